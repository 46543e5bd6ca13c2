"""The paper's per-pixel weight map (Ronneberger et al. 2015, Eq. 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

Cells are the 4-connected components of the cell pixels (ISBI convention:
non-zero = cell) or the instances of an instance-label image. d1 and d2 are
the distances to the nearest and second-nearest cell. The border term is
applied to membrane pixels only, as in the paper's Fig. 3d: it makes the net
learn the thin separations between touching cells.

w_c balances class frequencies per slice: w_c(x) = N / (2 N_c) for the class
c of x (N pixels, N_c of class c), so both classes carry equal total weight
and the mean of w_c over a slice is 1. A class absent from a slice gets 0.

Speed: instead of a full-slice distance transform per cell, each cell's
distance transform is computed only in its bounding box grown by the cut-off
distance D beyond which the border term is below `tolerance` (D ~ 28 px for
w0 = 10, sigma = 5, tolerance 1e-6). Where the second-nearest cell lies
farther than D the term is set to 0, an error below `tolerance`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from unet_pipeline.metrics import FOUR_CONNECTED


def instances_from_binary(labels: np.ndarray) -> np.ndarray:
    """4-connected components of the cell pixels (label 0 = membrane)."""
    inst, _ = ndimage.label(labels > 0, structure=FOUR_CONNECTED)
    return inst


def cutoff_distance(w0: float, sigma_px: float, tolerance: float) -> float:
    """Distance d with w0 * exp(-d^2 / (2 sigma^2)) == tolerance."""
    if w0 <= tolerance:
        return 0.0
    return sigma_px * math.sqrt(2.0 * math.log(w0 / tolerance))


def class_balance(cell: np.ndarray) -> tuple[float, float]:
    """(w_membrane, w_cell) = N / (2 N_c); 0 for an absent class."""
    n = cell.size
    n_cell = int(np.count_nonzero(cell))
    n_membrane = n - n_cell
    return (n / (2.0 * n_membrane) if n_membrane else 0.0, n / (2.0 * n_cell) if n_cell else 0.0)


def nearest_two_distances(instances: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """d1, d2: distances to the nearest and second-nearest instance (inf beyond `max_distance`)."""
    d1 = np.full(instances.shape, np.inf)
    d2 = np.full(instances.shape, np.inf)
    grow = int(math.ceil(max_distance)) + 1
    for label, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        window = tuple(slice(max(0, s.start - grow), min(n, s.stop + grow)) for s, n in zip(box, instances.shape))
        dist = ndimage.distance_transform_edt(instances[window] != label)
        near, second = d1[window], d2[window]
        d2[window] = np.minimum(second, np.maximum(near, dist))
        d1[window] = np.minimum(near, dist)
    return d1, d2


def _paper(w0, sigma_px) -> tuple[float, float]:
    """w0 and sigma: the given ones, else the config schema's (the paper's 10 and 5 px)."""
    from unet_pipeline import schema

    return (schema.default("weights.w0") if w0 is None else w0,
            schema.default("weights.sigma_px") if sigma_px is None else sigma_px)


def weight_map(
    labels: np.ndarray,
    w0: float | None = None,
    sigma_px: float | None = None,
    label_format: str = "binary",
    class_weights: tuple[float, float] | None = None,
    tolerance: float = 1e-6,
) -> np.ndarray:
    """Weight map of one 2D label slice (float32).

    Parameters
    ----------
    labels : 2D array; binary (non-zero = cell) or instance labels (0 = membrane).
    w0, sigma_px : border-term amplitude and width (None: the config schema's, the paper's 10 and 5 px).
    label_format : "binary" or "instances".
    class_weights : (w_membrane, w_cell) to use instead of this slice's balance
        (chunked computation passes the whole slice's values).
    tolerance : border-term values below this are treated as 0.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"weight_map expects a 2D slice, got shape {labels.shape}")
    w0, sigma_px = _paper(w0, sigma_px)
    instances = instances_from_binary(labels) if label_format == "binary" else labels.astype(np.int64)
    cell = instances > 0
    w_membrane, w_cell = class_weights if class_weights is not None else class_balance(cell)
    weights = np.where(cell, w_cell, w_membrane)
    d1, d2 = nearest_two_distances(instances, cutoff_distance(w0, sigma_px, tolerance))
    with np.errstate(invalid="ignore"):
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma_px ** 2))
    border[~np.isfinite(d2)] = 0.0
    weights = weights + np.where(cell, 0.0, border)
    return weights.astype(np.float32)


def weight_map_chunked(
    instances: np.ndarray, chunk: tuple[int, int], w0: float | None = None, sigma_px: float | None = None,
    tolerance: float = 1e-6,
) -> np.ndarray:
    """The same map computed chunk by chunk with a halo (for slices too large for one pass).

    `instances` must carry globally consistent labels (segment's chunked
    labelling provides them). The halo is the cut-off distance: beyond it no
    cell changes the border term by more than `tolerance`.
    """
    w0, sigma_px = _paper(w0, sigma_px)
    halo = int(math.ceil(cutoff_distance(w0, sigma_px, tolerance))) + 1
    class_weights = class_balance(instances > 0)
    out = np.empty(instances.shape, np.float32)
    h, w = instances.shape
    for y0 in range(0, h, chunk[0]):
        for x0 in range(0, w, chunk[1]):
            y1, x1 = min(h, y0 + chunk[0]), min(w, x0 + chunk[1])
            ry0, rx0 = max(0, y0 - halo), max(0, x0 - halo)
            ry1, rx1 = min(h, y1 + halo), min(w, x1 + halo)
            block = weight_map(instances[ry0:ry1, rx0:rx1], w0, sigma_px, "instances", class_weights, tolerance)
            out[y0:y1, x0:x1] = block[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
    return out


def weight_map_reference(labels: np.ndarray, w0: float | None = None, sigma_px: float | None = None) -> np.ndarray:
    """Straightforward version: one full-slice distance transform per cell.

    Kept as the definition the fast version is tested and benchmarked against.
    """
    w0, sigma_px = _paper(w0, sigma_px)
    instances = instances_from_binary(labels)
    cell = instances > 0
    w_membrane, w_cell = class_balance(cell)
    n = int(instances.max())
    if n == 0:
        return np.where(cell, w_cell, w_membrane).astype(np.float32)
    dists = np.stack([ndimage.distance_transform_edt(instances != k) for k in range(1, n + 1)])
    dists.sort(axis=0)
    d1 = dists[0]
    d2 = dists[1] if n > 1 else np.full(labels.shape, np.inf)
    border = np.where(np.isfinite(d2), w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma_px ** 2)), 0.0)
    return (np.where(cell, w_cell, w_membrane) + np.where(cell, 0.0, border)).astype(np.float32)


def write_weights(labels_path, out_path, *, w0: float, sigma_px: float, label_format: str, pyramid_levels,
                  threads: int = 1, chunk_px: int = 2048) -> Path:
    """The weights stage: a float32 OME-Zarr of weight maps for every label slice, in one job.

    Weights exist only for labelled (training) stacks, so one job computes
    them, a layer of blocks at a time (memory: one slice of labels and
    weights). Slices larger than `chunk_px` on a side are computed chunk by
    chunk with a halo (identical result), bounding the distance-transform
    memory. Written through the same store machinery as the block-wise
    stages: a killed job resumes with its unfinished blocks.
    """
    from unet_pipeline import stores
    from unet_pipeline.blockwise import PartialStore, run_part
    from unet_pipeline.finish import finish_store
    from unet_pipeline.geometry import Box, Part
    from unet_pipeline.provenance import store_fingerprint
    from unet_pipeline.pyramid import image_builder

    labels = stores.open_image(labels_path)
    settings = {"w0": w0, "sigma_px": sigma_px, "class_balance": "w_c = N / (2 N_c) per slice", "tolerance": 1e-6,
                "label_format": label_format}
    signature = {"kind": "weights", "labels": str(Path(labels_path).resolve()),
                 "labels_fingerprint": store_fingerprint(labels_path), **settings, "shape": list(labels.shape),
                 "chunks": list(labels.chunks), "chunks_per_file": list(stores.chunks_per_file(labels.array)),
                 "pyramid_levels": pyramid_levels}
    store = PartialStore.open(out_path, signature, image_builder(
        labels.shape, np.float32, labels.chunks, stores.chunks_per_file(labels.array), stores.compressor(),
        stores.voxel_size(labels_path), pyramid_levels, kind="weights", name="weights", downsampling="mean"))
    grid = stores.block_grid(store.array("0", "r"))
    layers = {}
    for index in grid.indices():
        layers.setdefault(index[0], []).append(index)

    def read(layer):  # one layer of blocks: whole slices, as the class balance is per slice
        region = Box.around([grid.box(i) for i in layer])
        planes = labels.read(region)
        maps = []
        for plane in planes:
            if max(plane.shape) > chunk_px:
                inst = instances_from_binary(plane) if label_format == "binary" else plane.astype(np.int64)
                maps.append(weight_map_chunked(inst, (chunk_px, chunk_px), w0, sigma_px))
            else:
                maps.append(weight_map(plane, w0, sigma_px, label_format))
        return region, np.stack(maps)

    def compute(index, layer_input):
        region, maps = layer_input
        return np.ascontiguousarray(maps[grid.box(index).relative_to(region.start).slices]), {}

    run_part(store, "0", grid, [tuple(v) for _, v in sorted(layers.items())], Part(0, 1), "weights", read,
             compute, threads)
    return finish_store(store, 1, threads)


def finish_weights(store, records: dict) -> dict:
    """The weight store's attributes: what the map was computed from, and with which settings."""
    from unet_pipeline.provenance import KEY, derive_fingerprint

    signature = store.signature
    return {**{k: v for k, v in signature.items() if k != "kind"}, KEY: derive_fingerprint("weights", signature)}
