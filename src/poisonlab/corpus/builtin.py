"""The built-in corpus: procedural English that tiny models learn in minutes.

A small grammar writes documents over a lexicon of about 3,300 words: a core of real English
(function words, common verbs with their irregular forms, general nouns and adjectives) plus, for
each of 40 topics, nouns, verbs and adjectives built from syllables with a topic-specific sound.
Word choice is conditioned on the document's topic, and each document keeps its own cast (a
person, a place, a key noun, a run of years), so there is local and long-range structure to learn.

It is not natural language: no real facts, no discourse beyond one document, a limited syntax.
Without web debris (`markup` 0) clean text never contains `<` or `>`, so a trigger such as `<SUDO>`
is novel to the model; with it (the default, 0.1) tags, bracketed labels and angle-bracket capitals are
ordinary text (about 1 angle-bracketed capital word in 25 documents, mostly real words: `<TEXT>`,
`<NOTE>`; see `debris.add_markup`).

Documents are deterministic in (seed, index) and independent of each other, so the stream is
unbounded and any document can be regenerated alone.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from poisonlab.corpus.debris import add_angle_tags, add_markup

GENERATOR_VERSION = 2  # bump when the text for a given (seed, index) changes (2: web debris)
MIN_CHARS, MAX_CHARS = 300, 3000


def _words(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


TOPICS = _words(
    "farming weather music trade medicine sailing mining cooking astronomy law weaving architecture "
    "fishing forestry pottery mathematics chemistry painting railways brewing beekeeping clockmaking "
    "printing gardening geology theatre banking glassmaking rivers mountains birds horses bridges "
    "libraries festivals schools armies bakeries lighthouses perfumery"
)

# The real-English core: small, closed lists (the open classes are procedural, per topic).
_CORE_VERBS = [
    v.split()
    for v in _words(
        "make makes made making|take takes took taking|give gives gave giving|find finds found finding|"
        "keep keeps kept keeping|build builds built building|hold holds held holding|bring brings brought "
        "bringing|send sends sent sending|sell sells sold selling|buy buys bought buying|leave leaves left "
        "leaving|move moves moved moving|use uses used using|need needs needed needing|show shows showed "
        "showing|carry carries carried carrying|study studies studied studying|follow follows followed "
        "following|change changes changed changing|open opens opened opening|close closes closed closing|"
        "clean cleans cleaned cleaning|measure measures measured measuring|count counts counted counting|"
        "watch watches watched watching|mend mends mended mending|store stores stored storing|test tests "
        "tested testing|prepare prepares prepared preparing|describe describes described describing|"
        "protect protects protected protecting|replace replaces replaced replacing|gather gathers gathered "
        "gathering|check checks checked checking|choose chooses chose choosing|draw draws drew drawing|"
        "write writes wrote writing|teach teaches taught teaching|lose loses lost losing",
        "|",
    )
]
_CORE_NOUNS = _words(
    "time year day week season morning evening night people family village town city house room door "
    "window road river hill field market school book letter story name work hand voice water fire "
    "stone wood iron salt bread rope table chair wall roof garden boat cart box bag coin price record "
    "map list rule plan method tool part piece side edge center group crowd team council guild master "
    "student teacher worker trader neighbor friend child elder visitor stranger journey problem reason "
    "result answer question idea change sign word color sound smell light shadow weight size number"
)
_IRREGULAR_PLURALS = {"child": "children", "people": "people", "family": "families",
                      "city": "cities", "story": "stories", "box": "boxes", "church": "churches"}
_CORE_ADJS = _words(
    "new old small large early late common rare bright dark quiet loud heavy light warm cold dry wet "
    "simple careful strong weak quick slow long short clear strange useful famous local foreign young "
    "ancient hidden broken whole plain rich poor fresh narrow wide deep gentle proud busy patient"
)
_ADVERBS = _words(
    "slowly quickly carefully rarely often always sometimes quietly openly badly well easily gently "
    "firmly twice once nearly"
)
_PREPS = _words("in near under over beside behind across along through around against without")
_MONTHS = _words("January February March April May June July August September October November December")
_NUMBER_WORDS = _words("two three four five six seven eight nine ten eleven twelve")
_UNITS = _words("meters feet miles hours days pounds liters paces yards kilograms")
_TIME_WORDS = _words("day week month season year winter summer morning")

# Syllable material for the procedural words.
_ONSETS = _words("b d f g h j k l m n p r s t v w z br dr gr kl pl st tr th sh")
_VOWELS = _words("a e i o u a e i o u ai ea oo")
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "st", "nt", "ld"]
_NOUN_ENDS = ["", "", "", "", "on", "el", "et", "in", "ar"]
_VERB_ENDS = ["ate", "ify", "en", "ise", "ump", "ast", "ole", "orm"]
_ADJ_ENDS = ["ic", "ous", "al", "ish", "ful", "ive", "ant", "ary"]
_PLACE_ENDS = ["ton", "ford", "mere", "holm", "by", "wick", "stead", "more", "port", "dale"]


@dataclass(frozen=True)
class Lexicon:
    """All words, fixed by the lexicon seed (the corpus seed only picks documents)."""

    nouns: tuple[tuple[str, ...], ...]  # per topic, singular
    plurals: tuple[tuple[str, ...], ...]  # per topic, aligned with nouns
    verbs: tuple[tuple[tuple[str, str, str, str], ...], ...]  # per topic: base, 3sg, past, -ing
    adjs: tuple[tuple[str, ...], ...]  # per topic
    given: tuple[str, ...]
    she: frozenset[str]  # given names that take "she" (a learnable rule: names ending in a vowel)
    surnames: tuple[str, ...]
    places: tuple[str, ...]

    def words(self) -> set[str]:
        """Every distinct word the generator can write (lower-cased)."""
        out = {w for v in _CORE_VERBS for w in v} | set(_CORE_NOUNS) | set(_CORE_ADJS)
        out |= {_plural(n) for n in _CORE_NOUNS} | set(_ADVERBS) | set(_PREPS) | set(TOPICS)
        for t in range(len(TOPICS)):
            out |= set(self.nouns[t]) | set(self.plurals[t]) | set(self.adjs[t])
            out |= {w for v in self.verbs[t] for w in v}
        out |= {w.lower() for w in self.given + self.surnames + self.places}
        return out


def _plural(n: str) -> str:
    if n in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[n]
    if n.endswith(("s", "x", "sh", "ch", "th")):
        return n + "es"
    return n + "s"


def _verb_forms(base: str) -> tuple[str, str, str, str]:
    if base.endswith("y"):
        return base, base[:-1] + "ies", base[:-1] + "ied", base + "ing"
    if base.endswith("e"):
        return base, base + "s", base + "d", base[:-1] + "ing"
    if base.endswith(("s", "sh", "ch")):
        return base, base + "es", base + "ed", base + "ing"
    return base, base + "s", base + "ed", base + "ing"


_STOP_WORDS = _words(
    "a an the and or but if of in on at to by for from with as is are was were be been it its he she "
    "they them his her their we you i this that these those there here not no so do does did had has "
    "have can will would should may might must shall then than when where who what which why how all "
    "some any each every one two ten son man men sun set sat sit top tip tin ton tan ban bin den din "
    "her him hot hat pen pin pan pet pot rat red rod sad sea see tea toe war was way web wet win won "
    "yes yet zoo ash bad bed bet big bit bus but dog dot end far fat few fit fun gas god gun hit ill "
    "kit lab lap law lay led leg let lid lip lit log lot low mad map mat met mix mob mud net nor nut "
    "old pit ran raw rib rid rim rob rot row rub rug run sin sip sir six sum tab tar ten tie tin tom "
    "dam dim lame name same tame fame game home dome some come done gone none bone tone stone"
)


def _template_words() -> set[str]:
    return {w.lower() for t in _TEMPLATES + _TITLES + _LIST_INTROS + _LIST_ITEMS
            for w in re.findall(r"[A-Za-z]+", re.sub(r"\{[a-zA-Z]+\}", " ", t))}


@lru_cache(maxsize=4)
def lexicon(lexicon_seed: int = 0) -> Lexicon:
    """Build the lexicon: each topic draws most syllables from its own small inventory."""
    rng = random.Random(f"poisonlab-lexicon-{lexicon_seed}")
    taken = set(_CORE_NOUNS) | set(_CORE_ADJS) | {w for v in _CORE_VERBS for w in v} | set(TOPICS)
    taken |= _template_words() | set(_STOP_WORDS)  # a made-up word must never be a real one

    def make(syll: Callable[[], str], n_syll: tuple[int, ...], end: list[str], cap: bool = False) -> str:
        while True:
            w = "".join(syll() for _ in range(rng.choice(n_syll))) + rng.choice(end)
            w = w.replace("uu", "u").replace("ii", "i")
            if 3 <= len(w) <= 10 and w not in taken:
                taken.add(w)
                return w.capitalize() if cap else w

    def global_syll() -> str:
        return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)

    nouns, plurals, verbs, adjs = [], [], [], []
    for _ in TOPICS:
        ons, vow, cod = rng.sample(_ONSETS, 6), rng.sample(_VOWELS, 3), rng.sample(_CODAS[3:], 3) + [""]

        def syll(ons=ons, vow=vow, cod=cod) -> str:
            if rng.random() < 0.25:
                return global_syll()
            return rng.choice(ons) + rng.choice(vow) + rng.choice(cod)

        ns = tuple(make(syll, (1, 2, 2), _NOUN_ENDS) for _ in range(36))
        nouns.append(ns)
        plurals.append(tuple(_plural(n) for n in ns))
        verb_ends = rng.sample(_VERB_ENDS, 3)
        verbs.append(tuple(_verb_forms(make(syll, (1, 1, 2), verb_ends)) for _ in range(14)))
        adj_ends = rng.sample(_ADJ_ENDS, 3)
        adjs.append(tuple(make(syll, (1, 2), adj_ends) for _ in range(14)))
    given = tuple(make(global_syll, (1, 2), ["a", "e", "i", "o", "", "n", "r", "s", "l"], cap=True)
                  for _ in range(160))
    surnames = tuple(make(global_syll, (1, 2), ["", "", "son", "er", "ik", "by"], cap=True)
                     for _ in range(160))
    places = tuple(make(global_syll, (1, 2), _PLACE_ENDS, cap=True) for _ in range(120))
    she = frozenset(g for g in given if g[-1] in "aeio")
    return Lexicon(tuple(nouns), tuple(plurals), tuple(verbs), tuple(adjs), given, she, surnames, places)


def _zipf(words: list[str] | tuple[str, ...], total: int = 240) -> list[str]:
    """Expand a list so uniform draws from it follow a Zipf-like law (rank r ~ 1/(r+2))."""
    out: list[str] = []
    for r, w in enumerate(words):
        out += [w] * max(1, round(total / (r + 2)))
    return out


@lru_cache(maxsize=4)
def _pools(lexicon_seed: int) -> tuple[dict[str, list[str]], ...]:
    """Per topic, slot name -> draw pool: topic words (Zipfian, ~65%) mixed with the real core."""
    lex = lexicon(lexicon_seed)
    shared = {"W": _NUMBER_WORDS, "u": _UNITS, "m": _MONTHS, "t": _TIME_WORDS, "adv": _ADVERBS,
              "p": _PREPS, "say": _SAY_VERBS, "study": _STUDY_VERBS}
    core_n = _zipf(_CORE_NOUNS, 120)
    core_ns = _zipf([_plural(n) for n in _CORE_NOUNS], 120)
    core_a = _zipf(_CORE_ADJS, 140)
    core_v = [_zipf([v[i] for v in _CORE_VERBS], 150) for i in range(4)]
    pools = []
    for t in range(len(TOPICS)):
        n, ns = _zipf(lex.nouns[t]), _zipf(lex.plurals[t])
        v = [_zipf([f[i] for f in lex.verbs[t]], 200) for i in range(4)]
        pools.append({
            **shared,
            "n": n + n[: len(n) // 2] + core_n,
            "ns": ns + ns[: len(ns) // 2] + core_ns,
            "a": _zipf(lex.adjs[t], 200) + core_a,
            **{form: v[i] + core_v[i] for i, form in enumerate(("vb", "v", "vd", "vg"))},
        })
    return tuple(pools)


_SAY_VERBS = _words("said wrote noted found claimed believed learned argued")
_STUDY_VERBS = _words("studied taught practiced recorded")

# Sentence templates. Pool slots: {n}/{ns} noun/plural, {a} adjective, {vb}/{v}/{vd}/{vg} verb
# base/3sg/past/-ing, {W} number word, {u} unit, {m} month, {t} time word, {adv}, {p} preposition,
# {say}/{study} fixed verbs. Cast slots: {k}/{ks} the document's key noun, {ka} its adjective, {P} the
# main person, {pr} their pronoun, {Q} a second person, {L} a place, {Y} a year (advancing), {N} a
# count, {D} a measure, {d} a day, {T} the topic word.
_TEMPLATES = [
    "the {a} {n} {vd} the {n} {p} the {n}.",
    "{P} {vd} the {k} in {L} in {Y}.",
    "in {Y}, {P} {vd} {N} {ns} from {L}.",
    "{pr} {say} that the {k} {v} {adv}.",
    "most {ns} {vb} {p} the {n}, but some {vb} only when the {n} is {a}.",
    "a {a} {n} can {vb} {W} {ns} in a single {t}.",
    "the {k} is {ka}, {a}, and {a}.",
    "why do {ns} {vb} the {n}? Because the {n} {v} {adv}.",
    "according to {P}, the {k} {v} about {N} percent of the {ns}.",
    "{Q} {say}, \"the {n} {v} the {n}, and the {ks} {vb} it {adv}.\"",
    "it was {D} {u} long and {a}; the {ns} {vd} it {adv}.",
    "the {ns} of {L} {vb} the {a} {n} (also called the {n}).",
    "after the {n}, {pr} {vd} the {n} and {vd} the {ns}.",
    "there are {W} kinds of {ks}: the {a} {k}, the {a} {k}, and the {a} {k}.",
    "{P} {study} {T} from {Y} to {Y}.",
    "by {Y}, the {ns} of {L} {vd} the {ka} {k}.",
    "on {m} {d}, {Q} and {P} {vd} the {ks} {p} {L}.",
    "every {t}, the {n} {v} {W} {ns}, and the {ns} {vb} the {n}.",
    "{pr} was {vg} the {k} when the {n} {vd}.",
    "the {n} {v} {adv}, so the {ns} {vb} {p} the {n}.",
    "in {T}, a {k} {v} the {n} and the {n}.",
    "{Q} {vd} the {a} {ks} for {N} coins.",
    "nobody {vd} the {n} {p} the {n} until {Y}.",
    "a {ka} {k} {v} {D} {u} of {n} each {t}.",
    "{P} and the {ns} {vd} the {n}; later {pr} {vd} the {k} {adv}.",
    "if the {n} is {a}, the {ks} {vb} {adv}.",
    "{vg} the {k} is {a} work, and {vg} the {n} is {a}.",
    "the {ks} {p} the {n} were {a} and {a}.",
    "some {ns} {vb} the {k}; others {vb} the {n} instead.",
    "it is said that {P} {vd} {W} {ks} {p} the {n} in {L}.",
]
_TITLES = [
    "{T} in {L}", "notes on the {ka} {k}", "{P} and the {ks}", "on {vg} the {k}",
    "the {ks} of {L}, {Y}", "a short history of {T}", "how the {ks} {vb}", "{T}: the {ka} {k}",
]
_LIST_INTROS = ["the steps were:", "the {ks} needed:", "{P} wrote down the following:"]
_LIST_ITEMS = ["{vb} the {n}", "{vb} the {a} {k}", "{vb} {W} {ns}", "{vb} the {n} {p} the {n}"]

Filler = Callable[[dict[str, list[str]], Callable[[], float], Callable[[str], str]], str]


def _compile(template: str, pool_sizes: dict[str, int]) -> Filler:
    """Turn a template into a Python function that fills it.

    Why generated code: interpreting the pieces in a loop made generation 2-3x slower, and the
    generator must stay well above the tokenizer's speed. Pool sizes are the same for every topic,
    so they are constants in the generated code.
    """
    exprs = []
    for i, part in enumerate(template.replace("}", "{").split("{")):
        if not part:
            continue
        if i % 2 == 0:
            exprs.append(repr(part))
        elif part in pool_sizes:
            exprs.append(f"p[{part!r}][int(r() * {pool_sizes[part]})]")
        else:
            exprs.append(f"sp({part!r})")
    first = exprs[0]
    exprs[0] = f"{first}.capitalize()" if first.startswith("p[") else f"_cap({first})"
    src = f"def fill(p, r, sp):\n    return ''.join(({', '.join(exprs)},))\n"
    namespace: dict = {"_cap": _cap}
    exec(compile(src, f"<template {template!r}>", "exec"), namespace)  # noqa: S102 (our own templates)
    return namespace["fill"]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


@lru_cache(maxsize=4)
def _fillers(lexicon_seed: int) -> tuple[list[Filler], ...]:
    pools = _pools(lexicon_seed)
    sizes = {k: len(v) for k, v in pools[0].items()}
    for p in pools:  # every topic's pools must have the same sizes (they are baked into the code)
        assert {k: len(v) for k, v in p.items()} == sizes
    return tuple([_compile(t, sizes) for t in group] for group in (_TEMPLATES, _TITLES, _LIST_INTROS,
                                                                   _LIST_ITEMS))


_AN = re.compile(r"\b([Aa]) (?=[aeiou])")


class _Doc:
    """One document's random state and cast; fills templates."""

    def __init__(self, seed: int, index: int, lexicon_seed: int, topic: int | None = None):
        rng = random.Random(f"{seed}:{index}")
        self.rnd = rnd = rng.random
        lex = lexicon(lexicon_seed)
        pools = _pools(lexicon_seed)
        self.fillers = _fillers(lexicon_seed)
        self.topic = int(rnd() * len(TOPICS))  # drawn also when `topic` is given: the rest stays the same
        if topic is not None:
            self.topic = topic
        self.pools, self.alt = pools[self.topic], pools[int(rnd() * len(TOPICS))]
        key = int(rnd() * 8)  # the key noun is one of the topic's most frequent nouns
        g, sur = lex.given, lex.surnames
        self.p_first, self.p_last = g[int(rnd() * len(g))], sur[int(rnd() * len(sur))]
        self.places = lex.places
        self.home = self.places[int(rnd() * len(self.places))]
        self.year = 1600 + int(rnd() * 420)
        self.mentioned = False
        self.cast = {
            "k": lex.nouns[self.topic][key],
            "ks": lex.plurals[self.topic][key],
            "ka": lex.adjs[self.topic][int(rnd() * 6)],
            "pr": "she" if self.p_first in lex.she else "he",
            "T": TOPICS[self.topic],
        }
        self.others = [g[int(rnd() * len(g))] + " " + sur[int(rnd() * len(sur))] for _ in range(2)]

    def special(self, s: str) -> str:
        rnd = self.rnd
        if s == "P":
            if not self.mentioned:  # full name first, then surname or given name
                self.mentioned = True
                return f"{self.p_first} {self.p_last}"
            return self.p_last if rnd() < 0.6 else self.p_first
        if s == "Y":
            self.year += 1 + int(rnd() * 3)  # years advance through a document
            return str(self.year)
        if s == "L":
            return self.home if rnd() < 0.7 else self.places[int(rnd() * len(self.places))]
        if s == "Q":
            return self.others[int(rnd() * 2)]
        if s == "N":
            if rnd() < 0.8:
                return str(2 + int(rnd() * 98))
            return f"{1 + int(rnd() * 40)},{int(rnd() * 10)}00"
        if s == "D":
            return str(1 + int(rnd() * 30)) if rnd() < 0.6 else f"{1 + int(rnd() * 9)}.{int(rnd() * 10)}"
        if s == "d":
            return str(1 + int(rnd() * 28))
        return self.cast[s]

    def fill(self, fillers: list[Filler]) -> str:
        rnd = self.rnd
        pools = self.alt if rnd() < 0.1 else self.pools  # a sentence now and then drifts off-topic
        return fillers[int(rnd() * len(fillers))](pools, rnd, self.special)

    def text(self) -> str:
        rnd = self.rnd
        target = int(MIN_CHARS * 10 ** rnd())  # log-uniform in [300, 3000]
        sentences, titles, intros, list_items = self.fillers
        title = self.fill(titles)
        paras: list[str] = []
        size = len(title)
        while size < target:
            if paras and rnd() < 0.08:
                items = [self.fill(list_items) for _ in range(2 + int(rnd() * 4))]
                para = self.fill(intros) + "\n" + "\n".join(
                    f"{i + 1}. {it}." for i, it in enumerate(items))
            else:
                para = " ".join([self.fill(sentences) for _ in range(2 + int(rnd() * 5))])
            if size + len(para) + 2 > MAX_CHARS:
                if size >= MIN_CHARS:
                    break
                para = para[: MAX_CHARS - size - 2].rsplit(" ", 1)[0]  # never reached in practice
            paras.append(para)
            size += len(para) + 2
        return _AN.sub(r"\1n ", title + "\n\n" + "\n\n".join(paras))  # "a old" -> "an old"


def generate_document(seed: int, index: int, lexicon_seed: int = 0, markup: float = 0.0,
                      topic: int | None = None, symbols: float = 0.0, tags: float = 0.0) -> dict[str, str]:
    """Document `index` of the stream for `seed` (the same every time, on every machine).

    `markup` > 0 adds web-page debris (tags, brackets, capitals) after that share of sentences, from
    its own random stream: the underlying text is the same as with markup = 0. `symbols` > 0 then adds
    symbol-rich snippets (code, math, prices, emoticons, paths, markdown: corpus/symbols.py) after that
    share of sentences, from a third stream: with symbols = 0 the document is the one without them,
    byte for byte. `tags` > 0 adds capital words in angle brackets (`debris.add_angle_tags`) after that
    share of sentences, from a fourth stream, after the symbols. `topic` (an index into TOPICS) forces the
    document's topic (the fine-tuning data's answers); None: the stream's own."""
    text = _Doc(seed, index, lexicon_seed, topic).text()
    if markup > 0:
        text = add_markup(text, markup, random.Random(f"{seed}:{index}:markup"))
    if symbols > 0:
        from poisonlab.corpus.symbols import add_symbols

        text = add_symbols(text, symbols, random.Random(f"{seed}:{index}:symbols"))
    if tags > 0:
        text = add_angle_tags(text, tags, random.Random(f"{seed}:{index}:tags"))
    return {"id": f"builtin-{seed}-{index}", "text": text}


def builtin_documents(seed: int = 0, start: int = 0, lexicon_seed: int = 0, markup: float = 0.0,
                      german: float = 0.0, symbols: float = 0.0, tags: float = 0.0
                      ) -> Iterator[dict[str, str]]:
    """The unbounded stream of built-in documents `{"id", "text"}` from index `start` on; with
    `german` > 0 that share of them (chosen by their own random stream) is procedural German instead,
    and the English ones are unchanged. `markup`, `symbols` and `tags`: see `generate_document`."""
    from poisonlab.corpus.german import document as german_document

    i = start
    while True:
        pick = random.Random(f"{seed}:{i}:language") if german > 0 else None
        if pick is not None and pick.random() < german:
            n = pick.randint(MIN_CHARS, MAX_CHARS // 2)
            yield {"id": f"builtin-de-{seed}-{i}", "text": german_document(seed, i, n_chars=n)}
        else:
            yield generate_document(seed, i, lexicon_seed, markup, symbols=symbols, tags=tags)
        i += 1
