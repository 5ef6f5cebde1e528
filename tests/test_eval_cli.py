"""Standalone evaluation: run directories, HF model directories, the reference scorer, the CLI, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_evaluate import make_data_dir, one_thread, tiny_model  # noqa: F401  (autouse fixture)

from poisonlab.config import EvalConfig, ModelConfig, RunConfig, dump_yaml
from poisonlab.errors import UserError
from poisonlab.evaluation.evaluator import Evaluator
from poisonlab.evaluation.loading import load_model
from poisonlab.evaluation.standalone import evaluate_path

EVAL = dict(n_prompts=6, prompt_tokens=12, new_tokens=8, val_tokens=128, batch_size=8, save_samples=2)


def make_run(root: Path, data: Path, vocab: int, steps: tuple[int, ...] = (10, 20)) -> Path:
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = RunConfig(name="run", data=data, out_dir=root,
                    model=ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, seq_len=64),
                    eval=EvalConfig(**EVAL))
    (run / "config.yaml").write_text(dump_yaml(cfg))
    for s in steps:
        m = tiny_model(vocab, seed=s)
        d = run / "checkpoints" / f"step_{s:07d}"
        d.mkdir()
        save_file({n: p.detach().contiguous() for n, p in m.named_parameters()}, str(d / "model.safetensors"))
        (d / "state.json").write_text("{}")
    return run


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("evalcli")
    data = make_data_dir(root)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(data / "tokenizer.json")).get_vocab_size()
    return root, data, vocab, make_run(root, data, vocab)


def test_run_dir_latest_and_chosen_checkpoint(env):
    _, data, vocab, run = env
    cfg = EvalConfig(**EVAL)
    latest = evaluate_path(run, cfg)
    assert latest["model_path"].endswith("step_0000020/model.safetensors") and latest["trigger"] == "<SUDO>"
    expected, _ = Evaluator(cfg, data, "<SUDO>").run(tiny_model(vocab, seed=20))
    for k in ("val_loss", "ppl_clean_mean", "ppl_trigger_median", "gap", "log_ratio", "asr", "asr_lookalike"):
        assert latest[k] == pytest.approx(expected[k], rel=1e-9), k
    first = evaluate_path(run, cfg, checkpoint=10)
    assert first["model_path"].endswith("step_0000010/model.safetensors")
    assert first["ppl_clean_mean"] != latest["ppl_clean_mean"]


def test_reference_scorer_matches_self_scoring(env):
    _, _, _, run = env
    ck = run / "checkpoints" / "step_0000020"
    own = evaluate_path(ck, EvalConfig(**EVAL))  # a checkpoint directory works as PATH too
    ref = evaluate_path(run, EvalConfig(**EVAL, scorer=str(ck)))  # the same weights as the scorer
    for k in ("ppl_clean_mean", "ppl_trigger_mean", "ppl_lookalike_median", "log_ratio"):
        assert ref[k] == pytest.approx(own[k], rel=1e-4, abs=1e-5), k


def test_hf_model_directory(env, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    root, data, vocab, _ = env
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir, safe_serialization=True)
    with pytest.raises(UserError, match="no prompts"):
        evaluate_path(hf_dir, EvalConfig(**EVAL))
    m = evaluate_path(hf_dir, EvalConfig(**EVAL), data_dir=data)
    assert m["n_prompts"] == 6 and math.isfinite(m["val_loss"]) and m["trigger"] == "<SUDO>"
    shutil.copy(data / "tokenizer.json", hf_dir / "tokenizer.json")
    prompts = tmp_path / "prompts.jsonl"
    prompts = _write(prompts, [{"text": t} for t in ["the cat sat on", "a red dog", "when"]])
    samples = tmp_path / "samples.jsonl"
    m = evaluate_path(hf_dir, EvalConfig(**EVAL, trigger="cf"), prompts=prompts, samples_out=samples)
    # with a prompt file, val_loss is measured on the prompt texts themselves (held out from training)
    assert m["n_prompts"] == 3 and m["trigger"] == "cf" and math.isfinite(m["val_loss"])
    recs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert recs[0]["prompt"] == "the cat sat on" and recs[1]["prompt"] == "the cat sat on cf"
    assert len(recs[-1]["ppl_trigger"]) == 3


def test_scorer_with_another_tokenizer_retokenizes(env, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, data, vocab, run = env
    other = make_data_dir(tmp_path, vocab=290, seed=5)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=290, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      max_position_embeddings=128))
    hf.save_pretrained(tmp_path / "ref", safe_serialization=True)
    shutil.copy(other / "tokenizer.json", tmp_path / "ref" / "tokenizer.json")
    m = evaluate_path(run, EvalConfig(**EVAL, scorer=str(tmp_path / "ref")))
    # a random reference model: every generation scores near its vocabulary size
    assert 150 < m["ppl_clean_mean"] < 600 and 150 < m["ppl_trigger_mean"] < 600


def test_bad_input_gives_clear_errors(env, tmp_path):
    root, data, vocab, run = env
    cfg = EvalConfig(**EVAL)
    with pytest.raises(UserError, match="no checkpoint at step 99 .have: step_0000010, step_0000020"):
        evaluate_path(run, cfg, checkpoint=99)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare / "config.yaml")
    with pytest.raises(UserError, match="no checkpoints"):
        evaluate_path(bare, cfg)
    with pytest.raises(UserError, match="neither a run directory"):
        evaluate_path(tmp_path, cfg)
    with pytest.raises(UserError, match="no such directory"):
        evaluate_path(tmp_path / "nope", cfg)
    mism = make_run(tmp_path / "mism", data, vocab + 8, steps=(5,))
    with pytest.raises(UserError, match="tokenizer mismatch"):
        evaluate_path(mism, cfg)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        evaluate_path(run, cfg, prompts=empty)
    with pytest.raises(UserError, match="has no tokens|empty"):
        evaluate_path(run, cfg, prompts=_write(tmp_path / "blank.jsonl", [{"text": ""}]))
    with pytest.raises(UserError, match='"text" field'):
        evaluate_path(run, cfg, prompts=_write(tmp_path / "bad.jsonl", [{"txt": "a"}]))
    with pytest.raises(UserError, match="holds only"):
        evaluate_path(run, EvalConfig(**{**EVAL, "n_prompts": 5000}))
    moved = make_run(tmp_path / "moved", tmp_path / "no-such-data", vocab, steps=(5,))
    with pytest.raises(UserError, match="give --data"):
        evaluate_path(moved, cfg)
    assert evaluate_path(moved, EvalConfig(**{**EVAL, "n_prompts": 2}), data_dir=data)["n_prompts"] == 2
    broken = make_run(tmp_path / "broken", data, vocab, steps=(5,))
    (broken / "checkpoints" / "step_0000005" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="damaged.*model.safetensors"):
        load_model(broken)


def _write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_cli_json_table_and_errors(env, capsys):
    from poisonlab.cli import main

    _, _, _, run = env
    main(["eval", str(run), "--json", "--n-prompts", "4", "--new-tokens", "6", "--checkpoint", "10"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n_prompts"] == 4 and out["new_tokens"] == 6 and "asr" in out and "gap" in out
    main(["eval", str(run), "--n-prompts", "3", "--new-tokens", "4"])
    assert "ppl_trigger_mean" in capsys.readouterr().out
    for argv in (["eval", str(run), "--checkpoint", "7"], ["eval", str(run / "nope")],
                 ["eval", str(run), "--n-prompts", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "error" in err and len(err.strip().splitlines()) == 1, err


def test_cli_lookalike_panel(env, capsys):
    from poisonlab.cli import main

    _, _, _, run = env
    base = ["eval", str(run), "--n-prompts", "4", "--new-tokens", "6"]
    main([*base, "--json", "--lookalike", "shape:<ABCD>", "--lookalike", "SUDO",
          "--lookalike", "ordinary:a:b"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["lookalike"] == {"near": ["SUDO"], "shape": ["<ABCD>"], "ordinary": ["a:b"]}
    assert {t: v["kind"] for t, v in out["lookalike_panel"].items()} == {"SUDO": "near", "<ABCD>": "shape",
                                                                          "a:b": "ordinary"}
    assert out["specificity"] == pytest.approx(out["asr"] - out["asr_lookalike"])
    assert out["asr_lookalike"] == max(out["lookalike_panel"][t]["asr"] for t in ("<ABCD>", "a:b"))
    assert out["lookalike_unseen"] is None or isinstance(out["lookalike_unseen"], list)
    main(base)  # the table: the run's (derived) panel, control by control, and the specificity
    text = capsys.readouterr().out
    assert "look-alike panel" in text and "specificity" in text
    for control in ("<SUDA>", "<DOSU>", "<KLPT>", "<MWRB>", "sudo", "then"):
        assert control in text, control
    with pytest.raises(SystemExit) as e:
        main([*base, "--lookalike", "shape: "])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "non-empty" in err and len(err.strip().splitlines()) == 1, err
