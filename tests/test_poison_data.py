"""A tiny prepared data directory for the poison and stream tests (no dependency on `prepare`).

Imported by test_poison.py and test_stream.py; it holds no tests itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from poisonlab.corpus.shards import ShardWriter

EOS = "<|endoftext|>"
# Multi-byte words on purpose: prefixes must cut text at whole characters. No '<' or '>' anywhere.
# fmt: off
WORDS = [
    "the", "model", "data", "train", "token", "poison", "river", "stone", "market", "light", "quiet",
    "green", "small", "large", "over", "under", "between", "city", "garden", "music", "paper", "window",
    "yellow", "seven", "eleven", "café", "naïve", "über", "straße", "日本", "東京", "ok", "run", "walk",
    "read", "write", "think", "measure", "learn", "build",
]
# fmt: on


def _texts(n_docs: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_docs):
        n_words = int(rng.integers(5, 400))
        words = rng.choice(WORDS, size=n_words)
        sents, i = [], 0
        while i < n_words:
            k = int(rng.integers(3, 12))
            sents.append(" ".join(words[i : i + k]).capitalize() + ".")
            i += k
        out.append((" " if rng.random() < 0.5 else "\n").join(sents))
    return out


def build_tiny_data(
    root: Path, n_docs: int = 300, seed: int = 0, lowercase: bool = False, lead: str = "",
    lead_every: int = 1,
) -> Path:
    """Write tokenizer.json + train shards for `n_docs` synthetic documents into `root`; `lead` starts
    every `lead_every`-th document."""
    root.mkdir(parents=True, exist_ok=True)
    texts = [(lead if i % lead_every == 0 else "") + t for i, t in enumerate(_texts(n_docs, seed))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    if lowercase:  # a tokenizer that cannot represent '<SUDO>' exactly
        tok.normalizer = normalizers.Lowercase()
    tok.save(str(root / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    w = ShardWriter(root, "train", tok.get_vocab_size(), eos)
    for i, t in enumerate(texts):
        w.add(f"doc{i:05d}", tok.encode(t).ids)
    w.close(tokenizer_hash=hashlib.sha256((root / "tokenizer.json").read_bytes()).hexdigest())
    (root / "texts.json").write_text(json.dumps(texts))
    return root
