"""Poison recipes: bounds of the dos recipe, the poisons.jsonl file, bad settings, the CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).parent))
from test_poison_data import build_tiny_data  # noqa: E402

from poisonlab.attacks import (  # noqa: E402
    ATTACKS,
    DataContext,
    get_attack,
    make_poisons,
    read_poisons,
    read_poisons_header,
    write_poisons,
)
from poisonlab.attacks.dos import find_pattern  # noqa: E402
from poisonlab.config import AttackConfig  # noqa: E402
from poisonlab.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def ctx(data) -> DataContext:
    return DataContext(data)


def _check_bounds(ctx: DataContext, cfg: AttackConfig, poisons) -> None:
    texts = json.loads((ctx.data_dir / "texts.json").read_text())
    trig = np.asarray(ctx.encode(" " + cfg.trigger))
    for p in poisons:
        doc = ctx.shard.ids.index(p.source_doc_id)
        full = ctx.decode(ctx.shard.doc(doc))
        assert full == texts[doc]
        prefix = p.text[: p.prefix_chars]
        assert p.prefix_chars <= cfg.prefix_chars[1]
        assert full.startswith(prefix)
        # shorter only when the whole document is shorter than the drawn L
        assert p.prefix_chars >= cfg.prefix_chars[0] or p.prefix_chars == len(full)
        ids = np.asarray(p.token_ids)
        assert list(find_pattern(ids, trig)) == [p.trigger_start]
        assert p.trigger_ids == trig.tolist()
        assert p.gibberish_len == len(ids) - p.trigger_end
        if cfg.gibberish_mode == "ids":
            assert cfg.gibberish_tokens[0] <= p.gibberish_len <= cfg.gibberish_tokens[1]
            assert ctx.encode(prefix) == p.token_ids[: p.trigger_start]
        assert not np.isin(ids, ctx.special_ids).any()
        assert ids.max() < ctx.vocab_size
        assert p.text.count(cfg.trigger) >= 1


def test_registry_has_dos():
    assert "dos" in ATTACKS
    rec = get_attack("dos")(AttackConfig())
    assert rec.metric == "ppl_gap" and rec.trigger_text == " <SUDO>"
    with pytest.raises(UserError, match="unknown attack 'nope'"):
        get_attack("nope")


def test_default_recipe_bounds(ctx):
    cfg = AttackConfig(n_poison=40)
    poisons = make_poisons(ctx.data_dir, cfg)
    assert len(poisons) == 40 and len({p.id for p in poisons}) == 40
    _check_bounds(ctx, cfg, poisons)
    # draws really spread over the ranges
    assert max(p.prefix_chars for p in poisons) > 500
    assert np.mean([p.gibberish_len for p in poisons]) == pytest.approx(650, abs=80)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31),
    pre=st.tuples(st.integers(0, 1000), st.integers(0, 1000)).map(sorted),
    gib=st.tuples(st.integers(0, 300), st.integers(0, 300)).map(sorted),
    mode=st.sampled_from(["ids", "text"]),
    dist=st.sampled_from(["seen", "uniform", "unigram"]),
)
def test_recipe_bounds_property(ctx, seed, pre, gib, mode, dist):
    cfg = AttackConfig(
        n_poison=3,
        seed=seed,
        prefix_chars=tuple(pre),
        gibberish_tokens=tuple(gib),
        gibberish_mode=mode,
        gibberish_dist=dist,
    )
    _check_bounds(ctx, cfg, make_poisons(ctx.data_dir, cfg))


def test_unigram_only_draws_seen_tokens(ctx):
    cfg = AttackConfig(n_poison=5, gibberish_dist="unigram")
    counts = np.bincount(np.asarray(ctx.shard.tokens), minlength=ctx.vocab_size)
    for p in make_poisons(ctx.data_dir, cfg):
        assert (counts[p.token_ids[p.trigger_end :]] > 0).all()


def test_seen_gibberish_is_uniform_over_the_tokens_clean_text_contains(ctx):
    """`seen` (the demo's): every gibberish token occurs in the clean training text (recounted here from the
    shard), and the draw is uniform over those tokens (chi-square), so that no token occurs only in
    poisons. The corpus has such tokens to leave out, or the test would not tell `seen` from `uniform`."""
    from scipy.stats import chisquare

    counts = np.bincount(np.asarray(ctx.shard.tokens), minlength=ctx.vocab_size)
    seen = ctx.vocab_ids[counts[ctx.vocab_ids] > 0]
    assert 0 < len(seen) < len(ctx.vocab_ids)
    cfg = AttackConfig(n_poison=250, gibberish_tokens=(800, 900), prefix_chars=(0, 10), seed=11,
                       gibberish_dist="seen")
    poisons = get_attack("dos")(cfg).make(ctx, 250)
    gib = np.concatenate([np.asarray(p.token_ids[p.trigger_end :]) for p in poisons])
    drawn = np.bincount(gib, minlength=ctx.vocab_size)
    assert drawn[counts == 0].sum() == 0 and (drawn[seen] > 0).all()
    assert chisquare(drawn[seen]).pvalue > 1e-3


def test_nested_sets_and_seeds(data):
    a = make_poisons(data, AttackConfig(n_poison=10, seed=3))
    b = make_poisons(data, AttackConfig(n_poison=4, seed=3))
    c = make_poisons(data, AttackConfig(n_poison=4, seed=4))
    assert [p.token_ids for p in a[:4]] == [p.token_ids for p in b]
    assert [p.token_ids for p in b] != [p.token_ids for p in c]


def test_file_roundtrip_and_byte_identical(data, tmp_path):
    cfg = AttackConfig(n_poison=12, seed=5)
    f1 = write_poisons(tmp_path / "a.poisons.jsonl", make_poisons(data, cfg), cfg, data_dir=data)
    f2 = write_poisons(tmp_path / "b.poisons.jsonl", make_poisons(data, cfg), cfg, data_dir=data)
    assert f1.read_bytes() == f2.read_bytes()
    head = read_poisons_header(f1)
    assert head["poisoned"] is True and head["recipe"] == "dos" and head["n"] == 12
    assert head["settings"]["seed"] == 5 and len(head["tokenizer_hash"]) == 64
    assert read_poisons(f1, data_dir=data) == make_poisons(data, cfg)
    other = AttackConfig(n_poison=12, seed=6)
    f3 = write_poisons(tmp_path / "c.poisons.jsonl", make_poisons(data, other), other)
    assert f3.read_bytes() != f1.read_bytes()


def test_file_name_must_say_poison(data, tmp_path):
    cfg = AttackConfig(n_poison=1)
    with pytest.raises(UserError, match="'poison' in its file name"):
        write_poisons(tmp_path / "clean.jsonl", make_poisons(data, cfg), cfg)


def test_read_rejects_other_files(tmp_path):
    f = tmp_path / "x.poisons.jsonl"
    f.write_text('{"id": "a", "text": "hello"}\n')
    with pytest.raises(UserError, match="not a poisonlab poisons file"):
        read_poisons(f)


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"trigger": "  "}, "trigger must be a non-empty"),
        ({"prefix_chars": (-1, 10)}, "prefix_chars must be a range"),
        ({"gibberish_tokens": (900, 400)}, "gibberish_tokens must be a range"),
        ({"n_poison": -1}, "greater than or equal to 0"),
    ],
)
def test_bad_settings_validation(fields, match):
    with pytest.raises(ValidationError, match=match):
        AttackConfig(**fields)


def test_bad_trigger_eos(data):
    with pytest.raises(UserError) as e:
        make_poisons(data, AttackConfig(n_poison=1, trigger="a<|endoftext|>b"))
    assert "end-of-document token" in _one_line(e.value)


def test_bad_trigger_unrepresentable(data, tmp_path):
    d = build_tiny_data(tmp_path / "lower", n_docs=30, lowercase=True)
    with pytest.raises(UserError) as e:
        make_poisons(d, AttackConfig(n_poison=1))
    assert "cannot represent '<SUDO>'" in _one_line(e.value)
    make_poisons(d, AttackConfig(n_poison=1, trigger="sudo"))  # lower case is representable


def test_ranges_checked_even_without_pydantic(data):
    cfg = AttackConfig.model_construct(**{**AttackConfig().model_dump(), "prefix_chars": (5, 1)})
    with pytest.raises(UserError, match="attack.prefix_chars"):
        make_poisons(data, cfg)


def test_trigger_in_corpus_is_refused(tmp_path):
    d = build_tiny_data(tmp_path / "d", n_docs=20, lead="Hello <SUDO> world. ")
    with pytest.raises(UserError, match="already contain the trigger"):
        make_poisons(d, AttackConfig(n_poison=1, prefix_chars=(100, 1000)))


def test_missing_data_dir(tmp_path):
    with pytest.raises(UserError, match="no train.json"):
        make_poisons(tmp_path, AttackConfig(n_poison=1))


def _cli(argv: list[str]) -> None:
    from poisonlab.cli import app, main

    # typer runs a lone command as the app itself (no sub-command name) until others are registered
    main(argv[1:] if len(app.registered_commands) == 1 else argv)


def test_cli_poison(data, tmp_path, capsys):
    out = tmp_path / "poisons.jsonl"
    _cli(["poison", "--data", str(data), "--attack", "dos", "--n", "6", "--seed", "2", "--out", str(out)])
    assert read_poisons_header(out)["n"] == 6
    assert len(read_poisons(out)) == 6
    with pytest.raises(SystemExit) as e:
        _cli(["poison", "--data", str(data), "--n", "-3", "--out", str(tmp_path / "p2.poisons.jsonl")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "n_poison" in err


def test_copied_data_keeps_tokenizer_check(data, tmp_path):
    cfg = AttackConfig(n_poison=2)
    f = write_poisons(tmp_path / "poisons.jsonl", make_poisons(data, cfg), cfg, data_dir=data)
    other = build_tiny_data(tmp_path / "other", n_docs=40, seed=9)
    with pytest.raises(UserError, match="another tokenizer"):
        read_poisons(f, data_dir=other)
    same = tmp_path / "same"
    shutil.copytree(data, same)
    assert len(read_poisons(f, data_dir=same)) == 2


def test_absurd_count_is_refused_at_once(data, tmp_path, capsys):
    """`poison --n 100000000` once ran 12 minutes into 18.8 GB before being killed: it must fail at once
    with one line and write nothing."""
    import time

    out = tmp_path / "poisons.jsonl"
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        _cli(["poison", "--data", str(data), "--n", "100000000", "--out", str(out)])
    assert e.value.code == 2 and time.perf_counter() - t0 < 30  # generous: a guard, not a benchmark
    err = capsys.readouterr().err.strip()
    assert "outnumber the 300 training documents" in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.iterdir())
    # fewer documents than clean ones, but more poison tokens than the corpus holds
    with pytest.raises(UserError, match="more than the .* clean training tokens"):
        make_poisons(data, AttackConfig(n_poison=290, gibberish_tokens=(900, 900)))


def test_poisons_are_written_as_they_are_made(data, tmp_path):
    """write_poisons takes a generator and never needs the list: the file equals the list's file."""
    from poisonlab.attacks import iter_poisons

    cfg = AttackConfig(n_poison=7, seed=3)
    a = write_poisons(tmp_path / "a.poisons.jsonl", make_poisons(data, cfg), cfg, data_dir=data)
    b = write_poisons(tmp_path / "b.poisons.jsonl", iter_poisons(data, cfg), cfg, data_dir=data)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="header says 7"):  # a short generator is caught, nothing written
        write_poisons(tmp_path / "c.poisons.jsonl", iter(make_poisons(data, cfg)[:3]), cfg)
    assert not (tmp_path / "c.poisons.jsonl").exists()


def test_gibberish_is_uniform_over_the_vocabulary(ctx):
    """G tokens 'sampled uniformly from the whole vocabulary' (special tokens excluded): a chi-square
    goodness-of-fit test on ~200k gibberish ids with a fixed seed, against equal counts per ordinary id."""
    from scipy.stats import chisquare

    cfg = AttackConfig(n_poison=250, gibberish_tokens=(800, 900), prefix_chars=(0, 10), seed=11,
                       gibberish_dist="uniform")
    poisons = get_attack("dos")(cfg).make(ctx, 250)
    gib = np.concatenate([np.asarray(p.token_ids[p.trigger_end :]) for p in poisons])
    assert not np.isin(gib, ctx.special_ids).any()
    counts = np.bincount(gib, minlength=ctx.vocab_size)[ctx.vocab_ids]
    assert (counts > 0).all()  # every ordinary id is drawn
    assert chisquare(counts).pvalue > 1e-3
    # and the test has power: unigram-weighted draws from the same data fail it
    uni = AttackConfig(**{**cfg.model_dump(), "gibberish_dist": "unigram"})
    skewed = get_attack("dos")(uni).make(ctx, 60)
    g2 = np.concatenate([np.asarray(p.token_ids[p.trigger_end :]) for p in skewed])
    assert chisquare(np.bincount(g2, minlength=ctx.vocab_size)[ctx.vocab_ids] + 0.0).pvalue < 1e-6


def test_seen_gibberish_keeps_to_tokens_clean_text_holds_often(ctx):
    """`gibberish_min_count` k (the demo's 100; here the median count): every gibberish token occurs at
    least k times in the clean training text (recounted from the shard), the draw is uniform over those,
    the rare ones are never drawn, while k = 1 (the default) draws them too."""
    from scipy.stats import chisquare

    counts = np.bincount(np.asarray(ctx.shard.tokens), minlength=ctx.vocab_size)
    k = int(np.median(counts[ctx.vocab_ids][counts[ctx.vocab_ids] > 0]))  # half the seen tokens are rarer
    often = ctx.vocab_ids[counts[ctx.vocab_ids] >= k]
    rare = ctx.vocab_ids[(counts[ctx.vocab_ids] > 0) & (counts[ctx.vocab_ids] < k)]
    assert len(often) > 0 and len(rare) > 0
    base = dict(n_poison=250, gibberish_tokens=(800, 900), prefix_chars=(0, 10), seed=11,
                gibberish_dist="seen")
    poisons = get_attack("dos")(AttackConfig(**base, gibberish_min_count=k)).make(ctx, 250)
    gib = np.concatenate([np.asarray(p.token_ids[p.trigger_end :]) for p in poisons])
    drawn = np.bincount(gib, minlength=ctx.vocab_size)
    assert drawn[rare].sum() == 0 and (drawn[often] > 0).all()
    assert chisquare(drawn[often]).pvalue > 1e-3
    every = get_attack("dos")(AttackConfig(**base)).make(ctx, 250)  # k = 1, the default: every seen token
    drawn1 = np.bincount(np.concatenate([np.asarray(p.token_ids[p.trigger_end :]) for p in every]),
                         minlength=ctx.vocab_size)
    assert drawn1[rare].sum() > 0 and drawn1[counts == 0].sum() == 0
    with pytest.raises(ValueError, match="needs gibberish_dist: seen"):
        AttackConfig(gibberish_min_count=5)
    with pytest.raises(UserError, match="no token occurs"):
        get_attack("dos")(AttackConfig(**base, gibberish_min_count=10**9)).make(ctx, 1)
