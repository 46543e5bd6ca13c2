"""The whole Snakemake workflow on a tiny synthetic config, as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


@pytest.mark.slow
def test_whole_workflow_runs_and_outputs_open_in_ome_zarr_reader(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    run = snakemake(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "report:" in run.stdout + run.stderr
    results = tmp_path / "results"
    metrics = json.loads((results / "test" / "metrics" / "metrics.json").read_text())
    assert 0 <= metrics["rand_error"] <= 1 and metrics["slices"] == [0, 1]
    for name in ("raw", "probabilities", "segmentation"):
        nodes = list(Reader(parse_url(str(results / "test" / f"{name}.ome.zarr")))())
        assert nodes and nodes[0].data[0].shape == (2, 64, 80), name
    assert (results / "report" / "report.md").read_text().count("| test |") == 1
    # Everything is up to date: a second run does nothing.
    again = snakemake(tmp_path, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    # A retrained model (other seed) replaces the old prediction instead of clashing with it.
    before = (results / "test" / "metrics" / "metrics.json").read_text()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "seed": 7}}))
    rerun = snakemake(tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (results / "test" / "metrics" / "metrics.json").read_text() != before


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
