"""Overlap-tile geometry (paper, Fig. 2), kept in one place and tested alone.

A `ChunkPlan` says, for one output chunk of a (slices, y, x) volume, which
input region it reads (the chunk grown by the network's context margin, with
mirror extrapolation where that reaches past the volume) and which tiles the
network runs on inside it. With valid convolutions output tiles must have
sizes the network accepts (4 + 16k for the paper's net). Every output pixel is written
exactly once and no outputs are blended: tiles abut. Where a chunk side is not
a sum of valid sizes, the last tile runs a few pixels past the chunk and those
are cropped (`split_length` says when).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from unet_pipeline.model import UNetConfig


@dataclass(frozen=True)
class Box:
    """Half-open box [start, stop) in voxel coordinates."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def grow(self, margin: tuple[int, ...]) -> "Box":
        return Box(tuple(a - m for a, m in zip(self.start, margin)), tuple(b + m for b, m in zip(self.stop, margin)))

    def relative_to(self, origin: tuple[int, ...]) -> "Box":
        return Box(tuple(a - o for a, o in zip(self.start, origin)), tuple(b - o for b, o in zip(self.stop, origin)))


@dataclass(frozen=True)
class ChunkGrid:
    """The regular grid of output chunks over a volume."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunks))

    @property
    def num_chunks(self) -> int:
        return int(np.prod(self.grid_shape))

    def box(self, index: tuple[int, ...]) -> Box:
        start = tuple(i * c for i, c in zip(index, self.chunks))
        stop = tuple(min(s + c, n) for s, c, n in zip(start, self.chunks, self.shape))
        return Box(start, stop)

    def indices(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(g) for g in self.grid_shape))

    def shard(self, shard: int, num_shards: int) -> list[tuple[int, ...]]:
        """Chunks of shard `shard` of `num_shards` (round robin, disjoint, covering)."""
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard index {shard} is outside 0..{num_shards - 1}")
        return [idx for n, idx in enumerate(self.indices()) if n % num_shards == shard]


def split_length(length: int, max_tile: int, cfg: UNetConfig) -> list[int]:
    """Output tile sizes, each valid for the network, covering `length`.

    Chooses the split with the least network input along this side (each
    tile costs its size plus twice the context margin); among equal costs an
    exact split (sum == `length`) wins. For the paper's net a side of 8 mod
    16 (e.g. 520 with tiles of 260) or 0 mod 16 with four tiles splits
    exactly; other sides compute a few pixels past the chunk, which are
    cropped (less work than the extra context of more, smaller tiles).
    """
    if length < 1:
        raise ValueError("length must be positive")
    if not cfg.is_valid_output_size(max_tile):
        lo, hi = cfg.nearest_valid_output_sizes(max_tile)
        raise ValueError(f"tile size {max_tile} is not valid for this network; nearest valid sizes: {lo} and {hi}")
    base, step = cfg.min_output_size, cfg.size_step
    k_max = (max_tile - base) // step
    count = math.ceil(length / max_tile)
    best: tuple[tuple[int, bool], list[int]] | None = None
    for n in range(count, count + step):
        # n tiles of size base + k_i * step add up to n*base + step*K.
        k_total = math.ceil(max(0, length - n * base) / step)
        if k_total > n * k_max:
            continue
        ks = [k_total // n + (1 if i < k_total % n else 0) for i in range(n)]
        sizes = [base + step * k for k in ks]
        rank = (sum(sizes) + 2 * cfg.context_margin * n, sum(sizes) != length)
        if best is None or rank < best[0]:
            best = (rank, sizes)
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class Tile:
    """One network call: `input` region and `output` region, in chunk-plan coordinates."""

    input: Box
    output: Box


@dataclass(frozen=True)
class ChunkPlan:
    """Read region, tiles and crop for one output chunk (2D network over slices)."""

    chunk: Box          # output region in the volume
    read: Box           # input region in the volume (may extend past it: mirror)
    computed: Box       # output region actually computed (>= chunk at far edges)
    tiles: tuple[Tile, ...]

    @classmethod
    def make(cls, chunk: Box, cfg: UNetConfig, max_tile: int) -> "ChunkPlan":
        margin = cfg.context_margin
        ys = split_length(chunk.shape[1], max_tile, cfg)
        xs = split_length(chunk.shape[2], max_tile, cfg)
        computed = Box(chunk.start, (chunk.stop[0], chunk.start[1] + sum(ys), chunk.start[2] + sum(xs)))
        read = computed.grow((0, margin, margin))
        tiles = []
        for y0, ty in zip(np.cumsum([0] + ys[:-1]), ys):
            for x0, tx in zip(np.cumsum([0] + xs[:-1]), xs):
                out = Box((0, int(y0), int(x0)), (computed.shape[0], int(y0) + ty, int(x0) + tx))
                inp = Box(out.start, (out.stop[0], out.stop[1] + 2 * margin, out.stop[2] + 2 * margin))
                tiles.append(Tile(inp, out))
        return cls(chunk, read, computed, tuple(tiles))


def mirror_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices of [start, stop) mirrored into [0, size) (edge not repeated, like np.pad 'reflect').

    Mirror extrapolation of the missing context (paper, Fig. 2); repeated
    reflection handles margins larger than the volume.
    """
    idx = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= size, period - idx, idx)


def read_mirrored(array, box: Box) -> np.ndarray:
    """Read `box` (2D region over slices) from an array-like, mirroring past its y/x borders.

    Only the bounding box of the needed in-volume indices is read, so the
    cost is that of the region itself, not of the volume.
    """
    z = slice(box.start[0], box.stop[0])
    iy = mirror_indices(box.start[1], box.stop[1], array.shape[1])
    ix = mirror_indices(box.start[2], box.stop[2], array.shape[2])
    block = np.asarray(array[z, iy.min():iy.max() + 1, ix.min():ix.max() + 1])
    return block[:, iy - iy.min()][:, :, ix - ix.min()]
