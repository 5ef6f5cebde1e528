"""Clean capability of a local HF model through lm-evaluation-harness, offline (`poisonlab clean-score`).

poisonlab writes a local lm-eval task over clean held-out text: the documents of a prepared data
directory's eval split (held out of training), decoded, one `{"text": ...}` a line, and a task YAML
(`output_type: loglikelihood_rolling`, as lm-eval's own wikitext task) whose metrics are word
perplexity, byte perplexity and bits per byte. Per-word and per-byte figures do not depend on the
tokenizer, so a poisonlab export and any other local causal LM (the imported SmolLM2) are scored on one
scale. lm-eval then runs its HF model class on the directory, on the CPU in float32 by default.

Nothing is downloaded: before lm-eval (and with it `datasets`, `transformers`, `huggingface_hub`) is
used, HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE and HF_EVALUATE_OFFLINE are set, in the
environment and in those libraries' settings if they are already imported. The local task reads its
JSONL through the `json` builder that ships with `datasets`, caching it under the output directory.
lm-eval's standard tasks (HellaSwag, MMLU, ...) fetch their data sets from the Hugging Face Hub: they
run here only when their data is already in the local HF cache; otherwise the command stops with one
line saying so (docs/evaluation.md: how to run them with network).

lm-eval is an optional dependency (`pip install 'poisonlab[lmeval]'`): writing the task needs nothing
beyond poisonlab.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from poisonlab.corpus.shards import TokenShard
from poisonlab.corpus.tokenizer import load_tokenizer
from poisonlab.errors import UserError
from poisonlab.fsutil import write_text

TASK = "poisonlab_clean"
DOCS_FILE = "heldout.jsonl"
# the metrics of a rolling log-likelihood task and lm-eval's aggregation of each
METRICS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
           "bits_per_byte": "bits_per_byte"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_EVALUATE_OFFLINE": "1"}
DEFAULT_DOCS = 200  # held-out documents scored by default (the demo's data holds 512; ~80k tokens)


def heldout_documents(data_dir: str | Path, n_docs: int | None = DEFAULT_DOCS) -> list[str]:
    """The first `n_docs` documents (None: all) of a prepared data directory's eval split, decoded with
    its tokenizer (byte-level BPE decodes to the text that was encoded)."""
    shard = TokenShard.open(data_dir, "eval")
    if shard.n_docs == 0:
        raise UserError(f"{data_dir}: the eval split has no documents")
    tok = load_tokenizer(data_dir)
    n = shard.n_docs if n_docs is None else min(n_docs, shard.n_docs)
    return [tok.decode(shard.doc(i).tolist(), skip_special_tokens=False) for i in range(n)]


def task_yaml(docs: Path, cache: Path) -> str:
    """The lm-eval task over the documents file: rolling log-likelihood of each whole document."""
    return "\n".join([
        "# written by poisonlab: clean held-out documents of a prepared data directory (its eval split)",
        f"task: {TASK}",
        "dataset_path: json  # the json builder that ships with datasets: a local file, nothing downloaded",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(docs.resolve()))}",
        f"  cache_dir: {json.dumps(str(cache.resolve()))}",
        "test_split: test",
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        # lm-eval's own aggregations for these metrics, said here so that it need not warn
        *[line for m, agg in METRICS.items() for line in (
            f"  - metric: {m}", f"    aggregation: {agg}", "    higher_is_better: false")],
        "metadata:",
        "  version: 1.0",
        "",
    ])


def write_clean_task(data_dir: str | Path, out: str | Path, n_docs: int | None = DEFAULT_DOCS) -> Path:
    """Write the local task into `out/task/`: the held-out documents (`heldout.jsonl`), the task YAML
    (`poisonlab_clean.yaml`) and `source.json` (the data directory, its content hash, the documents
    and their words and bytes). Returns the task directory, for lm-eval's `include_path`."""
    data_dir = Path(data_dir)
    texts = heldout_documents(data_dir, n_docs)
    task_dir = Path(out) / "task"
    task_dir.mkdir(parents=True, exist_ok=True)
    docs = task_dir / DOCS_FILE
    write_text(docs, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    write_text(task_dir / f"{TASK}.yaml", task_yaml(docs, Path(out) / "hf-datasets-cache"))
    header = json.loads((data_dir / "eval.json").read_text())
    source = {"data": str(data_dir), "split": "eval", "content_hash": header.get("content_hash"),
              "docs": len(texts), "of": header.get("n_docs"), "words": sum(words(t) for t in texts),
              "bytes": sum(len(t.encode("utf-8")) for t in texts)}
    write_text(task_dir / "source.json", json.dumps(source, indent=2) + "\n")
    return task_dir


def words(text: str) -> int:
    """Words as lm-eval counts them for word perplexity (`re.split(r"\\s+", text)`)."""
    import re

    return len(re.split(r"\s+", text))


def go_offline() -> None:
    """No download from here on: the offline switches of huggingface_hub, datasets, transformers and
    evaluate, in the environment and, for libraries already imported (they read it at import), in
    their settings."""
    os.environ.update(OFFLINE_ENV)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_HUB_OFFLINE = True
        ds.HF_DATASETS_OFFLINE = True


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise UserError("lm-eval is not installed: pip install 'poisonlab[lmeval]' (or pip install lm-eval); "
                        "`poisonlab eval` and the val_loss of every run need none of it") from None
    return lm_eval


def clean_score(model_dir: str | Path, data_dir: str | Path, out: str | Path, *,
                n_docs: int | None = DEFAULT_DOCS, tasks: Sequence[str] = (), batch_size: int = 8,
                device: str = "cpu", dtype: str = "float32", max_length: int | None = None) -> dict[str, Any]:
    """Score a local HF causal LM on the clean held-out documents of `data_dir` with lm-eval, offline,
    and any standard lm-eval `tasks` whose data is already in the local HF cache. Writes into `out`:
    `task/` (write_clean_task), `clean_score.json` (the metrics per task and how they were made) and
    `samples.jsonl` (each document's log-likelihood, words and bytes, so every figure can be re-derived).
    Returns what clean_score.json holds."""
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        hint = (" (a poisonlab run: export it first, `poisonlab export RUN --to DIR`)"
                if (model_dir / "config.yaml").is_file() else "")
        raise UserError(f"{model_dir}: not a HF model directory (no config.json){hint}")
    go_offline()
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    task_dir = write_clean_task(data_dir, out, n_docs)
    # lm-eval's own tasks (thousands of YAML files, slow to index) only when some are asked for
    manager = TaskManager(include_path=str(task_dir), include_defaults=bool(tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval has no task {', '.join(unknown)} (its task names: `lm_eval ls tasks`)")
    args: dict[str, Any] = {"pretrained": str(model_dir.resolve()), "dtype": dtype, "device": device}
    if max_length is not None:
        args["max_length"] = max_length
    try:
        res = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[TASK, *tasks], task_manager=manager,
                                      batch_size=batch_size, log_samples=True)
    except ConnectionError as e:  # datasets' answer to a Hub data set that is not cached, offline
        raise UserError(f"lm-eval: a task's data is not in the local Hugging Face cache and poisonlab runs "
                        f"lm-eval offline ({str(e).splitlines()[0][:200]}); see docs/evaluation.md for "
                        "running the standard tasks with network") from None
    if res is None:  # not rank 0 under torchrun
        return {}
    result = {
        "model": str(model_dir), "data": str(data_dir),
        "source": json.loads((task_dir / "source.json").read_text()),
        "offline": dict(OFFLINE_ENV), "device": device, "dtype": dtype, "max_length": res.get("max_length"),
        "lm_eval_version": res.get("lm_eval_version"),
        "transformers_version": res.get("transformers_version"),
        # lm-eval starts every document after the BOS token, or the end-of-text one when there is no BOS
        **{k: res.get(k) for k in ("tokenizer_bos_token", "tokenizer_eos_token", "eot_token_id")},
        "tasks": {name: {k.split(",")[0]: v for k, v in m.items() if k not in ("name", "alias")
                         and not k.split(",")[0].endswith("_stderr")}
                  for name, m in res["results"].items()},
    }
    samples = [{"task": name, "doc_id": s["doc_id"], "loglikelihood": float(s["filtered_resps"][0]),
                "words": s["word_perplexity"][1], "bytes": s["byte_perplexity"][1]}
               for name, rows in res["samples"].items() if name == TASK for s in rows]
    mine = result["tasks"][TASK]
    ll = sum(s["loglikelihood"] for s in samples)
    mine["loglikelihood"] = ll  # nats over every document; word_perplexity = exp(-ll / words)
    mine["words"] = sum(s["words"] for s in samples)
    mine["bytes"] = sum(s["bytes"] for s in samples)
    write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    write_text(out / "clean_score.json", json.dumps(result, indent=2, default=str) + "\n")
    return result
