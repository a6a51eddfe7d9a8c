"""Training-step time and peak memory of the msmarco_inbatch recipe's shape, fp32 vs bf16 autocast.

    python bench/train_step.py        # CPU: 2-layer BERT, batch 8 x group 2 (smoke-sized)
    python bench/train_step.py --device cuda --layers 12 --batch-size 64 --group-size 8   # msmarco, one GPU

Runs the real training path (``TrainingModule`` (one micro-batch's loss) + AdamW through ``Accelerator``) on
random token ids with a randomly initialised BERT (hidden 768 = BERT-base width); each precision runs in a
fresh subprocess, side by side. Memory: CUDA ``max_memory_allocated``; CPU: peak RSS above the post-setup
baseline. Output: a table and ``bench/results/train_step_<device>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import bench_common


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=8, help="queries per step")
    p.add_argument("--group-size", type=int, default=2, help="documents per query (train_group_size)")
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--passage-len", type=int, default=128)
    p.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or bench_common.REPO / "bench" / "results" / f"train_step_{args.device}.json"
    return args


def run_single(cfg: dict) -> dict:
    """One precision's training steps in this process: median step time, peak memory, documents/s."""
    import torch
    from accelerate import Accelerator
    from transformers import BertConfig, BertModel

    from dualenc.losses.inbatch import InBatchCE
    from dualenc.model import DualEncoder, DualEncoderConfig, HFEncoder
    from dualenc.training.config import load_config
    from dualenc.training.step import TrainingModule

    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision=cfg["precision"], cpu=cfg["device"] == "cpu")
    device = accelerator.device
    bert = BertModel(
        BertConfig(
            hidden_size=cfg["hidden"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["hidden"] // 64,
            intermediate_size=4 * cfg["hidden"],
        )
    )
    model = DualEncoder(HFEncoder(bert), None, None, DualEncoderConfig())
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    run_cfg = load_config(None, ["random_init=true", f"train_group_size={cfg['group_size']}"])
    module = TrainingModule(model, InBatchCE(0.05), run_cfg.loss)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    module, optimizer = accelerator.prepare(module, optimizer)
    b, g = cfg["batch_size"], cfg["group_size"]

    batch = {
        "query": bench_common.random_tokens(b, cfg["query_len"], device),
        "doc": bench_common.random_tokens(b * g, cfg["passage_len"], device),
        "doc_idx": torch.arange(b * g, device=device),  # (B*G,)
        "positives": torch.arange(b * g, device=device).view(b, g)[:, :1],  # (B, 1) first of each group
    }

    def step() -> None:
        out = module(batch)
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    peak = bench_common.peak_of_step(step, device)
    times = bench_common.step_times(step, cfg["repeats"])
    return {
        **cfg,
        "step_s": statistics.median(times),
        "peak_mib": peak / 2**20,
        "docs_per_s": b * g / statistics.median(times),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if bench_common.serve_single(args.single, run_single):
        return {}
    rows = []
    for precision in args.precisions:
        cfg = {k: v for k, v in vars(args).items() if k not in ("out", "single", "precisions")}
        cfg["precision"] = precision
        try:
            rows.append(bench_common.run_config(__file__, cfg))
        except bench_common.ConfigFailed as err:
            raise SystemExit(f"{precision} failed:\n{err.stderr[-4000:]}") from None
    base = rows[0]["step_s"]
    summary = [
        {
            "precision": r["precision"],
            "step_s": r["step_s"],
            "speedup": base / r["step_s"],
            "peak_mib": r["peak_mib"],
            "docs_per_s": r["docs_per_s"],
        }
        for r in rows
    ]
    title = (
        f"{args.layers}-layer BERT (hidden {args.hidden}), batch {args.batch_size} x group "
        f"{args.group_size}, {args.query_len}/{args.passage_len} tokens, {args.device}"
    )
    table = bench_common.print_table(summary, title)
    config = {k: str(v) for k, v in vars(args).items()}
    return bench_common.write_report(args.out, {"config": config, "rows": rows, "table": table})


if __name__ == "__main__":
    main(sys.argv[1:])
