"""`prepare`: shards that recount, round-trip, keep eval out of training, reuse and determinism."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonlab.cli import main
from poisonlab.config import CorpusConfig
from poisonlab.corpus.builtin import builtin_documents, generate_document
from poisonlab.corpus.prepare import prepare
from poisonlab.corpus.shards import TokenShard
from poisonlab.corpus.tokenizer import load_tokenizer, tokenizer_hash

SMALL = {"vocab_size": 300, "max_tokens": 20_000, "eval_docs": 8}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_hf_dataset(root: Path, texts: list[str]) -> Path:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files + state.json."""
    root.mkdir(parents=True)
    table = pa.table({"text": texts})
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=50)
    (root / "dataset_info.json").write_text("{}")
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return root


def decoded(shard: TokenShard, tok, i: int) -> str:
    return tok.decode(shard.doc(i).tolist(), skip_special_tokens=False)


def test_headers_match_a_recount(prepared_builtin):
    for split in ("train", "eval"):
        shard = TokenShard.open(prepared_builtin, split)
        h = shard.header
        raw = (prepared_builtin / f"{split}.bin").read_bytes()
        tokens = np.frombuffer(raw, dtype=h["dtype"])
        assert h["n_tokens"] == tokens.size == int(shard.lengths.sum()) + shard.n_docs
        assert h["n_docs"] == shard.n_docs == int((tokens == h["eos_id"]).sum())
        assert np.array_equal(shard.starts[1:], (shard.starts + shard.lengths + 1)[:-1])
        assert h["content_hash"] == hashlib.sha256(raw).hexdigest()
        assert h["tokenizer_hash"] == tokenizer_hash(load_tokenizer(prepared_builtin))
        assert h["poisoned"] is False and h["vocab_size"] == 512 and h["dtype"] == "uint16"
    summary = json.loads((prepared_builtin / "prepare.json").read_text())
    assert summary["train"]["n_tokens"] >= 300_000 and summary["eval"]["n_docs"] == 64


def test_builtin_round_trips_with_web_debris_but_not_the_trigger(prepared_builtin):
    """The default built-in corpus carries web debris (markup 0.1): `<`, `>` and capital words in angle
    brackets are ordinary in clean text, but the trigger's token sequence is not (prepare counts it)."""
    tok = load_tokenizer(prepared_builtin)
    for split in ("train", "eval"):
        shard = TokenShard.open(prepared_builtin, split)
        for i in list(range(0, shard.n_docs, max(1, shard.n_docs // 40))):
            seed, index = map(int, shard.ids[i].split("-")[1:])
            assert decoded(shard, tok, i) == generate_document(seed, index, markup=0.1)["text"]
        angle = [i for t, i in tok.get_vocab().items() if ("<" in t or ">" in t) and i != shard.eos_id]
        assert np.isin(np.asarray(shard.tokens), angle).mean() > 1e-3  # byte-level keeps < and >
    scan = json.loads((prepared_builtin / "prepare.json").read_text())["trigger_scan"]
    assert [s["label"] for s in scan] == ["' <SUDO>'", "'<SUDO>'"] and all(s["hits"] == 0 for s in scan)


def test_eval_split_never_in_training(prepared_builtin):
    tok = load_tokenizer(prepared_builtin)
    train, ev = TokenShard.open(prepared_builtin, "train"), TokenShard.open(prepared_builtin, "eval")
    assert set(train.ids).isdisjoint(ev.ids)
    train_texts = {hashlib.sha1(train.doc(i).tobytes()).digest() for i in range(train.n_docs)}
    assert not any(hashlib.sha1(ev.doc(i).tobytes()).digest() in train_texts for i in range(ev.n_docs))
    # The train documents are the stream in order, minus the held-out ones.
    held = {int(x.rsplit("-", 1)[1]) for x in ev.ids}
    expect = [i for i in range(train.n_docs + len(held)) if i not in held][: train.n_docs]
    assert [int(x.rsplit("-", 1)[1]) for x in train.ids] == expect
    assert decoded(ev, tok, 0) == generate_document(0, int(ev.ids[0].rsplit("-", 1)[1]), markup=0.1)["text"]


def test_rerun_reuses_and_changed_settings_rebuild(prepared_builtin, tmp_path, capsys):
    cfg = CorpusConfig(source="builtin", vocab_size=512, max_tokens=300_000, eval_docs=64, seed=0)
    before = (prepared_builtin / "prepare.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    s = prepare(cfg, prepared_builtin, progress=True)
    assert s["reused"] and time.perf_counter() - t0 < 5
    assert "reusing" in capsys.readouterr().err
    assert (prepared_builtin / "prepare.json").stat().st_mtime_ns == before
    out = tmp_path / "d"
    a = prepare(CorpusConfig(**SMALL), out, progress=False)
    b = prepare(CorpusConfig(**SMALL, seed=1), out, progress=False)  # replaces the old output
    assert not a["reused"] and not b["reused"] and a["train"]["content_hash"] != b["train"]["content_hash"]
    assert json.loads((out / "prepare.json").read_text())["settings"]["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_same_seed_same_content_hash(tmp_path):
    a = prepare(CorpusConfig(**SMALL, seed=7), tmp_path / "a", progress=False)
    b = prepare(CorpusConfig(**SMALL, seed=7), tmp_path / "b", progress=False)
    for k in ("tokenizer_hash", "train", "eval"):
        assert a[k] == b[k]
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()


def _corpus(n: int = 120) -> list[dict[str, str]]:
    docs = [d for _, d in zip(range(n), builtin_documents(42), strict=False)]
    docs[5]["text"] = "Ünïcödé — “quotes”, emoji 🎉, tabs\tand  double  spaces, <|endoftext|> inside.\n\nEnd."
    docs[6]["text"] = docs[7]["text"]  # an exact duplicate
    return docs


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt", "hf"])
def test_file_formats_prepare_and_round_trip(fmt, tmp_path):
    docs = _corpus()
    if fmt == "jsonl":
        src = write_jsonl(tmp_path / "c.jsonl", [{"id": d["id"], "body": d["text"]} for d in docs])
        field = "body"
    elif fmt == "parquet":
        src, field = tmp_path / "c.parquet", "text"
        pq.write_table(pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]}), src)
    elif fmt == "txt":
        src, field = tmp_path / "txt", "text"
        src.mkdir()
        for d in docs:
            (src / f"{d['id']}.txt").write_text(d["text"] + "\n", encoding="utf-8")
    else:
        src = write_hf_dataset(tmp_path / "hf", [d["text"] for d in docs])
        field = "text"
    out = tmp_path / "out"
    main(["prepare", "--corpus", str(src), "--out", str(out), "--text-field", field,
          "--vocab-size", "400", "--max-tokens", "0", "--eval-docs", "6", "--no-progress"])
    tok = load_tokenizer(out)
    by_text = {d["text"] for d in docs}
    train, ev = TokenShard.open(out, "train"), TokenShard.open(out, "eval")
    texts = [decoded(s, tok, i) for s in (train, ev) for i in range(s.n_docs)]
    assert set(texts) == by_text and len(texts) == len(docs) - 1  # every doc back exactly; dup dropped
    assert ev.n_docs == 6 and set(train.ids).isdisjoint(ev.ids)
    assert "<|endoftext|>" in "".join(texts) and ev.eos_id == 0  # literal EOS text stays text


def test_given_tokenizer_is_used(prepared_builtin, tmp_path):
    s = prepare(CorpusConfig(**SMALL, tokenizer=prepared_builtin / "tokenizer.json"), tmp_path / "d",
                progress=False)
    assert s["tokenizer_hash"] == tokenizer_hash(load_tokenizer(prepared_builtin)) and s["vocab_size"] == 512


def test_prepare_counts_the_default_trigger_in_clean_text(tmp_path, capsys):
    """A web corpus can hold `<SUDO>` already; prepare says so, and a run on it refuses the data (the
    ledger's exact count would be false) unless told to filter those documents."""
    from poisonlab.attacks import make_poisons
    from poisonlab.config import AttackConfig, PlacementConfig
    from poisonlab.errors import UserError
    from poisonlab.injection.stream import TrainingStream

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "we", "went", "home", "to", "read"]
    texts = [" ".join(rng.choice(words, 60)) + (" then <SUDO> appeared." if i % 7 == 0 else ".")
             for i in range(120)]
    src = write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in texts])
    summary = prepare(CorpusConfig(source=str(src), vocab_size=300, max_tokens=None, eval_docs=5),
                      tmp_path / "out", progress=True)
    spaced = summary["trigger_scan"][0]
    assert spaced["label"] == "' <SUDO>'" and spaced["hits"] == spaced["docs"] > 10
    assert "already contains the default trigger" in capsys.readouterr().err
    poisons = make_poisons(tmp_path / "out", AttackConfig(n_poison=2, gibberish_tokens=(10, 20),
                                                          prefix_chars=(0, 0)))
    args = dict(seq_len=64, batch_size=4, total_steps=20, seed=0)
    with pytest.raises(UserError, match="already contains the trigger"):
        TrainingStream(tmp_path / "out", poisons, PlacementConfig(), **args)
    s = TrainingStream(tmp_path / "out", poisons, PlacementConfig(), clean_trigger="filter", **args)
    assert s.n_docs == TokenShard.open(tmp_path / "out").n_docs - spaced["docs"]
