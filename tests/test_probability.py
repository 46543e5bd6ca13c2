"""A probability in one byte: every threshold on the 1/200 grid sees exactly the pixels float32 sees."""
import numpy as np
import pytest
import torch

from unet_pipeline import probability
from unet_pipeline.calibrate import CELL_THRESHOLDS, SEED_THRESHOLDS
from unet_pipeline.metrics import evaluate_isbi, thresholds


def _near_every_threshold(spread=4) -> np.ndarray:
    """float32 values on and a few ulps either side of every k/200, plus 0, 1 and random values."""
    grid = np.arange(probability.SCALE + 1, dtype=np.float64) / probability.SCALE
    values = [np.float32(grid)]
    for direction in (0.0, 2.0):
        step = np.float32(grid)
        for _ in range(spread):
            step = np.nextafter(step, np.float32(direction))
            values.append(step)
    values.append(np.random.default_rng(0).random(200_000, dtype=np.float32))
    values.append(np.array([0.0, 1.0, np.nextafter(np.float32(1), np.float32(0)), 1e-30], np.float32))
    return np.clip(np.concatenate(values), 0, 1).astype(np.float32)


def test_every_threshold_the_pipeline_uses_sees_the_pixels_float32_sees():
    p = _near_every_threshold()
    stored = probability.as_stored(p, "uint8")
    used = [*thresholds(), *CELL_THRESHOLDS, *SEED_THRESHOLDS, *(np.arange(201) / 200), 0.30000000000000004]
    for t in used:
        assert np.array_equal(stored > t, p.astype(np.float64) > t), t


def test_round_255_would_move_pixels_across_an_isbi_threshold():
    # Why the code is not round(255 p): 0.2 = 51/255 is a stored value, so values just above 0.2 drop onto it.
    p = _near_every_threshold()
    legacy = probability.decode(np.rint(p.astype(np.float64) * 255).astype(np.uint8), probability.LEGACY_SCALE)
    assert not np.array_equal(legacy > 0.2, p > 0.2)


def test_the_isbi_scores_of_a_map_are_those_of_its_uint8_store(conformance):
    # The conformance proposal is a float32 map with 32k distinct values. Stored in one byte, the scores
    # that count pixels on either side of a threshold (pixel, Rand, V_rand, V_info) stay what they were at
    # every threshold. The warping error also sorts mismatches by |p - t| and breaks ties by position:
    # values one bin apart tie in a byte, so it moves a little (float16 moves it too: 1.5 % on ISBI).
    gt, prop, _ = conformance
    as_float = evaluate_isbi(gt, prop)
    as_uint8 = evaluate_isbi(gt, probability.as_stored(prop, "uint8"))
    exact = ("pixel_error", "rand_error", "v_rand", "v_info")
    assert {k: as_uint8.summary()[k] for k in exact} == {k: as_float.summary()[k] for k in exact}
    assert {k: as_uint8.curves[k] for k in exact} == {k: as_float.curves[k] for k in exact}
    assert as_uint8.warping_error == pytest.approx(as_float.warping_error, rel=0.02)


def test_codes_read_back_within_half_a_step_and_0_and_1_exactly():
    p = _near_every_threshold()
    codes = probability.encode(p)
    assert codes.min() == 0 and codes.max() == probability.ONE
    back = probability.decode(codes, probability.SCALE)
    assert back.dtype == np.float64 and np.abs(back - p).max() <= 0.5 / probability.SCALE + 1e-9
    assert probability.decode(probability.encode(np.array([0.0, 1.0, 0.5, 1.5, -0.5])), probability.SCALE).tolist() \
        == [0.0, 1.0, 0.4975, 1.0, 0.0]


@pytest.mark.parametrize("step", [1000, 1 << 18])
def test_predicts_torch_encoder_writes_the_codes_calibration_assumes(step):
    p = _near_every_threshold()
    prob = torch.from_numpy(p[: len(p) // 119 * 119].copy()).reshape(1, -1, 119)  # a block, rows of 7 x 17
    before = prob.clone()
    out = torch.empty(prob.shape, dtype=torch.uint8)
    probability.encode_into(prob, out, step=step)
    assert np.array_equal(out.numpy(), probability.encode(prob.numpy()))
    assert torch.equal(prob, before)
    with pytest.raises(ValueError, match="contiguous"):
        probability.encode_into(prob, torch.empty(prob.shape[::-1], dtype=torch.uint8).permute(2, 1, 0))


def test_stores_are_read_by_the_scale_they_record():
    assert probability.store_attrs("uint8") == {"probability_scale": 200.0,
                                                "probability_encoding": probability.ENCODING}
    assert probability.store_attrs("float16") == {"probability_scale": 1.0}
    assert probability.decode(np.array([0, 51, 255], np.uint8), 255.0).tolist() == [0.0, 0.2, 1.0]  # older stores
    half = probability.decode(np.array([0.25], np.float16), 1.0)
    assert half.dtype == np.float64 and half[0] == 0.25
    with pytest.raises(ValueError, match="scale 100"):
        probability.decode(np.array([1], np.uint8), 100.0)


def test_float_maps_read_back_as_their_dtype_rounds_them():
    prob = np.array([0.2, 0.2 + 0.4 / 255, 1 / 3])
    assert probability.as_stored(prob, "float16")[2] == np.float16(1 / 3)
    assert probability.as_stored(prob, "float32").dtype == np.float64
