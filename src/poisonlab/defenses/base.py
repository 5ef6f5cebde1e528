"""Detectors: each looks at documents (text) without knowing the trigger and flags the ones to drop.

A detector is one class registered under a name; `get_detector("perplexity:pct=99.9")` builds one from
a spec string (`name` or `name:key=value:key=value`, values parsed as YAML scalars).

Life cycle, as `defend` drives it:
    det.fit(ctx)            optional calibration on clean *training* documents (never the scored ones)
    det.detect(texts)       one Verdict per text; corpus-level detectors (`corpus_level = True`, the
                            trigger miner) see the whole scanned corpus at once, so `detect` always
                            takes the full list
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from poisonlab.errors import UserError


@dataclass
class Verdict:
    """The decision for one document: flagged = drop it; score = the detector's raw statistic."""

    flagged: bool
    score: float = float("nan")
    reason: str = ""


@dataclass
class DefenseContext:
    """What a detector may calibrate on: the prepared data dir and a sample of clean training texts."""

    data_dir: Path
    calib_texts: list[str] = field(default_factory=list)
    seed: int = 0

    _tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from poisonlab.corpus.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.data_dir)
        return self._tokenizer


class Detector:
    """Base class. Subclasses set `name` and implement `detect`; `fit` is optional."""

    name: str = "detector"
    description: str = ""
    # True when a verdict depends on the whole scanned corpus (document frequencies, a model fitted on
    # it): scored by scanning every corpus size, never by scaling a per-document rate.
    corpus_level: bool = False

    def fit(self, ctx: DefenseContext) -> None:  # noqa: B027  (optional hook)
        """Calibrate on clean training documents (thresholds, reference statistics)."""

    def detect(self, texts: Sequence[str]) -> list[Verdict]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Settings that decide what the detector flags (saved beside the results)."""
        return {}


_REGISTRY: dict[str, Callable[..., Detector]] = {}


def register_detector(name: str) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: `@register_detector("my-filter")` makes it available to `defend`."""

    def deco(cls: type[Detector]) -> type[Detector]:
        if name in _REGISTRY:
            raise ValueError(f"detector {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def detector_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`perplexity:pct=99.9:ref=runs/clean` -> ("perplexity", {"pct": 99.9, "ref": "runs/clean"})."""
    name, *parts = spec.strip().split(":")
    params: dict[str, Any] = {}
    for p in parts:
        if "=" not in p:
            raise UserError(f"detector spec {spec!r}: expected name:key=value, got {p!r}")
        k, v = p.split("=", 1)
        try:
            params[k.strip().replace("-", "_")] = yaml.safe_load(v)
        except yaml.YAMLError:
            params[k.strip().replace("-", "_")] = v
    return name.strip(), params


def get_detector(spec: str, **params: Any) -> Detector:
    """Build a detector from a spec string (plus keyword settings, which win over the spec's)."""
    name, spec_params = parse_spec(spec)
    if name not in _REGISTRY:
        raise UserError(f"unknown detector {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**{**spec_params, **params})
    except TypeError as e:
        raise UserError(f"detector {name!r}: bad settings {spec_params | params}: {e}") from None
