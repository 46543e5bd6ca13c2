"""Segmentation settings chosen on the validation slices, never on the slices that are evaluated.

After training (the workflow's `calibrate` job), the published model
predicts the validation slices as predict will (its tile size, test-time
augmentation, precision and stored dtype: on ISBI 2012, settings chosen
without predict's d4 averaging scored Rand 0.026 on the test slices instead
of 0.023), and each segmentation method is tried on them: the threshold method at every
ISBI threshold, the watershed over a grid of cell thresholds, seed
thresholds and smallest seeds. Each candidate's segmentation is scored as
it would be written (labels as labels: `metrics.cells_of_labels`) by the
ISBI Rand and pixel errors.

Why not simply the lowest Rand error: the Rand error counts every cell
pixel drawn as membrane against the proposal, but ignores membrane pixels
drawn as cell, so it keeps falling as the cell threshold falls and the
membranes thin out, while the pixel error climbs (on ISBI 2012: cell
threshold 0.02 gives Rand 0.024 but pixel 0.081 on validation). A user wants
both. So a candidate is admissible only if its pixel error is within
PIXEL_ERROR_ALLOWANCE of the best pixel error any threshold reaches on the
same slices, and among the admissible ones the lowest Rand error wins (the
pixel error breaking ties, then the simpler threshold method). The best
parameters of each method, the better method and the pixel-error bound are
recorded beside the model (`segmentation.json`); `resolve` turns the
config's `auto` settings into them, a number in the config always winning.
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
from unet_pipeline.metrics import cells_of_labels, f_score, label4, pixel_counts, rand_counts, thresholds

log = logging.getLogger(__name__)

CELL_THRESHOLDS = (0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
SEED_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
MIN_SEEDS_PX = (5, 20, 50)
PIXEL_ERROR_ALLOWANCE = 0.01  # how much pixel error (absolute) may be given up for a lower Rand error
DEFAULT = SegmentationSettings("threshold", 0.5, "2d")  # without validation slices: the usual 0.5


def score(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Rand error, pixel error) of a label image as written, against binary truth (255 = cell)."""
    cells = cells_of_labels(labels) > 0
    truth = np.asarray(truth) > 0
    pixel, rand = np.zeros(3), np.zeros(3)
    for z in range(truth.shape[0]):  # a label image needs one threshold, not the ISBI eleven
        pixel += pixel_counts(truth[z], cells[z])
        rand += rand_counts(label4(truth[z])[0], label4(cells[z])[0])
    return 1.0 - f_score(*rand), 1.0 - f_score(*pixel)


def candidates(connectivity: str):
    """Every setting tried on the validation slices."""
    for th in thresholds()[1:10]:
        yield SegmentationSettings("threshold", round(th, 1), connectivity)
    if connectivity == "2d":
        for th in CELL_THRESHOLDS:
            for seed in SEED_THRESHOLDS:
                if seed <= th:
                    continue
                for min_px in MIN_SEEDS_PX:
                    yield SegmentationSettings("watershed", th, connectivity, seed, min_px)


CANDIDATES = sum(1 for _ in candidates("2d"))  # settings tried: sizes the calibrate job's runtime request


def calibrate(prob: np.ndarray, truth: np.ndarray, connectivity: str) -> dict:
    """The best admissible settings of each method on validation slices `prob` (cell probability), `truth` (binary).

    Admissible: pixel error at most the best threshold's plus
    PIXEL_ERROR_ALLOWANCE (see the module docstring); best: lowest Rand error.
    """
    scored = [(settings, *score(label_image(prob, settings), truth)) for settings in candidates(connectivity)]
    bound = min(pixel for settings, _, pixel in scored if settings.method == "threshold") + PIXEL_ERROR_ALLOWANCE
    best: dict[str, dict] = {}
    for settings, rand, pixel in scored:
        current = best.get(settings.method)
        if pixel <= bound and (current is None or (rand, pixel) < (current["rand_error"], current["pixel_error"])):
            best[settings.method] = {**settings.to_dict(), "rand_error": rand, "pixel_error": pixel}
    method = min(best, key=lambda m: (best[m]["rand_error"], best[m]["pixel_error"], m != "threshold"))
    return {"method": method, "methods": best, "validation_slices": int(prob.shape[0]),
            "pixel_error_bound": bound, "candidates_tried": len(scored)}


def choose_for_model(predictor, images: np.ndarray, truth: np.ndarray, probability_dtype: str,
                     connectivity: str = "2d") -> dict:
    """`calibrate` on the validation `images` as `predictor` predicts them and predict stores them.

    `predictor` is an `inference.Predictor` set up as predict's (tile size,
    TTA, precision); the probabilities pass through the dtype predict writes
    (uint8 quantises them), since those are what the segmentation reads.
    """
    from unet_pipeline.probability import as_stored

    prob = as_stored(predictor.predict_image(images), probability_dtype)
    return calibrate(prob, truth, connectivity)


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
            record_path: str | os.PathLike | None, max_halo_px: int | None = None) -> SegmentationSettings:
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
                                None if chosen == "threshold" else int(pick(min_seed_px, "min_seed_px")),
                                None if chosen == "threshold" else max_halo_px)
