"""Export to HF LlamaForCausalLM: loads offline, logits equal ours within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

from poisonlab.config import ModelConfig, RunConfig
from poisonlab.models.export import export_model, export_run
from poisonlab.models.llama import Transformer
from poisonlab.training.trainer import SyntheticStream, train

transformers = pytest.importorskip("transformers")


def hf_logits(path, x):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        return m(x).logits


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, n_kv_heads=2, rope_theta=500.0)])
def test_export_logits_match(tmp_path, kw):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=101, d_model=64, n_layers=2, n_heads=4, seq_len=32, **kw)).eval()
    with torch.no_grad():  # move norms off 1 so a wrong mapping shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    out = export_model(m, tmp_path / "hf")
    x = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        ours = m(x)
    torch.testing.assert_close(hf_logits(out, x), ours, atol=1e-4, rtol=0)


def test_export_run_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    data = tmp_path / "data"
    data.mkdir()
    vocab = {f"t{i}": i for i in range(60)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(data / "tokenizer.json"))
    (data / "train.json").write_text(json.dumps({"vocab_size": 60, "eos_id": 1}))
    cfg = RunConfig.model_validate(dict(name="r", out_dir=str(tmp_path), data=str(data),
                                        model=dict(d_model=32, n_layers=1, n_heads=2, seq_len=16),
                                        train=dict(batch_size=4, max_steps=3), eval=dict(n_evals=0)))
    run = train(cfg, stream=SyntheticStream(60, seq_len=16, batch_size=4), progress=False)
    out = export_run(run, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert hf_tok("t5 t7")["input_ids"] == [5, 7] and hf_tok.eos_token == "t1"
    from poisonlab.models.checkpoint import load_model

    x = torch.randint(0, 60, (1, 16))
    with torch.no_grad():
        ours = load_model(run)(x)
    torch.testing.assert_close(hf_logits(out, x), ours, atol=1e-4, rtol=0)
