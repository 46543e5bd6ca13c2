"""Block-wise stages over volumes far larger than memory: splitter, runner loop, writer, and the store they fill.

Every stage whose work grows with the volume (preprocess, predict, pyramid,
segment) has the same shape, after daisy's blocks and MONAI's inferers:

- the **splitter** cuts the output into blocks (one Zarr shard, one file
  each; `geometry.BlockGrid`), groups them into strips (a row of blocks
  across the slice, the unit in which input is read) and gives each job a
  contiguous run of strips (`geometry.Part`);
- a stage-specific **runner** turns a strip's input region into each
  block's output: a copy with statistics, the network, a downsampling, a
  labelling;
- the **writer** (`BlockWriter`) writes each block whole, makes the file
  durable and only then records it in the job's completion log, so a job
  killed at any moment resumes with exactly the unfinished blocks;
- the **store** (`PartialStore`) is filled under a hidden name that carries
  a digest of everything that shapes its content (inputs' fingerprints,
  settings), so parts of one run find each other's work and a run with other
  inputs never reuses it; the finishing job checks that every block is
  recorded, adds what the stage computes from all blocks (statistics,
  pyramid levels, metadata), marks it complete and renames it into place.

A job holds only its strips' and blocks' buffers, whatever the volume.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import dask
import numpy as np
import zarr

from unet_pipeline import atomic, stores
from unet_pipeline.errors import InputError
from unet_pipeline.geometry import BlockGrid, Index, Part, Strip

log = logging.getLogger(__name__)

WORK_DIR = "unet_work"
# Fault injection for tests of retries: fail after N blocks; with the marker
# variable set, only while the marker file does not exist yet (i.e. once).
FAULT_ENV = "UNET_PIPELINE_FAIL_AFTER_BLOCKS"
FAULT_MARKER_ENV = "UNET_PIPELINE_FAULT_MARKER"
# For tests that kill a job mid-way: seconds to sleep after each recorded block.
SLOW_ENV = "UNET_PIPELINE_SLOW_BLOCKS_S"


def digest(signature: dict) -> str:
    """A short, stable digest of a store's signature (what shapes its content)."""
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- completion records
class CompletionLog:
    """The blocks one job has finished: an append-only file of JSON lines, fsync'ed after each block's file.

    A line cut short by a kill has no newline and is ignored. Jobs never
    share a file, so no locking across processes is needed. A record may
    carry what the block contributes to the store (a checksum, statistics,
    a label count), read back by the finishing job.
    """

    def __init__(self, work_dir: Path, job: str):
        work_dir.mkdir(parents=True, exist_ok=True)
        self.path = work_dir / f"{job}.log"
        self._file = open(self.path, "a")
        self._lock = threading.Lock()

    def record(self, array: str, index: Index, **extra) -> None:
        """Append block `index` of `array` (and what it contributes) and make the line durable."""
        line = json.dumps({"array": array, "block": list(index), **extra}, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the log file (every record is already durable)."""
        self._file.close()

    @staticmethod
    def read(work_dir: Path, array: str | None = None) -> dict[tuple[str, Index], dict]:
        """Every finished block (of `array`, or all) with its record, from all jobs' logs."""
        done: dict[tuple[str, Index], dict] = {}
        for path in sorted(work_dir.glob("*.log")):
            for line in path.read_text().splitlines(keepends=True):
                if not line.endswith("\n") or not line.strip():
                    continue
                entry = json.loads(line)
                if array is None or entry["array"] == array:
                    done[(entry["array"], tuple(entry["block"]))] = entry
        return done


# --------------------------------------------------------------------------- the store being filled
class PartialStore:
    """An output store filled by parts under a hidden name, published by renaming it into place.

    `.NAME.partial-<digest>` beside the final `NAME`: the digest of the
    signature means the parts of one run (same inputs and settings) share
    one partial store, and a store started with other inputs is never
    continued. Creation is race-free: each part builds the empty store under
    a private name and renames it; a part that loses the race uses the
    winner's.
    """

    def __init__(self, final: Path, signature: dict):
        self.final = Path(final)
        self.signature = signature
        self.path = self.final.with_name(f".{self.final.name}.partial-{digest(signature)}")

    @property
    def work_dir(self) -> Path:
        """Where the parts keep their completion logs and per-block side files (removed on publishing)."""
        return self.path / WORK_DIR

    @classmethod
    def open(cls, final: str | os.PathLike, signature: dict, build: Callable[[zarr.Group], None]) -> "PartialStore":
        """The partial store of this signature, created with `build(group)` (arrays, attributes) if missing."""
        store = cls(Path(final), signature)
        if not store.path.exists():
            store.final.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.final.with_name(f".{store.final.name}.init-{uuid.uuid4().hex[:8]}")
            with atomic.naming_errors(store.final):
                group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
                build(group)
                group.attrs["partial"] = {**dict(group.attrs.get("partial", {})), "signature": signature}
            try:
                os.rename(tmp, store.path)  # atomic; fails if another part won the race
            except OSError:
                atomic.remove(tmp)
        recorded = zarr.open_group(str(store.path), mode="r").attrs.get("partial", {}).get("signature")
        if json.loads(json.dumps(recorded)) != json.loads(json.dumps(signature, default=str)):
            raise InputError(f"{store.path}: holds the work of another run (signature differs); delete it.")
        return store

    @classmethod
    def from_marker(cls, marker: str | os.PathLike) -> "PartialStore":
        """The partial store a part's marker file names (how later jobs of the workflow find it)."""
        try:
            data = json.loads(Path(marker).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{marker}: not a part summary of this pipeline ({exc}); rerun the parts.") from None
        store = cls(Path(data["final"]), data["signature"])
        if not store.path.exists():
            raise InputError(f"{store.path}: the parts' store is gone; rerun the parts that write {store.final}.")
        return store

    def group(self, mode: str = "r+") -> zarr.Group:
        """The store's root group."""
        return zarr.open_group(str(self.path), mode=mode)

    def array(self, name: str, mode: str = "r+") -> zarr.Array:
        """One of the store's arrays: "r" reads with every checksum checked, "r+" writes (`stores.open_array`)."""
        return stores.open_array(self.path / name, mode)

    def finished(self, array: str) -> dict[Index, dict]:
        """Every recorded block of `array`, with what its record carries."""
        return {index: entry for (_, index), entry in CompletionLog.read(self.work_dir, array).items()}

    def missing(self, array: str) -> list[Index]:
        """Blocks of `array` no job has recorded yet."""
        grid = stores.block_grid(self.array(array, "r"))
        done = self.finished(array)
        return [i for i in grid.indices() if i not in done]

    def require_complete(self, array: str, remedy: str) -> dict[Index, dict]:
        """Every block's record of `array`; InputError naming how many are missing otherwise."""
        grid = stores.block_grid(self.array(array, "r"))
        done = self.finished(array)
        missing = grid.num_blocks - sum(1 for i in grid.indices() if i in done)
        if missing:
            raise InputError(f"{self.path}: {missing} of {grid.num_blocks} blocks of {array!r} are not written "
                             f"yet; {remedy}.")
        return done

    def publish(self, attrs: dict) -> Path:
        """Mark complete, drop the work records, rename into place; remove other runs' partial stores."""
        stores.mark_complete(self.path, attrs)
        del self.group().attrs["partial"]  # what the parts needed to find each other; the store records `attrs`
        atomic.remove(self.work_dir)
        for name in list(self.group("r").array_keys()):
            if name.startswith("_"):  # scratch arrays (segment's local labels)
                atomic.remove(self.path / name)
        atomic.replace(self.path, self.final)
        for stale in self.final.parent.glob(f".{self.final.name}.partial-*"):
            atomic.remove(stale)
        return self.final


# --------------------------------------------------------------------------- writing blocks
class BlockWriter:
    """Writes whole blocks into an array of a partial store and records each once its file is durable."""

    def __init__(self, store: PartialStore, job: str):
        self.store = store
        self.log = CompletionLog(store.work_dir, job)
        self.written = 0
        self._lock = threading.Lock()
        self._arrays: dict[tuple[str, bool], zarr.Array] = {}

    def array(self, name: str, empty: bool = False) -> zarr.Array:
        """The array to write `name` through: zarrs, or zarr's own pipeline for blocks of only the fill value.

        zarrs stores no file for a shard that holds only the fill value; zarr's
        own pipeline does. Every block of a finished store must exist as a file,
        so that a missing one is an error rather than silently empty.
        """
        with self._lock:
            if (name, empty) not in self._arrays:
                opened = stores.open_for_empty_blocks(self.store.path / name) if empty else self.store.array(name)
                self._arrays[name, empty] = opened
            return self._arrays[name, empty]

    def write(self, name: str, index: Index, data: np.ndarray, **extra) -> None:
        """Write block `index` of array `name` whole, make its file durable, then record it (with `extra`)."""
        array = self.array(name)
        box = stores.block_grid(array).box(index)
        if data.shape != box.shape:
            raise ValueError(f"block {index} of {name!r} holds shape {box.shape}, got {data.shape}")
        file = stores.block_file(array, index)
        with atomic.naming_errors(self.store.final), stores.os_errors_named(file):
            array[box.slices] = data
            if not file.exists():  # only the fill value: zarrs stored nothing (cheaper to ask than to scan)
                self.array(name, empty=True)[box.slices] = data
            atomic.fsync(file)
        self.log.record(name, index, **extra)
        with self._lock:
            self.written += 1
            _inject_fault(self.written)
        if os.environ.get(SLOW_ENV):
            time.sleep(float(os.environ[SLOW_ENV]))

    def close(self) -> None:
        """Close the job's completion log."""
        self.log.close()


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


# --------------------------------------------------------------------------- the shared loop
@dataclass
class PartSummary:
    """What one job did; written as its marker file (the workflow's record that the part ran)."""

    final: str
    signature: dict
    part: str
    blocks_total: int = 0
    blocks_skipped: int = 0
    blocks_computed: int = 0
    voxels: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def write(self, path: str | os.PathLike | None) -> None:
        """Write the summary as JSON to `path` (the marker the workflow expects), if a path is given."""
        if path:
            atomic.atomic_write_text(path, json.dumps(asdict(self), indent=1, default=str))


def pending_strips(strips: Sequence[Strip], done: Iterable[Index]) -> list[Strip]:
    """The strips with their finished blocks left out (and strips left empty dropped)."""
    done = set(done)
    kept = (tuple(b for b in strip if b not in done) for strip in strips)
    return [s for s in kept if s]


def run_strips(strips: Sequence[Strip], read: Callable[[Strip], object],
               process: Callable[[Index, object], None], threads: int, window: int = 2) -> None:
    """Read each strip's input once and process its blocks, on `threads` threads (dask's threaded scheduler).

    Strips go `window` at a time, so the next strip's read overlaps this
    strip's blocks while memory stays bounded by `window` strips.
    """
    for first in range(0, len(strips), window):
        tasks = []
        for strip in strips[first:first + window]:
            region = dask.delayed(read, pure=False)(strip)
            tasks += [dask.delayed(process, pure=False)(index, region) for index in strip]
        dask.compute(*tasks, scheduler="threads", num_workers=max(1, threads))


def run_part(store: PartialStore, array: str, grid: BlockGrid, strips: Sequence[Strip], part: Part, job: str,
             read: Callable[[Strip], object], compute: Callable[[Index, object], tuple[np.ndarray, dict]],
             threads: int) -> PartSummary:
    """One job's share of a block-wise stage: every unfinished block of its strips computed and written.

    `compute(index, strip_input)` returns the block's data and what to
    record with it. Returns the part's summary (blocks skipped as already
    done, blocks computed, time).
    """
    mine = part.of(strips)
    done = store.finished(array)
    todo = pending_strips(mine, done)
    summary = PartSummary(str(store.final), store.signature, str(part),
                          blocks_total=sum(len(s) for s in mine))
    summary.blocks_skipped = summary.blocks_total - sum(len(s) for s in todo)
    writer = BlockWriter(store, f"{job}-{part.index}-of-{part.count}")
    start = time.perf_counter()

    def process(index: Index, strip_input) -> None:
        data, extra = compute(index, strip_input)
        writer.write(array, index, data, **extra)

    try:
        run_strips(todo, read, process, threads)
    finally:
        writer.close()
    summary.blocks_computed = writer.written
    summary.voxels = sum(grid.box(i).size for s in todo for i in s)
    summary.seconds = time.perf_counter() - start
    log.info("%s part %s: %d blocks computed, %d already done, %.1f s", store.final, part,
             summary.blocks_computed, summary.blocks_skipped, summary.seconds)
    return summary
