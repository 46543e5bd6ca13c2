"""The workflow through profiles/slurm on a real SLURM (tests/slurm/cluster.sh).

Checked from SLURM's own accounting: train and every predict part ran in the
gpu partition with one GPU each, the other rules in the CPU partition, predict
ran as the configured number of parts, the outputs equal a local run's, and
a predict part that fails once is retried without recomputing its finished
blocks.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.test_workflow import BARE_PATH, REPO, TINY, write_tiny

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
STATE = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/unet-slurm-pytest"))

CLUSTER_CONFIG = {"cpu_partition": "cpu", "gpu_partition": "gpu", "account": "unet", "gpu_job_cpus": 2}


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0 or shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("the test cluster needs root and Debian's packages")
    env = {**os.environ, "SLURM_TEST_DIR": str(STATE)}
    try:
        subprocess.run([str(CLUSTER_SH), "start"], check=True, env=env, timeout=600)
        yield {"SLURM_CONF": str(STATE / "slurm.conf")}
    finally:
        subprocess.run([str(CLUSTER_SH), "stop"], env=env, timeout=120)


def _run(workdir: Path, profile: str, extra_env: dict, *args):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **extra_env, "PATH": f"{BARE_PATH}:{os.environ['PATH'].replace(str(bin_dir) + ':', '')}"}
    return subprocess.run(
        [str(bin_dir / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--profile", str(REPO / "profiles" / profile), "--configfile", str(workdir / "config.yaml"), *args],
        capture_output=True, text=True, env=env, timeout=1500,
    )


def _workdir(tmp_path: Path, name: str) -> Path:
    return write_tiny(tmp_path / name, {**TINY, "cluster": CLUSTER_CONFIG})


def _sacct(env: dict, since_job: int = 0) -> list[dict]:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "--starttime", "now-1days", "-o", "JobID,Partition,AllocTRES,State,Comment"],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    ).stdout
    rows = []
    for line in out.strip().splitlines():
        job, partition, tres, state, comment = line.split("|")
        if int(job.split("_")[0]) > since_job:
            rows.append({"job": int(job.split("_")[0]), "partition": partition, "tres": tres, "state": state,
                         "rule": comment.removeprefix("rule_").split("_wildcards_")[0]})
    return rows


def _last_job(env: dict) -> int:
    rows = _sacct(env)
    return max((r["job"] for r in rows), default=0)


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory):
    """One whole workflow through SLURM, shared by the tests: (workdir, its SLURM jobs, the run)."""
    first = _last_job(slurm)
    workdir = _workdir(tmp_path_factory.mktemp("slurm"), "slurm")
    run = _run(workdir, "slurm", slurm, "--slurm-init-seconds-before-status-checks", "1")
    return workdir, [r for r in _sacct(slurm, first) if r["rule"]], run


def test_workflow_on_slurm_matches_local_run(slurm_run, finished_run):
    on_slurm, jobs, run = slurm_run
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    by_rule: dict[str, list] = {}
    for r in jobs:
        by_rule.setdefault(r["rule"], []).append(r)
    for rule in ("train", "calibrate", "predict"):
        for r in by_rule[rule]:
            assert r["partition"] == "gpu" and "gres/gpu=1" in r["tres"], r
    assert len(by_rule["predict"]) == TINY["predict"]["parts"]
    for rule in ("synth", "preprocess", "preprocess_labels", "weights", "finish", "segment_label", "segment_join",
                 "segment_relabel", "evaluate", "report"):
        assert rule in by_rule, rule
        for r in by_rule[rule]:
            assert r["partition"] == "cpu" and "gres/gpu" not in r["tres"], r
    assert all(r["state"] == "COMPLETED" for r in jobs)

    local = finished_run[0]  # the same config run locally (the cluster settings change no output)
    for name in ("probabilities", "segmentation"):
        a = zarr.open_group(str(on_slurm / "results" / "test" / f"{name}.ome.zarr"), mode="r")["0"][...]
        b = zarr.open_group(str(local / "results" / "test" / f"{name}.ome.zarr"), mode="r")["0"][...]
        assert np.array_equal(a, b), name
    metrics = [json.loads((w / "results" / "test" / "metrics" / "metrics.json").read_text())
               for w in (on_slurm, local)]
    assert metrics[0]["probability_map"] == metrics[1]["probability_map"]
    assert metrics[0]["segmentation"]["rand_error"] == metrics[1]["segmentation"]["rand_error"]


def test_failed_predict_part_is_retried_without_recomputing(slurm, slurm_run, tmp_path):
    # Start from the finished run's trained model (copied with its Snakemake metadata and
    # timestamps) with the prediction removed: only the predict parts and the store's finish rerun.
    done_run, _, run = slurm_run
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    workdir = tmp_path / "retry"
    shutil.copytree(done_run, workdir, symlinks=True)
    shutil.rmtree(workdir / "results" / "test" / "probabilities.ome.zarr")
    first = _last_job(slurm)
    fault = {**slurm, "UNET_PIPELINE_FAIL_AFTER_BLOCKS": "1", "UNET_PIPELINE_FAULT_MARKER": str(workdir / "fault")}
    run = _run(workdir, "slurm", fault, "--slurm-init-seconds-before-status-checks", "1",
               "results/test/probabilities.ome.zarr")
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert (workdir / "fault").exists()
    jobs = [r for r in _sacct(slurm, first) if r["rule"]]
    assert {r["rule"] for r in jobs} == {"predict", "finish"}, jobs
    predict = [r for r in jobs if r["rule"] == "predict"]
    assert [r["state"] for r in predict].count("FAILED") == 1
    assert len(predict) == TINY["predict"]["parts"] + 1
    logs = [p.read_text() for p in (workdir / "results" / "logs" / "predict").glob("test-*.log")]
    resumed = [re.search(r"(\d+) blocks computed, (\d+) already done", log) for log in logs]
    retried = [m for m in resumed if m and int(m.group(2)) > 0]
    assert len(retried) == 1 and int(retried[0].group(2)) >= 1
    again = zarr.open_group(str(workdir / "results" / "test" / "probabilities.ome.zarr"), mode="r")["0"][...]
    before = zarr.open_group(str(done_run / "results" / "test" / "probabilities.ome.zarr"), mode="r")["0"][...]
    assert np.array_equal(again, before)
