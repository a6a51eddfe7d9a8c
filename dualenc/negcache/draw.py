"""One step's draw of negatives from the sharded table, and its collectives (ALGORITHMS.md A3).

Every process scores all P·B gathered queries of the step against its own shard
(:mod:`dualenc.negcache.scan`), masking each query's known positives, the batch's documents and empty slots.
The shards' small per-query results (log-sum-exp, rank count, m candidates with their perturbed scores) are
all-gathered, and each process merges those of its own queries (:func:`~dualenc.negcache.scan.merge_shards`):
exactly the draws of one scan over the whole table, for any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dualenc.losses.sce import default_bucket_count
from dualenc.losses.sce_config import SCEConfig
from dualenc.negcache.config import CacheConfig
from dualenc.negcache.gumbel import GumbelKey
from dualenc.negcache.scan import ScanResult, merge_shards, scan_table
from dualenc.negcache.sce_candidates import scan_candidates
from dualenc.negcache.table import EmbeddingTable


@dataclass
class CacheDraw:
    """The negatives drawn for this process's queries. Shapes: B local queries, m draws each."""

    doc_idx: Tensor  # (B, m) corpus rows, -1 = no draw (nothing left in the cache)
    weight: Tensor  # (B, m) w_k of the lumped logit: 1/#draws, 0 for missing draws
    rest_lse: Tensor  # (B,) log-sum-exp of the stale scaled scores of the unmasked cache
    pos_rank: Tensor  # (B,) 1 + number of unmasked slots whose stale score beats the live positive score
    mean: Tensor | None = None  # (B, D) softmax-weighted mean of the unmasked cached embeddings (with_mean)


@dataclass
class StepQueries:
    """This process's part of a step, as :meth:`CacheSampler.draw` needs it (B local queries)."""

    q_emb: Tensor  # (B, D) live queries
    pos_score: Tensor  # (B,) scaled live score of each query's positive
    positives: Tensor  # (B, P) corpus rows of each query's known positives, padded with -1
    batch_docs: Tensor  # (N,) corpus rows of the local batch's documents
    scale: Tensor  # () 1/τ of the loss
    step: int  # the global micro-batch counter: with the run seed it keys the Gumbel noise


def gather_stacked(accelerator, x: Tensor) -> Tensor:
    """(n, ...) from every process stacked -> (P, n, ...); no collective with one process."""
    if accelerator.num_processes == 1:
        return x[None]
    return accelerator.gather(x[None].contiguous())


class CacheSampler:
    """Draws the step's negatives from this process's table shard together with the other processes'.

    Args:
        table: this process's shard.
        accelerator: gives rank, world size and the collectives.
        cfg: the ``cache`` config section (draws per query, replacement, masking, candidates, block size).
        sce: the ``sce`` config section (bucket sizes of ``cache_candidates=sce``).
        seed: the run seed; with the step it keys the Gumbel noise.
    """

    def __init__(self, table: EmbeddingTable, accelerator, cfg: CacheConfig, sce: SCEConfig, seed: int):
        self.table, self.accelerator, self.cfg, self.sce, self.seed = table, accelerator, cfg, sce, seed

    def gather(self, x: Tensor) -> Tensor:
        """(n, ...) from every process stacked -> (P, n, ...); no collective with one process."""
        return gather_stacked(self.accelerator, x)

    @torch.no_grad()
    def draw(
        self,
        step: StepQueries,
        *,
        cross_device: bool,
        with_mean: bool = False,
        generator: torch.Generator | None = None,
    ) -> CacheDraw:
        """Draw ``cfg.num_cache_negatives`` per local query from the softmax over the whole (sharded) table.

        A collective: every process calls it with its own queries. With ``cfg.cache_inbatch`` the batch's
        documents (every process's when ``cross_device``) are removed from the cache's mass R. ``with_mean``
        also combines the shards' softmax-weighted mean embeddings (cache-CE's gradient; dense candidates
        only). ``generator`` draws the SCE bucket centres (``cfg.cache_candidates == "sce"``) and must be the
        same on every process. For a fixed global batch the draws, ``rest_lse``, ``pos_rank`` and ``mean`` do
        not depend on the number of processes.
        """
        acc, device, local = self.accelerator, self.table.emb.device, step.q_emb.shape[0]
        positives = step.positives  # (B, P)
        if acc.num_processes > 1:
            positives = acc.pad_across_processes(positives, dim=1, pad_index=-1)  # (B, P_max)
        queries = self.gather(step.q_emb.detach().float()).flatten(0, 1).to(device)  # (Q=P*B, D)
        scan = self._scan(queries, step, positives, cross_device, with_mean, generator)
        if with_mean and scan.mean is None:
            raise ValueError("the softmax mean (loss=cache_ce) needs cache_candidates=dense")
        rows = torch.where(scan.slots >= 0, self.table.doc_idx[scan.slots.clamp(min=0)], -1)  # (Q, m)
        mine = slice(acc.process_index * local, (acc.process_index + 1) * local)

        def of_mine(x: Tensor) -> Tensor:  # every shard's (Q, ...) -> (S, B, ...) for this process's queries
            return self.gather(x)[:, mine]

        merged = merge_shards(
            of_mine(scan.lse),
            of_mine(scan.above),
            of_mine(scan.keys),
            of_mine(rows),
            replacement=self.cfg.cache_sample_with_replacement,
            mean=of_mine(scan.mean) if with_mean else None,
        )
        valid = merged.slots >= 0  # (B, m)
        weight = valid.float() / valid.sum(1, keepdim=True).clamp(min=1)  # (B, m)
        return CacheDraw(merged.slots, weight, merged.lse, 1 + merged.above, merged.mean)

    def _scan(
        self,
        queries: Tensor,
        step: StepQueries,
        positives: Tensor,
        cross_device: bool,
        with_mean: bool,
        generator: torch.Generator | None,
    ) -> ScanResult:
        """This shard's scan for every gathered query (global query id = row of ``queries`` (Q, D))."""
        cfg, device = self.cfg, self.table.emb.device
        all_pos = self.gather(positives).flatten(0, 1)  # (Q, P)
        seen = None
        if cfg.cache_inbatch:
            seen = self.gather(step.batch_docs).to(device)  # (S, N)
            if cross_device:  # every query sees every process's documents
                seen = seen.flatten()[None].expand(self.accelerator.num_processes, -1)  # (S, S*N)
        all_pos_score = self.gather(step.pos_score.detach().float()).flatten()  # (Q,)
        mask_rows, mask_slots, home_slots = _masked_slots(self.table, all_pos.to(device), seen)
        common = dict(
            pos_score=all_pos_score.to(device),  # (Q,)
            mask_rows=mask_rows,
            mask_slots=mask_slots,
            home_slots=home_slots,
            num_samples=cfg.num_cache_negatives,
            replacement=cfg.cache_sample_with_replacement,
            key=GumbelKey(self.seed, step.step),
            query_ids=torch.arange(queries.shape[0], device=device),  # (Q,)
            block_size=cfg.cache_score_block_size,
        )
        if cfg.cache_candidates == "sce":
            default = default_bucket_count(queries.shape[0])
            return scan_candidates(
                self.table,
                queries,
                step.scale,
                num_buckets=self.sce.sce_n_buckets or default,
                bucket_size_x=self.sce.sce_bucket_size_x or default,
                bucket_size_y=self.sce.sce_bucket_size_y,
                mix=self.sce.sce_mix,
                generator=generator,
                **common,
            )
        return scan_table(self.table, queries, step.scale, with_mean=with_mean, **common)


def _masked_slots(
    table: EmbeddingTable, positives: Tensor, batch_docs: Tensor | None
) -> tuple[Tensor, Tensor, list[Tensor] | None]:
    """(query row, local slot) pairs of the queries' positives, and per home process the slots of its batch.

    Shapes: positives (Q, P) corpus rows padded with -1; batch_docs (S, N) the documents each process's
    queries see exactly in the loss (None = none) -> (K,), (K,), S of (n_s,).
    """
    slots = table.locate(positives.reshape(-1))  # (Q*P,)
    rows = torch.arange(positives.shape[0], device=slots.device).repeat_interleave(positives.shape[1])
    hit = slots >= 0  # (Q*P,)
    home = None
    if batch_docs is not None:
        home = [s[s >= 0] for s in table.locate(batch_docs.reshape(-1)).view(batch_docs.shape)]
    return rows[hit], slots[hit], home
