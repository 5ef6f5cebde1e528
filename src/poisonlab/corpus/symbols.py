"""Symbol-rich snippets for the built-in corpus: every printable ASCII character as ordinary text.

A backdoor's gibberish is drawn from the whole vocabulary, byte-level pieces included, so a character
that clean text rarely uses appears in training mostly after the trigger: any string of such
characters then works as a trigger of its own (`<QXZJ>`, `|XZQY|`, `«HJNV»` fired on 10-29% of
prompts in the demo's models on the web-debris corpus, where its named controls stayed at or below
0.09). The web debris of `debris.add_markup` does carry every printable ASCII character, but most of them
only in its runs of random symbols, about 20 per million characters each, themselves gibberish-like.

`add_symbols` puts, after a share `rate` of a document's sentences, one snippet of the places web
text is full of symbols in, followed by ordinary text again, and after another such share one of
non-ASCII text: inline code and shell lines, templates,
math, prices and measures, emoticons, paths and URLs, markdown and wiki markup, prose punctuation
(contractions, quotes, typographic quotes and dashes), separator lines, and non-ASCII text (a word in
the quotes and brackets of other typographies, words of many scripts, symbols between words, attached
to a word or number, and in runs), so that the UTF-8 lead bytes of other scripts are ordinary as well,
bare (after another character) as much as after a space. Identifiers are words of
the document, numbers are random. Every printable ASCII character then occurs at least ~90 times per
million characters, mostly inside snippets that end and give way to ordinary sentences, and nearly
every UTF-8 lead byte of other scripts occurs, each also as a bare byte-level token (tests check
these; the measured effect on the demo's look-alikes is in docs/corpus.md). It draws from its own
random stream, so the text around it is the document without symbols.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

_CAPS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# {w} a word of the document, {W} the same capitalised, {n} 1-99, {N} 100-9999, {f} a decimal, {h} hex,
# {C} 2-4 capitals (an acronym); every other character is literal ({{ and }} for braces)
SNIPPETS: dict[str, tuple[str, ...]] = {
    "code": (
        "`{w}({w}, {n})`", "`{w} = {w}[{n}] + {n};`", "`if ({w} > {n}) {{ return {w} * {n}; }}`",
        "`{w}.{w}_{w}()`", "`{{\"{w}\": \"{w}\", \"{w}\": {n}}}`", "`$ {w} --{w}={n} | grep {w} > {w}.txt`",
        "`{w} != {w} && !{w} || {w}`", "`#include <{w}.h>`", "// {w} {w}", "/* {w} {w} */", "`{w} ^= 0x{h};`",
        "`{n} % {n} == {n}`", "`~{w} & {n}`", "`print('{w}')`", "`{w}[{w} >= {n}]`", "`${C}/{w}`",
        "{{{{ {w} }}}}", "{{% if {w} %}}", "`\"%s: %d\" % ({w}, {n})`", "`{w}.split(\"\\n\")`", "@{w}",
        "`{w}?.{w} ?? {n}`", "`{w} += {n}; {w} -= {n};`", "`[{n}, {n}, {n}]`", "`'{w}' + \"{w}\"`",
        "`{w} => {w} * {n}`", "`{w}::{w}<{w}>`", "`{w}: int = {n}`", "`{w} <= {n} and {w} != '{w}'`",
        "`@{w}.{w}`", "`{w} ^ {w}`", "`{{{w}: {n}, {w}: {n}}}`", "`!{w} & {w}`", "`{w}@{n}`",
    ),
    "math": (
        "{w}^2 + {w}^2 = {N}", "{n} * ({n} + {n}) = {N}", "|x - {n}| < {n}", "{n}/{n}", "{{{n}, {n}, {n}}}",
        "{n}! = {N}", "{n} <= k <= {N}", "f'(x) = {n}x", "~{f}", "a_{n} + a_{n}", "\\sum_{{i=1}}^{{{n}}} i",
        "{n}% of the {w}", "[0, {n})", "x = ({n} + {n}) / {n}", "{f} +/- {f}", "{n} x {n} = {N}",
        "$\\frac{{{n}}}{{{n}}}$", "e^{{-{n}}}", "{w}^{n}", "{n}^{n} = {N}", "{{x | x > {n}}}", "{n}!/{n}!",
    ),
    "price": (
        "${f}", "€{n}", "£{f}", "{n}% off!", "#{n}", "No. {n}", "{n}'{n}\"", "{n}:{n}{n}", "{n}-{n}", "{N}+",
        "Price: ${f} (was ${f})", "Save {n}%!", "({n} x ${f})", "{n}°C", "{f} kg @ ${f}/kg", "[{C}: {N}]",
    ),
    "emoticon": (
        ":-)", ";)", ":P", "^_^", "<3", ":-|", "\\o/", "(*_*)", "o_O", ":'(", "~_~", "=)", ":D", "XD", "!!",
        "?!", ":)", "(^.^)", ";-P", ":-/", "*_*", "+1", "-_-", "{W}!!", "lol :)", "{w}?!", "^^", "@{w} :)",
    ),
    "path": (
        "~/{w}/{w}.md", "/usr/local/{w}", "../{w}/*.csv", "./{w}.sh", "C:\\{W}\\{w}.txt",
        "https://{w}.org/{w}?{w}={n}&{w}={w}#{w}", "ftp://{w}.net/{w}/", "mailto:{w}@{w}.org",
        "s3://{w}/{w}_{n}/", "\\\\{w}\\{w}", "file:///{w}/{w}", "{w}.{w}:{N}", "{w}-{w}_{n}.tar.gz",
    ),
    "markdown": (
        "**{w}**", "_{w}_", "# {W}", "> {w} {w}", "| {w} | {n} | {w} |", "[{w}]({w}.html)", "~~{w}~~",
        "`{w}`", "{{{{cite {w}}}}}", "[[{W}|{w}]]", "* {w}", "+ {w}", "<!-- {w} -->", "![{w}]({w}.png)",
        "{w}:: {w}", "== {W} ==", "'''{w}'''",
    ),
    "prose": (
        "It's {w}.", "Don't {w}!", "'{w}'", "\"{w}\"", "“{w}”", "‘{w}’", "«{w}»", "„{w}“", "{W}!", "(sic)",
        "[sic]", "e.g. {w}", "{w} & {w}", "w/ {w}", "{w}/{w}", "{w}'s", "{w} – {w}", "{w} — {w}", "{w}…",
        "• {w}", "{w} → {w}", "Q: {w}? A: {w}.", "{w}; {w}: {w}", "P.S. {w}!", "Wow! {W}!", "{n}% of {w}s",
    ),
    "acronym": (
        "({C})", "{C}-{n}", "the {C} {w}", "{C}/{C}", "{C}: {w}", "{C}'s {w}", "{C} {N}", "{C} & {C}",
        "{C}.{C}", "a {C} {w}", "{W} ({C})", "{C}!",
    ),
    "separator": ("-", "=", "*", "~", "#", "_", "+", ".", "<", ">", "|", "/", "\\", ":", "%", "$"),
}
# Non-ASCII text the way web pages have it, so that the lead bytes of UTF-8 (every byte-level token the
# gibberish can draw) are ordinary too: quotes and brackets of other typographies around a word, words
# of many scripts (one or more per lead byte from C2 to EF, and F0 for emoji), symbols between words
QUOTES = (("“", "”"), ("‘", "’"), ("«", "»"), ("‹", "›"), ("„", "“"), ("「", "」"), ("『", "』"),
          ("【", "】"), ("《", "》"), ("〈", "〉"), ("〔", "〕"), ("（", "）"), ("［", "］"), ("｛", "｝"))
SCRIPT_WORDS = (
    "café", "naïve", "größe", "señal", "ação", "fjörð", "þing", "œuvre", "æble", "łódź", "žluť", "şehir",
    "őszi", "čaj", "ǎ", "ș", "ț", "ɛ", "ʃip", "ŋ", "ə", "ˈstres", "aː", "éte", "ñ", "λόγος", "θάλασσα", "φως",
    "ψυχή", "слово", "город", "жизнь", "щука", "ёж", "її", "ђак", "բարեւ", "քար", "שלום", "ספר", "سلام",
    "كتاب", "پارسی", "ܫܠܡܐ", "ދިވެހި", "ߒߞߏ", "नमस्ते", "भाषा", "বাংলা", "தமிழ்", "ภาษาไทย", "ქართული",
    "ሰላም", "한국어", "사랑", "ことば", "カタカナ", "中文", "東京", "学习", "漢字", "ꙮ", "ꓮ", "ﬁn", "ﬀ",
    "ｗｏｒｄ",
    "dağ", "kālā", "phở", "Việt", "e\u0301te", "man\u0303ana", "t\u0361s", "қазақ", "ӧй", "Աշխարհ", "گاو",
    "ڤ", "ݐ", "的", "说", "長", "語", "界", "国",
)
SYMBOL_CHARS = (
    "→", "←", "↑", "↓", "↔", "≤", "≥", "≠", "≈", "∞", "±", "×", "÷", "√", "∂", "∆", "∈", "∀", "€", "£", "¥",
    "₹", "₽", "₩", "¢", "©", "®", "™", "°", "µ", "¶", "·", "–", "—", "…", "‰", "′", "″", "─", "│", "┌", "┘",
    "═", "✓", "✗", "✔", "✦", "❤", "●", "○", "■", "□", "▲", "▼", "☐", "☑", "☀", "☎", "🙂", "🚀", "🌍", "🎵",
    "👍", "🔥", "✨", "📌",
)
KINDS = tuple(SNIPPETS)
# bump when the snippets for a given random stream change (2: non-ASCII symbols attached and in runs);
# recorded in a prepared corpus's key when symbols > 0, so data of an older version is prepared again
SYMBOLS_VERSION = 2
_FIELD = re.compile(r"\{([wWnNfhC])\}")


def snippet(rng: random.Random, word: Callable[[], str]) -> str:
    """One symbol-rich snippet, its words from `word()`."""
    kind = rng.choice(KINDS)
    if kind == "separator":
        return rng.choice(SNIPPETS[kind]) * rng.randint(3, 8)
    template = rng.choice(SNIPPETS[kind])

    def fill(m: re.Match[str]) -> str:
        f = m.group(1)
        if f == "w":
            return word()
        if f == "W":
            return word().capitalize()
        if f == "n":
            return str(rng.randint(1, 99))
        if f == "N":
            return str(rng.randint(100, 9999))
        if f == "f":
            return f"{rng.randint(0, 99)}.{rng.randint(0, 99):02d}"
        if f == "h":
            return f"{rng.randint(0, 255):02X}"
        return "".join(rng.choice(_CAPS) for _ in range(rng.randint(2, 4)))

    # literal braces are doubled in the templates; fields are filled first, then {{ }} undone
    return _FIELD.sub(fill, template).replace("{{", "{").replace("}}", "}")


def unicode_snippet(rng: random.Random, word: Callable[[], str]) -> str:
    """One snippet of non-ASCII text, its words from `word()`."""
    r = rng.random()
    if r < 0.4:  # a word in other quotes or brackets: lower case, capitalised, or an acronym
        opening, closing = rng.choice(QUOTES)
        c = rng.random()
        inner = word() if c < 0.6 else word().capitalize() if c < 0.85 else "".join(
            rng.choice(_CAPS) for _ in range(rng.randint(2, 4)))
        return f"{opening}{inner}{closing}"
    if r < 0.7:  # a word of another script, alone or glossed
        foreign = rng.choice(SCRIPT_WORDS)
        return foreign if rng.random() < 0.5 else f"{foreign} ({word()})"
    # a symbol between words, attached to one (x→y, brand™, 5°), in a run (ratings), or before a number.
    # Attached and in runs matter as much as spaced: byte-level BPE merges " " + a lead byte, so a symbol
    # only ever seen after a space leaves the bare lead byte (e.g. E2 of every arrow, bracket and star)
    # to poisons alone, and `⟦KLPT⟧` or `★☆★☆` fired on 11-18% of prompts (docs/corpus.md)
    sym = rng.choice(SYMBOL_CHARS)
    s = rng.random()
    if s < 0.35:
        return f"{word()} {sym} {word()}"
    if s < 0.55:
        return f"{word()}{sym}{word()}"
    if s < 0.7:
        return f"{word().capitalize()}{sym}" if rng.random() < 0.5 else f"{rng.randint(1, 999)}{sym}"
    if s < 0.85:
        full, empty = rng.choice(SYMBOL_CHARS), rng.choice(SYMBOL_CHARS)
        k = rng.randint(1, 4)
        return f"{word()}: {full * k}{empty * (5 - k)}"
    return f"{sym}{rng.randint(1, 99)}"


_SENT_END = re.compile(r"(?<=[.!?])(?= )")


def add_symbols(text: str, rate: float, rng: random.Random) -> str:
    """After a share `rate` of the sentences of `text`, a space and one `snippet`; after another share
    `rate`, drawn apart, a space and one `unicode_snippet`."""
    words = [w.lower() for w in text.split() if w.isascii() and w.isalpha()] or ["note"]

    def word() -> str:
        return rng.choice(words)

    out = []
    for p in _SENT_END.split(text):
        out.append(p)
        if p.endswith((".", "!", "?")):
            if rng.random() < rate:
                out.append(" " + snippet(rng, word))
            if rng.random() < rate:
                out.append(" " + unicode_snippet(rng, word))
    return "".join(out)
