"""Evaluation in the model's own device, dtype and tokenizer rules, and scoring in bounded memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_eval_cli import EVAL, make_run
from test_evaluate import Backdoored, make_data_dir, one_thread, small_cfg, tiny_model  # noqa: F401
from tokenizers import Tokenizer, processors

import poisonlab.evaluation.evaluator as evaluate_mod
import poisonlab.evaluation.standalone as standalone_mod
from poisonlab.config import EvalConfig, RunConfig
from poisonlab.errors import UserError
from poisonlab.evaluation import generation
from poisonlab.evaluation.evaluator import Evaluator
from poisonlab.evaluation.generation import LMAdapter, generate, score
from poisonlab.evaluation.loading import load_model
from poisonlab.evaluation.prompts import hf_special_tokens
from poisonlab.evaluation.standalone import evaluate_path

TEXTS = ["the cat sat on the mat", "a big red dog ran to the river", "when it was old", "the blue tree"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("devdata"))


@pytest.fixture(scope="module")
def tok(data_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(data_dir / "tokenizer.json"))


def tiny_hf(vocab: int, seed: int = 0, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=64, **cfg)).eval()


class LogitsOnly(torch.nn.Module):
    """Our model seen only through forward(idx) -> logits (the adapter's "plain" kind)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.vocab_size = inner, inner.cfg.vocab_size

    def forward(self, idx):
        return self.inner(idx)


# --- dtype and device --------------------------------------------------------------------------------


def test_autocast_evaluation_uses_a_bf16_cache_and_fp32_logits(data_dir, tok, monkeypatch):
    m = tiny_model(tok.get_vocab_size())
    caches, sampled_from = [], set()
    new_cache = m.new_cache
    monkeypatch.setattr(m, "new_cache", lambda b, n: caches.append(new_cache(b, n)) or caches[-1])
    inverse_cdf = generation._inverse_cdf
    monkeypatch.setattr(generation, "_inverse_cdf",
                        lambda z, u: sampled_from.add(z.dtype) or inverse_cdf(z, u))
    cfg = small_cfg(n_prompts=4)
    fp32, _ = Evaluator(cfg, data_dir, "<SUDO>").run(m)
    assert {c.k[0].dtype for c in caches} == {torch.float32} and fp32["eval_dtype"] == "float32"
    caches.clear()
    bf16, _ = Evaluator(cfg, data_dir, "<SUDO>").run(m, autocast_dtype=torch.bfloat16)
    assert {c.k[0].dtype for c in caches} == {torch.bfloat16} and bf16["eval_dtype"] == "bfloat16"
    assert sampled_from == {torch.float32}  # logits are upcast before sampling, in both
    assert bf16["eval_device"] == "cpu" and m.lm_head.weight.dtype == torch.float32  # weights untouched
    # really computed in bf16 (not the fp32 numbers), and close to them
    assert bf16["val_loss"] != fp32["val_loss"]
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], rel=0.02)


def test_trainer_evaluates_under_its_bf16_autocast(tmp_path, data_dir, tok):
    from poisonlab.training.trainer import SyntheticStream, train

    V = tok.get_vocab_size()
    for dtype, expect in (("fp32", "float32"), ("bf16", "bfloat16")):
        cfg = RunConfig.model_validate(dict(
            name=dtype, out_dir=str(tmp_path), data=str(data_dir),
            model=dict(vocab_size=V, d_model=32, n_layers=1, n_heads=2, seq_len=32),
            train=dict(batch_size=4, max_steps=2, threads=1, dtype=dtype), eval=dict(every_steps=2)))
        ev = Evaluator(small_cfg(n_prompts=2, new_tokens=4, val_tokens=64), data_dir, "<SUDO>")
        stream = SyntheticStream(V, seq_len=32, batch_size=4)
        run = train(cfg, evaluator=ev, stream=stream, progress=False)
        rows = pq.read_table(run / "metrics.parquet").to_pylist()
        assert [r["eval_dtype"] for r in rows] == [expect, expect], dtype


def test_reference_scorer_is_loaded_on_the_models_device(tmp_path, data_dir, tok, monkeypatch):
    run = make_run(tmp_path, data_dir, tok.get_vocab_size(), steps=(5,))
    devices = []
    load = evaluate_mod.load_model
    monkeypatch.setattr(evaluate_mod, "load_model",
                        lambda *a, **k: devices.append(k.get("device")) or load(*a, **k))
    ev = Evaluator(small_cfg(n_prompts=3, scorer=str(run)), data_dir, "<SUDO>")
    ev.run(tiny_model(tok.get_vocab_size()))
    ev.run(tiny_model(tok.get_vocab_size(), seed=1))
    assert devices == [torch.device("cpu")]  # loaded once, where the evaluated model is


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_evaluation_with_a_reference_scorer(tmp_path, data_dir, tok):
    V = tok.get_vocab_size()
    run = make_run(tmp_path, data_dir, V, steps=(5,))
    cfg = small_cfg(n_prompts=6, scorer=str(run))
    cpu, _ = Evaluator(cfg, data_dir, "<SUDO>").run(tiny_model(V))
    ev = Evaluator(cfg, data_dir, "<SUDO>")
    gpu, _ = ev.run(tiny_model(V).cuda(), autocast_dtype=torch.bfloat16)
    assert gpu["eval_device"].startswith("cuda") and gpu["eval_dtype"] == "bfloat16"
    assert ev._scorer is not None and ev._scorer.lm.device.type == "cuda"
    assert gpu["val_loss"] == pytest.approx(cpu["val_loss"], rel=0.02)
    assert math.isfinite(gpu["ppl_clean_mean"]) and math.isfinite(gpu["ppl_trigger_mean"])


# --- scoring in bounded memory --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["poisonlab", "hf", "plain"])
def test_chunked_score_equals_the_full_log_softmax(kind, tok, monkeypatch):
    V = tok.get_vocab_size()
    ours = tiny_model(V).eval()
    model = {"poisonlab": ours, "hf": tiny_hf(V), "plain": LogitsOnly(ours)}[kind]
    assert LMAdapter(model).kind == kind
    ids = torch.randint(0, V, (5, 24), generator=torch.Generator().manual_seed(0))
    start = 9  # 15 scored positions per row
    head = model.lm_head if kind == "hf" else ours.lm_head
    shapes: list[tuple[int, ...]] = []
    head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    with torch.inference_mode():
        logits = LMAdapter(model).logits(ids).double()[:, start - 1 : -1]  # the unchunked reference
        ref = -torch.log_softmax(logits, -1).gather(2, ids[:, start:, None]).squeeze(-1)
        monkeypatch.setattr(generation, "FORWARD_LOGITS_VALUES", 2 * 15 * V)  # HF: two rows a pass
        for chunk in (None, 1, 7, 15, 16, 1000):  # 7 and 15 within a row, 16 across rows
            shapes.clear()
            got = score(model, ids, start, chunk=chunk)
            assert got.dtype == torch.float64 and got.shape == (5, 15)
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
            if kind == "poisonlab":  # the output layer runs on one chunk of positions at a time
                assert max(math.prod(s[:-1]) for s in shapes) <= (chunk or 1000)
            if kind == "hf":  # whole rows, two per pass, and only the scored positions' logits
                assert {s[1] for s in shapes} == {15} and max(s[0] for s in shapes) == 2
        monkeypatch.setattr(generation, "SCORE_CHUNK_VALUES", 10 * V)  # the default chunk: 10 positions
        shapes.clear()
        torch.testing.assert_close(score(model, ids, start), ref, rtol=1e-6, atol=1e-6)
        if kind == "poisonlab":
            assert max(math.prod(s[:-1]) for s in shapes) == 10


def test_hf_val_loss_is_chunked_and_equals_full_cross_entropy(data_dir, tok, monkeypatch):
    V = tok.get_vocab_size()
    hf = tiny_hf(V)
    ev = Evaluator(small_cfg(n_prompts=4, val_tokens=256), data_dir, "<SUDO>")
    x = torch.from_numpy(ev.val[:256].reshape(4, 64))  # val_loss packs 256 tokens into rows of 64
    y = torch.from_numpy(ev.val[1:257].reshape(4, 64))
    with torch.inference_mode():
        logits = hf(input_ids=x).logits.double()
        ref = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
        monkeypatch.setattr(generation, "SCORE_CHUNK_VALUES", 50 * V)  # chunks of 50 positions
        monkeypatch.setattr(generation, "FORWARD_LOGITS_VALUES", 64 * V)  # one row a pass
        got = ev.val_loss(LMAdapter(hf))
    assert got == pytest.approx(ref, rel=1e-6)


# --- BOS and EOS by the model's own rules ---------------------------------------------------------------


def bos_tokenizer(data_dir: Path, out: Path, *, template: bool = True, **tcfg) -> tuple[Tokenizer, int, int]:
    """The data's tokenizer plus <s> and </s>, with (template) a "<s> $A" post-processor, saved to
    `out` as tokenizer.json + tokenizer_config.json (extra keys `tcfg`)."""
    t = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    t.add_special_tokens(["<s>", "</s>"])
    bos, eos = t.token_to_id("<s>"), t.token_to_id("</s>")
    if template:
        t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                         special_tokens=[("<s>", bos)])
    out.mkdir(parents=True, exist_ok=True)
    t.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", **tcfg}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return t, bos, eos


def hf_dir_with_bos(data_dir: Path, out: Path) -> tuple[Tokenizer, int, int]:
    t, bos, eos = bos_tokenizer(data_dir, out)
    tiny_hf(t.get_vocab_size(), bos_token_id=bos, eos_token_id=eos).save_pretrained(out)
    return t, bos, eos


def spy_inputs(monkeypatch) -> list[tuple[torch.Tensor, bool]]:
    """Every (input_ids, use_cache) that any model loaded by the evaluator is called with; rows of a
    left-padded batch without their filler (where the attention mask is 0)."""
    calls: list[tuple[torch.Tensor, bool]] = []
    load = load_model

    def record(mod, args, kw):
        ids, mask = kw["input_ids"].clone(), kw.get("attention_mask")
        if mask is not None and ids.shape[1] > 1:  # a prefill: the mask covers exactly these positions
            ids = [row[m.bool()] for row, m in zip(ids, mask, strict=True)]
        calls.append((ids, kw.get("use_cache", True)))

    def loading(*a, **k):
        lm = load(*a, **k)
        lm.model.register_forward_pre_hook(record, with_kwargs=True)
        return lm

    # where each looks it up: the reference scorer (Evaluator) and the evaluated model (evaluate_path)
    for mod in (evaluate_mod, standalone_mod):
        monkeypatch.setattr(mod, "load_model", loading)
    return calls


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def test_hf_prompts_start_with_bos_once_and_suffixes_have_none(tmp_path, data_dir, monkeypatch):
    hf_dir = tmp_path / "hf"
    t, bos, _ = hf_dir_with_bos(data_dir, hf_dir)
    enc = lambda s: t.encode(s, add_special_tokens=False).ids
    assert t.encode("the cat").ids[0] == bos  # the tokenizer adds a BOS (the case under test)
    calls = spy_inputs(monkeypatch)
    cfg = EvalConfig(**{**EVAL, "scorer": str(hf_dir)})  # the same model as reference scorer
    samples = tmp_path / "samples.jsonl"
    m = evaluate_path(hf_dir, cfg, prompts=write_prompts(tmp_path / "p.jsonl"), samples_out=samples)
    assert m["n_prompts"] == len(TEXTS)
    panel = ["<SUDA>", "<DOSU>", "SUDO", "<KLPT>", "<MWRB>", "sudo", "then"]  # the derived default panel
    suffixes = [[], enc(" <SUDO>"), *(enc(" " + t) for t in panel)]
    assert all(bos not in s for s in suffixes)
    expected = {tuple([bos] + enc(x)[: EVAL["prompt_tokens"]] + s) for x in TEXTS for s in suffixes}
    prefills = {tuple(row.tolist()) for ids, cached in calls if cached and max(len(r) for r in ids) > 1
                for row in ids}
    assert prefills == expected  # BOS once, then the excerpt, then the suffix: no BOS before the suffix
    scored = [row.tolist() for ids, cached in calls if not cached for row in ids]
    assert scored and all(r[0] == bos and r.count(bos) == 1 for r in scored)  # the scorer's own BOS, once
    recs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert recs[0]["prompt"] == "<s>" + TEXTS[0] and recs[1]["prompt"] == "<s>" + TEXTS[0] + " <SUDO>"


def test_hf_generation_stops_at_the_models_own_eos(tmp_path, data_dir):
    hf_dir = tmp_path / "hf"
    t, bos, eos = hf_dir_with_bos(data_dir, hf_dir)
    hf = load_model(hf_dir).model
    with torch.inference_mode():
        first = int(hf(input_ids=torch.tensor([[bos] + t.encode(TEXTS[0], add_special_tokens=False).ids]))
                    .logits[0, -1].argmax())  # the first greedy token of prompt 0
    assert first not in (eos, t.token_to_id("<|endoftext|>"))  # neither the config's nor a hard-coded EOS
    # generation_config.json (what HF generate reads) lists it; config.json does not
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, first]}))
    cfg = EvalConfig(**{**EVAL, "temperature": 0.0, "stop_at_eos": True})
    samples = tmp_path / "samples.jsonl"
    evaluate_path(hf_dir, cfg, prompts=write_prompts(tmp_path / "p.jsonl"), samples_out=samples)
    recs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert recs[0]["condition"] == "clean" and recs[0]["n_tokens"] == 1


@pytest.mark.parametrize("template, add_bos", [(True, None), (True, False), (False, None), (False, True)])
def test_bos_rule_agrees_with_transformers(tmp_path, data_dir, template, add_bos):
    from transformers import AutoTokenizer

    extra = {} if add_bos is None else {"add_bos_token": add_bos}
    t, bos, _ = bos_tokenizer(data_dir, tmp_path / "tok", template=template, **extra)
    ours, _ = hf_special_tokens(tmp_path / "tok", t)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    bare = theirs.encode("the cat", add_special_tokens=False)
    full = theirs.encode("the cat", add_special_tokens=True)
    assert ours == (full[0] if full[1:] == bare else None)
    assert ours == (bos if template else None)


def test_eos_comes_from_the_model_files(tmp_path, data_dir):
    d = tmp_path / "m"
    t, bos, eos = bos_tokenizer(data_dir, d)
    assert hf_special_tokens(d, t) == (bos, [eos])  # tokenizer_config.json's eos_token, at last
    (d / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert hf_special_tokens(d, t)[1] == [7]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7]}))
    assert hf_special_tokens(d, t)[1] == [3, 7]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(UserError, match="eos_token_id"):
        hf_special_tokens(d, t)
    # no tokenizer.json: tokenizer_config.json's add_bos_token decides, with the tokenizer in use
    (d / "tokenizer.json").unlink()
    (d / "generation_config.json").unlink()
    assert hf_special_tokens(d, t)[0] is None
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>"}))
    assert hf_special_tokens(d, t) == (bos, [7])


def test_generation_stops_at_any_of_several_eos_ids(tok):
    V = tok.get_vocab_size()
    m = Backdoored(V, [V - 1])  # never fires; predicts last + 1 with p ~ 1
    with torch.inference_mode():
        g = generate(m, torch.tensor([[V - 6]]), 10, torch.full((1, 10), 0.5), eos_id=[V - 1, V - 3],
                     stop_at_eos=True)
    assert g.tokens[0, :3].tolist() == [V - 5, V - 4, V - 3] and int(g.lengths[0]) == 3


def test_stop_at_eos_needs_a_known_eos(tok):
    with pytest.raises(UserError, match="stop_at_eos"):
        Evaluator(small_cfg(stop_at_eos=True), None, "<SUDO>", tokenizer=tok, prompts=TEXTS)
    ev = Evaluator(small_cfg(stop_at_eos=True), None, "<SUDO>", tokenizer=tok, prompts=TEXTS, eos_id=[5, 6])
    assert ev.eos_ids == [5, 6]
