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

    from dualenc.collate import GroupDataset, TrainCollator
    from dualenc.config import load_config
    from dualenc.encoder import DualEncoder
    from dualenc.losses import InBatchCE
    from dualenc.train_data import load_train_data
    from dualenc.train_step import TrainingModule

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
    module = accelerator.prepare(TrainingModule(model, InBatchCE(0.1, learn_temperature=True), cfg.loss))
    batch = TrainCollator(model, data.corpus)(mine)
    output = module(batch)
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


def _cache_setup(tmp_path: Path, model_dir: Path, overrides: list[str]):
    """Accelerator, model (eval: no dropout), data and a corpus-mode cache filled with the current towers."""
    from accelerate import Accelerator

    from dualenc.config import load_config
    from dualenc.encoder import DualEncoder
    from dualenc.negative_cache import NegativeCache
    from dualenc.train_data import load_train_data

    accelerator = Accelerator(cpu=True)
    cfg = load_config(None, ["random_init=true", "loss=cache", "train_group_size=2", *overrides])
    model = DualEncoder.from_pretrained(model_dir).eval()
    data = load_train_data(str(tmp_path / "triples.tsv"), format="triples", cache_dir=str(tmp_path / "hf"))
    cache = NegativeCache(cfg.cache, data.corpus, accelerator, model.dim, seed=0)
    cache.fill(model, tmp_path / f"fill-{accelerator.num_processes}", batch_size=16)
    return accelerator, cfg, model, data, cache


def cache_sampling(tmp_path: Path, model_dir: Path, out_file: str) -> None:
    """Many draws for 4 fixed queries (2 per process with 2 processes): counts per (query, corpus row)."""
    from dualenc.collate import GroupDataset, TrainCollator

    accelerator, cfg, model, data, cache = _cache_setup(tmp_path, model_dir, ["num_cache_negatives=16"])
    items = [GroupDataset(data, 2, seed=0)[i] for i in range(4)]
    per_rank = 4 // accelerator.num_processes
    batch = TrainCollator(model, data.corpus)(items[accelerator.process_index * per_rank :][:per_rank])
    with torch.no_grad():
        q_emb = model.encode_queries(batch["query"])  # (b, D)
        d_emb = model.encode_docs(batch["doc"])  # (b*G, D)
    scale = torch.tensor(20.0)
    pos_score = scale * (q_emb * d_emb[::2]).sum(-1)
    counts = torch.zeros(per_rank, len(data.corpus), dtype=torch.long)
    for step in range(150):
        draw = cache.sample(
            q_emb, pos_score, batch["positives"], batch["doc_idx"], scale, step, cross_device=True
        )
        for row in range(per_rank):
            counts[row].index_add_(0, draw.doc_idx[row], torch.ones(draw.doc_idx.shape[1], dtype=torch.long))
    result = {
        "counts": accelerator.gather(counts),
        "rest_lse": accelerator.gather(draw.rest_lse),
        "pos_rank": accelerator.gather(draw.pos_rank),
        "q_emb": accelerator.gather(q_emb),
        "positives": accelerator.gather(
            accelerator.pad_across_processes(batch["positives"], 1, pad_index=-1)
        ),
        "batch_docs": accelerator.gather(batch["doc_idx"]),
        "table_emb": accelerator.gather(cache.table.emb),
    }
    if accelerator.is_main_process:
        torch.save(result, tmp_path / out_file)
    accelerator.wait_for_everyone()


def cache_step(tmp_path: Path, model_dir: Path, out_file: str) -> None:
    """One cache training step over a fixed global batch (4 queries x G=2); with forced draws when replaying.

    The 2-process run saves its draws; the 1-process run replays them (draws are random, and which generator
    draws depends on the sharding), so the comparison isolates the distributed loss and gradient path.
    """
    from dualenc.collate import GroupDataset, TrainCollator
    from dualenc.losses import CachedCE
    from dualenc.train import TrainingModule, cache_training_step

    accelerator, cfg, model, data, cache = _cache_setup(tmp_path, model_dir, ["num_cache_negatives=2"])
    items = [GroupDataset(data, 2, seed=0)[i] for i in range(4)]
    per_rank = 4 // accelerator.num_processes
    rank = accelerator.process_index
    batch = TrainCollator(model, data.corpus)(items[rank * per_rank :][:per_rank])
    module = accelerator.prepare(TrainingModule(model, CachedCE(0.1, learn_temperature=True)))
    forced = tmp_path / "draws.pt"
    if forced.exists() and accelerator.num_processes == 1:
        replay = torch.load(forced)
        real_sample = cache.sample

        def sample(*args, **kwargs):
            draw = real_sample(*args, **kwargs)
            draw.doc_idx = replay["doc_idx"]
            draw.weight = replay["weight"]
            return draw

        cache.sample = sample
    recorded = {}
    real = cache.sample

    def recording(*args, **kwargs):
        draw = real(*args, **kwargs)
        recorded.update(doc_idx=draw.doc_idx, weight=draw.weight, rest_lse=draw.rest_lse)
        return draw

    cache.sample = recording
    output = cache_training_step(module, batch, accelerator, cfg, cache, draw_step=0)
    accelerator.backward(output.loss)
    loss = accelerator.reduce(output.loss.detach(), reduction="mean")
    grads = {
        n: p.grad.clone()
        for n, p in accelerator.unwrap_model(module).named_parameters()
        if p.grad is not None
    }
    draws = {k: accelerator.gather(v) for k, v in recorded.items()}
    table = accelerator.gather(cache.table.emb)
    if accelerator.is_main_process:
        if accelerator.num_processes > 1:
            torch.save({"doc_idx": draws["doc_idx"], "weight": draws["weight"]}, forced)
        torch.save(
            {"loss": loss, "grads": grads, "rest_lse": draws["rest_lse"], "table": table}, tmp_path / out_file
        )
    accelerator.wait_for_everyone()


CASES.update(cache_sampling=cache_sampling, cache_step=cache_step)


if __name__ == "__main__":
    from accelerate import debug_launcher

    case, tmp_dir, *rest = sys.argv[1:]
    fn, tmp = CASES[case], Path(tmp_dir)
    debug_launcher(fn, args=(tmp, *map(Path, rest), "two.pt"), num_processes=2)
    _reset_accelerate()
    fn(tmp, *map(Path, rest), "one.pt")
