rule predict:
    """One part of the overlap-tile prediction (one GPU job on a cluster); all parts fill one store."""
    input:
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
        model=f"{R}/model/model.pt",
    output:
        marker=temp(f"{R}/{{dataset}}/.parts/probabilities/write-{{part}}.json"),
    params:
        args=stages.predict(config),
        out=lambda w: store_path(w.dataset, "probabilities"),
        part=part_arg,
    log:
        f"{R}/logs/predict/{{dataset}}-{{part}}.log",
    benchmark:
        f"{R}/benchmarks/predict/{{dataset}}-{{part}}.tsv"
    threads: GPU_JOB_CPUS
    resources:
        mem_mb=lambda w: PLANS[w.dataset].probabilities.write.job.mem_mb,
        runtime=lambda w: PLANS[w.dataset].probabilities.write.job.runtime,
        gpu=1,
        **stages.predict_speed(config),
        **cluster_resources(gpu=True),
    shell:
        logged(
            f"{UNET} predict --raw {{input.raw:q}} --checkpoint {{input.model:q}} --out {{params.out:q}}"
            " {params.args} --part {params.part} --batch-size {resources.predict_batch}"
            " --writers {resources.predict_writers} --compile {resources.predict_compile} --threads {threads}"
            " --summary {output.marker:q} --no-progress"
        )
