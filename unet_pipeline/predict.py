"""Overlap-tile inference over volumes far larger than memory (paper, Fig. 2).

The data path is a bounded pipeline of three stages, so that the network,
not the bookkeeping around it, sets the speed:

1. a reader thread walks the job's *strips* (a row of output blocks across the
   whole slice width) in order and reads each strip's input region, mirrored
   past the volume border; rows shared with the next strip are kept, so every
   input chunk is decoded once per job (`StripReader`);
2. the calling thread is the device feeder: it uploads each strip's raw bytes
   (pinned memory, non-blocking copies on CUDA), cuts tiles from it,
   batches them across blocks and strips, normalises them, runs the network
   with test-time augmentation batched (`inference.Predictor`) and scatters the
   probabilities into per-block buffers, all on the device without a host
   synchronisation per tile; a finished block is encoded to the output dtype
   on the device and copied back asynchronously;
3. writer threads compress and write each block, which is exactly one Zarr v3
   shard (one file), then record it as finished.

Memory is bounded by a few strips of raw input and a few output blocks,
whatever the volume size. Tiles start on the pooling grid, so the result
equals one whole-slice pass exactly (to 1e-5 in fp32); each output voxel is
written once. Completion is recorded per block in append-only logs, one file
per job (`CompletionLog`), after the block's file is fsync'ed: a killed run
restarts with only unfinished blocks, and `--shard i/N` gives N jobs
disjoint, contiguous runs of strips that write into one store. The store has
no OME metadata until `gather` has checked every block, built the pyramid
and marked it complete, so outside readers never show a half-written map.
"""
from __future__ import annotations

import gc
import json
import math
import os
import queue
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from unet_pipeline import __version__, io
from unet_pipeline.blockstore import CompletionLog, block_file, block_grid, finish_store
from unet_pipeline.checkpoint import file_sha256
from unet_pipeline.errors import ConfigError, InputError
from unet_pipeline.inference import Predictor, stack_tiles
from unet_pipeline.preprocess import Normaliser
from unet_pipeline.provenance import derive_fingerprint, store_fingerprint
from unet_pipeline.shards import ShardCodec, write_shard
from unet_pipeline.tiling import Box, ChunkGrid, ChunkPlan, mirror_indices

PROGRESS_DIR = "unet_progress"
OUT_DTYPES = ("float16", "float32", "uint8")
# Fault injection for tests of retries: fail after N blocks; with the marker
# variable set, only while the marker file does not exist yet (i.e. once).
FAULT_ENV = "UNET_PIPELINE_FAIL_AFTER_BLOCKS"
FAULT_MARKER_ENV = "UNET_PIPELINE_FAULT_MARKER"
# Strips read ahead of the feeder: enough to hide a read behind the network.
READ_AHEAD = 2
# Widest part of a strip handed to the device at once: a strip of a very wide
# section (100k px) goes as several segments, so that float regions and device
# uploads stay bounded; the reader still decodes the strip's rows once.
SEGMENT_PX = 16384


def _inject_fault(blocks_done: int) -> None:
    fail_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    if not fail_after or blocks_done < fail_after:
        return
    marker = os.environ.get(FAULT_MARKER_ENV)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
    raise RuntimeError(f"injected fault after {fail_after} blocks ({FAULT_ENV})")


# --------------------------------------------------------------------------- output store
def _store_signature(raw_path, shape, chunks, block, out_dtype, checkpoint_hash, tta, precision,
                     voxel_size, input_fingerprint) -> dict:
    return {"input": str(Path(raw_path).resolve()), "input_fingerprint": input_fingerprint, "shape": list(shape),
            "chunks": list(chunks), "block": list(block), "dtype": out_dtype, "checkpoint_sha256": checkpoint_hash,
            "tta": str(tta), "precision": precision, "voxel_size": list(voxel_size)}


def open_output(out_path: Path, shape, chunks, chunks_per_file, out_dtype: str, signature: dict,
                overwrite: bool) -> zarr.Array:
    """Create the output store (race-free across shards) or reopen a matching one."""
    if overwrite:
        # The one job allowed to replace the store (the workflow's predict_init) also clears
        # stores half-created by a killed init; shard jobs never do, as they may race each other.
        for stale in out_path.parent.glob(f".{out_path.name}.init-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if out_path.exists() and not _is_ours(out_path, signature):
            shutil.rmtree(out_path, ignore_errors=True)
    if not out_path.exists():
        tmp = out_path.with_name(f".{out_path.name}.init-{uuid.uuid4().hex[:8]}")
        io.create_ome_image(tmp, shape, out_dtype, chunks, chunks_per_file=chunks_per_file,
                            codec=io.fast_compressor(), multiscales=False)
        zarr.open_group(str(tmp), mode="r+").attrs["predict"] = signature

        try:
            os.rename(tmp, out_path)  # atomic; fails if another shard won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    existing = dict(zarr.open_group(str(out_path), mode="r").attrs.get("predict", {}))
    if existing != signature:
        raise InputError(f"{out_path}: holds a different prediction (differs in {_changed(existing, signature)}); "
                         "delete it or pass --overwrite to replace it.")
    # Every block is written whole and almost never equals the fill value:
    # skipping zarr's per-chunk comparison with it saves 10% of a write.
    return zarr.open_array(str(out_path / "0"), mode="r+", config={"write_empty_chunks": True})


def _changed(existing: dict, signature: dict) -> str:
    """The signature keys that differ, e.g. 'input_fingerprint' when the raw stack was replaced."""
    keys = sorted(k for k in set(existing) | set(signature) if existing.get(k) != signature.get(k))
    return ", ".join(keys) or "layout"


def _is_ours(path: Path, signature: dict) -> bool:
    try:
        group = zarr.open_group(str(path), mode="r")
    except io.ZARR_OPEN_ERRORS:
        return False
    return dict(group.attrs.get("predict", {})) == signature


# --------------------------------------------------------------------------- strips
def plan_strips(grid: ChunkGrid, input_chunk_z: int) -> list[tuple[tuple[int, ...], ...]]:
    """Blocks grouped into strips: all blocks of one block row (z, y) across the width.

    A strip spans as many block layers in z as needed to start and end on the
    input's z-chunk boundaries, so that no input chunk is shared by two strips
    of different z and decoded twice.
    """
    gz, gy, gx = grid.grid_shape
    bz = grid.chunks[0]
    layers = math.lcm(bz, input_chunk_z) // bz
    strips = []
    for z0 in range(0, gz, layers):
        for y in range(gy):
            strips.append(tuple((z, y, x) for z in range(z0, min(gz, z0 + layers)) for x in range(gx)))
    return strips


def shard_strips(strips: list, shard: int, num_shards: int) -> list:
    """Contiguous runs of strips per job: each job reads its own rows once, plus the halo."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard index {shard} is outside 0..{num_shards - 1}")
    n = len(strips)
    return strips[shard * n // num_shards:(shard + 1) * n // num_shards]


def _runs(index: np.ndarray) -> list[tuple[slice, slice]]:
    """Split mirrored indices into runs of step +1 or -1: (destination slice, source slice) pairs.

    Mirroring a strip is then a handful of block copies (3 per axis at most
    unless the margin exceeds the volume), not a gather over every voxel.
    """
    runs, begin = [], 0
    n = len(index)
    while begin < n:
        end = begin + 1
        step = int(index[end] - index[begin]) if end < n else 1
        if abs(step) != 1:
            step = 1
        else:
            while end < n and index[end] - index[end - 1] == step:
                end += 1
        first, last = int(index[begin]), int(index[end - 1])
        stop = last + step if last + step >= 0 else None
        runs.append((slice(begin, end), slice(first, stop, step)))
        begin = end
    return runs


def _segments(strip: tuple, blocks_wide: int) -> list[tuple]:
    """A strip's blocks in runs of at most `blocks_wide` block columns, left to right."""
    columns = sorted({b[2] for b in strip})
    runs = [set(columns[i:i + blocks_wide]) for i in range(0, len(columns), blocks_wide)]
    return [tuple(b for b in strip if b[2] in run) for run in runs]


class StripReader:
    """Reads the mirrored input regions of consecutive strips, decoding each input chunk once.

    Strips arrive in increasing y within a z range; the rows a later strip
    still needs (its context margin reaches back into this one) are kept, and
    only new rows are read, always whole input chunks, so no chunk is decoded
    twice. Memory: a strip's rows across the full slice width.
    """

    def __init__(self, array):
        self.array = array
        # Shards on a local disk are decoded here directly where the layout allows (4x less CPU than zarr).
        root = getattr(array.store, "root", None) if isinstance(array, zarr.Array) else None
        self._directory = Path(root) / array.path if root is not None else None
        self._codec = ShardCodec.for_array(array) if self._directory is not None else None
        self.voxels_read = 0
        self._z: tuple[int, int] | None = None
        self._y0 = self._y1 = 0
        self._rows: np.ndarray | None = None

    def read(self, box: Box):
        """Make `box` readable; returns fill(out, convert), which writes the mirrored region into `out`.

        `convert(source, destination)` copies (and may normalise) one block of it.
        """
        _, height, width = self.array.shape
        row_chunk = self.array.chunks[1]
        z = (box.start[0], box.stop[0])
        iy = mirror_indices(box.start[1], box.stop[1], height)
        lo, hi = int(iy.min()), int(iy.max()) + 1
        first_row = lo // row_chunk * row_chunk
        if self._z != z or lo < self._y0:
            self._z, self._y0, self._y1 = z, first_row, first_row
            self._rows = np.empty((z[1] - z[0], 0, width), self.array.dtype)
        if hi > self._y1:
            stop = min(height, -(-hi // row_chunk) * row_chunk)
            if self._codec is not None:
                fresh = self._codec.read(self._directory, (z[0], self._y1, 0), (z[1], stop, width))
            else:
                fresh = np.asarray(self.array[z[0]:z[1], self._y1:stop])
            self.voxels_read += fresh.size
            self._rows = np.concatenate([self._rows[:, first_row - self._y0:], fresh], axis=1)
            self._y0, self._y1 = first_row, stop
        y_runs = _runs(iy - self._y0)
        x_runs = _runs(mirror_indices(box.start[2], box.stop[2], width))
        return lambda out, convert: [convert(self._rows[:, ys, xs], out[:, yd, xd])
                                     for yd, ys in y_runs for xd, xs in x_runs]


# --------------------------------------------------------------------------- device side
class HostBuffers:
    """A fixed set of reusable host buffers (pinned on CUDA) handed out by size.

    Taking blocks while all are in use: this is the pipeline's back-pressure,
    and it bounds host memory. A buffer's `ready` event (CUDA) is waited on
    before it is reused, so an asynchronous copy never races its next user.
    """

    def __init__(self, count: int, pin: bool):
        self._free: queue.Queue = queue.Queue()
        self._pin = pin
        for _ in range(count):
            self._free.put([torch.empty(0, dtype=torch.uint8), None])

    def take(self, shape, dtype: torch.dtype) -> tuple[list, torch.Tensor]:
        slot = self._free.get()
        base, event = slot
        if event is not None:
            event.synchronize()
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if base.numel() < nbytes:
            base = slot[0] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)
        return slot, base[:nbytes].view(dtype).view(tuple(shape))

    def give(self, slot: list, event=None) -> None:
        slot[1] = event
        self._free.put(slot)


def _encode_into(prob: torch.Tensor, dtype: str, out: torch.Tensor) -> None:
    """Probability -> stored dtype, written into `out` (uint8: round(255 p), half to even like np.rint).

    `prob` is scratch afterwards: uint8 is scaled and rounded in place, and
    the conversion happens in the copy, so no block-sized temporary is made.
    """
    if dtype == "uint8":
        prob = prob.mul_(255.0).round_().clamp_(0, 255)
    out.copy_(prob, non_blocking=out.device != prob.device)


_TORCH_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


@dataclass
class _Block:
    index: tuple[int, ...]
    box: Box
    remaining: int
    buffer: torch.Tensor | None = None


@dataclass
class _Strip:
    plan: ChunkPlan
    region: torch.Tensor
    slot: list
    jobs: list                      # (z, tile, [blocks it touches])
    next_job: int = 0
    unfinished: int = 0


def _overlap(a: Box, b: Box) -> Box | None:
    start = tuple(max(x, y) for x, y in zip(a.start, b.start))
    stop = tuple(min(x, y) for x, y in zip(a.stop, b.stop))
    return Box(start, stop) if all(s < e for s, e in zip(start, stop)) else None


def _strip_jobs(plan: ChunkPlan, blocks: list[_Block]) -> list:
    """(z, tile, blocks) for each tile touching a pending block; column-major, so blocks finish early."""
    origin = plan.computed.start
    tiles = sorted(plan.tiles, key=lambda t: (t.output.start[2], t.output.start[1]))
    jobs = []
    for tile in tiles:
        for z in range(plan.computed.shape[0]):
            out = Box((origin[0] + z, origin[1] + tile.output.start[1], origin[2] + tile.output.start[2]),
                      (origin[0] + z + 1, origin[1] + tile.output.stop[1], origin[2] + tile.output.stop[2]))
            touched = [(b, o) for b in blocks if (o := _overlap(out, b.box)) is not None]
            if touched:
                jobs.append((z, tile, out, touched))
                for b, _ in touched:
                    b.remaining += 1
    return jobs


@dataclass
class PredictStats:
    blocks_total: int = 0
    blocks_skipped: int = 0
    blocks_computed: int = 0
    seconds: float = 0.0
    voxels: int = 0
    input_voxels_read: int = 0
    extra: dict = field(default_factory=dict)


def _widen_unsigned(x: torch.Tensor) -> torch.Tensor:
    """Raw values as float32 on their device; uint16/uint32 go through the next wider signed type.

    torch has few kernels for unsigned types wider than 8 bits; reinterpreting
    the bits as the signed type of the same size and masking works on every
    device, so 16-bit EM is uploaded as 2 bytes per voxel and converted there.
    """
    wide = {torch.uint16: (torch.int16, torch.int32, 0xFFFF), torch.uint32: (torch.int32, torch.int64, 0xFFFFFFFF)}
    if x.dtype in wide:
        signed, wider, mask = wide[x.dtype]
        x = x.view(signed).to(wider).bitwise_and_(mask)
    return x.float()


class _Pipeline:
    """One job's reader thread, device feeder (the caller) and writer threads.

    On an accelerator, raw voxels travel in their stored type (1 byte for
    8-bit EM, 4x fewer than float) and are normalised there, and blocks are
    converted to the stored dtype there before the copy back. On a CPU, the
    reader normalises straight into the region and blocks are encoded into
    host buffers. `DEVICE_SIDE` None picks by device; tests set it True to run
    the accelerator's arithmetic on a CPU.
    """

    DEVICE_SIDE: bool | None = None

    def __init__(self, predictor: Predictor, raw, out: zarr.Array, out_path: Path, grid: ChunkGrid,
                 strips: list, normalise: Normaliser, out_dtype: str, workers: int, log: CompletionLog,
                 stats: PredictStats, bar):
        self.p, self.raw, self.out, self.out_path, self.grid = predictor, raw, out, out_path, grid
        self.strips, self.out_dtype, self.log, self.stats, self.bar = strips, out_dtype, log, stats, bar
        self.device = predictor.device
        self.cuda = self.device.type == "cuda"
        self.device_side = self.cuda if self.DEVICE_SIDE is None else self.DEVICE_SIDE
        self.raw_dtype = torch.from_numpy(np.empty(0, raw.dtype)).dtype
        self.normalise = normalise
        self.low, self.scale = normalise.low, normalise.scale
        self.workers = max(1, workers)
        self.inputs = HostBuffers(READ_AHEAD + 1, self.cuda)
        self.outputs = HostBuffers(2 * self.workers, self.cuda)
        self.reader = StripReader(raw)
        self.encoder = ShardCodec.for_array(out)
        self._spare: list[torch.Tensor] = []  # finished blocks' buffers, for the next blocks
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = time.perf_counter()

    # -- stage 1: reader thread
    def _read_all(self, ready: queue.Queue) -> None:
        try:
            width = max(1, SEGMENT_PX // self.grid.chunks[2])
            for blocks in (segment for strip in self.strips for segment in _segments(strip, width)):
                if self._stop.is_set():
                    return
                boxes = [self.grid.box(b) for b in blocks]
                box = Box(tuple(map(min, zip(*[b.start for b in boxes]))),
                          tuple(map(max, zip(*[b.stop for b in boxes]))))
                plan = ChunkPlan.make(box, self.p.cfg, self.p.max_tile)
                fill = self.reader.read(plan.read)
                if self.device_side:  # raw values travel in their stored type; normalised on the device
                    slot, host = self.inputs.take(plan.read.shape, self.raw_dtype)
                    fill(host.numpy(), lambda source, destination: np.copyto(destination, source))
                else:  # the CPU is the device: normalise here, beside the feeder thread
                    slot, host = self.inputs.take(plan.read.shape, torch.float32)
                    fill(host.numpy(), self.normalise.into)
                ready.put((blocks, plan, slot, host))
            ready.put(None)
        except BaseException as exc:  # handed to the feeder, which re-raises it
            ready.put(exc)

    def _next_strip(self, ready: queue.Queue) -> _Strip | None:
        item = ready.get()
        if item is None:
            return None
        if isinstance(item, BaseException):
            raise item
        indices, plan, slot, host = item
        region = host
        if self.device_side:
            region = _widen_unsigned(host.to(self.device, non_blocking=self.cuda)).sub_(self.low).mul_(self.scale)
        blocks = [_Block(idx, self.grid.box(idx), 0) for idx in indices]
        jobs = _strip_jobs(plan, blocks)
        return _Strip(plan, region, slot, jobs, unfinished=len(jobs))

    # -- stage 3: writer threads
    def _write(self, block: _Block, slot: list, host: torch.Tensor, event) -> None:
        try:
            if event is not None:
                event.synchronize()
            path = block_file(self.out_path, block.index)
            if self.encoder is not None:
                write_shard(path, self.encoder.encode(host.numpy(), block.index))
            else:
                self.out[block.box.slices] = host.numpy()
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            self.log.record(block.index)
        finally:
            self.outputs.give(slot)
        with self._lock:
            self.stats.blocks_computed += 1
            self.stats.voxels += math.prod(block.box.shape)
            self.bar.update(1)
            elapsed = time.perf_counter() - self._start
            self.bar.set_postfix(voxels_per_s=f"{self.stats.voxels / max(elapsed, 1e-9):.3g}")
            _inject_fault(self.stats.blocks_computed)

    def _emit(self, block: _Block, pool: ThreadPoolExecutor, futures: list) -> None:
        slot, host = self.outputs.take(block.buffer.shape, _TORCH_DTYPES[self.out_dtype])
        if self.device_side:  # convert on the device: the copy back carries the stored dtype's bytes only
            _encode_into(block.buffer, self.out_dtype, encoded := torch.empty_like(host, device=self.device))
            host.copy_(encoded, non_blocking=self.cuda)
        else:
            _encode_into(block.buffer, self.out_dtype, host)
        self._spare.append(block.buffer)  # stream-ordered on CUDA: the next scatter runs after the encode
        block.buffer = None
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        futures.append(pool.submit(self._write, block, slot, host, event))
        for f in [f for f in futures if f.done()]:
            futures.remove(f)
            f.result()

    def _block_buffer(self, shape) -> torch.Tensor:
        """A float32 block buffer on the device, reused: a fresh 64 MB array costs 16k page faults on a CPU."""
        for i, spare in enumerate(self._spare):
            if tuple(spare.shape) == tuple(shape):
                return self._spare.pop(i)
        if len(self._spare) > 2:
            self._spare.pop(0)
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    # -- stage 2: the device feeder
    def run(self) -> None:
        ready: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
        reader = threading.Thread(target=self._read_all, args=(ready,), daemon=True, name="predict-reader")
        reader.start()
        futures: list[Future] = []
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="predict-writer")
        active: list[_Strip] = []
        exhausted = False
        try:
            while True:
                batch = []
                while len(batch) < self.p.tiles_per_batch:
                    current = next((s for s in active if s.next_job < len(s.jobs)), None)
                    if current is None:
                        if exhausted:
                            break
                        strip = self._next_strip(ready)
                        if strip is None:
                            exhausted = True
                            continue
                        active.append(strip)
                        continue
                    batch.append((current, current.jobs[current.next_job]))
                    current.next_job += 1
                if not batch:
                    break
                self._run_batch(batch, pool, futures)
                for strip in [s for s in active if s.unfinished == 0]:
                    active.remove(strip)
                    event = None
                    if self.cuda:
                        event = torch.cuda.Event()
                        event.record()
                    self.inputs.give(strip.slot, event)
            for f in futures:
                f.result()
        finally:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            while reader.is_alive():  # unblock a reader waiting on a full queue or a buffer
                try:
                    item = ready.get(timeout=0.1)
                    if isinstance(item, tuple):
                        self.inputs.give(item[2])
                except queue.Empty:
                    pass
                for strip in active:
                    self.inputs.give(strip.slot)
                active = []
        self.stats.input_voxels_read = self.reader.voxels_read

    def _into_block(self, item, tiles: torch.Tensor, pool: ThreadPoolExecutor, futures: list) -> bool:
        """A lone tile whose output lies in one block is computed straight into that block's buffer (no copy)."""
        strip, (_, _, out_box, touched) = item
        if len(touched) != 1 or touched[0][1] != out_box:
            return False
        block = touched[0][0]
        if block.buffer is None:
            block.buffer = self._block_buffer(block.box.shape)
        self.p.probabilities(tiles, out=block.buffer[out_box.relative_to(block.box.start).slices])
        block.remaining -= 1
        if block.remaining == 0:
            self._emit(block, pool, futures)
        strip.unfinished -= 1
        return True

    def _run_batch(self, batch: list, pool: ThreadPoolExecutor, futures: list) -> None:
        shapes = {tile.input.shape[1:] for _, (_, tile, _, _) in batch}
        groups = [[item for item in batch if item[1][1].input.shape[1:] == s] for s in shapes]
        for group in groups:
            tiles = stack_tiles([strip.region[z][tile.input.slices[1:]] for strip, (z, tile, _, _) in group])
            if len(group) == 1 and self._into_block(group[0], tiles, pool, futures):
                continue
            prob = self.p.probabilities(tiles)
            for (strip, (z, tile, out_box, touched)), p in zip(group, prob):
                for block, overlap in touched:
                    if block.buffer is None:
                        block.buffer = self._block_buffer(block.box.shape)
                    src = overlap.relative_to(out_box.start)
                    dst = overlap.relative_to(block.box.start)
                    block.buffer[dst.slices] = p[src.slices[1:]]
                    block.remaining -= 1
                    if block.remaining == 0:
                        self._emit(block, pool, futures)
                strip.unfinished -= 1


# --------------------------------------------------------------------------- stage
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
    chunks_per_file: tuple[int, int, int] | None = io.CHUNKS_PER_FILE,
) -> PredictStats:
    """Predict the blocks of one shard (job) into `out_path` (created if needed).

    `init_only` creates (or, with `overwrite`, replaces a different) store and
    returns: the workflow does this once before the shards start, so that a
    retrained model replaces the old prediction without shards racing to do so.
    `workers` is the number of writer threads (compression runs there).
    """
    raw_path, out_path = Path(raw_path), Path(out_path)
    raw = io.open_ome_image(raw_path)
    if raw.ndim != 3:
        raise InputError(f"{raw_path}: expected a 3D (slices, y, x) image, got {raw.ndim}D.")
    if out_dtype not in OUT_DTYPES:
        raise ConfigError(f"predict.dtype must be one of {', '.join(OUT_DTYPES)}, got {out_dtype!r}")
    if any(c > s for c, s in zip(chunks, raw.shape)):
        raise ConfigError(
            f"predict.chunks {tuple(chunks)} is larger than the volume {tuple(raw.shape)} of {raw_path}; "
            "use a chunk shape no larger than the volume."
        )
    attrs = io.store_attrs(raw_path)
    normalise = Normaliser.from_attrs(attrs, str(raw_path))
    block = io.shard_shape(raw.shape, chunks, chunks_per_file) or tuple(chunks)
    signature = _store_signature(raw_path, raw.shape, chunks, block, out_dtype, file_sha256(checkpoint), tta,
                                 precision, io.voxel_size(raw_path), store_fingerprint(raw_path))
    if io.is_complete(out_path) and _is_ours(out_path, signature):
        return PredictStats(extra={"already_complete": True})
    if io.is_complete(out_path) and not overwrite:
        existing = dict(zarr.open_group(str(out_path), mode="r").attrs.get("predict", {}))
        raise InputError(f"{out_path}: a complete, different prediction exists (differs in "
                         f"{_changed(existing, signature)}); pass --overwrite to replace it.")
    out = open_output(out_path, raw.shape, chunks, chunks_per_file, out_dtype, signature, overwrite)
    if init_only:
        return PredictStats(extra={"initialised": str(out_path)})
    grid = block_grid(out)
    mine = shard_strips(plan_strips(grid, raw.chunks[0]), *shard)
    finished = CompletionLog.finished(out_path)
    total = sum(len(s) for s in mine)
    pending = [tuple(b for b in s if b not in finished) for s in mine]
    pending = [s for s in pending if s]
    stats = PredictStats(blocks_total=total, blocks_skipped=total - sum(len(s) for s in pending))
    bar = tqdm(total=total, initial=stats.blocks_skipped, unit="block", disable=not progress,
               desc=f"predict {shard[0]}/{shard[1]}")
    log = CompletionLog(out_path, f"job-{shard[0]}-of-{shard[1]}")
    start = time.perf_counter()
    # The pipeline creates many short-lived objects (zarr's asyncio tasks);
    # frozen, the long-lived ones (torch, the model) are no longer traversed
    # by every garbage collection: 4% of a prediction's CPU time otherwise.
    gc.freeze()
    try:
        if pending:
            _Pipeline(predictor, raw, out, out_path, grid, pending, normalise, out_dtype, workers, log, stats,
                      bar).run()
    finally:
        gc.unfreeze()
        log.close()
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def buffer_bytes(shape, itemsize: int, block, margin: int, tile: int, writers: int, out_itemsize: int) -> int:
    """Upper estimate of the host memory a predict job's buffers take, framework excluded.

    A strip spans the slice width and one block row (plus the context margin
    and a tile of rounding) and is held as raw rows; it goes to the device in
    segments of at most SEGMENT_PX, held as READ_AHEAD + 1 float32 regions;
    blocks (at most one shard each) are held as float32 buffers (one being
    filled, a few spare) and as 2 x writers encoded copies. Memory never grows
    with the number of slices or rows; with the width only through the raw
    rows (one byte per voxel for 8-bit EM) once slices are wider than a segment.
    """
    height = block[1] + 2 * margin + tile
    width = min(shape[2], max(SEGMENT_PX, block[2])) + 2 * margin + tile
    region = block[0] * height * width * 4
    rows = 2 * block[0] * height * shape[2] * itemsize
    voxels = math.prod(block)
    return (READ_AHEAD + 1) * region + rows + 4 * voxels * 4 + 2 * writers * voxels * out_itemsize


def gather(out_path: str | os.PathLike, pyramid_levels: int = 2, provenance: dict | None = None) -> None:
    """Check that every block of every job is done, then build the pyramid and mark complete."""
    out_path = Path(out_path)
    if not out_path.exists():
        raise InputError(f"{out_path}: no prediction store; run the predict shards first.")
    if io.is_complete(out_path):
        return
    signature = dict(zarr.open_group(str(out_path), mode="r").attrs.get("predict", {}))
    if not signature:
        raise InputError(f"{out_path}: not a prediction store of this pipeline (no 'predict' attributes).")
    attrs = {**signature, **(provenance or {}), "content": "cell probability (high = cell)",
             "package_version": __version__, "fingerprint": derive_fingerprint(signature)}
    finish_store(out_path, pyramid_levels, signature["voxel_size"], "cell_probability", attrs,
                 "rerun the missing shards")


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
