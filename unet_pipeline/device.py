"""Device and numeric precision choices, in one place for train and predict.

`auto` picks CUDA when present, else CPU. Precision `auto` means bf16
autocast where the hardware runs it natively: on CUDA when the GPU supports
it (else fp16 with a gradient scaler); on a CPU with AMX or AVX-512-BF16
(4-5x faster convolutions than fp32), and plain fp32 on other CPUs, where
oneDNN emulates bf16 and a convolution is up to 70x slower than in fp32
(measured on an AVX2-only AMD EPYC: 0.011 vs 0.78 Mvoxel/s for the
16-channel U-Net). `fp32` turns autocast off.
"""
from __future__ import annotations

import contextlib
import os

import torch

from unet_pipeline.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available; use 'auto' or 'cpu'.")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a valid torch device ({exc}).") from exc


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision 'fp16' is for CUDA; on CPU use 'bf16' or 'fp32'.")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX-512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or newer torch without the query
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
