"""Overlap-tile prediction: exact against whole-slice inference, resumable, sharded."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from unet_pipeline import io
from unet_pipeline.errors import ConfigError, InputError
from unet_pipeline.model import UNet, UNetConfig
from unet_pipeline.blockstore import CompletionLog
from unet_pipeline.inference import Predictor, load_predictor
from unet_pipeline.predict import gather, predict_volume
from unet_pipeline.preprocess import preprocess
from tests.conftest import random_checkpoint, raw_store, whole_slice_probability

MODEL = UNetConfig(base_channels=4, depth=3, dropout=0.0)


def _checkpoint(path, cfg=MODEL):
    return random_checkpoint(path, cfg)


def _raw_store(tmp_path, shape, seed=0):
    return raw_store(tmp_path, shape, seed)


def test_chunked_prediction_equals_whole_slice_prediction(tmp_path):
    raw_path, data = _raw_store(tmp_path, (3, 517, 1033))
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = load_predictor(ckpt, "cpu", "fp32", "none", tile_size=116)
    predict_volume(predictor, raw_path, tmp_path / "p.ome.zarr", ckpt, chunks=(2, 200, 300), out_dtype="float32",
                   progress=False, precision="fp32")
    gather(tmp_path / "p.ome.zarr")
    chunked = io.open_ome_image(tmp_path / "p.ome.zarr")[...]
    from unet_pipeline.preprocess import Normaliser

    norm = Normaliser.from_attrs(io.store_attrs(raw_path))(data)
    assert np.abs(chunked - whole_slice_probability(predictor.model, norm)).max() < 1e-5


def test_test_time_augmentation_is_invariant_for_symmetric_input(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    p = load_predictor(ckpt, "cpu", "fp32", "d4", tile_size=36)
    image = np.zeros((1, 36, 36), np.float32)  # one tile: flips keep the pooling grid
    image[:, 8:28, 8:28] = 1
    prob = p.predict_image(image)[0]
    assert np.allclose(prob, prob.T, atol=1e-5) and np.allclose(prob, prob[::-1], atol=1e-5)


def test_shards_fill_one_store_and_gather_checks_completion(tmp_path):
    raw_path, _ = _raw_store(tmp_path, (3, 70, 90))
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = load_predictor(ckpt, "cpu", "fp32", tile_size=36)
    out = tmp_path / "p.ome.zarr"
    kw = dict(chunks=(1, 40, 40), out_dtype="uint8", progress=False, precision="fp32")
    predict_volume(predictor, raw_path, out, ckpt, shard=(0, 2), **kw)
    with pytest.raises(InputError, match="not written yet"):
        gather(out)
    assert not io.is_complete(out)
    stats = predict_volume(predictor, raw_path, out, ckpt, shard=(1, 2), **kw)
    assert stats.blocks_computed == stats.blocks_total
    gather(out)
    assert io.is_complete(out) and "1" in zarr.open_group(str(out), mode="r")


def test_killed_run_resumes_only_unfinished_chunks(tmp_path):
    raw_path, _ = _raw_store(tmp_path, (4, 150, 150))
    ckpt = _checkpoint(tmp_path / "m.pt", UNetConfig(base_channels=16, depth=3, dropout=0.0))
    args = [sys.executable, "-m", "unet_pipeline.cli", "predict", "--raw", str(raw_path), "--checkpoint", str(ckpt),
            "--tile-size", "36", "--chunks", "1,50,50", "--dtype", "float32", "--precision", "fp32",
            "--device", "cpu", "--workers", "1", "--threads", "1", "--no-progress", "--chunks-per-file", "1,1,1"]
    reference = tmp_path / "ref.ome.zarr"
    subprocess.run(args + ["--out", str(reference)], check=True)
    out = tmp_path / "p.ome.zarr"
    proc = subprocess.Popen(args + ["--out", str(out)])
    deadline = time.time() + 120
    while time.time() < deadline:
        if out.exists() and len(CompletionLog.finished(out)) >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(CompletionLog.finished(out))
    assert 5 <= done_before < 36
    summary = tmp_path / "summary.json"
    subprocess.run(args + ["--out", str(out), "--summary", str(summary)], check=True)
    import json

    stats = json.loads(summary.read_text())
    assert stats["blocks_skipped"] == done_before and stats["blocks_computed"] == 36 - done_before
    assert np.array_equal(zarr.open_group(str(out))["0"][...], zarr.open_group(str(reference))["0"][...])


def test_mismatched_checkpoint_and_existing_output_are_refused(tmp_path):
    from unet_pipeline.checkpoint import model_from_checkpoint

    ckpt = _checkpoint(tmp_path / "m.pt")
    with pytest.raises(InputError, match="different model config.*depth=3"):
        model_from_checkpoint(ckpt, expected=UNetConfig(base_channels=4, depth=4, dropout=0.0))
    raw_path, _ = _raw_store(tmp_path, (2, 40, 40))
    predictor = load_predictor(ckpt, "cpu", "fp32", tile_size=36)
    out = tmp_path / "p.ome.zarr"
    predict_volume(predictor, raw_path, out, ckpt, chunks=(1, 40, 40), progress=False, precision="fp32")
    with pytest.raises(InputError, match="different prediction"):
        predict_volume(predictor, raw_path, out, ckpt, chunks=(1, 20, 20), progress=False, precision="fp32")
    with pytest.raises(ConfigError, match="larger than the volume"):
        predict_volume(predictor, raw_path, tmp_path / "q", ckpt, chunks=(1, 80, 80), progress=False)


def test_invalid_tile_size_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="nearest valid"):
        Predictor(UNet(MODEL), torch.device("cpu"), max_tile=37)


def test_input_that_is_not_3d_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    group = zarr.open_group(str(tmp_path / "flat.ome.zarr"), mode="w")
    group.create_array("0", shape=(40, 40), dtype="u1")
    io.mark_complete(tmp_path / "flat.ome.zarr", {"normalisation": {"low": 0, "high": 255}})
    predictor = load_predictor(ckpt, "cpu", "fp32", tile_size=36)
    with pytest.raises(InputError, match="expected a 3D"):
        predict_volume(predictor, tmp_path / "flat.ome.zarr", tmp_path / "p", ckpt, progress=False)


def test_cli_refuses_a_checkpoint_of_another_model(tmp_path):
    raw_path, _ = _raw_store(tmp_path, (1, 40, 40))
    ckpt = _checkpoint(tmp_path / "m.pt")
    r = subprocess.run([sys.executable, "-m", "unet_pipeline.cli", "predict", "--raw", str(raw_path), "--checkpoint",
                        str(ckpt), "--model", '{"base_channels": 8, "depth": 3, "dropout": 0.0}', "--out",
                        str(tmp_path / "p"), "--tile-size", "36"], capture_output=True, text=True)
    assert r.returncode == 2 and "base_channels=4 (config says 8)" in r.stderr


def _pass_through_expected(norm: np.ndarray) -> np.ndarray:
    """What PassThroughNet predicts: sigmoid(c[y, x] - c[y, x - 1]), x - 1 mirrored at the border."""
    left = np.concatenate([norm[:, :, 1:2], norm[:, :, :-1]], axis=2)
    return 1.0 / (1.0 + np.exp(-(norm.astype(np.float64) - left)))


@pytest.mark.parametrize("segment_px", [16384, 128])  # whole strips, or one block column per segment
def test_every_output_voxel_comes_from_its_own_input_and_input_is_read_once(tmp_path, monkeypatch, segment_px):
    from unet_pipeline import predict
    from unet_pipeline.inference import PassThroughNet
    from unet_pipeline.preprocess import Normaliser

    monkeypatch.setattr(predict, "SEGMENT_PX", segment_px)

    raw_path, data = _raw_store(tmp_path, (3, 301, 389))  # odd sizes: partial edge chunks and shards
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = Predictor(PassThroughNet(MODEL), torch.device("cpu"), max_tile=52, batch_size=3)
    out = tmp_path / "p.ome.zarr"
    stats = predict_volume(predictor, raw_path, out, ckpt, chunks=(1, 64, 64), out_dtype="float32",
                           chunks_per_file=(1, 2, 2), progress=False)
    assert stats.blocks_computed == stats.blocks_total == 3 * 3 * 4
    # Input chunks of 256^2: each is decoded once, although strips of 128 rows need 2 x 20 rows of context.
    assert stats.input_voxels_read == data.size
    gather(out)
    norm = Normaliser.from_attrs(io.store_attrs(raw_path))(data)
    got = io.open_ome_image(out)[...]
    assert np.abs(got - _pass_through_expected(norm)).max() < 1e-6


@pytest.mark.parametrize("raw_dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("out_dtype", ["float32", "uint8"])
def test_the_accelerators_data_path_gives_the_cpu_paths_result(tmp_path, monkeypatch, raw_dtype, out_dtype):
    # The CUDA path uploads raw values in their stored type, normalises them on the device and encodes
    # blocks there; run that arithmetic on the CPU (DEVICE_SIDE) and compare with the CPU path.
    from unet_pipeline import predict
    from unet_pipeline.inference import PassThroughNet
    from unet_pipeline.preprocess import Normaliser

    raw_path, data = raw_store(tmp_path, (2, 150, 170), seed=3, dtype=raw_dtype, chunks=(1, 64, 64))
    assert io.open_ome_image(raw_path).dtype == raw_dtype
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = Predictor(PassThroughNet(MODEL), torch.device("cpu"), max_tile=52, batch_size=2)
    results = {}
    for device_side in (False, True):
        monkeypatch.setattr(predict._Pipeline, "DEVICE_SIDE", device_side)
        out = tmp_path / f"p-{device_side}.ome.zarr"
        predict_volume(predictor, raw_path, out, ckpt, chunks=(1, 64, 64), out_dtype=out_dtype,
                       chunks_per_file=(1, 2, 2), progress=False)
        gather(out)
        results[device_side] = io.open_ome_image(out)[...]
    expected = _pass_through_expected(Normaliser.from_attrs(io.store_attrs(raw_path))(data))
    if out_dtype == "uint8":
        assert np.abs(results[True].astype(int) - np.rint(expected * 255)).max() <= 1
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


def test_jobs_split_strips_and_write_one_file_per_block(tmp_path):
    from unet_pipeline.inference import PassThroughNet

    raw_path, _ = _raw_store(tmp_path, (2, 200, 150))
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = Predictor(PassThroughNet(MODEL), torch.device("cpu"), max_tile=52)
    out = tmp_path / "p.ome.zarr"
    kw = dict(chunks=(1, 50, 50), out_dtype="uint8", chunks_per_file=(1, 2, 4), progress=False)
    first = predict_volume(predictor, raw_path, out, ckpt, shard=(0, 3), **kw)
    second = predict_volume(predictor, raw_path, out, ckpt, shard=(1, 3), **kw)
    third = predict_volume(predictor, raw_path, out, ckpt, shard=(2, 3), **kw)
    # 2 slices x 2 block rows = 4 strips of one 100 x 150 block each, split 1 / 1 / 2.
    assert [s.blocks_total for s in (first, second, third)] == [1, 1, 2]
    blocks = sorted(p.relative_to(out / "0" / "c") for p in (out / "0" / "c").rglob("*") if p.is_file())
    assert len(blocks) == 4 and len(CompletionLog.finished(out)) == 4
    gather(out)
    assert not (out / "unet_progress").exists()


def test_unfinished_store_is_not_an_ome_image_and_gather_carries_the_voxel_size(tmp_path):
    import tifffile

    data = (np.random.default_rng(0).random((2, 60, 60)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", data, photometric="minisblack")
    preprocess(tmp_path / "raw.tif", tmp_path / "raw.ome.zarr", chunks=(1, 64, 64), voxel_size=(40.0, 5.0, 5.0))
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = load_predictor(ckpt, "cpu", "fp32", tile_size=36)
    out = tmp_path / "p.ome.zarr"
    predict_volume(predictor, tmp_path / "raw.ome.zarr", out, ckpt, chunks=(1, 30, 30), shard=(0, 2), progress=False)
    assert "ome" not in zarr.open_group(str(out), mode="r").attrs  # napari / neuroglancer see no image yet
    predict_volume(predictor, tmp_path / "raw.ome.zarr", out, ckpt, chunks=(1, 30, 30), shard=(1, 2), progress=False)
    gather(out)
    assert io.voxel_size(out) == (40.0, 5.0, 5.0)
    scales = [d["coordinateTransformations"][0]["scale"]
              for d in zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]["datasets"]]
    assert scales == [[40.0, 5.0, 5.0], [40.0, 10.0, 10.0], [40.0, 20.0, 20.0]]


def test_compile_failure_falls_back_with_one_warning(monkeypatch, caplog):
    def broken_compile(model, **kw):
        def run(x):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = Predictor(UNet(MODEL), torch.device("cpu"), max_tile=36, batch_size=2)
    compiled = Predictor(UNet(MODEL), torch.device("cpu"), max_tile=36, batch_size=2, compile=True)
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
    predictor = Predictor(UNet(MODEL), torch.device("cpu"), transforms=DIHEDRAL, max_tile=36, batch_size=8)
    tiles = torch.rand(2, 36 + 2 * MODEL.context_margin, 36 + 2 * MODEL.context_margin)
    batched = predictor.probabilities(tiles)
    with torch.inference_mode():
        one_by_one = torch.stack([_invert(torch.softmax(predictor.model(_apply(tiles[:, None], k, f)), 1)[:, 1], k, f)
                                  for k, f in DIHEDRAL]).mean(0)
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_a_replaced_raw_stack_of_the_same_shape_is_never_reused(tmp_path):
    # Issue 12.1 through the package alone: preprocess A, predict, gather; replace the raw store with
    # stack B of the same shape; the old prediction must be refused, then replaced by B's.
    raw_path, _ = _raw_store(tmp_path, (2, 70, 90), seed=1)
    ckpt = _checkpoint(tmp_path / "m.pt")
    predictor = load_predictor(ckpt, "cpu", "fp32", tile_size=36)
    out = tmp_path / "p.ome.zarr"
    kw = dict(chunks=(1, 40, 40), out_dtype="float32", progress=False, precision="fp32")
    predict_volume(predictor, raw_path, out, ckpt, **kw)
    gather(out)
    old = io.open_ome_image(out)[...]
    _raw_store(tmp_path, (2, 70, 90), seed=2)  # stack B at the same path
    with pytest.raises(InputError, match="input_fingerprint"):
        predict_volume(predictor, raw_path, out, ckpt, **kw)
    predict_volume(predictor, raw_path, out, ckpt, overwrite=True, **kw)
    gather(out)
    predict_volume(predictor, raw_path, tmp_path / "fresh.ome.zarr", ckpt, **kw)
    gather(tmp_path / "fresh.ome.zarr")
    new = io.open_ome_image(out)[...]
    assert not np.array_equal(old, new)
    assert np.array_equal(new, io.open_ome_image(tmp_path / "fresh.ome.zarr")[...])


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
