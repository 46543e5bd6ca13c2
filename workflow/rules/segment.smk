rule segment:
    """Threshold + connected components, consistent across chunks, as an OME-Zarr label image."""
    input:
        done=f"{R}/{{dataset}}/probabilities.done",
    output:
        seg=directory(f"{R}/{{dataset}}/segmentation.ome.zarr"),
    params:
        args=stages.segment(config),
        prob=lambda w, input: input.done.replace(".done", ".ome.zarr"),
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
        logged("unet-pipeline segment --prob {params.prob} --out {output.seg} {params.args} --workers {threads}")
