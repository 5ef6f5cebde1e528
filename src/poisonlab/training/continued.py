"""Continued pretraining: a run that starts from trained weights (`init.run`): another poisonlab run,
or a local HF `LlamaForCausalLM` directory (config.json + safetensors + tokenizer.json).

The new run keeps the model of the run it starts from and has its own budget, learning-rate schedule
(`train.schedule_offset` / `schedule_steps` set where in a warmup + cosine it starts), poisons and
placement: its ledger and `poisons_seen` count its own poisons only. With `init.continue_data` (the
default) its clean data is what the earlier run would have read next: the same data order (same data,
same `train.seed`), from the first document boundary after the clean tokens that run consumed up to
the checkpoint it starts from, so no clean document is seen twice across the two runs.

From an HF directory the model's settings are its config.json (refused unless it is the Llama layout
poisonlab trains: SiLU MLP, no biases, no RoPE scaling), the weights its safetensors (the inverse of
export.py's names), the AdamW state fresh, and the data must be tokenized with its tokenizer
(`poisonlab prepare --tokenizer DIR/tokenizer.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from poisonlab.config import ModelConfig, RunConfig, load_run_config
from poisonlab.errors import UserError
from poisonlab.models.checkpoint import (
    has_weights,
    latest_checkpoint,
    load_checkpoint,
    require_intact,
    step_dir,
)


@dataclass(frozen=True)
class Start:
    """Where a continued run starts: the earlier run, its checkpoint and the clean tokens it consumed."""

    run: Path
    name: str
    step: int
    checkpoint: Path | None  # None: an HF directory
    clean_offset: int  # clean tokens of the data order consumed before this run (0: its own order)


def _content_hash(data: Path, run: Path) -> str | None:
    """The data's content hash from its header, looked for where `results.data_headers` looks."""
    from poisonlab.corpus.shards import data_headers

    for header in data_headers(data, run):
        try:
            return json.loads(header.read_text()).get("content_hash")
        except (OSError, ValueError):
            continue
    return None


def clean_tokens_consumed(run: Path, step: int) -> int:
    """Clean tokens of its data order that `run` trained on in steps < step: the packed positions of
    those steps less the poison tokens among them (from its ledger), plus where its own stream began."""
    from poisonlab.injection.stream import read_ledger

    if not (run / "ledger.parquet").is_file():
        raise UserError(f"init.run: {run} has no ledger.parquet, so the clean data it consumed is unknown; "
                        "set init.continue_data=false")
    table, meta = read_ledger(run / "ledger.parquet")
    limit = step * int(meta["batch_size"]) * int(meta["seq_len"])
    start = np.asarray(table["start"].to_pylist(), dtype=np.int64)
    length = np.asarray(table["n_tokens"].to_pylist(), dtype=np.int64)  # each poison with its EOS
    poison = int(np.clip(limit - start, 0, length).sum())
    return int(meta.get("clean_offset", 0)) + limit - poison


def resolve_start(cfg: RunConfig) -> Start | None:
    """The checkpoint a run starts from, checked against the run's settings; None from random weights."""
    from poisonlab.models.llama import resolve_model_config

    if cfg.init.run is None:
        return None
    run = Path(cfg.init.run)
    if is_hf_dir(run):
        return _hf_start(cfg, run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"init.run: {run} is not a poisonlab run directory (no config.yaml) or an HF "
                        "model directory (no config.json)")
    parent = load_run_config(run / "config.yaml")
    mine, theirs = resolve_model_config(cfg.model), resolve_model_config(parent.model)
    if mine != theirs:
        diff = sorted(k for k, v in mine.model_dump().items() if theirs.model_dump().get(k) != v)
        raise UserError(f"init.run: {run} trained another model (model.{', model.'.join(diff)} differ); "
                        "a continued run keeps the model it starts from")
    if cfg.init.step is None and not (run / "DONE").is_file():
        raise UserError(f"init.run: {run} has not finished (no DONE), so its last checkpoint is not its "
                        "end; wait for it, or name a checkpoint with init.step")
    ckpt = step_dir(run, cfg.init.step) if cfg.init.step is not None else latest_checkpoint(run)
    if ckpt is None or not has_weights(ckpt):  # one model.safetensors, or the shards of an FSDP run
        at = "" if cfg.init.step is None else f" at step {cfg.init.step}"
        raise UserError(f"init.run: {run} has no checkpoint{at} to start from")
    require_intact(ckpt)  # checked before this run writes anything
    step = int(json.loads((ckpt / "state.json").read_text())["step"])
    offset = 0
    if cfg.init.continue_data:
        ours, before = _content_hash(Path(cfg.data), Path.cwd()), _content_hash(Path(parent.data), run)
        if ours is None or ours != before or cfg.train.seed != parent.train.seed:
            raise UserError(
                f"init.run: continuing {run}'s data needs the same data and train.seed (data {parent.data} "
                f"vs {cfg.data}, seed {parent.train.seed} vs {cfg.train.seed}); set them so, or set "
                "init.continue_data=false (this run's own data order, which repeats documents it saw)")
        offset = clean_tokens_consumed(run, step)
    return Start(run, parent.name, step, ckpt, offset)


def load_start(start: Start, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """The earlier run's weights (and AdamW moments when `optimizer` is given) into a fresh model."""
    if start.checkpoint is None:
        load_hf_weights(start.run, model)
    else:
        load_checkpoint(start.checkpoint, model, optimizer, restore_rng=False)


# --- a local HF directory ------------------------------------------------------------------------------


def is_hf_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and not (Path(path) / "config.yaml").is_file()


def hf_model_config(path: Path, seq_len: int | None = None) -> ModelConfig:
    """poisonlab's ModelConfig for an HF Llama directory; refused where the layouts differ."""
    path = Path(path)
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"init.run: {path}/config.json: cannot read it ({e})") from None
    problems = []
    if c.get("model_type") != "llama":
        problems.append(f"model_type {c.get('model_type')!r} (poisonlab trains the llama layout)")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c.get('hidden_act')!r}")
    if c.get("attention_bias") or c.get("mlp_bias"):
        problems.append("biases")
    rope = c.get("rope_scaling") or {}
    if rope and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        problems.append(f"rope_scaling {rope}")
    d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    if c.get("head_dim") not in (None, d // heads):
        problems.append(f"head_dim {c['head_dim']} != hidden_size / heads")
    if problems:
        raise UserError(f"init.run: {path} is not a model poisonlab can train: " + "; ".join(problems))
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return ModelConfig(vocab_size=int(c["vocab_size"]), d_model=d, n_layers=int(c["num_hidden_layers"]),
                       n_heads=heads, n_kv_heads=c.get("num_key_value_heads"),
                       d_ff=int(c["intermediate_size"]),
                       seq_len=seq_len or min(int(c.get("max_position_embeddings", 2048)), 2048),
                       tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                       rope_theta=float(theta), norm_eps=float(c.get("rms_norm_eps", 1e-5)))


def _hf_start(cfg: RunConfig, run: Path) -> Start:
    from tokenizers import Tokenizer

    from poisonlab.models.llama import resolve_model_config

    want = hf_model_config(run, cfg.model.seq_len)
    mine = resolve_model_config(cfg.model)
    if mine != want:
        diff = sorted(k for k, v in want.model_dump().items() if mine.model_dump().get(k) != v)
        raise UserError(f"init.run: {run} is another model (model.{', model.'.join(diff)} differ); give "
                        "no model settings but seq_len and they are taken from its config.json")
    ours, theirs = Path(cfg.data) / "tokenizer.json", run / "tokenizer.json"
    if not theirs.is_file():
        raise UserError(f"init.run: {run} has no tokenizer.json, so the data cannot be checked against it")
    try:
        same = ours.is_file() and Tokenizer.from_file(str(ours)).get_vocab() == Tokenizer.from_file(
            str(theirs)).get_vocab()
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"init.run: {theirs}: not a readable tokenizer ({e})") from None
    if not same:
        raise UserError(f"init.run: {cfg.data} is not tokenized with {theirs}; prepare it with "
                        f"--tokenizer {theirs}")
    return Start(run, run.name, 0, None, 0)


def load_hf_weights(path: Path, model: torch.nn.Module) -> None:
    """An HF Llama directory's safetensors (one file or an index of shards) into our model, one tensor
    in memory at a time; into a sharded (FSDP) model each rank keeps its rows."""
    from contextlib import ExitStack

    from safetensors import safe_open

    from poisonlab.models.export import hf_name
    from poisonlab.training.distributed import fill_parameter

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    with ExitStack() as stack, torch.no_grad():
        where = {}
        for f in files:
            st = stack.enter_context(safe_open(str(path / f), framework="pt"))
            where.update({k: st for k in st.keys()})  # noqa: SIM118 (safe_open has no iter)
        for name, p in model.named_parameters():
            key = hf_name(name)
            if key not in where:
                raise UserError(f"init.run: {path}: no tensor {key} for {name}")
            shape = tuple(where[key].get_slice(key).get_shape())
            if shape != tuple(p.shape):
                raise UserError(f"init.run: {path}: {key} has shape {shape}, expected {tuple(p.shape)}")
            fill_parameter(p, where[key].get_tensor(key))
