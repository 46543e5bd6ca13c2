rule segment:
    """Threshold + connected components, consistent across chunks, as an OME-Zarr label image."""
    input:
        done=f"{R}/{{dataset}}/probabilities.done",
    output:
        seg=directory(f"{R}/{{dataset}}/segmentation.ome.zarr"),
    params:
        prob=f"{R}/{{dataset}}/probabilities.ome.zarr",
        threshold=config["segment"]["threshold"],
        connectivity=config["segment"]["connectivity"],
    log:
        f"{R}/logs/segment/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/segment/{{dataset}}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        **cluster_resources(gpu=False),
    shell:
        "unet-pipeline segment --prob {params.prob} --out {output.seg} --threshold {params.threshold}"
        " --connectivity {params.connectivity} --workers {threads} > {log} 2>&1"
