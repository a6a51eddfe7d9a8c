"""Atomic writes: write to a temporary sibling, fsync, then ``os.replace``; directories swapped in whole.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
half-written file, even after ``kill -9``; likewise for a directory written through :func:`atomic_dir` and
opened through :func:`readable_dir`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artefacts get the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def aside_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_dir` moves the old ``path`` while it swaps: ``.<name>.old`` beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.old"


def readable_dir(path: str | os.PathLike) -> Path:
    """The directory to read: ``path``, or its moved-aside previous version when ``path`` is missing.

    Where :func:`atomic_dir` swaps in two renames, a writer killed between them leaves no ``path`` and the
    complete previous directory at :func:`aside_path`. Readers read that one (they never move it back; the
    next writer does) and should still check what they read, since a directory can change while it is read.
    """
    path = Path(path)
    aside = aside_path(path)
    if not path.exists() and aside.is_dir():
        logger.warning(
            "%s is missing (a replacement was interrupted); reading its previous version %s", path, aside
        )
        return aside
    return path


def recover_dir(path: str | os.PathLike) -> None:
    """Undo what a writer killed inside :func:`atomic_dir` left behind.

    Moves the previous ``path`` back if ``path`` is missing, deletes a leftover aside copy and the temporary
    directories. Call it holding ``path``'s write lock (:func:`dualenc.io.lock.output_lock`): another
    writer's temporary directory would be deleted too.
    """
    path = Path(path)
    _restore(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def _restore(path: Path) -> None:
    """``path`` missing: the aside copy is the complete previous version; else an aside copy is garbage."""
    aside = aside_path(path)
    if not aside.is_dir():
        return
    if path.exists():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        logger.warning("restoring %s from %s (its replacement was interrupted)", path, aside)
        os.replace(aside, path)


def _exchange(new: Path, path: Path) -> bool:
    """Swap two existing directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``, glibc >= 2.28).

    Returns False, having changed nothing, where the platform or the file system has no such call.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(path), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # not supported here: use the two renames
        return False
    raise OSError(err, os.strerror(err), str(new), None, str(path))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` whole.

    On Linux the new directory and the old ``path`` are exchanged in one atomic step, and the old one (now
    at the temporary name) is deleted after: ``path`` always holds a complete directory. Where that call is
    missing the swap is two renames: the old ``path`` to :func:`aside_path`, then the new directory to
    ``path``. A kill between them leaves no ``path`` and the complete old directory at the aside path;
    :func:`readable_dir` reads it there, and the next ``atomic_dir`` (or :func:`recover_dir`) moves it back.
    Either way a kill at any moment leaves the complete old directory or the complete new one, never a mix.
    Hold ``path``'s write lock (:func:`dualenc.io.lock.output_lock`) so only one writer swaps at a time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _restore(path)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp_path, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp_path
        _restore(path)  # an aside copy left while the new directory was written is garbage now
        if not path.exists():
            os.replace(tmp_path, path)
        elif not (path.is_dir() and _exchange(tmp_path, path)):
            aside = aside_path(path)
            os.replace(path, aside)
            os.replace(tmp_path, path)
            if aside.is_dir():
                shutil.rmtree(aside)
            else:  # a file was there
                aside.unlink()
    finally:
        if tmp_path.exists():  # the new directory after a failure, or the old one after an exchange
            shutil.rmtree(tmp_path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Write one string per line to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line)
            fh.write("\n")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` atomically (memory-mappable with ``np.load(mmap_mode='r')``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
