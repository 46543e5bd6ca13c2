"""Segmentation settings chosen on validation slices, and `auto` resolved from that choice."""
import json

import numpy as np
import pytest

from unet_pipeline.calibrate import calibrate, default_record, resolve, write_record
from unet_pipeline.errors import InputError
from unet_pipeline.labelling import SegmentationSettings


def _two_cells_with_a_gap(slices=2):
    """Probability and truth of two cells whose membrane has a gap: the threshold merges them, seeds do not."""
    prob = np.full((slices, 40, 60), 0.05)
    prob[:, 5:35, 5:28] = 0.95
    prob[:, 5:35, 32:55] = 0.95
    prob[:, 5:35, 28:32] = 0.1
    prob[:, 18:22, 28:32] = 0.6
    truth = np.zeros(prob.shape, np.uint8)
    truth[:, 5:35, 5:29] = 255
    truth[:, 5:35, 31:55] = 255
    return prob, truth


def test_the_watershed_is_chosen_where_it_keeps_cells_apart():
    prob, truth = _two_cells_with_a_gap()
    record = calibrate(prob, truth, "2d")
    assert record["method"] == "watershed" and record["validation_slices"] == 2
    methods = record["methods"]
    assert methods["watershed"]["rand_error"] < methods["threshold"]["rand_error"]
    assert methods["threshold"]["threshold"] in [round(0.1 * k, 1) for k in range(1, 10)]


def test_the_threshold_method_is_chosen_where_seeds_gain_nothing():
    prob = np.full((1, 40, 60), 0.05)
    prob[0, 5:35, 5:28] = 0.95
    prob[0, 5:35, 32:55] = 0.95  # a clean membrane: both methods are perfect; the simpler one wins ties
    truth = (prob > 0.5).astype(np.uint8) * 255
    assert calibrate(prob, truth, "2d")["method"] == "threshold"


def test_auto_settings_come_from_the_record_and_numbers_win(tmp_path):
    prob, truth = _two_cells_with_a_gap()
    path = tmp_path / "segmentation.json"
    write_record(path, calibrate(prob, truth, "2d"))
    record = json.loads(path.read_text())
    auto = resolve("auto", "auto", "2d", "auto", "auto", path)
    learned = record["methods"]["watershed"]
    assert auto == SegmentationSettings("watershed", learned["threshold"], "2d", learned["seed_threshold"],
                                        learned["min_seed_px"])
    assert resolve("threshold", "auto", "2d", "auto", "auto", path).threshold == \
        record["methods"]["threshold"]["threshold"]
    assert resolve("auto", 0.42, "2d", "auto", "auto", path).threshold == 0.42
    assert resolve("threshold", 0.3, "3d", "auto", "auto", None) == SegmentationSettings("threshold", 0.3, "3d")


def test_without_validation_slices_auto_means_threshold_one_half(tmp_path):
    write_record(tmp_path / "s.json", default_record("2d"))
    assert resolve("auto", "auto", "2d", "auto", "auto", tmp_path / "s.json") == \
        SegmentationSettings("threshold", 0.5, "2d")
    with pytest.raises(InputError, match="no watershed settings were chosen"):
        resolve("watershed", "auto", "2d", "auto", "auto", tmp_path / "s.json")
    with pytest.raises(InputError, match="no segmentation choice recorded"):
        resolve("auto", "auto", "2d", "auto", "auto", tmp_path / "missing.json")


def test_a_lower_rand_error_is_not_bought_with_pixel_error_beyond_the_allowance():
    """Low cell thresholds thin the membranes: the Rand error falls, the pixel error climbs; the bound stops it."""
    from unet_pipeline.calibrate import PIXEL_ERROR_ALLOWANCE, score

    prob = np.full((1, 40, 60), 0.95)
    prob[0, :, 27:33] = 0.08       # a 6 px membrane, faint at its sides ...
    prob[0, :, 29:31] = 0.01       # ... and dark in the middle
    prob[0, 10:20, 8:18] = 0.08    # a faint blob inside the left cell
    truth = np.full(prob.shape, 255, np.uint8)
    truth[0, :, 27:33] = 0
    record = calibrate(prob, truth, "2d")
    thin = SegmentationSettings("watershed", 0.05, "2d", 0.9, 5)
    from unet_pipeline.labelling import label_image
    rand, pixel = score(label_image(prob, thin), truth)
    chosen = record["methods"]["watershed"]
    assert rand < chosen["rand_error"] and pixel > record["pixel_error_bound"]  # tempting, but out of bounds
    assert chosen["pixel_error"] <= record["pixel_error_bound"]
    assert record["pixel_error_bound"] == pytest.approx(record["methods"]["threshold"]["pixel_error"]
                                                        + PIXEL_ERROR_ALLOWANCE)


def test_the_calibrate_command_chooses_on_validation_slices_predicted_and_stored_as_predict_does(tmp_path, tiff_pair):
    from tests.conftest import random_checkpoint
    from unet_pipeline.cli import main
    from unet_pipeline.calibrate import choose_for_model
    from unet_pipeline.inference import load_predictor
    from unet_pipeline.model import UNetConfig
    from unet_pipeline.preprocess import preprocess
    from unet_pipeline.train import load_labelled

    raw, labels = tiff_pair
    preprocess(raw, tmp_path / "raw.ome.zarr", labels, tmp_path / "labels.ome.zarr", chunks=(1, 64, 64),
               chunks_per_file=(1, 1, 1))
    checkpoint = random_checkpoint(tmp_path / "model.pt", UNetConfig(depth=2, base_channels=4))
    dataset = {"name": "d", "raw": str(tmp_path / "raw.ome.zarr"), "labels": str(tmp_path / "labels.ome.zarr"),
               "validate": "1-2"}
    args = ["calibrate", "--checkpoint", str(checkpoint), "--tile-size", "36", "--tta", "flips", "--device", "cpu",
            "--precision", "fp32", "--threads", "1"]
    for dtype in ("uint8", "float32"):
        out = tmp_path / f"{dtype}.json"
        assert main([*args, "--datasets", json.dumps([dataset]), "--dtype", dtype, "--out", str(out)]) == 0
        record = json.loads(out.read_text())
        images, truth = load_labelled(dataset["raw"], dataset["labels"], [1, 2])
        predictor = load_predictor(checkpoint, "cpu", "fp32", "flips", 36)
        assert record == json.loads(json.dumps(choose_for_model(predictor, images, truth, dtype)))
        assert record["validation_slices"] == 2 and record["candidates_tried"] > 100
    # without validation slices: the default, recorded as such
    out = tmp_path / "none.json"
    main([*args, "--datasets", json.dumps([{**dataset, "validate": None}]), "--out", str(out)])
    assert json.loads(out.read_text()) == default_record("2d")
