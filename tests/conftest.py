"""Shared fixtures: small synthetic stacks, the ISBI data and the conformance vector by path."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNET_PIPELINE_SHARED", REPO.parent / "shared"))
ISBI = SHARED / "data" / "isbi2012"
CONFORMANCE = SHARED / "data" / "metrics-conformance"


@pytest.fixture(scope="session")
def synthetic_stack():
    from unet_pipeline.synthetic import synthesize_labels_and_raw

    return synthesize_labels_and_raw(4, (96, 128), seed=3, cell_diameter_px=24)


@pytest.fixture
def tiff_pair(tmp_path, synthetic_stack):
    raw, labels = synthetic_stack
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    return tmp_path / "raw.tif", tmp_path / "labels.tif"


def require_shared(path: Path) -> None:
    """Shared data is always beside the checkout in CI: missing there is a failure, not a skip."""
    if not path.exists():
        message = f"{path} not present (set UNET_PIPELINE_SHARED to the shared/ folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def isbi_labels():
    path = ISBI / "train-labels.tif"
    require_shared(path)
    return tifffile.imread(path)


@pytest.fixture(scope="session")
def conformance():
    require_shared(CONFORMANCE)
    import json

    return (np.load(CONFORMANCE / "gt.npy"), np.load(CONFORMANCE / "prop.npy"),
            json.loads((CONFORMANCE / "expected.json").read_text()))


def raw_store(tmp_path: Path, shape, seed: int = 0, dtype=np.uint8, chunks=(1, 256, 256), chunks_per_file=(1, 8, 8),
              voxel_size=(50.0, 4.0, 4.0)):
    """A preprocessed raw store of random voxels (up to 255, or 60000 for 16-bit); returns (path, voxels)."""
    from unet_pipeline.preprocess import preprocess

    top = 60000 if np.dtype(dtype) == np.uint16 else 255  # 16-bit values far above 255
    data = (np.random.default_rng(seed).random(shape) * top).astype(dtype)
    tifffile.imwrite(tmp_path / "raw.tif", data, photometric="minisblack")
    preprocess(tmp_path / "raw.tif", tmp_path / "raw.ome.zarr", chunks=chunks, chunks_per_file=chunks_per_file,
               voxel_size_nm=voxel_size)
    return tmp_path / "raw.ome.zarr", data


def random_checkpoint(path: Path, cfg):
    """A checkpoint of an untrained network of `cfg`, the same weights every time."""
    import torch

    from unet_pipeline.checkpoint import save_checkpoint
    from unet_pipeline.model import UNet

    torch.manual_seed(0)
    save_checkpoint(path, {"model": UNet(cfg).state_dict(), "model_config": cfg.to_dict()})
    return path


def whole_slice_probability(model, normalised: np.ndarray, device: str = "cpu") -> np.ndarray:
    """The reference for overlap-tile prediction: each slice in one pass, mirror-padded by the context margin.

    A valid output is 4 + 8k px here, so a little more is computed and cropped.
    fp32 throughout (IEEE on CUDA: `device.autocast` with no dtype).
    """
    import torch

    from unet_pipeline.device import autocast

    cfg, (_, h, w) = model.cfg, normalised.shape
    m = cfg.context_margin
    out_h = next(s for s in range(h, h + 64) if cfg.is_valid_output_size(s))
    out_w = next(s for s in range(w, w + 64) if cfg.is_valid_output_size(s))
    whole = []
    for z in range(normalised.shape[0]):
        padded = np.pad(normalised[z], ((m, m + out_h - h), (m, m + out_w - w)), mode="reflect")
        with torch.inference_mode(), autocast(torch.device(device), None):
            logits = model(torch.from_numpy(padded)[None, None].to(device))
        whole.append(torch.softmax(logits, 1)[0, 1, :h, :w].cpu().numpy())
    return np.stack(whole)


def kill_after_blocks(args: list[str], partial_dir_glob: Path, blocks: int, env: dict | None = None) -> int:
    """Run a part's command, kill it with SIGKILL once it has recorded `blocks` blocks; returns how many it had.

    Each block is slowed down (UNET_PIPELINE_SLOW_BLOCKS_S), so the kill lands mid-part on any machine.
    """
    import signal
    import subprocess
    import time

    from unet_pipeline.blockwise import CompletionLog

    def recorded() -> int:
        partials = sorted(partial_dir_glob.parent.glob(partial_dir_glob.name))
        return len(CompletionLog.read(partials[0] / "unet_work")) if partials else 0

    proc = subprocess.Popen(args, env={**os.environ, "UNET_PIPELINE_SLOW_BLOCKS_S": "0.05", **(env or {})})
    deadline = time.time() + 120
    while time.time() < deadline and recorded() < blocks and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return recorded()


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One whole run of the tiny workflow (tests/test_workflow.py's TINY), shared by the workflow and SLURM tests;
    tests that change it work on a copy."""
    from tests.test_workflow import snakemake, write_tiny

    workdir = write_tiny(tmp_path_factory.mktemp("finished"))
    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir, run
