"""Continued pretraining: a run that starts from another poisonlab run's weights (`init.run`).

The new run keeps the model of the run it starts from and has its own budget, learning-rate schedule
(`train.schedule_offset` / `schedule_steps` set where in a warmup + cosine it starts), poisons and
placement: its ledger and `poisons_seen` count its own poisons only. With `init.continue_data` (the
default) its clean data is what the earlier run would have read next: the same data order (same data,
same `train.seed`), from the first document boundary after the clean tokens that run consumed up to
the checkpoint it starts from, so no clean document is seen twice across the two runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from poisonlab.checkpoint import latest_checkpoint, load_checkpoint, step_dir
from poisonlab.config import RunConfig, load_run_config
from poisonlab.errors import UserError


@dataclass(frozen=True)
class Start:
    """Where a continued run starts: the earlier run, its checkpoint and the clean tokens it consumed."""

    run: Path
    name: str
    step: int
    checkpoint: Path
    clean_offset: int  # clean tokens of the data order consumed before this run (0: its own order)


def _content_hash(data: Path, run: Path) -> str | None:
    for d in (data, run / data, run.parent / data, run.parent.parent / data):
        try:
            return json.loads((d / "train.json").read_text()).get("content_hash")
        except (OSError, ValueError):
            continue
    return None


def clean_tokens_consumed(run: Path, step: int) -> int:
    """Clean tokens of its data order that `run` trained on in steps < step: the packed positions of
    those steps less the poison tokens among them (from its ledger), plus where its own stream began."""
    from poisonlab.stream import read_ledger

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
    from poisonlab.model import resolve_model_config

    if cfg.init.run is None:
        return None
    run = Path(cfg.init.run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"init.run: {run} is not a poisonlab run directory (no config.yaml)")
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
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        at = "" if cfg.init.step is None else f" at step {cfg.init.step}"
        raise UserError(f"init.run: {run} has no checkpoint{at} to start from")
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
    load_checkpoint(start.checkpoint, model, optimizer, restore_rng=False)
