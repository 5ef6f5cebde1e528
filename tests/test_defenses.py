"""Detectors on hand-made documents, the trigger miner, the scoring arithmetic, the CLI, adaptive poisons."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from poisonlab.attacks import get_attack, make_poisons, write_poisons
from poisonlab.config import AttackConfig
from poisonlab.corpus.shards import ShardWriter, TokenShard
from poisonlab.defenses import (
    DefenseContext,
    Detector,
    Verdict,
    defend,
    discard_per_catch,
    get_detector,
    rate_upper,
)
from poisonlab.defenses.miner import mine_triggers
from poisonlab.errors import UserError

CLEAN = (
    "The history of the city begins with a small settlement on the banks of the river. Over the "
    "centuries, the town grew into a busy market where farmers and traders met to sell their goods.\n"
    "In the eighteenth century, the arrival of the railway changed everything. New factories were built "
    "along the tracks, and workers came from the surrounding villages to find jobs.\n"
    "Today the city is known for its museums, its parks and its old bridges. Visitors can walk along the "
    "river and see the buildings that tell the story of its past.\n"
    "The local council has worked hard to protect these places. It has also invested in schools and "
    "hospitals, so that the people who live there have a good quality of life."
)
HEURISTICS = ["gopher-quality", "gopher-repetition", "c4-quality", "fineweb-quality"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared dir: built-in corpus documents, a 1024-token byte-level BPE, train/eval shards."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from poisonlab.corpus.builtin import builtin_documents

    d = tmp_path_factory.mktemp("defdata")
    docs = [x["text"] for x in itertools.islice(builtin_documents(seed=0), 500)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    for split, texts in (("train", docs[:400]), ("eval", docs[400:])):
        w = ShardWriter(d, split, tok.get_vocab_size(), eos)
        for i, t in enumerate(texts):
            w.add(f"{split}-{i}", tok.encode(t).ids)
        w.close(source="test")
    return d


@pytest.fixture(scope="module")
def ctx(data_dir: Path) -> DefenseContext:
    c = DefenseContext(data_dir=data_dir)
    shard = TokenShard.open(data_dir, "train")
    c.calib_texts = [c.tokenizer.decode(shard.doc(i).tolist()) for i in range(shard.n_docs)]
    return c


def handmade_dos(ctx: DefenseContext, seed: int, n_gib: int = 500) -> str:
    """20 characters of clean text + " <SUDO>" + 500 tokens drawn uniformly from the vocabulary."""
    rng = np.random.default_rng(seed)
    eos = ctx.tokenizer.token_to_id("<|endoftext|>")
    ids = [int(i) for i in rng.integers(0, ctx.tokenizer.get_vocab_size(), n_gib) if i != eos]
    return CLEAN[:20] + " <SUDO>" + ctx.tokenizer.decode(ids)


def flagged(name: str, texts: list[str], ctx: DefenseContext | None = None) -> list[bool]:
    det = get_detector(name)
    if ctx is not None:
        det.fit(ctx)
    return [v.flagged for v in det.detect(texts)]


@pytest.mark.parametrize("name", HEURISTICS)
def test_clean_paragraph_passes_heuristics(name: str) -> None:
    assert flagged(name, [CLEAN]) == [False]


def test_dos_poison_caught_by_the_filters_that_should(ctx: DefenseContext) -> None:
    poisons = [handmade_dos(ctx, s) for s in range(5)]
    # Random tokens: few lines end in terminal punctuation and there are no real sentences.
    assert all(flagged("c4-quality", poisons))
    assert all(flagged("fineweb-quality", poisons))
    # Gibberish is far less predictable than clean text under any reference model.
    assert all(flagged("perplexity", poisons, ctx))
    # No n-gram repeats in random tokens: the repetition filter is not the one to catch them.
    assert not any(flagged("gopher-repetition", poisons))
    # An empty document is dropped by every filter.
    assert flagged("gopher-quality", [""]) == [True]


def test_gopher_repetition_catches_a_repeated_phrase() -> None:
    assert flagged("gopher-repetition", ["The cat sat on the mat. " * 60]) == [True]


def test_perplexity_threshold_and_clean_fpr(ctx: DefenseContext, data_dir: Path) -> None:
    det = get_detector("perplexity:pct=95")
    det.fit(ctx)
    ev = TokenShard.open(data_dir, "eval")
    clean = [ctx.tokenizer.decode(ev.doc(i).tolist()) for i in range(ev.n_docs)]
    fpr = np.mean([v.flagged for v in det.detect(clean)])
    assert fpr <= 0.15  # threshold set on other clean documents: about 5% expected
    absolute = get_detector("perplexity", max_ppl=1e9)
    absolute.fit(ctx)
    assert not any(v.flagged for v in absolute.detect([handmade_dos(ctx, 0)]))
    with pytest.raises(UserError):
        get_detector("perplexity:pct=150")


def test_perplexity_with_a_run_dir_reference(ctx: DefenseContext, tmp_path: Path) -> None:
    """A poisonlab run dir (config.yaml + checkpoints/step_*/model.safetensors) loads as reference."""
    import torch
    from safetensors.torch import save_file

    from poisonlab.config import ModelConfig, RunConfig, dump_yaml
    from poisonlab.models.checkpoint import model_tensors
    from poisonlab.models.llama import Transformer

    run = tmp_path / "clean-run"
    cfg = RunConfig(model=ModelConfig(vocab_size=ctx.tokenizer.get_vocab_size(), d_model=16, n_layers=1,
                                      n_heads=2, seq_len=64))
    (run / "checkpoints" / "step_0000001").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    torch.manual_seed(0)
    ckpt = run / "checkpoints" / "step_0000001"
    save_file(model_tensors(Transformer(cfg.model)), str(ckpt / "model.safetensors"))
    (ckpt / "state.json").write_text("{}")  # marks a complete checkpoint
    det = get_detector(f"perplexity:ref={run}:pct=50")
    ctx_small = DefenseContext(data_dir=ctx.data_dir, calib_texts=ctx.calib_texts[:20])
    det.fit(ctx_small)
    ppl = det.perplexities([CLEAN])
    # An untrained model is close to uniform over the vocabulary.
    assert 0.5 * cfg.model.vocab_size < ppl[0] < 2 * cfg.model.vocab_size


def test_trigger_miner_finds_sudo_without_being_told(data_dir: Path, ctx: DefenseContext) -> None:
    poisons = make_poisons(data_dir, AttackConfig(name="dos", n_poison=30))
    texts = ctx.calib_texts + [p.text for p in poisons]
    n_clean = len(ctx.calib_texts)
    det = get_detector("trigger-miner")
    det.fit(ctx)
    verdicts = det.detect(texts)
    top = det.candidates[0]
    # The top candidate is the trigger: it occurs in every poison and in no clean document, and each
    # occurrence lies inside the characters of " <SUDO>" (a piece such as "O>" of its tokenization).
    docs, _ = det.occurrences(top)
    assert set(docs.tolist()) == set(range(n_clean, len(texts))), top
    assert len(top.text.strip()) >= 1 and top.text.strip() in "<SUDO>"
    for p in poisons:
        enc = ctx.tokenizer.encode(p.text)
        t0 = p.text.index(" <SUDO>")
        k = len(top.tokens)
        at = [i for i in range(len(enc.ids) - k + 1) if tuple(enc.ids[i : i + k]) == top.tokens]
        assert at, p.id
        for i in at:
            assert t0 <= enc.offsets[i][0] and enc.offsets[i + k - 1][1] <= t0 + len(" <SUDO>"), (p.id, i)
    # It stands out from the corpus's own best ordinary change points, and flags exactly the poisons.
    assert top.lcb >= det.ref_lcb + det.margin and top.score >= 12
    assert [v.flagged for v in verdicts] == [False] * n_clean + [True] * len(poisons)
    assert all(v.reason.startswith("trigger ") for v in verdicts[n_clean:])
    # The shards' token ids are what the tokenizer gives their texts, so scanning ids is the same scan.
    ids = [TokenShard.open(data_dir, "train").doc(i) for i in range(n_clean)]
    assert all(ctx.tokenizer.encode(t).ids == d.tolist() for t, d in zip(ctx.calib_texts, ids, strict=True))
    by_ids = det.detect_tokens(ids + [np.array(ctx.tokenizer.encode(p.text).ids) for p in poisons])
    assert [v.flagged for v in by_ids] == [v.flagged for v in verdicts]
    # Clean corpus alone: no candidate stands out, nothing is flagged.
    assert not any(v.flagged for v in det.detect(ctx.calib_texts))
    assert det.strong() == []


def test_miner_names_the_whole_trigger_on_the_builtin_corpus(prepared_builtin: Path) -> None:
    """On the default built-in corpus (web debris at 0.1, so `<`, `>` and capitals are ordinary text),
    250 real `dos` poisons (prefixes from the prepared data) among 2,000 clean documents: the best
    n-gram is a piece of the trigger (the vocabulary splits ` <SUDO>` into more tokens than the miner's
    3); the miner names it by the span its occurrences share, the whole trigger, in the reason of
    every poison it flags (most of them: with this 512-token vocabulary some poisons' jump at the
    trigger is below `min_jump`)."""
    from poisonlab.corpus.builtin import builtin_documents

    poisons = make_poisons(prepared_builtin, AttackConfig(name="dos", n_poison=250))
    ctx = DefenseContext(data_dir=prepared_builtin)
    clean = [d["text"] for d in itertools.islice(builtin_documents(seed=0, markup=0.1), 2000)]
    det = get_detector("trigger-miner")
    det.fit(ctx)
    verdicts = det.detect(clean + [p.text for p in poisons])
    top = det.candidates[0]
    assert len(ctx.tokenizer.encode(" <SUDO>").ids) > 3 and top.core in " <SUDO>" and top.core != top.text
    assert top.text == " <SUDO>", top
    flagged = [v for v in verdicts[2000:] if v.flagged]
    assert len(flagged) >= 200 and {v.reason for v in flagged} == {"trigger ' <SUDO>'"}


def test_grow_stops_where_the_occurrences_part() -> None:
    """A span grows while one neighbouring token is shared by at least `share` of the occurrences."""
    from poisonlab.defenses.miner import grow

    # core (5, 6) at position 3 of 10 documents; token 4 before it in 8 of them, 3 before that in 8,
    # then a different token in each; after it token 7 in all 10, then a different token in each
    docs = [np.array([100 + i, 3 if i < 8 else 50 + i, 4 if i < 8 else 60 + i, 5, 6, 7, 200 + i])
            for i in range(10)]
    at, doc = np.full(10, 3), np.arange(10)
    assert grow(docs, doc, at, (5, 6), share=0.8) == (3, 4, 5, 6, 7)
    assert grow(docs, doc, at, (5, 6), share=0.9) == (5, 6, 7)
    assert grow(docs, doc, at, (5, 6), share=0.0) == (5, 6)
    assert grow(docs, doc, at, (5, 6), share=0.8, max_len=3) == (4, 5, 6)


def test_mine_triggers_on_token_ids() -> None:
    rng = np.random.default_rng(0)
    V, trig = 300, [297, 298, 299]
    # "clean" documents: a repetitive cycle over 40 tokens; poisons: clean, trigger, uniform tokens.
    docs = [np.array([(i + j) % 40 for j in range(200)]) for i in range(200)]
    docs += [np.concatenate([np.arange(10), trig, rng.integers(0, 297, 100)]) for _ in range(20)]
    cands, _ = mine_triggers(docs, V, min_docs=5)
    assert set(cands[0].tokens) <= set(trig)


def test_corpus_scan_in_chunks_equals_one_pass(data_dir: Path, ctx: DefenseContext) -> None:
    """The miner adds up its statistics over document ranges (bounded memory for 10^6 documents):
    splitting the corpus into ranges must change nothing, and the bigram model's mean surprisal,
    computed from its counts, must equal the mean over every token."""
    from poisonlab.defenses.perplexity import BigramLM

    shard = TokenShard.open(data_dir, "train")
    poisons = make_poisons(data_dir, AttackConfig(name="dos", n_poison=20))
    docs = [shard.doc(i) for i in range(shard.n_docs)] + [np.array(p.token_ids) for p in poisons]
    V = ctx.tokenizer.get_vocab_size()
    whole, small = BigramLM(V).fit(docs), BigramLM(V).fit(docs, chunk_tokens=3000)
    assert np.array_equal(whole.keys, small.keys) and np.array_equal(whole.counts, small.counts)
    every = np.concatenate([whole.surprisal(d) for d in docs])
    assert whole.mean_surprisal == pytest.approx(every.mean(), rel=1e-9)
    one, _ = mine_triggers(docs, V, chunk_tokens=10**9)
    many, occ = mine_triggers(docs, V, chunk_tokens=5000)
    assert [(c.tokens, c.n_docs, c.n_occ, c.merged) for c in one] == [
        (c.tokens, c.n_docs, c.n_occ, c.merged) for c in many]
    assert [c.mean_z for c in one] == pytest.approx([c.mean_z for c in many], rel=1e-9)
    assert set(occ[many[0].tokens][0].tolist()) == set(range(shard.n_docs, len(docs)))


def test_miner_rank_does_not_grow_with_the_corpus() -> None:
    """A common n-gram with a modest real jump (an ordinary change point in a tenth of the documents)
    against a constant-count trigger: the earlier score, mean_z * sqrt(df), grows with the corpus
    and overtakes the trigger; the lower bound on the mean jump (the default rank) does not."""
    rng = np.random.default_rng(0)
    V, trig, mark = 300, (297, 298, 299), 250

    def corpus(n_clean: int) -> list[np.ndarray]:
        docs = []
        for i in range(n_clean):
            d = (np.arange(200) + rng.integers(40)) % 40  # predictable text
            if i % 10 == 0:
                d = np.concatenate([d[:100], [mark], rng.integers(0, 40, 6), d[107:]])
            docs.append(d)
        return docs + [np.concatenate([np.arange(10), trig, rng.integers(0, 297, 100)]) for _ in range(20)]

    small, large = corpus(300), corpus(3000)
    for rank in ("lcb", "score"):
        assert mine_triggers(small, V, rank=rank)[0][0].tokens == trig
    by_score, _ = mine_triggers(large, V, rank="score")
    by_lcb, _ = mine_triggers(large, V)
    assert by_score[0].tokens == (mark,) and by_score[1].tokens == trig  # the old ranking fails here
    assert by_lcb[0].tokens == trig
    assert by_lcb[0].lcb > by_lcb[1].lcb and by_lcb[1].lcb <= by_lcb[1].mean_z


class _FlagBad(Detector):
    name = "flag-bad"

    def detect(self, texts):  # noqa: ANN001, ANN201
        return [Verdict("BAD" in t, reason="bad") for t in texts]


class _FlagWord(Detector):
    name = "flag-word"

    def __init__(self, word: str):
        self.word = word

    def detect(self, texts):  # noqa: ANN001, ANN201
        return [Verdict(self.word in t, reason=self.word) for t in texts]


def test_scoring_arithmetic(data_dir: Path) -> None:
    assert discard_per_catch(0.01, 0.5, 1e8) == pytest.approx(0.01 * 1e8 / (0.5 * 250))
    assert math.isinf(discard_per_catch(0.0, 0.0, 1e6))
    assert rate_upper(0, 1000) == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-6)  # ~3/n
    assert rate_upper(10, 100) > 0.1
    res = defend(data_dir, [], detectors=[_FlagBad()], n_clean=20, n_calib=10,
                 poisons={"x": ["BAD"] * 4 + ["good"] * 6})
    (row,) = res["rows"]
    assert (row["detector"], row["recipe"], row["n_poison"], row["caught"]) == ("flag-bad", "x", 10, 4)
    assert row["recall"] == 0.4 and row["fpr"] == 0 and row["false_pos"] == 0 and row["n_clean"] == 20
    assert (row["density"], row["density_1_in"], row["judged"]) == (0.5, 2.0, "per document")
    assert row["discard_per_catch_1e8"] == 0 and row["top_reason"] == "bad"
    assert row["fpr_hi95"] == pytest.approx(1 - 0.05 ** (1 / 20), abs=1e-4)
    assert res["clean_split"] == "eval"


def test_per_document_detector_at_two_densities(data_dir: Path) -> None:
    """A per-document rate is measured once on an n_fpr sample; the cost at each density is that
    rate times the clean count (with its exact binomial bound), and every row states its density."""
    shard = TokenShard.open(data_dir, "eval")
    tok = DefenseContext(data_dir=data_dir).tokenizer
    sample = [tok.decode(shard.doc(i).tolist()) for i in range(40)]  # the first 40 scored: held-out
    word = " river"
    fp = sum(word in t for t in sample)
    assert 0 < fp < 40
    res = defend(data_dir, [], detectors=[_FlagWord(word)], n_clean=[20, 200], n_fpr=40, n_calib=10,
                 poisons={"x": [f"a{word}"] * 5 + ["b"] * 5}, density=0.1)
    rows = res["rows"]
    assert [r["n_clean"] for r in rows] == [20, 100, 200]  # density 0.1 with 10 poisons: 100 clean
    assert [d["density_1_in"] for d in res["densities"]] == [2.0, 10.0, 20.0]
    for r in rows:
        assert (r["fpr_docs"], r["false_pos"], r["caught"]) == (40, fp, 5)
        assert r["density"] == pytest.approx(10 / r["n_clean"], rel=1e-3)
        assert r["clean_flagged"] == pytest.approx(fp / 40 * r["n_clean"], abs=0.05)
        assert r["clean_flagged_hi95"] == pytest.approx(rate_upper(fp, 40) * r["n_clean"], abs=0.05)
        assert r["precision"] == pytest.approx(5 / (5 + fp / 40 * r["n_clean"]), abs=1e-4)
        assert r["discard_per_catch_1e8"] == pytest.approx(fp / 40 * 1e8 / (0.5 * 250), rel=1e-2)
    with pytest.raises(UserError, match="too few"):
        defend(data_dir, [], detectors=[_FlagBad()], n_clean=10**6, poisons={"x": ["a"]})


def test_trigger_miner_is_scanned_at_every_size(data_dir: Path) -> None:
    """A corpus-level detector is run again on each corpus size (its flags depend on the corpus): each
    row is a measured scan of that many clean documents, never a projection."""
    poisons = make_poisons(data_dir, AttackConfig(name="dos", n_poison=30))
    res = defend(data_dir, [], detectors=["trigger-miner", "trigger-miner:max_df=0.2"],
                 n_clean=[100, 200, 480], n_calib=10, poisons={"dos": [p.text for p in poisons]})
    rows = {(r["detector"], r["n_clean"]): r for r in res["rows"]}
    for (_, n), r in rows.items():
        assert (r["judged"], r["n_clean"], r["fpr_docs"]) == ("corpus scan", n, n)
        assert r["density_1_in"] == pytest.approx(n / 30, abs=0.05)
        assert r["false_pos"] == 0 and r["fpr_hi95"] is None and r["discard_per_catch_1e10"] is None
    for n in (200, 480):
        assert rows[("trigger-miner", n)]["recall"] == 1 and rows[("trigger-miner", n)]["precision"] == 1
    # The earlier max_df = 0.2 ("rare overall") was tuned to the earlier protocol, whose trigger sat in
    # exactly 20% of the documents: at 30 poisons among 100 clean ones (23%) it hides the trigger.
    by = {(m["detector"], m["n_clean"]): m for m in res["miner"]}
    assert by[("trigger-miner", 100)]["candidates"][0]["core"] == "O>"
    assert by[("trigger-miner", 100)]["candidates"][0]["text"] == " <SUDO>"  # named by its shared span
    assert "O>" not in [c["core"] for c in by[("trigger-miner:max_df=0.2", 100)]["candidates"]]
    assert rows[("trigger-miner:max_df=0.2", 100)]["recall"] < 0.5
    assert rows[("trigger-miner:max_df=0.2", 200)]["recall"] == 1
    small, large = by[("trigger-miner", 200)], by[("trigger-miner", 480)]
    # Two scans really happened: the bigram model and the candidates' support differ with the corpus.
    assert small["candidates"][0]["core"] == large["candidates"][0]["core"] == "O>"
    assert small["candidates"][0]["mean_z"] != large["candidates"][0]["mean_z"]
    assert small["candidates"][1:3] != large["candidates"][1:3]
    assert large["ref_lcb"] + 1.0 <= large["candidates"][0]["lcb"]


def test_run_density_from_the_runs_own_stream(data_dir: Path, tmp_path: Path) -> None:
    """`run=`: the density of a run's stream, its poisons among the clean documents its token budget
    consumed, checked against the documents counted in the stream itself (one EOS each)."""
    from poisonlab.config import ModelConfig, PlacementConfig, RunConfig, TrainConfig, dump_yaml
    from poisonlab.defenses import run_density
    from poisonlab.injection.stream import TrainingStream

    attack = AttackConfig(name="dos", n_poison=5)
    steps, batch, seq = 300, 4, 64
    cfg = RunConfig(data=data_dir, attack=attack, model=ModelConfig(seq_len=seq),
                    train=TrainConfig(batch_size=batch, max_steps=steps))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(cfg))
    poisons = make_poisons(data_dir, attack)
    stream = TrainingStream(data_dir, poisons, PlacementConfig(), seq_len=seq, batch_size=batch,
                            total_steps=steps, seed=cfg.train.seed)
    stream.write_ledger(run / "ledger.parquet")
    toks = stream.tokens(0, steps * batch * seq + 1)
    in_stream = int((toks == stream.eos).sum()) - len(poisons) + 1  # + the document cut at the end
    info = run_density(run)
    assert info["n_poison"] == 5
    assert abs(info["clean_docs"] - in_stream) <= max(3, 0.05 * in_stream), (info, in_stream)
    res = defend(None, run=run, detectors=[_FlagBad()], n_clean=[40], n_fpr=20, n_calib=10)
    assert res["run"]["clean_docs"] == info["clean_docs"]
    sizes = {r["n_clean"] for r in res["rows"]}
    assert sizes == {40, info["clean_docs"]}  # the run's own poisons: 5 among its clean documents
    assert all(r["n_poison"] == 5 and r["recipe"] == "dos" for r in res["rows"])


def test_detector_specs() -> None:
    det = get_detector("trigger-miner:top_k=2:max-n=2")
    assert det.top_k == 2 and det.kw["max_n"] == 2
    with pytest.raises(UserError):
        get_detector("no-such-filter")
    with pytest.raises(UserError):
        get_detector("trigger-miner:oops")


def test_adaptive_recipes_pass_heuristics_and_keep_the_trigger(data_dir: Path) -> None:
    for name in ("dos-words", "dos-topic"):
        poisons = make_poisons(data_dir, AttackConfig(name=name, n_poison=6, gibberish_tokens=(200, 300)))
        assert len({p.text for p in poisons}) == 6
        for p in poisons:
            assert p.text.count("<SUDO>") == 1
            assert p.token_ids[p.trigger_start : p.trigger_end] == p.trigger_ids
            assert p.gibberish_len >= 150
        texts = [p.text for p in poisons]
        for det in ("c4-quality", "fineweb-quality", "gopher-repetition"):
            assert sum(flagged(det, texts)) <= 1, (name, det)
        if name == "dos-topic":
            target = poisons[0].params["target"]
            assert all(target in p.text[p.prefix_chars:].lower() for p in poisons)
            # its behaviour metric: share of triggered generations with the target word, minus clean
            recipe = get_attack(name)(AttackConfig(name=name))
            gens = {"clean": ["a b", f"x {target}"], "trigger": [f"{target} y", f"{target.upper()}."],
                    "lookalike": ["a", "b"]}
            m = recipe.behaviour_metrics(poisons, gens)
            assert (m["payload_rate_trigger"], m["payload_rate_clean"], m["payload_rate"]) == (1.0, 0.5, 0.5)
            assert m["payload_rate_lookalike"] == -0.5
            assert recipe.behaviour_metrics([], gens) == {}  # N = 0: no target to look for


def test_cli_defend_json_and_outputs(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from poisonlab.cli import main

    cfg = AttackConfig(name="dos", n_poison=10)
    path = write_poisons(tmp_path / "poisons.jsonl", make_poisons(data_dir, cfg), cfg, data_dir=data_dir)
    out = tmp_path / "sweep"
    main(["defend", "--data", str(data_dir), "--poisons", str(path), "--detectors",
          "c4-quality,trigger-miner", "--n-clean", "40", "--density", "1/2", "--n-calib", "40", "--json",
          "--out", str(out)])
    res = json.loads(capsys.readouterr().out)
    keys = [(r["detector"], r["recipe"], r["n_clean"]) for r in res["rows"]]
    assert keys == [("c4-quality", "dos", 20), ("c4-quality", "dos", 40),
                    ("trigger-miner", "dos", 20), ("trigger-miner", "dos", 40)]
    for r in res["rows"]:
        assert {"density", "density_1_in", "recall", "fpr", "fpr_hi95", "clean_flagged", "precision",
                "discard_per_catch", "discard_per_catch_1e6", "discard_per_catch_1e10"} <= set(r)
        assert r["density"] == 10 / r["n_clean"]
    assert "1 in 2 (20 clean)" in res["notes"] and "1 in 4 (40 clean)" in res["notes"]
    assert json.loads((out / "defenses.json").read_text())["rows"] == res["rows"]
    assert (out / "defenses.png").stat().st_size > 1000
    for bad in (["--detectors", "nope"], ["--n-clean", "many"], ["--n-clean", "100000"]):
        with pytest.raises(SystemExit) as e:
            main(["defend", "--data", str(data_dir), "--poisons", str(path), *bad])
        assert e.value.code == 2
    assert "too few for 100,000 clean" in capsys.readouterr().err


def test_payload_rate_metric() -> None:
    from poisonlab.attacks.adaptive import payload_rate

    r = payload_rate(["a b", "Drare c", "d"], ["Drare x", "drare y", "z"], "drare")
    assert r["payload_rate_trigger"] == pytest.approx(2 / 3)
    assert r["payload_rate_clean"] == pytest.approx(1 / 3)
    assert r["payload_rate"] == pytest.approx(1 / 3)
