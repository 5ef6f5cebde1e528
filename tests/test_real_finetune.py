"""Fine-tuning sweeps that start from a given HF model (e.g. SmolLM2-135M-Instruct from `make real-model`)
instead of a pretrain stage: exactly one of the two, the model refused before any stage runs."""

from __future__ import annotations

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
