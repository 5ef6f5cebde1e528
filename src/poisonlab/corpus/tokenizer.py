"""Tokenizers: train a byte-level BPE with HF `tokenizers`, or load any `tokenizer.json`.

Byte-level BPE covers every string, and with the ByteLevel pre-tokenizer and decoder (no prefix
space, no normalizer) `decode(encode(text)) == text` exactly. The end-of-document token
`<|endoftext|>` is special (id 0 in a trained tokenizer) and separates documents in the shards. A
literal "<|endoftext|>" inside a document is encoded as plain text, never as the special token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from poisonlab.errors import UserError
from poisonlab.fsutil import recover

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")
EOS_TOKEN = EOS_CANDIDATES[0]
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (256 bytes + EOS + merges) on `texts`."""
    if vocab_size < 258:
        raise UserError(f"vocab_size: must be at least 258 (256 bytes + EOS + 1 merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document stays text
    return tok


def eos_id(tok: Tokenizer, where: str = "tokenizer") -> int:
    """The end-of-document token id: the first of `<|endoftext|>`, `</s>`, `<eos>` the vocab has."""
    for name in EOS_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    raise UserError(f"{where}: no end-of-document token (expected one of {', '.join(EOS_CANDIDATES)})")


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json`; UserError if it is missing, invalid or has no end-of-document token."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for any parse error
        raise UserError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None
    eos_id(tok, str(path))
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer of a directory written by `poisonlab prepare`."""
    recover(data_dir)  # a replacement of the directory cut short by a crash (fsutil)
    return load_tokenizer_file(Path(data_dir) / TOKENIZER_FILE)


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: equal for equal tokenizers, wherever they are saved."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many documents, encoded in parallel by the Rust side (no special tokens added)."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (>= 0.20) skips offsets
    encs = encode(texts, add_special_tokens=False)
    return [e.ids for e in encs]
