"""The model card (``README.md``) of a saved model: its facts, its load snippets run as written, the training
facts equal to ``train_summary.json``, and its sentence-transformers query-length claim, measured."""

from __future__ import annotations

import json
import re
from pathlib import Path

import custom_towers
import pytest
import torch
from helpers import REPO, WORDS, tiny_overrides, write_triples

from dualenc.model import DualEncoder, DualEncoderConfig
from dualenc.training.config import load_config

TINY = REPO / "recipes" / "configs" / "tiny.yaml"
LONG_QUERIES = [  # 30 and 25 words of the tiny vocabulary: longer than query_max_len=16 tokens
    " ".join(WORDS[i % len(WORDS)] for i in range(7, 37)),
    " ".join(WORDS[-(i % 20) - 1] for i in range(25)),
]
DOCS = ["dense retrieval with a negative cache", "the bert encoder tower"]


def _card(folder: Path) -> str:
    return (folder / "README.md").read_text(encoding="utf-8")


def _snippet(card: str, language: str, index: int = 0) -> str:
    """The ``index``-th fenced code block of ``language`` in the card."""
    return re.findall(rf"```{language}\n(.*?)\n```", card, re.S)[index]


def _row(card: str, label: str) -> str:
    """The value of a ``| label | value |`` table row."""
    return re.search(rf"^\| {label} \| (.*) \|$", card, re.M).group(1)


def _run(code: str, folder: Path, monkeypatch, **texts: list[str]) -> dict:
    """Exec a snippet of the card as a user would, in the folder's parent; ``texts`` replace its examples."""
    for name, values in texts.items():
        code = re.sub(rf"^{name} = .*$", f"{name} = {values!r}", code, count=1, flags=re.M)
    monkeypatch.chdir(folder.parent)
    namespace: dict = {}
    exec(compile(code, str(folder / "README.md"), "exec"), namespace)
    return namespace


def _ours(folder: Path, queries: list[str], docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """dualenc's own query and document embeddings, the reference for the snippets."""
    model = DualEncoder.from_pretrained(folder).eval()
    with torch.no_grad():
        query_embeddings = model.encode_queries(model.tokenize_queries(queries))
        return query_embeddings, model.encode_docs(model.tokenize_docs(docs))


def _max_abs(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


@pytest.mark.parametrize("separate", [False, True])
def test_the_card_states_the_settings_and_its_snippets_run(tiny_bert_dir, tmp_path, monkeypatch, separate):
    pytest.importorskip("sentence_transformers")
    lengths = {"query_max_len": 16, "passage_max_len": 24}
    prefixes = {"query_prefix": "query: ", "passage_prefix": "passage: "}
    model = DualEncoder.from_hf(
        tiny_bert_dir, separate=separate, pooling="mean", normalize=True, **lengths, **prefixes
    )
    folder = tmp_path / "my_model"
    model.save_pretrained(folder)
    card = _card(folder)
    assert card.startswith("---\nlibrary_name: dualenc\ntags:\n- sentence-transformers\n- dense-retrieval\n")
    assert "base_model:" not in card  # a local folder is no hub id
    assert _row(card, "Base model") == f"a local folder `{tiny_bert_dir.name}`"
    assert _row(card, "Pooling") == "`mean`"
    assert _row(card, "Normalisation") == "L2-normalised (dot product = cosine)"
    assert _row(card, "Query length") == "16 tokens (`query_max_len`)"
    assert _row(card, "Passage length") == "24 tokens (`passage_max_len`)"
    assert (_row(card, "Query prefix"), _row(card, "Passage prefix")) == ("`'query: '`", "`'passage: '`")
    assert ("separate towers" if separate else "one shared tower") in _row(card, "Towers")
    assert "dualenc encode --model my_model --topics" in _snippet(card, "bash")
    assert str(tmp_path) not in card and str(tiny_bert_dir) not in card  # no absolute path
    assert not [p for p in tmp_path.iterdir() if p.name != "my_model"]  # no temporary folder left
    assert not (folder / ".model_files").exists() and (folder / "dualenc_config.json").is_file()

    queries, docs = ["a dense query", LONG_QUERIES[0]], DOCS
    want_q, want_d = _ours(folder, queries, docs)
    ours = _run(_snippet(card, "python", 0), folder, monkeypatch, queries=queries, documents=docs)
    torch.testing.assert_close(ours["query_embeddings"], want_q)
    st = _run(_snippet(card, "python", 1), folder, monkeypatch, queries=queries, documents=docs)
    assert _max_abs(st["query_embeddings"], want_q) < 1e-5  # prefixes as prompts, query length handled
    assert _max_abs(st["document_embeddings"], want_d) < 1e-5
    assert st["scores"].shape == (2, 2)


def test_sentence_transformers_query_length_claim(tiny_model_dir, monkeypatch):
    """The card says ST uses passage_max_len for every input, so a long query differs, and that
    ``model.max_seq_length = query_max_len`` for queries fixes it: measured here on the card's own snippet."""
    st_lib = pytest.importorskip("sentence_transformers")
    card = _card(tiny_model_dir)
    model = DualEncoder.from_pretrained(tiny_model_dir)
    config = model.config
    claimed = int(re.search(r"this folder sets it to (\d+) tokens", card).group(1))
    assert claimed == config.passage_max_len == 24 and config.query_max_len == 16
    assert st_lib.SentenceTransformer(str(tiny_model_dir), device="cpu").max_seq_length == claimed
    assert all(len(model.tokenizer(query)["input_ids"]) > config.query_max_len for query in LONG_QUERIES)
    want_q, _ = _ours(tiny_model_dir, LONG_QUERIES, DOCS)
    code = _snippet(card, "python", 1)
    remedy = f"model.max_seq_length = {config.query_max_len}  #"
    assert remedy in code and "## Queries: one `max_seq_length` in sentence-transformers" in card
    naive = "\n".join(line for line in code.splitlines() if not line.startswith(remedy))
    before = _run(naive, tiny_model_dir, monkeypatch, queries=LONG_QUERIES, documents=DOCS)
    assert _max_abs(before["query_embeddings"], want_q) > 1e-3  # the difference the card warns of
    after = _run(code, tiny_model_dir, monkeypatch, queries=LONG_QUERIES, documents=DOCS)
    assert _max_abs(after["query_embeddings"], want_q) < 1e-5  # the card's remedy


def test_custom_towers_still_get_a_card(tokenizer, tmp_path, monkeypatch):
    tower = custom_towers.BagOfWords(len(tokenizer))
    model = DualEncoder(tower, None, tokenizer, DualEncoderConfig(query_max_len=6, passage_max_len=8))
    model.save_pretrained(tmp_path / "bow")
    card = _card(tmp_path / "bow")
    assert "custom `custom_towers.BagOfWords`" in _row(card, "Towers")
    assert _row(card, "Base model") == "not recorded" and _row(card, "Embedding dimension") == "8"
    assert "sentence-transformers cannot load this folder" in card
    assert "`custom_towers.BagOfWords` tower must be importable" in card
    ours = _run(_snippet(card, "python", 0), tmp_path / "bow", monkeypatch, queries=["a query"])
    assert ours["query_embeddings"].shape == (1, 8)


def test_the_card_is_part_of_the_atomic_swap(tiny_bert_dir, tmp_path, monkeypatch):
    """A failure while the card is written leaves the previous folder, card and all."""
    import dualenc.model.model_card as model_card

    DualEncoder.from_hf(tiny_bert_dir, query_max_len=7).save_pretrained(tmp_path / "m")
    before = _card(tmp_path / "m")

    def broken(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(model_card, "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        DualEncoder.from_hf(tiny_bert_dir, query_max_len=9).save_pretrained(tmp_path / "m")
    assert _card(tmp_path / "m") == before and "7 tokens" in _row(before, "Query length")
    assert json.loads((tmp_path / "m" / "dualenc_config.json").read_text())["query_max_len"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_training_writes_its_facts_into_the_cards(tmp_path, fresh_accelerate_state):
    from dualenc.training.loop import train

    triples = write_triples(tmp_path / "triples.tsv", 40, seed=1)
    rows = [line.split("\t") for line in triples.read_text().splitlines()]
    (tmp_path / "dev_corpus.tsv").write_text("".join(f"d{i}\t{p}\n" for i, (_, p, _) in enumerate(rows[:20])))
    (tmp_path / "dev_topics.tsv").write_text("".join(f"q{i}\t{q}\n" for i, (q, _, _) in enumerate(rows[:20])))
    (tmp_path / "dev_qrels.txt").write_text("".join(f"q{i} 0 d{i} 1\n" for i in range(20)))
    extra = {
        "train_file": str(triples),
        "dev_corpus_file": str(tmp_path / "dev_corpus.tsv"),
        "dev_topics_file": str(tmp_path / "dev_topics.tsv"),
        "dev_qrels_file": str(tmp_path / "dev_qrels.txt"),
        "max_steps": 12,
        "eval_steps": 4,
        "eval_measure": "RR@10",
    }
    train(load_config(TINY, tiny_overrides(tmp_path, **extra)))
    run = tmp_path / "run"
    summary = json.loads((run / "train_summary.json").read_text())
    final, best = _card(run / "final_model"), _card(run / "best_model")
    for card in (final, best):
        assert _row(card, "Loss").startswith("`inbatch`:") and _row(card, "Temperature") == "0.05"
        assert _row(card, "Base model").startswith("random BERT: hidden 32, 2 layers")
        assert _row(card, "Training data") == "`triples.tsv` (train_file), format `triples`"
        assert _row(card, "Group size").startswith("2 documents per query")
        assert _row(card, "Batch per step").endswith("= 8 queries, 16 documents")
        assert _row(card, "GradCache") == "off" and str(tmp_path) not in card
        measure, value, step = re.fullmatch(
            r"`(.+)` = (\S+) at step (\d+) \(dev queries `dev_topics.tsv`\)", _row(card, "Best dev")
        ).groups()
        assert measure == summary["eval_measure"] == "RR@10" and int(step) == summary["best_step"]
        assert float(value) == pytest.approx(summary["best_metric"], rel=1e-5)
    assert int(_row(final, "Optimizer steps")) == summary["steps"] == 12
    assert int(_row(best, "Optimizer steps")) == summary["best_step"]


def test_training_facts_of_cache_losses_and_grad_cache(tmp_path):
    from dualenc.model.model_card import training_facts

    overrides = ["loss=cache", "temperature=0.02", "learn_temperature=true", "grad_cache=true"]
    overrides += ["grad_cache_query_chunk=4", "grad_cache_passage_chunk=6", "gradient_accumulation_steps=3"]
    cfg = load_config(TINY, [*overrides, "num_cache_negatives=5", "refresh_fraction=0.25"])
    facts = training_facts(cfg, 7, 2, None, None)
    rows = dict(facts["rows"])
    assert facts["base_model"][0].startswith("random BERT") and rows["Optimizer steps"] == "7"
    assert rows["Temperature"] == "0.02 at the start, learned"
    assert (
        "`num_cache_negatives=5`" in rows["Cache settings"]
        and "`refresh_fraction=0.25`" in rows["Cache settings"]
    )
    assert rows["GradCache"] == "chunks of 4 queries, 6 documents"
    assert rows["Batch per step"] == "8 queries x 2 processes x 3 accumulation = 48 queries, 96 documents"
    assert rows["Best dev"] == "no dev set"
    assert rows["Training data"].startswith("`splade-toy.triples.train.sample.tsv` (train_file)")
