"""Open raw, probabilities and segmentation of a results folder with napari-ome-zarr; report layers and any change.

A manual check (napari is not a dependency of the project), run under Xvfb from an environment with
napari[pyqt5]==0.9.2 and napari-ome-zarr==0.10.0:
    xvfb-run -a python docs/napari_check.py results/<dataset>
"""
import sys
from pathlib import Path
folder = Path(sys.argv[1])
def listing():
    return sorted((str(p.relative_to(folder.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.parent.rglob("*"))
before = listing()
import napari
viewer = napari.Viewer(show=False)
for name in ("raw", "probabilities", "segmentation"):
    layers = viewer.open(str(folder / f"{name}.ome.zarr"), plugin="napari-ome-zarr")
    print(name, "->", [(l.name, type(l).__name__, l.data[0].shape if hasattr(l.data, "__getitem__") else None, len(l.data) if isinstance(l.data, list) else "") for l in layers])
after = listing()
changed = sorted(set(after) ^ set(before))
print("results changed:", changed if changed else "no")
viewer.close()
