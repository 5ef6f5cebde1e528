"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically, the last K kept.

    checkpoints/step_0000120/
        model.safetensors   the weights (a tied embedding stored once, as tok_emb.weight)
        state.safetensors   optimizer moments and steps ("opt.<param name>.<key>"), RNG states ("rng.*")
        state.json          step, total steps, lr, tokens and poisons seen, data position, param groups

The data position is the step itself: the training stream is a pure function of the step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from poisonlab.fsutil import atomic_path, recover_all, remove_tree

CKPT_DIR = "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary leftovers of a killed write start with '.').

    A write or deletion cut short by a crash is finished first (fsutil.recover), so every listed
    checkpoint is whole."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    recover_all(root)
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() yields a tied weight once, which is what safetensors needs (no shared storage)
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load model.safetensors into a model (strictly: every parameter must be there)."""
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"{path}: weights do not match the model "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    info: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step_<step> atomically, then delete all but the newest `keep`."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{names[id(p)]}.{k}"] = v.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = dict(info, step=step, param_groups=groups)
    final = step_dir(run_dir, step)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(model_tensors(model), str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_tree(old)  # renamed away first: never listed half deleted
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = True) -> dict[str, Any]:
    """Restore weights (and optimizer state and RNG) from a checkpoint dir; return its state.json."""
    path = Path(path)
    load_weights(model, path / "model.safetensors")
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    if optimizer is not None:
        # through load_state_dict, so that torch places each tensor (e.g. `step` for fused AdamW)
        index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        by_name = {n: index[id(p)] for n, p in model.named_parameters()}
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                pname, k = key[4:].rsplit(".", 1)
                opt_state.setdefault(by_name[pname], {})[k] = v
        sd = optimizer.state_dict()
        optimizer.load_state_dict({"state": opt_state, "param_groups": sd["param_groups"]})
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def load_model(run: Path, step: int | None = None, device: str | torch.device = "cpu"):
    """The trained model of a run dir (its latest checkpoint, or `step`), in eval mode."""
    from poisonlab.config import load_run_config
    from poisonlab.errors import UserError
    from poisonlab.model import Transformer

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: not a run directory (no config.yaml)")
    cfg = load_run_config(run / "config.yaml")
    ckpt = step_dir(run, step) if step is not None else latest_checkpoint(run)
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        raise UserError(f"{run}: no checkpoint{'' if step is None else f' at step {step}'} to load")
    model = Transformer(cfg.model)
    load_weights(model, ckpt / "model.safetensors")
    return model.to(device).eval()
