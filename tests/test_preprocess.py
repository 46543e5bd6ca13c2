"""Preprocess: stacks of every kind into OME-Zarr, in parts that equal one job, refusing what cannot be right."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr

from unet_pipeline import stores
from unet_pipeline.blockwise import PartialStore
from unet_pipeline.errors import InputError
from unet_pipeline.finish import finish_store
from unet_pipeline.geometry import Part
from unet_pipeline.normalise import Normaliser
from unet_pipeline.preprocess import preprocess, raw_part
from tests.conftest import kill_after_blocks

LAYOUT = dict(chunks=(1, 32, 32), chunks_per_file=(1, 2, 2))


def test_preprocess_writes_ome_zarr_that_the_ome_zarr_reader_opens(tmp_path, tiff_pair):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    raw_path, labels_path = tiff_pair
    attrs = preprocess(raw_path, tmp_path / "raw.ome.zarr", labels_path, tmp_path / "labels.ome.zarr",
                       chunks=(1, 64, 64), chunks_per_file=(1, 1, 1), voxel_size_nm=(50, 4, 4))
    nodes = list(Reader(parse_url(str(tmp_path / "raw.ome.zarr")))())
    image = nodes[0].data[0]
    assert image.shape == (4, 96, 128) and len(nodes[0].data) == 2  # 96 x 128 -> 48 x 64 fits a 64^2 chunk
    assert np.array_equal(np.asarray(image), tifffile.imread(raw_path))
    norm = Normaliser.from_attrs(attrs)
    assert norm.low < norm.high
    labels = stores.open_image(tmp_path / "labels.ome.zarr")[...]
    assert set(np.unique(labels)) <= {0, 255}


def test_statistics_are_the_stacks_percentiles_whatever_the_split(tmp_path):
    data = np.random.default_rng(0).normal(100, 20, (6, 100, 130)).clip(0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", data, photometric="minisblack")
    results = []
    for parts in (1, 4):
        out = tmp_path / f"raw{parts}.ome.zarr"
        summaries = [raw_part(tmp_path / "raw.tif", out, Part(i, parts), voxel_size_nm=(50, 4, 4),
                              pyramid_levels="auto", threads=2, **LAYOUT) for i in range(parts)]
        finish_store(PartialStore(out, summaries[0].signature), 1, 2)
        results.append(stores.store_attrs(out))
    assert results[0]["normalisation"] == results[1]["normalisation"]
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    stats = results[0]["normalisation"]
    assert stats["mean"] == pytest.approx(data.mean(), rel=1e-9) and stats["std"] == pytest.approx(data.std(), 1e-9)
    low, high = np.percentile(data, [0.5, 99.5])
    assert abs(stats["low"] - low) <= 2 and abs(stats["high"] - high) <= 2  # a sample, not every voxel
    for level in ("0", "1", "2"):
        a = zarr.open_array(str(tmp_path / "raw1.ome.zarr" / level))[...]
        b = zarr.open_array(str(tmp_path / "raw4.ome.zarr" / level))[...]
        assert np.array_equal(a, b), level


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_are_refused_naming_the_file_and_slices(tmp_path, bad):
    data = np.random.default_rng(0).random((3, 40, 40)).astype(np.float32)
    data[2, 5, 7] = bad
    tifffile.imwrite(tmp_path / "float.tif", data, photometric="minisblack")
    with pytest.raises(InputError, match=r"float.tif \(slices 2-2, rows 0-39\): 1 voxels are NaN or infinite"):
        preprocess(tmp_path / "float.tif", tmp_path / "raw.ome.zarr", **LAYOUT)
    assert not (tmp_path / "raw.ome.zarr").exists()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match="nothere.tif: file not found"):
        preprocess(tmp_path / "nothere.tif", tmp_path / "out.ome.zarr", **LAYOUT)


def test_label_shape_mismatch_names_both_files(tmp_path, tiff_pair):
    raw_path, _ = tiff_pair
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((4, 10, 10), np.uint8), photometric="minisblack")
    with pytest.raises(InputError, match=r"small.tif: label stack shape .* does not match raw stack .*raw.tif"):
        preprocess(raw_path, None, tmp_path / "small.tif", tmp_path / "l.ome.zarr", **LAYOUT)
    assert not (tmp_path / "l.ome.zarr").exists()


def test_non_binary_labels_are_refused_and_leave_no_output(tmp_path, tiff_pair):
    raw_path, labels_path = tiff_pair
    bad = tifffile.imread(labels_path).copy()
    bad[0, 0, 0] = 17
    tifffile.imwrite(tmp_path / "bad.tif", bad, photometric="minisblack")
    with pytest.raises(InputError, match=r"bad.tif \(slice 0\): labels are not binary"):
        preprocess(raw_path, None, tmp_path / "bad.tif", tmp_path / "l.ome.zarr", **LAYOUT)
    assert not (tmp_path / "l.ome.zarr").exists()


def test_stores_record_a_content_fingerprint(tmp_path, tiff_pair):
    from unet_pipeline.provenance import store_fingerprint

    raw_path, labels_path = tiff_pair
    preprocess(raw_path, tmp_path / "a.ome.zarr", labels_path, tmp_path / "la.ome.zarr", **LAYOUT)
    data = tifffile.imread(raw_path)
    data[0, 0, 0] ^= 1
    tifffile.imwrite(tmp_path / "changed.tif", data, photometric="minisblack")
    preprocess(tmp_path / "changed.tif", tmp_path / "c.ome.zarr", **LAYOUT)
    assert store_fingerprint(tmp_path / "c.ome.zarr") != store_fingerprint(tmp_path / "a.ome.zarr")
    assert store_fingerprint(tmp_path / "la.ome.zarr") != store_fingerprint(tmp_path / "a.ome.zarr")
    preprocess(raw_path, tmp_path / "again.ome.zarr", **LAYOUT)
    assert store_fingerprint(tmp_path / "again.ome.zarr") == store_fingerprint(tmp_path / "a.ome.zarr")


def test_a_killed_part_resumes_without_redoing_finished_blocks(tmp_path):
    data = (np.random.default_rng(2).random((12, 64, 64)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", data, photometric="minisblack")
    out = tmp_path / "raw.ome.zarr"
    args = [sys.executable, "-m", "unet_pipeline", "preprocess", "--raw", str(tmp_path / "raw.tif"), "--out", str(out),
            "--chunks", "1,32,32", "--chunks-per-file", "1,1,1", "--voxel-size", "50,4,4", "--threads", "1",
            "--part", "0/1", "--summary", str(tmp_path / "summary.json")]
    before = kill_after_blocks(args, tmp_path / ".raw.ome.zarr.partial-*", 10)
    assert 10 <= before < 12 * 4
    subprocess.run(args, check=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["blocks_skipped"] == before and summary["blocks_computed"] == 12 * 4 - before
    subprocess.run([sys.executable, "-m", "unet_pipeline", "finish", "--from", str(tmp_path / "summary.json")],
                   check=True)
    assert np.array_equal(stores.open_image(out)[...], data)


def test_a_killed_pyramid_part_resumes_without_redoing_finished_blocks(tmp_path):
    data = (np.random.default_rng(4).random((10, 128, 128)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", data, photometric="minisblack")
    out = tmp_path / "raw.ome.zarr"
    summary = raw_part(tmp_path / "raw.tif", out, Part(0, 1), chunks=(1, 16, 16), chunks_per_file=(1, 1, 1),
                       voxel_size_nm=(50, 4, 4), pyramid_levels="auto", threads=2)
    summary.write(tmp_path / "level0.json")
    args = [sys.executable, "-m", "unet_pipeline", "pyramid", "--from", str(tmp_path / "level0.json"), "--level", "1",
            "--part", "0/1", "--threads", "1", "--summary", str(tmp_path / "level1.json")]
    level0 = 10 * 8 * 8
    before = kill_after_blocks(args, tmp_path / ".raw.ome.zarr.partial-*", level0 + 20) - level0
    assert 20 <= before < 10 * 4 * 4
    subprocess.run(args, check=True)
    done = json.loads((tmp_path / "level1.json").read_text())
    assert done["blocks_skipped"] == before and done["blocks_computed"] == 10 * 16 - before
    subprocess.run([sys.executable, "-m", "unet_pipeline", "finish", "--from", str(tmp_path / "level1.json"),
                    "--first-unbuilt-level", "2"], check=True)
    from unet_pipeline.pyramid import downsample

    expected = downsample(data, (1, 2, 2), "mean", np.uint8)
    assert np.array_equal(stores.open_image(out, "1")[...], expected)
