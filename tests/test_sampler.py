"""Gumbel-max sampling (ALGORITHMS.md A3; Part B §4 oracles 1, 9, 11).

Oracles: closed-form softmax / sequential-without-replacement probabilities (chi-square goodness of fit with a
fixed seed; the p-value is the regularised upper incomplete gamma function), logsumexp of the concatenated
scores, the Negative Cache reference fixtures of Part B 1.7, and hand-computed staleness values.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dualenc import sampler
from dualenc.sampler import (
    choose_shards,
    combine_lse,
    gumbel_max_sample,
    gumbel_noise,
    staleness,
    two_stage_sample,
)

SCORES = torch.tensor([1.0, 0.5, -1.0, 2.0, 0.0], dtype=torch.float64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness-of-fit p-value (df = cells - 1)."""
    counts, probs = counts.double(), probs.double()
    expected = counts.sum() * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def frequencies(draws: torch.Tensor, num_cells: int) -> torch.Tensor:
    return torch.bincount(draws.reshape(-1), minlength=num_cells)


# ------------------------------------------------------------------------------------------- oracle 1
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_gumbel_max_frequencies_are_softmax(scale: float) -> None:
    n = 400_000
    scores = (scale * SCORES).expand(n, -1)  # (n, 5): one draw per row
    draws = gumbel_max_sample(scores, 1, generator=gen(0))  # (n, 1)
    counts = frequencies(draws, 5)
    probs = torch.softmax(scale * SCORES, dim=0)
    assert chi2_pvalue(counts, probs) > 1e-3
    assert (counts / n - probs).abs().max() < 3e-3
    # the test has power: the same counts are rejected against a nearby wrong distribution
    assert chi2_pvalue(counts, torch.softmax(1.1 * scale * SCORES, dim=0)) < 1e-6


def test_with_replacement_draws_are_independent_softmax_draws() -> None:
    n = 100_000
    draws = gumbel_max_sample(SCORES.expand(n, -1), 2, generator=gen(1))  # (n, 2)
    probs = torch.softmax(SCORES, dim=0)
    pairs = frequencies(draws[:, 0] * 5 + draws[:, 1], 25)  # ordered pairs, product distribution
    assert chi2_pvalue(pairs, torch.outer(probs, probs).reshape(-1)) > 1e-3


def test_gumbel_top_m_is_sequential_sampling_without_replacement() -> None:
    logits = torch.tensor([0.3, -0.5, 1.2, 0.0], dtype=torch.float64)
    p = torch.softmax(logits, dim=0)
    pairs = [(i, j) for i, j in itertools.product(range(4), repeat=2) if i != j]
    exact = torch.tensor([float(p[i] * p[j] / (1 - p[i])) for i, j in pairs], dtype=torch.float64)
    assert math.isclose(float(exact.sum()), 1.0, rel_tol=1e-12)
    n = 200_000
    draws = gumbel_max_sample(logits.expand(n, -1), 2, generator=gen(2), replacement=False)  # (n, 2)
    assert bool((draws[:, 0] != draws[:, 1]).all())
    lookup = torch.full((16,), -1, dtype=torch.long)  # ordered pair code 4*i + j -> cell index
    for k, (i, j) in enumerate(pairs):
        lookup[4 * i + j] = k
    counts = frequencies(lookup[draws[:, 0] * 4 + draws[:, 1]], len(pairs))
    assert chi2_pvalue(counts, exact) > 1e-3
    # contrast: with replacement, repeated pairs (mass p_i^2) do occur
    repl = gumbel_max_sample(logits.expand(n, -1), 2, generator=gen(2), replacement=True)
    assert bool((repl[:, 0] == repl[:, 1]).any())


# ------------------------------------------------------------------------------------------- injected noise
def zeros_noise(shape, *, generator, device=None, dtype=torch.float32):
    return torch.zeros(shape, device=device, dtype=dtype)


def test_zero_noise_gives_argmax_and_top_m() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.0, -2.0, 5.0, 4.0]])  # (2, 4)
    with_repl = gumbel_max_sample(scores, 3, generator=None, noise_fn=zeros_noise)
    assert with_repl.tolist() == [[1, 1, 1], [2, 2, 2]]
    without = gumbel_max_sample(scores, 3, generator=None, replacement=False, noise_fn=zeros_noise)
    assert without.tolist() == [[1, 2, 0], [2, 3, 0]]


def test_crafted_noise_selects_a_chosen_column() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.0, -2.0, 5.0, 4.0]])  # (2, 4)

    def push_column_3(shape, *, generator, device=None, dtype=torch.float32):
        noise = torch.zeros(shape, device=device, dtype=dtype)
        noise[:, 3] = 100.0
        return noise

    assert gumbel_max_sample(scores, 2, generator=None, noise_fn=push_column_3).tolist() == [[3, 3], [3, 3]]
    # a masked column is never chosen, however large its noise
    masked = scores.clone()
    masked[:, 3] = float("-inf")
    drawn = gumbel_max_sample(masked, 1, generator=None, noise_fn=push_column_3)
    assert drawn.tolist() == [[1], [2]]


def test_noise_fn_receives_generator_device_and_dtype() -> None:
    seen = {}

    def spy(shape, *, generator, device=None, dtype=torch.float32):
        seen.update(shape=shape, generator=generator, device=device, dtype=dtype)
        return torch.zeros(shape, device=device, dtype=dtype)

    g = gen(0)
    gumbel_max_sample(torch.zeros(3, 7, dtype=torch.float64), 1, generator=g, noise_fn=spy)
    assert seen == {"shape": (3, 7), "generator": g, "device": torch.device("cpu"), "dtype": torch.float64}


# ------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("replacement", [True, False])
def test_masked_columns_never_drawn(replacement: bool) -> None:
    scores = torch.tensor([5.0, float("-inf"), 0.0, float("-inf"), -3.0, 1.0]).expand(20_000, -1)
    draws = gumbel_max_sample(scores, 3, generator=gen(3), replacement=replacement)  # (n, 3)
    assert bool((draws >= 0).all())
    assert not bool(torch.isin(draws, torch.tensor([1, 3])).any())
    assert set(draws.unique().tolist()) == {0, 2, 4, 5}  # every unmasked column does occur


def test_rows_with_too_few_finite_columns_give_minus_one() -> None:
    inf = float("-inf")
    scores = torch.tensor([[0.0, inf, 1.0, inf], [inf, inf, inf, inf], [inf, 2.0, inf, inf]])  # (3, 4)
    without = gumbel_max_sample(scores, 3, generator=gen(4), replacement=False)
    assert sorted(without[0, :2].tolist()) == [0, 2] and without[0, 2] == -1
    assert without[1].tolist() == [-1, -1, -1]
    assert without[2].tolist() == [1, -1, -1]
    with_repl = gumbel_max_sample(scores, 3, generator=gen(4), replacement=True)
    assert set(with_repl[0].tolist()) <= {0, 2}
    assert with_repl[1].tolist() == [-1, -1, -1]
    assert with_repl[2].tolist() == [1, 1, 1]
    # more draws than columns, and no columns at all
    assert gumbel_max_sample(torch.zeros(2, 2), 3, generator=gen(4), replacement=False)[:, 2].tolist() == [
        -1,
        -1,
    ]
    assert gumbel_max_sample(torch.zeros(2, 0), 2, generator=gen(4)).tolist() == [[-1, -1], [-1, -1]]


# ------------------------------------------------------------------------------------------- determinism, clamping
@pytest.mark.parametrize("replacement", [True, False])
def test_generator_determinism_and_global_rng_untouched(replacement: bool) -> None:
    scores = torch.randn(50, 30, generator=gen(9))
    state = torch.random.get_rng_state()
    a = gumbel_max_sample(scores, 4, generator=gen(123), replacement=replacement)
    b = gumbel_max_sample(scores, 4, generator=gen(123), replacement=replacement)
    c = gumbel_max_sample(scores, 4, generator=gen(124), replacement=replacement)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_is_finite_when_uniform_hits_zero_or_one(monkeypatch, dtype: torch.dtype) -> None:
    def extreme_rand(shape, *, generator=None, device=None, dtype=torch.float32):
        return torch.tensor([0.0, 1.0, 0.5], dtype=dtype, device=device).reshape(shape)

    monkeypatch.setattr(sampler.torch, "rand", extreme_rand)
    noise = gumbel_noise((3,), generator=None, dtype=dtype)
    assert bool(torch.isfinite(noise).all())
    assert noise[0] < noise[2] < noise[1]  # monotone in u
    assert math.isclose(float(noise[2]), -math.log(math.log(2.0)), rel_tol=1e-6)


def test_gumbel_noise_moments() -> None:
    g = gumbel_noise((400_000,), generator=gen(5), dtype=torch.float64)
    assert g.dtype == torch.float64
    euler_gamma = 0.5772156649015329
    assert abs(float(g.mean()) - euler_gamma) < 0.01
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.02


# ------------------------------------------------------------------------------------------- oracle 9: shards
def test_combine_lse_equals_logsumexp_of_concatenation() -> None:
    shards = [torch.randn(7, m, generator=gen(m)) for m in (3, 5, 1)]
    shards[1][2] = float("-inf")  # one query has no mass on shard 1
    lse = torch.stack([torch.logsumexp(s, dim=1) for s in shards])  # (3, 7)
    torch.testing.assert_close(
        combine_lse(lse), torch.logsumexp(torch.cat(shards, dim=1), dim=1), atol=1e-6, rtol=0
    )
    assert combine_lse(torch.full((3, 2), float("-inf"))).tolist() == [float("-inf")] * 2


def test_choose_shards_never_picks_empty_shards() -> None:
    inf = float("-inf")
    lse = torch.tensor([[0.0, inf], [inf, inf], [1.0, inf]])  # (P=3, Q=2)
    chosen = choose_shards(lse, 5000, generator=gen(6))  # (2, 5000)
    assert set(chosen[0].unique().tolist()) == {0, 2}
    assert chosen[1].unique().tolist() == [-1]
    frac = float((chosen[0] == 2).double().mean())
    assert abs(frac - 1 / (1 + math.exp(-1.0))) < 0.02


def test_two_stage_sample_matches_global_softmax() -> None:
    inf = float("-inf")
    shards = [
        torch.tensor([0.5, -1.0], dtype=torch.float64),
        torch.tensor([1.5, inf, 0.0], dtype=torch.float64),
        torch.tensor([-0.5, 1.0], dtype=torch.float64),
        torch.tensor([inf], dtype=torch.float64),  # a shard with no mass
    ]
    n = 100_000
    shard, column = two_stage_sample(
        [s.expand(n, -1) for s in shards],
        2,
        generators=[gen(10 + p) for p in range(4)],
        home_generator=gen(20),
    )  # (n, 2), (n, 2)
    offsets = torch.tensor([0, 2, 5, 7])
    flat = offsets[shard] + column  # global column index
    counts = frequencies(flat, 8)
    assert counts[3] == 0 and counts[7] == 0  # masked slot and the empty shard
    probs = torch.softmax(torch.cat(shards), dim=0)
    keep = torch.tensor([0, 1, 2, 4, 5, 6])
    assert chi2_pvalue(counts[keep], probs[keep]) > 1e-3
    assert two_stage_sample([torch.full((1, 2), inf)], 2, generators=[gen(0)], home_generator=gen(1))[
        0
    ].tolist() == [[-1, -1]]


def test_two_stage_uses_the_chosen_shards_own_candidate() -> None:
    # shard 0 holds the single best score (3.0) but shard 1 the larger mass (lse 3.90 > 3.05): with zero noise
    # stage two picks shard 1 by mass, and the draw is shard 1's own best column, not the global argmax
    shards = [torch.tensor([[0.0, 3.0]]), torch.tensor([[2.8, 2.9, 2.7]])]
    shard, column = two_stage_sample(
        shards, 3, generators=[gen(0), gen(1)], home_generator=None, noise_fn=zeros_noise
    )
    assert shard.tolist() == [[1, 1, 1]] and column.tolist() == [[1, 1, 1]]


def test_shard_lse_give_the_global_positive_probability_on_the_distributed_fixture() -> None:
    """Part B 1.7: two replicas hold [1],[2] and [-1],[-2]; queries -1, 1 | 1, 1; positives [2]."""
    shards = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([-1.0, -2.0], dtype=torch.float64)]
    queries = torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    pos_score = queries * 2.0  # (4,)
    lse = torch.stack([torch.logsumexp(queries[:, None] * s[None, :], dim=1) for s in shards])  # (2, 4)
    p_pos = torch.softmax(torch.cat([pos_score[None], lse]), dim=0)[0]  # (4,)
    all_scores = queries[:, None] * torch.cat(shards)[None, :]  # (4, 4)
    p_global = torch.softmax(torch.cat([pos_score[:, None], all_scores], dim=1), dim=1)[:, 0]  # (4,)
    torch.testing.assert_close(p_pos, p_global, atol=1e-15, rtol=1e-15)
    torch.testing.assert_close(
        -torch.log(p_pos),
        torch.tensor([4.37452, 0.890350, 0.890350, 0.890350], dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(combine_lse(lse), torch.logsumexp(all_scores, dim=1), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------- oracle 11
def test_staleness_fixture() -> None:
    cache = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    features = torch.tensor([[2.0], [-3.0]], dtype=torch.float64)
    retrieved = torch.tensor([0, 1, 0])
    fresh = features[retrieved]  # doc tower = identity
    values = staleness(cache[retrieved], fresh)
    torch.testing.assert_close(values, torch.tensor([1 / 4, 4 / 9, 1 / 4], dtype=torch.float64))
    assert math.isclose(float(values.mean()), 0.31481481, abs_tol=1e-8)
    assert staleness(fresh, fresh).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="cached and fresh"):
        staleness(cache, fresh)
