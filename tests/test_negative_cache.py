"""The negative cache in training: masking, exact sampling (1 and 2 processes), refresh, resume."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import REPO, last_logged_step, read_log, tiny_overrides, train_subprocess, write_triples
from scipy import stats

from dualenc.negcache.config import CacheConfig
from dualenc.negcache.gumbel import GumbelKey, combine_lse, keyed_gumbel
from dualenc.negcache.negative_cache import NegativeCache
from dualenc.negcache.scan import ScanResult, merge_shards, scan_table
from dualenc.negcache.sce_candidates import scan_candidates
from dualenc.negcache.table import EmbeddingTable


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


def test_two_processes_draw_what_one_process_draws(sampling_run):
    """2 processes (sharded table, 2 queries each) draw exactly the negatives of 1 process, step by step."""
    one, two = torch.load(sampling_run / "one.pt"), torch.load(sampling_run / "two.pt")
    assert torch.equal(two["q_emb"], one["q_emb"]) and torch.equal(two["table_emb"], one["table_emb"])
    assert torch.equal(two["draws"], one["draws"])  # (4, 150, 16): every draw of every step
    assert torch.equal(two["counts"], one["counts"])
    assert torch.equal(two["pos_rank"], one["pos_rank"])
    torch.testing.assert_close(two["rest_lse"], one["rest_lse"], atol=1e-5, rtol=1e-6)
    assert len({tuple(d) for d in one["draws"][0].tolist()}) > 100  # each step draws anew


def test_sampled_frequencies_match_the_global_softmax(sampling_run):
    """Draws of NegativeCache.sample follow the softmax over the whole table (chi-square); exact LSE."""
    result = torch.load(sampling_run / "one.pt")
    counts = result["counts"]  # (4, C)
    for row in range(4):
        probs, lse = _expected_probs(result, row)
        assert counts[row][probs == 0].sum() == 0, "a masked document (positive, batch, empty) was drawn"
        assert chi2_pvalue(counts[row], torch.from_numpy(probs)) > 1e-3, row
        assert float(result["rest_lse"][row]) == pytest.approx(lse, abs=1e-4)
        wrong, _ = _expected_probs(
            result, row, scale=10.0
        )  # power: the same counts reject 2x the temperature
        assert chi2_pvalue(counts[row], torch.from_numpy(wrong)) < 1e-6, row


def test_two_processes_match_one_process_loss_and_gradients(tmp_path, tiny_model_dir):
    """One loss=cache step, nothing replayed: 2 processes (sharded table) == 1 process (whole table)."""
    from distributed_cases import run_case

    write_triples(tmp_path / "triples.tsv", 12)
    run_case("cache_step", tmp_path, tiny_model_dir)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert torch.equal(two["doc_idx"], one["doc_idx"]) and bool((one["doc_idx"] >= 0).all())
    assert torch.equal(two["pos_rank"], one["pos_rank"])
    torch.testing.assert_close(two["rest_lse"], one["rest_lse"], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-5, rtol=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and "loss.temperature.log_scale" in one["grads"]
    for name in one["grads"]:
        torch.testing.assert_close(two["grads"][name], one["grads"][name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(two["table"], one["table"], atol=1e-5, rtol=1e-5)  # same write-backs


def test_refresh_fraction_one_keeps_the_table_exact(tmp_path, tiny_model_dir):
    from accelerate import Accelerator

    from dualenc.model.encoder import DualEncoder
    from dualenc.negcache.negative_cache import NegativeCache
    from dualenc.retrieval.encode import encode_texts
    from dualenc.training.config import load_config
    from dualenc.training.data import load_train_data

    write_triples(tmp_path / "triples.tsv", 12)
    cfg = load_config(None, ["random_init=true", "loss=cache", "refresh_fraction=1.0"])
    model = DualEncoder.from_pretrained(tiny_model_dir).eval()
    data = load_train_data(str(tmp_path / "triples.tsv"), format="triples", cache_dir=str(tmp_path / "hf"))
    cache = NegativeCache(cfg.cache, data.corpus, Accelerator(cpu=True), model.dim, seed=0)
    cache.fill(model, tmp_path / "fill", batch_size=8)
    with torch.no_grad():  # change the document tower: the cache is now stale
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    logs = cache.refresh(model)
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
    reference = train_subprocess(tmp_path, False, [*base, f"output_dir={tmp_path / 'ref'}"], config=config)
    assert reference.wait(timeout=600) == 0
    killed = tmp_path / "killed"
    victim = train_subprocess(tmp_path, True, [*base, f"output_dir={killed}"], config=config)
    deadline = time.time() + 600
    # past the checkpoint: the slowed-down TrainingModule.forward (which loss=cache runs) leaves time to kill
    while not ((killed / "checkpoints" / "step_00000008").exists() and last_logged_step(killed) > 8):
        assert victim.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    logged = [r["step"] for r in read_log(killed)]
    assert 8 < max(logged) < steps and not (killed / "final_model").exists()  # it really was interrupted
    name = "cache.00000-of-00001.safetensors"
    ref_table = load_file(str(tmp_path / "ref" / "checkpoints" / "step_00000008" / name))
    got_table = load_file(str(killed / "checkpoints" / "step_00000008" / name))
    assert all(torch.equal(ref_table[k], got_table[k]) for k in ref_table)  # the table as checkpointed
    resumed = train_subprocess(
        tmp_path, False, [*base, f"output_dir={killed}", "resume_from=latest"], config=config
    )
    assert resumed.wait(timeout=600) == 0
    ref, got = read_log(tmp_path / "ref"), read_log(killed)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, steps + 1))
    for a, b in zip(ref[8:], got[8:], strict=True):  # after the resume point: same draws, same losses
        assert (a["loss"], a["cache/pos_rank"], a["cache/staleness_refresh"]) == (
            b["loss"],
            b["cache/pos_rank"],
            b["cache/staleness_refresh"],
        )
    final = "step_00000016"
    ref_table = load_file(str(tmp_path / "ref" / "checkpoints" / final / name))
    got_table = load_file(str(killed / "checkpoints" / final / name))
    assert all(torch.equal(ref_table[k], got_table[k]) for k in ref_table)
    assert json.loads((killed / "checkpoints" / final / "trainer_state.json").read_text())["step"] == steps


def test_stream_mode_trains_and_never_duplicates(tmp_path):
    """Stream (FIFO) mode: batch documents enter the table once; draws come only from what is cached."""
    from safetensors.torch import load_file

    from dualenc.training.config import load_config
    from dualenc.training.loop import train

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


def _one_process_cache(tmp_path, tiny_model_dir, overrides):
    from accelerate import Accelerator

    from dualenc.model.encoder import DualEncoder
    from dualenc.negcache.negative_cache import NegativeCache
    from dualenc.training.batches import GroupDataset, TrainCollator
    from dualenc.training.build import build_loss
    from dualenc.training.config import load_config
    from dualenc.training.data import load_train_data
    from dualenc.training.step import TrainingModule

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
    module = TrainingModule(model, build_loss(cfg), cfg.loss)
    return cfg, accelerator, module, batch, cache


def _dense_cache_ce(module, batch, table, inbatch: bool):
    """Oracle: CE over [live batch documents (or only the positive), every table row as a constant],
    positives and batch documents removed from the table part, by autograd of the dense logits."""
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
    """loss=cache_ce (lumped logit, block scan) == dense CE over the table as constants: value, gradient."""
    cfg, acc, module, batch, cache = _one_process_cache(
        tmp_path, tiny_model_dir, ["loss=cache_ce", f"cache_inbatch={inbatch}", "cache_score_block_size=7"]
    )
    table = cache.table.emb.clone()
    out = module(batch, cache, draw_id=0)
    grads = torch.autograd.grad(
        out.loss, [p for p in module.encoder.parameters() if p.requires_grad], allow_unused=True
    )
    cache.table.emb.copy_(table)
    dense = _dense_cache_ce(module, batch, cache.table, inbatch)
    dense_grads = torch.autograd.grad(
        dense, [p for p in module.encoder.parameters() if p.requires_grad], allow_unused=True
    )
    assert float(out.loss.detach()) == pytest.approx(float(dense), abs=1e-5)
    for g, ref in zip(grads, dense_grads, strict=True):
        if ref is None:
            assert g is None or float(g.abs().max()) == 0
        else:
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def test_sce_with_full_coverage_equals_cache_ce(tmp_path, tiny_model_dir):
    """loss=sce, one bucket holding every query and every slot == dense cache-CE without the in-batch part."""
    cfg, acc, module, batch, cache = _one_process_cache(
        tmp_path,
        tiny_model_dir,
        [
            "loss=sce",
            "sce_n_buckets=1",
            "sce_bucket_size_x=4",
            f"sce_bucket_size_y={len(cache_rows(tmp_path))}",
        ],
    )
    table = cache.table.emb.clone()
    out = module(batch, cache, draw_id=0)
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
    assert float(out.loss.detach()) == pytest.approx(float(dense), abs=1e-5)
    for g, ref in zip(grads, dense_grads, strict=True):
        if ref is not None:
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def cache_rows(tmp_path):
    """Corpus rows of the 12-triple test data (unique positives and negatives)."""
    write_triples(tmp_path / "triples.tsv", 12)
    rows = [line.split("\t") for line in (tmp_path / "triples.tsv").read_text().splitlines()]
    return {text for _, pos, neg in rows for text in (pos, neg)}


def test_cache_training_with_sce_candidates_runs(tmp_path):
    from dualenc.training.config import load_config
    from dualenc.training.loop import train

    config = REPO / "recipes" / "configs" / "tiny_cache.yaml"
    overrides = tiny_overrides(tmp_path, max_steps=10, cache_candidates="sce", sce_bucket_size_y=16)
    train(load_config(config, overrides))
    logs = read_log(tmp_path / "run")
    assert len(logs) == 10 and all(row["cache/draws"] > 0 for row in logs)


# ------------------------------------------------------------------------------------------- scans (no model)
# What training calls (NegativeCache.sample -> CacheSampler.draw) is scan_table (or scan_candidates) on every
# shard + merge_shards.
# P processes are simulated on one process: by splitting a table into shards and merging their scans, or by
# running NegativeCache itself in P threads whose collectives are an in-memory exchange (_FakeAccelerator).

KEY = GumbelKey(seed=11, step=5)


def _table(num_slots: int, dim: int, seed: int, empty: tuple[int, ...] = ()) -> EmbeddingTable:
    """A corpus-layout table (slot i holds corpus row i) with random embeddings and some empty slots."""
    g = torch.Generator().manual_seed(seed)
    table = EmbeddingTable(num_slots, dim)
    table.fill_corpus(torch.randn(num_slots, dim, generator=g), torch.arange(num_slots))
    table.doc_idx[list(empty)] = -1
    return table


def _shard(table: EmbeddingTable, start: int, end: int) -> EmbeddingTable:
    """Slots [start, end) of ``table`` as the shard of the process that owns them."""
    shard = EmbeddingTable(end - start, table.dim, slot_offset=start)
    shard.emb.copy_(table.emb[start:end])
    shard.doc_idx.copy_(table.doc_idx[start:end])
    return shard


def sharded_scan(
    table: EmbeddingTable,
    bounds: list[int],
    queries,
    scale,
    *,
    mask_rows,
    mask_slots,
    home_slots,
    replacement: bool,
    with_mean: bool = False,
    merge=merge_shards,
    **kw,
) -> ScanResult:
    """What P processes do: scan each shard [bounds[p], bounds[p+1]) of ``table``, then merge_shards.

    Masks are given in global slots; the result's ``slots`` are global slots (-1 = none)."""
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        inside = (mask_slots >= start) & (mask_slots < end)
        homes = None if home_slots is None else [h[(h >= start) & (h < end)] - start for h in home_slots]
        scan = scan_table(
            _shard(table, start, end),
            queries,
            scale,
            mask_rows=mask_rows[inside],
            mask_slots=mask_slots[inside] - start,
            home_slots=homes,
            replacement=replacement,
            with_mean=with_mean,
            **kw,
        )
        parts.append((scan, torch.where(scan.slots >= 0, scan.slots + start, -1)))
    stack = lambda f: torch.stack([f(scan, slots) for scan, slots in parts])  # noqa: E731
    return merge(
        stack(lambda s, _: s.lse),
        stack(lambda s, _: s.above),
        stack(lambda s, _: s.keys),
        stack(lambda _, g: g),
        replacement=replacement,
        mean=stack(lambda s, _: s.mean) if with_mean else None,
    )


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of counts to probabilities over the cells with probs > 0."""
    keep = probs > 0
    expected = counts.sum().double() * probs[keep].double()
    return float(stats.chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue)


# a table of 10 slots: slot 2 empty, slot 5 every query's positive, slot 7 a batch document of every query
GOF_TABLE = dict(num_slots=10, dim=4, seed=3, empty=(2,))
GOF_QUERIES = 20_000  # identical query vectors with distinct query ids: independent draws


def _gof_setup():
    table = _table(**GOF_TABLE)
    query = torch.randn(1, 4, generator=torch.Generator().manual_seed(4))  # (1, D)
    queries = query.expand(GOF_QUERIES, -1).contiguous()  # (Q, D)
    scores = 0.8 * (query @ table.emb.T)[0].double()  # (M,)
    scores[[2, 5, 7]] = float("-inf")
    masks = dict(
        mask_rows=torch.arange(GOF_QUERIES),
        mask_slots=torch.full((GOF_QUERIES,), 5),
        home_slots=[torch.tensor([7])],
        pos_score=torch.zeros(GOF_QUERIES),
    )
    return table, queries, scores.softmax(0), masks


def _gof_draws(bounds: list[int], replacement: bool, m: int, scale: float = 0.8, merge=merge_shards):
    """Draws of queries whose true law is ``probs`` = softmax(0.8 · scores) minus the masked slots."""
    table, queries, probs, masks = _gof_setup()
    scan = sharded_scan(
        table,
        bounds,
        queries,
        scale,
        replacement=replacement,
        num_samples=m,
        key=KEY,
        query_ids=torch.arange(GOF_QUERIES),
        block_size=3,
        merge=merge,
        **masks,
    )
    return scan.slots, probs  # (Q, m) global slots, (M,)


@pytest.mark.parametrize("bounds", [[0, 10], [0, 4, 9, 10]], ids=["1 shard", "3 shards"])
def test_draws_with_replacement_follow_the_softmax(bounds):
    """Chi-square of the draws of scan + merge against the exact masked softmax; draws k are independent."""
    slots, probs = _gof_draws(bounds, replacement=True, m=2)
    counts = torch.bincount(slots.flatten(), minlength=10)
    assert counts[[2, 5, 7]].tolist() == [0, 0, 0], "an empty or masked slot was drawn"
    assert chi2_pvalue(counts, probs) > 1e-3
    pairs = torch.bincount(slots[:, 0] * 10 + slots[:, 1], minlength=100)  # (draw 0, draw 1) ~ product law
    assert chi2_pvalue(pairs, torch.outer(probs, probs).flatten()) > 1e-3


@pytest.mark.parametrize("bounds", [[0, 10], [0, 4, 9, 10]], ids=["1 shard", "3 shards"])
def test_draws_without_replacement_are_sequential_softmax_draws(bounds):
    """Gumbel-top-2 (Kool et al. 2019): first draw ~ softmax, ordered pairs ~ p_i p_j / (1 - p_i),
    distinct."""
    slots, probs = _gof_draws(bounds, replacement=False, m=2)
    assert bool((slots[:, 0] != slots[:, 1]).all()) and bool((slots >= 0).all())
    assert not bool(torch.isin(slots, torch.tensor([2, 5, 7])).any())
    assert chi2_pvalue(torch.bincount(slots[:, 0], minlength=10), probs) > 1e-3
    ordered = torch.outer(probs, probs) / (1 - probs)[:, None]  # (M, M) P(first = i, second = j)
    ordered.fill_diagonal_(0)
    pairs = torch.bincount(slots[:, 0] * 10 + slots[:, 1], minlength=100)
    assert chi2_pvalue(pairs, ordered.flatten()) > 1e-3
    many, _ = _gof_draws(bounds, replacement=False, m=9)  # 7 unmasked slots: the rest are "no draw"
    assert bool((many[:, 7:] == -1).all()) and all(len(set(r)) == 7 for r in many[:50, :7].tolist())


def _random_shard_merge(lse, above, keys, items, *, replacement, mean=None) -> ScanResult:
    """A wrong merge_shards (for the power check): each draw takes a uniformly random shard's candidate."""
    shard = torch.randint(
        0, keys.shape[0], keys.shape[1:], generator=torch.Generator().manual_seed(0)
    )  # (Q, m)
    return ScanResult(
        combine_lse(lse), above.sum(0), items.gather(0, shard[None])[0], keys.gather(0, shard[None])[0]
    )


def test_the_goodness_of_fit_test_rejects_wrong_samplers():
    """Power: the same chi-square rejects draws at 2x and at 1.1x the temperature, a merge that ignores the
    keys (a random shard's candidate), and uniform draws over the same cells."""
    for scale in (0.4, 0.72):  # temperature off by 2x, by 10%
        slots, probs = _gof_draws([0, 4, 9, 10], replacement=True, m=2, scale=scale)
        assert chi2_pvalue(torch.bincount(slots.flatten(), minlength=10), probs) < 1e-6, scale
    slots, probs = _gof_draws([0, 4, 9, 10], replacement=True, m=2, merge=_random_shard_merge)
    assert chi2_pvalue(torch.bincount(slots.flatten(), minlength=10), probs) < 1e-6
    allowed = torch.tensor([0, 1, 3, 4, 6, 8, 9])
    uniform = allowed[torch.randint(0, 7, (2 * GOF_QUERIES,), generator=torch.Generator().manual_seed(0))]
    assert chi2_pvalue(torch.bincount(uniform, minlength=10), probs) < 1e-6


def _favour(row: int):
    """A noise function that makes corpus row ``row`` win any argmax it is allowed in (0 elsewhere)."""

    def noise(key, query_ids, doc_rows, draw, dtype):
        rows = doc_rows.expand(query_ids.shape[0], -1) if doc_rows.dim() == 1 else doc_rows  # (Q, b)
        return (rows == row).to(dtype) * 1e4

    return noise


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("bounds", [[0, 30], [0, 11, 30]], ids=["1 shard", "2 shards"])
def test_injected_noise_forces_the_draw_and_masked_slots_never_win(replacement, bounds):
    table = _table(30, 6, seed=5, empty=(4,))
    queries = torch.randn(4, 6, generator=torch.Generator().manual_seed(6))  # (4, D)
    dense = 1.3 * queries @ table.emb.T  # (4, 30)
    common = dict(
        pos_score=torch.zeros(4),
        num_samples=3,
        replacement=replacement,
        key=KEY,
        query_ids=torch.arange(4),
        block_size=7,
    )
    masks = dict(
        mask_rows=torch.tensor([1]), mask_slots=torch.tensor([20]), home_slots=[torch.tensor([13])] * 2
    )
    # query 1 has row 20 as a positive, queries 0-1 see slot 13 in their batch, 2-3 too (two home processes)
    forced = sharded_scan(table, bounds, queries, 1.3, noise=_favour(20), **masks, **common)
    dense[:, [4, 13]] = float("-inf")
    dense[1, 20] = float("-inf")
    best = dense.argsort(1, descending=True)  # (4, 30)
    for q in range(4):
        others = [s for s in best[q].tolist() if s != 20]
        if replacement:
            want = [20] * 3 if q != 1 else [others[0]] * 3  # the favoured row, unless masked for the query
        else:
            want = (
                [20, *others[:2]] if q != 1 else others[:3]
            )  # then the top scores (the rest of the noise is 0)
        assert forced.slots[q].tolist() == want, q
    for row, slot in (
        (-1, 4),
        (13, 13),
    ):  # an empty slot, a batch document: never drawn, however large the noise
        drawn = sharded_scan(table, bounds, queries, 1.3, noise=_favour(row), **masks, **common).slots
        assert not bool((drawn == slot).any()) and bool((drawn >= 0).all())


def _invariance_setup():
    table = _table(50, 8, seed=0, empty=(3, 17))
    g = torch.Generator().manual_seed(1)
    queries, pos_score = torch.randn(6, 8, generator=g), torch.randn(6, generator=g) * 3
    masks = dict(
        mask_rows=torch.tensor([0, 0, 5]),
        mask_slots=torch.tensor([1, 40, 7]),
        home_slots=[torch.tensor([2, 9]), torch.tensor([11, 33])],
    )
    return table, queries, pos_score, masks


@pytest.mark.parametrize("replacement", [True, False])
def test_draws_do_not_depend_on_block_size_or_sharding(replacement):
    """Identical draws, ranks and keys (lse and mean to float rounding) for blocks of 1, 7, all and 1 or 3
    shards."""
    table, queries, pos_score, masks = _invariance_setup()
    results = {}
    for block in (1, 7, 50):
        for bounds in ([0, 50], [0, 13, 31, 50]):
            results[block, len(bounds) - 1] = sharded_scan(
                table,
                bounds,
                queries,
                2.0,
                pos_score=pos_score,
                num_samples=4,
                replacement=replacement,
                key=KEY,
                query_ids=torch.arange(6) + 10,
                block_size=block,
                with_mean=True,
                **masks,
            )
    ref = results[50, 1]
    assert not bool((ref.slots[:, 0] == ref.slots[0, 0]).all())  # not trivially constant
    for name, got in results.items():
        assert torch.equal(got.slots, ref.slots), name
        assert torch.equal(got.above, ref.above), name
        torch.testing.assert_close(got.keys, ref.keys, atol=1e-5, rtol=0, msg=str(name))
        torch.testing.assert_close(got.lse, ref.lse, atol=1e-5, rtol=1e-6, msg=str(name))
        torch.testing.assert_close(got.mean, ref.mean, atol=1e-5, rtol=1e-5, msg=str(name))
    other_step = sharded_scan(
        table,
        [0, 50],
        queries,
        2.0,
        pos_score=pos_score,
        num_samples=4,
        replacement=replacement,
        key=GumbelKey(KEY.seed, KEY.step + 1),
        query_ids=torch.arange(6) + 10,
        **masks,
    )
    assert not torch.equal(other_step.slots, ref.slots)  # the step keys the noise


def test_block_scan_equals_a_dense_computation():
    """scan_table over blocks == dense logsumexp / softmax-mean / rank; draws == argmax of dense + the same
    noise."""
    table, queries, pos_score, masks = _invariance_setup()
    dense = 2.0 * queries @ table.emb.T  # (6, 50)
    dense[:, [3, 17]] = float("-inf")
    dense[masks["mask_rows"], masks["mask_slots"]] = float("-inf")
    dense[:3, [2, 9]] = float("-inf")
    dense[3:, [11, 33]] = float("-inf")
    ids = torch.arange(6)
    for replacement in (True, False):
        scan = scan_table(
            table,
            queries,
            2.0,
            pos_score=pos_score,
            num_samples=4,
            replacement=replacement,
            key=KEY,
            query_ids=ids,
            block_size=7,
            with_mean=True,
            **masks,
        )
        torch.testing.assert_close(scan.lse, torch.logsumexp(dense, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scan.mean, dense.softmax(1) @ table.emb, atol=1e-5, rtol=1e-5)
        assert torch.equal(scan.above, (dense > pos_score[:, None]).sum(1))
        if replacement:  # brute force: draw k = argmax over the whole row of score + noise(draw k)
            want = torch.stack(
                [(dense + keyed_gumbel(KEY, ids, table.doc_idx, k)).argmax(1) for k in range(4)], 1
            )
        else:
            want = (dense + keyed_gumbel(KEY, ids, table.doc_idx, 0)).topk(4, dim=1).indices
        assert torch.equal(scan.slots, want)


def test_sce_candidates_full_coverage_equals_the_dense_scan_and_truncation_lowers_the_mass():
    table = _table(40, 8, seed=3, empty=(5,))
    g = torch.Generator().manual_seed(4)
    queries, pos_score = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    common = dict(
        pos_score=pos_score,
        mask_rows=torch.tensor([0, 3]),
        mask_slots=torch.tensor([2, 9]),
        home_slots=[torch.tensor([1, 7])],
        num_samples=3,
        key=KEY,
        query_ids=torch.arange(6),
    )

    def candidates(**buckets):  # the same centres (generator seed 0) every call
        generator = torch.Generator().manual_seed(0)
        return scan_candidates(table, queries, 1.5, generator=generator, **common, **buckets)

    for replacement in (True, False):
        dense = scan_table(table, queries, 1.5, replacement=replacement, **common)
        full = candidates(
            num_buckets=1, bucket_size_x=6, bucket_size_y=39, mix=False, replacement=replacement
        )
        torch.testing.assert_close(full.lse, dense.lse, atol=1e-5, rtol=1e-5)
        assert torch.equal(full.above, dense.above)
        assert torch.equal(full.slots, dense.slots)  # same keyed noise on the same candidates: the same draws
    parts = [
        candidates(num_buckets=3, bucket_size_x=2, bucket_size_y=8, mix=True, replacement=True, block_size=b)
        for b in (1, 7, 40)
    ]
    for other in parts[1:]:  # the block size changes nothing
        assert torch.equal(other.slots, parts[0].slots) and torch.equal(other.above, parts[0].above)
        torch.testing.assert_close(other.lse, parts[0].lse, atol=1e-6, rtol=1e-6)
    part = parts[0]
    assert (part.lse <= dense.lse + 1e-6).all()  # a subset of the table's mass
    covered = torch.isfinite(part.lse)
    assert covered.any() and ((part.slots >= 0).all(1) == covered).all()


# ----------------------------------------------------------------------------------- simulated processes
class _Exchange:
    """An all-gather between the threads of simulated processes (a barrier on both sides of the swap)."""

    def __init__(self, world: int):
        self.world, self.box = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def all_gather(self, rank: int, value):
        self.box[rank] = value
        self.barrier.wait()
        out = list(self.box)
        self.barrier.wait()
        return out


class _FakeAccelerator:
    """The part of accelerate.Accelerator that NegativeCache uses, for one simulated process."""

    def __init__(self, exchange: _Exchange, rank: int):
        self.exchange, self.process_index, self.num_processes = exchange, rank, exchange.world
        self.device = torch.device("cpu")

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.exchange.all_gather(self.process_index, x), dim=0)

    def pad_across_processes(self, x: torch.Tensor, dim: int = 0, pad_index: int = 0) -> torch.Tensor:
        size = max(self.exchange.all_gather(self.process_index, x.shape[dim]))
        shape = list(x.shape)
        shape[dim] = size - x.shape[dim]
        return torch.cat([x, x.new_full(shape, pad_index)], dim=dim)


def run_processes(world: int, fn):
    """fn(accelerator) in ``world`` simulated processes (threads); returns their results by rank."""
    exchange = _Exchange(world)
    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(lambda rank: fn(_FakeAccelerator(exchange, rank)), range(world)))


def _simulated_cache(acc, table: EmbeddingTable, **cfg) -> NegativeCache:
    """A corpus-mode NegativeCache whose shard holds this process's slots of ``table``."""
    cache = NegativeCache(CacheConfig(**cfg), [None] * table.num_slots, acc, table.dim, seed=KEY.seed)
    start = cache.table.slot_offset
    cache.table.fill_corpus(
        table.emb[start : start + cache.table.num_slots].clone(),
        torch.arange(start, start + cache.table.num_slots),
    )
    return cache


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("inbatch", [True, False])
def test_negative_cache_sample_is_the_same_for_1_and_3_processes(replacement, inbatch):
    """NegativeCache.sample, 6 queries (cross-device batch): 1 process == 3 simulated processes, exactly."""
    table = _table(40, 8, seed=7)
    g = torch.Generator().manual_seed(8)
    q_emb, pos_score = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    positives = torch.tensor([[0, -1], [5, 6], [9, -1], [12, -1], [33, 34], [20, -1]])  # (6, 2)
    batch_docs = torch.tensor([0, 1, 5, 6, 9, 10, 12, 13, 33, 2, 20, 21])  # (12,) 2 per query

    def run(acc):
        cache = _simulated_cache(
            acc,
            table,
            num_cache_negatives=5,
            cache_sample_with_replacement=replacement,
            cache_score_block_size=7,
            cache_inbatch=inbatch,
        )
        b = 6 // acc.num_processes
        mine = slice(acc.process_index * b, (acc.process_index + 1) * b)
        docs = batch_docs[2 * mine.start : 2 * mine.stop]
        draws = [
            cache.sample(
                q_emb[mine],
                pos_score[mine],
                positives[mine],
                docs,
                torch.tensor(3.0),
                step,
                cross_device=True,
                with_mean=True,
            )
            for step in (0, 1, 9)
        ]
        return draws

    one, three = run_processes(1, run), run_processes(3, run)
    for step in range(3):
        got = [three[rank][step] for rank in range(3)]
        ref = one[0][step]
        assert torch.equal(torch.cat([d.doc_idx for d in got]), ref.doc_idx), step
        assert torch.equal(torch.cat([d.weight for d in got]), ref.weight)
        assert torch.equal(torch.cat([d.pos_rank for d in got]), ref.pos_rank)
        torch.testing.assert_close(torch.cat([d.rest_lse for d in got]), ref.rest_lse, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(torch.cat([d.mean for d in got]), ref.mean, atol=1e-5, rtol=1e-5)
        drawn = ref.doc_idx  # (6, 5)
        assert bool((drawn >= 0).all())
        masked = set(batch_docs.tolist()) if inbatch else set()
        for q in range(6):  # positives and the batch's documents (cache_inbatch) are never drawn
            assert not set(drawn[q].tolist()) & (set(positives[q].tolist()) | masked), q
    assert not torch.equal(one[0][0].doc_idx, one[0][1].doc_idx)  # a new step draws anew


def test_refresh_selects_the_same_documents_for_1_2_and_3_processes(monkeypatch):
    """Over 6 steps with write-backs in between: the globally oldest k slots are re-encoded, any sharding.

    Oracle: with one process, the k slots of largest age (ties: lowest slot) of the whole table.
    """
    table = _table(23, 4, seed=9)
    refreshed: dict[tuple[int, int], list[int]] = {}

    def encode_rows(
        self, model, rows
    ):  # the document tower at version ``model``: a function of (row, version)
        refreshed.setdefault((self.accelerator.num_processes, model), []).extend(rows.tolist())
        return rows[:, None].float().expand(-1, 4) + model

    monkeypatch.setattr(NegativeCache, "_encode_rows", encode_rows)
    written = [  # the 6 documents written at each step, one step per line
        [0, 1, 2, 11, 12, 13],
        [7, 8, 9, 3, 4, 14],
        [22, 3, 15, 6, 7, 8],
        [14, 4, 5, 0, 1, 2],
        [16, 17, 18, 19, 20, 21],
        [19, 20, 21, 9, 10, 22],
    ]

    def run(acc):
        cache = _simulated_cache(acc, table, refresh_fraction=0.15)  # k = round(0.15 * 23) = 3
        rank, world, logs = acc.process_index, acc.num_processes, []
        for step, docs in enumerate(written):
            part = len(docs) // world
            mine = torch.tensor(docs[rank * part : (rank + 1) * part])  # this rank's part of the step's docs
            cache.write_back(mine, torch.full((mine.numel(), 4), -1.0))
            ages = cache.table.age.clone()  # (M_local,) before the refresh (the whole table with one process)
            logs.append((ages, cache.refresh(model=step)))
        return cache.table.state_dict(), logs

    results = {world: run_processes(world, run) for world in (1, 2, 3)}
    ref_state, ref_logs = results[1][0]
    for step, (ages, logs) in enumerate(ref_logs):  # the oracle, from the ages before the refresh
        order = sorted(range(23), key=lambda s: (-int(ages[s]), s))[:3]
        assert sorted(refreshed[1, step]) == sorted(order), step
        assert logs["cache/refreshed"] == 3 / 23
    for world in (2, 3):
        for step in range(len(written)):
            assert sorted(refreshed[world, step]) == sorted(refreshed[1, step]), (world, step)
        state = {k: torch.cat([r[0][k] for r in results[world]]) for k in ref_state}
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state), world
        for rank in range(world):  # every process logs the global values
            for (_, logs), (_, ref) in zip(results[world][rank][1], ref_logs, strict=True):
                assert logs.keys() == ref.keys()
                assert logs == pytest.approx(ref, rel=1e-6), (world, rank)  # float32 sums


def test_sce_buckets_are_built_from_the_same_centres_and_queries_on_every_process(monkeypatch):
    """cache_candidates=sce: the centre generator is seeded by (seed, step) only, and every process buckets
    the same gathered queries (global query ids), so the buckets are the same on every process."""
    import dualenc.negcache.draw as draw

    seen = []
    real = draw.scan_candidates

    def spy(table, queries, scale, *, generator, query_ids, **kw):
        seen.append((kw["key"].step, generator.initial_seed(), queries.clone(), query_ids.tolist()))
        return real(table, queries, scale, generator=generator, query_ids=query_ids, **kw)

    monkeypatch.setattr(draw, "scan_candidates", spy)
    table, q_emb = _table(40, 8, seed=7), torch.randn(6, 8, generator=torch.Generator().manual_seed(8))

    def run(acc):
        cache = _simulated_cache(acc, table, cache_candidates="sce", num_cache_negatives=2)
        mine = slice(2 * acc.process_index, 2 * acc.process_index + 2)
        for step in (0, 1):
            cache.sample(
                q_emb[mine],
                torch.zeros(2),
                torch.full((2, 1), -1),
                torch.tensor([0, 1]),
                torch.tensor(2.0),
                step,
                cross_device=True,
            )

    run_processes(3, run)
    for step in (0, 1):
        calls = [c for c in seen if c[0] == step]
        assert len(calls) == 3 and len({c[1] for c in calls}) == 1, step  # one seed for all processes
        assert all(torch.equal(c[2], q_emb) and c[3] == list(range(6)) for c in calls)
    assert seen[0][1] != next(c[1] for c in seen if c[0] == 1)  # a new step draws new centres
