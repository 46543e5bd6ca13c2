"""Segmentation in blocks and parts: equal to scipy on the whole volume, the same ids however the work is split."""
import numpy as np
import pytest
import zarr
from scipy import ndimage

from unet_pipeline import stores
from unet_pipeline.blockwise import PartialStore
from unet_pipeline.finish import finish_store
from unet_pipeline.geometry import BlockGrid, Level, Part
from unet_pipeline.labelling import SegmentationSettings, label_image, structure
from unet_pipeline.segment import join, label_part, relabel_part, segment


def _probability_store(path, prob, chunks, chunks_per_file, voxel_size=(50.0, 4.0, 4.0)):
    """A finished float32 probability store of `prob` (as predict writes one)."""
    group = zarr.open_group(str(path), mode="w")
    stores.create_array(group, "0", prob.shape, "f4", chunks, chunks_per_file)
    with stores.default_codec_pipeline():  # writes every shard, empty ones too, as the pipeline's writer does
        zarr.open_array(str(path / "0"), mode="r+")[...] = prob
    stores.write_ngff(group, [Level(prob.shape, (1, 1, 1))], voxel_size, "cell_probability")
    stores.mark_complete(path, {"probability_scale": 1.0, "fingerprint": "test"})
    return path


def _smooth_probabilities(shape, seed=0):
    rng = np.random.default_rng(seed)
    prob = ndimage.gaussian_filter(rng.random(shape), (0.7, 2, 2)).astype(np.float32)
    return (prob - prob.min()) / (prob.max() - prob.min())


def _in_parts(prob_path, out, parts, connectivity="2d", threshold=0.5, settings=None):
    """The workflow's jobs: label parts, one join, relabel parts, finish."""
    settings = settings or SegmentationSettings("threshold", threshold, connectivity)
    labelled = [label_part(prob_path, out, Part(i, parts), settings=settings, pyramid_levels="auto", threads=2)
                for i in range(parts)]
    store = PartialStore(out, labelled[0].signature)
    join(store, settings)
    for i in range(parts):
        relabel_part(store, Part(i, parts), 2)
    finish_store(store, 1, 2)
    return stores.open_image(out)[...]


def _in_order_of_appearance(values: np.ndarray) -> np.ndarray:
    """Unique values in order of first appearance (raster order)."""
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]


def _ids_in_order_of_first_appearance_over_blocks(reference, grid):
    """The numbering the segmentation promises: a cell's id is its rank of first appearance when blocks are
    scanned in grid order and each block in raster order (the single-job segmentation's numbering)."""
    order: dict[int, int] = {}
    for index in grid.indices():
        block = reference[grid.box(index).slices]
        for value in _in_order_of_appearance(block[block > 0]):
            order.setdefault(int(value), len(order) + 1)
    lookup = np.zeros(reference.max() + 1, np.int64)
    for value, new in order.items():
        lookup[value] = new
    return lookup[reference]


@pytest.mark.parametrize("connectivity", ["2d", "3d"])
def test_block_wise_labels_equal_scipy_on_the_whole_volume_up_to_the_numbering(tmp_path, connectivity):
    prob = _smooth_probabilities((4, 97, 131))
    path = _probability_store(tmp_path / "p.ome.zarr", prob, (2, 20, 30), (1, 1, 1))
    got = _in_parts(path, tmp_path / "s.ome.zarr", 1, connectivity)
    ref, n_ref = ndimage.label(prob > 0.5, structure(connectivity))
    pairs = np.unique(np.stack([ref.ravel(), got.ravel()], 1), axis=0)
    assert len(pairs) == len(np.unique(ref)) == len(np.unique(got))  # one-to-one
    assert got.max() == n_ref and stores.store_attrs(tmp_path / "s.ome.zarr")["cells"] == n_ref


@pytest.mark.parametrize("connectivity", ["2d", "3d"])
def test_ids_follow_first_appearance_over_blocks_and_do_not_depend_on_the_parts(tmp_path, connectivity):
    prob = _smooth_probabilities((4, 97, 131), seed=1)
    path = _probability_store(tmp_path / "p.ome.zarr", prob, (2, 20, 30), (1, 1, 1))
    one = _in_parts(path, tmp_path / "one.ome.zarr", 1, connectivity)
    three = _in_parts(path, tmp_path / "three.ome.zarr", 3, connectivity)
    assert np.array_equal(one, three)
    ref, _ = ndimage.label(prob > 0.5, structure(connectivity))
    expected = _ids_in_order_of_first_appearance_over_blocks(ref, BlockGrid(prob.shape, (2, 20, 30)))
    assert np.array_equal(one, expected)


def test_segment_writes_an_ome_zarr_label_image_with_the_voxel_size(tmp_path):
    prob = np.zeros((2, 40, 40), np.float32)
    prob[:, 5:15, 5:15] = 0.9
    prob[:, 20:30, 20:38] = 0.8
    path = _probability_store(tmp_path / "p.ome.zarr", prob, (1, 16, 16), (1, 2, 2), voxel_size=(30.0, 6.0, 6.0))
    out = tmp_path / "results" / "ds" / "s.ome.zarr"
    assert segment(path, out, settings=SegmentationSettings("threshold", 0.5, "2d"), pyramid_levels="auto") == 4
    group = zarr.open_group(str(out), mode="r")
    assert "image-label" in group.attrs["ome"] and stores.is_complete(out)
    assert stores.voxel_size(out) == (30.0, 6.0, 6.0)
    # napari-ome-zarr opens the group two levels up (NGFF's image/labels/<name>) and would create it: it exists
    assert zarr.open_group(str(tmp_path / "results"), mode="r").attrs["unet_pipeline"].startswith("results")
    levels = group.attrs["ome"]["multiscales"][0]["datasets"]  # mode-downsampled labels, centred like level 0
    assert len(levels) == 3 and levels[2]["coordinateTransformations"][1]["translation"] == [0.0, 9.0, 9.0]
    assert not any(name.startswith("_") for name in group.array_keys())  # the scratch array is gone


def test_a_damaged_probability_file_is_one_sentence_and_leaves_no_output(tmp_path):
    prob = _smooth_probabilities((2, 40, 40))
    path = _probability_store(tmp_path / "p.ome.zarr", prob, (1, 20, 20), (1, 1, 1))
    chunk = path / "0" / "c" / "1" / "1" / "0"
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    chunk.write_bytes(bytes(blob))
    from unet_pipeline.errors import InputError

    with pytest.raises(InputError, match=r"0/c/1/1/0: this file of .*p.ome.zarr is damaged"):
        segment(path, tmp_path / "s.ome.zarr", settings=SegmentationSettings("threshold", 0.5, "2d"),
                pyramid_levels="auto")
    assert not (tmp_path / "s.ome.zarr").exists()


@pytest.mark.parametrize("step", ["label", "relabel"])
def test_a_killed_segment_part_resumes_without_redoing_finished_blocks(tmp_path, step):
    import json
    import subprocess
    import sys

    from tests.conftest import kill_after_blocks

    prob = _smooth_probabilities((6, 64, 64), seed=3)
    path = _probability_store(tmp_path / "p.ome.zarr", prob, (1, 16, 16), (1, 1, 1))
    out = tmp_path / "s.ome.zarr"
    base = [sys.executable, "-m", "unet_pipeline", "segment", "--prob", str(path), "--out", str(out), "--threads", "1",
            "--method", "threshold", "--threshold", "0.5"]

    earlier = 96 if step == "relabel" else 0  # the label step's records, already in the store

    def run(which, *extra, kill=False):
        args = base + ["--step", which, *extra, "--summary", str(tmp_path / f"{which}.json")]
        return kill_after_blocks(args, tmp_path / ".s.ome.zarr.partial-*", earlier + 20) if kill else \
            subprocess.run(args, check=True)

    if step == "relabel":
        run("label", "--part", "0/1")
        run("join")
    before = run(step, "--part", "0/1", kill=True) - earlier
    assert 20 <= before < 96
    run(step, "--part", "0/1")
    summary = json.loads((tmp_path / f"{step}.json").read_text())
    assert summary["blocks_skipped"] == before and summary["blocks_computed"] == 96 - before
    if step == "label":
        run("join")
        run("relabel", "--part", "0/1")
    subprocess.run([sys.executable, "-m", "unet_pipeline", "finish", "--from", str(tmp_path / "relabel.json")],
                   check=True)
    ref, n = ndimage.label(prob > 0.5, structure("2d"))
    got = stores.open_image(out)[...]
    assert got.max() == n and len(np.unique(np.stack([ref.ravel(), got.ravel()], 1), axis=0)) == n + 1


def _same_cells(a: np.ndarray, b: np.ndarray) -> bool:
    """The same partition into cells and the same membrane pixels, whatever the numbering."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0)
    return np.array_equal(a == 0, b == 0) and len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("parts", [1, 3])
def test_block_wise_watershed_equals_the_whole_volume_watershed(tmp_path, parts):
    # Cells larger than the first halo reach across several blocks: the halo must grow until each
    # region is whole, and the join must recognise a cell in every block it crosses.
    rng = np.random.default_rng(7)
    prob = ndimage.gaussian_filter(rng.random((3, 200, 260)), (0, 6, 6))
    prob = ((prob - prob.min()) / (prob.max() - prob.min())).astype(np.float32)
    settings = SegmentationSettings("watershed", 0.45, "2d", 0.6, 10)
    whole = label_image(prob, settings)
    assert whole.max() > 30
    path = _probability_store(tmp_path / "p.ome.zarr", prob, (1, 16, 16), (1, 2, 2))  # blocks of 32^2
    got = _in_parts(path, tmp_path / f"s{parts}.ome.zarr", parts, settings=settings)
    assert _same_cells(got, whole)
    threshold = label_image(prob, SegmentationSettings("threshold", 0.45, "2d"))
    assert got.max() > threshold.max()  # the seeds split cells the threshold merged


def test_watershed_keeps_two_cells_apart_where_a_gap_in_the_membrane_merges_them():
    prob = np.full((1, 40, 60), 0.05, np.float32)
    prob[0, 5:35, 5:28] = 0.95   # cell A
    prob[0, 5:35, 32:55] = 0.95  # cell B
    prob[0, 5:35, 28:32] = 0.1   # membrane between them...
    prob[0, 18:22, 28:32] = 0.6  # ...with a gap
    assert label_image(prob, SegmentationSettings("threshold", 0.5, "2d")).max() == 1
    cells = label_image(prob, SegmentationSettings("watershed", 0.5, "2d", 0.9, 20))
    assert cells.max() == 2 and cells[0, 20, 10] != cells[0, 20, 50]
    assert (cells[0, 18:22, 28:32] == 0).any()  # a line of membrane where they meet


def test_watershed_needs_2d_and_sensible_seeds():
    from unet_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="within slices"):
        SegmentationSettings("watershed", 0.5, "3d", 0.8, 10)
    with pytest.raises(ConfigError, match="seed_threshold must lie in"):
        SegmentationSettings("watershed", 0.5, "2d", 0.3, 10)


def test_the_watershed_halo_stops_at_its_bound_so_a_job_never_reads_the_whole_slice():
    """A mask that is one component over the whole slice would pull the whole slice into every block."""
    from unet_pipeline.geometry import Box
    from unet_pipeline.labelling import label_block

    rng = np.random.default_rng(3)
    prob = 0.6 + 0.4 * ndimage.gaussian_filter(rng.random((1, 600, 600)), (0, 8, 8))  # all above the threshold
    prob = (prob - prob.min()) / (prob.max() - prob.min()) * 0.4 + 0.55
    block = Box((0, 256, 256), (1, 320, 320))
    shapes = []

    def read(box):
        shapes.append(box.shape)
        return prob[box.slices]

    bounded = SegmentationSettings("watershed", 0.5, "2d", 0.8, 5, max_halo_px=128)
    labels, keys, cut = label_block(read, block, prob.shape, bounded)
    assert max(s[1] for s in shapes) == 64 + 2 * 128 and max(s[2] for s in shapes) == 64 + 2 * 128
    assert cut == 1 and labels.shape == (1, 64, 64) and (labels > 0).mean() > 0.9
    shapes.clear()
    unbounded = SegmentationSettings("watershed", 0.5, "2d", 0.8, 5, max_halo_px=1024)
    assert label_block(read, block, prob.shape, unbounded)[2] == 0
    assert shapes[-1] == (1, 600, 600)  # without a bound: the whole slice


def test_a_label_job_warns_once_naming_how_many_blocks_reached_the_halo_bound(tmp_path, caplog):
    # One mask component over the whole slice: every block's tile is cut at the bound. A terabyte has tens
    # of thousands of tiles, so the job says it once, with the count, not once per tile.
    rng = np.random.default_rng(3)
    prob = ndimage.gaussian_filter(rng.random((1, 600, 600)), (0, 8, 8))
    prob = ((prob - prob.min()) / (prob.max() - prob.min()) * 0.4 + 0.55).astype(np.float32)  # all above 0.5
    path = _probability_store(tmp_path / "p.ome.zarr", prob, (1, 100, 100), (1, 2, 2))  # 3 x 3 blocks
    settings = SegmentationSettings("watershed", 0.5, "2d", 0.8, 5, max_halo_px=128)
    with caplog.at_level("DEBUG"):
        summary = label_part(path, tmp_path / "s.ome.zarr", Part(0, 1), settings=settings, pyramid_levels="auto",
                             threads=2)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "halo" in r.getMessage()]
    assert len(warned) == 1 and "in 9 of the 9 blocks" in warned[0] and "z 0-1, y 0-200, x 0-200" in warned[0]
    assert summary.extra["blocks_beyond_halo"] == 9


def test_a_watershed_block_worked_in_small_tiles_equals_it_in_one_tile(monkeypatch):
    # The tiles of a block read their own halos; the keys are the volume's, so the block's labels must not
    # depend on the tile size (including tiles cut at the block's far edges and a block not at the origin).
    from unet_pipeline import labelling
    from unet_pipeline.geometry import Box

    rng = np.random.default_rng(3)
    prob = ndimage.gaussian_filter(rng.random((2, 150, 170)), (0, 5, 5))
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    settings = SegmentationSettings("watershed", 0.45, "2d", 0.6, 10, max_halo_px=512)  # beyond the volume
    block = Box((0, 20, 30), (2, 130, 150))

    def read(box):
        return prob[box.slices]

    one = labelling.label_block(read, block, prob.shape, settings)
    monkeypatch.setattr(labelling, "WATERSHED_TILE_PX", 25)  # 5 x 5 tiles, the last row and column cut
    assert len(labelling._tiles(block, 25)) == 25
    tiles = labelling._tiles(block, 25)
    covered = np.zeros(block.shape, int)
    for tile in tiles:
        covered[tile.relative_to(block.start).slices] += 1
    assert (covered == 1).all()  # the tiles cover the block exactly once
    small = labelling.label_block(read, block, prob.shape, settings)
    assert one[0].max() > 10
    assert np.array_equal(one[0], small[0]) and np.array_equal(one[1], small[1])
