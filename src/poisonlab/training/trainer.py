"""The training loop. Its parts live beside it, one concern each: resolve.py (the run resolved once:
config, model size, budget, start point), schedule.py (budget, lr, when to evaluate and checkpoint),
records.py (lock, resume housekeeping, the record files), throughput.py (tokens/s, MFU, progress),
distributed.py (DDP/FSDP, per-rank rows), continued.py (a start from trained weights); the model and
its checkpoints are poisonlab.models. This file wires them together.

`train(cfg)` runs one run into `cfg.out_dir/cfg.name` and returns that directory:

    config.yaml        the resolved config (model preset applied, vocabulary taken from the data)
    ledger.parquet     which poison is trained on at which step (written by the stream)
    checkpoints/       step_XXXXXXX/ (see models/checkpoint.py), the last `keep_checkpoints` kept
    metrics.parquet    one row per evaluation point (run columns + the evaluator's metrics)
    samples.jsonl      generations kept by the evaluator, one JSON object per line
    log.jsonl          train loss, lr, tokens/s, MFU and poisons seen every `log_every` steps
    tb/                TensorBoard event files of log.jsonl and metrics.parquet (train.log_to)
    DONE               written last: the manifest of every file above (rundir/manifest.py); a run with DONE
                       is skipped when started again
    .lock              held (flock) by the process training the run; names it (see rundir/lock.py)

Resume: the stream is a pure function of the step, so a checkpoint (weights, optimizer, RNG, step)
is the whole state. Rows of metrics/samples/log beyond the checkpoint's step are dropped on resume,
so a run killed at any moment ends exactly like an uninterrupted one (bitwise on CPU). Nothing is
written before the config, data, poisons and evaluator have been checked. The checkpoint resumed from
is the newest whose hashes match (checkpoint.resume_point; damaged newer ones are deleted and written
again), and the ledger must agree with it (rebuilt from the settings when it is missing). The live
curves (rundir/tracking.py) are written again from the records kept.

Signals (signals.py): SIGTERM or SIGUSR2 checkpoint at the next step boundary and stop (`Stopped`);
SIGINT stops at once (`Interrupted`: the step, and the checkpoint it resumes from).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from poisonlab.config import EvalConfig, RunConfig, TrainConfig, dump_yaml
from poisonlab.errors import UserError
from poisonlab.fsutil import recover, write_text
from poisonlab.hardware import compute_dtype, describe_machine, peak_flops, use_bf16
from poisonlab.injection.placement import describe
from poisonlab.models.checkpoint import load_checkpoint, resume_point, save_checkpoint
from poisonlab.rundir import tracking
from poisonlab.rundir.manifest import write_done
from poisonlab.signals import Interrupted, StopOnSignal, Stopped
from poisonlab.signals import name as signal_name
from poisonlab.training import distributed
from poisonlab.training.continued import is_hf_dir, load_start
from poisonlab.training.records import RunRecords, check_config, open_run_dir, run_lock
from poisonlab.training.resolve import ResolvedRun, resolve_run
from poisonlab.training.schedule import checkpoint_steps, eval_steps, lr_at
from poisonlab.training.throughput import ProgressBar, Throughput


class Stream(Protocol):
    """What the trainer needs from the data (poisonlab.injection.stream.TrainingStream has it)."""

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def poisons_seen(self, steps_done: int) -> int: ...
    def write_ledger(self, path: Path) -> None: ...


class Evaluator(Protocol):
    """What the trainer needs from an evaluator (evaluation.evaluator.Evaluator has it). Under torchrun
    every rank calls run with `share` (this rank's part); alone, share is not passed."""

    def run(self, model: torch.nn.Module, *, step: int,
            autocast_dtype: torch.dtype | None = None, **share) -> tuple[dict, list[dict]]: ...


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


# --- the run's columns and inputs -----------------------------------------------------------------------

def run_columns(cfg: RunConfig, params_total: int, params_nonemb: int,
                data_epochs: int | None, clean_tokens: int | None = None) -> dict:
    """The run's settings in every metrics row, so a row stands alone: the contract's columns plus
    every setting a sweep may vary apart from the seeds (which a summary averages over, and says so)."""
    from poisonlab.evaluation.panel import panel_json, resolve_panel

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


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False, soft_wrap=True)


def _model_name(cfg: RunConfig) -> str:
    """The preset's name; for a model started from a local HF directory, that directory's name (its
    shape alone, `d576-l30`, would not say it is SmolLM2); else the shape."""
    m = cfg.model
    if m.preset:
        return m.preset
    if cfg.init.run is not None and is_hf_dir(Path(cfg.init.run)):
        return Path(cfg.init.run).name
    return f"d{m.d_model}-l{m.n_layers}"


def _default_stream(cfg: RunConfig, n_steps: int, poisons: list, clean_offset: int = 0) -> Stream:
    from poisonlab.attacks import trigger_patterns
    from poisonlab.injection.stream import TrainingStream

    # the clean data is checked for the trigger whatever N is, so N = 0 controls see the same data
    return TrainingStream(cfg.data, poisons, cfg.placement, seq_len=cfg.model.seq_len,
                          batch_size=cfg.train.batch_size, total_steps=n_steps, seed=cfg.train.seed,
                          triggers=trigger_patterns(cfg.data, cfg.attack),
                          clean_trigger=cfg.attack.clean_trigger, allow_repeat=cfg.train.allow_data_repeat,
                          clean_offset=clean_offset)


def _default_evaluator(cfg: RunConfig, poisons: list) -> Evaluator:
    from poisonlab.attacks import get_attack
    from poisonlab.evaluation.evaluator import Evaluator as Ev

    recipe = get_attack(cfg.attack.name)(cfg.attack)
    behaviour = None
    if recipe.metric != "ppl_gap":  # the recipe measures its behaviour itself, from the generations
        behaviour = functools.partial(recipe.behaviour_metrics, poisons)
    return Ev(cfg.eval, cfg.data, cfg.eval.trigger or cfg.attack.trigger, behaviour=behaviour)


def train(cfg: RunConfig, *, resume: bool = True, evaluator: Evaluator | None = None,
          stream: Stream | None = None, progress: bool = True) -> Path:
    """Train one run; return its directory. A finished run (DONE) is returned untouched.

    Order: check everything (config, data, poisons, stream, evaluator, budget), so that a run that
    cannot start leaves nothing behind; then take the run directory's lock (runlock: one trainer per
    run, RunBusy if another process has it) and hold it until the run ends.
    """
    recover(cfg.data)  # a data directory whose replacement was cut short by a crash (fsutil)
    run = resolve_run(cfg)  # the config, model, budget: resolved here once, handed to every stage
    run_dir = run.run_dir
    if resume:
        check_config(run_dir, run.cfg)  # before the DONE check: a changed config must not pass as done
        if (run_dir / "DONE").is_file():
            return run_dir
    if run.cfg.train.threads:
        torch.set_num_threads(run.cfg.train.threads)
    dist = distributed.init_distributed()
    stop = StopOnSignal()
    ok = False
    try:
        try:
            # nothing is written before this
            run = run.with_start()  # continued pretraining: checked before anything is written
            tracking.check(run.cfg.train.log_to, run_dir)  # a missing tracker: one line, not a crash mid-run
            stream, evaluator = _inputs(run, dist.world, stream, evaluator)
            with run_lock(run_dir, dist):
                if open_run_dir(run.cfg, run_dir, dist, resume=resume):
                    _train(run, dist, resume=resume, evaluator=evaluator, stream=stream,
                           progress=progress, stop=stop)
            ok = True
        finally:
            stop.close()
            distributed.close_distributed(dist, ok)
    except Stopped as e:
        stop.forward(e)  # submitit's handler requeues the job; without one the caller reports it
        raise
    return run_dir


def _inputs(run: ResolvedRun, world: int, stream: Stream | None,
            evaluator: Evaluator | None) -> tuple[Stream, Evaluator | None]:
    """The stream and the evaluator (the defaults unless given). Building them checks the data, the
    poisons, the budget and the evaluation settings: a UserError here comes before any file is written."""
    cfg, t = run.cfg, run.cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise UserError(f"train.batch_size {t.batch_size} must divide by processes x grad_accum "
                        f"({world} x {t.grad_accum})")
    build_evaluator = evaluator is None and (cfg.eval.n_evals > 0 or cfg.eval.every_steps)
    poisons: list = []
    if (stream is None or build_evaluator) and cfg.attack.n_poison > 0:
        from poisonlab.attacks import make_poisons

        poisons = make_poisons(cfg.data, cfg.attack)
    if stream is None:
        stream = _default_stream(cfg, run.n_steps, poisons, run.start.clean_offset if run.start else 0)
    if build_evaluator:
        evaluator = _default_evaluator(cfg, poisons)
    return stream, evaluator


def _train(run: ResolvedRun, dist: distributed.Dist, *, resume: bool, evaluator: Evaluator | None,
           stream: Stream, progress: bool, stop: StopOnSignal) -> None:
    cfg, run_dir, n_steps = run.cfg, run.run_dir, run.n_steps
    t, mcfg = cfg.train, cfg.model
    bf16 = use_bf16(t.dtype, dist.device, mcfg.d_model)
    model, train_model, opt = _build(cfg, dist, bf16)
    sharded = distributed.is_sharded(model)
    evals = set(eval_steps(cfg, n_steps, stream)) if evaluator is not None else set()
    ckpts = checkpoint_steps(t, n_steps, evals)
    records = RunRecords(run_dir, main=dist.main)

    start, state = 0, {}
    ckpt = resume_point(run_dir, dist, say=_say) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        start = state["step"]
    elif run.start is not None:
        load_start(run.start, model, opt if cfg.init.optimizer else None)
    records.resume(start - 1 if ckpt is None else start)
    if ckpt is None:
        records.write_ledger(stream)
    else:
        records.restore_ledger(stream, start, state.get("poisons_seen"), say=_say)

    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=bf16)
    tokens_per_step = run.tokens_per_step
    speed = Throughput(tokens_per_step, run.flops_per_token, _peak_flops(cfg, run_dir, dist, bf16), start)
    run_cols = _run_cols(run, stream, dist)
    # the curves of the records kept so far, then of every record as it is written (main rank only);
    # the run's and the evaluation's settings are constant columns, not curves
    records.track(tracking.Tracker(run_dir, t.log_to, settings=set(run_cols) | set(EvalConfig.model_fields),
                                   config=cfg.model_dump(mode="json"), config_text=dump_yaml(cfg),
                                   main=dist.main))

    # one rule in every layout: the fp32 master weights under the training's autocast (a sharded
    # model: a whole copy that computes exactly that, see distributed.replica)
    eval_autocast = torch.bfloat16 if bf16 else None

    def evaluate(step: int) -> None:
        # every rank evaluates its share of the prompts
        eval_model = distributed.replica(model, dist, eval_autocast)
        eval_model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            metrics, samples = evaluator.run(eval_model, step=step, autocast_dtype=eval_autocast,
                                             **({"share": dist} if dist.enabled else {}))
        del eval_model
        model.train()
        if dist.main:
            cols = dict(run_cols, step=step, tokens_seen=step * tokens_per_step, progress=step / n_steps,
                        poisons_seen=stream.poisons_seen(step))
            if hasattr(stream, "poisons_seen_effective"):
                cols["poisons_seen_effective"] = stream.poisons_seen_effective(step)
            records.add_evaluation({**cols, **metrics},
                                   [{"run_id": cfg.name, "step": step, **s} for s in samples])
        dist.barrier()

    # the loss summed since the last log line, and that line's step: in the checkpoint, so that
    # log.jsonl after a resume reads exactly as without the interruption
    loss_sum = torch.tensor(state.get("loss_sum", 0.0), dtype=torch.float32, device=dist.device)
    last_log = state.get("last_log_step", start)
    last_ckpt = start if ckpt is not None else None  # where a run interrupted now would go on from

    def checkpoint(step: int, lr: float) -> None:
        nonlocal last_ckpt
        # the loss so far averaged over ranks (each rank resumes from it: the mean of the next log line
        # is the same), on every rank, before a checkpoint that only some ranks write
        loss_so_far = dist.mean(loss_sum).item()
        if dist.main or sharded:  # a sharded model: each rank writes its rows
            save_checkpoint(run_dir, step, model, opt, dict(total_steps=n_steps, lr=lr,
                            tokens_seen=step * tokens_per_step, poisons_seen=stream.poisons_seen(step),
                            data_position=step, loss_sum=loss_so_far, last_log_step=last_log),
                            keep=t.keep_checkpoints, dist=dist if sharded else None)
        last_ckpt = step

    def boundary(step: int, lr: float) -> None:
        # order matters for resume: evaluation rows at `step` exist before its checkpoint does
        b0 = time.perf_counter()
        if step in evals:
            evaluate(step)
        if step in ckpts:
            checkpoint(step, lr)
        dist.barrier()
        signum = stop.requested(dist) if 0 < step < n_steps else 0
        if signum:  # a time limit, preemption or shutdown
            if step not in ckpts:
                checkpoint(step, lr)
            records.add_log({"step": step, "event": f"stopped on {signal_name(signum)}; checkpoint written"})
            dist.barrier()
            raise Stopped(step, signum)
        speed.pause(time.perf_counter() - b0)

    def log(done: int, lr: float) -> str:
        nonlocal last_log
        mean_loss = dist.mean(loss_sum).item() / (done - last_log)
        tps, mfu = speed.lap(done)
        entry = dict(step=done, loss=round(mean_loss, 6), lr=lr, tokens_per_s=round(tps, 1),
                     mfu=None if mfu is None else round(mfu, 4), poisons_seen=stream.poisons_seen(done))
        if hasattr(stream, "poisons_seen_effective"):
            entry["poisons_seen_effective"] = stream.poisons_seen_effective(done)
        records.add_log(dict(entry, tokens_seen=done * tokens_per_step))
        loss_sum.zero_()
        last_log = done
        return f"loss {mean_loss:.3f} | {tps:,.0f} tok/s" + (f" | MFU {mfu:.0%}" if mfu else "")

    bar = ProgressBar(progress and dist.main, n_steps, start)
    done = start
    try:
        if start == 0:
            boundary(0, lr_at(0, t, n_steps))
        model.train()
        for step in range(start, n_steps):
            lr = lr_at(step, t, n_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = stream.batch(step)
            _step(train_model, model, opt, dist.rows(x), dist.rows(y), t, dist, autocast, loss_sum)
            done = step + 1
            bar.update(done, log(done, lr) if done % t.log_every == 0 or done == n_steps else None)
            boundary(done, lr)
    except KeyboardInterrupt:
        raise Interrupted(done, last_ckpt) from None
    finally:
        bar.close()
        records.close()  # the trackers flushed: before DONE lists their files, and on a stop or crash
    if dist.main:  # last: the manifest of every file the run wrote
        write_done(run_dir, {"steps": n_steps})
    dist.barrier()


def _build(cfg: RunConfig, dist: distributed.Dist, bf16: bool
           ) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """(the model, the module that trains it (DDP, FSDP, compiled), AdamW with decay on matrices only)."""
    t = cfg.train
    model, train_model = distributed.build_model(
        cfg.model, dist, seed=t.seed, parallel=t.parallel, bf16=bf16,
        activation_checkpointing=t.activation_checkpointing)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # matrices and embedding
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norm weights
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=t.betas, fused=dist.device.type == "cuda")
    if t.compile:
        train_model = torch.compile(train_model)
    return model, train_model, opt


def _step(train_model: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer,
          x: torch.Tensor, y: torch.Tensor, t: TrainConfig, dist: distributed.Dist,
          autocast: torch.autocast, loss_sum: torch.Tensor) -> None:
    """One optimizer step on this rank's rows, accumulated over t.grad_accum micro-batches; adds the
    step's loss (this rank's mean) to loss_sum, one micro-batch at a time."""
    if dist.device.type == "cuda":  # page-locked, so the copies run asynchronously to the host
        x, y = (b.pin_memory().to(dist.device, non_blocking=True) for b in (x, y))
    else:
        x, y = x.to(dist.device), y.to(dist.device)
    micro = t.grad_accum
    for i, (xb, yb) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
        with distributed.no_sync(train_model, sync=i == micro - 1), autocast:
            loss = train_model(xb, yb) / micro
        loss.backward()
        loss_sum += loss.detach()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _peak_flops(cfg: RunConfig, run_dir: Path, dist: distributed.Dist, bf16: bool) -> float:
    """MFU's peak over all ranks: the GPU datasheet for this dtype, a GEMM measured here on CPU, or
    train.peak_flops; recorded in hardware.json."""
    info = peak_flops(dist.device, compute_dtype(dist.device, bf16), width=cfg.model.d_model,
                      given=cfg.train.peak_flops)
    if dist.main:
        write_text(run_dir / "hardware.json",
                   json.dumps(info.record() | {"world": dist.world, **describe_machine()}) + "\n")
    return (info.flops or 0.0) * dist.world


def _run_cols(run: ResolvedRun, stream: Stream, dist: distributed.Dist) -> dict:
    cfg, begin = run.cfg, run.start
    cols = run_columns(cfg, run.params_total, run.params_nonemb, getattr(stream, "epochs_needed", None),
                       getattr(stream, "clean_tokens_needed", None))
    # where a continued run started: the earlier run, its step, the clean tokens it had consumed
    cols.update(init_from=begin.name if begin else None, init_step=begin.step if begin else None,
                clean_offset=getattr(stream, "clean_offset", 0))  # as the stream snapped it
    if dist.main and (cols["data_epochs"] or 1) > 1:
        _warn(f"{cfg.name}: trains on {cols['data_epochs']} passes over the clean data of {cfg.data} "
              "(train.allow_data_repeat): repeated data is a different experiment from the study's")
    return cols
