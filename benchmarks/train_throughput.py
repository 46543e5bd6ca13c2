"""Training steps/s of the full loop vs a bare forward/backward/step loop.

    python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--paper-net] [--tile 132] [--batch 1]

Same model, tile, precision, memory format (channels_last) and threads,
measured in one run. The full loop adds tile sampling with elastic
augmentation on the device, the weighted loss, loss reads and checkpoints
(validation is switched off: it is a separate, scheduled cost). On a CPU:
60 steps, a loss read every 5 and a checkpoint every 20. On a GPU, where a
step takes milliseconds and a checkpoint of the paper's network is hundreds
of MB: 500 steps at the cadence of config/isbi2012-gpu.yaml (a loss read
every 50 steps, one checkpoint per 500). Targets: ratio >= 0.9 (issue 10,
also on a GPU); the data path under 15% of a step.
"""
import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from unet_pipeline.threads import prefer_sleeping_openmp_threads  # noqa: E402

prefer_sleeping_openmp_threads()  # as the CLI does, before torch is imported: measure what the workflow runs

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import sync  # noqa: E402
from unet_pipeline.augment import AugmentConfig, sample_tiles  # noqa: E402
from unet_pipeline.device import autocast, resolve_device, resolve_dtype  # noqa: E402
from unet_pipeline.model import UNet, UNetConfig  # noqa: E402
from unet_pipeline.synthetic import synthesize_labels_and_raw  # noqa: E402
from unet_pipeline.train import SliceSet, TrainConfig, train, weighted_cross_entropy  # noqa: E402
from unet_pipeline.weights import weight_map  # noqa: E402

# (measured steps, loss read every, checkpoint every) per device type; the first read is the warm-up.
CADENCE = {"cpu": (60, 5, 20), "cuda": (500, 50, 500)}


def bare_loop(MODEL, TILE, batch, device, dtype, steps: int) -> float:
    torch.manual_seed(0)
    model = UNet(MODEL).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.99)
    size = MODEL.input_size(TILE)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, 2, (batch, TILE, TILE), device=device)
    w = torch.ones(batch, TILE, TILE, device=device)
    for i in range(steps + 5):
        if i == 5:
            sync(device)
            start = time.perf_counter()
        with autocast(device, dtype):
            logits = model(x)
        loss = weighted_cross_entropy(logits, y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return steps / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--paper-net", action="store_true", help="64 base channels (the paper's network)")
    ap.add_argument("--tile", type=int, default=132, help="output tile side")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(2)
    MODEL = UNetConfig(base_channels=64 if a.paper_net else 16)
    TILE = a.tile
    device = resolve_device(a.device)
    raw, labels = synthesize_labels_and_raw(6, (256, 256), seed=0)
    data = SliceSet(raw.astype(np.float32) / 255, (labels > 0).astype(np.uint8),
                    np.stack([weight_map(l) for l in labels]))
    dtype = resolve_dtype("auto", device)
    steps, log_every, checkpoint_every = CADENCE["cuda" if device.type == "cuda" else "cpu"]
    cfg = TrainConfig(steps=log_every + steps, tile_size=TILE, batch_size=a.batch, device=str(device),
                      validate_every=10**9, checkpoint_every=checkpoint_every, log_every=log_every)
    with tempfile.TemporaryDirectory() as tmp:
        train(MODEL, cfg, data, None, tmp, progress=False)
        # From the first loss read to the last, on the loop's own clock: set-up and warm-up excluded.
        with open(Path(tmp) / "training_log.csv") as fh:
            seconds = {int(r["step"]): float(r["seconds"]) for r in csv.DictReader(fh)}
        full = steps / (seconds[log_every + steps] - seconds[log_every])
    bare = bare_loop(MODEL, TILE, a.batch, device, dtype, steps)
    gen = torch.Generator().manual_seed(0)
    images, labs, wts = (torch.from_numpy(x).to(device) for x in (data.images, data.labels, data.weights))
    size = MODEL.input_size(TILE)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        sample_tiles(images, labs, wts, a.batch, size, TILE, AugmentConfig(), gen)
    sync(device)
    sampling = (time.perf_counter() - start) / steps
    print(f"model: depth {MODEL.depth}, {MODEL.base_channels} channels, tile {TILE} (input {size}), batch {a.batch}, "
          f"{device}, {dtype or 'fp32'}, channels_last, 2 threads; {steps} steps, loss read every {log_every}, "
          f"checkpoint every {checkpoint_every}")
    print(f"full training loop: {full:.2f} steps/s; bare forward/backward/step: {bare:.2f} steps/s")
    print(f"ratio full / bare: {full / bare:.2f} (target >= 0.9)")
    print(f"labelled pixels per second: {full * a.batch * TILE * TILE / 1e6:.2f} M")
    print(f"data path (tile sampling + augmentation): {1000 * sampling:.1f} ms = "
          f"{100 * sampling * bare:.1f}% of a bare step (target < 15%)")


if __name__ == "__main__":
    main()
