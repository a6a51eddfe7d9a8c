"""`dualenc encode` under faults, as a user meets them: kill -9, another model, two runs at once, bad sizes.

Each case was a silent failure once: a rerun with another ``--model`` resumed (or skipped) the first model's
rows and relabelled them in meta.json; two encodes shared one partial file; ``--batch-size 0`` deleted the
finished embeddings before failing; a truncated ``.npy`` surfaced as numpy's own error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_collection

from dualenc.cli import main
from dualenc.errors import InputError
from dualenc.io.embeddings import load_embeddings, read_meta, shard_paths
from dualenc.io.readers import read_collection
from dualenc.model.encoder import DualEncoder
from dualenc.retrieval.encode import encode_texts, model_fingerprint
from dualenc.retrieval.encode_to_disk import encode_corpus

NUM_DOCS, CHUNK = 200, 20

# `dualenc encode` with every chunk slowed down, so the test can kill it between two chunks
SLOW_ENCODE = textwrap.dedent(
    """
    import os, sys, time
    import dualenc.retrieval.encode_to_disk as to_disk
    from dualenc.cli import main

    encode_texts = to_disk.encode_texts
    def slow_encode_texts(*args, **kwargs):
        time.sleep(float(os.environ["SLOW_CHUNK_S"]))
        return encode_texts(*args, **kwargs)
    to_disk.encode_texts = slow_encode_texts
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with other weights (same tokenizer, config and shapes)."""
    model = DualEncoder.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("other") / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    write_collection(tmp_path / "c.tsv", NUM_DOCS, seed=5)
    return tmp_path / "c.tsv"


def _argv(model_dir, corpus, out, *extra) -> list[str]:
    argv = ["-q", "encode", "--model", str(model_dir), "--collection", str(corpus), "--output", str(out)]
    return [*argv, "--device", "cpu", "--batch-size", "8", "--chunk-size", str(CHUNK), *extra]


def _start_slow(argv, tmp_path, seconds_per_chunk: float = 0.25) -> subprocess.Popen:
    script = tmp_path / "slow_encode.py"
    script.write_text(SLOW_ENCODE)
    env = {**os.environ, "PYTHONHASHSEED": "0", "SLOW_CHUNK_S": str(seconds_per_chunk)}
    return subprocess.Popen([sys.executable, str(script), *argv], env=env, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(proc, progress: Path, low: int) -> int:
    """Wait until ``progress`` says at least ``low`` (and not all) rows are done; returns that count."""
    deadline = time.time() + 240
    while time.time() < deadline:
        if progress.exists():
            done = json.loads(progress.read_text())["done"]
            if low <= done < NUM_DOCS:
                return done
        assert proc.poll() is None, f"encode ended before the test could act: {proc.stderr.read()[-2000:]}"
        time.sleep(0.01)
    raise AssertionError("the encode made no progress in 240 s")


def _killed_encode(model_dir, corpus, out, tmp_path) -> dict[str, bytes]:
    """Encode into ``out``, kill -9 it after at least two chunks; the files it left, by name."""
    victim = _start_slow(_argv(model_dir, corpus, out), tmp_path)
    emb_path, ids_path = shard_paths(out, 0, 1)
    _wait_for_rows(victim, emb_path.with_suffix(".progress.json"), 2 * CHUNK)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    done = json.loads(emb_path.with_suffix(".progress.json").read_text())["done"]
    assert 2 * CHUNK <= done < NUM_DOCS  # killed in the middle: the shard is not finished
    assert not emb_path.exists() and not ids_path.exists() and not (out / "meta.json").exists()
    return _snapshot(out)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if ".lock" not in p.name}


def _direct(model_dir, corpus) -> np.ndarray:
    """The oracle: every text of ``corpus`` encoded in memory by the model in ``model_dir``."""
    model = DualEncoder.from_pretrained(model_dir).eval()
    return encode_texts(model, list(read_collection(corpus)["text"]), batch_size=8)


def test_kill_9_then_rerun_with_the_same_model_equals_an_uninterrupted_run(tiny_model_dir, corpus, tmp_path):
    assert main(_argv(tiny_model_dir, corpus, tmp_path / "ref")) == 0
    _killed_encode(tiny_model_dir, corpus, tmp_path / "out", tmp_path)
    assert main(_argv(tiny_model_dir, corpus, tmp_path / "out")) == 0
    [ref], [got] = load_embeddings(tmp_path / "ref"), load_embeddings(tmp_path / "out")
    assert got.ids == ref.ids and len(set(got.ids)) == NUM_DOCS
    np.testing.assert_array_equal(got.emb, ref.emb)  # bit-identical
    assert read_meta(tmp_path / "out")["made_by"] == read_meta(tmp_path / "ref")["made_by"]


def test_kill_9_then_rerun_with_another_model_is_refused(
    tiny_model_dir, other_model_dir, corpus, tmp_path, capsys
):
    out = tmp_path / "out"
    left = _killed_encode(tiny_model_dir, corpus, out, tmp_path)
    capsys.readouterr()
    assert main(_argv(other_model_dir, corpus, out)) == 2
    first = DualEncoder.from_pretrained(tiny_model_dir)
    other = DualEncoder.from_pretrained(other_model_dir)
    assert capsys.readouterr().err.strip() == (
        f"dualenc: error: {out}: interrupted encode emb.00000-of-00001.partial.npy was made with "
        f"model_fingerprint='{model_fingerprint(first)}', this run has "
        f"model_fingerprint='{model_fingerprint(other)}'; rerun with the same model and collection to reuse "
        "or resume it, or use --overwrite (overwrite=True) to encode again from scratch"
    )
    assert _snapshot(out) == left  # the refused run wrote nothing

    assert main(_argv(other_model_dir, corpus, out, "--overwrite")) == 0
    [shard] = load_embeddings(out)
    expected, first_rows = _direct(other_model_dir, corpus), _direct(tiny_model_dir, corpus)
    np.testing.assert_allclose(shard.emb, expected, atol=1e-5)  # the other model's vectors everywhere
    assert not np.isclose(shard.emb, first_rows, atol=1e-3).all(axis=1).any()  # no row of the first model
    assert read_meta(out)["made_by"]["model_fingerprint"] == model_fingerprint(other)


def test_finished_directory_of_another_model_is_refused(
    tiny_model_dir, other_model_dir, corpus, tmp_path, capsys
):
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dir, corpus, out)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_argv(other_model_dir, corpus, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dualenc: error: {out}: the embeddings directory was made with model_fingerprint=")
    assert _snapshot(out) == before  # not skipped, not relabelled: meta.json still names the first model
    assert read_meta(out)["model"] == str(tiny_model_dir)
    assert main(_argv(tiny_model_dir, corpus, out)) == 0  # the same model: already encoded, reused
    assert _snapshot(out) == before


def test_another_dtype_length_or_collection_is_refused(tiny_model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dir, corpus, out)) == 0
    before = _snapshot(out)
    cases = [
        (["--storage-dtype", "float16"], "storage_dtype='float32', this run has storage_dtype='float16'"),
        (["--passage-max-len", "12"], "passage_max_len=24, this run has passage_max_len=12"),
        ([], "collection="),  # the corpus rewritten below: same ids, other texts
    ]
    for flags, field in cases:
        if not flags:
            write_collection(corpus, NUM_DOCS, seed=6)
        capsys.readouterr()
        assert main([*_argv(tiny_model_dir, corpus, out), *flags]) == 2
        assert field in capsys.readouterr().err
        assert _snapshot(out) == before


def test_two_encodes_at_once_refuse_the_second_naming_the_pid(tiny_model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    first = _start_slow(_argv(tiny_model_dir, corpus, out), tmp_path, 1.0)  # ~9 s left after a chunk
    progress = shard_paths(out, 0, 1)[0].with_suffix(".progress.json")
    _wait_for_rows(first, progress, CHUNK)
    capsys.readouterr()
    assert main(_argv(tiny_model_dir, corpus, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dualenc: error: output directory {out} is in use by pid {first.pid} ")
    assert first.poll() is None  # the first run was still writing when the second was refused
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    [shard] = load_embeddings(out)  # the first run's result is whole and right
    np.testing.assert_allclose(shard.emb, _direct(tiny_model_dir, corpus), atol=1e-5)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--batch-size", "0"), ("--chunk-size", "0"), ("--batch-size", "-3"), ("--chunk-size", "-1")],
)
def test_bad_sizes_on_a_finished_output_change_no_file(tiny_model_dir, corpus, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dir, corpus, out)) == 0
    before = _snapshot(out)
    for extra in ([flag, value], [flag, value, "--overwrite"]):  # checked before --overwrite acts too
        capsys.readouterr()
        assert main([*_argv(tiny_model_dir, corpus, out), *extra]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()  # one line, no traceback
        name = flag[2:].replace("-", "[ -]")
        assert re.fullmatch(f"dualenc: error: (--)?{name} must be .*>= 1, got {value}", line), line
        assert _snapshot(out) == before  # compared byte for byte


@pytest.mark.parametrize("sizes", [{"batch_size": 0}, {"chunk_size": -2}, {"batch_size": 2.5}])
def test_bad_sizes_in_the_library_change_no_file(tiny_model_dir, corpus, tmp_path, sizes):
    model = DualEncoder.from_pretrained(tiny_model_dir).eval()
    out = encode_corpus(model, corpus, tmp_path / "out", cache_dir=str(tmp_path / "hf"))
    before = _snapshot(out)
    [(name, value)] = sizes.items()
    for more in ({}, {"overwrite": True}):
        with pytest.raises(InputError) as err:
            encode_corpus(model, corpus, out, cache_dir=str(tmp_path / "hf"), **more, **sizes)
        assert str(err.value) == f"{name.replace('_', ' ')} must be a whole number >= 1, got {value!r}"
        assert _snapshot(out) == before


def test_bad_storage_dtype_and_file_as_output_are_refused_before_writing(tiny_model_dir, corpus, tmp_path):
    model = DualEncoder.from_pretrained(tiny_model_dir).eval()
    with pytest.raises(InputError, match="storage dtype 'int8' not in"):
        encode_corpus(model, corpus, tmp_path / "e", storage_dtype="int8")
    assert not (tmp_path / "e").exists()
    (tmp_path / "file").write_text("keep me")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(InputError) as err:
            encode_corpus(model, corpus, out)
        assert (
            str(err.value)
            == f"{tmp_path / 'file'}: is a file, not a directory: cannot write embeddings there"
        )
    assert (tmp_path / "file").read_text() == "keep me"


def test_an_unfinished_directory_is_refused_naming_the_file(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dir, corpus, out)) == 0
    emb_path, ids_path = shard_paths(out, 0, 1)
    whole = emb_path.read_bytes()
    emb_path.write_bytes(whole[:-100])  # truncated: the header says 200 rows
    for read in (read_meta, load_embeddings):
        with pytest.raises(InputError) as err:
            read(out)
        assert str(err.value) == (
            f"{emb_path}: truncated: its header says (200, 32) float32 ({len(whole)} bytes) but the file has "
            f"{len(whole) - 100} bytes"
        )
    assert main(["-q", "index", "--embeddings", str(out), "--output", str(tmp_path / "idx")]) == 2
    emb_path.write_bytes(whole)
    ids = ids_path.read_text()
    ids_path.write_text("".join(ids.splitlines(keepends=True)[:-1]))  # one id short
    with pytest.raises(InputError, match=f"^{ids_path}: 199 ids but embeddings have shape \\(200, 32\\)$"):
        load_embeddings(out)
    ids_path.unlink()
    with pytest.raises(InputError, match=f"^{ids_path}: missing shard file"):
        read_meta(out)
    ids_path.write_text(ids)
    (out / "meta.json").unlink()
    for read in (read_meta, load_embeddings):
        with pytest.raises(InputError, match=f"^{out / 'meta.json'}: missing: not a finished embeddings dir"):
            read(out)
    assert main(_argv(tiny_model_dir, corpus, out)) == 0  # the same model finishes it: meta.json again
    np.testing.assert_array_equal(load_embeddings(out)[0].emb, np.load(emb_path))
