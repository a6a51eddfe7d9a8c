"""Training batches: draw each query's documents (:class:`GroupDataset`), tokenize (:class:`TrainCollator`).

A batch of B queries with G documents each becomes ``{"query": (B, Lq), "doc": (B*G, Ld), "doc_idx": (B*G,),
"positives": (B, P_max)}``; documents are corpus rows of a :class:`~dualenc.training.data.TrainData`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dualenc.errors import InputError
from dualenc.io.readers import doc_texts
from dualenc.model.encoder import tokenize_texts
from dualenc.training.data import TrainData

if TYPE_CHECKING:
    import datasets

    from dualenc.model.encoder import DualEncoder

logger = logging.getLogger(__name__)


class GroupDataset(torch.utils.data.Dataset):
    """One item per query group: a positive and negatives drawn deterministically from (seed, epoch, idx).

    Each item holds ``group_size`` documents: one positive, drawn uniformly among the query's positives, then
    ``group_size - 1`` negatives, drawn uniformly without replacement when the group has enough, with
    replacement otherwise (logged once). The draw uses ``numpy.random.default_rng([seed, epoch, idx])`` only,
    so it ignores the global RNG state and a resumed run draws the same documents. Call :meth:`set_epoch` each
    epoch (with persistent DataLoader workers the workers keep their own copy: recreate them instead).

    Args:
        data: the training data.
        group_size: documents per query, G = 1 positive + (G - 1) negatives (Tevatron's ``train_group_size``).
        seed: non-negative seed.

    Raises:
        InputError: ``group_size < 1``, a negative seed, or G > 1 and a group without negatives.
    """

    def __init__(self, data: TrainData, group_size: int, *, seed: int = 0):
        if group_size < 1:
            raise InputError(f"train_group_size must be >= 1, got {group_size}")
        if seed < 0:
            raise InputError(f"seed must be >= 0, got {seed}")
        self.groups = data.groups.with_format(None)
        self.group_size, self.seed, self.epoch = group_size, seed, 0
        if group_size > 1:
            table = self.groups.with_format("arrow")[:]
            import pyarrow.compute as pc

            num_neg = pc.list_value_length(table.column("negatives")).to_numpy()  # (N,)
            empty = np.flatnonzero(num_neg == 0)
            if len(empty):
                query_id = table.column("query_id")[int(empty[0])].as_py()
                raise InputError(
                    f"query id {query_id!r} (and {len(empty) - 1} more queries) has no negatives, but "
                    f"train_group_size={group_size} needs {group_size - 1} per query: use train_group_size=1 "
                    "(in-batch / cache negatives only) or mine hard negatives with `dualenc mine`"
                )
            num_short = int((num_neg < group_size - 1).sum())
            if num_short:
                logger.warning(
                    "%d of %d query groups have fewer than %d negatives: theirs are drawn with replacement",
                    num_short,
                    len(num_neg),
                    group_size - 1,
                )

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch`` (>= 0)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """``{"query": str, "doc_idx": [positive, *negatives] (len G), "positives": all positive rows}``."""
        group = self.groups[int(idx)]
        positives, negatives = group["positives"], group["negatives"]
        rng = np.random.default_rng([self.seed, self.epoch, int(idx)])
        doc_idx = [positives[int(rng.integers(len(positives)))]]
        num_neg = self.group_size - 1
        if num_neg:
            picks = rng.choice(len(negatives), size=num_neg, replace=len(negatives) < num_neg)  # (G - 1,)
            doc_idx += [negatives[int(i)] for i in picks]
        return {"query": group["query"], "doc_idx": doc_idx, "positives": list(positives)}


class TrainCollator:
    """Batch of :class:`GroupDataset` items -> tokenized queries and documents plus row indices.

    Keeps the model's tokenizers and config, not the model: a DataLoader worker that receives the collator
    by pickling (the ``spawn`` start method) then copies no weights.

    Args:
        model: a :class:`dualenc.model.encoder.DualEncoder`; its ``tokenizer``, ``doc_tokenizer`` and
            ``config`` are kept, so batches are tokenized as its ``tokenize_queries`` and ``tokenize_docs``
            do.
        corpus: the corpus of the :class:`TrainData`.

    Returns (from ``__call__``):
        ``{"query": BatchEncoding (B, Lq), "doc": BatchEncoding (B*G, Ld), "doc_idx": LongTensor (B*G,),
        "positives": LongTensor (B, P_max) padded with -1}``. Query ``i``'s documents are rows
        ``i*G .. i*G+G-1`` of ``doc``, its positive first. Document text is ``doc_texts`` of the rows.
    """

    def __init__(self, model: DualEncoder, corpus: datasets.Dataset):
        self.tokenizer, self.doc_tokenizer, self.config = model.tokenizer, model.doc_tokenizer, model.config
        self.corpus = corpus.with_format(None)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("empty batch")
        group_size = len(items[0]["doc_idx"])
        if any(len(item["doc_idx"]) != group_size for item in items):
            raise ValueError("every item of a batch needs the same number of documents")
        doc_idx = [int(row) for item in items for row in item["doc_idx"]]  # (B*G,)
        docs = self.corpus[doc_idx]  # one batched Arrow take
        texts = doc_texts(docs)
        num_pos = max(len(item["positives"]) for item in items)
        positives = torch.full((len(items), num_pos), -1, dtype=torch.long)  # (B, P_max)
        for i, item in enumerate(items):
            positives[i, : len(item["positives"])] = torch.as_tensor(item["positives"], dtype=torch.long)
        cfg, queries = self.config, [item["query"] for item in items]
        return {
            "query": tokenize_texts(self.tokenizer, queries, cfg.query_prefix, cfg.query_max_len),  # (B, Lq)
            "doc": tokenize_texts(
                self.doc_tokenizer, texts, cfg.passage_prefix, cfg.passage_max_len
            ),  # (B*G, Ld)
            "doc_idx": torch.tensor(doc_idx, dtype=torch.long),  # (B*G,)
            "positives": positives,
        }
