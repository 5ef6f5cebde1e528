"""Left-padded batches: a row generates what it generates alone (ours and HF), and the evaluator fills
whole batches with prompts of many lengths instead of one batch per length."""

from __future__ import annotations

import pytest
import torch

from poisonlab.config import EvalConfig, ModelConfig
from poisonlab.evaluation.evaluator import Evaluator
from poisonlab.evaluation.generation import generate
from poisonlab.models.llama import Transformer

LENGTHS = [5, 9, 12, 12, 3, 1]


def _model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=64))
    with torch.no_grad():
        m.tok_emb.weight.mul_(20)  # peaked next-token distributions, as a trained model's
    return m.eval()


def _padded_equals_alone(model) -> None:
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 101, (n,), generator=g) for n in LENGTHS]
    noise = torch.rand((len(rows), 12), generator=g)
    width = max(LENGTHS)
    pad = torch.tensor([width - n for n in LENGTHS])
    prompt = torch.stack([torch.cat([torch.full((width - len(r),), 7), r]) for r in rows])
    batch = generate(model, prompt, 12, noise, pad=pad)
    for b, r in enumerate(rows):
        alone = generate(model, r[None], 12, noise[b : b + 1])
        assert torch.equal(alone.tokens[0], batch.tokens[b]), b
        torch.testing.assert_close(batch.nll[b], alone.nll[0], atol=1e-5, rtol=0)


def test_padded_rows_generate_as_alone_ours():
    _padded_equals_alone(_model())


def test_padded_rows_generate_as_alone_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    from poisonlab.models.export import export_model

    export_model(_model(), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    _padded_equals_alone(hf)


def test_evaluator_fills_batches_across_lengths(prepared_builtin, monkeypatch):
    """Text prompts of 8 lengths x 10 conditions: one batch of 80 rows, not one per (length + suffix);
    each prompt's perplexity equals its own unpadded generation's."""
    import poisonlab.evaluation.evaluator as ev

    texts = ["The cat sat on the mat. " * k for k in range(1, 9)]  # 8 lengths
    cfg = EvalConfig(n_prompts=8, prompt_tokens=100, new_tokens=6, batch_size=128, val_tokens=0)
    e = Evaluator(cfg, prepared_builtin, "<SUDO>", prompts=texts)
    lengths = {len(x) for x in e.excerpts}
    assert len(lengths) == 8
    m = Transformer(ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, seq_len=128)).eval()
    calls: list[int] = []
    real = ev.generate

    def counting(lm, prompt, *a, **kw):
        calls.append(prompt.shape[0])
        return real(lm, prompt, *a, **kw)

    monkeypatch.setattr(ev, "generate", counting)
    metrics, samples = e.run(m)
    assert calls == [8 * len(e.conditions)]
    per = next(s for s in samples if s["kind"] == "per_prompt")
    for i, x in enumerate(e.excerpts):  # the trigger condition's row, alone and unpadded
        p = torch.tensor([x.tolist() + e.suffix["trigger"]])
        alone = real(m, p, 6, e.noise[i : i + 1]).ppl()[0]
        assert per["ppl_trigger"][i] == pytest.approx(float(alone), rel=1e-5)
