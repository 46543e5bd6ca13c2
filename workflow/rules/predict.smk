rule predict_init:
    """Create the probability store once, replacing one left by another input, model or config."""
    input:
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
        model=f"{R}/model/model.pt",
    output:
        init=f"{R}/{{dataset}}/predict/init.json",
    params:
        args=stages.predict(config),
        out=lambda w, output: os.path.join(os.path.dirname(os.path.dirname(output.init)), "probabilities.ome.zarr"),
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
        logged(
            "unet-pipeline predict --raw {input.raw} --checkpoint {input.model} --out {params.out} {params.args}"
            " --init-only --overwrite --summary {output.init}"
        )


rule predict:
    """One shard of the overlap-tile prediction; all shards write into one OME-Zarr."""
    input:
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
        model=f"{R}/model/model.pt",
        init=f"{R}/{{dataset}}/predict/init.json",
    output:
        summary=f"{R}/{{dataset}}/predict/shard-{{shard}}-of-{SHARDS}.json",
    params:
        args=stages.predict(config),
        out=lambda w, input: os.path.join(os.path.dirname(os.path.dirname(input.init)), "probabilities.ome.zarr"),
        shard=lambda w: f"{w.shard}/{SHARDS}",
    log:
        f"{R}/logs/predict/{{dataset}}-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/predict/{{dataset}}-{{shard}}.tsv"
    threads: GPU_JOB_CPUS
    resources:
        mem_mb=predict_mem_mb,
        runtime=predict_runtime_min,
        gpu=1,
        **stages.predict_speed(config),
        **cluster_resources(gpu=True),
    shell:
        logged(
            "unet-pipeline predict --raw {input.raw} --checkpoint {input.model} --out {params.out} {params.args}"
            " --shard {params.shard} --batch-size {resources.predict_batch} --workers {resources.predict_writers}"
            " --compile {resources.predict_compile} --threads {threads} --summary {output.summary} --no-progress"
        )


rule predict_gather:
    """All shards done: build the multiscale pyramid and mark the probability map complete."""
    input:
        expand(f"{R}/{{{{dataset}}}}/predict/shard-{{shard}}-of-{SHARDS}.json", shard=range(SHARDS)),
    output:
        done=f"{R}/{{dataset}}/probabilities.done",
    params:
        args=stages.gather(config),
        out=lambda w, output: output.done.replace(".done", ".ome.zarr"),
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
        logged("unet-pipeline gather --out {params.out} {params.args} --done-file {output.done}")
