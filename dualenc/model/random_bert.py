"""A randomly initialised BERT with a WordPiece vocabulary built from the given texts (offline smoke runs)."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Build an uncased BERT WordPiece vocabulary from ``texts``, deterministically; load it as a tokenizer.

    The vocabulary is the special tokens, every character seen (alone and as a ``##`` continuation, so any
    word can be spelled), then the most frequent whole words (ties broken alphabetically) up to
    ``vocab_size``. Words come from the ``tokenizers`` BERT normaliser and pre-tokeniser. (The ``tokenizers``
    WordPiece trainer is not used: it breaks frequency ties in hash order, so two runs of the same recipe
    would get different vocabularies.) ``vocab.txt`` and ``tokenizer_config.json`` are written to ``out_dir``
    so ``AutoTokenizer.from_pretrained(out_dir)`` works with transformers 4.x and 5.x alike.
    """
    from tokenizers import normalizers, pre_tokenizers
    from transformers import AutoTokenizer

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({ch for word in counts for ch in word})
    vocab = SPECIAL_TOKENS + chars + [f"##{ch}" for ch in chars]
    room = max(0, vocab_size - len(vocab))
    known = set(vocab)
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if w not in known]
    vocab += words[:room]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return AutoTokenizer.from_pretrained(out_dir)


def random_bert(
    texts: Iterable[str],
    *,
    vocab_size: int = 2000,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    dropout: float = 0.1,
    max_position: int = 512,
    seed: int = 0,
):
    """Return ``(BertModel, tokenizer)``: random weights (seeded) and a vocabulary trained on ``texts``."""
    from transformers import BertConfig, BertModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size, tmp)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=max_position,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BertModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model, tokenizer
