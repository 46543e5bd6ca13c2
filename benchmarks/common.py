"""Helpers shared by the benchmark scripts: paths and robust timing."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ISBI = REPO.parent / "shared" / "data" / "isbi2012"


def median_seconds(fn, repeats: int = 3) -> float:
    """Median wall time of `repeats` calls (the machines are shared and noisy)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(device) -> None:
    """Wait for a GPU's queued work, so that a timer measures it; a no-op on a CPU."""
    if device.type == "cuda":
        import torch  # here, so that importing this module does not import torch early

        torch.cuda.synchronize(device)
