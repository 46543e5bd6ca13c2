"""A short Markdown report: training curves, one example slice, the metrics table."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from unet_pipeline import atomic, probability, stores
from unet_pipeline.errors import InputError


def save_figure(fig, path: str | os.PathLike, dpi: int = 90) -> None:
    """Write a figure as PNG atomically (temporary file + rename) and close it."""
    import matplotlib.pyplot as plt

    with atomic.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def plot_training(log_csv: Path, out_png: Path) -> None:
    """The loss and the validation scores against the step, as a PNG beside the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise InputError(f"{log_csv}: the training log has no rows; run the train stage (it logs every "
                         "train.log_every steps).")
    steps = [int(r["step"]) for r in rows]
    loss = np.array([float(r["loss"]) for r in rows])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    ax[0].plot(steps, loss, alpha=0.3, label="loss per step")
    ax[0].plot(steps[window - 1:], smooth, label=f"mean of {window}")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("weighted cross entropy")
    ax[0].set_yscale("log")
    ax[0].legend()
    val = [r for r in rows if r["val_rand_error"]]
    if val:
        vs = [int(r["step"]) for r in val]
        ax[1].plot(vs, [float(r["val_rand_error"]) for r in val], marker="o", label="Rand error")
        ax[1].plot(vs, [float(r["val_pixel_error"]) for r in val], marker="o", label="pixel error")
        ax[1].set_xlabel("step")
        ax[1].set_title("validation")
        ax[1].legend()
    fig.tight_layout()
    save_figure(fig, out_png)


def _colour(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    colours = rng.uniform(0.2, 1.0, size=(int(labels.max()) + 1, 3))
    colours[0] = 0
    return colours[labels]


def plot_example(example: dict, out_png: Path) -> list[str]:
    """One slice: raw, probability, and the threshold and watershed segmentations side by side.

    Both methods use the settings chosen on the validation slices (the
    model's segmentation.json); with labels, each panel's title gives its
    Rand and pixel error on this slice. Returns the Markdown lines about it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unet_pipeline import calibrate
    from unet_pipeline.labelling import label_image

    z = example["slice"]
    raw = stores.open_image(example["raw"])[z]
    prob_image = stores.open_image(example["prob"])
    prob = probability.decode(prob_image[z], prob_image.attrs[probability.SCALE_KEY])
    written = stores.store_attrs(example["seg"])
    record = calibrate.read_record(example["calibration"]) if example.get("calibration") else None
    truth = stores.open_image(example["labels"])[z] if example.get("labels") else None
    panels = [(raw, "raw"), (prob, "cell probability")]
    lines = []
    for method in ("threshold", "watershed"):
        learned = (record or {}).get("methods", {}).get(method)
        if learned is None and written.get("method") != method:
            continue
        settings = learned or written
        chosen = calibrate.resolve(method, settings["threshold"], written.get("connectivity", "2d"),
                                   settings.get("seed_threshold"), settings.get("min_seed_px"), None)
        labels = label_image(prob[None].astype(np.float64), chosen)[0]
        title = method + (" (written)" if written.get("method") == method else "")
        if truth is not None:
            rand, pixel = calibrate.score(labels[None], truth[None])
            title += f"\nRand {rand:.3f}, pixel {pixel:.3f}"
            lines.append(f"- {chosen.describe()}: Rand error {rand:.4f}, pixel error {pixel:.4f} on this slice")
        panels.append((_colour(labels), title))
    fig, ax = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for a, (img, title) in zip(ax, panels):
        a.imshow(img, cmap="gray" if img.ndim == 2 else None)
        a.set_title(title, fontsize=9)
        a.axis("off")
    fig.suptitle(f"{example['dataset']}, slice {z}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # the panels' two-line titles clear the figure's title
    save_figure(fig, out_png)
    return lines


def _row(name: str, scored: str, m: dict, slices: int) -> str:
    return (f"| {name} | {scored} | {slices} | {m['pixel_error']:.4f} | {m['rand_error']:.4f} | "
            f"{m['warping_error']:.6f} | {m['v_rand']:.4f} | {m['v_info']:.4f} |")


def write_report(out_md: str | os.PathLike, log_csv, metrics_json: dict[str, str], example: dict | None) -> None:
    """Write `out_md` with figures beside it; `metrics_json` maps dataset name -> metrics.json path."""
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# unet-pipeline report", ""]
    plot_training(Path(log_csv), out_md.with_name("training.png"))
    lines += ["## Training", "", "![training curves](training.png)", ""]
    lines += ["## Metrics", "", "ISBI 2012 definitions; lower is better except V_rand and V_info. The probability "
              "map is scored as the challenge scored maps, each metric at its own best threshold (given below the "
              "table); the segmentation is scored as written, at the settings it was made with.", "",
              "| dataset | scored | slices | pixel error | Rand error | warping error | V_rand | V_info |",
              "|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, path in metrics_json.items():
        m = json.loads(Path(path).read_text())
        n = len(m["slices"])
        lines.append(_row(name, "probability map, best threshold per metric", m["probability_map"], n))
        if "segmentation" in m:
            settings = m["segmentation"].get("settings", {})
            lines.append(_row(name, f"segmentation as written ({settings.get('method', '?')})", m["segmentation"], n))
        best = m["probability_map"].get("best_thresholds", {})
        notes.append(f"- {name}: best thresholds of the probability map: " +
                     ", ".join(f"{k} {v:.1f}" for k, v in best.items()))
        if "segmentation" in m:
            notes.append(f"- {name}: segmentation settings: " +
                         ", ".join(f"{k} {v}" for k, v in m["segmentation"].get("settings", {}).items()))
    lines += ["", *notes, ""]
    if example:
        from unet_pipeline.view import VIEW_PORT, public_link

        folder = Path(example["raw"]).parent
        lines += ["## Look at it", "", f"`unet-pipeline view {folder}` serves the stores on this machine and opens them "
                  "in neuroglancer (raw, probabilities and segmentation, aligned); add `--no-browser` on a remote node. "
                  f"While it runs, [this link]({public_link(folder, VIEW_PORT, example['slice'])}) opens the same view in "
                  "the public neuroglancer client.", ""]
        example_lines = plot_example(example, out_md.with_name("example.png"))
        lines += [f"## Segmentation methods on {example['dataset']}, slice {example['slice']}", "",
                  "![raw, probability, threshold and watershed segmentations](example.png)", "", *example_lines, ""]
    atomic.atomic_write_text(out_md, "\n".join(lines))
