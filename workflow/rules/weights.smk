rule weights:
    """The paper's per-pixel weight maps (class balance + border term)."""
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
        mem_mb=4000,
        runtime=60,
        **cluster_resources(gpu=False),
    shell:
        logged("unet-pipeline weights --labels {input.labels} --out {output.weights} {params.args}")
