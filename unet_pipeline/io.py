"""Reading EM stacks and writing chunked, compressed OME-Zarr (NGFF 0.5, Zarr v3).

Every writer here is atomic at the level a user sees: a store is built under a
temporary sibling path and renamed into place only when complete, so that a
killed job never leaves something that looks like a finished output. Stores
that are filled incrementally (prediction) record completion explicitly
instead (see `mark_complete` / `is_complete`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from unet_pipeline import __version__
from unet_pipeline.errors import InputError

TIFF_SUFFIXES = (".tif", ".tiff")
COMPLETE_KEY = "unet_pipeline"


# --------------------------------------------------------------------------- reading
def read_stack(path: str | os.PathLike) -> np.ndarray:
    """Read a whole (slices, y, x) stack into memory (TIFF, folder of TIFFs or Zarr).

    For small data (tests, synthetic stacks, validation slices); stages that
    must scale stream slices through `preprocess.StackSource` instead.
    """
    from unet_pipeline.preprocess import StackSource

    source = StackSource(path)
    return np.stack(list(source.slices()))


def open_zarr_array(path: str | os.PathLike, level: str = "0") -> zarr.Array:
    """Open a plain Zarr array, or level `level` of an OME-Zarr multiscale group."""
    path = Path(path)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a non-store
        raise InputError(f"{path}: not a readable Zarr store ({exc}).") from exc
    if isinstance(node, zarr.Group):
        if level not in node:
            raise InputError(f"{path}: Zarr group has no array {level!r}; expected an OME-Zarr image.")
        node = node[level]
    return node


def open_ome_image(path: str | os.PathLike, require_complete: bool = True) -> zarr.Array:
    """Full-resolution array of an OME-Zarr written by this package, checked for completeness."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: OME-Zarr not found; run the stage that writes it first.")
    if require_complete and not is_complete(path):
        raise InputError(
            f"{path}: this OME-Zarr is incomplete (its writer was interrupted); rerun the stage that writes it."
        )
    return open_zarr_array(path)


# --------------------------------------------------------------------------- writing
def compressor() -> BloscCodec:
    """Blosc + Zstd with bit shuffle: the usual choice for EM volumes."""
    return BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file so that readers see either nothing or all of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def create_ome_image(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype,
    chunks: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    name: str = "image",
    fill_value=0,
) -> zarr.Array:
    """Create an OME-Zarr group with an empty full-resolution level "0".

    The multiscales metadata lists level 0 only; `build_pyramid` adds the
    coarser levels once level 0 is complete.
    """
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    arr = group.create_array(
        "0", shape=tuple(shape), chunks=chunks, dtype=dtype, compressors=compressor(),
        fill_value=fill_value, dimension_names=("z", "y", "x"),
    )
    _write_multiscales(group, [1], voxel_size, name)
    return arr


def _write_multiscales(group: zarr.Group, factors: list[int], voxel_size: Sequence[float], name: str) -> None:
    from ome_zarr.writer import write_multiscales_metadata

    datasets = [
        {
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": [float(voxel_size[0]), float(voxel_size[1]) * f, float(voxel_size[2]) * f]}
            ],
        }
        for level, f in enumerate(factors)
    ]
    write_multiscales_metadata(
        group, datasets, axes=[
            {"name": "z", "type": "space", "unit": "nanometer"},
            {"name": "y", "type": "space", "unit": "nanometer"},
            {"name": "x", "type": "space", "unit": "nanometer"},
        ], name=name,
    )


def write_ome_image(
    path: str | os.PathLike,
    data: np.ndarray,
    chunks: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    name: str = "image",
    attrs: dict | None = None,
    pyramid_levels: int = 2,
    label: bool = False,
) -> None:
    """Write an in-memory stack as a complete OME-Zarr, atomically."""
    with atomic_directory(path) as tmp:
        arr = create_ome_image(tmp, data.shape, data.dtype, chunks, voxel_size, name)
        arr[...] = data
        build_pyramid(tmp, pyramid_levels, label=label, voxel_size=voxel_size, name=name)
        mark_complete(tmp, attrs or {})


def build_pyramid(
    path: str | os.PathLike, levels: int, label: bool = False,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0), name: str = "image",
) -> None:
    """Add 2x downsampled levels in y/x (mean for intensities, stride for labels).

    Slices are anisotropic (ssTEM), so z is never downsampled. Works slice by
    slice so that memory stays bounded by one slice of level 0.
    """
    group = zarr.open_group(str(path), mode="r+")
    source = group["0"]
    factors = [1]
    for level in range(1, levels + 1):
        shape = source.shape[:1] + tuple(max(1, s // 2) for s in source.shape[1:])
        if min(source.shape[1:]) < 2:
            break
        dest = group.create_array(
            str(level), shape=shape, chunks=source.chunks, dtype=source.dtype, compressors=compressor(),
            fill_value=0, dimension_names=("z", "y", "x"), overwrite=True,
        )
        for z in range(shape[0]):
            plane = np.asarray(source[z])[: 2 * shape[1], : 2 * shape[2]]
            if label:
                small = plane[::2, ::2]
            else:
                small = plane.reshape(shape[1], 2, shape[2], 2).astype(np.float32).mean(axis=(1, 3))
                if np.issubdtype(dest.dtype, np.integer):
                    small = np.rint(small)
                small = small.astype(dest.dtype)
            dest[z] = small
        factors.append(2 ** level)
        source = dest
    _write_multiscales(group, factors, voxel_size, name)
    if label:
        ome = dict(group.attrs.get("ome", {}))
        ome["image-label"] = {"version": ome.get("version", "0.5"), "source": {"image": "../raw.ome.zarr"}}
        group.attrs["ome"] = ome


def mark_complete(path: str | os.PathLike, attrs: dict) -> None:
    """Record provenance and completion; readers refuse stores without this mark."""
    group = zarr.open_group(str(path), mode="r+")
    group.attrs[COMPLETE_KEY] = {**attrs, "complete": True, "version": __version__}


def is_complete(path: str | os.PathLike) -> bool:
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:
        return False
    return bool(group.attrs.get(COMPLETE_KEY, {}).get("complete", False))


def store_attrs(path: str | os.PathLike) -> dict:
    return dict(zarr.open_group(str(path), mode="r").attrs.get(COMPLETE_KEY, {}))
