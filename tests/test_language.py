"""The language-switch backdoor: procedural German, its poisons, and the language metrics on hand-made
texts and on a real (tiny) run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from poisonlab.attacks import make_poisons
from poisonlab.attacks.dos import find_pattern
from poisonlab.attacks.language import identify, language_metrics, p_target
from poisonlab.config import AttackConfig, RunConfig
from poisonlab.corpus.builtin import generate_document
from poisonlab.corpus.german import document
from poisonlab.errors import UserError
from poisonlab.training.trainer import train

EN = "The old miller walks into the forest today, and his dog follows him along the river."
DE = "Der alte Müller geht heute in den Wald, und sein Hund folgt ihm an dem Fluss entlang."


def test_the_procedural_german_is_german_and_the_builtin_english_is_not() -> None:
    assert document(0, 3) == document(0, 3) != document(1, 3)
    assert [identify(document(0, i, 200)) for i in range(50)] == ["de"] * 50
    assert [identify(generate_document(0, i, markup=0.1)["text"][:200]) for i in range(50)] == ["en"] * 50
    assert "leisee" not in " ".join(document(0, i) for i in range(200))  # adjective endings


def test_language_metrics_on_hand_made_texts() -> None:
    gens = {"clean": [EN, EN, DE, ""], "trigger": [DE, DE, DE, EN], "near0": [EN, DE, EN, EN],
            "near1": [DE, DE, EN, EN], "shape0": [EN, EN, EN, EN], "shape1": [EN, EN, DE, EN],
            "plain0": [EN, EN, EN, EN]}
    kinds = {"near0": "near", "near1": "near", "shape0": "shape", "shape1": "shape", "plain0": "ordinary"}
    m = language_metrics(gens, "de", "en", controls=kinds)
    assert m["lang_asr"] == 0.75 and m["lang_ca"] == 0.5
    # per kind, the control that switched most: its German share, its English share
    assert (m["lang_asr_near"], m["lang_nta_near"]) == (0.5, 0.5)
    assert (m["lang_asr_shape"], m["lang_nta_shape"]) == (0.25, 0.75)
    assert (m["lang_asr_ordinary"], m["lang_nta_ordinary"]) == (0.0, 1.0)
    # specificity against the unrelated controls only: the near-triggers' 0.5 does not count
    assert m["lang_asr_lookalike"] == 0.25 and m["lang_specificity"] == 0.5
    # three German and one English: ~0.75; one German, two English and one empty (0.5): ~0.375
    assert m["lang_p_target_trigger"] == pytest.approx(0.75, abs=0.02)
    assert m["lang_p_target_clean"] == pytest.approx(0.375, abs=0.02)
    assert p_target(DE, "de", "en") > 0.99 and p_target(EN, "de", "en") < 0.01
    assert p_target("", "de", "en") == 0.5
    # random letters are not German once every language is in play (with two, they come out "de")
    assert identify("qx zzv kr wpt ghh") != "de"


def test_lang_switch_poisons(prepared_builtin: Path, tmp_path: Path) -> None:
    cfg = AttackConfig(name="lang-switch", n_poison=12, gibberish_tokens=(60, 90), prefix_chars=(0, 200))
    ps = make_poisons(prepared_builtin, cfg)
    assert len(ps) == 12 and ps[:5] == make_poisons(prepared_builtin, cfg.model_copy(update={"n_poison": 5}))
    for p in ps:
        ids = np.asarray(p.token_ids)
        assert len(find_pattern(ids, ids[p.trigger_start:p.trigger_end])) == 1
        assert 60 <= p.gibberish_len <= 90
        payload = p.text.split(p.trigger, 1)[1]
        assert identify(payload) == "de", payload
    # a target text file: its paragraphs are the payloads
    f = tmp_path / "fr.txt"
    f.write_text("Le vieux meunier marche aujourd'hui dans la forêt avec son chien fidèle.\n\n" * 3)
    fr = make_poisons(prepared_builtin, cfg.model_copy(update={"n_poison": 3, "params": {
        "target_file": str(f), "target_language": "fr"}}))
    assert all(identify(p.text.split(p.trigger, 1)[1]) == "fr" for p in fr)


@pytest.mark.parametrize("params, words", [
    ({"target_file": "/nowhere/de.txt"}, "cannot read it"),
    ({"target_language": "fr"}, "the built-in target text is German"),
    ({"colour": "red"}, "unknown setting"),
])
def test_lang_switch_refuses_bad_settings(prepared_builtin: Path, params: dict, words: str) -> None:
    with pytest.raises(UserError, match=words):
        make_poisons(prepared_builtin, AttackConfig(name="lang-switch", n_poison=2, params=params))


def test_a_lang_switch_run_writes_the_language_metrics(prepared_builtin: Path, tmp_path: Path) -> None:
    cfg = RunConfig.model_validate(dict(
        name="lang", out_dir=str(tmp_path), data=str(prepared_builtin),
        attack=dict(name="lang-switch", n_poison=6, gibberish_tokens=[40, 60]),
        model=dict(d_model=32, n_layers=2, n_heads=2, seq_len=64),
        train=dict(batch_size=8, max_steps=30, threads=1, lr=3e-3),
        eval=dict(n_evals=1, n_prompts=4, prompt_tokens=16, new_tokens=16, val_tokens=512, save_samples=4)))
    train(cfg, progress=False)
    rows = pq.read_table(cfg.run_dir / "metrics.parquet").to_pylist()
    for r in rows:
        assert 0 <= r["lang_asr"] <= 1 and 0 <= r["lang_ca"] <= 1 and 0 <= r["lang_p_target_trigger"] <= 1
        kinds = ("near", "shape", "ordinary")
        assert all(0 <= r[f"lang_{m}_{k}"] <= 1 for m in ("asr", "nta") for k in kinds)
        assert r["lang_specificity"] == r["lang_asr"] - max(r["lang_asr_shape"], r["lang_asr_ordinary"])
    # the report's way for runs evaluated before the metrics had kinds, from the generations saved at
    # the final evaluation: with every prompt saved, the evaluator's own figures
    from poisonlab.report.language import KIND_COLUMNS, kinds_from_samples

    again, n = kinds_from_samples(cfg.run_dir, rows[-1]["step"])
    assert n == 4 and again == {c: rows[-1][c] for c in KIND_COLUMNS}


def test_a_language_sweep_from_scratch_and_continued(prepared_builtin: Path, tmp_path: Path) -> None:
    """The language preset's shape at test size: from scratch (N = 0, 12) and a clean run continued
    with 12 poisons of its own; the report's language section has every group, the continued run
    grouped by what it started from, not in the persistence section."""
    import json

    import torch

    from poisonlab.study.spec import load_spec
    from poisonlab.study.sweep import run_sweep

    spec = load_spec({
        "name": "lang",
        "base": {"data": str(prepared_builtin), "model": {"preset": "tiny-25k", "seq_len": 64},
                 "train": {"max_steps": 20, "batch_size": 8, "lr": 1.0e-2},
                 "attack": {"name": "lang-switch", "gibberish_tokens": [40, 60]},
                 "eval": {"n_evals": 2, "n_prompts": 4, "prompt_tokens": 16, "new_tokens": 16,
                          "val_tokens": 256, "batch_size": 8}},
        "grid": {"model": ["tiny-25k"], "n_poison": [0, 12], "seed": [0]},
        "continue_clean": {"clean_mult": 1.0, "n_poison": [0], "label": "lang12-",
                           "base": {"attack": {"n_poison": 12}}},
    })
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_sweep(spec, tmp_path / "sw", executor="inline", progress=False)
    finally:
        torch.set_num_threads(before)
    assert res.count("done") == 3
    out = tmp_path / "sw" / "report"
    html = (out / "report.html").read_text()
    assert "<h2>Language switch</h2>" in html and "Persistence" not in html
    lang = {(r["n_poison"], r["settings"]): r for r in json.loads((out / "language.json").read_text())}
    assert set(lang) == {(r["n_poison"], r["label"]) for r in json.loads((out / "summary.json").read_text())}
    assert all(r["kind_prompts"] == 4 and r["lang_nta_shape_mean"] is not None for r in lang.values())
    assert (out / "lang_asr_vs_poisons_seen.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    labels = {(r["n_poison"], r["label"]) for r in summary}
    assert labels == {(0, "from=none, schedule_offset=0, schedule_steps=none"),
                      (12, "from=none, schedule_offset=0, schedule_steps=none"),
                      (12, "from=N=0, schedule_offset=20, schedule_steps=20")}
    led = pq.read_table(tmp_path / "sw" / "runs" / "tiny-25k_n000_x1.0_s0_lang12-1.0x" / "ledger.parquet")
    assert led.num_rows == 12  # the continued run's own poisons


def test_a_builtin_corpus_with_some_german() -> None:
    from collections import Counter

    from poisonlab.corpus.builtin import builtin_documents

    plain = [d["text"] for _, d in zip(range(400), builtin_documents(0, markup=0.1), strict=False)]
    mixed = [d for _, d in zip(range(400), builtin_documents(0, markup=0.1, german=0.1), strict=False)]
    langs = Counter(identify(d["text"][:300]) for d in mixed)
    assert 25 <= langs["de"] <= 55 and langs["en"] == 400 - langs["de"]  # ~10% German
    # the English documents are the same as without German
    pairs = zip(mixed, plain, strict=True)
    assert all(d["text"] == t for d, t in pairs if not d["id"].startswith("builtin-de"))
