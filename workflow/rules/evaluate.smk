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
        args=lambda w: stages.evaluate(config, w.dataset),
        prob=lambda w, input: input.done.replace(".done", ".ome.zarr"),
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
        logged(
            "unet-pipeline evaluate --prob {params.prob} --labels {input.labels} {params.args}"
            " --out-json {output.json} --out-slices {output.slices} --out-curves {output.curves}"
            " --out-plot {output.plot} --workers {threads}"
        )
