"""The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015), layer by layer.

Default = the paper's network (Fig. 1): depth 4 (four 2x2 max poolings, five
levels), 64 base channels doubling per level, two unpadded 3x3 convolutions
with ReLU per level, dropout at the end of the contracting path, 2x2
up-convolutions that halve the channels, crop-and-concatenate skips and a 1x1
output convolution: 23 convolutional layers, He initialisation. Depth, width,
padding ('valid' | 'same') and batch norm are options (UNET.md, "Variants").
The hyper-parameters and the tile sizes they allow are `geometry.UNetConfig`
(torch-free, so the configuration can be checked without loading torch).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from unet_pipeline.geometry import UNetConfig

__all__ = ["UNet", "UNetConfig", "center_crop", "count_conv_layers"]


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
        """Per-class logits of the output tile for input tiles x (n, 1, H, W)."""
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
    """Convolutional layers (transposed ones included) of a network: 23 for the paper's U-Net."""
    return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules())
