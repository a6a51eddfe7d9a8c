"""Keyed Gumbel noise (dualenc/negcache/gumbel.py) and the staleness measure (dualenc/negcache/refresh.py)
(ALGORITHMS.md A3; Part B §4 oracles 9, 11).

Oracles: a pure-Python big-integer splitmix64 (the int64 tensor hash must equal it bit for bit), scipy's
Kolmogorov-Smirnov and chi-square tests against U(0, 1) and Gumbel(0, 1), logsumexp of the concatenated
scores, the Negative Cache reference fixtures of Part B 1.7, and hand-computed staleness values. The sampling
laws of the scans built on this noise are tested in tests/test_negative_cache.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from dualenc.negcache.gumbel import (
    GumbelKey,
    bits_to_uniform,
    combine_lse,
    keyed_bits,
    keyed_gumbel,
    keyed_uniform,
    mix64,
)
from dualenc.negcache.refresh import staleness

KEY = GumbelKey(seed=7, step=3)
M64 = (1 << 64) - 1


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- the hash
def _py_mix(x: int) -> int:
    """splitmix64's finaliser on Python integers (Steele et al. 2014; Stafford's variant 13)."""
    x &= M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _py_bits(seed: int, step: int, query: int, doc: int, draw: int) -> int:
    """The documented hash chain: state <- mix(state + (value + 1) * golden) over (seed, step, draw, query,
    doc)."""
    state = 0x6A09E667F3BCC908
    for value in (seed, step, draw, query, doc):
        state = _py_mix(state + ((value + 1) & M64) * 0x9E3779B97F4A7C15)
    return state


def test_tensor_hash_equals_the_big_integer_reference() -> None:
    """int64 multiply must wrap and >> be emulated as a logical shift: bit for bit, negative keys too."""
    g = gen(0)
    x = torch.randint(-(2**63), 2**63 - 1, (1000,), generator=g)
    expected = [_py_mix(v) for v in x.tolist()]
    assert [v & M64 for v in mix64(x.clone()).tolist()] == expected
    queries, docs = torch.tensor([0, 1, 5, 2**40]), torch.tensor([0, 3, 123456789, 2**50 + 1])
    for seed, step, draw in [(7, 3, 0), (0, 0, 2), (-1, 2**63 + 5, 1)]:
        bits = keyed_bits(GumbelKey(seed, step), queries, docs, draw)  # (4, 4)
        for i, q in enumerate(queries.tolist()):
            for j, d in enumerate(docs.tolist()):
                assert int(bits[i, j]) & M64 == _py_bits(seed, step, q, d, draw)


def test_mix64_is_a_bijection_on_a_sample() -> None:
    x = torch.arange(-50_000, 50_000)
    assert mix64(x.clone()).unique().numel() == x.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniforms_are_strictly_inside_the_unit_interval(dtype: torch.dtype) -> None:
    extreme = torch.tensor([0, -1, 2**63 - 1, -(2**63), 1, -2], dtype=torch.long)  # all bit patterns' corners
    u = bits_to_uniform(extreme, dtype)
    assert u.dtype == dtype and bool(((u > 0) & (u < 1)).all()), u
    bits = 23 if dtype == torch.float32 else 52
    assert float(u.min()) == 0.5 * 2.0**-bits and float(u.max()) == 1 - 0.5 * 2.0**-bits
    g = -torch.log(-torch.log(u))
    assert bool(torch.isfinite(g).all())
    with pytest.raises(ValueError, match="float32 or float64"):
        bits_to_uniform(extreme, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniforms_and_gumbels_pass_kolmogorov_smirnov(dtype: torch.dtype) -> None:
    queries, docs = torch.arange(200), torch.arange(1000) * 7 + 3  # (Q,), (b,)
    u = keyed_uniform(KEY, queries, docs, 0, dtype)  # (200, 1000)
    assert bool(((u > 0) & (u < 1)).all())
    assert stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3
    assert stats.kstest(u[:, 0].numpy(), "uniform").pvalue > 1e-3  # one document across queries
    assert stats.kstest(u[0].numpy(), "uniform").pvalue > 1e-3  # one query across documents
    g = keyed_gumbel(KEY, queries, docs, 1, dtype)
    assert stats.kstest(g.flatten().numpy(), "gumbel_r").pvalue > 1e-3
    # power: the same test rejects a slightly wrong law
    assert stats.kstest(g.flatten().numpy() * 1.05, "gumbel_r").pvalue < 1e-6


def test_neighbouring_pairs_are_independent() -> None:
    """Chi-square on a 10x10 grid of (u(q, d), u(q, d + 1)), (u(q, d), u(q + 1, d)), draws k and k + 1,
    steps."""
    queries, docs = torch.arange(100), torch.arange(1001)
    u = keyed_uniform(KEY, queries, docs, 0)  # (100, 1001)
    pairs = {
        "next document": (u[:, :-1], u[:, 1:]),
        "next query": (u[:-1, :-1], u[1:, :-1]),
        "next draw": (u, keyed_uniform(KEY, queries, docs, 1)),
        "next step": (u, keyed_uniform(GumbelKey(KEY.seed, KEY.step + 1), queries, docs, 0)),
        "next seed": (u, keyed_uniform(GumbelKey(KEY.seed + 1, KEY.step), queries, docs, 0)),
    }
    for name, (a, b) in pairs.items():
        cells = (a.flatten() * 10).long() * 10 + (b.flatten() * 10).long()  # (n,) in [0, 100)
        counts = torch.bincount(cells, minlength=100).numpy()
        assert stats.chisquare(counts).pvalue > 1e-3, name
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.01, name


def test_same_key_same_stream_on_any_call() -> None:
    queries, docs = torch.tensor([4, 0, 9]), torch.arange(50) * 3
    full = keyed_gumbel(KEY, queries, docs, 2)  # (3, 50)
    assert torch.equal(full, keyed_gumbel(GumbelKey(7, 3), queries, docs, 2))  # a fresh, equal key
    assert torch.equal(keyed_gumbel(KEY, queries, docs[10:17], 2), full[:, 10:17])  # any block of documents
    assert torch.equal(keyed_gumbel(KEY, queries[1:], docs, 2), full[1:])  # any subset of queries
    assert torch.equal(keyed_gumbel(KEY, queries, docs.flip(0), 2), full.flip(1))  # any order
    per_row = torch.stack([docs[:5], docs[5:10], docs[40:45]])  # (3, 5) a row of documents per query
    expected = torch.stack([full[0, :5], full[1, 5:10], full[2, 40:45]])
    assert torch.equal(keyed_gumbel(KEY, queries, per_row, 2), expected)
    state = torch.random.get_rng_state()
    keyed_gumbel(KEY, queries, docs, 0)
    assert torch.equal(torch.random.get_rng_state(), state)  # never touches the global RNG
    assert torch.allclose(
        keyed_uniform(KEY, queries, docs, 2, torch.float32).double(),
        keyed_uniform(KEY, queries, docs, 2, torch.float64),
        atol=2**-23,
        rtol=0,
    )


def test_different_keys_give_different_streams() -> None:
    queries, docs, f64 = torch.arange(4), torch.arange(64), torch.float64
    base = keyed_uniform(KEY, queries, docs, 0, f64)
    variants = [
        keyed_uniform(GumbelKey(KEY.seed + 1, KEY.step), queries, docs, 0, f64),
        keyed_uniform(GumbelKey(KEY.seed, KEY.step + 1), queries, docs, 0, f64),
        keyed_uniform(KEY, queries, docs, 1, f64),
        keyed_uniform(KEY, queries + 4, docs, 0, f64),
        keyed_uniform(KEY, queries, docs + 64, 0, f64),
        keyed_uniform(GumbelKey(KEY.step, KEY.seed), queries, docs, 0, f64),  # fields are not interchangeable
    ]
    for other in [base, *variants]:
        assert other.unique().numel() == other.numel()  # no repeated value within a stream
    for other in variants:
        assert not bool(torch.isclose(other, base).any())


def test_gumbel_moments() -> None:
    g = keyed_gumbel(KEY, torch.arange(400), torch.arange(1000), 0, torch.float64)
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
