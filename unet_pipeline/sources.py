"""The stacks users bring: a multi-page TIFF, a folder of TIFF slices, a Zarr (v2 or v3) array or an OME-Zarr image.

`StackSource` opens one as a (slices, y, x) array, reads regions of it, and
reports its voxel size when the file carries one (OME-XML or ImageJ
metadata and resolution tags in a TIFF, the scale of an OME-Zarr image), so
that a stack is never silently given another stack's voxel size.
`header` reads only the metadata, fast enough for Snakemake to plan jobs
and resources from a volume's shape before anything runs. `signature` is a
cheap digest of a source's content (metadata, sizes and sampled bytes): the
workflow passes it as a parameter, so a stack replaced by another one is
processed again even when the new file is older (`cp -p`, a restore from
backup) and Snakemake's modification times would not notice.

Every failure to read says which file and what to do.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from unet_pipeline.errors import InputError
from unet_pipeline.geometry import Box

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
# Physical units as OME, ImageJ and TIFF spell them, in nanometres.
NM_PER_UNIT = {"nm": 1.0, "nanometer": 1.0, "nanometre": 1.0, "um": 1e3, "µm": 1e3,
               "micron": 1e3, "micrometer": 1e3, "micrometre": 1e3, "mm": 1e6, "millimeter": 1e6,
               "millimetre": 1e6, "cm": 1e7, "centimeter": 1e7, "m": 1e9, "meter": 1e9, "metre": 1e9,
               "a": 0.1, "å": 0.1, "angstrom": 0.1, "pm": 1e-3, "picometer": 1e-3, "inch": 2.54e7}


def is_zarr(path: Path) -> bool:
    """Whether a path is a Zarr store (by suffix or by its metadata file), not a TIFF or a folder of TIFFs."""
    return path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zarray").exists() \
        or (path / ".zgroup").exists()


@dataclass(frozen=True)
class Header:
    """What a source says about itself without reading its voxels."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size_nm: tuple[float | None, float | None, float | None]


class StackSource:
    """A (slices, y, x) stack read by region from TIFF, a TIFF folder or Zarr."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: file not found. Check the dataset path in the config.")
        self._files: list[Path] | None = None
        self._array = None
        voxel: tuple = (None, None, None)
        if is_zarr(self.path):
            self._array, voxel = _open_zarr_source(self.path)
            shape, self.dtype = tuple(self._array.shape), np.dtype(self._array.dtype)
        elif self.path.is_dir():
            self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES)
            if not self._files:
                raise InputError(f"{self.path}: folder holds no .tif/.tiff files; expected one file per slice.")
            first = self._read_file(self._files[0])
            shape, self.dtype = (len(self._files), *first.shape), first.dtype
            voxel = _tiff_voxel_size(self._files[0])
        else:
            shape, self.dtype, voxel = self._open_tiff()
        self.shape = (1, *shape) if len(shape) == 2 else tuple(int(s) for s in shape)
        self.voxel_size_nm = tuple(voxel)
        if len(self.shape) != 3:
            raise InputError(f"{self.path}: expected a 2D image or a 3D stack (slices, y, x), got shape {self.shape}.")
        if 0 in self.shape:
            raise InputError(f"{self.path}: the stack is empty (shape {self.shape}).")
        if not (np.issubdtype(self.dtype, np.integer) or np.issubdtype(self.dtype, np.floating)
                or self.dtype == bool):
            raise InputError(f"{self.path}: unsupported pixel type {self.dtype}; use integer or float images.")

    # -- opening
    def _open_tiff(self):
        from unet_pipeline.stores import default_codec_pipeline

        try:
            with tifffile.TiffFile(self.path) as tif:
                series = tif.series[0]
                axes, series_shape = series.axes, series.shape
            # tifffile exposes a TIFF as a Zarr store: regions are read on demand,
            # whether the file has one page per slice or one shaped series.
            with default_codec_pipeline():
                import zarr

                self._array = zarr.open(tifffile.imread(self.path, aszarr=True), mode="r")
        except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds for damaged files
            raise InputError(f"{self.path}: not a readable TIFF image ({_reason(exc)}).") from None
        _refuse_channels(self.path, axes, series_shape)
        return tuple(self._array.shape), np.dtype(self._array.dtype), _tiff_voxel_size(self.path)

    def _read_file(self, path: Path) -> np.ndarray:
        try:
            data = tifffile.imread(path)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
            raise InputError(f"{path}: not a readable TIFF image ({_reason(exc)}).") from None
        if data.ndim == 3 and data.shape[-1] in (3, 4):
            _refuse_channels(path, "YXS", data.shape)
        if data.ndim != 2:
            raise InputError(f"{path}: expected a single 2D slice per file, got shape {data.shape}.")
        return data

    @property
    def header(self) -> Header:
        """What the source says about itself: shape, dtype, recorded voxel size."""
        return Header(self.shape, self.dtype, self.voxel_size_nm)

    def __len__(self) -> int:
        return self.shape[0]

    # -- reading
    def read(self, box: Box) -> np.ndarray:
        """The region `box` (inside the stack) as an array; a damaged file is named in one sentence."""
        if self._files is not None:
            planes = []
            for z in range(box.start[0], box.stop[0]):
                data = self._read_file(self._files[z])
                if data.shape != tuple(self.shape[1:]):
                    raise InputError(f"{self._files[z]}: slice shape {data.shape} differs from the first slice "
                                     f"{self.shape[1:]}.")
                planes.append(data[box.slices[1:]])
            return np.stack(planes)
        try:
            if self._array.ndim == 2:
                return np.asarray(self._array[box.slices[1:]])[None]
            return np.asarray(self._array[box.slices])
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoding errors of damaged files come in many kinds
            where = f"slices {box.start[0]}-{box.stop[0] - 1}" if box.shape[0] > 1 else f"slice {box.start[0]}"
            raise InputError(f"{self.path} ({where}): cannot be read, the file is damaged ({_reason(exc)}).") \
                from None

    def slice(self, z: int) -> np.ndarray:
        """Slice `z` as a 2D array."""
        return self.read(Box((z, 0, 0), (z + 1, *self.shape[1:])))[0]

    def __getitem__(self, z: int) -> np.ndarray:
        """Slice `z`, so that a source can stand in for an array indexed by slice."""
        return self.slice(z)

    def slices(self):
        """Every slice in order, one at a time."""
        for z in range(len(self)):
            yield self.slice(z)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _refuse_channels(path: Path, axes: str, shape) -> None:
    """EM stacks have one channel: an RGB or multi-channel TIFF would be read as (y, x, 3) slices."""
    if "S" in axes or "C" in axes:
        raise InputError(
            f"{path}: is an RGB/multi-channel image (axes {axes}, shape {tuple(shape)}); the pipeline needs "
            "single-channel (grayscale) EM slices: convert it, e.g. keep one channel or average them."
        )


def read_stack(path: str | os.PathLike) -> np.ndarray:
    """A whole (slices, y, x) stack in memory: for small data (tests, synthetic stacks)."""
    source = StackSource(path)
    return source.read(Box((0, 0, 0), source.shape))


# --------------------------------------------------------------------------- Zarr sources
def _open_zarr_source(path: Path):
    """A Zarr array, or level 0 of an OME-Zarr image, with the voxel size its metadata records."""
    import zarr

    from unet_pipeline.stores import ZARR_OPEN_ERRORS, PIPELINE_LOCK

    try:
        with PIPELINE_LOCK:
            node = zarr.open(str(path), mode="r")
    except ZARR_OPEN_ERRORS as exc:
        raise InputError(f"{path}: not a readable Zarr store ({_reason(exc)}).") from None
    voxel = (None, None, None)
    if isinstance(node, zarr.Group):
        ome = node.attrs.get("ome", {}) or {}
        multiscales = ome.get("multiscales") or node.attrs.get("multiscales")
        if not multiscales:
            raise InputError(f"{path}: a Zarr group without OME-Zarr multiscales metadata; give the path of the "
                             "image array inside it instead.")
        first = multiscales[0]
        dataset = first["datasets"][0]
        if dataset["path"] not in node:
            raise InputError(f"{path}: the OME-Zarr image names level {dataset['path']!r}, which is missing.")
        voxel = _ome_scale(first, dataset)
        with PIPELINE_LOCK:
            node = node[dataset["path"]]
    return node, voxel


def _ome_scale(multiscale: dict, dataset: dict) -> tuple:
    """(z, y, x) in nm from an NGFF multiscales entry: the dataset's scale, in its axes' units."""
    axes = multiscale.get("axes") or [{"name": n} for n in ("z", "y", "x")]
    scale = None
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = transform.get("scale")
    if scale is None or len(scale) != len(axes):
        return (None, None, None)
    by_name = {}
    for axis, value in zip(axes, scale):
        axis = axis if isinstance(axis, dict) else {"name": axis}
        factor = NM_PER_UNIT.get(str(axis.get("unit", "")).lower())
        by_name[axis.get("name")] = float(value) * factor if factor else None
    return tuple(by_name.get(n) for n in ("z", "y", "x"))


# --------------------------------------------------------------------------- TIFF metadata
def _tiff_voxel_size(path: Path) -> tuple:
    """(z, y, x) in nm from OME-XML, ImageJ metadata or resolution tags; None where the file says nothing."""
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome and tif.ome_metadata:
                found = _ome_xml_voxel_size(tif.ome_metadata)
                if any(v is not None for v in found):
                    return found
            page = tif.pages[0]
            tags = page.tags
            unit = tags.get("ResolutionUnit")
            unit_value = int(unit.value) if unit is not None else 1
            z = None
            nm_per_unit = {2: NM_PER_UNIT["inch"], 3: NM_PER_UNIT["cm"]}.get(unit_value)
            imagej = tif.imagej_metadata or {}
            if imagej:
                nm_per_unit = NM_PER_UNIT.get(str(imagej.get("unit", "")).lower(), nm_per_unit)
                if imagej.get("spacing") and nm_per_unit:
                    z = float(imagej["spacing"]) * nm_per_unit
            if nm_per_unit is None:
                return (z, None, None)
            y, x = (_pixel_size(tags.get(name), nm_per_unit) for name in ("YResolution", "XResolution"))
            return (z, y, x)
    except Exception:  # noqa: BLE001 - metadata is optional: a file that opens but says nothing is fine
        return (None, None, None)


def _pixel_size(tag, nm_per_unit: float) -> float | None:
    """nm per pixel from a resolution tag (pixels per unit, as a rational)."""
    if tag is None:
        return None
    value = tag.value
    per_unit = value[0] / value[1] if isinstance(value, tuple) else float(value)
    return nm_per_unit / per_unit if per_unit > 0 else None


def _ome_xml_voxel_size(xml: str) -> tuple:
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return (None, None, None)
    pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return (None, None, None)
    values = []
    for axis in ("Z", "Y", "X"):
        size = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        factor = NM_PER_UNIT.get(unit.lower())
        values.append(float(size) * factor if size is not None and factor else None)
    return tuple(values)


# --------------------------------------------------------------------------- for planning
@functools.cache
def _cached_header(path: str, stamp: tuple) -> Header:
    return StackSource(path).header


def header(path: str | os.PathLike) -> Header:
    """Shape, dtype and recorded voxel size of a source, from its metadata (cached per process)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found. Check the dataset path in the config.")
    stat = path.stat()
    return _cached_header(str(path.resolve()), (stat.st_size, stat.st_mtime_ns, stat.st_ino))


SAMPLES = 16
SAMPLE_BYTES = 16384


def signature(path: str | os.PathLike) -> str:
    """A cheap digest of a source's content: its metadata, file sizes and bytes sampled across every file.

    Reads at most a few MB whatever the stack's size. A stack replaced by
    another (even one of the same shape and an older modification time)
    differs in its sampled bytes; a copy of the same stack does not.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if is_zarr(path):
        _sign_zarr(path, digest)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES)
        digest.update(json.dumps([(p.name, p.stat().st_size) for p in files]).encode())
        for p in _spread(files, SAMPLES):
            _sign_file(p, digest, samples=2)
    elif path.exists():
        _sign_file(path, digest, SAMPLES)
    else:
        raise InputError(f"{path}: file not found. Check the dataset path in the config.")
    return digest.hexdigest()[:24]


def _spread(items: list, count: int) -> list:
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _sign_file(path: Path, digest, samples: int) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        for offset in sorted({round(i * max(0, size - SAMPLE_BYTES) / max(1, samples - 1)) for i in range(samples)}):
            fh.seek(offset)
            digest.update(fh.read(SAMPLE_BYTES))


def _sign_zarr(path: Path, digest) -> None:
    """Metadata files, and chunk files sampled across the chunk grid (a missing one counts as missing)."""
    meta = [p for p in sorted(path.rglob("*")) if p.name in ("zarr.json", ".zarray", ".zattrs", ".zgroup")
            and len(p.relative_to(path).parts) <= 3]
    for p in meta:
        digest.update(str(p.relative_to(path)).encode())
        digest.update(p.read_bytes())
    try:
        array, _ = _open_zarr_source(path)
    except InputError:
        return
    root = Path(getattr(array.store, "root", path)) / array.path
    chunks = array.shards if getattr(array, "shards", None) else array.chunks
    grid = [max(1, -(-s // c)) for s, c in zip(array.shape, chunks)]
    total = int(np.prod(grid))
    v3 = array.metadata.zarr_format == 3
    separator = getattr(getattr(array.metadata, "chunk_key_encoding", None), "separator", "/" if v3 else ".")
    for flat in sorted({round(i * (total - 1) / (SAMPLES - 1)) for i in range(SAMPLES)}):
        index = np.unravel_index(flat, grid)
        key = separator.join(str(int(i)) for i in index)
        file = root / ("c" + separator + key if v3 else key)
        if v3 and separator == "/":
            file = root / "c" / Path(*map(str, map(int, index)))
        if file.exists():
            _sign_file(file, digest, samples=2)
        else:
            digest.update(f"missing:{key}".encode())


def describe_voxel_size(voxel: tuple) -> str:
    """A voxel size for the log, '?' where unknown: e.g. '50 x 4 x 4 nm'."""
    return " x ".join("?" if v is None else f"{v:g}" for v in voxel) + " nm"


def resolve_voxel_size(path: str | os.PathLike, configured, where: str) -> tuple[float, float, float]:
    """The voxel size to record: the configured one, or `auto` = what the source's metadata says.

    Said in the log either way. A configured size that contradicts the
    file's metadata is used, with a warning; `auto` where the file records
    nothing falls back to 1 nm per axis, with a warning naming the key to set.
    """
    recorded = header(path).voxel_size_nm
    if configured != "auto":
        chosen = tuple(float(v) for v in configured)
        known = [(c, r) for c, r in zip(chosen, recorded) if r is not None]
        if any(abs(c - r) > 1e-3 * max(c, r) for c, r in known):
            log.warning("%s: %s is %s, but the file records %s; using the configured size", path, where,
                        describe_voxel_size(chosen), describe_voxel_size(recorded))
        log.info("%s: voxel size %s (from %s)", path, describe_voxel_size(chosen), where)
        return chosen
    if all(v is not None for v in recorded):
        log.info("%s: voxel size %s (from the file's metadata)", path, describe_voxel_size(recorded))
        return tuple(recorded)
    chosen = tuple(1.0 if v is None else v for v in recorded)
    log.warning("%s: the file records no voxel size for %s; using %s: set %s to the real one", path,
                ", ".join(a for a, v in zip("zyx", recorded) if v is None), describe_voxel_size(chosen), where)
    return chosen

