"""Corpora -> packed token shards, and the batches training reads from them."""

from .prepare import iter_documents, prepare_corpus, stdlib_documents
from .shards import PackedShards

__all__ = ["PackedShards", "iter_documents", "prepare_corpus", "stdlib_documents"]
