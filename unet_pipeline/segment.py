"""Instance labels from the probability map: threshold, then connected components.

Labelling runs chunk by chunk over the Zarr store and still gives labels that
are consistent across chunk boundaries: each chunk is labelled on its own
(scipy.ndimage.label) with a running offset, the label pairs that touch across
every chunk face are joined in a union-find (scipy.sparse.csgraph connected
components), and a final pass maps each chunk's labels to consecutive global
ids. The result equals `scipy.ndimage.label` of the whole array up to the
numbering. Connectivity '2d' (default, ISBI convention: 4-connected within a
slice, slices independent) or '3d' (6-connected).
"""
from __future__ import annotations

import os
from pathlib import Path

import dask
import numpy as np
import zarr
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from unet_pipeline import io, provenance
from unet_pipeline.blockstore import block_grid
from unet_pipeline.errors import ConfigError


def structure(connectivity: str) -> np.ndarray:
    if connectivity == "2d":
        s = np.zeros((3, 3, 3), bool)
        s[1] = ndimage.generate_binary_structure(2, 1)
        return s
    if connectivity == "3d":
        return ndimage.generate_binary_structure(3, 1)
    raise ConfigError(f"segment.connectivity must be '2d' or '3d', got {connectivity!r}")


def _foreground(block: np.ndarray, threshold: float) -> np.ndarray:
    values = block.astype(np.float32) / 255.0 if block.dtype == np.uint8 else block.astype(np.float32)
    return values > threshold


def label_chunked(prob: zarr.Array, out: zarr.Array, threshold: float = 0.5, connectivity: str = "2d",
                  workers: int = 2) -> int:
    """Label cells (prob > threshold) of `prob` into `out` block by block; returns the cell count.

    A block is one Zarr shard of `out` (one file): two threads never write
    into the same file.
    """
    grid = block_grid(out)
    struct = structure(connectivity)
    indices = list(grid.indices())

    def local(idx):
        labels, count = ndimage.label(_foreground(np.asarray(prob[grid.box(idx).slices]), threshold), struct)
        out[grid.box(idx).slices] = labels.astype(out.dtype)
        return count

    counts = dask.compute(*[dask.delayed(local)(i) for i in indices], scheduler="threads", num_workers=workers)
    offsets = dict(zip(indices, np.cumsum([0, *counts[:-1]])))
    total = int(sum(counts))

    # Pairs of labels that touch across a chunk face (face-adjacent voxels only:
    # the structure is face connectivity along y/x, and along z for '3d').
    axes = [1, 2] if connectivity == "2d" else [0, 1, 2]
    pairs = []
    for idx in indices:
        box = grid.box(idx)
        for axis in axes:
            if box.stop[axis] >= grid.shape[axis]:
                continue
            nxt = list(idx)
            nxt[axis] += 1
            nxt = tuple(nxt)
            a_sl = list(box.slices)
            a_sl[axis] = slice(box.stop[axis] - 1, box.stop[axis])
            b_sl = list(box.slices)
            b_sl[axis] = slice(box.stop[axis], box.stop[axis] + 1)
            a = np.asarray(out[tuple(a_sl)]).astype(np.int64)
            b = np.asarray(out[tuple(b_sl)]).astype(np.int64)
            touch = (a > 0) & (b > 0)
            if touch.any():
                pairs.append(np.stack([a[touch] + offsets[idx], b[touch] + offsets[nxt]], axis=1))
    if pairs:
        edges = np.unique(np.concatenate(pairs), axis=0)
        graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(total + 1, total + 1))
        _, component = connected_components(graph, directed=False)
    else:
        component = np.arange(total + 1)
    # Consecutive ids in order of first appearance; background stays 0.
    _, first = np.unique(component[1:], return_index=True)
    remap = np.zeros(total + 1, np.int64)
    order = np.argsort(first)
    new_id = np.empty(len(first), np.int64)
    new_id[order] = np.arange(1, len(first) + 1)
    remap[1:] = new_id[np.searchsorted(np.unique(component[1:]), component[1:])]

    def relabel(idx):
        box = grid.box(idx)
        labels = np.asarray(out[box.slices]).astype(np.int64)
        glob = np.where(labels > 0, labels + offsets[idx], 0)
        out[box.slices] = remap[glob].astype(out.dtype)

    dask.compute(*[dask.delayed(relabel)(i) for i in indices], scheduler="threads", num_workers=workers)
    return len(first)


def segment(prob_path: str | os.PathLike, out_path: str | os.PathLike, threshold: float = 0.5,
            connectivity: str = "2d", workers: int = 2) -> int:
    """Segment a probability OME-Zarr into an OME-Zarr label image (written atomically)."""
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"segment.threshold must lie in [0, 1], got {threshold}")
    prob = io.open_ome_image(prob_path)
    voxel_size = io.voxel_size(prob_path)
    per_file = io.chunks_per_shard(prob)
    with io.atomic_directory(out_path) as tmp:
        out = io.create_ome_image(tmp, prob.shape, np.uint32, prob.chunks, voxel_size, name="segmentation",
                                  chunks_per_file=per_file)
        count = label_chunked(prob, out, threshold, connectivity, workers)
        io.build_pyramid(tmp, 2, label=True, voxel_size=voxel_size, name="segmentation")
        settings = {"threshold": threshold, "connectivity": connectivity}
        fingerprint = provenance.derive_fingerprint("segment", provenance.store_fingerprint(prob_path), settings)
        io.mark_complete(tmp, {"source": str(Path(prob_path)), **settings, "cells": count,
                               provenance.KEY: fingerprint})
    return count
