"""Scalable CE (dualenc/losses/sce.py) against dense references (dualenc/losses/dense.py): ALGORITHMS.md
Part B 4, oracles 12-17."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_script
from torch.testing import assert_close

from dualenc.errors import InputError
from dualenc.losses.dense import blockwise_topk, full_ce
from dualenc.losses.sce import ScalableCE, bucketed_ce, default_bucket_count

F64 = torch.float64


def make(n: int = 12, c: int = 30, d: int = 6, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, d, generator=g, dtype=F64)).requires_grad_()  # (N, D)
    w = torch.randn(c, d, generator=g, dtype=F64).requires_grad_()  # (C, D)
    return x, w, torch.randint(0, c, (n,), generator=g)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_rows(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row CE written out: log sum_c exp <x_i, w_c> - <x_i, w_y>, (N,)."""
    logits = x @ w.T  # (N, C)
    return torch.log(torch.exp(logits).sum(1)) - logits.gather(1, targets[:, None])[:, 0]


def grads(loss: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, leaves)


def test_full_ce_matches_hand_formula_and_blocks():
    x, w, t = make()
    mask = torch.arange(12) % 4 != 0
    ref = dense_rows(x, w, t)[mask].mean()
    assert_close(full_ce(x, w, t, mask=mask), ref)
    ref_g = grads(ref, x, w)
    for block in (1, 5, 12, 50):
        assert_close(grads(full_ce(x, w, t, mask=mask, block_size=block), x, w), ref_g)


@pytest.mark.parametrize("mix", [False, True])
@pytest.mark.parametrize("n_b", [1, 3])
def test_full_coverage_equals_full_ce(mix, n_b):  # oracle 12 (and 16: coverage = 1)
    x, w, t = make()
    ref = full_ce(x, w, t)
    out = ScalableCE(n_b, 12, 30, mix=mix)(x, w, t, generator=gen(1))
    assert_close(out.loss, ref)
    assert_close(grads(out.loss, x, w), grads(ref, x, w))
    assert out.logs["coverage"].item() == 1.0 and out.logs["ce_rows"].item() == 12


def _rows_for(module: ScalableCE, x, w, t, seed: int):
    buckets = module.assign(
        x, w, torch.ones(len(t), dtype=torch.bool), module.n_buckets, module.bucket_size_x, gen(seed)
    )
    return buckets, *bucketed_ce(x, w, t, buckets.rows, buckets.items)


@pytest.mark.parametrize("mix", [False, True])
def test_lower_bound_and_monotone_in_b_y(mix):  # oracle 13
    x, w, t = make(n=16, c=40)
    ce_rows = dense_rows(x, w, t).detach()
    previous = None
    for b_y in (1, 2, 5, 10, 20, 39, 40):
        module = ScalableCE(4, 5, b_y, mix=mix)
        _, row_loss, covered = _rows_for(module, x, w, t, seed=3)
        row_loss = row_loss.detach()
        assert (row_loss >= 0).all()
        assert (row_loss[covered] <= ce_rows[covered] + 1e-12).all()
        if previous is not None:
            assert (row_loss >= previous - 1e-12).all()
        previous = row_loss
        # forward (same seed) is the mean of these rows over the covered ones
        assert_close(module(x, w, t, generator=gen(3)).loss, row_loss[covered].mean())
        if b_y == 1:
            assert (row_loss[covered] < ce_rows[covered] - 1e-3).any()  # the bound is not trivially tight
    assert_close(previous[covered], ce_rows[covered])  # b_y = C: every covered row has its exact CE


def test_no_double_positive():  # oracle 14
    x, w, t = make(n=3, c=10)
    t = torch.tensor([4, 7, 1])
    rows = torch.tensor([[0, 1]])  # one bucket: rows 0 and 1
    items = torch.tensor([[4, 2, 9]])  # contains row 0's target 4, not row 1's target 7
    row_loss, covered = bucketed_ce(x, w, t, rows, items)
    z = (x @ w.T).detach()  # (3, 10)
    expect0 = torch.logsumexp(z[0, [4, 2, 9]], 0) - z[0, 4]  # positive counted once
    expect1 = torch.logsumexp(z[1, [2, 9, 4, 7]], 0) - z[1, 7]
    assert_close(row_loss[:2].detach(), torch.stack([expect0, expect1]))
    double = torch.logsumexp(z[0, [4, 4, 2, 9]], 0) - z[0, 4]
    assert (row_loss[0] - double).abs() > 1e-3  # the unmasked version would differ
    assert covered.tolist() == [True, True, False] and row_loss[2].item() == 0.0


def test_gradient_sparsity_and_max_bucket_gradient():  # oracle 15
    x, w, t = make(n=10, c=40)
    module = ScalableCE(3, 4, 5)
    buckets, row_loss, covered = _rows_for(module, x, w, t, seed=5)
    loss = module(x, w, t, generator=gen(5)).loss
    gx, gw = grads(loss, x, w)
    # hand gradient of the logits: (softmax - onehot) / #covered over the max bucket's items + the positive
    logit_grad = torch.zeros(10, 40, dtype=F64)
    z = (x @ w.T).detach()
    for i in covered.nonzero()[:, 0].tolist():
        in_bucket = (buckets.rows == i).any(1).nonzero()[:, 0]
        cand = [sorted(set(buckets.items[k].tolist()) | {int(t[i])}) for k in in_bucket]
        losses = [torch.logsumexp(z[i, c], 0) - z[i, t[i]] for c in cand]
        best = cand[int(torch.stack(losses).argmax())]
        logit_grad[i, best] = torch.softmax(z[i, best], 0)
        logit_grad[i, t[i]] -= 1.0
    logit_grad /= covered.sum()
    assert_close(gx, logit_grad @ w.detach())
    assert_close(gw, logit_grad.T @ x.detach())
    touched = torch.zeros(40, dtype=torch.bool)
    touched[buckets.items.reshape(-1)] = True
    touched[t[covered]] = True
    assert (gw[~touched] == 0).all() and (~touched).sum() > 0
    assert (gx[~covered] == 0).all() and (~covered).sum() > 0


def test_padding_rows_and_pad_item():  # oracle 16
    x, w, t = make(n=12, c=30)
    mask = torch.arange(12) >= 4  # rows 0-3 are padding, with huge vectors and -100 targets
    with torch.no_grad():
        x[:4] *= 1e3
    t = t.masked_fill(~mask, -100)
    for seed in range(20):
        rows = ScalableCE(bucket_size_y=5).assign(x, w, mask, 5, 8, gen(seed)).rows
        assert (rows >= 4).all()
    ref = full_ce(x, w, t, mask=mask)
    ref_grads = grads(ref, x, w)
    for b_x in (8, 12):  # 12 > 8 real rows: pads fill the bucket but never count
        out = ScalableCE(1, b_x, 30)(x, w, t, mask=mask, generator=gen(0))
        assert_close(out.loss, ref)
        assert_close(grads(out.loss, x, w), ref_grads)
        assert out.logs["coverage"].item() == 1.0 and out.logs["ce_rows"].item() == 8
    # pad item 3: never selected; mask defaults to targets != pad_item; full coverage = CE without column 3
    t2 = torch.where(mask, t, 3).masked_fill(mask & (t == 3), 0)
    module = ScalableCE(1, 8, 29, pad_item=3)
    for seed in range(10):
        assert (module.assign(x, w, mask, 4, 8, gen(seed)).items != 3).all()
    keep = torch.arange(30) != 3
    remap = torch.cumsum(keep.long(), 0) - 1
    ref2 = full_ce(x, w[keep], remap[t2.clamp(min=0)], mask=mask)
    assert_close(module(x, w, t2, generator=gen(0)).loss, ref2)


def test_default_sizes_and_all_pad_batch():
    # the official default int(2 sqrt(N)), at least 1
    assert [default_bucket_count(n) for n in (0, 1, 9, 10, 2600)] == [1, 2, 6, 6, 101]
    x, w, t = make(n=16, c=300)
    out = ScalableCE()(x, w, t, mask=torch.arange(16) < 9, generator=gen(0))
    assert [out.logs[k].item() for k in ("n_buckets", "bucket_size_x", "bucket_size_y")] == [6, 6, 256]
    tiny = ScalableCE(bucket_size_y=5)(x, w, t, mask=torch.arange(16) < 1, generator=gen(0))
    assert tiny.logs["bucket_size_x"].item() == 1 and tiny.logs["coverage"].item() == 1.0  # b_x clamped to N
    empty = ScalableCE(bucket_size_y=5)(x, w, t, mask=torch.zeros(16, dtype=torch.bool))
    assert empty.loss.item() == 0.0 and empty.logs["coverage"].item() == 0.0
    assert all((g == 0).all() for g in grads(empty.loss, x, w))


def test_covered_row_with_exactly_zero_loss_counts():
    x = torch.tensor([[50.0, 0.0], [0.1, 0.2]], requires_grad=True)  # row 0: positive beats all by 50 nats
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([0, 1])
    row_loss, covered = bucketed_ce(x, w, t, torch.tensor([[0, 1]]), torch.arange(3)[None])
    assert row_loss[0].item() == 0.0 and covered.all()  # fp32 loss is exactly 0 yet the row is covered
    out = ScalableCE(1, 2, 3)(x, w, t, generator=gen(0))
    assert out.logs["ce_rows"].item() == 2
    assert_close(out.loss, row_loss[1] / 2)


def test_mix_centres_in_row_space():  # oracle 17
    g = gen(0)
    real = torch.randn(14, 3, generator=g, dtype=F64) @ torch.randn(3, 8, generator=g, dtype=F64)  # rank 3
    x = torch.cat([real, torch.randn(6, 8, generator=g, dtype=F64)])  # 6 full-rank pad rows
    mask = torch.arange(20) < 14
    w = torch.randn(30, 8, generator=g, dtype=F64)
    rank = torch.linalg.matrix_rank
    mixed = ScalableCE(mix=True, bucket_size_y=4).assign(x, w, mask, 5, 4, gen(1)).centres
    assert rank(real).item() == 3 and rank(torch.cat([real, mixed])).item() == 3
    gauss = ScalableCE(bucket_size_y=4).assign(x, w, mask, 5, 4, gen(1)).centres
    assert rank(torch.cat([real, gauss])).item() == 8


@pytest.mark.parametrize("mix", [False, True])
def test_determinism_under_fixed_generator(mix):  # oracle 17
    x, w, t = make(n=20, c=50)
    module = ScalableCE(3, 4, 6, mix=mix)
    a, b = module(x, w, t, generator=gen(7)).loss, module(x, w, t, generator=gen(7)).loss
    assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(grads(a, x, w), grads(b, x, w), strict=True))
    ones = torch.ones(20, dtype=torch.bool)
    r7, r8 = (module.assign(x, w, ones, 3, 4, gen(s)) for s in (7, 8))
    assert not torch.equal(r7.rows, r8.rows) and not torch.equal(r7.items, r8.items)


@pytest.mark.parametrize("block_size", [1, 3, 7, 50, 1000])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_blockwise_topk_equals_dense_topk(block_size, with_exclude):
    g = gen(0)
    q, table = torch.randn(4, 5, generator=g, dtype=F64), torch.randn(50, 5, generator=g, dtype=F64)
    exclude = (torch.arange(50) % 6 == 0) if with_exclude else None
    dense = q @ table.T  # (4, 50)
    if with_exclude:
        dense[:, exclude] = float("-inf")
    ref_val, ref_idx = torch.topk(dense, 5, dim=1)
    val, idx = blockwise_topk(q, table, 5, block_size=block_size, exclude=exclude)
    assert torch.equal(idx, ref_idx)
    assert_close(val, ref_val)


# argument validation: one test per error
def test_error_dim_mismatch():
    x, w, t = make()
    with pytest.raises(InputError, match="dimension mismatch"):
        ScalableCE(1, 2, 3)(x, w[:, :4], t)


def test_error_target_out_of_range():
    x, w, t = make()
    with pytest.raises(InputError, match="target 30 is outside"):
        ScalableCE(1, 2, 3)(x, w, t.index_fill(0, torch.tensor([2]), 30))


def test_error_mask_not_bool():
    x, w, t = make()
    with pytest.raises(InputError, match="mask must be a bool"):
        ScalableCE(1, 2, 3)(x, w, t, mask=torch.ones(12))


def test_error_explicit_b_x_above_n():
    x, w, t = make()
    with pytest.raises(InputError, match="bucket_size_x=13 exceeds"):
        ScalableCE(1, 13, 3)(x, w, t)


def test_error_b_y_above_c():
    x, w, t = make()
    with pytest.raises(InputError, match="bucket_size_y=31 exceeds the 30 selectable"):
        ScalableCE(1, 2, 31)(x, w, t)


def test_error_b_y_counts_pad_item():
    x, w, t = make()
    with pytest.raises(InputError, match="bucket_size_y=30 exceeds the 29 selectable"):
        ScalableCE(1, 2, 30, pad_item=0)(x, w, t.clamp(min=1))


def test_error_bad_bucket_count():
    with pytest.raises(InputError, match="n_buckets must be a positive integer"):
        ScalableCE(0)


def test_error_pad_item_out_of_range():
    x, w, t = make()
    with pytest.raises(InputError, match="pad_item=30 is outside"):
        ScalableCE(1, 2, 3, pad_item=30)(x, w, t)


def test_error_real_row_targets_pad_item():
    x, w, t = make()
    with pytest.raises(InputError, match="has the pad item 5"):
        ScalableCE(1, 2, 3, pad_item=5)(x, w, t.fill_(5), mask=torch.ones(12, dtype=torch.bool))


def test_error_topk_k_too_large():
    with pytest.raises(InputError, match=r"k=5 must be in \[1, 4\]"):
        blockwise_topk(torch.randn(2, 3), torch.randn(5, 3), 5, exclude=torch.arange(5) == 0)


def test_error_full_ce_block_size():
    x, w, t = make()
    with pytest.raises(InputError, match="block_size must be >= 1"):
        full_ce(x, w, t, block_size=0)


def test_loss_memory_bench_quick(tmp_path: Path):
    bench = load_script("bench/loss_memory.py")
    out = tmp_path / "res.json"
    bench.main(["--quick", "--losses", "ce", "sce", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"config", "machine", "memory_method", "rows"} <= result.keys()
    assert {"platform", "cpu_count", "torch"} <= result["machine"].keys()
    rows = {r["loss"]: r for r in result["rows"]}
    assert rows.keys() == {"ce", "sce"} and all(r["status"] == "ok" for r in rows.values())
    assert {"peak_mib", "time_ms", "mem_ratio_vs_ce", "time_ratio_vs_ce"} <= rows["sce"].keys()
    assert rows["ce"]["peak_mib"] > 0 and 0 <= rows["sce"]["rel_err_vs_ce"] < 1
    skipped = bench.main(["--quick", "--losses", "ce", "--max-gib", "0", "--out", str(out)])
    assert skipped["rows"][0]["status"] == "skipped"
