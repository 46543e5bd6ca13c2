"""Preprocess: inputs of every supported kind, bad inputs with clear errors, atomic outputs."""
import numpy as np
import pytest
import tifffile
import zarr

from unet_pipeline import io
from unet_pipeline.errors import InputError
from unet_pipeline.io import StackSource
from unet_pipeline.preprocess import Normaliser, preprocess


def test_multipage_tiff_folder_and_zarr_read_the_same(tmp_path, synthetic_stack):
    raw, _ = synthetic_stack
    tifffile.imwrite(tmp_path / "stack.tif", raw, photometric="minisblack")
    folder = tmp_path / "slices"
    folder.mkdir()
    for z, plane in enumerate(raw):
        tifffile.imwrite(folder / f"s{z:03d}.tif", plane)
    arr = zarr.create_array(str(tmp_path / "stack.zarr"), shape=raw.shape, chunks=(1, 64, 64), dtype=raw.dtype)
    arr[...] = raw
    for path in (tmp_path / "stack.tif", folder, tmp_path / "stack.zarr"):
        assert np.array_equal(io.read_stack(path), raw), path


def test_isbi_tiff_pages_are_read_one_by_one():
    from tests.conftest import ISBI, require_shared

    path = ISBI / "train-volume.tif"
    require_shared(path)
    source = StackSource(path)
    assert source.shape == (30, 512, 512)
    assert np.array_equal(source.slice(7), tifffile.imread(path, key=7))


def test_preprocess_writes_ome_zarr_that_the_ome_zarr_reader_opens(tmp_path, tiff_pair):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    raw_path, labels_path = tiff_pair
    attrs = preprocess(raw_path, tmp_path / "raw.ome.zarr", labels_path, tmp_path / "labels.ome.zarr",
                       chunks=(1, 64, 64), voxel_size=(50, 4, 4))
    nodes = list(Reader(parse_url(str(tmp_path / "raw.ome.zarr")))())
    image = nodes[0].data[0]
    assert image.shape == (4, 96, 128) and len(nodes[0].data) == 3
    assert np.array_equal(np.asarray(image), tifffile.imread(raw_path))
    norm = Normaliser.from_attrs(attrs)
    assert norm.low < norm.high
    labels = io.open_ome_image(tmp_path / "labels.ome.zarr")[...]
    assert set(np.unique(labels)) <= {0, 255}


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match="nothere.tif: file not found"):
        preprocess(tmp_path / "nothere.tif", tmp_path / "out.ome.zarr")


def test_label_shape_mismatch_names_both_files(tmp_path, tiff_pair):
    raw_path, _ = tiff_pair
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((4, 10, 10), np.uint8), photometric="minisblack")
    with pytest.raises(InputError, match=r"small.tif: label stack shape .* does not match raw stack .*raw.tif"):
        preprocess(raw_path, tmp_path / "r.ome.zarr", tmp_path / "small.tif", tmp_path / "l.ome.zarr")
    assert not (tmp_path / "r.ome.zarr").exists()


def test_non_binary_labels_are_refused_and_leave_no_output(tmp_path, tiff_pair):
    raw_path, labels_path = tiff_pair
    bad = tifffile.imread(labels_path).copy()
    bad[0, 0, 0] = 17
    tifffile.imwrite(tmp_path / "bad.tif", bad, photometric="minisblack")
    with pytest.raises(InputError, match=r"bad.tif \(slice 0\): labels are not binary"):
        preprocess(raw_path, None, tmp_path / "bad.tif", tmp_path / "l.ome.zarr")
    assert not (tmp_path / "l.ome.zarr").exists()
    assert not list(tmp_path.glob(".l.ome.zarr*"))


def test_non_image_file_is_named(tmp_path):
    (tmp_path / "notes.tif").write_text("this is not a TIFF")
    with pytest.raises(InputError, match="notes.tif: not a readable TIFF"):
        StackSource(tmp_path / "notes.tif")


def test_empty_stack_is_refused(tmp_path):
    arr = zarr.create_array(str(tmp_path / "empty.zarr"), shape=(0, 10, 10), chunks=(1, 10, 10), dtype="u1")
    assert arr.shape[0] == 0
    with pytest.raises(InputError, match="empty"):
        StackSource(tmp_path / "empty.zarr")
    (tmp_path / "nofiles").mkdir()
    with pytest.raises(InputError, match="holds no .tif"):
        StackSource(tmp_path / "nofiles")


def test_interrupted_write_leaves_nothing_that_looks_finished(tmp_path):
    target = tmp_path / "out.ome.zarr"
    with pytest.raises(RuntimeError):
        with io.atomic_directory(target) as tmp:
            io.create_ome_image(tmp, (2, 8, 8), "u1", (1, 8, 8))
            raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())


def test_incomplete_store_is_refused_by_readers(tmp_path):
    io.create_ome_image(tmp_path / "half.ome.zarr", (2, 8, 8), "f4", (1, 8, 8))
    with pytest.raises(InputError, match="incomplete"):
        io.open_ome_image(tmp_path / "half.ome.zarr")


def test_rgb_tiff_is_refused_with_one_sentence(tmp_path):
    rgb = np.zeros((2, 32, 40, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with pytest.raises(InputError, match=r"rgb.tif: is an RGB/multi-channel image .*convert it"):
        StackSource(tmp_path / "rgb.tif")
    (tmp_path / "slices").mkdir()
    tifffile.imwrite(tmp_path / "slices" / "000.tif", rgb[0], photometric="rgb")
    with pytest.raises(InputError, match=r"000.tif: is an RGB/multi-channel image"):
        StackSource(tmp_path / "slices")


def test_a_rerun_removes_temporaries_left_by_a_killed_writer(tmp_path):
    target = tmp_path / "out.ome.zarr"
    debris = tmp_path / ".out.ome.zarr.tmp-deadbeef"
    (debris / "0").mkdir(parents=True)
    (tmp_path / ".log.csv.tmp-0badf00d").write_text("half")
    with io.atomic_directory(target) as tmp:
        io.create_ome_image(tmp, (2, 8, 8), "u1", (1, 8, 8))
    io.atomic_write_text(tmp_path / "log.csv", "step\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "out.ome.zarr"]


def test_stores_record_a_content_fingerprint(tmp_path, tiff_pair):
    from unet_pipeline.provenance import store_fingerprint

    raw_path, labels_path = tiff_pair
    preprocess(raw_path, tmp_path / "a.ome.zarr", labels_path, tmp_path / "la.ome.zarr")
    preprocess(raw_path, tmp_path / "b.ome.zarr", chunks=(1, 32, 32))  # same content, other layout
    assert store_fingerprint(tmp_path / "a.ome.zarr") == store_fingerprint(tmp_path / "b.ome.zarr")
    data = tifffile.imread(raw_path)
    data[0, 0, 0] ^= 1
    tifffile.imwrite(tmp_path / "changed.tif", data, photometric="minisblack")
    preprocess(tmp_path / "changed.tif", tmp_path / "c.ome.zarr")
    assert store_fingerprint(tmp_path / "c.ome.zarr") != store_fingerprint(tmp_path / "a.ome.zarr")
    assert store_fingerprint(tmp_path / "la.ome.zarr") != store_fingerprint(tmp_path / "a.ome.zarr")
