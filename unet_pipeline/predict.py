"""Overlap-tile inference over volumes far larger than memory (paper, Fig. 2).

The output chunk grid drives everything: each chunk reads its input region
(chunk + context margin, mirrored past the volume border), runs the network
on abutting tiles inside it and writes exactly its own output chunk, so no
locks or blending are needed and memory is bounded by one chunk per worker.
Chunks are tasks of a dask graph (reading the next chunk overlaps with
computing the current one). Completion is recorded per chunk in a small
`done` Zarr array, written only after the chunk's data is on disk: a killed
run restarts with only unfinished chunks, and `--shard i/N` splits the chunks
among N jobs writing into the same store. `gather` checks every chunk, then
builds the pyramid and marks the store complete.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
import torch
import zarr
from tqdm import tqdm

from unet_pipeline import __version__, io
from unet_pipeline.checkpoint import file_sha256, model_from_checkpoint
from unet_pipeline.device import autocast, resolve_device, resolve_dtype
from unet_pipeline.errors import ConfigError, InputError
from unet_pipeline.model import UNet, UNetConfig
from unet_pipeline.preprocess import Normaliser
from unet_pipeline.tiling import Box, ChunkGrid, ChunkPlan, read_mirrored

# The 8 symmetries of the square as (quarter turns, flip); test-time augmentation.
DIHEDRAL = tuple((k, f) for f in (False, True) for k in range(4))
DONE_ARRAY = "done"
# Fault injection for tests of retries: fail after N chunks; with the marker
# variable set, only while the marker file does not exist yet (i.e. once).
FAULT_ENV = "UNET_PIPELINE_FAIL_AFTER_CHUNKS"
FAULT_MARKER_ENV = "UNET_PIPELINE_FAULT_MARKER"


def _inject_fault(chunks_done: int) -> None:
    fail_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    if not fail_after or chunks_done < fail_after:
        return
    marker = os.environ.get(FAULT_MARKER_ENV)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
    raise RuntimeError(f"injected fault after {fail_after} chunks ({FAULT_ENV})")


def tta_transforms(tta: str | int | list) -> tuple[tuple[int, bool], ...]:
    """'none' -> identity; 'flips' -> 4 flips; 'd4' or 8 -> all 8; an int n -> first n of the 8."""
    if tta in ("none", None, 0, 1):
        return DIHEDRAL[:1]
    if tta in ("d4", 8):
        return DIHEDRAL
    if tta == "flips":
        return ((0, False), (2, False), (0, True), (2, True))
    if isinstance(tta, int) and 1 <= tta <= 8:
        return DIHEDRAL[:tta]
    raise ConfigError(f"predict.tta must be 'none', 'flips', 'd4' or 1-8, got {tta!r}")


@dataclass
class Predictor:
    """A trained network plus how to run it (device, precision, test-time augmentation)."""

    model: UNet
    device: torch.device
    dtype: torch.dtype | None = None
    transforms: tuple[tuple[int, bool], ...] = DIHEDRAL[:1]
    max_tile: int = 388
    batch_size: int = 1

    def __post_init__(self):
        self.model = self.model.to(self.device).eval()
        cfg = self.model.cfg
        if not cfg.is_valid_output_size(self.max_tile):
            lo, hi = cfg.nearest_valid_output_sizes(self.max_tile)
            raise ConfigError(f"predict.tile_size {self.max_tile} is not a valid output tile; nearest valid: {lo} and {hi}")

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """Cell probability for a batch of (n, h, w) normalised input tiles."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)[:, None]
        total = None
        for k, flip in self.transforms:
            xt = torch.rot90(x, k, dims=(-2, -1))
            if flip:
                xt = torch.flip(xt, dims=(-1,))
            with autocast(self.device, self.dtype):
                logits = self.model(xt)
            prob = torch.softmax(logits.float(), dim=1)[:, 1]
            if flip:
                prob = torch.flip(prob, dims=(-1,))
            prob = torch.rot90(prob, -k, dims=(-2, -1))
            total = prob if total is None else total + prob
        return (total / len(self.transforms)).cpu().numpy()

    def predict_block(self, block: np.ndarray, plan: ChunkPlan) -> np.ndarray:
        """Run every tile of `plan` on the normalised read region `block`; returns the chunk."""
        out = np.empty(plan.computed.shape, np.float32)
        jobs = [(z, tile) for z in range(block.shape[0]) for tile in plan.tiles]
        # Tiles of equal shape go through the network together.
        by_shape: dict[tuple, list] = {}
        for z, tile in jobs:
            by_shape.setdefault(tile.input.shape[1:], []).append((z, tile))
        for items in by_shape.values():
            for i in range(0, len(items), self.batch_size):
                group = items[i:i + self.batch_size]
                batch = np.stack([block[z][tile.input.slices[1:]] for z, tile in group])
                probs = self._forward(batch)
                for (z, tile), prob in zip(group, probs):
                    out[(z, *tile.output.slices[1:])] = prob
        crop = plan.chunk.relative_to(plan.computed.start)
        return out[crop.slices]

    def predict_image(self, image: np.ndarray) -> np.ndarray:
        """Whole-array prediction of normalised (slices, y, x) data held in memory."""
        image = image[None] if image.ndim == 2 else image
        plan = ChunkPlan.make(Box((0, 0, 0), image.shape), self.model.cfg, self.max_tile)
        return self.predict_block(read_mirrored(image, plan.read), plan)


def load_predictor(checkpoint: str | os.PathLike, device: str = "auto", precision: str = "auto",
                   tta="none", tile_size: int = 388, batch_size: int = 1,
                   expected_model: UNetConfig | None = None) -> Predictor:
    """The checkpoint's network ready to predict; refuses one that differs from `expected_model`."""
    dev = resolve_device(device)
    model, _ = model_from_checkpoint(checkpoint, expected=expected_model, device=dev)
    return Predictor(model, dev, resolve_dtype(precision, dev), tta_transforms(tta), tile_size, batch_size)


# --------------------------------------------------------------------------- output store
def _encode(prob: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    return prob.astype(np.float16 if dtype == "float16" else np.float32)


def _store_signature(raw_path, shape, chunks, out_dtype, checkpoint_hash, tta, precision) -> dict:
    return {"input": str(Path(raw_path).resolve()), "shape": list(shape), "chunks": list(chunks),
            "dtype": out_dtype, "checkpoint_sha256": checkpoint_hash, "tta": str(tta), "precision": precision}


def open_output(out_path: Path, raw: zarr.Array, chunks, out_dtype: str, signature: dict,
                overwrite: bool, voxel_size) -> tuple[zarr.Array, zarr.Array]:
    """Create the output store (race-free across shards) or reopen a matching one."""
    if out_path.exists() and overwrite and not _is_ours(out_path, signature):
        shutil.rmtree(out_path, ignore_errors=True)
    if not out_path.exists():
        tmp = out_path.with_name(f".{out_path.name}.init-{uuid.uuid4().hex[:8]}")
        arr = io.create_ome_image(tmp, raw.shape, out_dtype, chunks, voxel_size, name="cell_probability")
        group = zarr.open_group(str(tmp), mode="r+")
        grid = ChunkGrid(tuple(raw.shape), tuple(arr.chunks))
        group.create_array(DONE_ARRAY, shape=grid.grid_shape, chunks=(1, 1, 1), dtype="uint8", fill_value=0)
        group.attrs["predict"] = signature
        try:
            os.rename(tmp, out_path)  # atomic; fails if another shard won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(out_path), mode="r+")
    existing = dict(group.attrs.get("predict", {}))
    if existing != signature:
        changed = sorted(k for k in set(existing) | set(signature) if existing.get(k) != signature.get(k))
        raise InputError(
            f"{out_path}: holds a different prediction (differs in {', '.join(changed) or 'layout'}); "
            "delete it or pass --overwrite to replace it."
        )
    return group["0"], group[DONE_ARRAY]


def _is_ours(path: Path, signature: dict) -> bool:
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs.get("predict", {})) == signature
    except Exception:
        return False


def _fsync_chunk(out_path: Path, index: tuple[int, ...]) -> None:
    """Make the chunk's file durable before its done flag is written."""
    chunk_file = out_path / "0" / "c" / Path(*map(str, index))
    if chunk_file.exists():
        with open(chunk_file, "rb") as fh:
            os.fsync(fh.fileno())


@dataclass
class PredictStats:
    chunks_total: int = 0
    chunks_skipped: int = 0
    chunks_computed: int = 0
    seconds: float = 0.0
    voxels: int = 0
    extra: dict = field(default_factory=dict)


def predict_volume(
    predictor: Predictor | None,
    raw_path: str | os.PathLike,
    out_path: str | os.PathLike,
    checkpoint: str | os.PathLike,
    chunks: tuple[int, int, int] = (1, 512, 512),
    out_dtype: str = "float16",
    shard: tuple[int, int] = (0, 1),
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    precision: str = "auto",
    tta="none",
    init_only: bool = False,
) -> PredictStats:
    """Predict the chunks of one shard into `out_path` (created if needed).

    `init_only` creates (or, with `overwrite`, replaces a different) store and
    returns: the workflow does this once before the shards start, so that a
    retrained model replaces the old prediction without shards racing to do so.
    """
    raw_path, out_path = Path(raw_path), Path(out_path)
    raw = io.open_ome_image(raw_path)
    if raw.ndim != 3:
        raise InputError(f"{raw_path}: expected a 3D (slices, y, x) image, got {raw.ndim}D.")
    if out_dtype not in ("float16", "float32", "uint8"):
        raise ConfigError(f"predict.dtype must be float16, float32 or uint8, got {out_dtype!r}")
    if any(c > s for c, s in zip(chunks, raw.shape)):
        raise ConfigError(
            f"predict.chunks {tuple(chunks)} is larger than the volume {tuple(raw.shape)} of {raw_path}; "
            "use a chunk shape no larger than the volume."
        )
    attrs = io.store_attrs(raw_path)
    normalise = Normaliser.from_attrs(attrs, str(raw_path))
    voxel = attrs.get("voxel_size", (1.0, 1.0, 1.0))
    signature = _store_signature(raw_path, raw.shape, chunks, out_dtype, file_sha256(checkpoint), tta, precision)
    if io.is_complete(out_path) and _is_ours(out_path, signature):
        return PredictStats(extra={"already_complete": True})
    if io.is_complete(out_path) and not overwrite:
        raise InputError(f"{out_path}: a complete, different output exists; pass --overwrite to replace it.")
    out, done = open_output(out_path, raw, chunks, out_dtype, signature, overwrite, voxel)
    if init_only:
        return PredictStats(extra={"initialised": str(out_path)})
    grid = ChunkGrid(tuple(raw.shape), tuple(out.chunks))
    mine = grid.shard(*shard)
    done_flags = np.asarray(done[...])
    pending = [idx for idx in mine if not done_flags[idx]]
    stats = PredictStats(chunks_total=len(mine), chunks_skipped=len(mine) - len(pending))
    bar = tqdm(total=len(mine), initial=stats.chunks_skipped, unit="chunk", disable=not progress,
               desc=f"predict {shard[0]}/{shard[1]}")
    lock = threading.Lock()
    start = time.perf_counter()

    def read(idx):
        plan = ChunkPlan.make(grid.box(idx), predictor.model.cfg, predictor.max_tile)
        return plan, normalise(read_mirrored(raw, plan.read))

    def compute_and_write(job, idx):
        plan, block = job
        prob = predictor.predict_block(block, plan)
        out[plan.chunk.slices] = _encode(prob, out_dtype)
        _fsync_chunk(out_path, idx)
        done[idx] = 1
        with lock:
            stats.chunks_computed += 1
            stats.voxels += prob.size
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(voxels_per_s=f"{stats.voxels / max(elapsed, 1e-9):.3g}")
            _inject_fault(stats.chunks_computed)
        return idx

    # One read task and one compute task per chunk; with two or more threads
    # the read of the next chunk runs while the network works on this one.
    tasks = [dask.delayed(compute_and_write)(dask.delayed(read)(idx), idx) for idx in pending]
    try:
        if tasks:
            dask.compute(*tasks, scheduler="threads", num_workers=max(1, workers))
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def gather(out_path: str | os.PathLike, pyramid_levels: int = 2, provenance: dict | None = None) -> None:
    """Check that every chunk of every shard is done, then build the pyramid and mark complete."""
    out_path = Path(out_path)
    if not out_path.exists():
        raise InputError(f"{out_path}: no prediction store; run the predict shards first.")
    group = zarr.open_group(str(out_path), mode="r+")
    done = np.asarray(group[DONE_ARRAY][...])
    missing = int(done.size - np.count_nonzero(done))
    if missing:
        raise InputError(f"{out_path}: {missing} of {done.size} chunks are not predicted yet; rerun the missing shards.")
    if not io.is_complete(out_path):
        signature = dict(group.attrs["predict"])
        io.build_pyramid(out_path, pyramid_levels, name="cell_probability")
        io.mark_complete(out_path, {**signature, **(provenance or {}), "content": "cell probability (high = cell)",
                                    "package_version": __version__})


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError as exc:
        raise ConfigError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from exc
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text}: i must lie in 0..N-1")
    return i, n


def write_summary(path: str | os.PathLike, stats: PredictStats) -> None:
    io.atomic_write_text(path, json.dumps(stats.__dict__, indent=2, default=str))
