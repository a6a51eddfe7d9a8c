"""Collection encoding: order, sharding, resume after kill -9 (bit-identical), errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from helpers import exit_probe_env, read_exit_probes, write_collection

from dualenc.errors import InputError
from dualenc.io.embeddings import load_embeddings, read_meta, shard_bounds, shard_paths, write_collection_meta
from dualenc.io.readers import read_collection
from dualenc.model.config import DualEncoderConfig
from dualenc.model.encoder import DualEncoder
from dualenc.retrieval.encode import encode_texts, encoder_identity, model_fingerprint
from dualenc.retrieval.encode_to_disk import collection_identity, encode_collection, encode_corpus


@pytest.fixture
def model(tiny_model_dir):
    return DualEncoder.from_pretrained(tiny_model_dir).eval()


def test_shard_bounds_cover_rows_once():
    for rows in (0, 1, 7, 100):
        for shards in (1, 2, 3, 8):
            bounds = [shard_bounds(rows, p, shards) for p in range(shards)]
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_encode_texts_keeps_input_order(model):
    texts = ["the query", "a much longer passage about dense retrieval and the index", "score"]
    out = encode_texts(model, texts, kind="doc", batch_size=2)
    for i, text in enumerate(texts):  # encoding each text alone is the oracle
        alone = model.encode_docs(model.tokenize_docs([text])).detach().numpy()[0]
        np.testing.assert_allclose(out[i], alone, atol=1e-5)


def test_encode_collection_matches_direct_encoding(model, tmp_path):
    ids = write_collection(tmp_path / "c.tsv", 230)
    data = read_collection(tmp_path / "c.tsv", cache_dir=str(tmp_path / "hf"))
    encode_collection(model, data, tmp_path / "emb", batch_size=16, chunk_size=50, progress=False)
    write_collection_meta(tmp_path / "emb", num_shards=1, model_name="tiny", kind="doc")
    [shard] = load_embeddings(tmp_path / "emb")
    assert shard.ids == ids
    direct = encode_texts(model, list(data["text"]), batch_size=16)
    np.testing.assert_allclose(shard.emb, direct, atol=1e-5)


def test_sharded_encode_equals_single_process(model, tmp_path):
    ids = write_collection(tmp_path / "c.tsv", 101)
    data = read_collection(tmp_path / "c.tsv", cache_dir=str(tmp_path / "hf"))
    encode_collection(model, data, tmp_path / "one", batch_size=8, chunk_size=40, progress=False)
    for p in range(3):
        encode_collection(
            model,
            data,
            tmp_path / "three",
            batch_size=8,
            chunk_size=40,
            process_index=p,
            num_processes=3,
            progress=False,
        )
    write_collection_meta(tmp_path / "one", num_shards=1, model_name="tiny", kind="doc")
    meta = write_collection_meta(tmp_path / "three", num_shards=3, model_name="tiny", kind="doc")
    assert meta["count"] == 101 and meta["dim"] == 32
    one = load_embeddings(tmp_path / "one")
    three = load_embeddings(tmp_path / "three")
    assert [i for s in three for i in s.ids] == ids == one[0].ids
    np.testing.assert_allclose(np.concatenate([s.emb for s in three]), one[0].emb, atol=1e-5)


def test_more_processes_than_rows_gives_empty_shards(model, tmp_path):
    write_collection(tmp_path / "c.tsv", 2)
    data = read_collection(tmp_path / "c.tsv", cache_dir=str(tmp_path / "hf"))
    for p in range(4):
        encode_collection(model, data, tmp_path / "e", process_index=p, num_processes=4, progress=False)
    write_collection_meta(tmp_path / "e", num_shards=4, model_name="tiny", kind="doc")
    shards = load_embeddings(tmp_path / "e")
    assert [len(s.ids) for s in shards] == [1, 1, 0, 0]
    assert all(s.emb.shape[1] == 32 for s in shards)


def test_resume_with_other_settings_is_refused(model, tmp_path):
    """An interrupted encode made with another storage dtype, or with no record (older dualenc): refused."""
    write_collection(tmp_path / "c.tsv", 60)
    data = read_collection(tmp_path / "c.tsv", cache_dir=str(tmp_path / "hf"))
    emb_path, _ = shard_paths(tmp_path / "e", 0, 1)
    emb_path.parent.mkdir(parents=True)
    np.lib.format.open_memmap(
        emb_path.with_suffix(".partial.npy"), mode="w+", dtype=np.float16, shape=(60, 32)
    )
    made_by = {**encoder_identity(model, "doc"), **collection_identity(data, "doc", "float16")}
    progress = emb_path.with_suffix(".progress.json")
    progress.write_text(
        json.dumps({"made_by": {**made_by, "shard": [0, 1], "shard_rows": [0, 60]}, "done": 20, "rows": 60})
    )
    with pytest.raises(InputError) as err:
        encode_collection(model, data, tmp_path / "e", progress=False)
    assert str(err.value) == (
        f"{tmp_path / 'e'}: interrupted encode emb.00000-of-00001.partial.npy was made with "
        "storage_dtype='float16', this run has storage_dtype='float32'; rerun with the same model and "
        "collection to reuse or resume it, or use --overwrite (overwrite=True) to encode again from scratch"
    )
    progress.write_text(json.dumps({"fingerprint": "0123", "done": 20, "rows": 60}))  # an older dualenc's
    with pytest.raises(InputError, match="partial.npy has no record of the model and collection"):
        encode_collection(model, data, tmp_path / "e", progress=False)
    assert not emb_path.exists() and json.loads(progress.read_text())["done"] == 20  # nothing written


def test_bad_storage_dtype(model, tmp_path):
    write_collection(tmp_path / "c.tsv", 3)
    data = read_collection(tmp_path / "c.tsv", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(InputError, match="storage dtype 'int8'"):
        encode_collection(model, data, tmp_path / "e", storage_dtype="int8", progress=False)


ENCODE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from dualenc.io.readers import read_collection
    from dualenc.retrieval.encode_to_disk import encode_collection
    from dualenc.model.encoder import DualEncoder

    model_dir, collection, cache, out, slow = sys.argv[1:6]
    model = DualEncoder.from_pretrained(model_dir).eval()
    if slow == "1":  # slow each batch down so the parent can kill us mid-way
        encode = model.encode_docs
        def slow_encode(features):
            time.sleep(0.05)
            return encode(features)
        model.encode_docs = slow_encode
    data = read_collection(collection, cache_dir=cache)
    encode_collection(model, data, out, batch_size=8, chunk_size=40, progress=False)
    """
)


def _encode_subprocess(args, tmp_path):
    script = tmp_path / "encode_script.py"
    script.write_text(ENCODE_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)], env={**os.environ, "PYTHONHASHSEED": "0"}
    )


def test_kill_9_then_resume_is_identical(tiny_model_dir, tmp_path):
    """kill -9 in the middle of an encode, rerun: identical embeddings, no duplicate or missing id."""
    ids = write_collection(tmp_path / "c.tsv", 400, seed=3)
    common = [tiny_model_dir, tmp_path / "c.tsv", tmp_path / "hf"]
    reference = _encode_subprocess([*common, tmp_path / "ref", "0"], tmp_path)
    assert reference.wait(timeout=300) == 0

    victim = _encode_subprocess([*common, tmp_path / "killed", "1"], tmp_path)
    emb_path, ids_path = shard_paths(tmp_path / "killed", 0, 1)
    progress = emb_path.with_suffix(".progress.json")
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until some but not all chunks are done
        if progress.exists() and 80 <= json.loads(progress.read_text())["done"] < 400:
            break
        assert victim.poll() is None, "encode finished before it could be killed"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert not emb_path.exists() and not ids_path.exists()  # the shard is not marked done
    done_before = json.loads(progress.read_text())["done"]
    assert 80 <= done_before < 400

    resumed = _encode_subprocess([*common, tmp_path / "killed", "0"], tmp_path)
    assert resumed.wait(timeout=300) == 0
    ref_emb, ref_ids = shard_paths(tmp_path / "ref", 0, 1)
    got = np.load(emb_path)
    assert np.array_equal(got, np.load(ref_emb))  # bit-identical
    got_ids = ids_path.read_text().splitlines()
    assert got_ids == ref_ids.read_text().splitlines() == ids
    assert len(set(got_ids)) == len(got_ids) == 400
    assert not progress.exists() and not emb_path.with_suffix(".partial.npy").exists()


def test_finished_shard_of_another_model_is_refused_unless_overwrite(model, tmp_path):
    write_collection(tmp_path / "c.tsv", 30)
    data = read_collection(tmp_path / "c.tsv", cache_dir=str(tmp_path / "hf"))
    path = encode_collection(model, data, tmp_path / "e", progress=False)
    first = np.load(path)
    assert encode_collection(model, data, tmp_path / "e", progress=False) == path  # same model: reused
    old_fingerprint = model_fingerprint(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with pytest.raises(InputError, match=f"model_fingerprint='{old_fingerprint}', this run has model_fing"):
        encode_collection(model, data, tmp_path / "e", progress=False)
    np.testing.assert_array_equal(np.load(path), first)  # the refused run left the finished shard alone
    encode_collection(model, data, tmp_path / "e", progress=False, overwrite=True)
    np.testing.assert_allclose(np.load(path), encode_texts(model, list(data["text"])), atol=1e-5)
    assert not np.allclose(np.load(path), first)  # re-encoded with the new weights


# ---------------------------------------------------------------------------------------------- encode_corpus


def test_encode_corpus_from_a_file_or_a_dataset(model, tmp_path):

    ids = write_collection(tmp_path / "c.tsv", 37)
    out = encode_corpus(
        model, tmp_path / "c.tsv", tmp_path / "emb", batch_size=8, cache_dir=str(tmp_path / "hf")
    )
    assert out == tmp_path / "emb"
    meta = read_meta(out)
    fingerprint = model_fingerprint(model)
    assert meta["model"] == meta["model_fingerprint"] == fingerprint and meta["source"] == str(
        tmp_path / "c.tsv"
    )
    assert (meta["count"], meta["dim"], meta["kind"], meta["normalize"]) == (37, 32, "doc", True)
    [shard] = load_embeddings(out)
    data = read_collection(tmp_path / "c.tsv", cache_dir=str(tmp_path / "hf"))
    assert shard.ids == ids
    np.testing.assert_allclose(shard.emb, encode_texts(model, list(data["text"])), atol=1e-5)

    again = encode_corpus(model, data, tmp_path / "emb2", kind="query", model_name="tiny")
    meta = read_meta(again)
    assert (meta["model"], meta["kind"], "source" in meta) == ("tiny", "query", False)
    queries = encode_texts(model, list(data["text"]), kind="query")
    np.testing.assert_allclose(load_embeddings(again)[0].emb, queries, atol=1e-5)


def test_encode_corpus_needs_a_barrier_to_shard(model, tmp_path):

    write_collection(tmp_path / "c.tsv", 3)
    with pytest.raises(ValueError, match="needs wait_for_everyone"):
        encode_corpus(model, tmp_path / "c.tsv", tmp_path / "e", num_processes=2, process_index=1)


def test_cli_encodes_with_a_saved_custom_tower(tokenizer, tmp_path):
    """`dualenc encode --model DIR` on a custom-tower dir (module on PYTHONPATH): encode_corpus's vectors."""
    import custom_towers

    torch.manual_seed(0)
    model = DualEncoder(custom_towers.BagOfWords(len(tokenizer)), None, tokenizer, DualEncoderConfig())
    model.save_pretrained(tmp_path / "model")
    ids = write_collection(tmp_path / "c.tsv", 50)
    expected = encode_corpus(
        model.eval(), tmp_path / "c.tsv", tmp_path / "py", cache_dir=str(tmp_path / "hf")
    )
    argv = [
        sys.executable,
        "-m",
        "dualenc",
        "-q",
        "encode",
        "--model",
        str(tmp_path / "model"),
        "--device",
        "cpu",
    ]
    argv += ["--collection", str(tmp_path / "c.tsv"), "--output", str(tmp_path / "cli")]
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    refused = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"dualenc: error: {tmp_path / 'model' / 'tower.json'}: cannot import the tower class "
        "custom_towers.BagOfWords (ModuleNotFoundError: No module named 'custom_towers'); its module must be "
        "importable by the loading process (installed, or its folder on PYTHONPATH)"
    )
    env["PYTHONPATH"] = tests_dir
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [cli], [py] = load_embeddings(tmp_path / "cli"), load_embeddings(expected)
    assert cli.ids == py.ids == ids
    np.testing.assert_array_equal(cli.emb, py.emb)
    cli_meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    py_meta = json.loads((expected / "meta.json").read_text())
    assert cli_meta["model"] == str(tmp_path / "model") and cli_meta["source"] == str(tmp_path / "c.tsv")
    assert cli_meta["model_fingerprint"] == py_meta["model_fingerprint"]


def test_cli_sharded_encode_with_a_custom_tower_equals_one_process(tokenizer, tmp_path):
    """`torchrun --nproc_per_node 2 -m dualenc encode`: two shards, meta.json once, one process's vectors."""
    import custom_towers

    torch.manual_seed(0)
    model = DualEncoder(custom_towers.BagOfWords(len(tokenizer)), None, tokenizer, DualEncoderConfig())
    model.save_pretrained(tmp_path / "model")
    ids = write_collection(tmp_path / "c.tsv", 41)
    one = encode_corpus(model.eval(), tmp_path / "c.tsv", tmp_path / "one", cache_dir=str(tmp_path / "hf"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dualenc", "-q"]
    argv = [*launcher, "encode", "--model", str(tmp_path / "model"), "--collection", str(tmp_path / "c.tsv")]
    argv += ["--output", str(tmp_path / "two"), "--device", "cpu", "--chunk-size", "8", "--batch-size", "4"]
    probes = tmp_path / "exit_probes"  # the gloo threads alive in each process at finalization
    probes.mkdir()
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)), "OMP_NUM_THREADS": "1"}
    env = exit_probe_env(env, probes)
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    # both workers destroyed their process group before exiting: no gloo thread left for the finalization
    alive = read_exit_probes(probes)
    assert alive == [("0", []), ("1", []), ("solo", [])], alive
    shards = load_embeddings(tmp_path / "two")
    assert [len(s.ids) for s in shards] == [21, 20] and [i for s in shards for i in s.ids] == ids
    np.testing.assert_allclose(
        np.concatenate([s.emb for s in shards]), load_embeddings(one)[0].emb, atol=1e-6
    )
    meta = read_meta(tmp_path / "two")
    assert (meta["num_shards"], meta["count"]) == (2, 41)
    assert meta["model_fingerprint"] == read_meta(one)["model_fingerprint"]
