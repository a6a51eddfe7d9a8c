"""Every expected failure of the `dualenc` command is one line `dualenc: error: ...` and exit status 2.

One test per class of failure, each through `main([...])` as a user runs it (a subprocess where a
traceback could escape the handler): the line names the file, line or value; nothing is written; the
traceback appears only with `--debug` or `DUALENC_DEBUG=1`; a bug keeps its traceback.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ir_measures
import pytest
from helpers import write, write_collection

from dualenc.cli import main
from dualenc.evaluation.measures import evaluate
from dualenc.io.embeddings import load_embeddings

ROOT = Path(__file__).resolve().parents[1]


def error_line(capsys) -> str:
    """The one stderr line of a failed command (asserting it is one line, with no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dualenc: error: "), err
    assert "Traceback" not in err
    return lines[0]


def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m dualenc -q ARGV` in a subprocess: what escapes the handler reaches its stderr."""
    full_env = {k: v for k, v in os.environ.items() if k != "DUALENC_DEBUG"}
    full_env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "dualenc", "-q", *argv],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


@pytest.fixture
def data(tmp_path):
    write_collection(tmp_path / "collection.tsv", 20, seed=3)
    write(tmp_path / "topics.tsv", "q1\tfirst query\nq2\tsecond query\n")
    write(tmp_path / "qrels.txt", "q1 0 d0001 1\nq2 0 d0002 2\nq3 0 d0003 1\n")
    return tmp_path


def test_sizes_below_one_are_refused_before_any_file_is_written(data, tiny_model_dir, capsys):
    out = data / "out"
    cases = [
        (
            ["encode", "--model", str(tiny_model_dir), "--collection", str(data / "collection.tsv")],
            "--batch-size",
            "0",
        ),
        (
            ["encode", "--model", str(tiny_model_dir), "--collection", str(data / "collection.tsv")],
            "--chunk-size",
            "-5",
        ),
        (["index", "--embeddings", str(data)], "--train-size", "0"),
        (
            [
                "retrieve",
                "--encoder",
                str(tiny_model_dir),
                "--topics",
                str(data / "topics.tsv"),
                "--index",
                str(data),
            ],
            "--hits",
            "0",
        ),
        (["mine", "--run", str(data / "qrels.txt"), "--qrels", str(data / "qrels.txt")], "--depth", "-1"),
        (
            ["mine", "--run", str(data / "qrels.txt"), "--qrels", str(data / "qrels.txt")],
            "--num-negatives",
            "0",
        ),
    ]
    for argv, flag, value in cases:
        assert main(["-q", *argv, "--output", str(out), flag, value]) == 2
        assert error_line(capsys) == f"dualenc: error: {flag} must be >= 1, got {value}"
        assert not out.exists()


def test_model_dir_that_is_not_a_whole_model(data, tiny_model_dir, tmp_path, capsys):
    def broken(name, damage):
        path = tmp_path / name
        shutil.copytree(tiny_model_dir, path)
        damage(path)
        return path

    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    write(not_a_model / "README.md", "not a model\n")
    no_weights = broken("no_weights", lambda p: (p / "model.safetensors").unlink())
    no_tokenizer = broken("no_tokenizer", lambda p: [f.unlink() for f in p.glob("tokenizer*.json")])
    size = (tiny_model_dir / "model.safetensors").stat().st_size
    truncated = broken("truncated", lambda p: os.truncate(p / "model.safetensors", size - 100))
    cut_header = broken("cut_header", lambda p: os.truncate(p / "model.safetensors", 100))
    cases = [
        (not_a_model, f"{not_a_model}: not a model directory: none of dualenc_config.json"),
        (no_weights, f"{no_weights}: incomplete model: no weights file (model.safetensors or"),
        (no_tokenizer, f"{no_tokenizer}: incomplete model: no tokenizer file (tokenizer.json"),
        (
            truncated / "model.safetensors",
            f"truncated weights: {size - 100} bytes, the safetensors header says {size}",
        ),
        (
            cut_header / "model.safetensors",
            "truncated weights: 100 bytes, too short for the safetensors header",
        ),
    ]
    for model, expected in cases:
        model_dir = model if model.is_dir() else model.parent
        argv = ["encode", "--model", str(model_dir), "--collection", str(data / "collection.tsv")]
        assert main(["-q", *argv, "--output", str(data / "emb"), "--device", "cpu"]) == 2
        line = error_line(capsys)
        assert expected in line and str(model) in line, line
        assert not (data / "emb").exists()
    # `retrieve --encoder` is checked the same way
    argv = [
        "retrieve",
        "--encoder",
        str(no_weights),
        "--topics",
        str(data / "topics.tsv"),
        "--index",
        str(data),
    ]
    assert main(["-q", *argv, "--output", str(data / "run.trec")]) == 2
    assert "incomplete model: no weights file" in error_line(capsys)


def test_output_path_of_the_wrong_kind_or_not_writable(data, tiny_model_dir, tmp_path, capsys):
    encode = ["encode", "--model", str(tiny_model_dir), "--collection", str(data / "collection.tsv")]
    retrieve = [
        "retrieve",
        "--encoder",
        str(tiny_model_dir),
        "--topics",
        str(data / "topics.tsv"),
        "--index",
        str(data),
    ]
    a_file, a_dir = write(tmp_path / "taken.txt", "keep me\n"), tmp_path
    if os.geteuid() != 0:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o500)
    else:  # root may write anywhere that permissions forbid; sysfs refuses new files even to root
        read_only = Path("/sys")
        if not read_only.is_dir():
            pytest.skip("no read-only directory to write into as root")
    cases = [
        (encode, a_file, f"{a_file}: --output is an existing file; this command writes a directory there"),
        (retrieve, a_dir, f"{a_dir}: --output is an existing directory; this command writes a file there"),
        (encode, read_only / "emb", f"{read_only / 'emb'}: cannot write in {read_only}: Permission denied"),
        (
            retrieve,
            read_only / "sub" / "r.trec",
            f"{read_only}/sub/r.trec: cannot write in {read_only}: Permission denied",
        ),
    ]
    for argv, output, expected in cases:
        assert main(["-q", *argv, "--output", str(output)]) == 2
        assert error_line(capsys) == f"dualenc: error: {expected}"
    assert a_file.read_text() == "keep me\n"


def test_os_errors_while_writing_name_the_path(data, monkeypatch, capsys):
    """An OS error past the checks (disk full, permissions changed meanwhile) is one line naming the path."""
    run = write(data / "run.trec", "q1 Q0 d0001 1 2.0 t\nq1 Q0 d0003 2 1.0 t\n")
    argv = [
        "-q",
        "mine",
        "--run",
        str(run),
        "--qrels",
        str(data / "qrels.txt"),
        "--output",
        str(data / "hn.jsonl"),
    ]
    failures = [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            f"No space left on device (while writing --output {data / 'hn.jsonl'})",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", str(data / "hn.jsonl.tmp")),
            f"{data / 'hn.jsonl.tmp'}: Permission denied",
        ),
    ]
    for failure, expected in failures:

        def fail(*args, failure=failure, **kwargs):
            raise failure

        monkeypatch.setattr("dualenc.retrieval.mine.write_groups", fail)
        assert main(argv) == 2
        assert error_line(capsys) == f"dualenc: error: {expected}"


def test_truncated_npy_embeddings_shard(data, tiny_model_dir, capsys):
    emb = data / "emb"
    argv = ["-q", "encode", "--model", str(tiny_model_dir), "--topics", str(data / "topics.tsv")]
    assert main([*argv, "--output", str(emb), "--device", "cpu"]) == 0
    (shard,) = emb.glob("*.npy")
    os.truncate(shard, shard.stat().st_size - 16)
    commands = [
        ["index", "--embeddings", str(emb), "--output", str(data / "index")],
        ["search", "--queries", str(emb), "--index", str(emb), "--output", str(data / "run.trec")],
    ]
    for command in commands:
        assert main(["-q", *command]) == 2
        line = error_line(capsys)
        assert str(shard) in line and "truncated" in line, line
    assert not (data / "index").exists() and not (data / "run.trec").exists()


def test_garbled_gzip_is_one_line(data, tiny_model_dir, capsys):
    text = "".join(f"d{i}\tdocument number {i}\n" for i in range(300))
    garbled = bytearray(gzip.compress(text.encode(), compresslevel=0))
    garbled[garbled.index(b"d150\t") + 4] = ord(" ")  # a line without its tab; the CRC fails at the end
    collection = data / "collection.tsv.gz"
    collection.write_bytes(bytes(garbled))
    argv = ["-q", "encode", "--model", str(tiny_model_dir), "--collection", str(collection)]
    assert main([*argv, "--output", str(data / "emb"), "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"dualenc: error: {collection}: not a valid gzip file (CRC check failed"), line
    assert "columns" not in line and not (data / "emb").exists()


def test_no_traceback_escapes_and_debug_shows_it(data):
    """In a fresh process: one line and no traceback; `--debug` or DUALENC_DEBUG=1 add the traceback."""
    qrels = data / "qrels.txt.gz"
    qrels.write_bytes(b"q1 0 d1 1\n")  # named .gz, not gzip
    argv = ["evaluate", "--qrels", str(qrels), "--run", str(write(data / "run.trec", "q1 Q0 d1 1 1.0 t\n"))]
    expected = f"dualenc: error: {qrels}: not a valid gzip file (Not a gzipped file (b'q1'))"
    quiet = run_cli(*argv)
    assert (quiet.returncode, quiet.stderr.strip().splitlines()) == (2, [expected])
    for debug_argv, env in ((["--debug"], {}), ([], {"DUALENC_DEBUG": "1"})):
        loud = run_cli(*debug_argv, *argv, env=env)
        assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr
        assert loud.stderr.strip().splitlines()[-1] == expected


def test_a_bug_keeps_its_traceback(data, monkeypatch):
    def buggy(args):
        return 1 / 0

    monkeypatch.setattr(sys.modules["dualenc.cli.main"], "cmd_evaluate", buggy)
    with pytest.raises(ZeroDivisionError):
        main(["-q", "evaluate", "--qrels", str(data / "qrels.txt"), "--run", str(data / "qrels.txt")])


def test_extra_tsv_columns_are_an_error_unless_named(data, tiny_model_dir, capsys):
    extra = write(data / "extra.tsv", "".join(f"d{i}\ttext {i}\tx\t{i}\n" for i in range(12)))
    argv = ["-q", "encode", "--model", str(tiny_model_dir), "--collection", str(extra), "--device", "cpu"]
    assert main([*argv, "--output", str(data / "emb")]) == 2
    line = error_line(capsys)
    assert line.startswith(f"dualenc: error: {extra}:1: expected 2 (id, text) or 3 (id, title, text) ") and (
        "found 4" in line
    ), line
    assert not (data / "emb").exists()
    assert main([*argv, "--output", str(data / "emb"), "--columns", "id,text,-,-"]) == 0
    assert sum(len(s.ids) for s in load_embeddings(data / "emb")) == 12
    assert main([*argv, "--output", str(data / "emb2"), "--columns", "id,body,-,-"]) == 2
    assert "unknown column name 'body'" in error_line(capsys)


def trec_run(run: dict[str, dict[str, float]]) -> str:
    return "".join(
        f"{q} Q0 {d} {r} {s} t\n" for q, hits in run.items() for r, (d, s) in enumerate(hits.items(), 1)
    )


def test_evaluate_unjudged_topics_warn_and_strict_refuses(data, capsys, caplog):
    qrels_path = data / "qrels.txt"  # judges q1 q2 q3
    judged = {"q1": {"d0001": 3.0, "d0009": 2.0}, "q2": {"d0005": 3.0, "d0002": 2.0}, "q3": {"d0003": 1.0}}
    run = {"x1": {"d0001": 1.0}, **judged, "x2": {"d0002": 1.0}}  # two topics without judgments
    run_path = write(data / "run.trec", trec_run(run))
    argv = [
        "evaluate",
        "--qrels",
        str(qrels_path),
        "--run",
        str(run_path),
        "--measures",
        "RR@10 nDCG@10",
        "--json",
    ]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    values = json.loads(capsys.readouterr().out)
    qrels = {q.query_id: {q.doc_id: q.relevance} for q in ir_measures.read_trec_qrels(str(qrels_path))}
    assert values == evaluate(qrels, judged, "RR@10 nDCG@10")  # the unjudged topics change nothing
    assert values["RR@10"] == pytest.approx((1 + 1 / 2 + 1) / 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"2 run queries have no judgments in the qrels {qrels_path} and are ignored (first: 'x1' on line 1)"
    ]
    assert main([*argv, "--strict"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"dualenc: error: {run_path}:1: query id 'x1' is not in the qrels {qrels_path}"), (
        line
    )
    assert "2 of 5 run queries" in line


def test_evaluate_partial_run_warns_with_the_count(data, capsys, caplog):
    run_path = write(data / "run.trec", "q1 Q0 d0009 1 2.0 t\nq1 Q0 d0001 2 1.0 t\n")
    argv = [
        "evaluate",
        "--qrels",
        str(data / "qrels.txt"),
        "--run",
        str(run_path),
        "--measures",
        "RR@10",
        "--json",
    ]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"RR@10": pytest.approx(0.5 / 3)}  # q2, q3 count 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["the run ranks 1 of 3 judged queries; the other 2 count 0"]


def test_evaluate_warnings_reach_stderr(data):
    run_path = write(data / "run.trec", "q1 Q0 d0001 1 2.0 t\nzz Q0 d0001 1 2.0 t\n")
    done = run_cli(
        "evaluate", "--qrels", str(data / "qrels.txt"), "--run", str(run_path), "--measures", "RR@10"
    )
    assert done.returncode == 0, done.stderr
    assert (
        "1 run query has no judgments" in done.stderr
        and "ranks 1 of 3 judged queries; the other 2" in done.stderr
    )
    assert len(done.stderr.strip().splitlines()) == 2 and "RR@10" in done.stdout


def test_retrieve_refuses_an_index_of_another_models_vectors(data, tiny_model_dir, tmp_path, capsys):
    import torch

    from dualenc.model import DualEncoder

    other = DualEncoder.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01)
    other.save_pretrained(tmp_path / "other_model")
    emb, index = tmp_path / "emb", tmp_path / "index"
    collection = ["--collection", str(data / "collection.tsv")]
    assert main(["-q", "encode", "--model", str(tiny_model_dir), *collection, "--output", str(emb)]) == 0
    assert main(["-q", "index", "--embeddings", str(emb), "--output", str(index)]) == 0
    capsys.readouterr()
    for searched in (index, emb):  # a FAISS index dir, and exact search over the embeddings dir
        retrieve = ["-q", "retrieve", "--topics", str(data / "topics.tsv"), "--index", str(searched)]
        run = tmp_path / "run.trec"
        assert main([*retrieve, "--encoder", str(tmp_path / "other_model"), "--output", str(run)]) == 2
        assert "the documents were encoded with" in error_line(capsys) and not run.exists()
        assert main([*retrieve, "--encoder", str(tiny_model_dir), "--output", str(run)]) == 0
        assert run.read_text().count("\n") == 2 * 20  # both topics, every one of the 20 documents
        run.unlink()
