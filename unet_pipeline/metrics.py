"""The ISBI 2012 challenge metrics, exactly as its reference code computed them.

Every definition follows ../shared/docs/METRICS.md (the metric classes of
Fiji's Trainable Segmentation plugin): pixel error, foreground-restricted Rand
error, warping error (splits + mergers, minimum over thresholds), V_rand and
V_info after a 4-connected watershed, and the plain Jain warping residual.
Inputs are (slices, y, x) stacks; ground truth 255 = cell, proposal = float
probability in [0, 1], high = cell. The warping loop and the watershed are
compiled with numba; everything else is vectorised NumPy/SciPy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from scipy import ndimage

from unet_pipeline.errors import ConfigError, InputError

FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


# --------------------------------------------------------------------------- inputs
def thresholds(count: int | None = None, maximum: float = 1.0) -> list[float]:
    """0.0, 0.1, ... accumulated in float64 while <= maximum (11 values for 1.0).

    The last value for maximum 1.0 is 0.9999999999999999, so p == 1.0 counts
    as cell: this is how the reference loop behaves.
    """
    values, th = [], 0.0
    while th <= maximum:
        values.append(th)
        th += 0.1
    return values if count is None else values[:count]


PROPOSAL_KINDS = ("probability", "binary", "instances")


def as_cell_probability(
    proposal: np.ndarray, membrane_probability: bool = False, kind: str = "probability"
) -> np.ndarray:
    """Validate a proposal and return float64 cell probability, shape (slices, y, x).

    Parameters
    ----------
    proposal : float array in [0, 1]; uint8 is read as 0-255 and divided by 255.
    membrane_probability : the map gives membrane (not cell) probability; flip it.
    kind : "probability" (default), "binary" (non-zero = cell) or "instances"
        (label image; label 0 = membrane, any other label = cell).
    """
    p = np.asarray(proposal)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3:
        raise InputError(f"proposal must be 2D or 3D (slices, y, x), got shape {p.shape}")
    if kind == "binary":
        p = (p != 0).astype(np.float64)
    elif kind == "instances":
        p = cells_of_labels(p)
    elif kind != "probability":
        raise ConfigError(f"proposal kind must be one of {', '.join(PROPOSAL_KINDS)}, got {kind!r}")
    elif p.dtype == np.uint8:
        p = p.astype(np.float64) / 255.0
    elif np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
        if np.isnan(p).any():
            raise InputError("proposal contains NaN values")
        if p.min() < 0.0 or p.max() > 1.0:
            raise InputError(
                f"proposal values must lie in [0, 1], found [{p.min():g}, {p.max():g}]; "
                "convert 0-255 maps to uint8 or divide by 255"
            )
    else:
        raise InputError(f"proposal dtype {p.dtype} is not supported; use float in [0, 1] or uint8 0-255")
    return 1.0 - p if membrane_probability else p


def cells_of_labels(labels: np.ndarray) -> np.ndarray:
    """A label image (0 = membrane, each other value one cell) as a cell map scored as the labels it holds.

    Two different labels that touch are two cells: the pixels of the higher
    label that 4-touch a lower non-zero label are drawn as membrane (one
    pixel wide, as ISBI submissions drew boundaries), so the cells stay
    4-separated when the metrics take connected components. Binarising the
    labels instead (non-zero = cell) would merge every pair of touching cells.
    Works on (y, x) or (slices, y, x); slices stay independent.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return cells_of_labels(labels[None])[0]
    boundary = np.zeros(labels.shape, bool)
    for axis in (1, 2):
        a = np.swapaxes(labels, 0, axis)
        lo, hi = a[:-1], a[1:]  # pairs of 4-neighbours along `axis`
        differ = (lo != hi) & (lo > 0) & (hi > 0)
        mark = np.swapaxes(boundary, 0, axis)
        mark[1:] |= differ & (hi > lo)
        mark[:-1] |= differ & (lo > hi)
    return ((labels > 0) & ~boundary).astype(np.float64)


def as_ground_truth(labels: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Validate ground truth (255 = cell, 0 = membrane) and return it as float64."""
    gt = np.asarray(labels)
    if gt.ndim == 2:
        gt = gt[None]
    if gt.ndim != 3:
        raise InputError(f"ground truth must be 2D or 3D, got shape {gt.shape}")
    if shape is not None and gt.shape != tuple(shape):
        raise InputError(f"ground truth shape {gt.shape} does not match proposal shape {tuple(shape)}")
    gt = gt.astype(np.float64)
    if np.isnan(gt).any():
        raise InputError("ground truth contains NaN values")
    return gt


def label4(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=FOUR_CONNECTED)


def f_score(tp: float, fp: float, fn: float) -> float:
    precision = 1.0 if fp == 0 else tp / (tp + fp)
    recall = 1.0 if fn == 0 else tp / (tp + fn)
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- counts
def pixel_counts(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """TP, FP, FN of the cell class."""
    return (float(np.count_nonzero(pred & truth)), float(np.count_nonzero(pred & ~truth)),
            float(np.count_nonzero(~pred & truth)))


def _contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, n_ij) over the pixels with a > 0."""
    keep = a > 0
    ai = a[keep].astype(np.int64)
    bj = b[keep].astype(np.int64)
    if ai.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    base = int(bj.max()) + 1
    key = ai * base + bj
    size = (int(ai.max()) + 1) * base
    if size <= 4 * key.size + 1_000_000:  # dense table: a counting pass instead of a sort
        counts = np.bincount(key, minlength=size)
        uniq = np.flatnonzero(counts)
        counts = counts[uniq]
    else:
        uniq, counts = np.unique(key, return_counts=True)
    return uniq // base, uniq % base, counts


def rand_counts(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """TP, FP, FN of the foreground-restricted Rand index for one slice.

    Proposal label 0 inside ground-truth cells: each pixel is its own segment.
    """
    i, j, n = _contingency(a, b)
    n = n.astype(np.float64)
    on_membrane = float(n[j == 0].sum())
    inside = j > 0
    tp = float(np.sum(n[inside] ** 2)) + on_membrane
    col = np.bincount(j[inside], weights=n[inside]) if inside.any() else np.zeros(1)
    predicted = float(np.sum(col ** 2)) + on_membrane
    actual = float(np.sum(np.bincount(i, weights=n) ** 2)) if i.size else 0.0
    return tp, predicted - tp, actual - tp


def info_score(a: np.ndarray, b: np.ndarray) -> float:
    """V_info of one slice (foreground-restricted, proposal label 0 = singletons)."""
    i, j, n = _contingency(a, b)
    total = float(n.sum())
    if total == 0:
        return f_score(0, 0, 0)
    p = n / total
    c = float(p[j == 0].sum())
    a_marg = np.bincount(i, weights=p)
    a_marg = a_marg[a_marg > 0]
    inside = j > 0
    b_marg = np.bincount(j[inside], weights=p[inside]) if inside.any() else np.zeros(0)
    b_marg = b_marg[b_marg > 0]
    log_n = math.log(total)
    s_a = float(np.sum(a_marg * np.log(a_marg)))
    s_b = float(np.sum(b_marg * np.log(b_marg))) - c * log_n
    p_in = p[inside]
    s_ab = float(np.sum(p_in * np.log(p_in))) - c * log_n
    h_a, h_b = -s_a, -s_b
    h_a_given_b, h_b_given_a = s_b - s_ab, s_a - s_ab
    if h_a == 0:
        precision, recall = 0.0, 1.0
    elif h_b == 0:
        precision, recall = 1.0, 0.0
    else:
        precision = (h_a - h_a_given_b) / h_a
        recall = (h_b - h_b_given_a) / h_b
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)


@numba.njit(cache=True)
def _flood_membrane(lab: np.ndarray, basins: int) -> np.ndarray:
    """Vincent-Soille flooding of the membrane level from labelled basins (in place).

    `lab` holds basin labels (> 0) on cell pixels and -2 (MASK) on membrane.
    Membrane pixels are flooded first in, first out (column-major scan,
    neighbours W, N, E, S; a neighbour counts once its distance is <= the
    current one, as in the reference code); where basins meet the pixel
    becomes 0 (a one-pixel line); membrane blobs touching no basin get new
    labels.
    """
    h, w = lab.shape
    mask_label, wshed = -2, 0
    dist = np.zeros((h, w), np.int32)
    size = h * w + 1
    queue = np.empty(size, np.int32)
    dy = (0, -1, 0, 1)
    dx = (-1, 0, 1, 0)
    head = tail = count = 0
    for x in range(w):
        for y in range(h):
            if lab[y, x] == mask_label:
                for k in range(4):
                    ry, rx = y + dy[k], x + dx[k]
                    if 0 <= ry < h and 0 <= rx < w and lab[ry, rx] > 0:
                        dist[y, x] = 1
                        queue[tail] = y * w + x
                        tail += 1
                        count += 1
                        break
    fictitious = -1
    cur_dist = 1
    queue[tail] = fictitious
    tail += 1
    count += 1
    while True:
        p = queue[head]
        head = head + 1 if head + 1 < size else 0
        count -= 1
        if p == fictitious:
            if count == 0:
                break
            queue[tail] = fictitious
            tail = tail + 1 if tail + 1 < size else 0
            count += 1
            cur_dist += 1
            p = queue[head]
            head = head + 1 if head + 1 < size else 0
            count -= 1
        py, px = p // w, p % w
        # `flag` (Soille's correction): a pixel made a line only by a line
        # neighbour may still join a basin; one made a line by two basins may not.
        flag = False
        for k in range(4):
            qy, qx = py + dy[k], px + dx[k]
            if not (0 <= qy < h and 0 <= qx < w):
                continue
            lq = lab[qy, qx]
            if dist[qy, qx] <= cur_dist and (lq > 0 or lq == wshed):
                if lq > 0:
                    if lab[py, px] == mask_label or (lab[py, px] == wshed and flag):
                        lab[py, px] = lq
                    elif lab[py, px] != lq:
                        lab[py, px] = wshed
                        flag = False
                elif lab[py, px] == mask_label:
                    lab[py, px] = wshed
                    flag = True
            elif lq == mask_label and dist[qy, qx] == 0:
                dist[qy, qx] = cur_dist + 1
                queue[tail] = qy * w + qx
                tail = tail + 1 if tail + 1 < size else 0
                count += 1
    # Membrane blobs that no basin reached become basins of their own.
    current = basins
    for x in range(w):
        for y in range(h):
            if lab[y, x] == mask_label:
                current += 1
                head, tail = 0, 1
                queue[0] = y * w + x
                lab[y, x] = current
                while head < tail:
                    q = queue[head]
                    head += 1
                    qy, qx = q // w, q % w
                    for k in range(4):
                        ry, rx = qy + dy[k], qx + dx[k]
                        if 0 <= ry < h and 0 <= rx < w and lab[ry, rx] == mask_label:
                            lab[ry, rx] = current
                            queue[tail] = ry * w + rx
                            tail += 1
    return lab


def watershed_labels(cell: np.ndarray) -> np.ndarray:
    """4-connected watershed of the image (cell ? 0 : 255), as used for V_rand / V_info.

    Basins are the 4-components of the cell pixels (their numbering does not
    matter: only equality of labels is used); 0 marks watershed lines.
    """
    basins, count = label4(cell)
    lab = np.where(cell, basins, -2).astype(np.int32)
    return _flood_membrane(lab, count)


# --------------------------------------------------------------------------- warping
def _simple_point_table() -> np.ndarray:
    """256-entry table: is the centre of this 8-neighbourhood a simple point?

    Bit k of the index is neighbour k in the order NW, N, NE, E, SE, S, SW, W.
    Simple (cell 4-connected, membrane 8-connected): the cell neighbours form
    exactly one 4-component touching a 4-neighbour of the centre, and the
    membrane neighbours form exactly one 8-component.
    """
    table = np.zeros(256, np.bool_)
    ring = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0)]
    four_neighbours = {(0, 1), (1, 2), (2, 1), (1, 0)}
    for code in range(256):
        patch = np.zeros((3, 3), bool)
        for k, (y, x) in enumerate(ring):
            patch[y, x] = bool(code >> k & 1)
        cells, _ = ndimage.label(patch, structure=FOUR_CONNECTED)
        touching = {cells[p] for p in four_neighbours if cells[p] > 0}
        background = ~patch
        background[1, 1] = False
        _, n_membrane = ndimage.label(background, structure=np.ones((3, 3), bool))
        table[code] = len(touching) == 1 and n_membrane == 1
    return table


SIMPLE_POINT = _simple_point_table()


@numba.njit(cache=True)
def _neighbourhood_code(img: np.ndarray, y: int, x: int) -> int:
    return (
        img[y - 1, x - 1] * 1 + img[y - 1, x] * 2 + img[y - 1, x + 1] * 4 + img[y, x + 1] * 8
        + img[y + 1, x + 1] * 16 + img[y + 1, x] * 32 + img[y + 1, x - 1] * 64 + img[y, x - 1] * 128
    )


@numba.njit(cache=True)
def _warp(labels: np.ndarray, target: np.ndarray, key: np.ndarray, simple: np.ndarray) -> np.ndarray:
    """Warp `labels` towards `target` by flipping simple points (padded uint8 images).

    Passes repeat until no mismatch is left or a pass changes nothing; each
    pass lists mismatches column-major, sorts them stably by descending key
    and flips, in that order, each one that is simple in the current image.
    Flips only ever remove mismatches and keys are fixed, so each pass's
    sorted list is the first pass's sorted list minus the pixels already
    fixed: one scan and one sort serve all passes.
    """
    h, w = labels.shape
    warped = labels.copy()
    count = 0
    for x in range(w):
        for y in range(h):
            if warped[y, x] != target[y, x]:
                count += 1
    ys = np.empty(count, np.int64)
    xs = np.empty(count, np.int64)
    keys = np.empty(count, np.float32)
    n = 0
    for x in range(w):
        for y in range(h):
            if warped[y, x] != target[y, x]:
                ys[n] = y
                xs[n] = x
                keys[n] = -key[y, x]
                n += 1
    order = np.argsort(keys, kind="mergesort")
    py = ys[order]
    px = xs[order]
    remaining = count
    while remaining > 0:
        kept = 0
        for k in range(remaining):
            y, x = py[k], px[k]
            if simple[_neighbourhood_code(warped, y, x)]:
                warped[y, x] = 1 - warped[y, x]
            else:  # compact in place: the next pass walks only what is left
                py[kept] = y
                px[kept] = x
                kept += 1
        if kept == remaining:
            break
        remaining = kept
    return warped


@numba.njit(cache=True)
def _neighbour_labels(comp: np.ndarray, y: int, x: int, out: np.ndarray) -> int:
    """Distinct labels among the in-image 8-neighbours of (y, x); returns how many."""
    h, w = comp.shape
    n = 0
    for oy in range(-1, 2):
        for ox in range(-1, 2):
            if oy == 0 and ox == 0:
                continue
            ny, nx = y + oy, x + ox
            if 0 <= ny < h and 0 <= nx < w:
                v = comp[ny, nx]
                seen = False
                for k in range(n):
                    if out[k] == v:
                        seen = True
                        break
                if not seen:
                    out[n] = v
                    n += 1
    return n


@numba.njit(cache=True)
def _labels_around_cut(window: np.ndarray, visited: np.ndarray, queue: np.ndarray) -> int:
    """Distinct CC4 labels (0 included) among the centre's 8 neighbours, centre set to membrane.

    Same count as relabelling the whole window, but each flood stops as soon
    as it has reached every cell neighbour of the centre.
    """
    h, w = window.shape
    cy, cx = h // 2, w // 2
    visited[:, :] = 0
    visited[cy, cx] = 1  # the centre is membrane now
    has_membrane = 0
    targets = 0
    for oy in range(-1, 2):
        for ox in range(-1, 2):
            if oy == 0 and ox == 0:
                continue
            if window[cy + oy, cx + ox]:
                targets += 1
            else:
                has_membrane = 1
    components = 0
    reached = 0
    for oy in range(-1, 2):
        for ox in range(-1, 2):
            sy, sx = cy + oy, cx + ox
            if (oy == 0 and ox == 0) or not window[sy, sx] or visited[sy, sx]:
                continue
            components += 1
            visited[sy, sx] = 1
            reached += 1
            head, tail = 0, 1
            queue[0] = sy * w + sx
            while head < tail and reached < targets:
                q = queue[head]
                head += 1
                qy, qx = q // w, q % w
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    ry, rx = qy + dy, qx + dx
                    if 0 <= ry < h and 0 <= rx < w and window[ry, rx] and not visited[ry, rx]:
                        visited[ry, rx] = 1
                        if abs(ry - cy) <= 1 and abs(rx - cx) <= 1:
                            reached += 1
                        queue[tail] = ry * w + rx
                        tail += 1
    return components + has_membrane


@numba.njit(cache=True)
def _classify_kernel(warped: np.ndarray, target: np.ndarray, comp: np.ndarray) -> tuple[int, int, int]:
    h, w = warped.shape
    buf = np.empty(8, np.int64)
    window = np.zeros((41, 41), np.uint8)
    visited = np.zeros((41, 41), np.uint8)
    queue = np.empty(41 * 41, np.int64)
    splits = merges = residual = 0
    for y in range(h):
        for x in range(w):
            if warped[y, x] == target[y, x]:
                continue
            residual += 1
            n = _neighbour_labels(comp, y, x, buf)
            is_cell = warped[y, x] == 1
            if n >= 3:
                if is_cell:
                    splits += 1
                else:
                    merges += 1
            elif n == 2 and is_cell:
                # Does removing this cell pixel cut its object locally?
                for wy in range(41):
                    for wx in range(41):
                        sy, sx = y - 20 + wy, x - 20 + wx
                        window[wy, wx] = warped[sy, sx] if 0 <= sy < h and 0 <= sx < w else 0
                if _labels_around_cut(window, visited, queue) > 2:
                    splits += 1
    return splits, merges, residual


def _classify_mismatches(warped: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """(splits, merges, all residual mismatches) of a warped slice (unpadded)."""
    comp, _ = label4(warped)
    return _classify_kernel(warped, target, comp.astype(np.int64))


def warp_slice(gt_cell: np.ndarray, prob: np.ndarray, th: float) -> tuple[np.ndarray, np.ndarray]:
    """Warp ground truth towards the thresholded proposal; returns (warped, target) unpadded."""
    labels = np.pad(gt_cell.astype(np.uint8), 1)
    target = np.pad((prob > th).astype(np.uint8), 1)
    key = np.pad(np.abs(prob - th).astype(np.float32), 1)
    warped = _warp(labels, target, key, SIMPLE_POINT)
    return warped[1:-1, 1:-1], target[1:-1, 1:-1]


# --------------------------------------------------------------------------- per slice, then aggregated
ALL_METRICS = ("pixel", "rand", "warping", "thinned")


@dataclass
class SliceStatistics:
    """Everything one slice contributes, per threshold, before aggregation over slices."""

    pixels: int
    pixel_counts: np.ndarray     # (11, 3) TP, FP, FN
    rand_counts: np.ndarray      # (11, 3) TP, FP, FN
    splits: np.ndarray           # (10,)
    merges: np.ndarray           # (10,)
    residual_at_0_5: float       # all mismatches left after warping at 0.5
    v_rand: np.ndarray           # (11,)
    v_info: np.ndarray           # (11,)


def slice_statistics(gt: np.ndarray, prob: np.ndarray, which: tuple[str, ...] = ALL_METRICS) -> SliceStatistics:
    """Statistics of one 2D slice: gt float (255 = cell), prob float64 cell probability."""
    ths = thresholds()
    nan3 = np.full((len(ths), 3), np.nan)
    stats = SliceStatistics(gt.size, nan3.copy(), nan3.copy(), np.full(10, np.nan), np.full(10, np.nan),
                            np.nan, np.full(len(ths), np.nan), np.full(len(ths), np.nan))
    truth_mask, truth_labels = None, None
    for k, th in enumerate(ths):
        pred = prob > th
        if "pixel" in which:
            stats.pixel_counts[k] = pixel_counts(gt > 0, pred)
        if "rand" in which or "thinned" in which:
            mask = gt > th
            if truth_mask is None or not np.array_equal(mask, truth_mask):
                truth_mask, truth_labels = mask, label4(mask)[0]  # 0/255 truth: labelled once
            a = truth_labels
            if "rand" in which:
                stats.rand_counts[k] = rand_counts(a, label4(pred)[0])
            if "thinned" in which:
                b = watershed_labels(pred)
                stats.v_rand[k] = f_score(*rand_counts(a, b))
                stats.v_info[k] = info_score(a, b)
        if "warping" in which and k < 10:
            warped, target = warp_slice(gt > 0, prob, th)
            stats.splits[k], stats.merges[k], residual = _classify_mismatches(warped, target)
            if k == 5:  # th = 0.5
                stats.residual_at_0_5 = float(residual)
    return stats


@dataclass
class MetricResult:
    """Scores of one evaluation and the per-threshold curves they were optimised over."""

    pixel_error: float
    rand_error: float
    warping_error: float
    warping_residual_at_0_5: float
    v_rand: float
    v_info: float
    curves: dict
    best_thresholds: dict = None  # metric -> the threshold its best value came from (ISBI: each its own)

    def summary(self) -> dict:
        """The five ISBI scores and the plain warping residual, by name."""
        return {
            "pixel_error": self.pixel_error,
            "rand_error": self.rand_error,
            "warping_error": self.warping_error,
            "warping_residual_at_0.5": self.warping_residual_at_0_5,
            "v_rand": self.v_rand,
            "v_info": self.v_info,
        }


def aggregate(stats: list[SliceStatistics]) -> MetricResult:
    """Combine slices as each metric defines it (METRICS.md).

    Pixel and Rand error: TP/FP/FN summed over slices, then 1 - max F over
    thresholds. Warping error: splits + merges summed over slices / all
    pixels, minimum over thresholds 0.0..0.9. V_rand / V_info: mean over
    slices, then maximum over thresholds. Residual: mean over slices.
    """
    ths = thresholds()
    pixels = sum(s.pixels for s in stats)
    px = np.sum([s.pixel_counts for s in stats], axis=0)
    rc = np.sum([s.rand_counts for s in stats], axis=0)
    topo = np.sum([s.splits + s.merges for s in stats], axis=0) / pixels
    v_rand = np.mean([s.v_rand for s in stats], axis=0)
    v_info = np.mean([s.v_info for s in stats], axis=0)
    curves = {
        "pixel_error": [(th, 1.0 - f_score(*px[k])) for k, th in enumerate(ths)],
        "rand_error": [(th, 1.0 - f_score(*rc[k])) for k, th in enumerate(ths)],
        "warping_error": [(th, float(topo[k])) for k, th in enumerate(ths[:10])],
        "v_rand": [(th, float(v_rand[k])) for k, th in enumerate(ths)],
        "v_info": [(th, float(v_info[k])) for k, th in enumerate(ths)],
    }

    # f_score of NaN counts is NaN-like garbage: blank out metrics not computed.
    for name, arr in (("pixel_error", px), ("rand_error", rc)):
        if np.isnan(arr).any():
            curves[name] = [(th, float("nan")) for th in ths]
    chosen = {}

    def best(name, pick):
        values = [(v, th) for th, v in curves[name] if not math.isnan(v)]
        if not values:
            return float("nan")
        value = pick(v for v, _ in values)
        chosen[name] = next(th for v, th in values if v == value)  # the first threshold reaching it
        return float(value)

    residual = float(np.mean([s.residual_at_0_5 / s.pixels for s in stats]))
    scores = [best("pixel_error", min), best("rand_error", min), best("warping_error", min), residual,
              best("v_rand", max), best("v_info", max)]
    return MetricResult(*scores, curves, chosen)


def _slice_statistics_args(args) -> SliceStatistics:
    return slice_statistics(*args)


def evaluate_isbi(labels: np.ndarray, proposal: np.ndarray, membrane_probability: bool = False,
                  kind: str = "probability", which: tuple[str, ...] = ALL_METRICS, workers: int = 1) -> MetricResult:
    """All ISBI 2012 metrics of a proposal (slices, y, x) against ground truth.

    `which` restricts to a subset of "pixel", "rand", "warping", "thinned"
    (V_rand / V_info); skipped scores are NaN. `workers` > 1 scores slices in
    that many processes.
    """
    prob = as_cell_probability(proposal, membrane_probability, kind)
    gt = as_ground_truth(labels, prob.shape)
    jobs = [(gt[z], prob[z], which) for z in range(gt.shape[0])]
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            return aggregate(list(pool.map(_slice_statistics_args, jobs)))
    return aggregate([_slice_statistics_args(job) for job in jobs])
