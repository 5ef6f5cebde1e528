"""`prepare --workers`: many input files tokenized side by side give the one-process output byte for
byte (documents, order, dedup across files, the token budget), read as one stream, and resume."""

from __future__ import annotations

import json
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonlab.cli import main
from poisonlab.config import CorpusConfig, PlacementConfig
from poisonlab.corpus import parallel
from poisonlab.corpus.builtin import builtin_documents
from poisonlab.corpus.prepare import prepare
from poisonlab.corpus.shards import ConcatTokens, TokenShard
from poisonlab.injection.stream import TrainingStream


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FineWeb-like folder: Parquet files with id and other columns, JSON Lines beside them, and
    documents repeated within a file and across files."""
    src = tmp_path_factory.mktemp("parallel") / "corpus"
    (src / "sub").mkdir(parents=True)
    texts = [d["text"] for _, d in zip(range(900), builtin_documents(3, markup=0.1), strict=False)]
    rng = random.Random(0)
    for i in range(6):
        chunk = texts[i * 150 : (i + 1) * 150] + rng.sample(texts[:600], 12)
        if i % 2:
            ids = [f"doc-{i}-{j}" for j in range(len(chunk))]
            pq.write_table(pa.table({"id": ids, "text": chunk, "url": ["u"] * len(chunk)}),
                           src / "sub" / f"{i:03d}.parquet", row_group_size=40)
        else:
            (src / f"{i:03d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
    return src


def _cfg(src: Path, **kw) -> CorpusConfig:
    return CorpusConfig(source=str(src), vocab_size=300, eval_docs=16, **({"max_tokens": None} | kw))


def _same(a: Path, b: Path) -> None:
    sa, sb = TokenShard.open(a), TokenShard.open(b)
    assert sa.header["content_hash"] == sb.header["content_hash"]
    assert list(sa.ids) == list(sb.ids)
    assert np.array_equal(sa.starts, sb.starts) and np.array_equal(sa.lengths, sb.lengths)
    assert np.array_equal(np.asarray(sa.tokens[:]), np.asarray(sb.tokens[:]))
    for split in ("eval",):
        assert (a / f"{split}.bin").read_bytes() == (b / f"{split}.bin").read_bytes()
    pa_, pb = json.loads((a / "prepare.json").read_text()), json.loads((b / "prepare.json").read_text())
    assert pa_["train"] == pb["train"] and pa_["key"] == pb["key"]


@pytest.mark.parametrize("limits", [{}, {"max_tokens": 250_000}, {"max_docs": 400}, {"dedup": False}],
                         ids=["all", "max_tokens", "max_docs", "no_dedup"])
def test_workers_write_the_one_process_output(corpus: Path, tmp_path: Path, limits: dict) -> None:
    one = prepare(_cfg(corpus, **limits), tmp_path / "one", progress=False)
    many = prepare(_cfg(corpus, **limits), tmp_path / "many", progress=False, workers=3)
    _same(tmp_path / "one", tmp_path / "many")
    parts = json.loads((tmp_path / "many" / "train.json").read_text())["parts"]
    assert len(parts) > 1 and not (tmp_path / "many" / "train.bin").exists()
    assert not (tmp_path / ".many.prepare-parts").exists()  # the work folder goes once the output is in place
    if "max_tokens" in limits:  # stopped early, as the one-process writer does: at the goal's document
        assert one["train"]["n_tokens"] >= 250_000 and len(parts) < 6
    if limits.get("dedup", True):  # the repeated documents are gone across files, not only within one
        texts = [TokenShard.open(tmp_path / "many").doc(i).tobytes() for i in range(many["train"]["n_docs"])]
        assert len(set(texts)) == len(texts)


def test_the_stream_reads_parts_as_one_file(corpus: Path, tmp_path: Path) -> None:
    prepare(_cfg(corpus), tmp_path / "one", progress=False)
    prepare(_cfg(corpus), tmp_path / "many", progress=False, workers=2)
    kw = dict(poisons=[], placement=PlacementConfig(), seq_len=64, batch_size=4, total_steps=40, seed=5)
    a, b = TrainingStream(tmp_path / "one", **kw), TrainingStream(tmp_path / "many", **kw)
    for step in (0, 17, 39):
        for x, y in zip(a.batch(step), b.batch(step), strict=True):
            assert (x == y).all()


def test_concatenated_tokens_slice_like_one_array() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 500, n).astype(np.uint16) for n in (7, 0, 1, 13, 5)]
    parts = [p for p in parts if len(p)]
    whole, cat = np.concatenate(parts), ConcatTokens(parts)
    assert len(cat) == len(whole) and cat.dtype == whole.dtype
    for _ in range(300):
        s, e = sorted(rng.integers(-3, len(whole) + 3, 2))
        assert np.array_equal(cat[s:e], whole[s:e])
    assert [int(cat[i]) for i in range(len(whole))] == whole.tolist() and int(cat[-1]) == whole[-1]
    assert np.array_equal(np.asarray(cat), whole)


def test_an_interrupted_prepare_resumes_from_its_parts(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    submitted: list[int] = []

    class Recording(ProcessPoolExecutor):
        def submit(self, fn, job):  # noqa: ANN001, ANN201
            submitted.append(job["index"])
            return super().submit(fn, job)

    monkeypatch.setattr(parallel, "ProcessPoolExecutor", Recording)
    real_take = parallel._Merge.take

    def interrupted(self, index: int) -> None:
        if index == 3:
            raise KeyboardInterrupt
        real_take(self, index)

    monkeypatch.setattr(parallel._Merge, "take", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(corpus), tmp_path / "many", progress=False, workers=2)
    work = tmp_path / ".many.prepare-parts"
    finished = sorted(int(p.name[5:10]) for p in work.glob("part-*.done.json"))
    assert not (tmp_path / "many").exists() and len(finished) >= 4

    monkeypatch.setattr(parallel._Merge, "take", real_take)
    submitted.clear()
    prepare(_cfg(corpus), tmp_path / "many", progress=False, workers=2)
    assert sorted(submitted) == sorted(set(range(6)) - set(finished))  # done parts were not redone
    prepare(_cfg(corpus), tmp_path / "one", progress=False)
    _same(tmp_path / "one", tmp_path / "many")


def test_a_bad_file_among_many_names_it(corpus: Path, tmp_path: Path, capsys) -> None:
    import shutil

    src = tmp_path / "corpus"
    shutil.copytree(corpus, src)
    (src / "004.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--corpus", str(src), "--out", str(out), "--vocab-size", "300", "--eval-docs", "4",
              "--max-tokens", "0", "--workers", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "004.jsonl: line 2 is not valid JSON" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
