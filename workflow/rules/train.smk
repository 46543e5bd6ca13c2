rule train:
    """Train the U-Net; resumes from last.pt when a run on the same data and config was interrupted."""
    input:
        raw=expand(f"{R}/{{dataset}}/raw.ome.zarr", dataset=TRAINING),
        labels=expand(f"{R}/{{dataset}}/labels.ome.zarr", dataset=TRAINING),
        weights=expand(f"{R}/{{dataset}}/weights.ome.zarr", dataset=TRAINING),
    output:
        model=f"{R}/model/model.pt",
        log_csv=f"{R}/model/training_log.csv",
    params:
        args=stages.train(config),
        out=lambda w, output: os.path.dirname(output.model),
    log:
        f"{R}/logs/train.log",
    benchmark:
        f"{R}/benchmarks/train.tsv"
    threads: GPU_JOB_CPUS
    resources:
        mem_mb=8000,
        runtime=train_runtime_min(),
        gpu=gpu_count(),
        **cluster_resources(gpu=True),
    shell:
        logged(
            f"{UNET} train {{params.args}} --out {{params.out:q}} --resume --threads {{threads}} --no-progress"
        )


rule calibrate:
    """Choose the segmentation settings (`auto`) on the validation slices, predicted as predict will predict.

    A job of its own: a change of predict's tile size, TTA, dtype or
    precision chooses again here and never retrains the network.
    """
    input:
        model=f"{R}/model/model.pt",
        raw=expand(f"{R}/{{dataset}}/raw.ome.zarr", dataset=TRAINING),
        labels=expand(f"{R}/{{dataset}}/labels.ome.zarr", dataset=TRAINING),
    output:
        f"{R}/model/segmentation.json",
    params:
        args=stages.calibrate(config),
    log:
        f"{R}/logs/calibrate.log",
    benchmark:
        f"{R}/benchmarks/calibrate.tsv"
    threads: GPU_JOB_CPUS
    resources:
        mem_mb=lambda w: calibrate_mem_mb(),
        runtime=lambda w: calibrate_runtime_min(),
        gpu=1,
        **cluster_resources(gpu=True),
    shell:
        logged(
            f"{UNET} calibrate --checkpoint {{input.model:q}} {{params.args}} --out {{output:q}} --threads {{threads}}"
        )
