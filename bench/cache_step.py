"""Negative-cache training step vs in-batch training step at equal batch: time split, peak memory, negatives/s.

    python bench/cache_step.py                       # CPU: 2-layer BERT (hidden 768), tables 1e4..1e6 x 768
    python bench/cache_step.py --device cuda --layers 12 --batch-size 64 --passage-len 128 --table-dtype bfloat16

Both steps forward and backward the same number of documents: the in-batch step encodes B queries and B·(1+m)
documents (positive + m hard negatives each); the cache step encodes B queries, B positives and the B·m negatives
drawn from the table. The cache step's own work is timed apart (scoring the whole table in blocks, Gumbel-max
sampling, shard choice, write-back of the fresh embeddings); the refresh (re-encoding ``refresh_fraction`` of the
table without gradient) is reported from the measured no-grad encoding throughput. The table is synthetic (random
unit vectors): timing does not depend on its content. Each configuration runs in a fresh subprocess.

Memory: CUDA ``max_memory_allocated`` above the memory in use before the step (the table counts as setup and is
reported separately); CPU: peak RSS above the post-setup baseline (VmHWM reset through /proc/self/clear_refs).
Output: a table and ``bench/results/cache_step_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict:
    """This environment with the repository first on PYTHONPATH (what was there is kept)."""
    import os

    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def parse_args(argv):
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
    args.out = args.out or REPO / "bench" / "results" / f"cache_step_{args.device}.json"
    return args


class Clock:
    """Wall-clock sections, synchronising CUDA so the times are real."""

    def __init__(self, device):
        self.device, self.times = device, {}

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def section(self, name):
        clock = self

        class _Section:
            def __enter__(self):
                clock.sync()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.sync()
                clock.times[name] = clock.times.get(name, 0.0) + time.perf_counter() - self.start

        return _Section()


def _memory_baseline(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS") * 1024


def _memory_peak(device, baseline):
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - baseline
    return _status_kib("VmHWM") * 1024 - baseline


def _status_kib(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def run_single(cfg: dict) -> dict:
    """One (variant, table size) configuration in this process."""
    import torch
    from transformers import BertConfig, BertModel

    from dualenc.losses.base import CachedCE, CacheTerms, InBatchCE, LossInputs
    from dualenc.model.encoder import HFEncoder
    from dualenc.negcache.gumbel import GumbelKey
    from dualenc.negcache.scan import scan_table
    from dualenc.negcache.table import EmbeddingTable

    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    b, m, size, dim = cfg["batch_size"], cfg["num_negatives"], int(cfg["table_size"]), cfg["dim"]
    bert = BertModel(
        BertConfig(
            hidden_size=dim,
            num_hidden_layers=cfg["layers"],
            num_attention_heads=max(1, dim // 64),
            intermediate_size=4 * dim,
            vocab_size=30522,
        )
    )
    tower = HFEncoder(bert, pooling="cls", normalize=True).to(device).train()
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-5)

    def features(n, length):
        return {
            "input_ids": torch.randint(1000, 30000, (n, length), device=device),
            "attention_mask": torch.ones(n, length, dtype=torch.long, device=device),
        }

    table = None
    if cfg["variant"] == "cache":
        dtype = getattr(torch, cfg["table_dtype"])
        table = EmbeddingTable(size, dim, dtype=dtype, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        for start in range(0, size, 262_144):  # fill in blocks: random unit vectors
            end = min(start + 262_144, size)
            block = torch.nn.functional.normalize(
                torch.randn(end - start, dim, generator=gen, device=device), dim=1
            )
            table.emb[start:end] = block.to(dtype)
        table.doc_idx.copy_(torch.arange(size, device=device))
    clock = Clock(device)
    loss_in, loss_cache = InBatchCE(0.05).to(device), CachedCE(0.05).to(device)

    def step():
        q_feat = features(b, cfg["query_len"])
        if cfg["variant"] == "inbatch":
            with clock.section("encode_grad"):
                q = tower(q_feat)  # (B, D)
                d = tower(features(b * (1 + m), cfg["passage_len"]))  # (B*(1+m), D)
                loss = loss_in(LossInputs(q, d, torch.arange(b, device=device) * (1 + m))).loss
                loss.backward()
        else:
            with clock.section("encode_grad"):
                q = tower(q_feat)  # (B, D)
                d = tower(features(b, cfg["passage_len"]))  # (B, D)
            with clock.section("cache_work"):
                scale = torch.tensor(20.0, device=device)
                scan = scan_table(
                    table,
                    q.detach().float(),
                    scale,
                    pos_score=scale * (q * d).sum(-1).detach(),
                    mask_rows=torch.arange(b, device=device),
                    mask_slots=torch.arange(b, device=device),
                    home_slots=None,
                    num_samples=m,
                    replacement=True,
                    key=GumbelKey(0, 1),
                    query_ids=torch.arange(b, device=device),
                    block_size=cfg["block_size"],
                )
                rest_lse, drawn = scan.lse, scan.slots  # (B,), (B, m): one shard, nothing to merge
            with clock.section("encode_grad"):
                neg = tower(features(b * m, cfg["passage_len"])).view(b, m, -1)  # (B, m, D) re-encoded draws
                terms = CacheTerms(
                    rest_lse=rest_lse, neg_emb=neg, neg_weight=torch.full((b, m), 1.0 / m, device=device)
                )
                loss = loss_cache(LossInputs(q, d, torch.arange(b, device=device), cache=terms)).loss
                loss.backward()
            with clock.section("cache_work"):
                slots = torch.cat([torch.arange(b, device=device), drawn.flatten()])  # write-back
                table.write(slots, torch.cat([d.detach(), neg.detach().flatten(0, 1)]))
                table.tick()
        with clock.section("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (lazy initialisation is not step cost)
    baseline = _memory_baseline(device)
    clock.times = {}
    step()
    peak = _memory_peak(device, baseline)
    samples = []
    for _ in range(cfg["repeats"]):
        clock.times = {}
        step()
        samples.append(dict(clock.times))
    times = {k: statistics.median(s.get(k, 0.0) for s in samples) for k in samples[0]}
    with torch.no_grad():  # refresh cost: measured no-grad encoding throughput
        tower.eval()
        docs = max(64, b * (1 + m))
        with clock.section("refresh_probe"):
            tower(features(docs, cfg["passage_len"]))
        per_doc = clock.times["refresh_probe"] / docs
    table_bytes = 0 if table is None else table.emb.numel() * table.emb.element_size()
    return {
        **cfg,
        "times_s": times,
        "step_s": sum(times.values()),
        "peak_mib": peak / 2**20,
        "table_mib": table_bytes / 2**20,
        "nograd_s_per_doc": per_doc,
        "refresh_s": per_doc * cfg["refresh_fraction"] * size if cfg["variant"] == "cache" else 0.0,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.single:
        print(json.dumps(run_single(json.loads(args.single))))
        return {}
    rows = []
    for size in args.table_sizes:
        for variant in ("inbatch", "cache"):
            cfg = {k: v for k, v in vars(args).items() if k not in ("out", "single", "quick", "table_sizes")}
            cfg.update(variant=variant, table_size=size)
            proc = subprocess.run(
                [sys.executable, __file__, "--single", json.dumps(cfg)],
                capture_output=True,
                text=True,
                env=child_env(),
            )
            if proc.returncode != 0:
                raise SystemExit(f"{variant} @ {size:g} failed:\n{proc.stderr[-4000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return report(args, rows)


def report(args, rows: list[dict]) -> dict:
    from dualenc.io.provenance import environment_info
    from dualenc.io.text_table import format_table

    table, b, m = [], args.batch_size, args.num_negatives
    for size in args.table_sizes:
        inb = next(r for r in rows if r["variant"] == "inbatch" and r["table_size"] == size)
        cac = next(r for r in rows if r["variant"] == "cache" and r["table_size"] == size)
        negs_in = b * (1 + m) - 1  # per query: every other batch document
        negs_cache = b - 1 + int(size) - b  # in-batch positives + the whole table (minus the batch's slots)
        cache_step = cac["step_s"]
        table.append(
            {
                "table": f"{int(size):,} x {args.dim}",
                "inbatch_step_s": inb["step_s"],
                "cache_step_s": cache_step,
                "cache_work_s": cac["times_s"]["cache_work"],
                "cache_work/inbatch": cac["times_s"]["cache_work"] / inb["step_s"],
                "refresh_s": cac["refresh_s"],
                "peak_mib_inbatch": inb["peak_mib"],
                "peak_mib_cache": cac["peak_mib"],
                "table_mib": cac["table_mib"],
                "negs_per_q_per_s_ratio": (negs_cache / (cache_step + cac["refresh_s"]))
                / (negs_in / inb["step_s"]),
            }
        )
    text = format_table(table)
    print(text)
    out = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "summary": table,
        "table": text,
        **environment_info(REPO),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
