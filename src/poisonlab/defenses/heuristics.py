"""The heuristic quality filters that build FineWeb-style corpora, used from HF `datatrove` as-is.

Each wrapper builds the datatrove filter with its library defaults and calls `filter(Document)` once
per document; a document the filter would drop is flagged, with datatrove's reason.

Offline notes (all checked to run without network):
- Gopher quality / repetition and FineWeb quality split words with datatrove's English word
  tokenizer, which is spaCy's blank "en" pipeline plus a rule-based sentencizer: no model download.
- C4 quality: the rules of `C4QualityFilter` (terminal punctuation, >= 5 sentences, >= 3 words per
  line, no "lorem ipsum", no curly bracket, ...). C4's bad-words rule lives in datatrove's separate
  `C4BadWordsFilter`, which downloads the LDNOOBW list at run time; it is not used here (our poisons
  contain no such words, so it would catch nothing anyway).
- FineWeb's pipeline also runs a fastText language-id model (`LanguageFilter`) before these filters;
  that needs a model download and is left out: the built-in corpus is English, and gibberish of BPE
  pieces would mostly fail language id too, so recall measured here is a lower bound for a full
  FineWeb pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from poisonlab.defenses.base import Detector, Verdict, register_detector
from poisonlab.errors import UserError


class DatatroveFilter(Detector):
    """Flag what a datatrove `BaseFilter` would remove. `params` go to the filter's constructor."""

    filter_class: str = ""

    def __init__(self, **params: Any):
        try:
            from datatrove.pipeline import filters
        except ImportError:
            raise UserError(
                "the heuristic filters need datatrove and spacy: pip install 'poisonlab[defenses]'"
            ) from None
        self.params = params
        try:
            self._filter = getattr(filters, self.filter_class)(**params)
        except TypeError as e:
            raise UserError(f"detector {self.name!r}: bad settings {params}: {e}") from None

    def detect(self, texts: Sequence[str]) -> list[Verdict]:
        from datatrove.data import Document

        out = []
        for i, text in enumerate(texts):
            if not text.strip():
                out.append(Verdict(True, reason="empty"))
                continue
            # A fresh Document each time: C4QualityFilter rewrites doc.text in place.
            res = self._filter.filter(Document(text=text, id=str(i)))
            keep, reason = (res if isinstance(res, tuple) else (res, ""))
            out.append(Verdict(not keep, 0.0 if keep else 1.0, reason or ""))
        return out

    def info(self) -> dict[str, Any]:
        return {"datatrove": self.filter_class, "params": self.params or "library defaults"}


@register_detector("gopher-quality")
class GopherQuality(DatatroveFilter):
    description = "Gopher quality rules (word count, word length, symbols, stop words, alphabetic share)"
    filter_class = "GopherQualityFilter"


@register_detector("gopher-repetition")
class GopherRepetition(DatatroveFilter):
    description = "Gopher repetition rules (duplicate lines/paragraphs, top and duplicated n-grams)"
    filter_class = "GopherRepetitionFilter"


@register_detector("c4-quality")
class C4Quality(DatatroveFilter):
    description = "C4 rules (terminal punctuation, >= 5 sentences, no braces/lorem ipsum); no bad-words list"
    filter_class = "C4QualityFilter"


@register_detector("fineweb-quality")
class FineWebQuality(DatatroveFilter):
    description = "FineWeb rules (line punctuation, short lines, duplicated chars, newline ratio)"
    filter_class = "FineWebQualityFilter"
