"""One pass over a table shard, block by block: masked log-sum-exp, local Gumbel-max candidates, positive rank.

The (Q, M) score matrix of all queries against a shard is never materialised: for a 1M-slot shard and 512
queries it would be 2 GiB of float32. Slots are scored ``block_size`` at a time and the per-query results are
merged across blocks (log-sum-exp by ``logaddexp``; Gumbel-max by the running maximum of the perturbed scores,
which is exact because the max over a union is the max of the maxima; Gumbel-top-m by merging running top-m).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dualenc.cache import EmbeddingTable
from dualenc.sampler import gumbel_noise


@dataclass
class ScanResult:
    lse: Tensor  # (Q,) log-sum-exp of the masked scaled scores of the shard (-inf when all masked)
    above: Tensor  # (Q,) unmasked slots whose score exceeds the query's positive score
    slots: Tensor  # (Q, m) local slots of the candidates, -1 = none
    keys: Tensor  # (Q, m) perturbed scores of the candidates (Gumbel-top-m merge keys; -inf = none)
    mean: Tensor | None = None  # (Q, D) softmax-weighted mean of the unmasked embeddings (with_mean=True)


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
    generator: torch.Generator,
    block_size: int = 65_536,
    with_mean: bool = False,
) -> ScanResult:
    """Score ``queries`` against every slot of ``table`` in blocks and keep what sampling needs.

    Args:
        table: this process's shard.
        queries: (Q, D) query vectors (float32).
        scale: 1/τ.
        pos_score: (Q,) scaled live score of each query's positive (for the rank statistic).
        mask_rows, mask_slots: (K,) pairs (query row, local slot) masked out (the queries' known positives).
        home_slots: per home process h, the local slots masked for its queries (rows h·Q/H .. (h+1)·Q/H): the
            documents its loss already scores exactly; None = none.
        num_samples: m candidates per query.
        replacement: m independent Gumbel-max draws (True) or Gumbel-top-m (False).
        generator: the noise source (draws depend on it and on ``block_size`` only).
        block_size: slots scored at once; memory is O(Q · block_size).
        with_mean: also return Σ_j softmax_j e_j over the unmasked slots (the gradient direction of cache-CE).

    Returns:
        ScanResult with shapes (Q,), (Q,), (Q, m), (Q, m).
    """
    num_queries, device = queries.shape[0], table.emb.device
    lse = torch.full((num_queries,), float("-inf"), device=device)  # (Q,)
    above = torch.zeros(num_queries, dtype=torch.long, device=device)  # (Q,)
    keys = torch.full((num_queries, num_samples), float("-inf"), device=device)  # (Q, m)
    slots = torch.full((num_queries, num_samples), -1, dtype=torch.long, device=device)  # (Q, m)
    per_home = num_queries // len(home_slots) if home_slots else 0
    mean = torch.zeros(num_queries, table.dim, device=device) if with_mean else None  # (Q, D)
    for start in range(0, table.num_slots, block_size):
        end = min(start + block_size, table.num_slots)
        block = scale * (queries @ table.emb[start:end].float().T)  # (Q, b)
        block[:, table.doc_idx[start:end] < 0] = float("-inf")  # empty slots
        inside = (mask_slots >= start) & (mask_slots < end)
        block[mask_rows[inside], mask_slots[inside] - start] = float("-inf")
        for home, masked in enumerate(home_slots or []):
            local = masked[(masked >= start) & (masked < end)] - start
            block[home * per_home : (home + 1) * per_home, local] = float("-inf")
        block_lse = torch.logsumexp(block, dim=1)  # (Q,)
        new_lse = torch.logaddexp(lse, block_lse)  # (Q,)
        if mean is not None:  # running softmax-weighted mean, rescaled to the new normaliser
            keep = torch.exp(lse - new_lse).nan_to_num(0.0)  # (Q,) old mass share (0 when both are -inf)
            weights = torch.exp(block - new_lse[:, None]).nan_to_num(0.0)  # (Q, b)
            mean = mean * keep[:, None] + weights @ table.emb[start:end].float()  # (Q, D)
        lse = new_lse
        above += (block > pos_score[:, None]).sum(1)
        if replacement:
            for k in range(num_samples):  # draw k: running argmax of the perturbed scores
                value, index = (block + gumbel_noise(block.shape, generator=generator, device=device)).max(1)
                better = value > keys[:, k]  # (Q,)
                keys[:, k] = torch.where(better, value, keys[:, k])
                slots[:, k] = torch.where(better, index + start, slots[:, k])
        else:  # merge this block's perturbed top-m into the running top-m
            perturbed = block + gumbel_noise(block.shape, generator=generator, device=device)  # (Q, b)
            top_val, top_idx = perturbed.topk(min(num_samples, end - start), dim=1)  # (Q, <=m)
            merged_val = torch.cat([keys, top_val], dim=1)  # (Q, m + <=m)
            merged_idx = torch.cat([slots, top_idx + start], dim=1)
            keys, order = merged_val.topk(num_samples, dim=1)  # (Q, m)
            slots = merged_idx.gather(1, order)
    slots = slots.masked_fill(~torch.isfinite(keys), -1)
    return ScanResult(lse, above, slots, keys, mean)


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
    generator: torch.Generator,
    num_buckets: int,
    bucket_size_x: int,
    bucket_size_y: int,
    mix: bool,
    block_size: int = 65_536,
) -> ScanResult:
    """Like :func:`scan_table`, but over SCE bucket candidates instead of every slot (ALGORITHMS.md A5 use 2).

    n_b random centres (Gaussian, or Mix: random combinations of the queries) each take their b_x most aligned
    queries and b_y most aligned slots (exact MIPS, in blocks over the table: n_b × M scores instead of Q × M).
    A query's candidates are the slots of the buckets holding it; log-sum-exp, rank and Gumbel draws are
    computed over those candidates only. This truncates the softmax to its (approximately) largest terms, a
    better-targeted version of the reference code's contiguous block-max ``top_k``; with one bucket holding
    every query and every slot it equals :func:`scan_table`. Queries in no bucket get no draw (-1) and -inf mass.

    Shapes: as :func:`scan_table`; memory O(Q · n_b · b_y) for the candidate scores.
    """
    from dualenc.sce import blockwise_topk

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
        return scan_table(table, queries, scale, pos_score=pos_score, mask_rows=mask_rows, mask_slots=mask_slots,
                          home_slots=home_slots, num_samples=num_samples, replacement=replacement,
                          generator=generator, block_size=block_size)  # fmt: skip
    _, items = blockwise_topk(
        centres, table.emb.float(), size_y, block_size=block_size, exclude=empty
    )  # (n_b, b_y)
    in_bucket = torch.zeros(num_queries, num_buckets, dtype=torch.bool, device=device)  # (Q, n_b)
    in_bucket[members, torch.arange(num_buckets, device=device)[:, None].expand_as(members)] = True
    cand = items.reshape(1, -1).expand(num_queries, -1).clone()  # (Q, n_b * b_y)
    cand[~in_bucket.repeat_interleave(size_y, dim=1)] = -1
    cand = _first_occurrences(cand)  # a slot in several of the query's buckets counts once
    scores = scale * torch.einsum("qd,qkd->qk", queries, table.emb[cand.clamp(min=0)].float())  # (Q, K)
    scores[cand < 0] = float("-inf")
    masked = torch.zeros_like(cand, dtype=torch.bool)  # (Q, K)
    if mask_rows.numel():  # the queries' own positives: (row, slot) pairs
        hit = (cand[mask_rows] == mask_slots[:, None]).int()  # (pairs, K)
        masked |= torch.zeros_like(cand, dtype=torch.int).index_add_(0, mask_rows, hit) > 0
    per_home = num_queries // len(home_slots) if home_slots else 0
    for home, slots in enumerate(home_slots or []):
        rows = slice(home * per_home, (home + 1) * per_home)
        masked[rows] |= torch.isin(cand[rows], slots)
    scores[masked] = float("-inf")
    lse = torch.logsumexp(scores, dim=1)  # (Q,)
    above = (scores > pos_score[:, None]).sum(1)  # (Q,)
    if replacement:
        draws = [
            (scores + gumbel_noise(scores.shape, generator=generator, device=device)).max(1)
            for _ in range(num_samples)
        ]
        keys = torch.stack([v for v, _ in draws], dim=1)  # (Q, m)
        picks = torch.stack([i for _, i in draws], dim=1)  # (Q, m)
    else:
        keys, picks = (scores + gumbel_noise(scores.shape, generator=generator, device=device)).topk(
            min(num_samples, scores.shape[1]), dim=1
        )  # (Q, <=m)
    slots = cand.gather(1, picks).masked_fill(~torch.isfinite(keys), -1)  # (Q, m)
    return ScanResult(lse, above, slots, keys)


def _first_occurrences(cand: Tensor) -> Tensor:
    """Replace repeats of a slot within a row by -1 (keep the first). Shapes: (Q, K) -> (Q, K)."""
    order = torch.sort(cand, dim=1, stable=True)  # values (Q, K), indices (Q, K)
    repeat = torch.zeros_like(cand, dtype=torch.bool)  # (Q, K) in sorted order
    repeat[:, 1:] = (order.values[:, 1:] == order.values[:, :-1]) & (order.values[:, 1:] >= 0)
    out = cand.clone()
    out.scatter_(1, order.indices, torch.where(repeat, torch.full_like(order.values, -1), order.values))
    return out
