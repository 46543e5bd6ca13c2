"""Outputs that appear whole or not at all: temporary siblings renamed into place.

A killed job must never leave a file or folder that looks finished: every
writer here builds its output under a hidden temporary name beside the
target and renames it into place only on success (a rename within one
folder is atomic). Temporaries left by a killed writer are removed the next
time the same target is written. Errors from the operating system that name
no file (a full disk, a quota) are attributed to the output being written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def naming_errors(target: str | os.PathLike) -> Iterator[None]:
    """Attribute an OSError without a file name (a full disk, a quota) to `target`, the output being written.

    A write that fails for lack of space raises ENOSPC from deep inside a
    library, often with no path; the user needs to know which output failed.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc
        raise


def remove(path: Path) -> None:
    """Remove a file or a folder tree, whichever `path` is; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporary_sibling(target: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside `target`; stale ones of the same kind left by killed writers are removed first.

    One writer at a time owns a target (Snakemake never runs two jobs for one
    output), so any `.NAME.<kind>-*` present when a new write starts is debris.
    """
    for stale in target.parent.glob(f".{target.name}.{kind}-*"):
        remove(stale)
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")


def replace(source: Path, target: Path) -> None:
    """Move `source` into place at `target`, replacing whatever is there.

    A folder cannot be renamed over a non-empty folder, so an existing
    target is first renamed aside (atomically) and removed afterwards: a
    reader sees the old output or the new one, never a mixture.
    """
    if not source.is_dir():
        os.replace(source, target)  # a file replaces a file atomically: readers see one or the other
    elif target.exists() or target.is_symlink():
        aside = temporary_sibling(target, "old")
        os.replace(target, aside)
        os.replace(source, target)
        remove(aside)
    else:
        os.replace(source, target)


@contextlib.contextmanager
def _swapped_in(target: str | os.PathLike, durable: bool) -> Iterator[Path]:
    """A temporary sibling of `target` that replaces it only when the block ends without an error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    try:
        with naming_errors(target):
            yield tmp
            if durable:
                fsync(tmp)
        replace(tmp, target)
    finally:
        remove(tmp)


def atomic_directory(target: str | os.PathLike):
    """Yield a temporary sibling directory that replaces `target` only on success."""
    return _swapped_in(target, durable=False)


def atomic_file(target: str | os.PathLike, durable: bool = False):
    """Yield a temporary sibling path; on success it replaces `target`, so readers see all or nothing.

    `durable` fsyncs the file before the rename, for writes whose completion
    is recorded elsewhere (a checkpoint).
    """
    return _swapped_in(target, durable)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file so that readers see either nothing or all of it."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def fsync(path: str | os.PathLike) -> None:
    """Make a written file durable: its completion may be recorded only afterwards."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
