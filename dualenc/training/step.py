"""One micro-batch's loss: encode, gather across processes, add the negative cache's terms, call the loss.

:class:`TrainingModule` is what Accelerate wraps (DDP): its ``forward`` runs the whole micro-batch, so every
parameter that gets a gradient (both towers, the learned temperature) is used inside the wrapped forward.
Every loss has the same contract, ``loss(LossInputs) -> LossOutput`` (dualenc/losses/base.py); a loss that
needs the negative cache says which terms through its ``cache_terms`` attribute, and this module asks the
cache for them.
The step never changes the cache: it returns the fresh document embeddings, and the training loop writes them
back (``NegativeCache.write_back``) where a reader can see it. :func:`backward_micro_batch` runs a
micro-batch's forward and backward, plainly or through GradCache (dualenc/training/grad_cache.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dualenc.losses.base import CacheTerms, LossInputs, false_negative_mask
from dualenc.training.config_sections import LossConfig, TrainConfig
from dualenc.training.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world
from dualenc.training.grad_cache import grad_cache_step

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dualenc.model.encoder import DualEncoder
    from dualenc.negcache.negative_cache import NegativeCache
    from dualenc.training.grad_cache import Replay


@dataclass
class StepOutput:
    """A micro-batch's loss, its detached logs, and fresh document embeddings for the cache's write-back."""

    loss: Tensor  # ()
    logs: dict[str, Tensor] = field(default_factory=dict)
    fresh_idx: Tensor | None = None  # (n,) corpus rows of documents encoded live this micro-batch
    fresh_emb: Tensor | None = None  # (n, D) their embeddings; the batch's own documents come first
    num_batch_docs: int = 0  # the first num_batch_docs rows of fresh_* are the batch's documents


class TrainingModule(nn.Module):
    """The dual encoder plus the loss (which owns the temperature); ``forward`` = one micro-batch's loss.

    Args:
        encoder: the dual encoder being trained.
        loss: any dualenc loss (``forward(LossInputs) -> LossOutput``, a ``cache_terms`` attribute).
        cfg: the ``loss`` config section (cross-device negatives, false-negative masking).
    """

    def __init__(self, encoder: DualEncoder, loss: nn.Module, cfg: LossConfig):
        super().__init__()
        self.encoder, self.loss = encoder, loss
        self.cross_device, self.mask_false_negatives = cfg.negatives_x_device, cfg.mask_false_negatives

    def forward(
        self,
        batch: dict | None = None,
        cache: NegativeCache | None = None,
        draw_id: int = 0,
        replay: Replay | None = None,
    ) -> StepOutput | Tensor:
        """Shapes: batch query (B, Lq), doc (B·G, Ld), doc_idx (B·G,), positives (B, P) -> StepOutput.

        ``draw_id`` keys the cache's random draws (the plan's micro-batch id: the same in a resumed run).
        With ``replay`` (GradCache's stage 3, dualenc/training/grad_cache.py) it re-encodes one chunk per side
        and returns the scalar whose gradient is that chunk's share of the step's gradient.
        """
        if replay is not None:
            return self._replay(replay)
        q_emb, d_emb = self.encoder(batch["query"], batch["doc"])  # (B, D), (B·G, D)
        return self.loss_from_embeddings(q_emb, d_emb, batch, cache, draw_id, self.encoder.encode_docs)

    def loss_from_embeddings(
        self,
        q_emb: Tensor,
        d_emb: Tensor,
        batch: dict,
        cache: NegativeCache | None,
        draw_id: int,
        encode_negatives: Callable[[Mapping[str, Tensor]], Tensor],
    ) -> StepOutput:
        """The micro-batch's loss from its live embeddings; ``encode_negatives`` encodes the cache's draws.

        Shapes: q_emb (B, D), d_emb (B·G, D); encode_negatives: features (n, Ld) -> (n, D).
        """
        inputs = self._in_batch_inputs(q_emb, d_emb, batch)
        fresh_idx, fresh_emb, logs = batch["doc_idx"], d_emb.detach(), {}
        needs = getattr(self.loss, "cache_terms", None)
        if needs is not None:
            if cache is None:
                raise ValueError(f"{type(self.loss).__name__} needs a negative cache")
            inputs.cache, neg_idx, neg_emb, logs = self._cache_terms(
                needs, cache, q_emb, d_emb, batch, draw_id, encode_negatives
            )
            if neg_idx is not None:
                fresh_idx = torch.cat([fresh_idx, neg_idx])  # (B·G + B·m,)
                fresh_emb = torch.cat([fresh_emb, neg_emb.detach()])  # (B·G + B·m, D)
        output = self.loss(inputs)
        return StepOutput(output.loss, {**output.logs, **logs}, fresh_idx, fresh_emb, d_emb.shape[0])

    def _replay(self, replay: Replay) -> Tensor:
        """GradCache stage 3: Σ <emb, dL/d emb> over the re-encoded chunks (their RNG states replayed) plus
        Σ <θ, dL/dθ> over the loss's parameters; its gradient is exactly their share of dL/dθ."""
        total = None
        for chunk, encode in (
            (replay.query, self.encoder.encode_queries),
            (replay.doc, self.encoder.encode_docs),
        ):
            if chunk is None:
                continue
            with chunk.rng.replayed():
                emb = encode(chunk.features)  # (c, D)
            term = (emb * chunk.grad.to(emb.dtype)).sum()  # ()
            total = term if total is None else total + term
        for param, grad in replay.params:
            total = total + (param * grad).sum()  # ()
        return total

    def _in_batch_inputs(self, q_emb: Tensor, d_emb: Tensor, batch: dict) -> LossInputs:
        """Every document of the micro-batch (of every process with cross-device negatives) as a column."""
        group = d_emb.shape[0] // q_emb.shape[0]
        targets = torch.arange(q_emb.shape[0], device=q_emb.device) * group  # (B,)
        doc_idx = batch["doc_idx"]  # (B·G,)
        rank, world = rank_and_world()
        if self.cross_device and world > 1:
            targets = targets + rank * d_emb.shape[0]  # (B,) this process's rows in the gathered columns
            d_emb = all_gather_with_grad(d_emb)  # (P·B·G, D)
            doc_idx = all_gather_no_grad(doc_idx)  # (P·B·G,)
        mask = (
            false_negative_mask(doc_idx, batch["positives"], targets) if self.mask_false_negatives else None
        )
        return LossInputs(q_emb, d_emb, targets, mask)

    def _cache_terms(
        self,
        needs: str,
        cache: NegativeCache,
        q_emb: Tensor,
        d_emb: Tensor,
        batch: dict,
        draw_id: int,
        encode_negatives: Callable[[Mapping[str, Tensor]], Tensor],
    ) -> tuple[CacheTerms, Tensor | None, Tensor | None, dict[str, Tensor]]:
        """The cache's terms for the loss (A3-A5); the drawn negatives' rows and live embeddings (or None)."""
        group = d_emb.shape[0] // q_emb.shape[0]
        positive = d_emb[::group]  # (B, D) each query's live positive
        if needs == "table":  # SCE over the whole table, one process (refused for more when the run starts)
            from dualenc.negcache.negative_cache import (
                shared_generator,  # datasets: only where a cache exists
            )

            target_slots = cache.table.locate(batch["doc_idx"][::group])  # (B,)
            generator = shared_generator(cache.seed, draw_id, 2, q_emb.device)
            return (
                CacheTerms(table=cache.table.emb, target_slots=target_slots, generator=generator),
                None,
                None,
                {},
            )
        scale = self.loss.temperature().detach()  # ()
        pos_score = scale * (q_emb.detach() * positive.detach()).sum(-1)  # (B,)
        _, world = rank_and_world()
        draw = cache.sample(
            q_emb,
            pos_score,
            batch["positives"],
            batch["doc_idx"],
            scale,
            draw_id,
            cross_device=self.cross_device and world > 1,
            with_mean=needs == "mean",
        )
        logs = {
            "cache/pos_rank": draw.pos_rank.float().mean(),
            "cache/draws": (draw.doc_idx >= 0).float().sum(1).mean(),
        }
        if needs == "mean":
            return CacheTerms(rest_lse=draw.rest_lse, mean=draw.mean), None, None, logs
        neg_emb = q_emb.new_zeros(*draw.doc_idx.shape, q_emb.shape[1])  # (B, m, D)
        texts = cache.negative_texts(draw)
        if texts:  # re-encoded live, with gradient, inside the wrapped forward
            features = self.encoder.tokenize_docs(texts).to(q_emb.device)
            neg_emb[draw.doc_idx >= 0] = encode_negatives(features).to(neg_emb.dtype)  # (n, D)
        terms = CacheTerms(rest_lse=draw.rest_lse, neg_emb=neg_emb, neg_weight=draw.weight)
        return terms, draw.doc_idx.flatten(), neg_emb.flatten(0, 1), logs  # (B·m,), (B·m, D)


def backward_micro_batch(
    accelerator: Accelerator,
    module: nn.Module,
    batch: dict,
    cache: NegativeCache | None,
    draw_id: int,
    train: TrainConfig,
    *,
    scale: float,
    sync: bool,
) -> StepOutput:
    """Forward one micro-batch and accumulate ``scale`` x its gradient, plainly or with GradCache.

    ``sync``: DDP reduces the gradients at this micro-batch (the optimizer step's last one); before that the
    micro-batches run under ``no_sync``.
    """
    if train.grad_cache:  # the same gradient, one chunk's activations at a time
        return grad_cache_step(
            accelerator,
            module,
            batch,
            cache,
            draw_id,
            query_chunk=train.grad_cache_query_chunk,
            doc_chunk=train.grad_cache_passage_chunk,
            loss_scale=scale,
            sync=sync,
        )
    with contextlib.nullcontext() if sync else accelerator.no_sync(module):
        output: StepOutput = module(batch, cache=cache, draw_id=draw_id)
        accelerator.backward(output.loss * scale)
    return output
