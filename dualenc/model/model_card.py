"""The model card: ``README.md`` in every model directory that ``DualEncoder.save_pretrained`` writes.

Markdown under a YAML front matter block as on Hugging Face (``library_name: dualenc``, ``tags``,
``base_model`` when a hub id): base model, towers, pooling, normalisation, lengths, prefixes; when training
saved the model, the loss and its settings, data, steps, batch and best dev score (:func:`training_facts`);
how to load it in dualenc and in sentence-transformers, whose one ``max_seq_length`` (``passage_max_len`` in a
shared folder) embeds queries longer than ``query_max_len`` differently unless it is set to that for queries.

Paths: a local file or folder is named by its last component only (``triples.tsv``, ``final_model``); the
run's ``config.yaml`` keeps full paths. Hub ids and ``pkg:`` paths are kept whole. The card is written in the
folder's temporary directory (:func:`card_folder`), so it appears in the same atomic swap as the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dualenc.io.atomic import atomic_dir, write_text
from dualenc.model.towers import HFEncoder

CARD_NAME = "README.md"
_INNER = ".model_files"  # the model directory is written here, inside the card's temporary directory
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_LOSSES = {
    "inbatch": "softmax cross-entropy over in-batch and hard negatives",
    "cache": "softmax cross-entropy over in-batch, hard and negative-cache-sampled negatives",
    "cache_ce": "exact softmax over the whole cached document table (as constants)",
    "sce": "Scalable Cross-Entropy over the cached document table",
}
_RANDOM = (
    "random BERT: hidden {random_hidden_size}, {random_num_layers} layers, vocabulary {random_vocab_size}"
)
_ST_SCORES = "scores = {}.similarity(query_embeddings, document_embeddings)"
_EXAMPLE_QUERY = "how do dense retrievers work?"
_EXAMPLE_DOC = "A dense retriever embeds queries and documents as vectors and ranks by their inner product."


@contextlib.contextmanager
def card_folder(path: str | os.PathLike, card: str) -> Iterator[Path]:
    """Yield a folder to write a model directory into; on success it becomes ``path``, with ``card`` as its
    ``README.md``, in one :func:`~dualenc.io.atomic.atomic_dir` swap (a failure leaves ``path`` as it was)."""
    with atomic_dir(path) as tmp:
        inner = tmp / _INNER
        yield inner
        for child in inner.iterdir():
            os.replace(child, tmp / child.name)
        inner.rmdir()
        write_text(tmp / CARD_NAME, card)


def model_card(model: Any, path: str | os.PathLike, training: Mapping[str, Any] | None = None) -> str:
    """The ``README.md`` of a ``DualEncoder`` saved to ``path``; ``training`` from :func:`training_facts`."""
    name = Path(os.path.abspath(path)).name
    tower_base = getattr(getattr(model.query_encoder, "model", None), "name_or_path", "")
    base, hub_id = (training or {}).get("base_model") or describe_base(tower_base)
    front = ["---", "library_name: dualenc", "tags:", "- sentence-transformers", "- dense-retrieval"]
    front += [f"base_model: {hub_id}", "---"] if hub_id else ["---"]
    parts = [
        "\n".join(front),
        f"# {name}\n\nA dense retriever (dual encoder) saved by dualenc.",
        "## Model\n\n" + _table(_model_rows(model, base)),
    ]
    if training is not None:
        note = "File names only here; the run's `config.yaml` has the full paths."
        parts.append("## Training\n\n" + _table(training["rows"]) + "\n\n" + note)
    parts += [_dualenc_usage(model, name), _st_usage(model, name)]
    return "\n\n".join(parts) + "\n"


def describe_base(name: str | None) -> tuple[str, str | None]:
    """How a card names a base model: (text, hub id for the front matter or None). A local folder is named
    as the card in it names its base, as a ``pkg:`` path when in an installed package, else by its name."""
    if not name:
        return "not recorded", None
    if name.startswith("pkg:"):
        return f"`{name}`", None
    path = Path(name)
    if path.is_absolute() or path.exists():
        known = _card_base(path / CARD_NAME)  # a separate tower's card is one folder up
        known = known or (_card_base(path.parent / CARD_NAME) if path.name in ("query", "passage") else None)
        if known:
            return known
        parts = Path(os.path.abspath(path)).parts
        found = [i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages")]
        if found and found[-1] + 1 < len(parts):
            return f"`pkg:{'/'.join(parts[found[-1] + 1 :])}`", None
        return f"a local folder `{path.name}`", None
    return (f"`{name}`", name) if _HUB_ID.fullmatch(name) else (f"`{path.name}`", None)


def _card_base(card: Path) -> tuple[str, str | None] | None:
    """(text, hub id) of the base model a model card names: its ``Base model`` row (a dualenc card) or the hub
    id under ``base_model:`` of its front matter; None when it names none."""
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    match = re.match(r"---\n(.*?)\n---", text, re.S)
    found = re.search(r"^base_model:\s*(\S+)\s*$", match.group(1), re.M) if match else None
    hub_id = found.group(1) if found and _HUB_ID.fullmatch(found.group(1)) else None
    row = re.search(r"^\| Base model \| (.+) \|$", text, re.M)
    if row and row.group(1) != "not recorded":
        return row.group(1), hub_id
    return (f"`{hub_id}`", hub_id) if hub_id else None


def training_facts(
    run_config: Any, steps: int, processes: int, best_metric: float | None, best_step: int | None
) -> dict[str, Any]:
    """What a card says about the training that saved a model: ``base_model`` (a random start, else None: the
    towers' own origin) and ``rows`` (label, Markdown text) of loss, data, steps, batch, best dev score.

    ``run_config`` is the run's ``RunConfig`` (or its dict of sections); ``steps`` the optimizer steps of the
    saved weights; ``processes`` the training processes; ``best_metric`` (None without a dev set or before the
    first evaluation) and ``best_step`` the best dev score so far and its step.
    """
    c = run_config if isinstance(run_config, Mapping) else dataclasses.asdict(run_config)
    model, data, train, loss = c["model"], c["data"], c["train"], c["loss"]
    base = (_RANDOM.format(**model), None) if model["random_init"] else None  # None: the towers say
    temperature = f"{loss['temperature']:g}" + (" at the start, learned" if loss["learn_temperature"] else "")
    rows = [
        ("Loss", f"`{loss['loss']}`: {_LOSSES.get(loss['loss'], '')}"),
        ("Temperature", temperature),
        ("Negatives from other processes", "yes" if loss["negatives_x_device"] else "no"),
    ]
    cache = _cache_settings(loss["loss"], c["cache"], c["sce"])
    if cache:
        rows.append(("Cache settings", ", ".join(f"`{k}={v}`" for k, v in cache.items())))
    gc = f"chunks of {train['grad_cache_query_chunk']} queries, {train['grad_cache_passage_chunk']} documents"
    keys = ("train_file", "corpus_file", "queries_file", "qrels_file")
    files = ", ".join(f"`{Path(data[key]).name}` ({key})" for key in keys if data[key]) or "not recorded"
    group, per_process = data["train_group_size"], train["per_device_train_batch_size"]
    accumulation = train["gradient_accumulation_steps"]
    queries = per_process * processes * accumulation
    batch = f"{per_process} queries x {processes} processes x {accumulation} accumulation"
    rows += [
        ("GradCache", gc if train["grad_cache"] else "off"),
        ("Training data", f"{files}, format `{data['train_format']}`"),
        ("Group size", f"{group} documents per query (1 positive + {group - 1} hard negatives)"),
        ("Optimizer steps", str(steps)),
        ("Batch per step", f"{batch} = {queries} queries, {queries * group} documents"),
        ("Learning rate", f"{train['learning_rate']:g}"),
        ("Best dev", _best_dev(data["dev_topics_file"], train["eval_measure"], best_metric, best_step)),
    ]
    return {"base_model": base, "rows": rows}


def _best_dev(topics: str | None, measure: str, best_metric: float | None, best_step: int | None) -> str:
    """The best dev score and its step, or why there is none."""
    if not topics:
        return "no dev set"
    if best_metric is None:
        return f"`{measure}`: not evaluated yet"
    return f"`{measure}` = {best_metric:.6g} at step {best_step} (dev queries `{Path(topics).name}`)"


def _cache_settings(loss: str, cache: Mapping[str, Any], sce: Mapping[str, Any]) -> dict[str, Any] | None:
    """The negative-cache (and SCE) settings that shaped a cache loss; None for ``inbatch``."""
    if loss == "inbatch":
        return None
    keys = ["cache_mode", "cache_size", "cache_lru"] if cache["cache_mode"] == "stream" else ["cache_mode"]
    keys += ["refresh_fraction"] * (cache["cache_mode"] == "corpus") + ["cache_dtype", "cache_inbatch"]
    if loss == "cache":
        keys += ["num_cache_negatives", "cache_sample_with_replacement", "cache_candidates"]
    settings = {key: cache[key] for key in keys}
    if loss == "sce":
        settings.update({key: value for key, value in sce.items() if key != "sce_block_size"})
    return {key: str(value).lower() if isinstance(value, bool) else value for key, value in settings.items()}


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


def _model_rows(model: Any, base: str) -> list[tuple[str, str]]:
    c = model.config
    kinds = [_kind(tower) for tower in ((model.query_encoder,) if c.shared else _towers(model))]
    towers = f"one shared tower for queries and documents ({kinds[0]})"
    if not c.shared:
        towers = f"separate towers: queries in `query/` ({kinds[0]}), documents in `passage/` ({kinds[1]})"
    dim = getattr(model.query_encoder, "dim", None)
    return [
        ("Base model", base),
        ("Towers", towers),
        ("Embedding dimension", "not recorded" if dim is None else str(dim)),
        ("Pooling", f"`{c.pooling}`"),
        ("Normalisation", "L2-normalised (dot product = cosine)" if c.normalize else "none (dot product)"),
        ("Query length", f"{c.query_max_len} tokens (`query_max_len`)"),
        ("Passage length", f"{c.passage_max_len} tokens (`passage_max_len`)"),
        ("Query prefix", f"`{c.query_prefix!r}`" if c.query_prefix else "none"),
        ("Passage prefix", f"`{c.passage_prefix!r}`" if c.passage_prefix else "none"),
    ]


def _towers(model: Any) -> tuple[Any, Any]:  # (query tower, document tower)
    return model.query_encoder, model.doc_encoder


def _kind(tower: Any) -> str:
    """``BertModel`` for an ``HFEncoder``, else ``custom my_towers.BagOfWords``."""
    if isinstance(tower, HFEncoder):
        return f"`{type(tower.model).__name__}`"
    return f"custom `{type(tower).__module__}.{type(tower).__qualname__}`"


def _dualenc_usage(model: Any, name: str) -> str:
    custom = [_kind(t) for t in _towers(model) if not isinstance(t, HFEncoder)]
    needs = f"The module of the {custom[0]} tower must be importable (on `PYTHONPATH`)." if custom else ""
    code = [
        "import torch",
        "from dualenc.model import DualEncoder",
        "",
        f'model = DualEncoder.from_pretrained("{name}").eval()  # the path of this folder',
        f'queries = ["{_EXAMPLE_QUERY}"]',
        f'documents = ["{_EXAMPLE_DOC}"]',
        "with torch.no_grad():  # tokenize_* add the prefixes and truncate to the lengths above",
        "    query_embeddings = model.encode_queries(model.tokenize_queries(queries))",
        "    document_embeddings = model.encode_docs(model.tokenize_docs(documents))",
        "scores = query_embeddings @ document_embeddings.T",
    ]
    cli = [
        f"dualenc encode --model {name} --topics queries.tsv --output embeddings/queries",
        f"dualenc encode --model {name} --collection corpus.tsv --output embeddings/corpus",
    ]
    blocks = ["## Use it with dualenc", needs, _code("python", code)]
    blocks += ["Or encode files from the command line:", _code("bash", cli)]
    return "\n\n".join(block for block in blocks if block)


def _code(language: str, lines: list[str]) -> str:  # a fenced code block
    return f"```{language}\n" + "\n".join(lines) + "\n```"


def _st_usage(model: Any, name: str) -> str:
    c, head = model.config, "## Use it with sentence-transformers"
    custom = [_kind(t) for t in _towers(model) if not isinstance(t, HFEncoder)]
    if custom:
        return f"{head}\n\nsentence-transformers cannot load this folder: a tower is a {custom[0]} module."
    texts = [f'queries = ["{_EXAMPLE_QUERY}"]', f'documents = ["{_EXAMPLE_DOC}"]']
    code = ["from sentence_transformers import SentenceTransformer", "", *texts]
    if not c.shared:
        code += [
            f'query_model = SentenceTransformer("{name}/query")',
            f'document_model = SentenceTransformer("{name}/passage")',
            "query_embeddings = query_model.encode(queries)",
            "document_embeddings = document_model.encode(documents)",
            _ST_SCORES.format("query_model"),
        ]
        note = (
            "Each tower folder (`query/`, `passage/`) is a sentence-transformers folder with its own "
            f"`max_seq_length` ({c.query_max_len} and {c.passage_max_len} tokens) and its prefix as the "
            "default prompt, so it embeds as dualenc does; the top folder itself is not one."
        )
        return "\n\n".join([head, _code("python", code), note])
    q_prompt = ', prompt_name="query"' if c.query_prefix else ""
    d_prompt = ', prompt_name="document"' if c.passage_prefix else ""
    differ = c.query_max_len != c.passage_max_len
    code.append(f'model = SentenceTransformer("{name}")  # the path of this folder')
    if differ:
        code.append(f"model.max_seq_length = {c.query_max_len}  # query_max_len, for queries (see below)")
    code.append(f"query_embeddings = model.encode(queries{q_prompt})")
    if differ:
        code.append(f"model.max_seq_length = {c.passage_max_len}  # passage_max_len, this folder's setting")
    code += [f"document_embeddings = model.encode(documents{d_prompt})", _ST_SCORES.format("model")]
    blocks = [head, _code("python", code)]
    if c.query_prefix or c.passage_prefix:
        blocks.append(
            "The prefixes are the prompts `query` and `document` of `config_sentence_transformers.json`; "
            "pass `prompt_name` as above (`encode_query` / `encode_document` of sentence-transformers 5 and "
            "later pick them too)."
        )
    if differ:
        blocks.append(_length_caveat(c.query_max_len, c.passage_max_len))
    return "\n\n".join(blocks)


def _length_caveat(q_len: int, p_len: int) -> str:
    """The one difference from dualenc in sentence-transformers: a single ``max_seq_length``."""
    return (
        "### Queries: one `max_seq_length` in sentence-transformers\n\n"
        f"sentence-transformers has one `max_seq_length` for every input, and this folder sets it to {p_len} "
        "tokens (`passage_max_len`, in `sentence_bert_config.json`), while dualenc truncates queries to "
        f"{q_len} tokens (`query_max_len`; the prefix and the special tokens count). A query longer than "
        f"{min(q_len, p_len)} tokens therefore embeds differently there, unless `model.max_seq_length = "
        f"{q_len}` while queries are encoded (and {p_len} again for documents), as in the snippet above, or "
        f"you truncate queries yourself to {q_len} tokens. The difference is large: all-MiniLM-L6-v2 saved "
        "by dualenc with lengths 64 and 256 gave, for queries of 68 to 238 tokens, a cosine of 0.75 to 0.99 "
        "between the two embeddings (max-abs difference 0.10), and equal embeddings with `max_seq_length` "
        "set. dualenc does not write the `query_length` key of `sentence_bert_config.json` that "
        "sentence-transformers 6.2 applies in `encode_query`: sentence-transformers 3.x refuses to load a "
        "folder that has it."
    )
