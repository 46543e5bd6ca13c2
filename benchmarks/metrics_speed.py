"""All ISBI 2012 metrics on ten 512x512 ISBI slices with a realistic probability map.

Target (issue 5): under 5 s for all metrics together on 2 cores; the
reference implementation needs 50-240 s. The probability map is the ground
truth degraded the way a trained net's output is: blurred borders, noise,
some broken and some spurious membrane (pixel error about 0.06,
like a trained network on ISBI).
"""
import sys

import numpy as np
import tifffile
from scipy import ndimage

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import ISBI, median_seconds  # noqa: E402

from unet_pipeline.metrics import evaluate_isbi  # noqa: E402


def realistic_probability(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = ndimage.gaussian_filter((labels > 0).astype(np.float64), (0, 2.0, 2.0))
    p += ndimage.gaussian_filter(rng.normal(0, 2.0, labels.shape), (0, 2, 2))
    return np.clip(p, 0, 1).astype(np.float32)


def main():
    labels = tifffile.imread(ISBI / "train-labels.tif")[:10]
    prob = realistic_probability(labels)
    evaluate_isbi(labels[:1, :64, :64], prob[:1, :64, :64])  # compile numba kernels (cached on disk)
    one = median_seconds(lambda: evaluate_isbi(labels, prob), repeats=3)
    two = median_seconds(lambda: evaluate_isbi(labels, prob, workers=2), repeats=3)
    result = evaluate_isbi(labels, prob).summary()
    print("metrics on 10 ISBI slices:", {k: round(v, 6) for k, v in result.items()})
    print(f"all metrics, 10 x 512x512 slices, 1 process:  median {one:.2f} s (target < 5 s; reference 50-240 s)")
    print(f"all metrics, 10 x 512x512 slices, 2 processes: median {two:.2f} s")
    print(f"speed-up over the reference's best case (50 s): {50 / one:.1f}x (1 process), {50 / two:.1f}x (2)")


if __name__ == "__main__":
    main()
