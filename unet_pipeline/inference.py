"""The network runner: a trained U-Net applied to batches of tiles on one device.

Everything between "raw tiles on the device" and "cell probability on the
device" lives here, so that the volume pipeline (`predict.py`) and validation
during training (`train.py`) run the network the same way:

- test-time augmentation (the 8 symmetries of the square) batched into one
  forward pass instead of one pass per transform;
- channels_last memory format (faster convolutions on GPUs and with oneDNN);
- bf16/fp16 autocast (`device.py`);
- optional `torch.compile`, falling back to eager mode with one warning
  where it cannot compile (no compiler, unsupported platform).
No function here synchronises with the host: results stay on the device.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from unet_pipeline.checkpoint import check_training_config, model_from_checkpoint
from unet_pipeline.device import autocast, describe, resolve_device, resolve_dtype, tune_convolutions
from unet_pipeline.errors import ConfigError
from unet_pipeline.model import UNetConfig
from unet_pipeline.geometry import DIHEDRAL, Box, tta_transforms
from unet_pipeline.tiling import TilePlan, read_mirrored

log = logging.getLogger(__name__)

# Largest batch `batch_size: auto` picks on a GPU: beyond 16 tiles of 572^2 the
# paper's network gains nothing measurable (issue 10: 111 Mvoxel/s at 16).
MAX_AUTO_BATCH = 16


def _apply(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1)) if k else x
    return torch.flip(x, dims=(-1,)) if flip else x


def _invert(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, -k, dims=(-2, -1)) if k else x


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat without the copy when there is only one tensor (no test-time augmentation)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def stack_tiles(tiles: list[torch.Tensor]) -> torch.Tensor:
    """Tiles (views of a region) as one batch; a single tile stays a view, with no copy."""
    return tiles[0][None] if len(tiles) == 1 else torch.stack(tiles)


def activation_bytes_per_tile(cfg: UNetConfig, input_size: int, bytes_per_value: int = 2) -> int:
    """Upper estimate of the activation memory one input tile needs during inference.

    The largest moment is the top level of the expanding path: the skip
    connection, the concatenation and two convolution outputs alive at once.
    """
    top = cfg.base_channels * input_size * input_size * bytes_per_value
    return 6 * top


def auto_batch_size(cfg: UNetConfig, tile_size: int, device: torch.device, transforms: int) -> int:
    """Network inputs per forward pass: 1 tile's transforms on CPU; on a GPU as many as fit in 40% of free memory."""
    if device.type != "cuda":
        return transforms
    free, _ = torch.cuda.mem_get_info(device)
    per_tile = activation_bytes_per_tile(cfg, cfg.input_size(tile_size))
    fits = max(1, int(0.4 * free // per_tile))
    return max(transforms, min(MAX_AUTO_BATCH * transforms, 2 ** int(math.log2(fits))))


@dataclass
class Predictor:
    """A trained network plus how to run it (device, precision, test-time augmentation, batching).

    `batch_size` counts network inputs per forward pass, test-time
    augmentation copies included, so it bounds device memory whatever the TTA.
    """

    model: nn.Module
    device: torch.device
    tile_size: int
    dtype: torch.dtype | None = None
    transforms: tuple[tuple[int, bool], ...] = DIHEDRAL[:1]
    batch_size: int | None = None
    channels_last: bool = True
    compile: bool = False
    _net: nn.Module = field(init=False, repr=False)
    _compiled: bool = field(init=False, default=False, repr=False)

    def __post_init__(self):
        cfg = self.model.cfg
        cfg.check_output_size(self.tile_size, "predict.tile_size")
        self.model = self.model.to(self.device).eval()
        tune_convolutions(self.device, self.dtype)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.batch_size is None:
            self.batch_size = auto_batch_size(cfg, self.tile_size, self.device, len(self.transforms))
        if self.batch_size < 1:
            raise ConfigError(f"predict.batch_size must be at least 1 or 'auto', got {self.batch_size}")
        self._net = self.model
        if self.compile:
            self._net = torch.compile(self.model, dynamic=False)
            self._compiled = True

    @property
    def cfg(self) -> UNetConfig:
        """The network's hyper-parameters (and so its tile geometry)."""
        return self.model.cfg

    @property
    def tiles_per_batch(self) -> int:
        """Tiles per forward pass: the batch divided among the test-time transforms."""
        return max(1, self.batch_size // len(self.transforms))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # No memory-format conversion of the 1-channel input: the first
        # convolution lays it out like its channels_last weights.
        with autocast(self.device, self.dtype):
            if not self._compiled:
                return self.model(x)
            try:
                return self._net(x)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: report it and run eagerly
                log.warning("predict.compile: torch.compile failed (%s: %s); running the network uncompiled",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self._compiled = False
                return self.model(x)

    def _probability(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Cell probability (n, h, w), float32, of inputs (n, 1, H, W); written into `out` when given."""
        if self._compiled and x.shape[0] < self.batch_size:
            # Pad a short last batch so that the compiled graph sees one shape.
            pad = x.new_zeros((self.batch_size - x.shape[0], *x.shape[1:]))
            prob = self._probability(torch.cat([x, pad]))[: x.shape[0]]
            return prob if out is None else out.copy_(prob)
        logits = self._logits(x).float()
        if logits.shape[1] == 2:  # softmax of two classes, 3x cheaper on CPU; no temporary but the result
            diff = torch.sub(logits[:, 1], logits[:, 0], out=out)
            return torch.sigmoid(diff, out=diff)
        prob = torch.softmax(logits, dim=1)[:, 1]
        return prob if out is None else out.copy_(prob)

    @torch.inference_mode()
    def probabilities(self, tiles: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cell probability over the test-time transforms of normalised tiles (n, H, W) on the device.

        Transforms that give the same tile orientation run in one forward pass
        (all 8 for square tiles); each result is mapped back before averaging.
        With `out` (n, h, w), any strides, the result is written there; without
        test-time augmentation directly, saving a copy of every output tile.
        """
        x = tiles[:, None]
        n = x.shape[0]
        if out is not None:
            if self.transforms == DIHEDRAL[:1] and n <= self.batch_size:
                return self._probability(x, out)
            return out.copy_(self.probabilities(tiles))
        square = x.shape[-1] == x.shape[-2]
        groups: dict[bool, list[tuple[int, bool]]] = {}
        for k, flip in self.transforms:
            groups.setdefault(square or k % 2 == 0, []).append((k, flip))
        parts = []
        for transforms in groups.values():
            batch = _cat([_apply(x, k, flip) for k, flip in transforms])
            step = max(n, self.batch_size // n * n)  # whole transforms per pass
            prob = _cat([self._probability(batch[i:i + step]) for i in range(0, batch.shape[0], step)])
            parts += [_invert(prob[j * n:(j + 1) * n], k, flip) for j, (k, flip) in enumerate(transforms)]
        if len(parts) == 1:
            return parts[0]
        return torch.stack(parts).mean(dim=0)

    @torch.inference_mode()
    def predict_region(self, region: torch.Tensor, plan: TilePlan) -> torch.Tensor:
        """Run every tile of `plan` on the normalised `region` (its read box, on the device); returns the region."""
        out = torch.empty(plan.computed.shape, dtype=torch.float32, device=self.device)
        jobs = [(z, tile) for z in range(region.shape[0]) for tile in plan.tiles]
        for i in range(0, len(jobs), self.tiles_per_batch):
            group = jobs[i:i + self.tiles_per_batch]
            tiles = stack_tiles([region[z][tile.input.slices[1:]] for z, tile in group])
            prob = self.probabilities(tiles.float())
            for (z, tile), p in zip(group, prob):
                out[(z, *tile.output.slices[1:])] = p
        return out[plan.region.relative_to(plan.computed.start).slices]

    def predict_image(self, image: np.ndarray) -> np.ndarray:
        """Whole-array prediction of normalised (slices, y, x) data held in memory."""
        image = image[None] if image.ndim == 2 else image
        plan = TilePlan.make(Box((0, 0, 0), image.shape), self.cfg, self.tile_size)
        region = torch.from_numpy(np.ascontiguousarray(read_mirrored(image, plan.read), np.float32)).to(self.device)
        return self.predict_region(region, plan).cpu().numpy()


def load_predictor(checkpoint: str | os.PathLike, device: str, precision: str, tta, tile_size: int,
                   batch_size: int | None = None,
                   expected_model: UNetConfig | None = None, compile: bool = False,
                   channels_last: bool = True, expected_training: dict | None = None) -> Predictor:
    """The checkpoint's network ready to predict; refuses one that differs from `expected_model`.

    `expected_training` (the resolved training config, as `stages.training_config`)
    is compared with the one stored in the checkpoint (`check_training_config`).
    `batch_size` None picks one for the device (`auto_batch_size`).
    """
    dev = resolve_device(device)
    model, state = model_from_checkpoint(checkpoint, expected=expected_model, device=dev)
    if expected_training is not None:
        check_training_config(checkpoint, state, expected_training)
    dtype = resolve_dtype(precision, dev)
    log.info("predicting with %s (step %s of its training) on %s", checkpoint, state.get("step", "?"),
             describe(dev, dtype, device, precision))
    return Predictor(model, dev, tile_size, dtype, tta_transforms(tta), batch_size,
                     channels_last=channels_last, compile=compile)


class PassThroughNet(nn.Module):
    """A zero-cost stand-in for the U-Net with the same geometry, to measure and test the data path.

    Its two logit channels are views of the output tile's own input pixels,
    channel 1 at each pixel and channel 0 one pixel to the left, so nothing is
    computed or copied, the cell probability is sigmoid(c[y, x] - c[y, x - 1])
    of the normalised input c (mirrored at the border like the network's
    input), and every output voxel can be checked against the input it came
    from. All the time a prediction with it takes is data path.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if cfg.padding != "valid" or cfg.num_classes != 2:
            raise ConfigError("PassThroughNet stands in for a two-class U-Net with valid convolutions")
        self.cfg = cfg
        self.anchor = nn.Parameter(torch.zeros(()))  # so that .to(device) works as for a network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.cfg.context_margin
        n, _, h, w = x.shape
        s = x.stride()
        centre = x[:, :, m:h - m, m:w - m]
        # Channel c starts c - 1 pixels to the left of the centre crop: a view, no copy.
        return x.as_strided((n, 2, h - 2 * m, w - 2 * m), (s[0], s[3], s[2], s[3]),
                            centre.storage_offset() - s[3])
