"""One pass over a table shard, block by block: masked log-sum-exp, Gumbel-max candidates, positive rank.

The (Q, M) score matrix of all queries against a shard is never materialised: for a 1M-slot shard and 512
queries it would be 2 GiB of float32. Slots are scored ``block_size`` at a time and the per-query results are
merged across blocks (log-sum-exp by ``logaddexp``; Gumbel-max by the running maximum of the perturbed scores;
Gumbel-top-m by merging running top-m). The Gumbel noise of a (query, document) pair is keyed by (seed, step,
global query id, corpus row, draw) (:func:`dualenc.negcache.gumbel.keyed_gumbel`), so it does not depend on the block or
on the shard holding the document. Hence the max over a union of blocks or shards is the max of their maxima, and
:func:`merge_shards` turns the shards' results into exactly the draws of one scan over the whole table, for any
block size and any number of shards (with replacement, a tie between perturbed scores goes to the lowest global
slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dualenc.negcache.gumbel import GumbelKey, NoiseFn, combine_lse, keyed_gumbel
from dualenc.negcache.table import EmbeddingTable


@dataclass
class ScanResult:
    lse: Tensor  # (Q,) log-sum-exp of the masked scaled scores (-inf when all masked)
    above: Tensor  # (Q,) unmasked slots whose score exceeds the query's positive score
    slots: Tensor  # (Q, m) the drawn slots (local to the shard; merge_shards: what it was given), -1 = none
    keys: Tensor  # (Q, m) perturbed scores of the draws (-inf = none)
    mean: Tensor | None = None  # (Q, D) softmax-weighted mean of the unmasked embeddings (with_mean=True)


def _mask_block(
    block: Tensor,
    table: EmbeddingTable,
    start: int,
    mask_rows: Tensor,
    mask_slots: Tensor,
    home_slots: list[Tensor] | None,
) -> Tensor:
    """Set masked (query, slot) scores of the block of slots [start, start + b) to -inf. Shapes: (Q, b) -> same."""
    end = start + block.shape[1]
    block[:, table.doc_idx[start:end] < 0] = float("-inf")  # empty slots
    inside = (mask_slots >= start) & (mask_slots < end)
    block[mask_rows[inside], mask_slots[inside] - start] = float("-inf")
    per_home = block.shape[0] // len(home_slots) if home_slots else 0
    for home, masked in enumerate(home_slots or []):
        local = masked[(masked >= start) & (masked < end)] - start
        block[home * per_home : (home + 1) * per_home, local] = float("-inf")
    return block


@torch.no_grad()
def scan_table(
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
    noise: NoiseFn = keyed_gumbel,
    block_size: int = 65_536,
    with_mean: bool = False,
) -> ScanResult:
    """Score ``queries`` against every slot of ``table`` in blocks and draw from the masked softmax (A3).

    Args:
        table: this process's shard.
        queries: (Q, D) query vectors (float32).
        scale: 1/τ.
        pos_score: (Q,) scaled live score of each query's positive (for the rank statistic).
        mask_rows, mask_slots: (K,) pairs (query row, local slot) masked out (the queries' known positives).
        home_slots: per home process h, the local slots masked for its queries (rows h·Q/H .. (h+1)·Q/H): the
            documents its loss already scores exactly; None = none.
        num_samples: m draws per query.
        replacement: m independent Gumbel-max draws (noise draws 0..m-1), or Gumbel-top-m (noise draw 0),
            returned in decreasing order of perturbed score.
        key: (seed, step) of the noise.
        query_ids: (Q,) int64 global id of each query (its row in the step's gathered batch).
        noise: the noise function (:class:`~dualenc.negcache.gumbel.NoiseFn`), called per block with the block's
            ``table.doc_idx`` as document rows.
        block_size: slots scored at once; memory O(Q · block_size). The results do not depend on it.
        with_mean: also return Σ_j softmax_j e_j over the unmasked slots (the gradient direction of cache-CE).

    Returns:
        ScanResult with shapes (Q,), (Q,), (Q, m), (Q, m), (Q, D) or None; ``slots`` are local.
    """
    num_queries, device = queries.shape[0], table.emb.device
    lse = torch.full((num_queries,), float("-inf"), device=device)  # (Q,)
    above = torch.zeros(num_queries, dtype=torch.long, device=device)  # (Q,)
    keys = torch.full((num_queries, num_samples), float("-inf"), device=device)  # (Q, m)
    slots = torch.full((num_queries, num_samples), -1, dtype=torch.long, device=device)  # (Q, m)
    mean = torch.zeros(num_queries, table.dim, device=device) if with_mean else None  # (Q, D)
    for start in range(0, table.num_slots, block_size):
        end = min(start + block_size, table.num_slots)
        block = scale * (queries @ table.emb[start:end].float().T)  # (Q, b)
        block = _mask_block(block, table, start, mask_rows, mask_slots, home_slots)
        new_lse = torch.logaddexp(lse, torch.logsumexp(block, dim=1))  # (Q,)
        if mean is not None:  # running softmax-weighted mean, rescaled to the new normaliser
            keep = torch.exp(lse - new_lse).nan_to_num(0.0)  # (Q,) old mass share (0 when both are -inf)
            weights = torch.exp(block - new_lse[:, None]).nan_to_num(0.0)  # (Q, b)
            mean = mean * keep[:, None] + weights @ table.emb[start:end].float()  # (Q, D)
        lse = new_lse
        above += (block > pos_score[:, None]).sum(1)
        rows = table.doc_idx[start:end]  # (b,) corpus rows: what the noise is keyed by
        if replacement:
            for k in range(num_samples):  # draw k: running argmax (ties: the earlier block keeps it)
                value, index = (block + noise(key, query_ids, rows, k, block.dtype)).max(1)  # (Q,), (Q,)
                better = value > keys[:, k]  # (Q,)
                keys[:, k] = torch.where(better, value, keys[:, k])
                slots[:, k] = torch.where(better, index + start, slots[:, k])
        else:  # merge this block's perturbed top-m into the running top-m
            perturbed = block + noise(key, query_ids, rows, 0, block.dtype)  # (Q, b)
            top_val, top_idx = perturbed.topk(min(num_samples, end - start), dim=1)  # (Q, <=m)
            keys, slots = _top_m(
                torch.cat([keys, top_val], 1), torch.cat([slots, top_idx + start], 1), num_samples
            )
    slots = slots.masked_fill(~torch.isfinite(keys), -1)
    return ScanResult(lse, above, slots, keys, mean)


def _top_m(keys: Tensor, items: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The m largest keys per row (decreasing) and their items. Shapes: (Q, n), (Q, n) -> (Q, m), (Q, m)."""
    best, order = keys.topk(min(m, keys.shape[1]), dim=1)  # (Q, <=m)
    picked = items.gather(1, order)  # (Q, <=m)
    if best.shape[1] < m:  # fewer candidates than draws: pad with "no draw"
        pad = m - best.shape[1]
        best = torch.cat([best, best.new_full((best.shape[0], pad), float("-inf"))], 1)
        picked = torch.cat([picked, picked.new_full((picked.shape[0], pad), -1)], 1)
    return best, picked


def merge_shards(
    lse: Tensor,
    above: Tensor,
    keys: Tensor,
    items: Tensor,
    *,
    replacement: bool,
    mean: Tensor | None = None,
) -> ScanResult:
    """Combine S shards' scans of the same queries into the scan of their union (exact, A3).

    With keyed noise a pair's perturbed score is the same whichever shard holds the document, so draw k (with
    replacement) is the shard maximum with the largest key (ties: the lowest shard), and Gumbel-top-m is the
    top-m of the shards' top-m. The log-sum-exp is the log-sum-exp of the shards', the rank counts add up, and
    the softmax mean is the shards' means weighted by their share of the mass.

    Args:
        lse, above: (S, Q) the shards' ``ScanResult.lse`` and ``.above``.
        keys: (S, Q, m) the shards' ``ScanResult.keys`` (-inf = no draw).
        items: (S, Q, m) what to return for each candidate (corpus rows or global slots; -1 = none).
        replacement: as in :func:`scan_table`.
        mean: (S, Q, D) the shards' softmax means, or None.

    Returns:
        ScanResult over the union: lse (Q,), above (Q,), slots = items (Q, m) (-1 = none), keys (Q, m),
        mean (Q, D) or None.
    """
    if replacement:
        best, shard = keys.max(0)  # (Q, m), (Q, m)
        picked = items.gather(0, shard[None]).squeeze(0)  # (Q, m)
    else:
        best, picked = _top_m(
            keys.permute(1, 0, 2).flatten(1), items.permute(1, 0, 2).flatten(1), keys.shape[2]
        )
    picked = picked.masked_fill(~torch.isfinite(best), -1)  # (Q, m)
    total = combine_lse(lse)  # (Q,)
    merged_mean = None
    if mean is not None:
        share = torch.exp(lse - total[None]).nan_to_num(0.0)  # (S, Q)
        merged_mean = (share[..., None] * mean).sum(0)  # (Q, D)
    return ScanResult(total, above.sum(0), picked, best, merged_mean)


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
    """Like :func:`scan_table`, but over SCE bucket candidates instead of every slot (ALGORITHMS.md A5 use 2).

    n_b random centres (Gaussian, or Mix: random combinations of the queries) each take their b_x most aligned
    queries and b_y most aligned slots of this shard (exact MIPS, in blocks over the table: n_b × M scores instead
    of Q × M). A query's candidates are the slots of the buckets holding it; log-sum-exp, rank and Gumbel draws
    are computed over those candidates only. This truncates the softmax to its (approximately) largest terms, a
    better-targeted version of the reference code's contiguous block-max ``top_k``; with one bucket holding
    every query and every slot it equals :func:`scan_table`. Queries in no bucket get no draw (-1) and -inf mass.

    ``generator`` draws the centres only; seed it from (seed, step) alone so that every process builds the same
    buckets over the same gathered queries. The candidate set is each shard's own top-b_y per bucket, so it
    depends on the sharding (the draws from a given candidate set do not: the noise is keyed as in scan_table).

    Shapes: as :func:`scan_table`; memory O(Q · n_b · b_y) for the candidate scores.
    """
    from dualenc.losses.sce import blockwise_topk

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
        return scan_table(
            table,
            queries,
            scale,
            pos_score=pos_score,
            mask_rows=mask_rows,
            mask_slots=mask_slots,
            home_slots=home_slots,
            num_samples=num_samples,
            replacement=replacement,
            key=key,
            query_ids=query_ids,
            noise=noise,
            block_size=block_size,
        )
    _, items = blockwise_topk(
        centres, table.emb.float(), size_y, block_size=block_size, exclude=empty
    )  # (n_b, b_y)
    in_bucket = torch.zeros(num_queries, num_buckets, dtype=torch.bool, device=device)  # (Q, n_b)
    in_bucket[members, torch.arange(num_buckets, device=device)[:, None].expand_as(members)] = True
    cand = items.reshape(1, -1).expand(num_queries, -1).clone()  # (Q, n_b * b_y)
    cand[~in_bucket.repeat_interleave(size_y, dim=1)] = -1
    cand = _first_occurrences(cand)  # a slot in several of the query's buckets counts once
    scores = scale * torch.einsum("qd,qkd->qk", queries, table.emb[cand.clamp(min=0)].float())  # (Q, K)
    scores = scores.masked_fill(_candidate_mask(cand, mask_rows, mask_slots, home_slots), float("-inf"))
    lse = torch.logsumexp(scores, dim=1)  # (Q,)
    above = (scores > pos_score[:, None]).sum(1)  # (Q,)
    # (Q, K) corpus rows of the candidates: what the noise is keyed by
    rows = torch.where(cand >= 0, table.doc_idx[cand.clamp(min=0)], -1)
    if replacement:
        draws = [(scores + noise(key, query_ids, rows, k, scores.dtype)).max(1) for k in range(num_samples)]
        keys = torch.stack([v for v, _ in draws], dim=1)  # (Q, m)
        picks = torch.stack([i for _, i in draws], dim=1)  # (Q, m)
        slots = cand.gather(1, picks)  # (Q, m)
    else:
        keys, slots = _top_m(
            scores + noise(key, query_ids, rows, 0, scores.dtype), cand, num_samples
        )  # (Q, m)
    slots = slots.masked_fill(~torch.isfinite(keys), -1)  # (Q, m)
    return ScanResult(lse, above, slots, keys)


def _candidate_mask(
    cand: Tensor, mask_rows: Tensor, mask_slots: Tensor, home_slots: list[Tensor] | None
) -> Tensor:
    """(Q, K) True where a candidate slot is missing (-1) or masked for its query (positives, home documents)."""
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
