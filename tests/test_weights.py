import math

import numpy as np
import pytest

from unet_pipeline.weights import (
    class_balance, instances_from_binary, weight_map, weight_map_chunked, weight_map_reference,
)


def test_border_term_between_two_squares_at_a_known_gap():
    labels = np.zeros((40, 60), np.uint8)
    labels[10:30, 10:25] = 255
    labels[10:30, 31:46] = 255  # gap of 6 px: columns 25..30
    w = weight_map(labels, w0=10, sigma_px=5)
    w_membrane, _ = class_balance(labels > 0)
    # Pixel centres at column 25 and 30 are 1 px from one cell and 6 from the other: d1 + d2 = 7.
    # Half way (between columns 27 and 28) d1 + d2 = gap + 1 pixel-centre offset.
    for col in (27, 28):
        d1 = min(col - 24, 31 - col)
        d2 = max(col - 24, 31 - col)
        expected = w_membrane + 10 * math.exp(-((d1 + d2) ** 2) / (2 * 25))
        assert w[20, col] == pytest.approx(expected, rel=1e-5)


def test_single_cell_has_no_border_term():
    labels = np.zeros((30, 30), np.uint8)
    labels[5:25, 5:25] = 255
    w = weight_map(labels)
    w_membrane, w_cell = class_balance(labels > 0)
    assert np.allclose(w[labels == 0], w_membrane) and np.allclose(w[labels > 0], w_cell)


def test_empty_slice_is_constant():
    w = weight_map(np.zeros((16, 16), np.uint8))
    assert np.allclose(w, 0.5)


def test_class_balance_gives_mean_one():
    labels = np.zeros((10, 10), np.uint8)
    labels[:3] = 255
    _, w_cell = class_balance(labels > 0)
    w_c = np.where(labels > 0, w_cell, class_balance(labels > 0)[0])
    assert w_c.mean() == pytest.approx(1.0)


def test_fast_map_equals_per_cell_reference_on_isbi(isbi_labels):
    lab = isbi_labels[0, :256, :256]
    assert np.abs(weight_map(lab) - weight_map_reference(lab)).max() < 1e-5


def test_chunked_with_halo_equals_whole_slice(isbi_labels):
    lab = isbi_labels[1]
    whole = weight_map(lab)
    chunked = weight_map_chunked(instances_from_binary(lab), (100, 173))
    assert np.abs(whole - chunked).max() < 1e-5


def test_instance_labels_separate_touching_cells():
    inst = np.zeros((20, 20), np.int32)
    inst[2:18, 2:10] = 1
    inst[2:18, 10:18] = 2  # touching, no membrane between them
    w = weight_map(inst, label_format="instances")
    assert w[10, 1] > w[0, 0]  # membrane near two cells gets the border term
