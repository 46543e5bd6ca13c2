rule evaluate:
    """ISBI 2012 metrics on the dataset's test slices."""
    input:
        done=f"{R}/{{dataset}}/probabilities.done",
        labels=f"{R}/{{dataset}}/labels.ome.zarr",
    output:
        json=f"{R}/{{dataset}}/metrics/metrics.json",
        slices=f"{R}/{{dataset}}/metrics/per_slice.csv",
        curves=f"{R}/{{dataset}}/metrics/curves.csv",
        plot=f"{R}/{{dataset}}/metrics/curves.png",
    params:
        prob=f"{R}/{{dataset}}/probabilities.ome.zarr",
        slices=lambda w: json.dumps(DATASETS[w.dataset]["test"]) if isinstance(DATASETS[w.dataset]["test"], list) else DATASETS[w.dataset]["test"],
    log:
        f"{R}/logs/evaluate/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{dataset}}.tsv"
    threads: config["evaluate"]["workers"]
    resources:
        mem_mb=4000,
        runtime=60,
        **cluster_resources(gpu=False),
    shell:
        "unet-pipeline evaluate --prob {params.prob} --labels {input.labels} --slices '{params.slices}'"
        " --out-json {output.json} --out-slices {output.slices} --out-curves {output.curves}"
        " --out-plot {output.plot} --workers {threads} > {log} 2>&1"
