"""The negative cache's randomness: counter-based ("keyed") Gumbel noise and derived seeds (ALGORITHMS.md A3).

* Gumbel-max: ``argmax_c (s_c + g_c)`` with ``g_c ~ Gumbel(0, 1)`` i.i.d. is one draw from ``softmax(s)``.
* Gumbel-top-m (Kool et al. 2019): the top-m of ``s + g``, in decreasing order, are m draws from
  ``softmax(s)`` without replacement (draw one, remove it, renormalise, draw the next).

Training draws its cache negatives with this noise: the scans (:mod:`dualenc.negcache.scan`,
:mod:`dualenc.negcache.sce_candidates`) add :func:`keyed_gumbel` to their scores, and
:func:`~dualenc.negcache.scan.merge_shards` combines the shards' log-sum-exps with :func:`combine_lse`.

The noise of draw k of query q for document d is a pure function of (seed, step, global query id q, corpus row
d, k): the five integers are hashed with the splitmix64 finaliser (Steele, Lea & Flood 2014; Stafford's
"variant 13" constants) to 64 random bits, whose top bits give a uniform ``u`` strictly inside (0, 1), and
``g = -log(-log u)``. No generator state is involved, so

* the noise of a (query, document) pair does not depend on which shard, block or process holds the document:
  the argmax over a table is the max over its shards' maxima, and the top-m of a table is the top-m of its
  shards' top-m, for any number of processes and any block size;
* a resumed run redraws the same noise from the same (seed, step).

:func:`derived_seed` turns a tuple of integers into a seed (numpy's SeedSequence), for the generators that do
keep state (SCE bucket centres, dropout).

References:
    Gumbel (1954); Maddison, Tarlow & Minka, "A* Sampling", NeurIPS 2014 (the Gumbel-max trick).
    Kool, van Hoof & Welling, "Stochastic Beams and Where to Find Them: The Gumbel-Top-k Trick for Sampling
    Sequences Without Replacement", ICML 2019.
    Steele, Lea & Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014 (splitmix64).
    Salmon, Moraes, Dror & Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011 (counter-based RNGs).
    Lindgren, Reddi, Guo & Kumar, "Efficient Training of Retrieval Models using Negative Cache", NeurIPS 2021.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 value torch stores for it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN = _signed(0x9E3779B97F4A7C15)  # splitmix64's increment, 2^64 / golden ratio
_MUL1 = _signed(0xBF58476D1CE4E5B9)  # splitmix64 finaliser multipliers (Stafford's variant 13)
_MUL2 = _signed(0x94D049BB133111EB)
_ROOT = _signed(0x6A09E667F3BCC908)  # initial hash state (fractional bits of sqrt(2))
_CHUNK = {"cpu": 1 << 16}  # elements hashed at once: keeps the int64 temporaries in a CPU's cache
_CHUNK_OTHER = 1 << 24  # accelerators: few, large kernels
_UNIFORM_BITS = {torch.float32: 23, torch.float64: 52}  # random bits per uniform (exact in the dtype)


@dataclass(frozen=True)
class GumbelKey:
    """What the noise of one sampling call is keyed by, besides the query, the document and the draw."""

    seed: int  # the run seed
    step: int  # the global micro-batch counter (the same on every process)


class NoiseFn(Protocol):
    """The noise every scan adds to its scores (default :func:`keyed_gumbel`; tests inject others).

    ``noise(key, query_ids, doc_rows, draw, dtype)``: query_ids (Q,) int64, doc_rows (b,) or (Q, b) int64
    (the same documents for every query, or one row per query), draw k >= 0 -> (Q, b) tensor of ``dtype``.
    """

    def __call__(
        self, key: GumbelKey, query_ids: Tensor, doc_rows: Tensor, draw: int, dtype: torch.dtype
    ) -> Tensor: ...


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic: mask the sign copies)."""
    return torch.bitwise_right_shift(x, bits).bitwise_and_((1 << (64 - bits)) - 1)


def mix64(x: Tensor) -> Tensor:
    """The splitmix64 finaliser (Stafford's variant 13), a bijection of 64-bit patterns. Shapes: any -> same.

    ``x`` is int64 (bit patterns); multiplication wraps modulo 2^64 as in two's complement. Modifies ``x``.
    """
    x ^= _shift_right(x, 30)
    x *= _MUL1
    x ^= _shift_right(x, 27)
    x *= _MUL2
    x ^= _shift_right(x, 31)
    return x


def _absorb(state: Tensor, values: Tensor) -> Tensor:
    """One link of the hash chain: ``mix64(state + (values + 1) · GOLDEN)``, i.e. element ``values`` of the
    splitmix64 stream started at ``state``. Shapes: broadcastable int64 -> broadcast shape."""
    return mix64((values + 1).mul_(GOLDEN) + state)


def _key_state(key: GumbelKey, draw: int) -> int:
    """The hash of (seed, step, draw), as an int64 value (computed on the CPU: no device synchronisation)."""
    state = torch.tensor([_ROOT], dtype=torch.long)
    for value in (key.seed, key.step, draw):
        state = _absorb(state, torch.tensor([_signed(value)], dtype=torch.long))
    return int(state[0])


def _query_states(key: GumbelKey, query_ids: Tensor, draw: int) -> Tensor:
    """The hash of (seed, step, draw, query id) per query. Shapes: (Q,) -> (Q,) int64."""
    state = torch.tensor(_key_state(key, draw), dtype=torch.long, device=query_ids.device)  # ()
    return _absorb(state, query_ids.long())  # (Q,)


def _as_rows(doc_rows: Tensor) -> Tensor:
    """(b,) documents shared by every query -> (1, b); (Q, b) unchanged."""
    return doc_rows.long().reshape(1, -1) if doc_rows.dim() == 1 else doc_rows.long()


def keyed_bits(key: GumbelKey, query_ids: Tensor, doc_rows: Tensor, draw: int) -> Tensor:
    """64 random bits per (query, document) pair, a pure function of (key, query id, document row, draw).

    Args:
        key: seed and step.
        query_ids: (Q,) int64 global query ids.
        doc_rows: (b,) or (Q, b) int64 corpus rows.
        draw: k, the index of the draw (0 for Gumbel-top-m).

    Returns:
        (Q, b) int64 bit patterns.
    """
    return _absorb(_query_states(key, query_ids, draw)[:, None], _as_rows(doc_rows))  # (Q, b)


def bits_to_uniform(bits: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniforms strictly inside (0, 1) from the top bits of 64-bit patterns. Shapes: any -> same.

    float32 uses the top 23 bits n and returns (n + 1/2) / 2^23, float64 the top 52 bits and
    (n + 1/2) / 2^52: exact in the dtype, symmetric around 1/2, never 0 or 1 (at least 2^-24, resp. 2^-53,
    away from either end).
    """
    if dtype not in _UNIFORM_BITS:
        raise ValueError(f"noise dtype must be float32 or float64, got {dtype}")
    bits_kept = _UNIFORM_BITS[dtype]
    top = _shift_right(bits, 64 - bits_kept).to(dtype)  # integers in [0, 2^bits_kept)
    return top.add_(0.5).mul_(2.0**-bits_kept)


def keyed_uniform(
    key: GumbelKey, query_ids: Tensor, doc_rows: Tensor, draw: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Uniforms in (0, 1) keyed by (seed, step, query id, document row, draw).

    Hashes 2^16 elements at a time on a CPU (the int64 temporaries stay in cache), 2^24 elsewhere; the values
    do not depend on it. Shapes: as :func:`keyed_gumbel`.
    """
    states, docs = _query_states(key, query_ids, draw)[:, None], _as_rows(doc_rows)  # (Q, 1), (1 or Q, b)
    out = torch.empty(states.shape[0], docs.shape[1], dtype=dtype, device=states.device)  # (Q, b)
    chunk = _CHUNK.get(states.device.type, _CHUNK_OTHER)
    width = max(1, chunk // max(1, states.shape[0]))
    for start in range(0, docs.shape[1], width):
        bits = _absorb(states, docs[:, start : start + width])  # (Q, w)
        out[:, start : start + width] = bits_to_uniform(bits, dtype)
    return out


def keyed_gumbel(
    key: GumbelKey, query_ids: Tensor, doc_rows: Tensor, draw: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Gumbel(0, 1) noise ``-log(-log u)`` of draw ``draw`` for every (query, document) pair.

    The default :class:`NoiseFn` of the scans.

    Args:
        key: seed and step of the sampling call.
        query_ids: (Q,) int64 global query ids (position of the query in the step's gathered batch).
        doc_rows: (b,) corpus rows shared by every query, or (Q, b) one row of documents per query.
        draw: k, the index of an independent draw (with replacement); 0 for Gumbel-top-m.
        dtype: float32 (bounded: g in [-2.81, 16.6]) or float64.

    Returns:
        (Q, b) noise. The value for a pair depends only on (key, query id, document row, draw), never on the
        other pairs in the call, the device or the process.
    """
    return keyed_uniform(key, query_ids, doc_rows, draw, dtype).log_().neg_().log_().neg_()  # (Q, b)


def combine_lse(shard_lse: Tensor) -> Tensor:
    """Global log-sum-exp from the shards' log-sum-exps.

    Args:
        shard_lse: (P, Q) log-sum-exp of each query's scores on each of P shards (``-inf`` = no mass).

    Returns:
        (Q,) ``logsumexp`` over the shards; ``-inf`` where every shard is ``-inf``.
    """
    return torch.logsumexp(shard_lse, dim=0)  # (Q,)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (numpy's SeedSequence).

    E.g. (seed, rank, micro-batch) for dropout, (seed, step, stream) for the SCE bucket centres.
    """
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)
