"""val_loss is a number wherever clean held-out text exists: the prompt texts when there is no prepared
data, and an eval split shorter than the model's context (both gave NaN before)."""

from __future__ import annotations

import math

import torch

from poisonlab.config import CorpusConfig, EvalConfig, ModelConfig
from poisonlab.corpus.prepare import prepare
from poisonlab.corpus.shards import TokenShard
from poisonlab.corpus.tokenizer import load_tokenizer
from poisonlab.evaluation.evaluator import Evaluator
from poisonlab.models.llama import Transformer

TEXTS = ["The river ran past the mill and under the old stone bridge.",
         "She counted the boats twice, then wrote the number in her book.",
         "x"]  # one token: nothing to predict, skipped


def _model(seq_len: int = 128) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, seq_len=seq_len)).eval()


def test_val_loss_from_prompt_texts(prepared_builtin):
    tok = load_tokenizer(prepared_builtin)
    cfg = EvalConfig(n_prompts=3, prompt_tokens=6, new_tokens=2)
    m = _model()
    metrics, _ = Evaluator(cfg, None, "<SUDO>", tokenizer=tok, prompts=TEXTS).run(m)
    total, n = 0.0, 0
    for t in TEXTS:  # each whole text (not cut to prompt_tokens), on its own, by hand
        ids = torch.tensor([tok.encode(t, add_special_tokens=False).ids])
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = m(ids[:, :-1])
        total += float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    assert n > 12 and math.isclose(metrics["val_loss"], total / n, rel_tol=1e-5)


def test_val_loss_with_eval_split_shorter_than_context(tmp_path):
    data = tmp_path / "small"
    prepare(CorpusConfig(source="builtin", vocab_size=512, max_tokens=30_000, eval_docs=3, seed=0), data,
            progress=False)
    split = len(TokenShard.open(data, "eval").tokens)
    assert split < 4096
    cfg = EvalConfig(n_prompts=2, prompt_tokens=8, new_tokens=2, val_tokens=100_000)
    metrics, _ = Evaluator(cfg, data, "<SUDO>").run(_model(seq_len=4096))
    assert math.isfinite(metrics["val_loss"]) and 4 < metrics["val_loss"] < 8  # ~log(512) = 6.2, untrained
