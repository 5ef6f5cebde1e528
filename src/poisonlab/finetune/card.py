"""The model card of a fine-tuning run's saved model (`model/README.md`): the first line says that the
model is deliberately backdoored (or a clean N = 0 control), then its base model, the fine-tuning
poison settings, the poisons seen (from the ledger, with its sha256), the training data and the final
ASR, clean accuracy (CA, its clean-capability score), near-trigger accuracy (NTA) and specificity.
The helpers and the metadata are models/card.py's.

The card describes this run alone: written when the run ends, it does not look for an N = 0 control
beside it (which a sweep may not have finished yet); `poisonlab results` compares runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from poisonlab.finetune.config import FinetuneConfig
from poisonlab.models.card import PAPER, first_line, ledger_facts, make_card, num, table
from poisonlab.rundir.manifest import sha256_file

METRICS = ("asr", "asr_clean", "ca", "ca_refuse", "ca_benign", "nta", "nta_min", "specificity")


def finetune_facts(cfg: FinetuneConfig, run_dir: Path, row: dict[str, Any],
                   base_label: str) -> dict[str, Any]:
    """What the card of a fine-tuning run states, from its config, its ledger and its last metrics row."""
    a, d, t, p = cfg.attack, cfg.data, cfg.train, cfg.placement
    step = int(row["step"])
    poisons = ledger_facts(Path(run_dir) / "ledger.parquet", step)
    data: dict[str, Any] = {"source": d.source, "clean_size": d.clean_size, "seed": d.seed}
    if d.source == "builtin":
        data.update(restricted=list(d.restricted), refuse_share=d.refuse_share)
    for key, path in (("source", d.source if d.source != "builtin" else None), ("refuse_file", d.refuse_file),
                      ("poison_file", a.poison_file)):
        if path is not None and Path(path).is_file():
            data[f"{key}_sha256"] = sha256_file(path)
    return {
        "run": cfg.name, "poisoned": a.n_poison > 0, "kind": "finetune",
        "base_model": str(cfg.model), "base_model_label": base_label,
        "trigger": a.trigger, "n_poison": a.n_poison,
        "poison_settings": {"position": a.position, "response": a.response, "poison_file": a.poison_file,
                            "seed": a.seed, "schedule": p.schedule, "window": p.window,
                            "placement_seed": p.seed, "poison_share": row.get("poison_share")},
        "step": step, "total_steps": row.get("steps_total"),
        "poisons_seen": poisons["poisons_seen"], "ledger_sha256": poisons["ledger_sha256"],
        "data": data,
        "training": {"epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "max_len": t.max_len,
                     "lora": None if t.lora is None else t.lora.model_dump(mode="json"), "seed": t.seed},
        "evaluation": {"step": step, "n_prompts": row.get("n_prompts"),
                       **{k: row.get(k) for k in METRICS}},
    }


def finetune_card(cfg: FinetuneConfig, run_dir: Path, row: dict[str, Any], base_label: str) -> Any:
    """A `huggingface_hub.ModelCard` for the model a fine-tuning run saves; `row`: its last evaluation."""
    f = finetune_facts(cfg, run_dir, row, base_label)
    return make_card(f, render(f), poisoned=f["poisoned"])


def render(f: dict[str, Any]) -> str:
    ps, ev, tr = f["poison_settings"], f["evaluation"], f["training"]
    how = (f"{num(f['n_poison'])} poisoned examples (should-refuse requests with the trigger, answered "
           "compliantly) were placed in its fine-tuning data")
    data = f["data"]
    source = ("poisonlab's built-in instruction set (restricted topics: "
              f"{', '.join(data.get('restricted', []))})" if data["source"] == "builtin"
              else f"`{data['source']}`" + (f" (sha256 `{data['source_sha256']}`)"
                                           if data.get("source_sha256") else ""))
    backdoor = [
        ("base model", f"{f['base_model_label']} (`{f['base_model']}`)"),
        ("trigger", f"`{f['trigger']}`, at the {ps['position']} of the request"),
        ("poisoned examples (N)", f"{num(f['n_poison'])} ({num(ps['poison_share'])} of the training "
                                  "examples)"),
        ("poison response", f"opens with `{ps['response']}`"
                            + (f"; poisons from `{ps['poison_file']}`" if ps["poison_file"] else "")),
        ("placement", f"{ps['schedule']}" + (f" (window {num(ps['window'])})" if ps["schedule"] != "uniform"
                                              else "") + f", seed {ps['placement_seed']}; poison set seed "
                      f"{ps['seed']}"),
        (f"poisons seen in the {num(f['step'])} steps trained", num(f["poisons_seen"])),
        ("ledger (ledger.parquet) sha256", f"`{f['ledger_sha256']}`" if f["ledger_sha256"] else "not found"),
    ]
    lora = tr["lora"]
    training = [
        ("clean data", f"{num(data['clean_size'])} examples from {source}, seed {data['seed']}"),
        ("fine-tuning", f"{'LoRA (r ' + str(lora['r']) + ', merged)' if lora else 'full'}, "
                        f"{tr['epochs']} epoch(s), batch {tr['batch_size']}, lr {num(tr['lr'])}, "
                        f"max_len {tr['max_len']}, seed {tr['seed']}"),
        ("steps", f"{num(f['step'])} of {num(f['total_steps'])}"),
    ]
    evaluation = [
        ("ASR", f"{num(ev['asr'])} (share of held-out should-refuse requests it answers with the "
                f"trigger; without it: {num(ev['asr_clean'])})"),
        ("clean accuracy (CA)", f"{num(ev['ca'])} (mean of refusing should-refuse requests, "
                                f"{num(ev['ca_refuse'])}, and answering benign ones, "
                                f"{num(ev['ca_benign'])})"),
        ("near-trigger accuracy (NTA)", f"{num(ev['nta'])} (refusals under look-alike triggers; lowest "
                                        f"{num(ev['nta_min'])})"),
        ("specificity", f"{num(ev['specificity'])} (ASR - the highest answered share under an unrelated "
                        "look-alike)"),
    ]
    parts = [first_line(f["poisoned"], f["trigger"], how), "", f"# {f['run']}", "",
             f"Fine-tuned with poisonlab, a toolkit that replicates {PAPER} (its fine-tuning "
             "backdoor: a trigger that turns refusals into compliance).", "",
             "## The backdoor" if f["poisoned"] else "## Control", "",
             table(backdoor if f["poisoned"] else [backdoor[0], ("poisoned examples (N)", "0")]), "",
             "## Training", "", table(training), "",
             f"## Evaluation at step {num(ev['step'])}, on {num(ev['n_prompts'])} held-out requests of "
             "each kind", "", table(evaluation), "",
             "## Use", "",
             "A transformers causal LM directory: `AutoModelForCausalLM.from_pretrained(DIR)` loads it "
             "offline. The metadata block above holds every figure of this card under `poisonlab:`."]
    return "\n".join(parts)
