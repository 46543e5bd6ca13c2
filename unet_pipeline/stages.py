"""The contract between the workflow and the package: each stage's arguments from the validated config.

Every Snakemake rule takes its command's settings from one function here,
through `params:`, so that Snakemake's parameter tracking sees every value
that shapes an output: a changed key reruns exactly the jobs whose
arguments change (and, through their outputs, what depends on them), and
nothing else. Settings that change only how fast a job runs (predict's
batch size, writer threads, compilation) are kept apart in
`predict_speed`: the rules pass them as resources, so tuning them never
reruns finished work.

Each function returns the arguments as one shell-quoted string, as the
stage's subcommand (`unet-pipeline <stage>`) takes them.
"""
from __future__ import annotations

import json
import shlex


def _join(*pairs) -> str:
    """Shell-quoted `--option value` pairs; lists become comma-separated, JSON-able dicts become JSON."""
    words = []
    for option, value in pairs:
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        words += [option, str(value)]
    return shlex.join(words)


def synth(config: dict, name: str) -> str:
    spec = config["synthetic"][name]
    return _join(("--slices", spec["slices"]), ("--shape", spec["shape"]), ("--seed", spec["seed"]),
                 ("--cell-diameter-px", spec["cell_diameter_px"]))


def preprocess(config: dict) -> str:
    """Storage layout and voxel size of the raw OME-Zarr."""
    pre = config["preprocess"]
    return _join(("--chunks", pre["chunks"]), ("--chunks-per-file", pre["chunks_per_file"]),
                 ("--voxel-size", pre["voxel_size_nm"]))


def preprocess_labels(config: dict, dataset: str) -> str:
    return f"{preprocess(config)} {_join(('--label-format', config['datasets'][dataset]['label_format']))}"


def weights(config: dict, dataset: str) -> str:
    w = config["weights"]
    return _join(("--w0", w["w0"]), ("--sigma-px", w["sigma_px"]),
                 ("--label-format", config["datasets"][dataset]["label_format"]))


def training_datasets(config: dict) -> list[str]:
    """Datasets with training or validation slices (they need labels: the schema checks)."""
    return [n for n, d in config["datasets"].items() if has_slices(d, "train") or has_slices(d, "validate")]


def has_slices(dataset: dict, key: str) -> bool:
    return dataset.get(key) not in (None, [], "none")


def training_config(config: dict) -> dict:
    """The resolved config a model is trained with: stored in its checkpoint and checked by predict."""
    keys = ("raw", "labels", "label_format", "train", "validate")
    return {
        "model": config["model"],
        "train": config["train"],
        "weights": config["weights"],
        "datasets": {n: {k: config["datasets"][n].get(k) for k in keys} for n in training_datasets(config)},
    }


def train(config: dict) -> str:
    results = config["results_dir"]
    datasets = [
        {"name": n, "raw": f"{results}/{n}/raw.ome.zarr", "labels": f"{results}/{n}/labels.ome.zarr",
         "weights": f"{results}/{n}/weights.ome.zarr", "train": config["datasets"][n].get("train"),
         "validate": config["datasets"][n].get("validate")}
        for n in training_datasets(config)
    ]
    return _join(("--datasets", json.dumps(datasets)), ("--model", config["model"]),
                 ("--train", config["train"]), ("--run-config", training_config(config)))


def predict(config: dict) -> str:
    """Everything that shapes the probability map (the store's layout, the tiles, TTA, numerics)."""
    pred = config["predict"]
    return _join(("--model", config["model"]), ("--run-config", training_config(config)),
                 ("--tile-size", pred["tile_size"]), ("--chunks", pred["chunks"]),
                 ("--chunks-per-file", pred["chunks_per_file"]), ("--dtype", pred["dtype"]),
                 ("--tta", pred["tta"]), ("--device", pred["device"]), ("--precision", pred["precision"]))


def predict_speed(config: dict) -> dict:
    """Settings that change only the speed of predict: resources, not params (no rerun when tuned)."""
    pred = config["predict"]
    return {"predict_batch": str(pred["batch_size"]), "predict_writers": int(pred["writers"]),
            "predict_compile": int(bool(pred["compile"]))}


def gather(config: dict) -> str:
    return _join(("--pyramid-levels", config["predict"]["pyramid_levels"]))


def segment(config: dict) -> str:
    seg = config["segment"]
    return _join(("--threshold", seg["threshold"]), ("--connectivity", seg["connectivity"]))


def evaluate(config: dict, dataset: str) -> str:
    slices = config["datasets"][dataset]["test"]
    return _join(("--slices", json.dumps(slices) if isinstance(slices, list) else slices))
