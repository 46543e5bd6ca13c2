"""The two ways cells are labelled from the probability map, for a whole image or one block of a volume.

- **threshold**: cell where p > threshold, then connected components
  (4-connected within a slice for '2d', 6-connected for '3d');
- **watershed** (within slices): the cell mask p > threshold is split by a
  seeded watershed on the membrane probability 1 - p. Seeds are the
  4-connected components of p > seed_threshold with at least `min_seed_px`
  pixels; the flooding stays inside the mask, and where two cells meet a
  one-pixel line of membrane is drawn (`flood.seeded_watershed`). A mask
  component without a seed is a cell of its own, so no cell is lost. A gap
  in a thin membrane merges two cells under `threshold`; here the two seeds
  meet at the gap and the cells stay apart, which is why the watershed
  usually has the lower Rand error.

Block by block (`label_block`), the threshold method needs only the block;
its labels are joined across block faces later. A watershed region depends
on the whole mask component it floods, so a block reads its region grown by
a halo, and floods the bounding box of every mask component that reaches
into the block, once that component lies wholly inside what was read. Each
block's result is then exactly the whole-volume result, and each region carries a key (the
position of its seed's first pixel in the volume) by which the join step
recognises the same cell in every block it crosses.

A watershed block is worked in tiles of at most WATERSHED_TILE_PX a side,
each with its own halo: the keys are the volume's, so the tiles' results
fit together exactly, and a 4096^2 block (one probability shard) needs the
memory of a 1024^2 tile and its halo, not of the whole block and its halo
(the flood holds about 20 bytes per pixel, the probabilities 8 more).

The halo is at most `max_halo_px`, so that a job's memory is bounded
by its blocks whatever the data: at a low cell threshold, leaky membranes
can join a whole slice into one mask component, and a slice of a large
volume does not fit in a job. A block that reaches the bound is labelled
with what it read (`label_block` counts such tiles, and the label job
warns once with their number): pixels near its border may then be
flooded from other seeds than in a whole-slice watershed, and a seed cut by
the halo's edge can split one cell at the block border. Seeds lie within a
cell's width of every pixel, so a bound of several cell widths rarely
changes anything.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import logging

import numpy as np
from scipy import ndimage

from unet_pipeline.errors import ConfigError
from unet_pipeline.flood import flood_levels, seeded_watershed
from unet_pipeline.geometry import BlockGrid, Box
from unet_pipeline import schema
from unet_pipeline.schema import choices

log = logging.getLogger(__name__)

MIN_HALO_PX = 64
WATERSHED_TILE_PX = 1024


@dataclass(frozen=True)
class SegmentationSettings:
    """How cells are labelled: method, cell threshold, connectivity, and the watershed's seeds."""

    method: str
    threshold: float
    connectivity: str
    seed_threshold: float | None = None
    min_seed_px: int | None = None
    max_halo_px: int | None = None  # watershed blocks: how far beyond a block it may read (None: schema default)

    def __post_init__(self):
        if self.method not in ("threshold", "watershed"):
            raise ConfigError(f"segment.method must be threshold or watershed here, got {self.method!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"segment.threshold must lie in [0, 1], got {self.threshold}")
        if self.connectivity not in choices("segment.connectivity"):
            raise ConfigError(f"segment.connectivity must be one of {choices('segment.connectivity')}, got "
                              f"{self.connectivity!r}")
        if self.method == "watershed":
            if self.connectivity != "2d":
                raise ConfigError("segment.method watershed works within slices: set segment.connectivity to 2d "
                                  "(a 3D watershed needs whole neurons in one block, which no block-wise job holds)")
            if self.seed_threshold is None or not self.threshold <= self.seed_threshold <= 1.0:
                raise ConfigError(f"segment.watershed.seed_threshold must lie in [threshold, 1], got "
                                  f"{self.seed_threshold}")
            if self.min_seed_px is None or self.min_seed_px < 1:
                raise ConfigError(f"segment.watershed.min_seed_px must be at least 1, got {self.min_seed_px}")
            if self.max_halo_px is not None and self.max_halo_px < MIN_HALO_PX:
                raise ConfigError(f"segment.watershed.max_halo_px must be at least {MIN_HALO_PX}, got "
                                  f"{self.max_halo_px}")

    def to_dict(self) -> dict:
        """The settings that apply to the method, as plain data (recorded with the segmentation)."""
        values = asdict(self)
        if self.method == "threshold":
            values.pop("seed_threshold")
            values.pop("min_seed_px")
        if self.method == "threshold" or self.max_halo_px is None:
            values.pop("max_halo_px")
        return values

    def describe(self) -> str:
        """The settings in words, for the log."""
        if self.method == "threshold":
            return f"threshold {self.threshold:g} + connected components"
        return (f"watershed (cells p > {self.threshold:g}, seeds p > {self.seed_threshold:g} of at least "
                f"{self.min_seed_px} px)")


def structure(connectivity: str) -> np.ndarray:
    """Face connectivity: 4-connected within a slice ('2d') or 6-connected ('3d')."""
    if connectivity == "2d":
        s = np.zeros((3, 3, 3), bool)
        s[1] = ndimage.generate_binary_structure(2, 1)
        return s
    if connectivity == "3d":
        return ndimage.generate_binary_structure(3, 1)
    raise ConfigError(f"segment.connectivity must be one of {choices('segment.connectivity')}, got {connectivity!r}")


FOUR = ndimage.generate_binary_structure(2, 1)


def _watershed_slice(prob: np.ndarray, settings: SegmentationSettings, origin_flat: np.ndarray) -> tuple:
    """Watershed regions of one slice and each region's key (the volume index of its marker's first pixel).

    `origin_flat` maps each pixel of the slice to its flat index in the volume.
    """
    mask = prob > settings.threshold
    seeds, count = ndimage.label(prob > settings.seed_threshold, FOUR)
    if count:
        sizes = np.bincount(seeds.ravel(), minlength=count + 1)
        keep = sizes >= settings.min_seed_px
        keep[0] = False
        renumber = np.zeros(count + 1, np.int64)
        renumber[keep] = np.arange(1, int(keep.sum()) + 1)
        seeds = renumber[seeds]
    components, n_components = ndimage.label(mask, FOUR)
    markers = seeds.astype(np.int64)
    # A mask component with no seed is one cell: its whole area is its marker.
    seeded = np.zeros(n_components + 1, bool)
    seeded[np.unique(components[markers > 0])] = True
    lonely = ~seeded[components] & (components > 0)
    if lonely.any():
        extra, _ = ndimage.label(lonely, FOUR)
        markers = np.where(lonely, extra + markers.max(), markers)
    regions = seeded_watershed(flood_levels(prob), markers, mask)
    n = int(markers.max())
    keys = np.full(n + 1, np.iinfo(np.int64).max, np.int64)
    if n:
        np.minimum.at(keys, markers[markers > 0], origin_flat[markers > 0])
    return regions, keys


def label_image(prob: np.ndarray, settings: SegmentationSettings) -> np.ndarray:
    """Cells of a whole (slices, y, x) probability array, numbered in raster order of first appearance."""
    if settings.method == "threshold":
        labels, _ = ndimage.label(prob > settings.threshold, structure(settings.connectivity))
        return labels.astype(np.uint32)
    keyed = np.zeros(prob.shape, np.int64)
    whole = Box((0, 0, 0), prob.shape)
    for z in range(prob.shape[0]):
        regions, keys = _watershed_slice(prob[z], settings, _flat_indices(whole, z, prob.shape))
        keyed[z] = np.where(regions > 0, keys[regions], -1)
    return _number_by_appearance(keyed)[0]


def _flat_indices(region: Box, z: int, volume) -> np.ndarray:
    """Flat indices in the volume of the pixels of slice `z` (relative to the region) of `region`."""
    ys = np.arange(region.start[1], region.stop[1], dtype=np.int64)
    xs = np.arange(region.start[2], region.stop[2], dtype=np.int64)
    return np.add.outer(((region.start[0] + z) * volume[1] + ys) * volume[2], xs)


def _number_by_appearance(keyed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys (-1 = membrane) -> ids 1.. in raster order of first appearance; also each id's key."""
    flat = keyed.ravel()
    inside = flat >= 0
    values, first = np.unique(flat[inside], return_index=True)
    order = np.argsort(first)
    ids = np.empty(len(values), np.int64)
    ids[order] = np.arange(1, len(values) + 1)
    labels = np.zeros(flat.shape, np.uint32)
    labels[inside] = ids[np.searchsorted(values, flat[inside])]
    keys_of_ids = np.empty(len(values) + 1, np.int64)
    keys_of_ids[0] = -1
    keys_of_ids[ids] = values
    return labels.reshape(keyed.shape), keys_of_ids


def label_block(read: Callable[[Box], np.ndarray], block: Box, volume: tuple[int, ...],
                settings: SegmentationSettings) -> tuple[np.ndarray, np.ndarray | None, int]:
    """One block's cells, numbered locally in raster order, (watershed) each local id's key, and the number
    of its watershed tiles labelled with a halo cut at `max_halo_px`.

    `read(box)` returns cell probability (float64) of a box inside the volume.
    Threshold: labels of the block alone (joined across faces later), keys
    None. Watershed: tile by tile, each flooded over the mask components it
    touches, so the labels equal the whole-volume ones (unless a component
    is larger than the halo: see
    the module docstring); keys[i] identifies local id i's cell.
    """
    if settings.method == "threshold":
        labels, _ = ndimage.label(read(block) > settings.threshold, structure(settings.connectivity))
        return labels.astype(np.uint32), None, 0
    keyed = np.full(block.shape, -1, np.int64)
    cut = 0
    for tile in _tiles(block, WATERSHED_TILE_PX):
        keyed[tile.relative_to(block.start).slices], whole = _watershed_keys(read, tile, volume, settings)
        cut += not whole
    return (*_number_by_appearance(keyed), cut)


def _tiles(block: Box, side: int) -> list[Box]:
    """The block cut in y and x into tiles of at most `side` pixels a side (a grid over the block)."""
    grid = BlockGrid(block.shape, (block.shape[0], side, side))
    back = tuple(-s for s in block.start)  # the grid's boxes are the block's; relative_to(-start) moves them in
    return [grid.box(index).relative_to(back) for index in grid.indices()]


def halo_bound(settings: SegmentationSettings) -> int:
    """How far (px) a watershed tile reads beyond its edges at most."""
    return settings.max_halo_px or schema.default("segment.watershed.max_halo_px")


def _watershed_keys(read: Callable[[Box], np.ndarray], tile: Box, volume: tuple[int, ...],
                    settings: SegmentationSettings) -> tuple[np.ndarray, bool]:
    """The key of each pixel's cell (-1 = membrane) in `tile`, flooded over the mask components it touches,
    and whether those components lay wholly within the halo bound.

    Reads the tile with the largest halo once, and floods only the bounding
    box of the mask components that reach into the tile: a region depends on
    its component alone (seeds lie inside the mask), so this is the
    whole-slice result wherever those components are whole.
    """
    limit = halo_bound(settings)
    region = tile.grow((0, limit, limit)).clip(volume)
    prob = read(region)
    needed, whole = _components_around(prob > settings.threshold, region, tile, volume)
    if not whole:
        log.debug("tile %s: a cell region reaching into it extends beyond the %d px halo bound", tile, limit)
    prob = prob[needed.relative_to(region.start).slices]
    inner = tile.relative_to(needed.start).slices
    keyed = np.full(tile.shape, -1, np.int64)
    for z in range(needed.shape[0]):
        regions, keys = _watershed_slice(prob[z], settings, _flat_indices(needed, z, volume))
        keyed[z] = np.where(regions[inner[1:]] > 0, keys[regions[inner[1:]]], -1)
    return keyed, whole


def _components_around(mask: np.ndarray, region: Box, tile: Box, volume: tuple[int, ...]) -> tuple[Box, bool]:
    """The box around `tile` and every mask component reaching into it (per slice, in y and x), within
    `region`; and whether all those components lie wholly inside `region`.

    A component touching a side of the region that is not the volume's edge
    may continue outside it.
    """
    inner = tile.relative_to(region.start).slices
    lo = [tile.start[1] - region.start[1], tile.start[2] - region.start[2]]
    hi = [tile.stop[1] - region.start[1], tile.stop[2] - region.start[2]]
    whole = True
    for z in range(mask.shape[0]):
        components, n = ndimage.label(mask[z], FOUR)
        if not n:
            continue
        wanted = np.unique(components[inner[1:]])
        boxes = ndimage.find_objects(components)
        for box in (boxes[i - 1] for i in wanted[wanted > 0]):
            for axis in (0, 1):
                lo[axis] = min(lo[axis], box[axis].start)
                hi[axis] = max(hi[axis], box[axis].stop)
    for axis in (0, 1):
        is_open_lo = region.start[axis + 1] > 0
        is_open_hi = region.stop[axis + 1] < volume[axis + 1]
        if (lo[axis] == 0 and is_open_lo) or (hi[axis] == region.shape[axis + 1] and is_open_hi):
            whole = False
    start = (tile.start[0], region.start[1] + lo[0], region.start[2] + lo[1])
    stop = (tile.stop[0], region.start[1] + hi[0], region.start[2] + hi[1])
    return Box(start, stop), whole
