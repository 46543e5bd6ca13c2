"""Shared fixtures: small synthetic stacks, the ISBI data and the conformance vector by path."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNET_PIPELINE_SHARED", REPO.parent / "shared"))
ISBI = SHARED / "data" / "isbi2012"
CONFORMANCE = SHARED / "data" / "metrics-conformance"


@pytest.fixture(scope="session")
def synthetic_stack():
    from unet_pipeline.synthetic import synthesize_labels_and_raw

    return synthesize_labels_and_raw(4, (96, 128), seed=3, cell_diameter_px=24)


@pytest.fixture
def tiff_pair(tmp_path, synthetic_stack):
    raw, labels = synthetic_stack
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    return tmp_path / "raw.tif", tmp_path / "labels.tif"


def require_shared(path: Path) -> None:
    """Shared data is always beside the checkout in CI: missing there is a failure, not a skip."""
    if not path.exists():
        message = f"{path} not present (set UNET_PIPELINE_SHARED to the shared/ folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def isbi_labels():
    path = ISBI / "train-labels.tif"
    require_shared(path)
    return tifffile.imread(path)


@pytest.fixture(scope="session")
def conformance():
    require_shared(CONFORMANCE)
    import json

    return (np.load(CONFORMANCE / "gt.npy"), np.load(CONFORMANCE / "prop.npy"),
            json.loads((CONFORMANCE / "expected.json").read_text()))
