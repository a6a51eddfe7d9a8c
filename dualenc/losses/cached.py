"""Softmax CE with a negative cache (Lindgren et al., NeurIPS 2021; ALGORITHMS.md A4): loss=cache, cache_ce.

:class:`CachedCE` is the loss training runs; :func:`reference_surrogate` is the reference code's per-example
losses, kept for parity tests and the paper's fixtures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualenc.losses.base import CacheTerms, LossInputs, LossOutput, Temperature, at_least_float32

NEGATIVE_CACHE_CITATION = """@inproceedings{lindgren2021efficient,
  title = {Efficient Training of Retrieval Models using Negative Cache},
  author = {Lindgren, Erik and Reddi, Sashank J. and Guo, Ruiqi and Kumar, Sanjiv},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)}, year = {2021}}"""


class CachedCE(nn.Module):
    """Softmax CE over the positive, the batch's documents (exact) and one lumped logit for the cache's rest.

    Full softmax CE over the positive, the in-batch documents B and the rest R of the corpus has the gradient
    −(1−p⁺)∇s⁺ + Σ_{j∈B} p_j ∇s_j + P_R · E_{j∼q_R}[∇s_j]  (Lindgren et al. 2021, the identity behind eq. 3;
    ALGORITHMS.md A4). This loss is the cross-entropy over the logits

        [ s⁺,  s_j for j in the batch (live),  ℓ_R ],   ℓ_R = LSE_R(stale) + Σ_k w_k (s_{n_k} − sg(s_{n_k}))

    where LSE_R is the log-sum-exp of the cached (stale, constant) scores of R and n_k are negatives drawn
    from q_R ∝ exp(stale scores) by Gumbel-max and re-encoded live, with weights w_k (1/m for m samples). ℓ_R
    has the value of the stale log-mass of R and passes P_R·w_k of gradient to each sampled live score, so the
    gradient is an unbiased estimate of the full-softmax gradient when the cache is fresh. Special cases:

    - ``inbatch=False`` and one sample: the gradient of the reference code's surrogate (1−p⁺)(s_n − s⁺) and
      the value of its "interpretable loss" −log p⁺ (see :func:`reference_surrogate`);
    - weights = q_R over every document of R (the expectation enumerated) with a fresh cache: the
      full-softmax CE gradient exactly;
    - an empty cache (LSE_R = −inf): plain in-batch CE.

    With ``sampled=False`` (loss ``cache_ce``) the cache passes, instead of samples, the softmax-weighted mean
    of R's stale embeddings as one constant "negative" with weight 1: ℓ_R then has the value LSE_R and the
    exact gradient P_R · E_{q_R}[e_j] with respect to the query (the documents of R are constants).

    Args:
        temperature: τ, scores are <q, d>/τ (cached scores must be computed with the same scale,
            ``self.temperature()``).
        learn_temperature: learn log(1/τ).
        inbatch: include the batch's documents as exact negatives (True) or only [s⁺, ℓ_R] (the reference).
        sampled: draws re-encoded live (``cache``) or the exact mean of the stale table (``cache_ce``).

    Inputs (:class:`~dualenc.losses.base.LossInputs`):
        q_emb (B, D), d_emb (N, D), targets (B,), mask (B, N) or None: as in
            :class:`~dualenc.losses.inbatch.InBatchCE`.
        cache.neg_emb (B, m, D): live embeddings of the sampled negatives (with grad) [sampled].
        cache.neg_weight (B, m): w_k, 0 where a draw is missing; rows sum to 1 (or 0 when R is empty)
            [sampled].
        cache.mean (B, D): the softmax-weighted mean of R's stale embeddings [not sampled].
        cache.rest_lse (B,): LSE_R of the stale scaled scores of the cache minus the query's positives and
            the batch's documents (−inf when nothing is left).

    References:
        Lindgren, Reddi, Guo, Kumar. Efficient Training of Retrieval Models using Negative Cache.
        NeurIPS 2021.
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
        q_emb, cache = inputs.q_emb, inputs.cache
        if cache is None:
            raise ValueError("CachedCE needs the negative cache's terms (LossInputs.cache)")
        scale = self.temperature().to(torch.promote_types(q_emb.dtype, torch.float32))  # ()
        live, target_col = self._live_logits(inputs, scale)  # (B, N) or (B, 1), (B,)
        neg, weight = self._sampled_logits(q_emb, cache, scale)  # (B, m), (B, m)
        has_rest = torch.isfinite(cache.rest_lse) & (weight.sum(1) > 0)  # (B,)
        surrogate = (weight * (neg - neg.detach())).sum(1)  # (B,) value 0, gradient w_k to each sample
        lumped = torch.where(
            has_rest,
            cache.rest_lse.detach().to(surrogate.dtype) + surrogate,
            torch.full_like(surrogate, float("-inf")),
        )  # (B,) ℓ_R
        logits = torch.cat([live, lumped[:, None]], dim=1)  # (B, N + 1) or (B, 2)
        loss = F.cross_entropy(logits, target_col)  # ()
        with torch.no_grad():
            rows = torch.arange(q_emb.shape[0], device=q_emb.device)  # (B,)
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

    def _live_logits(self, inputs: LossInputs, scale: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled live scores of the batch's documents (or of the positive alone) and the target columns.

        Shapes: -> (B, N) and ``inputs.targets`` with ``inbatch``; (B, 1) and zeros (B,) without.
        """
        q_emb, d_emb, targets, mask = inputs.q_emb, inputs.d_emb, inputs.targets, inputs.mask
        if not self.inbatch:
            live = at_least_float32((q_emb * d_emb[targets]).sum(-1)) * scale  # (B,)
            return live[:, None], torch.zeros_like(targets)
        live = at_least_float32(q_emb @ d_emb.T) * scale  # (B, N)
        if mask is not None:
            live = live.masked_fill(mask, float("-inf"))  # (B, N)
        return live, targets

    def _sampled_logits(self, q_emb: Tensor, cache: CacheTerms, scale: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled live scores of the cache's negatives and their weights w_k. Shapes: -> (B, m), (B, m)."""
        if self.cache_terms == "mean":  # one constant negative, the mean of R, with weight 1
            neg_emb = cache.mean.to(q_emb.dtype)[:, None]  # (B, 1, D)
            neg_weight = q_emb.new_ones(q_emb.shape[0], 1)  # (B, 1)
        else:
            neg_emb, neg_weight = cache.neg_emb, cache.neg_weight  # (B, m, D), (B, m)
        neg = at_least_float32(torch.einsum("bd,bmd->bm", q_emb, neg_emb)) * scale  # (B, m)
        return neg, neg_weight.to(neg.dtype)


def reference_surrogate(s_pos: Tensor, s_neg: Tensor, cache_scores: Tensor) -> tuple[Tensor, Tensor]:
    """The reference code's per-example losses (google-research negative_cache ``losses.py``).

    training loss = (1 − p⁺)(s_neg − s⁺) with p⁺ = softmax([s⁺, cache_scores])[0] detached; interpretable
    loss = −log p⁺. Only its gradient matters for training; kept for parity tests and the paper's fixtures.

    Shapes:
        s_pos (B,), s_neg (B,) live scores; cache_scores (B, M) stale, constant -> (B,), (B,).
    """
    logits = torch.cat([s_pos[:, None], cache_scores.detach()], dim=1)  # (B, 1 + M)
    log_p = logits.log_softmax(dim=1)[:, 0].detach()  # (B,)
    p_pos = log_p.exp()  # (B,)
    return (1 - p_pos) * (s_neg - s_pos), -log_p
