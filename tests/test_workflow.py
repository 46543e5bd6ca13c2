"""The whole Snakemake workflow on a tiny synthetic config, as a user runs it."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from unet_pipeline import io, provenance
from unet_pipeline.synthetic import synthesize_labels_and_raw

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "results_dir": "results",
    "synthetic": {"train": {"slices": 3, "shape": [64, 80], "seed": 1, "cell_diameter_px": 20},
                  "test": {"slices": 2, "shape": [64, 80], "seed": 2, "cell_diameter_px": 20}},
    "datasets": {
        "train": {"raw": "results/synthetic/train/raw.tif", "labels": "results/synthetic/train/labels.tif",
                  "train": "0-1", "validate": "2", "predict": False},
        "test": {"raw": "results/synthetic/test/raw.tif", "labels": "results/synthetic/test/labels.tif",
                 "test": "all"},
    },
    "preprocess": {"chunks": [1, 32, 32]},
    "model": {"depth": 2, "base_channels": 4},
    "train": {"steps": 6, "tile_size": 20, "validate_every": 3, "checkpoint_every": 3, "device": "cpu"},
    "predict": {"tile_size": 36, "chunks": [1, 32, 48], "chunks_per_file": [1, 1, 1], "shards": 2},
}


def snakemake(workdir: Path, *args):
    bin_dir = Path(sys.executable).parent
    env_path = f"{bin_dir}:{__import__('os').environ['PATH']}"
    return subprocess.run(
        [str(bin_dir / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "config.yaml"), "--cores", "2", "--resources", "gpu=1", *args],
        capture_output=True, text=True, env={**__import__("os").environ, "PATH": env_path},
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One whole run of the tiny workflow, shared by the tests below; tests that change it work on a copy."""
    workdir = tmp_path_factory.mktemp("finished")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir, run


def _copy(workdir: Path, tmp_path: Path) -> Path:
    """A copy of a finished run (outputs, times and Snakemake's records), to change without touching the original."""
    target = tmp_path / "run"
    shutil.copytree(workdir, target, symlinks=True)
    return target


def _with(config: dict, section: str, **values) -> dict:
    return {**config, section: {**config.get(section, {}), **values}}


def planned_jobs(workdir: Path, config: dict) -> dict[str, int]:
    """Jobs a dry run with `config` would run, by rule (Snakemake's job stats table)."""
    (workdir / "changed.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "changed.yaml"), "--cores", "2", "-n", "--quiet", "rules"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout + run.stderr
    if "Nothing to be done" in text:
        return {}
    rows = re.findall(r"^(\w+)\s+(\d+)$", text.split("Job stats:")[1], flags=re.M)
    return {rule: int(n) for rule, n in rows if rule != "total"}


@pytest.mark.slow
def test_whole_workflow_runs_and_outputs_open_in_ome_zarr_reader(finished_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    workdir, run = finished_run
    assert "report:" in run.stdout + run.stderr
    results = workdir / "results"
    metrics = json.loads((results / "test" / "metrics" / "metrics.json").read_text())
    assert 0 <= metrics["rand_error"] <= 1 and metrics["slices"] == [0, 1]
    for name in ("raw", "probabilities", "segmentation"):
        nodes = list(Reader(parse_url(str(results / "test" / f"{name}.ome.zarr")))())
        assert nodes and nodes[0].data[0].shape == (2, 64, 80), name
    assert (results / "report" / "report.md").read_text().count("| test |") == 1
    # Everything is up to date: a second run does nothing.
    again = snakemake(workdir, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    # The checkpoint holds the resolved training config; predict checks it against its own.
    from unet_pipeline.checkpoint import load_checkpoint

    stored = load_checkpoint(results / "model" / "model.pt")["config"]
    assert stored["train"]["steps"] == TINY["train"]["steps"] and set(stored["datasets"]) == {"train"}


PREDICTION = {"predict_init": 1, "predict": 2, "predict_gather": 1, "segment": 1, "evaluate": 1, "report": 1, "all": 1}
TRAINING = {"train": 1, **PREDICTION}


@pytest.mark.slow
@pytest.mark.parametrize("section, values, expected", [
    ("predict", {"tile_size": 52}, PREDICTION),
    ("predict", {"tta": "flips"}, PREDICTION),
    ("predict", {"dtype": "uint8"}, PREDICTION),
    ("preprocess", {"chunks": [1, 16, 16]},
     {"preprocess": 2, "preprocess_labels": 2, "weights": 1, **TRAINING}),
    ("train", {"steps": 7}, TRAINING),
    ("weights", {"w0": 5}, {"weights": 1, **TRAINING}),
    ("segment", {"threshold": 0.6}, {"segment": 1, "report": 1, "all": 1}),
    # Speed settings only: nothing reruns.
    ("predict", {"writers": 3, "batch_size": 2, "compile": True}, {}),
])
def test_a_config_change_reruns_exactly_the_jobs_it_affects(finished_run, section, values, expected):
    workdir, _ = finished_run
    assert planned_jobs(workdir, _with(TINY, section, **values)) == expected


@pytest.mark.slow
def test_changed_test_slices_rerun_only_evaluation(finished_run):
    workdir, _ = finished_run
    datasets = {**TINY["datasets"], "test": {**TINY["datasets"]["test"], "test": "1"}}
    assert planned_jobs(workdir, {**TINY, "datasets": datasets}) == {"evaluate": 1, "report": 1, "all": 1}


@pytest.mark.slow
def test_a_replaced_raw_stack_is_predicted_again(finished_run, tmp_path):
    # Issue 12.1: a stack replaced by another of the same shape must not keep the old prediction.
    workdir = _copy(finished_run[0], tmp_path)
    results = workdir / "results"
    before = io.open_ome_image(results / "test" / "probabilities.ome.zarr")[...]
    raw, _ = synthesize_labels_and_raw(2, (64, 80), seed=9, cell_diameter_px=20)
    tifffile.imwrite(results / "synthetic" / "test" / "raw.tif", raw, photometric="minisblack")
    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    after = io.open_ome_image(results / "test" / "probabilities.ome.zarr")
    shards = [json.loads((results / "test" / "predict" / f"shard-{i}-of-2.json").read_text()) for i in range(2)]
    assert all(s["blocks_skipped"] == 0 and s["blocks_computed"] == s["blocks_total"] for s in shards)
    assert not np.array_equal(before, after[...])
    raw_fingerprint = provenance.store_fingerprint(results / "test" / "raw.ome.zarr")
    assert io.store_attrs(results / "test" / "probabilities.ome.zarr")["input_fingerprint"] == raw_fingerprint


@pytest.mark.slow
def test_retraining_after_new_weight_maps_trains_a_full_run(finished_run, tmp_path):
    # Issue 12.2: a rerun of train (new weight maps) used to "resume" the finished last.pt for zero
    # steps, crash on the empty log, and keep crashing; it must train again on the new data.
    workdir = _copy(finished_run[0], tmp_path)
    (workdir / "config.yaml").write_text(yaml.safe_dump(_with(TINY, "weights", w0=5)))
    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (workdir / "results" / "model" / "training_log.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in log[1:]][-1] == TINY["train"]["steps"] and len(log) > 2
    assert "resuming" not in (workdir / "results" / "logs" / "train.log").read_text()


@pytest.mark.slow
def test_a_stage_error_reaches_the_terminal(tmp_path):
    # Issue 12.4: the stage's one-sentence error, not only Snakemake's "non-zero exit status".
    raw, labels = synthesize_labels_and_raw(2, (64, 80), seed=1, cell_diameter_px=20)
    labels[0, 0, 0] = 17
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    config = {**TINY, "synthetic": {}, "datasets": {
        "bad": {"raw": str(tmp_path / "raw.tif"), "labels": str(tmp_path / "labels.tif"), "train": "0"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path, "--printshellcmds", "results/bad/labels.ome.zarr")  # a flag ends --resources
    assert run.returncode != 0
    assert "labels.tif (slice 0): labels are not binary" in run.stderr


@pytest.mark.slow
def test_bad_config_stops_with_the_key_named(tmp_path):
    bad = dict(TINY, predict={**TINY["predict"], "tile_size": 37})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(bad))
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0 and "predict.tile_size" in run.stderr + run.stdout


def test_dry_run_on_a_fresh_directory_lists_every_job(tmp_path):
    # Resources computed from inputs (predict's runtime) must not fail before the inputs exist.
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    run = snakemake(tmp_path, "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    for rule in ("synth", "train", "predict_init", "predict", "predict_gather", "report"):
        assert f"rule {rule}:" in run.stdout + run.stderr, rule
