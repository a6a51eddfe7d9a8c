"""Peak memory and time of one loss call (forward + backward) for full CE, SCE and the sampled baselines.

    python bench/loss_memory.py --device cpu                 # C in {1e4, 1e5, 1e6, 2e6}, N=1024, d=64
    python bench/loss_memory.py --device cuda --max-gib 60
    python bench/loss_memory.py --quick --out /tmp/q.json    # tiny smoke run (the test suite runs this)

Given X (N, d) and W (C, d), both requiring grad, each configuration (loss, C) runs in a fresh subprocess
(``--single``) so no peak, allocator cache or thread pool leaks between configurations. Negatives are sampled
during setup, before the baseline is taken: only the loss is measured, as in the paper's Fig. 6 comparison
(ALGORITHMS.md Part B 2.3-2.4). Full CE configurations whose estimated memory exceeds ``--max-gib`` get a
"skipped" row instead of crashing the machine.

Memory, CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus the memory allocated
before the call (tensors only, no allocator cache).

Memory, CPU (method recorded as ``memory_method`` in the JSON): tracemalloc cannot see torch's C++ allocations and
``ru_maxrss`` never goes down, so we use the kernel's own high-water mark. After setup and one warm-up call (lazy
one-time initialisation is not loss memory) we call glibc ``malloc_trim(0)``, so memory freed so far goes back
to the OS instead of being reused unseen, read VmRSS as the baseline, reset VmHWM by writing "5" to
``/proc/self/clear_refs``, run the measured call and report VmHWM - baseline. That is exact at page granularity,
unlike a sampling thread, which misses peaks shorter than its period. Where clear_refs is not writable the
fallback is ``ru_maxrss`` - baseline, i.e. the warm-up call's peak (a slight overestimate). RSS counts pages
actually touched, so it includes allocator overhead and OpenMP buffers.

Output: a table (MiB, ms, ratios vs full CE), a JSON file (config, machine, rows) and a log-log PNG.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOSSES = ("ce", "ce_chunked", "sce", "bce", "gbce", "ce_minus")
REPO = Path(__file__).resolve().parents[1]


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
        args.out = REPO / "bench" / "results" / f"loss_memory_{args.device}.json"
    return args


def estimate_gib(loss: str, cfg: dict) -> float:
    """Rough peak of one call in GiB (fp32): the largest live activations plus the grads of X and W."""
    n, c, d, k = cfg["num_rows"], cfg["num_items"], cfg["dim"], cfg["num_negatives"]
    n_b = max(1, int(2 * math.sqrt(n)))
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _setup(cfg: dict):
    """Build X, W, targets (and negatives) on the device; return the loss closure and the leaves."""
    import torch

    from dualenc.losses.sampled import bce_loss, ce_minus_loss, gbce_loss, sample_uniform, sample_unseen
    from dualenc.losses.sce import ScalableCE, full_ce

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


def run_single(cfg: dict) -> dict:
    """Measure one configuration in this (fresh) process; returns one result row."""
    import torch

    from dualenc.losses.sce import full_ce

    cuda = cfg["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(cfg["seed"])
    fn, x, w, targets = _setup(cfg)

    def call() -> float:
        loss = fn()
        loss.backward()
        sync()
        x.grad = w.grad = None
        return float(loss)

    call()  # warm-up: one-time lazy initialisation (kernels, thread pools) is not loss memory
    if cuda:
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        value = call()
        peak, method = torch.cuda.max_memory_allocated() - base, "cuda.max_memory_allocated"
    else:
        try:  # hand freed setup memory back to the OS, so the call cannot reuse it unseen
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        base_kib = _status_kib("VmRSS")
        method = "VmHWM (clear_refs)" if _reset_hwm() else "ru_maxrss"
        value = call()
        peak_kib = (
            _status_kib("VmHWM")
            if method.startswith("VmHWM")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        peak = (peak_kib - base_kib) * 1024
    times = []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    row = {"peak_mib": peak / 2**20, "time_ms": 1e3 * statistics.median(times), "loss_value": value}
    row["memory_method"] = method
    if cfg["loss"] == "sce":
        with torch.no_grad():
            ce = float(full_ce(x, w, targets, block_size=cfg["chunk"]))
        row.update(ce_value=ce, rel_err_vs_ce=abs(value - ce) / ce)
    return row


def _run_child(cfg: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {
            "status": "failed",
            "error": proc.stderr.strip().splitlines()[-1:] or [f"rc={proc.returncode}"],
        }
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def _machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()}
    info.update(python=platform.python_version(), torch=torch.__version__, device=device)
    info.update(torch_threads=torch.get_num_threads(), load_avg_1_5_15=list(os.getloadavg()))
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    head = f"{'C':>9} {'loss':>10} {'status':>7} {'peak MiB':>10} {'time ms':>10} {'mem/CE':>8} {'time/CE':>8} {'rel.err':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['num_items']:>9} {r['loss']:>10} {r['status']:>7} {_fmt(r.get('peak_mib'), '10.1f')} "
            f"{_fmt(r.get('time_ms'), '10.1f')} {_fmt(r.get('mem_ratio_vs_ce'), '8.4f')} "
            f"{_fmt(r.get('time_ratio_vs_ce'), '8.3f')} {_fmt(r.get('rel_err_vs_ce'), '8.3f')}"
        )


def plot(rows: list[dict], path: Path) -> bool:
    """Memory and time vs catalog size, log-log, one line per loss; False (with a message) without matplotlib."""
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
    if args.single is not None:
        print(json.dumps(run_single(json.loads(args.single))))
        return {}
    from dualenc.io.atomic import write_json

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
    }
    result |= {"memory_method": next((r["memory_method"] for r in rows if "memory_method" in r), None)}
    result["rows"] = rows
    write_json(args.out, result)
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
