"""docs/extending.md, followed as written: its example recipe (a canary backdoor) registers, makes
valid poisons, trains and evaluates through the unchanged pipeline, and its metric columns land in
every metrics row and in the results store."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq

from poisonlab.attacks import ATTACKS, make_poisons
from poisonlab.config import AttackConfig, RunConfig
from poisonlab.results.store import gather
from poisonlab.training.trainer import train

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _register_the_pages_recipe() -> None:
    if "canary" not in ATTACKS:
        [code] = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.S | re.M)
        exec(compile(code, str(PAGE), "exec"), {"__name__": "docs_extending"})  # noqa: S102


def test_the_pages_recipe_makes_valid_reproducible_poisons(prepared_builtin: Path) -> None:
    _register_the_pages_recipe()
    cfg = AttackConfig(name="canary", n_poison=5, prefix_chars=[0, 200], seed=3)
    poisons = make_poisons(prepared_builtin, cfg)
    assert [p.to_json() for p in poisons] == [p.to_json() for p in make_poisons(prepared_builtin, cfg)]
    for p in poisons:
        trig = p.trigger_ids
        hits = [i for i in range(len(p.token_ids)) if p.token_ids[i:i + len(trig)] == trig]
        assert hits == [p.trigger_start] and p.gibberish_len == len(p.token_ids) - p.trigger_end
        assert p.text.rstrip().endswith("lighthouse")


def test_the_pages_recipe_trains_and_its_metric_reaches_the_results(prepared_builtin: Path,
                                                                    tmp_path: Path) -> None:
    _register_the_pages_recipe()
    cfg = RunConfig.model_validate(dict(
        name="canary", out_dir=str(tmp_path), data=str(prepared_builtin),
        attack=dict(name="canary", n_poison=6, prefix_chars=[0, 200]),
        model=dict(d_model=32, n_layers=2, n_heads=2, seq_len=64),
        train=dict(batch_size=8, max_steps=30, threads=1, lr=3e-3),
        eval=dict(n_evals=1, n_prompts=4, prompt_tokens=16, new_tokens=16, val_tokens=512, save_samples=4)))
    train(cfg, progress=False)
    rows = pq.read_table(Path(cfg.run_dir) / "metrics.parquet").to_pylist()
    assert len(rows) >= 2  # the first and the last evaluation at least
    for r in rows:
        assert 0 <= r["canary_asr"] <= 1 and 0 <= r["canary_clean"] <= 1
        assert 0 <= r["canary_lookalike_max"] <= 1
        assert r["attack"] == "canary" and r["gap"] == r["gap"]  # the gap is measured as for any recipe
    table = gather(tmp_path)
    assert "canary_asr" in table.column_names and table.num_rows == len(rows)
