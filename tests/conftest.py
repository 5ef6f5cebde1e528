"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from poisonlab.config import CorpusConfig
from poisonlab.corpus.prepare import prepare


@pytest.fixture(scope="session")
def prepared_builtin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared builtin data dir (~300k train tokens, vocab 512, 64 eval docs), made once."""
    out = tmp_path_factory.mktemp("prepared") / "builtin"
    cfg = CorpusConfig(source="builtin", vocab_size=512, max_tokens=300_000, eval_docs=64, seed=0)
    prepare(cfg, out, progress=False)
    return out
