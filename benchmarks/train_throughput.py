"""Training steps/s of the full loop vs a bare forward/backward/step loop.

Same model, tile, precision and threads, measured in one run. The full loop
adds tile sampling with elastic augmentation, the weighted loss, logging
and checkpoints every 20 steps (validation is switched off: it is a
separate, scheduled cost). Issue 3 targets: ratio >= 0.85; the data path under 15% of a step.
"""
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from unet_pipeline.augment import AugmentConfig, sample_tiles  # noqa: E402
from unet_pipeline.device import autocast, resolve_dtype  # noqa: E402
from unet_pipeline.model import UNet, UNetConfig  # noqa: E402
from unet_pipeline.synthetic import synthesize_labels_and_raw  # noqa: E402
from unet_pipeline.train import SliceSet, TrainConfig, train, weighted_cross_entropy  # noqa: E402
from unet_pipeline.weights import weight_map  # noqa: E402

STEPS = 60
MODEL = UNetConfig(base_channels=16)
TILE = 132


def bare_loop(dtype) -> float:
    torch.manual_seed(0)
    model = UNet(MODEL)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.99)
    size = MODEL.input_size(TILE)
    x = torch.randn(1, 1, size, size)
    y = torch.randint(0, 2, (1, TILE, TILE))
    w = torch.ones(1, TILE, TILE)
    device = torch.device("cpu")
    for i in range(STEPS + 5):
        if i == 5:
            start = time.perf_counter()
        with autocast(device, dtype):
            logits = model(x)
        loss = weighted_cross_entropy(logits, y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return STEPS / (time.perf_counter() - start)


def main():
    torch.set_num_threads(2)
    raw, labels = synthesize_labels_and_raw(6, (256, 256), seed=0)
    data = SliceSet(raw.astype(np.float32) / 255, (labels > 0).astype(np.uint8),
                    np.stack([weight_map(l) for l in labels]))
    dtype = resolve_dtype("auto", torch.device("cpu"))
    cfg = TrainConfig(steps=STEPS + 5, tile_size=TILE, device="cpu", validate_every=10**9, checkpoint_every=20)
    with tempfile.TemporaryDirectory() as tmp:
        train(MODEL, cfg, data, None, tmp, progress=False)
        # Steps 6..65 from the loop's own clock: set-up and warm-up excluded, as for the bare loop.
        with open(Path(tmp) / "training_log.csv") as fh:
            seconds = {int(r["step"]): float(r["seconds"]) for r in csv.DictReader(fh)}
        full = STEPS / (seconds[STEPS + 5] - seconds[5])
    bare = bare_loop(dtype)
    gen = torch.Generator().manual_seed(0)
    images, labs, wts = (torch.from_numpy(a) for a in (data.images, data.labels, data.weights))
    size = MODEL.input_size(TILE)
    start = time.perf_counter()
    for _ in range(STEPS):
        sample_tiles(images, labs, wts, 1, size, TILE, AugmentConfig(), gen)
    sampling = (time.perf_counter() - start) / STEPS
    print(f"model: depth {MODEL.depth}, {MODEL.base_channels} channels, tile {TILE} (input {size}), "
          f"{dtype or 'fp32'}, 2 threads")
    print(f"full training loop: {full:.2f} steps/s; bare forward/backward/step: {bare:.2f} steps/s")
    print(f"ratio full / bare: {full / bare:.2f} (target >= 0.85)")
    print(f"data path (tile sampling + augmentation): {1000 * sampling:.1f} ms = "
          f"{100 * sampling * bare:.1f}% of a bare step (target < 15%)")


if __name__ == "__main__":
    main()
