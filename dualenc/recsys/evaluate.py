"""Full-catalog next-item evaluation: rank every item, drop the user's seen items, score the single target.

Definitions as the SCE paper's code (``eval_utils.py::calculate_topn_metrics``), one target per user:

- ``HR@k``   fraction of users whose target is in their top k;
- ``NDCG@k`` mean over users of ``1 / log2(rank + 1)`` when the target is at ``rank <= k``, else 0 (the ideal
  DCG of one relevant item is 1);
- ``COV@k``  catalog coverage: distinct items in the union of all top-k lists / C.

The pad item and every item in the user's input history are excluded from the ranking (a seen target then
cannot be hit, as in the official code).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dualenc.recsys.data import PAD, left_pad
from dualenc.recsys.sasrec import SASRec


def exclude_seen(scores: Tensor, seen: Sequence[np.ndarray]) -> Tensor:
    """Set the pad column and each row's seen items to -inf (in place); scores (U, C + 1) -> (U, C + 1)."""
    scores[:, PAD] = float("-inf")
    rows = torch.cat([torch.full((len(s),), r, dtype=torch.long) for r, s in enumerate(seen)])  # (S,)
    cols = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in seen])  # (S,)
    scores[rows, cols] = float("-inf")
    return scores


def ranking_metrics(
    top_items: np.ndarray, targets: np.ndarray, num_items: int, ks: Sequence[int] = (10,)
) -> dict:
    """HR@k, NDCG@k and COV@k of ranked lists against one target per user.

    Args:
        top_items: each user's items, best first; at least max(ks) columns.
        targets: each user's target item.
        num_items: C, for coverage.
        ks: cut-offs.

    Returns:
        {"NDCG@k": float, "HR@k": float, "COV@k": float} for each k.

    Shapes:
        top_items (U, K), targets (U,) -> dict of floats.
    """
    top_items, targets = np.asarray(top_items), np.asarray(targets)
    if top_items.ndim != 2 or targets.shape != (top_items.shape[0],) or top_items.shape[1] < max(ks):
        raise ValueError(
            f"need top_items (U, >= {max(ks)}) and targets (U,), got {top_items.shape}, {targets.shape}"
        )
    out = {}
    for k in ks:
        hits = top_items[:, :k] == targets[:, None]  # (U, k)
        ranks = np.nonzero(hits)[1] + 1.0  # (hits,) 1-based rank of each found target
        num_users = max(len(targets), 1)
        out[f"NDCG@{k}"] = float(np.sum(1.0 / np.log2(ranks + 1.0)) / num_users)
        out[f"HR@{k}"] = float(hits.any(axis=1).sum() / num_users)
        out[f"COV@{k}"] = float(np.unique(top_items[:, :k]).size / num_items)
    return out


@torch.no_grad()
def recommend(model: SASRec, inputs: Sequence[np.ndarray], k: int, batch_size: int = 256) -> np.ndarray:
    """Top-k unseen items for each input history (the last ``model.maxlen`` items are fed): (U, k) int64."""
    was_training = model.training
    model.eval()
    device = model.item_table.device
    tops = []
    for start in range(0, len(inputs), batch_size):
        part = inputs[start : start + batch_size]
        scores = model.score_last(left_pad(part, model.maxlen).to(device)).float().cpu()  # (b, C + 1)
        tops.append(torch.topk(exclude_seen(scores, part), k, dim=1).indices.numpy())  # (b, k)
    model.train(was_training)
    return np.concatenate(tops) if tops else np.zeros((0, k), dtype=np.int64)


def evaluate(
    model: SASRec,
    inputs: Sequence[np.ndarray],
    targets: np.ndarray,
    num_items: int,
    ks: Sequence[int] = (10,),
    batch_size: int = 256,
) -> dict:
    """Rank the full catalog for every user and return :func:`ranking_metrics`."""
    return ranking_metrics(recommend(model, inputs, max(ks), batch_size), targets, num_items, ks)
