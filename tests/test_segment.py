"""Segmentation in blocks and parts: equal to scipy on the whole volume, the same ids however the work is split."""
import numpy as np
import pytest
import zarr
from scipy import ndimage

from unet_pipeline import stores
from unet_pipeline.blockwise import PartialStore
from unet_pipeline.finish import finish_store
from unet_pipeline.geometry import BlockGrid, Level, Part
from unet_pipeline.segment import join, label_part, relabel_part, segment, structure


def _probability_store(path, prob, chunks, chunks_per_file, voxel_size=(50.0, 4.0, 4.0)):
    """A finished float32 probability store of `prob` (as predict writes one)."""
    group = zarr.open_group(str(path), mode="w")
    stores.create_array(group, "0", prob.shape, "f4", chunks, chunks_per_file)
    with stores.default_codec_pipeline():  # writes every shard, empty ones too, as the pipeline's writer does
        zarr.open_array(str(path / "0"), mode="r+")[...] = prob
    stores.write_ngff(group, [Level(prob.shape, (1, 1, 1))], voxel_size, "cell_probability", True)
    stores.mark_complete(path, {"probability_scale": 1.0, "fingerprint": "test"})
    return path


def _smooth_probabilities(shape, seed=0):
    rng = np.random.default_rng(seed)
    prob = ndimage.gaussian_filter(rng.random(shape), (0.7, 2, 2)).astype(np.float32)
    return (prob - prob.min()) / (prob.max() - prob.min())


def _in_parts(prob_path, out, parts, connectivity="2d", threshold=0.5):
    """The workflow's jobs: label parts, one join, relabel parts, finish."""
    settings = dict(threshold=threshold, connectivity=connectivity, pyramid_levels="auto", threads=2)
    labelled = [label_part(prob_path, out, Part(i, parts), **settings) for i in range(parts)]
    store = PartialStore(out, labelled[0].signature)
    join(store, connectivity)
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
    assert segment(path, tmp_path / "s.ome.zarr", threshold=0.5, connectivity="2d", pyramid_levels="auto") == 4
    group = zarr.open_group(str(tmp_path / "s.ome.zarr"), mode="r")
    assert "image-label" in group.attrs["ome"] and stores.is_complete(tmp_path / "s.ome.zarr")
    assert stores.voxel_size(tmp_path / "s.ome.zarr") == (30.0, 6.0, 6.0)
    levels = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert len(levels) == 3 and all(len(d["coordinateTransformations"]) == 1 for d in levels)  # strided: no shift
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
        segment(path, tmp_path / "s.ome.zarr", threshold=0.5, connectivity="2d", pyramid_levels="auto")
    assert not (tmp_path / "s.ome.zarr").exists()
