"""Stores this package writes: outputs appear whole or not at all, and a damaged store is never read as data."""
import numpy as np
import pytest
import zarr

from unet_pipeline import atomic, stores
from unet_pipeline.errors import InputError
from unet_pipeline.geometry import Box
from tests.conftest import raw_store


def test_interrupted_write_leaves_nothing_that_looks_finished(tmp_path):
    target = tmp_path / "out.ome.zarr"
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "zarr.json").parent.mkdir(parents=True)
            (tmp / "zarr.json").write_text("{}")
            raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())


def test_a_rerun_removes_temporaries_left_by_a_killed_writer(tmp_path):
    target = tmp_path / "out.ome.zarr"
    debris = tmp_path / ".out.ome.zarr.tmp-deadbeef"
    (debris / "0").mkdir(parents=True)
    (tmp_path / ".log.csv.tmp-0badf00d").write_text("half")
    with atomic.atomic_directory(target) as tmp:
        tmp.mkdir()
    atomic.atomic_write_text(tmp_path / "log.csv", "step\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "out.ome.zarr"]


def test_an_unfinished_store_is_refused_by_readers(tmp_path):
    group = zarr.open_group(str(tmp_path / "half.ome.zarr"), mode="w")
    stores.create_array(group, "0", (2, 8, 8), "f4", (1, 8, 8), (1, 1, 1))
    with pytest.raises(InputError, match="incomplete"):
        stores.open_image(tmp_path / "half.ome.zarr")


def test_indexing_a_store_image_reads_like_numpy(tmp_path):
    path, data = raw_store(tmp_path, (3, 70, 90), chunks=(1, 32, 32), chunks_per_file=(1, 2, 2))
    image = stores.open_image(path)
    assert np.array_equal(image[1], data[1]) and np.array_equal(image[...], data)
    assert np.array_equal(image[0:2, 5:40, -20:], data[0:2, 5:40, -20:])
    assert np.array_equal(image.read(Box((1, 60, 80), (3, 70, 90))), data[1:3, 60:70, 80:90])


def test_a_deleted_shard_file_is_an_error_naming_it_not_zeros(tmp_path):
    path, _ = raw_store(tmp_path, (2, 70, 90), chunks=(1, 32, 32), chunks_per_file=(1, 2, 2))
    shard = path / "0" / "c" / "1" / "0" / "1"
    shard.unlink()
    image = stores.open_image(path)
    assert image[0].shape == (70, 90)  # slice 0 is whole
    with pytest.raises(InputError, match=r"0/c/1/0/1: this file of .*raw.ome.zarr is missing"):
        image[1]


@pytest.mark.parametrize("shard", ["0/0/0", "0/1/0"])  # an interior shard (read whole by zarrs), an edge one
@pytest.mark.parametrize("region", ["slice", "one chunk"])
def test_flipped_bytes_in_a_shard_are_an_error_naming_the_file(tmp_path, shard, region):
    path, _ = raw_store(tmp_path, (2, 150, 90), chunks=(1, 32, 32), chunks_per_file=(1, 2, 2))
    file = path / "0" / "c" / shard
    blob = bytearray(file.read_bytes())
    # the shard index at the file's end: (offset, size) per chunk, C order, then its CRC32C. zarrs writes the
    # chunks in whatever order its threads finish them, so the first chunk's bytes are found through it.
    offset, size = np.frombuffer(bytes(blob[-(4 * 16 + 4):-4]), "<u8").reshape(4, 2)[0]
    blob[offset + size // 2] ^= 0xFF  # inside the compressed bytes of the shard's first chunk, the one read
    file.write_bytes(bytes(blob))
    image = stores.open_image(path)
    y = 0 if shard == "0/0/0" else 64
    with pytest.raises(InputError, match=rf"0/c/{shard}: this file of .*raw.ome.zarr is damaged"):
        image[0] if region == "slice" else image[0, y:y + 32, 0:32]


def test_a_truncated_shard_is_an_error_naming_the_file(tmp_path):
    path, _ = raw_store(tmp_path, (1, 70, 90), chunks=(1, 32, 32), chunks_per_file=(1, 2, 2))
    shard = path / "0" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(InputError, match=r"0/c/0/0/0: this file of .*raw.ome.zarr is damaged"):
        stores.open_image(path)[0]
