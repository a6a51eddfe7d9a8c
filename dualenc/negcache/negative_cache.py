"""The negative cache during training (Lindgren et al., NeurIPS 2021; ALGORITHMS.md A1-A4).

Per process, one :class:`~dualenc.negcache.table.EmbeddingTable` shard (process p owns global slots offset_p ..). Each step:

1. ``sample``: every process scores all P·B gathered queries of the step against its shard (stale embeddings),
   masks each query's known positives, the batch's documents and empty slots, and returns per query its local
   log-sum-exp, rank count and m Gumbel-max candidates (or Gumbel-top-m) with their perturbed scores. The Gumbel
   noise of (query, document, draw k) is keyed by (seed, step, global query id, corpus row, k)
   (:func:`dualenc.negcache.gumbel.keyed_gumbel`), so the global draw is the shard candidate with the largest perturbed
   score (top-m of the shards' top-m without replacement): exact, and the same for any number of processes.
   These small tuples are all-gathered and merged by each query's home process (:func:`merge_shards`).
2. the trainer re-encodes the drawn documents with gradient (``negative_texts``) and computes the loss.
3. ``write_back``: fresh embeddings of the batch's documents and of the drawn negatives go to their owning
   shard (one all-gather); in stream mode the batch's documents are inserted into the local FIFO.
4. ``refresh`` (once per optimizer step): corpus mode re-encodes, without gradient, the ``refresh_fraction``
   globally oldest slots of the whole table (each by its owner); every slot ages by one.

The noise is keyed by the corpus row, so a document held by two slots (possible only in stream mode, where each
process's FIFO skips only its own duplicates) gets the same noise in both and is drawn as if it had the larger of
its two scores, while ``rest_lse`` counts both.

For a fixed global batch, draws, ``rest_lse``, ``pos_rank``, the softmax mean and the refreshed slots are the same
with 1 process as with P (a draw can differ only where two perturbed scores tie within the float rounding of
the scores); a resumed run redraws the same negatives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dualenc.io.readers import doc_text
from dualenc.model.options import resolve_dtype
from dualenc.negcache.gumbel import GumbelKey, derived_seed, staleness
from dualenc.negcache.scan import ScanResult, merge_shards, scan_candidates, scan_table
from dualenc.negcache.table import EmbeddingTable
from dualenc.retrieval.encode import shard_bounds
from dualenc.training.config_sections import CacheConfig, SCEConfig

logger = logging.getLogger(__name__)


@dataclass
class CacheDraw:
    """The negatives drawn for this process's queries. Shapes: B local queries, m draws each."""

    doc_idx: Tensor  # (B, m) corpus rows, -1 = no draw (nothing left in the cache)
    weight: Tensor  # (B, m) w_k of the lumped logit: 1/#draws, 0 for missing draws
    rest_lse: Tensor  # (B,) log-sum-exp of the stale scaled scores of the unmasked cache
    pos_rank: Tensor  # (B,) 1 + number of unmasked slots whose stale score beats the live positive score
    mean: Tensor | None = None  # (B, D) softmax-weighted mean of the unmasked cached embeddings (with_mean)


def shared_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, step, stream) only: the same on every process, and in a resumed run."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, step, stream))


class NegativeCache:
    """Owns this process's table shard and runs the per-step protocol above.

    Args:
        cfg: the ``cache`` config section.
        corpus: the training corpus (``id``, ``title``, ``text``); slots hold its row indices.
        accelerator: gives rank, world size, device and the collectives.
        dim: embedding dimension D.
        seed: run seed; with the step it keys the Gumbel noise (and seeds the SCE bucket centres).
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
        self.table = EmbeddingTable(
            end - start,
            dim,
            dtype=resolve_dtype(cfg.cache_dtype),
            device=accelerator.device,
            slot_offset=start,
        )
        self._stats = _empty_stats(self.table.emb.device)

    # ------------------------------------------------------------------------------------------- filling
    def fill(self, model, work_dir: Path, *, batch_size: int) -> None:
        """Corpus mode: encode this process's shard of the corpus (no grad, resumable) and load it."""
        from dualenc.retrieval.encode import encode_collection, model_fingerprint

        acc = self.accelerator
        path = encode_collection(
            model,
            self.corpus,
            work_dir,
            batch_size=batch_size,
            process_index=acc.process_index,
            num_processes=acc.num_processes,
            device=acc.device,
            progress=acc.is_local_main_process,
            autocast_dtype=torch.bfloat16 if acc.device.type == "cuda" else None,
            model_id=model_fingerprint(model),
        )
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
    def sample(
        self,
        q_emb: Tensor,
        pos_score: Tensor,
        positives: Tensor,
        batch_docs: Tensor,
        scale: Tensor,
        step: int,
        *,
        cross_device: bool,
        with_mean: bool = False,
    ) -> CacheDraw:
        """Draw ``num_cache_negatives`` per local query, exactly from the softmax over the whole (sharded) table.

        Shapes: q_emb (B, D), pos_score (B,) scaled live positive scores, positives (B, P) corpus rows padded with
        -1, batch_docs (N,) corpus rows of the local batch documents -> CacheDraw. With ``cache_inbatch`` the
        batch's documents (every process's when ``cross_device``) are removed from the cache's mass R.
        ``with_mean`` also combines the shards' softmax-weighted mean embeddings (cache-CE's gradient).
        ``step`` is the global micro-batch counter: with the run seed it keys the Gumbel noise, so the draws, like
        ``rest_lse``, ``pos_rank`` and ``mean``, do not depend on the number of processes for a fixed global batch.
        """
        acc, device = self.accelerator, self.table.emb.device
        if acc.num_processes > 1:
            positives = acc.pad_across_processes(positives, dim=1, pad_index=-1)
        queries = self._gather(q_emb.detach().float()).flatten(0, 1).to(device)  # (Q=P*B, D)
        scan = self._scan(queries, pos_score, positives, batch_docs, scale, step, cross_device, with_mean)
        if with_mean and scan.mean is None:
            raise ValueError("the softmax mean (loss=cache_ce) needs cache_candidates=dense")
        rows = torch.where(scan.slots >= 0, self.table.doc_idx[scan.slots.clamp(min=0)], -1)  # (Q, m)
        mine = slice(acc.process_index * q_emb.shape[0], (acc.process_index + 1) * q_emb.shape[0])
        merged = merge_shards(
            self._gather(scan.lse)[:, mine],
            self._gather(scan.above)[:, mine],
            self._gather(scan.keys)[:, mine],
            self._gather(rows)[:, mine],
            replacement=self.cfg.cache_sample_with_replacement,
            mean=self._gather(scan.mean)[:, mine] if with_mean else None,
        )
        valid = merged.slots >= 0  # (B, m)
        weight = valid.float() / valid.sum(1, keepdim=True).clamp(min=1)  # (B, m)
        return CacheDraw(merged.slots, weight, merged.lse, 1 + merged.above, merged.mean)

    def _scan(
        self,
        queries: Tensor,
        pos_score: Tensor,
        positives: Tensor,
        batch_docs: Tensor,
        scale: Tensor,
        step: int,
        cross_device: bool,
        with_mean: bool,
    ) -> ScanResult:
        """This shard's scan for every gathered query (global query id = row of ``queries``). Shapes as sample."""
        device, world = self.table.emb.device, self.accelerator.num_processes
        all_pos = self._gather(positives).flatten(0, 1)  # (Q, P)
        seen = None
        if self.cfg.cache_inbatch:
            seen = self._gather(batch_docs).to(device)  # (S, N)
            if cross_device:
                seen = seen.flatten()[None].expand(world, -1)  # every query sees every process's documents
        all_pos_score = self._gather(pos_score.detach().float()).flatten()  # (Q,)
        mask_rows, mask_slots, home_slots = self._masks(all_pos.to(device), seen)
        common = dict(
            pos_score=all_pos_score.to(device),
            mask_rows=mask_rows,
            mask_slots=mask_slots,
            home_slots=home_slots,
            num_samples=self.cfg.num_cache_negatives,
            replacement=self.cfg.cache_sample_with_replacement,
            key=GumbelKey(self.seed, step),
            query_ids=torch.arange(queries.shape[0], device=device),
            block_size=self.cfg.cache_score_block_size,
        )
        if self.cfg.cache_candidates == "sce":
            default = max(1, int(2 * queries.shape[0] ** 0.5))
            return scan_candidates(
                self.table,
                queries,
                scale,
                num_buckets=self.sce.sce_n_buckets or default,
                bucket_size_x=self.sce.sce_bucket_size_x or default,
                bucket_size_y=self.sce.sce_bucket_size_y,
                mix=self.sce.sce_mix,
                generator=shared_generator(self.seed, step, 0, device),
                **common,
            )
        return scan_table(self.table, queries, scale, with_mean=with_mean, **common)

    def negative_texts(self, draw: CacheDraw) -> list[str]:
        """Texts of the valid draws, in row-major order of ``draw.doc_idx``."""
        return self._row_texts(draw.doc_idx[draw.doc_idx >= 0].tolist())

    def _row_texts(self, rows: list[int]) -> list[str]:
        """``title + " " + text`` of corpus ``rows``, in order."""
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
            gap = staleness(self.table.emb[slots[hit]].float(), fresh.float())  # (h,)
            self._count("written", gap)
            reset = self.cfg.cache_mode == "corpus" or self.cfg.cache_lru
            self.table.write(slots[hit], fresh, reset_age=reset)
        if self.cfg.cache_mode == "stream" and insert is not None:
            new = doc_idx[insert]  # (k,)
            self.table.insert(new[new >= 0], emb.detach()[insert][new >= 0])

    @torch.no_grad()
    def refresh(self, model) -> dict[str, float]:
        """End of an optimizer step: re-encode the globally oldest slots (corpus mode), age every slot by one.

        Corpus mode: the k = max(1, round(refresh_fraction · total slots of all processes)) oldest slots of the
        whole table, by (age descending, global slot ascending), are re-encoded without gradient by their owners
        (the paper's refresh of a fraction of the cache per iteration, oldest first; A2). The selection does not
        depend on the sharding. Stream mode: no re-encoding (FIFO per process). Collective: every process calls it.

        Returns the logs, reduced over processes: ``cache/staleness_refresh`` (mean relative squared error of the
        re-encoded slots), ``cache/refreshed`` (fraction re-encoded), ``cache/staleness_written`` (mean over the
        write-backs since the last refresh), ``cache/age_mean``, ``cache/age_max``, ``cache/filled``.
        """
        refreshed = 0
        if self.cfg.cache_mode == "corpus" and self.cfg.refresh_fraction > 0:
            total = len(self.corpus)  # corpus mode: the shards hold one slot per corpus document
            refreshed = max(1, round(self.cfg.refresh_fraction * total)) if total else 0
            self._refresh_slots(model, self._global_oldest(refreshed))
        self.table.tick()
        return self._reduced_logs(refreshed)

    def _global_oldest(self, count: int) -> Tensor:
        """Local slots of this shard among the ``count`` oldest slots of the whole table. Shapes: -> (k_local,).

        Order: age descending (empty slots first, as :meth:`EmbeddingTable.oldest`), then global slot ascending.
        Each shard offers its own ``count`` oldest; the global selection is computed identically on every process.
        """
        table = self.table
        local = table.oldest(min(count, table.num_slots))  # (c,) oldest first
        age = torch.where(table.filled, table.age.long(), 2**32)[local]  # (c,) empty = older than any age
        pad = count - local.numel()
        age = torch.cat([age, age.new_full((pad,), -(2**62))])  # (count,) padding sorts last
        slot = torch.cat([local + table.slot_offset, local.new_full((pad,), -1)])  # (count,) global slots
        ages, slots = self._gather(age).flatten(), self._gather(slot).flatten()  # (P*count,)
        order = torch.argsort(slots, stable=True)  # global slot ascending ...
        order = order[torch.argsort(ages[order], descending=True, stable=True)]  # ... within age descending
        chosen = slots[order[:count]]  # (count,)
        mine = (chosen >= table.slot_offset) & (chosen < table.slot_offset + table.num_slots)
        return chosen[mine] - table.slot_offset  # (k_local,)

    def _refresh_slots(self, model, slots: Tensor) -> None:
        """Re-encode the documents of local ``slots`` (eval mode, no grad) and write them. Shapes: (k,)."""
        if slots.numel() == 0:
            return
        fresh = self._encode_rows(model, self.table.doc_idx[slots])  # (k, D)
        gap = staleness(self.table.emb[slots].float(), fresh.float())  # (k,)
        self._count("refresh", gap)
        self.table.write(slots, fresh)

    def _encode_rows(self, model, rows: Tensor) -> Tensor:
        """Embeddings of corpus ``rows`` by the document tower, without dropout or gradient. Shapes: (k,) -> (k, D)."""
        from dualenc.retrieval.encode import encode_texts

        texts = self._row_texts(rows.tolist())
        was_training = model.training
        model.eval()  # cached embeddings without dropout noise
        fresh = encode_texts(
            model, texts, kind="doc", batch_size=self.cfg.cache_fill_batch_size, device=self.table.emb.device
        )
        model.train(was_training)
        return torch.from_numpy(fresh).to(self.table.emb.device)  # (k, D)

    def _count(self, name: str, gap: Tensor) -> None:
        """Add per-slot staleness values (n,) to the running (sum, count) ``name`` (no device synchronisation)."""
        self._stats[name] += torch.stack([gap.sum(), gap.new_tensor(float(gap.numel()))]).to(
            self._stats[name]
        )

    def _reduced_logs(self, refreshed: int) -> dict[str, float]:
        """The step's logs, summed (age: maxed) over processes; resets the staleness statistics."""
        table, device = self.table, self.table.emb.device
        age = table.age.double()  # (M,)
        top = age.max() if table.num_slots else age.new_tensor(float("-inf"))  # ()
        local = torch.cat(
            [
                self._stats["refresh"],
                self._stats["written"],
                torch.stack([age.sum(), table.filled.sum().double(), age.new_tensor(table.num_slots), top]),
            ]
        )
        stats = self._gather(local.to(device)).cpu()  # (P, 8)
        ref_sum, ref_n, wr_sum, wr_n, age_sum, filled, slots = stats[:, :7].sum(0).tolist()
        self._stats = _empty_stats(device)
        logs = {
            "cache/age_mean": age_sum / max(slots, 1),
            "cache/age_max": float(stats[:, 7].max()),
            "cache/filled": filled / max(slots, 1),
        }
        if refreshed:
            logs.update(
                {"cache/staleness_refresh": ref_sum / max(ref_n, 1), "cache/refreshed": refreshed / slots}
            )
        if wr_n:
            logs["cache/staleness_written"] = wr_sum / wr_n
        return logs


def _empty_stats(device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Per-process (sum, count) of the staleness of refreshed and of written-back slots, since the last refresh."""
    return {name: torch.zeros(2, dtype=torch.float64, device=device) for name in ("refresh", "written")}
