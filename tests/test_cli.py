"""The CLI reports user errors as one sentence and exit status 2."""
import json
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "unet_pipeline", *args], capture_output=True, text=True)


def test_missing_input_is_one_clear_line(tmp_path):
    r = _run("preprocess", "--raw", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o.ome.zarr"))
    assert r.returncode == 2
    assert "missing.tif: file not found" in r.stderr and "Traceback" not in r.stderr


def test_config_typo_is_reported(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets: {a: {raw: x.tif, labels: y.tif, train: '0-1', vaildate: '2'}}\n")
    r = _run("validate-config", str(cfg))
    assert r.returncode == 2 and "did you mean 'validate'" in r.stderr


def test_synth_is_deterministic(tmp_path):
    import tifffile

    for name in ("a", "b"):
        assert _run("synth", "--out-raw", str(tmp_path / f"{name}.tif"), "--out-labels",
                    str(tmp_path / f"{name}-l.tif"), "--slices", "2", "--shape", "64,64", "--seed", "4"
                    ).returncode == 0
    assert (tifffile.imread(tmp_path / "a.tif") == tifffile.imread(tmp_path / "b.tif")).all()
    labels = tifffile.imread(tmp_path / "a-l.tif")
    assert set(labels.ravel().tolist()) == {0, 255}


def test_evaluate_scores_a_tiff_proposal_against_the_conformance_vector(tmp_path, conformance):
    import json

    import tifffile

    gt, prop, expected = conformance
    tifffile.imwrite(tmp_path / "gt.tif", gt.astype("uint8"), photometric="minisblack")
    tifffile.imwrite(tmp_path / "membrane.tif", (1.0 - prop).astype("float32"), photometric="minisblack")
    out = tmp_path / "m.json"
    r = _run("evaluate", "--prob", str(tmp_path / "membrane.tif"), "--labels", str(tmp_path / "gt.tif"),
             "--membrane-probability", "--out-json", str(out), "--out-slices", str(tmp_path / "s.csv"),
             "--out-curves", str(tmp_path / "c.csv"), "--out-plot", str(tmp_path / "c.png"))
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    # 1 - (1 - p) in float64 is within an ulp of p, so allow float32-level rounding at thresholds
    assert abs(got["probability_map"]["pixel_error"] - expected["pixel_error"]) < 1e-3
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 4
    assert (tmp_path / "c.png").stat().st_size > 0


def _bad_cases(tmp_path):
    """(subcommand arguments, text the one-sentence error must contain) for every subcommand."""
    import numpy as np
    import tifffile

    missing = str(tmp_path / "missing.ome.zarr")
    out = str(tmp_path / "out")
    nan = np.full((1, 16, 16), np.nan, np.float32)
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    tifffile.imwrite(tmp_path / "two.tif", np.full((1, 16, 16), 2.0, np.float32))
    tifffile.imwrite(tmp_path / "gt.tif", np.full((1, 16, 16), 255, np.uint8))
    (tmp_path / "empty.csv").write_text("step,loss,lr,seconds,val_loss,val_pixel_error,val_rand_error\n")
    evaluate = ["--labels", str(tmp_path / "gt.tif"), "--out-json", f"{out}.json", "--out-slices", f"{out}.csv",
                "--out-curves", f"{out}-c.csv"]
    return [
        (["synth", "--out-raw", "/proc/forbidden/r.tif", "--out-labels", out, "--slices", "1", "--shape", "32,32"],
         "/proc/forbidden"),
        (["preprocess", "--raw", str(tmp_path / "missing.tif"), "--out", out], "missing.tif: file not found"),
        (["weights", "--labels", missing, "--out", out], "missing.ome.zarr: OME-Zarr not found"),
        (["train", "--datasets", "[{not json", "--out", out], "--datasets is not valid JSON"),
        (["predict", "--raw", missing, "--checkpoint", str(tmp_path / "m.pt"), "--out", out],
         "m.pt: checkpoint not found"),
        (["calibrate", "--checkpoint", str(tmp_path / "m.pt"), "--out", out, "--datasets",
          json.dumps([{"name": "d", "raw": missing, "labels": missing, "validate": "0"}])],
         "missing.ome.zarr: OME-Zarr not found"),
        (["finish", "--from", str(tmp_path / "no-summary.json")], "no-summary.json: not a part summary"),
        (["pyramid", "--from", str(tmp_path / "no-summary.json"), "--level", "1"], "no-summary.json: not a part"),
        (["segment", "--prob", missing, "--out", out, "--method", "threshold", "--threshold", "0.5"],
         "missing.ome.zarr: OME-Zarr not found"),
        (["evaluate", "--prob", str(tmp_path / "nan.tif"), *evaluate], "nan.tif (slice 0): proposal contains NaN"),
        (["evaluate", "--prob", str(tmp_path / "two.tif"), *evaluate], r"two.tif (slice 0): proposal values must lie"),
        (["report", "--out", f"{out}.md", "--log", str(tmp_path / "empty.csv")],
         "empty.csv: the training log has no rows"),
        (["validate-config", str(tmp_path / "missing.yaml")], "missing.yaml: config file not found"),
    ]


def test_every_subcommand_reports_bad_input_as_one_sentence_and_exit_2(tmp_path, capsys):
    from unet_pipeline.cli import main

    for args, expected in _bad_cases(tmp_path):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith(f"unet-pipeline {args[0]}: error: "), (args, err)
        assert expected in err[-1], (expected, err[-1])
        assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "out.json").exists()  # a refused evaluation writes nothing


def test_bad_numbers_on_the_command_line_are_one_sentence_and_exit_2(tmp_path):
    base = ["predict", "--raw", str(tmp_path / "r"), "--checkpoint", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    for extra, named in ((["--tile-size", "0"], "--tile-size"), (["--chunks", "0,64,64"], "--chunks"),
                         (["--chunks", "1,64"], "--chunks"), (["--threads", "0"], "--threads")):
        r = _run(*base, *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (extra, r.stderr)
        assert lines[0].startswith(f"unet-pipeline predict: error: argument {named}: expected"), lines


def test_evaluate_keeps_the_map_and_the_written_segmentation_apart(tmp_path):
    import json

    import numpy as np
    import tifffile

    truth = np.zeros((2, 40, 60), np.uint8)
    truth[:, 5:35, 5:29] = 255
    truth[:, 5:35, 31:55] = 255
    prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    prob[:, 18:22, 29:31] = 0.7  # a gap: merged above 0.5, apart above 0.8
    labels = np.zeros(truth.shape, np.uint32)
    labels[truth > 0] = 1
    labels[:, 18:22, 29:31] = 1  # a segmentation that merged the two cells through the gap
    for name, data in (("gt.tif", truth), ("prob.tif", prob), ("seg.tif", labels)):
        tifffile.imwrite(tmp_path / name, data, photometric="minisblack")
    out = tmp_path / "m.json"
    r = _run("evaluate", "--prob", str(tmp_path / "prob.tif"), "--segmentation", str(tmp_path / "seg.tif"),
             "--labels", str(tmp_path / "gt.tif"), "--out-json", str(out), "--out-slices", str(tmp_path / "s.csv"),
             "--out-curves", str(tmp_path / "c.csv"))
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert m["probability_map"]["rand_error"] < 1e-9 and m["probability_map"]["best_thresholds"]["rand_error"] >= 0.7
    assert m["segmentation"]["rand_error"] > 0.1  # the merge the best threshold hides is scored
    assert (tmp_path / "s.csv").read_text().count("segmentation") == 2
