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
