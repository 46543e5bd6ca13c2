"""Segmentation settings chosen on the validation slices, never on the slices that are evaluated.

When training finishes, the chosen model predicts the validation slices and
each segmentation method is tried on them: the threshold method at every
ISBI threshold, the watershed over a grid of cell thresholds, seed
thresholds and smallest seeds. Each candidate's segmentation is scored as
it would be written (labels as labels: `metrics.cells_of_labels`) by the
ISBI Rand error, the pixel error breaking ties. The best parameters of each
method and the better method are recorded beside the model
(`segmentation.json`); `resolve` turns the config's `auto` settings into
them, a number in the config always winning.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from unet_pipeline import atomic
from unet_pipeline.errors import InputError
from unet_pipeline.labelling import SegmentationSettings, label_image
from unet_pipeline.metrics import aggregate, cells_of_labels, slice_statistics, thresholds

log = logging.getLogger(__name__)

CELL_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
SEED_STEPS = (0.1, 0.2, 0.3, 0.4)
MIN_SEEDS_PX = (5, 20, 50)
DEFAULT = SegmentationSettings("threshold", 0.5, "2d")  # without validation slices: the usual 0.5


def score(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Rand error, pixel error) of a label image as written, against binary truth (255 = cell)."""
    cells = cells_of_labels(labels)
    stats = [slice_statistics(np.where(truth[z] > 0, 255.0, 0.0), cells[z], ("pixel", "rand"))
             for z in range(truth.shape[0])]
    result = aggregate(stats)
    return result.rand_error, result.pixel_error


def candidates(connectivity: str):
    """Every setting tried on the validation slices."""
    for th in thresholds()[1:10]:
        yield SegmentationSettings("threshold", round(th, 1), connectivity)
    if connectivity == "2d":
        for th in CELL_THRESHOLDS:
            for step in SEED_STEPS:
                seed = round(th + step, 2)
                if seed >= 1.0:
                    continue
                for min_px in MIN_SEEDS_PX:
                    yield SegmentationSettings("watershed", th, connectivity, seed, min_px)


def calibrate(prob: np.ndarray, truth: np.ndarray, connectivity: str) -> dict:
    """The best settings of each method on validation slices `prob` (cell probability) and `truth` (binary)."""
    best: dict[str, dict] = {}
    for settings in candidates(connectivity):
        rand, pixel = score(label_image(prob, settings), truth)
        current = best.get(settings.method)
        if current is None or (rand, pixel) < (current["rand_error"], current["pixel_error"]):
            best[settings.method] = {**settings.to_dict(), "rand_error": rand, "pixel_error": pixel}
    method = min(best, key=lambda m: (best[m]["rand_error"], best[m]["pixel_error"], m != "threshold"))
    return {"method": method, "methods": best, "validation_slices": int(prob.shape[0])}


def write_record(path: str | os.PathLike, record: dict) -> None:
    """Write the choice beside the model (atomically) and log it."""
    atomic.atomic_write_text(path, json.dumps(record, indent=2))
    chosen = record["methods"].get(record["method"], {}) if "methods" in record else {}
    log.info("%s: segmentation chosen on %s validation slices: %s (Rand error %s)", path,
             record.get("validation_slices", 0), record["method"], chosen.get("rand_error", "not measured"))


def default_record(connectivity: str) -> dict:
    """What `auto` means without validation slices: threshold 0.5 and connected components."""
    settings = SegmentationSettings("threshold", DEFAULT.threshold, connectivity)
    return {"method": "threshold", "methods": {"threshold": settings.to_dict()}, "validation_slices": 0,
            "note": "no validation slices: the default threshold 0.5, nothing chosen"}


def read_record(path: str | os.PathLike | None) -> dict | None:
    """The choice recorded with a model (None without a path); InputError naming the file if unreadable."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: no segmentation choice recorded with the model ({exc}); rerun train, or set "
                         "segment.method and its parameters to numbers.") from None


def resolve(method: str, threshold, connectivity: str, seed_threshold, min_seed_px,
            record_path: str | os.PathLike | None) -> SegmentationSettings:
    """The settings to segment with: numbers as configured, `auto` from the choice recorded with the model."""
    needs_record = "auto" in (method, threshold) or (method != "threshold" and "auto" in (seed_threshold,
                                                                                          min_seed_px))
    record = read_record(record_path) if needs_record else None
    if needs_record and record is None:
        raise InputError("segment settings are auto but no choice recorded with the model was given "
                         "(--calibration); set them to numbers or give the model's segmentation.json")
    chosen = record["method"] if method == "auto" else method
    learned = (record or {}).get("methods", {}).get(chosen, {})
    if method == "watershed" and not learned and "auto" in (threshold, seed_threshold, min_seed_px):
        raise InputError(f"{record_path}: no watershed settings were chosen (no 2d validation slices); set "
                         "segment.threshold and segment.watershed to numbers")

    def pick(value, key):
        return learned.get(key) if value == "auto" else value

    return SegmentationSettings(chosen, float(pick(threshold, "threshold")), connectivity,
                                None if chosen == "threshold" else float(pick(seed_threshold, "seed_threshold")),
                                None if chosen == "threshold" else int(pick(min_seed_px, "min_seed_px")))
