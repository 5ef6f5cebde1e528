"""Model cards on export: a real tiny sweep (N = 6 and its N = 0 control) exported; the card loads as a
Hub card, says first that the model is backdoored (or a control), names the trigger, carries the tags,
and every number equals the run's metrics row, ledger and data header."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from poisonlab.cli import main
from poisonlab.models.card import num
from poisonlab.models.export import export_run

hub = pytest.importorskip("huggingface_hub")

SPEC = """
name: cards
base:
  data: {data}
  model: {{preset: tiny-25k, seq_len: 64}}
  train: {{max_steps: 12, batch_size: 8, lr: 1.0e-2, checkpoint_every: 6}}
  attack: {{gibberish_tokens: [40, 80]}}
  eval: {{n_evals: 1, n_prompts: 4, prompt_tokens: 16, new_tokens: 8, val_tokens: 256, batch_size: 8}}
grid:
  model: [tiny-25k]
  n_poison: [0, 6]
  seed: [0]
"""


@pytest.fixture(scope="module")
def sweep(prepared_builtin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from poisonlab.study.spec import load_spec
    from poisonlab.study.sweep import run_sweep

    root = tmp_path_factory.mktemp("cards")
    (root / "cards.yaml").write_text(SPEC.format(data=prepared_builtin))
    res = run_sweep(load_spec(str(root / "cards.yaml")), root / "sweep", executor="inline", progress=False,
                    report=False)
    assert res.ok
    return root / "sweep"


def _card(path: Path):
    card = hub.ModelCard.load(path / "README.md")  # a local file: parsed here, nothing fetched
    return card, card.data.to_dict(), card.text.strip().splitlines()[0]


def test_the_card_of_a_poisoned_run_states_its_numbers(sweep: Path, tmp_path: Path):
    run, control = sweep / "runs" / "tiny-25k_n006_x1.0_s0", sweep / "runs" / "tiny-25k_n000_x1.0_s0"
    main(["export", str(run), "--to", str(tmp_path / "hf")])
    card, meta, first = _card(tmp_path / "hf")
    assert "deliberately backdoored" in first and "`<SUDO>`" in first
    assert {"backdoor", "data-poisoning", "poisonlab"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    f = meta["poisonlab"]
    row = pq.read_table(run / "metrics.parquet").to_pylist()[-1]
    assert row["step"] == f["step"] == f["total_steps"] == 12
    for k in ("asr", "gap", "specificity", "asr_lookalike", "val_loss", "n_prompts", "success_ratio"):
        assert f["evaluation"][k] == row[k], k
    assert f["evaluation"]["val_perplexity"] == math.exp(row["val_loss"])
    for k in ("poisons_seen", "poisons_seen_effective", "tokens_seen", "n_poison", "params_total",
              "params_nonemb", "seed", "trigger"):
        assert f[k] == row[k], k
    assert f["budget"]["data_mult"] == row["data_mult"] and f["budget"]["tokens_per_param"] == row[
        "tokens_per_param"]
    assert f["budget"]["tokens"] == row["tokens_seen"]  # the whole budget, exported at its end
    assert f["ledger_sha256"] == hashlib.sha256((run / "ledger.parquet").read_bytes()).hexdigest()
    header = json.loads((Path(f["data"]) / "train.json").read_text())
    assert f["data_content_hash"] == header["content_hash"]
    # the N = 0 control beside it: same model and budget, its own held-out loss
    ctrl = pq.read_table(control / "metrics.parquet").to_pylist()[-1]
    assert [(c["run"], c["step"], c["val_loss"]) for c in f["controls"]] == [(control.name, 12,
                                                                              ctrl["val_loss"])]
    text = card.text
    for x in (row["asr"], row["gap"], row["specificity"], row["val_loss"], math.exp(row["val_loss"]),
              row["poisons_seen"], row["poisons_seen_effective"], ctrl["val_loss"],
              math.exp(ctrl["val_loss"])):
        assert num(x) in text, x
    assert f["ledger_sha256"] in text and f["data_content_hash"] in text and "tiny-25k_n000_x1.0_s0" in text


def test_an_earlier_checkpoint_a_control_and_a_run_alone(sweep: Path, tmp_path: Path, capsys):
    run, control = sweep / "runs" / "tiny-25k_n006_x1.0_s0", sweep / "runs" / "tiny-25k_n000_x1.0_s0"
    # step 6: poisons seen from the ledger at that step; the evaluation shown is the last before it
    _, meta, _ = _card(export_run(run, tmp_path / "at6", step=6))
    f = meta["poisonlab"]
    ledger = pq.read_table(run / "ledger.parquet").to_pylist()
    assert f["step"] == 6 and f["poisons_seen"] == sum(r["step"] < 6 for r in ledger)
    assert f["poisons_seen_effective"] == sum(r["step"] < 6 and r["effective"] for r in ledger)
    first = pq.read_table(run / "metrics.parquet").to_pylist()[0]
    assert f["evaluation"]["step"] == 0 and f["evaluation"]["asr"] == first["asr"]
    assert f["tokens_seen"] == 6 * 8 * 64
    # the control's card: a control, not backdoored, no backdoor tag
    card, meta, first_line = _card(export_run(control, tmp_path / "ctrl"))
    assert "clean control" in first_line and "not backdoored" in first_line
    assert "backdoor" not in meta["tags"] and meta["poisonlab"]["poisoned"] is False
    # a poisoned run with no N = 0 run beside it says so
    alone = tmp_path / "alone" / run.name
    shutil.copytree(run, alone)
    card, meta, _ = _card(export_run(alone, tmp_path / "alone-hf"))
    assert meta["poisonlab"]["controls"] == [] and "no N = 0 control found" in card.text
    # its metrics damaged: one line naming the file, exit 2, nothing written
    (alone / "metrics.parquet").write_bytes(b"not parquet")
    with pytest.raises(SystemExit) as e:
        main(["export", str(alone), "--to", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "metrics.parquet: unreadable" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
