"""Cell probabilities in one byte, with every threshold the pipeline uses seeing the pixels float32 sees.

A uint8 probability map is a quarter of float32's bytes and opens in every
viewer (neuroglancer reads no float16). But a byte holds 256 values, and
where they fall matters. round(255 p) puts the ISBI threshold 0.2 exactly on
a stored value (51/255 = 0.2), so every pixel within 1/510 of 0.2 changes
side; on ISBI 2012 a few of those 0.2 % of the pixels open or close membrane
gaps, and the map's Rand error moved from 0.0789 (float32) to 0.0702.

The code here puts the thresholds *between* stored values instead:

    v = ceil(200 p)   for 0 <= p < 1     (0 .. 200)
    v = 201           for p == 1         (a saturated softmax)

read back as 0 for v = 0, (v - 0.5) / 200 for v = 1 .. 200, and 1 for 201.
For a threshold t = k / 200, v > k exactly when 200 p > k, so "p > t" holds
for the value read back exactly when it holds for p. Every multiple of
0.005 is such a threshold: the ISBI thresholds 0.0, 0.1, ... 0.9 (also as
the 0.30000000000000004 that accumulating 0.1 gives: no float32 lies
between it and 0.3, and no value read back lies within 0.0025 of it), the
last ISBI threshold 0.9999999999999999 (above it: only p == 1, hence code
201), and every cell and seed threshold calibration tries. A threshold off
that grid (0.123) moves by less than 0.005. (200 steps, not the 250 a
byte allows: calibration's cell thresholds 0.03, 0.07 and 0.15 are
multiples of 0.005 but not of 0.004.)

So the ISBI pixel error, Rand error, V_rand and V_info of a stored map are
those of the network's output, bit for bit (ISBI slices 25-29). The warping
error is not kept: it also flips pixels in the order of |p - t|, and values
less than 0.005 apart tie in a byte (0.001617 against 0.001662 in float32;
float16 gives 0.001637). Users who need it to the last digit store float32.

The product 200 p is formed in float64, where it is exact for a float32 p
(24 + 5 significant bits), so predict (torch, on the block) and calibration
(NumPy, on validation slices) store bit-identical values.

A store records how to read it (`SCALE_KEY` in its attributes): 200 for
this code, 255 for round(255 p) (uint8 maps written before this code), 1
for float maps (stored as is).
"""
from __future__ import annotations

import numpy as np

SCALE_KEY = "probability_scale"
ENCODING_KEY = "probability_encoding"
SCALE = 200            # stored steps per unit probability: thresholds on multiples of 1/200 are kept exactly
ONE = SCALE + 1        # the code of p == 1 exactly
LEGACY_SCALE = 255     # round(255 p), read as v / 255
ENCODING = (f"uint8 v = ceil({SCALE} p) for p < 1, {ONE} for p = 1; read 0 as 0, {ONE} as 1, "
            f"else (v - 0.5) / {SCALE}: p > k/{SCALE} exactly when v > k")

_DECODED = np.concatenate([[0.0], (np.arange(1, SCALE + 1) - 0.5) / SCALE, [1.0]])  # code -> float64


def stored_one(scale: float) -> float:
    """The value a store of this scale holds for p = 1 (a viewer's top grey level)."""
    return float(ONE) if scale == SCALE else float(scale)


def store_attrs(dtype) -> dict:
    """What a probability store's attributes say about reading its values: this code for uint8, scale 1 for floats."""
    if np.dtype(dtype) == np.uint8:
        return {SCALE_KEY: float(SCALE), ENCODING_KEY: ENCODING}
    return {SCALE_KEY: 1.0}


def encode(prob: np.ndarray) -> np.ndarray:
    """Probabilities -> uint8 codes (see the module docstring); values outside [0, 1] are clipped."""
    p = np.clip(np.asarray(prob, np.float64), 0.0, 1.0)
    return (np.ceil(p * SCALE) + (p >= 1.0)).astype(np.uint8)


def encode_into(prob, out, step: int = 1 << 18) -> None:
    """`encode` for torch: float32 `prob` -> uint8 `out` (same shape, any device), in slabs of `step` values.

    The float64 scratch is one slab (2 MB), not one block: a block-sized
    float64 temporary would double predict's memory per block, and the slab
    stays in cache (580 Mvoxel/s on one core here, against 460 for 8 MB slabs;
    round(255 p) in float32 ran 1450, but moved thresholds). `prob` is left
    unchanged.
    """
    import torch

    if not out.is_contiguous() or not prob.is_contiguous():
        raise ValueError("encode_into needs contiguous tensors (it writes `out` through a flat view)")
    flat_prob, flat_out = prob.view(-1), out.view(-1)
    scratch = torch.empty(min(step, flat_prob.numel()), dtype=torch.float64, device=prob.device)
    for start in range(0, flat_prob.numel(), step):
        p = flat_prob[start:start + step]
        s = scratch[:p.numel()]
        s.copy_(p).clamp_(0.0, 1.0)
        saturated = s >= 1.0
        s.mul_(SCALE).ceil_().add_(saturated)
        flat_out[start:start + step].copy_(s, non_blocking=flat_out.device != s.device)


def decode(values: np.ndarray, scale: float) -> np.ndarray:
    """Stored probability values -> float64 in [0, 1], by the scale the store records (never guessed from the data).

    float64, because thresholds are compared in float64 everywhere
    (METRICS.md); the codes read back lie 0.0025 from every threshold on the
    grid, so no rounding on the way can move a pixel across one.
    """
    if scale == 1.0:
        return np.asarray(values).astype(np.float64)
    if scale == SCALE:
        return _DECODED[np.asarray(values, np.uint8)]
    if scale == LEGACY_SCALE:
        return np.asarray(values).astype(np.float64) / LEGACY_SCALE
    raise ValueError(f"probability scale {scale!r} is not one this package writes (1, {SCALE} or {LEGACY_SCALE})")


def as_stored(prob: np.ndarray, dtype) -> np.ndarray:
    """Probabilities as they read back after predict stores them as `dtype`, in float64.

    Settings chosen on probabilities must be chosen on the values the
    segmentation will later read.
    """
    if np.dtype(dtype) == np.uint8:
        return decode(encode(prob), SCALE)
    return decode(np.asarray(prob).astype(dtype), 1.0)
