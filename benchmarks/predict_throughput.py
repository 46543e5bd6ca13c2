"""Prediction: end-to-end throughput vs the bare model, and memory vs volume size.

1. Throughput: `predict_volume` (Zarr read, decompress, mirror, normalise,
   model, write, compress, done flags) against the bare model forward over
   the very same tiles already in memory, same dtype and threads, one run.
   Issue 4 target: ratio >= 0.9.
2. Memory: peak RSS of `unet-pipeline predict` (a fresh process each) on a
   volume and on one 8x larger (2x in z, y and x) with the same chunking.
   Target: at most 1.2x.
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from unet_pipeline import io  # noqa: E402
from unet_pipeline.checkpoint import save_checkpoint  # noqa: E402
from unet_pipeline.model import UNet, UNetConfig  # noqa: E402
from unet_pipeline.predict import load_predictor, predict_volume  # noqa: E402
from unet_pipeline.preprocess import Normaliser, preprocess  # noqa: E402
from unet_pipeline.synthetic import synthesize_labels_and_raw  # noqa: E402
from unet_pipeline.tiling import ChunkGrid, ChunkPlan, read_mirrored  # noqa: E402

TILE = 388
CHUNKS = (1, 512, 512)


def make_volume(tmp: Path, name: str, shape) -> Path:
    raw, _ = synthesize_labels_and_raw(shape[0], shape[1:], seed=1, cell_diameter_px=60)
    tifffile.imwrite(tmp / f"{name}.tif", raw, photometric="minisblack")
    preprocess(tmp / f"{name}.tif", tmp / f"{name}.ome.zarr", chunks=CHUNKS)
    return tmp / f"{name}.ome.zarr"


def checkpoint(tmp: Path, cfg: UNetConfig) -> Path:
    torch.manual_seed(0)
    path = tmp / f"model-{cfg.base_channels}.pt"
    save_checkpoint(path, {"model": UNet(cfg).state_dict(), "model_config": cfg.to_dict()})
    return path


def throughput(tmp: Path) -> None:
    cfg = UNetConfig(base_channels=16, dropout=0.0)
    ckpt = checkpoint(tmp, cfg)
    raw_path = make_volume(tmp, "tput", (4, 1024, 1024))
    predictor = load_predictor(ckpt, "cpu", "auto", "none", TILE)
    start = time.perf_counter()
    predict_volume(predictor, raw_path, tmp / "tput-prob.ome.zarr", ckpt, CHUNKS, "float16", progress=False)
    end_to_end = time.perf_counter() - start

    raw = io.open_ome_image(raw_path)
    normalise = Normaliser.from_attrs(io.store_attrs(raw_path))
    grid = ChunkGrid(tuple(raw.shape), CHUNKS)
    jobs = []
    for idx in grid.indices():
        plan = ChunkPlan.make(grid.box(idx), cfg, TILE)
        jobs.append((normalise(read_mirrored(raw, plan.read)), plan))
    start = time.perf_counter()
    for block, plan in jobs:  # the same tiles, in memory: model only
        for tile in plan.tiles:
            predictor._forward(block[0][tile.input.slices[1:]][None])
    bare = time.perf_counter() - start
    voxels = int(np.prod(raw.shape))
    print(f"volume {raw.shape}, chunks {CHUNKS}, tile {TILE}, model 16 channels depth 4, "
          f"{predictor.dtype or 'fp32'}, {torch.get_num_threads()} threads")
    print(f"end-to-end predict: {voxels / end_to_end / 1e6:.3f} Mvoxel/s; bare model on the same tiles: "
          f"{voxels / bare / 1e6:.3f} Mvoxel/s")
    print(f"ratio end-to-end / bare: {bare / end_to_end:.2f} (target >= 0.9)")


def peak_rss_mb(raw_path: Path, ckpt: Path, out: Path) -> float:
    code = (
        "import resource, subprocess, sys;"
        f"subprocess.run([sys.executable, '-m', 'unet_pipeline.cli', 'predict', '--raw', '{raw_path}',"
        f" '--checkpoint', '{ckpt}', '--out', '{out}', '--tile-size', '{TILE}', '--chunks', "
        f"'{','.join(map(str, CHUNKS))}', '--no-progress'], check=True, stdout=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
               .stdout.split()[-1]) / 1024


def memory(tmp: Path) -> None:
    cfg = UNetConfig(base_channels=4, dropout=0.0)
    ckpt = checkpoint(tmp, cfg)
    small = make_volume(tmp, "small", (3, 1024, 1024))
    large = make_volume(tmp, "large", (6, 2048, 2048))
    rss_small = peak_rss_mb(small, ckpt, tmp / "small-prob.ome.zarr")
    rss_large = peak_rss_mb(large, ckpt, tmp / "large-prob.ome.zarr")
    print(f"peak RSS of predict: {rss_small:.0f} MB for {io.open_ome_image(small).shape}, "
          f"{rss_large:.0f} MB for {io.open_ome_image(large).shape} (8x the voxels)")
    print(f"ratio large / small: {rss_large / rss_small:.2f} (target <= 1.2)")
    print(json.dumps({"rss_small_mb": rss_small, "rss_large_mb": rss_large}))


def main():
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        throughput(Path(tmp))
        memory(Path(tmp))


if __name__ == "__main__":
    main()
