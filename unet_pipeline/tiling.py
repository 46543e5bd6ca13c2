"""Overlap-tile geometry (paper, Fig. 2), kept in one place and tested alone.

A `ChunkPlan` says, for one output chunk of a (slices, y, x) volume, which
input region it reads (the chunk grown by the network's context margin, with
mirror extrapolation where that reaches past the volume) and which tiles the
network runs on inside it. With valid convolutions output tiles must have
sizes the network accepts (4 + 16k for the paper's net) and must start on the pooling
grid (multiples of 16) so that the result equals one whole-image pass
exactly (`tile_axis`). Every output pixel is written exactly once; nothing is
blended. Tiles at a chunk's edges may run past it, and those pixels are cropped.
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


@dataclass(frozen=True)
class AxisTiling:
    """Tiles along one axis: output tiles of `size` starting at `starts` (volume coordinates)."""

    starts: tuple[int, ...]
    size: int

    @property
    def begin(self) -> int:
        return self.starts[0]

    @property
    def end(self) -> int:
        return self.starts[-1] + self.size


def tile_axis(begin: int, end: int, max_tile: int, cfg: UNetConfig) -> AxisTiling:
    """Output tiles covering [begin, end) whose starts are multiples of the pooling period.

    A U-Net with d poolings is translation-equivariant only for shifts that
    are multiples of 2**d: tiles that start on that grid give exactly the
    values of one whole-image pass. Valid output sizes are period * k +
    residue (4 + 16k for the paper's net), so neighbouring tiles overlap by
    the residue (4 px, 1% of a 388 tile); each pixel is written once.
    """
    if end <= begin:
        raise ValueError("empty axis range")
    cfg.check_output_size(max_tile)
    period = cfg.size_step
    residue = cfg.min_output_size % period
    max_stride = (max_tile - residue) // period * period
    if max_stride < period:
        raise ValueError(f"tile size {max_tile} is too small; use at least {period + residue}")
    first = begin // period * period
    count = math.ceil((end - first - residue) / max_stride) if end - first > residue else 1
    count = max(count, 1)
    stride = math.ceil(max(end - first - residue, 1) / count / period) * period
    return AxisTiling(tuple(first + i * stride for i in range(count)), stride + residue)


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
    computed: Box       # output region the tiles cover (contains the chunk)
    tiles: tuple[Tile, ...]

    @classmethod
    def make(cls, chunk: Box, cfg: UNetConfig, max_tile: int) -> "ChunkPlan":
        margin = cfg.context_margin
        ys = tile_axis(chunk.start[1], chunk.stop[1], max_tile, cfg)
        xs = tile_axis(chunk.start[2], chunk.stop[2], max_tile, cfg)
        computed = Box((chunk.start[0], ys.begin, xs.begin), (chunk.stop[0], ys.end, xs.end))
        read = computed.grow((0, margin, margin))
        tiles = []
        for y0 in ys.starts:
            for x0 in xs.starts:
                out = Box((0, y0 - ys.begin, x0 - xs.begin), (computed.shape[0], y0 - ys.begin + ys.size,
                                                              x0 - xs.begin + xs.size))
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
