import numpy as np
import pytest

from unet_pipeline.model import UNetConfig
from unet_pipeline.tiling import Box, ChunkGrid, ChunkPlan, mirror_indices, read_mirrored, split_length

CFG = UNetConfig()


@pytest.mark.parametrize("length", [1, 4, 100, 388, 512, 517, 520, 1033, 2048])
def test_split_covers_with_valid_tiles(length):
    sizes = split_length(length, 388, CFG)
    assert all(CFG.is_valid_output_size(s) and s <= 388 for s in sizes)
    assert length <= sum(sizes) < length + CFG.size_step * len(sizes)


def test_split_is_exact_when_possible():
    assert split_length(520, 388, CFG) == [260, 260]
    assert sum(split_length(388, 388, CFG)) == 388


def test_mirror_matches_numpy_reflect_even_past_the_volume():
    for size in (1, 2, 5, 9):
        ref = np.pad(np.arange(size), 20, mode="reflect") if size > 1 else np.zeros(size + 40, int)
        assert np.array_equal(mirror_indices(-20, size + 20, size), ref)


def test_read_mirrored_equals_padding_the_whole_array():
    data = np.random.default_rng(0).random((2, 13, 17))
    box = Box((0, -9, -30), (2, 20, 5))
    full = np.pad(data, ((0, 0), (9, 7), (30, 0)), mode="reflect")
    assert np.array_equal(read_mirrored(data, box), full[:, :29, :35])


def test_chunk_plan_tiles_abut_and_cover_the_chunk():
    plan = ChunkPlan.make(Box((0, 100, 0), (1, 300, 517)), CFG, 388)
    covered = np.zeros(plan.computed.shape[1:], int)
    for t in plan.tiles:
        covered[t.output.slices[1:]] += 1
        assert t.input.shape[1] == t.output.shape[1] + 2 * CFG.context_margin
    assert (covered == 1).all()
    assert plan.read.start[1] == 100 - 92


def test_shards_are_disjoint_and_cover_the_grid():
    grid = ChunkGrid((5, 100, 70), (2, 30, 30))
    shards = [set(grid.shard(i, 3)) for i in range(3)]
    assert set.union(*shards) == set(grid.indices())
    assert sum(len(s) for s in shards) == grid.num_chunks == 3 * 4 * 3
