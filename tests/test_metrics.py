"""The ISBI 2012 metrics pinned to ../shared/docs/METRICS.md."""
import numpy as np
import pytest
from scipy import ndimage

from unet_pipeline import metrics as M
from unet_pipeline.errors import InputError


def test_conformance_vector(conformance):
    gt, prop, expected = conformance
    result = M.evaluate_isbi(gt, prop).summary()
    for key in ("pixel_error", "rand_error", "warping_error", "warping_residual_at_0.5", "v_rand", "v_info"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key


def test_thresholds_accumulate_in_float64():
    ths = M.thresholds()
    assert len(ths) == 11 and ths[-1] == 0.9999999999999999 and len(M.thresholds(10)) == 10


def two_cells(gap_col=10, size=(20, 21)):
    gt = np.full(size, 255.0)
    gt[:, gap_col] = 0
    gt[0, :] = gt[-1, :] = 0
    gt[:, 0] = gt[:, -1] = 0
    return gt


def test_perfect_proposal_scores_perfectly():
    gt = two_cells()
    r = M.evaluate_isbi(gt, gt / 255.0)
    assert r.pixel_error == 0 and r.rand_error == 0 and r.warping_error == 0
    assert r.v_rand == 1 and r.v_info == 1


def test_cut_membrane_is_a_merge():
    gt = two_cells()
    prop = gt / 255.0
    prop[9, 10] = 1.0  # one-pixel hole in the separating membrane
    stats = M.slice_statistics(gt, prop)
    assert stats.merges[5] == 1 and stats.splits[5] == 0
    assert M.evaluate_isbi(gt, prop).rand_error > 0.3


def test_spurious_membrane_line_is_a_split():
    gt = np.full((20, 20), 255.0)
    gt[0, :] = gt[-1, :] = gt[:, 0] = gt[:, -1] = 0
    prop = gt / 255.0
    prop[:, 10] = 0.0  # a line across the single cell
    stats = M.slice_statistics(gt, prop)
    assert stats.splits[5] == 1 and stats.merges[5] == 0


def test_shifted_boundary_costs_pixel_error_but_no_warping_error():
    gt = two_cells(gap_col=10)
    prop = two_cells(gap_col=11) / 255.0
    r = M.evaluate_isbi(gt, prop)
    assert r.pixel_error > 0
    assert r.warping_error == 0


def _brute_force_simple(code: int) -> bool:
    """Flipping the centre changes neither the 4-components of cell nor the 8-components of membrane."""
    ring = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0)]
    patch = np.zeros((3, 3), bool)
    for k, (y, x) in enumerate(ring):
        patch[y, x] = bool(code >> k & 1)
    counts = []
    for centre in (True, False):
        p = patch.copy()
        p[1, 1] = centre
        cells = ndimage.label(p, ndimage.generate_binary_structure(2, 1))[1]
        membrane = ndimage.label(~p, np.ones((3, 3), bool))[1]
        counts.append((cells, membrane))
    return counts[0] == counts[1]


def test_simple_point_table_matches_brute_force_on_all_256_neighbourhoods():
    assert [bool(M.SIMPLE_POINT[c]) for c in range(256)] == [_brute_force_simple(c) for c in range(256)]


def test_rand_error_treats_proposal_membrane_inside_cells_as_singletons():
    a = np.array([[1, 1, 1, 1]])
    b = np.array([[0, 0, 1, 1]])
    tp, fp, fn = M.rand_counts(a, b)
    # TP = 2^2 (pair block) + 2 singletons; actual = 4^2; predicted = 2^2 + 2
    assert (tp, fp, fn) == (6.0, 0.0, 10.0)


def test_watershed_leaves_one_pixel_lines_between_basins():
    cell = np.ones((5, 7), bool)
    cell[:, 2:5] = False
    lab = M.watershed_labels(cell)
    assert set(np.unique(lab[:, 0:2])) == {1} and set(np.unique(lab[:, 5:])) == {2}
    assert (lab[:, 3] == 0).all()


def test_membrane_probability_flag_and_uint8_input():
    gt = two_cells()
    as_uint8 = (gt).astype(np.uint8)
    assert M.evaluate_isbi(gt, as_uint8).pixel_error == 0
    assert M.evaluate_isbi(gt, 1.0 - gt / 255.0, membrane_probability=True).pixel_error == 0
    assert M.evaluate_isbi(gt, (gt > 0).astype(int) * 7, kind="instances").rand_error == 0


@pytest.mark.parametrize("bad, message", [
    (np.full((20, 21), np.nan), "NaN"),
    (np.full((20, 21), 2.0), r"\[0, 1\]"),
    (np.zeros((20, 20)), "does not match"),
    (np.zeros((2, 2, 2, 2)), "2D or 3D"),
])
def test_bad_proposals_are_rejected(bad, message):
    with pytest.raises(InputError, match=message):
        M.evaluate_isbi(two_cells(), bad)


def test_slices_aggregate_by_summing_counts():
    gt = np.stack([two_cells(), two_cells(gap_col=5)])
    prop = np.stack([two_cells(gap_col=11), two_cells(gap_col=5)]) / 255.0
    whole = M.evaluate_isbi(gt, prop)
    parts = M.aggregate([M.slice_statistics(gt[z], prop[z].astype(np.float64)) for z in range(2)])
    assert whole.summary() == parts.summary()


def test_two_touching_cells_are_scored_as_two_not_merged():
    from unet_pipeline.metrics import cells_of_labels, evaluate_isbi

    truth = np.zeros((1, 20, 30), np.uint8)
    truth[0, 2:18, 2:14] = 255
    truth[0, 2:18, 16:28] = 255  # two cells, a 2 px membrane between them
    labels = np.zeros((1, 20, 30), np.uint32)
    labels[0, 2:18, 2:15] = 1
    labels[0, 2:18, 15:28] = 2  # the same two cells, touching (no membrane drawn)
    as_labels = evaluate_isbi(truth, labels, kind="instances", which=("rand",))
    binarised = evaluate_isbi(truth, labels, kind="binary", which=("rand",))
    assert as_labels.rand_error < 0.01 < binarised.rand_error  # binarised, the two become one
    cells = cells_of_labels(labels[0])
    assert cells[2:18, 14:16].sum() == 16  # one pixel of membrane per row where they meet, not two


def test_each_metric_reports_the_threshold_of_its_best_value(conformance):
    from unet_pipeline.metrics import evaluate_isbi

    gt, prop, _ = conformance
    result = evaluate_isbi(gt, prop, which=("pixel", "rand"))
    for name in ("pixel_error", "rand_error"):
        th = result.best_thresholds[name]
        assert dict(result.curves[name])[th] == getattr(result, name)
