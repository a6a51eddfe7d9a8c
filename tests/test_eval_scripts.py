"""The eval/ scripts as a user runs them: prepare_scifact.py on the real zip, and where each script's defaults
point (the files shipped in ../shared/data)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, load_script

# What eval/prepare_scifact.py writes from the shipped zip, and its docstring states: (file, lines).
SCIFACT_FILES = {
    "corpus.jsonl": 5183,
    "queries.train-all.tsv": 809,
    "qrels.train-all.txt": 919,
    "queries.train.tsv": 729,
    "qrels.train.txt": 822,
    "queries.dev.tsv": 80,
    "qrels.dev.txt": 97,
}


def _prepare(*args: str) -> subprocess.CompletedProcess:
    """``python eval/prepare_scifact.py ARGS`` from the repository root."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "eval/prepare_scifact.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": path},
    )


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_prepare_scifact_writes_the_counts_its_docstring_states(shared_data, tmp_path):
    zip_path = shared_data / "scifact" / "scifact.hf-csv.zip"
    if not zip_path.is_file():
        pytest.skip(f"{zip_path} not found")
    out = tmp_path / "scifact"
    proc = _prepare(str(zip_path), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {name: len(_lines(out / name)) for name in SCIFACT_FILES} == SCIFACT_FILES
    doc = load_script("eval/prepare_scifact.py").__doc__
    for name, count in SCIFACT_FILES.items():
        assert name in doc and f"({count:,})" in doc, (name, count)

    train, dev, every = (
        {line.split("\t")[0] for line in _lines(out / f"queries.{split}.tsv")}
        for split in ("train", "dev", "train-all")
    )
    assert train | dev == every and not train & dev
    for split, queries in (("train", train), ("dev", dev)):
        assert {line.split()[0] for line in _lines(out / f"qrels.{split}.txt")} == queries
    docs = [json.loads(line) for line in _lines(out / "corpus.jsonl")]
    assert all(d.keys() == {"_id", "title", "text"} and d["text"] for d in docs)
    cited = {line.split()[2] for line in _lines(out / "qrels.train-all.txt")}
    assert cited <= {d["_id"] for d in docs}
    assert "'queries.train': 729" in proc.stdout


def test_prepare_scifact_missing_zip_is_one_clear_line(tmp_path):
    proc = _prepare(str(tmp_path / "absent.zip"), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"prepare_scifact: error: {tmp_path / 'absent.zip'}: file not found"
    not_zip = tmp_path / "not.zip"
    not_zip.write_text("plain text")
    proc = _prepare(str(not_zip), str(tmp_path / "out"))
    assert proc.returncode == 2 and "not a zip file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_prepare_scifact_bad_arguments_print_the_real_usage(tmp_path):
    proc = _prepare(str(tmp_path / "only_one_argument.zip"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: python eval/prepare_scifact.py [-h] ZIP OUT_DIR")
    assert "required: OUT_DIR" in proc.stderr


def test_data_root_is_shared_data_beside_the_repository(monkeypatch, tmp_path):
    eval_common = load_script("eval/eval_common.py")
    monkeypatch.delenv("DUALENC_DATA", raising=False)
    assert eval_common.data_root() == REPO.parent / "shared" / "data"
    monkeypatch.setenv("DUALENC_DATA", str(tmp_path))
    assert eval_common.data_root() == tmp_path


@pytest.mark.parametrize(
    ("script", "measures", "baselines"),
    [
        ("msmarco_dev", "msmarco-dev", 0),
        ("trec_dl19", "nDCG@10 RR(rel=2)@10 R(rel=2)@100 R(rel=2)@1000", 1),
        ("beir_scifact", "beir", 0),
    ],
)
def test_eval_script_defaults_are_the_shipped_files(shared_data, monkeypatch, script, measures, baselines):
    """Each script hands eval_common.main default topics, qrels (and baseline runs) that exist."""
    module = load_script(f"eval/{script}.py")
    calls = []
    monkeypatch.setattr(module.eval_common, "main", lambda *args, **kwargs: calls.append(args) or {})
    monkeypatch.setenv("DUALENC_DATA", str(shared_data))
    module.main(["--model", "m"])
    ((name, defaults, description, argv),) = calls
    assert (name, defaults["measures"], argv) == (script, measures, ["--model", "m"])
    assert description == module.__doc__.splitlines()[0]
    assert Path(defaults["topics"]).is_file() and Path(defaults["qrels"]).is_file()
    assert len(defaults["baselines"]) == baselines
    assert all(Path(spec.rpartition("=")[2]).is_file() for spec in defaults["baselines"])
    if script != "beir_scifact":  # its default collection is converted from the zip on first use
        assert Path(defaults["collection"]).is_file()


def test_beir_scifact_converts_the_default_corpus_on_first_use_only(shared_data, monkeypatch, tmp_path):
    module = load_script("eval/beir_scifact.py")
    monkeypatch.setenv("DUALENC_DATA", str(shared_data))
    monkeypatch.chdir(tmp_path)  # the default corpus is outputs/scifact/corpus.jsonl under the working dir
    module._convert_corpus(argparse.Namespace(collection="other.jsonl"))
    assert not (tmp_path / "outputs").exists()
    module._convert_corpus(argparse.Namespace(collection=str(module.CORPUS)))
    assert len(_lines(tmp_path / module.CORPUS)) == SCIFACT_FILES["corpus.jsonl"]
