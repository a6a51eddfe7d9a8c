"""Sampled-softmax baselines of the SCE paper: BCE, gBCE and CE⁻ over sampled negatives.

All losses see the same tensors as :func:`dualenc.losses.dense.full_ce`: rows ``x`` (N, D), table ``w``
(C, D), targets (N,), an optional ``mask`` (N,) (True = real row), plus sampled negative indices into ``w``.
Each returns the 0-d mean over real rows. Definitions follow the official SCE code
(AIRI-Institute/Scalable-SASRec, ``model.py``; ALGORITHMS.md Part B 2.4). The negatives come from the
samplers of :mod:`dualenc.losses.uniform_negatives`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dualenc.errors import InputError
from dualenc.losses.dense import check_inputs

CITATIONS = {
    "bce": """@inproceedings{kang2018sasrec,
  title = {Self-Attentive Sequential Recommendation}, author = {Kang, Wang-Cheng and McAuley, Julian},
  booktitle = {IEEE International Conference on Data Mining (ICDM)}, pages = {197--206}, year = {2018}}""",
    "gbce": """@inproceedings{petrov2023gsasrec,
  title = {gSASRec: Reducing Overconfidence in Sequential Recommendation Trained with Negative Sampling},
  author = {Petrov, Aleksandr Vladimirovich and Macdonald, Craig},
  booktitle = {Proceedings of the 17th ACM Conference on Recommender Systems (RecSys '23)}, year = {2023}}""",
    "ce_minus": """@inproceedings{klenitskiy2023turning,
  title = {Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?},
  author = {Klenitskiy, Anton and Vasilev, Alexey},
  booktitle = {Proceedings of the 17th ACM Conference on Recommender Systems (RecSys '23)}, year = {2023}}""",
}


def _check_negatives(negatives: Tensor, num_rows: int, num_items: int) -> None:
    if negatives.dim() != 2 or negatives.dtype.is_floating_point or negatives.dtype == torch.bool:
        raise InputError(
            f"negatives must be a 2-D integer tensor, got {negatives.dtype} {tuple(negatives.shape)}"
        )
    if negatives.shape[0] == 0 or num_rows % negatives.shape[0] != 0:
        raise InputError(f"negatives has {negatives.shape[0]} rows; need N={num_rows} or a divisor of N")
    if negatives.numel() and (int(negatives.min()) < 0 or int(negatives.max()) >= num_items):
        raise InputError(f"negative indices must lie in [0, C) with C={num_items}")


def _pos_neg_logits(x: Tensor, w: Tensor, targets: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
    """Positive logits (N,) and negative logits (N, n); negatives (N, n) per row or (S, n) per sequence.

    One gather of ``w`` per call: the backward of each gather allocates a dense (C, D) gradient.
    """
    num_seq, n = negatives.shape
    if num_seq == x.shape[0]:  # per row: the positive is column 0 of one (N, 1 + n) gather
        idx = torch.cat([targets[:, None], negatives], dim=1)  # (N, 1 + n)
        emb = w.index_select(0, idx.reshape(-1)).view(num_seq, n + 1, -1)  # (N, 1 + n, D)
        logits = (emb @ x[:, :, None])[..., 0]  # (N, 1 + n)
        return logits[:, 0], logits[:, 1:]
    w_sel = w.index_select(0, torch.cat([targets, negatives.reshape(-1)]))  # (N + S * n, D)
    pos = (x * w_sel[: x.shape[0]]).sum(-1)  # (N,)
    neg_emb = w_sel[x.shape[0] :].view(num_seq, n, -1)  # (S, n, D)
    rows = x.view(num_seq, x.shape[0] // num_seq, -1)  # (S, L, D) rows grouped by sequence, L = N / S
    neg = (rows @ neg_emb.transpose(1, 2)).reshape(x.shape[0], n)  # (N, n)
    return pos, neg


def _checked_logits(
    x: Tensor, w: Tensor, targets: Tensor, negatives: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a sampled loss's arguments; return the mask and the positive and negative logits.

    Shapes: as :func:`bce_loss` -> mask (N,) (all True when None), pos (N,), neg (N, n). Pad rows' targets
    are read as item 0 (their loss is masked out).
    """
    mask = check_inputs(x, w, targets, mask)  # (N,)
    _check_negatives(negatives, x.shape[0], w.shape[0])
    pos, neg = _pos_neg_logits(x, w, targets.masked_fill(~mask, 0), negatives)  # (N,), (N, n)
    return mask, pos, neg


def _binary_rows(pos: Tensor, neg: Tensor, beta: float = 1.0) -> Tensor:
    """Mean of the 1 + n binary terms ``-beta log sigma(s+)`` and ``-log(1 - sigma(s-_j))`` per row.

    Shapes: pos (N,), neg (N, n) -> (N,).
    """
    return -(beta * F.logsigmoid(pos) + F.logsigmoid(-neg).sum(-1)) / (1 + neg.shape[1])  # (N,)


def _masked_mean(row_loss: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``row_loss`` (N,) over the real rows of ``mask`` (N,); 0 when there is none."""
    return row_loss.masked_fill(~mask, 0.0).sum() / mask.sum().clamp_min(1)  # ()


def bce_loss(
    x: Tensor, w: Tensor, targets: Tensor, negatives: Tensor, *, mask: Tensor | None = None
) -> Tensor:
    """Binary cross-entropy over the positive and n sampled negatives (SASRec's loss with n negatives).

    Row loss = mean of the 1 + n terms ``-log sigma(s+)`` and ``-log(1 - sigma(s-_j))`` (the SCE code's BCE⁺;
    with n = 1 it is half of Kang & McAuley's per-position loss, whose two terms are summed).

    Shapes:
        x (N, D), w (C, D), targets (N,), negatives (N, n) (per row) or (S, n) (per sequence, rows grouped
        contiguously, N = S * L), mask (N,) -> ().

    References:
        Kang & McAuley, ICDM 2018 (``CITATIONS["bce"]``); Mezentsev et al., RecSys 2024 (BCE⁺ in Fig. 6).
    """
    mask, pos, neg = _checked_logits(x, w, targets, negatives, mask)  # (N,), (N,), (N, n)
    return _masked_mean(_binary_rows(pos, neg), mask)


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """gSASRec's calibration power ``beta = alpha (t (1 - 1/alpha) + 1/alpha)``, ``alpha = n / (C - 1)``.

    ``t = 0`` gives beta = 1 (plain BCE), ``t = 1`` gives beta = alpha. Petrov & Macdonald, RecSys 2023
    (as in the SCE code's ``SASRec.__init__``).
    """
    if not 0.0 <= t <= 1.0 or num_items < 2 or num_negatives < 1:
        raise InputError(
            f"gBCE needs t in [0, 1], C >= 2, n >= 1; got t={t}, C={num_items}, n={num_negatives}"
        )
    alpha = num_negatives / (num_items - 1.0)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce_positive_logit(pos: Tensor, beta: float) -> Tensor:
    """The logit of ``sigma(s)^beta``: ``log(1 / (sigma(s)^-beta - 1))``, accurate and finite for any s.

    With ``y = beta * softplus(-s) >= 0`` it is ``-y - log(1 - e^-y)``. Far from 0 (y > log 2) ``log1p`` is
    exact; near 0 we use ``log(1 - e^-y) = log beta + log softplus(-s) + log((1 - e^-y) / y)``, with
    ``log softplus(-s) = -s - e^-s / 2`` for s > 20, so nothing underflows to ``log 0`` even when
    ``sigma(s)`` rounds to 1 (the naive formula returns inf from s ~ 17 in fp32). Shapes: (...) -> (...).
    """
    if beta <= 0:
        raise InputError(f"beta must be > 0, got {beta}")
    cut = math.log(2.0)
    y = -beta * F.logsigmoid(pos)  # (...) = -log sigma(s)^beta (F.softplus is linear above 20)
    far = torch.log1p(-torch.exp(-y.clamp(min=cut)))  # (...) log(1 - e^-y) for y > log 2
    # each branch sees only its own side: no inf/NaN grads
    big, small = pos.clamp(min=20.0), pos.clamp(max=20.0)  # (...), (...)
    log_sp = torch.where(pos > 20.0, -big - 0.5 * torch.exp(-big), torch.log(-F.logsigmoid(small)))  # (...)
    y_mid = y.clamp(min=1e-8, max=cut)  # (...)
    ratio = torch.where(y < 1e-8, -0.5 * y, torch.log(-torch.expm1(-y_mid) / y_mid))  # (...) log((1-e^-y)/y)
    near = math.log(beta) + log_sp + ratio  # (...) log(1 - e^-y) for y <= log 2
    return -y - torch.where(y > cut, far, near)  # (...)


def gbce_loss(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    negatives: Tensor,
    *,
    t: float = 0.75,
    mask: Tensor | None = None,
    num_items: int | None = None,
) -> Tensor:
    """Generalised BCE: BCE with the positive probability ``sigma(s+)`` replaced by ``sigma(s+)^beta``.

    The positive term ``-log sigma(l)`` of the transformed logit ``l = gbce_positive_logit(s+, beta)`` equals
    ``-beta * log sigma(s+)`` exactly, which is how it is computed (finite for any s+). Negatives are meant to
    come from :func:`~dualenc.losses.uniform_negatives.sample_uniform` (with replacement). Row loss = mean of
    the 1 + n terms, as in :func:`bce_loss`.

    Args:
        t: calibration parameter in [0, 1] (paper grid 0.75, 0.9); t = 0 is BCE.
        num_items: catalog size for ``alpha = n / (C - 1)``; None = rows of ``w``. Pass C - 1 when ``w``
            holds a pad row, to match the SCE code (which counts real items only).

    Shapes:
        as :func:`bce_loss`.

    References:
        Petrov & Macdonald, RecSys 2023 (``CITATIONS["gbce"]``); Mezentsev et al., RecSys 2024 (baseline).
    """
    mask, pos, neg = _checked_logits(x, w, targets, negatives, mask)  # (N,), (N,), (N, n)
    beta = gbce_beta(neg.shape[1], num_items if num_items is not None else w.shape[0], t)
    return _masked_mean(_binary_rows(pos, neg, beta), mask)


def ce_minus_loss(
    x: Tensor, w: Tensor, targets: Tensor, negatives: Tensor, *, mask: Tensor | None = None
) -> Tensor:
    """Sampled softmax CE⁻: cross-entropy over [positive, n negatives], no logQ correction.

    The paper's setting shares one negative set per sequence: pass negatives (S, n) from
    :func:`~dualenc.losses.uniform_negatives.sample_unseen` with one history row per sequence, and rows of
    ``x`` grouped by sequence (N = S * L, the flattening of an (S, L) batch). Per-row negatives (N, n) work
    too.

    Shapes:
        as :func:`bce_loss`.

    References:
        Klenitskiy & Vasilev, RecSys 2023 (``CITATIONS["ce_minus"]``); Mezentsev et al., RecSys 2024
        (baseline).
    """
    mask, pos, neg = _checked_logits(x, w, targets, negatives, mask)  # (N,), (N,), (N, n)
    row_loss = torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos  # (N,)
    return _masked_mean(row_loss, mask)
