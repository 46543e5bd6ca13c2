rule weights:
    """The paper's per-pixel weight maps (class balance + border term)."""
    input:
        labels=f"{R}/{{dataset}}/labels.ome.zarr",
    output:
        weights=directory(f"{R}/{{dataset}}/weights.ome.zarr"),
    params:
        w0=config["weights"]["w0"],
        sigma=config["weights"]["sigma_px"],
        label_format=lambda w: DATASETS[w.dataset]["label_format"],
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
        "unet-pipeline weights --labels {input.labels} --out {output.weights} --w0 {params.w0}"
        " --sigma-px {params.sigma} --label-format {params.label_format} > {log} 2>&1"
