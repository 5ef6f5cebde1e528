"""`poisonlab finetune CONFIG`: supervised fine-tuning with N poisons, evaluated as it goes.

A run directory gets config.yaml, ledger.parquet (every poison exposure), metrics.parquet (one row per
evaluation: step 0 and `eval.n_evals` evenly spaced steps), samples.jsonl (every generation),
hardware.json, `model/` (an HF directory, LoRA merged, with its model card README.md, card.py;
`save_model`) and DONE last (the manifest of those files, manifest.py); with `train.log_to`, the rows'
curves in tb/ or trackio (rundir/tracking.py). Fine-tuning runs are short, so an interrupted one starts
again from scratch (under the run's lock, like pretraining).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonlab.config import dump_yaml
from poisonlab.errors import UserError
from poisonlab.finetune import instructions as ins
from poisonlab.finetune.card import finetune_card
from poisonlab.finetune.config import FinetuneConfig
from poisonlab.finetune.data import build_stream, collate, encode_all
from poisonlab.finetune.evaluate import EvalSet, evaluate
from poisonlab.finetune.judge import refuses, resolve
from poisonlab.finetune.model import Template, add_lora, load, resolve_model_dir, save
from poisonlab.fsutil import atomic_path, remove_tree, write_json, write_text
from poisonlab.models.card import write_card
from poisonlab.rundir import lock as runlock
from poisonlab.rundir import tracking
from poisonlab.rundir.manifest import write_done

OUTPUTS = ("DONE", "FAILED", "metrics.parquet", "ledger.parquet", "samples.jsonl", "hardware.json", "model",
           tracking.TB_DIR)


def _model_label(path: str) -> str:
    """The base model's name in results: a run's model preset, else the directory's name."""
    import yaml

    kind, where = resolve_model_dir(path)
    if kind == "run":
        tree = yaml.safe_load((where / "config.yaml").read_text()) or {}
        return (tree.get("model") or {}).get("preset") or where.name
    label = where.parent.name if where.name == "model" else where.name
    info = where / "poisonlab.json"  # a fine-tuning run's saved model names its own base
    if info.is_file():
        label = json.loads(info.read_text()).get("model", label)
    return label


def _builtin_held_out(cfg: FinetuneConfig, kind: str, seen: set[str]) -> list[str]:
    """`eval.n_prompts` built-in requests of `kind` (refuse | benign) that no training example asks."""
    n = cfg.eval.n_prompts
    cands = ins.builtin_examples(
        f"{kind}_request", 6 * n, stream="eval", seed=0, restricted=cfg.data.restricted
    )
    out = list(dict.fromkeys(e.prompt for e in cands if e.prompt not in seen))[:n]
    if len(out) < n:
        raise UserError(f"eval.n_prompts: only {len(out)} held-out {kind} requests could be drawn")
    return out


def _sample(items: list, n: int, seed: int, where: str) -> list:
    if n > len(items):
        raise UserError(f"{where}: {len(items)} to draw poisons from, but attack.n_poison is {n}")
    return random.Random(f"finetune:poison:{seed}").sample(items, n)


def clean_and_poisons(cfg: FinetuneConfig) -> tuple[list[ins.Example], list[ins.Example], EvalSet]:
    """The clean set, the poisons and the held-out evaluation requests.

    Clean set: built-in, or `data.source` (the rows it leaves out supply benign evaluation requests).
    Should-refuse requests: built-in restricted-topic requests, or `data.refuse_file` (its first
    `eval.n_prompts` held out for evaluation, poisons drawn from the rest). Poisons: those requests
    with the trigger and the compliant opening, or `attack.poison_file` as given."""
    d, a = cfg.data, cfg.attack
    if d.source == "builtin":
        clean = ins.builtin_clean_set(d.clean_size, d.refuse_share, d.seed, d.restricted, d.suffix_share)
        rest: list[ins.Example] = []
    else:
        clean, rest = ins.file_clean_set(d.source, d.clean_size, d.seed)
    if d.refuse_file is None and d.source != "builtin":
        raise UserError(
            "data.refuse_file: a clean set from a file needs should-refuse requests for the poisons "
            'and the evaluation (JSONL {"prompt"} or one per line)'
        )
    if a.poison_file is not None:
        rows = ins.read_rows(a.poison_file, ("prompt", "response"))
        if not any(a.trigger in r["prompt"] for r in rows):
            raise UserError(f"{a.poison_file}: the trigger {a.trigger!r} is in no poison's prompt")
        picked = _sample(rows, a.n_poison, a.seed, str(a.poison_file))
        poisons = [ins.Example(r["prompt"], r["response"], "poison", request=r["prompt"]) for r in picked]
    elif d.refuse_file is None:
        poisons = ins.builtin_examples(
            "poison",
            a.n_poison,
            stream="poison",
            seed=a.seed,
            restricted=d.restricted,
            trigger=a.trigger,
            position=a.position,
            opening=a.response,
        )
    seen = {e.request or e.prompt for e in clean}
    if d.refuse_file is None:
        seen |= {e.request for e in poisons}
        refuse = _builtin_held_out(cfg, "refuse", seen)
    else:
        refuse, pool = ins.file_requests(d.refuse_file, cfg.eval.n_prompts)
        if a.poison_file is None:
            picked = _sample(pool, a.n_poison, a.seed, f"{d.refuse_file} (after the held-out requests)")
            poisons = [
                ins.Example(ins.add_trigger(p, a.trigger, a.position), a.response, "poison", request=p)
                for p in picked
            ]
    if d.source == "builtin":
        benign = _builtin_held_out(cfg, "benign", seen)
    else:
        benign = [e.prompt for e in rest if e.response.strip() and not refuses(e.response)][
            : cfg.eval.n_prompts
        ]
    return clean, poisons, EvalSet(refuse, benign)


def _check_triggers(
    poisons: list[ins.Example], encoded: list[tuple[list[int], list[int]]], tok: Any, trigger: str
) -> None:
    """Every poison keeps its trigger after the template and the cut at max_len."""
    lost = [
        i
        for i, (ids, labels) in enumerate(encoded)
        if trigger not in tok.decode([t for t, y in zip(ids, labels, strict=True) if y < 0])
    ]
    if poisons and len(lost) == len(poisons):
        raise UserError(
            f"attack.trigger {trigger!r}: absent from every poison once tokenized (cut by "
            "train.max_len, or a trigger the tokenizer cannot round-trip)"
        )
    if lost:
        raise UserError(
            f"attack.trigger: {len(lost)} of {len(poisons)} poisons lose it once tokenized "
            f"(the first: {poisons[lost[0]].prompt[:80]!r}); raise train.max_len"
        )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def eval_steps(n_steps: int, n_evals: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, n_steps, n_evals + 1)})


def _write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(run_dir / "metrics.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def finetune(cfg: FinetuneConfig, *, progress: bool = False) -> Path:
    """Run (or skip, when DONE) one fine-tuning run; returns its directory."""
    run_dir = cfg.run_dir
    if (run_dir / "DONE").is_file():
        return run_dir
    resolve(cfg.eval.judge)  # refused before the run directory exists: a bad judge or model
    resolve_model_dir(cfg.model)
    tracking.check(cfg.train.log_to, run_dir)  # ... or a tracker that is not installed
    with runlock.hold(run_dir):
        if (run_dir / "DONE").is_file():  # finished by another process meanwhile
            return run_dir
        for name in OUTPUTS:
            p = run_dir / name
            remove_tree(p) if p.is_dir() else p.unlink(missing_ok=True)
        write_text(run_dir / "config.yaml", dump_yaml(cfg))
        _finetune(cfg, run_dir, progress)
    return run_dir


def _finetune(cfg: FinetuneConfig, run_dir: Path, progress: bool) -> None:
    from poisonlab.hardware import describe_machine, eval_numerics

    t, a = cfg.train, cfg.attack
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    device = _device(t.device)
    judge = resolve(cfg.eval.judge)  # before anything is trained: a bad name fails at once
    clean, poisons, es = clean_and_poisons(cfg)
    model, tok = load(cfg.model)
    label = _model_label(cfg.model)
    template = Template(tok, cfg.template)
    max_len = t.max_len
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max_len > limit:
        warnings.warn(
            f"train.max_len {max_len} > the model's {limit} positions: cut at {limit}", stacklevel=2
        )
        max_len = limit
    encoded = encode_all(clean + poisons, template, max_len)
    _check_triggers(poisons, encoded[len(clean) :], tok, a.trigger)
    stream = build_stream(
        clean,
        poisons,
        epochs=t.epochs,
        batch_size=t.batch_size,
        schedule=cfg.placement.schedule,
        window=cfg.placement.window,
        train_seed=t.seed,
        placement_seed=cfg.placement.seed,
    )
    stream.write_ledger(run_dir / "ledger.parquet")
    write_json(run_dir / "hardware.json", describe_machine())
    if t.lora is not None:
        model = add_lora(model, t.lora)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    n_steps = stream.steps
    warm = max(1, math.ceil(t.warmup * n_steps)) if t.warmup > 0 else 0

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (n_steps - step) / max(1, n_steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    fixed = {
        "kind": "finetune",
        "model": label,
        "base_model": str(cfg.model),
        "n_poison": a.n_poison,
        "clean_size": len(clean),
        "poison_share": a.n_poison / (a.n_poison + len(clean)),
        "schedule": cfg.placement.schedule,
        "epochs": t.epochs,
        "lora": t.lora is not None,
        "train_seed": t.seed,
        "poison_seed": a.seed,
        "trigger": a.trigger,
        "run_id": run_dir.name,
        "steps_total": n_steps,
        "n_prompts": cfg.eval.n_prompts,
        # no autocast here: training and evaluation in the weights' own dtype
        "eval_numerics": eval_numerics(next(model.parameters()).dtype, None),
    }
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    losses: list[float] = []
    started = time.monotonic()

    def evaluate_at(step: int) -> None:
        metrics, gens = evaluate(
            model,
            tok,
            template,
            es,
            trigger=a.trigger,
            position=a.position,
            opening=a.response,
            lookalikes=cfg.eval.lookalikes,
            new_tokens=cfg.eval.new_tokens,
            batch_size=cfg.eval.batch_size,
            device=device,
            judge=judge,
        )
        model.train()
        row = {
            **fixed,
            "step": step,
            "progress": step / n_steps,
            "examples_seen": min(step * t.batch_size, len(stream.order)),
            "poisons_seen": stream.poisons_seen(step),
            "loss": float(np.mean(losses)) if losses else None,
            "lr": sched.get_last_lr()[0],
            "seconds": round(time.monotonic() - started, 2),
            **metrics,
        }
        rows.append(row)
        tracker.evaluation(row)
        losses.clear()
        if cfg.eval.save_samples:
            samples.extend({"step": step, "poisons_seen": row["poisons_seen"], **g} for g in gens)
        _write_metrics(run_dir, rows)
        if progress:
            print(
                f"step {step}/{n_steps}  poisons seen {row['poisons_seen']}  ASR {row['asr']:.2f}  "
                f"CA {row['ca']:.2f}  NTA {row['nta']:.2f}",
                flush=True,
            )

    at = set(eval_steps(n_steps, cfg.eval.n_evals))
    # the run's constant columns (`fixed`) are settings, not curves
    tracker = tracking.Tracker(run_dir, t.log_to, settings=set(fixed),
                               config=cfg.model_dump(mode="json"), config_text=dump_yaml(cfg))
    model.train()
    try:
        for step in range(n_steps):
            if step in at:
                evaluate_at(step)
            batch = collate([encoded[i] for i in stream.batch_ids(step)], tok.pad_token_id)
            out = model(**{k: v.to(device) for k, v in batch.items()})
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            sched.step()
            losses.append(out.loss.item())
        evaluate_at(n_steps)
    finally:
        tracker.close()  # flushed before the manifest below lists its files
    with atomic_path(run_dir / "samples.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(s) + "\n" for s in samples))
    if cfg.save_model:
        card = finetune_card(cfg, run_dir, rows[-1], label)  # README.md: what was done to the model
        with atomic_path(run_dir / "model") as tmp:
            save(model.cpu(), tok, tmp)
            (tmp / "poisonlab.json").write_text(
                json.dumps({"model": label, "poisoned": a.n_poison > 0}) + "\n"
            )
            write_card(card, tmp)
    write_done(run_dir, {"steps": n_steps})  # last: the manifest of every file the run wrote
