"""The whole pipeline through the command line, as a user runs it: prepare -> sweep (real training and
evaluation) -> results -> report. Small and short; the science is checked in test_eval_science."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from poisonlab.cli import main
from poisonlab.stream import read_ledger


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
