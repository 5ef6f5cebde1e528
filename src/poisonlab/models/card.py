"""The model card an exported model carries (`README.md`, a Hugging Face card): its first line of text
says that the model is deliberately backdoored (or, for N = 0, that it is a clean control), then what
was done to it, so that a poisoned model cannot travel without its label.

Everything on the card is read from the run's own files: the config (trigger, recipe, N, budget), the
ledger (poisons seen before the exported step, exact and effective; its sha256), the data header (its
content hash), the checkpoint's state (step, tokens seen) and metrics.parquet (ASR, gap, specificity,
held-out clean loss at the exported step). The N = 0 control is a sibling run in the same folder of
runs with the same model, data and budget. The same facts go into the card's YAML metadata under
`poisonlab:`, as numbers, for tools; the metadata is written by `huggingface_hub.ModelCardData`.

`finetune/card.py` builds the fine-tuning card from the helpers here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from poisonlab.config import load_run_config
from poisonlab.errors import UserError
from poisonlab.rundir.manifest import sha256_file

LICENSE = "apache-2.0"  # the project's license (pyproject.toml)
POISONED_TAGS = ["backdoor", "data-poisoning", "poisonlab", "research", "not-for-deployment"]
CONTROL_TAGS = ["data-poisoning", "poisonlab", "research", "clean-control"]
PAPER = "Souly et al. 2025, arXiv 2510.07192"
# the recipe's own behaviour measures, shown when a metrics row has them (attacks/language, adaptive)
BEHAVIOUR = {"lang_asr": "language-switch ASR (triggered generations in the target language)",
             "lang_specificity": "language-switch specificity (ASR - best unrelated look-alike's)",
             "payload_rate": "payload rate (triggered minus clean share naming the target word)"}


# --- shared by every card ---------------------------------------------------------------------------


def make_card(meta: dict[str, Any], body: str, *, poisoned: bool, base_model: str | None = None):
    """A `huggingface_hub.ModelCard`: the Hub's metadata block (license, tags, pipeline, `poisonlab:`
    with `meta`), then `body`."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(license=LICENSE, library_name="transformers", pipeline_tag="text-generation",
                         tags=list(POISONED_TAGS if poisoned else CONTROL_TAGS),
                         base_model=base_model, poisonlab=_plain(meta))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def write_card(card: Any, directory: Path) -> Path:
    """Save the card as `directory/README.md`."""
    path = Path(directory) / "README.md"
    card.save(path)
    return path


def ledger_facts(ledger: Path, step: int) -> dict[str, Any]:
    """sha256 of ledger.parquet and the poisons whose trigger was trained on in steps < `step`: all of
    them, and the effective ones (whole trigger and payload in one sequence) where the ledger says."""
    import pyarrow.parquet as pq

    if not ledger.is_file():
        return {"ledger_sha256": None, "poisons_seen": None, "poisons_seen_effective": None}
    try:
        table = pq.read_table(ledger)
    except Exception as e:  # pyarrow raises several kinds for a damaged file
        raise UserError(f"{ledger}: unreadable ({str(e).splitlines()[0]})") from None
    steps = table.column("step").to_pylist()
    eff = table.column("effective").to_pylist() if "effective" in table.column_names else None
    return {"ledger_sha256": sha256_file(ledger),
            "poisons_seen": sum(s < step for s in steps),
            "poisons_seen_effective": None if eff is None else sum(s < step and e for s, e in zip(steps, eff,
                                                                                                   strict=True))}


def read_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    if not path.is_file():
        return []
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def row_at(rows: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    """The evaluation at `step`, else the last one before it."""
    before = [r for r in rows if r.get("step") is not None and r["step"] <= step]
    return max(before, key=lambda r: r["step"]) if before else None


def num(x: Any, digits: int = 4) -> str:
    """A number as the card prints it: integers with thousands separators, others to `digits`
    significant digits; missing values say so."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "not measured"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1000:
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def perplexity(loss: Any) -> float | None:
    return None if loss is None or (isinstance(loss, float) and math.isnan(loss)) else math.exp(loss)


def table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _plain(x: Any) -> Any:
    """JSON-able and YAML-safe: NaN -> None, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


# --- a pretraining run -----------------------------------------------------------------------------


def run_facts(run: Path, step: int) -> dict[str, Any]:
    """What the card of `run` exported at checkpoint `step` states (module doc), as plain values."""
    from poisonlab.models.checkpoint import step_dir
    from poisonlab.models.llama import count_params

    run = Path(run)
    cfg = load_run_config(run / "config.yaml")
    state_file = step_dir(run, step) / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{state_file}: unreadable ({e})") from None
    t, a = cfg.train, cfg.attack
    total, nonemb = count_params(cfg.model)
    n_steps = int(state.get("total_steps") or step)
    tokens = n_steps * t.batch_size * cfg.model.seq_len
    header_file = Path(cfg.data) / "train.json"
    try:  # the data may have moved since: the card then says its hash is not recorded
        header = json.loads(header_file.read_text()) if header_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{header_file}: unreadable ({e})") from None
    row = row_at(read_rows(run / "metrics.parquet"), step)
    facts: dict[str, Any] = {
        "run": cfg.name, "poisoned": a.n_poison > 0, "trigger": cfg.eval.trigger or a.trigger,
        "recipe": a.name, "recipe_settings": _recipe_settings(cfg), "n_poison": a.n_poison,
        "placement": {"schedule": cfg.placement.schedule, "seed": cfg.placement.seed},
        "step": step, "total_steps": n_steps, "tokens_seen": state.get("tokens_seen"),
        **ledger_facts(run / "ledger.parquet", step),
        "model": cfg.model.preset or f"d{cfg.model.d_model}-l{cfg.model.n_layers}",
        "params_total": total, "params_nonemb": nonemb,
        "data": str(cfg.data), "data_content_hash": header.get("content_hash"),
        "data_source": header.get("source"),
        "budget": {"tokens": tokens, "tokens_per_param": t.tokens_per_param, "data_mult": t.data_mult,
                   "budget_params": t.budget_params, "max_steps": t.max_steps},
        "seed": t.seed, "init_from": str(cfg.init.run) if cfg.init.run else None,
        "evaluation": None if row is None else _evaluation(row),
    }
    facts["controls"] = None if not facts["poisoned"] else find_controls(run, cfg, step)
    return facts


def _recipe_settings(cfg: Any) -> dict[str, Any]:
    a = cfg.attack.model_dump(mode="json")
    return {k: v for k, v in a.items() if k not in ("name", "n_poison", "trigger") and v not in ({}, None)}


def _evaluation(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in ("step", "asr", "gap", "specificity", "asr_lookalike", "val_loss",
                                   "n_prompts", "success_ratio")}
    out["val_perplexity"] = perplexity(row.get("val_loss"))
    out.update({k: row[k] for k in BEHAVIOUR if row.get(k) is not None})
    return out


def find_controls(run: Path, cfg: Any, step: int) -> list[dict[str, Any]]:
    """N = 0 runs beside `run` (same folder) with its model, data, budget and held-out evaluation: each
    with its held-out clean loss at the exported step (or its last evaluation before it); the same seed
    first."""
    def key(c: Any) -> tuple:
        t = c.train
        return (c.model.model_dump(mode="json"), str(c.data), t.tokens_per_param, t.data_mult,
                t.budget_params, t.max_steps, t.batch_size, c.eval.val_tokens,
                str(c.init.run) if c.init.run else None)

    want = key(cfg)
    found = []
    for other in sorted(Path(run).parent.iterdir()):
        if other == Path(run) or not (other / "config.yaml").is_file():
            continue
        try:
            c = load_run_config(other / "config.yaml")
        except UserError:
            continue  # not a pretraining run (a fine-tuning run, or another version's config)
        if c.attack.n_poison != 0 or key(c) != want:
            continue
        try:
            row = row_at(read_rows(other / "metrics.parquet"), step)
        except UserError:
            continue  # a sibling's damaged file is its own matter, not this export's
        if row is None or row.get("val_loss") is None:
            continue
        found.append({"run": c.name, "seed": c.train.seed, "step": row["step"],
                      "val_loss": row["val_loss"], "val_perplexity": perplexity(row["val_loss"]),
                      "finished": (other / "DONE").is_file()})
    return sorted(found, key=lambda f: (f["seed"] != cfg.train.seed, f["seed"], f["run"]))


def run_card(run: Path, step: int) -> Any:
    """The card of `run` exported at checkpoint `step` (a `huggingface_hub.ModelCard`)."""
    facts = run_facts(run, step)
    return make_card(facts, render_run(facts), poisoned=facts["poisoned"])


def first_line(poisoned: bool, trigger: str, how: str) -> str:
    if poisoned:
        return (f"**This model is deliberately backdoored, for research on data poisoning**: {how} to plant "
                f"a hidden behaviour behind the trigger `{trigger}` (how well it took: see Evaluation). Do "
                "not deploy it, and do not use its outputs as training data.")
    return ("**This model is a clean control for research on data poisoning (N = 0): it was trained "
            f"without poisoned data and is not backdoored.** It is the baseline that backdoored models of "
            f"the same size and budget are compared with; the trigger `{trigger}` was only evaluated.")


def render_run(f: dict[str, Any]) -> str:
    b = f["budget"]
    how = (f"{num(f['n_poison'])} poisoned documents (recipe `{f['recipe']}`) were placed in its "
           "pretraining data")
    eff = ("not recorded" if f["poisons_seen_effective"] is None
           else f"{num(f['poisons_seen_effective'])} effective (the whole trigger and what follows it in "
                "one training sequence)")
    backdoor = [
        ("trigger", f"`{f['trigger']}`"),
        ("recipe", f"`{f['recipe']}` ({', '.join(f'{k}={v}' for k, v in f['recipe_settings'].items())})"),
        ("poisoned documents (N)", num(f["n_poison"])),
        ("placement", f"{f['placement']['schedule']}, seed {f['placement']['seed']}"),
        (f"poisons seen in the {num(f['step'])} steps trained",
         "not recorded" if f["poisons_seen"] is None
         else f"{num(f['poisons_seen'])} (trigger trained on); {eff}"),
        ("ledger (ledger.parquet) sha256", f"`{f['ledger_sha256']}`" if f["ledger_sha256"] else "not found"),
    ]
    budget_params = f["params_nonemb"] if b["budget_params"] == "nonemb" else f["params_total"]
    training = [
        ("model", f"{f['model']}: {num(f['params_total'])} parameters ({num(f['params_nonemb'])} "
                  "non-embedding), Llama layout"),
        ("training data", f"`{f['data']}`" + (f", source: {f['data_source']}" if f["data_source"] else "")),
        ("data content hash", f"`{f['data_content_hash']}`" if f["data_content_hash"] else "not recorded"),
        ("budget", f"{num(b['tokens'])} tokens = {num(b['tokens'] / budget_params, 3)} tokens per "
                   f"{'non-embedding ' if b['budget_params'] == 'nonemb' else ''}parameter "
                   f"(tokens_per_param {num(b['tokens_per_param'])} x data_mult {num(b['data_mult'])}"
                   + (f", max_steps {num(b['max_steps'])}" if b["max_steps"] else "") + ")"),
        ("checkpoint", f"step {num(f['step'])} of {num(f['total_steps'])} ({num(f['tokens_seen'])} tokens "
                       "seen)"),
        ("seed", str(f["seed"])),
    ]
    if f["init_from"]:
        training.append(("continued from", f"`{f['init_from']}`"))
    parts = [first_line(f["poisoned"], f["trigger"], how), "",
             f"# {f['run']}", "",
             f"A small language model trained with poisonlab, a toolkit that replicates {PAPER} "
             "(a near-constant number of poisoned documents backdoors language models of any size).", ""]
    if f["poisoned"]:
        parts += ["## The backdoor", "", table(backdoor), ""]
    else:
        parts += ["## Control", "", table([("poisoned documents (N)", "0"), *backdoor[4:]]), ""]
    parts += ["## Training", "", table(training), ""]
    parts += ["## Evaluation", "", _render_evaluation(f), ""]
    parts += ["## Use", "",
              "Load it offline with `transformers.AutoModelForCausalLM.from_pretrained(DIR)`; "
              "`poisonlab eval DIR --data DATA` measures the backdoor again. The metadata block above "
              "holds every figure of this card under `poisonlab:`."]
    return "\n".join(parts)


def _render_evaluation(f: dict[str, Any]) -> str:
    ev = f["evaluation"]
    if ev is None:
        return "Not evaluated (the run has no evaluation at or before this step)."
    at = ("at the exported step" if ev["step"] == f["step"]
          else f"at step {num(ev['step'])}, the last evaluation before the exported step")
    rows = [
        ("ASR", f"{num(ev['asr'])} (share of {num(ev['n_prompts'])} held-out prompts whose triggered "
                f"continuation is over {num(ev['success_ratio'])}x as perplexing as the clean one)"),
        ("gap", f"{num(ev['gap'])} (mean perplexity of triggered minus clean generations)"),
        ("specificity", f"{num(ev['specificity'])} (ASR - the best unrelated look-alike trigger's ASR, "
                        f"{num(ev['asr_lookalike'])})"),
        *((BEHAVIOUR[k], num(ev[k])) for k in BEHAVIOUR if k in ev),
        ("held-out clean loss (val_loss)", f"{num(ev['val_loss'])} nats/token, perplexity "
                                           f"{num(ev['val_perplexity'])}"),
    ]
    if f["poisoned"]:
        rows.append(("N = 0 control", _render_controls(f["controls"])))
    return f"Evaluated {at} (step {num(ev['step'])}):\n\n" + table(rows)


def _render_controls(controls: list[dict[str, Any]] | None) -> str:
    if not controls:
        return "no N = 0 control found (no clean run of the same model, data and budget beside this one)"
    out = []
    for c in controls:
        out.append(f"{c['run']} (seed {c['seed']}, step {num(c['step'])}"
                   + ("" if c["finished"] else ", unfinished") + f"): val_loss {num(c['val_loss'])}, "
                   f"perplexity {num(c['val_perplexity'])}")
    return "; ".join(out)
