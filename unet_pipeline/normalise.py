"""Intensity normalisation: raw values mapped so that the 0.5 and 99.5 percentiles go to 0 and 1.

Raw intensities are stored unchanged (uint8 EM compresses well and viewers
show it as acquired); the statistics are computed once by preprocess and
stored in the raw image's attributes, and `Normaliser` applies them on the
fly, so training and prediction see the same mapping.

The statistics are computed block by block in parallel jobs and combined:
each block contributes exact sums (count, sum, sum of squares, min, max)
and a sample of its voxels of a size proportional to its share of the
volume, drawn at positions seeded by the block's index. The combination is
therefore the same whichever job computed which block, and however many
jobs there were.
"""
from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from unet_pipeline.errors import InputError

PERCENTILES = (0.5, 99.5)
SAMPLES_TOTAL = 1_000_000


@dataclass(frozen=True)
class Normaliser:
    """Maps raw intensities so that the low/high percentiles go to 0 and 1."""

    low: float
    high: float

    @property
    def scale(self) -> float:
        return 1.0 / max(self.high - self.low, 1e-6)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return (raw.astype(np.float32) - np.float32(self.low)) * np.float32(self.scale)

    def into(self, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The same mapping written into float32 `out` (any strides), in one pass with no temporary array.

        The same two float32 operations per voxel as `__call__` (subtract, then
        multiply), so the values are identical. Normalisation was the slowest
        step of the prediction's reader; measured per voxel of a strided 2048^2
        region: 1.6 G/s here, 1.1 G/s with two NumPy passes, 0.4 G/s through a
        256-entry look-up table, 0.1 G/s converting first. The GIL is released.
        """
        if raw.ndim == 3 and out.ndim == 3 and out.dtype == np.float32 and raw.dtype.kind in "uif":
            from unet_pipeline.normalise_kernel import normalise_3d  # numba: imported only where it runs

            normalise_3d(raw, out, np.float32(self.low), np.float32(self.scale))
            return out
        np.subtract(raw, np.float32(self.low), out=out, dtype=np.float32, casting="unsafe")
        return np.multiply(out, np.float32(self.scale), out=out)

    @classmethod
    def from_attrs(cls, attrs: dict, where: str = "") -> "Normaliser":
        """The normalisation a raw store recorded; InputError naming `where` if it recorded none."""
        stats = attrs.get("normalisation")
        if not stats:
            raise InputError(f"{where}: no normalisation statistics in the attributes; rerun preprocess.")
        return cls(float(stats["low"]), float(stats["high"]))


def block_statistics(block: np.ndarray, index: tuple[int, ...], total_voxels: int) -> dict:
    """What one block contributes to the stack's statistics (JSON-able, for its completion record)."""
    values = block.reshape(-1)
    count = max(16, math.ceil(SAMPLES_TOTAL * values.size / total_voxels))
    seed = int.from_bytes(hashlib.sha256(repr(tuple(index)).encode()).digest()[:8], "little")
    picks = np.random.default_rng(seed).integers(0, values.size, min(count, values.size))
    sample = np.ascontiguousarray(values[picks])
    as_float = values.astype(np.float64)
    return {"n": int(values.size), "sum": float(as_float.sum()), "sum_sq": float(np.dot(as_float, as_float)),
            "min": float(values.min()), "max": float(values.max()), "dtype": sample.dtype.str,
            "sample": base64.b64encode(sample.tobytes()).decode()}


def combine_statistics(parts: list[dict]) -> dict:
    """The stack's statistics from its blocks' contributions (`block_statistics`)."""
    n = sum(p["n"] for p in parts)
    mean = sum(p["sum"] for p in parts) / n
    variance = max(0.0, sum(p["sum_sq"] for p in parts) / n - mean * mean)
    sample = np.concatenate([np.frombuffer(base64.b64decode(p["sample"]), dtype=np.dtype(p["dtype"]))
                             for p in parts]).astype(np.float64)
    low, high = np.percentile(sample, PERCENTILES)
    return {"method": "percentile", "low": float(low), "high": float(high), "percentiles": list(PERCENTILES),
            "mean": mean, "std": math.sqrt(variance), "min": min(p["min"] for p in parts),
            "max": max(p["max"] for p in parts), "samples": int(sample.size)}
