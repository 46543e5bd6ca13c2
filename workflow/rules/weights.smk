rule weights:
    """The paper's per-pixel weight maps (class balance + border term), for labelled training stacks."""
    input:
        labels=f"{R}/{{dataset}}/labels.ome.zarr",
    output:
        weights=directory(f"{R}/{{dataset}}/weights.ome.zarr"),
    params:
        args=lambda w: stages.weights(config, w.dataset),
    log:
        f"{R}/logs/weights/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/weights/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=lambda w: PLANS[w.dataset].weights.mem_mb,
        runtime=lambda w: PLANS[w.dataset].weights.runtime,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} weights --labels {{input.labels:q}} --out {{output.weights:q}} {{params.args}} --threads {{threads}}"
        )
