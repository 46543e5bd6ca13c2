# Segmentation in three steps: label blocks (parts), join labels across block borders (one small job),
# write each block's final ids (parts); `finish` then builds the pyramid and publishes the store.
# Settings left at `auto` are those chosen on the validation slices by the calibrate job (train.smk).


rule segment_label:
    """One part: label blocks of the probability map (threshold or watershed); local ids and borders kept."""
    input:
        prob=f"{R}/{{dataset}}/probabilities.ome.zarr",
        calibration=f"{R}/model/segmentation.json",
    output:
        marker=temp(f"{R}/{{dataset}}/.parts/segmentation/label-{{part}}.json"),
    params:
        args=stages.segment(config),
        out=lambda w: store_path(w.dataset, "segmentation"),
        part=part_arg,
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
            " --calibration {input.calibration:q}"
            " --part {params.part} --threads {threads} --summary {output.marker:q}"
        )


rule segment_join:
    """Join the labels of one cell across blocks: memory grows with the block borders, not the voxels."""
    input:
        prob=f"{R}/{{dataset}}/probabilities.ome.zarr",
        calibration=f"{R}/model/segmentation.json",
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
            " --calibration {input.calibration:q}"
            " --threads {threads} --summary {output.marker:q}"
        )


rule segment_relabel:
    """One part: write blocks with their final cell ids."""
    input:
        prob=f"{R}/{{dataset}}/probabilities.ome.zarr",
        calibration=f"{R}/model/segmentation.json",
        joined=f"{R}/{{dataset}}/.parts/segmentation/join.json",
    output:
        marker=temp(f"{R}/{{dataset}}/.parts/segmentation/write-{{part}}.json"),
    params:
        args=stages.segment(config),
        out=lambda w: store_path(w.dataset, "segmentation"),
        part=part_arg,
    log:
        f"{R}/logs/segment_relabel/{{dataset}}-{{part}}.log",
    benchmark:
        f"{R}/benchmarks/segment_relabel/{{dataset}}-{{part}}.tsv"
    threads: CPU_JOB_CPUS
    resources:
        mem_mb=lambda w: PLANS[w.dataset].relabel.mem_mb,
        runtime=lambda w: PLANS[w.dataset].relabel.runtime,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} segment --step relabel --prob {{input.prob:q}} --out {{params.out:q}} {{params.args}}"
            " --calibration {input.calibration:q}"
            " --part {params.part} --threads {threads} --summary {output.marker:q}"
        )
