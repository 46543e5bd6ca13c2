"""Geometry, without torch: the U-Net's size arithmetic, boxes, block grids, strips, parts and pyramid levels.

Everything that says where data lies (which input a tile reads, which voxels
a block writes, which blocks a job owns, how coarse a pyramid level is) is
arithmetic on integers, kept here so that the configuration checks, the
workflow's resource functions and every stage share one definition, and so
that none of them has to import torch to do it.

The network (Ronneberger et al. 2015, Fig. 1): with unpadded ("valid") 3x3
convolutions a U-Net of depth d loses 12 * 2**d - 8 pixels per axis, i.e. a
context margin of 6 * 2**d - 4 on each side (92 for the paper's d = 4: a
572 input gives 388). Every 2x2 max pooling must see an even size, which
makes the valid output sides 4 + k * 2**d (d >= 2; 2 + 2k for d = 1). With
padded ("same") convolutions the output is the input minus a halo kept for
context, and its side must be a multiple of 2**d.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

from unet_pipeline import schema
from unet_pipeline.errors import ConfigError


# --------------------------------------------------------------------------- the network's shape
@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the network and the tile sizes they allow; defaults are the schema's (the paper's)."""

    in_channels: int = 1
    num_classes: int = 2
    depth: int = schema.field("model.depth")
    base_channels: int = schema.field("model.base_channels")
    padding: str = schema.field("model.padding")
    batch_norm: bool = schema.field("model.batch_norm")
    dropout: float = schema.field("model.dropout")
    # Context kept around each output tile when padding == "same": convolutions
    # near a tile edge see zeros, so tiles overlap by this margin and are cropped.
    same_halo_px: int = schema.field("model.same_halo_px")

    def __post_init__(self):
        if self.padding not in schema.choices("model.padding"):
            raise ConfigError(f"model.padding must be one of {schema.choices('model.padding')}, got {self.padding!r}")
        if not 1 <= self.depth <= 6:
            raise ConfigError(f"model.depth must be between 1 and 6, got {self.depth}")
        if self.base_channels < 1 or self.num_classes < 2 or self.in_channels < 1:
            raise ConfigError("model.base_channels, num_classes (>= 2) and in_channels must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """The hyper-parameters as plain data (stored in checkpoints)."""
        return asdict(self)

    @property
    def size_step(self) -> int:
        """Valid output sides form an arithmetic progression with this step: 2**depth (one pixel per pooling grid)."""
        return 2 ** self.depth

    @property
    def context_margin(self) -> int:
        """Input pixels needed on each side of an output tile: 6 * 2**depth - 4 (92 for the paper's net)."""
        return self.same_halo_px if self.padding == "same" else 6 * 2 ** self.depth - 4

    @property
    def min_output_size(self) -> int:
        """Smallest valid output side; every valid side is this plus a multiple of `size_step`."""
        if self.padding == "same":
            return self.size_step
        return 4 if self.depth >= 2 else 2

    def is_valid_output_size(self, output_size: int) -> bool:
        """Whether an output side is one the network produces exactly (`min_output_size` + k * `size_step`)."""
        return output_size >= self.min_output_size and (output_size - self.min_output_size) % self.size_step == 0

    def input_size(self, output_size: int, key: str = "tile_size") -> int:
        """Input side that yields exactly `output_size`, or ConfigError naming `key` and the nearest valid sizes."""
        if not self.is_valid_output_size(output_size):
            lo, hi = self.nearest_valid_output_sizes(output_size)
            raise ConfigError(
                f"config key '{key}': {output_size} is not a valid output tile for this network (depth "
                f"{self.depth}, {self.padding} convolutions); nearest valid sizes: {lo} and {hi}"
            )
        return output_size + 2 * self.context_margin

    def output_size(self, input_size: int) -> int:
        """Output side for an input side (the inverse of `input_size`); ValueError if no output fits exactly."""
        out = input_size - 2 * self.context_margin
        if not self.is_valid_output_size(out):
            raise ValueError(f"input {input_size} gives no valid output for depth {self.depth} ({self.padding})")
        return out

    def check_output_size(self, output_size: int, key: str = "tile_size") -> None:
        """The one check of a tile size (config, training, prediction): ConfigError naming `key`."""
        self.input_size(output_size, key)

    def nearest_valid_output_sizes(self, output_size: int) -> tuple[int, int]:
        """The valid output sides just below and above `output_size` (both equal if it is valid)."""
        base = self.min_output_size
        k = max(0, math.floor((output_size - base) / self.size_step))
        lo = base + k * self.size_step
        hi = lo + self.size_step if lo < output_size else lo
        return lo, hi


# The 8 symmetries of the square as (quarter turns, flip): test-time augmentation (the paper averages rotations).
DIHEDRAL = tuple((k, f) for f in (False, True) for k in range(4))


def tta_transforms(tta) -> tuple[tuple[int, bool], ...]:
    """'none' -> identity; 'flips' -> 4 flips; 'd4' or 8 -> all 8; an int n -> the first n of the 8."""
    if tta in ("none", None, 0, 1):
        return DIHEDRAL[:1]
    if tta in ("d4", 8):
        return DIHEDRAL
    if tta == "flips":
        return ((0, False), (2, False), (0, True), (2, True))
    if isinstance(tta, int) and 1 <= tta <= 8:
        return DIHEDRAL[:tta]
    raise ConfigError(f"predict.tta must be 'none', 'flips', 'd4' or 1-8, got {tta!r}")


# --------------------------------------------------------------------------- boxes and grids
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

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def grow(self, margin: Sequence[int]) -> "Box":
        """The box widened by `margin` on both sides of each axis (may extend past a volume)."""
        return Box(tuple(a - m for a, m in zip(self.start, margin)), tuple(b + m for b, m in zip(self.stop, margin)))

    def clip(self, shape: Sequence[int]) -> "Box":
        """The part of the box inside a volume of `shape`."""
        return Box(tuple(max(0, a) for a in self.start), tuple(min(b, n) for b, n in zip(self.stop, shape)))

    def intersect(self, other: "Box") -> "Box | None":
        """The overlap of two boxes, or None where they do not overlap."""
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop))
        return Box(start, stop) if all(s < e for s, e in zip(start, stop)) else None

    def relative_to(self, origin: Sequence[int]) -> "Box":
        """The same box in coordinates whose zero is `origin`."""
        return Box(tuple(a - o for a, o in zip(self.start, origin)), tuple(b - o for b, o in zip(self.stop, origin)))

    @classmethod
    def around(cls, boxes: Sequence["Box"]) -> "Box":
        """The smallest box holding all of `boxes`."""
        return cls(tuple(map(min, zip(*[b.start for b in boxes]))), tuple(map(max, zip(*[b.stop for b in boxes]))))


Index = tuple[int, ...]
Strip = tuple[Index, ...]
# Widest strip a block-wise stage reads at once: a row of a 100k px section is
# read in segments, so that a strip's memory does not grow with the width.
STRIP_WIDTH_PX = 16384


@dataclass(frozen=True)
class BlockGrid:
    """The regular grid of blocks over a volume; blocks at the far edges are cut to the volume."""

    shape: tuple[int, ...]
    block: tuple[int, ...]

    def __post_init__(self):
        if len(self.shape) != len(self.block) or min(self.block) < 1:
            raise ValueError(f"block shape {self.block} does not fit a volume of shape {self.shape}")

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.block))

    @property
    def num_blocks(self) -> int:
        return math.prod(self.grid_shape)

    def box(self, index: Index) -> Box:
        """The voxels of block `index` (cut at the volume's far edges)."""
        start = tuple(i * c for i, c in zip(index, self.block))
        stop = tuple(min(s + c, n) for s, c, n in zip(start, self.block, self.shape))
        return Box(start, stop)

    def indices(self) -> Iterator[Index]:
        """Every block index, in grid (z, y, x) order."""
        return itertools.product(*(range(g) for g in self.grid_shape))

    def touching(self, box: Box) -> Iterator[Index]:
        """Indices of the blocks that `box` (inside the volume) overlaps."""
        ranges = [range(max(0, a) // c, (min(b, n) - 1) // c + 1)
                  for a, b, c, n in zip(box.start, box.stop, self.block, self.shape)]
        return itertools.product(*ranges)

    def strips(self, z_align: int = 1, max_width: int | None = None) -> list[Strip]:
        """Blocks grouped into strips: a block row (z, y) across the width, in z, y, x order.

        A strip is the unit in which stages read their input: rows across the
        slice, so that an input chunk is decoded once however the blocks cut
        it in x. With `z_align` (in voxels) a strip spans as many block layers
        as needed to start and end on multiples of it (the input's z chunks),
        so that no input chunk is shared by strips of different z. With
        `max_width` (in voxels) a row of a very wide section is cut into
        strips of at most that many voxels (whole blocks), bounding a strip's
        memory whatever the width.
        """
        gz, gy, gx = self.grid_shape
        layers = math.lcm(self.block[0], z_align) // self.block[0]
        columns = max(1, (max_width or self.shape[2]) // self.block[2])
        return [tuple((z, y, x) for z in range(z0, min(gz, z0 + layers)) for x in range(x0, min(gx, x0 + columns)))
                for z0 in range(0, gz, layers) for y in range(gy) for x0 in range(0, gx, columns)]


# --------------------------------------------------------------------------- a job's share
@dataclass(frozen=True)
class Part:
    """Job `index` of `count` over a stage's strips: contiguous runs, so each job reads its rows once."""

    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ConfigError(f"part {self.index}/{self.count}: the index must lie in 0..{self.count - 1}")

    @classmethod
    def parse(cls, text: str) -> "Part":
        """'i/N' -> Part(i, N)."""
        try:
            index, count = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise ConfigError(f"--part must look like i/N (e.g. 0/4), got {text!r}") from None
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def of(self, items: Sequence) -> list:
        """This job's contiguous share of `items` (shares of all jobs cover them once, in order)."""
        n = len(items)
        return list(items[self.index * n // self.count:(self.index + 1) * n // self.count])


def parts_for(work: float, work_per_part: float, max_parts: int) -> int:
    """How many jobs split `work` so that each does at most `work_per_part` (never more jobs than strips)."""
    if work_per_part <= 0:
        raise ValueError("work per part must be positive")
    return max(1, min(max_parts, math.ceil(work / work_per_part)))


# --------------------------------------------------------------------------- storage layout
def clip_chunks(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """A chunk shape no larger than the volume (small stacks get small chunks)."""
    return tuple(min(int(c), int(s)) for c, s in zip(chunks, shape))


def shard_shape(shape: Sequence[int], chunks: Sequence[int], chunks_per_file: Sequence[int]) -> tuple[int, ...]:
    """The Zarr v3 shard (one file, and the unit of one write) for `chunks` of a volume of `shape`.

    A shard never extends past the chunk that holds the volume's last voxel,
    so small volumes get small files. [1, 1, 1] chunks per file make the
    shard a single chunk.
    """
    chunks = clip_chunks(chunks, shape)
    return tuple(min(c * int(n), -(-s // c) * c) for c, n, s in zip(chunks, chunks_per_file, shape))


# --------------------------------------------------------------------------- pyramid levels
@dataclass(frozen=True)
class Level:
    """One level of a multiscale pyramid: its shape and its downsampling factor from level 0 per axis."""

    shape: tuple[int, ...]
    factor: tuple[int, ...]

    def step_from(self, previous: "Level") -> tuple[int, ...]:
        """The factor (1 or 2 per axis) from the level before."""
        return tuple(f // p for f, p in zip(self.factor, previous.factor))

    def scale(self, voxel_size: Sequence[float]) -> list[float]:
        """The level's voxel size in physical units, for NGFF's coordinateTransformations."""
        return [float(v) * f for v, f in zip(voxel_size, self.factor)]

    def translation(self, voxel_size: Sequence[float]) -> list[float]:
        """Where voxel 0's centre lies, in physical units, for NGFF's coordinateTransformations.

        A coarse voxel stands for the f level-0 voxels it was made from (their
        mean, or their most frequent label), so its centre lies (f - 1) / 2
        level-0 voxels in, and the level covers exactly what level 0 covers.
        """
        return [float(v) * (f - 1) / 2 for v, f in zip(voxel_size, self.factor)]


def pyramid(shape: Sequence[int], chunks: Sequence[int], voxel_size: Sequence[float],
            max_levels: int | None = None) -> list[Level]:
    """Level 0 and the 2x downsampled levels below it, as viewers of large volumes expect.

    y and x are halved at every level; z is halved too once the voxels are
    about isotropic (z no larger than y/x after the halving: for 50 x 4 x 4 nm
    from level 4 on). Levels stop where a slice fits in one chunk, or after
    `max_levels` levels (None: no limit). Sizes round up, so every level
    covers the whole volume.
    """
    levels = [Level(tuple(int(s) for s in shape), (1,) * len(shape))]
    while max_levels is None or len(levels) <= max_levels:
        last = levels[-1]
        if all(s <= c for s, c in zip(last.shape[1:], chunks[1:])):
            break
        step_yx = 2
        size_z = voxel_size[0] * last.factor[0]
        size_yx = max(voxel_size[1] * last.factor[1], voxel_size[2] * last.factor[2]) * step_yx
        step_z = 2 if size_z <= size_yx and last.shape[0] > 1 else 1
        factor = (last.factor[0] * step_z, last.factor[1] * step_yx, last.factor[2] * step_yx)
        new_shape = (-(-last.shape[0] // step_z), -(-last.shape[1] // step_yx), -(-last.shape[2] // step_yx))
        levels.append(Level(new_shape, factor))
    return levels
