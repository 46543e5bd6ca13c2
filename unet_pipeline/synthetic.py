"""Built-in EM-like data with exact ground truth, for the default run and the tests.

Cells are the regions of a Voronoi tessellation whose seeds drift slowly from
slice to slice (as neurites do through serial sections); membranes are the
pixels within a locally varying half-thickness of the cell borders (2-6 px
thick in total). Interiors get per-cell gray values, smooth texture and a few
dark organelles (labelled as cell, as in ISBI 2012, so the net must learn to
tell them from membranes); the whole image gets uneven illumination, Gaussian
blur and noise. Output follows the ISBI convention: uint8 raw, labels 255 =
cell, 0 = membrane. Everything is a function of the seed.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to [0, 1]."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    field -= field.min()
    return field / max(field.max(), 1e-12)


def _seeds(rng: np.random.Generator, shape: tuple[int, int], cell_diameter_px: float) -> np.ndarray:
    """Seeds with a minimum spacing, so that cells have plausible sizes."""
    h, w = shape
    target = int(h * w / (0.8 * cell_diameter_px ** 2)) + 1
    min_dist = 0.55 * cell_diameter_px
    points: list[np.ndarray] = []
    for _ in range(target * 30):
        if len(points) >= target:
            break
        p = rng.uniform((-0.05 * h, -0.05 * w), (1.05 * h, 1.05 * w))
        if not points or np.min(np.linalg.norm(np.asarray(points) - p, axis=1)) >= min_dist:
            points.append(p)
    return np.asarray(points)


def synthesize_labels_and_raw(
    num_slices: int = 8,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    cell_diameter_px: float = 40.0,
    noise_sigma: float = 0.06,
    blur_sigma_px: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate (raw, labels), both uint8 of shape (num_slices, *shape).

    Parameters
    ----------
    num_slices, shape : stack size.
    seed : everything is deterministic given the seed.
    cell_diameter_px : typical cell size.
    noise_sigma : standard deviation of the additive noise (image range 0-1).
    blur_sigma_px : point-spread function of the microscope.
    """
    if num_slices < 1 or min(shape) < 16:
        raise ValueError("synthetic stack needs at least 1 slice of at least 16x16 pixels")
    rng = np.random.default_rng(seed)
    h, w = shape
    seeds = _seeds(rng, shape, cell_diameter_px)
    cell_gray = rng.uniform(0.55, 0.85, size=len(seeds))
    yy, xx = np.mgrid[0:h, 0:w]
    coords = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
    raw = np.empty((num_slices, h, w), np.uint8)
    labels = np.empty((num_slices, h, w), np.uint8)
    for z in range(num_slices):
        # Seeds drift like neurites crossing serial sections.
        seeds = seeds + rng.normal(0.0, 0.04 * cell_diameter_px, size=seeds.shape)
        dist, idx = cKDTree(seeds).query(coords, k=2)
        # d2 - d1 equals twice the distance to the Voronoi border near it.
        gap = (dist[:, 1] - dist[:, 0]).reshape(h, w)
        thickness = 2.0 + 4.0 * _smooth_field(rng, shape, cell_diameter_px / 2)
        membrane = gap < thickness
        labels[z] = np.where(membrane, 0, 255)

        owner = idx[:, 0].reshape(h, w)
        image = cell_gray[owner] + 0.08 * (_smooth_field(rng, shape, 2.0) - 0.5)
        # Dark organelles (vesicles, mitochondria) inside cells, labelled as cell.
        organelles = np.zeros(shape, bool)
        for _ in range(max(1, int(h * w / cell_diameter_px ** 2))):
            cy, cx = rng.uniform((0, 0), (h, w))
            ry, rx = rng.uniform(2.0, 0.12 * cell_diameter_px, size=2)
            organelles |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        organelles &= ~ndimage.binary_dilation(membrane, iterations=3)
        image = np.where(organelles, image - rng.uniform(0.25, 0.35), image)
        image = np.where(membrane, 0.18 + 0.06 * _smooth_field(rng, shape, 3.0), image)
        illumination = 0.8 + 0.4 * _smooth_field(rng, shape, max(h, w) / 4)
        image = ndimage.gaussian_filter(image * illumination, blur_sigma_px)
        image = image + rng.normal(0.0, noise_sigma, size=shape)
        raw[z] = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return raw, labels
