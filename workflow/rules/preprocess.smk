rule preprocess:
    """Raw stack (TIFF, TIFF folder or Zarr) -> chunked OME-Zarr with normalisation statistics."""
    input:
        raw=raw_source,
    output:
        raw=directory(f"{R}/{{dataset}}/raw.ome.zarr"),
    params:
        args=stages.preprocess(config),
    log:
        f"{R}/logs/preprocess/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/preprocess/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        **cluster_resources(gpu=False),
    shell:
        logged("unet-pipeline preprocess --raw {input.raw} --out-raw {output.raw} {params.args}")


rule preprocess_labels:
    """Labels, checked against the raw stack (shape, binary values), as OME-Zarr."""
    input:
        raw=raw_source,
        labels=labels_source,
    output:
        labels=directory(f"{R}/{{dataset}}/labels.ome.zarr"),
    params:
        args=lambda w: stages.preprocess_labels(config, w.dataset),
    log:
        f"{R}/logs/preprocess_labels/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/preprocess_labels/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        **cluster_resources(gpu=False),
    shell:
        logged(
            "unet-pipeline preprocess --raw {input.raw} --labels {input.labels} --out-labels {output.labels}"
            " {params.args}"
        )
