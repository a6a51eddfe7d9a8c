"""Sampled baselines (dualenc/losses/sampled.py) and their samplers (dualenc/losses/uniform_negatives.py):
ALGORITHMS.md Part B 2.4 and oracle 19."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dualenc.errors import InputError
from dualenc.losses.sampled import bce_loss, ce_minus_loss, gbce_beta, gbce_loss, gbce_positive_logit
from dualenc.losses.uniform_negatives import sample_uniform, sample_unseen

F64 = torch.float64
# upper 0.999 quantiles of chi-square (scipy.stats.chi2.ppf(0.999, df)), so a fair sampler fails 1 run in 1000
CHI2_999 = {9: 27.877, 35: 66.619}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(n: int = 8, c: int = 20, d: int = 5, seed: int = 0):
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=F64).requires_grad_()
    w = torch.randn(c, d, generator=g, dtype=F64).requires_grad_()
    return x, w, torch.randint(0, c, (n,), generator=g)


def chi2(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sample_unseen_rules():
    history = torch.tensor([[1, 3, 3, -1, 50], [0, 9, 5, 2, 2]])  # -1 and 50 (>= C) are padding
    for num_items, n in ((12, 7), (40, 3), (5000, 40)):  # the dense-key branch and the oversampling branch
        for seed in range(5):
            neg = sample_unseen(history, num_items, n, gen(seed), pad_item=11)
            assert neg.shape == (2, n) and neg.min() >= 0 and neg.max() < num_items
            for row, hist in zip(neg.tolist(), history.tolist(), strict=True):
                assert len(set(row)) == n and not set(row) & (set(hist) | {11})


def test_sample_unseen_takes_every_allowed_item_when_n_is_all():
    history = torch.tensor([[4, 0, 7], [1, 1, 1]])
    neg = sample_unseen(history, 9, 5, gen(0), pad_item=8)
    assert sorted(neg[0].tolist()) == [1, 2, 3, 5, 6]
    with pytest.raises(InputError, match="num_negatives=7 exceeds the 5 items"):
        sample_unseen(history, 9, 7, gen(0), pad_item=8)


@pytest.mark.parametrize(("num_items", "n", "df"), [(7, 2, 9), (11, 2, 35)])  # 5 or 9 allowed items
def test_sample_unseen_subsets_are_uniform(num_items, n, df):
    draws = 20 * (df + 1) * 50
    history = torch.tensor([[0, num_items - 1]]).expand(draws, 2)  # same history on every row
    neg = sample_unseen(history, num_items, n, gen(1))
    allowed = list(range(1, num_items - 1))
    index = {pair: k for k, pair in enumerate(itertools.combinations(allowed, n))}
    assert len(index) == df + 1
    keys = torch.tensor([index[tuple(sorted(r))] for r in neg.tolist()])
    assert chi2(torch.bincount(keys, minlength=df + 1).double()) < CHI2_999[df]


def test_sample_uniform_with_replacement():
    neg = sample_uniform(4000, 6, 3, gen(0), pad_item=2)
    assert neg.shape == (4000, 3) and set(neg.unique().tolist()) == {0, 1, 3, 4, 5}
    counts = torch.bincount(neg.reshape(-1), minlength=6).double()[[0, 1, 3, 4, 5]]
    assert chi2(counts) < 18.467  # chi2.ppf(0.999, 4)
    assert (neg[:, 0] == neg[:, 1]).any()  # with replacement: repeats within a row happen
    assert torch.equal(neg, sample_uniform(4000, 6, 3, gen(0), pad_item=2))


def test_bce_one_negative_is_the_sasrec_loss():  # oracle 19
    x, w, t = make()
    mask = torch.arange(8) != 3
    neg = sample_unseen(t[:, None], 20, 1, gen(2))  # (N, 1)
    s_pos = (x * w[t]).sum(1)[mask]
    s_neg = (x * w[neg[:, 0]]).sum(1)[mask]
    # Kang & McAuley's SASRec: BCE(pos, 1) + BCE(neg, 0), each averaged over non-pad positions
    sasrec = F.binary_cross_entropy_with_logits(s_pos, torch.ones_like(s_pos))
    sasrec = sasrec + F.binary_cross_entropy_with_logits(s_neg, torch.zeros_like(s_neg))
    ours = bce_loss(x, w, t.masked_fill(~mask, -100), neg, mask=mask)
    assert_close(2 * ours, sasrec)  # the SCE code averages the 1 + n terms: half of SASRec's sum
    assert_close(torch.autograd.grad(2 * ours, (x, w)), torch.autograd.grad(sasrec, (x, w)))


def test_gbce_t0_is_bce_and_t1_has_beta_alpha():  # oracle 19
    x, w, t = make()
    neg = sample_uniform(8, 20, 4, gen(3))
    assert gbce_beta(4, 20, 0.0) == 1.0
    assert math.isclose(gbce_beta(4, 20, 1.0), 4 / 19)
    g0, b = gbce_loss(x, w, t, neg, t=0.0), bce_loss(x, w, t, neg)
    assert_close(g0, b)
    assert_close(torch.autograd.grad(g0, (x, w)), torch.autograd.grad(b, (x, w)))
    # t = 1 against the formula written out: positive probability sigma(s)^alpha, BCE on its logit
    beta = 4 / 19
    s_pos = (x * w[t]).sum(1)
    s_neg = torch.einsum("nd,nkd->nk", x, w[neg])
    logit = torch.log(1 / (torch.sigmoid(s_pos) ** (-beta) - 1))
    terms = torch.cat(
        [
            F.binary_cross_entropy_with_logits(logit, torch.ones(8, dtype=F64), reduction="none")[:, None],
            F.binary_cross_entropy_with_logits(s_neg, torch.zeros_like(s_neg), reduction="none"),
        ],
        1,
    )
    assert_close(gbce_loss(x, w, t, neg, t=1.0), terms.mean(1).mean())


def test_gbce_positive_logit_is_stable():
    mpmath = pytest.importorskip("mpmath")  # a torch dependency (via sympy)
    mpmath.mp.dps = 400  # sigma(700) = 1 - 1e-304: the naive formula needs ~320 digits
    s = torch.cat(
        [torch.linspace(-40, 40, 81, dtype=F64), torch.tensor([-700.0, -200, 19.9, 20.1, 200, 700])]
    )
    exact = [
        float(mpmath.log(1 / ((1 / (1 + mpmath.exp(-mpmath.mpf(v)))) ** mpmath.mpf(-0.3) - 1)))
        for v in s.tolist()
    ]
    assert_close(gbce_positive_logit(s, 0.3), torch.tensor(exact, dtype=F64), rtol=1e-12, atol=1e-12)
    extreme = torch.tensor([-200.0, -60.0, 60.0, 200.0], requires_grad=True)  # fp32
    logit = gbce_positive_logit(extreme, 0.3)
    (grad,) = torch.autograd.grad(logit.sum(), extreme)
    assert torch.isfinite(logit).all() and torch.isfinite(grad).all()
    assert torch.isinf(torch.log(1 / (torch.sigmoid(extreme) ** (-0.3) - 1))).any()  # the naive form breaks


def test_ce_minus_with_every_unseen_item_is_ce_over_unseen():  # oracle 19
    x, w, _ = make(n=6, c=12)
    t = torch.tensor([3, 5, 5, 0, 8, 2])  # two sequences of three rows
    history = torch.tensor([[3, 5, 9], [0, 8, 2]])
    neg = sample_unseen(history, 12, 9, gen(4))  # (S, 9): all 9 unseen items of each sequence
    z = (x @ w.T).detach()
    expect = []
    for i in range(6):
        unseen = [c for c in range(12) if c not in history[i // 3].tolist()]
        expect.append(torch.logsumexp(z[i, [int(t[i])] + unseen], 0) - z[i, t[i]])
    mask = torch.tensor([True, True, False, True, True, True])
    loss = ce_minus_loss(x, w, t, neg, mask=mask)
    assert_close(loss, torch.stack(expect)[mask].mean())
    per_row = ce_minus_loss(x, w, t, neg.repeat_interleave(3, dim=0), mask=mask)  # same sets given per row
    assert_close(torch.autograd.grad(loss, (x, w)), torch.autograd.grad(per_row, (x, w)))


def test_pad_rows_do_not_count():
    x, w, t = make()
    neg = sample_uniform(8, 20, 3, gen(5))
    mask = torch.arange(8) < 5
    for fn in (bce_loss, gbce_loss, ce_minus_loss):
        padded = fn(x, w, t.masked_fill(~mask, -100), neg, mask=mask)
        assert_close(padded, fn(x[:5], w, t[:5], neg[:5]))


def test_error_negatives_out_of_range():
    x, w, t = make()
    with pytest.raises(InputError, match=r"negative indices must lie in \[0, C\)"):
        bce_loss(x, w, t, torch.full((8, 2), 20))


def test_error_negatives_rows():
    x, w, t = make()
    with pytest.raises(InputError, match="negatives has 3 rows"):
        ce_minus_loss(x, w, t, torch.zeros(3, 2, dtype=torch.long))


def test_error_gbce_t_out_of_range():
    x, w, t = make()
    with pytest.raises(InputError, match="gBCE needs t in"):
        gbce_loss(x, w, t, torch.zeros(8, 2, dtype=torch.long), t=1.5)


def test_error_history_dtype():
    with pytest.raises(InputError, match="history must be a 2-D integer tensor"):
        sample_unseen(torch.zeros(2, 3), 10, 2)
