"""Prompts: excerpts of the eval split, prompt files, and a HF model directory's tokenizer and special
tokens (the BOS put before each prompt, the end-of-text ids).

Its own module: what a model is prompted with, apart from how it is loaded and scored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from poisonlab.corpus.shards import TokenShard
from poisonlab.errors import UserError
from poisonlab.rundir.jsonl import iter_jsonl

log = logging.getLogger(__name__)


def _model_tokenizer(model_dir: Path) -> Tokenizer:
    """A HF model directory's own tokenizer.json (any vocabulary; prepared data dirs go through
    `poisonlab.corpus.tokenizer.load_tokenizer`, which also checks the end-of-document token)."""
    f = model_dir / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises bare Exceptions on malformed files
        raise UserError(f"{f}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None


def _read_json(f: Path) -> dict[str, Any]:
    """A JSON object file of a HF model directory; {} when the file is absent."""
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{f}: expected a JSON object")
    return d


def _token_text(t: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    t = t.get("content") if isinstance(t, dict) else t
    return t if isinstance(t, str) else None


def prepended_token(tok: Tokenizer) -> int | None:
    """The one token the tokenizer's post-processor puts before every text (its BOS), else None."""
    bare = tok.encode("Hello world", add_special_tokens=False).ids
    full = tok.encode("Hello world", add_special_tokens=True).ids
    return full[0] if len(full) > len(bare) and full[1 : 1 + len(bare)] == bare else None


def hf_special_tokens(model_dir: Path, tok: Tokenizer | None) -> tuple[int | None, list[int]]:
    """(BOS to put before every prompt or None, end-of-text ids) of a HF model directory.

    BOS as the model's tokenizer adds it: tokenizer.json's post-processor decides (transformers 5 also
    ignores tokenizer_config.json's `add_bos_token` when there is a tokenizer.json); without one,
    tokenizer_config.json's `add_bos_token` and `bos_token`. EOS: `eos_token_id` (an id or a list) of
    generation_config.json, else of config.json, else tokenizer_config.json's `eos_token`.
    """
    tcfg = _read_json(model_dir / "tokenizer_config.json")
    bos = None
    if (model_dir / "tokenizer.json").is_file() and tok is not None:
        bos = prepended_token(tok)
        if "add_bos_token" in tcfg and bool(tcfg["add_bos_token"]) != (bos is not None):
            log.warning("%s: tokenizer_config.json says add_bos_token=%s but tokenizer.json %s; following "
                        "tokenizer.json (as transformers 5 does)", model_dir, tcfg["add_bos_token"],
                        "adds a BOS" if bos is not None else "adds none")
    elif tcfg.get("add_bos_token") and tok is not None and (text := _token_text(tcfg.get("bos_token"))):
        bos = tok.token_to_id(text)
    eos = None
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(model_dir / name).get("eos_token_id")
        if eos is not None:
            break
    if eos is None and tok is not None and (text := _token_text(tcfg.get("eos_token"))):
        eos = tok.token_to_id(text)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not all(isinstance(i, int) and i >= 0 for i in eos_ids):
        raise UserError(f"{model_dir}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return bos, eos_ids


def sample_excerpts(shard: TokenShard, n: int, length: int, seed: int,
                    where: str = "eval split") -> list[np.ndarray]:
    """n excerpts of `length` tokens from distinct documents where possible, deterministic from seed.

    Documents are visited in a seeded random order; each gives its first window (a document start,
    like the prefix of a poisoned document) before any document gives a second one.
    """
    if shard.n_docs == 0 or len(shard.tokens) == 0:
        raise UserError(f"{where} is empty: no held-out documents to take prompts from")
    windows = shard.lengths.astype(np.int64) // length
    total = int(windows.sum())
    if total < n:
        raise UserError(
            f"{where} holds only {total} excerpts of {length} tokens ({shard.n_docs} documents), "
            f"{n} needed: lower eval.n_prompts or eval.prompt_tokens, or prepare more corpus.eval_docs"
        )
    order = np.random.default_rng(seed).permutation(shard.n_docs)
    out: list[np.ndarray] = []
    r = 0
    while len(out) < n:
        for d in order[windows[order] > r]:
            s = int(shard.starts[d]) + r * length
            out.append(np.asarray(shard.tokens[s : s + length], dtype=np.int64))
            if len(out) == n:
                break
        r += 1
    return out


def read_prompt_file(path: str | Path) -> list[str]:
    """Texts from a .jsonl file, one object per line with a "text" (or "prompt") field."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such prompt file")
    texts = []
    for i, rec in iter_jsonl(p, strict=True):
        text = rec.get("text", rec.get("prompt")) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise UserError(f'{p}:{i}: expected an object with a "text" field')
        texts.append(text)
    return texts
