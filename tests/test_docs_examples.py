"""The Python examples of README.md and docs/*.md use the current import paths (no deprecated
alias, every name exists), and the README's API example runs as written on a prepared corpus."""

from __future__ import annotations

import ast
import importlib
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def test_examples_import_names_that_exist_at_their_current_paths():
    checked = 0
    for page in PAGES:
        for code in _blocks(page):
            tree = ast.parse(code, filename=str(page))  # a syntax error fails here, naming the page
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("poisonlab"):
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", DeprecationWarning)  # no old path in the docs
                        module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), f"{page.name}: {node.module} has no {alias.name}"
                        checked += 1
    assert checked >= 15  # the pages do show the API


@pytest.mark.slow
def test_readme_api_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from poisonlab.config import CorpusConfig
    from poisonlab.corpus.prepare import prepare

    [example] = [b for b in _blocks(ROOT / "README.md") if "TrainingStream" in b]
    # the example's corpus as `poisonlab prepare --out data/builtin` writes it, at a small vocabulary
    prepare(CorpusConfig(source="builtin", vocab_size=512, max_tokens=2_200_000, eval_docs=64, seed=0),
            tmp_path / "data" / "builtin", progress=False)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102 (our own README)
    stream = scope["stream"]
    x, y = stream.batch(123)
    assert tuple(x.shape) == (16, 128) and bool((x[:, 1:] == y[:, :-1]).all())
    assert 0 < stream.poisons_seen(500) <= 250
