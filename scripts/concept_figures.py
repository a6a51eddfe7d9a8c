"""Make the six figures of docs/concepts.md, each computed with dualenc's own code where the concept lives.

    python scripts/concept_figures.py                 # writes docs/figures/concept_*.png
    python scripts/concept_figures.py --out /tmp/fig  # anywhere else

Deterministic (fixed seeds, no global random state) and headless (matplotlib ``Figure`` objects rendered by
the Agg backend; pyplot is never imported). Each ``*_figure`` function writes one PNG and returns the numbers
it plots, which tests/test_concept_figures.py checks against the claims of docs/concepts.md.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import permutations
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Patch

from dualenc.losses.base import false_negative_mask
from dualenc.losses.sce import ScalableCE, default_bucket_count
from dualenc.losses.sce_config import SCEConfig
from dualenc.negcache.config import CacheConfig
from dualenc.negcache.draw import CacheSampler, StepQueries
from dualenc.negcache.gumbel import GumbelKey
from dualenc.negcache.negative_cache import NegativeCache
from dualenc.negcache.scan import merge_shards, scan_table
from dualenc.negcache.table import EmbeddingTable

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures"
DPI = 110
WIDTH = 8.0  # inches: 880 px at DPI
MSMARCO_PASSAGES = 8_841_823
Numbers = dict[str, Any]


def _save(fig: Figure, out: Path, name: str) -> Path:
    """Write ``fig`` as ``out/concept_<name>.png`` and return the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"concept_{name}.png"
    fig.savefig(path, dpi=DPI)
    return path


def _one_process() -> SimpleNamespace:
    """The attributes of an Accelerate ``Accelerator`` that the cache reads, for one CPU process."""
    return SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------- dual encoder
def _box(
    ax: Axes, x: float, y: float, width: float, height: float, text: str, color: str
) -> tuple[float, ...]:
    """A rounded box centred at (x, y) in axes coordinates; returns its (left, right, bottom, top)."""
    left, bottom = x - width / 2, y - height / 2
    patch = FancyBboxPatch((left, bottom), width, height, boxstyle="round,pad=0.008", fc=color, ec="0.3")
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=9)
    return left, left + width, bottom, bottom + height


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], style: str = "->") -> None:
    """An arrow from ``start`` to ``end`` in axes coordinates."""
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": style, "lw": 1.2, "color": "0.25"})


def dual_encoder_figure(out: Path) -> Numbers:
    """A diagram: texts -> towers -> pooling -> vectors -> score -> softmax CE over a candidate set."""
    fig = Figure(figsize=(WIDTH, 3.3), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title("Dual encoder: two towers, one inner product")
    pool = "pool: cls | mean\n(+ L2 if normalize)"
    columns = (  # (centre x, width, box colour, query text, document text)
        (0.075, 0.13, "#f2f2f2", "query\ntext q", "document\ntext d"),
        (
            0.255,
            0.16,
            "#cfe2f3",
            "query tower f\n(transformer)",
            "document tower g\n(= f unless\nuntie_encoder)",
        ),
        (0.445, 0.15, "#d9ead3", pool, pool),
        (0.615, 0.11, "#fff2cc", r"$f(q) \in \mathbb{R}^D$", r"$g(d) \in \mathbb{R}^D$"),
    )
    ends = {}
    for side, y in (("q", 0.78), ("d", 0.22)):
        previous = None
        for x, width, color, q_text, d_text in columns:
            box = _box(ax, x, y, width, 0.28, q_text if side == "q" else d_text, color)
            if previous is not None:
                _arrow(ax, (previous[1], y), (box[0], y))
            previous = box
        ends[side] = (previous[1], y)
    _arrow(ax, (0.255, 0.355), (0.255, 0.645), style="<->")
    ax.text(0.34, 0.5, "one shared module\nby default", ha="left", va="center", fontsize=8, style="italic")
    score = _box(ax, 0.855, 0.66, 0.27, 0.26, "score\n" r"$s(q,d)=\langle f(q), g(d)\rangle/\tau$", "#f4cccc")
    loss = _box(ax, 0.855, 0.2, 0.27, 0.26, "softmax CE over\n" r"$\{d^+\} \cup$ negatives", "#ead1dc")
    _arrow(ax, ends["q"], (score[0], 0.74))
    _arrow(ax, ends["d"], (score[0], 0.58))
    _arrow(ax, (0.855, score[2]), (0.855, loss[3]))
    path = _save(fig, out, "dual_encoder")
    return {"path": path}


# ---------------------------------------------------------------------------------------- in-batch vs cache
CATEGORIES = (
    ("positive $d^+$ (live)", "#38a169"),
    ("batch document (live logit)", "#90cdf4"),
    ("masked: other known positive", "#a0aec0"),
    (r"rest R of the table (stale, in $\ell_R$)", "#fbd38d"),
    ("drawn from R, re-encoded live", "#c53030"),
)
POS, LIVE, MASKED, REST, DRAWN = range(5)


def inbatch_cache_example(num_draws: int = 2, seed: int = 3) -> Numbers:
    """4 queries, a batch of positive + hard negative each, a 24-document table; the draws of CacheSampler."""
    gen = torch.Generator().manual_seed(seed)
    num_docs, dim, scale = 24, 16, 10.0
    docs = torch.nn.functional.normalize(torch.randn(num_docs, dim, generator=gen), dim=1)  # (M, D)
    batch_docs = torch.tensor([0, 10, 1, 11, 2, 12, 3, 13])  # (B·G,) positive, hard negative per query
    targets = torch.tensor([0, 2, 4, 6])  # (B,) column of each query's positive
    positives = torch.tensor([[0, 5], [1, -1], [2, 3], [3, -1]])  # (B, P): q0 also has 5, q2 also has 3
    queries = docs[batch_docs[targets]] + 0.6 * torch.randn(4, dim, generator=gen) / dim**0.5  # (B, D)
    queries = torch.nn.functional.normalize(queries, dim=1)
    table = EmbeddingTable(num_docs, dim)
    table.fill_corpus(docs, torch.arange(num_docs))
    cfg = CacheConfig(num_cache_negatives=num_draws, cache_inbatch=True)
    sampler = CacheSampler(table, _one_process(), cfg, SCEConfig(), seed=0)
    pos_score = scale * (queries * docs[batch_docs[targets]]).sum(1)  # (B,)
    step = StepQueries(queries, pos_score, positives, batch_docs, torch.tensor(scale), step=0)
    draw = sampler.draw(step, cross_device=False)
    inbatch = torch.full((4, batch_docs.numel()), LIVE)  # (B, B·G)
    inbatch[false_negative_mask(batch_docs, positives, targets)] = MASKED
    inbatch[torch.arange(4), targets] = POS
    cache = torch.full((4, num_docs), REST)  # (B, M) corpus mode: slot j holds corpus row j
    cache[:, batch_docs] = LIVE
    for i in range(4):
        cache[i, positives[i][positives[i] >= 0]] = MASKED
        cache[i, batch_docs[targets[i]]] = POS
    in_rest = cache == REST  # (B, M) the masked softmax R of each query
    for i in range(4):
        cache[i, draw.doc_idx[i][draw.doc_idx[i] >= 0]] = DRAWN
    dense = scale * queries @ docs.T  # (B, M)
    rest_lse = torch.logsumexp(dense.masked_fill(~in_rest, float("-inf")), dim=1)  # (B,)
    return {
        "inbatch": inbatch.numpy(),
        "cache": cache.numpy(),
        "batch_docs": batch_docs.numpy(),
        "drawn": draw.doc_idx.numpy(),
        "in_rest": in_rest.numpy(),
        "rest_lse_sampler": draw.rest_lse.numpy(),
        "rest_lse_dense": rest_lse.numpy(),
    }


def _category_panel(ax: Axes, grid: np.ndarray, columns: np.ndarray, title: str, xlabel: str) -> None:
    """One (queries x documents) panel coloured by category, with cell borders."""
    cmap = ListedColormap([c for _, c in CATEGORIES])
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(CATEGORIES) - 0.5, aspect="auto")
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [f"$q_{i}$" for i in range(grid.shape[0])])
    ax.set_xticks(np.arange(-0.5, len(columns)), minor=True)
    ax.set_yticks(np.arange(-0.5, grid.shape[0]), minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)


def inbatch_vs_cache_figure(out: Path) -> Numbers:
    """Which documents each query's softmax contains: in-batch (left) vs negative cache (right)."""
    ex = inbatch_cache_example()
    fig = Figure(figsize=(WIDTH, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [8, 24]})
    _category_panel(left, ex["inbatch"], ex["batch_docs"], "loss: inbatch", "batch document (corpus row)")
    left.set_ylabel("query")
    m = ex["drawn"].shape[1]
    _category_panel(
        right,
        ex["cache"],
        np.arange(ex["cache"].shape[1]),
        f"loss: cache (m = {m} draws per query)",
        "table slot = corpus row (cache_mode: corpus)",
    )
    for i, row in enumerate(ex["drawn"]):
        for doc, count in zip(*np.unique(row[row >= 0], return_counts=True), strict=True):
            right.text(doc, i, f"{count}×", ha="center", va="center", color="white", fontsize=8)
    fig.suptitle("What each query is scored against: the batch only, or the batch plus the whole table")
    handles = [Patch(color=c, label=label) for label, c in CATEGORIES]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    ex["path"] = _save(fig, out, "inbatch_vs_cache")
    return ex


# ------------------------------------------------------------------------------------------- Gumbel-max
GUMBEL_SCORES = (2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0)


def keyed_draws(
    scores: torch.Tensor, num_shards: int, num_queries: int, num_samples: int, replacement: bool, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws of ``num_queries`` identical queries from ``softmax(scores)`` with dualenc's scan + shard merge.

    The table (one 1-d embedding per document, = its score) is split into ``num_shards`` contiguous shards;
    each is scanned (:func:`scan_table`) and the results merged (:func:`merge_shards`), as training does.
    Returns the drawn corpus rows (Q, m) and the merged log-sum-exp (Q,).
    """
    num_docs = scores.numel()
    queries = torch.ones(num_queries, 1)  # (Q, 1): score = <1, e_j> = s_j
    bounds = np.linspace(0, num_docs, num_shards + 1).astype(int)
    lse, above, keys, rows = [], [], [], []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        shard = EmbeddingTable(int(end - start), 1, slot_offset=int(start))
        shard.fill_corpus(scores[start:end, None].float(), torch.arange(start, end))
        res = scan_table(
            shard,
            queries,
            1.0,
            pos_score=torch.zeros(num_queries),
            mask_rows=torch.zeros(0, dtype=torch.long),
            mask_slots=torch.zeros(0, dtype=torch.long),
            home_slots=None,
            num_samples=num_samples,
            replacement=replacement,
            key=GumbelKey(seed=0, step=step),
            query_ids=torch.arange(num_queries),
        )
        lse.append(res.lse)
        above.append(res.above)
        keys.append(res.keys)
        rows.append(torch.where(res.slots >= 0, shard.doc_idx[res.slots.clamp(min=0)], -1))
    merged = merge_shards(
        torch.stack(lse), torch.stack(above), torch.stack(keys), torch.stack(rows), replacement=replacement
    )
    return merged.slots, merged.lse


def inclusion_probabilities(probs: np.ndarray, m: int) -> np.ndarray:
    """P(j in the sample) for m draws without replacement (draw, remove, renormalise), by enumeration."""
    incl = np.zeros_like(probs)
    for seq in permutations(range(len(probs)), m):
        p, left = 1.0, 1.0
        for j in seq:
            p *= probs[j] / left
            left -= probs[j]
        incl[list(seq)] += p
    return incl


def gumbel_max_numbers(num_queries: int = 100_000, top_m: int = 3) -> Numbers:
    """Empirical draw frequencies on 1 and 4 shards, with and without replacement, and the exact values."""
    scores = torch.tensor(GUMBEL_SCORES, dtype=torch.float64)
    probs = torch.softmax(scores, 0).numpy()
    res: Numbers = {"scores": np.array(GUMBEL_SCORES), "softmax": probs, "num_draws": num_queries}
    res["inclusion"] = inclusion_probabilities(probs, top_m)
    res["top_m"] = top_m
    for shards in (1, 4):
        one, lse = keyed_draws(scores, shards, num_queries, 1, True, step=0)
        res[f"one_{shards}"] = one[:, 0].numpy()
        res[f"lse_{shards}"] = lse.numpy()
        res[f"freq_{shards}"] = np.bincount(one[:, 0].numpy(), minlength=len(probs)) / num_queries
        top, _ = keyed_draws(scores, shards, num_queries, top_m, False, step=1)
        res[f"top_{shards}"] = top.numpy()
        res[f"incl_{shards}"] = np.bincount(top.flatten().numpy(), minlength=len(probs)) / num_queries
    res["lse_exact"] = float(torch.logsumexp(scores, 0))
    return res


def gumbel_max_figure(out: Path) -> Numbers:
    """Frequencies of keyed Gumbel-max draws (1 and 4 shards) against the exact softmax probabilities."""
    res = gumbel_max_numbers()
    n, x = res["num_draws"], np.arange(len(GUMBEL_SCORES))
    fig = Figure(figsize=(WIDTH, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (
        ("softmax", "freq", "one draw: argmax$_j$ $(s_j + g_j)$", "probability of being drawn"),
        (
            "inclusion",
            "incl",
            f"Gumbel-top-{res['top_m']}: {res['top_m']} draws without replacement",
            "probability of being in the sample",
        ),
    )
    for ax, (exact, emp, title, ylabel) in zip(axes, panels, strict=True):
        p = res[exact]
        ax.bar(x - 0.27, p, 0.27, color="0.6", label="exact")
        for off, shards, color in ((0.0, 1, "#3182ce"), (0.27, 4, "#dd6b20")):
            se = np.sqrt(res[f"{emp}_{shards}"] * (1 - res[f"{emp}_{shards}"]) / n)
            ax.bar(
                x + off,
                res[f"{emp}_{shards}"],
                0.27,
                yerr=2 * se,
                color=color,
                capsize=2,
                label=f"{shards} shard{'s' * (shards > 1)} (±2 s.e.)",
            )
        ax.set_xticks(x, [f"$d_{j}$\n{s:+.1f}" for j, s in enumerate(GUMBEL_SCORES)], fontsize=8)
        ax.set_xlabel("document $d_j$ and its score $s_j$ (logit)")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    same = int((res["one_1"] == res["one_4"]).sum()), int((res["top_1"] == res["top_4"]).all(1).sum())
    fig.suptitle(
        f"dualenc's keyed Gumbel-max draws for {n:,} queries against the exact softmax\n"
        f"1 and 4 shards draw the same documents for {same[0]:,} (one draw) and "
        f"{same[1]:,} (top-{res['top_m']}) of {n:,} queries",
        fontsize=10,
    )
    res["path"] = _save(fig, out, "gumbel_max")
    return res


# -------------------------------------------------------------------------------------- refresh / staleness
def refresh_count(num_slots: int, fraction: float) -> int:
    """k, the slots :meth:`NegativeCache.refresh` re-encodes per optimizer step (corpus mode)."""
    return max(1, round(fraction * num_slots))


def steady_state_ages(num_slots: int, fraction: float) -> tuple[int, float]:
    """(max, mean) slot age after many steps of refresh alone: k slots at each age 0..n-2, the rest at n-1."""
    k = refresh_count(num_slots, fraction)
    n = math.ceil(num_slots / k)
    mean = (k * (n - 1) * (n - 2) / 2 + (num_slots - (n - 1) * k) * (n - 1)) / num_slots
    return n - 1, mean


def simulate_refresh(
    num_slots: int, fraction: float, steps: int, *, writes_per_step: int = 0, seed: int = 0
) -> tuple[list[dict[str, float]], np.ndarray]:
    """Run ``steps`` optimizer steps of :class:`NegativeCache`'s write-back and refresh on a corpus table.

    The towers are replaced by a stub (every re-encode returns ones): only which slots are written, and their
    ages, matter here. ``writes_per_step`` uniformly random documents are written back per step, standing in
    for the batch's documents and drawn negatives of real training. Returns the logs of every ``refresh`` call
    and the final ages (M,).
    """
    cfg = CacheConfig(cache_mode="corpus", refresh_fraction=fraction)
    cache = NegativeCache(cfg, range(num_slots), _one_process(), dim=2, seed=0)
    cache._encode_rows = lambda model, rows: torch.ones(rows.numel(), 2)  # stub towers
    cache.table.fill_corpus(torch.ones(num_slots, 2), torch.arange(num_slots))
    gen, logs = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        if writes_per_step:
            rows = torch.randperm(num_slots, generator=gen)[:writes_per_step]
            cache.write_back(rows, torch.ones(writes_per_step, 2))
        logs.append(cache.refresh(model=None))
    return logs, cache.table.age.numpy().copy()


REFRESH_FRACTIONS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)


def refresh_fraction_figure(out: Path, num_slots: int = 1000) -> Numbers:
    """Steady-state max and mean age against the refresh fraction r, and the re-encoding cost per step."""
    rows = []
    for r in REFRESH_FRACTIONS:
        n = math.ceil(num_slots / refresh_count(num_slots, r))
        last = simulate_refresh(num_slots, r, n + 2)[0][-1]
        rows.append((r, last["cache/age_max"], last["cache/age_mean"], *steady_state_ages(num_slots, r)))
    r, sim_max, sim_mean, th_max, th_mean = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
    fig = Figure(figsize=(WIDTH, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.loglog(r, th_max, "-", color="#c53030", label=r"max age $= \lceil M/k\rceil - 1$")
    ax.loglog(r, sim_max, "o", color="#c53030", ms=6, mfc="none", label="max age, simulated (cache/age_max)")
    ax.loglog(r, th_mean, "-", color="#3182ce", label="mean age, exact formula")
    ax.loglog(
        r, sim_mean, "s", color="#3182ce", ms=5, mfc="none", label="mean age, simulated (cache/age_mean)"
    )
    for value, text in ((0.001, "msmarco_cache"), (0.01, "default"), (0.02, "scifact_cache")):
        ax.axvline(value, color="0.5", ls=":", lw=1)
        ax.text(value * 1.06, 1.1, text, rotation=90, fontsize=8, color="0.35", va="bottom")
    ax.set_xlabel(f"refresh fraction r (slots re-encoded per optimizer step / table size; M = {num_slots:,})")
    ax.set_ylabel("steady-state slot age (optimizer steps)")
    top = ax.secondary_xaxis(
        "top", functions=(lambda v: v * MSMARCO_PASSAGES, lambda v: v / MSMARCO_PASSAGES)
    )
    top.set_xlabel("passages re-encoded per optimizer step (no grad) for the 8.8M-passage MS MARCO table")
    ax.set_title("Refresh fraction: staleness falls as 1/r, re-encoding cost grows as r", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(which="major", alpha=0.3)
    path = _save(fig, out, "refresh_fraction")
    return {
        "r": r,
        "sim_max": sim_max,
        "sim_mean": sim_mean,
        "max": th_max,
        "mean": th_mean,
        "path": path,
        "num_slots": num_slots,
    }


def staleness_figure(out: Path, num_slots: int = 1000, steps: int = 40, writes: int = 64) -> Numbers:
    """Max and mean age per step for three refresh fractions, and the age histogram with write-backs."""
    fig = Figure(figsize=(WIDTH, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    res: Numbers = {"num_slots": num_slots, "steps": steps, "writes": writes}
    step = np.arange(1, steps + 1)
    for r, color in ((0.2, "#38a169"), (0.1, "#3182ce"), (0.05, "#c53030")):
        logs, _ = simulate_refresh(num_slots, r, steps)
        res[f"age_max_{r}"] = np.array([x["cache/age_max"] for x in logs])
        res[f"age_mean_{r}"] = np.array([x["cache/age_mean"] for x in logs])
        left.plot(step, res[f"age_max_{r}"], "-", color=color, label=f"r = {r}: max")
        left.plot(step, res[f"age_mean_{r}"], "--", color=color, label=f"r = {r}: mean")
    left.set_xlabel("optimizer step")
    left.set_ylabel("slot age (optimizer steps)")
    left.set_title("refresh only (cache/age_max, cache/age_mean)", fontsize=10)
    left.set_ylim(0, 27)
    left.legend(fontsize=7, ncols=3, loc="upper left")
    r = 0.05
    ages_plain = simulate_refresh(num_slots, r, steps)[1]
    ages_written = simulate_refresh(num_slots, r, steps, writes_per_step=writes)[1]
    bins = np.arange(0, ages_plain.max() + 2)
    for ages, off, color, label in (
        (ages_plain, -0.2, "#c53030", "refresh only"),
        (ages_written, 0.2, "#805ad5", f"+ write-back of {writes} random docs / step"),
    ):
        counts = np.bincount(ages, minlength=len(bins) - 1)
        right.bar(bins[:-1] + off, counts, 0.4, color=color, label=f"{label} (mean {ages.mean():.1f})")
    res.update(ages_plain=ages_plain, ages_written=ages_written)
    right.set_xlabel(f"slot age after step {steps} (optimizer steps)")
    right.set_ylabel(f"slots (of {num_slots:,})")
    right.set_title(f"age histogram, r = {r}", fontsize=10)
    right.set_ylim(0, 1.35 * max(np.bincount(ages_written).max(), np.bincount(ages_plain).max()))
    right.legend(fontsize=7, loc="upper right")
    fig.suptitle(
        "Staleness: the age of a slot is the number of optimizer steps since it was written", fontsize=10
    )
    res["path"] = _save(fig, out, "staleness")
    return res


# ------------------------------------------------------------------------------------------- SCE buckets
def sce_data(
    kind: str, num_rows: int = 256, num_items: int = 4096, dim: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random queries x (N, D) and items w (C, D): ``iso`` both Gaussian; ``lowrank`` queries in 4 dims."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randn(num_items, dim, generator=gen)  # (C, D)
    if kind == "iso":
        return torch.randn(num_rows, dim, generator=gen), items
    basis = torch.linalg.qr(torch.randn(dim, 4, generator=gen))[0]  # (D, 4) orthonormal
    x = torch.randn(num_rows, 4, generator=gen) @ basis.T + 0.05 * torch.randn(num_rows, dim, generator=gen)
    return x, items


def bucket_candidates(
    x: torch.Tensor, w: torch.Tensor, n_b: int, b_x: int, b_y: int, mix: bool, seed: int
) -> torch.Tensor:
    """(N, C) bool: item c is in a bucket holding row i, for buckets drawn by :meth:`ScalableCE.assign`."""
    sce = ScalableCE(n_b, b_x, b_y, mix=mix)
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    buckets = sce.assign(x, w, mask, n_b, b_x, torch.Generator().manual_seed(seed))
    rows = torch.zeros(x.shape[0], n_b)  # (N, n_b)
    rows[buckets.rows, torch.arange(n_b)[:, None].expand_as(buckets.rows)] = 1.0
    items = torch.zeros(n_b, w.shape[0])  # (n_b, C)
    items[torch.arange(n_b)[:, None].expand_as(buckets.items), buckets.items] = 1.0
    return (rows @ items) > 0  # (N, C)


def topk_capture(
    x: torch.Tensor, w: torch.Tensor, n_b: int, b_x: int, b_y: int, mix: bool, *, k: int = 16, seeds: int = 4
) -> float:
    """Mean over rows (and ``seeds`` draws of centres) of the fraction of a row's true top-k logits that are
    among its bucket candidates; a row in no bucket counts 0."""
    true_top = (x @ w.T).topk(k, dim=1).indices  # (N, k)
    hits = [
        bucket_candidates(x, w, n_b, b_x, b_y, mix, s).gather(1, true_top).float().mean()
        for s in range(seeds)
    ]
    return float(torch.stack(hits).mean())


SCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def sce_buckets_figure(out: Path, b_y: int = 64, k: int = 16) -> Numbers:
    """Top-k items captured by SCE buckets vs n_b (Gaussian vs Mix centres), and the logits SCE keeps."""
    res: Numbers = {"n_b": np.array(SCE_BUCKETS), "b_y": b_y, "k": k}
    fig = Figure(figsize=(WIDTH, 3.9), layout="constrained")
    left, right = fig.subplots(1, 2)
    for kind, style, marker, name in (
        ("lowrank", "-", "o", "rank-4 queries"),
        ("iso", "--", "s", "isotropic"),
    ):
        x, w = sce_data(kind)
        b_x = default_bucket_count(x.shape[0])
        res.update(N=x.shape[0], C=w.shape[0], b_x=b_x)
        for mix, color in ((False, "#3182ce"), (True, "#dd6b20")):
            curve = np.array([topk_capture(x, w, n, b_x, b_y, mix, k=k) for n in SCE_BUCKETS])
            res[f"{kind}_{'mix' if mix else 'random'}"] = curve
            label = f"{'Mix' if mix else 'Gaussian'} centres, {name}"
            left.plot(res["n_b"], curve, style, marker=marker, ms=4, color=color, label=label)
    left.set_xscale("log", base=2)
    left.axvline(res["b_x"], color="0.5", ls=":", lw=1, label=r"default $n_b = \lfloor 2\sqrt{N} \rfloor$")
    left.set_xlabel(f"buckets $n_b$ ($b_x$ = {res['b_x']} rows, $b_y$ = {b_y} items each)")
    left.set_ylabel(f"share of a row's top-{k} items in its buckets")
    left.set_title(f"N = {res['N']} rows, C = {res['C']:,} items, D = 32", fontsize=10)
    left.set_ylim(0, 1)
    left.legend(fontsize=7, handlelength=3)
    n_b = res["n_b"].astype(float)
    res["sce_logits"] = n_b * res["b_x"] * (b_y + 1)
    right.loglog(n_b, res["sce_logits"], "o-", color="#805ad5", ms=4, label=r"SCE: $n_b\, b_x\, (b_y+1)$")
    right.axhline(res["N"] * res["C"], color="0.3", label=r"full CE: $N\, C$")
    right.set_xscale("log", base=2)
    right.set_xlabel("buckets $n_b$")
    right.set_ylabel("logits with gradient (count)")
    right.set_title("memory: the logits the loss differentiates", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle("SCE buckets: how many of each row's largest logits random buckets find", fontsize=10)
    res["path"] = _save(fig, out, "sce_buckets")
    return res


FIGURES = {
    "dual_encoder": dual_encoder_figure,
    "inbatch_vs_cache": inbatch_vs_cache_figure,
    "gumbel_max": gumbel_max_figure,
    "refresh_fraction": refresh_fraction_figure,
    "staleness": staleness_figure,
    "sce_buckets": sce_buckets_figure,
}


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: these tensors are small, and a busy machine makes a thread pool crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_all(out: Path, *, verbose: bool = False) -> dict[str, Numbers]:
    """Write every figure into ``out``; returns each figure's numbers by name."""
    results = {}
    with single_thread():
        for name, make in FIGURES.items():
            tick = time.perf_counter()
            results[name] = make(out)
            if verbose:
                path = results[name]["path"]
                size = path.stat().st_size / 1024
                print(f"{path}  {size:.0f} KiB  {time.perf_counter() - tick:.1f} s")
    return results


def main(argv: list[str] | None = None) -> dict[str, Numbers]:
    """Command line: ``--out DIR`` (default docs/figures); prints each PNG's path, size and time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (default docs/figures)"
    )
    return make_all(parser.parse_args(argv).out, verbose=True)


if __name__ == "__main__":
    main()
