"""A run resolved once: the config with its model preset applied and its vocabulary taken from the
data (or, for a run continued from an HF directory, the model of its config.json), the model's size,
the budget in steps and, once checked, where a continued run starts. The trainer and the planners
receive this object instead of re-deriving each piece at each stage.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from poisonlab.config import RunConfig
from poisonlab.errors import UserError
from poisonlab.models.llama import count_params, flops_per_token, resolve_model_config
from poisonlab.training.continued import Start, hf_model_config, is_hf_dir, resolve_start
from poisonlab.training.schedule import total_steps


@dataclass(frozen=True)
class ResolvedRun:
    cfg: RunConfig  # resolved: resolve_run_config(cfg) of the config given
    n_steps: int  # the run's budget in optimizer steps (schedule.total_steps)
    params_total: int
    params_nonemb: int
    start: Start | None = None  # where a continued run starts; set by with_start()

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.model.seq_len

    @property
    def flops_per_token(self) -> int:
        return flops_per_token(self.cfg.model)

    def with_start(self) -> ResolvedRun:
        """This run with its start point checked (continued pretraining: the earlier run or HF
        directory, its checkpoint and the clean tokens it consumed); raises UserError before anything
        is written. Not part of resolve_run, so that a finished run is returned without its parent."""
        return dataclasses.replace(self, start=resolve_start(self.cfg))


def resolve_run(cfg: RunConfig) -> ResolvedRun:
    cfg = resolve_run_config(cfg)
    total, nonemb = count_params(cfg.model)
    return ResolvedRun(cfg, total_steps(cfg), total, nonemb)


def resolve_run_config(cfg: RunConfig) -> RunConfig:
    """The run's config with the model preset applied and the vocabulary taken from the data (or, for a
    run continued from an HF directory, the model of its config.json)."""
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
