PRED = config["predict"]
PREDICT_ARGS = (
    "--tile-size {PRED[tile_size]} --chunks {params.chunks} --chunks-per-file {params.chunks_per_file}"
    " --dtype {PRED[dtype]} --tta {PRED[tta]} --device {PRED[device]} --precision {PRED[precision]}"
    " --batch-size {PRED[batch_size]} --workers {PRED[writers]}" + (" --compile" if PRED["compile"] else "")
)


rule predict_init:
    """Create the probability store once, replacing one left by another model or config."""
    input:
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
        model=f"{R}/model/model.pt",
    output:
        init=f"{R}/{{dataset}}/predict/init.json",
    params:
        out=f"{R}/{{dataset}}/probabilities.ome.zarr",
        chunks=",".join(map(str, PRED["chunks"])),
        chunks_per_file=",".join(map(str, PRED["chunks_per_file"])),
        model=json.dumps(config["model"]),
    log:
        f"{R}/logs/predict_init/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/predict_init/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **cluster_resources(gpu=False),
    shell:
        "unet-pipeline predict --raw {input.raw} --checkpoint {input.model} --model '{params.model}'"
        " --out {params.out} " + PREDICT_ARGS + " --init-only --overwrite"
        " --summary {output.init} > {log} 2>&1"


rule predict:
    """One shard of the overlap-tile prediction; all shards write into one OME-Zarr."""
    input:
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
        model=f"{R}/model/model.pt",
        init=f"{R}/{{dataset}}/predict/init.json",
    output:
        summary=f"{R}/{{dataset}}/predict/shard-{{shard}}-of-{SHARDS}.json",
    params:
        out=f"{R}/{{dataset}}/probabilities.ome.zarr",
        chunks=",".join(map(str, PRED["chunks"])),
        chunks_per_file=",".join(map(str, PRED["chunks_per_file"])),
        model=json.dumps(config["model"]),
    log:
        f"{R}/logs/predict/{{dataset}}-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/predict/{{dataset}}-{{shard}}.tsv"
    threads: GPU_JOB_CPUS
    resources:
        mem_mb=predict_mem_mb,
        runtime=predict_runtime_min,
        gpu=1,
        **cluster_resources(gpu=True),
    shell:
        "unet-pipeline predict --raw {input.raw} --checkpoint {input.model} --model '{params.model}' --out {params.out}"
        " --shard {wildcards.shard}/{SHARDS} " + PREDICT_ARGS + " --threads {threads}"
        " --summary {output.summary} --no-progress > {log} 2>&1"


rule predict_gather:
    """All shards done: build the multiscale pyramid and mark the probability map complete."""
    input:
        expand(f"{R}/{{{{dataset}}}}/predict/shard-{{shard}}-of-{SHARDS}.json", shard=range(SHARDS)),
    output:
        done=f"{R}/{{dataset}}/probabilities.done",
    params:
        out=f"{R}/{{dataset}}/probabilities.ome.zarr",
    log:
        f"{R}/logs/predict_gather/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/predict_gather/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        **cluster_resources(gpu=False),
    shell:
        "unet-pipeline gather --out {params.out} --pyramid-levels {PRED[pyramid_levels]}"
        " --done-file {output.done} > {log} 2>&1"
