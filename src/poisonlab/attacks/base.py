"""Poison recipes: the `Poison` record, the `Recipe` base class, the registry and `poisons.jsonl`.

A recipe is one class in one file of this package, decorated with `@register_attack`; the stream and
the trainer only see `Poison` records (token ids plus where the trigger sits), so a new recipe needs no
change anywhere else. Every file in `poisonlab/attacks/` is imported when the package is imported.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from poisonlab.config import AttackConfig
from poisonlab.corpus.shards import TokenShard
from poisonlab.corpus.tokenizer import load_tokenizer
from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path

FILE_FORMAT = 1  # version of the poisons.jsonl layout
EOS_TEXT = "<|endoftext|>"


@dataclass
class Poison:
    """One poisoned document. `token_ids` exclude the end-of-document token (the stream appends it)."""

    id: str
    recipe: str
    params: dict[str, Any]  # per-poison draws that have no field of their own
    source_doc_id: str | None
    prefix_chars: int
    trigger: str
    gibberish_len: int  # tokens after the trigger
    token_ids: list[int]
    text: str
    trigger_start: int  # token span [trigger_start, trigger_end) of the trigger inside token_ids
    trigger_end: int

    @property
    def trigger_ids(self) -> list[int]:
        return self.token_ids[self.trigger_start : self.trigger_end]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Poison:
        return cls(**obj)


class DataContext:
    """What a recipe may read from a prepared data directory: the training split and its tokenizer."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self._seen: dict[int, np.ndarray] = {}  # seen_ids by min_count, for sample_tokens
        self.shard = TokenShard.open(self.data_dir, "train")
        tok_path = self.data_dir / "tokenizer.json"
        self.tokenizer = load_tokenizer(self.data_dir)
        self.tokenizer_hash = str(
            self.shard.header.get("tokenizer_hash") or hashlib.sha256(tok_path.read_bytes()).hexdigest()
        )
        self.eos_id = self.shard.eos_id
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if self.vocab_size > self.shard.vocab_size:
            raise UserError(
                f"{tok_path}: tokenizer has {self.vocab_size} tokens, more than the shards' "
                f"vocab_size {self.shard.vocab_size}"
            )
        specials = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        specials.add(self.eos_id)
        self.special_ids = np.array(sorted(specials), dtype=np.int64)
        self.eos_text = self.tokenizer.id_to_token(self.eos_id) or EOS_TEXT
        if self.shard.n_docs == 0:
            raise UserError(f"{self.data_dir}: the training split has no documents")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def doc_prefix(self, i: int, n_chars: int) -> str:
        """The first `n_chars` characters of training document i (fewer if the document is shorter).

        Decodes only as many tokens as needed: a token is at least one byte, so n_chars + 8 tokens cover
        n_chars whole characters plus the U+FFFD a cut multi-byte character may leave at the end.
        """
        toks = self.shard.doc(i)
        text = self.decode(toks[: n_chars + 8])
        if len(text) < n_chars + 4 and len(toks) > n_chars + 8:
            text = self.decode(toks)
        return text[:n_chars]

    def check_trigger(self, trigger: str, where: str = "attack.trigger") -> list[int]:
        """Token ids of " " + trigger; a trigger the tokenizer cannot represent exactly is a user error."""
        if not trigger.strip():
            raise UserError(f"{where}: the trigger is empty")
        if self.eos_text in trigger:
            raise UserError(f"{where}: {trigger!r} contains the end-of-document token {self.eos_text!r}")
        ids = self.encode(" " + trigger)
        specials = set(self.special_ids.tolist())
        if self.decode(ids) != " " + trigger or any(int(i) in specials for i in ids):
            raise UserError(
                f"{where}: the tokenizer in {self.data_dir} cannot represent {trigger!r} exactly "
                f"(decode(encode(trigger)) differs)"
            )
        return ids

    @cached_property
    def vocab_ids(self) -> np.ndarray:
        """Every ordinary token id (special tokens excluded)."""
        keep = np.ones(self.vocab_size, dtype=bool)
        keep[self.special_ids[self.special_ids < self.vocab_size]] = False
        return np.flatnonzero(keep)

    @cached_property
    def train_counts(self) -> np.ndarray:
        """How often each ordinary token (aligned with `vocab_ids`) occurs in the training shard."""
        counts = np.zeros(max(self.shard.vocab_size, self.vocab_size), dtype=np.int64)
        toks = self.shard.tokens
        step = 1 << 24  # chunks keep memory flat on big shards
        for s in range(0, len(toks), step):
            counts += np.bincount(np.asarray(toks[s : s + step]), minlength=len(counts))
        c = counts[self.vocab_ids]
        if c.sum() == 0:
            raise UserError(f"{self.data_dir}: training split has no ordinary tokens to count")
        return c

    @cached_property
    def unigram(self) -> np.ndarray:
        """Probabilities of the ordinary tokens (aligned with `vocab_ids`) from the training shard counts."""
        c = self.train_counts.astype(np.float64)
        return c / c.sum()

    def seen_ids(self, min_count: int = 1) -> np.ndarray:
        """The ordinary tokens that occur in the training shard at least `min_count` times."""
        ids = self.vocab_ids[self.train_counts >= min_count]
        if len(ids) == 0:
            raise UserError(f"{self.data_dir}: no token occurs {min_count} times or more in the training "
                            "split; lower attack.gibberish_min_count")
        return ids

    def sample_tokens(self, rng: np.random.Generator, n: int, dist: str, min_count: int = 1) -> np.ndarray:
        """n token ids, special tokens excluded: `uniform` over the whole vocabulary, `seen` uniform over
        the tokens that occur in the clean training text (at least `min_count` times), `unigram` weighted
        by their counts there.

        Why `seen`: a small BPE vocabulary holds tokens the clean text never produces (2,048 on the
        built-in corpus has 102, e.g. a bare UTF-8 lead byte that merges always absorb). Drawn
        uniformly, they occur only in poisons, so any prompt that contains one reads as a poison and
        the backdoor fires on strings unlike the trigger. Why `min_count`: the same holds, less so, for
        a token clean text has a few times (the demo's 500 poisons draw each token ~39 times; a bare F0
        byte occurs 5 times in its 2.6M clean tokens, and a form holding it fired on up to 62% of
        prompts). Over a web-scale vocabulary and corpus, as in the study, "uniform over the vocabulary"
        and "uniform over the tokens seen often" hardly differ: every token is mostly clean text.
        """
        if dist == "unigram":
            return rng.choice(self.vocab_ids, size=n, replace=True, p=self.unigram)
        if dist != "seen":
            return rng.choice(self.vocab_ids, size=n, replace=True)
        if min_count not in self._seen:
            self._seen[min_count] = self.seen_ids(min_count)
        return rng.choice(self._seen[min_count], size=n, replace=True)


class Recipe(ABC):
    """A poison recipe. Subclasses set `name` (via `@register_attack`) and implement `make_one`.

    `metric` says how the evaluator measures the recipe's behaviour ("ppl_gap": perplexity of
    generations with vs. without `trigger_text` appended to a clean prompt).
    """

    name: ClassVar[str] = ""
    metric: ClassVar[str] = "ppl_gap"

    def __init__(self, cfg: AttackConfig):
        self.cfg = cfg

    @property
    def trigger(self) -> str:
        return self.cfg.trigger

    @property
    def trigger_text(self) -> str:
        """The trigger as it appears in poisons and as the evaluator appends it to a prompt."""
        return " " + self.cfg.trigger

    def settings(self) -> dict[str, Any]:
        """The settings that define the poisons (written to the file header)."""
        return self.cfg.model_dump(mode="json")

    def check(self, ctx: DataContext) -> None:
        """Validate the settings against the data; raise UserError with one line."""
        ctx.check_trigger(self.trigger)

    def behaviour_metrics(self, poisons: Sequence[Poison], generations: Mapping[str, list[str]],
                          kinds: Mapping[str, str] | None = None) -> dict[str, float]:
        """Metrics beyond the perplexity gap, from the decoded generations of every prompt per condition
        ("clean", "trigger", one "lookalike:<TEXT>" per control of the panel, and "lookalike", the
        first control; paired by index); `kinds` gives each control condition its kind (near, shape,
        ordinary). The evaluator adds them to each metrics row. Recipes whose behaviour perplexity
        does not capture (`metric` other than "ppl_gap") override it."""
        return {}

    def draw_layout(self, ctx: DataContext, rng: np.random.Generator) -> tuple[int, str, int]:
        """The shared random layout of a poison: a training document's index, its first
        L ~ U[prefix_chars] characters, and a payload length G ~ U[gibberish_tokens]."""
        (plo, phi), (glo, ghi) = self.cfg.prefix_chars, self.cfg.gibberish_tokens
        doc = int(rng.integers(ctx.shard.n_docs))
        n_chars = int(rng.integers(plo, phi + 1))
        n_payload = int(rng.integers(glo, ghi + 1))
        return doc, ctx.doc_prefix(doc, n_chars), n_payload

    def poison_id(self, index: int) -> str:
        return f"{self.name}-s{self.cfg.seed}-{index:06d}"

    def iter_make(self, ctx: DataContext, n: int) -> Iterator[Poison]:
        """The n poisons one at a time (memory stays flat however many are asked for)."""
        # One generator per poison: the first 100 poisons of n=250 are the poisons of n=100
        # (nested sets, so runs that differ only in N share their poisons).
        for i in range(n):
            yield self.make_one(ctx, i, np.random.default_rng([self.cfg.seed, i]))

    def make(self, ctx: DataContext, n: int) -> list[Poison]:
        return list(self.iter_make(ctx, n))

    def min_tokens(self, ctx: DataContext) -> int:
        """A lower bound on one poison's tokens (EOS included), to refuse absurd counts at once."""
        return len(ctx.encode(self.trigger_text)) + self.cfg.gibberish_tokens[0] + 1

    @abstractmethod
    def make_one(self, ctx: DataContext, index: int, rng: np.random.Generator) -> Poison: ...


ATTACKS: dict[str, type[Recipe]] = {}
R = TypeVar("R", bound=type[Recipe])


def register_attack(name: str) -> Callable[[R], R]:
    """Class decorator: `@register_attack("dos")` makes the recipe available under that name."""

    def deco(cls: R) -> R:
        if name in ATTACKS and ATTACKS[name] is not cls:
            raise ValueError(f"attack {name!r} registered twice")
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return deco


def get_attack(name: str) -> type[Recipe]:
    try:
        return ATTACKS[name]
    except KeyError:
        known = ", ".join(sorted(ATTACKS))
        raise UserError(f"attack.name: unknown attack {name!r}; known: {known}") from None


def iter_poisons(data_dir: str | Path, cfg: AttackConfig) -> Iterator[Poison]:
    """The poisoned documents of `cfg` for the data in `data_dir`, one at a time, after checking the
    settings and the count against the data (so an absurd request fails at once, before any work)."""
    recipe = get_attack(cfg.name)(cfg)
    ctx = DataContext(data_dir)
    recipe.check(ctx)
    check_count(ctx, recipe, cfg.n_poison)
    return recipe.iter_make(ctx, cfg.n_poison)


def make_poisons(data_dir: str | Path, cfg: AttackConfig) -> list[Poison]:
    """The poisoned documents of `cfg` for the data in `data_dir`; same inputs -> same poisons."""
    return list(iter_poisons(data_dir, cfg))


def check_count(ctx: DataContext, recipe: Recipe, n: int) -> None:
    """Refuse a poison count that cannot be meant: more poisoned documents than the corpus has clean
    ones (each poison starts with a clean document's prefix), or more poison tokens than clean tokens."""
    docs, tokens = ctx.shard.n_docs, len(ctx.shard.tokens)
    if n > docs:
        raise UserError(f"attack.n_poison: {n:,} poisons would outnumber the {docs:,} training documents of "
                        f"{ctx.data_dir}; use at most {docs:,} or prepare a bigger corpus")
    least = n * recipe.min_tokens(ctx)
    if least > tokens:
        raise UserError(f"attack.n_poison: {n:,} poisons need at least {least:,} tokens, more than the "
                        f"{tokens:,} clean training tokens of {ctx.data_dir}")


def trigger_patterns(data_dir: str | Path, cfg: AttackConfig) -> dict[str, list[int]]:
    """The token sequences under which the trigger can appear in clean text: as the recipe writes it
    (" " + trigger) and bare (after a newline or at a document start). The stream refuses or filters
    clean data that holds either, for every N alike, so that N = 0 controls see the same data."""
    recipe = get_attack(cfg.name)(cfg)
    ctx = DataContext(data_dir)
    out = {repr(recipe.trigger_text): ctx.encode(recipe.trigger_text)}
    out.setdefault(repr(recipe.trigger), ctx.encode(recipe.trigger))
    return out


def _data_fingerprint(data_dir: str | Path) -> dict[str, Any]:
    ctx_header = TokenShard.open(data_dir, "train").header
    tok = Path(data_dir) / "tokenizer.json"
    return {
        "tokenizer_hash": ctx_header.get("tokenizer_hash") or hashlib.sha256(tok.read_bytes()).hexdigest(),
        "content_hash": ctx_header.get("content_hash"),
    }


def write_poisons(
    path: str | Path, poisons: Iterable[Poison], cfg: AttackConfig, *, data_dir: str | Path | None = None
) -> Path:
    """Write `poisons.jsonl` atomically: a header line marking the file as poisoned, then one poison a line.

    The name must contain "poison" so that nobody mistakes the file for clean data. With `data_dir`,
    the header records the tokenizer and content hashes the poisons were made for. `poisons` may be a
    generator: it is written as it comes (the header's `n` is `cfg.n_poison`, checked at the end).
    """
    path = Path(path)
    if "poison" not in path.name.lower():
        raise UserError(f"{path}: poisoned data needs 'poison' in its file name, e.g. poisons.jsonl")
    recipe = get_attack(cfg.name)(cfg)
    header: dict[str, Any] = {
        "poisonlab_poisons": FILE_FORMAT,
        "poisoned": True,
        "recipe": cfg.name,
        "metric": recipe.metric,
        "trigger_text": recipe.trigger_text,
        "n": len(poisons) if isinstance(poisons, Sized) else cfg.n_poison,
        "settings": recipe.settings(),
    }
    if data_dir is not None:
        header.update(_data_fingerprint(data_dir))
    written = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        # Header keys in insertion order, so the line starts with the poisoned-data marker.
        f.write(json.dumps(header, ensure_ascii=False) + "\n")
        for p in poisons:
            f.write(json.dumps(p.to_json(), sort_keys=True, ensure_ascii=False) + "\n")
            written += 1
        if written != header["n"]:
            raise ValueError(f"{path}: {written} poisons written, the header says {header['n']}")
    return path


def read_poisons_header(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such poisons file")
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        header = json.loads(first)
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("poisonlab_poisons") != FILE_FORMAT:
        raise UserError(f"{path}: not a poisonlab poisons file (first line is not its header)")
    return header


def read_poisons(path: str | Path, *, data_dir: str | Path | None = None) -> list[Poison]:
    """Read `poisons.jsonl`. With `data_dir`, refuse poisons made with another tokenizer."""
    path = Path(path)
    header = read_poisons_header(path)
    if data_dir is not None and header.get("tokenizer_hash"):
        want = _data_fingerprint(data_dir)["tokenizer_hash"]
        if header["tokenizer_hash"] != want:
            raise UserError(f"{path}: poisons were made with another tokenizer than the one in {data_dir}")
    out = []
    with path.open(encoding="utf-8") as f:
        next(f)
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            try:
                out.append(Poison.from_json(json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise UserError(f"{path}:{lineno}: not a poison record ({e})") from None
    if len(out) != header.get("n", len(out)):
        raise UserError(f"{path}: header says {header['n']} poisons, file has {len(out)} (truncated?)")
    return out
