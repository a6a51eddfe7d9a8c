"""The negative cache in training: masking, exact sampling (1 and 2 processes), refresh, resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_train import REPO, _train_subprocess, read_log, tiny_overrides, write_triples


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    keep = probs > 0
    expected = counts.sum() * probs[keep]
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def _expected_probs(result: dict, row: int, scale: float = 20.0) -> tuple[np.ndarray, float]:
    """Oracle: softmax over the whole table minus the query's positives and all batch documents."""
    scores = scale * (result["q_emb"][row].double() @ result["table_emb"].double().T)  # (C,)
    masked = set(result["positives"][row][result["positives"][row] >= 0].tolist()) | set(
        result["batch_docs"].tolist()
    )
    for doc in masked:
        scores[doc] = float("-inf")
    return scores.softmax(0).numpy(), float(torch.logsumexp(scores, 0))


@pytest.fixture(scope="module")
def sampling_run(tmp_path_factory, tiny_model_dir):
    """One run of the sampling case: 2 processes (two.pt) then 1 process (one.pt)."""
    from distributed_cases import run_case

    tmp_path = tmp_path_factory.mktemp("sampling")
    write_triples(tmp_path / "triples.tsv", 12)
    run_case("cache_sampling", tmp_path, tiny_model_dir)
    return tmp_path


@pytest.mark.parametrize("processes", [1, 2])
def test_sampled_frequencies_match_the_global_softmax(sampling_run, processes):
    """Two-stage sharded Gumbel-max: draws follow the softmax over the whole (sharded) table; LSE is exact."""
    tmp_path = sampling_run
    result = torch.load(tmp_path / ("two.pt" if processes == 2 else "one.pt"))
    counts = result["counts"].numpy()  # (4, C)
    for row in range(4):
        probs, lse = _expected_probs(result, row)
        assert counts[row][probs == 0].sum() == 0, "a masked document (positive, batch, empty) was drawn"
        stat, dof = _chi_square(counts[row], probs)
        assert stat < dof + 5 * math.sqrt(2 * dof), (row, stat, dof)  # ~5 sigma of the chi-square
        assert float(result["rest_lse"][row]) == pytest.approx(lse, abs=1e-4)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    torch.testing.assert_close(two["rest_lse"], one["rest_lse"], atol=1e-5, rtol=1e-6)
    assert torch.equal(two["pos_rank"], one["pos_rank"])


def test_two_processes_match_one_process_loss_and_gradients(tmp_path, tiny_model_dir):
    """Same global batch and the same draws: 2 processes (sharded table) == 1 process (whole table), to 1e-5."""
    from distributed_cases import run_case

    write_triples(tmp_path / "triples.tsv", 12)
    run_case("cache_step", tmp_path, tiny_model_dir)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    torch.testing.assert_close(two["rest_lse"], one["rest_lse"], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-5, rtol=1e-5)
    assert one["grads"].keys() == two["grads"].keys()
    for name in one["grads"]:
        torch.testing.assert_close(two["grads"][name], one["grads"][name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(two["table"], one["table"], atol=1e-5, rtol=1e-5)  # same write-backs


def test_refresh_fraction_one_keeps_the_table_exact(tmp_path, tiny_model_dir):
    from accelerate import Accelerator

    from dualenc.config import load_config
    from dualenc.encode import encode_texts
    from dualenc.encoder import DualEncoder
    from dualenc.negative_cache import NegativeCache
    from dualenc.train_data import load_train_data

    write_triples(tmp_path / "triples.tsv", 12)
    cfg = load_config(None, ["random_init=true", "loss=cache", "refresh_fraction=1.0"])
    model = DualEncoder.from_pretrained(tiny_model_dir).eval()
    data = load_train_data(str(tmp_path / "triples.tsv"), format="triples", cache_dir=str(tmp_path / "hf"))
    cache = NegativeCache(cfg.cache, data.corpus, Accelerator(cpu=True), model.dim, seed=0)
    cache.fill(model, tmp_path / "fill", batch_size=8)
    with torch.no_grad():  # change the document tower: the cache is now stale
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    logs = cache.end_step(model)
    assert logs["cache/refreshed"] == 1.0 and logs["cache/staleness_refresh"] > 0
    fresh = encode_texts(model, [f"{t}" for t in data.corpus["text"]], kind="doc", batch_size=8)
    torch.testing.assert_close(cache.table.emb, torch.from_numpy(fresh), atol=1e-5, rtol=1e-5)
    assert cache.table.age.tolist() == [0] * len(data.corpus)


def test_kill_9_and_resume_restores_table_and_losses(tmp_path):
    """Checkpoint, kill -9, resume: identical cache table, identical draws, identical next losses."""
    import signal
    import time

    from safetensors.torch import load_file

    steps = 16
    config = str(REPO / "recipes" / "configs" / "tiny_cache.yaml")
    base = tiny_overrides(tmp_path, max_steps=steps, save_steps=8, save_total_limit=0, refresh_fraction=0.2)
    reference = _train_subprocess(tmp_path, False, [*base, f"output_dir={tmp_path / 'ref'}"], config=config)
    assert reference.wait(timeout=600) == 0
    killed = tmp_path / "killed"
    victim = _train_subprocess(tmp_path, True, [*base, f"output_dir={killed}"], config=config)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "step_00000008").exists():
        assert victim.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    name = "cache.00000-of-00001.safetensors"
    ref_table = load_file(str(tmp_path / "ref" / "checkpoints" / "step_00000008" / name))
    got_table = load_file(str(killed / "checkpoints" / "step_00000008" / name))
    assert all(torch.equal(ref_table[k], got_table[k]) for k in ref_table)  # the table as checkpointed
    resumed = _train_subprocess(
        tmp_path, False, [*base, f"output_dir={killed}", "resume_from=latest"], config=config
    )
    assert resumed.wait(timeout=600) == 0
    ref, got = read_log(tmp_path / "ref"), read_log(killed)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, steps + 1))
    for a, b in zip(ref[8:], got[8:], strict=True):  # after the resume point: same draws, same losses
        assert (a["loss"], a["cache/pos_rank"], a["cache/staleness_refresh"]) == (
            b["loss"], b["cache/pos_rank"], b["cache/staleness_refresh"])  # fmt: skip
    final = "step_00000016"
    ref_table = load_file(str(tmp_path / "ref" / "checkpoints" / final / name))
    got_table = load_file(str(killed / "checkpoints" / final / name))
    assert all(torch.equal(ref_table[k], got_table[k]) for k in ref_table)
    assert json.loads((killed / "checkpoints" / final / "trainer_state.json").read_text())["step"] == steps


def test_stream_mode_trains_and_never_duplicates(tmp_path):
    """Stream (FIFO) mode: batch documents enter the table once; draws come only from what is cached."""
    from safetensors.torch import load_file

    from dualenc.config import load_config
    from dualenc.train import train

    config = REPO / "recipes" / "configs" / "tiny_cache.yaml"
    overrides = tiny_overrides(tmp_path, max_steps=20, cache_mode="stream", cache_size=40, save_steps=20)
    train(load_config(config, overrides))
    table = load_file(
        str(tmp_path / "run" / "checkpoints" / "step_00000020" / "cache.00000-of-00001.safetensors")
    )
    filled = table["doc_idx"][table["doc_idx"] >= 0]
    assert len(filled) == 40 and len(set(filled.tolist())) == 40  # full, no document twice
    logs = read_log(tmp_path / "run")
    assert logs[0]["cache/filled"] < 1.0 and logs[-1]["cache/filled"] == 1.0
    assert np.mean([r["loss"] for r in logs[-5:]]) < np.mean([r["loss"] for r in logs[:5]])
