rule report:
    """Markdown summary: training curves, the metrics of maps and segmentations, both methods on one slice."""
    input:
        log_csv=f"{R}/model/training_log.csv",
        metrics=expand(f"{R}/{{dataset}}/metrics/metrics.json", dataset=EVALUATED),
        seg=f"{R}/{report_example()}/segmentation.ome.zarr",
        calibration=f"{R}/model/segmentation.json",
        labels=[f"{R}/{report_example()}/labels.ome.zarr"] if report_example() in LABELLED else [],
    output:
        report=f"{R}/report/report.md",
    params:
        metrics=shlex.join(f"{n}={R}/{n}/metrics/metrics.json" for n in EVALUATED),
        example=json.dumps({
            "dataset": report_example(),
            "raw": f"{R}/{report_example()}/raw.ome.zarr",
            "prob": f"{R}/{report_example()}/probabilities.ome.zarr",
            "seg": f"{R}/{report_example()}/segmentation.ome.zarr",
            "labels": f"{R}/{report_example()}/labels.ome.zarr" if report_example() in LABELLED else None,
            "calibration": f"{R}/model/segmentation.json",
            "slice": config["report"]["slice"],
        }),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} report --out {{output.report:q}} --log {{input.log_csv:q}} --metrics {{params.metrics}}"
            " --example {params.example:q}"
        )
