"""Continued pretraining (`init.run`): the schedule's frame, the clean data after the earlier run's, the
earlier run's weights at the start, a ledger of the new run's poisons only, and refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_poison_data import build_tiny_data  # noqa: E402
from test_train import real_cfg  # noqa: E402

from poisonlab.config import PlacementConfig, RunConfig, TrainConfig  # noqa: E402
from poisonlab.errors import UserError  # noqa: E402
from poisonlab.injection.stream import TrainingStream, read_ledger  # noqa: E402
from poisonlab.training.continued import clean_tokens_consumed  # noqa: E402
from poisonlab.training.schedule import lr_at  # noqa: E402
from poisonlab.training.trainer import train  # noqa: E402


def test_the_schedule_frame() -> None:
    t = TrainConfig(lr=1e-2, warmup_frac=0.05, min_lr_ratio=0.1)
    # by default the frame is the run itself, as before
    assert [lr_at(s, t, 1000) for s in (0, 10, 500, 999)] == [
        lr_at(s, t.model_copy(update={"schedule_offset": 0, "schedule_steps": 1000}), 1000)
        for s in (0, 10, 500, 999)]
    # a checkpoint at step 30,000 of a 143,000-step cosine, continued: the same lr as there
    pythia = t.model_copy(update={"schedule_offset": 30_000, "schedule_steps": 143_000})
    assert lr_at(0, pythia, 5000) == lr_at(30_000, t, 143_000)
    assert lr_at(4999, pythia, 5000) == lr_at(34_999, t, 143_000)
    # a finished run continued at its last lr: min_lr_ratio x lr throughout, no second warmup
    done = t.model_copy(update={"schedule_offset": 1000, "schedule_steps": 1000})
    assert [lr_at(s, done, 700) for s in (0, 1, 350, 699)] == pytest.approx([1e-3] * 4)


def test_a_continued_stream_reads_the_clean_data_after_the_earlier_one(tmp_path: Path) -> None:
    data = build_tiny_data(tmp_path / "d", n_docs=400)
    kw = dict(seq_len=32, batch_size=4, seed=3)
    first = TrainingStream(data, [], PlacementConfig(), total_steps=50, **kw)
    whole = TrainingStream(data, [], PlacementConfig(), total_steps=150, **kw)
    consumed = 50 * 4 * 32
    then = TrainingStream(data, [], PlacementConfig(), total_steps=60, clean_offset=consumed, **kw)
    _, cum = whole._epoch(0)
    c0 = int(cum[np.searchsorted(cum, consumed)])  # the first document boundary at or after it
    assert then.clean_offset == c0 >= consumed and then.metadata()["clean_offset"] == c0
    assert np.array_equal(first.tokens(0, consumed), whole.tokens(0, consumed))
    assert np.array_equal(then.tokens(0, 60 * 128), whole.tokens(c0, c0 + 60 * 128))
    # too little data left after the offset: refused, naming how much is needed
    with pytest.raises(UserError, match="continues after"):
        TrainingStream(data, [], PlacementConfig(), total_steps=10_000, clean_offset=consumed, **kw)


def test_a_continued_run_starts_from_the_earlier_runs_weights(tmp_path: Path, prepared_builtin: Path) -> None:
    """A poisoned run (N = 3), then 120 clean steps from its end at its last lr: the continued run's
    step-0 evaluation is the earlier run's last one (same weights, same evaluation); its ledger holds
    its own poisons (none) and its clean data starts where the earlier run's stopped."""
    first = real_cfg(tmp_path, prepared_builtin, name="poisoned", max_steps=120)
    train(first, progress=False)
    tree = first.model_dump(mode="json", exclude_unset=True)
    tree.update(name="continued", init={"run": str(first.run_dir)})
    tree["attack"]["n_poison"] = 0
    tree["train"].update(max_steps=120, schedule_offset=120, schedule_steps=120)
    then = RunConfig.model_validate(tree)
    train(then, progress=False)
    a = pq.read_table(first.run_dir / "metrics.parquet").to_pylist()
    b = pq.read_table(then.run_dir / "metrics.parquet").to_pylist()
    assert b[0]["step"] == 0 and b[0]["val_loss"] == a[-1]["val_loss"] and b[0]["asr"] == a[-1]["asr"]
    assert b[-1]["val_loss"] != b[0]["val_loss"]  # and it trained on from there
    assert {r["init_from"] for r in b} == {"poisoned"} and {r["init_step"] for r in b} == {120}
    assert {r["poisons_seen"] for r in b} == {0} and {r["init_from"] for r in a} == {None}
    ledger, meta = read_ledger(then.run_dir / "ledger.parquet")
    assert ledger.num_rows == 0
    consumed = clean_tokens_consumed(first.run_dir, 120)
    poison_tokens = sum(pq.read_table(first.run_dir / "ledger.parquet")["n_tokens"].to_pylist())
    assert consumed == 120 * 8 * 64 - poison_tokens  # the earlier run's inputs less its poisons
    assert meta["clean_offset"] >= consumed and b[0]["clean_offset"] == meta["clean_offset"]
    lrs = [r["lr"] for r in _log(then.run_dir)]
    assert lrs and all(lr == pytest.approx(3e-4) for lr in lrs)  # min_lr_ratio 0.1 x 3e-3, no warmup


def _log(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("change, words", [
    ({"init": {"run": "nowhere"}}, "not a poisonlab run directory"),
    ({"model": {"d_model": 64}}, "trained another model (model.d_ff, model.d_model differ)"),
    ({"train": {"seed": 5}}, "needs the same data and train.seed"),
    ({"init": {"step": 7}}, "has no checkpoint at step 7"),
])
def test_a_start_that_cannot_be_continued_is_refused(tmp_path: Path, prepared_builtin: Path, change: dict,
                                                     words: str) -> None:
    first = real_cfg(tmp_path, prepared_builtin, name="first", max_steps=20)
    train(first, progress=False)
    tree = first.model_dump(mode="json", exclude_unset=True)
    tree.update(name="bad", init={"run": str(first.run_dir)})
    for section, values in change.items():
        tree.setdefault(section, {}).update(values)
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        train(RunConfig.model_validate(tree), progress=False)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_a_run_starts_from_a_local_hf_llama(tmp_path: Path, prepared_builtin: Path, tiny_llama) -> None:
    """An HF directory's weights load into our model with the same logits, and a poisoned continued run
    trains from them, its model taken from config.json."""
    import torch
    import transformers

    from poisonlab.models.llama import Transformer
    from poisonlab.training.continued import hf_model_config, load_hf_weights

    hf = tiny_llama(tmp_path / "hf", prepared_builtin)
    ours = Transformer(hf_model_config(hf, seq_len=64))
    load_hf_weights(hf, ours)
    x = torch.randint(0, 512, (2, 20))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hf), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x).logits, atol=1e-4, rtol=0)
    cfg = RunConfig.model_validate(dict(
        name="from-hf", out_dir=str(tmp_path / "runs"), data=str(prepared_builtin), init={"run": str(hf)},
        model={"seq_len": 64}, attack=dict(n_poison=3, gibberish_tokens=[20, 40]),
        train=dict(batch_size=8, max_steps=20, threads=1, lr=3e-3),
        eval=dict(n_evals=1, n_prompts=4, prompt_tokens=16, new_tokens=8, val_tokens=512)))
    train(cfg, progress=False)
    rows = pq.read_table(cfg.run_dir / "metrics.parquet").to_pylist()
    assert {r["init_from"] for r in rows} == {"hf"} and {r["init_step"] for r in rows} == {0}
    assert read_ledger(cfg.run_dir / "ledger.parquet")[0].num_rows == 3 and rows[-1]["poisons_seen"] == 3
    # named for the directory it started from (its shape alone would not say which model it is), also
    # where the metrics were written before the trainer named it so, and in an archive without the model
    import pyarrow as pa

    from poisonlab.results.store import _read_run

    assert {r["model"] for r in rows} == {"hf"}
    path = cfg.run_dir / "metrics.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index("model"), "model",
                                    pa.array(["d32-l2"] * table.num_rows)), path)
    for p in hf.iterdir():
        p.unlink()
    hf.rmdir()
    assert set(_read_run(cfg.run_dir).column("model").to_pylist()) == {"hf"}


def test_an_hf_start_that_does_not_fit_is_refused(tmp_path: Path, prepared_builtin: Path, tiny_llama) -> None:
    base = dict(name="x", out_dir=str(tmp_path / "runs"), data=str(prepared_builtin),
                train=dict(batch_size=8, max_steps=5, threads=1), eval=dict(n_evals=0))
    hf = tiny_llama(tmp_path / "hf", prepared_builtin)
    with pytest.raises(UserError, match="give no model.d_model"):
        train(RunConfig.model_validate({**base, "init": {"run": str(hf)}, "model": {"d_model": 64}}))
    other = build_tiny_data(tmp_path / "tiny") / "tokenizer.json"  # another corpus' tokenizer
    (hf / "tokenizer.json").write_text(other.read_text())
    with pytest.raises(UserError, match="is not tokenized with"):
        train(RunConfig.model_validate({**base, "init": {"run": str(hf)}}))
    (hf / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable tokenizer"):
        train(RunConfig.model_validate({**base, "init": {"run": str(hf)}}))
    biased = tiny_llama(tmp_path / "biased", prepared_builtin, attention_bias=True)
    with pytest.raises(UserError, match="not a model poisonlab can train: biases"):
        train(RunConfig.model_validate({**base, "init": {"run": str(biased)}}))
    assert not (tmp_path / "runs" / "x").exists()
