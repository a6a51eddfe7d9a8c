"""One pass over a table shard, block by block: masked log-sum-exp, Gumbel-max candidates, positive rank.

The (Q, M) score matrix of all queries against a shard is never materialised: for a 1M-slot shard and 512
queries it would be 2 GiB of float32. :func:`scan_table` scores ``block_size`` slots at a time and merges the
per-query results across blocks (log-sum-exp by ``logaddexp``; Gumbel-max by the running maximum of the
perturbed scores; Gumbel-top-m by merging running top-m). The Gumbel noise of a (query, document) pair is
keyed by (seed, step, global query id, corpus row, draw) (:func:`dualenc.negcache.gumbel.keyed_gumbel`), so it
does not depend on the block or on the shard holding the document. Hence the max over a union of blocks or
shards is the max of their maxima, and :func:`merge_shards` turns the shards' results into exactly the draws
of one scan over the whole table, for any block size and any number of shards (with replacement, a tie
between perturbed scores goes to the lowest global slot). :mod:`dualenc.negcache.sce_candidates` does the same
over the slots of SCE buckets only (``cache_candidates=sce``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from dualenc.negcache.gumbel import GumbelKey, NoiseFn, combine_lse, keyed_gumbel
from dualenc.negcache.table import EmbeddingTable


@dataclass
class ScanResult:
    """What a scan of a shard (or :func:`merge_shards` of several) returns for each of Q queries."""

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
    """Set masked (query, slot) scores of the block of slots [start, start + b) to -inf, in place.

    Shapes: block (Q, b) -> (Q, b).
    """
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
        noise: the noise function (:class:`~dualenc.negcache.gumbel.NoiseFn`), called per block with the
            block's ``table.doc_idx`` as document rows.
        block_size: slots scored at once; memory O(Q · block_size). The results do not depend on it.
        with_mean: also return Σ_j softmax_j e_j over the unmasked slots (the gradient direction of cache-CE).

    Returns:
        ScanResult with shapes (Q,), (Q,), (Q, m), (Q, m), (Q, D) or None; ``slots`` are local.
    """
    num_queries, device = queries.shape[0], table.emb.device
    result = nothing_drawn(num_queries, num_samples, device)  # running over the blocks
    mean = torch.zeros(num_queries, table.dim, device=device) if with_mean else None  # (Q, D)
    for start in range(0, table.num_slots, block_size):
        end = min(start + block_size, table.num_slots)
        block = scale * (queries @ table.emb[start:end].float().T)  # (Q, b)
        block = _mask_block(block, table, start, mask_rows, mask_slots, home_slots)
        new_lse = torch.logaddexp(result.lse, torch.logsumexp(block, dim=1))  # (Q,)
        if mean is not None:  # running softmax-weighted mean, rescaled to the new normaliser
            keep = torch.exp(result.lse - new_lse).nan_to_num(0.0)  # (Q,) old mass share (0 when both -inf)
            weights = torch.exp(block - new_lse[:, None]).nan_to_num(0.0)  # (Q, b)
            mean = mean * keep[:, None] + weights @ table.emb[start:end].float()  # (Q, D)
        result.lse = new_lse
        result.above += (block > pos_score[:, None]).sum(1)  # (Q,)
        perturbed = perturbed_scores(
            block, table.doc_idx[start:end], key, query_ids, noise, replacement, num_samples
        )
        _merge_block_draws(result, perturbed, start, replacement)
    result.slots = result.slots.masked_fill(~torch.isfinite(result.keys), -1)  # (Q, m)
    result.mean = mean
    return result


def perturbed_scores(
    scores: Tensor,
    rows: Tensor,
    key: GumbelKey,
    query_ids: Tensor,
    noise: NoiseFn,
    replacement: bool,
    num_samples: int,
) -> Iterator[Tensor]:
    """Scores plus the keyed noise of each draw: m draws (0..m-1) with replacement, else draw 0 only.

    Lazy, so that one perturbed copy of the scores exists at a time. Shapes: scores (Q, b), rows (b,) or
    (Q, b), the corpus rows the noise is keyed by -> m (or 1) of (Q, b).
    """
    for k in range(num_samples if replacement else 1):
        yield scores + noise(key, query_ids, rows, k, scores.dtype)  # (Q, b)


def _merge_block_draws(
    result: ScanResult, perturbed: Iterator[Tensor], start: int, replacement: bool
) -> None:
    """Fold the draws of the block of slots [start, start + b) into the running draws of ``result``.

    With replacement, draw k is the running argmax of ``perturbed[k]`` (ties: the earlier block keeps it);
    without, the block's perturbed top-m is merged into the running top-m. Shapes: perturbed of (Q, b).
    """
    num_samples = result.keys.shape[1]
    if replacement:
        for k, block in enumerate(perturbed):
            value, index = block.max(1)  # (Q,), (Q,)
            better = value > result.keys[:, k]  # (Q,)
            result.keys[:, k] = torch.where(better, value, result.keys[:, k])
            result.slots[:, k] = torch.where(better, index + start, result.slots[:, k])
        return
    block = next(perturbed)  # (Q, b)
    top_val, top_idx = block.topk(min(num_samples, block.shape[1]), dim=1)  # (Q, <=m)
    result.keys, result.slots = top_m(
        torch.cat([result.keys, top_val], 1), torch.cat([result.slots, top_idx + start], 1), num_samples
    )  # (Q, m), (Q, m)


def nothing_drawn(num_queries: int, num_samples: int, device: torch.device) -> ScanResult:
    """The scan of a shard with no unmasked slot: no mass, no slot above the positive, no draw."""
    return ScanResult(
        lse=torch.full((num_queries,), float("-inf"), device=device),  # (Q,)
        above=torch.zeros(num_queries, dtype=torch.long, device=device),  # (Q,)
        slots=torch.full((num_queries, num_samples), -1, dtype=torch.long, device=device),  # (Q, m)
        keys=torch.full((num_queries, num_samples), float("-inf"), device=device),  # (Q, m)
    )


def top_m(keys: Tensor, items: Tensor, m: int) -> tuple[Tensor, Tensor]:
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
        best, picked = top_m(
            keys.permute(1, 0, 2).flatten(1), items.permute(1, 0, 2).flatten(1), keys.shape[2]
        )
    picked = picked.masked_fill(~torch.isfinite(best), -1)  # (Q, m)
    total = combine_lse(lse)  # (Q,)
    merged_mean = None
    if mean is not None:
        share = torch.exp(lse - total[None]).nan_to_num(0.0)  # (S, Q)
        merged_mean = (share[..., None] * mean).sum(0)  # (Q, D)
    return ScanResult(total, above.sum(0), picked, best, merged_mean)
