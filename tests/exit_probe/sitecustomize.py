"""Imported at start-up by every Python process whose PYTHONPATH begins with this folder (the test's
launchers and their workers): when ``DUALENC_EXIT_PROBE`` names a folder, an ``atexit`` handler writes there
which gloo threads still run when the interpreter starts finalizing (``<RANK or 'solo'>.<pid>.json``).

A process that ends through :func:`dualenc.training.process_exit.end_process` skips finalization, so it
writes nothing."""

import atexit
import json
import os
from pathlib import Path


def _gloo_threads() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            continue
    return sorted(name for name in names if "gloo" in name)


def _write_probe(folder: str) -> None:
    rank = os.environ.get("RANK", "solo")
    try:
        found: object = _gloo_threads()
    except Exception as err:  # reported in the file, where the test sees it
        found = f"probe failed: {err!r}"
    Path(folder, f"{rank}.{os.getpid()}.json").write_text(json.dumps(found))


if os.environ.get("DUALENC_EXIT_PROBE"):
    atexit.register(_write_probe, os.environ["DUALENC_EXIT_PROBE"])
