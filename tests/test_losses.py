"""Losses over embeddings: in-batch CE vs brute force, the negative-cache loss vs the reference fixtures
and vs full-softmax CE (value and gradient)."""

from __future__ import annotations

import math

import pytest
import torch

from dualenc.losses.base import CacheTerms, LossInputs, false_negative_mask
from dualenc.losses.cached import CachedCE, reference_surrogate
from dualenc.losses.inbatch import InBatchCE


def call(loss, q, d, *, targets, mask=None, **cache):
    """Call a loss through its one contract, ``loss(LossInputs)``; keyword cache terms become CacheTerms."""
    return loss(LossInputs(q, d, targets, mask, CacheTerms(**cache) if cache else None))


def brute_force_ce(q, d, targets, mask, scale):
    """Oracle: per-query -log softmax written out with Python loops."""
    total = 0.0
    for i in range(q.shape[0]):
        logits = [scale * float(q[i] @ d[j]) for j in range(d.shape[0]) if mask is None or not mask[i, j]]
        pos = scale * float(q[i] @ d[targets[i]])
        total += -pos + math.log(sum(math.exp(v) for v in logits))
    return total / q.shape[0]


def test_inbatch_ce_matches_brute_force():
    torch.manual_seed(0)
    q, d = torch.randn(4, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    targets = torch.tensor([0, 3, 6, 9])
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[1, 4] = mask[2, 0] = True
    for m in (None, mask):
        out = call(InBatchCE(temperature=0.5), q, d, targets=targets, mask=m)
        assert float(out.loss) == pytest.approx(brute_force_ce(q, d, targets, m, 2.0), abs=1e-6)
    out = call(InBatchCE(), q, d, targets=targets, mask=mask)
    assert float(out.logs["num_negatives"]) == pytest.approx((11 * 4 - 2) / 4)


def test_inbatch_ce_refuses_masking_a_target():
    q, d = torch.randn(2, 4), torch.randn(4, 4)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    with pytest.raises(ValueError, match="own positive"):
        call(InBatchCE(), q, d, targets=torch.tensor([0, 2]), mask=mask)


def test_learned_temperature_gradient_matches_autograd_of_the_formula():
    torch.manual_seed(1)
    q, d = torch.randn(3, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    targets = torch.tensor([0, 2, 4])
    loss_fn = InBatchCE(temperature=0.2, learn_temperature=True).double()
    call(loss_fn, q, d, targets=targets).loss.backward()
    log_scale = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
    reference = torch.nn.functional.cross_entropy(log_scale.exp() * (q @ d.T), targets)
    (grad,) = torch.autograd.grad(reference, log_scale)
    assert float(loss_fn.temperature.log_scale.grad) == pytest.approx(float(grad), rel=1e-10)


def test_a_fixed_temperature_is_used_as_given_and_a_learned_one_is_capped():
    """τ = 0.005 fixed scales by 200 (no silent cap); a learned scale is clamped at 100 and starts below."""
    from dualenc.losses.base import MAX_SCALE, Temperature

    assert float(Temperature(0.005)()) == pytest.approx(200.0)
    learned = Temperature(0.02, learn=True)
    with torch.no_grad():
        learned.log_scale.fill_(math.log(500.0))  # as if training had pushed it past the cap
    assert float(learned()) == MAX_SCALE
    with pytest.raises(ValueError, match="a learned temperature must start at >= 0.01, got 0.005"):
        Temperature(0.005, learn=True)


def test_false_negative_mask_matches_a_loop():
    doc_idx = torch.tensor([5, 9, 5, 2, 7, 9])
    positives = torch.tensor([[5, -1], [2, 9], [7, -1]])
    targets = torch.tensor([0, 3, 4])
    mask = false_negative_mask(doc_idx, positives, targets)
    for i in range(3):
        for j in range(6):
            expected = int(doc_idx[j]) in [p for p in positives[i].tolist() if p >= 0] and j != targets[i]
            assert bool(mask[i, j]) == expected


# ----------------------------------------------------- negative cache: the reference fixtures (Part B 1.7)

CACHE = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
QUERY = torch.tensor([[-1.0], [1.0], [3.0]], dtype=torch.float64)
POSITIVE = torch.tensor([[2.0], [2.0], [1.0]], dtype=torch.float64)
RETRIEVED = torch.tensor([0, 1, 0])
P_POS = torch.tensor([0.0420101, 0.705385, 0.499381], dtype=torch.float64)


def cached_loss_per_example(q, pos, cache, neg, scale=1.0, inbatch=False):
    """CachedCE on each example alone (the reference reports per-example values)."""
    values = []
    loss_fn = CachedCE(temperature=1.0 / scale, inbatch=inbatch).double()
    for i in range(q.shape[0]):
        rest_lse = torch.logsumexp(scale * (q[i : i + 1] @ cache.T), dim=1)  # (1,)
        out = call(
            loss_fn,
            q[i : i + 1],
            pos[i : i + 1],
            targets=torch.tensor([0]),
            mask=None,
            neg_emb=neg[i : i + 1, None],
            neg_weight=torch.ones(1, 1),
            rest_lse=rest_lse,
        )
        values.append(out.loss)
    return torch.stack(values)


def reference_setting_loss(q, pos, neg, rest_lse):
    """CachedCE as the reference trains: no in-batch negatives, one sampled negative per query (weight 1)."""
    return call(
        CachedCE(inbatch=False).double(),
        q,
        pos,
        targets=torch.arange(q.shape[0]),
        neg_emb=neg[:, None],
        neg_weight=torch.ones(q.shape[0], 1),
        rest_lse=rest_lse,
    )


def test_interpretable_loss_fixture():
    values = cached_loss_per_example(QUERY, POSITIVE, CACHE, CACHE[RETRIEVED])
    torch.testing.assert_close(
        values, torch.tensor([3.169846, 0.349012, 0.694385], dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(torch.exp(-values), P_POS, atol=2e-6, rtol=0)  # fixture has 6 decimals


def test_reference_surrogate_fixture_and_score_transform():
    for factor, scale in ((1.0, 1.0), (2.0, 0.25)):  # embeddings x2 and score_transform 0.25x: same losses
        s_pos = scale * (factor * QUERY * factor * POSITIVE).sum(1)
        s_neg = scale * (factor * QUERY * factor * CACHE[RETRIEVED]).sum(1)
        cache_scores = scale * (factor * QUERY) @ (factor * CACHE).T
        training, interpretable = reference_surrogate(s_pos, s_neg, cache_scores)
        expected = (1 - P_POS) * torch.tensor([1.0, -3.0, 0.0], dtype=torch.float64)
        torch.testing.assert_close(training, expected, atol=5e-6, rtol=0)
        torch.testing.assert_close(interpretable, -torch.log(P_POS), atol=1e-5, rtol=0)
        values = cached_loss_per_example(
            factor * QUERY, factor * POSITIVE, factor * CACHE, factor * CACHE[RETRIEVED], scale=scale
        )
        torch.testing.assert_close(values, interpretable, atol=1e-12, rtol=0)


def test_scalar_parameter_gradients_fixture():
    """Reference test: query scale a and doc scale b at 1.0 give d(mean loss)/d(a, b) = 0.024715006 each."""
    a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    q, pos, neg = a * QUERY, b * POSITIVE, b * CACHE[RETRIEVED]  # the doc tower re-encodes the negative
    rest_lse = torch.logsumexp(q @ CACHE.T, dim=1)  # stale cache scores
    out = reference_setting_loss(q, pos, neg, rest_lse)
    grads = torch.autograd.grad(out.loss, [a, b])
    # the fixture was computed in TF float32: 1e-6 absolute
    torch.testing.assert_close(
        torch.stack(grads), torch.tensor([0.024715006] * 2, dtype=torch.float64), atol=1e-6, rtol=0
    )
    # and the reference surrogate gives the same gradient (its value differs: only its gradient is meaningful)
    q, pos, neg = a * QUERY, b * POSITIVE, b * CACHE[RETRIEVED]
    training, _ = reference_surrogate((q * pos).sum(1), (q * neg).sum(1), q @ CACHE.T)
    ref_grads = torch.autograd.grad(training.mean(), [a, b])
    torch.testing.assert_close(torch.stack(grads), torch.stack(ref_grads), atol=1e-12, rtol=0)


def test_p_pos_and_cache_get_no_gradient_sampled_and_positive_do():
    q = QUERY.clone().requires_grad_(True)
    pos, neg = POSITIVE.clone().requires_grad_(True), CACHE[RETRIEVED].clone().requires_grad_(True)
    cache = CACHE.clone().requires_grad_(True)
    rest_lse = torch.logsumexp(q @ cache.T, dim=1)
    out = reference_setting_loss(q, pos, neg, rest_lse)
    out.loss.backward()
    assert cache.grad is None  # stale embeddings are constants
    assert pos.grad is not None and neg.grad is not None and q.grad is not None
    # gradient of the positive score is -(1 - p+)/B: p+ itself is not differentiated
    torch.testing.assert_close(pos.grad[:, 0], -(1 - P_POS) * QUERY[:, 0] / 3, atol=5e-6, rtol=0)


# ------------------------------------------------------------ A4: exactness against full softmax CE


def _linear_setup(seed=0, num_queries=3, num_docs=9, dim=4):
    torch.manual_seed(seed)
    wq = torch.randn(dim, dim, dtype=torch.float64, requires_grad=True)  # linear query tower
    wd = torch.randn(dim, dim, dtype=torch.float64, requires_grad=True)  # linear doc tower
    qx = torch.randn(num_queries, dim, dtype=torch.float64)
    dx = torch.randn(num_docs, dim, dtype=torch.float64)
    return wq, wd, qx, dx


@pytest.mark.parametrize("inbatch", [True, False])
def test_fresh_cache_with_enumerated_expectation_equals_full_softmax(inbatch):
    """Cache = whole corpus, fresh, E over q_R enumerated: value and gradient = full softmax CE."""
    wq, wd, qx, dx = _linear_setup()
    scale, batch_docs = 2.0, [0, 1, 2]  # documents 0..2 are the batch (query i's positive is doc i)
    q, d = qx @ wq, dx @ wd  # (3, D), (9, D)
    full = torch.nn.functional.cross_entropy(scale * q @ d.T, torch.arange(3))
    full_grads = torch.autograd.grad(full, [wq, wd])

    q, d = qx @ wq, dx @ wd
    stale = d.detach()  # fresh cache: equal to the live embeddings
    if inbatch:
        rest = [j for j in range(9) if j not in batch_docs]
        mask = None
    else:  # without the in-batch part the other queries' positives live in R
        rest = None
    rows = []
    for i in range(3):
        r = rest if inbatch else [j for j in range(9) if j != i]
        rows.append(r)
    rest_idx = torch.tensor(rows)  # (3, |R|)
    stale_scores = scale * torch.einsum("bd,brd->br", q.detach(), stale[rest_idx])  # (3, |R|)
    weights = stale_scores.softmax(dim=1)  # q_R, enumerated
    loss = call(
        CachedCE(temperature=1 / scale, inbatch=inbatch).double(),
        q,
        d[batch_docs],
        targets=torch.arange(3),
        mask=mask if inbatch else None,
        neg_emb=d[rest_idx],
        neg_weight=weights,
        rest_lse=torch.logsumexp(stale_scores, dim=1),
    ).loss
    grads = torch.autograd.grad(loss, [wq, wd])
    assert float(loss.detach()) == pytest.approx(float(full.detach()), abs=1e-12)
    for g, ref in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-12, rtol=0)


def test_empty_cache_is_plain_inbatch_ce():
    torch.manual_seed(2)
    q, d = torch.randn(4, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    targets = torch.arange(4) * 2
    cached = call(
        CachedCE(temperature=0.1).double(),
        q,
        d,
        targets=targets,
        mask=None,
        neg_emb=torch.zeros(4, 1, 6, dtype=torch.float64),
        neg_weight=torch.zeros(4, 1),
        rest_lse=torch.full((4,), float("-inf"), dtype=torch.float64),
    )
    plain = call(InBatchCE(temperature=0.1), q, d, targets=targets)
    assert float(cached.loss) == pytest.approx(float(plain.loss), abs=1e-12)


def test_monte_carlo_gradient_converges_to_the_full_gradient():
    """Oracle 3: averaging n sampled-negative gradients approaches the full gradient at rate ~1/sqrt(n)."""
    wq, wd, qx, dx = _linear_setup(seed=3, num_queries=2, num_docs=12)
    scale = 1.5
    q, d = qx @ wq, dx @ wd
    full = torch.nn.functional.cross_entropy(scale * q @ d.T, torch.arange(2))
    full_grad = torch.cat([g.flatten() for g in torch.autograd.grad(full, [wq, wd])])
    rest = torch.tensor([[j for j in range(12) if j != i] for i in range(2)])  # no in-batch part
    generator = torch.Generator().manual_seed(0)
    errors = {}
    for n in (16, 1024):
        q, d = qx @ wq, dx @ wd
        stale = scale * torch.einsum("bd,brd->br", q.detach(), d.detach()[rest])  # (2, 11)
        draws = torch.multinomial(stale.softmax(1), n, replacement=True, generator=generator)  # (2, n)
        loss = call(
            CachedCE(temperature=1 / scale, inbatch=False).double(),
            q,
            d[:2],
            targets=torch.arange(2),
            mask=None,
            neg_emb=d[rest.gather(1, draws)],
            neg_weight=torch.full((2, n), 1.0 / n, dtype=torch.float64),
            rest_lse=torch.logsumexp(stale, 1),
        ).loss
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [wq, wd])])
        errors[n] = float((grad - full_grad).norm() / full_grad.norm())
    assert errors[1024] < errors[16] / 3  # sqrt(64) = 8 in expectation; 3 leaves room for noise
    assert errors[1024] < 0.1
