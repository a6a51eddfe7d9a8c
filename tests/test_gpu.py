"""CUDA parity: the GPU paths of the table, the scan, the sampler, SCE and encoding equal their CPU oracles.

Marked ``gpu`` and skipped without CUDA. They need only torch and transformers (no datasets, faiss or
ir-measures), so they run on a machine with a GPU through ``scripts/gpu_checks.sh``.
"""

from __future__ import annotations

import pytest
import torch

from dualenc.losses.dense import full_ce
from dualenc.losses.sce import ScalableCE
from dualenc.negcache.gumbel import GumbelKey, keyed_bits, keyed_gumbel
from dualenc.negcache.scan import scan_table
from dualenc.negcache.table import EmbeddingTable

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _table(device: str, size: int = 3000, dim: int = 16, dtype=torch.float32) -> EmbeddingTable:
    gen = torch.Generator().manual_seed(0)
    table = EmbeddingTable(size, dim, dtype=dtype, device=device)
    emb = torch.nn.functional.normalize(torch.randn(size, dim, generator=gen), dim=1)  # (M, D) on CPU
    table.fill_corpus(emb.to(device=device, dtype=dtype), torch.arange(size, device=device))
    table.doc_idx[7::50] = -1  # some empty slots
    return table


def _scan(table: EmbeddingTable, queries: torch.Tensor, device: str, *, with_mean: bool, block: int):
    q = queries.to(device)  # (Q, D)
    return scan_table(
        table,
        q,
        5.0,
        pos_score=torch.full((q.shape[0],), 2.0, device=device),
        mask_rows=torch.arange(q.shape[0], device=device),
        mask_slots=torch.arange(q.shape[0], device=device) * 3,
        home_slots=None,
        num_samples=2,
        replacement=True,
        key=GumbelKey(0, 1),
        query_ids=torch.arange(q.shape[0], device=device),
        block_size=block,
        with_mean=with_mean,
    )


def test_table_scan_statistics_equal_cpu():
    """Log-sum-exp, positive rank and softmax mean over the masked table: CUDA (other block size) = CPU."""
    queries = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))  # (Q, D)
    cpu = _scan(_table("cpu"), queries, "cpu", with_mean=True, block=1000)
    cuda = _scan(_table("cuda"), queries, "cuda", with_mean=True, block=777)
    torch.testing.assert_close(cuda.lse.cpu(), cpu.lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cuda.mean.cpu(), cpu.mean, rtol=1e-5, atol=1e-5)
    assert torch.equal(cuda.above.cpu(), cpu.above)
    # keyed noise: the same draws on any device and block size
    assert torch.equal(cuda.slots.cpu(), cpu.slots)
    drawn = cuda.slots.cpu()  # (Q, m)
    table = _table("cpu")
    assert bool((table.doc_idx[drawn] >= 0).all()), "an empty slot was drawn"
    assert not bool((drawn == (torch.arange(12) * 3)[:, None]).any()), "a masked positive was drawn"


def test_bfloat16_table_scan_is_close_to_float32():
    queries = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    exact = _scan(_table("cuda"), queries, "cuda", with_mean=False, block=1024)
    bf16 = _scan(_table("cuda", dtype=torch.bfloat16), queries, "cuda", with_mean=False, block=1024)
    torch.testing.assert_close(bf16.lse, exact.lse, rtol=0, atol=0.05)


def test_keyed_noise_on_cuda_equals_cpu_bit_for_bit():
    """int64 wrap-around and shifts on CUDA: the same 64-bit hashes, hence the same Gumbel noise."""
    key, queries, docs = GumbelKey(3, 2**40 + 7), torch.arange(64) * 11, torch.arange(5000) - 2
    bits = keyed_bits(key, queries, docs, 3)  # (Q, b)
    assert torch.equal(keyed_bits(key, queries.cuda(), docs.cuda(), 3).cpu(), bits)
    for dtype in (torch.float32, torch.float64):
        cpu = keyed_gumbel(key, queries, docs, 1, dtype)
        torch.testing.assert_close(
            keyed_gumbel(key, queries.cuda(), docs.cuda(), 1, dtype).cpu(), cpu, rtol=1e-6, atol=1e-6
        )


def test_table_operations_equal_cpu():
    """A random stream of inserts, refreshes and ticks leaves identical buffers on CUDA and CPU."""
    tables = {dev: EmbeddingTable(64, 4, device=dev) for dev in ("cpu", "cuda")}
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        rows = torch.randint(0, 200, (10,), generator=gen)  # (n,) corpus rows, with repeats
        emb = torch.randn(10, 4, generator=gen)  # (n, D)
        refresh = torch.randint(0, 64, (5,), generator=gen)  # (r,) slots, with repeats
        fresh = torch.randn(5, 4, generator=gen)
        for dev, table in tables.items():
            table.write(refresh.to(dev), fresh.to(dev))
            table.insert(rows.to(dev), emb.to(dev))
            table.tick()
    cpu, cuda = (tables[d].state_dict() for d in ("cpu", "cuda"))
    for key in cpu:
        assert torch.equal(cuda[key].cpu(), cpu[key]), key
    probe = torch.arange(200)
    assert torch.equal(tables["cuda"].locate(probe.cuda()).cpu(), tables["cpu"].locate(probe))


@pytest.mark.parametrize("mix", [False, True])
def test_scalable_ce_on_cuda_equals_cpu(mix):
    """Same centres (drawn from one CPU generator): value and gradients equal in float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64)  # (N, D)
    w = torch.randn(500, 8, generator=gen, dtype=torch.float64)  # (C, D)
    targets = torch.randint(0, 500, (64,), generator=gen)  # (N,)
    results = {}
    for dev in ("cpu", "cuda"):
        xd, wd = x.to(dev, copy=True).requires_grad_(), w.to(dev, copy=True).requires_grad_()  # fresh leaves
        loss = ScalableCE(bucket_size_y=32, mix=mix, block_size=100)(
            xd, wd, targets.to(dev), generator=torch.Generator().manual_seed(5)
        ).loss
        loss.backward()
        results[dev] = (loss.detach().cpu(), xd.grad.cpu(), wd.grad.cpu())
    for got, want in zip(results["cuda"], results["cpu"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_full_coverage_sce_equals_full_ce_on_cuda():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=gen, dtype=torch.float64, device="cpu").cuda()
    w = torch.randn(40, 8, generator=gen, dtype=torch.float64, device="cpu").cuda()
    targets = torch.randint(0, 40, (16,), generator=gen).cuda()
    sce = ScalableCE(n_buckets=1, bucket_size_x=16, bucket_size_y=40)(x, w, targets).loss
    torch.testing.assert_close(sce, full_ce(x, w, targets), rtol=1e-12, atol=1e-12)


def test_bf16_autocast_encoding_is_close_to_fp32(tiny_model_dir):
    from dualenc.model.encoder import DualEncoder
    from dualenc.retrieval.encode import encode_texts

    texts = ["dense passage retrieval", "negative cache table", "scalable softmax bucket", "the a of"]
    model = DualEncoder.from_pretrained(tiny_model_dir)
    ref = torch.from_numpy(encode_texts(model.eval(), texts, batch_size=2))  # (4, D) fp32 on CPU
    model = model.to("cuda")
    got = torch.from_numpy(
        encode_texts(model, texts, batch_size=3, device="cuda", autocast_dtype=torch.bfloat16)
    )
    cos = torch.nn.functional.cosine_similarity(got.float(), ref, dim=1)  # (4,)
    assert bool((cos > 0.99).all()), cos


def test_grad_cache_replays_cuda_dropout(tmp_path, tiny_bert_dir):
    """GradCache on CUDA with dropout: the re-forward restores the CUDA generator, so the gradients equal
    autograd through the same chunks encoded in the same order (and, with one chunk per side, the plain
    step)."""
    grad_cache_dropout_check(tmp_path, tiny_bert_dir, "cuda")


def grad_cache_dropout_check(tmp_path, tiny_bert_dir, device: str) -> None:
    """The check of :func:`test_grad_cache_replays_cuda_dropout` on ``device`` (CPU runs it by hand)."""
    from accelerate import Accelerator
    from helpers import write_tokenizer_dir
    from transformers import BertModel

    from dualenc.losses.inbatch import InBatchCE
    from dualenc.model.encoder import DualEncoder, tokenize_texts
    from dualenc.training.config import load_config
    from dualenc.training.grad_cache import grad_cache_step, split_features
    from dualenc.training.step import TrainingModule

    hf = tmp_path / "hf"
    torch.manual_seed(0)
    bert = BertModel.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    bert.save_pretrained(hf)
    write_tokenizer_dir(hf)
    model = DualEncoder.from_hf(hf, pooling="mean", normalize=True, query_max_len=12, passage_max_len=20)
    cfg = load_config(None, ["random_init=true", "train_group_size=2", "learn_temperature=true"])
    accelerator = Accelerator(cpu=device == "cpu")
    module = accelerator.prepare(
        TrainingModule(model.train(), InBatchCE(0.1, learn_temperature=True), cfg.loss)
    )
    words = "dense passage retrieval negative cache table scalable softmax bucket query document".split()
    queries = [" ".join(words[i : i + 2 + i % 3]) for i in range(7)]
    docs = [" ".join(words[(i * 3) % 7 :][: 3 + i % 5]) for i in range(14)]
    batch = {
        "query": tokenize_texts(model.tokenizer, queries, "", 12).to(device),
        "doc": tokenize_texts(model.tokenizer, docs, "", 20).to(device),
        "doc_idx": torch.arange(14, device=device),
        "positives": torch.arange(0, 14, 2, device=device)[:, None],
    }

    def grads() -> dict:
        out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        module.zero_grad()
        return out

    def gc(q: int, d: int) -> dict:
        torch.manual_seed(5)
        grad_cache_step(
            accelerator, module, batch, None, 0, query_chunk=q, doc_chunk=d, loss_scale=1.0, sync=True
        )
        return grads()

    got = gc(3, 4)
    torch.manual_seed(5)
    q = torch.cat([model.encode_queries(c) for c in split_features(batch["query"], 3)])  # (7, D)
    d = torch.cat([model.encode_docs(c) for c in split_features(batch["doc"], 4)])  # (14, D)
    module.loss_from_embeddings(q, d, batch, None, 0, model.encode_docs).loss.backward()
    want = grads()
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)

    one = gc(7, 14)
    torch.manual_seed(5)
    module(batch).loss.backward()
    plain = grads()
    for name in plain:
        torch.testing.assert_close(one[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
    other = gc(2, 5)  # other chunks, other masks: dropout is on
    assert max((other[n] - got[n]).abs().max() for n in got) > 1e-4
