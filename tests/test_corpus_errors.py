"""Bad input to `poisonlab prepare`: exit 2, one line naming the file and the problem, no traceback,
and no output directory (or temporary) left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonlab.cli import main


def run_bad(args: list[str], out: Path, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--out", str(out), "--vocab-size", "300", "--eval-docs", "1", "--no-progress",
              *args])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert e.value.code == 2
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporaries
    return err


def jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


GOOD = json.dumps({"text": "A fine document with some words in it."}).encode()


@pytest.mark.parametrize(
    ("name", "make", "expect"),
    [
        ("empty.jsonl", lambda p: jsonl(p, []), "empty corpus"),
        ("blank.jsonl", lambda p: jsonl(p, [b"", json.dumps({"text": "   "}).encode()]), "empty corpus"),
        ("utf8.jsonl", lambda p: jsonl(p, [GOOD, b'{"text": "caf\xe9"}']), "not valid UTF-8 at line 2"),
        ("bad.jsonl", lambda p: jsonl(p, [GOOD, GOOD, b'{"text": "x"']), "line 3 is not valid JSON"),
        ("field.jsonl", lambda p: jsonl(p, [b'{"body": "x"}']), "line 1 has no field 'text'"),
        ("type.jsonl", lambda p: jsonl(p, [b'{"text": 5}']), "field 'text' is int"),
        ("array.jsonl", lambda p: jsonl(p, [b"[1, 2]"]), "line 1 is not a JSON object"),
        ("huge.jsonl", lambda p: jsonl(p, [b'{"text": "' + b"a" * (50 << 20) + b'"}']), "longer than 32 MiB"),
        ("col.parquet", lambda p: pq.write_table(pa.table({"body": ["x"]}), p), "no column 'text'"),
        ("int.parquet", lambda p: pq.write_table(pa.table({"text": [1, 2]}), p), "not string"),
        ("junk.parquet", lambda p: p.write_bytes(b"not parquet at all"), "not a readable Parquet file"),
        ("nulls.parquet", lambda p: pq.write_table(pa.table({"text": pa.array([None], pa.string())}), p),
         "empty corpus"),
        ("data.csv", lambda p: p.write_text("text\nx\n"), "unknown file type"),
        ("missing.jsonl", lambda p: None, "no such file or folder"),
    ],
)
def test_bad_files(name, make, expect, tmp_path, capsys):
    path = tmp_path / name
    make(path)
    err = run_bad(["--corpus", str(path)], tmp_path / "out", capsys)
    assert str(path) in err or name in err
    assert expect in err


def test_bad_text_files_and_folders(tmp_path, capsys):
    folder = tmp_path / "txts"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"fine text\n" * 3 + b"bad \xff byte\n")
    err = run_bad(["--corpus", str(folder)], tmp_path / "out", capsys)
    assert "a.txt: not valid UTF-8 at line 4 (byte offset 34)" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no .txt" in run_bad(["--corpus", str(empty)], tmp_path / "out", capsys)
    (empty / "blank.txt").write_text("\n\n  \n")
    assert "empty corpus" in run_bad(["--corpus", str(empty)], tmp_path / "out", capsys)


def test_unreadable_file(tmp_path, capsys, monkeypatch):
    path = jsonl(tmp_path / "c.jsonl", [GOOD])
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the permission check fail as it would for a user
        from poisonlab.corpus import sources

        monkeypatch.setattr(sources.os, "access", lambda *a, **k: False)
    assert "c.jsonl: file is not readable" in run_bad(["--corpus", str(path)], tmp_path / "out", capsys)


def test_bad_hf_dataset(tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset_info.json").write_text("{}")
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    assert "data.arrow: listed in" in run_bad(["--corpus", str(ds)], tmp_path / "out", capsys)
    (ds / "data.arrow").write_bytes(b"garbage")
    assert "data.arrow: not an Arrow file" in run_bad(["--corpus", str(ds)], tmp_path / "out", capsys)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--vocab-size", "100"], "vocab_size"),
        (["--eval-docs", "0"], "eval_docs"),
        (["--max-doc-chars", "10"], "max_doc_chars"),
        (["--max-tokens", "-5"], "max_tokens"),
        (["--max-tokens", "0"], "unbounded"),
    ],
)
def test_out_of_range_settings(args, expect, tmp_path, capsys):
    err = run_bad(args, tmp_path / "out", capsys)
    assert expect in err


def test_bad_tokenizer_and_out(tmp_path, capsys):
    src = jsonl(tmp_path / "c.jsonl", [GOOD])
    tok = tmp_path / "tok.json"
    tok.write_text("{not json")
    assert "tok.json: not a valid tokenizer.json" in run_bad(
        ["--corpus", str(src), "--tokenizer", str(tok)], tmp_path / "out", capsys)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tok))
    assert "no end-of-document token" in run_bad(["--corpus", str(src), "--tokenizer", str(tok)],
                                                 tmp_path / "out", capsys)
    # An existing folder that prepare did not write is never replaced.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--corpus", str(src), "--out", str(other), "--no-progress"])
    assert e.value.code == 2 and (other / "keep.txt").read_text() == "precious"
    assert "not a directory written by" in capsys.readouterr().err


def test_error_while_tokenizing_in_the_background_leaves_nothing(tmp_path):
    """A bad line far into the file is met by the prefetch thread; the error still surfaces cleanly."""
    from poisonlab.config import CorpusConfig
    from poisonlab.corpus.prepare import prepare
    from poisonlab.errors import UserError

    lines = [json.dumps({"text": f"Document {i} has a few words."}).encode() for i in range(3000)]
    path = jsonl(tmp_path / "c.jsonl", [*lines, b"{oops"])
    cfg = CorpusConfig(source=str(path), vocab_size=300, max_tokens=None, eval_docs=2,
                       tokenizer_sample_chars=2000)
    with pytest.raises(UserError, match="line 3001 is not valid JSON"):
        prepare(cfg, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
