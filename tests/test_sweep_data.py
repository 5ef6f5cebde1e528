"""A sweep states the data it needs: presets prepare enough for one pass, too-small data is refused
up front (not once per run, minutes later), and a missing data directory is made from `prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poisonlab.errors import UserError
from poisonlab.study.spec import expand, list_presets, load_spec
from poisonlab.study.sweep import check_data, data_needs, prepare_data


@pytest.mark.parametrize("preset", list_presets())
def test_each_preset_prepares_enough_data_for_one_pass(preset, tmp_path, monkeypatch, fake_real_model):
    from poisonlab.study.finetune_sweep import load_ft_spec, pretrain_spec
    from poisonlab.study.spec import spec_tree

    monkeypatch.chdir(tmp_path)  # presets that start from the real model find its config.json here
    fake_real_model(tmp_path)

    tree, where = spec_tree(preset)  # a fine-tuning preset: its pretraining stage's data
    if tree.get("kind") == "finetune":
        ft = load_ft_spec(tree, where)
        if ft.pretrain is None:  # it starts from a given model (real-finetune): no data to prepare
            assert ft.prepare is None and ft.model is not None
            return
    spec = pretrain_spec(ft) if tree.get("kind") == "finetune" else load_spec(preset)
    runs = expand(spec, tmp_path)
    need = max(d["needs"] for d in data_needs(runs))
    if spec.prepare is None:  # the paper preset: a corpus of the user's; its comment must say how big
        text = (Path(__file__).parents[1] / "src/poisonlab/presets" / f"{preset}.yaml").read_text()
        assert f"{need / 1e9:.0f}B tokens" in text, need
        return
    assert spec.prepare.max_tokens >= need, (preset, need)
    assert not any(r.config.train.allow_data_repeat for r in runs)


def test_too_small_data_is_refused_before_any_run(prepared_builtin, tmp_path):
    spec = load_spec("demo", [f"base.data={prepared_builtin}"])  # 300k tokens; tiny-100k needs 2.1M
    with pytest.raises(UserError) as e:
        check_data(expand(spec, tmp_path))
    msg = str(e.value)
    holds = json.loads((prepared_builtin / "train.json").read_text())["n_tokens"]
    assert f"holds {holds:,} training tokens" in msg and "--max-tokens 2138112" in msg and "\n" not in msg
    ok = load_spec("demo", [f"base.data={prepared_builtin}", "train.allow_data_repeat=true"])
    check_data(expand(ok, tmp_path))  # repetition asked for: allowed


def test_missing_data_is_prepared_from_the_spec(tmp_path):
    data = tmp_path / "data"
    spec = load_spec({
        "name": "t", "base": {"data": str(data), "model": {"preset": "tiny-25k"}, "train": {"max_steps": 3}},
        "prepare": {"source": "builtin", "vocab_size": 300, "max_tokens": 20_000, "eval_docs": 8},
    })
    runs = expand(spec, tmp_path / "sweep")
    prepare_data(spec, runs, progress=False)
    assert json.loads((data / "train.json").read_text())["n_tokens"] >= 20_000
    del spec.prepare
    with pytest.raises(UserError, match="data not prepared"):
        prepare_data(load_spec({"base": {"data": str(tmp_path / "nothing")}}),
                     expand(load_spec({"base": {"data": str(tmp_path / "nothing")}}), tmp_path / "s2"),
                     progress=False)


def test_runs_go_seed_by_seed_longest_first(tmp_path):
    """A sweep stopped part-way has whole seeds of every cell, and side-by-side jobs end together."""
    from poisonlab.study.sweep import run_order

    order = run_order(expand(load_spec("tiny-grid"), tmp_path))
    seeds = [r.seed for r in order]
    assert seeds == sorted(seeds)
    first = [r for r in order if r.seed == 0]
    assert first[0].model == "tiny-800k" and first[-1].model == "tiny-25k"
