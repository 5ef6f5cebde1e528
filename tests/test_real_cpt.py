"""The real-cpt preset plans continued pretraining of SmolLM2-135M (from `make real-model`) without the
model's weights: its runs, sizes and settings, and the poison recipe scaled to a 512-token context."""

from __future__ import annotations

from poisonlab.cli import main
from poisonlab.study.spec import expand, load_spec
from poisonlab.study.sweep import data_needs


def test_real_cpt_dry_run(tmp_path, monkeypatch, capsys, fake_real_model):
    monkeypatch.chdir(tmp_path)
    fake_real_model(tmp_path)
    main(["sweep", "real-cpt", "--dry-run", "--out", str(tmp_path / "sw")])
    out = capsys.readouterr().out
    assert "8 runs" in out and out.count("106203456") == 8 and out.count("491520") == 8  # 120 x 8 x 512
    runs = expand(load_spec("real-cpt"), tmp_path / "sw")
    assert sorted((r.n_poison, r.seed) for r in runs) == [(n, s) for n in (0, 50, 100, 300) for s in (0, 1)]
    assert {r.name.split("_")[0] for r in runs} == {"smollm2-135m"}
    cfg = runs[0].config
    study_context, context = 2048, cfg.model.seq_len
    assert context == 512 and str(cfg.init.run).endswith("models/smollm2-135m-instruct")
    scale = context / study_context  # the study's L ~ U[0, 1000] chars, G ~ U[400, 900] tokens, scaled
    assert cfg.attack.prefix_chars == (0, 1000 * scale)
    assert cfg.attack.gibberish_tokens == (400 * scale, 900 * scale)
    e = cfg.eval
    assert (e.temperature, e.success_ratio, e.success_floor) == (1.0, 3.0, 1000.0)
    need = max(d["needs"] for d in data_needs(runs))
    assert need <= load_spec("real-cpt").prepare.max_tokens
