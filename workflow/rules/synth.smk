rule synth:
    """Built-in EM-like data with exact ground truth (the default run's input)."""
    output:
        raw=f"{R}/synthetic/{{name}}/raw.tif",
        labels=f"{R}/synthetic/{{name}}/labels.tif",
    params:
        args=lambda w: stages.synth(config, w.name),
    log:
        f"{R}/logs/synth/{{name}}.log",
    benchmark:
        f"{R}/benchmarks/synth/{{name}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **cluster_resources(gpu=False),
    shell:
        logged(f"{UNET} synth --out-raw {{output.raw:q}} --out-labels {{output.labels:q}} {{params.args}}")
