# Segmentation in three steps: label blocks (parts), join labels across block faces (one small job),
# write each block's final ids (parts); `finish` then builds the pyramid and publishes the store.


rule segment_label:
    """One part: label blocks of the probability map on their own; local ids and block faces kept."""
    input:
        prob=f"{R}/{{dataset}}/probabilities.ome.zarr",
    output:
        marker=temp(f"{R}/{{dataset}}/.parts/segmentation/label-{{part}}.json"),
    params:
        args=stages.segment(config),
        out=lambda w: store_path(w.dataset, "segmentation"),
        part=lambda w: f"{w.part}/{PLANS[w.dataset].segmentation.write.parts}",
    log:
        f"{R}/logs/segment_label/{{dataset}}-{{part}}.log",
    benchmark:
        f"{R}/benchmarks/segment_label/{{dataset}}-{{part}}.tsv"
    threads: CPU_JOB_CPUS
    resources:
        mem_mb=lambda w: PLANS[w.dataset].segmentation.write.job.mem_mb,
        runtime=lambda w: PLANS[w.dataset].segmentation.write.job.runtime,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} segment --step label --prob {{input.prob:q}} --out {{params.out:q}} {{params.args}}"
            " --part {params.part} --threads {threads} --summary {output.marker:q}"
        )


rule segment_join:
    """Join labels that touch across block faces into cells: memory grows with the faces, not the voxels."""
    input:
        prob=f"{R}/{{dataset}}/probabilities.ome.zarr",
        labelled=lambda w: markers(w.dataset, "segmentation", "label", PLANS[w.dataset].segmentation.write.parts),
    output:
        marker=temp(f"{R}/{{dataset}}/.parts/segmentation/join.json"),
    params:
        args=stages.segment(config),
        out=lambda w: store_path(w.dataset, "segmentation"),
    log:
        f"{R}/logs/segment_join/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/segment_join/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=lambda w: PLANS[w.dataset].join.mem_mb,
        runtime=lambda w: PLANS[w.dataset].join.runtime,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} segment --step join --prob {{input.prob:q}} --out {{params.out:q}} {{params.args}}"
            " --threads {threads} --summary {output.marker:q}"
        )


rule segment_relabel:
    """One part: write blocks with their final cell ids."""
    input:
        prob=f"{R}/{{dataset}}/probabilities.ome.zarr",
        joined=f"{R}/{{dataset}}/.parts/segmentation/join.json",
    output:
        marker=temp(f"{R}/{{dataset}}/.parts/segmentation/write-{{part}}.json"),
    params:
        args=stages.segment(config),
        out=lambda w: store_path(w.dataset, "segmentation"),
        part=lambda w: f"{w.part}/{PLANS[w.dataset].segmentation.write.parts}",
    log:
        f"{R}/logs/segment_relabel/{{dataset}}-{{part}}.log",
    benchmark:
        f"{R}/benchmarks/segment_relabel/{{dataset}}-{{part}}.tsv"
    threads: CPU_JOB_CPUS
    resources:
        mem_mb=lambda w: PLANS[w.dataset].segmentation.write.job.mem_mb,
        runtime=lambda w: PLANS[w.dataset].segmentation.write.job.runtime,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} segment --step relabel --prob {{input.prob:q}} --out {{params.out:q}} {{params.args}}"
            " --part {params.part} --threads {threads} --summary {output.marker:q}"
        )
