"""The statistics of eval/compare_training.py: how crowded an embedding space is, and a paired significance
test of two systems on the same queries. Plain numpy (and scipy for the test); no dualenc imports."""

from __future__ import annotations

import numpy as np


def _unit_row_sum(emb: np.ndarray, block_rows: int) -> np.ndarray:
    """sum_i e_i / ||e_i|| over the rows of ``emb`` (n, D), read ``block_rows`` at a time (memmaps stay on
    disk)."""
    total = np.zeros(emb.shape[1], dtype=np.float64)  # (D,)
    for start in range(0, emb.shape[0], block_rows):
        rows = np.asarray(emb[start : start + block_rows], dtype=np.float64)  # (b, D)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)  # (b, 1)
        if (norms == 0).any():
            raise ValueError(f"row {start + int(np.argmin(norms[:, 0]))} is the zero vector: no cosine")
        total += (rows / norms).sum(axis=0)
    return total


def mean_pairwise_cosine(*embs: np.ndarray, block_rows: int = 65_536) -> float:
    """Mean cosine similarity over the n(n-1) ordered pairs of distinct rows of ``embs`` (arrays (n_k, D)
    taken together, e.g. the shards of a corpus), in O(D) extra memory: (||sum_i u_i||^2 - n) / (n (n - 1))
    with u_i = e_i / ||e_i||. Near 0: the embeddings spread over the sphere; near 1: crowded into a narrow
    cone (the anisotropy of Ethayarajh, EMNLP 2019)."""
    n = sum(emb.shape[0] for emb in embs)
    if n < 2:
        raise ValueError("the mean pairwise cosine needs at least 2 rows")
    total = sum(_unit_row_sum(emb, block_rows) for emb in embs)  # (D,)
    return float((total @ total - n) / (n * (n - 1)))


def paired_randomization_pvalue(a: np.ndarray, b: np.ndarray, *, num_resamples: int = 10_000) -> float:
    """Two-sided paired randomization (sign-flip) test of mean(a - b) = 0.

    The IR default for comparing two systems on the same queries (Smucker, Allan, Carterette, CIKM 2007);
    exact when 2^n <= ``num_resamples``. Needs scipy.
    """
    from scipy import stats

    result = stats.permutation_test(
        (a, b),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=num_resamples,
        alternative="two-sided",
        random_state=0,
    )
    return float(result.pvalue)
