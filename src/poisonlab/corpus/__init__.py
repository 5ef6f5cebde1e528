"""Corpus stage: document sources -> tokenizer -> token shards (see docs/corpus.md)."""

from poisonlab.corpus.builtin import builtin_documents, generate_document
from poisonlab.corpus.prepare import prepare
from poisonlab.corpus.shards import ShardWriter, TokenShard
from poisonlab.corpus.sources import iter_documents, split_eval
from poisonlab.corpus.tokenizer import (
    encode_batch,
    eos_id,
    load_tokenizer,
    load_tokenizer_file,
    tokenizer_hash,
    train_tokenizer,
)

__all__ = [
    "ShardWriter",
    "TokenShard",
    "builtin_documents",
    "encode_batch",
    "eos_id",
    "generate_document",
    "iter_documents",
    "load_tokenizer",
    "load_tokenizer_file",
    "prepare",
    "split_eval",
    "tokenizer_hash",
    "train_tokenizer",
]
