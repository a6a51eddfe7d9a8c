"""Training loop: tiny recipe end to end, 2 processes == 1 process, kill -9 + resume reproduces the losses."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    REPO,
    last_logged_step,
    load_script,
    read_log,
    tiny_overrides,
    train_subprocess,
    write_triples,
)

from dualenc.model.encoder import DualEncoder
from dualenc.training.config import load_config

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each test builds its own Accelerator


def test_tiny_recipe_runs_and_the_loss_falls(tmp_path):
    from dualenc.training.loop import train

    cfg = load_config(
        REPO / "recipes" / "configs" / "tiny.yaml", tiny_overrides(tmp_path, dev_corpus_file=None)
    )
    result = train(cfg)
    losses = [row["loss"] for row in read_log(tmp_path / "run") if "loss" in row]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    model = DualEncoder.from_pretrained(result.final_model).eval()
    emb = model.encode_docs(model.tokenize_docs(["the query", "a passage"]))
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved == cfg  # the resolved config is written next to the run and every checkpoint
    assert (tmp_path / "run" / "checkpoints" / "step_00000030" / "config.yaml").exists()


def test_dev_evaluation_keeps_the_best_model(tmp_path):
    from dualenc.training.loop import train

    triples = write_triples(tmp_path / "triples.tsv", 40, seed=1)
    rows = [line.split("\t") for line in triples.read_text().splitlines()]
    (tmp_path / "dev_corpus.tsv").write_text(
        "".join(f"d{i}\t{pos}\n" for i, (_, pos, _) in enumerate(rows[:20]))
    )
    (tmp_path / "dev_topics.tsv").write_text("".join(f"q{i}\t{q}\n" for i, (q, _, _) in enumerate(rows[:20])))
    (tmp_path / "dev_qrels.txt").write_text("".join(f"q{i} 0 d{i} 1\n" for i in range(20)))
    extra = {
        "train_file": str(triples),
        "dev_corpus_file": str(tmp_path / "dev_corpus.tsv"),
        "dev_topics_file": str(tmp_path / "dev_topics.tsv"),
        "dev_qrels_file": str(tmp_path / "dev_qrels.txt"),
        "eval_steps": 10,
        "eval_measure": "RR@10",
    }
    overrides = tiny_overrides(tmp_path, **extra)
    result = train(load_config(REPO / "recipes" / "configs" / "tiny.yaml", overrides))
    dev = [row for row in read_log(tmp_path / "run") if "dev/RR@10" in row]
    assert [row["step"] for row in dev] == [10, 20, 30]
    best = max(dev, key=lambda row: row["dev/RR@10"])
    assert result.best_metric == pytest.approx(best["dev/RR@10"])
    assert (tmp_path / "run" / "best_model" / "dualenc_config.json").exists()
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 30 and summary["best_step"] == best["step"]
    assert {"commit", "machine", "versions"} <= summary["made_by"].keys()
    assert summary["best_metric"] == pytest.approx(best["dev/RR@10"]) and summary["eval_measure"] == "RR@10"
    timed = [row for row in read_log(tmp_path / "run") if "loss" in row]
    elapsed = [row["elapsed_s"] for row in timed]
    assert elapsed == sorted(elapsed) and 0 < elapsed[-1] <= summary["wall_s"]
    assert all(0 < row["step_time_s"] <= row["elapsed_s"] for row in timed)
    assert summary["peak_rss_gib"] >= timed[-1]["peak_rss_gib"] > 0.05  # a process holding torch + BERT
    # CPU time of the main process (every thread): spent, and at most what its threads could spend
    assert 0 < summary["cpu_s"] <= summary["wall_s"] * torch.get_num_threads() + 1
    # where it went: 30 steps x 8 queries x (1 query + 2 documents) encoded with grad; 3 dev evaluations x (20
    # documents + 20 queries) without; one checkpoint (the last); no cache
    cost, run_dir = summary["cost_by_phase"], tmp_path / "run"
    assert list(cost) == ["training", "cache_fill", "cache_refresh", "dev_eval", "checkpoint"]
    assert (cost["training"]["grad_sequences"], cost["training"]["nograd_sequences"]) == (30 * 8 * 3, 0)
    assert (cost["dev_eval"]["grad_sequences"], cost["dev_eval"]["nograd_sequences"]) == (0, 3 * (20 + 20))
    assert 3 * 720 <= cost["training"]["grad_tokens"] <= 30 * 8 * 32 + 30 * 16 * 64  # >= [CLS] w [SEP]
    for phase in ("cache_fill", "cache_refresh", "checkpoint"):
        assert cost[phase]["grad_sequences"] == cost[phase]["nograd_sequences"] == 0, phase
    assert cost["dev_eval"]["cpu_s"] > 0 and cost["checkpoint"]["cpu_s"] > 0 and cost["training"]["cpu_s"] > 0
    assert cost["cache_fill"]["cpu_s"] == cost["cache_refresh"]["cpu_s"] == 0
    assert sum(p["cpu_s"] for p in cost.values()) == pytest.approx(summary["cpu_s"], abs=1e-9)
    assert sum(p["wall_s"] for p in cost.values()) == pytest.approx(summary["wall_s"], abs=1e-9)
    split = load_script("eval/cost_split.py").main(["--out", str(tmp_path / "split.json"), f"tiny={run_dir}"])
    row = split["methods"][0]  # eval/cost_split.py reads what the trainer wrote
    assert row["dev_eval_cpu_h"] * 3600 == pytest.approx(cost["dev_eval"]["cpu_s"])
    assert (row["grad_ksequences"], row["nograd_ksequences"]) == (0.72, 0.12)


# ------------------------------------------------ 2 processes (gloo) == 1 process, same global batch


def test_two_processes_match_one_process(tmp_path, tiny_model_dir):
    """accelerate.debug_launcher (2 processes, gloo) vs 1 process on the same global batch, loss and
    gradients."""
    from distributed_cases import run_case

    write_triples(tmp_path / "triples.tsv", 8)
    run_case("train_step", tmp_path, tiny_model_dir)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (
        float(one["num_negatives"]) == float(two["num_negatives"]) == 7.0
    )  # cross-device negatives are included
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-5, rtol=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and "loss.temperature.log_scale" in one["grads"]
    for name in one["grads"]:
        torch.testing.assert_close(two["grads"][name], one["grads"][name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- kill -9, resume, same losses


def test_kill_9_and_resume_reproduces_the_loss_sequence(tmp_path):
    steps = 24
    base = tiny_overrides(tmp_path, max_steps=steps, save_steps=8, save_total_limit=0)
    reference = train_subprocess(tmp_path, False, [*base, f"output_dir={tmp_path / 'ref'}"])
    assert reference.wait(timeout=600) == 0
    killed_dir = tmp_path / "killed"
    victim = train_subprocess(tmp_path, True, [*base, f"output_dir={killed_dir}"])
    deadline = time.time() + 600
    while not (killed_dir / "checkpoints" / "step_00000008").exists() or last_logged_step(killed_dir) <= 8:
        assert victim.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    logged = [row["step"] for row in read_log(killed_dir)]
    assert not (killed_dir / "final_model").exists() and 8 < max(logged) < steps  # killed past the checkpoint
    resumed = train_subprocess(tmp_path, False, [*base, f"output_dir={killed_dir}", "resume_from=latest"])
    assert resumed.wait(timeout=600) == 0
    ref = {row["step"]: row["loss"] for row in read_log(tmp_path / "ref")}
    got = {row["step"]: row["loss"] for row in read_log(killed_dir)}
    assert sorted(got) == sorted(ref) == list(range(1, steps + 1))  # no step missing or logged twice
    assert [got[s] for s in range(9, steps + 1)] == [ref[s] for s in range(9, steps + 1)]
    # the training clock continues from the checkpoint: wall_s = the killed session up to its checkpoint +
    # this one
    summary = json.loads((killed_dir / "train_summary.json").read_text())
    checkpoint_state = json.loads((Path(summary["resumed_from"]) / "trainer_state.json").read_text())
    assert checkpoint_state["step"] >= 8 and checkpoint_state["elapsed_s"] >= 0.15 * checkpoint_state["step"]
    assert summary["wall_s"] - summary["session_wall_s"] == pytest.approx(
        checkpoint_state["elapsed_s"], abs=0.05
    )
    assert summary["cpu_s"] > checkpoint_state["cpu_s"] > 0  # the CPU clock is carried over too
    elapsed = [row["elapsed_s"] for row in read_log(killed_dir) if "loss" in row]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= summary["wall_s"]
    ref_model = DualEncoder.from_pretrained(tmp_path / "ref" / "final_model")
    got_model = DualEncoder.from_pretrained(killed_dir / "final_model")
    for (name, a), (_, b) in zip(ref_model.state_dict().items(), got_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_users_model_is_left_without_counting_hooks_after_training_or_a_failure(
    tmp_path, tokenizer, monkeypatch
):
    """train(cfg, model=...) hooks the towers to count encodes (cost_by_phase) and takes the hooks off again
    when it returns and when it raises: a model trained, or failed, once is clean for the user's next use."""
    import custom_towers

    from dualenc.model.encoder import DualEncoderConfig
    from dualenc.training import loop

    query, doc = custom_towers.BagOfWords(len(tokenizer)), custom_towers.BagOfWords(len(tokenizer))
    model = DualEncoder(query, doc, tokenizer, DualEncoderConfig())
    towers = (model.query_encoder, model.doc_encoder)
    overrides = tiny_overrides(tmp_path, dev_corpus_file=None, max_steps=2)
    result = loop.train(load_config(REPO / "recipes" / "configs" / "tiny.yaml", overrides), model=model)
    assert result.step == 2 and [len(t._forward_pre_hooks) for t in towers] == [0, 0]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["cost_by_phase"]["training"]["grad_sequences"] == 2 * 8 * 3  # the hooks did count

    seen = []

    def failing_step(*args, **kwargs):
        seen.append([len(t._forward_pre_hooks) for t in towers])
        raise RuntimeError("injected fault in the step")

    monkeypatch.setattr(loop, "backward_micro_batch", failing_step)
    (tmp_path / "again").mkdir()
    overrides = tiny_overrides(tmp_path / "again", dev_corpus_file=None, max_steps=2)
    with pytest.raises(RuntimeError, match="injected fault"):
        loop.train(load_config(REPO / "recipes" / "configs" / "tiny.yaml", overrides), model=model)
    assert seen == [[1, 1]]  # on while the step ran (the path was exercised) ...
    assert [len(t._forward_pre_hooks) for t in towers] == [0, 0]  # ... and off after it raised
