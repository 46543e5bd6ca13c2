"""Overlap-tile prediction (paper, Fig. 2) over volumes far larger than memory, in parts that run as separate jobs.

Each part predicts its strips of output blocks (one Zarr shard, one file
each) into the probability store, through a bounded pipeline of three
stages, so that the network, not the bookkeeping around it, sets the speed:

1. a reader thread walks the part's *strips* (a row of output blocks across
   the slice) in order and reads each strip's input region, mirrored past
   the volume border; rows shared with the next strip are kept, so every
   input chunk is decoded once per job (`StripReader`);
2. the calling thread is the device feeder: it uploads each strip's raw bytes
   (pinned memory, non-blocking copies on CUDA), cuts tiles from it,
   batches them across blocks and strips, normalises them, runs the network
   with test-time augmentation batched (`inference.Predictor`) and scatters the
   probabilities into per-block buffers, all on the device without a host
   synchronisation per tile; a finished block is encoded to the output dtype
   on the device and copied back asynchronously;
3. writer threads write each block whole (`blockwise.BlockWriter`: one
   shard file, made durable, then recorded in the part's completion log).

Memory is bounded by a few strips of raw input and a few output blocks,
whatever the volume size. Tiles start on the pooling grid, so the result
equals one whole-slice pass exactly (to 1e-5 in fp32); each output voxel is
written once. The store is filled under a hidden name carrying a digest of
the raw image's fingerprint, the checkpoint and the settings
(`blockwise.PartialStore`): a killed part resumes with its unfinished
blocks, parts of one run share the store, and a new model or stack starts a
new one. The finishing job (`finish.finish_store`) checks every block,
builds the pyramid and publishes the store.
"""
from __future__ import annotations

import gc
import math
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from unet_pipeline import __version__, probability, stores
from unet_pipeline.blockwise import BlockWriter, PartialStore, PartSummary, pending_strips
from unet_pipeline.checkpoint import file_sha256
from unet_pipeline.errors import InputError
from unet_pipeline.geometry import STRIP_WIDTH_PX, Box, BlockGrid, Part, clip_chunks
from unet_pipeline.inference import Predictor, stack_tiles
from unet_pipeline.normalise import Normaliser
from unet_pipeline.provenance import KEY as FINGERPRINT, derive_fingerprint, store_fingerprint
from unet_pipeline.pyramid import image_builder
from unet_pipeline.resources import READ_AHEAD
from unet_pipeline.schema import choices
from unet_pipeline.tiling import TilePlan, mirror_indices

LAYOUT_VERSION = 2


# --------------------------------------------------------------------------- strips
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


class StripReader:
    """Reads the mirrored input regions of consecutive strips, decoding each input chunk once.

    Strips arrive in increasing y within a z range; the rows a later strip
    still needs (its context margin reaches back into this one) are kept, and
    only new rows are read, always whole rows of the input's blocks (shards),
    so no chunk is decoded twice and shards are decoded whole (the fast,
    checksum-checked path of `stores.StoreImage`; a missing or damaged file
    is an error naming it). Memory: about two block rows across the width.
    """

    def __init__(self, image: stores.StoreImage):
        self.image = image
        self.voxels_read = 0
        self._z: tuple[int, int] | None = None
        self._y0 = self._y1 = 0
        self._rows: np.ndarray | None = None

    def read(self, box: Box):
        """Make `box` readable; returns fill(out, convert), which writes the mirrored region into `out`.

        `convert(source, destination)` copies (and may normalise) one block of it.
        """
        _, height, width = self.image.shape
        row_chunk, block_rows = self.image.chunks[1], self.image.grid.block[1]
        z = (box.start[0], box.stop[0])
        iy = mirror_indices(box.start[1], box.stop[1], height)
        lo, hi = int(iy.min()), int(iy.max()) + 1
        first_row = lo // row_chunk * row_chunk
        if self._z != z or lo < self._y0:
            self._z, self._y0, self._y1 = z, first_row, first_row
            self._rows = np.empty((z[1] - z[0], 0, width), self.image.dtype)
        if hi > self._y1:
            stop = min(height, -(-hi // block_rows) * block_rows)
            fresh = self.image.read(Box((z[0], self._y1, 0), (z[1], stop, width)))
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
        """A free buffer as a tensor of `shape` and `dtype` (blocks until one is given back)."""
        slot = self._free.get()
        base, event = slot
        if event is not None:
            event.synchronize()
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if base.numel() < nbytes:
            base = slot[0] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)
        return slot, base[:nbytes].view(dtype).view(tuple(shape))

    def give(self, slot: list, event=None) -> None:
        """Hand a buffer back; on CUDA, its next user first waits for `event` (the copy using it)."""
        slot[1] = event
        self._free.put(slot)


def _encode_into(prob: torch.Tensor, dtype: str, out: torch.Tensor) -> None:
    """Probability -> stored dtype, written into `out` (uint8: `probability.encode_into`; floats: the copy converts)."""
    if dtype == "uint8":
        probability.encode_into(prob, out)
    else:
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
    plan: TilePlan
    region: torch.Tensor
    slot: list
    jobs: list                      # (z, tile, [blocks it touches])
    next_job: int = 0
    unfinished: int = 0


def _strip_jobs(plan: TilePlan, blocks: list[_Block]) -> list:
    """(z, tile, blocks) for each tile touching a pending block; column-major, so blocks finish early."""
    origin = plan.computed.start
    tiles = sorted(plan.tiles, key=lambda t: (t.output.start[2], t.output.start[1]))
    jobs = []
    for tile in tiles:
        for z in range(plan.computed.shape[0]):
            out = Box((origin[0] + z, origin[1] + tile.output.start[1], origin[2] + tile.output.start[2]),
                      (origin[0] + z + 1, origin[1] + tile.output.stop[1], origin[2] + tile.output.stop[2]))
            touched = [(b, o) for b in blocks if (o := out.intersect(b.box)) is not None]
            if touched:
                jobs.append((z, tile, out, touched))
                for b, _ in touched:
                    b.remaining += 1
    return jobs


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

    def __init__(self, predictor: Predictor, raw: stores.StoreImage, writer: BlockWriter, grid: BlockGrid,
                 strips: list, normalise: Normaliser, out_dtype: str, writers: int, bar):
        self.p, self.raw, self.writer, self.grid = predictor, raw, writer, grid
        self.strips, self.out_dtype, self.bar = strips, out_dtype, bar
        self.device = predictor.device
        self.cuda = self.device.type == "cuda"
        self.device_side = self.cuda if self.DEVICE_SIDE is None else self.DEVICE_SIDE
        self.raw_dtype = torch.from_numpy(np.empty(0, raw.dtype)).dtype
        self.normalise = normalise
        self.low, self.scale = normalise.low, normalise.scale
        self.writers = max(1, writers)
        self.inputs = HostBuffers(READ_AHEAD + 1, self.cuda)
        self.outputs = HostBuffers(2 * self.writers, self.cuda)
        self.reader = StripReader(raw)
        self._spare: list[torch.Tensor] = []  # finished blocks' buffers, for the next blocks
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self.voxels = 0

    # -- stage 1: reader thread
    def _read_all(self, ready: queue.Queue) -> None:
        try:
            for blocks in self.strips:
                if self._stop.is_set():
                    return
                box = Box.around([self.grid.box(b) for b in blocks])
                plan = TilePlan.make(box, self.p.cfg, self.p.tile_size)
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
            self.writer.write("0", block.index, host.numpy())
        finally:
            self.outputs.give(slot)
        with self._lock:
            self.voxels += block.box.size
            self.bar.update(1)
            elapsed = time.perf_counter() - self._start
            self.bar.set_postfix(voxels_per_s=f"{self.voxels / max(elapsed, 1e-9):.3g}")

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
        """Predict every pending block: the reader thread feeds strips, the caller runs the network."""
        ready: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
        reader = threading.Thread(target=self._read_all, args=(ready,), daemon=True, name="predict-reader")
        reader.start()
        futures: list[Future] = []
        pool = ThreadPoolExecutor(self.writers, thread_name_prefix="predict-writer")
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
def probability_signature(raw_path, checkpoint, shape, chunks, chunks_per_file, out_dtype: str, tile_size: int,
                          tta, precision: str, pyramid_levels) -> dict:
    """Everything that shapes a probability map: the raw image's content, the network, the settings.

    The encoding is part of it, so a part left half-done by a version that
    stored another code starts a new store instead of mixing two codes.
    """
    return {"kind": "probabilities", "raw": str(Path(raw_path).resolve()), "raw_fingerprint":
            store_fingerprint(raw_path), "checkpoint_sha256": file_sha256(checkpoint), "shape": list(shape),
            "chunks": list(chunks), "chunks_per_file": list(chunks_per_file), "dtype": out_dtype,
            "tile_size": int(tile_size), "tta": str(tta), "precision": precision,
            "pyramid_levels": pyramid_levels, "layout": LAYOUT_VERSION, **probability.store_attrs(out_dtype)}


def predict_part(predictor: Predictor, raw_path: str | os.PathLike, out_path: str | os.PathLike,
                 checkpoint: str | os.PathLike, part: Part, *, chunks, chunks_per_file, out_dtype: str,
                 tta, precision: str, pyramid_levels, writers: int, progress: bool = False) -> PartSummary:
    """Predict this job's blocks of the probability map of `raw_path` into the store for `out_path`.

    `writers` threads compress and write blocks. Returns the part's summary;
    the store is published by `finish.finish_store` once every part is done.
    """
    raw_path, out_path = Path(raw_path), Path(out_path)
    raw = stores.open_image(raw_path)
    if raw.ndim != 3:
        raise InputError(f"{raw_path}: expected a 3D (slices, y, x) image, got {raw.ndim}D.")
    if out_dtype not in choices("predict.dtype"):
        raise InputError(f"predict.dtype must be one of {', '.join(choices('predict.dtype'))}, got {out_dtype!r}")
    normalise = Normaliser.from_attrs(raw.attrs, str(raw_path))
    chunks = clip_chunks(chunks, raw.shape)  # a stack smaller than the chunks gets one chunk
    voxel = stores.voxel_size(raw_path)
    signature = probability_signature(raw_path, checkpoint, raw.shape, chunks, chunks_per_file, out_dtype,
                                      predictor.tile_size, tta, precision, pyramid_levels)
    store = PartialStore.open(out_path, signature, image_builder(
        raw.shape, out_dtype, chunks, chunks_per_file, stores.fast_compressor(), voxel, pyramid_levels,
        kind="probabilities", name="cell_probability", downsampling="mean"))
    grid = stores.block_grid(store.array("0", "r"))
    mine = part.of(grid.strips(z_align=raw.chunks[0], max_width=STRIP_WIDTH_PX))
    pending = pending_strips(mine, store.finished("0"))
    summary = PartSummary(str(store.final), signature, str(part), blocks_total=sum(len(s) for s in mine))
    summary.blocks_skipped = summary.blocks_total - sum(len(s) for s in pending)
    bar = tqdm(total=summary.blocks_total, initial=summary.blocks_skipped, unit="block", disable=not progress,
               desc=f"predict {part}")
    writer = BlockWriter(store, f"predict-{part.index}-of-{part.count}")
    start = time.perf_counter()
    # The pipeline creates many short-lived objects (zarr's tasks); frozen,
    # the long-lived ones (torch, the model) are no longer traversed by every
    # garbage collection: 4% of a prediction's CPU time otherwise.
    gc.freeze()
    try:
        if pending:
            pipeline = _Pipeline(predictor, raw, writer, grid, pending, normalise, out_dtype, writers, bar)
            pipeline.run()
            summary.voxels = pipeline.voxels
            summary.extra["input_voxels_read"] = pipeline.reader.voxels_read
    finally:
        gc.unfreeze()
        writer.close()
        bar.close()
    summary.blocks_computed = writer.written
    summary.seconds = time.perf_counter() - start
    return summary


def finish_probabilities(store: PartialStore, records: dict) -> dict:
    """The finished probability map's attributes: what it was computed from, and how to read its values."""
    signature = store.signature
    return {**signature, "content": "cell probability (high = cell)", "package_version": __version__,
            FINGERPRINT: derive_fingerprint(signature)}
