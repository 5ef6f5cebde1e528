"""What the hardware can do: CPU features, the peak FLOP/s that MFU is a share of, a machine summary.

MFU = model FLOPs per token x tokens/s / peak. The peak is
- on a known GPU, the datasheet's dense (no sparsity) figure for the dtype the matmuls really run in:
  bf16 under autocast, tf32 for fp32 matmuls with TF32 enabled, else fp32 (`GPU_PEAKS`, picked by the
  full device name: H100 SXM, PCIe and NVL differ);
- on a CPU, a GEMM measured in this process at the run's dtype and thread count (`measure_gemm_flops`):
  clocks, turbo, shared cores and AVX2 / AVX-512 / AMX make any formula a guess, so on CPU "MFU" means
  "share of what torch.matmul achieves here";
- or the user's `train.peak_flops`.
`Peak.kind` says which ("table", "measured", "user", or "unknown" for a GPU missing from the table).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# --- CPU features ---------------------------------------------------------------------------------------

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text()
    return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_features(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of avx2, avx512f, avx512_bf16, amx_bf16 the CPU reports."""
    flags = cpu_flags(cpuinfo)
    return {f: f in flags for f in CPU_FEATURES}


def cpu_has_amx() -> bool:
    return "amx_bf16" in cpu_flags()


def cpu_model(cpuinfo: str | None = None) -> str:
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cpu_cores(cpuinfo: str | None = None) -> int:
    """Physical cores: distinct (physical id, core id) pairs, else the logical CPU count."""
    pairs, phys = set(), "0"
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            pairs.add((phys, value.strip()))
    return len(pairs) or os.cpu_count() or 1


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset or Slurm)."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --- GPU peaks ------------------------------------------------------------------------------------------
# Dense tensor-core figures from NVIDIA's datasheets, in FLOP/s. Datasheets print TF32/BF16 "with
# sparsity" (marked *); the dense figure is half of it. Rows are tried in order against the lower-cased
# device name (`torch.cuda.get_device_name`), so a more specific name comes first. A dtype missing from
# a row has no datasheet figure (V100: no bf16, whose emulation has no peak; no TF32, so tf32 -> fp32).
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    # GH200 datasheet: FP32 67, TF32 494 | 989*, BF16 990 | 1,979* TFLOPS
    ("GH200", r"gh200", dict(fp32=67e12, tf32=494e12, bf16=990e12)),
    # H200 datasheet, H200 NVL column: FP32 60, TF32 835*, BF16 1,671*
    ("H200 NVL", r"h200.*nvl", dict(fp32=60e12, tf32=417.5e12, bf16=835.5e12)),
    # H200 datasheet, H200 SXM column: FP32 67, TF32 989*, BF16 1,979*
    ("H200 SXM", r"h200", dict(fp32=67e12, tf32=494.5e12, bf16=989.5e12)),
    # H100 datasheet, H100 NVL column (per GPU): FP32 60, TF32 835*, BF16 1,671*
    ("H100 NVL", r"h100.*nvl", dict(fp32=60e12, tf32=417.5e12, bf16=835.5e12)),
    # H100 datasheet, H100 PCIe column: FP32 51, TF32 756*, BF16 1,513*
    ("H100 PCIe", r"h100.*pcie", dict(fp32=51e12, tf32=378e12, bf16=756.5e12)),
    # H100 datasheet, H100 SXM column: FP32 67, TF32 989*, BF16 1,979* (name "NVIDIA H100 80GB HBM3")
    ("H100 SXM", r"h100.*(sxm|hbm3)", dict(fp32=67e12, tf32=494.5e12, bf16=989.5e12)),
    # A100 datasheet: FP32 19.5, TF32 156 | 312*, BF16 312 | 624*, the same for SXM and PCIe
    ("A100 SXM", r"a100.*sxm", dict(fp32=19.5e12, tf32=156e12, bf16=312e12)),
    ("A100 PCIe", r"a100.*pcie", dict(fp32=19.5e12, tf32=156e12, bf16=312e12)),
    # A10 datasheet: FP32 31.2, TF32 62.5 | 125*, BF16 125 | 250* (not the A10G, which differs)
    ("A10", r"\ba10\b", dict(fp32=31.2e12, tf32=62.5e12, bf16=125e12)),
    # A40 datasheet: FP32 37.4, TF32 74.8 | 149.6*, BF16 149.7 | 299.4*
    ("A40", r"\ba40\b", dict(fp32=37.4e12, tf32=74.8e12, bf16=149.7e12)),
    # L4 datasheet: FP32 30.3, TF32 120*, BF16 242*
    ("L4", r"\bl4\b", dict(fp32=30.3e12, tf32=60e12, bf16=121e12)),
    # L40S datasheet: FP32 91.6, TF32 183 | 366*, BF16 362.05 | 733*
    ("L40S", r"\bl40s\b", dict(fp32=91.6e12, tf32=183e12, bf16=362.05e12)),
    # L40 datasheet: FP32 90.5, TF32 90.5 | 181*, BF16 181.05 | 362.1*
    ("L40", r"\bl40\b", dict(fp32=90.5e12, tf32=90.5e12, bf16=181.05e12)),
    # Ada whitepaper (RTX 4090): FP32 82.6; TF32 82.6 | 165.2*; BF16 with FP32 accumulate 165.2 | 330.4*
    ("RTX 4090", r"rtx 4090$", dict(fp32=82.6e12, tf32=82.6e12, bf16=165.2e12)),
    # GA102 whitepaper (RTX 3090): FP32 35.6; TF32 35.6 | 71*; BF16 with FP32 accumulate 71 | 142*
    ("RTX 3090", r"rtx 3090$", dict(fp32=35.6e12, tf32=35.6e12, bf16=71e12)),
    # V100 datasheet: FP32 15.7 (SXM2), 14 (PCIe), 16.4 (V100S PCIe); tensor cores are fp16 only
    ("V100S PCIe", r"v100s", dict(fp32=16.4e12)),
    ("V100 SXM2", r"v100.*sxm2", dict(fp32=15.7e12)),
    ("V100 PCIe", r"v100.*pcie", dict(fp32=14e12)),
]


def gpu_row(name: str) -> tuple[str, dict[str, float]] | None:
    """(row label, peaks by dtype) of the table row matching a full CUDA device name, or None."""
    low = name.lower().strip()
    for label, pattern, peaks in GPU_PEAKS:
        if re.search(pattern, low):
            return label, peaks
    return None


def gpu_peak_flops(name: str, dtype: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s of the device named `name` at `dtype`, the table row used); None if unknown."""
    row = gpu_row(name)
    if row is None:
        return None, "not in the table"
    label, peaks = row
    if dtype == "tf32" and "tf32" not in peaks:  # no TF32 units: fp32 matmuls run as fp32
        dtype = "fp32"
    return peaks.get(dtype), label


# --- the dtype a run computes in, and whether to use bf16 ----------------------------------------------

# bf16 autocast on CPU pays only with AMX (without it, bf16 matmul measured ~100x slower than fp32 on an
# AVX2 machine) and from width 128 up (+14% at 128, +9% at 256, +60% at 512 in CALIBRATION.md)
CPU_BF16_MIN_WIDTH = 128


def use_bf16(dtype: str, device: torch.device, d_model: int) -> bool:
    """Whether training runs under bf16 autocast: `train.dtype`, or for "auto" where it is native."""
    if dtype != "auto":
        return dtype == "bf16"
    if device.type == "cuda":
        # native only (compute capability >= 8): by default torch also says yes where bf16 is emulated (V100)
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before the argument existed
            return torch.cuda.get_device_capability(device)[0] >= 8
    return cpu_has_amx() and d_model >= CPU_BF16_MIN_WIDTH


def compute_dtype(device: torch.device, bf16: bool) -> str:
    """What the matmuls really run in: "bf16" (autocast), "tf32" (fp32 with TF32 on CUDA) or "fp32"."""
    if bf16:
        return "bf16"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:  # also set by matmul precision "high"
        return "tf32"
    return "fp32"


def eval_numerics(weights: torch.dtype, autocast: torch.dtype | None) -> str:
    """What an evaluation computes in, as the `eval_numerics` column says it: the dtype of the weights
    it evaluates and the autocast over them ("float32 weights, bfloat16 autocast"; "float32 weights")."""
    name = lambda d: str(d).removeprefix("torch.")
    return f"{name(weights)} weights" + (f", {name(autocast)} autocast" if autocast is not None else "")


# --- the CPU GEMM probe ---------------------------------------------------------------------------------

PROBE_ROWS = 2048  # rows of the probe's left matrix: a micro-batch of tokens (16 x 128)
PROBE_SECONDS = 0.25


def probe_width(d_model: int) -> int:
    """Inner and output size of the probe: the model's width, in [256, 1024] so that the GEMM is
    compute-bound (narrower ones measure call overhead) and stays within the time budget."""
    return min(1024, max(256, 64 * math.ceil(d_model / 64)))


def measure_gemm_flops(dtype: str = "fp32", width: int = 256, rows: int = PROBE_ROWS,
                       budget_s: float = PROBE_SECONDS, cached: bool = True) -> float:
    """Best FLOP/s of torch.matmul (rows x width) @ (width x width) on the CPU, at `dtype` and the current
    torch thread count; cached per process unless `cached=False`. Bounded in time whatever the speed:
    it starts on 64 rows and doubles them only while a call takes under a twentieth of `budget_s`
    (bf16 without AMX or AVX512-BF16 can run at ~1 GFLOP/s), and stops at the budget."""
    fn = _measure if cached else _measure.__wrapped__
    return fn(dtype, width, rows, budget_s, torch.get_num_threads())


@functools.lru_cache(maxsize=64)
def _measure(dtype: str, width: int, rows: int, budget_s: float, threads: int) -> float:
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, width, generator=g).to(dt)
    b = torch.randn(width, width, generator=g).to(dt)
    n, best, calls = 64, 0.0, 0
    torch.matmul(a[:n], b)  # untimed: the first call pays the BLAS library's start-up (seconds, loaded)
    deadline = time.perf_counter() + budget_s
    while True:
        t0 = time.perf_counter()
        torch.matmul(a[:n], b)
        dt_s = time.perf_counter() - t0
        best = max(best, 2 * n * width * width / max(dt_s, 1e-9))
        calls += 1
        if time.perf_counter() >= deadline and calls >= 5:  # never a single (possibly cold) call
            return best
        if n < rows and dt_s < budget_s / 20:
            n = min(rows, 2 * n)


# --- the peak of a run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    flops: float | None  # FLOP/s of one device; None: unknown (no MFU is reported)
    kind: str  # "table" | "measured" | "user" | "unknown"
    dtype: str  # what the run's matmuls compute in
    source: str  # the table row, or the probe's shape and threads

    def record(self) -> dict:
        return {f"peak_{k}": v for k, v in asdict(self).items()}


def peak_flops(device: torch.device, dtype: str, *, width: int = 256, given: float | None = None) -> Peak:
    """The peak MFU is a share of, for one device computing in `dtype` ("fp32", "tf32", "bf16"):
    `given` (train.peak_flops) if set, else the GPU table, else on CPU a GEMM measured here."""
    if given:
        return Peak(float(given), "user", dtype, "train.peak_flops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops, row = gpu_peak_flops(name, dtype)
        return Peak(flops, "table" if flops else "unknown", dtype, f"{name}: {row}")
    cpu_dtype = "bf16" if dtype == "bf16" else "fp32"
    w = probe_width(width)
    flops = measure_gemm_flops(cpu_dtype, w)
    threads = torch.get_num_threads()
    return Peak(flops, "measured", cpu_dtype, f"torch.matmul {PROBE_ROWS}x{w} @ {w}x{w} {cpu_dtype}, "
                f"{threads} thread{'s' if threads > 1 else ''}")


def estimate_mfu(flops_per_tok: int, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak."""
    return flops_per_tok * tokens_per_s / peak if peak else None


# --- what a benchmark ran on -----------------------------------------------------------------------------


def describe_machine() -> dict:
    """CPU model, cores/threads, features, torch version and threads, GPU name: printed by benchmarks."""
    return {
        "cpu": cpu_model(),
        "cores": cpu_cores(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "features": [f for f, on in cpu_features().items() if on],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def machine_line(info: dict | None = None) -> str:
    """describe_machine() as one line, for the start of a benchmark's output."""
    m = info or describe_machine()
    feats = ", ".join(m["features"]) or "none of " + "/".join(CPU_FEATURES)
    return (f"machine: {m['cpu']}, {m['cores']} cores / {m['logical_cpus']} threads "
            f"({m['usable_cpus']} usable), {feats}; torch {m['torch']}, {m['torch_threads']} threads; "
            f"GPU {m['gpu'] or 'none'}; load {m['load_avg_1m']}")
