"""In-batch softmax cross-entropy (DPR; Karpukhin et al., EMNLP 2020, eq. 2): loss=inbatch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dualenc.losses.base import LossInputs, LossOutput, Temperature, at_least_float32

DPR_CITATION = """@inproceedings{karpukhin2020dense,
  title = {Dense Passage Retrieval for Open-Domain Question Answering},
  author = {Karpukhin, Vladimir and Oguz, Barlas and Min, Sewon and Lewis, Patrick and Wu, Ledell and
            Edunov, Sergey and Chen, Danqi and Yih, Wen-tau},
  booktitle = {EMNLP}, year = {2020}}"""


class InBatchCE(nn.Module):
    """Softmax cross-entropy of each query over its positive and every other document it is shown.

    The documents are the batch's positives and hard negatives, from every process when the caller gathered
    them (DPR's in-batch negatives; Karpukhin et al. 2020, eq. 2; Tevatron's ``negatives_x_device``):

        loss = mean_i [ -s(q_i, d_{t_i}) + log Σ_{j not masked} exp s(q_i, d_j) ],   s(q, d) = <q, d> / τ

    Args:
        temperature: τ (Tevatron's ``temperature``); 0.01–0.05 suits normalised embeddings, 1.0 raw dot
            products.
        learn_temperature: learn log(1/τ) starting from ``temperature``.

    Inputs (:class:`~dualenc.losses.base.LossInputs`):
        q_emb: (B, D) query vectors.
        d_emb: (N, D) document vectors (N = B·G locally, or P·B·G after a cross-device gather).
        targets: (B,) index in ``d_emb`` of each query's positive.
        mask: optional (B, N) bool, True = exclude that document from the query's softmax (known false
            negatives); never True at a target.

    Returns:
        LossOutput with logs ``loss``, ``accuracy`` (positive ranked first), ``num_negatives`` (mean per
        query), ``scale`` (1/τ), ``pos_score`` and ``neg_score`` (mean raw inner products).

    References:
        Karpukhin et al., Dense Passage Retrieval for Open-Domain Question Answering, EMNLP 2020.
    """

    citation = DPR_CITATION
    cache_terms = None  # needs nothing from a negative cache

    def __init__(self, temperature: float = 1.0, learn_temperature: bool = False):
        super().__init__()
        self.temperature = Temperature(temperature, learn_temperature)

    def forward(self, inputs: LossInputs) -> LossOutput:
        q_emb, d_emb, targets, mask = inputs.q_emb, inputs.d_emb, inputs.targets, inputs.mask
        if q_emb.dim() != 2 or d_emb.dim() != 2 or q_emb.shape[1] != d_emb.shape[1]:
            raise ValueError(f"expected (B, D) and (N, D), got {tuple(q_emb.shape)} and {tuple(d_emb.shape)}")
        raw = q_emb @ d_emb.T  # (B, N)
        scores = at_least_float32(raw)  # (B, N)
        scores = scores * self.temperature().to(scores.dtype)  # (B, N)
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
