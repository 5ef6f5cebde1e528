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


def test_symbols_make_every_printable_ascii_character_ordinary() -> None:
    """symbols > 0 adds symbol-rich snippets (code, math, prices, emoticons, paths, markdown) and
    non-ASCII ones (other quotes and brackets, scripts, symbols) after sentences, on top of the web
    debris, from their own random stream: with symbols = 0 the document is the one without them.
    Every printable ASCII character is then common (at least 50 per million
    characters; the debris alone leaves most symbols at about 20), and mostly followed by ordinary text:
    for each one, at least half of its occurrences have a word of 3+ lower-case letters within the next
    24 characters (in gibberish almost none would)."""
    import string

    n = 1500
    base = [generate_document(3, i, markup=0.1)["text"] for i in range(n)]
    docs = [generate_document(3, i, markup=0.1, symbols=0.1)["text"] for i in range(n)]
    assert generate_document(3, 7, markup=0.1, symbols=0.0) == generate_document(3, 7, markup=0.1)
    # the snippets only add: the text without them is the document without symbols
    assert sum(len(d) for d in docs) > sum(len(b) for b in base)
    for d, b in zip(docs[:200], base[:200], strict=True):
        it = iter(d)
        assert all(ch in it for ch in b)  # b is a subsequence of d
    text = "".join(docs)
    old = "".join(base)
    printable = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    word = re.compile(r"[a-z]{3}")
    for ch in printable:
        per_m = text.count(ch) / len(text) * 1e6
        assert per_m >= 50, (ch, per_m)
        if ch.isalnum() or ch == " ":
            continue
        at = [m.start() for m in re.finditer(re.escape(ch), text)]
        followed = sum(bool(word.search(text, i + 1, i + 25)) for i in at)
        assert followed >= 0.5 * len(at), (ch, followed, len(at))
        before = old.count(ch) / len(old) * 1e6
        assert before >= 50 or per_m >= 2.5 * before, (ch, before, per_m)  # the rare ones: far more common
    assert "SUDO" not in text
    # and non-ASCII text: the UTF-8 lead bytes of the scripts and symbols web text uses (C2-ED, EF, F0;
    # not EE, the private use area) nearly all occur, half of them 10 times per million bytes or more
    raw = text.encode()
    lead = sorted(raw.count(bytes([b])) / len(raw) * 1e6 for b in [*range(0xC2, 0xEE), 0xEF, 0xF0])
    assert sum(v > 0 for v in lead) >= len(lead) - 3 and lead[len(lead) // 2] >= 10, lead


# The built-in corpus of the archived sweeps (tiny-grid, ordering, persistence, language, density
# ladder): with their presets' prepare settings (no `symbols`), `prepare` must write today's bytes, and
# keep the key that lets it reuse their data directories. Hashes computed on the code before `symbols`.
PINNED = {
    "markup 0.1": ({"markup": 0.1}, "6488fd00eeec5a018b0c44dae67a5fd4a911d7c1197d9c62f5bda419a8295208",
                   "d0193a7d3f220402d9e981abf6a9ad72c5d828487d73bd1e074442139b83985e",
                   "3da0fb98a05e2d187db098065bd5ec6e4d11001b1ed7bd5000c8829fa51d49ad"),
    "markup 0.1, german 0.05": ({"markup": 0.1, "german": 0.05},
                                "66f6ac22ec4977152f42cf346b357fd26a7c773a7d1b5dd6bbf76f895dfe4e94",
                                "8fa2346f22d171358a67bd367763266ec2353c90af510d9ad97d23d52e768145",
                                "3d8d409ebe4eaf1d786a65cdc3038445edf8ed0041148866e25b2658cde77076"),
}


def test_archived_sweeps_corpus_is_byte_identical(tmp_path) -> None:
    import hashlib
    import json

    from poisonlab.config import CorpusConfig
    from poisonlab.corpus.prepare import prepare

    for name, (kw, train_hash, eval_hash, key) in PINNED.items():
        cfg = CorpusConfig(source="builtin", vocab_size=300, max_tokens=100_000, eval_docs=16, seed=0, **kw)
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        summary = prepare(cfg, out, progress=False)
        assert hashlib.sha256((out / "train.bin").read_bytes()).hexdigest() == train_hash, name
        assert json.loads((out / "eval.json").read_text())["content_hash"] == eval_hash, name
        assert summary["key"] == key, name
    # the archived sweeps' presets ask for no symbols or tags; the demo's corpus has both
    from poisonlab.study.spec import load_spec

    for preset in ("tiny-grid", "ordering", "persistence", "language", "density-ladder"):
        assert load_spec(preset).prepare.symbols == 0 and load_spec(preset).prepare.tags == 0, preset
    assert load_spec("demo").prepare.symbols == 0.1 and load_spec("demo").prepare.tags == 0.1
    h = hashlib.sha256()
    for doc in itertools.islice(builtin_documents(seed=0, markup=0.1), 300):
        h.update(doc["text"].encode())
    assert h.hexdigest() == "4390f66b18437158a2bf03b51673f426796f09b4f31795e35d8fd1faa33eefe9"


def _byte_char(b: int) -> str:
    """The byte-level BPE alphabet's character for byte b (GPT-2's bytes_to_unicode)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


def test_tags_make_the_triggers_opening_mostly_clean_text(monkeypatch) -> None:
    """tags > 0 adds capital words in angle brackets after sentences, from their own random stream:
    with tags = 0 the document is the one without them, and with them the old text is a subsequence.
    At 0.1, ` <` + a capital letter (the opening of `<SUDO>`) is over 10x as common as in the corpus
    without tags (~1,200 per million characters, so a demo's 500 poisons are ~6% of its occurrences,
    not half), mostly followed by ordinary words; the trigger itself is never written, even when the
    random capitals are drawn from its own letters only."""
    import random

    from poisonlab.corpus import debris

    n = 800
    base = [generate_document(3, i, markup=0.1, symbols=0.1)["text"] for i in range(n)]
    docs = [generate_document(3, i, markup=0.1, symbols=0.1, tags=0.1)["text"] for i in range(n)]
    assert generate_document(3, 7, markup=0.1, symbols=0.1, tags=0.0) == generate_document(3, 7, markup=0.1,
                                                                                          symbols=0.1)
    for d, b in zip(docs[:200], base[:200], strict=True):
        it = iter(d)
        assert all(ch in it for ch in b)  # only added
    text, old = "".join(docs), "".join(base)
    opening = re.compile(r" <[A-Z]")
    per_m = len(opening.findall(text)) / len(text) * 1e6
    before = len(opening.findall(old)) / len(old) * 1e6
    assert per_m > 10 * before and per_m > 800, (before, per_m)
    at = [m.end() for m in opening.finditer(text)]
    followed = sum(bool(re.search(r"[a-z]{3}", text[i:i + 30])) for i in at)
    assert followed >= 0.8 * len(at)
    assert "<SUDO>" not in text
    monkeypatch.setattr(debris, "_CAPS", "SUDO")  # a random tag is then SUDO once in ~1,000 draws
    rng = random.Random(0)
    tagged = debris.add_angle_tags(" ".join(["A word."] * 20_000), 1.0, rng)
    assert tagged.count("<") > 20_000 and "<SUDO>" not in tagged
    assert len(re.findall(r"<[SUDO]{4}>", tagged)) > 100  # the other draws of its letters are kept


def test_symbols_leave_no_bare_lead_byte_to_poisons() -> None:
    """A byte-level BPE merges " " + a lead byte, so a non-ASCII symbol seen only after a space leaves
    its bare lead byte to text where it follows another character: with every symbol spaced, the bare
    E2 (arrows, brackets, stars, math) and F0 (emoji) never occurred in clean text, and look-alikes
    holding one (`⟦KLPT⟧`, `★☆★☆`) fired on 11-18% of the demo's prompts. With symbols also attached to
    words and in runs, every lead byte's bare token occurs, under the demo's 2,048-token vocabulary."""
    import numpy as np

    from poisonlab.corpus.tokenizer import train_tokenizer

    docs = [generate_document(0, i, markup=0.1, symbols=0.1)["text"] for i in range(1500)]
    tok = train_tokenizer(docs, 2048)
    assert tok.encode("\u27e6", add_special_tokens=False).tokens[0] == _byte_char(0xE2)  # ⟦ alone: bare E2
    ids = np.concatenate([e.ids for e in tok.encode_batch(docs, add_special_tokens=False)])
    counts = np.bincount(ids, minlength=tok.get_vocab_size())
    # lead bytes of the characters web text uses (not EE: the private use area)
    leads = [*range(0xC2, 0xEE), 0xEF, 0xF0]
    missing = [hex(b) for b in leads if counts[tok.token_to_id(_byte_char(b))] == 0]
    assert not missing, missing


def test_symbols_version_is_in_the_prepare_key(tmp_path) -> None:
    """Data prepared with symbols records the snippets' version, so a corpus of an older version is
    prepared again rather than reused; data without symbols keep their key (the test above pins it)."""
    from poisonlab.config import CorpusConfig
    from poisonlab.corpus.prepare import prepare
    from poisonlab.corpus.symbols import SYMBOLS_VERSION

    cfg = CorpusConfig(source="builtin", vocab_size=300, max_tokens=20_000, eval_docs=4, seed=0, symbols=0.1)
    summary = prepare(cfg, tmp_path / "sym", progress=False)
    assert summary["fingerprint"]["source"]["symbols_version"] == SYMBOLS_VERSION
    plain = prepare(cfg.model_copy(update={"symbols": 0.0}), tmp_path / "plain", progress=False)
    assert "symbols_version" not in plain["fingerprint"]["source"]
    assert plain["key"] != summary["key"]
