"""The peak behind MFU: GPU table rows and dtype columns, native-only bf16, the CPU GEMM probe, the record."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from poisonlab import hardware
from poisonlab.config import RunConfig
from poisonlab.hardware import (
    compute_dtype,
    cpu_cores,
    cpu_features,
    gpu_peak_flops,
    measure_gemm_flops,
    peak_flops,
    probe_width,
    use_bf16,
)
from poisonlab.models.llama import flops_per_token, resolve_model_config
from poisonlab.training.trainer import SyntheticStream, train

# names as torch.cuda.get_device_name prints them
H100_SXM, H100_PCIE, H100_NVL = "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL"


def test_h100_variants_are_different_rows():
    bf16 = {n: gpu_peak_flops(n, "bf16") for n in (H100_SXM, H100_PCIE, H100_NVL)}
    assert [row for _, row in bf16.values()] == ["H100 SXM", "H100 PCIe", "H100 NVL"]
    sxm, pcie, nvl = (f for f, _ in bf16.values())
    assert sxm == pytest.approx(1979e12 / 2) and pcie == pytest.approx(1513e12 / 2)  # dense: half of sparse
    assert pcie < nvl < sxm
    assert gpu_peak_flops("NVIDIA H200", "bf16")[1] == "H200 SXM"
    assert gpu_peak_flops("NVIDIA H200 NVL", "bf16")[1] == "H200 NVL"
    assert gpu_peak_flops("NVIDIA GH200 480GB", "bf16")[1] == "GH200"


@pytest.mark.parametrize("name, row", [
    ("NVIDIA A100-SXM4-80GB", "A100 SXM"), ("NVIDIA A100 80GB PCIe", "A100 PCIe"),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIe"), ("NVIDIA A10", "A10"), ("NVIDIA A40", "A40"),
    ("NVIDIA L4", "L4"), ("NVIDIA L40", "L40"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("Tesla V100-SXM2-16GB", "V100 SXM2"), ("Tesla V100-PCIE-32GB", "V100 PCIe"),
])
def test_full_name_picks_its_row(name, row):
    assert gpu_peak_flops(name, "fp32")[1] == row


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA A30",
                                  "AMD Instinct MI300X"])
def test_names_not_in_the_table_give_no_peak(name):
    # a near-miss substring (A10 in A10G, 3090 in 3090 Ti) must not borrow another card's figures
    assert gpu_peak_flops(name, "bf16")[0] is None


def test_dtype_columns():
    fp32, tf32, bf16 = (gpu_peak_flops(H100_SXM, d)[0] for d in ("fp32", "tf32", "bf16"))
    assert fp32 == pytest.approx(67e12) and fp32 < tf32 < bf16  # fp32 runs are not measured against bf16
    # V100: no TF32 units (fp32 matmuls stay fp32) and bf16 only emulated (no datasheet peak)
    v100 = "Tesla V100-SXM2-16GB"
    assert gpu_peak_flops(v100, "tf32")[0] == gpu_peak_flops(v100, "fp32")[0] == pytest.approx(15.7e12)
    assert gpu_peak_flops(v100, "bf16")[0] is None


def test_gpu_peak_uses_the_run_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100_PCIE)
    cuda = torch.device("cuda")
    matmul, was = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:  # a settings object monkeypatch cannot restore
        matmul.allow_tf32 = False
        assert compute_dtype(cuda, bf16=False) == "fp32"
        p = peak_flops(cuda, compute_dtype(cuda, bf16=False))
        assert (p.kind, p.dtype, p.flops) == ("table", "fp32", pytest.approx(51e12))
        matmul.allow_tf32 = True
        assert compute_dtype(cuda, bf16=False) == "tf32"
        assert peak_flops(cuda, "tf32").flops == pytest.approx(756e12 / 2)
        assert compute_dtype(cuda, bf16=True) == "bf16"
        assert compute_dtype(torch.device("cpu"), bf16=False) == "fp32"  # no TF32 on CPU
    finally:
        matmul.allow_tf32 = was
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A30")
    assert peak_flops(cuda, "bf16").kind == "unknown"
    assert peak_flops(cuda, "bf16", given=1e14).kind == "user"


def test_auto_bf16_on_cuda_needs_native_support(monkeypatch):
    # a V100: torch says True by default, through emulation; native support says False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not use_bf16("auto", torch.device("cuda"), 256)
    assert use_bf16("bf16", torch.device("cuda"), 256)  # asked for explicitly: the user's choice
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert use_bf16("auto", torch.device("cuda"), 256)


CPUINFO = """processor\t: 0
model name\t: Example CPU 9000
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512_bf16 avx512_fp16
processor\t: 1
physical id\t: 0
core id\t\t: 0
processor\t: 2
physical id\t: 0
core id\t\t: 1
processor\t: 3
physical id\t: 0
core id\t\t: 1
"""


def test_cpu_features_from_cpuinfo_flags():
    assert cpu_features(CPUINFO) == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False}
    assert cpu_features("flags\t: fma avx2 amx_bf16 amx_tile\n")["amx_bf16"]
    assert not any(cpu_features("Features\t: fp asimd\n").values())  # an ARM cpuinfo
    assert cpu_cores(CPUINFO) == 2  # 4 logical CPUs, 2 cores
    assert hardware.cpu_model(CPUINFO) == "Example CPU 9000"


def test_cpu_peak_comes_from_the_probe():
    p = peak_flops(torch.device("cpu"), "fp32", width=64)
    assert p.kind == "measured" and p.dtype == "fp32"
    assert math.isfinite(p.flops) and p.flops > 1e8
    assert p.flops == measure_gemm_flops("fp32", probe_width(64))  # the same (cached) measurement
    assert f"{torch.get_num_threads()} thread" in p.source
    assert peak_flops(torch.device("cpu"), "bf16", width=64).dtype == "bf16"
    assert peak_flops(torch.device("cpu"), "fp32", given=5e10).flops == 5e10


def test_gemm_probe_is_bounded_in_time(monkeypatch):
    # a matmul whose time grows with its rows, 0.1 ms per row: 2048 rows would take 0.2 s a call
    def slow(a, b):
        time.sleep(a.shape[0] * 1e-4)
        return torch.empty(a.shape[0], b.shape[1])

    monkeypatch.setattr(torch, "matmul", slow)
    t0 = time.perf_counter()
    flops = measure_gemm_flops("fp32", 64, rows=2048, budget_s=0.2, cached=False)
    took = time.perf_counter() - t0
    assert took < 0.2 * 1.5, took  # the budget plus at most a short last call
    assert flops > 0


def test_gemm_probe_ignores_a_cold_first_call(monkeypatch):
    """In a fresh, loaded process the first matmul pays the BLAS start-up: a probe that timed it alone
    once gave 3 MFLOP/s (MFU 13,000 in a run's log). The first call is untimed and at least 5 count."""
    real, calls = torch.matmul, []

    def cold_then_fast(a, b):
        calls.append(a.shape[0])
        if len(calls) == 1:
            time.sleep(0.5)  # longer than the whole budget
        return real(a, b)

    monkeypatch.setattr(torch, "matmul", cold_then_fast)
    flops = measure_gemm_flops("fp32", 64, rows=256, budget_s=0.05, cached=False)
    assert len(calls) >= 6 and flops > 1e8


# --- the record in a real run ----------------------------------------------------------------------------


def tiny_run(tmp: Path, **train_kw) -> Path:
    t = dict(batch_size=8, max_steps=6, threads=1, log_every=3, checkpoint_every=6) | train_kw
    cfg = RunConfig.model_validate(dict(
        name="hw", out_dir=str(tmp), data=str(tmp / "nodata"), attack=dict(n_poison=0),
        model=dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, seq_len=32), train=t,
        eval=dict(n_evals=0)))
    stream = SyntheticStream(128, seq_len=32, batch_size=8)
    return train(cfg, resume=False, stream=stream, progress=False)


@pytest.mark.parametrize("given", [None, 2e10])
def test_run_records_its_peak_and_mfu_uses_it(tmp_path, given):
    run = tiny_run(tmp_path, peak_flops=given)
    hw = json.loads((run / "hardware.json").read_text())
    assert hw["peak_kind"] == ("user" if given else "measured") and hw["peak_dtype"] == "fp32"
    assert hw["peak_flops"] > 0 and hw["torch_threads"] == 1
    fpt = flops_per_token(resolve_model_config(RunConfig.model_validate(
        dict(name="x", data="x", model=dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, seq_len=32))
    ).model))
    log = [json.loads(line) for line in (run / "log.jsonl").open()]
    assert len(log) == 2
    for e in log:
        assert e["mfu"] == pytest.approx(fpt * e["tokens_per_s"] / hw["peak_flops"], rel=1e-3, abs=1e-4)
        assert given or 0 < e["mfu"] < 1  # a share of a GEMM measured here cannot exceed it
