"""What the command line checks before any file is touched, and the one line each expected failure prints.

:func:`check_args` runs before a subcommand: sizes are at least 1, input files and directories exist, a
model directory is a whole model (:func:`dualenc.model.model_dir.read_model_dir`), an output path is of the
right kind (a directory for ``encode``/``index``, a file for ``search``/``retrieve``/``mine``) and the
directory it will be written in accepts a file. :func:`failure_line` turns an expected failure (bad input,
an OS error, a corrupt file that a library rejects) into one line; it returns None for anything else, a bug,
whose traceback the caller keeps.
"""

from __future__ import annotations

import errno
import gzip
import json
import tempfile
import zlib
from argparse import Namespace
from pathlib import Path

from dualenc.errors import InputError
from dualenc.io.atomic import readable_dir

MIN_VALUES = {  # flag (argparse dest) -> smallest accepted value
    "batch_size": 1,
    "chunk_size": 1,
    "hits": 1,
    "depth": 1,
    "train_size": 1,
    "num_negatives": 1,
    "skip_top": 0,
    "query_max_len": 1,
    "passage_max_len": 1,
}
OUTPUT_KINDS = {"encode": "dir", "index": "dir", "search": "file", "retrieve": "file", "mine": "file"}
INPUT_FILES = ("collection", "topics", "qrels", "run")  # flags naming a file to read
INPUT_DIRS = ("embeddings", "queries", "index")  # flags naming a directory to read
MODEL_FLAGS = ("model", "encoder")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args: Namespace) -> None:
    """Raise one ``InputError`` for the first bad flag of ``args`` (see the module docstring)."""
    for dest, least in MIN_VALUES.items():
        value = getattr(args, dest, None)
        if value is not None and value < least:
            raise InputError(f"{_flag(dest)} must be >= {least}, got {value}")
    for dest in INPUT_FILES:
        path = getattr(args, dest, None)
        if path is not None and not Path(path).is_file():
            problem = "is a directory, expected a file" if Path(path).exists() else "file not found"
            raise InputError(f"{dest} {problem} ({_flag(dest)})", path=path)
    for dest in INPUT_DIRS:
        path = getattr(args, dest, None)
        # readable_dir: the previous version of a directory whose replacement was interrupted
        if path is not None and not readable_dir(path).is_dir():
            problem = "is a file, expected a directory" if Path(path).exists() else "directory not found"
            raise InputError(f"{dest} {problem} ({_flag(dest)})", path=path)
    for dest in MODEL_FLAGS:
        if getattr(args, dest, None) is not None:
            from dualenc.model.model_dir import read_model_dir

            read_model_dir(getattr(args, dest), {})
    kind = OUTPUT_KINDS.get(getattr(args, "command", None))
    if kind is not None and getattr(args, "output", None) is not None:
        check_output(Path(args.output), kind)


def check_output(output: Path, kind: str) -> None:
    """``output`` can be written as a ``kind`` (``"dir"`` or ``"file"``): right kind, writable place."""
    if kind == "dir" and output.exists() and not output.is_dir():
        raise InputError("--output is an existing file; this command writes a directory there", path=output)
    if kind == "file" and output.is_dir():
        raise InputError("--output is an existing directory; this command writes a file there", path=output)
    parent = output.absolute().parent
    while not parent.exists():  # the writers create missing parents
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot write --output under {parent}: it is a file", path=output)
    for directory in (parent, output) if output.is_dir() else (parent,):
        try:  # a real write: os.access says yes to root on a read-only file system
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as err:
            raise InputError(f"cannot write in {directory}: {err.strerror or err}", path=output) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def failure_line(err: BaseException, args: Namespace) -> str | None:
    """The message for an expected failure of a subcommand run with ``args``; None for a bug."""
    if isinstance(err, InputError):
        return str(err)
    if isinstance(err, (gzip.BadGzipFile, EOFError, zlib.error)):
        return f"not a valid gzip file ({_one_line(str(err))})"
    if isinstance(err, OSError):
        return _os_error_line(err, args)
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}"
    if type(err).__name__ == "SafetensorError":  # safetensors' own exception type, not importable cheaply
        return f"corrupt safetensors file: {_one_line(str(err))}"
    if isinstance(err, RuntimeError) and "faiss" in str(err).lower():  # faiss raises RuntimeError
        return f"faiss: {_one_line(str(err))}"
    return None


def _os_error_line(err: OSError, args: Namespace) -> str:
    """``path: reason`` for an OS error; one without a path names the output it was probably writing."""
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    reason = err.strerror or _one_line(str(err))
    if paths:
        return f"{' -> '.join(paths)}: {reason}"
    output = getattr(args, "output", None)
    if err.errno in _WRITE_ERRNOS and output is not None:
        return f"{reason} (while writing --output {output})"
    return reason
