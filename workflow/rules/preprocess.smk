PRE = config["preprocess"]
CHUNKS = ",".join(map(str, PRE["chunks"]))
CHUNKS_PER_FILE = ",".join(map(str, PRE["chunks_per_file"]))
VOXEL = ",".join(map(str, PRE["voxel_size_nm"]))


rule preprocess:
    """Raw stack (TIFF, TIFF folder or Zarr) -> chunked OME-Zarr with normalisation statistics."""
    input:
        raw=raw_source,
    output:
        raw=directory(f"{R}/{{dataset}}/raw.ome.zarr"),
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
        "unet-pipeline preprocess --raw {input.raw} --out-raw {output.raw}"
        " --chunks {CHUNKS} --chunks-per-file {CHUNKS_PER_FILE} --voxel-size {VOXEL} > {log} 2>&1"


rule preprocess_labels:
    """Labels, checked against the raw stack (shape, binary values), as OME-Zarr."""
    input:
        raw=raw_source,
        labels=labels_source,
    output:
        labels=directory(f"{R}/{{dataset}}/labels.ome.zarr"),
    params:
        label_format=lambda w: DATASETS[w.dataset]["label_format"],
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
        "unet-pipeline preprocess --raw {input.raw} --labels {input.labels} --out-labels {output.labels}"
        " --chunks {CHUNKS} --chunks-per-file {CHUNKS_PER_FILE} --voxel-size {VOXEL} --label-format {params.label_format} > {log} 2>&1"
