"""Checkpoints: ``accelerator.save_state`` written atomically, found again by ``resume_from=latest``, and
restored with the trainer state and the negative cache's shard.

Layout: ``output_dir/checkpoints/step_00000100/`` (Accelerate state: model, optimizer, scheduler, RNG,
registered objects) plus our ``trainer_state.json`` and the resolved ``config.yaml``. A checkpoint is first
written to a hidden ``.tmp-step_…`` sibling and renamed when complete, so a crash never leaves a half
checkpoint that ``latest`` would pick.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.negcache.negative_cache import NegativeCache
from dualenc.training.resume_check import (
    check_manifest,
    check_same_processes,
    check_same_settings,
    damaged,
    write_manifest,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """``None`` -> None; ``"latest"`` -> the newest complete checkpoint (or None); else a directory."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        dirs = checkpoint_dirs(output_dir)
        return dirs[-1] if dirs else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise InputError(f"not a dualenc checkpoint (no {STATE_FILE})", path=path)
    return path


def _process_file(directory: Path, name: str, accelerator) -> Path:
    return (
        directory / f"{name}.{accelerator.process_index:05d}-of-{accelerator.num_processes:05d}.safetensors"
    )


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    state: dict,
    config_yaml: str,
    keep: int,
    per_process: dict[str, dict] | None = None,
) -> Path:
    """Save the full training state at ``step``; every process must call this (Accelerate saves per-rank RNG).

    ``per_process`` maps a name to a tensor state dict that differs between processes (a negative-cache table
    shard): each process writes its own ``{name}.{rank}-of-{P}.safetensors``. (Accelerate's
    ``register_for_checkpointing`` saves custom objects from the main process only, which would drop the other
    processes' shards.)
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    for name, tensors in (per_process or {}).items():
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(_process_file(tmp, name, accelerator)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic.write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
        atomic.write_text(tmp / "config.yaml", config_yaml)
        write_manifest(tmp)  # last: it lists every file above with its size and hash
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_process_state(checkpoint: Path, accelerator, name: str) -> dict:
    """This process's ``name`` state dict, saved by ``save_checkpoint(per_process=...)``."""
    from safetensors.torch import load_file

    path = _process_file(Path(checkpoint), name, accelerator)
    if not path.exists():
        raise InputError(
            f"checkpoint has no {name} state for process {accelerator.process_index} (saved with "
            "a different number of processes?)",
            path=path,
        )
    # read on the CPU, then move: safetensors does not know "cpu:0", Accelerate's device for CPU processes
    return {k: v.to(accelerator.device) for k, v in load_file(str(path), device="cpu").items()}


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


@dataclass
class TrainerState:
    """What a checkpoint stores beyond Accelerate's state: step, best dev score, training clock."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # CPU time (user + system, every thread) of the main process, over every session
    num_processes: int | None = None  # None in checkpoints saved before it was recorded
    cost: dict[str, dict] | None = None  # CostMeter.totals(): time and encodes by phase (None: saved before)

    @classmethod
    def from_dict(cls, values: dict) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def restore_checkpoint(
    accelerator: Accelerator,
    out: Path,
    resume_from: str | None,
    cache: NegativeCache | None,
    config: dict[str, dict],
) -> tuple[Path | None, TrainerState]:
    """Load the checkpoint ``resume_from`` names (None: a fresh start): Accelerate's state, ours and this
    process's shard of the negative cache. Refused first, with one clear error, when ``config`` (the run's
    sections) or the process count differ from the checkpoint's, and when its files do not load."""
    resume = resolve_resume(out, resume_from)
    if resume is None:
        return None, TrainerState(num_processes=accelerator.num_processes)
    check_manifest(resume)
    try:
        saved = read_state(resume)
    except (OSError, ValueError) as err:
        raise damaged(resume, err) from None
    check_same_settings(resume, config)
    check_same_processes(resume, saved, accelerator.num_processes)
    try:
        accelerator.load_state(str(resume))
        cache_state = load_process_state(resume, accelerator, "cache") if cache is not None else None
    except InputError:
        raise
    except Exception as err:  # truncated or corrupted files: safetensors, torch.load, numpy, pickle errors
        raise damaged(resume, err) from None
    if cache is not None:
        cache.table.load_state_dict(cache_state)
    state = TrainerState.from_dict(saved)
    state.num_processes = accelerator.num_processes
    logger.info("resumed from %s at step %d", resume, state.step)
    return resume, state
