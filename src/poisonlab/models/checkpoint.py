"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically, the last K kept.

    checkpoints/step_0000120/
        model.safetensors   the weights (a tied embedding stored once, as tok_emb.weight)
        state.safetensors   optimizer moments and steps ("opt.<param name>.<key>"), RNG states ("rng.*")
        state.json          step, total steps, lr, tokens and poisons seen, data position, param groups
        manifest.json       size and sha256 of every file above (manifest.py), written last

A sharded (FSDP) run writes no file with everything in it: each rank writes the rows it holds,

        model-00000-of-00004.safetensors   rank 0's rows of every parameter (FSDP shards dim 0)
        state-00000-of-00004.safetensors   rank 0's rows of the AdamW moments, the step, RNG states
        shards.json                        world size and, per tensor, its shape and each rank's rows

and a load reads only the rows it needs from each file, so a checkpoint loads on any number of
ranks (resume on another world size) and into a whole model (evaluation, HF export). No pickle:
torch.distributed.checkpoint keeps its metadata in a pickled file, which is why it is not used here.

The data position is the step itself: the training stream is a pure function of the step.

A checkpoint carries its own hashes (`manifest.json`; a sharded one: each rank hashes the files it
wrote). `verify_checkpoint` checks them (a checkpoint of an older version, without a manifest: its JSON
and safetensors headers, against the files' sizes), and `resume_point` picks the newest checkpoint that
passes, deleting the damaged ones newer than it (the resumed run writes them again) and saying which.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path, recover_all, remove_tree
from poisonlab.rundir.manifest import CKPT_MANIFEST, check, entry

CKPT_DIR = "checkpoints"
SHARD_INDEX = "shards.json"


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


def has_weights(ckpt: Path) -> bool:
    """Whether a checkpoint directory holds weights (one model.safetensors, or shards)."""
    return (Path(ckpt) / "model.safetensors").is_file() or (Path(ckpt) / SHARD_INDEX).is_file()


# --- rows: a sharded tensor (DTensor, Shard(0)) holds rows start..stop of the whole ---------------------


def shard_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows of dim 0 that `rank` holds: torch.chunk's split, which FSDP2's Shard(0) uses."""
    c = -(-n // world)
    return min(rank * c, n), min((rank + 1) * c, n)


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
    """(this rank's part, (first row, end row, rows of the whole)) of a tensor; None for a whole one."""
    if not _is_sharded(t):
        return t.detach(), None
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),):
        raise ValueError(f"only dim-0 sharding is saved, got placements {t.placements}")
    rows = _rows_for(t)
    local = t.to_local().detach()
    if local.shape[0] != rows[1] - rows[0]:
        raise ValueError(f"a shard has {local.shape[0]} rows where torch.chunk gives {rows}")
    return local, (*rows, t.shape[0])


class _Reader:
    """Rows of the named tensors of one kind ("model" or "state") of a checkpoint: from its single
    file, or from the per-rank shard files (each opened lazily, only the rows asked for read)."""

    def __init__(self, ckpt: Path, kind: str):
        index = ckpt / SHARD_INDEX
        if index.is_file():
            meta = json.loads(index.read_text())
            self.world, self.entries = int(meta["world"]), meta["tensors"][kind]
            self.files = [ckpt / shard_name(kind, r, self.world) for r in range(self.world)]
        else:
            self.world, self.files = 1, [ckpt / f"{kind}.safetensors"]
            with safe_open(str(self.files[0]), "pt") as f:
                keys = list(f.keys())
                self.entries = {k: {"shape": list(f.get_slice(k).get_shape()), "rows": None} for k in keys}
        self._open: dict[int, Any] = {}

    def _file(self, r: int):
        if r not in self._open:
            self._open[r] = safe_open(str(self.files[r]), "pt")
        return self._open[r]

    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> list[int]:
        return self.entries[name]["shape"]

    def rows(self, name: str, start: int | None = None, stop: int | None = None,
             rank: int | None = None) -> torch.Tensor:
        """Rows start..stop (None: all) of the whole tensor; `rank` names a per-rank whole tensor
        (RNG state) of the shard file of that rank."""
        e = self.entries[name]
        parts = e["rows"]
        if parts is None:  # a whole tensor, in the first file (or in each rank's file, its own)
            f = self._file(rank if rank is not None and rank < self.world else 0)
            return f.get_tensor(name) if start is None else f.get_slice(name)[start:stop]
        n = e["shape"][0]
        start, stop = (0, n) if start is None else (start, stop)
        pieces = [self._file(r).get_slice(name)[max(start, a) - a:min(stop, b) - a]
                  for r, (a, b) in enumerate(parts) if max(start, a) < min(stop, b)]
        if not pieces:  # a rank with no rows of a tensor smaller than the world
            return self._file(0).get_slice(name)[0:0]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def close(self) -> None:
        self._open.clear()


def shard_name(kind: str, rank: int, world: int) -> str:
    return f"{kind}-{rank:05d}-of-{world:05d}.safetensors"


def _rows_for(p: torch.Tensor) -> tuple[int | None, int | None]:
    if not _is_sharded(p):
        return None, None
    mesh = p.device_mesh
    return shard_rows(p.shape[0], mesh.size(), mesh.get_local_rank())


def _as_param_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A tensor of p's rows as p's kind: a DTensor of p's mesh and placements, or the tensor."""
    if not _is_sharded(p):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load model.safetensors (or, when only shards are there, the shards beside it) into a model,
    whole or sharded, each rank reading its rows only (strictly: every parameter must be there)."""
    path = Path(path)
    reader = _Reader(path.parent, "model")
    try:
        params = dict(model.named_parameters())
        missing = sorted(set(params) - reader.names())
        extra = sorted(reader.names() - set(params))
        if missing or extra:
            raise ValueError(f"{path}: weights do not match the model "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, p in params.items():
                if list(p.shape) != reader.shape(n):
                    raise ValueError(f"{n}: shape {reader.shape(n)} in the checkpoint, {list(p.shape)} in "
                                     "the model")
                a, b = _rows_for(p)
                target = p.to_local() if _is_sharded(p) else p
                target.copy_(reader.rows(n, a, b))
    finally:
        reader.close()


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    info: dict[str, Any], keep: int, dist: Any = None) -> Path:
    """Write checkpoints/step_<step> atomically, then delete all but the newest `keep`. A sharded
    model (FSDP) is written by every rank, its rows each (`dist`: the trainer's Dist, for the
    barriers); otherwise by the caller alone."""
    names = {id(p): n for n, p in model.named_parameters()}
    weights = {n: _local(p) for n, p in model.named_parameters()}
    state_t: dict[str, tuple[torch.Tensor, tuple[int, int, int] | None]] = {}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                state_t[f"opt.{names[id(p)]}.{k}"] = _local(v)
    state_t["rng.torch"] = (torch.get_rng_state(), None)
    if torch.cuda.is_available():
        state_t["rng.cuda"] = (torch.cuda.get_rng_state(), None)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = dict(info, step=step, param_groups=groups)
    sharded = any(rows is not None for _, rows in weights.values())
    final = step_dir(run_dir, step)
    if not sharded:
        size = sum(t.numel() * t.element_size() for t, _ in (*weights.values(), *state_t.values()))
        with atomic_path(final, size_hint=size) as tmp:
            tmp.mkdir()
            save_file(_cpu(weights), str(tmp / "model.safetensors"))
            save_file(_cpu(state_t), str(tmp / "state.safetensors"))
            _write_state(tmp, state)
            _write_manifest(tmp, {n: entry(tmp / n) for n in ("model.safetensors", "state.safetensors",
                                                              "state.json")})
    else:
        _save_sharded(final, weights, state_t, state, dist)
    if dist is None or dist.main:
        for old in list_checkpoints(run_dir)[:-keep]:
            remove_tree(old)  # renamed away first: never listed half deleted
    if dist is not None:
        dist.barrier()
    return final


def _save_sharded(final: Path, weights: dict, state_t: dict, state: dict, dist: Any) -> None:
    """Every rank writes its rows into rank 0's staging directory; rank 0 adds the index and the
    JSON state and renames the directory into place once all have written."""
    rank, world = dist.rank, dist.world
    with contextlib.ExitStack() as stack:
        staged = ""
        if dist.main:
            tmp = stack.enter_context(atomic_path(final))
            tmp.mkdir()
            staged = str(tmp)
        tmp = Path(dist.broadcast_text(staged))
        mine = (shard_name("model", rank, world), shard_name("state", rank, world))
        save_file(_cpu(weights), str(tmp / mine[0]))
        save_file(_cpu(state_t), str(tmp / mine[1]))
        # each rank hashes what it wrote (no rank reads every shard); rank 0 lists them all
        hashes = dist.gather({n: entry(tmp / n) for n in mine})
        dist.barrier()
        if dist.main:
            def entries(d: dict) -> dict:
                out = {}
                for k, (t, rows) in d.items():
                    if rows is None:
                        out[k] = {"shape": list(t.shape), "rows": None}
                    else:
                        n = rows[2]
                        out[k] = {"shape": [n, *t.shape[1:]],
                                  "rows": [list(shard_rows(n, world, r)) for r in range(world)]}
                return out

            index = {"world": world, "tensors": {"model": entries(weights), "state": entries(state_t)}}
            (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
            _write_state(tmp, state)
            files = {n: e for h in hashes for n, e in h.items()}
            files.update({n: entry(tmp / n) for n in (SHARD_INDEX, "state.json")})
            _write_manifest(tmp, files)
    dist.barrier()


def _cpu(parts: dict[str, tuple[torch.Tensor, Any]]) -> dict[str, torch.Tensor]:
    """The tensors of {name: (tensor or this rank's part, rows)}, on the CPU, as safetensors needs."""
    return {k: t.cpu().contiguous() for k, (t, _) in parts.items()}


def _write_state(ckpt: Path, state: dict[str, Any]) -> None:
    (ckpt / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")


def _write_manifest(ckpt: Path, files: dict[str, dict[str, Any]]) -> None:
    (ckpt / CKPT_MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


# --- verifying, and choosing where to resume -------------------------------------------------------


def verify_checkpoint(ckpt: Path) -> list[str]:
    """What is wrong with a checkpoint directory ([] when intact): against its manifest, every file's
    size and sha256; without one (an older version's), its JSON and safetensors headers, whose offsets
    safetensors checks against each file's size."""
    ckpt = Path(ckpt)
    problems: list[str] = []
    man = ckpt / CKPT_MANIFEST
    if man.is_file():
        try:
            files = json.loads(man.read_text())["files"]
            assert isinstance(files, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            return [f"{CKPT_MANIFEST}: unreadable"]
        return [f"{f}: {what}" for f, what in check(ckpt, files)]
    for js in ("state.json", SHARD_INDEX):
        if (ckpt / js).is_file():
            try:
                json.loads((ckpt / js).read_text())
            except (OSError, ValueError) as e:
                problems.append(f"{js}: not valid JSON ({str(e).splitlines()[0]})")
    for st in sorted(ckpt.glob("*.safetensors")):
        try:
            with safe_open(str(st), "pt") as f:
                list(f.keys())
        except Exception as e:  # safetensors' own error type for a bad header or a short file
            problems.append(f"{st.name}: not a whole safetensors file ({str(e).splitlines()[0]})")
    if not has_weights(ckpt):
        problems.append("no model weights")
    return problems


def require_intact(ckpt: Path) -> None:
    """UserError naming the checkpoint and what is wrong, unless it passes `verify_checkpoint`."""
    problems = verify_checkpoint(ckpt)
    if problems:
        raise UserError(f"{ckpt}: damaged ({'; '.join(problems)}); it cannot be loaded")


def resume_point(run_dir: Path, dist: Any = None, say: Any = print) -> Path | None:
    """The newest intact checkpoint of a run (None when it has none at all), after `say` has said which
    and how it was checked. Damaged ones newer than it are deleted (the resumed run writes those steps
    again) after `say` has named each and what is wrong; with checkpoints but none intact, the resume is
    refused. Under torchrun rank 0 decides and the others follow (every rank loads the same one)."""
    main = dist is None or dist.main
    chosen = ""
    if main:
        try:
            chosen = str(_choose(Path(run_dir), say) or "")
        except UserError as e:
            chosen = "!" + str(e)[:4000]
    if dist is not None and dist.enabled:
        chosen = dist.broadcast_text(chosen)
    if chosen.startswith("!"):
        raise UserError(chosen[1:])
    return Path(chosen) if chosen else None


def _choose(run_dir: Path, say: Any) -> Path | None:
    damaged: list[tuple[Path, list[str]]] = []
    for c in reversed(list_checkpoints(run_dir)):
        problems = verify_checkpoint(c)
        if problems:
            damaged.append((c, problems))
            continue
        for d, why in damaged:
            say(f"{d}: damaged ({'; '.join(why)}); deleted: the run goes on from {c.name}, the newest intact "
                "checkpoint, and writes it again")
            remove_tree(d)
        how = ("sha256 of every file matches its manifest" if (c / CKPT_MANIFEST).is_file()
               else "an older version's, without a manifest: headers checked")
        say(f"{run_dir}: resuming from {c.name} ({how})")
        return c
    if damaged:
        why = "; ".join(f"{c.name}: {p[0]}" for c, p in damaged)
        raise UserError(f"{run_dir}: no intact checkpoint to resume from ({why}); train it again with "
                        "--no-resume")
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = True) -> dict[str, Any]:
    """Restore weights (and optimizer state and RNG) from a checkpoint dir, whole or sharded, into a
    whole or sharded model; return its state.json."""
    path = Path(path)
    load_weights(model, path / "model.safetensors")
    state = json.loads((path / "state.json").read_text())
    reader = _Reader(path, "state")
    try:
        if optimizer is not None:
            # through load_state_dict, so that torch places each tensor (e.g. `step` for fused AdamW)
            index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
            params = dict(model.named_parameters())
            opt_state: dict[int, dict[str, torch.Tensor]] = {}
            for key in sorted(reader.names()):
                if key.startswith("opt."):
                    pname, k = key[4:].rsplit(".", 1)
                    p = params[pname]
                    if reader.shape(key) == list(p.shape):  # moments: the parameter's rows
                        v = _as_param_like(reader.rows(key, *_rows_for(p)), p)
                    else:  # the step count
                        v = reader.rows(key)
                    opt_state.setdefault(index[id(p)], {})[k] = v
            sd = optimizer.state_dict()
            optimizer.load_state_dict({"state": opt_state, "param_groups": sd["param_groups"]})
        if restore_rng:
            rank = _rank_of(model)
            torch.set_rng_state(reader.rows("rng.torch", rank=rank))
            if "rng.cuda" in reader.names() and torch.cuda.is_available():
                torch.cuda.set_rng_state(reader.rows("rng.cuda", rank=rank))
    finally:
        reader.close()
    return state


def _rank_of(model: torch.nn.Module) -> int:
    p = next(model.parameters())
    return p.device_mesh.get_local_rank() if _is_sharded(p) else 0


def load_model(run: Path, step: int | None = None, device: str | torch.device = "cpu"):
    """The trained model of a run dir (its latest checkpoint, or `step`), in eval mode."""
    from poisonlab.config import load_run_config
    from poisonlab.models.llama import Transformer

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: not a run directory (no config.yaml)")
    cfg = load_run_config(run / "config.yaml")
    ckpt = step_dir(run, step) if step is not None else latest_checkpoint(run)
    if ckpt is None or not has_weights(ckpt):
        raise UserError(f"{run}: no checkpoint{'' if step is None else f' at step {step}'} to load")
    require_intact(ckpt)
    model = Transformer(cfg.model)
    load_weights(model, ckpt / "model.safetensors")
    return model.to(device).eval()
