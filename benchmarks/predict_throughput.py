"""Prediction throughput against the network's own speed, and memory against volume size, in one run.

    python benchmarks/predict_throughput.py [--device auto|cpu|cuda] [--paper-net] [--tta none|d4]

Prints, in Mvoxel/s (medians of --repeats):
1. data path: one `predict_part` job with the zero-cost `PassThroughNet` (Zarr read,
   decompression, mirroring, normalisation, tiling, batching, device copies,
   encoding, compression, completion records), default config (chunks
   1x512x512, 8x8 chunks per file, batch auto, 2 writers). Target on 2 CPU
   cores: >= 100. Measured in the steady state of a long job (32 slices of
   2048^2 on a CPU, 64 on a GPU), and also on 8 slices, where a job's start
   (the first strip is read before any tile runs) and end (the last block is
   compressed after the last tile) are a larger share;
2. the best bare forward of the network over tiles already on the device:
   batch 1 / 4 / 16, channels_last on and off, torch.compile where
   --compile is given (CUDA), with the same precision and test-time
   augmentation;
3. end to end: one `predict_part` job with the real network, and its ratio to the
   best bare forward (target >= 0.9 on CPU, >= 0.8 on a GPU; with d4, of
   best bare / 8), on slices of whole 388 tiles, so that the ratio measures
   the pipeline rather than how a slice's size divides into tiles;
4. MONAI's `sliding_window_inference` on the same network with the same
   mirror padding, where MONAI is installed (a benchmark-only dependency);
5. peak RSS of `unet-pipeline predict` for a volume and one 8x larger
   (target <= 1.2x): 4x the slices and 2x the rows at the same width, and
   also 2x wider and taller. Memory is bounded by a few strips (a block row
   across the slice width) and blocks (at most one shard, 4096^2 by
   default), so it does not grow with slices or rows, but it does with the
   slice width up to the shard size.
Defaults: the 16-channel network of config/config.yaml on CPU; --paper-net
for the 64-channel one (on a GPU).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from unet_pipeline.threads import prefer_sleeping_openmp_threads  # noqa: E402

prefer_sleeping_openmp_threads()  # as the CLI does, before torch is imported: measure what the workflow runs

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from common import sync  # noqa: E402
from unet_pipeline import stores  # noqa: E402
from unet_pipeline.checkpoint import save_checkpoint  # noqa: E402
from unet_pipeline.device import resolve_device, resolve_dtype  # noqa: E402
from unet_pipeline.geometry import Part, tta_transforms  # noqa: E402
from unet_pipeline.inference import PassThroughNet, Predictor  # noqa: E402
from unet_pipeline.model import UNet, UNetConfig  # noqa: E402
from unet_pipeline.predict import predict_part  # noqa: E402
from unet_pipeline.preprocess import preprocess  # noqa: E402
from unet_pipeline.synthetic import synthesize_labels_and_raw  # noqa: E402

TILE = 388
CHUNKS = (1, 512, 512)
CHUNKS_PER_FILE = (1, 8, 8)


def make_volume(tmp: Path, name: str, shape) -> Path:
    """An EM-like volume: a synthetic 1024^2 stack tiled to `shape` (synthesis of large slices is slow)."""
    base, _ = synthesize_labels_and_raw(2, (1024, 1024), seed=1, cell_diameter_px=60)
    reps = [-(-s // b) for s, b in zip(shape, base.shape)]
    raw = np.tile(base, reps)[: shape[0], : shape[1], : shape[2]]
    tifffile.imwrite(tmp / f"{name}.tif", raw, photometric="minisblack")
    preprocess(tmp / f"{name}.tif", tmp / f"{name}.ome.zarr", chunks=CHUNKS, chunks_per_file=CHUNKS_PER_FILE,
               voxel_size_nm=(50, 4, 4))
    return tmp / f"{name}.ome.zarr"


def checkpoint(tmp: Path, cfg: UNetConfig) -> Path:
    torch.manual_seed(0)
    path = tmp / f"model-{cfg.base_channels}.pt"
    save_checkpoint(path, {"model": UNet(cfg).state_dict(), "model_config": cfg.to_dict()})
    return path


def median_rate(fn, voxels: int, repeats: int) -> float:
    """Median Mvoxel/s of `repeats` runs after one warm-up run (imports, first allocations)."""
    fn()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(voxels / (time.perf_counter() - start) / 1e6)
    return statistics.median(rates)


def run_predict(predictor, raw_path: Path, ckpt: Path, tmp: Path, tag: str, out_dtype: str = "float16"):
    """One job's prediction (a whole part) into a fresh store per call; the previous call's store is removed."""
    counter = iter(range(10**6))

    def once():
        i = next(counter)
        for old in tmp.glob(f".{tag}-{i - 1}.ome.zarr.partial-*"):
            shutil.rmtree(old, ignore_errors=True)
        predict_part(predictor, raw_path, tmp / f"{tag}-{i}.ome.zarr", ckpt, Part(0, 1), chunks=CHUNKS,
                     chunks_per_file=CHUNKS_PER_FILE, out_dtype=out_dtype, tta="none", precision="auto",
                     pyramid_levels=0, writers=2)
    return once


def bare_forward(model, cfg, device, dtype, transforms, tiles_total: int, repeats: int, try_compile: bool):
    """Best Mvoxel/s of the network alone over tiles already on the device."""
    size = cfg.input_size(TILE)
    results = {}
    for batch in (1, 4, 16):
        for channels_last in (False, True):
            for compiled in ((False, True) if try_compile else (False,)):
                p = Predictor(model, device, TILE, dtype, transforms, batch * len(transforms),
                              channels_last=channels_last, compile=compiled)
                x = torch.rand(batch, size, size, device=device)
                p.probabilities(x)  # warm-up (and compilation)
                sync(device)
                steps = max(1, tiles_total // batch)

                def run():
                    for _ in range(steps):
                        p.probabilities(x)
                    sync(device)
                results[(batch, channels_last, compiled)] = median_rate(run, steps * batch * TILE * TILE, repeats)
    model.to(memory_format=torch.contiguous_format)
    return results


def monai_sliding_window(model, cfg, device, dtype, volume: np.ndarray, repeats: int) -> float | None:
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    m = cfg.context_margin
    model = model.eval()

    def net(x):  # same-size output: pad by the context margin, mirror like ours
        x = torch.nn.functional.pad(x, (m, m, m, m), mode="reflect")
        with torch.autocast(device.type, dtype) if dtype else torch.inference_mode():
            return torch.softmax(model(x).float(), 1)[:, 1:]

    data = torch.from_numpy(volume.astype(np.float32) / 255)[:, None].to(device)

    def run():
        with torch.inference_mode():
            sliding_window_inference(data, (TILE, TILE), 16, net, overlap=0.0, padding_mode="reflect")
        sync(device)
    return median_rate(run, volume.size, repeats)


def peak_rss_mb(raw_path: Path, ckpt: Path, out: Path, device: str) -> float:
    code = (
        "import resource, subprocess, sys;"
        f"subprocess.run([sys.executable, '-m', 'unet_pipeline', 'predict', '--raw', '{raw_path}',"
        f" '--checkpoint', '{ckpt}', '--out', '{out}', '--tile-size', '{TILE}', '--chunks', "
        f"'{','.join(map(str, CHUNKS))}', '--device', '{device}', '--part', '0/1', '--no-progress'], check=True,"
        " stdout=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
               .stdout.split()[-1]) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--paper-net", action="store_true", help="64 base channels (the paper's network)")
    ap.add_argument("--tta", default="none")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile for the bare forward")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    dtype = resolve_dtype("auto", device)
    transforms = tta_transforms(a.tta)
    cfg = UNetConfig(base_channels=64 if a.paper_net else 16, dropout=0.0)
    gpu = device.type == "cuda"
    data_shape = (64, 2048, 2048) if gpu else (32, 2048, 2048)
    short_shape = (8, 2048, 2048)
    # Slices of 3 (CPU) or 6 (GPU) whole 388 tiles (384 k + 4 px): the ratio then measures the pipeline
    # around the network. Other sizes add the tiling's own cost: tiles are balanced across the slice
    # (1024 px: three of 356), about 10% more network work per output voxel than 388 tiles.
    net_shape = (32, 2308, 2308) if gpu else (2, 1156, 1156)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = checkpoint(tmp, cfg)
        print(f"device {device}, precision {dtype or 'fp32'}, {torch.get_num_threads()} threads, tile {TILE}, "
              f"chunks {CHUNKS}, {len(transforms)} TTA pass(es), network {cfg.base_channels} channels")

        stub = Predictor(PassThroughNet(cfg), device, TILE, dtype, transforms, None)
        raw_path = make_volume(tmp, "data", data_shape)
        rate = median_rate(run_predict(stub, raw_path, ckpt, tmp, "stub"), int(np.prod(data_shape)), a.repeats)
        rate_u8 = median_rate(run_predict(stub, raw_path, ckpt, tmp, "stub8", "uint8"), int(np.prod(data_shape)),
                              a.repeats)
        short_path = make_volume(tmp, "short", short_shape)
        short = median_rate(run_predict(stub, short_path, ckpt, tmp, "short"), int(np.prod(short_shape)), a.repeats)
        print(f"1. data path (zero-cost PassThroughNet), volume {data_shape}: {rate:.1f} Mvoxel/s with float16 "
              f"output, {rate_u8:.1f} with uint8 (target >= 100 on 2 CPU cores); volume {short_shape}, start and "
              f"end of a job included: {short:.1f} Mvoxel/s")

        model = UNet(cfg).to(device).eval()
        tiles = 64 if gpu else 4
        bare = bare_forward(model, cfg, device, dtype, transforms, tiles, a.repeats, a.compile and gpu)
        best_key = max(bare, key=bare.get)
        for (batch, cl, comp), r in sorted(bare.items()):
            print(f"2. bare forward, batch {batch}, channels_last {cl}, compile {comp}: {r:.2f} Mvoxel/s")
        print(f"   best bare: {bare[best_key]:.2f} Mvoxel/s (batch {best_key[0]}, channels_last {best_key[1]}, "
              f"compile {best_key[2]})")

        net_path = make_volume(tmp, "net", net_shape)
        predictor = Predictor(model, device, TILE, dtype, transforms, None, compile=best_key[2])
        end_to_end = median_rate(run_predict(predictor, net_path, ckpt, tmp, "net"), int(np.prod(net_shape)),
                                 a.repeats)
        target = 0.8 if gpu else 0.9
        print(f"3. end to end, volume {net_shape}: {end_to_end:.2f} Mvoxel/s; "
              f"ratio to the best bare forward: {end_to_end / bare[best_key]:.2f} (target >= {target})")

        volume = stores.open_image(net_path)[...]
        monai = monai_sliding_window(UNet(cfg).to(device), cfg, device, dtype, volume, a.repeats)
        if monai is None:
            print("4. MONAI sliding_window_inference: MONAI is not installed (pip install monai to compare)")
        else:
            print(f"4. MONAI sliding_window_inference (roi {TILE}, sw_batch 16): {monai:.2f} Mvoxel/s; "
                  f"ours / MONAI: {end_to_end / monai:.2f} (target >= 2)")

        tiny = UNetConfig(base_channels=4, dropout=0.0)
        tiny_ckpt = checkpoint(tmp, tiny)
        rss = {}
        for name, shape in (("small", (3, 1024, 1024)), ("tall", (12, 2048, 1024)), ("wide", (6, 2048, 2048))):
            rss[name] = peak_rss_mb(make_volume(tmp, name, shape), tiny_ckpt, tmp / f"{name}-prob.ome.zarr",
                                    str(device))
        print(f"5. peak RSS of predict: {rss['small']:.0f} MB for (3, 1024, 1024); {rss['tall']:.0f} MB for "
              f"(12, 2048, 1024), 8x the voxels at the same width: ratio {rss['tall'] / rss['small']:.2f} "
              f"(target <= 1.2); {rss['wide']:.0f} MB for (6, 2048, 2048), 8x the voxels with 2x the width: "
              f"ratio {rss['wide'] / rss['small']:.2f} (strips and blocks span the width up to one shard)")
        print(json.dumps({"data_path_mvox_s": rate, "data_path_uint8_mvox_s": rate_u8, "data_path_short_mvox_s": short, "best_bare_mvox_s": bare[best_key],
                          "end_to_end_mvox_s": end_to_end, "monai_mvox_s": monai,
                          **{f"rss_{k}_mb": v for k, v in rss.items()}}))


if __name__ == "__main__":
    main()
