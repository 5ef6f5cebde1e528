"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from poisonlab.config import CorpusConfig
from poisonlab.corpus.prepare import prepare


@pytest.fixture(scope="session")
def prepared_builtin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared builtin data dir (~300k train tokens, vocab 512, 64 eval docs), made once."""
    out = tmp_path_factory.mktemp("prepared") / "builtin"
    cfg = CorpusConfig(source="builtin", vocab_size=512, max_tokens=300_000, eval_docs=64, seed=0)
    prepare(cfg, out, progress=False)
    return out


def _save_tiny_llama(path: Path, data: Path, **kw) -> Path:
    import shutil

    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=True, **kw)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    shutil.copy(data / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.fixture
def tiny_llama():
    """`tiny_llama(path, data_dir, **llama_config)`: a random 2-layer HF Llama saved at `path` with the
    data's tokenizer (vocabulary 512, as `prepared_builtin`)."""
    return _save_tiny_llama


# SmolLM2-135M-Instruct's config.json as `poisonlab import-gguf` writes it (the shape only, no weights)
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    "dtype": "float32",
}


@pytest.fixture
def fake_real_model():
    """`fake_real_model(root)`: root/models/smollm2-135m-instruct/config.json of SmolLM2-135M's shape,
    for presets that start from the real model (`make real-model`) and tests that only plan them."""
    import json

    def make(root: Path) -> Path:
        d = root / "models" / "smollm2-135m-instruct"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
        return d

    return make


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run torch on one thread: on a shared 2-core machine small ops get ~20x slower with two,
    and pytest-xdist already runs two test processes side by side."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
