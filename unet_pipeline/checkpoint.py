"""Checkpoint files: everything needed to resume training exactly or to predict.

A checkpoint holds the model weights and its `UNetConfig`, the optimiser, the
step, every RNG state, the run's config and the package version: tensors and
plain data only. Checkpoints travel between labs, so they are loaded with
torch's restricted unpickler (`weights_only=True`): a file whose pickle asks
for any other object (a class, a function such as `os.system`) is refused
before anything in it runs. Files are written atomically (temporary file +
rename), so a killed job leaves either the previous checkpoint or the new
one, never a truncated file.
"""
from __future__ import annotations

import hashlib
import io as _bytes_io
import logging
import os
import re
import warnings
from pathlib import Path

import torch

from unet_pipeline import __version__
from unet_pipeline.errors import InputError
from unet_pipeline.atomic import atomic_file
from unet_pipeline.model import UNet, UNetConfig

log = logging.getLogger(__name__)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` atomically and durably.

    The bytes are built in memory first and written with an ordinary file
    write: torch's own writer reports a full disk as "unexpected pos ...",
    naming neither the file nor the cause; a plain write raises OSError
    (ENOSPC) that `atomic_file` attributes to `path`.
    """
    buffer = _bytes_io.BytesIO()
    torch.save({**state, "version": __version__}, buffer)
    with atomic_file(path, durable=True) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint's contents, loaded without executing anything from the file (tensors and plain data)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found; run the train stage first or fix predict.checkpoint.")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a foreign file
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the checkpoint ({exc.strerror or exc}).") from exc
    except Exception as exc:  # noqa: BLE001 - whatever a damaged or hostile file makes the unpickler raise
        raise InputError(f"{path}: not a checkpoint this package can load safely ({_load_failure(exc)}); "
                         "use a model.pt written by `unet-pipeline train`.") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise InputError(f"{path}: not a unet-pipeline checkpoint (no model weights or model config).")
    return state


def _load_failure(exc: Exception) -> str:
    """A short reason for a refused checkpoint: the object it asked for, or the kind of damage."""
    text = str(exc)
    found = re.search(r"unsupported GLOBAL (\S+)", text) or re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it holds a Python object ({found.group(1)}), not only tensors and plain data"
    if isinstance(exc, (MemoryError, OverflowError, EOFError)) or "Weights only load failed" in text:
        return "the file is damaged or is not a PyTorch checkpoint"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:160]


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


def check_training_config(path: str | os.PathLike, state: dict, expected: dict) -> None:
    """Compare the config a checkpoint was trained with against the one the caller expects.

    A different model section is refused (the network would not match the
    prediction settings); other differences (train, weights, training data)
    are warned about, naming the keys: the checkpoint is usable, but it is
    not the model this config would train. A checkpoint without a stored
    config (trained outside the workflow) is warned about once.
    """
    stored = state.get("config") or {}
    if not stored:
        log.warning("%s: the checkpoint records no training config; cannot check it against this one", path)
        return
    differences = _differences(stored, expected)
    model = [d for d in differences if d.startswith("model.")]
    if model:
        raise InputError(f"{path}: checkpoint was trained with another model config ({'; '.join(model[:5])}); "
                         "retrain or set the model section to match.")
    if differences:
        log.warning("%s: checkpoint was trained with another config (%s); its predictions are not what this "
                    "config would give", path, "; ".join(differences[:8]))


def _differences(stored, expected, prefix: str = "") -> list[str]:
    """Keys whose values differ, as 'key: stored -> expected', recursing into mappings."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(stored) | set(expected)):
            out += _differences(stored.get(key), expected.get(key), f"{prefix}{key}.")
        return out
    return [] if stored == expected else [f"{prefix.rstrip('.')}: {stored!r} -> {expected!r}"]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (a prediction records the checkpoint it was made with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
