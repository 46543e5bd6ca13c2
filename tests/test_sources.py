"""Reading what users bring: TIFF, TIFF folders, Zarr and OME-Zarr, damaged files, voxel sizes, signatures."""
import numpy as np
import pytest
import tifffile
import zarr

from unet_pipeline.errors import InputError
from unet_pipeline.geometry import Box
from unet_pipeline.sources import StackSource, header, read_stack, resolve_voxel_size, signature


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
        assert np.array_equal(read_stack(path), raw), path
        assert np.array_equal(StackSource(path).read(Box((1, 10, 20), (3, 50, 90))), raw[1:3, 10:50, 20:90]), path


def test_isbi_tiff_pages_are_read_one_by_one():
    from tests.conftest import ISBI, require_shared

    path = ISBI / "train-volume.tif"
    require_shared(path)
    source = StackSource(path)
    assert source.shape == (30, 512, 512)
    assert np.array_equal(source.slice(7), tifffile.imread(path, key=7))
    assert source.voxel_size_nm == (None, None, None)  # the ISBI file records no physical size


def test_non_image_file_is_named(tmp_path):
    (tmp_path / "notes.tif").write_text("this is not a TIFF")
    with pytest.raises(InputError, match="notes.tif: not a readable TIFF"):
        StackSource(tmp_path / "notes.tif")


def test_truncated_tiff_is_one_sentence(tmp_path):
    data = (np.random.default_rng(0).random((6, 64, 64)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "full.tif", data, photometric="minisblack")
    blob = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match=r"cut.tif.*(not a readable TIFF|damaged)"):
        read_stack(tmp_path / "cut.tif")


def test_tiff_damaged_inside_is_named_with_the_slices(tmp_path):
    data = (np.random.default_rng(1).random((3, 64, 64)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", data, photometric="minisblack", compression="zlib")
    with tifffile.TiffFile(tmp_path / "stack.tif") as tif:
        offset = tif.pages[1].dataoffsets[0]
    blob = bytearray((tmp_path / "stack.tif").read_bytes())
    blob[offset + 10:offset + 60] = b"\x00" * 50  # damage inside slice 1's compressed data
    (tmp_path / "stack.tif").write_bytes(bytes(blob))
    source = StackSource(tmp_path / "stack.tif")
    assert np.array_equal(source.slice(0), data[0])
    with pytest.raises(InputError, match=r"stack.tif \(slice 1\): cannot be read, the file is damaged"):
        source.slice(1)


def test_empty_stack_is_refused(tmp_path):
    zarr.create_array(str(tmp_path / "empty.zarr"), shape=(0, 10, 10), chunks=(1, 10, 10), dtype="u1")
    with pytest.raises(InputError, match="empty"):
        StackSource(tmp_path / "empty.zarr")
    (tmp_path / "nofiles").mkdir()
    with pytest.raises(InputError, match="holds no .tif"):
        StackSource(tmp_path / "nofiles")


def test_rgb_tiff_is_refused_with_one_sentence(tmp_path):
    rgb = np.zeros((2, 32, 40, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with pytest.raises(InputError, match=r"rgb.tif: is an RGB/multi-channel image .*convert it"):
        StackSource(tmp_path / "rgb.tif")
    (tmp_path / "slices").mkdir()
    tifffile.imwrite(tmp_path / "slices" / "000.tif", rgb[0], photometric="rgb")
    with pytest.raises(InputError, match=r"000.tif: is an RGB/multi-channel image"):
        StackSource(tmp_path / "slices")


# --------------------------------------------------------------------------- voxel sizes
def test_voxel_size_is_read_from_imagej_and_resolution_tags(tmp_path):
    data = np.zeros((3, 16, 16), np.uint8)
    tifffile.imwrite(tmp_path / "ij.tif", data, imagej=True, resolution=(1 / 0.008, 1 / 0.008),
                     metadata={"spacing": 0.05, "unit": "um", "axes": "ZYX"})
    assert header(tmp_path / "ij.tif").voxel_size_nm == pytest.approx((50.0, 8.0, 8.0))
    tifffile.imwrite(tmp_path / "cm.tif", data, photometric="minisblack", resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
    assert header(tmp_path / "cm.tif").voxel_size_nm[1:] == pytest.approx((10.0, 10.0))


def test_voxel_size_is_read_from_ome_tiff_and_ome_zarr(tmp_path):
    data = np.zeros((2, 16, 16), np.uint16)
    tifffile.imwrite(tmp_path / "a.ome.tif", data, metadata={"axes": "ZYX", "PhysicalSizeX": 0.006,
                                                             "PhysicalSizeY": 0.006, "PhysicalSizeZ": 0.03})
    assert header(tmp_path / "a.ome.tif").voxel_size_nm == pytest.approx((30.0, 6.0, 6.0))
    from unet_pipeline import stores
    from unet_pipeline.geometry import Level

    group = zarr.open_group(str(tmp_path / "b.ome.zarr"), mode="w")
    stores.create_array(group, "0", (2, 16, 16), "u1", (1, 16, 16), (1, 1, 1))
    stores.write_ngff(group, [Level((2, 16, 16), (1, 1, 1))], (40.0, 5.0, 5.0), "image")
    assert header(tmp_path / "b.ome.zarr").voxel_size_nm == (40.0, 5.0, 5.0)


def test_auto_voxel_size_falls_back_with_a_warning_and_a_configured_one_wins(tmp_path, caplog):
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((2, 8, 8), np.uint8), photometric="minisblack")
    with caplog.at_level("WARNING"):
        assert resolve_voxel_size(tmp_path / "plain.tif", "auto", "datasets.a.voxel_size_nm") == (1.0, 1.0, 1.0)
    assert "records no voxel size" in caplog.text and "datasets.a.voxel_size_nm" in caplog.text
    assert resolve_voxel_size(tmp_path / "plain.tif", [50, 4, 4], "k") == (50.0, 4.0, 4.0)


# --------------------------------------------------------------------------- signatures
def test_a_replaced_stack_changes_the_signature_even_with_the_same_shape_and_an_older_time(tmp_path):
    import os

    rng = np.random.default_rng(0)
    a = (rng.random((4, 64, 64)) * 255).astype(np.uint8)
    b = (rng.random((4, 64, 64)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", a, photometric="minisblack")
    before = signature(tmp_path / "raw.tif")
    tifffile.imwrite(tmp_path / "new.tif", b, photometric="minisblack")
    os.utime(tmp_path / "new.tif", (1, 1))  # `cp -p` of an old backup
    os.replace(tmp_path / "new.tif", tmp_path / "raw.tif")
    assert signature(tmp_path / "raw.tif") != before
    tifffile.imwrite(tmp_path / "raw.tif", a, photometric="minisblack")
    assert signature(tmp_path / "raw.tif") == before  # the same content signs the same
