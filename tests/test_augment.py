import numpy as np
import torch

from unet_pipeline.augment import AugmentConfig, sample_tiles, sampling_grid


def _stack():
    yy, xx = np.mgrid[0:96, 0:96]
    labels = (((yy // 12) + (xx // 12)) % 2).astype(np.uint8)  # checkerboard with known edges
    return labels


def test_image_label_and_weight_stay_aligned_under_deformation():
    labels = _stack()
    img = torch.from_numpy(labels[None].astype(np.float32))
    lab = torch.from_numpy(labels[None])
    wts = torch.from_numpy(labels[None].astype(np.float32))
    cfg = AugmentConfig(contrast=0, brightness=0, noise_sigma=0)
    gen = torch.Generator().manual_seed(0)
    tiles = sample_tiles(img, lab, wts, 4, 60, 40, cfg, gen)
    centre = tiles.image[:, 0, 10:50, 10:50]
    # The image (bicubic) and the labels (nearest) agree away from the edges.
    agree = ((centre > 0.5).long() == tiles.labels).float().mean().item()
    assert agree > 0.97
    assert ((tiles.weights > 0.5).long() == tiles.labels).float().mean().item() > 0.97


def test_elastic_displacements_have_the_papers_scale():
    cfg = AugmentConfig(rotation=False, flips=False)
    gen = torch.Generator().manual_seed(1)
    grids = sampling_grid(200, 3, (1000, 1000), cfg, gen)
    plain = sampling_grid(200, 3, (1000, 1000), AugmentConfig(enabled=False), torch.Generator().manual_seed(1))
    # The 3 x 3 tile's pixels sit on the coarse grid points, each displaced by N(0, 10 px): a corner
    # relative to the centre by the difference of two, std 10 sqrt(2), and on average not at all.
    relative = grids[:, 0, 0] - grids[:, 1, 1] - (plain[:, 0, 0] - plain[:, 1, 1])
    assert 10 < relative.std().item() < 18
    assert relative.mean(0).abs().max().item() < 3  # 200 draws: the mean's own spread is about 1 px


def test_sampling_is_deterministic_given_the_generator():
    labels = _stack()
    img = torch.from_numpy(labels[None].astype(np.float32))
    args = (img, torch.from_numpy(labels[None]), img.clone(), 2, 40, 20, AugmentConfig())
    a = sample_tiles(*args, torch.Generator().manual_seed(5))
    b = sample_tiles(*args, torch.Generator().manual_seed(5))
    assert torch.equal(a.image, b.image) and torch.equal(a.labels, b.labels)
