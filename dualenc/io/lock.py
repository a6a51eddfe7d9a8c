"""One writer per output (a directory, or one file of it such as an encode shard): an advisory file lock
next to it, held while an artefact is written.

A second writer (another process, or another run of a command) gets one clear error naming the directory and
the pid that holds it, before it touches any file. The lock is a sibling file ``.<name>.lock`` (the directory
itself may be swapped in whole by :func:`dualenc.io.atomic.atomic_dir`); the operating system drops it when
the holder exits, even on ``kill -9``, so a stale lock file never blocks a later run; a new writer waits
:data:`GRACE_S` seconds for a holder that is still exiting (the workers of a launcher killed a moment ago).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from dualenc.errors import InputError

GRACE_S = 5.0  # how long to wait for a holder that is exiting (processes killed a moment ago)


def lock_path(directory: str | os.PathLike) -> Path:
    """The lock file of ``directory``: ``.<name>.lock`` beside it."""
    directory = Path(directory).absolute()
    return directory.parent / f".{directory.name}.lock"


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold the write lock of ``directory`` for the ``with`` block; InputError if another holds it."""
    from filelock import FileLock, Timeout

    path = lock_path(directory)
    try:  # the parent must be a folder this process can write: say so now, not as a lock timeout
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise InputError(f"cannot write there: {err.strerror or err}", path=err.filename or path) from None
    lock = FileLock(str(path), timeout=GRACE_S)
    try:
        lock.acquire()
    except Timeout:
        holder = _holder(path)
        raise InputError(
            f"output directory {directory} is in use{f' by pid {holder}' if holder else ''} (lock {path}); "
            "wait for that run to finish or write elsewhere"
        ) from None
    try:
        with open(str(path) + ".pid", "w", encoding="utf-8") as fh:
            fh.write(str(os.getpid()))
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(str(path) + ".pid")
        lock.release()


def _holder(path: Path) -> str | None:
    """The pid the holder wrote next to the lock, if it is readable."""
    try:
        return Path(str(path) + ".pid").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None
