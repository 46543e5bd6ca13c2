"""The evaluate stage: ISBI 2012 metrics of a prediction on a dataset's test slices.

Writes a JSON summary that keeps apart the probability map's scores (the
challenge's protocol: each metric at its best threshold, named) and the
written segmentation's (as it is, at its own settings), a per-slice CSV of
both, the probability map's per-threshold curves (CSV) and a plot of them.
Slices are scored in parallel worker processes that each read one slice, so
memory is bounded by a few slices; the stack scores are then aggregated from
the per-slice counts as each metric defines it (metrics.aggregate).
"""
from __future__ import annotations

import csv
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from unet_pipeline import atomic, probability, stores
from unet_pipeline.errors import ConfigError, InputError
from unet_pipeline.sources import StackSource
from unet_pipeline.metrics import as_cell_probability, aggregate, slice_statistics, thresholds

METRIC_NAMES = ("pixel_error", "rand_error", "warping_error", "warping_residual_at_0.5", "v_rand", "v_info")


def open_stack(path):
    """An OME-Zarr written by this package (checked complete, read with checksums), or any TIFF/Zarr stack."""
    if stores.is_complete(path):
        return stores.open_image(path)
    if stores.store_attrs(path):  # ours, but unfinished: say so rather than read it as a plain Zarr
        stores.open_image(path)
    return StackSource(path)


def read_proposal(path, z: int) -> np.ndarray:
    """Slice `z` of a proposal: this package's probabilities decoded by their recorded scale, else as stored."""
    stack = open_stack(path)
    values = stack[z]
    if isinstance(stack, stores.StoreImage) and probability.SCALE_KEY in stack.attrs:
        return probability.decode(values, stack.attrs[probability.SCALE_KEY])
    return values


# float16 storage rounds probabilities just below 1 up by at most one ulp (2^-10);
# anything farther outside [0, 1] is not a probability and is refused, not clipped.
STORAGE_ROUNDING = 2.0 ** -10


def _slice_stats(args):
    prob_path, labels_path, z, membrane, kind = args
    p = read_proposal(prob_path, z)
    gt = np.asarray(open_stack(labels_path)[z])
    if kind == "probability" and np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
        p[(p > 1.0) & (p <= 1.0 + STORAGE_ROUNDING)] = 1.0
    try:
        p = as_cell_probability(p, membrane, kind)[0]
    except InputError as exc:
        raise InputError(f"{prob_path} (slice {z}): {exc}") from None
    return z, slice_statistics(np.where(gt > 0, 255.0, 0.0), p)


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _score(jobs: list, processes: int) -> list:
    if processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=processes) as pool:
            return list(pool.map(_slice_stats, jobs))
    return [_slice_stats(job) for job in jobs]


def _segmentation_settings(path) -> dict:
    """How a segmentation store of this package was made (method and parameters), for the record."""
    attrs = stores.store_attrs(path)
    keys = ("method", "threshold", "seed_threshold", "min_seed_px", "connectivity", "cells")
    return {k: attrs[k] for k in keys if k in attrs}


def evaluate(prob_path: str | os.PathLike, labels_path: str | os.PathLike, slices: list[int],
             out_json: str | os.PathLike, out_slices_csv: str | os.PathLike, out_curves_csv: str | os.PathLike,
             out_plot: str | os.PathLike | None = None, processes: int = 1, membrane_probability: bool = False,
             kind: str = "probability", segmentation: str | os.PathLike | None = None) -> dict:
    """Score `slices` and write the outputs; returns the summary dict.

    Two things are scored and kept apart. `probability_map`: the ISBI 2012
    protocol for a probability map, each metric at its own best threshold,
    which is reported beside it. `segmentation` (when given): the label image
    as written, at the settings it was made with, labels scored as labels
    (the boundary between two touching cells is membrane). `prob_path` may
    be this package's probability OME-Zarr or any stack (TIFF, folder of
    TIFFs, Zarr) of another method: float cell probability in [0, 1], uint8
    0-255, `membrane_probability` to flip a membrane map, or `kind` "binary"
    / "instances" for hard segmentations.
    """
    prob = open_stack(prob_path)
    labels = open_stack(labels_path)
    if prob.shape != labels.shape:
        raise InputError(f"{prob_path}: shape {prob.shape} does not match labels {labels_path} {labels.shape}.")
    if not slices:
        raise ConfigError(f"no test slices to evaluate for {prob_path}; set datasets.<name>.test in the config.")
    bad = [z for z in slices if not 0 <= z < prob.shape[0]]
    if bad:
        raise ConfigError(f"test slices {bad} are outside {prob_path} ({prob.shape[0]} slices)")
    per_slice = _score([(str(prob_path), str(labels_path), z, membrane_probability, kind) for z in slices],
                       processes)
    result = aggregate([stats for _, stats in per_slice])
    summary = {"slices": list(slices), "labels": str(labels_path),
               "probability_map": {**result.summary(), "best_thresholds": result.best_thresholds,
                                   "scored": "ISBI 2012 protocol: each metric at its own best threshold",
                                   "path": str(prob_path)}}
    rows = [["slice", "scored", *METRIC_NAMES]]
    rows += [[z, "probability map", *aggregate([stats]).summary().values()] for z, stats in per_slice]
    if segmentation is not None:
        if open_stack(segmentation).shape != labels.shape:
            raise InputError(f"{segmentation}: shape does not match labels {labels_path} {labels.shape}.")
        seg_slices = _score([(str(segmentation), str(labels_path), z, False, "instances") for z in slices],
                            processes)
        seg = aggregate([stats for _, stats in seg_slices])
        summary["segmentation"] = {**seg.summary(), "scored": "as written, labels as labels",
                                   "settings": _segmentation_settings(segmentation), "path": str(segmentation)}
        rows += [[z, "segmentation", *aggregate([stats]).summary().values()] for z, stats in seg_slices]
    atomic.atomic_write_text(out_json, json.dumps(summary, indent=2))
    atomic.atomic_write_text(out_slices_csv, _csv(rows))
    names = list(result.curves)
    curve_rows = [["threshold", *names]]
    for k, th in enumerate(thresholds()):
        curve_rows.append([th, *(result.curves[m][k][1] if k < len(result.curves[m]) else "" for m in names)])
    atomic.atomic_write_text(out_curves_csv, _csv(curve_rows))
    if out_plot:
        plot_curves(result.curves, out_plot)
    return summary


def plot_curves(curves: dict, out_plot: str | os.PathLike) -> None:
    """Each score of the probability map against the threshold, as a PNG."""
    import matplotlib

    from unet_pipeline.report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        th, v = zip(*values)
        ax.plot(th, v, marker="o", label=name)
    ax.set_xlabel("threshold on cell probability")
    ax.set_ylabel("score")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_plot, dpi=100)
