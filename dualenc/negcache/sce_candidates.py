"""The cache scan over SCE bucket candidates instead of every slot (``cache_candidates=sce``; ALGORITHMS.md A5
use 2), for tables too large to score densely."""

from __future__ import annotations

import torch
from torch import Tensor

from dualenc.losses.dense import blockwise_topk
from dualenc.negcache.gumbel import GumbelKey, NoiseFn, keyed_gumbel
from dualenc.negcache.scan import ScanResult, nothing_drawn, perturbed_scores, top_m
from dualenc.negcache.table import EmbeddingTable


@torch.no_grad()
def scan_candidates(
    table: EmbeddingTable,
    queries: Tensor,
    scale: Tensor | float,
    *,
    pos_score: Tensor,
    mask_rows: Tensor,
    mask_slots: Tensor,
    home_slots: list[Tensor] | None,
    num_samples: int,
    replacement: bool,
    key: GumbelKey,
    query_ids: Tensor,
    generator: torch.Generator,
    num_buckets: int,
    bucket_size_x: int,
    bucket_size_y: int,
    mix: bool,
    noise: NoiseFn = keyed_gumbel,
    block_size: int = 65_536,
) -> ScanResult:
    """Like :func:`~dualenc.negcache.scan.scan_table`, but over SCE bucket candidates instead of every slot.

    n_b random centres (Gaussian, or Mix: random combinations of the queries) each take their b_x most
    aligned queries and b_y most aligned slots of this shard (exact MIPS, in blocks over the table: n_b × M
    scores instead of Q × M). A query's candidates are the slots of the buckets holding it; log-sum-exp, rank
    and Gumbel draws are computed over those candidates only. This truncates the softmax to its
    (approximately) largest terms, a better-targeted version of the reference code's contiguous block-max
    ``top_k``; with one bucket holding every query and every slot it equals ``scan_table``. Queries in no
    bucket get no draw (-1) and -inf mass; a shard with no filled slot gives no draw to any query.

    ``generator`` draws the centres only; seed it from (seed, step) alone so that every process builds the
    same buckets over the same gathered queries. The candidate set is each shard's own top-b_y per bucket, so
    it depends on the sharding (the draws from a given candidate set do not: the noise is keyed as in
    ``scan_table``).

    Shapes: as ``scan_table``; memory O(Q · n_b · b_y) for the candidate scores.
    """
    num_queries, device = queries.shape[0], table.emb.device
    cand = _bucket_candidates(
        table, queries, generator, num_buckets, bucket_size_x, bucket_size_y, mix, block_size
    )  # (Q, K) local slots, -1 = none
    if cand is None:  # an empty shard
        return nothing_drawn(num_queries, num_samples, device)
    scores = scale * torch.einsum("qd,qkd->qk", queries, table.emb[cand.clamp(min=0)].float())  # (Q, K)
    scores = scores.masked_fill(_candidate_mask(cand, mask_rows, mask_slots, home_slots), float("-inf"))
    lse = torch.logsumexp(scores, dim=1)  # (Q,)
    above = (scores > pos_score[:, None]).sum(1)  # (Q,)
    rows = torch.where(cand >= 0, table.doc_idx[cand.clamp(min=0)], -1)  # (Q, K) what the noise is keyed by
    perturbed = perturbed_scores(scores, rows, key, query_ids, noise, replacement, num_samples)  # of (Q, K)
    if replacement:
        draws = [p.max(1) for p in perturbed]  # m of ((Q,), (Q,))
        keys = torch.stack([v for v, _ in draws], dim=1)  # (Q, m)
        slots = cand.gather(1, torch.stack([i for _, i in draws], dim=1))  # (Q, m)
    else:
        keys, slots = top_m(next(perturbed), cand, num_samples)  # (Q, m), (Q, m)
    slots = slots.masked_fill(~torch.isfinite(keys), -1)  # (Q, m)
    return ScanResult(lse, above, slots, keys)


def _bucket_candidates(
    table: EmbeddingTable,
    queries: Tensor,
    generator: torch.Generator,
    num_buckets: int,
    bucket_size_x: int,
    bucket_size_y: int,
    mix: bool,
    block_size: int,
) -> Tensor | None:
    """Each query's candidate slots: the b_y slots of every bucket holding it, each slot once.

    Shapes: queries (Q, D) -> (Q, n_b * b_y) local slots, -1 = not a candidate; None when the shard holds no
    document.
    """
    num_queries, dim, device = queries.shape[0], table.dim, table.emb.device
    bucket_size_x = min(bucket_size_x, num_queries)
    if mix:
        omega = torch.randn(num_queries, num_buckets, generator=generator, device=device)  # (Q, n_b)
        centres = omega.T @ queries  # (n_b, D)
    else:
        centres = torch.randn(num_buckets, dim, generator=generator, device=device)  # (n_b, D)
    members = (centres @ queries.T).topk(bucket_size_x, dim=1).indices  # (n_b, b_x)
    empty = table.doc_idx < 0  # (M,)
    size_y = min(bucket_size_y, int((~empty).sum()))
    if size_y < 1:
        return None
    emb = table.emb.float()  # (M, D)
    _, items = blockwise_topk(centres, emb, size_y, block_size=block_size, exclude=empty)  # (n_b, b_y)
    in_bucket = torch.zeros(num_queries, num_buckets, dtype=torch.bool, device=device)  # (Q, n_b)
    in_bucket[members, torch.arange(num_buckets, device=device)[:, None].expand_as(members)] = True
    cand = items.reshape(1, -1).expand(num_queries, -1).clone()  # (Q, n_b * b_y)
    cand[~in_bucket.repeat_interleave(size_y, dim=1)] = -1
    return _first_occurrences(cand)  # (Q, n_b * b_y) a slot in several of the query's buckets counts once


def _candidate_mask(
    cand: Tensor, mask_rows: Tensor, mask_slots: Tensor, home_slots: list[Tensor] | None
) -> Tensor:
    """(Q, K) True where a candidate slot is missing (-1) or masked for its query (positives, home docs)."""
    masked = cand < 0  # (Q, K)
    if mask_rows.numel():  # the queries' own positives: (row, slot) pairs
        hit = (cand[mask_rows] == mask_slots[:, None]).int()  # (pairs, K)
        masked |= torch.zeros_like(cand, dtype=torch.int).index_add_(0, mask_rows, hit) > 0
    per_home = cand.shape[0] // len(home_slots) if home_slots else 0
    for home, slots in enumerate(home_slots or []):
        rows = slice(home * per_home, (home + 1) * per_home)
        masked[rows] |= torch.isin(cand[rows], slots)
    return masked


def _first_occurrences(cand: Tensor) -> Tensor:
    """Replace repeats of a slot within a row by -1 (keep the first). Shapes: (Q, K) -> (Q, K)."""
    order = torch.sort(cand, dim=1, stable=True)  # values (Q, K), indices (Q, K)
    repeat = torch.zeros_like(cand, dtype=torch.bool)  # (Q, K) in sorted order
    repeat[:, 1:] = (order.values[:, 1:] == order.values[:, :-1]) & (order.values[:, 1:] >= 0)
    out = cand.clone()
    out.scatter_(1, order.indices, torch.where(repeat, torch.full_like(order.values, -1), order.values))
    return out
