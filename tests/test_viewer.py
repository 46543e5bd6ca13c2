"""The outputs open in neuroglancer, in a real (headless) Chromium, and show what the stores hold.

Needs Debian's `chromium` and `chromium-driver`: installed with apt where the
test runs as root and they are missing (as the SLURM test installs SLURM),
skipped with the reason elsewhere. WebGL2 runs on SwiftShader.
"""
import io
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch

from unet_pipeline import stores
from unet_pipeline.geometry import Part
from unet_pipeline.inference import Predictor
from unet_pipeline.labelling import SegmentationSettings
from unet_pipeline.model import UNetConfig
from tests.conftest import random_checkpoint

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless=new --no-sandbox --disable-dev-shm-usage --use-gl=angle --use-angle=swiftshader "
         "--enable-unsafe-swiftshader --ignore-gpu-blocklist").split()
SIZE = 640  # the viewport, in screen pixels


def _chromium() -> None:
    if os.path.exists(CHROMIUM) and os.path.exists(DRIVER):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], check=True, timeout=600,
                   stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


class _BrightIsCell(torch.nn.Module):
    """A stand-in network with the U-Net's geometry: cell probability sigmoid(8 (c - 0.5)) of the normalised
    input c, so the segmentation has cells of the stack's size (a random U-Net's would be speckle)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        m = self.cfg.context_margin
        centre = x[:, :, m:x.shape[2] - m, m:x.shape[3] - m]
        return torch.cat([torch.zeros_like(centre), 8 * (centre - 0.5)], dim=1)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A dataset's results as the stages write them: raw, probabilities (uint8), segmentation, with pyramids."""
    from unet_pipeline.blockwise import PartialStore
    from unet_pipeline.finish import finish_store
    from unet_pipeline.predict import predict_part
    from unet_pipeline.segment import segment
    from unet_pipeline.synthetic import synthesize_labels_and_raw

    folder = tmp_path_factory.mktemp("results")
    raw, _ = synthesize_labels_and_raw(2, (192, 256), seed=4, cell_diameter_px=40)
    import tifffile

    tifffile.imwrite(folder / "stack.tif", raw, photometric="minisblack")
    from unet_pipeline.preprocess import preprocess

    layout = dict(chunks=(1, 32, 32), chunks_per_file=(1, 2, 2))
    preprocess(folder / "stack.tif", folder / "raw.ome.zarr", voxel_size_nm=(50, 4, 4), **layout)
    model = UNetConfig(base_channels=4, depth=3, dropout=0.0)
    ckpt = random_checkpoint(folder / "m.pt", model)
    predictor = Predictor(_BrightIsCell(model), torch.device("cpu"), 52, channels_last=False)
    summary = predict_part(predictor, folder / "raw.ome.zarr", folder / "probabilities.ome.zarr", ckpt, Part(0, 1),
                           out_dtype="uint8", tta="none", precision="fp32", pyramid_levels="auto", writers=1,
                           **layout)
    finish_store(PartialStore(folder / "probabilities.ome.zarr", summary.signature), 1, 2)
    segment(folder / "probabilities.ome.zarr", folder / "segmentation.ome.zarr",
            settings=SegmentationSettings("threshold", 0.5, "2d"), pyramid_levels="auto")
    (folder / "stack.tif").unlink()
    (folder / "m.pt").unlink()
    return folder


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def browser(results):
    """The `view` command's viewer, opened in headless Chromium."""
    _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    from unet_pipeline.view import start

    before = _listing(results)
    viewer, data_server, url = start(results, port=0)
    options = Options()
    for flag in FLAGS + [f"--window-size={SIZE},{SIZE}"]:
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.get(url)
    with viewer.config_state.txn() as s:  # the panel alone: no bars, borders or axes in the screenshots
        s.show_ui_controls = False
        s.show_panel_borders = False
    with viewer.txn() as s:
        s.show_axis_lines = False
        s.show_scale_bar = False
        s.show_default_annotations = False
    yield viewer, driver
    driver.quit()
    data_server.shutdown()
    assert _listing(results) == before  # looking at results never changes them


def _only(viewer, name: str, scale: float, z: int = 1) -> np.ndarray:
    """A screenshot (grey values, or RGB for segmentation) with only layer `name` shown, at `scale` voxels/pixel."""
    from PIL import Image

    with viewer.txn() as s:
        for layer in s.layers:
            layer.visible = layer.name == name
            if layer.name == "probabilities":
                layer.opacity = 1.0
        s.cross_section_scale = scale
        s.position = [128.0, 96.0, z + 0.5]
    shot = viewer.screenshot(size=[SIZE, SIZE]).screenshot
    return np.asarray(Image.open(io.BytesIO(shot.image)).convert("RGB")).astype(np.float64)


def _data_box(image: np.ndarray) -> tuple[slice, slice]:
    """Where the layer's data is on the screenshot: everything not of the background (a corner's colour)."""
    differs = np.abs(image - image[2, 2]).sum(axis=2) > 0
    ys, xs = np.nonzero(differs)
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


def _resized(values: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resampling of a slice to `shape` (what the viewer draws at that zoom)."""
    ys = (np.arange(shape[0]) + 0.5) * values.shape[0] / shape[0]
    xs = (np.arange(shape[1]) + 0.5) * values.shape[1] / shape[1]
    return values[ys.astype(int)][:, xs.astype(int)]


def test_no_layer_reports_an_error(browser):
    viewer, driver = browser
    deadline = time.time() + 60
    script = """
        return window.viewer.layerManager.managedLayers.map(l => ({name: l.name,
          sources: l.layer.dataSources.map(s => s.loadState === undefined ? 'loading' :
                                            (s.loadState.error ? 'ERROR ' + s.loadState.error.message : 'ok'))}));"""
    while True:
        layers = driver.execute_script(script)
        if all(s != "loading" for layer in layers for s in layer["sources"]) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert {layer["name"]: layer["sources"] for layer in layers} == {
        "raw": ["ok"], "probabilities": ["ok"], "segmentation": ["ok"]}


@pytest.mark.parametrize("name", ["raw", "probabilities"])
def test_the_rendered_slice_is_the_stored_slice(browser, results, name):
    viewer, _ = browser
    image = _only(viewer, name, scale=0.5)  # 2 screen pixels per voxel: level 0 is drawn
    box = _data_box(image)
    assert (box[0].stop - box[0].start, box[1].stop - box[1].start) == pytest.approx((384, 512), abs=2)
    stored = stores.open_image(results / f"{name}.ome.zarr")[1].astype(np.float64)
    shown = image[box].mean(axis=2)
    assert np.corrcoef(shown.ravel(), _resized(stored, shown.shape).ravel())[0, 1] > 0.9


def test_probability_one_is_drawn_white(browser, results):
    # Stored values run 0 .. 201 (probability.py): drawn on the default 0 .. 255 grey scale, p = 1 would be
    # 79 % grey. The view's shader range maps the stored value of p = 1 to white.
    viewer, _ = browser
    image = _only(viewer, "probabilities", scale=0.5)
    stored = stores.open_image(results / "probabilities.ome.zarr")[1].astype(np.float64)
    shown = image[_data_box(image)].mean(axis=2)
    slope, offset = np.polyfit(_resized(stored, shown.shape).ravel(), shown.ravel(), 1)
    assert slope == pytest.approx(255 / 201, rel=0.05) and abs(offset) < 4


def test_the_segmentation_shows_its_cells_where_they_are_stored(browser, results):
    viewer, _ = browser
    box = _data_box(_only(viewer, "raw", scale=0.5))  # where the slice lies on the screen
    image = _only(viewer, "segmentation", scale=0.5)
    cells = np.abs(image[box] - image[2, 2]).sum(axis=2) > 0  # label 0 is transparent
    stored = stores.open_image(results / "segmentation.ome.zarr")[1] > 0
    agreement = np.mean(cells == _resized(stored, cells.shape))
    assert agreement > 0.95


def test_a_coarse_pyramid_level_lies_where_level_0_lies(browser, results):
    viewer, _ = browser
    fine = _only(viewer, "raw", scale=0.5)
    coarse = _only(viewer, "raw", scale=4.0)  # 4 voxels per pixel: neuroglancer draws a coarse level
    assert len(stores.store_attrs(results / "raw.ome.zarr")) and (results / "raw.ome.zarr" / "2").exists()
    fine_box, coarse_box = _data_box(fine), _data_box(coarse)
    # the same extent, scaled by 8, about the same centre (a missing translation would shift it)
    centre = [(b.start + b.stop) / 2 for b in fine_box]
    coarse_centre = [(b.start + b.stop) / 2 for b in coarse_box]
    assert coarse_centre == pytest.approx(centre, abs=1.0)
    level2 = stores.open_image(results / "raw.ome.zarr", "2")[1].astype(np.float64)
    shown = coarse[coarse_box].mean(axis=2)
    assert np.corrcoef(shown.ravel(), _resized(level2, shown.shape).ravel())[0, 1] > 0.9


def test_an_overview_of_raw_and_segmentation_is_drawn(browser, tmp_path):
    # Also the README's screenshot: UNET_PIPELINE_SCREENSHOT=docs/view.png saves it there.
    from PIL import Image

    viewer, _ = browser
    with viewer.txn() as s:
        for layer in s.layers:
            layer.visible = layer.name in ("raw", "segmentation")
        s.layers["segmentation"].layer.selected_alpha = 0.35
        s.cross_section_scale = 0.5
    shot = viewer.screenshot(size=[SIZE, SIZE]).screenshot
    image = np.asarray(Image.open(io.BytesIO(shot.image)).convert("RGB"))
    box = _data_box(image.astype(np.float64))
    assert image[box].std() > 20  # data drawn, not a blank panel
    target = os.environ.get("UNET_PIPELINE_SCREENSHOT")
    if target:
        Image.fromarray(image).save(target)
