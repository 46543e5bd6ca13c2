import numpy as np
import pytest

from unet_pipeline.model import UNetConfig
from unet_pipeline.tiling import Box, ChunkGrid, ChunkPlan, mirror_indices, read_mirrored, tile_axis

CFG = UNetConfig()


@pytest.mark.parametrize("begin, end", [(0, 1), (0, 388), (0, 512), (200, 517), (100, 1033), (16, 2048)])
def test_tiles_are_valid_on_the_pooling_grid_and_cover_the_range(begin, end):
    axis = tile_axis(begin, end, 388, CFG)
    assert CFG.is_valid_output_size(axis.size) and axis.size <= 388
    assert all(s % 16 == 0 for s in axis.starts)
    assert axis.begin <= begin and axis.end >= end
    # consecutive tiles overlap by exactly the 4 px residue of the valid sizes
    assert all(b - a == axis.size - 4 for a, b in zip(axis.starts, axis.starts[1:]))


def test_overlap_is_small_for_the_papers_tile():
    axis = tile_axis(0, 1536, 388, CFG)
    assert len(axis.starts) == 4 and axis.size == 388


def test_mirror_matches_numpy_reflect_even_past_the_volume():
    for size in (1, 2, 5, 9):
        ref = np.pad(np.arange(size), 20, mode="reflect") if size > 1 else np.zeros(size + 40, int)
        assert np.array_equal(mirror_indices(-20, size + 20, size), ref)


def test_read_mirrored_equals_padding_the_whole_array():
    data = np.random.default_rng(0).random((2, 13, 17))
    box = Box((0, -9, -30), (2, 20, 5))
    full = np.pad(data, ((0, 0), (9, 7), (30, 0)), mode="reflect")
    assert np.array_equal(read_mirrored(data, box), full[:, :29, :35])


def test_chunk_plan_tiles_cover_the_chunk():
    plan = ChunkPlan.make(Box((0, 100, 0), (1, 300, 517)), CFG, 388)
    covered = np.zeros(plan.computed.shape[1:], int)
    for t in plan.tiles:
        covered[t.output.slices[1:]] += 1
        assert t.input.shape[1] == t.output.shape[1] + 2 * CFG.context_margin
    assert (covered >= 1).all()
    assert plan.computed.start[1] == 96 and plan.read.start[1] == 96 - 92


def test_shards_are_disjoint_and_cover_the_grid():
    grid = ChunkGrid((5, 100, 70), (2, 30, 30))
    shards = [set(grid.shard(i, 3)) for i in range(3)]
    assert set.union(*shards) == set(grid.indices())
    assert sum(len(s) for s in shards) == grid.num_chunks == 3 * 4 * 3
