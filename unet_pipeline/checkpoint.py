"""Checkpoint files: everything needed to resume training exactly or to predict.

A checkpoint holds the model weights and its `UNetConfig`, the optimiser, the
step, every RNG state, the run's config and the package version. Files are
written atomically (temporary file + rename), so a killed job leaves either
the previous checkpoint or the new one, never a truncated file.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import torch

from unet_pipeline import __version__
from unet_pipeline.errors import InputError
from unet_pipeline.model import UNet, UNetConfig


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    torch.save({**state, "version": __version__}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found; run the train stage first or fix predict.checkpoint.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable checkpoint ({exc}).") from exc
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise InputError(f"{path}: not a unet-pipeline checkpoint (no model weights or model config).")
    return state


def model_from_checkpoint(path: str | os.PathLike, expected: UNetConfig | None = None,
                          device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """Build the network stored in a checkpoint; refuse one that differs from `expected`."""
    state = load_checkpoint(path)
    cfg = UNetConfig(**state["model_config"])
    if expected is not None and expected != cfg:
        diffs = {k: (v, getattr(expected, k)) for k, v in cfg.to_dict().items() if getattr(expected, k) != v}
        raise InputError(
            f"{path}: checkpoint was trained with a different model config "
            + ", ".join(f"{k}={a!r} (config says {b!r})" for k, (a, b) in diffs.items())
            + "; retrain or set the model section to match."
        )
    model = UNet(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit the stored model config ({exc}).") from exc
    return model.to(device).eval(), state


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
