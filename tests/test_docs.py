"""The Python examples in docs/ run as written (each page's ```python blocks, in order, in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["api.md"]


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page, minilm_dir, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    assert blocks, f"{page} has no python block"
    namespace: dict = {"__name__": "docs_example"}
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), namespace)  # noqa: S102 - running our own documentation
    out = capsys.readouterr().out.splitlines()
    assert out == ["['d1', 'd2']", "mean True 256", "False"]
