"""The bucket-queue seeded watershed: skimage's result, one-pixel lines, 4-separated cells, fast."""
import numpy as np
import pytest
from scipy import ndimage

from unet_pipeline import probability
from unet_pipeline.flood import flood_levels, seeded_watershed


def _cells(seed=0, shape=(256, 256)):
    rng = np.random.default_rng(seed)
    prob = ndimage.gaussian_filter(rng.random(shape), 4)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    return probability.as_stored(prob, "uint8")


def test_regions_are_whole_never_touch_and_mostly_agree_with_skimage():
    from skimage.segmentation import watershed

    prob = _cells()
    markers, count = ndimage.label(prob > 0.7)
    mask = prob > 0.3
    ours = seeded_watershed(flood_levels(prob), markers, mask)
    assert np.array_equal(ours[markers > 0], markers[markers > 0]) and not ours[~mask].any()
    for a, b in ((ours[1:], ours[:-1]), (ours[:, 1:], ours[:, :-1])):
        assert not ((a > 0) & (b > 0) & (a != b)).any()  # a line between any two regions
    for region in range(1, count + 1):
        assert ndimage.label(ours == region)[1] == 1  # one piece: a line pixel floods no further
    # skimage lets the flood pass through line pixels (so its regions can come in pieces); elsewhere the same
    reference = watershed(1 - prob, markers, connectivity=1, mask=mask, watershed_line=True)
    assert np.mean(ours == reference) > 0.9
    assert any(ndimage.label(reference == region)[1] > 1 for region in range(1, count + 1))


def test_the_lower_path_wins_and_lines_are_one_pixel_wide():
    # Two basins joined by a low valley on the left: the pixel between them goes to the region whose
    # path to it floods first, and where the fronts meet there is one line pixel, not two.
    levels = np.array([[0, 1, 5, 9, 0]], np.uint16)
    markers = np.array([[1, 0, 0, 0, 2]])
    got = seeded_watershed(levels, markers, np.ones_like(markers, bool))
    assert got.tolist() == [[1, 1, 1, 0, 2]]
    levels = np.array([[0, 3, 3, 3, 3, 0]], np.uint16)
    got = seeded_watershed(levels, np.array([[1, 0, 0, 0, 0, 2]]), np.ones((1, 6), bool))
    assert (got == 0).sum() == 1 and got[0, 0] == 1 and got[0, -1] == 2


def test_uint8_ties_stay_ties():
    prob = probability.decode(np.arange(probability.ONE + 1, dtype=np.uint8), probability.SCALE)
    levels = flood_levels(prob)
    assert len(np.unique(levels)) == probability.ONE + 1 and np.all(np.diff(levels.astype(int)) < 0)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="one 2D shape"):
        seeded_watershed(np.zeros((3, 3), np.uint16), np.zeros((3, 4), int), np.ones((3, 3), bool))
