rule preprocess:
    """One part of the raw stack (TIFF, TIFF folder, Zarr or OME-Zarr) copied into the raw OME-Zarr, with its
    share of the normalisation statistics; `finish` publishes the store."""
    input:
        raw=raw_source,
    output:
        marker=temp(f"{R}/{{dataset}}/.parts/raw/write-{{part}}.json"),
    params:
        args=lambda w: stages.preprocess(config, w.dataset),
        source=lambda w: stages.source_identity(config, DATASETS[w.dataset]["raw"]),  # a replaced stack reruns
        out=lambda w: store_path(w.dataset, "raw"),
        part=part_arg,
    log:
        f"{R}/logs/preprocess/{{dataset}}-{{part}}.log",
    benchmark:
        f"{R}/benchmarks/preprocess/{{dataset}}-{{part}}.tsv"
    threads: CPU_JOB_CPUS
    resources:
        mem_mb=lambda w: PLANS[w.dataset].raw.write.job.mem_mb,
        runtime=lambda w: PLANS[w.dataset].raw.write.job.runtime,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} preprocess --raw {{input.raw:q}} --out {{params.out:q}} --part {{params.part}} {{params.args}}"
            " --threads {threads} --summary {output.marker:q}"
        )


rule preprocess_labels:
    """One part of the label stack, checked against the raw stack (shape, binary values), into the labels OME-Zarr."""
    input:
        raw=raw_source,
        labels=labels_source,
    output:
        marker=temp(f"{R}/{{dataset}}/.parts/labels/write-{{part}}.json"),
    params:
        args=lambda w: stages.preprocess_labels(config, w.dataset),
        source=lambda w: stages.source_identity(config, DATASETS[w.dataset]["labels"]),
        out=lambda w: store_path(w.dataset, "labels"),
        part=part_arg,
    log:
        f"{R}/logs/preprocess_labels/{{dataset}}-{{part}}.log",
    benchmark:
        f"{R}/benchmarks/preprocess_labels/{{dataset}}-{{part}}.tsv"
    threads: CPU_JOB_CPUS
    resources:
        mem_mb=lambda w: PLANS[w.dataset].labels.write.job.mem_mb,
        runtime=lambda w: PLANS[w.dataset].labels.write.job.runtime,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} preprocess --raw {{input.raw:q}} --labels {{input.labels:q}} --out {{params.out:q}}"
            " --part {params.part} {params.args} --threads {threads} --summary {output.marker:q}"
        )
