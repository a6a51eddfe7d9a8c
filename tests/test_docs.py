"""The docs/ pages run as written.

On a page, a ```python block whose first line is ``# <name>.py`` is a file: it is written into a fresh folder.
The other ```python blocks run in this process, in order, in one namespace. Then each ```bash block runs in
that folder, in order, and its standard output must match the ```text block right after it: the same text,
integers equal, decimals within ``DECIMAL_TOLERANCE`` (other CPUs may round a last digit differently).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from doc_commands import FILE_MARK, read_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs"
NUMBER = re.compile(r"\d+(?:\.\d+)?")
DECIMAL_TOLERANCE = 0.02


def _check_output(got: str, want: str, where: str) -> None:
    """``got`` reads as ``want``: same text around the numbers, integers equal, decimals close."""
    assert NUMBER.sub("#", got.rstrip()) == NUMBER.sub("#", want.rstrip()), f"{where}: printed\n{got}"
    for g, w in zip(NUMBER.findall(got), NUMBER.findall(want), strict=True):
        if "." in w:
            assert abs(float(g) - float(w)) <= DECIMAL_TOLERANCE, f"{where}: {g} printed, page shows {w}"
        else:
            assert g == w, f"{where}: {g} printed, page shows {w}"


def run_page(page: str, folder: Path) -> str:
    """Run ``page`` as the module docstring says; returns what its in-process python blocks printed. A block
    marked ``<!-- not run: REASON -->`` on the line before its fence is left out (tests/test_doc_blocks.py
    checks its commands against the parsers instead)."""
    found = read_blocks((DOCS / page).read_text(), page)[0]
    blocks = [(block.lang, block.text) for block in found if block.mark is None]
    namespace: dict = {"__name__": "docs_example"}
    printed = io.StringIO()
    for lang, code in blocks:
        if lang != "python":
            continue
        mark = FILE_MARK.match(code)
        if mark:
            (folder / mark.group(1)).write_text(code)
        else:
            with contextlib.redirect_stdout(printed):
                exec(compile(code, page, "exec"), namespace)  # noqa: S102 - running our own documentation
    # the venv's python and dualenc first; no PYTHONPATH: the page sets it where it says it is needed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    assert shutil.which("dualenc", path=env["PATH"]), "the dualenc command is not installed next to python"
    for i, (lang, code) in enumerate(blocks):
        if lang != "bash":
            continue
        assert i + 1 < len(blocks) and blocks[i + 1][0] == "text", f"{page}: no ```text output after {code!r}"
        done = subprocess.run(
            ["bash", "-e", "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"{page}: {code!r} failed:\n{done.stderr[-4000:]}"
        _check_output(done.stdout, blocks[i + 1][1], f"{page}: {code.splitlines()[0]!r}")
    return printed.getvalue()


def test_api_page_runs_as_written(minilm_dir, tmp_path):
    from safetensors.torch import load_file

    from dualenc.io.embeddings import load_embeddings

    printed = run_page("api.md", tmp_path)
    assert printed.splitlines() == ["mean True 256", "False"]
    assert {p.name for p in tmp_path.glob("*.py")} == {"my_towers.py", "train_bow.py"}

    final = tmp_path / "out" / "run" / "final_model"
    spec = json.loads((final / "tower.json").read_text())
    assert spec["class"] == "my_towers.BagOfWords" and spec["config"]["dim"] == 64
    before = load_file(tmp_path / "out" / "untrained" / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert before.keys() == after.keys() == {"embed.weight", "proj.weight", "proj.bias"}
    assert all((after[k] - before[k]).abs().max() > 1e-3 for k in before), "training did not move the weights"

    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    for measure in ("RR@10", "R@10"):
        assert scores["trained"][measure] > scores["untrained"][measure] + 0.3, scores

    [cli], [python] = (
        load_embeddings(tmp_path / "out" / "cli.emb"),
        load_embeddings(tmp_path / "out" / "trained.emb"),
    )
    assert cli.ids == python.ids and len(cli.ids) == 300
    np.testing.assert_array_equal(cli.emb, python.emb)


def test_recipes_page_runs_as_written(tmp_path, shared_data):
    """Its launch commands: tiny.yaml on one process and on 2 CPU processes (torchrun), from a folder laid out
    as the repository root (recipes/, eval/ and bench/ linked, ../shared/data the test data); the plan lines
    it shows; the published frontier rebuilt from its JSON alone."""
    root = tmp_path / "repo"
    root.mkdir()
    for folder in ("recipes", "eval", "bench"):
        (root / folder).symlink_to(DOCS.parent / folder)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)
    run_page("recipes.md", root)
    for run in ("tiny_1p", "tiny_2p"):
        assert json.loads((root / "outputs" / run / "train_summary.json").read_text())["steps"] == 60


def test_negative_cache_page_runs_as_written(tmp_path, shared_data):
    """Its command: tiny_cache.yaml trains with the cache and does what the config's header promises (the loss
    falls below 1.5 within 60 steps, the positive's rank among the cached documents falls)."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "recipes").symlink_to(DOCS.parent / "recipes")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)
    run_page("negative_cache.md", root)
    run = root / "outputs" / "tiny_cache"
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 60
    steps = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert steps[0]["loss"] > 2.5 and steps[-1]["loss"] < 1.5, [s["loss"] for s in steps]
    assert steps[-1]["cache/pos_rank"] < steps[0]["cache/pos_rank"]


def test_data_page_runs_as_written(tmp_path):
    """Its worked example: hand-written qrels and run, scored by dualenc evaluate as the page shows."""
    run_page("data.md", tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"qrels.txt", "run.trec"}


def test_architecture_page_runs_as_written():
    """Its command (the layers check) runs from the repository root and prints what the page shows."""
    run_page("architecture.md", DOCS.parent)


@pytest.mark.parametrize(
    ("got", "ok"),
    [
        ("  trained: RR@10 0.9950  R@10 1.0000", True),
        ("  trained: RR@10 0.9000  R@10 1.0000", False),
        ("  trained: RR@5 1.0000  R@10 1.0000", False),
        ("trained: RR@10 1.0000  R@10 1.0000", False),
    ],
)
def test_output_check(got, ok):
    want = "  trained: RR@10 1.0000  R@10 1.0000\n"
    if ok:
        _check_output(got, want, "x")
    else:
        with pytest.raises(AssertionError):
            _check_output(got, want, "x")


def test_cli_reference_is_generated_from_the_parsers():
    """docs/cli.md equals what scripts/cli_reference.py writes from dualenc's argparse parsers."""
    script = DOCS.parent / "scripts" / "cli_reference.py"
    cmd = [sys.executable, str(script), "--check"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    page = (DOCS / "cli.md").read_text()
    assert "## dualenc mine" in page and "`--format`" in page


def _mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "-f",
        str(root / "mkdocs.yml"),
        "-d",
        str(site),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _raw_dollars(html: str) -> list[str]:
    """The `$` a reader of the site would see: outside code, scripts and arithmatex's math."""
    for element in (r"<pre.*?</pre>", r"<code.*?</code>", r"<script.*?</script>"):
        html = re.sub(element, "", html, flags=re.S)
    html = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', "", html, flags=re.S)
    return [html[max(0, m.start() - 30) : m.start() + 30] for m in re.finditer(r"\$", html)]


def test_raw_dollars_sees_unrendered_tex():
    assert _raw_dollars('<p>cost $x$</p><span class="arithmatex">\\(y\\)</span><code>$OUT</code>') != []
    assert _raw_dollars('<span class="arithmatex">\\(y\\)</span><pre>echo $OUT</pre>') == []


def test_docs_site_builds_in_strict_mode(tmp_path):
    """mkdocs.yml: every page in the navigation, every link and anchor found; a broken link fails it."""
    done = _mkdocs_build(DOCS.parent, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "cli" / "index.html").is_file()
    assert 'class="arithmatex"' in (tmp_path / "site" / "concepts" / "index.html").read_text()
    for page in sorted((tmp_path / "site").rglob("index.html")):
        assert _raw_dollars(page.read_text()) == [], f"{page}: TeX left for the reader, not for MathJax"

    copy = tmp_path / "copy"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy(DOCS.parent / "mkdocs.yml", copy / "mkdocs.yml")
    page = copy / "docs" / "quickstart.md"
    page.write_text(page.read_text() + "\nSee [the missing page](missing.md).\n")
    broken = _mkdocs_build(copy, tmp_path / "site2")
    assert broken.returncode != 0 and "missing.md" in broken.stderr
