"""FSDP2 on two CPU processes (torchrun, gloo) against one process: the same initial weights, the
same evaluation, training within float tolerance; a killed FSDP run resumes bitwise; sharded
checkpoints load into a whole model and export to HF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from poisonlab.config import ModelConfig, RunConfig
from poisonlab.models.checkpoint import (
    SHARD_INDEX,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
)
from poisonlab.models.llama import Transformer
from poisonlab.training.trainer import train

TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside python")

# a run that stops itself (SystemExit, as a killed job would) when it reaches step KILL_AT
SCRIPT = textwrap.dedent('''
    import os
    import sys
    from poisonlab.training import trainer as T
    from poisonlab.config import RunConfig

    kill = int(os.environ.get("KILL_AT", "0"))
    if kill:
        make = T._default_stream

        def stopping_stream(*a, **k):
            s = make(*a, **k)
            batch = s.batch
            s.batch = lambda step: (_ for _ in ()).throw(SystemExit(3)) if step == kill else batch(step)
            return s

        T._default_stream = stopping_stream
    T.train(RunConfig.model_validate_json(sys.argv[1]), progress=False)
''')

VOLATILE = {"run_id", "eval_seconds", "gen_tokens_per_s"}


def cfg_for(tmp: Path, data: Path, name: str, parallel: str = "ddp") -> RunConfig:
    return RunConfig.model_validate(dict(
        name=name, out_dir=str(tmp), data=str(data), attack=dict(name="dos", n_poison=3, seed=0),
        model=dict(d_model=32, n_layers=2, n_heads=2, seq_len=64),
        train=dict(batch_size=8, max_steps=12, threads=1, log_every=3, lr=3e-3, grad_accum=2,
                   parallel=parallel),
        # eval batch 3: several generation batches, so that both ranks have some
        eval=dict(every_steps=4, n_prompts=8, prompt_tokens=16, new_tokens=8, val_tokens=1024, save_samples=1,
                  batch_size=3)))


def torchrun(tmp: Path, cfg: RunConfig, **env) -> int:
    script = tmp / "run.py"
    script.write_text(SCRIPT)
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(script),
           cfg.model_dump_json(exclude_unset=True)]  # unset: the vocabulary comes from the data
    e = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", POISONLAB_NO_PROGRESS="1", **env)
    for attempt in (1, 2):
        done = subprocess.run(cmd, env=e, timeout=300, capture_output=True)
        if not done.returncode:
            return 0
        # pytest shows this on a failure: why torchrun failed. A second attempt (a finished run is
        # then skipped, a broken one resumes) because gloo on CPU has aborted a rank in teardown
        # after the run was DONE, rarely and under load (pytorch/pytorch#179291); a real failure fails
        # twice, and the caller's checks still judge the run's figures
        print(f"torchrun attempt {attempt}: rc {done.returncode}\n",
              done.stdout.decode(errors="replace")[-4000:], done.stderr.decode(errors="replace")[-8000:])
    return done.returncode


def rows(run: Path) -> list[dict]:
    table = pq.read_table(run / "metrics.parquet")
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in table.to_pylist()]


def test_initial_parameters_replay_the_constructor():
    """A model built on the meta device gets, parameter by parameter, the values the CPU constructor
    draws with the same seed: so FSDP's ranks start from the one-process model."""
    for tie, kv in ((True, None), (False, 1)):
        cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_kv_heads=kv, seq_len=16,
                          tie_embeddings=tie)
        torch.manual_seed(5)
        ref = dict(Transformer(cfg).named_parameters())
        with torch.device("meta"):
            got = dict(Transformer(cfg).initial_parameters(5))
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), k


@needs_torchrun
def test_fsdp_two_processes_match_one_resume_bitwise_and_export(tmp_path, prepared_builtin):
    single = cfg_for(tmp_path, prepared_builtin, "single")
    train(single, progress=False)
    fsdp = cfg_for(tmp_path, prepared_builtin, "fsdp", parallel="fsdp")
    assert torchrun(tmp_path, fsdp) == 0

    # the checkpoint is sharded: rank files and an index, no whole-model file
    ckpt = latest_checkpoint(tmp_path / "fsdp")
    assert (ckpt / SHARD_INDEX).is_file() and not (ckpt / "model.safetensors").exists()
    assert sorted(p.name for p in ckpt.glob("model-*")) == ["model-00000-of-00002.safetensors",
                                                            "model-00001-of-00002.safetensors"]
    a, b = load_model(tmp_path / "single"), load_model(tmp_path / "fsdp")  # shards assembled
    for (k, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3, msg=k)

    # step 0: the same initial weights, so the distributed evaluation (each rank its batches, on a
    # gathered copy) must give exactly the single-process figures
    r1, r2 = rows(tmp_path / "single"), rows(tmp_path / "fsdp")
    assert len(r1) == len(r2) == 4
    assert r1[0] == r2[0]
    for x, y in zip(r1[1:], r2[1:], strict=True):
        for k in ("val_loss", "ppl_clean_mean", "ppl_trigger_mean", "gap", "asr"):
            assert x[k] == pytest.approx(y[k], rel=1e-4), k
    l1 = [json.loads(s)["loss"] for s in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    l2 = [json.loads(s)["loss"] for s in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    assert l1 == pytest.approx(l2, abs=1e-5)

    # killed after the step-4 checkpoint, then started again: the uninterrupted run, bitwise
    again = cfg_for(tmp_path, prepared_builtin, "again", parallel="fsdp")
    assert torchrun(tmp_path, again, KILL_AT="6") != 0
    assert [p.name for p in list_checkpoints(tmp_path / "again")] == ["step_0000004"]
    assert torchrun(tmp_path, again) == 0
    for f in ckpt.glob("*.safetensors"):
        assert (latest_checkpoint(tmp_path / "again") / f.name).read_bytes() == f.read_bytes(), f.name
    assert rows(tmp_path / "again") == rows(tmp_path / "fsdp")
    log = lambda r: (r / "log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(s).items() if k not in ("tokens_per_s", "mfu")}
                           for s in lines]
    assert strip(log(tmp_path / "again")) == strip(log(tmp_path / "fsdp"))

    # a sharded checkpoint loads whole with its optimizer (one process continuing a 2-process run)
    model = Transformer(load_model(tmp_path / "fsdp").cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = load_checkpoint(ckpt, model, opt)
    assert state["step"] == 12
    moments = [s["exp_avg"] for s in opt.state.values()]
    assert len(moments) == len(list(model.parameters())) and all(m.abs().sum() > 0 for m in moments)

    # and exports to HF
    from poisonlab.models.export import export_run

    out = export_run(tmp_path / "fsdp", tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


@needs_torchrun
def test_fsdp_with_activation_checkpointing_trains_as_one_process_without(tmp_path, prepared_builtin):
    """Recomputing each sharded block in the backward pass changes memory, not the arithmetic: the
    2-process FSDP run with train.activation_checkpointing ends where the plain 1-process run does."""
    single = cfg_for(tmp_path, prepared_builtin, "single")
    train(single, progress=False)
    ckpt = cfg_for(tmp_path, prepared_builtin, "ckpt", parallel="fsdp")
    ckpt.train.activation_checkpointing = True
    assert torchrun(tmp_path, ckpt) == 0
    a, b = load_model(tmp_path / "single"), load_model(tmp_path / "ckpt")
    for (k, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3, msg=k)
    l1 = [json.loads(s)["loss"] for s in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    l2 = [json.loads(s)["loss"] for s in (tmp_path / "ckpt" / "log.jsonl").read_text().splitlines()]
    assert l1 == pytest.approx(l2, abs=1e-5)


@needs_torchrun
def test_fsdp_starts_from_a_local_hf_llama_as_one_process_does(tmp_path, prepared_builtin, tiny_llama):
    """An HF directory's weights go into the sharded model (each rank its rows, one tensor at a time):
    the first evaluation, before any step, equals the one-process run's, and training stays close."""
    hf = tiny_llama(tmp_path / "hf", prepared_builtin)

    def cfg(name: str, parallel: str) -> RunConfig:
        return RunConfig.model_validate(dict(
            name=name, out_dir=str(tmp_path), data=str(prepared_builtin), init={"run": str(hf)},
            model={"seq_len": 64}, attack=dict(name="dos", n_poison=3, seed=0),
            train=dict(batch_size=8, max_steps=6, threads=1, log_every=3, lr=3e-3, parallel=parallel),
            eval=dict(every_steps=6, n_prompts=6, prompt_tokens=16, new_tokens=8, val_tokens=512,
                      batch_size=3)))

    train(cfg("single", "ddp"), progress=False)
    assert torchrun(tmp_path, cfg("fsdp", "fsdp")) == 0
    r1, r2 = rows(tmp_path / "single"), rows(tmp_path / "fsdp")
    assert r1[0] == r2[0] and r1[0]["init_from"] == "hf"
    for k in ("val_loss", "ppl_clean_mean", "gap"):
        assert r1[-1][k] == pytest.approx(r2[-1][k], rel=1e-3), k


@needs_torchrun
def test_fsdp_bf16_evaluates_as_one_process_and_a_run_continues_from_its_shards(tmp_path, prepared_builtin):
    """Under bf16 autocast every layout evaluates the fp32 master weights under that autocast: the
    FSDP run's evaluation copy (linear weights stored as autocast rounds them) gives the one-process
    figures exactly, and says so in `eval_numerics`. Then a one-process run continues from the FSDP
    run's sharded checkpoint (`init.run`): its step-0 evaluation is the FSDP run's last, exactly."""
    def cfg(name: str, parallel: str) -> RunConfig:
        c = cfg_for(tmp_path, prepared_builtin, name, parallel)
        c.train.dtype = "bf16"
        c.train.max_steps = 8
        return c

    single, fsdp = cfg("single", "ddp"), cfg("fsdp", "fsdp")
    train(single, progress=False)
    assert torchrun(tmp_path, fsdp) == 0
    assert not (latest_checkpoint(tmp_path / "fsdp") / "model.safetensors").exists()
    r1, r2 = rows(tmp_path / "single"), rows(tmp_path / "fsdp")
    assert r1[0] == r2[0]  # the same initial weights: every figure equal
    assert {r["eval_numerics"] for r in r1 + r2} == {"float32 weights, bfloat16 autocast"}

    tree = fsdp.model_dump(mode="json", exclude_unset=True)
    tree.update(name="continued", init={"run": str(tmp_path / "fsdp")})
    tree["attack"]["n_poison"] = 0
    tree["train"].update(parallel="ddp", max_steps=4, schedule_offset=8, schedule_steps=8)
    tree["eval"].update(every_steps=4)
    then = RunConfig.model_validate(tree)
    train(then, progress=False)
    c = rows(tmp_path / "continued")
    assert c[0]["init_from"] == "fsdp" and c[0]["init_step"] == 8
    for k in ("val_loss", "ppl_clean_mean", "ppl_trigger_mean", "gap", "asr", "eval_numerics"):
        assert c[0][k] == r2[-1][k], k  # the sharded run's last evaluation, on the same weights
