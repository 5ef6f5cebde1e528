"""Standalone evaluation: a saved run or a local HF model evaluated from its path (`poisonlab eval`),
and the evaluation settings a run was trained with.

Its own module: it puts loading, prompts and the Evaluator together; the trainer needs none of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from poisonlab.config import EvalConfig
from poisonlab.corpus.tokenizer import load_tokenizer
from poisonlab.errors import UserError
from poisonlab.evaluation.evaluator import Evaluator
from poisonlab.evaluation.loading import load_model
from poisonlab.evaluation.panel import panel_json
from poisonlab.evaluation.prompts import read_prompt_file


def evaluate_path(path: str | Path, cfg: EvalConfig, *, data_dir: str | Path | None = None,
                  checkpoint: int | None = None, prompts: str | Path | None = None,
                  samples_out: str | Path | None = None, device: str | torch.device = "cpu",
                  autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Evaluate a run directory (latest or chosen checkpoint) or a local HF model directory.

    Prompts come from `prompts` (a .jsonl file or a prepared data directory), else `data_dir`, else the
    run's data. The trigger is `cfg.trigger`, else the run's, else "<SUDO>". A HF model gets its
    tokenizer's BOS and its own end-of-text tokens (`hf_special_tokens`).
    """
    data = Path(data_dir) if data_dir is not None else None
    lm = load_model(path, checkpoint, data_dir=data, device=device)
    texts = None
    if prompts is not None:
        pp = Path(prompts)
        if pp.is_dir():
            data = pp
        else:
            texts = read_prompt_file(pp)
            if not texts:
                raise UserError(f"{pp}: the prompt set is empty")
    data = data or lm.data_dir
    if texts is None and data is None:
        raise UserError(f"{path}: no prompts: give --prompts FILE.jsonl or --data DIR (prepared data)")
    tok = lm.tokenizer
    if tok is None:
        if data is None:
            raise UserError(f"{path}: no tokenizer.json; give --data DIR whose tokenizer the model uses")
        tok = load_tokenizer(data)
    if data is not None and texts is None:
        dtok = load_tokenizer(data)
        if dtok.get_vocab_size() != tok.get_vocab_size():
            raise UserError(f"tokenizer mismatch: {data}/tokenizer.json has {dtok.get_vocab_size()} tokens, "
                            f"the model's tokenizer {tok.get_vocab_size()}")
    trigger = cfg.trigger or lm.trigger or "<SUDO>"
    ev = Evaluator(cfg, data, trigger, tokenizer=tok, prompts=texts, bos_id=lm.bos_id,
                   eos_id=lm.eos_ids or None)
    metrics, samples = ev.run(lm.model, autocast_dtype=autocast_dtype)
    metrics = {"model_path": lm.source, "trigger": trigger, "lookalike": panel_json(ev.panel), **metrics}
    if samples_out is not None:
        from poisonlab.fsutil import write_text

        write_text(samples_out, "".join(json.dumps(s) + "\n" for s in samples))
    return metrics


def base_eval_config(path: str | Path) -> EvalConfig:
    """The evaluation settings a run was trained with (run directories), else the defaults."""
    from poisonlab.config import load_run_config

    p = Path(path)
    for cand in (p, p.parent.parent):
        if (cand / "config.yaml").is_file():
            return load_run_config(cand / "config.yaml").eval
    return EvalConfig()
