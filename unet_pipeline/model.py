"""The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015), layer by layer.

Default = the paper's network (Fig. 1): depth 4 (four 2x2 max poolings, five
levels), 64 base channels doubling per level, two unpadded 3x3 convolutions
with ReLU per level, dropout at the end of the contracting path, 2x2
up-convolutions that halve the channels, crop-and-concatenate skips and a 1x1
output convolution: 23 convolutional layers, He initialisation. Depth, width,
padding ('valid' | 'same') and batch norm are options (UNET.md, "Variants").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from unet_pipeline.config import defaults
from unet_pipeline.errors import ConfigError

_DEFAULTS = defaults("model")  # the config schema holds every default (the paper's network)


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the network; the defaults are the paper's."""

    in_channels: int = 1
    num_classes: int = 2
    depth: int = _DEFAULTS["depth"]
    base_channels: int = _DEFAULTS["base_channels"]
    padding: str = _DEFAULTS["padding"]
    batch_norm: bool = _DEFAULTS["batch_norm"]
    dropout: float = _DEFAULTS["dropout"]
    # Context kept around each output tile when padding == "same": convolutions
    # near a tile edge see zeros, so tiles overlap by this margin and are cropped.
    same_halo_px: int = _DEFAULTS["same_halo_px"]

    def __post_init__(self):
        if self.padding not in ("valid", "same"):
            raise ConfigError(f"model.padding must be 'valid' or 'same', got {self.padding!r}")
        if not 1 <= self.depth <= 6:
            raise ConfigError(f"model.depth must be between 1 and 6, got {self.depth}")
        if self.base_channels < 1 or self.num_classes < 2 or self.in_channels < 1:
            raise ConfigError("model.base_channels, num_classes (>= 2) and in_channels must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    # --- geometry -----------------------------------------------------------
    @property
    def _conv_loss(self) -> int:
        """Pixels lost per side by one pair of 3x3 convolutions."""
        return 2 if self.padding == "valid" else 0

    def output_size(self, input_size: int) -> int:
        """Output side length for an input side, or raise if a pooling would see an odd size."""
        size = input_size
        for level in range(self.depth):
            size -= 2 * self._conv_loss
            if size <= 0 or size % 2:
                raise ValueError(f"input {input_size} gives odd or empty size {size} before pooling {level + 1}")
            size //= 2
        size -= 2 * self._conv_loss
        if size <= 0:
            raise ValueError(f"input {input_size} is too small")
        for _ in range(self.depth):
            size = 2 * size - 2 * self._conv_loss
            if size <= 0:
                raise ValueError(f"input {input_size} is too small")
        return size

    @property
    def context_margin(self) -> int:
        """Input pixels needed on each side of an output tile (92 for the paper's net)."""
        if self.padding == "same":
            return self.same_halo_px
        # Valid convs: the margin does not depend on the tile size.
        smallest = self.min_output_size
        return (self.input_size(smallest) - smallest) // 2

    @property
    def size_step(self) -> int:
        """Valid output sizes form an arithmetic progression with this step (2**depth)."""
        return 2 ** self.depth

    @property
    def min_output_size(self) -> int:
        """Smallest valid output side; every valid side is this plus a multiple of `size_step`."""
        return self.size_step if self.padding == "same" else self._valid_base()

    def input_size(self, output_size: int, key: str = "tile_size") -> int:
        """Input side that yields exactly `output_size`, or ConfigError naming `key` and the nearest valid sizes."""
        if self.padding == "same":
            core = output_size
            if core % self.size_step:
                raise self._invalid(output_size, key)
            return core + 2 * self.same_halo_px
        size = output_size
        for _ in range(self.depth):
            size += 2 * self._conv_loss
            if size % 2:
                raise self._invalid(output_size, key)
            size //= 2
        size += 2 * self._conv_loss
        for _ in range(self.depth):
            size = 2 * size + 2 * self._conv_loss
        if size <= 0 or self.output_size(size) != output_size:
            raise self._invalid(output_size, key)
        return size

    def is_valid_output_size(self, output_size: int) -> bool:
        try:
            self.input_size(output_size)
            return True
        except ConfigError:
            return False

    def check_output_size(self, output_size: int, key: str = "tile_size") -> None:
        """The one check of a tile size (config, training, prediction): ConfigError naming `key`."""
        self.input_size(output_size, key)

    def _invalid(self, output_size: int, key: str) -> ConfigError:
        lo, hi = self.nearest_valid_output_sizes(output_size)
        return ConfigError(
            f"config key '{key}': {output_size} is not a valid output tile for this network (depth {self.depth}, "
            f"{self.padding} convolutions); nearest valid sizes: {lo} and {hi}"
        )

    def nearest_valid_output_sizes(self, output_size: int) -> tuple[int, int]:
        """The valid output sides just below and above `output_size` (both equal if it is valid)."""
        base = self.min_output_size
        k = max(0, math.floor((output_size - base) / self.size_step))
        lo = base + k * self.size_step
        hi = lo + self.size_step if lo < output_size else lo
        return lo, hi

    def _valid_base(self) -> int:
        # Arithmetic, so that the error path never recurses into input_size():
        # the smallest output whose sizes stay even at every pooling.
        loss = self._conv_loss
        step = self.size_step
        for out in range(1, step + 1):
            size = out
            ok = True
            for _ in range(self.depth):
                size += 2 * loss
                if size % 2:
                    ok = False
                    break
                size //= 2
            if ok:
                return out
        raise AssertionError("no valid residue")  # pragma: no cover


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by ReLU (optionally batch norm first)."""

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig):
        pad = 1 if cfg.padding == "same" else 0
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            layers.append(nn.Conv2d(c, c_out, 3, padding=pad, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def center_crop(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The paper's 'copy and crop': the centre of a contracting-path feature map."""
    dy = (features.shape[-2] - height) // 2
    dx = (features.shape[-1] - width) // 2
    return features[..., dy:dy + height, dx:dx + width]


class UNet(nn.Module):
    """The paper's U-Net; `forward` returns per-class logits for the output tile."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_channels * 2 ** level for level in range(cfg.depth + 1)]
        self.down = nn.ModuleList()
        c_in = cfg.in_channels
        for w in widths[:-1]:
            self.down.append(DoubleConv(c_in, w, cfg))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.bottom = DoubleConv(widths[-2], widths[-1], cfg)
        # Dropout at the end of the contracting path (paper, Sec. 3.1).
        self.dropout = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose2d(w_low, w, 2, stride=2))
            self.up_conv.append(DoubleConv(2 * w, w, cfg))
        self.head = nn.Conv2d(widths[0], cfg.num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation: N(0, sqrt(2/N)), N = fan-in (paper, Sec. 3)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                if isinstance(m, nn.ConvTranspose2d):
                    # A transposed conv's fan-in per output pixel is C_in * k*k / stride**2 = C_in.
                    fan_in = m.in_channels
                else:
                    fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottom(x))
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips)):
            x = up(x)
            x = conv(torch.cat([center_crop(skip, x.shape[-2], x.shape[-1]), x], dim=1))
        logits = self.head(x)
        if self.cfg.padding == "same" and self.cfg.same_halo_px:
            h = self.cfg.same_halo_px
            logits = logits[..., h:-h, h:-h]
        return logits


def count_conv_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules())
