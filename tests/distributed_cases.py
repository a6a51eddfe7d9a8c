"""Multi-process test cases, run as ``python tests/distributed_cases.py CASE TMP_DIR [ARGS]``.

Each case runs under ``accelerate.debug_launcher`` (2 processes, gloo on CPU) and then once in a single process;
both write their results to TMP_DIR for the calling test to compare. The launch happens in a fresh interpreter
because forking a process whose OpenMP thread pool is already running (any pytest process that has done torch
maths) can deadlock the children.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def train_step(tmp_path: Path, model_dir: Path, out_file: str) -> None:
    """One training step over a fixed global batch of 4 queries x G=2; the main process saves loss and grads."""
    from accelerate import Accelerator

    from dualenc.config import load_config
    from dualenc.encoder import DualEncoder
    from dualenc.losses import InBatchCE
    from dualenc.train import TrainingModule, training_step
    from dualenc.train_data import GroupDataset, TrainCollator, load_train_data

    accelerator = Accelerator(cpu=True)
    cfg = load_config(
        None, ["random_init=true", "train_group_size=2", "learn_temperature=true", "temperature=0.1"]
    )
    model = DualEncoder.from_pretrained(
        model_dir
    ).eval()  # eval: no dropout, so both runs compute one function
    data = load_train_data(str(tmp_path / "triples.tsv"), format="triples", cache_dir=str(tmp_path / "hf"))
    dataset = GroupDataset(data, 2, seed=0)
    items = [dataset[i] for i in range(4)]
    per_rank = len(items) // accelerator.num_processes
    mine = items[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
    module = accelerator.prepare(TrainingModule(model, InBatchCE(0.1, learn_temperature=True)))
    batch = TrainCollator(model, data.corpus)(mine)
    output = training_step(module, batch, accelerator, cfg)
    accelerator.backward(output.loss)
    loss = accelerator.reduce(output.loss.detach(), reduction="mean")
    grads = {
        n: p.grad.clone()
        for n, p in accelerator.unwrap_model(module).named_parameters()
        if p.grad is not None
    }
    if accelerator.is_main_process:
        torch.save(
            {"loss": loss, "grads": grads, "num_negatives": output.logs["num_negatives"]}, tmp_path / out_file
        )
    accelerator.wait_for_everyone()


CASES = {"train_step": train_step}


def run_case(name: str, tmp_path: Path, *args: object, timeout: float = 600) -> None:
    """Run case ``name`` in a fresh interpreter: 2 processes -> two.pt, then 1 process -> one.pt."""
    cmd = [sys.executable, __file__, name, str(tmp_path), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


if __name__ == "__main__":
    from accelerate import debug_launcher

    case, tmp_dir, *rest = sys.argv[1:]
    fn, tmp = CASES[case], Path(tmp_dir)
    debug_launcher(fn, args=(tmp, *map(Path, rest), "two.pt"), num_processes=2)
    _reset_accelerate()
    fn(tmp, *map(Path, rest), "one.pt")
