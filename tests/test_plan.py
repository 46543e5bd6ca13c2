"""What the workflow asks of a cluster, planned from a stack's header before anything runs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import zarr

from unet_pipeline.config import validate_config
from unet_pipeline.errors import ConfigError
from unet_pipeline.resources import Planner, dataset_plan

REPO = Path(__file__).resolve().parents[1]
TERABYTE = (2000, 20000, 25000)  # 10^12 voxels of uint8


def _config(datasets: dict, **sections) -> dict:
    train = {"raw": "results/synthetic/train/raw.tif", "labels": "results/synthetic/train/labels.tif",
             "train": "0-7", "validate": "8-9", "predict": False}
    return {"synthetic": {"train": {"slices": 10, "shape": [256, 256]}}, "datasets": {"train": train, **datasets},
            "preprocess": {"voxel_size_nm": [50, 4, 4]}, **sections}


def _dry_run_jobs(workdir: Path, config: dict) -> list[tuple[str, dict]]:
    """Every job of a dry run through profiles/slurm, as (rule, resources)."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "config.yaml"), "--profile", str(REPO / "profiles" / "slurm"), "-n"],
        capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    jobs = []
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n(.*?)(?=\n\n|\nShell command)", run.stdout + run.stderr,
                                 flags=re.S | re.M):
        found = re.search(r"resources: (.*)", body)
        resources = dict(kv.split("=", 1) for kv in found.group(1).split(", ") if "=" in kv) if found else {}
        jobs.append((rule, resources))
    return jobs


def test_a_terabyte_is_planned_as_many_jobs_none_over_4_hours_or_64_gb(tmp_path):
    zarr.create_array(str(tmp_path / "em.zarr"), shape=TERABYTE, chunks=(1, 1024, 1024), dtype="u1")  # no data
    jobs = _dry_run_jobs(tmp_path, _config({"terabyte": {"raw": str(tmp_path / "em.zarr")}}))
    count = {}
    for rule, resources in jobs:
        count[rule] = count.get(rule, 0) + 1
        if rule != "all":
            assert int(resources["runtime"]) <= 240 and int(resources["mem_mb"]) <= 64000, (rule, resources)
    for rule in ("preprocess", "pyramid", "predict", "segment_label", "segment_relabel"):
        assert count[rule] > 1, (rule, count)
    assert count["segment_join"] == 1 and count["finish"] == 2 + 3  # train: raw, labels; terabyte: raw, probabilities, segmentation


def test_parts_follow_the_volume_and_the_measured_throughput():
    config = validate_config(_config({}))
    small = Planner(config, (10, 256, 256)).preprocess(1, "small")
    large = Planner(config, TERABYTE).preprocess(1, "large")
    assert small.parts == 1 and large.parts == pytest.approx(1e12 / (20e6 * 3600), abs=1)
    assert large.job.runtime <= 10 + 1.5 * 60 + 1  # about cluster.job_minutes, with the margin
    faster = validate_config(_config({}, cluster={"throughput_mvoxel_per_s": {"preprocess": 40}}))
    assert Planner(faster, TERABYTE).preprocess(1, "large").parts == pytest.approx(large.parts / 2, abs=1)


def test_relabel_parts_ask_for_a_lookup_not_for_a_watershed():
    # The relabel parts cover the label parts' blocks, but only look ids up: at the default throughputs
    # (segment 20, watershed 4 Mvoxel/s) a fifth of the label parts' time, and no halo in memory.
    config = validate_config(_config({}))
    plan = dataset_plan(config, "train", TERABYTE, True)
    label = plan.segmentation.write
    voxels_per_part = 1e12 / label.parts
    assert plan.relabel.runtime == 10 + -(-1.5 * voxels_per_part // (20e6 * 60))
    assert label.job.runtime == 10 + -(-1.5 * voxels_per_part // (4e6 * 60))
    # the 4.3 GB stack of benchmarks/workflow_scale.py: a relabel part peaked at 478 MB (1 thread), a label part
    # at 929 MB
    scale = dataset_plan(config, "train", (64, 8192, 8192), True)
    assert 478 < scale.relabel.mem_mb < scale.segmentation.write.job.mem_mb
    threshold = dataset_plan(validate_config(_config({}, segment={"method": "threshold"})), "train", TERABYTE, True)
    assert threshold.relabel.runtime == threshold.segmentation.write.job.runtime  # both at the segment speed


def test_memory_does_not_grow_with_slices_but_with_the_block_and_the_width():
    config = validate_config(_config({}))
    base = Planner(config, (100, 8192, 8192)).predict().job.mem_mb
    assert Planner(config, (10_000, 8192, 8192)).predict().job.mem_mb == base
    assert Planner(config, (100, 8192, 65536)).predict().job.mem_mb > base


def test_a_plan_over_the_sites_limits_is_refused_naming_the_setting(tmp_path):
    config = validate_config(_config({}, predict={"parts": 2}))
    with pytest.raises(ConfigError, match=r"predict: one job would need \d+ min, more than cluster.max_job_minutes "
                                          r"\(240\); raise predict.parts"):
        Planner(config, TERABYTE).predict()
    wide = validate_config(_config({}, cluster={"max_job_mem_mb": 2000}))
    with pytest.raises(ConfigError, match="more than cluster.max_job_mem_mb"):
        dataset_plan(wide, "train", (10, 4096, 400_000), True)
