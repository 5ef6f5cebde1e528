"""The plan's memory model against the allocator's own measurements, and the plan's layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from poisonlab.cli import app, main
from poisonlab.config import ModelConfig, RunConfig
from poisonlab.models.llama import Transformer, _chunk_rows
from poisonlab.study.plan import GIB, get_gpu, measured_peak, plan_run, training_memory, usable_bytes

SHAPES = [  # d_model, n_layers, n_heads, vocab, seq_len, micro-batch: activations vs weights vs logits
    (64, 2, 4, 2048, 128, 16),
    (128, 4, 4, 2048, 128, 16),
    (256, 4, 8, 4096, 128, 8),
    (128, 2, 4, 8192, 256, 4),
]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-l{s[1]}-v{s[3]}-t{s[4]}-b{s[5]}")
def test_memory_model_matches_measured_peak(shape, bf16):
    """One real training step of poisonlab's model (AdamW moments already there), peak from the CPU
    allocator's events (torch.profiler): the estimate is within 20% (measured 0.96-1.11 when written)."""
    d, L, H, V, T, B = shape
    cfg = ModelConfig(d_model=d, n_layers=L, n_heads=H, vocab_size=V, seq_len=T)
    measured = measured_peak(cfg, micro_batch=B, bf16=bf16)
    est = training_memory(cfg, micro_batch=B, bf16=bf16, fused_adam=False,  # CPU AdamW is foreach
                          chunk_rows=_chunk_rows(torch.device("cpu"), V))
    assert 0.8 <= est.train / measured <= 1.2, (est, measured)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: f"d{s[0]}-l{s[1]}-v{s[3]}-t{s[4]}-b{s[5]}")
def test_memory_model_matches_measured_peak_with_activation_checkpointing(shape, bf16):
    """The same step with each block recomputed in the backward pass: the estimate (block inputs kept,
    one block recomputed at a time) is within 20% of the allocator's peak (measured 0.95-1.18 over six
    shapes when written: gradients are counted whole, though only part of them exist at the peak),
    and checkpointing lowers both the estimate and the measured peak."""
    d, L, H, V, T, B = shape
    cfg = ModelConfig(d_model=d, n_layers=L, n_heads=H, vocab_size=V, seq_len=T)
    measured = measured_peak(cfg, micro_batch=B, bf16=bf16, checkpointed=True)
    kw = dict(micro_batch=B, bf16=bf16, fused_adam=False, chunk_rows=_chunk_rows(torch.device("cpu"), V))
    est = training_memory(cfg, checkpointed=True, **kw)
    assert 0.8 <= est.train / measured <= 1.2, (est, measured)
    assert est.activations < training_memory(cfg, **kw).activations
    assert measured < measured_peak(cfg, micro_batch=B, bf16=bf16)


def test_activation_checkpointing_changes_no_gradient(monkeypatch):
    """Recomputing the blocks gives the same loss and the same gradients (fp32, to rounding), and the
    blocks do go through torch.utils.checkpoint, once per block."""
    import torch.utils.checkpoint as tc

    calls = []
    real = tc.checkpoint
    monkeypatch.setattr(tc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = ModelConfig(d_model=64, n_layers=3, n_heads=4, vocab_size=512, seq_len=32)
    x, y = torch.randint(0, 512, (2, 4, 32), generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.checkpoint_blocks = ckpt
        loss = model(x, y)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == cfg.n_layers
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_eval_cache_term_is_the_models_own_cache():
    cfg = ModelConfig(d_model=128, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=512, seq_len=64)
    model = Transformer(cfg)
    cache = model.new_cache(batch_size=7, max_len=90)
    nbytes = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    total = sum(p.numel() for p in model.parameters())
    mem = training_memory(cfg, micro_batch=1, bf16=False, eval_batch=7, eval_len=90)
    assert mem.eval == pytest.approx(4 * total + nbytes + 2 * 4 * 7 * 512)


def _run(preset: str, **train) -> RunConfig:
    return RunConfig.model_validate({"data": "/nonexistent", "model": {"preset": preset, "vocab_size": 32768},
                                     "train": {"batch_size": 512, "dtype": "bf16", **train},
                                     "eval": {"n_prompts": 300, "prompt_tokens": 64, "new_tokens": 100,
                                              "batch_size": 300}})


def test_every_gpu_has_a_datasheet_peak():
    from poisonlab.study.plan import GPUS

    assert all(g.bf16_flops > 1e14 for g in GPUS.values())


def test_plan_layouts_follow_memory():
    """A 600M model replicates (DDP); 13B's 208 GB of fp32 state cannot, so FSDP shards it; a GPU too
    small for it needs more nodes; every plan's peak is under the usable memory, and micro-batch x
    accumulation x GPUs is the global batch."""
    h100 = get_gpu("h100-80gb")
    small = plan_run(_run("paper-600m"), h100, gpus_per_node=8)
    big = plan_run(_run("paper-13b"), h100, gpus_per_node=8)
    a100 = plan_run(_run("paper-13b"), get_gpu("a100-40gb"), gpus_per_node=4)
    assert (small.strategy, big.strategy, a100.strategy) == ("ddp", "fsdp", "fsdp")
    assert a100.nodes > 1
    for p, gpu in ((small, h100), (big, h100), (a100, get_gpu("a100-40gb"))):
        assert p.fits and p.memory["peak"] * GIB <= usable_bytes(gpu)
        assert p.micro_batch * p.grad_accum * p.gpus == 512
    # the next larger micro-batch would not have fitted
    over = training_memory(_run("paper-600m").model.model_copy(update={"vocab_size": 32768}),
                           micro_batch=small.micro_batch * 2, world=8, strategy="ddp")
    assert over.train > usable_bytes(h100)
    # 16 bytes per parameter of fp32 state, sharded over the 8 GPUs of the node
    assert big.memory["weights"] + big.memory["grads"] + big.memory["optimizer"] == pytest.approx(
        16 * big.params / 8 / GIB)
    # GPU-hours: training FLOPs at the stated MFU, plus generation
    assert big.gpu_hours * 3600 >= big.train_flops / (h100.bf16_flops * 0.4)


def test_plan_respects_configured_accumulation_and_reports_misfits():
    h100 = get_gpu("h100-80gb")
    p = plan_run(_run("paper-600m", grad_accum=64), h100, gpus_per_node=8)
    assert (p.micro_batch, p.grad_accum) == (1, 64) and p.note == ""
    one = plan_run(_run("small-10m"), h100, gpus_per_node=1)
    assert one.strategy == "single" and one.memory["buffers"] > 0  # autocast's bf16 copies, no buckets
    none = plan_run(_run("paper-13b"), get_gpu("rtx-4090"), gpus_per_node=1, nodes=1)
    assert not none.fits and "micro-batch 1 needs" in none.note


def test_plan_turns_on_activation_checkpointing_only_when_one_sequence_does_not_fit():
    """600M at a 32k context on 8 x 40 GB GPUs: one sequence's activations do not fit beside the state,
    block inputs do; the plan checkpoints, with a note, and a run configured with checkpointing is
    planned with it and no note; the 2k context fits without it. Checkpointing costs the body's forward
    again: more GPU-hours, by less than a third. A Slurm sweep refuses the long runs unless set."""
    from poisonlab.errors import UserError
    from poisonlab.study.spec import expand, load_spec
    from poisonlab.study.sweep import check_fit

    a100, h100 = get_gpu("a100-40gb"), get_gpu("h100-80gb")
    long = _run("paper-600m", grad_accum=64)
    long.model.seq_len = 32768
    p = plan_run(long, a100, gpus_per_node=8)
    assert p.fits and p.strategy == "ddp" and p.activation_checkpointing and p.micro_batch == 1
    assert "train.activation_checkpointing=true" in p.note
    assert p.memory["peak"] * GIB <= usable_bytes(a100)
    plain = training_memory(long.model.model_copy(update={"vocab_size": 32768}), micro_batch=1, world=8,
                            strategy="ddp")
    assert plain.train > usable_bytes(a100)  # without it, not one sequence fits
    short = plan_run(_run("paper-600m", grad_accum=64), a100, gpus_per_node=8)
    assert short.fits and not short.activation_checkpointing and short.note == ""
    # on 80 GB the long context fits without recomputation; asked for, it is planned and costs more
    free = plan_run(long, h100, gpus_per_node=8)
    long.train.activation_checkpointing = True
    asked = plan_run(long, h100, gpus_per_node=8)
    assert not free.activation_checkpointing and asked.activation_checkpointing and asked.note == ""
    assert asked.memory["peak"] < free.memory["peak"]
    assert 1.0 < asked.gpu_hours / free.gpu_hours < 4 / 3
    spec = load_spec("paper", ["model.vocab_size=32768"]).model_copy(
        update={"gpu": "a100-40gb", "slurm": {"gpus_per_node": 8, "nodes": 1}})
    runs = [r for r in expand(spec, Path("unused")) if r.config.model.preset == "paper-600m"][:2]
    for r in runs:
        r.config.model.seq_len, r.config.train.grad_accum = 32768, 64
    with pytest.raises(UserError, match=r"2 run\(s\) do not fit .*activation_checkpointing=true"):
        check_fit(spec, runs)
    for r in runs:
        r.config.train.activation_checkpointing = True
    check_fit(spec, runs)


def test_plan_cli_paper_preset_fits(capsys):
    """The paper preset on 8 x H100 nodes: every run fits (7B and 13B under FSDP), in JSON too."""
    r = CliRunner().invoke(app, ["plan", "paper", "--json", "--set", "model.vocab_size=32768"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["totals"]["runs"] == 72 and out["totals"]["fit"] == 72
    by_model = {row["model"]: row for row in out["runs"]}
    assert by_model["paper-600m"]["strategy"] == "ddp" and by_model["paper-13b"]["strategy"] == "fsdp"
    # the preset's accumulation is the plan's: nothing to change
    assert all(row["note"] == "" for row in out["runs"])  # 7B and 13B are set to train.parallel=fsdp
    with pytest.raises(SystemExit) as e:
        main(["plan", "paper", "--gpu", "tpu-v9"])
    assert e.value.code == 2 and "unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # 13B on one 24 GB GPU: no layout, exit 1
        main(["plan", "paper", "--gpu", "rtx-4090", "--gpus-per-node", "1", "--nodes", "1"])
    assert e.value.code == 1 and "runs fit" in capsys.readouterr().err


def test_slurm_sweep_refuses_runs_the_plan_cannot_fit(tmp_path):
    """Before anything is submitted: the paper preset fits 8 x H100 as it is (7B and 13B set to FSDP);
    the same runs under DDP do not, and `--executor slurm` refuses them, naming the runs."""
    from poisonlab.errors import UserError
    from poisonlab.study.spec import expand, load_spec
    from poisonlab.study.sweep import check_fit, run_sweep

    spec = load_spec("paper", ["model.vocab_size=32768"])
    runs = expand(spec, tmp_path)
    check_fit(spec, runs)  # every run fits
    big = [r for r in runs if r.config.model.preset in ("paper-7b", "paper-13b")]
    assert len(big) == 18 and all(r.config.train.parallel == "fsdp" for r in big)
    for r in big:
        r.config.train.parallel = "ddp"
    with pytest.raises(UserError, match=r"18 run\(s\) do not fit .*paper-7b.*train.parallel=fsdp"):
        check_fit(spec, runs)
    # a GPU on which 13B fits on no layout: refused before submission
    small = load_spec("paper", ["model.vocab_size=32768"]).model_copy(update={"gpu": "rtx-4090"})
    with pytest.raises(UserError, match="do not fit"):
        run_sweep(small, tmp_path, executor="slurm", run_fn="poisonlab.study.executors:default_run_fn",
                  progress=False, report=False)
    assert not (tmp_path / "slurm").exists()  # nothing submitted


def test_gpu_check_script_runs_on_cpu():
    """benchmarks/gpu_check.py is for CUDA machines; its CPU path keeps it working between them."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    args = ["--device", "cpu", "--presets", "tiny-25k", "--steps", "1", "--batch", "2", "--eval-batch", "2"]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    train, ev = out["rows"]
    assert train["preset"] == "tiny-25k" and train["tokens_per_s"] > 0 and train["plan_gib"] > 0
    assert ev["eval_tokens_per_s"] > 0


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_gpu_check_distributed_rows_run_under_torchrun_on_cpu(parallel):
    """The rows gpu_check.py makes on several GPUs (itself under torchrun, the trainer's DDP/FSDP
    build), on 2 CPU processes: tokens/s over both ranks and the plan's estimate for that layout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside python")
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), "--parallel", parallel,
           "--presets", "tiny-25k", "--steps", "1", "--batch", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout.strip().splitlines()[-1])["rows"]
    assert row["parallel"] == parallel and row["gpus"] == 2 and row["tokens_per_s"] > 0
    assert row["plan_gib"] > 0


@pytest.mark.parametrize("scorer", ["self", "hf"])
def test_plan_counts_the_evaluation_tokens_the_evaluator_runs(scorer, prepared_builtin, tiny_llama, tmp_path):
    """The plan's evaluation tokens against the positions that really go through a forward pass in
    one evaluation (hooks on the input embedding of the model and of the scorer; no val_loss): the
    model scores its own generations from their logits, so with `scorer: self` every sequence counts
    once, and a reference scorer reads each once more. Every control of the panel is a condition."""
    from poisonlab.evaluation.evaluator import Evaluator
    from poisonlab.evaluation.generation import is_hf_model
    from poisonlab.study.plan import _eval_sizes, eval_conditions

    ref = None if scorer == "self" else tiny_llama(tmp_path / "ref", prepared_builtin)
    cfg = RunConfig.model_validate({"data": str(prepared_builtin), "model": {"d_model": 32, "n_layers": 2,
                                    "n_heads": 2, "seq_len": 128, "vocab_size": 512},
                                    "eval": {"n_prompts": 4, "prompt_tokens": 48, "new_tokens": 32,
                                             "n_evals": 0, "val_tokens": 0, "scorer": str(ref or "self")}})
    ev = Evaluator(cfg.eval, prepared_builtin, cfg.attack.trigger)
    counted = [0]

    def count(module, args):
        counted[0] += args[0].shape[0] * args[0].shape[1]

    model = Transformer(cfg.model)
    model.tok_emb.register_forward_pre_hook(count)
    real_scorer, hooked = ev._scorer_for, set()

    def scorer_with_hook(device):
        s = real_scorer(device)
        if s is not None and id(s) not in hooked:
            assert is_hf_model(s.lm.model)
            s.lm.model.get_input_embeddings().register_forward_pre_hook(count)
            hooked.add(id(s))
        return s

    ev._scorer_for = scorer_with_hook
    ev.run(model)
    assert eval_conditions(cfg) == len(ev.conditions) == 9  # clean, trigger, 7 controls of <SUDO>
    _, planned = _eval_sizes(cfg, eval_conditions(cfg), steps=1)  # n_evals 0: one evaluation point
    assert 0.95 <= planned / counted[0] <= 1.1, (planned, counted[0])
    assert (ref is None) == (cfg.eval.scorer == "self")
