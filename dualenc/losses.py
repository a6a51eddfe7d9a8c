"""Losses over embeddings: each an ``nn.Module`` returning :class:`LossOutput` (loss + detached logs).

A loss never sees the encoder or the batch, only vectors, targets and masks; gathering across processes is the
training step's job (dualenc/distributed.py). The temperature belongs to the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DPR_CITATION = """@inproceedings{karpukhin2020dense,
  title = {Dense Passage Retrieval for Open-Domain Question Answering},
  author = {Karpukhin, Vladimir and Oguz, Barlas and Min, Sewon and Lewis, Patrick and Wu, Ledell and
            Edunov, Sergey and Chen, Danqi and Yih, Wen-tau},
  booktitle = {EMNLP}, year = {2020}}"""

MAX_SCALE = 100.0  # a learned 1/temperature is clamped here, as CLIP does, to keep logits bounded


@dataclass
class LossOutput:
    """What every dualenc loss returns: the scalar to backpropagate and detached values worth logging."""

    loss: Tensor  # ()
    logs: dict[str, Tensor] = field(default_factory=dict)


class Temperature(nn.Module):
    """Score scale 1/τ, fixed or learned (parameterised as log(1/τ) so it stays positive)."""

    def __init__(self, temperature: float = 1.0, learn: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self) -> Tensor:
        """The current scale 1/τ, a 0-d tensor (clamped to ``MAX_SCALE`` when learned)."""
        return self.log_scale.exp().clamp(max=MAX_SCALE)


class InBatchCE(nn.Module):
    """Softmax cross-entropy of each query over its positive and every other document it is shown.

    The documents are the batch's positives and hard negatives, from every process when the caller gathered
    them (DPR's in-batch negatives; Karpukhin et al. 2020, eq. 2; Tevatron's ``negatives_x_device``):

        loss = mean_i [ -s(q_i, d_{t_i}) + log Σ_{j not masked} exp s(q_i, d_j) ],   s(q, d) = <q, d> / τ

    Args:
        temperature: τ (Tevatron's ``temperature``); 0.01–0.05 suits normalised embeddings, 1.0 raw dot products.
        learn_temperature: learn log(1/τ) starting from ``temperature``.

    Inputs:
        q_emb: (B, D) query vectors.
        d_emb: (N, D) document vectors (N = B·G locally, or P·B·G after a cross-device gather).
        targets: (B,) index in ``d_emb`` of each query's positive.
        mask: optional (B, N) bool, True = exclude that document from the query's softmax (known false
            negatives); never True at a target.

    Returns:
        LossOutput with logs ``loss``, ``accuracy`` (positive ranked first), ``num_negatives`` (mean per query),
        ``scale`` (1/τ), ``pos_score`` and ``neg_score`` (mean raw inner products).

    References:
        Karpukhin et al., Dense Passage Retrieval for Open-Domain Question Answering, EMNLP 2020.
    """

    citation = DPR_CITATION

    def __init__(self, temperature: float = 1.0, learn_temperature: bool = False):
        super().__init__()
        self.temperature = Temperature(temperature, learn_temperature)

    def forward(
        self, q_emb: Tensor, d_emb: Tensor, *, targets: Tensor, mask: Tensor | None = None
    ) -> LossOutput:
        if q_emb.dim() != 2 or d_emb.dim() != 2 or q_emb.shape[1] != d_emb.shape[1]:
            raise ValueError(f"expected (B, D) and (N, D), got {tuple(q_emb.shape)} and {tuple(d_emb.shape)}")
        raw = q_emb @ d_emb.T  # (B, N)
        scores = raw.float() * self.temperature()  # (B, N)
        keep = torch.ones_like(scores, dtype=torch.bool)  # (B, N)
        if mask is not None:
            if bool(mask.gather(1, targets[:, None]).any()):
                raise ValueError("mask excludes a query's own positive")
            keep = ~mask
            scores = scores.masked_fill(mask, float("-inf"))  # (B, N)
        loss = F.cross_entropy(scores, targets)  # ()
        with torch.no_grad():
            rows = torch.arange(q_emb.shape[0], device=q_emb.device)  # (B,)
            is_target = torch.zeros_like(keep)  # (B, N)
            is_target[rows, targets] = True
            negatives = keep & ~is_target  # (B, N)
            logs = {
                "loss": loss.detach(),
                "accuracy": (scores.argmax(dim=1) == targets).float().mean(),
                "num_negatives": negatives.sum(dim=1).float().mean(),
                "scale": self.temperature().detach(),
                "pos_score": raw[rows, targets].float().mean(),
                "neg_score": (raw.float() * negatives).sum() / negatives.sum().clamp(min=1),
            }
        return LossOutput(loss, logs)


def false_negative_mask(doc_idx: Tensor, positives: Tensor, targets: Tensor) -> Tensor:
    """Documents that are a known positive of the query but not its target (duplicates, shared positives).

    Args:
        doc_idx: (N,) corpus row of every document column.
        positives: (B, P) corpus rows of each query's positives, padded with -1.
        targets: (B,) the column of each query's own positive.

    Returns:
        (B, N) bool, True = mask out.
    """
    hit = (doc_idx[None, :, None] == positives[:, None, :]) & (positives[:, None, :] >= 0)  # (B, N, P)
    mask = hit.any(dim=2)  # (B, N)
    mask[torch.arange(targets.shape[0], device=targets.device), targets] = False
    return mask
