"""Fingerprints: what an output was computed from, so that reuse is decided by content.

A path and a shape say nothing about what a store holds: a stack replaced
by another of the same shape looks the same. Every store this package writes
records a `fingerprint` in its attributes: a checksum of its content for
stores made from outside data (raw, labels), or a digest of the producing
step's inputs' fingerprints and settings for derived ones (weights,
probabilities, segmentation). Resumable work (a prediction store, a
training checkpoint) records the fingerprint of what it was computed from
and is resumed only when that still matches.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from unet_pipeline import stores

KEY = "fingerprint"


class ContentHash:
    """SHA-256 over arrays fed in order, with each array's dtype and shape (so a reshape is a change)."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def update(self, array: np.ndarray) -> "ContentHash":
        """Feed one array (its dtype and shape too); returns self."""
        array = np.ascontiguousarray(array)
        self._hash.update(f"{array.dtype.str}{array.shape}".encode())
        self._hash.update(memoryview(array).cast("B"))
        return self

    def hexdigest(self) -> str:
        """The digest of everything fed so far."""
        return self._hash.hexdigest()


def derive_fingerprint(*parts) -> str:
    """Digest of JSON-able parts: the fingerprint of an output from its inputs' fingerprints and settings."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def store_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint a store recorded; for stores without one, a digest of its files' names, sizes and times.

    The fallback covers OME-Zarr written by older versions: any rewrite of
    the data changes it, so it errs on the side of recomputing.
    """
    recorded = stores.store_attrs(path).get(KEY)
    if recorded:
        return str(recorded)
    path = Path(path)
    listing = sorted(
        (str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file()
    )
    return derive_fingerprint("files", listing)
