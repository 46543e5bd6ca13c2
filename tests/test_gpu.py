"""The CUDA code paths, on a CUDA GPU (skipped elsewhere; `pytest -m gpu` on a GPU node).

The arithmetic of the accelerator's data path also runs on the CPU in
test_predict.py (`_Pipeline.DEVICE_SIDE`); these tests add what only a GPU
has: pinned memory, asynchronous copies, events and the rule that the
training loop never waits for the device between logging steps.
"""
import warnings

import numpy as np
import pytest
import torch

from unet_pipeline import stores
from unet_pipeline.geometry import tta_transforms
from unet_pipeline.inference import PassThroughNet, Predictor, load_predictor
from unet_pipeline.model import UNetConfig
from unet_pipeline.normalise import Normaliser
from unet_pipeline.train import SliceSet, TrainConfig, train
from tests.conftest import random_checkpoint, raw_store, whole_slice_probability
from tests.test_predict import _predict, _read

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = UNetConfig(base_channels=4, depth=3, dropout=0.0)
GPU = "cuda"


def _raw_store(tmp_path, dtype=np.uint8):
    return raw_store(tmp_path, (3, 300, 420), dtype=dtype, chunks=(1, 128, 128))[0]


@pytest.mark.parametrize("raw_dtype", [np.uint8, np.uint16])
def test_cuda_prediction_equals_the_whole_slice_pass_and_the_cpu(tmp_path, raw_dtype):
    raw_path = _raw_store(tmp_path, raw_dtype)
    ckpt = random_checkpoint(tmp_path / "m.pt", MODEL)
    results = {}
    for device in ("cpu", GPU):
        predictor = load_predictor(ckpt, device, "fp32", "none", tile_size=116)
        out = tmp_path / f"{len(results)}.ome.zarr"
        _predict(predictor, raw_path, out, ckpt, chunks=(1, 128, 128), out_dtype="float32", chunks_per_file=(1, 2, 2))
        results["cuda" if results else "cpu"] = _read(out)
    # The issue-10 guarantee on the GPU itself: chunked == one whole-slice pass to 1e-5 in fp32.
    normalised = Normaliser.from_attrs(stores.store_attrs(raw_path))(stores.open_image(raw_path)[...])
    model = load_predictor(ckpt, GPU, "fp32", "none", tile_size=116).model
    assert np.abs(results["cuda"] - whole_slice_probability(model, normalised, GPU)).max() < 1e-5
    # precision fp32 turns TF32 off (device.ieee_fp32): cuDNN and oneDNN differ only in the order of sums.
    assert np.abs(results["cuda"] - results["cpu"]).max() < 1e-4


def test_cuda_data_path_with_test_time_augmentation_and_uint8_output(tmp_path):
    raw_path = _raw_store(tmp_path)
    ckpt = random_checkpoint(tmp_path / "m.pt", MODEL)
    results = {}
    for device in ("cpu", GPU):
        predictor = Predictor(PassThroughNet(MODEL), torch.device(device), 52, None, tta_transforms("d4"), 16)
        out = tmp_path / f"{len(results)}.ome.zarr"
        _predict(predictor, raw_path, out, ckpt, chunks=(1, 128, 128), out_dtype="uint8", chunks_per_file=(1, 2, 2),
                 tta="d4", precision="auto")
        results["cuda" if results else "cpu"] = stores.open_image(out)[...].astype(int)
    assert np.abs(results["cuda"] - results["cpu"]).max() <= 1


def _synchronisations(tmp_path, steps: int) -> int:
    """Host-device synchronisations during `train()` of `steps` steps (the loss read once, at the end)."""
    rng = np.random.default_rng(0)
    data = SliceSet(rng.random((3, 256, 256), dtype=np.float32), (rng.random((3, 256, 256)) > 0.5).astype(np.uint8),
                    np.ones((3, 256, 256), np.float32))
    cfg = TrainConfig(steps=steps, tile_size=68, batch_size=2, device=GPU, precision="bf16", log_every=steps,
                      checkpoint_every=steps, validate_every=steps)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(MODEL, cfg, data, None, tmp_path / f"run-{steps}", progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_training_steps_never_wait_for_the_device(tmp_path):
    # The training loop itself (train(), not a copy of its step): the host waits for the GPU only at
    # set-up, at the loss read and at checkpoints, so the count does not grow with the steps.
    assert _synchronisations(tmp_path, 4) == _synchronisations(tmp_path, 12)
