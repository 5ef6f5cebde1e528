"""`poisonlab clean-score` (evaluation/lmeval.py): the local lm-eval task poisonlab writes over the eval
split's held-out documents, always tested; lm-eval itself scoring a local HF model offline, tested where
lm-eval is installed (the optional `lmeval` extra: too heavy for the dev extra), against the same
log-likelihoods computed with transformers directly."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from poisonlab.corpus.shards import TokenShard
from poisonlab.corpus.tokenizer import load_tokenizer
from poisonlab.errors import UserError
from poisonlab.evaluation.lmeval import DOCS_FILE, TASK, go_offline, write_clean_task

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def test_the_task_is_the_eval_splits_documents(prepared_builtin: Path, tmp_path: Path) -> None:
    """heldout.jsonl holds the first documents of the eval split, as text that encodes back to exactly
    the split's tokens; the YAML is a rolling log-likelihood task over that file, with a local cache;
    source.json counts the words and bytes lm-eval's perplexities divide by."""
    task_dir = write_clean_task(prepared_builtin, tmp_path / "out", n_docs=5)
    docs = [json.loads(line)["text"] for line in (task_dir / DOCS_FILE).read_text().splitlines()]
    shard, tok = TokenShard.open(prepared_builtin, "eval"), load_tokenizer(prepared_builtin)
    assert len(docs) == 5
    for i, text in enumerate(docs):
        assert tok.encode(text, add_special_tokens=False).ids == shard.doc(i).tolist()
    spec = yaml.safe_load((task_dir / f"{TASK}.yaml").read_text())
    assert spec["task"] == TASK and spec["dataset_path"] == "json"
    assert spec["output_type"] == "loglikelihood_rolling" and spec["doc_to_target"] == "{{text}}"
    files = spec["dataset_kwargs"]["data_files"]["test"]
    assert Path(files).is_absolute() and Path(files) == (task_dir / DOCS_FILE).resolve()
    assert Path(spec["dataset_kwargs"]["cache_dir"]).parent == (tmp_path / "out").resolve()
    metrics = [m["metric"] for m in spec["metric_list"]]
    assert metrics == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    source = json.loads((task_dir / "source.json").read_text())
    assert source["docs"] == 5 and source["of"] == shard.n_docs
    assert source["words"] == sum(len(re.split(r"\s+", t)) for t in docs)  # lm-eval's word count
    assert source["bytes"] == sum(len(t.encode()) for t in docs)
    assert len(write_clean_task(prepared_builtin, tmp_path / "all", n_docs=None).joinpath(
        DOCS_FILE).read_text().splitlines()) == shard.n_docs


def test_offline_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    go_offline()
    assert hub.HF_HUB_OFFLINE is True and hub.is_offline_mode()
    import os

    switches = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE")
    assert all(os.environ[k] == "1" for k in switches)


def test_bad_input_is_one_line(prepared_builtin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    from poisonlab.cli import main

    monkeypatch.setattr("poisonlab.evaluation.lmeval.go_offline", lambda: None)  # leave this process as is
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    with pytest.raises(SystemExit) as e:
        main(["clean-score", str(run), "--data", str(prepared_builtin)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a HF model directory" in err and "poisonlab export" in err
    assert len(err.strip().splitlines()) == 1
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(UserError, match=r"lm-eval is not installed: pip install 'poisonlab\[lmeval\]'"):
        from poisonlab.evaluation.lmeval import clean_score

        clean_score(hf, prepared_builtin, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def hf_model(prepared_builtin: Path, tmp_path: Path) -> Path:
    """A random 2-layer HF Llama with the data's tokenizer, as `poisonlab export` writes one (BOS and EOS
    the data's end-of-document token), with a context of 64."""
    import shutil

    import torch
    import transformers

    eos = TokenShard.open(prepared_builtin, "eval").eos_id
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    path = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    shutil.copy(prepared_builtin / "tokenizer.json", path / "tokenizer.json")
    eos_text = load_tokenizer(prepared_builtin).id_to_token(eos)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64, "eos_token": eos_text}))
    return path


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install 'poisonlab[lmeval]')")
def test_lm_eval_scores_the_documents_offline(hf_model: Path, prepared_builtin: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """lm-eval's rolling log-likelihood of each document equals transformers' own: the end-of-text token,
    then the document, predicted in windows of the model's context (64), each from its own tokens (the
    last from the 64 tokens before its end); word perplexity is exp(-sum / words). Offline throughout."""
    import os

    import torch
    import transformers

    from poisonlab.cli import main

    out = tmp_path / "score"
    main(["clean-score", str(hf_model), "--data", str(prepared_builtin), "--docs", "4", "--out", str(out),
          "--json"])
    res = json.loads(capsys.readouterr().out)
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == [0, 1, 2, 3] and res["max_length"] == 64
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_model), dtype=torch.float32).eval()
    shard, tok = TokenShard.open(prepared_builtin, "eval"), load_tokenizer(prepared_builtin)
    for s in samples:
        seq = torch.tensor([shard.eos_id, *shard.doc(s["doc_id"]).tolist()])
        ll, done, n = 0.0, 0, len(seq) - 1
        while done < n:  # seq[done + 1 : end + 1] from the 64 tokens before `end + 1` (fewer at first)
            end = min(done + 64, n)
            x = seq[max(0, end - 64) : end]
            with torch.no_grad():
                logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            k = end - done  # the last k positions predict the new tokens
            ll += float(logp[-k:].gather(1, seq[done + 1 : end + 1, None]).sum())
            done = end
        assert n > 64 and s["loglikelihood"] == pytest.approx(ll, rel=1e-4)
        text = tok.decode(shard.doc(s["doc_id"]).tolist(), skip_special_tokens=False)
        assert s["words"] == len(re.split(r"\s+", text)) and s["bytes"] == len(text.encode())
    m = res["tasks"]["poisonlab_clean"]
    total = sum(s["loglikelihood"] for s in samples)
    assert m["word_perplexity"] == pytest.approx(math.exp(-total / m["words"]), rel=1e-9)
    assert m["bits_per_byte"] == pytest.approx(-total / m["bytes"] / math.log(2), rel=1e-9)
    assert json.loads((out / "clean_score.json").read_text())["tasks"] == res["tasks"]
    assert np.isfinite(m["byte_perplexity"])


@pytest.mark.slow  # lm-eval indexes its thousands of task files, twice
@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install 'poisonlab[lmeval]')")
def test_a_standard_task_without_cached_data_stops_in_one_line(hf_model: Path, prepared_builtin: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """HellaSwag's data set is on the Hub: offline, with no local copy, the command stops (exit 2) and
    says so instead of downloading; an unknown task name is one line too."""
    import datasets.config
    import huggingface_hub.constants

    from poisonlab.cli import main

    # empty caches, whatever this machine holds
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    for args, says in ((["--task", "hellaswag"], "not in the local Hugging Face cache"),
                       (["--task", "no_such_task"], "lm-eval has no task no_such_task")):
        with pytest.raises(SystemExit) as e:
            main(["clean-score", str(hf_model), "--data", str(prepared_builtin), "--docs", "2",
                  "--out", str(tmp_path / "o"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err, err
