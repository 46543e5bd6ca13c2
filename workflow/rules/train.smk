rule train:
    """Train the U-Net; resumes from last.pt when a run on the same data and config was interrupted."""
    input:
        raw=expand(f"{R}/{{dataset}}/raw.ome.zarr", dataset=TRAINING),
        labels=expand(f"{R}/{{dataset}}/labels.ome.zarr", dataset=TRAINING),
        weights=expand(f"{R}/{{dataset}}/weights.ome.zarr", dataset=TRAINING),
    output:
        model=f"{R}/model/model.pt",
        log_csv=f"{R}/model/training_log.csv",
        segmentation=f"{R}/model/segmentation.json",
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
