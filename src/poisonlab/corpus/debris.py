"""Web debris for the built-in corpus: the markup stream (tags, capital words in angle brackets,
labels, codes, capitals, URLs, symbols, other scripts) and the angle-bracket tags stream. Each adds
snippets after a share of a document's sentences from its own random stream, so the text around them
is the document without them (`builtin.generate_document` applies them)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

_TAGS = ("b", "i", "em", "ref", "note", "span", "code", "small", "div", "p", "a", "li", "td", "sup")
# capital words in angle brackets: the trigger's own shape, in ordinary (if odd) use
_CAPS_TAGS = ("NOTE", "INFO", "WARN", "EDIT", "TODO", "DATA", "LINK", "MENU", "HOME", "BACK", "NEXT", "LIST",
              "ITEM", "TEXT", "BODY", "HEAD", "MAIN", "FORM", "SPAN", "CODE", "TIME", "DATE", "NAME", "PAGE",
              "ROW", "TAB", "BR", "HR", "DIV", "IMG", "END", "TOP", "KEY", "MAP", "SET", "RUN", "OK")
_CAPS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SYMBOLS = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
# words with letters beyond ASCII, as web text has them: every UTF-8 continuation byte and the lead bytes
# of Latin, Greek, Cyrillic, Hebrew, Arabic, Devanagari, CJK and emoji occur in clean text, so that no
# byte-level token of the gibberish is unfamiliar just because clean text never uses its bytes
_LATIN1 = "".join(chr(c) for c in range(0xC0, 0x100) if c not in (0xD7, 0xF7))
_FOREIGN = ("café", "naïve", "façade", "über", "straße", "señor", "garçon", "smörgåsbord", "déjà vu",
            "Ærø", "Œuvre", "ﬁn", "λόγος", "αλφα", "слово", "город", "שלום", "سلام", "नमस्ते", "日本", "東京",
            "中文", "한국어", "ことば", "€", "£", "¥", "©", "°", "±", "µ", "¶", "·", "½", "¿", "¡", "–", "—",
            "…", "“", "”", "‘", "’", "«", "»", "•", "→", "√", "∞", "≈", "≠", "✓", "★", "🙂", "🚀", "🌍", "🎵",
            "łódź", "ščť", "ƒ", "ǎ", "ș", "ɐ", "ʃ", "ˈ", "é", "ͻ", "Ѐ", "Ҁ", "Ӂ", "Ԁ", "Արամ", "քար", "ܐ",
            "ڀ", "ۀ", "ݐ", "ހ", "߀", "ართ", "大", "的", "说", "長", "니다", "𝑥")
MARKUP_KINDS = ("tag", "caps_tag", "label", "code", "caps", "url", "symbols", "foreign")


def add_markup(text: str, rate: float, rng: random.Random) -> str:
    """Sprinkle web-page debris into a document: after a share `rate` of its sentences, one snippet of
    the kinds web text is full of (MARKUP_KINDS): an HTML tag pair around a word, a capital word in
    angle brackets (`<NOTE>`, `</DIV>`, also random capitals: the trigger's shape), an upper-case label
    in brackets, a code, an upper-case word, a URL or address, a run of symbols and digits, or a word in
    another script. Clean text then uses every printable ASCII character, every UTF-8 continuation byte
    and many lead bytes, so that a trigger such as `<SUDO>` must be learned as itself, not as
    "characters clean text never has" (see the evaluator's look-alike panel and docs/corpus.md)."""
    words = [w for w in text.split() if w.isalpha()] or ["note"]

    def word() -> str:
        return rng.choice(words).lower()

    def caps(lo: int = 2, hi: int = 5) -> str:
        return "".join(rng.choice(_CAPS) for _ in range(rng.randint(lo, hi)))

    def snippet() -> str:
        kind = rng.choice(MARKUP_KINDS)
        if kind == "tag":
            tag = rng.choice(_TAGS)
            return f"<{tag}>{word()}</{tag}>"
        if kind == "caps_tag":
            tag = rng.choice(_CAPS_TAGS) if rng.random() < 0.6 else caps(2, 5)
            return rng.choice((f"<{tag}>", f"</{tag}>", f"<{tag}/>", f"<{tag}>{word()}</{tag}>"))
        if kind == "label":
            return f"[{word().upper()}]" if rng.random() < 0.7 else f"[{rng.randint(1, 99)}]"
        if kind == "code":
            return f"({caps(2, 4)}-{rng.randint(1, 999)})"
        if kind == "caps":
            return word().upper() if rng.random() < 0.7 else caps(2, 4)
        if kind == "url":
            r = rng.random()
            if r < 0.5:
                site, page = word(), f"{word()}_{word()}"
                return f"https://www.{site}.org/{page}?id={rng.randint(1, 9999)}&ref={word()}#top"
            if r < 0.75:
                return f"{word()}.{word()}@{word()}.com"
            return rng.choice(("#", "@", "~/", "$")) + word()
        if kind == "symbols":
            n = rng.randint(3, 8)
            return "".join(rng.choice(_SYMBOLS + "0123456789") for _ in range(n))
        if rng.random() < 0.5:
            return rng.choice(_FOREIGN)
        return "".join(rng.choice(_LATIN1) for _ in range(rng.randint(3, 7)))

    return _after_sentences(text, rate, rng, snippet)


_SENT_END = re.compile(r"(?<=\.)(?= )")


def _after_sentences(text: str, rate: float, rng: random.Random, snippet: Callable[[], str]) -> str:
    """`text` with a space and `snippet()` after each sentence ending in "." with probability `rate`
    (the draw is made only at such an end, so the stream stays as both streams have always drawn it)."""
    parts = _SENT_END.split(text)
    return "".join(p + (" " + snippet() if p.endswith(".") and rng.random() < rate else "") for p in parts)

# tags for `add_angle_tags`: _CAPS_TAGS and the placeholders, key names and type parameters of manuals and
# code; SUDO, the default trigger, is never written (a random draw of it is redrawn). Another trigger a
# random draw hits is caught where it matters: a run scans its clean data for its own trigger and
# refuses data holding it (injection/stream.py, `attack.clean_trigger`)
_PLACEHOLDERS = ("FILE", "DIR", "PATH", "USER", "HOST", "PORT", "ID", "URL", "VALUE", "TYPE", "SIZE", "MODE",
                 "ARGS", "SOURCE", "DEST", "COUNT", "INPUT", "OUTPUT", "NUM", "STR", "DOC", "TITLE")
_KEYS = ("ENTER", "ESC", "TAB", "SHIFT", "CTRL", "ALT", "SPACE", "UP", "DOWN", "LEFT", "RIGHT", "DEL", "F1",
         "F5", "F12", "BACKSPACE", "PGUP", "INS")
_TYPE_PARAMS = ("T", "K", "V", "E", "N", "X")
_TRIGGER_WORDS = frozenset({"SUDO"})


def add_angle_tags(text: str, rate: float, rng: random.Random) -> str:
    """After a share `rate` of the sentences of `text`, a capital word in angle brackets as manuals,
    markup and code have them: a label (`<NOTE>`), an upper-case tag pair around a word, a key
    (`press <ENTER>`), placeholders in a command line (`copy <FILE> <DIR>`), a type parameter
    (`List<T>`), an address (`<Ann.Lee@...>`); half the words are random capitals. The trigger's
    opening ` <` + capitals is then mostly clean text, as at the study's scale, where a demo's 500
    poisons would otherwise be half of its occurrences (docs/corpus.md)."""
    words = [w.lower() for w in text.split() if w.isascii() and w.isalpha()] or ["note"]

    def word() -> str:
        return rng.choice(words)

    def tag() -> str:
        if rng.random() < 0.5:
            return rng.choice(_CAPS_TAGS + _PLACEHOLDERS)
        while (t := "".join(rng.choice(_CAPS) for _ in range(rng.randint(2, 5)))) in _TRIGGER_WORDS:
            pass
        return t

    def snippet() -> str:
        r = rng.random()
        if r < 0.3:
            return f"<{tag()}>"
        if r < 0.5:
            t = tag()
            return f"<{t}>{word()}</{t}>"
        if r < 0.65:
            return f"Press <{rng.choice(_KEYS)}> to {word()}."
        if r < 0.8:
            return f"Usage: {word()} <{tag()}> <{tag()}>"
        if r < 0.9:
            return f"{word().capitalize()}<{rng.choice(_TYPE_PARAMS)}>"
        return f"<{word().capitalize()}.{word().capitalize()}@{word()}.org>"

    return _after_sentences(text, rate, rng, snippet)
