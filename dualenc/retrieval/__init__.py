"""Retrieval: encode texts and collections, build, save and search FAISS indexes (or search embeddings
exactly), mine hard negatives. The layer above dualenc.model and dualenc.losses: it imports only dualenc.io
and dualenc.errors (models are passed in)."""

from dualenc.retrieval.encode import encode_texts, model_fingerprint
from dualenc.retrieval.encode_to_disk import encode_collection, encode_corpus
from dualenc.retrieval.index import IndexShard, build_index, search_shards, set_search_params
from dualenc.retrieval.index_dir import index_from_embeddings, load_index, save_index
from dualenc.retrieval.mine import mine_hard_negatives, write_groups
from dualenc.retrieval.search import index_kind, search_vectors
from dualenc.retrieval.topk import exact_search_torch

__all__ = [
    "IndexShard",
    "build_index",
    "encode_collection",
    "encode_corpus",
    "encode_texts",
    "exact_search_torch",
    "index_from_embeddings",
    "index_kind",
    "load_index",
    "mine_hard_negatives",
    "model_fingerprint",
    "save_index",
    "search_shards",
    "search_vectors",
    "set_search_params",
    "write_groups",
]
