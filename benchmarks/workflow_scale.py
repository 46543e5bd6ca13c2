"""The inference chain on a stack larger than any one job may hold, every job capped at 2 GB of memory.

    python benchmarks/workflow_scale.py [--shape 64,8192,8192] [--limit-mb 2048] [--keep DIR]

Builds an EM-like uint8 stack of `--shape` (default 64 x 8192 x 8192 = 4.3 GB)
as a Zarr source, then runs the workflow's own commands for each stage,
each job in its own process with its address space limited to `--limit-mb`
(RLIMIT_AS, as `ulimit -v`), so a job that tried to hold the stack would
fail:

- preprocess (parts), its finishing job (statistics, pyramid);
- predict with a small network (depth 2, 4 channels; the data path and a
  network, not a paper-sized one on 2 CPU cores), trained first for 400 steps
  on the synthetic slices the stack is tiled from (15 s), so that its map
  looks like a trained network's: an untrained one calls nearly every pixel
  cell, one component per slice, the watershed's worst case; its finishing job;
- segment (the seeded watershed): label (parts), join, relabel (parts), its
  finishing job.

Each stage runs once as 1 part and once as 2 parts started together, each
part on `--threads` threads (default 1: the 2 parts then use the 2 cores a
single part leaves half idle). Prints, per stage, Mvoxel/s of one job, peak
RSS of each job, and the wall time of 1 part against 2 concurrent parts;
then the arithmetic for 1 TB on N nodes from the measured rates.

Each stage's measurements are saved in `DIR/results.json` as soon as it
ends; a rerun with the same `--keep DIR` skips the stages recorded there
(the whole run takes about an hour on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from unet_pipeline.synthetic import synthesize_labels_and_raw  # noqa: E402

UNET = [sys.executable, "-m", "unet_pipeline"]


def base_stack() -> tuple[np.ndarray, np.ndarray]:
    """The synthetic 4 x 1024^2 EM stack (raw, labels) that the benchmark's volume is tiled from."""
    return synthesize_labels_and_raw(4, (1024, 1024), seed=1, cell_diameter_px=60)


def make_source(path: Path, shape: tuple[int, int, int]) -> None:
    """An EM-like Zarr stack: the base stack tiled over `shape`, written slice by slice."""
    import zarr

    base, _ = base_stack()
    array = zarr.create_array(str(path), shape=shape, chunks=(1, 1024, 1024), dtype="u1")
    reps = (-(-shape[1] // 1024), -(-shape[2] // 1024))
    for z in range(shape[0]):
        array[z] = np.tile(base[z % 4], reps)[: shape[1], : shape[2]]


def trained_model(work: Path) -> Path:
    """The small network trained for 400 steps on the base stack's first 3 slices (in-process, uncapped)."""
    import tifffile
    import torch

    from unet_pipeline.model import UNetConfig
    from unet_pipeline.preprocess import preprocess
    from unet_pipeline.train import TrainConfig, load_slices, train
    from unet_pipeline.weights import write_weights

    data = work / "training"
    data.mkdir(exist_ok=True)
    raw, labels = base_stack()
    tifffile.imwrite(data / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(data / "labels.tif", labels, photometric="minisblack")
    preprocess(data / "raw.tif", data / "raw.ome.zarr", data / "labels.tif", data / "labels.ome.zarr",
               chunks=(1, 512, 512), chunks_per_file=(1, 1, 1), voxel_size_nm=(50, 4, 4))
    write_weights(data / "labels.ome.zarr", data / "weights.ome.zarr", w0=10, sigma_px=5, label_format="binary",
                  pyramid_levels=1)
    slices = load_slices(data / "raw.ome.zarr", data / "labels.ome.zarr", data / "weights.ome.zarr", [0, 1, 2])
    torch.set_num_threads(2)
    cfg = TrainConfig(steps=400, tile_size=100, batch_size=4, optimizer="adam", learning_rate=3e-3,
                      validate_every=10_000, checkpoint_every=10_000, device="cpu", precision="bf16")
    return train(UNetConfig(depth=2, base_channels=4, dropout=0.0), cfg, slices, None, data / "model",
                 progress=False)


def limited(limit_mb: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))
    return apply


def run_jobs(commands: list[list[str]], limit_mb: int) -> tuple[float, list[float]]:
    """Run commands together, each in its own capped process; (wall seconds, peak RSS MB of each)."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    logs = [tempfile.TemporaryFile(mode="w+") for _ in commands]
    procs = [subprocess.Popen(c, preexec_fn=limited(limit_mb), env=env, stdout=subprocess.DEVNULL, stderr=log)
             for c, log in zip(commands, logs)]
    peaks = []
    for proc, log, command in zip(procs, logs, commands):
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        peaks.append(usage.ru_maxrss / 1024)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command[2:4])} failed ({proc.returncode}): {log.read()[-2000:]}")
    return time.perf_counter() - start, peaks


def parts(command: list[str], count: int, summary_dir: Path, name: str) -> list[list[str]]:
    return [command + ["--part", f"{i}/{count}", "--summary", str(summary_dir / f"{name}-{count}-{i}.json")]
            for i in range(count)]


def fresh(store: Path) -> None:
    """No store, and no partial one of an interrupted run that a job would resume (and be timed short)."""
    for old in (store, *store.parent.glob(f".{store.name}.partial-*")):
        shutil.rmtree(old, ignore_errors=True)


def save(work: Path, results: dict) -> None:
    (work / "results.json").write_text(json.dumps(results, indent=1))


def stage(label: str, base: list[str], voxels: int, work: Path, limit_mb: int, threads: int, results: dict,
          finish: bool = True, counts=(1, 2)) -> None:
    """Run `base` as 1 part and as 2 concurrent parts into fresh stores; record rates, RSS and wall times."""
    for count in counts:
        if str(count) in results[label]:
            continue  # measured by an earlier run of the benchmark (results.json)
        out = work / f"{label}-{count}.ome.zarr"
        fresh(out)
        command = base + ["--out", str(out), "--threads", str(threads)]
        wall, peaks = run_jobs(parts(command, count, work, label), limit_mb)
        entry = {"wall_s": wall, "peak_rss_mb": peaks, "mvoxel_per_s_per_job": voxels / count / wall / 1e6}
        if finish:
            fwall, fpeaks = run_jobs([UNET + ["finish", "--from", str(work / f"{label}-{count}-0.json"),
                                              "--threads", str(threads)]], limit_mb)
            entry.update(finish_wall_s=fwall, finish_peak_rss_mb=fpeaks[0])
        results[label][str(count)] = entry
        save(work, results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="64,8192,8192")
    ap.add_argument("--limit-mb", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    voxels = int(np.prod(shape))
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="unet-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "results.json"
    results: dict = json.loads(saved.read_text()) if saved.exists() else \
        {k: {} for k in ("preprocess", "predict", "segment_label", "segment_relabel")}
    try:
        source = work / "source.zarr"
        if not source.exists():
            start = time.perf_counter()
            make_source(source, shape)
            print(f"source {shape} uint8 = {voxels / 1e9:.2f} GB written in {time.perf_counter() - start:.0f} s")
        print(f"every job limited to {a.limit_mb} MB of address space, {a.threads} thread(s) per job")

        stage("preprocess", UNET + ["preprocess", "--raw", str(source), "--voxel-size", "50,4,4"], voxels, work,
              a.limit_mb, a.threads, results)
        raw = work / "preprocess-1.ome.zarr"

        model = work / "training" / "model" / "model.pt"
        if not model.exists():
            start = time.perf_counter()
            trained_model(work)
            print(f"small network trained in {time.perf_counter() - start:.0f} s")
        stage("predict", UNET + ["predict", "--raw", str(raw), "--checkpoint", str(model), "--tile-size",
                                 "388", "--device", "cpu", "--precision", "fp32", "--no-progress", "--writers", "1"],
              voxels, work, a.limit_mb, a.threads, results)
        prob = work / "predict-1.ome.zarr"

        # the watershed (ISBI's automatic choice; the dearer method: a halo around each block)
        segment = UNET + ["segment", "--prob", str(prob), "--method", "watershed", "--threshold", "0.3",
                          "--seed-threshold", "0.6", "--min-seed-px", "20"]
        for count in (1, 2):
            if str(count) in results["segment_relabel"]:
                continue
            out = work / f"segmentation-{count}.ome.zarr"
            fresh(out)
            common = ["--out", str(out), "--threads", str(a.threads)]
            wall, peaks = run_jobs(parts(segment + ["--step", "label"] + common, count, work, "label"), a.limit_mb)
            label = {"wall_s": wall, "peak_rss_mb": peaks, "mvoxel_per_s_per_job": voxels / count / wall / 1e6}
            jwall, jpeaks = run_jobs([segment + ["--step", "join"] + common + ["--summary",
                                                                                str(work / f"join-{count}.json")]],
                                     a.limit_mb)
            label.update(join_wall_s=jwall, join_peak_rss_mb=jpeaks[0])
            wall, peaks = run_jobs(parts(segment + ["--step", "relabel"] + common, count, work, "relabel"), a.limit_mb)
            fwall, fpeaks = run_jobs([UNET + ["finish", "--from", str(work / f"relabel-{count}-0.json"), "--threads",
                                              str(a.threads)]], a.limit_mb)
            results["segment_label"][str(count)] = label
            results["segment_relabel"][str(count)] = {"wall_s": wall, "peak_rss_mb": peaks,
                                                      "mvoxel_per_s_per_job": voxels / count / wall / 1e6,
                                                      "finish_wall_s": fwall, "finish_peak_rss_mb": fpeaks[0]}
            save(work, results)
        import zarr

        for name in ("preprocess", "predict", "segmentation"):
            a1 = zarr.open_array(str(work / f"{name}-1.ome.zarr" / "0"), mode="r")
            a2 = zarr.open_array(str(work / f"{name}-2.ome.zarr" / "0"), mode="r")
            same = all(np.array_equal(a1[z], a2[z]) for z in range(0, shape[0], max(1, shape[0] // 8)))
            print(f"{name}: 1 part and 2 parts wrote identical level 0 (sampled slices): {same}")

        print(f"\n{'stage':16s} {'Mvoxel/s per job':>17s} {'peak RSS per job (MB)':>24s} {'wall 1 part':>12s} "
              f"{'wall 2 parts':>13s} {'speed-up':>9s}")
        for name, by_count in results.items():
            one, two = by_count["1"], by_count["2"]
            print(f"{name:16s} {one['mvoxel_per_s_per_job']:17.1f} "
                  f"{max(one['peak_rss_mb'] + two['peak_rss_mb']):24.0f} {one['wall_s']:11.0f}s {two['wall_s']:12.0f}s "
                  f"{one['wall_s'] / two['wall_s']:9.2f}")
        extra = {f"{name} {key.removesuffix('_wall_s')}": results[name]["1"][key]
                 for name, key in (("preprocess", "finish_wall_s"), ("predict", "finish_wall_s"),
                                   ("segment_label", "join_wall_s"), ("segment_relabel", "finish_wall_s"))}
        print("finishing jobs (1 part), seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in extra.items()))
        print(json.dumps({"shape": shape, "limit_mb": a.limit_mb, "threads": a.threads, "results": results}))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
