"""Gumbel-max sampling from a softmax over a (sharded) table of scores (ALGORITHMS.md A3).

Pure functions: every random number comes from the ``torch.Generator`` passed in (never the global RNG), through
one injectable noise function, so tests can force an exact argmax and a resumed run reproduces every draw.

* Gumbel-max: ``argmax_c (s_c + g_c)`` with ``g_c ~ Gumbel(0, 1)`` i.i.d. is one draw from ``softmax(s)``.
* Gumbel-top-k (Kool et al. 2019): the top-m of ``s + g`` are m draws from ``softmax(s)`` without replacement
  (sequentially: draw one, remove it, renormalise, draw the next).
* Two-stage sharded sampling: with the table split into shards, pick a shard by Gumbel-max over the shards'
  log-sum-exps, then take that shard's own Gumbel-max candidate. This is an exact draw from the global softmax,
  and the global log-sum-exp is the log-sum-exp of the shard log-sum-exps.

References:
    Gumbel (1954); Maddison, Tarlow & Minka, "A* Sampling", NeurIPS 2014 (the Gumbel-max trick).
    Kool, van Hoof & Welling, "Stochastic Beams and Where to Find Them: The Gumbel-Top-k Trick for Sampling
    Sequences Without Replacement", ICML 2019.
    Lindgren, Reddi, Guo & Kumar, "Efficient Training of Retrieval Models using Negative Cache", NeurIPS 2021.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

NoiseFn = Callable[..., Tensor]


def gumbel_noise(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard Gumbel noise ``g = -log(-log(u))``, ``u ~ U(0, 1)``.

    ``u`` is clamped to ``[finfo(dtype).tiny, 1 - finfo(dtype).eps]`` so that ``g`` is always finite.

    Args:
        shape: shape of the noise tensor.
        generator: the only source of randomness (``None`` uses the global RNG; the library always passes one).
        device: device of the result; defaults to the generator's device.
        dtype: floating dtype of the result.

    Returns:
        Tensor of ``shape`` with i.i.d. Gumbel(0, 1) entries.
    """
    if device is None and generator is not None:
        device = generator.device
    info = torch.finfo(dtype)
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)  # shape
    u = u.clamp(min=info.tiny, max=1.0 - info.eps)  # shape, in (0, 1)
    return -torch.log(-torch.log(u))  # shape


def _noise_dtype(scores: Tensor) -> torch.dtype:
    """float64 scores get float64 noise; everything else is perturbed in float32."""
    return torch.promote_types(scores.dtype, torch.float32)


def gumbel_max_sample(
    scores: Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None,
    replacement: bool = True,
    noise_fn: NoiseFn = gumbel_noise,
) -> Tensor:
    """Draw ``num_samples`` columns per row from ``softmax(scores)`` by Gumbel-max.

    Args:
        scores: (Q, M) logits, already divided by the temperature; ``-inf`` masks a column.
        num_samples: m, draws per row.
        generator: source of the noise.
        replacement: ``True``: m independent Gumbel-max draws (one (Q, M) noise tensor at a time, so memory
            stays O(Q·M)). ``False``: Gumbel-top-m, i.e. m distinct columns drawn without replacement.
        noise_fn: ``noise_fn(shape, generator=, device=, dtype=)``; replace it to force the argmax in tests.

    Returns:
        (Q, m) int64 column indices. Masked columns are never returned; a draw that has no finite column left
        (a row with no finite column, or fewer than m of them without replacement) is -1.

    References:
        Gumbel-max and Gumbel-top-k (Kool et al. 2019); ALGORITHMS.md A3.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (Q, M), got shape {tuple(scores.shape)}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    num_queries, num_cols = scores.shape
    out = torch.full((num_queries, num_samples), -1, dtype=torch.long, device=scores.device)  # (Q, m)
    if num_samples == 0 or num_cols == 0:
        return out
    logits = scores.to(_noise_dtype(scores))  # (Q, M)
    noise_kw = {"generator": generator, "device": scores.device, "dtype": logits.dtype}
    if replacement:
        for k in range(num_samples):
            perturbed = logits + noise_fn((num_queries, num_cols), **noise_kw)  # (Q, M)
            best, idx = perturbed.max(dim=1)  # (Q,), (Q,)
            out[:, k] = torch.where(torch.isfinite(best), idx, -1)
        return out
    perturbed = logits + noise_fn((num_queries, num_cols), **noise_kw)  # (Q, M)
    take = min(num_samples, num_cols)
    best, idx = perturbed.topk(take, dim=1)  # (Q, take), (Q, take)
    out[:, :take] = torch.where(torch.isfinite(best), idx, -1)
    return out


def combine_lse(shard_lse: Tensor) -> Tensor:
    """Global log-sum-exp from the shards' log-sum-exps.

    Args:
        shard_lse: (P, Q) log-sum-exp of each query's scores on each of P shards (``-inf`` = no mass).

    Returns:
        (Q,) ``logsumexp`` over the shards; ``-inf`` where every shard is ``-inf``.
    """
    return torch.logsumexp(shard_lse, dim=0)  # (Q,)


def choose_shards(
    shard_lse: Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None,
    noise_fn: NoiseFn = gumbel_noise,
) -> Tensor:
    """For every query and draw, pick a shard with probability ∝ ``exp(shard_lse)`` (Gumbel-max).

    Args:
        shard_lse: (P, Q) shard log-sum-exps.
        num_samples: m, independent draws per query.
        generator: source of the noise (the query's home process's generator).
        noise_fn: the noise function (see :func:`gumbel_max_sample`).

    Returns:
        (Q, m) int64 shard indices; shards with ``-inf`` mass are never chosen; -1 where all shards are ``-inf``.

    References:
        ALGORITHMS.md A3 and Part B 1.4 (two-stage sampling).
    """
    if shard_lse.dim() != 2:
        raise ValueError(f"shard_lse must be (P, Q), got shape {tuple(shard_lse.shape)}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    num_shards, num_queries = shard_lse.shape
    if num_shards == 0:
        return torch.full((num_queries, num_samples), -1, dtype=torch.long, device=shard_lse.device)
    logits = shard_lse.T.to(_noise_dtype(shard_lse))[:, None, :]  # (Q, 1, P)
    shape = (num_queries, num_samples, num_shards)  # P is small: all m draws at once
    noise = noise_fn(shape, generator=generator, device=shard_lse.device, dtype=logits.dtype)  # (Q, m, P)
    best, idx = (logits + noise).max(dim=2)  # (Q, m), (Q, m)
    return torch.where(torch.isfinite(best), idx, -1)  # (Q, m)


def two_stage_sample(
    shard_scores: list[Tensor],
    num_samples: int,
    *,
    generators: list[torch.Generator],
    home_generator: torch.Generator | None,
    noise_fn: NoiseFn = gumbel_noise,
) -> tuple[Tensor, Tensor]:
    """Reference implementation, on one process, of exact sampling from a table split into shards.

    Each shard p draws m local candidates (with replacement) from its own scores with ``generators[p]`` and
    computes its log-sum-exp; then draw k of each query takes the k-th candidate of the shard chosen for it by
    :func:`choose_shards` (``home_generator``). Conditioned on the chosen shard, the candidate is a draw from that
    shard's softmax, so the pair is a draw from the global softmax; draws are independent across k.

    Args:
        shard_scores: P tensors (Q, M_p) of scaled scores (``-inf`` = masked).
        num_samples: m, draws per query (with replacement).
        generators: one generator per shard.
        home_generator: generator of the query's home process.
        noise_fn: the noise function (see :func:`gumbel_max_sample`).

    Returns:
        ``(shard, column)``, both (Q, m) int64: the shard of each draw and the column within it; -1 in both where
        the query has no finite score anywhere.
    """
    if len(generators) != len(shard_scores):
        raise ValueError(f"{len(shard_scores)} shards but {len(generators)} generators")
    candidates = torch.stack(
        [
            gumbel_max_sample(s, num_samples, generator=g, replacement=True, noise_fn=noise_fn)
            for s, g in zip(shard_scores, generators, strict=True)
        ]
    )  # (P, Q, m)
    lse = torch.stack([torch.logsumexp(s, dim=1) for s in shard_scores])  # (P, Q)
    shard = choose_shards(lse, num_samples, generator=home_generator, noise_fn=noise_fn)  # (Q, m)
    column = candidates.gather(0, shard.clamp(min=0)[None]).squeeze(0)  # (Q, m)
    column = torch.where(shard >= 0, column, -1)  # (Q, m)
    return shard, column


def staleness(cached: Tensor, fresh: Tensor) -> Tensor:
    """Relative squared error of cached embeddings against freshly computed ones (logging only).

    Args:
        cached: (n, D) embeddings read from the table.
        fresh: (n, D) the same documents re-encoded with the current document tower.

    Returns:
        (n,) ``||cached - fresh||² / ||fresh||²`` (``inf``/``nan`` where ``fresh`` is the zero vector).

    References:
        Lindgren et al. 2021, the reference code's staleness summary (ALGORITHMS.md Part B 1.3).
    """
    if cached.shape != fresh.shape or cached.dim() != 2:
        raise ValueError(
            f"cached and fresh must both be (n, D), got {tuple(cached.shape)} and {tuple(fresh.shape)}"
        )
    return (cached - fresh).pow(2).sum(dim=1) / fresh.pow(2).sum(dim=1)  # (n,)
