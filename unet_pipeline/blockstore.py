"""Block-wise output stores: the unit of work is one block (a Zarr v3 shard, one file).

Stages that fill a store block by block share this: predict (across many
jobs) uses the block grid, the file that holds a block, per-job completion
records and the final check that turns a filled store into a finished
OME-Zarr; segment (on several threads) uses the block grid. A block is never
written by two threads or jobs, and two blocks never share a file, so no
locking is needed.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Sequence

import zarr

from unet_pipeline import io
from unet_pipeline.errors import InputError
from unet_pipeline.tiling import ChunkGrid

PROGRESS_DIR = "unet_progress"


class CompletionLog:
    """Finished blocks of a prediction store: append-only text files, one per job.

    One line `z y x` per block, written and fsync'ed after the block's own
    file is durable. A line cut short by a kill has no newline and is
    ignored. Jobs never share a file, so no locking across processes is
    needed, and a store holds as many record files as jobs ran on it.
    """

    def __init__(self, store: str | os.PathLike, job: str):
        self.dir = Path(store) / PROGRESS_DIR
        self.dir.mkdir(exist_ok=True)
        self._file = open(self.dir / f"{job}.log", "a")
        self._lock = threading.Lock()

    def record(self, index: tuple[int, ...]) -> None:
        with self._lock:
            self._file.write(" ".join(map(str, index)) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def finished(store: str | os.PathLike) -> set[tuple[int, ...]]:
        done = set()
        for path in (Path(store) / PROGRESS_DIR).glob("*.log"):
            for line in path.read_text().splitlines(keepends=True):
                if line.endswith("\n") and line.strip():
                    done.add(tuple(int(v) for v in line.split()))
        return done


def block_shape(array: zarr.Array) -> tuple[int, ...]:
    """The unit of one write: a Zarr shard (one file), or a chunk when the array is not sharded."""
    return tuple(array.shards or array.chunks)


def block_file(store: Path, index: tuple[int, ...]) -> Path:
    """The file of block `index` of level 0 (Zarr v3 default chunk keys: a shard's or chunk's grid index)."""
    return store / "0" / "c" / Path(*map(str, index))


def block_grid(array: zarr.Array) -> ChunkGrid:
    """The grid of an array's blocks: whole shards (files), so threads and jobs never share a file."""
    return ChunkGrid(tuple(array.shape), block_shape(array))


def finish_store(path: str | os.PathLike, pyramid_levels: int, voxel_size: Sequence[float], name: str,
                 attrs: dict, remedy: str) -> None:
    """Refuse a store with unrecorded blocks; else build its pyramid, mark it complete, drop the records."""
    path = Path(path)
    level0 = zarr.open_array(str(path / "0"), mode="r")
    grid = block_grid(level0)
    missing = grid.num_chunks - len(CompletionLog.finished(path) & set(grid.indices()))
    if missing:
        raise InputError(f"{path}: {missing} of {grid.num_chunks} blocks are not written yet; {remedy}.")
    io.build_pyramid(path, pyramid_levels, voxel_size=voxel_size, name=name)
    io.mark_complete(path, attrs)
    shutil.rmtree(path / PROGRESS_DIR, ignore_errors=True)
