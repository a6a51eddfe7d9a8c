"""Multi-process test cases, run as ``python tests/distributed_cases.py CASE TMP_DIR [ARGS]``.

Each case runs under ``accelerate.debug_launcher`` (2 processes, gloo on CPU) and then once in a single
process; both write their results to TMP_DIR for the calling test to compare. The launch happens in a fresh
interpreter because forking a process whose OpenMP thread pool is already running (any pytest process that has
done torch maths) can deadlock the children.
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
    """One training step over a fixed global batch of 4 queries x G=2; the main process saves loss and
    grads."""
    from accelerate import Accelerator

    from dualenc.losses.inbatch import InBatchCE
    from dualenc.model.encoder import DualEncoder
    from dualenc.training.batches import GroupDataset, TrainCollator
    from dualenc.training.config import load_config
    from dualenc.training.data import load_train_data
    from dualenc.training.step import TrainingModule

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
    """Accelerator, model (eval: no dropout), data and a corpus-mode cache of the current document tower.

    Every run encodes the whole corpus in the same batches and loads its own shard from it, so the table holds
    the same bits for any number of processes (the comparison is about sampling, not about the fill's
    batching).
    """
    from accelerate import Accelerator

    from dualenc.io.readers import doc_texts
    from dualenc.model.encoder import DualEncoder
    from dualenc.negcache.negative_cache import NegativeCache
    from dualenc.retrieval.encode import encode_texts
    from dualenc.training.config import load_config
    from dualenc.training.data import load_train_data

    accelerator = Accelerator(cpu=True)
    cfg = load_config(None, ["random_init=true", "loss=cache", "train_group_size=2", *overrides])
    model = DualEncoder.from_pretrained(model_dir).eval()
    data = load_train_data(str(tmp_path / "triples.tsv"), format="triples", cache_dir=str(tmp_path / "hf"))
    cache = NegativeCache(cfg.cache, data.corpus, accelerator, model.dim, seed=0)
    texts = doc_texts(data.corpus)
    emb = torch.from_numpy(encode_texts(model, texts, kind="doc", batch_size=16))  # (C, D)
    rows = torch.arange(
        cache.table.slot_offset, cache.table.slot_offset + cache.table.num_slots
    )  # (M_local,)
    cache.table.fill_corpus(emb[rows], rows)
    return accelerator, cfg, model, data, cache


def _local_batch(accelerator, model, data, size: int = 4) -> dict:
    """This process's share of a fixed global batch of ``size`` queries x G=2 (contiguous, by rank)."""
    from dualenc.training.batches import GroupDataset, TrainCollator

    items = [GroupDataset(data, 2, seed=0)[i] for i in range(size)]
    per_rank = size // accelerator.num_processes
    return TrainCollator(model, data.corpus)(items[accelerator.process_index * per_rank :][:per_rank])


def cache_sampling(tmp_path: Path, model_dir: Path, out_file: str) -> None:
    """150 steps of 16 draws for 4 fixed queries (2 per process with 2 processes): every draw, counts per row.

    The query vectors are encoded from the whole global batch in every run (the same bits for 1 and 2
    processes).
    """
    from dualenc.training.batches import GroupDataset, TrainCollator

    accelerator, cfg, model, data, cache = _cache_setup(tmp_path, model_dir, ["num_cache_negatives=16"])
    batch = _local_batch(accelerator, model, data)
    full = TrainCollator(model, data.corpus)([GroupDataset(data, 2, seed=0)[i] for i in range(4)])
    per_rank = 4 // accelerator.num_processes
    mine = slice(accelerator.process_index * per_rank, (accelerator.process_index + 1) * per_rank)
    with torch.no_grad():
        q_emb = model.encode_queries(full["query"])[mine]  # (b, D)
        positive = model.encode_docs(full["doc"])[::2][mine]  # (b, D)
    scale = torch.tensor(20.0)
    pos_score = scale * (q_emb * positive).sum(-1)  # (b,)
    counts = torch.zeros(per_rank, len(data.corpus), dtype=torch.long)
    draws = []
    for step in range(150):
        draw = cache.sample(
            q_emb, pos_score, batch["positives"], batch["doc_idx"], scale, step, cross_device=True
        )
        draws.append(draw.doc_idx)
        for row in range(per_rank):
            counts[row].index_add_(0, draw.doc_idx[row], torch.ones(draw.doc_idx.shape[1], dtype=torch.long))
    result = {
        "draws": accelerator.gather(torch.stack(draws, dim=1)),  # (4, steps, m)
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


def _cache_loss(model, loss_fn, batch: dict, cache, accelerator, step: int):
    """loss=cache on one micro-batch from public pieces: NegativeCache.sample, live re-encoding of the draws,
    CachedCE over [positive, every process's batch documents, lumped rest of the cache], then the
    write-back."""
    from dualenc.losses.base import CacheTerms, LossInputs, false_negative_mask
    from dualenc.training.distributed import all_gather_with_grad

    q_emb, d_emb = model(batch["query"], batch["doc"])  # (b, D), (b*G, D)
    group = d_emb.shape[0] // q_emb.shape[0]
    scale = loss_fn.temperature().detach()  # ()
    pos_score = scale * (q_emb.detach() * d_emb[::group].detach()).sum(-1)  # (b,)
    draw = cache.sample(
        q_emb, pos_score, batch["positives"], batch["doc_idx"], scale, step, cross_device=True
    )
    neg_emb = q_emb.new_zeros(*draw.doc_idx.shape, q_emb.shape[1])  # (b, m, D)
    texts = cache.negative_texts(draw)
    if texts:
        neg_emb[draw.doc_idx >= 0] = model.encode_docs(model.tokenize_docs(texts))  # (n, D) with gradient
    targets = accelerator.process_index * d_emb.shape[0] + torch.arange(q_emb.shape[0]) * group  # (b,)
    d_all = all_gather_with_grad(d_emb)  # (P*b*G, D)
    doc_all = accelerator.gather(batch["doc_idx"]) if accelerator.num_processes > 1 else batch["doc_idx"]
    terms = CacheTerms(rest_lse=draw.rest_lse, neg_emb=neg_emb, neg_weight=draw.weight)
    mask = false_negative_mask(doc_all, batch["positives"], targets)  # (b, P*b*G)
    output = loss_fn(LossInputs(q_emb, d_all, targets, mask, terms))
    cache.write_back(
        torch.cat([batch["doc_idx"], draw.doc_idx.flatten()]),
        torch.cat([d_emb.detach(), neg_emb.detach().flatten(0, 1)]),
    )
    return draw, output


def cache_step(tmp_path: Path, model_dir: Path, out_file: str) -> None:
    """One loss=cache step over a fixed global batch (4 queries x G=2): draws, loss, gradients, table.

    Nothing is replayed: the draws themselves must not depend on the number of processes. Gradients are
        averaged
    over processes, as DDP does.
    """
    from dualenc.losses.cached import CachedCE

    accelerator, cfg, model, data, cache = _cache_setup(tmp_path, model_dir, ["num_cache_negatives=2"])
    batch = _local_batch(accelerator, model, data)
    loss_fn = CachedCE(0.1, learn_temperature=True)
    draw, output = _cache_loss(model, loss_fn, batch, cache, accelerator, step=3)
    output.loss.backward()
    named = [*model.named_parameters(), *(("loss." + n, p) for n, p in loss_fn.named_parameters())]
    grads = {n: accelerator.reduce(p.grad, reduction="mean") for n, p in named if p.grad is not None}
    result = {
        "loss": accelerator.reduce(output.loss.detach(), reduction="mean"),
        "grads": grads,
        "doc_idx": accelerator.gather(draw.doc_idx),
        "rest_lse": accelerator.gather(draw.rest_lse),
        "pos_rank": accelerator.gather(draw.pos_rank),
        "table": accelerator.gather(cache.table.emb),
    }
    if accelerator.is_main_process:
        torch.save(result, tmp_path / out_file)
    accelerator.wait_for_everyone()


CASES.update(cache_sampling=cache_sampling, cache_step=cache_step)


if __name__ == "__main__":
    from accelerate import debug_launcher

    case, tmp_dir, *rest = sys.argv[1:]
    fn, tmp = CASES[case], Path(tmp_dir)
    debug_launcher(fn, args=(tmp, *map(Path, rest), "two.pt"), num_processes=2)
    _reset_accelerate()
    fn(tmp, *map(Path, rest), "one.pt")
