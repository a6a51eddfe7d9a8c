"""What the bench scripts share: one configuration per fresh subprocess, peak memory above a baseline, and the
report tail (a printed table, a JSON file with the commit, machine and library versions).

The scripts import it by sibling name (``import bench_common``): Python puts a script's own folder first on
``sys.path``. It needs only torch, the standard library and dualenc.io (no datasets, faiss or
ir-measures), so the benchmarks run on a GPU machine that has torch, transformers and accelerate only.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]


class ConfigFailed(RuntimeError):
    """A configuration's subprocess exited non-zero; ``stderr`` holds what it printed."""

    def __init__(self, returncode: int, stderr: str):
        super().__init__(f"the configuration's subprocess exited with code {returncode}")
        self.returncode, self.stderr = returncode, stderr


def child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (what was there is kept)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_config(script: str | os.PathLike, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``python SCRIPT --single CFG_JSON`` in a fresh process; return the JSON of its last stdout line.

    A fresh process per configuration, so no peak, allocator cache or thread pool leaks between them.

    Raises:
        ConfigFailed: the subprocess exited non-zero.
    """
    cmd = [sys.executable, str(Path(script).resolve()), "--single", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=REPO)
    if proc.returncode != 0:
        raise ConfigFailed(proc.returncode, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_single(single: str | None, run_single: Callable[[dict], dict]) -> bool:
    """Inside a configuration's subprocess (``--single CFG_JSON`` given): run ``run_single`` on the config and
    print its row as the last stdout line, for :func:`run_config`; True. Without ``--single``: False."""
    if single is None:
        return False
    print(json.dumps(run_single(json.loads(single))))
    return True


def random_tokens(n: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``n`` random token sequences of ``length`` (ids 1000-29999, no padding), as an encoder takes them."""
    import torch

    return {
        "input_ids": torch.randint(1000, 30000, (n, length), device=device),  # (n, length)
        "attention_mask": torch.ones(n, length, dtype=torch.long, device=device),  # (n, length)
    }


def status_kib(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB, e.g. ``VmRSS`` (resident now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def trim_heap() -> None:
    """Hand freed memory back to the OS (glibc ``malloc_trim``), so a measured call cannot reuse it unseen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_hwm() -> bool:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_baseline(device: torch.device) -> int:
    """Bytes in use now, and the peak count restarted: CUDA tensors, or this process's RSS on a CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    trim_heap()
    if not reset_hwm():
        raise RuntimeError("cannot reset the peak RSS: /proc/self/clear_refs is not writable")
    return status_kib("VmRSS") * 1024


def memory_peak(device: torch.device, baseline: int) -> int:
    """Peak bytes above ``baseline`` since :func:`memory_baseline`."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - baseline
    return status_kib("VmHWM") * 1024 - baseline


def peak_of_step(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of one ``step()`` above the memory in use before it, after a warm-up step (lazy
    initialisation is not step cost)."""
    step()
    baseline = memory_baseline(device)
    step()
    return memory_peak(device, baseline)


def step_times(step: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``step()`` (time their median, after a warm-up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def print_table(rows: Sequence[Mapping[str, object]], title: str | None = None) -> str:
    """Print ``rows`` as a plain-text table under ``title`` (if any); return the table."""
    from dualenc.io.text_table import format_table

    table = format_table(rows)
    print(table if title is None else f"{title}\n{table}")
    return table


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``report`` as JSON (atomically) with the provenance keys it does not set itself (``commit``,
    ``machine``, ``python``, ``versions``), print where; return what was written."""
    from dualenc.io.atomic import write_json
    from dualenc.io.provenance import environment_info

    out = {**report, **{k: v for k, v in environment_info(REPO).items() if k not in report}}
    write_json(path, out)
    print(f"wrote {path}")
    return out
