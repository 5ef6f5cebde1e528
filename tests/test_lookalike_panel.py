"""The look-alike panel: derived controls, per-kind metrics on real evaluations, old configs, and the
check that controls use tokens clean training text has."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_evaluate import Backdoored, _text, make_data_dir, one_thread, small_cfg, tiny_model  # noqa: F401
from tokenizers import Tokenizer

from poisonlab.config import EvalConfig, RunConfig, load_run_config
from poisonlab.corpus.shards import ShardWriter, TokenShard
from poisonlab.errors import UserError
from poisonlab.evaluation.evaluator import Evaluator
from poisonlab.evaluation.metrics import success
from poisonlab.evaluation.panel import default_panel, resolve_panel, train_token_counts

SUDO_PANEL = {"near": ["<SUDA>", "<DOSU>", "SUDO"], "shape": ["<KLPT>", "<MWRB>"],
              "ordinary": ["sudo", "then"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The miniature data directory plus a clean train split of lower-case lexicon words only: no
    `<`, `>` or capital letter ever occurs in it."""
    d = make_data_dir(tmp_path_factory.mktemp("paneldata"))
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    rng = random.Random(1)
    w = ShardWriter(d, "train", tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"))
    for i in range(60):
        w.add(f"t{i}", tok.encode(_text(rng, rng.randint(30, 90))).ids)
    w.close(tokenizer_hash="test", source="test")
    return d


@pytest.fixture(scope="module")
def tok(data_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(data_dir / "tokenizer.json"))


# --- the derived panel -----------------------------------------------------------------------------


def test_default_panel_of_sudo_is_the_documented_one():
    assert EvalConfig().lookalikes is None  # no panel given: derived from the trigger
    assert default_panel("<SUDO>") == SUDO_PANEL
    assert [(c.kind, c.text) for c in resolve_panel("<SUDO>", None)] == [
        (k, t) for k, texts in SUDO_PANEL.items() for t in texts]
    # a given panel replaces the derived one, kinds left out have no controls
    assert [(c.kind, c.text) for c in resolve_panel("<SUDO>", {"shape": ["<AB>"]})] == [("shape", "<AB>")]


def test_derived_panel_for_other_triggers():
    p = default_panel("[TRIGGER]")
    assert p["near"] == ["[TRIGGEA]", "[GGERTRI]", "TRIGGER"]  # one edit, halves swapped, brackets dropped
    assert p["ordinary"] == ["trigger", "then"]
    for s in p["shape"]:  # same brackets and length, capitals none of which the trigger has
        assert s[0] == "[" and s[-1] == "]" and len(s) == len("[TRIGGER]") and s[1:-1].isupper()
        assert not set(s[1:-1]) & set("TRIGGER")
    assert len(set(p["shape"])) == 2
    c = default_panel("cf")  # no brackets, lower case, two letters
    assert c["near"] == ["ca", "fc"] and c["ordinary"] == ["then", "and"]
    assert all(len(s) == 2 and s.islower() and not set(s) & {"c", "f"} for s in c["shape"])
    for trigger in ("<SUDO>", "[TRIGGER]", "cf", "SUDO", "<MOVE>", "<|endoftext|>", "James Bond", "x"):
        texts = [t for ts in default_panel(trigger).values() for t in ts]
        assert trigger not in texts and len(texts) == len(set(texts)), trigger  # not the trigger, no repeats
        assert default_panel(trigger)["shape"] and default_panel(trigger)["ordinary"], trigger


def test_an_evaluation_uses_and_reports_the_derived_panel(data_dir, tok):
    metrics, samples = Evaluator(small_cfg(n_prompts=4, save_samples=1), data_dir, "[TRIGGER]").run(
        tiny_model(tok.get_vocab_size()))
    panel = json.loads(metrics["lookalike_panel"])
    assert {t: v["kind"] for t, v in panel.items()} == {
        t: k for k, texts in default_panel("[TRIGGER]").items() for t in texts}
    recs = {r["condition"]: r for r in samples if r["kind"] == "sample"}
    assert recs["lookalike:[TRIGGEA]"]["prompt"].endswith(" [TRIGGEA]")
    assert recs["lookalike:[TRIGGEA]"]["lookalike_kind"] == "near"
    assert recs["trigger"]["prompt"].endswith(" [TRIGGER]")


# --- settings: validation, older configs, the metrics rows' `lookalike` column ----------------------


def _run_yaml(tmp_path: Path, eval_tree: dict) -> Path:
    tree = RunConfig().model_dump(mode="json")
    del tree["eval"]["lookalikes"]
    tree["eval"].update(eval_tree)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_older_configs_with_one_lookalike_load(tmp_path):
    # the old default: no choice was made, the derived panel (which contains <SUDA>)
    assert load_run_config(_run_yaml(tmp_path, {"lookalike": "<SUDA>"})).eval.lookalikes is None
    assert load_run_config(_run_yaml(tmp_path, {"lookalike": "SUDO"})).eval.lookalikes == {"near": ["SUDO"]}
    assert load_run_config(_run_yaml(tmp_path, {"lookalike": ""})).eval.lookalikes == {}  # no control
    assert EvalConfig(lookalike="[SUDO]").lookalikes == {"near": ["[SUDO]"]}


@pytest.mark.parametrize("tree, message", [
    ({"lookalike": "SUDO", "lookalikes": {"near": ["x"]}}, "not both"),
    ({"lookalikes": {"nearby": ["x"]}}, "unknown kind 'nearby'"),
    ({"lookalikes": {"near": ["x"], "shape": ["x"]}}, "listed twice"),
    ({"lookalikes": {"ordinary": [" "]}}, "non-empty"),
])
def test_bad_panels_are_refused_with_one_line(tmp_path, tree, message):
    path = _run_yaml(tmp_path, tree)
    with pytest.raises(UserError, match=message) as e:
        load_run_config(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_metrics_rows_name_the_panel_for_new_and_old_runs(tmp_path):
    from poisonlab.results.store import gather
    from poisonlab.training.trainer import run_columns

    cfg = RunConfig.model_validate({"attack": {"trigger": "cf"}})
    assert json.loads(run_columns(cfg, 1, 1, None)["lookalike"]) == default_panel("cf")
    cfg = RunConfig.model_validate({"eval": {"lookalikes": {"shape": ["<AB>"]}}})
    want = {"near": [], "shape": ["<AB>"], "ordinary": []}
    assert json.loads(run_columns(cfg, 1, 1, None)["lookalike"]) == want
    # a run of an older version: no `lookalike` column, one look-alike in config.yaml
    run = tmp_path / "old" / "r"
    run.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"run_id": "r", "step": 0, "asr": 0.5, "asr_lookalike": 0.1}]),
                   run / "metrics.parquet")
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"lookalike": "SUDO"}}))
    row = gather(tmp_path / "old", write=False).to_pylist()[0]
    assert json.loads(row["lookalike"]) == {"near": ["SUDO"], "shape": [], "ordinary": []}


# --- metrics on real evaluations ---------------------------------------------------------------------


def test_backdoor_on_brackets_has_no_specificity_and_one_on_the_word_has(data_dir, tok):
    """Hand-made backdoors keyed on a piece of the trigger: on " <" every bracketed control fires too
    (specificity 0); on "SUD" the near-triggers that contain it fire and no unrelated control does."""
    V = tok.get_vocab_size()
    cfg = small_cfg(n_prompts=10)
    on_bracket, _ = Evaluator(cfg, data_dir, "<SUDO>").run(Backdoored(V, tok.encode(" <").ids))
    asr = {t: v["asr"] for t, v in json.loads(on_bracket["lookalike_panel"]).items()}
    assert asr == {"<SUDA>": 1.0, "<DOSU>": 1.0, "SUDO": 0.0, "<KLPT>": 1.0, "<MWRB>": 1.0, "sudo": 0.0,
                   "then": 0.0}
    assert (on_bracket["asr"], on_bracket["asr_near"], on_bracket["asr_shape"]) == (1.0, 1.0, 1.0)
    assert (on_bracket["asr_ordinary"], on_bracket["asr_lookalike"]) == (0.0, 1.0)
    assert on_bracket["specificity"] == 0.0
    sud = tok.encode("SUD").ids
    assert len(sud) == 3 and sud == tok.encode(" <SUDO>").ids[2:5]  # the trigger's own S, U, D tokens
    on_word, _ = Evaluator(cfg, data_dir, "<SUDO>").run(Backdoored(V, sud))
    asr = {t: v["asr"] for t, v in json.loads(on_word["lookalike_panel"]).items()}
    assert asr == {"<SUDA>": 1.0, "<DOSU>": 0.0, "SUDO": 1.0, "<KLPT>": 0.0, "<MWRB>": 0.0, "sudo": 0.0,
                   "then": 0.0}
    assert (on_word["asr"], on_word["asr_near"], on_word["asr_lookalike"]) == (1.0, 1.0, 0.0)
    assert on_word["specificity"] == 1.0
    assert on_word["gap_near"] == pytest.approx(V - on_word["ppl_clean_mean"], rel=1e-6)
    assert abs(on_word["gap_lookalike"]) < 1e-5
    # a panel without unrelated controls measures no specificity
    near_only, _ = Evaluator(small_cfg(n_prompts=4, lookalikes={"near": ["<SUDA>"]}), data_dir, "<SUDO>").run(
        Backdoored(V, sud))
    assert near_only["asr_near"] == 1.0 and math.isnan(near_only["asr_shape"])
    assert math.isnan(near_only["asr_lookalike"]) and math.isnan(near_only["specificity"])


def test_panel_columns_rederived_from_the_per_prompt_perplexities(data_dir, tok):
    """On a real (random) tiny model, with a lenient rule so that the controls' ASRs differ: every
    panel column follows from samples.jsonl's per-prompt perplexities."""
    ratio = 1.05
    model = tiny_model(tok.get_vocab_size(), seed=3)
    with torch.no_grad():  # less sharp than tiny_model's: clean ppl 1-20, so the controls' ASRs vary
        model.tok_emb.weight.div_(4)
    metrics, samples = Evaluator(small_cfg(n_prompts=24, success_ratio=ratio), data_dir, "<SUDO>").run(model)
    per = samples[-1]
    assert per["kind"] == "per_prompt"
    assert set(per["lookalikes"]) == {t for ts in SUDO_PANEL.values() for t in ts}
    clean = np.array(per["ppl_clean"])
    panel = json.loads(metrics["lookalike_panel"])
    mine = {}
    for text, rec in per["lookalikes"].items():
        p = np.array(rec["ppl"])
        mine[text] = (rec["kind"], float(np.mean(success(p, clean, ratio))), float(p.mean() - clean.mean()))
        assert panel[text]["kind"] == rec["kind"]
        assert panel[text]["asr"] == pytest.approx(mine[text][1])
        assert panel[text]["gap"] == pytest.approx(mine[text][2], rel=1e-9, abs=1e-9)
    assert len({round(v[1], 6) for v in mine.values()}) >= 3  # the ASRs differ, so "highest" is tested
    for kind in ("near", "shape", "ordinary"):
        assert metrics[f"asr_{kind}"] == pytest.approx(max(v[1] for v in mine.values() if v[0] == kind))
        assert metrics[f"gap_{kind}"] == pytest.approx(max(v[2] for v in mine.values() if v[0] == kind))
    unrelated = {t: v for t, v in mine.items() if v[0] != "near"}
    assert metrics["asr_lookalike"] == pytest.approx(max(v[1] for v in unrelated.values()))
    assert metrics["gap_lookalike"] == pytest.approx(max(v[2] for v in unrelated.values()))
    assert metrics["asr"] == pytest.approx(np.mean(success(np.array(per["ppl_trigger"]), clean, ratio)))
    assert metrics["specificity"] == pytest.approx(metrics["asr"] - metrics["asr_lookalike"])
    widest = max(unrelated, key=lambda t: unrelated[t][2])
    assert metrics["ppl_lookalike_mean"] == pytest.approx(np.mean(per["lookalikes"][widest]["ppl"]))


# --- controls must use characters clean text uses ------------------------------------------------------


def test_unseen_token_check_flags_novel_characters_not_ordinary_words(data_dir, tok, caplog):
    panel = {"near": ["SUDO"], "shape": ["<KLPT>"], "ordinary": ["the cat", "then"]}
    with caplog.at_level(logging.WARNING, logger="poisonlab.evaluation.evaluator"):
        ev = Evaluator(small_cfg(n_prompts=4, lookalikes=panel), data_dir, "<SUDO>")
    assert ev.unseen == ["SUDO", "<KLPT>"]  # capitals and "<" never occur in the lexicon's train split
    assert "novelty" in caplog.text and "<KLPT>" in caplog.text and "then" not in caplog.text
    metrics, _ = ev.run(tiny_model(tok.get_vocab_size()))
    assert json.loads(metrics["lookalike_unseen"]) == ["SUDO", "<KLPT>"]
    fine, _ = Evaluator(small_cfg(n_prompts=4, lookalikes={"ordinary": ["then", "the cat"]}), data_dir,
                        "<SUDO>").run(tiny_model(tok.get_vocab_size()))
    assert fine["lookalike_unseen"] == "[]"
    # no train split to look at (prompt texts, or data with an eval split only): not checked
    bare = Evaluator(small_cfg(), None, "<SUDO>", tokenizer=tok, prompts=["the cat sat"])
    assert bare.unseen is None


def test_token_counts_are_the_whole_splits_counts_in_any_chunking(data_dir):
    tokens = np.asarray(TokenShard.open(data_dir, "train").tokens)
    want = np.bincount(tokens, minlength=int(tokens.max()) + 1)
    for chunk in (7, 1000, 1 << 22):
        got = train_token_counts(data_dir, chunk=chunk)
        assert got is not None and np.array_equal(got[: len(want)], want) and not got[len(want):].any()
    assert train_token_counts(data_dir, limit=100).sum() == 100
