# What every block-wise store shares (raw, labels, probabilities, segmentation): pyramid levels too large
# for one job get jobs of their own; `finish` checks every block, builds the remaining levels and
# publishes the store under its final name.


rule pyramid:
    """One part of a pyramid level of a store being written (only levels too large for the finishing job)."""
    input:
        below=lambda w: level_markers(w.dataset, w.store, int(w.level) - 1),
    output:
        marker=temp(f"{R}/{{dataset}}/.parts/{{store}}/level{{level}}-{{part}}.json"),
    params:
        part=part_arg,
    log:
        f"{R}/logs/pyramid/{{dataset}}-{{store}}-{{level}}-{{part}}.log",
    benchmark:
        f"{R}/benchmarks/pyramid/{{dataset}}-{{store}}-{{level}}-{{part}}.tsv"
    threads: CPU_JOB_CPUS
    resources:
        mem_mb=lambda w: store_plan(w).pyramid_job.mem_mb,
        runtime=lambda w: store_plan(w).pyramid_job.runtime,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} pyramid --from {{input.below[0]:q}} --level {{wildcards.level}} --part {{params.part}}"
            " --threads {threads} --summary {output.marker:q}"
        )


rule finish:
    """Check every block of the store, build its remaining pyramid levels, publish it under its final name."""
    input:
        markers=finish_markers,
        upstream=finish_upstream,
    output:
        store=directory(f"{R}/{{dataset}}/{{store}}.ome.zarr"),
    params:
        settings=lambda w: stages.store_settings(config, w.dataset, w.store),  # a changed setting reruns the store
        first_unbuilt_level=lambda w: len(store_plan(w).pyramid_parts) + 1,
    log:
        f"{R}/logs/finish/{{dataset}}-{{store}}.log",
    benchmark:
        f"{R}/benchmarks/finish/{{dataset}}-{{store}}.tsv"
    threads: CPU_JOB_CPUS
    resources:
        mem_mb=lambda w: store_plan(w).finish.mem_mb,
        runtime=lambda w: store_plan(w).finish.runtime,
        **cluster_resources(gpu=False),
    shell:
        logged(
            f"{UNET} finish --from {{input.markers[0]:q}} --first-unbuilt-level {{params.first_unbuilt_level}}"
            " --threads {threads}"
        )
