"""Direct shard reading and writing agree with zarr's own, edge shards, gaps and damage included."""
import numpy as np
import pytest
import zarr

from unet_pipeline import io
from unet_pipeline.errors import InputError
from unet_pipeline.shards import ShardCodec


def _array(tmp_path, shape=(3, 150, 230), chunks=(1, 32, 48), per_file=(2, 2, 3), dtype="uint8"):
    data = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    arr = io.create_ome_image(tmp_path / "a.ome.zarr", shape, dtype, chunks, chunks_per_file=per_file, fill_value=7)
    arr[...] = data
    return arr, data, tmp_path / "a.ome.zarr" / "0"


@pytest.mark.parametrize("start, stop", [
    ((0, 0, 0), (3, 150, 230)),        # everything, partial edge shards in y and x
    ((1, 17, 0), (3, 101, 230)),       # rows across shard and chunk borders
    ((2, 140, 200), (3, 150, 230)),    # the last corner only
    ((0, 40, 50), (1, 41, 51)),        # a single voxel
])
def test_regions_read_directly_equal_zarrs_reading(tmp_path, start, stop):
    arr, data, directory = _array(tmp_path)
    codec = ShardCodec.for_array(arr)
    region = tuple(slice(a, b) for a, b in zip(start, stop))
    assert np.array_equal(codec.read(directory, start, stop), data[region])
    assert np.array_equal(codec.read(directory, start, stop), arr[region])


def test_missing_shards_and_chunks_read_as_the_fill_value(tmp_path):
    arr, data, directory = _array(tmp_path)
    codec = ShardCodec.for_array(arr)
    arr[1, 0:32, 0:48] = 7  # a chunk of fill values: zarr stores it as an empty index entry
    index = np.frombuffer((directory / "c" / "0" / "0" / "0").read_bytes()[-(16 * 12 + 4):-4], "<u8")
    assert (index == 2**64 - 1).sum() == 2  # offset and length of the one empty chunk
    assert np.array_equal(codec.read(directory, (0, 0, 0), (3, 150, 230)), arr[...])
    (directory / "c" / "0" / "0" / "0").unlink()  # a whole shard gone
    assert np.array_equal(codec.read(directory, (0, 0, 0), (2, 64, 144)), np.full((2, 64, 144), 7, np.uint8))


def test_a_damaged_shard_index_is_named(tmp_path):
    arr, _, directory = _array(tmp_path)
    path = directory / "c" / "0" / "1" / "1"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"c/0/1/1: shard index is damaged"):
        ShardCodec.for_array(arr).read(directory, (0, 0, 0), (2, 150, 230))


def test_other_layouts_are_left_to_zarr(tmp_path):
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(2, 8, 8), chunks=(1, 8, 8), dtype="u1")
    assert ShardCodec.for_array(plain) is None
    unsharded = io.create_ome_image(tmp_path / "u.ome.zarr", (2, 8, 8), "u1", (1, 8, 8), chunks_per_file=None)
    assert ShardCodec.for_array(unsharded) is None
