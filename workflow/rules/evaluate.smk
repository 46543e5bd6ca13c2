rule evaluate:
    """ISBI 2012 metrics on the test slices: of the probability map (best threshold per metric, each named) and of
    the segmentation as written."""
    input:
        prob=f"{R}/{{dataset}}/probabilities.ome.zarr",
        seg=f"{R}/{{dataset}}/segmentation.ome.zarr",
        labels=f"{R}/{{dataset}}/labels.ome.zarr",
    output:
        json=f"{R}/{{dataset}}/metrics/metrics.json",
        slices=f"{R}/{{dataset}}/metrics/per_slice.csv",
        curves=f"{R}/{{dataset}}/metrics/curves.csv",
        plot=f"{R}/{{dataset}}/metrics/curves.png",
    params:
        args=lambda w: stages.evaluate(config, w.dataset),
    log:
        f"{R}/logs/evaluate/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{dataset}}.tsv"
    threads: config["evaluate"]["processes"]
    resources:
        mem_mb=4000,
        runtime=60,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} evaluate --prob {{input.prob:q}} --segmentation {{input.seg:q}} --labels {{input.labels:q}}"
            " {params.args}"
            " --out-json {output.json:q} --out-slices {output.slices:q} --out-curves {output.curves:q}"
            " --out-plot {output.plot:q}"
        )
