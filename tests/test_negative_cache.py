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


def test_block_scan_equals_a_dense_computation():
    """scan_table over blocks == dense logsumexp / softmax-mean / rank; Gumbel candidates never masked."""
    from dualenc.cache import EmbeddingTable
    from dualenc.cache_scan import scan_table

    torch.manual_seed(0)
    table = EmbeddingTable(50, 8)
    table.emb.copy_(torch.randn(50, 8))
    table.doc_idx.copy_(torch.arange(50))
    table.doc_idx[[3, 17]] = -1  # empty slots
    queries, scale = torch.randn(6, 8), 2.0
    pos_score = torch.randn(6) * 3
    mask_rows, mask_slots = torch.tensor([0, 0, 5]), torch.tensor([1, 40, 7])
    home = [torch.tensor([2, 9]), torch.tensor([11])]  # queries 0-2 see slots 2, 9; queries 3-5 slot 11
    dense = scale * queries @ table.emb.T  # (6, 50)
    dense[:, [3, 17]] = float("-inf")
    dense[mask_rows, mask_slots] = float("-inf")
    dense[:3, [2, 9]] = float("-inf")
    dense[3:, 11] = float("-inf")
    for block in (7, 50):
        for replacement in (True, False):
            scan = scan_table(table, queries, scale, pos_score=pos_score, mask_rows=mask_rows, mask_slots=mask_slots,
                              home_slots=home, num_samples=4, replacement=replacement,
                              generator=torch.Generator().manual_seed(1), block_size=block, with_mean=True)  # fmt: skip
            torch.testing.assert_close(scan.lse, torch.logsumexp(dense, 1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(scan.mean, dense.softmax(1) @ table.emb, atol=1e-5, rtol=1e-5)
            assert torch.equal(scan.above, (dense > pos_score[:, None]).sum(1))
            drawn = scan.slots[scan.slots >= 0]
            rows = torch.arange(6)[:, None].expand_as(scan.slots)[scan.slots >= 0]
            assert torch.isfinite(dense[rows, drawn]).all()  # only unmasked slots
            if not replacement:
                assert all(len(set(r.tolist())) == 4 for r in scan.slots)  # Gumbel-top-m: distinct


def _one_process_cache(tmp_path, tiny_model_dir, overrides):
    from accelerate import Accelerator

    from dualenc.collate import GroupDataset, TrainCollator
    from dualenc.config import load_config
    from dualenc.encoder import DualEncoder
    from dualenc.negative_cache import NegativeCache
    from dualenc.train import TrainingModule, build_loss
    from dualenc.train_data import load_train_data

    write_triples(tmp_path / "triples.tsv", 12)
    cfg = load_config(None, ["random_init=true", "train_group_size=2", "temperature=0.2", *overrides])
    accelerator = Accelerator(cpu=True)
    model = DualEncoder.from_pretrained(tiny_model_dir).eval()
    data = load_train_data(str(tmp_path / "triples.tsv"), format="triples", cache_dir=str(tmp_path / "hf"))
    cache = NegativeCache(cfg.cache, data.corpus, accelerator, model.dim, seed=0)
    cache.fill(model, tmp_path / "fill", batch_size=16)
    with torch.no_grad():  # make the table stale, so "constants" and "live" differ
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = TrainCollator(model, data.corpus)([GroupDataset(data, 2, seed=0)[i] for i in range(4)])
    module = TrainingModule(model, build_loss(cfg))
    return cfg, accelerator, module, batch, cache


def _dense_cache_ce(module, batch, table, inbatch: bool):
    """Oracle: CE over [live batch documents (or only the positive), every table row as a constant], positives and
    batch documents removed from the table part, by autograd of the dense logits."""
    q, d = module.encoder(batch["query"], batch["doc"])  # (4, D), (8, D)
    scale = module.loss.temperature()
    targets = torch.arange(4) * 2
    stale = scale * q @ table.emb.T.detach()  # (4, M)
    for i in range(4):
        stale[i, batch["positives"][i][batch["positives"][i] >= 0]] = float("-inf")
        if inbatch:
            stale[i, batch["doc_idx"]] = float("-inf")
    if inbatch:
        live = scale * q @ d.T  # (4, 8)
        logits, target = torch.cat([live, stale], 1), targets
    else:
        live = scale * (q * d[targets]).sum(1, keepdim=True)  # (4, 1)
        logits, target = torch.cat([live, stale], 1), torch.zeros(4, dtype=torch.long)
    return torch.nn.functional.cross_entropy(logits, target)


@pytest.mark.parametrize("inbatch", [True, False])
def test_cache_ce_equals_the_dense_softmax_over_the_table(tmp_path, tiny_model_dir, inbatch):
    """loss=cache_ce (lumped logit, block scan) == dense CE over the table as constants: value and gradient."""
    from dualenc.train import cache_training_step

    cfg, acc, module, batch, cache = _one_process_cache(
        tmp_path, tiny_model_dir, ["loss=cache_ce", f"cache_inbatch={inbatch}", "cache_score_block_size=7"]
    )
    table = cache.table.emb.clone()
    out = cache_training_step(module, batch, acc, cfg, cache, draw_step=0)
    grads = torch.autograd.grad(
        out.loss, [p for p in module.encoder.parameters() if p.requires_grad], allow_unused=True
    )
    cache.table.emb.copy_(table)
    dense = _dense_cache_ce(module, batch, cache.table, inbatch)
    dense_grads = torch.autograd.grad(
        dense, [p for p in module.encoder.parameters() if p.requires_grad], allow_unused=True
    )
    assert float(out.loss) == pytest.approx(float(dense), abs=1e-5)
    for g, ref in zip(grads, dense_grads, strict=True):
        if ref is None:
            assert g is None or float(g.abs().max()) == 0
        else:
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def test_sce_with_full_coverage_equals_cache_ce(tmp_path, tiny_model_dir):
    """loss=sce with one bucket holding every query and every slot == dense cache-CE without the in-batch part."""
    from dualenc.train import cache_training_step

    cfg, acc, module, batch, cache = _one_process_cache(
        tmp_path, tiny_model_dir,
        ["loss=sce", "sce_n_buckets=1", "sce_bucket_size_x=4", f"sce_bucket_size_y={len(cache_rows(tmp_path))}"],
    )  # fmt: skip
    table = cache.table.emb.clone()
    out = cache_training_step(module, batch, acc, cfg, cache, draw_step=0)
    assert float(out.logs["coverage"]) == 1.0
    grads = torch.autograd.grad(
        out.loss, [p for p in module.encoder.parameters() if p.requires_grad], allow_unused=True
    )
    cache.table.emb.copy_(table)
    # SCE masks only the query's own target slot; with one positive per query that is the dense oracle's mask
    dense = _dense_cache_ce(module, batch, cache.table, inbatch=False)
    dense_grads = torch.autograd.grad(
        dense, [p for p in module.encoder.parameters() if p.requires_grad], allow_unused=True
    )
    assert float(out.loss) == pytest.approx(float(dense), abs=1e-5)
    for g, ref in zip(grads, dense_grads, strict=True):
        if ref is not None:
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def cache_rows(tmp_path):
    """Corpus rows of the 12-triple test data (unique positives and negatives)."""
    write_triples(tmp_path / "triples.tsv", 12)
    rows = [line.split("\t") for line in (tmp_path / "triples.tsv").read_text().splitlines()]
    return {text for _, pos, neg in rows for text in (pos, neg)}


def test_sce_candidates_full_coverage_equals_the_dense_scan_and_truncation_lowers_the_mass():
    from dualenc.cache import EmbeddingTable
    from dualenc.cache_scan import scan_candidates, scan_table

    torch.manual_seed(3)
    table = EmbeddingTable(40, 8)
    table.emb.copy_(torch.randn(40, 8))
    table.doc_idx.copy_(torch.arange(40))
    table.doc_idx[5] = -1
    queries, pos_score = torch.randn(6, 8), torch.randn(6)
    common = dict(pos_score=pos_score, mask_rows=torch.tensor([0, 3]), mask_slots=torch.tensor([2, 9]),
                  home_slots=[torch.tensor([1, 7])], num_samples=3, replacement=True)  # fmt: skip
    dense = scan_table(table, queries, 1.5, generator=torch.Generator().manual_seed(0), **common)
    full = scan_candidates(table, queries, 1.5, generator=torch.Generator().manual_seed(0), num_buckets=1,
                           bucket_size_x=6, bucket_size_y=39, mix=False, **common)  # fmt: skip
    torch.testing.assert_close(full.lse, dense.lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(full.above, dense.above)
    masked = {(0, 2), (3, 9)} | {(r, s) for r in range(6) for s in (1, 7, 5)}
    for slots in (full.slots,):
        assert all((r, int(s)) not in masked for r in range(6) for s in slots[r])
    part = scan_candidates(table, queries, 1.5, generator=torch.Generator().manual_seed(0), num_buckets=3,
                           bucket_size_x=2, bucket_size_y=8, mix=True, **common)  # fmt: skip
    assert (part.lse <= dense.lse + 1e-6).all()  # a subset of the table's mass
    covered = torch.isfinite(part.lse)
    assert covered.any() and ((part.slots >= 0).all(1) == covered).all()


def test_cache_training_with_sce_candidates_runs(tmp_path):
    from dualenc.config import load_config
    from dualenc.train import train

    config = REPO / "recipes" / "configs" / "tiny_cache.yaml"
    overrides = tiny_overrides(tmp_path, max_steps=10, cache_candidates="sce", sce_bucket_size_y=16)
    train(load_config(config, overrides))
    logs = read_log(tmp_path / "run")
    assert len(logs) == 10 and all(row["cache/draws"] > 0 for row in logs)
