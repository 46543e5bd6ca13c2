"""Overlap-tile prediction: exact against whole-slice inference, resumable, split into parts that fill one store."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from unet_pipeline import probability, stores
from unet_pipeline.blockwise import PartialStore
from unet_pipeline.errors import ConfigError, InputError
from unet_pipeline.finish import finish_store
from unet_pipeline.geometry import Part
from unet_pipeline.inference import Predictor, load_predictor
from unet_pipeline.model import UNet, UNetConfig
from unet_pipeline.normalise import Normaliser
from unet_pipeline.predict import predict_part
from tests.conftest import kill_after_blocks, random_checkpoint, raw_store, whole_slice_probability

MODEL = UNetConfig(base_channels=4, depth=3, dropout=0.0)


def _checkpoint(path, cfg=MODEL):
    return random_checkpoint(path, cfg)


def _raw_store(tmp_path, shape, seed=0):
    return raw_store(tmp_path, shape, seed)


def _part(predictor, raw, out, ckpt, part=Part(0, 1), chunks=(1, 512, 512), chunks_per_file=(1, 8, 8),
          out_dtype="uint8", tta="none", precision="fp32", writers=2):
    return predict_part(predictor, raw, out, ckpt, part, chunks=chunks, chunks_per_file=chunks_per_file,
                        out_dtype=out_dtype, tta=tta, precision=precision, pyramid_levels="auto", writers=writers)


def _predict(predictor, raw, out, ckpt, parts=1, **kw):
    """Every part, then the finishing step, as the workflow's jobs do; returns the summaries."""
    summaries = [_part(predictor, raw, out, ckpt, Part(i, parts), **kw) for i in range(parts)]
    finish_store(PartialStore(out, summaries[0].signature), 1, 2)
    return summaries


def _read(path):
    image = stores.open_image(path)
    return probability.decode(image[...], image.attrs[probability.SCALE_KEY])


def test_chunked_prediction_equals_whole_slice_prediction(tmp_path):
    raw_path, data = _raw_store(tmp_path, (3, 517, 1033))
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = load_predictor(ckpt, "cpu", "fp32", "none", tile_size=116)
    _predict(predictor, raw_path, tmp_path / "p.ome.zarr", ckpt, chunks=(2, 200, 300), chunks_per_file=(1, 1, 1),
             out_dtype="float32")
    chunked = _read(tmp_path / "p.ome.zarr")
    norm = Normaliser.from_attrs(stores.store_attrs(raw_path))(data)
    assert np.abs(chunked - whole_slice_probability(predictor.model, norm)).max() < 1e-5


def test_test_time_augmentation_is_invariant_for_symmetric_input(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    p = load_predictor(ckpt, "cpu", "fp32", "d4", tile_size=36)
    image = np.zeros((1, 36, 36), np.float32)  # one tile: flips keep the pooling grid
    image[:, 8:28, 8:28] = 1
    prob = p.predict_image(image)[0]
    assert np.allclose(prob, prob.T, atol=1e-5) and np.allclose(prob, prob[::-1], atol=1e-5)


def test_parts_fill_one_store_and_finishing_checks_completion(tmp_path):
    raw_path, _ = _raw_store(tmp_path, (3, 70, 90))
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = load_predictor(ckpt, "cpu", "fp32", "none", tile_size=36)
    out = tmp_path / "p.ome.zarr"
    kw = dict(chunks=(1, 40, 40), chunks_per_file=(1, 1, 1))
    first = _part(predictor, raw_path, out, ckpt, Part(0, 2), **kw)
    with pytest.raises(InputError, match=r"blocks of '0' are not written yet; rerun the jobs that write"):
        finish_store(PartialStore(out, first.signature), 1, 2)
    assert not out.exists() and not stores.is_complete(out)
    second = _part(predictor, raw_path, out, ckpt, Part(1, 2), **kw)
    assert second.blocks_computed == second.blocks_total and second.signature == first.signature
    finish_store(PartialStore(out, first.signature), 1, 2)
    assert stores.is_complete(out) and "1" in zarr.open_group(str(out), mode="r")
    assert not list(tmp_path.glob(".p.ome.zarr*"))  # the hidden store was renamed into place


def test_a_killed_part_resumes_only_unfinished_blocks(tmp_path):
    raw_path, _ = _raw_store(tmp_path, (4, 150, 150))
    ckpt = _checkpoint(tmp_path / "m.pt", UNetConfig(base_channels=16, depth=3, dropout=0.0))
    args = [sys.executable, "-m", "unet_pipeline", "predict", "--raw", str(raw_path), "--checkpoint", str(ckpt),
            "--tile-size", "36", "--chunks", "1,50,50", "--dtype", "float32", "--precision", "fp32",
            "--device", "cpu", "--writers", "1", "--threads", "1", "--no-progress", "--chunks-per-file", "1,1,1"]
    reference = tmp_path / "ref.ome.zarr"
    subprocess.run(args + ["--out", str(reference)], check=True)
    out = tmp_path / "p.ome.zarr"
    part = ["--part", "0/1", "--summary", str(tmp_path / "summary.json")]
    done_before = kill_after_blocks(args + ["--out", str(out)] + part, tmp_path / ".p.ome.zarr.partial-*", 5)
    assert 5 <= done_before < 36
    subprocess.run(args + ["--out", str(out)] + part, check=True)
    stats = json.loads((tmp_path / "summary.json").read_text())
    assert stats["blocks_skipped"] == done_before and stats["blocks_computed"] == 36 - done_before
    subprocess.run([sys.executable, "-m", "unet_pipeline", "finish", "--from", str(tmp_path / "summary.json")],
                   check=True)
    assert np.array_equal(_read(out), _read(reference))


def test_a_checkpoint_of_another_model_is_refused_and_another_setting_never_continues_a_store(tmp_path):
    from unet_pipeline.checkpoint import model_from_checkpoint

    ckpt = _checkpoint(tmp_path / "m.pt")
    with pytest.raises(InputError, match="different model config.*depth=3"):
        model_from_checkpoint(ckpt, expected=UNetConfig(base_channels=4, depth=4, dropout=0.0))
    raw_path, _ = _raw_store(tmp_path, (2, 40, 40))
    predictor = load_predictor(ckpt, "cpu", "fp32", "none", tile_size=36)
    out = tmp_path / "p.ome.zarr"
    a = _part(predictor, raw_path, out, ckpt, chunks=(1, 40, 40))
    b = _part(predictor, raw_path, out, ckpt, chunks=(1, 20, 20))  # another layout: its own store, from scratch
    assert a.signature != b.signature and b.blocks_skipped == 0 and len(list(tmp_path.glob(".p.ome.zarr.partial-*"))) == 2
    finish_store(PartialStore(out, b.signature), 1, 2)
    assert not list(tmp_path.glob(".p.ome.zarr.partial-*"))  # the other run's work is cleared
    # chunks larger than a small stack are clipped to it (not an error after training)
    small = _part(predictor, raw_path, tmp_path / "q.ome.zarr", ckpt, chunks=(1, 80, 80))
    assert small.signature["chunks"] == [1, 40, 40]


def test_invalid_tile_size_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="nearest valid"):
        Predictor(UNet(MODEL), torch.device("cpu"), tile_size=37)


def test_input_that_is_not_3d_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    group = zarr.open_group(str(tmp_path / "flat.ome.zarr"), mode="w")
    group.create_array("0", shape=(40, 40), dtype="u1")
    stores.mark_complete(tmp_path / "flat.ome.zarr", {"normalisation": {"low": 0, "high": 255}})
    predictor = load_predictor(ckpt, "cpu", "fp32", "none", tile_size=36)
    with pytest.raises(InputError, match="expected a 3D"):
        _part(predictor, tmp_path / "flat.ome.zarr", tmp_path / "p", ckpt)


def test_cli_refuses_a_checkpoint_of_another_model(tmp_path):
    raw_path, _ = _raw_store(tmp_path, (1, 40, 40))
    ckpt = _checkpoint(tmp_path / "m.pt")
    r = subprocess.run([sys.executable, "-m", "unet_pipeline", "predict", "--raw", str(raw_path), "--checkpoint",
                        str(ckpt), "--model", '{"base_channels": 8, "depth": 3, "dropout": 0.0}', "--out",
                        str(tmp_path / "p"), "--tile-size", "36"], capture_output=True, text=True)
    assert r.returncode == 2 and "base_channels=4 (config says 8)" in r.stderr


def _pass_through_expected(norm: np.ndarray) -> np.ndarray:
    """What PassThroughNet predicts: sigmoid(c[y, x] - c[y, x - 1]), x - 1 mirrored at the border."""
    left = np.concatenate([norm[:, :, 1:2], norm[:, :, :-1]], axis=2)
    return 1.0 / (1.0 + np.exp(-(norm.astype(np.float64) - left)))


@pytest.mark.parametrize("strip_px", [16384, 128])  # whole rows, or one block column per strip
def test_every_output_voxel_comes_from_its_own_input_and_input_is_read_once(tmp_path, monkeypatch, strip_px):
    from unet_pipeline import predict
    from unet_pipeline.inference import PassThroughNet

    monkeypatch.setattr(predict, "STRIP_WIDTH_PX", strip_px)

    raw_path, data = _raw_store(tmp_path, (3, 301, 389))  # odd sizes: partial edge chunks and shards
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = Predictor(PassThroughNet(MODEL), torch.device("cpu"), tile_size=52, batch_size=3)
    out = tmp_path / "p.ome.zarr"
    (stats,) = _predict(predictor, raw_path, out, ckpt, chunks=(1, 64, 64), out_dtype="float32",
                        chunks_per_file=(1, 2, 2))
    assert stats.blocks_computed == stats.blocks_total == 3 * 3 * 4
    # Input blocks of 256^2: each is decoded once, although strips of 128 rows need 2 x 20 rows of context.
    assert stats.extra["input_voxels_read"] == data.size
    norm = Normaliser.from_attrs(stores.store_attrs(raw_path))(data)
    got = _read(out)
    assert np.abs(got - _pass_through_expected(norm)).max() < 1e-6


@pytest.mark.parametrize("raw_dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("out_dtype", ["float32", "uint8"])
def test_the_accelerators_data_path_gives_the_cpu_paths_result(tmp_path, monkeypatch, raw_dtype, out_dtype):
    # The CUDA path uploads raw values in their stored type, normalises them on the device and encodes
    # blocks there; run that arithmetic on the CPU (DEVICE_SIDE) and compare with the CPU path.
    from unet_pipeline import predict
    from unet_pipeline.inference import PassThroughNet

    raw_path, data = raw_store(tmp_path, (2, 150, 170), seed=3, dtype=raw_dtype, chunks=(1, 64, 64))
    assert stores.open_image(raw_path).dtype == raw_dtype
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = Predictor(PassThroughNet(MODEL), torch.device("cpu"), tile_size=52, batch_size=2)
    results = {}
    for device_side in (False, True):
        monkeypatch.setattr(predict._Pipeline, "DEVICE_SIDE", device_side)
        out = tmp_path / f"p-{device_side}.ome.zarr"
        _predict(predictor, raw_path, out, ckpt, chunks=(1, 64, 64), out_dtype=out_dtype, chunks_per_file=(1, 2, 2))
        results[device_side] = stores.open_image(out)[...]
    expected = _pass_through_expected(Normaliser.from_attrs(stores.store_attrs(raw_path))(data))
    if out_dtype == "uint8":
        assert np.abs(results[True].astype(int) - probability.encode(expected).astype(int)).max() <= 1
    else:
        assert np.abs(results[True] - expected).max() < 1e-6
    assert np.abs(results[True].astype(np.float64) - results[False]).max() <= (1 if out_dtype == "uint8" else 1e-6)


def test_unsigned_raw_values_keep_their_whole_range_on_the_way_to_float():
    from unet_pipeline.predict import _widen_unsigned

    for dtype, top in ((np.uint8, 255), (np.uint16, 65535), (np.uint32, 4294967295)):
        values = np.array([0, 1, top // 2, top - 1, top], dtype=dtype)
        got = _widen_unsigned(torch.from_numpy(values))
        assert got.dtype == torch.float32
        assert np.array_equal(got.numpy(), values.astype(np.float32)), dtype


def test_parts_split_strips_and_write_one_file_per_block(tmp_path):
    from unet_pipeline.inference import PassThroughNet

    raw_path, _ = _raw_store(tmp_path, (2, 200, 150))
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = Predictor(PassThroughNet(MODEL), torch.device("cpu"), tile_size=52)
    out = tmp_path / "p.ome.zarr"
    kw = dict(chunks=(1, 50, 50), out_dtype="uint8", chunks_per_file=(1, 2, 4))
    summaries = [_part(predictor, raw_path, out, ckpt, Part(i, 3), **kw) for i in range(3)]
    # 2 slices x 2 block rows = 4 strips of one 100 x 150 block each, split 1 / 1 / 2.
    assert [s.blocks_total for s in summaries] == [1, 1, 2]
    partial = PartialStore(out, summaries[0].signature)
    blocks = sorted(p for p in (partial.path / "0" / "c").rglob("*") if p.is_file())
    assert len(blocks) == 4 and len(partial.finished("0")) == 4
    finish_store(partial, 1, 2)
    assert not (out / "unet_work").exists()


def test_an_unfinished_store_is_hidden_and_the_finished_one_carries_the_voxel_size(tmp_path):
    raw_path, _ = raw_store(tmp_path, (2, 60, 60), chunks=(1, 64, 64), voxel_size=(40.0, 5.0, 5.0))
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = load_predictor(ckpt, "cpu", "fp32", "none", tile_size=36)
    out = tmp_path / "p.ome.zarr"
    first = _part(predictor, raw_path, out, ckpt, Part(0, 2), chunks=(1, 15, 15), chunks_per_file=(1, 2, 2))
    assert not out.exists()  # napari / neuroglancer see no image yet: only a hidden partial store
    assert "ome" not in zarr.open_group(str(PartialStore(out, first.signature).path), mode="r").attrs
    _part(predictor, raw_path, out, ckpt, Part(1, 2), chunks=(1, 15, 15), chunks_per_file=(1, 2, 2))
    finish_store(PartialStore(out, first.signature), 1, 2)
    assert stores.voxel_size(out) == (40.0, 5.0, 5.0)
    datasets = zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]["datasets"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in datasets]
    assert scales == [[40.0, 5.0, 5.0], [40.0, 10.0, 10.0], [40.0, 20.0, 20.0]]
    assert datasets[1]["coordinateTransformations"][1] == {"type": "translation", "translation": [0.0, 2.5, 2.5]}


def test_compile_failure_falls_back_with_one_warning(monkeypatch, caplog):
    def broken_compile(model, **kw):
        def run(x):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = Predictor(UNet(MODEL), torch.device("cpu"), tile_size=36, batch_size=2)
    compiled = Predictor(UNet(MODEL), torch.device("cpu"), tile_size=36, batch_size=2, compile=True)
    compiled.model.load_state_dict(eager.model.state_dict())
    image = np.random.default_rng(0).random((2, 70, 70)).astype(np.float32)
    with caplog.at_level("WARNING"):
        got = compiled.predict_image(image)
        compiled.predict_image(image)
    assert [r.message for r in caplog.records if "torch.compile failed" in r.message].__len__() == 1
    assert np.allclose(got, eager.predict_image(image), atol=1e-6)


def test_tta_batched_equals_one_pass_per_transform():
    from unet_pipeline.inference import DIHEDRAL, _apply, _invert

    torch.manual_seed(1)
    predictor = Predictor(UNet(MODEL), torch.device("cpu"), transforms=DIHEDRAL, tile_size=36, batch_size=8)
    tiles = torch.rand(2, 36 + 2 * MODEL.context_margin, 36 + 2 * MODEL.context_margin)
    batched = predictor.probabilities(tiles)
    with torch.inference_mode():
        one_by_one = torch.stack([_invert(torch.softmax(predictor.model(_apply(tiles[:, None], k, f)), 1)[:, 1], k, f)
                                  for k, f in DIHEDRAL]).mean(0)
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_a_replaced_raw_stack_of_the_same_shape_is_never_reused(tmp_path):
    # Issue 12.1 through the package alone: preprocess A, predict; replace the raw store with stack B of the
    # same shape; nothing of A's prediction may be reused.
    raw_path, _ = _raw_store(tmp_path, (2, 70, 90), seed=1)
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = load_predictor(ckpt, "cpu", "fp32", "none", tile_size=36)
    out = tmp_path / "p.ome.zarr"
    kw = dict(chunks=(1, 40, 40), out_dtype="float32")
    (a,) = _predict(predictor, raw_path, out, ckpt, **kw)
    old = _read(out)
    _raw_store(tmp_path, (2, 70, 90), seed=2)  # stack B at the same path
    (b,) = _predict(predictor, raw_path, out, ckpt, **kw)
    assert a.signature["raw_fingerprint"] != b.signature["raw_fingerprint"] and b.blocks_skipped == 0
    _predict(predictor, raw_path, tmp_path / "fresh.ome.zarr", ckpt, **kw)
    new = _read(out)
    assert not np.array_equal(old, new)
    assert np.array_equal(new, _read(tmp_path / "fresh.ome.zarr"))


def test_predict_checks_the_training_config_stored_in_the_checkpoint(tmp_path, caplog):
    from unet_pipeline.checkpoint import check_training_config

    stored = {"model": MODEL.to_dict(), "train": {"steps": 6}, "weights": {"w0": 10}, "datasets": {}}
    state = {"config": stored}
    check_training_config("m.pt", state, stored)
    assert not caplog.records
    with caplog.at_level("WARNING"):
        check_training_config("m.pt", state, {**stored, "train": {"steps": 8}})
    assert "train.steps: 6 -> 8" in caplog.text
    with pytest.raises(InputError, match=r"m.pt: checkpoint was trained with another model config \(model.depth"):
        check_training_config("m.pt", state, {**stored, "model": {**MODEL.to_dict(), "depth": 2}})


def test_a_damaged_input_shard_stops_the_pipeline_with_the_file_named(tmp_path):
    from unet_pipeline.inference import PassThroughNet

    raw_path, _ = raw_store(tmp_path, (2, 150, 170), chunks=(1, 64, 64), chunks_per_file=(1, 2, 2))
    shard = raw_path / "0" / "c" / "1" / "1" / "0"
    blob = bytearray(shard.read_bytes())
    blob[30] ^= 0xFF
    shard.write_bytes(bytes(blob))
    predictor = Predictor(PassThroughNet(MODEL), torch.device("cpu"), 52)
    with pytest.raises(InputError, match=r"raw.ome.zarr/0/c/1/1/0: this file of .* is damaged"):
        _part(predictor, raw_path, tmp_path / "p.ome.zarr", _checkpoint(tmp_path / "m.pt"), chunks=(1, 64, 64),
              chunks_per_file=(1, 2, 2))


def test_a_full_disk_in_a_writer_thread_is_one_sentence_naming_the_store(tmp_path):
    raw_path, _ = raw_store(tmp_path, (2, 150, 170), chunks=(1, 64, 64))
    ckpt = _checkpoint(tmp_path / "m.pt")
    code = "\n".join([
        "import resource, sys",
        "resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))",  # files over 3 kB fail as on a full disk
        "from unet_pipeline.cli import main",
        "sys.exit(main(sys.argv[1:]))",
    ])
    run = subprocess.run([sys.executable, "-c", code, "predict", "--raw", str(raw_path), "--checkpoint", str(ckpt),
                          "--out", str(tmp_path / "p.ome.zarr"), "--tile-size", "36", "--chunks", "1,64,64",
                          "--dtype", "float32", "--device", "cpu", "--precision", "fp32", "--part", "0/1",
                          "--no-progress"], capture_output=True, text=True)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert lines[-1].startswith("unet-pipeline predict: error: ") and "p.ome.zarr" in lines[-1]
    assert "File too large" in lines[-1]


def test_raw_chunks_of_several_slices_give_the_same_prediction(tmp_path):
    from unet_pipeline.inference import PassThroughNet

    results = []
    for z_chunk in (1, 3):
        folder = tmp_path / f"z{z_chunk}"
        folder.mkdir()
        raw_path, data = raw_store(folder, (5, 100, 130), chunks=(z_chunk, 64, 64), chunks_per_file=(1, 1, 1))
        predictor = Predictor(PassThroughNet(MODEL), torch.device("cpu"), 52)
        (summary,) = _predict(predictor, raw_path, folder / "p.ome.zarr", _checkpoint(folder / "m.pt"),
                              chunks=(1, 64, 64), chunks_per_file=(1, 1, 1), out_dtype="float32")
        assert summary.extra["input_voxels_read"] == data.size  # each input chunk decoded once
        results.append(_read(folder / "p.ome.zarr"))
    assert np.array_equal(results[0], results[1])


def test_same_padding_predicts_close_to_a_whole_slice_pass(tmp_path):
    # With padded convolutions a tile is not translation-exact (zeros at its edges), so the halo keeps
    # the difference from a whole-slice pass small rather than nil.
    cfg = UNetConfig(base_channels=4, depth=3, dropout=0.0, padding="same", same_halo_px=32)
    raw_path, data = raw_store(tmp_path, (1, 150, 170), chunks=(1, 64, 64))
    ckpt = random_checkpoint(tmp_path / "m.pt", cfg)
    predictor = load_predictor(ckpt, "cpu", "fp32", "none", tile_size=64)
    _predict(predictor, raw_path, tmp_path / "p.ome.zarr", ckpt, chunks=(1, 64, 64), out_dtype="float32")
    got = _read(tmp_path / "p.ome.zarr")
    norm = Normaliser.from_attrs(stores.store_attrs(raw_path))(data)
    padded = np.pad(norm[0], ((32, 32 + 10), (32, 32 + 14)), mode="reflect")  # 160 x 184: multiples of 8
    with torch.inference_mode():
        whole = torch.softmax(predictor.model(torch.from_numpy(padded)[None, None]), 1)[0, 1, :150, :170].numpy()
    assert got.shape == (1, 150, 170) and np.abs(got[0] - whole).mean() < 0.02
