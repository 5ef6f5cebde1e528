"""Loading a model to evaluate: a poisonlab run directory (or one of its checkpoints) or a local HF
model directory, with its tokenizer, data, trigger and special tokens.

Its own module: the evaluator (reference scorer), standalone evaluation and the defenses load models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from poisonlab.config import EvalConfig
from poisonlab.corpus.tokenizer import load_tokenizer
from poisonlab.errors import UserError
from poisonlab.evaluation.prompts import _model_tokenizer, hf_special_tokens
from poisonlab.fsutil import recover
from poisonlab.models.checkpoint import has_weights, load_weights, require_intact


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer | None
    data_dir: Path | None  # the run's prepared data (run directories only)
    trigger: str | None  # the run's trigger (run directories only)
    eval_cfg: EvalConfig | None  # the run's evaluation settings (run directories only)
    kind: str  # "run" | "hf"
    source: str  # what was loaded, for messages and the metrics row
    bos_id: int | None = None  # put before every prompt (HF models whose tokenizer adds a BOS)
    eos_ids: tuple[int, ...] = ()  # the model's end-of-text tokens (HF; a run's come with its data)


def _find_checkpoint(run_dir: Path, checkpoint: int | None) -> Path:
    from poisonlab.models.checkpoint import has_weights, latest_checkpoint, list_checkpoints, step_dir

    if checkpoint is not None:
        f = step_dir(run_dir, checkpoint) / "model.safetensors"
        if not has_weights(f.parent):  # one file, or shards beside where it would be
            have = [p.name for p in list_checkpoints(run_dir)]
            raise UserError(f"{run_dir}: no checkpoint at step {checkpoint} "
                            f"(have: {', '.join(have) or 'none'})")
        return f
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise UserError(f"{run_dir}: no checkpoints/step_*/model.safetensors; has the run saved one yet?")
    return latest / "model.safetensors"


def _resolve_data(data: Path, run_dir: Path) -> Path:
    """The run's data directory: as written in config.yaml (relative to where training ran), else
    relative to the folder that holds the runs."""
    for cand in (data, run_dir.parent.parent / data, run_dir.parent / data):
        if (cand / "tokenizer.json").is_file():
            return cand
    raise UserError(f"{run_dir}: its data directory {data} is not here; give --data DIR")


def _check_run_for_eval(run_dir: Path) -> None:
    """A finished run is checked against its manifest: a damaged config.yaml refuses the evaluation
    (the model and trigger come from it); damage elsewhere is said, and the intact checkpoint used."""
    from poisonlab.rundir.check import check_run

    c = check_run(run_dir)
    if not c.broken:
        return
    for f, what in c.problems:
        if f == "config.yaml" or f == "DONE":
            raise UserError(f"{run_dir / f}: {what}")
    import sys

    print(f"note: {run_dir} is broken ({c.reason()}); evaluating its checkpoint, checked on its own",
          file=sys.stderr)


def load_model(path: str | Path, checkpoint: int | None = None, *, data_dir: Path | None = None,
               device: str | torch.device = "cpu") -> LoadedModel:
    """A poisonlab run directory (or one of its checkpoint directories) or a local HF model directory."""
    from poisonlab.config import load_run_config

    p = Path(path)
    recover(p)  # an export (or other replacement) of the directory cut short by a crash (fsutil)
    if not p.is_dir():
        raise UserError(f"{p}: no such directory (expected a run directory or a HF model directory)")
    run_dir, ckpt = p, None
    if has_weights(p) and (p.parent.parent / "config.yaml").is_file():
        run_dir, ckpt = p.parent.parent, p / "model.safetensors"  # a checkpoint directory
    if (run_dir / "config.yaml").is_file():
        from poisonlab.models.llama import Transformer, resolve_model_config

        _check_run_for_eval(run_dir)
        run = load_run_config(run_dir / "config.yaml")
        ckpt = ckpt or _find_checkpoint(run_dir, checkpoint)
        require_intact(ckpt.parent)
        data = data_dir or _resolve_data(run.data, run_dir)
        tok = load_tokenizer(data)
        mcfg = resolve_model_config(run.model)
        if tok.get_vocab_size() != mcfg.vocab_size:
            raise UserError(f"tokenizer mismatch: {data}/tokenizer.json has {tok.get_vocab_size()} tokens, "
                            f"the model in {run_dir} has vocab_size {mcfg.vocab_size}")
        model = Transformer(mcfg)
        try:
            load_weights(model, ckpt)
        except Exception as e:  # shape mismatch, missing tensors, a corrupt file
            msg = str(e).splitlines()[0]
            raise UserError(f"{ckpt}: does not fit the model in config.yaml ({msg})") from None
        return LoadedModel(model.to(device).eval(), tok, data, run.attack.trigger, run.eval, "run", str(ckpt))
    if (p / "config.json").is_file():
        if not any(p.glob("*.safetensors")):
            raise UserError(f"{p}: no *.safetensors weights (only safetensors are loaded)")
        try:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, use_safetensors=True)
        except Exception as e:
            raise UserError(f"{p}: cannot load as a HF causal LM ({str(e).splitlines()[0]})") from None
        tok = None
        if (p / "tokenizer.json").is_file():
            tok = _model_tokenizer(p)
        elif data_dir is not None:
            tok = load_tokenizer(data_dir)
        if tok is not None and tok.get_vocab_size() > model.config.vocab_size:
            raise UserError(f"tokenizer mismatch: tokenizer has {tok.get_vocab_size()} tokens, the model "
                            f"in {p} has vocab_size {model.config.vocab_size}")
        bos, eos = hf_special_tokens(p, tok)
        return LoadedModel(model.to(device).eval(), tok, None, None, None, "hf", str(p), bos, tuple(eos))
    raise UserError(f"{p}: neither a run directory (config.yaml) nor a HF model directory (config.json)")
