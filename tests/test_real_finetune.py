"""Fine-tuning sweeps that start from a given HF model (e.g. SmolLM2-135M-Instruct from `make real-model`)
instead of a pretrain stage: exactly one of the two, the model refused before any stage runs;
the align check that keeps a grid from starting from a model that is not aligned."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from poisonlab.errors import UserError
from poisonlab.study.finetune_sweep import load_ft_spec


def test_the_base_model_is_given_or_pretrained_not_neither_nor_both(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no such directory"):  # with an align stage, before any stage runs
        load_ft_spec({"kind": "finetune", "model": str(tmp_path / "nothing"), "align": {}}, "spec")
    with pytest.raises(UserError, match="neither an HF model directory"):
        load_ft_spec({"kind": "finetune", "model": str(tmp_path / "empty"), "align": {}}, "spec")
    for tree, why in (
        ({"kind": "finetune", "align": {}}, "neither is given"),
        ({"kind": "finetune", "model": str(tmp_path / "empty"), "pretrain": {}, "align": {}}, "not both"),
    ):
        with pytest.raises(UserError, match=why) as e:
            load_ft_spec(tree, "spec")
        assert "\n" not in str(e.value) and "`model: DIR`" in str(e.value)
    # `--set model=DIR` sets the sweep's model (it went to base.model, which every run overwrites)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (tmp_path / "empty" / "config.json").write_text("{}")
    spec = load_ft_spec({"kind": "finetune", "model": str(tmp_path / "empty"), "align": {}}, "spec",
                        [f"model={other}", "train.lr=0.5"])
    assert spec.model == str(other) and spec.base == {"train": {"lr": 0.5}}


def test_align_check_reads_the_aligned_models_final_evaluation(tmp_path):
    import pyarrow as pa

    from poisonlab.study.finetune_sweep import check_aligned

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    tree = {"kind": "finetune", "model": str(tmp_path / "m"), "align_check": {"max_asr_clean": 0.1}}
    with pytest.raises(UserError, match="align_check without an align stage"):
        load_ft_spec(tree, "spec")
    spec = load_ft_spec({**tree, "align": {}, "align_check": {"max_asr_clean": 0.1, "min_ca": 0.9}}, "spec")
    run = tmp_path / "sw" / "base" / "align"
    run.mkdir(parents=True)
    for rows, missed in (
        ([{"step": 0, "asr_clean": 0.98, "ca": 0.49}, {"step": 50, "asr_clean": 0.05, "ca": 0.95}], None),
        ([{"step": 0, "asr_clean": 0.0, "ca": 1.0}, {"step": 50, "asr_clean": 0.75, "ca": 0.95}],
         "untriggered ASR 0.75 > 0.1 at step 50"),
        ([{"step": 50, "asr_clean": 0.75, "ca": 0.47}],
         "untriggered ASR 0.75 > 0.1, CA 0.47 < 0.9 at step 50"),
    ):
        pq.write_table(pa.Table.from_pylist(rows), run / "metrics.parquet")
        if missed is None:
            check_aligned(spec, tmp_path / "sw")  # the last evaluation counts, not step 0's
            continue
        with pytest.raises(UserError) as e:
            check_aligned(spec, tmp_path / "sw")
        assert missed in str(e.value) and str(run / "samples.jsonl") in str(e.value)
    unchecked = load_ft_spec({**tree, "align": {}, "align_check": None}, "spec")
    check_aligned(unchecked, tmp_path / "sw")  # no check asked: nothing read
