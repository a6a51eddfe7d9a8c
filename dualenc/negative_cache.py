"""The negative cache during training (Lindgren et al., NeurIPS 2021; ALGORITHMS.md A1-A4).

Per process, one :class:`~dualenc.cache.EmbeddingTable` shard. Each step:

1. ``sample``: every process scores all P·B queries of the step against its shard (stale embeddings), masks
   each query's known positives, the batch's documents and empty slots, and returns per query its local
   log-sum-exp and m local Gumbel-max candidates. These small tuples are all-gathered; each query's home process
   picks the shard of every draw by Gumbel-max over the shard log-sum-exps (exact two-stage sampling, A3), or,
   without replacement, merges the shards' Gumbel-top-m perturbed scores (exact Gumbel-top-m).
2. the trainer re-encodes the drawn documents with gradient (``negative_features``) and computes the loss.
3. ``write_back``: fresh embeddings of the batch's documents and of the drawn negatives go to their owning
   shard (one all-gather); in stream mode the batch's documents are inserted into the local FIFO.
4. ``end_step``: corpus mode re-encodes the ``refresh_fraction`` oldest slots of each shard without gradient;
   every slot ages by one.

Randomness comes from generators seeded by (seed, rank, step): a resumed run draws the same negatives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dualenc.cache import EmbeddingTable
from dualenc.cache_scan import scan_candidates, scan_table
from dualenc.config_sections import CacheConfig, SCEConfig
from dualenc.data import doc_text
from dualenc.encode import shard_bounds
from dualenc.sampler import choose_shards, combine_lse, staleness

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CacheDraw:
    """The negatives drawn for this process's queries. Shapes: B local queries, m draws each."""

    doc_idx: Tensor  # (B, m) corpus rows, -1 = no draw (nothing left in the cache)
    weight: Tensor  # (B, m) w_k of the lumped logit: 1/#draws, 0 for missing draws
    rest_lse: Tensor  # (B,) log-sum-exp of the stale scaled scores of the unmasked cache
    pos_rank: Tensor  # (B,) 1 + number of unmasked slots whose stale score beats the live positive score
    mean: Tensor | None = None  # (B, D) softmax-weighted mean of the unmasked cached embeddings (with_mean)


def generator_for(seed: int, rank: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, rank, step, stream) only, so a resumed run reproduces every draw."""
    value = int(np.random.SeedSequence([seed, rank, step, stream]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(value)


class NegativeCache:
    """Owns this process's table shard and runs the per-step protocol above.

    Args:
        cfg: the ``cache`` config section.
        corpus: the training corpus (``id``, ``title``, ``text``); slots hold its row indices.
        accelerator: gives rank, world size, device and the collectives.
        dim: embedding dimension D.
        seed: run seed (generators are derived from it).
    """

    def __init__(
        self, cfg: CacheConfig, corpus, accelerator, dim: int, *, seed: int, sce: SCEConfig | None = None
    ):
        self.cfg, self.corpus, self.accelerator, self.seed = cfg, corpus, accelerator, seed
        self.sce = sce or SCEConfig()
        rank, world = accelerator.process_index, accelerator.num_processes
        if cfg.cache_mode == "corpus":
            start, end = shard_bounds(len(corpus), rank, world)
        else:
            start, end = shard_bounds(cfg.cache_size, rank, world)
        self.table = EmbeddingTable(end - start, dim, dtype=DTYPES[cfg.cache_dtype], device=accelerator.device,
                                    slot_offset=start)  # fmt: skip
        self.logs: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- filling
    def fill(self, model, work_dir: Path, *, batch_size: int) -> None:
        """Corpus mode: encode this process's shard of the corpus (no grad, resumable) and load it."""
        from dualenc.encode import encode_collection, model_fingerprint

        acc = self.accelerator
        path = encode_collection(
            model, self.corpus, work_dir, batch_size=batch_size, process_index=acc.process_index,
            num_processes=acc.num_processes, device=acc.device, progress=acc.is_local_main_process,
            autocast_dtype=torch.bfloat16 if acc.device.type == "cuda" else None, model_id=model_fingerprint(model),
        )  # fmt: skip
        emb = torch.from_numpy(np.load(path))  # (M_local, D)
        rows = torch.arange(
            self.table.slot_offset, self.table.slot_offset + self.table.num_slots
        )  # (M_local,)
        self.table.fill_corpus(emb.to(self.table.emb.device), rows.to(self.table.emb.device))
        logger.info("cache shard %d filled: %d documents", acc.process_index, self.table.num_slots)

    # ------------------------------------------------------------------------------------------- sampling
    def _gather(self, x: Tensor) -> Tensor:
        """(n, ...) from every process stacked -> (P, n, ...); no collective with one process."""
        if self.accelerator.num_processes == 1:
            return x[None]
        return self.accelerator.gather(x[None].contiguous())

    def _masks(
        self, positives: Tensor, batch_docs: Tensor | None
    ) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """(query row, local slot) pairs of the queries' positives, and per home process the slots of its batch.

        Shapes: positives (Q, P) corpus rows padded with -1; batch_docs (S, N) the documents each process's
        queries see exactly in the loss (None = none).
        """
        slots = self.table.locate(positives.reshape(-1))  # (Q*P,)
        rows = torch.arange(positives.shape[0], device=slots.device).repeat_interleave(positives.shape[1])
        hit = slots >= 0
        home = None
        if batch_docs is not None:
            home = [s[s >= 0] for s in self.table.locate(batch_docs.reshape(-1)).view(batch_docs.shape)]
        return rows[hit], slots[hit], home

    @torch.no_grad()
    def sample(self, q_emb: Tensor, pos_score: Tensor, positives: Tensor, batch_docs: Tensor, scale: Tensor,
               step: int, *, cross_device: bool, with_mean: bool = False) -> CacheDraw:  # fmt: skip
        """Draw ``num_cache_negatives`` per local query, exactly from the softmax over the whole (sharded) table.

        Shapes: q_emb (B, D), pos_score (B,) scaled live positive scores, positives (B, P) corpus rows padded with
        -1, batch_docs (N,) corpus rows of the local batch documents -> CacheDraw. With ``cache_inbatch`` the
        batch's documents (every process's when ``cross_device``) are removed from the cache's mass R.
        ``with_mean`` also combines the shards' softmax-weighted mean embeddings (cache-CE's gradient).
        """
        acc, m, device = self.accelerator, self.cfg.num_cache_negatives, self.table.emb.device
        rank, world, batch = acc.process_index, acc.num_processes, q_emb.shape[0]
        if world > 1:
            positives = acc.pad_across_processes(positives, dim=1, pad_index=-1)
        queries = self._gather(q_emb.detach().float()).flatten(0, 1)  # (Q=P*B, D)
        all_pos = self._gather(positives).flatten(0, 1)  # (Q, P)
        seen = None
        if self.cfg.cache_inbatch:
            seen = self._gather(batch_docs).to(device)  # (S, N)
            if cross_device:
                seen = seen.flatten()[None].expand(world, -1)  # every query sees every process's documents
        all_pos_score = self._gather(pos_score.detach().float()).flatten()  # (Q,)
        mask_rows, mask_slots, home_slots = self._masks(all_pos.to(device), seen)
        common = dict(
            pos_score=all_pos_score.to(device), mask_rows=mask_rows, mask_slots=mask_slots, home_slots=home_slots,
            num_samples=m, replacement=self.cfg.cache_sample_with_replacement,
            generator=generator_for(self.seed, rank, step, 0, device), block_size=self.cfg.cache_score_block_size,
        )  # fmt: skip
        if self.cfg.cache_candidates == "sce":
            default = max(1, int(2 * queries.shape[0] ** 0.5))
            scan = scan_candidates(
                self.table, queries.to(device), scale, num_buckets=self.sce.sce_n_buckets or default,
                bucket_size_x=self.sce.sce_bucket_size_x or default, bucket_size_y=self.sce.sce_bucket_size_y,
                mix=self.sce.sce_mix, **common,
            )  # fmt: skip
        else:
            scan = scan_table(self.table, queries.to(device), scale, with_mean=with_mean, **common)
        local_lse, above, cand, key = (
            scan.lse,
            scan.above,
            scan.slots,
            scan.keys,
        )  # (Q,), (Q,), (Q, m), (Q, m)
        cand_doc = torch.where(cand >= 0, self.table.doc_idx[cand.clamp(min=0)], torch.full_like(cand, -1))
        mine = slice(rank * batch, (rank + 1) * batch)
        lse = self._gather(local_lse)[:, mine]  # (S, B) shard log-sum-exps of my queries
        docs = self._gather(cand_doc)[:, mine]  # (S, B, m)
        home_gen = generator_for(self.seed, rank, step, 1, device)
        if self.cfg.cache_sample_with_replacement:
            shard = choose_shards(lse, m, generator=home_gen)  # (B, m)
            picked = docs.gather(0, shard.clamp(min=0)[None]).squeeze(0)  # (B, m)
            picked = torch.where(shard >= 0, picked, torch.full_like(picked, -1))
        else:  # global Gumbel-top-m = top-m of the shards' perturbed top-m
            keys = self._gather(key.masked_fill(cand < 0, float("-inf")))[:, mine]  # (S, B, m)
            flat_keys, flat_docs = (
                keys.permute(1, 0, 2).flatten(1),
                docs.permute(1, 0, 2).flatten(1),
            )  # (B, S*m)
            best_keys, best = flat_keys.topk(m, dim=1)  # (B, m)
            picked = torch.where(
                torch.isfinite(best_keys), flat_docs.gather(1, best), torch.full_like(best, -1)
            )
        valid = picked >= 0  # (B, m)
        weight = valid.float() / valid.sum(1, keepdim=True).clamp(min=1)  # (B, m)
        pos_rank = 1 + self._gather(above)[:, mine].sum(0)  # (B,)
        rest_lse, mean = combine_lse(lse), None
        if with_mean:  # mix the shards' means by their share of the mass
            share = torch.exp(lse - rest_lse[None]).nan_to_num(0.0)  # (S, B)
            mean = (share[..., None] * self._gather(scan.mean)[:, mine]).sum(0)  # (B, D)
        return CacheDraw(picked, weight, rest_lse, pos_rank, mean)

    def negative_texts(self, draw: CacheDraw) -> list[str]:
        """Texts of the valid draws, in row-major order of ``draw.doc_idx``."""
        rows = draw.doc_idx[draw.doc_idx >= 0].tolist()
        part = self.corpus[rows] if rows else {"title": [], "text": []}
        return [doc_text(t, x) for t, x in zip(part["title"], part["text"], strict=True)]

    # ------------------------------------------------------------------------------------------- updates
    @torch.no_grad()
    def write_back(self, doc_idx: Tensor, emb: Tensor, *, insert: Tensor | None = None) -> None:
        """Write fresh embeddings of documents to their owning shards (all-gather); stream mode also inserts.

        Shapes: doc_idx (n,) corpus rows (-1 = skip), emb (n, D); insert (k,) positions of rows that a stream cache
        inserts into this process's FIFO when absent (the batch's own documents).
        """
        all_idx = self._gather(doc_idx.contiguous()).flatten()  # (P*n,)
        all_emb = self._gather(emb.detach().contiguous()).flatten(0, 1)  # (P*n, D)
        slots = self.table.locate(all_idx.to(self.table.doc_idx.device))  # (P*n,)
        hit = slots >= 0
        if hit.any():
            fresh = all_emb[hit].to(self.table.emb.device)  # (h, D)
            self.logs["cache/staleness_written"] = float(
                staleness(self.table.emb[slots[hit]].float(), fresh.float()).mean()
            )
            reset = self.cfg.cache_mode == "corpus" or self.cfg.cache_lru
            self.table.write(slots[hit], fresh, reset_age=reset)
        if self.cfg.cache_mode == "stream" and insert is not None:
            new = doc_idx[insert]  # (k,)
            self.table.insert(new[new >= 0], emb.detach()[insert][new >= 0])

    @torch.no_grad()
    def end_step(self, model) -> dict[str, float]:
        """Refresh the oldest ``refresh_fraction`` of the shard (corpus mode), age every slot; return logs."""
        if self.cfg.cache_mode == "corpus" and self.cfg.refresh_fraction > 0:
            count = max(1, round(self.cfg.refresh_fraction * self.table.num_slots))
            slots = self.table.oldest(count)  # (count,)
            rows = self.table.doc_idx[slots]  # (count,)
            from dualenc.encode import encode_texts

            part = self.corpus[rows.tolist()]
            texts = [doc_text(t, x) for t, x in zip(part["title"], part["text"], strict=True)]
            was_training = model.training
            model.eval()  # cached embeddings without dropout noise
            fresh = torch.from_numpy(encode_texts(model, texts, kind="doc", batch_size=self.cfg.cache_fill_batch_size,
                                                  device=self.table.emb.device))  # fmt: skip
            model.train(was_training)
            fresh = fresh.to(self.table.emb.device)  # (count, D)
            self.logs["cache/staleness_refresh"] = float(
                staleness(self.table.emb[slots].float(), fresh).mean()
            )
            self.table.write(slots, fresh)
            self.logs["cache/refreshed"] = count / self.table.num_slots
        self.table.tick()
        ages = self.table.age.float()
        self.logs.update({"cache/age_mean": float(ages.mean()), "cache/age_max": float(ages.max()),
                          "cache/filled": float(self.table.filled.float().mean())})  # fmt: skip
        logs, self.logs = self.logs, {}
        return logs
