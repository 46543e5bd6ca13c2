"""Preprocess: a TIFF or Zarr stack in, a chunked, compressed OME-Zarr out, in parts that run as separate jobs.

Each part copies its strips of the source (rows of blocks across the slice;
each source chunk is decoded once) into the raw store's blocks, refuses
non-finite voxels, and records for each block a checksum and its
contribution to the intensity statistics. The finishing job
(`finish_raw`) combines them: the store's fingerprint (a digest of the
blocks' checksums in grid order) and the normalisation statistics
(`normalise.combine_statistics`), the same however many parts ran. Labels
are checked block by block against the raw stack (shape, binary values or
instance ids) and stored the same way.

Raw intensities are stored unchanged; `Normaliser` applies the statistics on
the fly. Memory: a job holds one or two strips of the source.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from unet_pipeline import sources, stores
from unet_pipeline.blockwise import PartialStore, PartSummary, run_part
from unet_pipeline.errors import InputError
from unet_pipeline.geometry import STRIP_WIDTH_PX, Box, Part
from unet_pipeline.normalise import block_statistics, combine_statistics
from unet_pipeline.provenance import KEY as FINGERPRINT
from unet_pipeline.pyramid import image_builder
from unet_pipeline.sources import StackSource

LAYOUT_VERSION = 2  # bump when the stored content of a store changes for the same inputs and settings


def block_checksum(block: np.ndarray) -> str:
    """SHA-256 of a block's voxels with their dtype and shape (so a reshape or a cast is a change)."""
    h = hashlib.sha256(f"{block.dtype.str}{block.shape}".encode())
    h.update(memoryview(np.ascontiguousarray(block)).cast("B"))
    return h.hexdigest()


def content_fingerprint(records: dict, grid_indices) -> str:
    """A store's fingerprint from its blocks' checksums, in grid order."""
    h = hashlib.sha256()
    for index in grid_indices:
        h.update(records[index]["sha256"].encode())
    return h.hexdigest()


def _strip_reader(source: StackSource, grid):
    def read(strip):
        region = Box.around([grid.box(i) for i in strip])
        return region, source.read(region)
    return read


def _block_of(index, strip_input, grid) -> np.ndarray:
    region, data = strip_input
    return data[grid.box(index).relative_to(region.start).slices]


# --------------------------------------------------------------------------- raw
def raw_signature(source_path, shape, dtype, chunks, chunks_per_file, voxel_size, pyramid_levels) -> dict:
    """Everything that shapes a raw store: the source (path and sampled content) and the layout."""
    return {"kind": "raw", "source": str(Path(source_path).resolve()), "source_signature":
            sources.signature(source_path), "shape": list(shape), "dtype": str(dtype), "chunks": list(chunks),
            "chunks_per_file": list(chunks_per_file), "voxel_size": list(voxel_size),
            "pyramid_levels": pyramid_levels, "layout": LAYOUT_VERSION}


def raw_part(source_path: str | os.PathLike, out: str | os.PathLike, part: Part, chunks, chunks_per_file,
             voxel_size_nm, pyramid_levels, threads: int, where: str = "preprocess.voxel_size_nm") -> PartSummary:
    """Copy this job's share of the source into the raw store (created by the first part to start)."""
    source = StackSource(source_path)
    voxel = sources.resolve_voxel_size(source_path, voxel_size_nm, where)
    signature = raw_signature(source_path, source.shape, source.dtype, chunks, chunks_per_file, voxel,
                              pyramid_levels)
    store = PartialStore.open(out, signature, image_builder(
        source.shape, source.dtype, chunks, chunks_per_file, stores.compressor(), voxel, pyramid_levels,
        kind="raw", name="raw", downsampling="mean"))
    grid = stores.block_grid(store.array("0", "r"))
    total = int(np.prod(source.shape))
    floating = np.issubdtype(source.dtype, np.floating)

    def compute(index, strip_input):
        block = _block_of(index, strip_input, grid)
        if floating and not np.isfinite(block).all():
            box = grid.box(index)
            bad = int(block.size - np.count_nonzero(np.isfinite(block)))
            raise InputError(
                f"{source_path} (slices {box.start[0]}-{box.stop[0] - 1}, rows {box.start[1]}-{box.stop[1] - 1}): "
                f"{bad} voxels are NaN or infinite; replace them (e.g. with the background value) before "
                "preprocessing, normalisation cannot map them.")
        return np.ascontiguousarray(block), {"sha256": block_checksum(block),
                                             **block_statistics(block, index, total)}

    strips = grid.strips(max_width=STRIP_WIDTH_PX)
    return run_part(store, "0", grid, strips, part, "raw", _strip_reader(source, grid), compute, threads)


def finish_raw(store: PartialStore, records: dict) -> dict:
    """The raw store's attributes: source, voxel size, fingerprint, normalisation statistics."""
    grid = stores.block_grid(store.array("0", "r"))
    statistics = combine_statistics([records[i] for i in grid.indices()])
    store.array("0").attrs["normalisation"] = statistics  # beside the data too, for other readers
    signature = store.signature
    return {"source": signature["source"], "source_signature": signature["source_signature"],
            "voxel_size": signature["voxel_size"], "normalisation": statistics,
            FINGERPRINT: content_fingerprint(records, grid.indices())}


# --------------------------------------------------------------------------- labels
def check_labels(labels: np.ndarray, where: str, label_format: str) -> np.ndarray:
    """Validate labels and return them in the stored form.

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


def labels_part(labels_path: str | os.PathLike, raw_path: str | os.PathLike, out: str | os.PathLike, part: Part,
                label_format: str, chunks, chunks_per_file, voxel_size_nm, pyramid_levels, threads: int,
                where: str = "preprocess.voxel_size_nm") -> PartSummary:
    """Check and copy this job's share of a label stack (it must match the raw stack's shape)."""
    labels = StackSource(labels_path)
    raw = sources.header(raw_path)
    if labels.shape != raw.shape:
        raise InputError(f"{labels_path}: label stack shape {labels.shape} does not match raw stack {raw_path} "
                         f"shape {raw.shape}.")
    voxel = sources.resolve_voxel_size(raw_path, voxel_size_nm, where)
    dtype = np.uint8 if label_format == "binary" else np.uint32
    signature = {"kind": "labels", "source": str(Path(labels_path).resolve()),
                 "source_signature": sources.signature(labels_path), "label_format": label_format,
                 "shape": list(labels.shape), "chunks": list(chunks), "chunks_per_file": list(chunks_per_file),
                 "voxel_size": list(voxel), "pyramid_levels": pyramid_levels, "layout": LAYOUT_VERSION}
    store = PartialStore.open(out, signature, image_builder(
        labels.shape, dtype, chunks, chunks_per_file, stores.compressor(), voxel, pyramid_levels,
        kind="labels", name="labels", downsampling="mode"))
    grid = stores.block_grid(store.array("0", "r"))

    def compute(index, strip_input):
        box = grid.box(index)
        where_block = f"{labels_path} (slices {box.start[0]}-{box.stop[0] - 1})" if box.shape[0] > 1 \
            else f"{labels_path} (slice {box.start[0]})"
        stored = check_labels(_block_of(index, strip_input, grid), where_block, label_format)
        return stored, {"sha256": block_checksum(stored)}

    strips = grid.strips(max_width=STRIP_WIDTH_PX)
    return run_part(store, "0", grid, strips, part, "labels", _strip_reader(labels, grid), compute, threads)


def finish_labels(store: PartialStore, records: dict) -> dict:
    """The label store's attributes: source, format, voxel size, fingerprint."""
    grid = stores.block_grid(store.array("0", "r"))
    signature = store.signature
    return {"source": signature["source"], "source_signature": signature["source_signature"],
            "label_format": signature["label_format"], "voxel_size": signature["voxel_size"],
            FINGERPRINT: content_fingerprint(records, grid.indices())}


# --------------------------------------------------------------------------- in one process
def preprocess(raw_path, out_raw, labels_path=None, out_labels=None, *, chunks, chunks_per_file,
               voxel_size_nm=None, label_format=None, pyramid_levels=None, threads: int = 2) -> dict:
    """Raw (and labels) in one process: every part, then the finishing step. Returns the raw attributes.

    For tests, benchmarks and small stacks; the workflow runs the parts as
    separate jobs (`unet-pipeline preprocess --part i/N`, then `finish`).
    Settings left None take the config schema's defaults.
    """
    from unet_pipeline import schema
    from unet_pipeline.finish import finish_store

    voxel_size_nm = schema.default("preprocess.voxel_size_nm") if voxel_size_nm is None else voxel_size_nm
    label_format = schema.dataset_key("label_format")["default"] if label_format is None else label_format
    pyramid_levels = schema.default("pyramid.levels") if pyramid_levels is None else pyramid_levels
    attrs = {}
    if out_raw is not None:
        done = raw_part(raw_path, out_raw, Part(0, 1), chunks, chunks_per_file, voxel_size_nm, pyramid_levels,
                        threads)
        finish_store(PartialStore(Path(out_raw), done.signature), 1, threads)
        attrs = stores.store_attrs(out_raw)
    if labels_path is not None and out_labels is not None:
        done = labels_part(labels_path, raw_path, out_labels, Part(0, 1), label_format, chunks, chunks_per_file,
                           voxel_size_nm, pyramid_levels, threads)
        finish_store(PartialStore(Path(out_labels), done.signature), 1, threads)
    return attrs
