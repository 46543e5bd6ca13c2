"""A short Markdown report: training curves, one example slice, the metrics table."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from unet_pipeline import atomic, stores
from unet_pipeline.errors import InputError


def save_figure(fig, path: str | os.PathLike, dpi: int = 90) -> None:
    """Write a figure as PNG atomically (temporary file + rename) and close it."""
    import matplotlib.pyplot as plt

    with atomic.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def plot_training(log_csv: Path, out_png: Path) -> None:
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


def plot_example(raw_path, prob_path, seg_path, z: int, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = stores.open_image(raw_path)[z]
    prob_image = stores.open_image(prob_path)
    prob = stores.as_probability(prob_image[z], prob_image.attrs[stores.PROBABILITY_SCALE_KEY])
    seg = stores.open_image(seg_path)[z]
    rng = np.random.default_rng(0)
    colours = rng.uniform(0.2, 1.0, size=(int(seg.max()) + 1, 3))
    colours[0] = 0
    fig, ax = plt.subplots(1, 3, figsize=(12, 4.2))
    for a, img, title in zip(ax, (raw, prob, colours[seg]), ("raw", "cell probability", "segmentation")):
        a.imshow(img, cmap="gray" if img.ndim == 2 else None)
        a.set_title(f"{title} (slice {z})")
        a.axis("off")
    fig.tight_layout()
    save_figure(fig, out_png)


def write_report(out_md: str | os.PathLike, log_csv, metrics_json: dict[str, str], example: dict | None) -> None:
    """Write `out_md` with figures beside it; `metrics_json` maps dataset name -> metrics.json path."""
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# unet-pipeline report", ""]
    plot_training(Path(log_csv), out_md.with_name("training.png"))
    lines += ["## Training", "", "![training curves](training.png)", ""]
    if example:
        plot_example(example["raw"], example["prob"], example["seg"], example["slice"], out_md.with_name("example.png"))
        lines += [f"## Example: {example['dataset']}", "", "![raw, probability, segmentation](example.png)", ""]
    lines += ["## Metrics (ISBI 2012 definitions; lower is better except V_rand and V_info)", "",
              "| dataset | slices | pixel error | Rand error | warping error | V_rand | V_info |",
              "|---|---|---|---|---|---|---|"]
    for name, path in metrics_json.items():
        m = json.loads(Path(path).read_text())
        lines.append(f"| {name} | {len(m['slices'])} | {m['pixel_error']:.4f} | {m['rand_error']:.4f} | "
                     f"{m['warping_error']:.6f} | {m['v_rand']:.4f} | {m['v_info']:.4f} |")
    lines.append("")
    atomic.atomic_write_text(out_md, "\n".join(lines))
