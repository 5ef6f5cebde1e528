"""The training loop: token budget, AdamW + warmup/cosine, evaluation hook, checkpoints, resume, logs.

`train(cfg)` runs one run into `cfg.out_dir/cfg.name` and returns that directory:

    config.yaml        the resolved config (model preset applied, vocabulary taken from the data)
    ledger.parquet     which poison is trained on at which step (written by the stream)
    checkpoints/       step_XXXXXXX/ (see checkpoint.py), the last `keep_checkpoints` kept
    metrics.parquet    one row per evaluation point (run columns + the evaluator's metrics)
    samples.jsonl      generations kept by the evaluator, one JSON object per line
    log.jsonl          train loss, lr, tokens/s, MFU and poisons seen every `log_every` steps
    DONE               written last; a run with DONE is skipped when started again
    .lock              held (flock) by the process training the run; names it (see runlock.py)

Resume: the stream is a pure function of the step, so a checkpoint (weights, optimizer, RNG, step)
is the whole state. Rows of metrics/samples/log beyond the checkpoint's step are dropped on resume,
so a run killed at any moment ends exactly like an uninterrupted one (bitwise on CPU). Nothing is
written before the config, data, poisons and evaluator have been checked.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from poisonlab import distributed, runlock
from poisonlab.checkpoint import CKPT_DIR, latest_checkpoint, load_checkpoint, save_checkpoint
from poisonlab.config import EvalConfig, RunConfig, TrainConfig, dump_yaml
from poisonlab.continued import Start, load_start, resolve_start
from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path, recover, recover_all, remove_staging, remove_tree, write_text
from poisonlab.hardware import compute_dtype, describe_machine, estimate_mfu, peak_flops, use_bf16
from poisonlab.model import Transformer, count_params, flops_per_token, resolve_model_config
from poisonlab.placement import describe


class Stream(Protocol):
    """What the trainer needs from the data (poisonlab.stream.TrainingStream has it)."""

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def poisons_seen(self, steps_done: int) -> int: ...
    def write_ledger(self, path: Path) -> None: ...


class Evaluator(Protocol):
    def run(self, model: torch.nn.Module, *, step: int,
            autocast_dtype: torch.dtype | None = None) -> tuple[dict, list[dict]]: ...


class SyntheticStream:
    """Uniform random tokens with the TrainingStream interface, for benchmarks and tests.

    `poisons_seen` pretends one poison every `poison_every` steps; the ledger is empty.
    """

    def __init__(self, vocab_size: int, *, seq_len: int, batch_size: int, seed: int = 0,
                 poison_every: int = 4):
        self.v, self.t, self.b, self.seed, self.every = vocab_size, seq_len, batch_size, seed, poison_every

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        tok = torch.randint(0, self.v, (self.b, self.t + 1), generator=g)
        return tok[:, :-1], tok[:, 1:]

    def poisons_seen(self, steps_done: int) -> int:
        return steps_done // self.every

    def write_ledger(self, path: Path) -> None:
        pq.write_table(pa.table({"poison_id": pa.array([], pa.string()), "step": pa.array([], pa.int64())}),
                       path)


# --- budget, schedule, speed ----------------------------------------------------------------------------


def total_steps(cfg: RunConfig) -> int:
    """train.max_steps, else ceil(tokens_per_param * data_mult * params / tokens per step)."""
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    total, nonemb = count_params(cfg.model)
    params = nonemb if t.budget_params == "nonemb" else total
    return max(1, math.ceil(t.tokens_per_param * t.data_mult * params / (t.batch_size * cfg.model.seq_len)))


def lr_at(step: int, t: TrainConfig, n_steps: int) -> float:
    """Linear warmup over warmup_frac of the schedule, then cosine decay to min_lr_ratio * lr; the
    schedule is this run's n_steps, or the frame train.schedule_offset / schedule_steps sets."""
    step += t.schedule_offset
    n_steps = t.schedule_steps or t.schedule_offset + n_steps
    warmup = math.ceil(t.warmup_frac * n_steps)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, n_steps - warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# --- evaluation and checkpoint schedule -------------------------------------------------------------


def milestone_grid(e: EvalConfig, n_poison: int) -> list[int]:
    """Poison counts start, start*r, start*r^2 ... (rounded up, distinct) up to n_poison, and n_poison."""
    if e.milestone_ratio is None or n_poison < 1:
        return []
    out, m = [], float(e.milestone_start)
    while m < n_poison:
        out.append(math.ceil(m))
        m *= e.milestone_ratio
    return sorted(set(out) | {n_poison})


def eval_steps(cfg: RunConfig, n_steps: int, stream: Stream) -> list[int]:
    """Steps (optimizer steps done) at which to evaluate: evenly spaced incl. 0 and the end, or every
    k steps, plus the first step at which poisons_seen reaches each milestone."""
    e = cfg.eval
    points: set[int] = set()
    if e.every_steps:
        points.update(range(0, n_steps + 1, e.every_steps))
        points.add(n_steps)
    elif e.n_evals > 0:
        points.update(round(i * n_steps / e.n_evals) for i in range(e.n_evals + 1))
    if e.log_evals:
        points.update(round(n_steps ** (i / e.log_evals)) for i in range(e.log_evals + 1))
    for m in sorted(set(e.poison_milestones) | set(milestone_grid(e, cfg.attack.n_poison))):
        # poisons_seen is monotone in steps: bisect instead of asking for every step
        s = bisect.bisect_left(range(n_steps + 1), m, key=stream.poisons_seen)
        if s <= n_steps:
            points.add(s)
    return sorted(points)


# --- the run directory -------------------------------------------------------------------------------

def run_columns(cfg: RunConfig, params_total: int, params_nonemb: int,
                data_epochs: int | None, clean_tokens: int | None = None) -> dict:
    """The run's settings in every metrics row, so a row stands alone: the contract's columns plus
    every setting a sweep may vary apart from the seeds (which a summary averages over, and says so)."""
    from poisonlab.evaluate import panel_json, resolve_panel

    t = cfg.train
    trigger = cfg.eval.trigger or cfg.attack.trigger
    return dict(
        run_id=cfg.name, model=_model_name(cfg), params_total=params_total, params_nonemb=params_nonemb,
        attack=cfg.attack.name, n_poison=cfg.attack.n_poison, data_mult=t.data_mult, seed=t.seed,
        # the look-alike panel evaluated, {kind: [text, ...]} as compact JSON
        trigger=trigger, lookalike=panel_json(resolve_panel(trigger, cfg.eval.lookalikes)),
        schedule=cfg.placement.schedule, attack_seed=cfg.attack.seed, placement_seed=cfg.placement.seed,
        **describe(cfg.placement),  # window, per_batch (density), every (frequency)
        tokens_per_param=t.tokens_per_param, budget_params=t.budget_params, max_steps=t.max_steps,
        data_epochs=data_epochs, clean_tokens=clean_tokens,  # clean tokens the whole run trains on
    )


def _warn(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]WARNING[/] {text}", highlight=False)


def resolve_run_config(cfg: RunConfig) -> RunConfig:
    """The run's config with the model preset applied and the vocabulary taken from the data (or, for a
    run continued from an HF directory, the model of its config.json)."""
    from poisonlab.continued import hf_model_config, is_hf_dir

    model = cfg.model
    if cfg.init.run is not None and is_hf_dir(cfg.init.run):
        given = model.model_fields_set - {"seq_len"}
        if given:
            raise UserError(f"init.run: {cfg.init.run} is an HF model, whose config.json sets the model; "
                            f"give no model.{', model.'.join(sorted(given))} (only model.seq_len)")
        model = hf_model_config(cfg.init.run, model.seq_len if "seq_len" in model.model_fields_set else None)
        model.model_fields_set.add("vocab_size")
    header = Path(cfg.data) / "train.json"
    if header.is_file():
        vocab = int(json.loads(header.read_text())["vocab_size"])
        if "vocab_size" not in model.model_fields_set:
            model = model.model_copy(update={"vocab_size": vocab})
            model.model_fields_set.add("vocab_size")
        elif model.vocab_size < vocab:
            raise UserError(f"model.vocab_size {model.vocab_size} is smaller than the vocabulary of "
                            f"{cfg.data} ({vocab})")
    return cfg.model_copy(update={"model": resolve_model_config(model)})


def _model_name(cfg: RunConfig) -> str:
    m = cfg.model
    return m.preset or f"d{m.d_model}-l{m.n_layers}"


def _read_rows(path: Path, max_step: int) -> list[dict]:
    if not path.is_file():
        return []
    return [r for r in pq.read_table(path).to_pylist() if r["step"] <= max_step]


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep complete lines with step <= max_step (a killed run may leave a torn last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", -1) <= max_step:
                keep.append(line + "\n")
    write_text(path, "".join(keep))


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    if rows:
        with open(path, "a") as f:
            f.write("".join(json.dumps(r, default=float) + "\n" for r in rows))


def _default_stream(cfg: RunConfig, n_steps: int, poisons: list, clean_offset: int = 0) -> Stream:
    from poisonlab.attacks import trigger_patterns
    from poisonlab.stream import TrainingStream

    # the clean data is checked for the trigger whatever N is, so N = 0 controls see the same data
    return TrainingStream(cfg.data, poisons, cfg.placement, seq_len=cfg.model.seq_len,
                          batch_size=cfg.train.batch_size, total_steps=n_steps, seed=cfg.train.seed,
                          triggers=trigger_patterns(cfg.data, cfg.attack),
                          clean_trigger=cfg.attack.clean_trigger, allow_repeat=cfg.train.allow_data_repeat,
                          clean_offset=clean_offset)


def _default_evaluator(cfg: RunConfig, poisons: list) -> Evaluator:
    from poisonlab.attacks import get_attack
    from poisonlab.evaluate import Evaluator as Ev

    recipe = get_attack(cfg.attack.name)(cfg.attack)
    behaviour = None
    if recipe.metric != "ppl_gap":  # the recipe measures its behaviour itself, from the generations
        behaviour = functools.partial(recipe.behaviour_metrics, poisons)
    return Ev(cfg.eval, cfg.data, cfg.eval.trigger or cfg.attack.trigger, behaviour=behaviour)


def _check_config(run_dir: Path, cfg: RunConfig) -> None:
    """A run dir may only be resumed with the config it was started with (threads may change)."""
    path = run_dir / "config.yaml"
    if path.is_file():
        import yaml

        old, new = yaml.safe_load(path.read_text()), yaml.safe_load(dump_yaml(cfg))
        with contextlib.suppress(ValueError, TypeError):  # defaults filled: a newer setting is no change
            old = yaml.safe_load(dump_yaml(RunConfig.model_validate(old)))
        for c in (old, new):
            c.get("train", {}).pop("threads", None)
        if old != new:
            diff = sorted(f"{sec}.{k}" for sec in new if isinstance(new[sec], dict)
                          for k in new[sec] if old.get(sec, {}).get(k) != new[sec][k])
            raise UserError(f"{run_dir}: exists with a different config ({', '.join(diff) or 'top level'}); "
                            "use another name or --no-resume")


# --- the loop -----------------------------------------------------------------------------------------


def train(cfg: RunConfig, *, resume: bool = True, evaluator: Evaluator | None = None,
          stream: Stream | None = None, progress: bool = True) -> Path:
    """Train one run; return its directory. A finished run (DONE) is returned untouched.

    Order: check everything (config, data, poisons, stream, evaluator, budget), so that a run that
    cannot start leaves nothing behind; then take the run directory's lock (runlock: one trainer per
    run, RunBusy if another process has it) and hold it until the run ends.
    """
    recover(cfg.data)  # a data directory whose replacement was cut short by a crash (fsutil)
    cfg = resolve_run_config(cfg)
    run_dir = Path(cfg.run_dir)
    if resume:
        _check_config(run_dir, cfg)  # before the DONE check: a changed config must not pass as done
        if (run_dir / "DONE").is_file():
            return run_dir
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    dist = distributed.init_distributed()
    try:
        # nothing is written before this
        stream, evaluator, begin = _inputs(cfg, dist.world, stream, evaluator)
        with _run_lock(run_dir, dist):
            if _open_run_dir(cfg, run_dir, dist, resume=resume):
                _train(cfg, run_dir, dist, resume=resume, evaluator=evaluator, stream=stream,
                       progress=progress, begin=begin)
    finally:
        distributed.close_distributed(dist)
    return run_dir


def _inputs(cfg: RunConfig, world: int, stream: Stream | None,
            evaluator: Evaluator | None) -> tuple[Stream, Evaluator | None, Start | None]:
    """The stream, the evaluator (the defaults unless given) and where a continued run starts. Building
    them checks the data, the poisons, the budget, the evaluation settings and the earlier run: a
    UserError here comes before any file is written."""
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise UserError(f"train.batch_size {t.batch_size} must divide by processes x grad_accum "
                        f"({world} x {t.grad_accum})")
    build_evaluator = evaluator is None and (cfg.eval.n_evals > 0 or cfg.eval.every_steps)
    poisons: list = []
    if (stream is None or build_evaluator) and cfg.attack.n_poison > 0:
        from poisonlab.attacks import make_poisons

        poisons = make_poisons(cfg.data, cfg.attack)
    start = resolve_start(cfg)  # continued pretraining: checked before anything is written
    if stream is None:
        stream = _default_stream(cfg, total_steps(cfg), poisons, start.clean_offset if start else 0)
    if build_evaluator:
        evaluator = _default_evaluator(cfg, poisons)
    return stream, evaluator, start


@contextlib.contextmanager
def _run_lock(run_dir: Path, dist: distributed.Dist) -> Iterator[None]:
    """Rank 0 holds the run's lock for the block; every rank learns whether it got it, so that under
    torchrun all ranks stop together when the run is busy (none is left waiting at a barrier)."""
    with contextlib.ExitStack() as stack:
        busy: runlock.RunBusy | None = None
        if dist.main:
            try:
                stack.enter_context(runlock.hold(run_dir))
            except runlock.RunBusy as e:
                busy = e
        if dist.mean(torch.tensor(float(busy is not None), device=dist.device)).item() > 0:
            raise busy or runlock.RunBusy(run_dir, runlock.read_holder(run_dir))
        yield


def _open_run_dir(cfg: RunConfig, run_dir: Path, dist: distributed.Dist, *, resume: bool) -> bool:
    """Under the lock: False if the run was finished meanwhile; else clear it (no resume), finish or
    remove what killed writes left, and write config.yaml."""
    if resume:  # again: another process may have finished it (or started it differently) meanwhile
        _check_config(run_dir, cfg)
        if (run_dir / "DONE").is_file():
            return False
    dist.barrier()  # every rank has looked before rank 0 changes anything
    if dist.main:
        if not resume:  # DONE first: a reset cut short must not pass as a finished run
            for name in ("DONE", CKPT_DIR, "metrics.parquet", "samples.jsonl", "log.jsonl", "ledger.parquet",
                         "config.yaml"):
                p = run_dir / name
                remove_tree(p) if p.is_dir() else p.unlink(missing_ok=True)
        recover_all(run_dir)
        recover_all(run_dir / CKPT_DIR)
        remove_staging(run_dir / CKPT_DIR)  # half-written checkpoints of a killed run; we hold the lock
        write_text(run_dir / "config.yaml", dump_yaml(cfg))
    dist.barrier()
    return True


def _train(cfg: RunConfig, run_dir: Path, dist: distributed.Dist, *, resume: bool,
           evaluator: Evaluator | None, stream: Stream, progress: bool, begin: Start | None) -> None:
    t, mcfg = cfg.train, cfg.model
    n_steps = total_steps(cfg)

    # same seed on every rank: identical initial weights, as DDP requires
    torch.manual_seed(t.seed)
    model = Transformer(mcfg).to(dist.device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # matrices and embedding
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norm weights
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=t.betas, fused=dist.device.type == "cuda")

    evals = set(eval_steps(cfg, n_steps, stream)) if evaluator is not None else set()
    if t.checkpoint_every:
        ckpts = set(range(t.checkpoint_every, n_steps, t.checkpoint_every))
    else:  # at every evaluation; without evaluations, at every tenth of the run
        ckpts = evals - {0} if evals else {round(i * n_steps / 10) for i in range(1, 10)} - {0}
    ckpts.add(n_steps)

    start, state = 0, {}
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        start = state["step"]
    elif begin is not None:
        load_start(begin, model, opt if cfg.init.optimizer else None)
    metrics_path, samples_path = run_dir / "metrics.parquet", run_dir / "samples.jsonl"
    log_path = run_dir / "log.jsonl"
    rows: list[dict] = []
    if dist.main:
        rows = _read_rows(metrics_path, start - 1 if ckpt is None else start)
        for p in (samples_path, log_path):
            _truncate_jsonl(p, start - 1 if ckpt is None else start)
        if ckpt is None:
            with atomic_path(run_dir / "ledger.parquet") as tmp:
                stream.write_ledger(tmp)

    train_model = distributed.wrap(model, dist)
    if t.compile:
        train_model = torch.compile(train_model)
    bf16 = use_bf16(t.dtype, dist.device, mcfg.d_model)
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=bf16)
    total, nonemb = count_params(mcfg)
    fpt = flops_per_token(mcfg)
    # MFU's peak: the GPU datasheet for this dtype, a GEMM measured here on CPU, or train.peak_flops
    peak_info = peak_flops(dist.device, compute_dtype(dist.device, bf16), width=mcfg.d_model,
                           given=t.peak_flops)
    if dist.main:
        write_text(run_dir / "hardware.json",
                   json.dumps(peak_info.record() | {"world": dist.world, **describe_machine()}) + "\n")
    peak = peak_info.flops or 0.0
    peak *= dist.world
    tokens_per_step = t.batch_size * mcfg.seq_len
    run_cols = run_columns(cfg, total, nonemb, getattr(stream, "epochs_needed", None),
                           getattr(stream, "clean_tokens_needed", None))
    # where a continued run started: the earlier run, its step, the clean tokens it had consumed
    run_cols.update(init_from=begin.name if begin else None, init_step=begin.step if begin else None,
                    clean_offset=getattr(stream, "clean_offset", 0))  # as the stream snapped it
    if dist.main and (run_cols["data_epochs"] or 1) > 1:
        _warn(f"{cfg.name}: trains on {run_cols['data_epochs']} passes over the clean data of {cfg.data} "
              "(train.allow_data_repeat): repeated data is a different experiment from the study's")

    def evaluate(step: int) -> None:
        if dist.main:
            model.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                metrics, samples = evaluator.run(model, step=step,
                                                 autocast_dtype=torch.bfloat16 if bf16 else None)
            model.train()
            cols = dict(run_cols, step=step, tokens_seen=step * tokens_per_step, progress=step / n_steps,
                        poisons_seen=stream.poisons_seen(step))
            if hasattr(stream, "poisons_seen_effective"):
                cols["poisons_seen_effective"] = stream.poisons_seen_effective(step)
            rows.append({**cols, **metrics})
            with atomic_path(metrics_path) as tmp:
                pq.write_table(pa.Table.from_pylist(rows), tmp)
            _append_jsonl(samples_path, [{"run_id": cfg.name, "step": step, **s} for s in samples])
        dist.barrier()

    micro = t.grad_accum
    # the loss summed since the last log line, and that line's step: in the checkpoint, so that
    # log.jsonl after a resume reads exactly as without the interruption
    loss_sum = torch.tensor(state.get("loss_sum", 0.0), dtype=torch.float32, device=dist.device)
    last_step = state.get("last_log_step", start)

    def boundary(step: int, lr: float) -> None:
        # order matters for resume: evaluation rows at `step` exist before its checkpoint does
        if step in evals:
            evaluate(step)
        if step in ckpts and dist.main:
            save_checkpoint(run_dir, step, model, opt, dict(total_steps=n_steps, lr=lr,
                            tokens_seen=step * tokens_per_step, poisons_seen=stream.poisons_seen(step),
                            data_position=step, loss_sum=loss_sum.item(), last_log_step=last_step),
                            keep=t.keep_checkpoints)
        dist.barrier()

    bar = _progress_bar(progress and dist.main, n_steps, start)
    if start == 0:
        boundary(0, lr_at(0, t, n_steps))
    # tokens/s counts steps timed in this process and leaves out time spent evaluating and saving
    last_t, timed_from, paused = time.perf_counter(), start, 0.0
    model.train()
    for step in range(start, n_steps):
        lr = lr_at(step, t, n_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = stream.batch(step)
        x, y = dist.rows(x).to(dist.device), dist.rows(y).to(dist.device)
        for i, (xb, yb) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
            with distributed.no_sync(train_model, sync=i == micro - 1), autocast:
                loss = train_model(xb, yb) / micro
            loss.backward()
            loss_sum += loss.detach()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1

        if done % t.log_every == 0 or done == n_steps:
            mean_loss = dist.mean(loss_sum).item() / (done - last_step)
            now = time.perf_counter()
            tps = (done - max(last_step, timed_from)) * tokens_per_step / max(now - last_t - paused, 1e-9)
            mfu = estimate_mfu(fpt, tps, peak)
            entry = dict(step=done, loss=round(mean_loss, 6), lr=lr, tokens_per_s=round(tps, 1),
                         mfu=None if mfu is None else round(mfu, 4), poisons_seen=stream.poisons_seen(done),
                         tokens_seen=done * tokens_per_step)
            if dist.main:
                _append_jsonl(log_path, [entry])
            mfu_text = f" | MFU {mfu:.0%}" if mfu else ""
            bar.update(done, f"loss {mean_loss:.3f} | {tps:,.0f} tok/s{mfu_text}")
            loss_sum.zero_()
            last_step, last_t, paused = done, now, 0.0
        else:
            bar.update(done, None)
        b0 = time.perf_counter()
        boundary(done, lr)
        paused += time.perf_counter() - b0
    bar.close()
    if dist.main:
        write_text(run_dir / "DONE", json.dumps({"steps": n_steps, "time": time.time()}) + "\n")
    dist.barrier()


class _progress_bar:
    """A rich progress bar that can be switched off (and is, on ranks other than 0)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.p = None
        if enabled and os.environ.get("POISONLAB_NO_PROGRESS") is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                              TextColumn("{task.description}"), transient=False)
            self.p.start()
            self.task = self.p.add_task("", total=total, completed=start)

    def update(self, done: int, text: str | None) -> None:
        if self.p is not None:
            self.p.update(self.task, completed=done, **({} if text is None else {"description": text}))

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
