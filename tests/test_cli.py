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
                    str(tmp_path / f"{name}-l.tif"), "--slices", "2", "--shape", "64", "64", "--seed", "4"
                    ).returncode == 0
    assert (tifffile.imread(tmp_path / "a.tif") == tifffile.imread(tmp_path / "b.tif")).all()
    labels = tifffile.imread(tmp_path / "a-l.tif")
    assert set(labels.ravel().tolist()) == {0, 255}
