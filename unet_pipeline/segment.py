"""Instance labels from the probability map, block by block and split across jobs.

Three steps, each a set of workflow jobs:

1. **label** (parts): each block is labelled (`labelling.label_block`:
   threshold and connected components, or the seeded watershed with a halo),
   its local ids are written to a scratch array of the store, and what the
   join needs is saved beside it: the block's faces (the local ids on each
   side of the block) for the threshold method, the keys of the cells on
   its border for the watershed;
2. **join** (one small job): provisional ids are the blocks' local ids plus
   an offset in grid order; labels that touch across a block face (threshold)
   or carry the same key (watershed) are the same cell, joined by a
   union-find (scipy's connected components) over those pairs only. It
   records which provisional ids merge into a lower one: its memory grows
   with the labels on block surfaces, not with the voxels;
3. **relabel** (parts): each block's final ids: a provisional id's component
   root (its smallest provisional id) minus the number of merged ids below
   it, i.e. consecutive ids in order of first appearance over blocks in grid
   order, the same for any number of parts.

Connectivity '2d' (default, ISBI convention: 4-connected within a slice,
slices independent) or '3d' (6-connected; threshold only). The result
equals the whole-volume labelling (`labelling.label_image`) up to the
numbering (tested), and the numbering does not depend on how the work was
split.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from unet_pipeline import atomic, probability, stores
from unet_pipeline.blockwise import PartialStore, PartSummary, run_part
from unet_pipeline.errors import InputError
from unet_pipeline.geometry import Part
from unet_pipeline.labelling import SegmentationSettings, halo_bound, label_block
from unet_pipeline.provenance import KEY as FINGERPRINT, derive_fingerprint, store_fingerprint
from unet_pipeline.pyramid import image_builder

log = logging.getLogger(__name__)

LOCAL = "_local"          # scratch array of per-block ids, dropped when the store is published
JOIN_FILE = "join.npz"
LAYOUT_VERSION = 2


def joined_axes(connectivity: str) -> tuple[int, ...]:
    """Axes along which labels can continue into the next block."""
    return (1, 2) if connectivity == "2d" else (0, 1, 2)


def segmentation_signature(prob_path, shape, settings: dict, pyramid_levels) -> dict:
    """Everything that shapes a segmentation: the probability map's fingerprint and the method's settings."""
    return {"kind": "segmentation", "probabilities": str(Path(prob_path).resolve()),
            "probabilities_fingerprint": store_fingerprint(prob_path), "shape": list(shape), **settings,
            "pyramid_levels": pyramid_levels, "layout": LAYOUT_VERSION}


def open_store(prob_path, out_path, settings: SegmentationSettings, pyramid_levels) -> tuple:
    """The segmentation's partial store (created by the first job to start) and the probability image."""
    prob = stores.open_image(prob_path)
    signature = segmentation_signature(prob_path, prob.shape, settings.to_dict(), pyramid_levels)
    per_file = stores.chunks_per_file(prob.array)
    build_image = image_builder(prob.shape, np.uint32, prob.chunks, per_file, stores.compressor(),
                                stores.voxel_size(prob_path), pyramid_levels, kind="segmentation",
                                name="segmentation", downsampling="mode", label_source="../raw.ome.zarr")

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


def border_keys(labels: np.ndarray, keys: np.ndarray) -> dict[str, np.ndarray]:
    """The local ids on a block's y/x border and their cells' keys: the only ones another block can share."""
    border = np.unique(np.concatenate([a.ravel() for a in faces(labels, (1, 2)).values()]))
    border = border[border > 0]
    return {"border": border.astype(np.int64), "keys": keys[border]}


def label_part(prob_path, out_path, part: Part, *, settings: SegmentationSettings, pyramid_levels,
               threads: int) -> PartSummary:
    """Step 1: label this job's blocks; local ids into the scratch array, what the join needs beside it."""
    store, prob = open_store(prob_path, out_path, settings, pyramid_levels)
    scale = prob.attrs[probability.SCALE_KEY]
    grid = stores.block_grid(store.array(LOCAL, "r"))
    axes = joined_axes(settings.connectivity)
    (store.work_dir / "faces").mkdir(parents=True, exist_ok=True)

    def read(box):
        return probability.decode(prob.read(box), scale)

    beyond_halo = []  # blocks with watershed tiles cut at the halo bound (appended from the worker threads)

    def compute(index, _):
        labels, keys, cut = label_block(read, grid.box(index), prob.shape, settings)
        if cut:
            beyond_halo.append(grid.box(index))
        saved = faces(labels, axes) if keys is None else border_keys(labels, keys)
        with atomic.atomic_file(_faces_file(store, index), durable=True) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **saved)
        return labels, {"count": int(labels.max()) if labels.size else 0}

    summary = run_part(store, LOCAL, grid, grid.strips(), part, "label", lambda strip: None, compute, threads)
    summary.extra["blocks_beyond_halo"] = len(beyond_halo)
    if beyond_halo:  # once per job, not per tile: a terabyte has tens of thousands of tiles
        first = min(beyond_halo, key=lambda box: box.start)
        log.warning("%s part %s: in %d of the %d blocks labelled, a cell region reaches beyond the %d px halo "
                    "bound (segment.watershed.max_halo_px; the first at voxels %s); those blocks were labelled "
                    "with that halo, so cells near their borders may differ from a whole-slice watershed. Where "
                    "cells are that large, raise the bound; where a low cell threshold joins them through leaky "
                    "membranes, raise segment.threshold", store.final, part, len(beyond_halo), summary.blocks_computed,
                    halo_bound(settings), ", ".join(f"{axis} {lo}-{hi}" for axis, lo, hi in
                                                    zip("zyx", first.start, first.stop)))
    return summary


# --------------------------------------------------------------------------- step 2: join
def _face_pairs(store: PartialStore, grid, order, offset_of, connectivity: str) -> list[np.ndarray]:
    """Threshold method: provisional ids that touch across a block face are one cell."""
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
    return pairs


def _key_pairs(store: PartialStore, order, offset_of) -> list[np.ndarray]:
    """Watershed: provisional ids whose cells carry the same key (the same seed) are one cell."""
    ids, keys = [], []
    for index in order:
        with np.load(_faces_file(store, index)) as saved:
            ids.append(saved["border"] + offset_of[index])
            keys.append(saved["keys"])
    if not ids:
        return []
    ids, keys = np.concatenate(ids), np.concatenate(keys)
    order_by_key = np.argsort(keys, kind="stable")
    ids, keys = ids[order_by_key], keys[order_by_key]
    same = keys[1:] == keys[:-1]  # consecutive ids of one key: a chain joins them all
    return [np.stack([ids[:-1][same], ids[1:][same]], axis=1)] if same.any() else []


def join(store: PartialStore, settings: SegmentationSettings) -> dict:
    """Step 2: which provisional ids are one cell; written to the store's work folder. Returns a summary."""
    records = store.require_complete(LOCAL, "rerun the segment label jobs")
    grid = stores.block_grid(store.array(LOCAL, "r"))
    order = list(grid.indices())
    counts = np.array([records[i]["count"] for i in order], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offset_of = dict(zip(order, offsets.tolist()))
    total = int(counts.sum())
    if settings.method == "watershed":
        pairs = _key_pairs(store, order, offset_of)
    else:
        pairs = _face_pairs(store, grid, order, offset_of, settings.connectivity)
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
    log.info("%s: %d provisional labels in %d blocks, %d joined across block borders: %d cells (%s)",
             store.final, total, len(order), len(eliminated), cells, settings.describe())
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
def segment(prob_path, out_path, *, settings: SegmentationSettings, pyramid_levels, threads: int = 2) -> int:
    """All three steps and the finishing one in this process; returns the number of cells."""
    from unet_pipeline.finish import finish_store

    done = label_part(prob_path, out_path, Part(0, 1), settings=settings, pyramid_levels=pyramid_levels,
                      threads=threads)
    store = PartialStore(Path(out_path), done.signature)
    join(store, settings)
    relabel_part(store, Part(0, 1), threads)
    finish_store(store, 1, threads)
    return int(stores.store_attrs(out_path)["cells"])
