"""The CLI reports user errors as one sentence and exit status 2."""
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "unet_pipeline.cli", *args], capture_output=True, text=True)


def test_missing_input_is_one_clear_line(tmp_path):
    r = _run("preprocess", "--raw", str(tmp_path / "missing.tif"), "--out-raw", str(tmp_path / "o.ome.zarr"))
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
    assert abs(got["pixel_error"] - expected["pixel_error"]) < 1e-3
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 4
    assert (tmp_path / "c.png").stat().st_size > 0
