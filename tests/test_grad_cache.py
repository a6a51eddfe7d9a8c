"""GradCache (dualenc/training/grad_cache.py) against the plain large-batch step it stands in for.

Oracles: without dropout, the plain step over the whole micro-batch (one forward, autograd through the whole
graph): loss and every parameter gradient equal to 1e-5, for chunk sizes that do not divide the batch, a
learned temperature, separate towers, false-negative masks, and the negative cache's live re-encoded draws.
With dropout, the chunks' masks are not the whole batch's, so the oracle is autograd through the same chunks
encoded in the same RNG order with their graphs kept (stage 1 with gradients); and with one chunk per side,
the plain step itself. The 2-process runs through the real launcher are in tests/test_train_processes.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import make_text, tiny_bert_config, write_tokenizer_dir

from dualenc.training.grad_cache import grad_cache_step, split_features

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
B, G = 7, 2  # 7 queries x (positive + 1 hard negative): chunks of 3 and 4 do not divide 7 or 14


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import BertModel

    from dualenc.model.encoder import DualEncoder

    root = tmp_path_factory.mktemp("gc")
    dirs = {}
    for name, dropout in (("plain", 0.0), ("dropout", 0.2)):
        torch.manual_seed(0)
        hf = root / f"hf-{name}"
        BertModel(
            tiny_bert_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        ).save_pretrained(hf)
        write_tokenizer_dir(hf)
        model = DualEncoder.from_hf(hf, pooling="mean", normalize=True, query_max_len=12, passage_max_len=20)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(24):
        query = make_text(rng, 2, 6)
        lines.append(f"{query}\t{query} {make_text(rng, 2, 12)}\t{make_text(rng, 3, 14)}")
    (root / "triples.tsv").write_text("\n".join(lines) + "\n")
    dirs["root"] = root
    return dirs


def _setup(model_dirs, tmp_path, model: str, overrides: list[str], mixed_precision: str = "no"):
    """Accelerator, prepared TrainingModule, a batch of B queries x G, a filled cache (loss != inbatch)."""
    from accelerate import Accelerator

    from dualenc.io.readers import doc_texts
    from dualenc.model.encoder import DualEncoder
    from dualenc.negcache.negative_cache import NegativeCache
    from dualenc.retrieval.encode import encode_texts
    from dualenc.training.batches import GroupDataset, TrainCollator
    from dualenc.training.build import build_loss
    from dualenc.training.config import load_config
    from dualenc.training.data import load_train_data
    from dualenc.training.step import TrainingModule

    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    untie = "two-towers" in overrides
    overrides = [o for o in overrides if o != "two-towers"]
    cfg = load_config(None, ["random_init=true", f"train_group_size={G}", "temperature=0.1", *overrides])
    encoder = DualEncoder.from_pretrained(model_dirs[model])
    encoder = encoder.double() if mixed_precision == "no" else encoder
    if untie:  # separate towers (started from different weights, so both matter)
        doc_tower = copy.deepcopy(encoder.query_encoder)
        with torch.no_grad():
            for param in doc_tower.parameters():
                param.mul_(0.9)
        encoder = DualEncoder(encoder.query_encoder, doc_tower, encoder.tokenizer, encoder.config)
    data = load_train_data(
        str(model_dirs["root"] / "triples.tsv"), format="triples", cache_dir=str(tmp_path / "hf")
    )
    batch = TrainCollator(encoder, data.corpus)([GroupDataset(data, G, seed=0)[i] for i in range(B)])
    cache = None
    if cfg.loss.loss != "inbatch":
        cache = NegativeCache(cfg.cache, data.corpus, accelerator, encoder.dim, seed=0)
        with torch.no_grad():
            emb = torch.from_numpy(encode_texts(encoder.eval(), doc_texts(data.corpus), kind="doc"))
        cache.table.fill_corpus(emb.to(cache.table.emb.dtype), torch.arange(len(data.corpus)))
    loss = build_loss(cfg).double() if mixed_precision == "no" else build_loss(cfg)
    module = accelerator.prepare(TrainingModule(encoder.train(), loss, cfg.loss))
    return accelerator, module, batch, cache


def _grads(module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    return grads


def _plain(module, batch, cache) -> tuple[float, dict]:
    torch.manual_seed(5)
    output = module(batch, cache=cache, draw_id=3)
    output.loss.backward()
    return output.loss.item(), _grads(module)


def _gc(accelerator, module, batch, cache, q_chunk: int, d_chunk: int) -> tuple[float, dict, object]:
    torch.manual_seed(5)
    output = grad_cache_step(
        accelerator,
        module,
        batch,
        cache,
        3,
        query_chunk=q_chunk,
        doc_chunk=d_chunk,
        loss_scale=1.0,
        sync=True,
    )
    return output.loss.item(), _grads(module), output


def _assert_same(expected: dict, got: dict, atol: float = 1e-5) -> None:
    assert expected.keys() == got.keys()
    assert len(expected) > 10  # both towers' layers took part
    for name, grad in expected.items():
        assert grad.abs().max() > 0 or got[name].abs().max() == 0, name
        torch.testing.assert_close(got[name], grad, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["learn_temperature=true"],
        ["two-towers", "learn_temperature=true"],
        ["loss=cache", "num_cache_negatives=3", "refresh_fraction=0.1"],
        ["loss=cache_ce", "refresh_fraction=0.1"],
    ],
    ids=["inbatch", "learned-temperature", "two-towers", "cache", "cache_ce"],
)
@pytest.mark.parametrize("chunks", [(3, 4), (1, 5), (B, B * G)], ids=["3-4", "1-5", "one-chunk"])
def test_grad_cache_equals_the_plain_large_batch_step(model_dirs, tmp_path, overrides, chunks):
    accelerator, module, batch, cache = _setup(model_dirs, tmp_path, "plain", overrides)
    loss, grads = _plain(module, batch, cache)
    gc_loss, gc_grads, output = _gc(accelerator, module, batch, cache, *chunks)
    assert gc_loss == pytest.approx(loss, abs=1e-5)
    _assert_same(grads, gc_grads)
    if "learn_temperature=true" in overrides:
        assert "loss.temperature.log_scale" in gc_grads
    if (
        cache is not None and "loss=cache" in overrides
    ):  # the drawn negatives were re-encoded and back-propagated
        assert output.fresh_idx.numel() == B * G + B * 3


def test_grad_cache_with_dropout_replays_each_chunks_masks(model_dirs, tmp_path):
    """Oracle: the chunks encoded with graphs in stage 1's RNG order, the same loss, one backward."""
    accelerator, module, batch, cache = _setup(model_dirs, tmp_path, "dropout", ["learn_temperature=true"])
    gc_loss, gc_grads, output = _gc(accelerator, module, batch, cache, 3, 4)

    torch.manual_seed(5)
    q = torch.cat([module.encoder.encode_queries(c) for c in split_features(batch["query"], 3)])  # (B, D)
    d = torch.cat([module.encoder.encode_docs(c) for c in split_features(batch["doc"], 4)])  # (B·G, D)
    reference = module.loss_from_embeddings(q, d, batch, None, 3, module.encoder.encode_docs)
    reference.loss.backward()
    assert gc_loss == pytest.approx(reference.loss.item(), abs=1e-5)
    _assert_same(_grads(module), gc_grads)
    torch.testing.assert_close(output.fresh_emb, d.detach(), rtol=0, atol=1e-12)  # stage 3 = stage 1's rows

    # chunks of other sizes see other masks: the gradients differ (dropout really is on)
    _, other, _ = _gc(accelerator, module, batch, cache, 2, 5)
    assert max((other[n] - gc_grads[n]).abs().max() for n in gc_grads) > 1e-4


def test_grad_cache_with_dropout_and_one_chunk_is_the_plain_step(model_dirs, tmp_path):
    accelerator, module, batch, cache = _setup(
        model_dirs, tmp_path, "dropout", ["loss=cache", "num_cache_negatives=2", "refresh_fraction=0.1"]
    )
    loss, grads = _plain(module, batch, cache)
    gc_loss, gc_grads, _ = _gc(accelerator, module, batch, cache, B, B * G)
    assert gc_loss == pytest.approx(loss, abs=1e-5)
    _assert_same(grads, gc_grads)


def test_grad_cache_accumulates_like_backward_of_the_scaled_loss(model_dirs, tmp_path):
    """Two micro-batches with loss_scale 1/2 each: the sum equals half the sum of the plain gradients."""
    accelerator, module, batch, cache = _setup(model_dirs, tmp_path, "plain", [])
    _, grads = _plain(module, batch, cache)
    for _ in range(2):
        torch.manual_seed(5)
        grad_cache_step(
            accelerator, module, batch, None, 3, query_chunk=2, doc_chunk=3, loss_scale=0.5, sync=True
        )
    _assert_same(grads, _grads(module))


def test_split_features_trims_each_chunk_to_its_longest_row():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    features = {"input_ids": torch.arange(12).view(3, 4), "attention_mask": mask}
    chunks = split_features(features, 2)
    assert [c["input_ids"].shape for c in chunks] == [(2, 2), (1, 4)]
    assert chunks[0]["input_ids"].tolist() == [[0, 1], [4, 5]]


def test_grad_cache_chunk_sizes_must_be_positive():
    from dualenc.training.config import load_config

    with pytest.raises(ValueError, match="grad_cache_query_chunk"):
        load_config(None, ["random_init=true", "grad_cache=true", "grad_cache_query_chunk=0"])


def test_grad_cache_under_bf16_autocast_follows_the_plain_step(model_dirs, tmp_path):
    """mixed_precision=bf16: stage 1 runs under the Accelerator's autocast as the wrapped forward does, so the
    gradients follow the plain bf16 step up to bf16 rounding (not bit for bit: other matrix shapes)."""
    accelerator, module, batch, cache = _setup(
        model_dirs, tmp_path, "plain", ["learn_temperature=true"], mixed_precision="bf16"
    )
    loss, grads = _plain(module, batch, cache)
    seen = []  # autocast state at every forward of a Linear layer: stage 1, the loss, the replays
    hooks = [
        layer.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        for layer in module.modules()
        if isinstance(layer, torch.nn.Linear)
    ]
    gc_loss, gc_grads, _ = _gc(accelerator, module, batch, cache, 3, 4)
    for hook in hooks:
        hook.remove()
    assert len(seen) > 20 and all(seen)  # every encoder forward of the GradCache step ran under autocast
    assert gc_loss == pytest.approx(loss, rel=2e-2)
    assert grads.keys() == gc_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (gc_grads[name] - grad).abs().max() <= 0.1 * scale, name
