"""Multiscale pyramids for viewers, built block by block and split across jobs like every volume-sized stage.

Level L+1 is made from level L: y and x halved at every level, z too once
the voxels are about isotropic (`geometry.pyramid`), down to the level where
a slice fits in one chunk, so a viewer zoomed out over a terabyte loads a few
chunks per screen. Intensities and probabilities are averaged (edge voxels of
odd sizes average what is there); labels take the most frequent label of
each group, so that no label is invented. Either way a coarse voxel is
centred on the voxels it stands for (NGFF translation), so every level
covers exactly what level 0 covers. Each level-(L+1) block reads exactly the level-L
region below it, so a level's blocks are independent: jobs split them as
they split level 0 (`pyramid_part`), and the small coarse levels are built by
the store's finishing job (`build_levels`).
"""
from __future__ import annotations

import logging

import numpy as np

from unet_pipeline.blockwise import PartialStore, PartSummary, run_part
from unet_pipeline.geometry import Box, Level, Part, pyramid
from unet_pipeline import stores

log = logging.getLogger(__name__)


def levels_of(store: PartialStore) -> list[Level]:
    """The pyramid levels the store was created with (recorded in its attributes)."""
    recorded = store.group("r").attrs["partial"]["levels"]
    return [Level(tuple(level["shape"]), tuple(level["factor"])) for level in recorded]


def plan(shape, chunks, voxel_size, max_levels) -> list[Level]:
    """Level 0 and the levels below it; `max_levels` "auto" goes down to one chunk per slice."""
    return pyramid(shape, chunks, voxel_size, None if max_levels == "auto" else int(max_levels))


def image_builder(shape, dtype, chunks, chunks_per_file, codecs, voxel_size, max_levels, *, kind: str, name: str,
                  downsampling: str, label_source: str | None = None, attrs: dict | None = None):
    """How a block-wise stage's partial store is created: an empty array per pyramid level, and what
    the finishing job needs to know (the kind of store, its NGFF name, mean or stride levels, voxel size).
    """
    levels = plan(shape, chunks, voxel_size, max_levels)

    def build(group) -> None:
        for i, level in enumerate(levels):
            stores.create_array(group, str(i), level.shape, dtype, chunks, chunks_per_file, codecs)
        group.attrs["partial"] = {
            "kind": kind, "name": name, "downsampling": downsampling, "label_source": label_source,
            "voxel_size": [float(v) for v in voxel_size], **(attrs or {}),
            "levels": [{"shape": list(level.shape), "factor": list(level.factor)} for level in levels],
        }

    return build


def downsample(data: np.ndarray, step: tuple[int, ...], how: str, dtype) -> np.ndarray:
    """One level down: the mean ("mean") or the most frequent label ("mode") of each 1x2x2 (or 2x2x2) group.

    Odd sizes round up: an edge group uses the voxels it has (the edge voxel
    is repeated), so every level covers the whole volume. A tie between
    labels goes to the first in raster order within the group.
    """
    pad = [(0, (-n) % s) for n, s in zip(data.shape, step)]
    if any(p for _, p in pad):
        data = np.pad(data, pad, mode="edge")
    if how == "mode":
        candidates = [data[tuple(slice(o, None, s) for o, s in zip(offset, step))] for offset in np.ndindex(*step)]
        votes = [sum((c == other).astype(np.uint8) for other in candidates) for c in candidates]
        best, best_votes = candidates[0].copy(), votes[0]
        for c, v in zip(candidates[1:], votes[1:]):
            better = v > best_votes
            best[better], best_votes = c[better], np.maximum(best_votes, v)
        return np.ascontiguousarray(best).astype(dtype, copy=False)
    out = None
    for offset in np.ndindex(*step):
        part = data[tuple(slice(o, None, s) for o, s in zip(offset, step))]
        out = part.astype(np.float32) if out is None else np.add(out, part, out=out, dtype=np.float32)
    out *= np.float32(1.0 / np.prod(step))
    if np.issubdtype(np.dtype(dtype), np.integer):
        np.rint(out, out=out)
    return out.astype(dtype, copy=False)


def pyramid_part(store: PartialStore, level: int, part: Part, threads: int) -> PartSummary:
    """Compute this job's blocks of level `level` (>= 1) from the finished level below."""
    levels = levels_of(store)
    if not 1 <= level < len(levels):
        raise ValueError(f"{store.final}: has no pyramid level {level} (levels 1..{len(levels) - 1})")
    store.require_complete(str(level - 1), f"run the jobs of level {level - 1} first")
    source = store.array(str(level - 1), "r")
    target = store.array(str(level), "r")
    step = levels[level].step_from(levels[level - 1])
    how = store.group("r").attrs["partial"]["downsampling"]
    grid = stores.block_grid(target)

    def compute(index, _):
        box = grid.box(index)
        below = Box(tuple(a * s for a, s in zip(box.start, step)),
                    tuple(min(b * s, n) for b, s, n in zip(box.stop, step, source.shape)))
        return downsample(np.asarray(source[below.slices]), step, how, target.dtype), {}

    # Blocks read their own region below (no strip shares input), so strips are only the order of work.
    return run_part(store, str(level), grid, grid.strips(), part, f"level-{level}", lambda strip: None, compute,
                    threads)


def build_levels(store: PartialStore, first: int, threads: int) -> None:
    """Levels `first`.. in this process (the finishing job's share: the small, coarse ones)."""
    for level in range(first, len(levels_of(store))):
        pyramid_part(store, level, Part(0, 1), threads)
