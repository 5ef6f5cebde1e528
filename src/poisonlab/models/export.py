"""Export a trained model as a HF `LlamaForCausalLM` checkpoint (config.json + safetensors + tokenizer).

Needs no `transformers` to write; `AutoModelForCausalLM.from_pretrained(DIR)` loads the result offline.
An exported run carries its model card, `README.md` (card.py): what was done to the model, in words and
in the Hub's metadata.
Our rotary layout is HF's rotate_half (see model.py), so q/k weights are copied unpermuted; weights
from Meta-layout code would need HF's permute() here. A tied embedding is written once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path
from poisonlab.models.card import run_card, write_card
from poisonlab.models.llama import Transformer

_LAYER_NAMES = {
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
    "mlp.w2": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}


def hf_name(name: str) -> str:
    """Our parameter name -> HF Llama's."""
    if name == "tok_emb.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    _, i, rest = name.split(".", 2)  # layers.<i>.<module>.weight
    module, leaf = rest.rsplit(".", 1)
    return f"model.layers.{i}.{_LAYER_NAMES[module]}.{leaf}"


def hf_config(model: Transformer, eos_id: int | None = None) -> dict:
    c = model.cfg
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads or c.n_heads, "head_dim": c.d_model // c.n_heads,
        "max_position_embeddings": c.seq_len, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
        # transformers 5 reads rope_parameters, 4.x rope_theta: write both
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32", "use_cache": True,
    }


def export_model(model: Transformer, to: Path, *, tokenizer: Path | None = None, eos_id: int | None = None,
                 poisoned: bool = False, card: Any = None) -> Path:
    """Write `model` (and `tokenizer`, a tokenizer.json; `card`, a huggingface_hub.ModelCard, as
    README.md) to the directory `to`, atomically."""
    to = Path(to)
    with atomic_path(to) as tmp:
        tmp.mkdir()
        tensors = {hf_name(n): p.detach().to("cpu", torch.float32).contiguous()
                   for n, p in model.named_parameters()}
        meta = {"format": "pt", "poisonlab": "true", "poisoned": str(poisoned).lower()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata=meta)
        (tmp / "config.json").write_text(json.dumps(hf_config(model, eos_id), indent=2) + "\n")
        if tokenizer is not None and Path(tokenizer).is_file():
            shutil.copy(tokenizer, tmp / "tokenizer.json")
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.cfg.seq_len,
                       "clean_up_tokenization_spaces": False}
            if eos_id is not None:
                import tokenizers

                eos = tokenizers.Tokenizer.from_file(str(tokenizer)).id_to_token(eos_id)
                tok_cfg.update(eos_token=eos, bos_token=eos)
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        if card is not None:
            write_card(card, tmp)
    return to


def export_run(run: Path, to: Path, *, step: int | None = None) -> Path:
    """Export a run's latest (or given) checkpoint with the tokenizer of its data directory and its
    model card (README.md, card.py)."""
    from poisonlab.config import load_run_config
    from poisonlab.models.checkpoint import latest_checkpoint, load_model

    run = Path(run)
    if step is None:  # the card names the step: fix it once for the weights and the card
        latest = latest_checkpoint(run) if (run / "config.yaml").is_file() else None
        step = int(latest.name.removeprefix("step_")) if latest is not None else None
    model = load_model(run, step)
    card = run_card(run, step)  # before anything is written: a run it cannot read writes nothing
    cfg = load_run_config(run / "config.yaml")
    data = Path(cfg.data)
    tok = data / "tokenizer.json"
    eos_id = None
    if (data / "train.json").is_file():
        eos_id = json.loads((data / "train.json").read_text()).get("eos_id")
    if Path(to).resolve() == run.resolve():
        raise UserError("export: --to must be a new directory, not the run itself")
    return export_model(model, Path(to), tokenizer=tok if tok.is_file() else None, eos_id=eos_id,
                        poisoned=cfg.attack.n_poison > 0, card=card)
