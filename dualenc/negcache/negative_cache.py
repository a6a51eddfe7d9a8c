"""The negative cache during training (Lindgren et al., NeurIPS 2021; ALGORITHMS.md A1-A4).

Per process, one :class:`~dualenc.negcache.table.EmbeddingTable` shard (process p owns global slots
offset_p ..). :class:`NegativeCache` runs the per-step protocol on it:

1. ``sample`` (:class:`~dualenc.negcache.draw.CacheSampler`): every process scores all P·B gathered queries of
   the step against its shard (stale embeddings), masks each query's known positives, the batch's documents
   and empty slots, and keeps per query its local log-sum-exp, rank count and m Gumbel-max candidates (or
   Gumbel-top-m) with their perturbed scores. The Gumbel noise of (query, document, draw k) is keyed by
   (seed, step, global query id, corpus row, k) (:func:`dualenc.negcache.gumbel.keyed_gumbel`), so the global
   draw is the shard candidate with the largest perturbed score (top-m of the shards' top-m without
   replacement): exact, and the same for any number of processes. These small tuples are all-gathered and
   merged by each query's home process (:func:`~dualenc.negcache.scan.merge_shards`).
2. the trainer re-encodes the drawn documents with gradient (``negative_texts``) and computes the loss.
3. ``write_back``: fresh embeddings of the batch's documents and of the drawn negatives go to their owning
   shard (one all-gather); in stream mode the batch's documents are inserted into the local FIFO.
4. ``refresh`` (once per optimizer step): corpus mode re-encodes, without gradient, the ``refresh_fraction``
   globally oldest slots of the whole table (each by its owner;
   :func:`~dualenc.negcache.refresh.global_oldest`); every slot ages by one.

The noise is keyed by the corpus row, so a document held by two slots (possible only in stream mode, where
each process's FIFO skips only its own duplicates) gets the same noise in both and is drawn as if it had the
larger of its two scores, while ``rest_lse`` counts both.

For a fixed global batch, draws, ``rest_lse``, ``pos_rank``, the softmax mean and the refreshed slots are the
same with 1 process as with P (a draw can differ only where two perturbed scores tie within the float
rounding of the scores); a resumed run redraws the same negatives.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dualenc.io.embeddings import shard_bounds, shard_paths
from dualenc.io.readers import doc_texts
from dualenc.losses.sce_config import SCEConfig
from dualenc.model.options import resolve_dtype
from dualenc.negcache.config import CacheConfig
from dualenc.negcache.draw import CacheDraw, CacheSampler, StepQueries
from dualenc.negcache.fill_cost import FillCost, measure_fill
from dualenc.negcache.gumbel import derived_seed
from dualenc.negcache.refresh import StalenessStats, global_oldest, staleness
from dualenc.negcache.table import EmbeddingTable

logger = logging.getLogger(__name__)


def shared_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, step, stream) only: the same on every process, and in a resumed run.

    Streams: 0 = the cache's SCE bucket centres (``cache_candidates=sce``), 2 = those of ``loss=sce``.
    """
    return torch.Generator(device=device).manual_seed(derived_seed(seed, step, stream))


class NegativeCache:
    """Owns this process's table shard and runs the per-step protocol above.

    Args:
        cfg: the ``cache`` config section.
        corpus: the training corpus (``id``, ``title``, ``text``); slots hold its row indices.
        accelerator: gives rank, world size, device and the collectives.
        dim: embedding dimension D.
        seed: run seed; with the step it keys the Gumbel noise (and seeds the SCE bucket centres).
        sce: the ``sce`` config section (bucket sizes of ``cache_candidates=sce``); None = its defaults.
    """

    def __init__(
        self, cfg: CacheConfig, corpus, accelerator, dim: int, *, seed: int, sce: SCEConfig | None = None
    ):
        self.cfg, self.corpus, self.accelerator, self.seed = cfg, corpus, accelerator, seed
        self.sce = sce or SCEConfig()
        rank, world = accelerator.process_index, accelerator.num_processes
        num_slots = len(corpus) if cfg.cache_mode == "corpus" else cfg.cache_size
        start, end = shard_bounds(num_slots, rank, world)
        self.table = EmbeddingTable(
            end - start,
            dim,
            dtype=resolve_dtype(cfg.cache_dtype),
            device=accelerator.device,
            slot_offset=start,
        )
        self.sampler = CacheSampler(self.table, accelerator, cfg, self.sce, seed)
        self._stats = StalenessStats(self.table.emb.device)

    def fill(self, model, work_dir: Path, *, batch_size: int) -> FillCost:
        """Corpus mode: encode this process's shard of the corpus (no grad, resumable) and load it.

        The shards go to ``work_dir/<model fingerprint>``: a killed fill resumes with the same model, and a
        run that starts over with other weights encodes into a folder of its own instead of meeting the old
        rows. Returns the cost of the encode when an earlier session made the shard and this one reused it
        (:mod:`~dualenc.negcache.fill_cost`: the run's clocks add it), else zero (encoded now, on the clocks).
        """
        from dualenc.retrieval import encode_collection, model_fingerprint

        acc = self.accelerator
        model_id = model_fingerprint(model)
        shard_dir = Path(work_dir) / model_id[:16]

        def encode() -> Path:
            return encode_collection(
                model,
                self.corpus,
                shard_dir,
                batch_size=batch_size,
                process_index=acc.process_index,
                num_processes=acc.num_processes,
                device=acc.device,
                progress=acc.is_local_main_process,
                autocast_dtype=torch.bfloat16 if acc.device.type == "cuda" else None,
                model_id=model_id,
            )

        expected = shard_paths(shard_dir, acc.process_index, acc.num_processes)[0]
        path, reused = measure_fill(encode, expected)
        if reused.wall_s and acc.is_local_main_process:
            logger.info("the fill reused an earlier session's shard: %.1f s on the clocks", reused.wall_s)
        emb = torch.from_numpy(np.load(path))  # (M_local, D)
        offset = self.table.slot_offset
        rows = torch.arange(offset, offset + self.table.num_slots)  # (M_local,)
        self.table.fill_corpus(emb.to(self.table.emb.device), rows.to(self.table.emb.device))
        logger.info("cache shard %d filled: %d documents", acc.process_index, self.table.num_slots)
        return reused

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
        """Draw ``num_cache_negatives`` per local query, exactly from the softmax over the whole table.

        Shapes: q_emb (B, D), pos_score (B,) scaled live positive scores, positives (B, P) corpus rows padded
        with -1, batch_docs (N,) corpus rows of the local batch documents -> CacheDraw. With ``cache_inbatch``
        the batch's documents (every process's when ``cross_device``) are removed from the cache's mass R.
        ``with_mean`` also combines the shards' softmax-weighted mean embeddings (cache-CE's gradient).
        ``step`` is the global micro-batch counter: with the run seed it keys the Gumbel noise (and seeds the
        SCE bucket centres), so the draws, like ``rest_lse``, ``pos_rank`` and ``mean``, do not depend on the
        number of processes for a fixed global batch. A collective: every process calls it.
        """
        generator = None
        if self.cfg.cache_candidates == "sce":
            generator = shared_generator(self.seed, step, 0, self.table.emb.device)
        queries = StepQueries(q_emb, pos_score, positives, batch_docs, scale, step)
        return self.sampler.draw(queries, cross_device=cross_device, with_mean=with_mean, generator=generator)

    def negative_texts(self, draw: CacheDraw) -> list[str]:
        """Texts of the valid draws, in row-major order of ``draw.doc_idx``."""
        return self._row_texts(draw.doc_idx[draw.doc_idx >= 0].tolist())

    def _row_texts(self, rows: list[int]) -> list[str]:
        """The texts the encoder sees (:func:`~dualenc.io.readers.doc_texts`) of corpus ``rows``, in order."""
        return doc_texts(self.corpus[rows]) if rows else []

    @torch.no_grad()
    def write_back(self, doc_idx: Tensor, emb: Tensor, *, insert: Tensor | None = None) -> None:
        """Write fresh embeddings of documents to their owning shards (all-gather); stream mode also inserts.

        Shapes: doc_idx (n,) corpus rows (-1 = skip), emb (n, D); insert (k,) positions of rows that a stream
        cache inserts into this process's FIFO when absent (the batch's own documents).
        """
        all_idx = self.sampler.gather(doc_idx.contiguous()).flatten()  # (P*n,)
        all_emb = self.sampler.gather(emb.detach().contiguous()).flatten(0, 1)  # (P*n, D)
        slots = self.table.locate(all_idx.to(self.table.doc_idx.device))  # (P*n,)
        hit = slots >= 0  # (P*n,)
        if hit.any():
            fresh = all_emb[hit].to(self.table.emb.device)  # (h, D)
            self._stats.add("written", staleness(self.table.emb[slots[hit]].float(), fresh.float()))
            reset = self.cfg.cache_mode == "corpus" or self.cfg.cache_lru
            self.table.write(slots[hit], fresh, reset_age=reset)
        if self.cfg.cache_mode == "stream" and insert is not None:
            new = doc_idx[insert]  # (k,)
            self.table.insert(new[new >= 0], emb.detach()[insert][new >= 0])

    @torch.no_grad()
    def refresh(self, model) -> dict[str, float]:
        """End of an optimizer step: re-encode the globally oldest slots (corpus mode), age every slot by one.

        Corpus mode: the k = max(1, round(refresh_fraction · total slots of all processes)) oldest slots of
        the whole table, by (age descending, global slot ascending), are re-encoded without gradient by their
        owners (the paper's refresh of a fraction of the cache per iteration, oldest first; A2). The selection
        does not depend on the sharding. Stream mode: no re-encoding (FIFO per process). A collective: every
        process calls it.

        Returns the logs of :meth:`~dualenc.negcache.refresh.StalenessStats.logs`, reduced over processes:
        ``cache/staleness_refresh`` (mean relative squared error of the re-encoded slots),
        ``cache/refreshed`` (fraction re-encoded), ``cache/staleness_written`` (mean over the write-backs
        since the last refresh), ``cache/age_mean``, ``cache/age_max``, ``cache/filled``.
        """
        refreshed = 0
        if self.cfg.cache_mode == "corpus" and self.cfg.refresh_fraction > 0:
            total = len(self.corpus)  # corpus mode: the shards hold one slot per corpus document
            refreshed = max(1, round(self.cfg.refresh_fraction * total)) if total else 0
            self._refresh_slots(model, global_oldest(self.table, refreshed, self.sampler.gather))
        self.table.tick()
        return self._stats.logs(self.table, refreshed, self.sampler.gather)

    def _refresh_slots(self, model, slots: Tensor) -> None:
        """Re-encode the documents of local ``slots`` (eval mode, no grad) and write them. Shapes: (k,)."""
        if slots.numel() == 0:
            return
        fresh = self._encode_rows(model, self.table.doc_idx[slots])  # (k, D)
        self._stats.add("refresh", staleness(self.table.emb[slots].float(), fresh.float()))
        self.table.write(slots, fresh)

    def _encode_rows(self, model, rows: Tensor) -> Tensor:
        """Embeddings of corpus ``rows`` (k,) by the document tower, without dropout or gradient: (k, D)."""
        from dualenc.retrieval import encode_texts

        texts = self._row_texts(rows.tolist())
        was_training = model.training
        model.eval()  # cached embeddings without dropout noise
        batch_size, device = self.cfg.cache_fill_batch_size, self.table.emb.device
        fresh = encode_texts(model, texts, kind="doc", batch_size=batch_size, device=device)  # (k, D)
        model.train(was_training)
        return torch.from_numpy(fresh).to(self.table.emb.device)  # (k, D)
