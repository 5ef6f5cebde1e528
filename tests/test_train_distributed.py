"""Two CPU processes under torchrun (DDP, gloo) train like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from poisonlab.config import RunConfig
from poisonlab.models.checkpoint import latest_checkpoint
from poisonlab.training.trainer import SyntheticStream, train

TORCHRUN = Path(sys.executable).with_name("torchrun")

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from poisonlab.config import RunConfig
    from poisonlab.training.trainer import SyntheticStream, train

    class Eval:
        def run(self, model, *, step, autocast_dtype=None, share=None):
            x = torch.arange(64).view(2, 32) % model.cfg.vocab_size
            return {"val_loss": model(x[:, :-1], x[:, 1:]).item()}, []

    cfg = RunConfig.model_validate_json(sys.argv[1])
    s = SyntheticStream(cfg.model.vocab_size, seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size)
    train(cfg, evaluator=Eval(), stream=s, progress=False)
''')


def cfg_for(tmp: Path, name: str, **train_kw) -> RunConfig:
    t = dict(batch_size=8, max_steps=6, threads=1, log_every=2, lr=3e-3)
    t.update(train_kw)
    return RunConfig.model_validate(dict(
        name=name, out_dir=str(tmp), data=str(tmp / "nodata"),
        model=dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, seq_len=32),
        train=t, eval=dict(every_steps=3)))


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside python")
@pytest.mark.parametrize("accum", [2])  # accumulation and no_sync included
def test_two_processes_match_one(tmp_path, accum):
    single = cfg_for(tmp_path, "single", grad_accum=accum)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    ddp = cfg_for(tmp_path, "ddp", grad_accum=accum)
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(script), ddp.model_dump_json()]
    subprocess.run(cmd,
                   env=env, check=True, timeout=300)
    exec(compile(SCRIPT.split("cfg = RunConfig")[0], "script", "exec"), ns := {})
    s = SyntheticStream(128, seq_len=32, batch_size=8)
    train(single, evaluator=ns["Eval"](), stream=s, progress=False)

    a = load_file(str(latest_checkpoint(tmp_path / "single") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "ddp") / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    ma = pq.read_table(tmp_path / "single" / "metrics.parquet").column("val_loss").to_pylist()
    mb = pq.read_table(tmp_path / "ddp" / "metrics.parquet").column("val_loss").to_pylist()
    assert len(ma) == len(mb) == 3
    assert ma == pytest.approx(mb, rel=1e-5)
    assert (tmp_path / "ddp" / "DONE").is_file()
