import numpy as np
import pytest

from unet_pipeline.geometry import BlockGrid, Box, Part, UNetConfig, pyramid
from unet_pipeline.tiling import TilePlan, mirror_indices, read_mirrored, tile_axis

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


def test_tile_plan_tiles_cover_the_region():
    plan = TilePlan.make(Box((0, 100, 0), (1, 300, 517)), CFG, 388)
    covered = np.zeros(plan.computed.shape[1:], int)
    for t in plan.tiles:
        covered[t.output.slices[1:]] += 1
        assert t.input.shape[1] == t.output.shape[1] + 2 * CFG.context_margin
    assert (covered >= 1).all()
    assert plan.computed.start[1] == 96 and plan.read.start[1] == 96 - 92


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_parts_are_disjoint_contiguous_runs_of_strips_covering_the_grid(count):
    grid = BlockGrid((5, 100, 70), (2, 30, 30))
    strips = grid.strips()
    runs = [Part(i, count).of(strips) for i in range(count)]
    assert [s for run in runs for s in run] == strips  # contiguous, in order, nothing twice
    blocks = [b for strip in strips for b in strip]
    assert sorted(blocks) == sorted(grid.indices()) and len(blocks) == grid.num_blocks == 3 * 4 * 3


def test_strips_are_block_rows_cut_to_the_width_limit_and_aligned_to_input_chunks():
    grid = BlockGrid((4, 60, 100), (1, 30, 20))
    assert grid.strips()[0] == tuple((0, 0, x) for x in range(5))
    assert [len(s) for s in grid.strips(max_width=40)][:3] == [2, 2, 1]
    assert grid.strips(z_align=2)[0] == tuple((z, 0, x) for z in (0, 1) for x in range(5))


def test_part_names_its_range_when_out_of_it():
    from unet_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="0..2"):
        Part(3, 3)
    assert Part.parse("2/5") == Part(2, 5)


def test_pyramid_halves_yx_then_z_once_voxels_are_about_isotropic_down_to_one_chunk():
    levels = pyramid((64, 5000, 3000), (1, 512, 512), (50, 4, 4))
    assert [lv.factor for lv in levels] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8), (2, 16, 16)]
    assert levels[-1].shape == (32, 313, 188) and levels[-2].shape[1] > 512
    assert pyramid((4, 256, 256), (1, 256, 256), (50, 4, 4)) == pyramid((4, 256, 256), (1, 256, 256), (50, 4, 4))[:1]
    assert len(pyramid((4, 5000, 5000), (1, 512, 512), (50, 4, 4), max_levels=2)) == 3


def test_coarse_levels_are_centred_on_the_voxels_they_stand_for():
    level = pyramid((8, 64, 64), (1, 8, 8), (50, 4, 4))[2]
    assert level.factor == (1, 4, 4)
    assert level.translation((50, 4, 4)) == [0.0, 6.0, 6.0]  # (4 - 1) / 2 voxels of 4 nm


def test_label_levels_take_the_most_frequent_label_and_invent_none():
    from unet_pipeline.pyramid import downsample

    labels = np.array([[[1, 1, 2, 3, 7],
                        [1, 2, 3, 3, 7],
                        [4, 5, 6, 0, 9]]], np.uint32)
    got = downsample(labels, (1, 2, 2), "mode", np.uint32)
    assert got.tolist() == [[[1, 3, 7], [4, 6, 9]]]  # ties go to the first label of the group
    assert set(np.unique(got)) <= set(np.unique(labels))
    means = downsample(np.array([[[0, 2], [4, 6]]], np.uint8), (1, 2, 2), "mean", np.uint8)
    assert means.tolist() == [[[3]]]
