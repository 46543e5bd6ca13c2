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
stage's subcommand (`unet-pipeline <stage>`) takes them: a path with a
space or a `;` is one argument, never shell syntax.
"""
from __future__ import annotations

import json
import shlex
import sys

from unet_pipeline.config import has_slices, synthetic_path


def command() -> str:
    """How rules call the package: this interpreter's `-m unet_pipeline`, so no PATH lookup is needed.

    Snakemake started as `.venv/bin/snakemake` with `.venv/bin` missing from
    PATH (and SLURM jobs, which inherit that PATH) still run the package of
    the environment Snakemake itself runs in.
    """
    return f"{shlex.quote(sys.executable)} -m unet_pipeline"


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
    """Size, seed and cell size of synthetic stack `name`."""
    spec = config["synthetic"][name]
    return _join(("--slices", spec["slices"]), ("--shape", spec["shape"]), ("--seed", spec["seed"]),
                 ("--cell-diameter-px", spec["cell_diameter_px"]))


def voxel_size(config: dict, dataset: str):
    """The dataset's voxel size setting: its own, else the workflow's (`auto`: from the file)."""
    own = config["datasets"][dataset].get("voxel_size_nm")
    return own if own is not None else config["preprocess"]["voxel_size_nm"]


def _voxel_size_key(config: dict, dataset: str) -> str:
    own = config["datasets"][dataset].get("voxel_size_nm")
    return f"datasets.{dataset}.voxel_size_nm" if own is not None else "preprocess.voxel_size_nm"


def _layout(section: dict) -> tuple:
    return ("--chunks", section["chunks"]), ("--chunks-per-file", section["chunks_per_file"])


def preprocess(config: dict, dataset: str) -> str:
    """Storage layout, voxel size and pyramid of the raw OME-Zarr."""
    pre = config["preprocess"]
    voxel = voxel_size(config, dataset)
    return _join(*_layout(pre), ("--voxel-size", voxel), ("--voxel-size-key", _voxel_size_key(config, dataset)),
                 ("--pyramid-levels", config["pyramid"]["levels"]))


def preprocess_labels(config: dict, dataset: str) -> str:
    """The raw store's layout and voxel size, and how the labels are written (binary or instances)."""
    return f"{preprocess(config, dataset)} {_join(('--label-format', config['datasets'][dataset]['label_format']))}"


def source_identity(config: dict, path: str) -> str:
    """What Snakemake compares to notice a replaced stack: a digest of its content, sampled.

    Modification times miss a stack replaced by an older file (`cp -p`, a
    restore). A synthetic stack is identified by its spec (it is generated
    deterministically, and does not exist before the first run).
    """
    for name, spec in config.get("synthetic", {}).items():
        if path in (synthetic_path(config, name, "raw"), synthetic_path(config, name, "labels")):
            return "synthetic " + json.dumps(spec, sort_keys=True)
    from unet_pipeline import sources

    return sources.signature(path)


def weights(config: dict, dataset: str) -> str:
    """The weight map's w0 and sigma (paper, Eq. 2) and how to read the labels."""
    w = config["weights"]
    return _join(("--w0", w["w0"]), ("--sigma-px", w["sigma_px"]),
                 ("--label-format", config["datasets"][dataset]["label_format"]),
                 ("--pyramid-levels", config["pyramid"]["levels"]))


def training_datasets(config: dict) -> list[str]:
    """Datasets with training or validation slices (they need labels: the schema checks)."""
    return [n for n, d in config["datasets"].items() if has_slices(d.get("train")) or has_slices(d.get("validate"))]


def training_config(config: dict) -> dict:
    """The resolved config a model is trained with: stored in its checkpoint and checked by predict."""
    keys = ("raw", "labels", "label_format", "train", "validate")
    return {
        "model": config["model"],
        "train": config["train"],
        "weights": config["weights"],
        "datasets": {n: {k: config["datasets"][n].get(k) for k in keys} for n in training_datasets(config)},
    }


def _training_stores(config: dict, store_names: tuple[str, ...], slice_keys: tuple[str, ...]) -> str:
    """--datasets of train and calibrate: each training dataset's stores and its slice selections, as JSON."""
    results = config["results_dir"]
    return json.dumps([{"name": n, **{s: f"{results}/{n}/{s}.ome.zarr" for s in store_names},
                        **{k: config["datasets"][n].get(k) for k in slice_keys}}
                       for n in training_datasets(config)])


def train(config: dict) -> str:
    """The training datasets (paths and slices), the model and train sections, and the resolved config."""
    datasets = _training_stores(config, ("raw", "labels", "weights"), ("train", "validate"))
    return _join(("--datasets", datasets), ("--model", config["model"]),
                 ("--train", config["train"]), ("--run-config", training_config(config)))


def calibrate(config: dict) -> str:
    """The validation slices, and everything of predict's that shapes the probabilities they are scored on."""
    pred = config["predict"]
    return _join(("--datasets", _training_stores(config, ("raw", "labels"), ("validate",))),
                 ("--model", config["model"]),
                 ("--run-config", training_config(config)), ("--tile-size", pred["tile_size"]),
                 ("--dtype", pred["dtype"]), ("--tta", pred["tta"]), ("--device", pred["device"]),
                 ("--precision", pred["precision"]))


def predict(config: dict) -> str:
    """Everything that shapes the probability map (the store's layout, the tiles, TTA, numerics, pyramid)."""
    pred = config["predict"]
    return _join(("--model", config["model"]), ("--run-config", training_config(config)),
                 ("--tile-size", pred["tile_size"]), *_layout(pred), ("--dtype", pred["dtype"]),
                 ("--tta", pred["tta"]), ("--device", pred["device"]), ("--precision", pred["precision"]),
                 ("--pyramid-levels", config["pyramid"]["levels"]))


def predict_speed(config: dict) -> dict:
    """Settings that change only the speed of predict: resources, not params (no rerun when tuned)."""
    pred = config["predict"]
    return {"predict_batch": str(pred["batch_size"]), "predict_writers": int(pred["writers"]),
            "predict_compile": int(bool(pred["compile"]))}


def segment(config: dict) -> str:
    """The segmentation method and its parameters (`auto` ones come from the model's segmentation.json)."""
    seg = config["segment"]
    return _join(("--method", seg["method"]), ("--threshold", seg["threshold"]),
                 ("--seed-threshold", seg["watershed"]["seed_threshold"]),
                 ("--min-seed-px", seg["watershed"]["min_seed_px"]),
                 ("--max-halo-px", seg["watershed"]["max_halo_px"]), ("--connectivity", seg["connectivity"]),
                 ("--pyramid-levels", config["pyramid"]["levels"]))


def evaluate(config: dict, dataset: str) -> str:
    """The dataset's test slices and the processes that score them."""
    slices = config["datasets"][dataset]["test"]
    return _join(("--slices", json.dumps(slices) if isinstance(slices, list) else slices),
                 ("--processes", config["evaluate"]["processes"]))


def store_settings(config: dict, dataset: str, store: str) -> str:
    """The settings that shape a store, for its finishing job's params: a change reruns the store's jobs."""
    return {"raw": lambda: preprocess(config, dataset), "labels": lambda: preprocess_labels(config, dataset),
            "probabilities": lambda: predict(config), "segmentation": lambda: segment(config)}[store]()
