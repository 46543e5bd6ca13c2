rule synth:
    """Built-in EM-like data with exact ground truth (the default run's input)."""
    output:
        raw=f"{R}/synthetic/{{name}}/raw.tif",
        labels=f"{R}/synthetic/{{name}}/labels.tif",
    params:
        spec=lambda w: config["synthetic"][w.name],
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
        "unet-pipeline synth --out-raw {output.raw} --out-labels {output.labels}"
        " --slices {params.spec[slices]} --shape {params.spec[shape][0]} {params.spec[shape][1]}"
        " --seed {params.spec[seed]} --cell-diameter-px {params.spec[cell_diameter_px]} > {log} 2>&1"
