"""Training-tile sampling with the paper's augmentation, as tensor operations on the device.

One sampling grid per tile combines a random shift (the tile's position), a
rotation, flips and the paper's elastic deformation: displacement vectors on
a coarse 3x3 grid drawn from N(0, sigma = 10 px) per component, upsampled to
per-pixel displacements by bicubic interpolation (UNET.md, "Training"). The
image is resampled bicubically, labels by nearest neighbour and weight maps
bilinearly, all through the same grid, so they stay aligned. Where the grid
reaches past the slice, grid_sample's reflection mirrors the data (the same
mirror extrapolation as at inference). Gray values then vary by random
contrast, brightness and noise. Random numbers come from one CPU
`torch.Generator` (the per-pixel noise from a device generator seeded from
it), so a run is reproducible and resumable; only those few numbers are
drawn on the host and copied to the device without waiting for it
(`device.to_device`), and every per-pixel array is made on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unet_pipeline import schema
from unet_pipeline.device import to_device



@dataclass(frozen=True)
class AugmentConfig:
    """Every augmentation parameter (defaults: the config schema's); set `enabled: false` to sample plain tiles."""

    enabled: bool = schema.field("train.augment.enabled")
    elastic_sigma_px: float = schema.field("train.augment.elastic_sigma_px")
    elastic_grid: int = schema.field("train.augment.elastic_grid")
    rotation: bool = schema.field("train.augment.rotation")
    flips: bool = schema.field("train.augment.flips")
    contrast: float = schema.field("train.augment.contrast")          # factor drawn from [1 - c, 1 + c]
    brightness: float = schema.field("train.augment.brightness")      # offset drawn from [-b, b] (normalised units)
    noise_sigma: float = schema.field("train.augment.noise_sigma")    # additive Gaussian noise (normalised units)


@dataclass
class TrainingTiles:
    """One training batch: input tiles, their class labels and weight maps, on the training device."""

    image: torch.Tensor    # (n, 1, in, in) float
    labels: torch.Tensor   # (n, out, out) long, 1 = cell
    weights: torch.Tensor  # (n, out, out) float


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def sampling_grid(
    n: int, in_size: int, slice_shape: tuple[int, int], cfg: AugmentConfig, gen: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n, in, in, 2) source coordinates (x, y) in pixels of the slice, for each tile pixel, on `device`.

    Only the random parameters (a few numbers per tile) are drawn on the host;
    the per-pixel grid is built on the device. Built on the host it took 11 ms
    per 572^2 tile and 170 ms for 4 tiles of 892^2 on 2 cores, longer than a
    training step of the paper's network on a GPU.
    """
    h, w = slice_shape
    device = torch.device(device)
    flip = theta = coarse = None
    if cfg.enabled and cfg.flips:
        flip = to_device(torch.where(torch.rand(n, 2, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64), device)
    if cfg.enabled and cfg.rotation:
        theta = to_device(_uniform(gen, n, 0.0, 2 * math.pi).to(torch.float64), device)
    if cfg.enabled and cfg.elastic_sigma_px > 0:
        coarse = to_device(torch.randn(n, 2, cfg.elastic_grid, cfg.elastic_grid, generator=gen)
                           * cfg.elastic_sigma_px, device)
    # The tile centre is uniform over the slice: border pixels get mirrored context.
    centre = to_device(torch.stack([_uniform(gen, n, 0, w - 1), _uniform(gen, n, 0, h - 1)], dim=-1)
                       .to(torch.float64), device)

    offsets = torch.arange(in_size, dtype=torch.float64, device=device) - (in_size - 1) / 2.0
    gy, gx = torch.meshgrid(offsets, offsets, indexing="ij")
    local = torch.stack([gx, gy], dim=-1).expand(n, in_size, in_size, 2)
    if flip is not None:
        local = local * flip[:, None, None, :]
    if theta is not None:
        c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
        x, y = local[..., 0], local[..., 1]
        local = torch.stack([c * x - s * y, s * x + c * y], dim=-1)
    if coarse is not None:
        dense = F.interpolate(coarse, size=(in_size, in_size), mode="bicubic", align_corners=True)
        local = local + dense.permute(0, 2, 3, 1).to(torch.float64)
    return local + centre[:, None, None, :]


def _normalised(grid_px: torch.Tensor, slice_shape: tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates -> grid_sample's [-1, 1] (scalars only: no host-to-device copy)."""
    h, w = slice_shape
    x = grid_px[..., 0] * (2.0 / max(w - 1, 1)) - 1.0
    y = grid_px[..., 1] * (2.0 / max(h - 1, 1)) - 1.0
    return torch.stack([x, y], dim=-1).float()


def sample_tiles(
    images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, n: int, in_size: int, out_size: int,
    cfg: AugmentConfig, gen: torch.Generator,
) -> TrainingTiles:
    """Draw `n` augmented training tiles from stacks (S, H, W) held on the training device.

    The label and weight tiles are the central `out_size` part of the same
    warped grid as the image tile: the network's valid output region.
    Nothing here waits for the device, so on a GPU the next step's tiles are
    queued while the current step still runs.
    """
    device = images.device
    slice_shape = tuple(images.shape[-2:])
    idx = to_device(torch.randint(0, images.shape[0], (n,), generator=gen), device)
    grid = _normalised(sampling_grid(n, in_size, slice_shape, cfg, gen, device), slice_shape)
    margin = (in_size - out_size) // 2
    inner = grid[:, margin:margin + out_size, margin:margin + out_size]
    img = F.grid_sample(images[idx][:, None], grid, mode="bicubic", padding_mode="reflection", align_corners=True)
    lab = F.grid_sample(labels[idx][:, None].float(), inner, mode="nearest", padding_mode="reflection",
                        align_corners=True)
    wts = F.grid_sample(weights[idx][:, None], inner, mode="bilinear", padding_mode="reflection",
                        align_corners=True)
    if cfg.enabled:
        contrast = to_device(_uniform(gen, n, 1 - cfg.contrast, 1 + cfg.contrast), device)[:, None, None, None]
        bright = to_device(_uniform(gen, n, -cfg.brightness, cfg.brightness), device)[:, None, None, None]
        mean = img.mean(dim=(-2, -1), keepdim=True)
        img = (img - mean) * contrast + mean + bright
        if cfg.noise_sigma > 0:
            # Drawn on the device from a seed drawn on the host: reproducible and resumable,
            # without a tile-sized host draw and upload every step.
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            noise_gen = torch.Generator(device=device).manual_seed(seed)
            img = img + cfg.noise_sigma * torch.randn(img.shape, generator=noise_gen, device=device, dtype=img.dtype)
    return TrainingTiles(img, lab[:, 0].round().long(), wts[:, 0])
