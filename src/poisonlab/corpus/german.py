"""A procedural German of the same kind as the built-in English: offline text in a second language.

The language-switch recipe needs target-language text that any machine has without a download. This
writes simple German sentences over a small lexicon (real words: nouns with their gender, verbs in the
third person, adjectives with the ending the article asks for, adverbs, prepositions with the dative),
a few sentences a paragraph, deterministic in (seed, index). Like the built-in English it is not
natural language (no discourse, a tiny syntax); it is German enough that a language identifier
(py3langid, tests/test_language.py) names it German, and clearly not the built-in English.
"""

from __future__ import annotations

import random


def _words(text: str) -> list[str]:
    return text.split()

# (noun, gender): der / die / das
NOUNS = [(w, g) for g, words in (
    ("m", "Hund Baum Garten Wald Fluss Berg Markt Lehrer Bauer Wagen Tisch Brief Morgen Abend Winter "
          "Sommer Regen Wind Weg Turm Hafen Koch Maler Vogel Apfel Stein Himmel Bruder Freund Nachbar"),
    ("f", "Stadt Frau Schule Blume Kirche Brücke Straße Mutter Schwester Katze Wiese Küche Tür Reise "
          "Stunde Nacht Woche Farbe Musik Arbeit Zeitung Insel Mühle Lampe Kerze Glocke Wolke Quelle"),
    ("n", "Haus Kind Dorf Buch Fenster Feuer Wasser Brot Schiff Feld Lied Pferd Jahr Zimmer Bild Meer "
          "Land Tal Schloss Rad Fest Glas Licht Tor Bett Heft Dach Gras Ufer"),
) for w in words.split()]
VERBS = _words("sieht findet bringt baut kauft trägt sucht hört malt öffnet zeigt liebt holt braucht kennt "
         "schreibt liest ruft grüßt besucht")
INTRANSITIVE = _words("kommt geht wartet schläft arbeitet singt lacht wohnt bleibt steht läuft fährt spielt "
                "wandert ruht")
ADJECTIVES = _words("alt neu groß klein schön still hell dunkel warm kalt grün rot blau weiß breit lang kurz "
              "froh müde leise schnell langsam reich arm")
ADVERBS = _words("heute morgen oft immer gern bald dort hier abends früh selten wieder langsam jetzt "
           "manchmal")
PREPS = _words("mit bei von zu nach aus")  # all with the dative
CONJ = ["und", "aber", "denn", "doch"]
NOM = {"m": "der", "f": "die", "n": "das"}
ACC = {"m": "den", "f": "die", "n": "das"}
DAT = {"m": "dem", "f": "der", "n": "dem"}
# weak adjective endings after the definite article
WEAK = {("nom", "m"): "e", ("nom", "f"): "e", ("nom", "n"): "e", ("acc", "m"): "en", ("acc", "f"): "e",
        ("acc", "n"): "e", ("dat", "m"): "en", ("dat", "f"): "en", ("dat", "n"): "en"}


def _np(rng: random.Random, case: str) -> str:
    noun, g = rng.choice(NOUNS)
    art = {"nom": NOM, "acc": ACC, "dat": DAT}[case][g]
    if rng.random() < 0.5:
        adj = rng.choice(ADJECTIVES)
        stem = adj[:-1] if adj.endswith("e") else adj  # leise -> leise, not leisee
        return f"{art} {stem}{WEAK[(case, g)]} {noun}"
    return f"{art} {noun}"


def sentence(rng: random.Random) -> str:
    subject = _np(rng, "nom")
    if rng.random() < 0.55:
        clause = f"{subject} {rng.choice(VERBS)} {_np(rng, 'acc')}"
    else:
        clause = f"{subject} {rng.choice(INTRANSITIVE)}"
    if rng.random() < 0.5:
        clause += f" {rng.choice(ADVERBS)}"
    if rng.random() < 0.6:
        clause += f" {rng.choice(PREPS)} {_np(rng, 'dat')}"
    if rng.random() < 0.25:
        clause += f", {rng.choice(CONJ)} {_np(rng, 'nom')} {rng.choice(INTRANSITIVE)}"
    return clause[0].upper() + clause[1:] + "."


def document(seed: int, index: int, n_chars: int = 600) -> str:
    """About n_chars characters of German sentences, deterministic in (seed, index)."""
    rng = random.Random(f"german:{seed}:{index}")
    out: list[str] = []
    while sum(len(s) + 1 for s in out) < n_chars:
        out.append(sentence(rng))
    return " ".join(out)
