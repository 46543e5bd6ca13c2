"""The overlap-tile strategy (paper, Fig. 2): which tiles the network runs on to cover a region exactly once.

A `TilePlan` says, for one output region of a (slices, y, x) volume, which
input region it reads (the region grown by the network's context margin,
with mirror extrapolation where that reaches past the volume) and which
tiles the network runs on inside it. With valid convolutions output tiles
must have sizes the network accepts (4 + 16k for the paper's net) and must
start on the pooling grid (multiples of 16) so that the result equals one
whole-image pass exactly (`tile_axis`). Every output pixel is written
exactly once; nothing is blended. Tiles at a region's edges may run past
it, and those pixels are cropped. Torch-free: plain integer arithmetic on
`geometry.Box`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from unet_pipeline.geometry import Box, UNetConfig


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


def tile_axis(begin: int, end: int, tile_size: int, cfg: UNetConfig) -> AxisTiling:
    """Output tiles no larger than `tile_size` covering [begin, end), starting on multiples of the pooling period.

    A U-Net with d poolings is translation-equivariant only for shifts that
    are multiples of 2**d: tiles that start on that grid give exactly the
    values of one whole-image pass. Valid output sizes are period * k +
    residue (4 + 16k for the paper's net), so neighbouring tiles overlap by
    the residue (4 px, 1% of a 388 tile); each pixel is written once. Tiles
    are balanced: a region is cut into equal tiles rather than full ones and a
    sliver.
    """
    if end <= begin:
        raise ValueError("empty axis range")
    cfg.check_output_size(tile_size)
    period = cfg.size_step
    residue = cfg.min_output_size % period
    max_stride = (tile_size - residue) // period * period
    if max_stride < period:
        raise ValueError(f"tile size {tile_size} is too small; use at least {period + residue}")
    first = begin // period * period
    count = max(1, math.ceil((end - first - residue) / max_stride) if end - first > residue else 1)
    stride = math.ceil(max(end - first - residue, 1) / count / period) * period
    return AxisTiling(tuple(first + i * stride for i in range(count)), stride + residue)


@dataclass(frozen=True)
class Tile:
    """One network call: its `input` region and `output` region, relative to the plan's `read` origin."""

    input: Box
    output: Box


@dataclass(frozen=True)
class TilePlan:
    """Read region, tiles and crop for one output region (a 2D network applied to each slice)."""

    region: Box         # output region in the volume
    read: Box           # input region in the volume (may extend past it: mirror)
    computed: Box       # output region the tiles cover (contains `region`)
    tiles: tuple[Tile, ...]

    @classmethod
    def make(cls, region: Box, cfg: UNetConfig, tile_size: int) -> "TilePlan":
        """The tiles (at most `tile_size` of output each) that cover `region` once, and what they read."""
        margin = cfg.context_margin
        ys = tile_axis(region.start[1], region.stop[1], tile_size, cfg)
        xs = tile_axis(region.start[2], region.stop[2], tile_size, cfg)
        computed = Box((region.start[0], ys.begin, xs.begin), (region.stop[0], ys.end, xs.end))
        read = computed.grow((0, margin, margin))
        tiles = []
        for y0 in ys.starts:
            for x0 in xs.starts:
                out = Box((0, y0 - ys.begin, x0 - xs.begin), (computed.shape[0], y0 - ys.begin + ys.size,
                                                              x0 - xs.begin + xs.size))
                inp = Box(out.start, (out.stop[0], out.stop[1] + 2 * margin, out.stop[2] + 2 * margin))
                tiles.append(Tile(inp, out))
        return cls(region, read, computed, tuple(tiles))


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
