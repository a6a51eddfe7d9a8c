"""Losses over embeddings: each an ``nn.Module`` returning :class:`LossOutput` (loss + detached logs).

A loss never sees the encoder or the batch, only vectors, targets and masks; gathering across processes is the
training step's job (dualenc/training/distributed.py). The temperature belongs to the loss.
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

MAX_SCALE = 100.0


def _at_least_float32(x: Tensor) -> Tensor:
    """Logits in float32 (or float64 when the inputs are): bf16/fp16 scores lose too much in a softmax."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# a learned 1/temperature is clamped here, as CLIP does, to keep logits bounded


@dataclass
class CacheTerms:
    """What the negative cache contributes to a loss for the B local queries (A3-A5 of ALGORITHMS.md).

    Which fields are set depends on the loss's ``cache_terms``: ``"samples"`` (``rest_lse``, ``neg_emb``,
    ``neg_weight``), ``"mean"`` (``rest_lse``, ``mean``), ``"table"`` (``table``, ``target_slots``,
    ``generator``).
    """

    rest_lse: Tensor | None = None  # (B,) log-sum-exp of the stale scaled scores of the rest R of the cache
    neg_emb: Tensor | None = None  # (B, m, D) live embeddings of negatives drawn from the cache (with grad)
    neg_weight: Tensor | None = None  # (B, m) w_k of each draw, 0 for a missing draw
    mean: Tensor | None = None  # (B, D) softmax-weighted mean of R's stale embeddings
    table: Tensor | None = None  # (M, D) the stale table (constants)
    target_slots: Tensor | None = None  # (B,) the table slot of each query's positive
    generator: torch.Generator | None = None  # draws random bucket centres (SCE)


@dataclass
class LossInputs:
    """What every dualenc loss takes: live vectors, each query's positive column, masks, the cache's terms."""

    q_emb: Tensor  # (B, D) live query vectors
    d_emb: Tensor  # (N, D) live documents the queries are scored against (N = B·G, or P·B·G gathered)
    targets: Tensor  # (B,) column of each query's positive in d_emb
    mask: Tensor | None = None  # (B, N) True = known false negative, excluded (never at a target)
    cache: CacheTerms | None = None  # the negative cache's contribution (losses with cache_terms only)


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
        log_scale = torch.tensor(
            math.log(1.0 / temperature), dtype=torch.float64
        )  # exact in float64 tests too
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

    Inputs (:class:`LossInputs`):
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
    cache_terms = None  # needs nothing from a negative cache

    def __init__(self, temperature: float = 1.0, learn_temperature: bool = False):
        super().__init__()
        self.temperature = Temperature(temperature, learn_temperature)

    def forward(self, inputs: LossInputs) -> LossOutput:
        q_emb, d_emb, targets, mask = inputs.q_emb, inputs.d_emb, inputs.targets, inputs.mask
        if q_emb.dim() != 2 or d_emb.dim() != 2 or q_emb.shape[1] != d_emb.shape[1]:
            raise ValueError(f"expected (B, D) and (N, D), got {tuple(q_emb.shape)} and {tuple(d_emb.shape)}")
        raw = q_emb @ d_emb.T  # (B, N)
        scores = _at_least_float32(raw)  # (B, N)
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


NEGATIVE_CACHE_CITATION = """@inproceedings{lindgren2021efficient,
  title = {Efficient Training of Retrieval Models using Negative Cache},
  author = {Lindgren, Erik and Reddi, Sashank J. and Guo, Ruiqi and Kumar, Sanjiv},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)}, year = {2021}}"""


class CachedCE(nn.Module):
    """Softmax CE over the positive, the batch's documents (exact) and one lumped logit for the rest of the cache.

    Full softmax CE over the positive, the in-batch documents B and the rest R of the corpus has the gradient
    −(1−p⁺)∇s⁺ + Σ_{j∈B} p_j ∇s_j + P_R · E_{j∼q_R}[∇s_j]  (Lindgren et al. 2021, the identity behind eq. 3;
    ALGORITHMS.md A4). This loss is the cross-entropy over the logits

        [ s⁺,  s_j for j in the batch (live),  ℓ_R ],   ℓ_R = LSE_R(stale) + Σ_k w_k (s_{n_k} − sg(s_{n_k}))

    where LSE_R is the log-sum-exp of the cached (stale, constant) scores of R and n_k are negatives drawn from
    q_R ∝ exp(stale scores) by Gumbel-max and re-encoded live, with weights w_k (1/m for m samples). ℓ_R has the
    value of the stale log-mass of R and passes P_R·w_k of gradient to each sampled live score, so the gradient is
    an unbiased estimate of the full-softmax gradient when the cache is fresh. Special cases:

    - ``inbatch=False`` and one sample: the gradient of the reference code's surrogate (1−p⁺)(s_n − s⁺) and the
      value of its "interpretable loss" −log p⁺ (see :func:`reference_surrogate`);
    - weights = q_R over every document of R (the expectation enumerated) with a fresh cache: the full-softmax CE
      gradient exactly;
    - an empty cache (LSE_R = −inf): plain in-batch CE.

    With ``sampled=False`` (loss ``cache_ce``) the cache passes, instead of samples, the softmax-weighted mean of
    R's stale embeddings as one constant "negative" with weight 1: ℓ_R then has the value LSE_R and the exact
    gradient P_R · E_{q_R}[e_j] with respect to the query (the documents of R are constants).

    Args:
        temperature: τ, scores are <q, d>/τ (cached scores must be computed with the same scale: ``scale()``).
        learn_temperature: learn log(1/τ).
        inbatch: include the batch's documents as exact negatives (True) or only [s⁺, ℓ_R] (the reference).
        sampled: draws re-encoded live (``cache``) or the exact mean of the stale table (``cache_ce``).

    Inputs (:class:`LossInputs`):
        q_emb (B, D), d_emb (N, D), targets (B,), mask (B, N) or None: as in :class:`InBatchCE`.
        cache.neg_emb (B, m, D): live embeddings of the sampled negatives (with grad) [sampled].
        cache.neg_weight (B, m): w_k, 0 where a draw is missing; rows sum to 1 (or 0 when R is empty) [sampled].
        cache.mean (B, D): the softmax-weighted mean of R's stale embeddings [not sampled].
        cache.rest_lse (B,): LSE_R of the stale scaled scores of the cache minus the query's positives and the
            batch's documents (−inf when nothing is left).

    References:
        Lindgren, Reddi, Guo, Kumar. Efficient Training of Retrieval Models using Negative Cache. NeurIPS 2021.
    """

    citation = NEGATIVE_CACHE_CITATION

    def __init__(
        self,
        temperature: float = 1.0,
        learn_temperature: bool = False,
        *,
        inbatch: bool = True,
        sampled: bool = True,
    ):
        super().__init__()
        self.temperature = Temperature(temperature, learn_temperature)
        self.inbatch = inbatch
        self.cache_terms = "samples" if sampled else "mean"

    def forward(self, inputs: LossInputs) -> LossOutput:
        q_emb, d_emb, targets, mask, cache = (
            inputs.q_emb,
            inputs.d_emb,
            inputs.targets,
            inputs.mask,
            inputs.cache,
        )
        if cache is None:
            raise ValueError("CachedCE needs the negative cache's terms (LossInputs.cache)")
        if self.cache_terms == "mean":  # one constant negative, the mean of R, with weight 1
            neg_emb, neg_weight = cache.mean.to(q_emb.dtype)[:, None], q_emb.new_ones(q_emb.shape[0], 1)
        else:
            neg_emb, neg_weight = cache.neg_emb, cache.neg_weight  # (B, m, D), (B, m)
        rest_lse = cache.rest_lse  # (B,)
        dtype = torch.promote_types(q_emb.dtype, torch.float32)
        scale = self.temperature().to(dtype)  # ()
        rows = torch.arange(q_emb.shape[0], device=q_emb.device)  # (B,)
        if self.inbatch:
            live = _at_least_float32(q_emb @ d_emb.T) * scale  # (B, N)
            if mask is not None:
                live = live.masked_fill(mask, float("-inf"))
            target_col = targets
        else:
            live = (_at_least_float32((q_emb * d_emb[targets]).sum(-1)) * scale)[:, None]  # (B, 1)
            target_col = torch.zeros_like(targets)
        neg = (
            _at_least_float32(torch.einsum("bd,bmd->bm", q_emb, neg_emb)) * scale
        )  # (B, m) live sampled scores
        weight = neg_weight.to(neg.dtype)  # (B, m)
        has_rest = torch.isfinite(rest_lse) & (weight.sum(1) > 0)  # (B,)
        surrogate = (weight * (neg - neg.detach())).sum(1)  # (B,) value 0, gradient w_k to each sample
        lumped = torch.where(
            has_rest,
            rest_lse.detach().to(surrogate.dtype) + surrogate,
            torch.full_like(surrogate, float("-inf")),
        )
        logits = torch.cat([live, lumped[:, None]], dim=1)  # (B, N + 1) or (B, 2)
        loss = F.cross_entropy(logits, target_col)  # ()
        with torch.no_grad():
            prob = logits.softmax(dim=1)  # (B, cols)
            logs = {
                "loss": loss.detach(),
                "p_pos": prob[rows, target_col].mean(),
                "rest_mass": prob[:, -1].mean(),
                "accuracy": (logits.argmax(dim=1) == target_col).float().mean(),
                "scale": scale.detach(),
                "pos_score": live[rows, target_col].mean() / scale.detach(),
                "sampled_score": (neg * weight).sum() / weight.sum().clamp(min=1e-12) / scale.detach(),
            }
        return LossOutput(loss, logs)


def reference_surrogate(s_pos: Tensor, s_neg: Tensor, cache_scores: Tensor) -> tuple[Tensor, Tensor]:
    """The reference code's per-example losses (google-research negative_cache ``losses.py``).

    training loss = (1 − p⁺)(s_neg − s⁺) with p⁺ = softmax([s⁺, cache_scores])[0] detached; interpretable loss
    = −log p⁺. Only its gradient matters for training; kept for parity tests and the paper's fixtures.

    Shapes:
        s_pos (B,), s_neg (B,) live scores; cache_scores (B, M) stale, constant -> (B,), (B,).
    """
    logits = torch.cat([s_pos[:, None], cache_scores.detach()], dim=1)  # (B, 1 + M)
    log_p = logits.log_softmax(dim=1)[:, 0].detach()  # (B,)
    p_pos = log_p.exp()  # (B,)
    return (1 - p_pos) * (s_neg - s_pos), -log_p
