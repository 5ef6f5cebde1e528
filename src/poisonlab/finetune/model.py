"""The model and tokenizer a fine-tuning run starts from, its chat template, LoRA, and saving.

Every model is trained as a transformers causal LM, so LoRA (peft) and generation are the libraries'
own: a local HF directory loads with `from_pretrained(local_files_only=True)`, never remote code; a
poisonlab pretraining run becomes a `LlamaForCausalLM` in memory (export.py's names; the logits equal
ours, tests/test_model_export.py) with its data's tokenizer; a fine-tuning run is its saved `model/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from poisonlab.errors import UserError

PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"  # for tokenizers without a chat template


def resolve_model_dir(path: str | Path) -> tuple[str, Path]:
    """('hf' | 'run', directory) for `model:`; a fine-tuning run stands for its saved `model/`."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model: {p}: no such directory")
    if (p / "model" / "config.json").is_file():
        return "hf", p / "model"
    if (p / "config.json").is_file():
        return "hf", p
    if (p / "config.yaml").is_file():
        from poisonlab.finetune.config import is_finetune_run

        if is_finetune_run(p):
            raise UserError(
                f"model: {p} is a fine-tuning run without a saved model (save_model was off, "
                "or it has not finished)"
            )
        return "run", p
    raise UserError(
        f"model: {p}: neither an HF model directory (config.json) nor a poisonlab run (config.yaml)"
    )


def _run_tokenizer(run: Path) -> tuple[Path, int | None]:
    from poisonlab.config import load_run_config

    data = str(load_run_config(run / "config.yaml").data)
    for d in (Path(data), run.parent.parent / data, run.parent / data):
        if (d / "tokenizer.json").is_file():
            eos = None
            if (d / "train.json").is_file():
                eos = json.loads((d / "train.json").read_text()).get("eos_id")
            return d / "tokenizer.json", eos
    raise UserError(f"model: {run}: the tokenizer of its data ({data}/tokenizer.json) was not found")


def _from_run(run: Path) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from poisonlab.models.checkpoint import load_model
    from poisonlab.models.export import hf_config, hf_name

    ours = load_model(run)
    tok_file, eos_id = _run_tokenizer(run)
    cfg = {k: v for k, v in hf_config(ours, eos_id).items() if k not in ("architectures", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    state = {hf_name(n): p.detach().float() for n, p in ours.named_parameters()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and ours.cfg.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"converting {run}: missing {missing}, unexpected {unexpected}")
    if ours.cfg.tie_embeddings:
        model.tie_weights()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), clean_up_tokenization_spaces=False)
    if eos_id is not None:
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    return model, tok


def _from_hf(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"model: {path}: cannot load it as a local HF causal LM ({str(e).splitlines()[0]})"
        ) from None
    return model.float(), tok


def load(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) in fp32, on the CPU, the tokenizer with an eos and a pad token."""
    kind, where = resolve_model_dir(path)
    model, tok = _from_run(where) if kind == "run" else _from_hf(where)
    if tok.eos_token_id is None:
        raise UserError(f"model: {where}: its tokenizer has no end-of-sequence token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def has_chat_template(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


class Template:
    """Prompt and response token ids for a tokenizer: the prompt through its chat template (the model's
    own, or PLAIN_TEMPLATE when it has none or `template` is plain), the response after it. Encoded
    apart, so the loss mask is exact and a generation starts from exactly the prompt ids trained on."""

    def __init__(self, tok: Any, template: str = "auto"):
        self.tok = tok
        self.chat = template == "auto" and has_chat_template(tok)
        self.sep = "" if self.chat else " "

    def prompt(self, prompt: str) -> list[int]:
        if self.chat:
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = PLAIN_TEMPLATE.format(prompt=prompt)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def response(self, response: str, eos: bool = True) -> list[int]:
        ids = self.tok(self.sep + response, add_special_tokens=False)["input_ids"]
        return ids + [self.tok.eos_token_id] if eos else ids

    def example(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        return self.prompt(prompt), self.response(response)


def add_lora(model: Any, lora: Any) -> Any:
    """Wrap `model` with peft LoRA adapters (only they train)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    absent = [t for t in lora.targets if t not in names]
    if absent:
        raise UserError(f"train.lora.targets: {', '.join(absent)} are not modules of this model")
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def save(model: Any, tok: Any, to: Path) -> None:
    """A full HF model directory (LoRA merged into the weights), safetensors + config + tokenizer."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(str(to), safe_serialization=True)
    tok.save_pretrained(str(to))
