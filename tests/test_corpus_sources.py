"""Document sources: every format streams the same documents; splitting, dedup and the eval split."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonlab.corpus import sources
from poisonlab.corpus.builtin import builtin_documents
from poisonlab.corpus.sources import iter_documents, split_eval, split_text
from poisonlab.errors import UserError

TEXTS = ["First document.\n\nIt has two paragraphs.", "Second: ünïcödé, emoji 🎉 and\ttabs.", "Third."]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_hf_dataset(root: Path, texts: list[str], column: str = "text") -> Path:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC *stream* files + state.json."""
    root.mkdir(parents=True)
    table = pa.table({column: texts, "id": [f"r{i}" for i in range(len(texts))]})
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=7):
            writer.write_batch(batch)
    (root / "dataset_info.json").write_text(json.dumps({"features": {column: {"dtype": "string"}}}))
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                 "_split": "train"}))
    return root


def test_jsonl_with_custom_field_ids_and_nulls(tmp_path):
    recs = [{"id": "a", "body": TEXTS[0]}, {"body": TEXTS[1]}, {"body": None}, {"body": TEXTS[2], "x": 1}]
    path = write_jsonl(tmp_path / "c.jsonl", recs)
    docs = list(iter_documents(str(path), text_field="body"))
    assert [d["text"] for d in docs] == TEXTS
    assert docs[0]["id"] == "a" and docs[1]["id"] == "c.jsonl:2"


def test_parquet_in_batches(tmp_path):
    texts = [f"document number {i}\n\nbody {i}" for i in range(1500)]  # several record batches
    pq.write_table(pa.table({"content": texts}), tmp_path / "c.parquet", row_group_size=400)
    docs = list(iter_documents(str(tmp_path / "c.parquet"), text_field="content"))
    assert [d["text"] for d in docs] == texts
    assert docs[1000]["id"] == "c.parquet:1000"


def test_txt_folder_sorted_and_hidden_files_skipped(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text(TEXTS[1] + "\n")
    (tmp_path / "sub" / "a.txt").write_text("  " + TEXTS[0] + "\n\n")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "notes.bin").write_bytes(b"\xff")
    docs = list(iter_documents(str(tmp_path)))
    assert [(d["id"], d["text"]) for d in docs] == [("b.txt", TEXTS[1]), ("sub/a.txt", TEXTS[0])]


def test_hf_save_to_disk_and_dataset_dict(tmp_path):
    write_hf_dataset(tmp_path / "ds", TEXTS * 5)
    docs = list(iter_documents(str(tmp_path / "ds"), dedup=False))
    assert [d["text"] for d in docs] == TEXTS * 5 and docs[4]["id"] == "r4"
    write_hf_dataset(tmp_path / "dd" / "train", TEXTS)
    write_hf_dataset(tmp_path / "dd" / "test", ["not this"])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    assert [d["text"] for d in iter_documents(str(tmp_path / "dd"))] == TEXTS


def test_split_text_at_paragraphs():
    paras = [f"Paragraph {i} " + "word " * 30 for i in range(40)]
    text = "\n\n".join(paras)
    pieces = list(split_text(text, 500))
    assert all(len(p) <= 500 for p in pieces) and "".join(pieces) == text
    assert all(p.startswith("\n\nParagraph") for p in pieces[1:])  # cut exactly at paragraph breaks
    hard = list(split_text("x" * 1050, 500))
    assert [len(p) for p in hard] == [500, 500, 50]


def test_long_texts_become_documents_and_dedup(tmp_path):
    long = "\n\n".join(f"Part {i}. " + "lorem ipsum " * 20 for i in range(30))
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": long}, {"text": TEXTS[2]}, {"text": TEXTS[2]},
                                              {"text": "  " + TEXTS[2] + "\n"}])
    docs = list(iter_documents(str(path), max_doc_chars=1000))
    assert all(len(d["text"]) <= 1000 for d in docs)
    assert [d["id"] for d in docs[:2]] == ["c.jsonl:1#0", "c.jsonl:1#1"]
    assert sum(d["text"] == TEXTS[2] for d in docs) == 1  # exact duplicates (after strip) dropped
    kept = list(iter_documents(str(path), max_doc_chars=1000, dedup=False))
    assert sum(d["text"] == TEXTS[2] for d in kept) == 3


def test_enormous_single_line_txt_is_split_in_bounded_pieces(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("word " * 10_000_000)  # one 50 MB line
    n = 0
    for d in iter_documents(str(path), max_doc_chars=20_000, dedup=False):
        assert 15_000 <= len(d["text"]) <= 20_000 or d["id"].endswith(f"#{n}")
        n += 1
    assert n > 2400


def test_eval_split_is_deterministic_disjoint_and_spread():
    docs = list(itertools.islice(builtin_documents(0), 300))
    ev1, tr1 = split_eval(iter(docs), 20, window=200)
    ev2, tr2 = split_eval(iter(docs), 20, window=200)
    tr1, tr2 = list(tr1), list(tr2)
    assert ev1 == ev2 and tr1 == tr2 and len(ev1) == 20 and len(tr1) == 280
    assert {d["id"] for d in ev1}.isdisjoint(d["id"] for d in tr1)
    idx = sorted(int(d["id"].rsplit("-", 1)[1]) for d in ev1)
    assert idx[-1] > 100 and idx != list(range(20))  # not simply the first documents
    few, rest = split_eval(iter(docs[:30]), 20)  # a small corpus keeps most of itself for training
    assert len(few) == 3 and len(list(rest)) == 27


def test_debian_docs_reads_rst_sources_and_skips_translations(tmp_path, monkeypatch):
    py, lx = tmp_path / "python3.11/html/_sources", tmp_path / "linux-doc-6.1/html/_sources"
    (py / "library").mkdir(parents=True)
    (lx / "translations/zh_CN").mkdir(parents=True)
    (py / "library" / "os.rst.txt").write_text(":mod:`os` --- Miscellaneous interfaces\n\nText.")
    (lx / "index.rst.txt").write_text("The Linux Kernel documentation\n\nMore.")
    (lx / "translations/zh_CN/index.rst.txt").write_text("中文")
    monkeypatch.setattr(sources, "DEBIAN_DOC_ROOTS", {"python3.11-doc": py, "linux-doc-6.1": lx})
    docs = list(iter_documents("debian-docs"))
    assert len(docs) == 2 and docs[0]["text"].startswith(":mod:`os`")
    monkeypatch.setattr(sources, "DEBIAN_DOC_ROOTS", {"python3.11-doc": tmp_path / "nope"})
    with pytest.raises(UserError, match="apt-get install python3.11-doc linux-doc-6.1"):
        list(iter_documents("debian-docs"))
