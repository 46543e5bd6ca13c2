"""Device and precision choices (device.py) that hold on any machine."""
import pytest
import torch

from unet_pipeline.device import autocast, ieee_fp32, resolve_device, resolve_dtype, to_device
from unet_pipeline.errors import ConfigError


def test_precision_choices_and_their_errors():
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) is None
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16' is for CUDA"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_dtype("fp8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_fp32_on_cuda_turns_tf32_off_and_restores_the_settings():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with ieee_fp32():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    # autocast(cuda, None) is that context; on a CPU fp32 changes nothing.
    with autocast(torch.device("cuda"), None):
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    with autocast(torch.device("cpu"), None):
        assert (conv.fp32_precision, matmul.fp32_precision) == before
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_to_device_on_the_cpu_is_the_same_tensor():
    x = torch.arange(4)
    assert to_device(x, torch.device("cpu")) is x


def test_cudnn_picks_its_fastest_convolutions_only_under_autocast_on_cuda(monkeypatch):
    from unet_pipeline.device import tune_convolutions

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tune_convolutions(torch.device("cpu"), torch.bfloat16)
    tune_convolutions(torch.device("cuda"), None)  # fp32: the precision chosen for exactness
    assert torch.backends.cudnn.benchmark is False
    tune_convolutions(torch.device("cuda"), torch.bfloat16)
    assert torch.backends.cudnn.benchmark is True
