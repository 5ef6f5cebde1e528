"""Byte-level BPE: exact round trip, the end-of-document token, loading other tokenizers, the hash."""

from __future__ import annotations

import itertools

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from poisonlab.corpus.builtin import builtin_documents
from poisonlab.corpus.tokenizer import (
    encode_batch,
    eos_id,
    load_tokenizer,
    load_tokenizer_file,
    tokenizer_hash,
    train_tokenizer,
)
from poisonlab.errors import UserError

TRICKY = [
    "plain text",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n and \u00a0nbsp",
    "Ünïcödé, 中文, العربية, emoji 🎉👩‍👩‍👧, combining e\u0301",
    "<SUDO> trigger and a literal <|endoftext|> in the text",
    "\x00\x01 control bytes \x7f",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [d["text"] for d in itertools.islice(builtin_documents(0), 200)]
    return train_tokenizer(texts, 400)


def test_round_trip_exact(tok):
    for s in TRICKY:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == s
    assert [tok.decode(x) for x in encode_batch(tok, TRICKY)] == TRICKY


def test_eos_is_special_and_never_comes_from_text(tok):
    assert tok.get_vocab_size() == 400 and eos_id(tok) == 0
    assert 0 not in encode_batch(tok, ["a literal <|endoftext|> stays text"])[0]


def test_hash_is_stable_across_save_and_load(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert tokenizer_hash(loaded) == tokenizer_hash(tok)
    assert encode_batch(loaded, TRICKY) == encode_batch(tok, TRICKY)
    other = train_tokenizer([d["text"] for d in itertools.islice(builtin_documents(1), 200)], 400)
    assert tokenizer_hash(other) != tokenizer_hash(tok)


@pytest.mark.parametrize("eos", ["</s>", "<eos>"])
def test_other_eos_names_are_accepted(eos, tmp_path):
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([eos])
    t.save(str(tmp_path / "t.json"))
    assert eos_id(load_tokenizer_file(tmp_path / "t.json")) == 0


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="no such tokenizer file"):
        load_tokenizer_file(tmp_path / "missing.json")
    (tmp_path / "t.json").write_text('{"version": "1.0"}')
    with pytest.raises(UserError, match="t.json: not a valid tokenizer.json"):
        load_tokenizer_file(tmp_path / "t.json")
    with pytest.raises(UserError, match="at least 258"):
        train_tokenizer(["x"], 100)
