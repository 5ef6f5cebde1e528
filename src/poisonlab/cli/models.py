"""`poisonlab train`, `export` and `import-gguf`: make a model, and move models in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional  # noqa: F401  (typer reads Optional at runtime)

import typer
from rich.console import Console

console = Console(stderr=True)


def train_cmd(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. train.lr=3e-3")] = None,  # noqa: UP045
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="use the last checkpoint")] = True,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (train.threads)")] = None,  # noqa: UP045
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
) -> None:
    """Train one run (torchrun --nproc-per-node K ... for DDP); a finished run is skipped."""
    import os

    from poisonlab.config import load_run_config
    from poisonlab.training.trainer import train

    overrides = list(set_ or [])
    if threads is not None:
        overrides.append(f"train.threads={threads}")
    cfg = load_run_config(config, overrides)
    done = resume and (cfg.run_dir / "DONE").is_file()
    run = train(cfg, resume=resume, progress=progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, say it once
        console.print(f"run: {run}" + (" (already finished; --no-resume to train again)" if done else ""),
                      highlight=False)


def export_cmd(
    run: Annotated[Path, typer.Argument(help="run directory")],
    to: Annotated[Path, typer.Option("--to", help="output directory (HF LlamaForCausalLM)")],
    step: Annotated[Optional[int], typer.Option(help="checkpoint step (default: latest)")] = None,  # noqa: UP045
) -> None:
    """Export a run's model as a HF transformers checkpoint with its tokenizer and its model card
    (README.md: what was done to the model, first of all whether it is backdoored)."""
    from poisonlab.models.export import export_run

    out = export_run(run, to, step=step)
    console.print(f"exported: {out} (model card: {out / 'README.md'})", highlight=False)


def import_gguf_cmd(
    path: Annotated[Path, typer.Argument(help="a local .gguf file (llama.cpp's format)")],
    out: Annotated[Path, typer.Option("--out", help="HF model directory to write (safetensors + tokenizer)")],
    check: Annotated[bool, typer.Option(help="reload the output, compare its logits with the GGUF's")] = True,
) -> None:
    """Import a GGUF model as a local HF directory (weights dequantized to float32), offline."""
    from poisonlab.models.gguf_import import import_gguf

    r = import_gguf(path, out, check=check)
    types = ", ".join(f"{n} {k}" for k, n in sorted(r.tensor_types.items()))
    checked = "not checked" if r.max_logit_diff is None else f"max |logit diff| {r.max_logit_diff:.2g}"
    console.print(f"imported: {r.out} ({r.model_type}, {r.params / 1e6:.1f}M parameters, vocabulary "
                  f"{r.vocab_size}; from {types} tensors; {checked})", highlight=False)
