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
from unet_pipeline.schema import choices



def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of a `device` setting: `auto` is CUDA when present, else the CPU."""
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
    if precision not in choices("train.precision"):
        raise ConfigError(f"precision must be one of {choices('train.precision')}, got {precision!r}")
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


def describe(device: torch.device, dtype: torch.dtype | None, requested_device: str, requested_precision: str) -> str:
    """What `auto` chose, for the log: e.g. "cpu (auto: no CUDA GPU), fp32 (auto: no native bf16 on this CPU)"."""
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    if requested_device == "auto":
        where += " (auto: " + ("CUDA GPU found)" if device.type == "cuda" else "no CUDA GPU)")
    numeric = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]
    if requested_precision == "auto":
        if device.type == "cpu":
            numeric += " (auto: " + ("native bf16 on this CPU)" if dtype is not None else "no native bf16 on this CPU)")
        else:
            numeric += " (auto)"
    return f"{where}, {numeric}"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied without making the host wait for the device's queued work.

    A copy from ordinary (pageable) host memory to a GPU synchronises the
    stream: the training loop would wait for the previous step before it
    could prepare the next. From pinned memory the copy is asynchronous, and
    torch's pinned-memory allocator keeps the buffer until the copy has run.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The precision context for the network: autocast to `dtype`, or true fp32 where `dtype` is None.

    On CUDA, fp32 convolutions otherwise run in TF32 by default (10-bit
    mantissa): `precision: fp32` would then differ from the CPU's result
    by about 1e-3 instead of 1e-5.
    """
    if dtype is not None:
        return torch.autocast(device_type=device.type, dtype=dtype)
    return ieee_fp32() if device.type == "cuda" else contextlib.nullcontext()


def tune_convolutions(device: torch.device, dtype: torch.dtype | None) -> None:
    """Let cuDNN time its convolution algorithms once per input shape and keep the fastest.

    Tiles come in a handful of fixed shapes, so the one-off timing pays for
    itself within a few batches. Only under autocast: in fp32, the precision
    chosen for exactness, cuDNN keeps its default algorithm choice.
    """
    if device.type == "cuda" and dtype is not None:
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def ieee_fp32():
    """cuDNN convolutions and CUDA matrix products in IEEE fp32 (no TF32) inside; the settings are restored after."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
