"""Helpers shared by test files (import as ``from helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """Import a repository script (``eval/…``, ``bench/…``) by path, its folder first on ``sys.path``.

    Scripts import their siblings by name (``from eval_common import main``), as they do when run.
    """
    path = REPO / relative_path
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
