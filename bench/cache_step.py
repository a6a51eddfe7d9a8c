"""Negative-cache training step vs in-batch step at equal batch: time split, peak memory, negatives/s.

    python bench/cache_step.py        # CPU: 2-layer BERT (hidden 768), tables 1e4..1e6 x 768
    python bench/cache_step.py --device cuda --layers 12 --batch-size 64 --passage-len 128 \\
        --table-dtype bfloat16

Both steps forward and backward the same number of documents: the in-batch step encodes B queries and
B·(1+m) documents (positive + m hard negatives each); the cache step encodes B queries, B positives and the
B·m negatives drawn from the table. The cache step's own work is timed apart (scoring the whole table in
blocks, Gumbel-max sampling, shard choice, write-back of the fresh embeddings); the refresh (re-encoding
``refresh_fraction`` of the table without gradient) is reported from the measured no-grad encoding
throughput. The table is synthetic (random unit vectors): timing does not depend on its content. Each
configuration runs in a fresh subprocess.

Memory: CUDA ``max_memory_allocated`` above the memory in use before the step (the table counts as setup and
is reported separately); CPU: peak RSS above the post-setup baseline (VmHWM reset through
/proc/self/clear_refs). Output: a table and ``bench/results/cache_step_<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import bench_common

if TYPE_CHECKING:
    import torch

    from dualenc.negcache.table import EmbeddingTable

TABLE_FILL_BLOCK = 262_144  # rows of random unit vectors generated at once


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--table-sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    p.add_argument("--dim", type=int, default=768, help="hidden size = embedding dimension")
    p.add_argument("--layers", type=int, default=2, help="BERT layers (12 = BERT-base)")
    p.add_argument("--batch-size", type=int, default=16, help="queries per step (B)")
    p.add_argument("--query-len", type=int, default=16)
    p.add_argument("--passage-len", type=int, default=64)
    p.add_argument(
        "--num-negatives", type=int, default=1, help="m: cache draws (= hard negatives in-batch) per query"
    )
    p.add_argument("--refresh-fraction", type=float, default=0.01)
    p.add_argument("--table-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=65_536, help="slots scored at once")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median) after one warm-up step")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.table_sizes, args.dim, args.layers, args.batch_size, args.repeats = [2000.0], 64, 1, 4, 1
        args.passage_len, args.query_len = 16, 8
    args.out = args.out or bench_common.REPO / "bench" / "results" / f"cache_step_{args.device}.json"
    return args


class Clock:
    """Wall-clock sections that add up per name, synchronising CUDA so the times are real."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


def random_table(size: int, dim: int, dtype: torch.dtype, device: torch.device) -> EmbeddingTable:
    """A full table of random unit vectors (timing does not depend on the content), slot i holding doc i."""
    import torch

    from dualenc.negcache.table import EmbeddingTable

    table = EmbeddingTable(size, dim, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for start in range(0, size, TABLE_FILL_BLOCK):
        end = min(start + TABLE_FILL_BLOCK, size)
        block = torch.randn(end - start, dim, generator=gen, device=device)  # (n, D)
        table.emb[start:end] = torch.nn.functional.normalize(block, dim=1).to(dtype)
    table.doc_idx.copy_(torch.arange(size, device=device))
    return table


def make_step(
    cfg: dict, tower: torch.nn.Module, table: EmbeddingTable | None, clock: Clock
) -> Callable[[], None]:
    """The training step, sections timed by ``clock``: the in-batch step, or the cache step given a table."""
    import torch

    from dualenc.losses.base import CacheTerms, LossInputs
    from dualenc.losses.cached import CachedCE
    from dualenc.losses.inbatch import InBatchCE
    from dualenc.negcache.gumbel import GumbelKey
    from dualenc.negcache.scan import scan_table

    device = clock.device
    b, m = cfg["batch_size"], cfg["num_negatives"]
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-5)
    loss_in, loss_cache = InBatchCE(0.05).to(device), CachedCE(0.05).to(device)
    rows = torch.arange(b, device=device)  # (B,) query i's positive is document (or slot) i

    def features(n: int, length: int) -> dict[str, torch.Tensor]:
        return bench_common.random_tokens(n, length, device)

    def inbatch_step(q_feat: dict[str, torch.Tensor]) -> None:
        with clock.section("encode_grad"):
            q = tower(q_feat)  # (B, D)
            d = tower(features(b * (1 + m), cfg["passage_len"]))  # (B*(1+m), D)
            loss_in(LossInputs(q, d, rows * (1 + m))).loss.backward()

    def cache_step(q_feat: dict[str, torch.Tensor]) -> None:
        with clock.section("encode_grad"):
            q = tower(q_feat)  # (B, D)
            d = tower(features(b, cfg["passage_len"]))  # (B, D)
        with clock.section("cache_work"):
            scale = torch.tensor(20.0, device=device)
            scan = scan_table(
                table,
                q.detach().float(),
                scale,
                pos_score=scale * (q * d).sum(-1).detach(),  # (B,)
                mask_rows=rows,
                mask_slots=rows,
                home_slots=None,
                num_samples=m,
                replacement=True,
                key=GumbelKey(0, 1),
                query_ids=rows,
                block_size=cfg["block_size"],
            )
            rest_lse, drawn = scan.lse, scan.slots  # (B,), (B, m): one shard, nothing to merge
        with clock.section("encode_grad"):
            neg = tower(features(b * m, cfg["passage_len"])).view(b, m, -1)  # (B, m, D) re-encoded draws
            weight = torch.full((b, m), 1.0 / m, device=device)  # (B, m)
            terms = CacheTerms(rest_lse=rest_lse, neg_emb=neg, neg_weight=weight)
            loss_cache(LossInputs(q, d, rows, cache=terms)).loss.backward()
        with clock.section("cache_work"):  # write-back of the fresh embeddings
            slots = torch.cat([rows, drawn.flatten()])  # (B + B*m,)
            table.write(slots, torch.cat([d.detach(), neg.detach().flatten(0, 1)]))
            table.tick()

    def step() -> None:
        (inbatch_step if table is None else cache_step)(features(b, cfg["query_len"]))
        with clock.section("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def run_single(cfg: dict) -> dict:
    """One (variant, table size) configuration in this process."""
    import torch
    from transformers import BertConfig, BertModel

    from dualenc.model.towers import HFEncoder

    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    b, m, size, dim = cfg["batch_size"], cfg["num_negatives"], int(cfg["table_size"]), cfg["dim"]
    bert_config = BertConfig(
        hidden_size=dim,
        num_hidden_layers=cfg["layers"],
        num_attention_heads=max(1, dim // 64),
        intermediate_size=4 * dim,
        vocab_size=30522,
    )
    tower = HFEncoder(BertModel(bert_config), pooling="cls", normalize=True).to(device).train()
    table = None
    if cfg["variant"] == "cache":
        table = random_table(size, dim, getattr(torch, cfg["table_dtype"]), device)
    clock = Clock(device)
    step = make_step(cfg, tower, table, clock)
    peak = bench_common.peak_of_step(step, device)
    samples = []
    for _ in range(cfg["repeats"]):
        clock.times = {}
        step()
        samples.append(dict(clock.times))
    times = {k: statistics.median(s.get(k, 0.0) for s in samples) for k in samples[0]}
    with torch.no_grad():  # refresh cost: measured no-grad encoding throughput
        tower.eval()
        docs = max(64, b * (1 + m))
        tokens = bench_common.random_tokens(docs, cfg["passage_len"], device)
        with clock.section("refresh_probe"):
            tower(tokens)
        per_doc = clock.times["refresh_probe"] / docs
    table_bytes = 0 if table is None else table.emb.numel() * table.emb.element_size()
    return {
        **cfg,
        "times_s": times,
        "step_s": sum(times.values()),
        "peak_mib": peak / 2**20,
        "table_mib": table_bytes / 2**20,
        "nograd_s_per_doc": per_doc,
        "refresh_s": per_doc * cfg["refresh_fraction"] * size if table is not None else 0.0,
    }


def summarise(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """One row per table size: both steps, the cache's own work and negatives per query per second."""
    summary, b, m = [], args.batch_size, args.num_negatives
    for size in args.table_sizes:
        inb = next(r for r in rows if r["variant"] == "inbatch" and r["table_size"] == size)
        cac = next(r for r in rows if r["variant"] == "cache" and r["table_size"] == size)
        negs_in = b * (1 + m) - 1  # per query: every other batch document
        negs_cache = b - 1 + int(size) - b  # in-batch positives + the whole table (minus the batch's slots)
        rate_in = negs_in / inb["step_s"]  # negatives per query per second
        rate_cache = negs_cache / (cac["step_s"] + cac["refresh_s"])
        summary.append(
            {
                "table": f"{int(size):,} x {args.dim}",
                "inbatch_step_s": inb["step_s"],
                "cache_step_s": cac["step_s"],
                "cache_work_s": cac["times_s"]["cache_work"],
                "cache_work/inbatch": cac["times_s"]["cache_work"] / inb["step_s"],
                "refresh_s": cac["refresh_s"],
                "peak_mib_inbatch": inb["peak_mib"],
                "peak_mib_cache": cac["peak_mib"],
                "table_mib": cac["table_mib"],
                "negs_per_q_per_s_ratio": rate_cache / rate_in,
            }
        )
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if bench_common.serve_single(args.single, run_single):
        return {}
    rows = []
    for size in args.table_sizes:
        for variant in ("inbatch", "cache"):
            cfg = {k: v for k, v in vars(args).items() if k not in ("out", "single", "quick", "table_sizes")}
            cfg.update(variant=variant, table_size=size)
            try:
                rows.append(bench_common.run_config(__file__, cfg))
            except bench_common.ConfigFailed as err:
                raise SystemExit(f"{variant} @ {size:g} failed:\n{err.stderr[-4000:]}") from None
    summary = summarise(args, rows)
    table = bench_common.print_table(summary)
    config = {k: str(v) for k, v in vars(args).items()}
    return bench_common.write_report(
        args.out, {"config": config, "rows": rows, "summary": summary, "table": table}
    )


if __name__ == "__main__":
    main(sys.argv[1:])
