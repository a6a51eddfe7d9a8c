"""scripts/concept_figures.py: the six PNGs of docs/concepts.md, and the numbers the page quotes from them."""

from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest
import torch
from helpers import REPO, load_script

PAGE = REPO / "docs" / "concepts.md"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 150_000


@pytest.fixture(scope="module")
def script():
    return load_script("scripts/concept_figures.py")


@pytest.fixture(scope="module")
def made(script, tmp_path_factory):
    """Run the script's command line once into a temporary folder: (folder, numbers by figure)."""
    out = tmp_path_factory.mktemp("figures")
    return out, script.main(["--out", str(out)])


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_six_valid_pngs(made, script):
    out, numbers = made
    names = {f"concept_{name}.png" for name in script.FIGURES}
    assert len(names) == 6 and {p.name for p in out.glob("*.png")} == names
    for name in names:
        data = (out / name).read_bytes()
        width, height = _png_size(data)
        assert 700 <= width <= 1000 and 200 <= height <= 600, (name, width, height)
        assert len(data) <= MAX_PNG_BYTES, (name, len(data))
    assert all(numbers[name]["path"] == out / f"concept_{name}.png" for name in script.FIGURES)


def test_every_linked_figure_exists_in_docs_figures(script):
    linked = re.findall(r"\]\((figures/concept_\w+\.png)\)", PAGE.read_text(encoding="utf-8"))
    assert sorted(linked) == sorted(f"figures/concept_{name}.png" for name in script.FIGURES)
    for link in linked:
        data = (PAGE.parent / link).read_bytes()
        assert data[:8] == PNG_SIGNATURE, link


def test_gumbel_max_draws_are_softmax_samples_identical_on_1_and_4_shards(made):
    g = made[1]["gumbel_max"]
    n = g["num_draws"]
    for shards in (1, 4):
        for exact, empirical in (("softmax", f"freq_{shards}"), ("inclusion", f"incl_{shards}")):
            p = g[exact]
            z = np.abs(g[empirical] - p) / np.sqrt(p * (1 - p) / n)
            assert z.max() < 4.0, (shards, exact, z)
        assert np.allclose(g[f"lse_{shards}"], g["lse_exact"], atol=1e-5)  # shard LSE combine = global LSE
        top = g[f"top_{shards}"]
        assert all(len(set(row)) == g["top_m"] for row in top.tolist())  # without replacement: distinct
    assert (g["one_1"] == g["one_4"]).all() and (g["top_1"] == g["top_4"]).all()
    assert np.isclose(g["softmax"].sum(), 1) and np.isclose(g["inclusion"].sum(), g["top_m"])


def test_inbatch_and_cache_candidate_sets(made, script):
    ex = made[1]["inbatch_vs_cache"]
    inbatch, cache, in_rest, drawn = ex["inbatch"], ex["cache"], ex["in_rest"], ex["drawn"]
    assert (inbatch == script.LIVE).sum(1).tolist() == [7, 7, 6, 7]  # q2's other positive (row 3) is masked
    assert in_rest.sum(1).tolist() == [15, 16, 16, 16]  # 24 slots - 8 batch documents - other positives
    for i, row in enumerate(drawn):
        assert (row >= 0).all() and in_rest[i, row].all()  # draws only from R: never a positive or batch doc
        assert (cache[i] == script.DRAWN).sum() == len(set(row.tolist()))
    np.testing.assert_allclose(ex["rest_lse_sampler"], ex["rest_lse_dense"], rtol=1e-5)


def test_refresh_steady_state_ages(made, script):
    r = made[1]["refresh_fraction"]
    m = r["num_slots"]
    for fraction, sim_max, sim_mean in zip(r["r"], r["sim_max"], r["sim_mean"], strict=True):
        k = max(1, round(fraction * m))
        assert sim_max == math.ceil(m / k) - 1
        expected_mean = script.steady_state_ages(m, fraction)[1]
        assert sim_mean == pytest.approx(expected_mean, abs=1e-9)
        if m % k == 0:
            assert sim_mean == pytest.approx((m / k - 1) / 2)
    # the examples of docs/concepts.md
    assert script.refresh_count(5183, 0.02) == 104
    assert script.steady_state_ages(5183, 0.02)[0] == 49
    assert script.steady_state_ages(5183, 0.02)[1] == pytest.approx(24.42, abs=0.01)
    assert script.refresh_count(script.MSMARCO_PASSAGES, 0.001) == 8842
    assert script.steady_state_ages(script.MSMARCO_PASSAGES, 0.001)[0] == 999


def test_age_distribution_while_filling_up_and_after(script):
    """k slots at each age 0..min(t, n-1)-1, the rest at min(t, n-1): here M = 20, k = 3, n = 7."""
    for steps in (3, 6, 8, 15):
        ages = script.simulate_refresh(20, 0.15, steps)[1]
        top = min(steps, 6)
        expected = [3] * top + [20 - 3 * top]
        assert np.bincount(ages).tolist() == expected, steps


def test_staleness_curves(made):
    s = made[1]["staleness"]
    m, steps = s["num_slots"], s["steps"]
    for r in (0.2, 0.1, 0.05):
        n = math.ceil(m / max(1, round(r * m)))
        assert s[f"age_max_{r}"].tolist() == [min(t, n - 1) for t in range(1, steps + 1)]
        assert s[f"age_mean_{r}"][n - 2 :] == pytest.approx((n - 1) / 2)
    assert np.bincount(s["ages_plain"]).tolist() == [50] * 20
    written = s["ages_written"]  # write-backs only make slots younger: the maximum stays <= n - 1
    assert s["ages_plain"].mean() == pytest.approx(9.5)
    assert written.max() == 12 and written.mean() == pytest.approx(4.8, abs=0.05)


def test_sce_capture(made, script):
    c = made[1]["sce_buckets"]
    n_b = c["n_b"].tolist()
    default = n_b.index(c["b_x"])
    assert c["b_x"] == 32 and c["N"] == 256 and c["C"] == 4096
    for curve in ("lowrank_random", "lowrank_mix", "iso_random", "iso_mix"):
        assert np.all(np.diff(c[curve]) >= 0), curve  # more buckets, more of the top-k found
    assert np.abs(c["iso_mix"] - c["iso_random"]).max() < 0.05  # isotropic data: Mix ~ Gaussian
    assert c["lowrank_mix"][default] > c["lowrank_random"][default] + 0.3  # rank-4 queries: Mix far ahead
    assert c["lowrank_mix"][default] == pytest.approx(0.70, abs=0.02)
    assert c["lowrank_random"][default] == pytest.approx(0.22, abs=0.02)
    assert c["iso_random"][default] == pytest.approx(0.30, abs=0.03)
    assert c["sce_logits"][default] / (c["N"] * c["C"]) == pytest.approx(0.0635, abs=5e-4)


def test_sce_full_coverage_keeps_every_logit(script):
    x, w = script.sce_data("iso", num_rows=32, num_items=128)
    assert script.topk_capture(x, w, 1, 32, 128, mix=False, seeds=1) == 1.0


@pytest.mark.parametrize("mix", [False, True])
def test_figure_buckets_are_the_cache_candidates(script, mix):
    """ScalableCE.assign's buckets (the figure) = the candidates of cache_candidates=sce, same generator."""
    from dualenc.negcache.sce_candidates import _bucket_candidates
    from dualenc.negcache.table import EmbeddingTable

    x, w = script.sce_data("lowrank", num_rows=64, num_items=512)
    table = EmbeddingTable(512, w.shape[1])
    table.fill_corpus(w, torch.arange(512))
    cand = _bucket_candidates(table, x, torch.Generator().manual_seed(5), 8, 16, 32, mix, 100)  # (Q, K)
    dense = torch.zeros(64, 513, dtype=torch.bool)
    dense[torch.arange(64)[:, None].expand_as(cand), cand.where(cand >= 0, 512)] = True
    assert torch.equal(dense[:, :512], script.bucket_candidates(x, w, 8, 16, 32, mix, seed=5))
