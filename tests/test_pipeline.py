"""The whole pipeline through the command line, as a user runs it: prepare -> sweep (real training and
evaluation) -> results -> report. Small and short; the science is checked in test_eval_science."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_poison_data import build_tiny_data

from poisonlab.cli import main
from poisonlab.config import load_run_config
from poisonlab.evaluation.panel import panel_json, resolve_panel
from poisonlab.injection.stream import read_ledger


def test_sweep_results_report_end_to_end(prepared_builtin: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "mini.yaml"
    spec.write_text(f"""
name: mini
base:
  data: {prepared_builtin}
  model: {{preset: tiny-25k, seq_len: 64}}
  train: {{max_steps: 24, batch_size: 8, lr: 1.0e-2}}
  attack: {{gibberish_tokens: [40, 80]}}
  eval: {{n_evals: 2, n_prompts: 8, prompt_tokens: 16, new_tokens: 16, val_tokens: 512, batch_size: 8}}
grid:
  model: [tiny-25k]
  n_poison: [0, 12]
  seed: [0]
""")
    out = tmp_path / "sweep"
    main(["sweep", str(spec), "--out", str(out), "--executor", "inline"])
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["tiny-25k_n000_x1.0_s0", "tiny-25k_n012_x1.0_s0"]
    for name in runs:
        run = out / "runs" / name
        assert (run / "DONE").is_file() and (run / "config.yaml").is_file()
        rows = pq.read_table(run / "metrics.parquet").to_pylist()
        assert [r["step"] for r in rows] == [0, 12, 24]
        ledger, _ = read_ledger(run / "ledger.parquet")
        # poisons seen in the metrics are the ledger's count of triggers trained on before that step
        steps = ledger.column("step").to_pylist()
        assert [r["poisons_seen"] for r in rows] == [sum(s < r["step"] for s in steps) for r in rows]
        assert rows[-1]["poisons_seen"] == (12 if "n012" in name else 0)
        # and the effective count: triggers whole in one row with gibberish after them (ledger flag)
        eff = [s for s, e in zip(steps, ledger.column("effective").to_pylist(), strict=True) if e]
        assert [r["poisons_seen_effective"] for r in rows] == [sum(s < r["step"] for s in eff) for r in rows]
        # every row carries the settings a sweep may vary, from the run's own config
        cfg = load_run_config(run / "config.yaml")
        panel = panel_json(resolve_panel(cfg.attack.trigger, cfg.eval.lookalikes))
        want = {"trigger": cfg.attack.trigger, "lookalike": panel,
                "schedule": cfg.placement.schedule, "attack_seed": cfg.attack.seed,
                "placement_seed": cfg.placement.seed, "tokens_per_param": cfg.train.tokens_per_param,
                "budget_params": cfg.train.budget_params, "max_steps": 24, "data_epochs": 1}
        assert all({k: r[k] for k in want} == want for r in rows)
    capsys.readouterr()

    main(["results", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert sorted(r["n_poison"] for r in summary) == [0, 12]

    main(["report", str(out)])
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64" in html and "<SUDO>" not in html  # figures embedded, samples escaped

    # idempotent: a second sweep skips both finished runs
    main(["sweep", str(spec), "--out", str(out), "--executor", "inline", "--no-report"])
    assert "2 skipped" in capsys.readouterr().err


def test_repeated_data_is_refused_then_loud_when_allowed(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A budget beyond one pass over the clean data (here 1.1 passes of a 94k-token corpus) is refused
    with one line and no run directory, and trains with a warning once allowed."""
    data = build_tiny_data(tmp_path / "data")
    holds = json.loads((data / "train.json").read_text())["n_tokens"]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
name: rep
data: {data}
out_dir: {tmp_path / "runs"}
attack: {{n_poison: 0}}
model: {{preset: tiny-25k, seq_len: 64}}
train: {{max_steps: {holds // 512 + 10}, batch_size: 8, log_every: 100}}
eval: {{n_evals: 0}}
""")
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert f"clean training tokens but the data holds {holds:,}" in err
    assert not (tmp_path / "runs" / "rep").exists()
    main(["train", str(cfg), "--no-progress", "--set", "train.allow_data_repeat=true"])
    assert "WARNING" in capsys.readouterr().err
    assert read_ledger(tmp_path / "runs" / "rep" / "ledger.parquet")[1]["epochs_needed"] == 2
