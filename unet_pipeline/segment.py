"""Instance labels from the probability map, block by block and split across jobs.

Three steps, each a set of workflow jobs:

1. **label** (parts): each block is labelled on its own (threshold, then
   connected components with scipy.ndimage.label), its local ids are written
   to a scratch array of the store, and its faces (the local ids on each
   side of the block) are saved beside it;
2. **join** (one small job): provisional ids are the blocks' local ids plus
   an offset in grid order; labels that touch across a block face are the
   same cell, joined by a union-find (scipy's connected components) over the
   face pairs only. It records which provisional ids merge into a lower one:
   its memory grows with the labels on block surfaces, not with the voxels;
3. **relabel** (parts): each block's final ids: a provisional id's component
   root (its smallest provisional id) minus the number of merged ids below
   it, i.e. consecutive ids in order of first appearance over blocks in grid
   order, the same for any number of parts.

Connectivity '2d' (default, ISBI convention: 4-connected within a slice,
slices independent) or '3d' (6-connected). The result equals
`scipy.ndimage.label` of the whole volume up to the numbering (tested), and
the numbering does not depend on how the work was split.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from unet_pipeline import atomic, stores
from unet_pipeline.blockwise import PartialStore, PartSummary, run_part
from unet_pipeline.errors import ConfigError, InputError
from unet_pipeline.geometry import Box, Part
from unet_pipeline.provenance import KEY as FINGERPRINT, derive_fingerprint, store_fingerprint
from unet_pipeline.pyramid import image_builder
from unet_pipeline.schema import choices

log = logging.getLogger(__name__)

LOCAL = "_local"          # scratch array of per-block ids, dropped when the store is published
JOIN_FILE = "join.npz"
LAYOUT_VERSION = 2


def structure(connectivity: str) -> np.ndarray:
    """Face connectivity: 4-connected within a slice ('2d') or 6-connected ('3d')."""
    if connectivity == "2d":
        s = np.zeros((3, 3, 3), bool)
        s[1] = ndimage.generate_binary_structure(2, 1)
        return s
    if connectivity == "3d":
        return ndimage.generate_binary_structure(3, 1)
    raise ConfigError(f"segment.connectivity must be one of {choices('segment.connectivity')}, got {connectivity!r}")


def joined_axes(connectivity: str) -> tuple[int, ...]:
    """Axes along which labels can continue into the next block."""
    return (1, 2) if connectivity == "2d" else (0, 1, 2)


def segmentation_signature(prob_path, shape, settings: dict, pyramid_levels) -> dict:
    return {"kind": "segmentation", "probabilities": str(Path(prob_path).resolve()),
            "probabilities_fingerprint": store_fingerprint(prob_path), "shape": list(shape), **settings,
            "pyramid_levels": pyramid_levels, "layout": LAYOUT_VERSION}


def _settings(threshold: float, connectivity: str) -> dict:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"segment.threshold must lie in [0, 1], got {threshold}")
    structure(connectivity)
    return {"method": "threshold", "threshold": float(threshold), "connectivity": connectivity}


def open_store(prob_path, out_path, threshold: float, connectivity: str, pyramid_levels) -> tuple:
    """The segmentation's partial store (created by the first job to start) and the probability image."""
    prob = stores.open_image(prob_path)
    settings = _settings(threshold, connectivity)
    signature = segmentation_signature(prob_path, prob.shape, settings, pyramid_levels)
    per_file = stores.chunks_per_file(prob.array)
    build_image = image_builder(prob.shape, np.uint32, prob.chunks, per_file, stores.compressor(),
                                stores.voxel_size(prob_path), pyramid_levels, kind="segmentation",
                                name="segmentation", averaged=False, label_source="../raw.ome.zarr")

    def build(group):
        build_image(group)
        stores.create_array(group, LOCAL, prob.shape, np.uint32, prob.chunks, per_file, stores.fast_compressor())

    return PartialStore.open(out_path, signature, build), prob


# --------------------------------------------------------------------------- step 1: label
def faces(labels: np.ndarray, axes) -> dict[str, np.ndarray]:
    """A block's labels on its low and high face along each joined axis."""
    out = {}
    for axis in axes:
        out[f"lo{axis}"] = np.take(labels, 0, axis=axis)
        out[f"hi{axis}"] = np.take(labels, labels.shape[axis] - 1, axis=axis)
    return out


def _faces_file(store: PartialStore, index) -> Path:
    return store.work_dir / "faces" / (".".join(map(str, index)) + ".npz")


def label_part(prob_path, out_path, part: Part, *, threshold: float, connectivity: str, pyramid_levels,
               threads: int) -> PartSummary:
    """Step 1: label this job's blocks independently; local ids into the scratch array, faces beside it."""
    store, prob = open_store(prob_path, out_path, threshold, connectivity, pyramid_levels)
    scale = prob.attrs[stores.PROBABILITY_SCALE_KEY]
    grid = stores.block_grid(store.array(LOCAL, "r"))
    struct, axes = structure(connectivity), joined_axes(connectivity)
    (store.work_dir / "faces").mkdir(parents=True, exist_ok=True)

    def compute(index, _):
        box = grid.box(index)
        foreground = stores.as_probability(prob.read(box), scale) > threshold
        labels, count = ndimage.label(foreground, struct)
        labels = labels.astype(np.uint32)
        with atomic.atomic_file(_faces_file(store, index), durable=True) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **faces(labels, axes))
        return labels, {"count": int(count)}

    return run_part(store, LOCAL, grid, grid.strips(), part, "label", lambda strip: None, compute, threads)


# --------------------------------------------------------------------------- step 2: join
def join(store: PartialStore, connectivity: str) -> dict:
    """Step 2: which provisional ids are one cell; written to the store's work folder. Returns a summary."""
    records = store.require_complete(LOCAL, "rerun the segment label jobs")
    grid = stores.block_grid(store.array(LOCAL, "r"))
    order = list(grid.indices())
    counts = np.array([records[i]["count"] for i in order], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offset_of = dict(zip(order, offsets.tolist()))
    total = int(counts.sum())
    pairs = []
    for index in order:
        with np.load(_faces_file(store, index)) as mine:
            for axis in joined_axes(connectivity):
                neighbour = tuple(i + (k == axis) for k, i in enumerate(index))
                if neighbour[axis] >= grid.grid_shape[axis]:
                    continue
                with np.load(_faces_file(store, neighbour)) as theirs:
                    a, b = mine[f"hi{axis}"].astype(np.int64), theirs[f"lo{axis}"].astype(np.int64)
                touch = (a > 0) & (b > 0)
                if touch.any():
                    pairs.append(np.unique(np.stack([a[touch] + offset_of[index], b[touch] + offset_of[neighbour]],
                                                    axis=1), axis=0))
    if pairs:
        edges = np.unique(np.concatenate(pairs), axis=0)
        border = np.unique(edges)  # provisional ids on a joined face: the only ones that can merge
        local = np.searchsorted(border, edges)
        graph = coo_matrix((np.ones(len(local)), (local[:, 0], local[:, 1])), shape=(len(border), len(border)))
        _, component = connected_components(graph, directed=False)
        roots = np.full(component.max() + 1, np.iinfo(np.int64).max)
        np.minimum.at(roots, component, border)
        border_root = roots[component]
    else:
        border = border_root = np.zeros(0, np.int64)
    eliminated = np.sort(border[border_root != border])
    with atomic.atomic_file(store.work_dir / JOIN_FILE, durable=True) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, border=border, border_root=border_root, eliminated=eliminated, offsets=offsets,
                     total=np.int64(total))
    cells = total - len(eliminated)
    log.info("%s: %d provisional labels in %d blocks, %d joined across block faces: %d cells", store.final,
             total, len(order), len(eliminated), cells)
    return {"provisional": total, "cells": cells, "joined": int(len(eliminated))}


# --------------------------------------------------------------------------- step 3: relabel
def final_ids(provisional: np.ndarray, border: np.ndarray, border_root: np.ndarray,
              eliminated: np.ndarray) -> np.ndarray:
    """Final ids of provisional ids: their component's root, numbered among roots in increasing order."""
    root = provisional.copy()
    if border.size:
        pos = np.clip(np.searchsorted(border, provisional), 0, len(border) - 1)
        on_border = border[pos] == provisional
        root[on_border] = border_root[pos[on_border]]
    return root - np.searchsorted(eliminated, root)


def relabel_part(store: PartialStore, part: Part, threads: int) -> PartSummary:
    """Step 3: write this job's blocks with their final ids."""
    join_file = store.work_dir / JOIN_FILE
    if not join_file.exists():
        raise InputError(f"{store.path}: the join step has not run; run `unet-pipeline segment --step join`.")
    with np.load(join_file) as data:
        border, border_root, eliminated, offsets = (data[k] for k in ("border", "border_root", "eliminated",
                                                                       "offsets"))
    local = store.array(LOCAL, "r")
    grid = stores.block_grid(local)
    offset_of = dict(zip(grid.indices(), offsets.tolist()))

    def compute(index, _):
        ids = np.asarray(local[grid.box(index).slices])
        count = int(ids.max()) if ids.size else 0
        table = np.zeros(count + 1, np.uint32)
        if count:
            table[1:] = final_ids(np.arange(1, count + 1, dtype=np.int64) + offset_of[index], border, border_root,
                                  eliminated)
        return table[ids], {}

    return run_part(store, "0", grid, grid.strips(), part, "relabel", lambda strip: None, compute, threads)


def finish_segmentation(store: PartialStore, records: dict) -> dict:
    """The finished segmentation's attributes: settings, cell count, fingerprint."""
    with np.load(store.work_dir / JOIN_FILE) as data:
        cells = int(data["total"]) - len(data["eliminated"])
    signature = store.signature
    return {**{k: v for k, v in signature.items() if k != "kind"}, "cells": cells,
            FINGERPRINT: derive_fingerprint("segment", signature)}


# --------------------------------------------------------------------------- in one process
def segment(prob_path, out_path, *, threshold: float, connectivity: str, pyramid_levels, threads: int = 2) -> int:
    """All three steps and the finishing one in this process; returns the number of cells."""
    from unet_pipeline.finish import finish_store

    done = label_part(prob_path, out_path, Part(0, 1), threshold=threshold, connectivity=connectivity,
                      pyramid_levels=pyramid_levels, threads=threads)
    store = PartialStore(Path(out_path), done.signature)
    join(store, connectivity)
    relabel_part(store, Part(0, 1), threads)
    finish_store(store, 1, threads)
    return int(stores.store_attrs(out_path)["cells"])
