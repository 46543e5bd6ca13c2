"""`unet-pipeline view results/<dataset>`: look at raw, probabilities and segmentation in neuroglancer.

Two servers on 127.0.0.1: the `neuroglancer` package's own (pinned; it
serves the viewer client it ships, so nothing is fetched from the internet,
and holds the viewer state), and a small file server for the dataset's
OME-Zarr stores with the headers a browser viewer needs (CORS, and HTTP
range requests, with which neuroglancer reads the chunks it needs out of
shard files). Both only read: opening a result never changes `results/`.
The viewer shows raw and probabilities as image layers and the segmentation
as a segmentation layer, at the stores' voxel size, so they line up. On a
remote node, `--no-browser` prints the link and the SSH tunnel that reaches
it (both ports).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import urllib.parse
import webbrowser
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

from RangeHTTPServer import RangeRequestHandler

from unet_pipeline import probability, stores
from unet_pipeline.errors import InputError

log = logging.getLogger(__name__)

LAYERS = (("raw", "image"), ("probabilities", "image"), ("segmentation", "segmentation"))
VIEW_PORT = 8765  # the viewer's; the stores are served on the next port


class _Handler(RangeRequestHandler):
    """The stores' files under /data/, read-only, with range requests and CORS."""

    def __init__(self, *args, data: Path, **kwargs):
        self.data = data
        super().__init__(*args, directory=str(data), **kwargs)

    def translate_path(self, path: str) -> str:
        parts = urllib.parse.urlsplit(path).path
        if parts.startswith("/data/"):
            target = (self.data / urllib.parse.unquote(parts[len("/data/"):])).resolve()
            if self.data.resolve() in (target, *target.parents):  # never outside the results folder
                return str(target)
        return str(self.data / "__nothing__")

    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Accept-Ranges")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def do_OPTIONS(self):  # noqa: N802 - the http.server spelling
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Range")
        self.end_headers()

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        log.debug("view: " + format, *args)


def dataset_stores(folder: Path) -> dict[str, Path]:
    """The finished stores of a dataset's results folder that the view shows."""
    found = {name: folder / f"{name}.ome.zarr" for name, _ in LAYERS if stores.is_complete(folder / f"{name}.ome.zarr")}
    if not found:
        raise InputError(f"{folder}: holds no finished raw, probabilities or segmentation OME-Zarr; give a dataset's "
                         "results folder, e.g. results/<dataset>")
    return found


PUBLIC_CLIENT = "https://neuroglancer-demo.appspot.com/"


def viewer_state(found: dict[str, Path], data_url: str, z: int | None = None) -> dict:
    """The neuroglancer state (JSON) showing the stores: one layer each, in nm at their voxel size, on slice `z`.

    Dimensions go x, y, z: neuroglancer's "xy" panel shows the first two.
    """
    first = next(iter(found.values()))
    voxel = stores.voxel_size(first)
    shape = stores.open_image(first).shape
    layers = []
    for name, kind in LAYERS:
        if name not in found:
            continue
        layer = {"type": kind, "name": name, "source": f"zarr://{data_url}/data/{found[name].name}/"}
        if name == "probabilities":  # the shader's grey scale spans p = 0 .. 1, whatever the stored values
            top = probability.stored_one(stores.store_attrs(found[name]).get(probability.SCALE_KEY, 1.0))
            layer.update(opacity=0.5, visible="segmentation" not in found,
                         shaderControls={"normalized": {"range": [0, top]}})
        layers.append(layer)
    return {
        "dimensions": {"x": [voxel[2] * 1e-9, "m"], "y": [voxel[1] * 1e-9, "m"], "z": [voxel[0] * 1e-9, "m"]},
        "position": [shape[2] / 2, shape[1] / 2, (z if z is not None else shape[0] // 2) + 0.5],
        "crossSectionScale": max(shape[1:]) / 512,
        "layers": layers,
        "layout": "xy",
    }


def public_link(folder: str | os.PathLike, port: int, z: int | None = None) -> str:
    """A link that opens the view in the public neuroglancer client, reading the stores from `view` on `port`.

    For the report: one click while `unet-pipeline view` runs (its stores are served on port + 1).
    """
    state = viewer_state(dataset_stores(Path(folder)), f"http://127.0.0.1:{port + 1}", z)
    return PUBLIC_CLIENT + "#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")))


def start(folder: str | os.PathLike, port: int, host: str = "127.0.0.1") -> tuple:
    """Start both servers for a dataset's results folder; returns (viewer, data server, the viewer link)."""
    import neuroglancer

    folder = Path(folder)
    found = dataset_stores(folder)
    data_server = ThreadingHTTPServer((host, 0 if port == 0 else port + 1), partial(_Handler, data=folder))
    threading.Thread(target=data_server.serve_forever, daemon=True, name="view-data").start()
    neuroglancer.set_server_bind_address(host, bind_port=port)
    viewer = neuroglancer.Viewer()
    viewer.set_state(neuroglancer.ViewerState(viewer_state(found, f"http://{host}:{data_server.server_address[1]}")))
    return viewer, data_server, viewer.get_viewer_url()


def serve(folder: str | os.PathLike, port: int, open_browser: bool) -> None:
    """Serve until interrupted, printing the link (and the SSH tunnel for a remote node)."""
    import time

    viewer, data_server, url = start(folder, port)
    ports = (urllib.parse.urlsplit(url).port, data_server.server_address[1])
    tunnel = " ".join(f"-L {p}:127.0.0.1:{p}" for p in ports)
    print(f"neuroglancer view of {folder} (Ctrl-C to stop):\n  {url}\n"
          f"from another machine: ssh {tunnel} {os.uname().nodename}, then open the link there")
    if open_browser:
        webbrowser.open(url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        data_server.shutdown()
