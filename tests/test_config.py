from pathlib import Path

import pytest
import yaml

from unet_pipeline.config import load_config, parse_slices, validate_config
from unet_pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _default():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_shipped_configs_are_valid():
    assert load_config(REPO / "config" / "config.yaml")["model"]["padding"] == "valid"
    cfg = load_config(REPO / "config" / "isbi2012.yaml")
    assert parse_slices(cfg["datasets"]["isbi2012-train"]["train"], 30) == list(range(20))


def test_defaults_are_the_papers():
    cfg = validate_config({"datasets": {"a": {"raw": "x.tif", "labels": "y.tif", "train": "0-1"}}})
    assert cfg["model"]["base_channels"] == 64 and cfg["model"]["depth"] == 4
    assert cfg["train"]["momentum"] == 0.99 and cfg["weights"]["w0"] == 10


def test_typo_is_named_with_a_suggestion():
    cfg = _default()
    cfg["train"]["stpes"] = cfg["train"].pop("steps")
    with pytest.raises(ConfigError, match=r"train\.'stpes' \(did you mean 'steps'\?\)"):
        validate_config(cfg)


def test_bad_value_names_the_key():
    cfg = _default()
    cfg["predict"]["dtype"] = "float64"
    with pytest.raises(ConfigError, match="'predict.dtype'"):
        validate_config(cfg)


def test_invalid_tile_size_names_nearest_valid_sizes():
    cfg = _default()
    cfg["train"]["tile_size"] = 130
    with pytest.raises(ConfigError, match="'train.tile_size'.*116 and 132"):
        validate_config(cfg)


def test_training_slices_need_labels():
    with pytest.raises(ConfigError, match="datasets.a.train' needs labels"):
        validate_config({"datasets": {"a": {"raw": "x.tif", "train": "0-3"}}})


@pytest.mark.parametrize("spec, expected", [("0-3", [0, 1, 2, 3]), ("1,4-5", [1, 4, 5]), ([2, 0], [0, 2]),
                                            ("all", [0, 1, 2, 3, 4, 5]), ("none", [])])
def test_slice_specs(spec, expected):
    assert parse_slices(spec, 6) == expected


def test_slices_beyond_the_stack_are_refused():
    with pytest.raises(ConfigError, match=r"slices \[7\] do not exist"):
        parse_slices("5-7", 7, "datasets.a.test")


def test_validating_and_planning_load_no_torch():
    # What the Snakefile imports to validate a config and plan the jobs (issue 18: 6 s of torch per snakemake call).
    import subprocess
    import sys

    code = ("import unet_pipeline.config, unet_pipeline.resources, unet_pipeline.stages, unet_pipeline.sources; "
            "from unet_pipeline.config import load_config; load_config(sys.argv[1])")
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import sys; {code}",
                          str(REPO / "config" / "config.yaml")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = [line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
    assert "unet_pipeline.config" in imported and not any(name.split(".")[0] == "torch" for name in imported)


def test_deprecated_keys_still_work_with_a_warning(caplog):
    cfg = _default()
    cfg["predict"]["shards"] = 3
    cfg["evaluate"] = {"workers": 4}
    with caplog.at_level("WARNING"):
        loaded = validate_config(cfg)
    assert loaded["predict"]["parts"] == 3 and loaded["evaluate"]["processes"] == 4
    assert "'predict.shards' is deprecated: it now reads 'predict.parts'" in caplog.text
    cfg["predict"]["parts"] = 2
    with pytest.raises(ConfigError, match="'predict.shards' .* and 'predict.parts' are both set"):
        validate_config(cfg)
