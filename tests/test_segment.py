import numpy as np
import pytest
import zarr
from scipy import ndimage

from unet_pipeline import io
from unet_pipeline.segment import label_chunked, segment, structure


def _same_partition(a, b):
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("connectivity", ["2d", "3d"])
def test_chunked_labels_equal_scipy_up_to_relabelling(connectivity):
    rng = np.random.default_rng(0)
    prob = ndimage.gaussian_filter(rng.random((4, 97, 131)), (0.7, 2, 2)).astype(np.float32)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    src = zarr.create_array(store=zarr.storage.MemoryStore(), shape=prob.shape, chunks=(1, 20, 30), dtype="f4")
    src[...] = prob
    out = zarr.create_array(store=zarr.storage.MemoryStore(), shape=prob.shape, chunks=(2, 20, 30), dtype="u4")
    count = label_chunked(src, out, 0.5, connectivity)
    ref, n_ref = ndimage.label(prob > 0.5, structure(connectivity))
    assert count == n_ref
    assert _same_partition(ref, out[...])
    assert out[...].max() == count  # consecutive ids


def test_segment_writes_an_ome_zarr_label_image(tmp_path):
    prob = np.zeros((2, 40, 40), np.float32)
    prob[:, 5:15, 5:15] = 0.9
    prob[:, 20:30, 20:38] = 0.8
    io.write_ome_image(tmp_path / "p.ome.zarr", prob, (1, 16, 16))
    assert segment(tmp_path / "p.ome.zarr", tmp_path / "s.ome.zarr") == 4
    group = zarr.open_group(str(tmp_path / "s.ome.zarr"), mode="r")
    assert "image-label" in group.attrs["ome"]
    assert io.is_complete(tmp_path / "s.ome.zarr")


def test_segmentation_of_a_sharded_map_matches_scipy_and_keeps_voxel_size(tmp_path):
    from scipy import ndimage

    from unet_pipeline import io
    from unet_pipeline.segment import segment

    rng = np.random.default_rng(5)
    prob = (ndimage.gaussian_filter(rng.random((2, 90, 130)), 3) > 0.5).astype(np.float32)
    path = tmp_path / "prob.ome.zarr"
    io.write_ome_image(path, prob, (1, 20, 20), voxel_size=(30.0, 6.0, 6.0))  # 8 x 8 chunks per file: shards
    assert zarr.open_group(str(path), mode="r")["0"].shards is not None
    segment(path, tmp_path / "seg.ome.zarr", workers=2)
    seg = io.open_ome_image(tmp_path / "seg.ome.zarr")[...]
    for z in range(2):
        ref, n = ndimage.label(prob[z] > 0.5)
        assert len(np.unique(seg[z][seg[z] > 0])) == n
        assert np.array_equal(seg[z] > 0, ref > 0)
    assert io.voxel_size(tmp_path / "seg.ome.zarr") == (30.0, 6.0, 6.0)
