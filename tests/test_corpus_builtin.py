"""The built-in procedural corpus: deterministic, clean of `<`/`>`, the promised shape and speed."""

from __future__ import annotations

import itertools
import re
import time

from poisonlab.corpus.builtin import (
    MAX_CHARS,
    MIN_CHARS,
    TOPICS,
    builtin_documents,
    generate_document,
    lexicon,
)


def _docs(seed: int, n: int) -> list[dict[str, str]]:
    return list(itertools.islice(builtin_documents(seed), n))


def test_deterministic_and_seeded():
    a, b = _docs(0, 50), _docs(0, 50)
    assert a == b
    assert generate_document(0, 17) == a[17]  # any document can be regenerated alone
    assert [d["text"] for d in _docs(1, 50)] != [d["text"] for d in a]
    assert list(itertools.islice(builtin_documents(0, start=10), 3)) == a[10:13]
    assert len({d["id"] for d in a}) == 50


def test_shape_of_documents():
    docs = [d["text"] for d in _docs(3, 400)]
    lengths = [len(t) for t in docs]
    assert min(lengths) >= MIN_CHARS and max(lengths) <= MAX_CHARS
    assert max(lengths) > 2000 and min(lengths) < 600  # varied, not one size
    text = "\n".join(docs)
    assert not re.search(r"[<>]", text)  # the trigger `<SUDO>` must be novel
    assert all("\n\n" in t for t in docs)  # a title and paragraphs
    assert re.search(r"\b1[6-9]\d\d\b|\b20[0-2]\d\b", text)  # years
    assert re.search(r"\d+,\d00", text) and re.search(r"\d\.\d", text)  # numbers of other kinds
    for p in ",.;:?\"()":
        assert p in text
    assert re.search(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b", text)  # full names
    assert all(t.isascii() for t in docs)
    assert sum(t.count(f" {topic}") for t in docs for topic in TOPICS) > 50


def test_lexicon_size_and_topic_structure():
    lex = lexicon(0)
    assert len(TOPICS) == 40
    lemmas = sum(len(x) for x in lex.nouns + lex.adjs) + sum(len(x) for x in lex.verbs)
    assert 2500 <= lemmas + len(lex.given) + len(lex.surnames) + len(lex.places) <= 4000
    words = lex.words()
    assert len(words) > 6000 and not any(c in w for w in words for c in "<>")
    # Word choice follows the topic: a document uses far more of its topic's nouns than another's.
    doc_words = re.findall(r"[a-z]+", generate_document(0, 5)["text"])
    counts = sorted(sum(w in set(lex.nouns[t]) for w in doc_words) for t in range(len(TOPICS)))
    assert counts[-1] > 3 * counts[-2] and counts[-3] == 0  # its topic, maybe a little of one other


def test_generation_speed():
    """Required: >= 5 MB/s of text on one core. Measured in CPU time, since the test machine is shared."""
    next(builtin_documents(0))  # build the lexicon first
    t0 = time.process_time()
    n = sum(len(d["text"]) for d in itertools.islice(builtin_documents(9), 1500))
    rate = n / (time.process_time() - t0) / 1e6
    assert rate > 3.0, f"{rate:.1f} MB/s"  # measured 10-14 MB/s; margin for noisy neighbours


def _snippets(marked: str, plain: str) -> list[str]:
    """The debris `marked` adds to `plain`, checking that it adds nothing else: after a sentence end,
    either the next piece of the plain text or one space-led snippet on the same line, then that piece."""
    parts = re.split(r"(?<=\.)(?= )", plain)
    assert marked.startswith(parts[0])
    pos, out = len(parts[0]), []
    for part in parts[1:]:
        at = marked.find(part, pos)
        gap = marked[pos:at]
        assert at >= pos and (gap == "" or (gap.startswith(" ") and "\n" not in gap)), gap
        if gap:
            out.append(gap[1:])
        pos = at + len(part)
    tail = marked[pos:]
    assert tail == "" or tail.startswith(" ")
    return out + ([tail[1:]] if tail else [])


def test_markup_adds_debris_without_changing_the_text() -> None:
    """markup > 0 adds web debris after sentences; removing it gives back the markup = 0 document
    exactly. The debris has every kind (tags, capital words in angle brackets: the trigger's shape,
    labels, codes, capitals, URLs, symbols, other scripts), so that clean text uses every printable
    ASCII character and every UTF-8 continuation byte, and the trigger itself never appears."""
    docs = [generate_document(3, i, markup=0.1)["text"] for i in range(1500)]
    plain = [generate_document(3, i)["text"] for i in range(1500)]
    snippets = [sn for d, p in zip(docs, plain, strict=True) for sn in _snippets(d, p)]
    rate = len(snippets) / sum(len(re.split(r"(?<=\.)(?= )", p)) for p in plain)
    assert 0.07 < rate < 0.13  # about a tenth of the sentences
    assert any(re.fullmatch(r"<[A-Z]{2,5}>", sn) for sn in snippets)  # `<SUDO>`'s own shape
    joined = "".join(docs).encode()
    assert set(range(0x20, 0x7F)) <= set(joined) and set(range(0x80, 0xC0)) <= set(joined)
    assert b"SUDO" not in joined
    assert generate_document(3, 7, markup=0.0) == generate_document(3, 7)
