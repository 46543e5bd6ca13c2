"""Preprocess: TIFF stacks or Zarr in, chunked compressed OME-Zarr out.

Raw intensities are stored unchanged (uint8 EM compresses well and viewers
show it as acquired); the normalisation statistics (0.5 and 99.5 percentiles
over a subsample, mean, std) are stored in the image's attributes and applied
on the fly by `Normaliser`, so train and predict see the same mapping. Labels
are validated against the raw stack and converted alongside. Slices are
streamed one at a time, so memory is bounded by a slice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from unet_pipeline import io
from unet_pipeline.io import StackSource
from unet_pipeline.provenance import KEY as FINGERPRINT, ContentHash
from unet_pipeline.errors import InputError


# --------------------------------------------------------------------------- normalisation
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
        stats = attrs.get("normalisation")
        if not stats:
            raise InputError(f"{where}: no normalisation statistics in the attributes; rerun preprocess.")
        return cls(float(stats["low"]), float(stats["high"]))


def intensity_statistics(source: StackSource, max_samples: int = 2_000_000, seed: int = 0) -> dict:
    """Percentiles, mean and std from a strided subsample of the stack."""
    rng = np.random.default_rng(seed)
    per_slice = max(1, max_samples // len(source))
    step = max(1, len(source) // 64)
    samples = []
    for z in range(0, len(source), step):
        plane = source.slice(z).ravel()
        samples.append(plane[rng.integers(0, plane.size, min(per_slice, plane.size))].astype(np.float64))
    values = np.concatenate(samples)
    low, high = np.percentile(values, [0.5, 99.5])
    return {"method": "percentile", "low": float(low), "high": float(high), "percentiles": [0.5, 99.5],
            "mean": float(values.mean()), "std": float(values.std())}


# --------------------------------------------------------------------------- labels
def check_labels(labels: np.ndarray, where: str, label_format: str = "binary") -> np.ndarray:
    """Validate one label slice and return it in the stored form.

    binary: values {0, 255} or {0, 1} (ISBI: 255 = cell), stored as uint8 0/255.
    instances: 0 = membrane/background, every other value one cell, stored as uint32.
    """
    if label_format == "binary":
        values = np.unique(labels)
        if not set(values.tolist()) <= {0, 1, 255} or {1, 255} <= set(values.tolist()):
            shown = values[:10].tolist()
            raise InputError(
                f"{where}: labels are not binary (values {shown}{'...' if values.size > 10 else ''}); expected "
                "0 = membrane and 255 (or 1) = cell. For instance labels set label_format: instances."
            )
        return np.where(labels > 0, 255, 0).astype(np.uint8)
    if label_format == "instances":
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise InputError(f"{where}: instance labels must be non-negative integers, got {labels.dtype}.")
        return labels.astype(np.uint32)
    raise InputError(f"label_format must be 'binary' or 'instances', got {label_format!r}")


# --------------------------------------------------------------------------- stage
def preprocess(
    raw_path: str | os.PathLike,
    out_raw: str | os.PathLike | None,
    labels_path: str | os.PathLike | None = None,
    out_labels: str | os.PathLike | None = None,
    chunks: tuple[int, int, int] = (1, 512, 512),
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
    label_format: str = "binary",
    chunks_per_file: tuple[int, int, int] | None = io.CHUNKS_PER_FILE,
) -> dict:
    """Convert a raw stack and/or its labels into OME-Zarr; returns the raw attributes.

    With `out_raw` None only the labels are written (still checked against
    the raw stack's shape), so the two can be separate workflow jobs.
    """
    raw = StackSource(raw_path)
    labels = None
    if labels_path is not None:
        labels = StackSource(labels_path)
        if labels.shape != raw.shape:
            raise InputError(
                f"{labels_path}: label stack shape {labels.shape} does not match raw stack {raw_path} shape {raw.shape}."
            )
    attrs: dict = {}
    if out_raw is not None:
        attrs = {"source": str(raw_path), "normalisation": intensity_statistics(raw), "voxel_size": list(voxel_size)}
        with io.atomic_directory(out_raw) as tmp:
            arr = io.create_ome_image(tmp, raw.shape, raw.dtype, chunks, voxel_size, name="raw",
                                     chunks_per_file=chunks_per_file)
            content = ContentHash()
            for z, plane in enumerate(raw.slices()):
                arr[z] = plane
                content.update(plane)
            attrs[FINGERPRINT] = content.hexdigest()
            arr.attrs["normalisation"] = attrs["normalisation"]  # beside the data, for other readers
            io.build_pyramid(tmp, 2, voxel_size=voxel_size, name="raw")
            io.mark_complete(tmp, attrs)
    if labels is not None and out_labels is not None:
        dtype = np.uint8 if label_format == "binary" else np.uint32
        with io.atomic_directory(out_labels) as tmp:
            arr = io.create_ome_image(tmp, labels.shape, dtype, chunks, voxel_size, name="labels",
                                     chunks_per_file=chunks_per_file)
            content = ContentHash()
            for z, plane in enumerate(labels.slices()):
                arr[z] = stored = check_labels(plane, f"{labels_path} (slice {z})", label_format)
                content.update(stored)
            io.build_pyramid(tmp, 2, label=True, voxel_size=voxel_size, name="labels")
            io.mark_complete(tmp, {"source": str(labels_path), "label_format": label_format,
                                   FINGERPRINT: content.hexdigest()})
    return attrs
