"""The contract between the workflow and the package: stage arguments, lint, the schema in the wheel."""
import json
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from unet_pipeline import schema, stages
from unet_pipeline.cli import build_parser
from unet_pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
    return load_config(REPO / "config" / "config.yaml")


def _parse(command: str, args: str):
    """The stage's own CLI parser reads the arguments the workflow would pass."""
    required = {"preprocess": "--raw r --out o", "weights": "--labels l --out o", "train": "--out o",
                "predict": "--raw r --checkpoint c --out o",
                "calibrate": "--checkpoint c --out o", "segment": "--prob p --out o",
                "evaluate": "--prob p --labels l --out-json a --out-slices b --out-curves c",
                "synth": "--out-raw a --out-labels b", "finish": "--from m", "pyramid": "--from m --level 1"}[command]
    return build_parser().parse_args([command, *shlex.split(required), *shlex.split(args)])


def test_every_stage_argument_comes_from_its_config_key(config):
    cfg = json.loads(json.dumps(config))
    cfg["predict"].update(tile_size=196, tta="d4", dtype="uint8", chunks=[1, 128, 64], chunks_per_file=[1, 2, 4])
    cfg["preprocess"].update(chunks=[2, 64, 64], voxel_size_nm=[30, 5, 5])
    cfg["segment"].update(threshold=0.3, connectivity="3d")
    cfg["pyramid"].update(levels=3)
    a = _parse("predict", stages.predict(cfg))
    assert (a.tile_size, a.tta, a.dtype, a.chunks, a.chunks_per_file) == (196, "d4", "uint8", (1, 128, 64), (1, 2, 4))
    assert json.loads(a.model) == cfg["model"] and json.loads(a.run_config) == stages.training_config(cfg)
    assert a.pyramid_levels == 3
    a = _parse("preprocess", stages.preprocess_labels(cfg, "synthetic-test"))
    assert (a.chunks, a.voxel_size, a.label_format) == ((2, 64, 64), (30.0, 5.0, 5.0), "binary")
    cfg["datasets"]["synthetic-test"]["voxel_size_nm"] = [40, 8, 8]  # a dataset's own size wins, named as its key
    a = _parse("preprocess", stages.preprocess(cfg, "synthetic-test"))
    assert (a.voxel_size, a.voxel_size_key) == ((40.0, 8.0, 8.0), "datasets.synthetic-test.voxel_size_nm")
    a = _parse("segment", stages.segment(cfg))
    assert (a.threshold, a.connectivity, a.pyramid_levels) == (0.3, "3d", 3)
    a = _parse("train", stages.train(cfg))
    assert json.loads(a.train) == cfg["train"] and [d["name"] for d in json.loads(a.datasets)] == ["synthetic-train"]
    # segmentation settings are chosen on validation slices, on probabilities made as predict makes them
    a = _parse("calibrate", stages.calibrate(cfg))
    assert (a.tile_size, a.tta, a.dtype, a.precision, a.device) == (196, "d4", "uint8", cfg["predict"]["precision"],
                                                                    cfg["predict"]["device"])
    assert [(d["name"], d["validate"]) for d in json.loads(a.datasets)] == [
        ("synthetic-train", cfg["datasets"]["synthetic-train"]["validate"])]
    assert json.loads(a.run_config) == stages.training_config(cfg)
    a = _parse("weights", stages.weights(cfg, "synthetic-train"))
    assert (a.w0, a.sigma_px) == (cfg["weights"]["w0"], cfg["weights"]["sigma_px"])
    a = _parse("evaluate", stages.evaluate(cfg, "synthetic-test"))
    assert (a.slices, a.processes) == ("all", cfg["evaluate"]["processes"])
    a = _parse("synth", stages.synth(cfg, "train"))
    assert (a.slices, a.shape, a.seed) == (10, (256, 256), 1)


def test_speed_settings_are_not_arguments_that_rerun_prediction(config):
    cfg = json.loads(json.dumps(config))
    before = stages.predict(cfg)
    cfg["predict"].update(writers=7, batch_size=3, compile=True)
    assert stages.predict(cfg) == before
    assert stages.predict_speed(cfg) == {"predict_batch": "3", "predict_writers": 7, "predict_compile": 1}


def test_cli_defaults_and_choices_are_the_schemas():
    a = _parse("predict", "")
    pred = schema.section_defaults("predict")
    assert (a.tile_size, list(a.chunks), a.dtype, a.writers) == (pred["tile_size"], pred["chunks"], pred["dtype"],
                                                                  pred["writers"])
    assert _parse("weights", "").w0 == schema.default("weights.w0")
    predict = next(action for action in build_parser()._subparsers._group_actions[0].choices["predict"]._actions
                   if action.dest == "dtype")
    assert tuple(predict.choices) == schema.choices("predict.dtype")


def test_config_readme_documents_every_key_as_the_schema_says():
    readme = (REPO / "config" / "README.md").read_text()
    assert schema.BEGIN in readme and schema.END in readme, "config/README.md lost its generated table"
    table = readme.split(schema.BEGIN)[1].split(schema.END)[0]
    assert table == schema.markdown_table(), (
        "config/README.md and the schema disagree: run `python -m unet_pipeline.schema config/README.md`")


def test_lint_finds_no_rule_using_values_from_outside_it():
    run = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--lint"], cwd=REPO,
                         capture_output=True, text=True)
    lints = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.startswith("    * ")]
    # Conda/container per rule is the only lint left: the workflow runs in the project's pinned venv.
    assert lints and all(line.startswith("* Specify a conda environment") for line in lints), lints


def test_a_wheel_carries_the_schema_and_validates_configs(tmp_path):
    source = tmp_path / "src"  # built from a copy: an in-tree build would leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    shutil.copytree(REPO / "unet_pipeline", source / "unet_pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("unet_pipeline-*.whl"))
    assert "unet_pipeline/schemas/config.schema.yaml" in zipfile.ZipFile(wheel).namelist()
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); import unet_pipeline.config as c; "
        "assert c.__file__.startswith(sys.argv[1]), c.__file__; "
        "print(c.validate_config({'datasets': {'a': {'raw': 'x.tif', 'labels': 'y.tif', 'train': '0'}}})['model'])"
    )
    run = subprocess.run([sys.executable, "-c", check, str(tmp_path / "site")], cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0 and "'base_channels': 64" in run.stdout, run.stderr[-2000:]


def test_both_profiles_rerun_jobs_on_the_same_triggers():
    # The workflow tests decide reruns with the local profile's triggers; a SLURM run must decide alike.
    import yaml

    local, slurm = (yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())
                    for name in ("local", "slurm"))
    assert local["rerun-triggers"] == slurm["rerun-triggers"]
    assert "input" not in local["rerun-triggers"] and {"mtime", "params", "code"} <= set(local["rerun-triggers"])
