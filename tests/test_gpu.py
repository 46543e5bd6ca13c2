"""The CUDA code paths, on a CUDA GPU (skipped elsewhere; `pytest -m gpu` on a GPU node).

The arithmetic of the accelerator's data path also runs on the CPU in
test_predict.py (`_Pipeline.DEVICE_SIDE`); these tests add what only a GPU
has: pinned memory, asynchronous copies, events and the rule that the
training loop never waits for the device between logging steps.
"""
import numpy as np
import pytest
import torch

from unet_pipeline import io
from unet_pipeline.augment import AugmentConfig, sample_tiles
from unet_pipeline.inference import PassThroughNet, Predictor, load_predictor, tta_transforms
from unet_pipeline.model import UNet, UNetConfig
from unet_pipeline.predict import gather, predict_volume
from unet_pipeline.preprocess import Normaliser
from unet_pipeline.train import weighted_cross_entropy
from tests.conftest import random_checkpoint, raw_store, whole_slice_probability

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
        predict_volume(predictor, raw_path, out, ckpt, chunks=(1, 128, 128), out_dtype="float32",
                       chunks_per_file=(1, 2, 2), progress=False, precision="fp32")
        gather(out)
        results["cuda" if results else "cpu"] = io.open_ome_image(out)[...]
    # The issue-10 guarantee on the GPU itself: chunked == one whole-slice pass to 1e-5 in fp32.
    normalised = Normaliser.from_attrs(io.store_attrs(raw_path))(io.open_ome_image(raw_path)[...])
    model = load_predictor(ckpt, GPU, "fp32", "none", tile_size=116).model
    assert np.abs(results["cuda"] - whole_slice_probability(model, normalised, GPU)).max() < 1e-5
    # precision fp32 turns TF32 off (device.ieee_fp32): cuDNN and oneDNN differ only in the order of sums.
    assert np.abs(results["cuda"] - results["cpu"]).max() < 1e-4


def test_cuda_data_path_with_test_time_augmentation_and_uint8_output(tmp_path):
    raw_path = _raw_store(tmp_path)
    ckpt = random_checkpoint(tmp_path / "m.pt", MODEL)
    results = {}
    for device in ("cpu", GPU):
        predictor = Predictor(PassThroughNet(MODEL), torch.device(device), None, tta_transforms("d4"), 52, 16)
        out = tmp_path / f"{len(results)}.ome.zarr"
        predict_volume(predictor, raw_path, out, ckpt, chunks=(1, 128, 128), out_dtype="uint8",
                       chunks_per_file=(1, 2, 2), progress=False, tta="d4")
        gather(out)
        results["cuda" if results else "cpu"] = io.open_ome_image(out)[...].astype(int)
    assert np.abs(results["cuda"] - results["cpu"]).max() <= 1


def test_training_steps_never_wait_for_the_device():
    device = torch.device(GPU)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((3, 256, 256), dtype=np.float32)).to(device)
    labels = torch.from_numpy((rng.random((3, 256, 256)) > 0.5).astype(np.uint8)).to(device)
    weights = torch.ones(3, 256, 256, device=device)
    model = UNet(MODEL).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99)
    gen = torch.Generator().manual_seed(0)
    size, tile = MODEL.input_size(68), 68

    def step():
        tiles = sample_tiles(images, labels, weights, 2, size, tile, AugmentConfig(), gen)
        with torch.autocast(device.type, torch.bfloat16):
            logits = model(tiles.image)
        loss = weighted_cross_entropy(logits, tiles.labels, tiles.weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    step()  # first-call set-up (cuDNN plans, pinned pool) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.stack(losses)).tolist())
