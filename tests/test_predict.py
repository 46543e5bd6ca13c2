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
from unet_pipeline.checkpoint import save_checkpoint
from unet_pipeline.errors import ConfigError, InputError
from unet_pipeline.model import UNet, UNetConfig
from unet_pipeline.predict import CompletionLog, Predictor, gather, load_predictor, predict_volume
from unet_pipeline.preprocess import preprocess

MODEL = UNetConfig(base_channels=4, depth=3, dropout=0.0)


def _checkpoint(path, cfg=MODEL):
    torch.manual_seed(0)
    save_checkpoint(path, {"model": UNet(cfg).state_dict(), "model_config": cfg.to_dict()})
    return path


def _raw_store(tmp_path, shape, seed=0):
    import tifffile

    data = (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", data, photometric="minisblack")
    preprocess(tmp_path / "raw.tif", tmp_path / "raw.ome.zarr", chunks=(1, 256, 256))
    return tmp_path / "raw.ome.zarr", data


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
    # One pass per slice: the whole slice mirror-padded by the context margin.
    model = predictor.model
    m = MODEL.context_margin
    whole = []
    for z in range(3):
        padded = np.pad(norm[z], m, mode="reflect")
        # A valid output must be 4 + 8k here; compute a bit more and crop.
        need_y = next(s for s in range(517, 700) if MODEL.is_valid_output_size(s))
        need_x = next(s for s in range(1033, 1200) if MODEL.is_valid_output_size(s))
        padded = np.pad(norm[z], ((m, m + need_y - 517), (m, m + need_x - 1033)), mode="reflect")
        with torch.inference_mode():
            logits = model(torch.from_numpy(padded)[None, None])
        whole.append(torch.softmax(logits, 1)[0, 1, :517, :1033].numpy())
    assert np.abs(chunked - np.stack(whole)).max() < 1e-5


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
    with pytest.raises(InputError, match="not predicted yet"):
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
