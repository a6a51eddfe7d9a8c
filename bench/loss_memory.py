"""Peak memory and time of one loss call (forward + backward) for full CE, SCE and the sampled baselines.

    python bench/loss_memory.py --device cpu                 # C in {1e4, 1e5, 1e6, 2e6}, N=1024, d=64
    python bench/loss_memory.py --device cuda --max-gib 60
    python bench/loss_memory.py --quick --out /tmp/q.json    # tiny smoke run (the test suite runs this)

Given X (N, d) and W (C, d), both requiring grad, each configuration (loss, C) runs in a fresh subprocess
(``--single``) so no peak, allocator cache or thread pool leaks between configurations. Negatives are sampled
during setup, before the baseline is taken: only the loss is measured, as in the paper's Fig. 6 comparison
(ALGORITHMS.md Part B 2.3-2.4). Full CE configurations whose estimated memory exceeds ``--max-gib`` get a
"skipped" row instead of crashing the machine.

Memory, CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus the memory
allocated before the call (tensors only, no allocator cache).

Memory, CPU (method recorded as ``memory_method`` in the JSON): tracemalloc cannot see torch's C++
allocations and ``ru_maxrss`` never goes down, so we use the kernel's own high-water mark. After setup and one
warm-up call (lazy one-time initialisation is not loss memory) we call glibc ``malloc_trim(0)``, so memory
freed so far goes back to the OS instead of being reused unseen, read VmRSS as the baseline, reset VmHWM by
writing "5" to ``/proc/self/clear_refs``, run the measured call and report VmHWM - baseline. That is exact at
page granularity, unlike a sampling thread, which misses peaks shorter than its period. Where clear_refs is
not writable the fallback is ``ru_maxrss`` - baseline, i.e. the warm-up call's peak (a slight overestimate).
RSS counts pages actually touched, so it includes allocator overhead and OpenMP buffers.

Output: a table (MiB, ms, ratios vs full CE), a JSON file (config, machine, commit, rows) and a log-log PNG.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import bench_common

if TYPE_CHECKING:
    import torch

LOSSES = ("ce", "ce_chunked", "sce", "bce", "gbce", "ce_minus")
COLUMNS = (  # the printed table: (header, row key, width, number format)
    ("C", "num_items", 9, ""),
    ("loss", "loss", 10, ""),
    ("status", "status", 7, ""),
    ("peak MiB", "peak_mib", 10, ".1f"),
    ("time ms", "time_ms", 10, ".1f"),
    ("mem/CE", "mem_ratio_vs_ce", 8, ".4f"),
    ("time/CE", "time_ratio_vs_ce", 8, ".3f"),
    ("rel.err", "rel_err_vs_ce", 8, ".3f"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--catalog-sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 2e6], help="values of C")
    p.add_argument("--num-rows", type=int, default=1024, help="N = batch size x sequence length (all real)")
    p.add_argument("--dim", type=int, default=64, help="d, embedding size")
    p.add_argument(
        "--seq-len", type=int, default=128, help="rows per sequence (CE- shares negatives per sequence)"
    )
    p.add_argument("--bucket-size-y", type=int, default=256, help="SCE b_y; n_b = b_x = int(2 sqrt(N))")
    p.add_argument("--num-negatives", type=int, default=256, help="n for BCE, gBCE, CE-")
    p.add_argument(
        "--chunk", type=int, default=64, help="rows per block of ce_chunked (checkpointed full CE)"
    )
    p.add_argument("--logit-std", type=float, default=1.0, help="std of the random logits <x_i, w_c>")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--repeats", type=int, default=3, help="timed calls (median) after the measured one")
    p.add_argument("--max-gib", type=float, default=16.0, help="skip configurations estimated above this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default bench/results/loss_memory_<device>.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    p.add_argument("--single", type=str, default=None, help=argparse.SUPPRESS)  # internal: one config as JSON
    args = p.parse_args(argv)
    if args.quick:
        args.catalog_sizes, args.num_rows, args.dim, args.seq_len = [2000.0], 64, 16, 8
        args.bucket_size_y, args.num_negatives, args.chunk, args.repeats = 32, 16, 16, 1
    if args.out is None:
        args.out = bench_common.REPO / "bench" / "results" / f"loss_memory_{args.device}.json"
    return args


def estimate_gib(loss: str, cfg: dict) -> float:
    """Rough peak of one call in GiB (fp32): the largest live activations plus the grads of X and W."""
    n, c, d, k = cfg["num_rows"], cfg["num_items"], cfg["dim"], cfg["num_negatives"]
    from dualenc.losses.sce import default_bucket_count

    n_b = default_bucket_count(n)
    floats = {
        "ce": 3 * n * c,  # logits, log-softmax output, their grad
        "ce_chunked": 3 * cfg["chunk"] * c,
        "sce": n_b * min(c, 65_536)
        + 3 * n_b * n_b * (cfg["bucket_size_y"] + 1)
        + n_b * cfg["bucket_size_y"] * d,
        "bce": 2 * n * k * d + 3 * n * k,
        "gbce": 2 * n * k * d + 3 * n * k,
        "ce_minus": 2 * (n // cfg["seq_len"]) * k * d + 3 * n * k,
    }[loss]
    return 4 * (floats + c * d + n * d) / 2**30


def _setup(cfg: dict):
    """Build X, W, targets (and negatives) on the device; return the loss closure and the leaves."""
    import torch

    from dualenc.losses.dense import full_ce
    from dualenc.losses.sampled import bce_loss, ce_minus_loss, gbce_loss
    from dualenc.losses.sce import ScalableCE
    from dualenc.losses.uniform_negatives import sample_uniform, sample_unseen

    dev, n, c, d = cfg["device"], cfg["num_rows"], cfg["num_items"], cfg["dim"]
    gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
    scale = cfg["logit_std"] ** 0.5 * d**-0.25  # <x, w> has std logit_std
    x = (torch.randn(n, d, generator=gen, device=dev) * scale).requires_grad_()  # (N, d)
    w = (torch.randn(c, d, generator=gen, device=dev) * scale).requires_grad_()  # (C, d)
    targets = torch.randint(0, c, (n,), generator=gen, device=dev)  # (N,)
    history = targets.view(-1, cfg["seq_len"])  # (S, L) a sequence's history = its own items
    k, loss = cfg["num_negatives"], cfg["loss"]
    if loss == "ce":
        return (lambda: full_ce(x, w, targets)), x, w, targets
    if loss == "ce_chunked":
        return (lambda: full_ce(x, w, targets, block_size=cfg["chunk"])), x, w, targets
    if loss == "sce":
        sce = ScalableCE(bucket_size_y=cfg["bucket_size_y"])
        return (lambda: sce(x, w, targets, generator=gen).loss), x, w, targets
    if loss == "bce":
        per_row = history.repeat_interleave(cfg["seq_len"], dim=0)  # (N, L)
        neg = sample_unseen(per_row, c, k, gen)  # (N, k)
        return (lambda: bce_loss(x, w, targets, neg)), x, w, targets
    if loss == "gbce":
        neg = sample_uniform(n, c, k, gen, device=dev)  # (N, k)
        return (lambda: gbce_loss(x, w, targets, neg, t=0.75)), x, w, targets
    neg = sample_unseen(history, c, k, gen)  # (S, k) one set per sequence
    return (lambda: ce_minus_loss(x, w, targets, neg)), x, w, targets


def peak_of_call(call: Callable[[], float], device: torch.device) -> tuple[float, int, str]:
    """Run ``call`` once, measured: its value, its peak bytes above the memory in use before, the method."""
    if device.type == "cuda":
        baseline = bench_common.memory_baseline(device)
        value = call()
        return value, bench_common.memory_peak(device, baseline), "cuda.max_memory_allocated"
    bench_common.trim_heap()  # hand freed setup memory back to the OS, so the call cannot reuse it unseen
    base_kib = bench_common.status_kib("VmRSS")
    if bench_common.reset_hwm():
        value = call()
        return value, (bench_common.status_kib("VmHWM") - base_kib) * 1024, "VmHWM (clear_refs)"
    value = call()
    return value, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) * 1024, "ru_maxrss"


def run_single(cfg: dict) -> dict:
    """Measure one configuration in this (fresh) process; returns one result row."""
    import torch

    from dualenc.losses.dense import full_ce

    device = torch.device(cfg["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(cfg["seed"])
    fn, x, w, targets = _setup(cfg)

    def call() -> float:
        loss = fn()
        loss.backward()
        sync()
        x.grad = w.grad = None
        return float(loss)

    call()  # warm-up: one-time lazy initialisation (kernels, thread pools) is not loss memory
    value, peak, method = peak_of_call(call, device)
    times = bench_common.step_times(call, cfg["repeats"])
    row = {"peak_mib": peak / 2**20, "time_ms": 1e3 * statistics.median(times), "loss_value": value}
    row["memory_method"] = method
    if cfg["loss"] == "sce":
        with torch.no_grad():
            ce = float(full_ce(x, w, targets, block_size=cfg["chunk"]))
        row.update(ce_value=ce, rel_err_vs_ce=abs(value - ce) / ce)
    return row


def _run_child(cfg: dict) -> dict:
    """One configuration in a fresh subprocess: ``status`` ok and its row, or failed and its last error."""
    try:
        return {"status": "ok", **bench_common.run_config(__file__, cfg)}
    except bench_common.ConfigFailed as err:
        return {"status": "failed", "error": err.stderr.strip().splitlines()[-1:] or [f"rc={err.returncode}"]}


def _machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()}
    info.update(python=platform.python_version(), torch=torch.__version__, device=device)
    info.update(torch_threads=torch.get_num_threads(), load_avg_1_5_15=list(os.getloadavg()))
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(rows: list[dict]) -> None:
    """Fixed-width table, one row per (C, loss); ``-`` where a row has no value."""
    head = " ".join(f"{header:>{width}}" for header, _, width, _ in COLUMNS)
    print(head + "\n" + "-" * len(head))
    for r in rows:
        cells = [
            "-".rjust(width) if r.get(key) is None else format(r[key], f">{width}{spec}")
            for _, key, width, spec in COLUMNS
        ]
        print(" ".join(cells))


def plot(rows: list[dict], path: Path) -> bool:
    """Memory and time vs catalog size, log-log, one line per loss; False (and a message) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    from dualenc.io.atomic import atomic_path

    if not any(r["status"] == "ok" for r in rows):
        print("no measured configuration: no plot")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for loss in dict.fromkeys(r["loss"] for r in rows):
        ok = [r for r in rows if r["loss"] == loss and r["status"] == "ok"]
        for ax, key in zip(axes, ["peak_mib", "time_ms"], strict=True):
            ax.plot([r["num_items"] for r in ok], [max(r[key], 1e-3) for r in ok], marker="o", label=loss)
    for ax, label in zip(axes, ["peak memory of the loss (MiB)", "forward + backward (ms)"], strict=True):
        ax.set(xscale="log", yscale="log", xlabel="catalog size C", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if bench_common.serve_single(args.single, run_single):
        return {}
    keys = ["device", "num_rows", "dim", "seq_len", "bucket_size_y", "num_negatives", "chunk", "logit_std"]
    base = {k: getattr(args, k) for k in keys} | {"repeats": args.repeats, "seed": args.seed}
    machine = _machine(args.device)  # includes the load average before the runs: the machine may be shared
    rows = []
    for num_items in (int(c) for c in args.catalog_sizes):
        for loss in args.losses:
            cfg = base | {"loss": loss, "num_items": num_items}
            est = estimate_gib(loss, cfg)
            row = {"loss": loss, "num_items": num_items, "est_gib": est}
            row |= {"status": "skipped"} if est > args.max_gib else _run_child(cfg)
            rows.append(row)
            print(f"C={num_items} {loss}: {row['status']}", file=sys.stderr, flush=True)
        ce = next((r for r in rows[-len(args.losses) :] if r["loss"] == "ce" and r["status"] == "ok"), None)
        for r in rows[-len(args.losses) :]:
            if ce is not None and r["status"] == "ok":
                r["mem_ratio_vs_ce"] = r["peak_mib"] / max(ce["peak_mib"], 1e-9)
                r["time_ratio_vs_ce"] = r["time_ms"] / max(ce["time_ms"], 1e-9)
    print_table(rows)
    result = {
        "config": base | {"max_gib": args.max_gib, "losses": args.losses},
        "machine": machine,
        "memory_method": next((r["memory_method"] for r in rows if "memory_method" in r), None),
        "rows": rows,
    }
    result = bench_common.write_report(args.out, result)
    plot(rows, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
