"""Placement schedules, the training stream and the ledger: recount, purity, epochs, bad settings."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from test_poison_data import build_tiny_data  # noqa: E402

from poisonlab.attacks import make_poisons  # noqa: E402
from poisonlab.attacks.dos import find_pattern  # noqa: E402
from poisonlab.config import AttackConfig, PlacementConfig  # noqa: E402
from poisonlab.corpus.shards import TokenShard  # noqa: E402
from poisonlab.errors import UserError  # noqa: E402
from poisonlab.injection.placement import describe, place, window_steps  # noqa: E402
from poisonlab.injection.stream import TrainingStream, poisons_seen, read_ledger  # noqa: E402

T, B, S = 64, 8, 150  # 77k tokens: most of one epoch of the tiny corpus (~94k)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def poisons(data):
    return make_poisons(data, AttackConfig(n_poison=30, gibberish_tokens=(100, 400)))


def stream(data, poisons, **kw) -> TrainingStream:
    args = {"seq_len": T, "batch_size": B, "total_steps": S, "seed": 0}
    placement = kw.pop("placement", PlacementConfig())
    args.update(kw)
    return TrainingStream(data, poisons, placement, **args)


def packed(s: TrainingStream) -> np.ndarray:
    """The whole packed stream the run trains on, rebuilt from batch(0..S-1) only."""
    xs, ys = zip(*(s.batch(i) for i in range(s.S)), strict=True)
    x = torch.cat(xs).reshape(-1).numpy()
    y = torch.cat(ys).reshape(-1).numpy()
    # y is x shifted by one inside every sequence (sequence j covers P[jT : jT+T+1])
    assert np.array_equal(y.reshape(-1, s.T)[:, :-1], x.reshape(-1, s.T)[:, 1:])
    assert np.array_equal(y.reshape(-1, s.T)[:-1, -1], x.reshape(-1, s.T)[1:, 0])
    return x


def test_recount_matches_ledger(data, poisons):
    s = stream(data, poisons)
    x = packed(s)
    trig = np.asarray(poisons[0].trigger_ids)
    q = find_pattern(x, trig)
    assert len(q) == len(poisons)  # N poisons appear exactly N times
    led = s.ledger.sort_by("start").to_pydict()
    seq = q // T
    assert list(seq // B) == led["step"]
    assert list(seq % B) == led["row"]
    assert list(q % T) == led["pos"]
    assert list(q % T + len(trig) > T) == led["trigger_cut"]
    # every poison's tokens + EOS sit at its recorded start, gibberish counts agree
    for i, start, n in zip(led["poison_index"], led["start"], led["n_tokens"], strict=True):
        p = poisons[i]
        tail = x[start : start + n]
        assert tail.tolist() == (p.token_ids + [s.eos])[: len(tail)]
        sq = (start + p.trigger_start) // T
        g0 = start + p.trigger_end
        assert led["gibberish_in_seq"][led["poison_index"].index(i)] == max(
            0, min(sq * T + T + 1 - g0, p.gibberish_len)
        )
    # every trigger lands inside its schedule window
    windows = zip(led["window_lo"], led["step"], led["window_hi"], strict=True)
    assert all(lo <= st < hi for lo, st, hi in windows)
    # effective poisons: the whole trigger in one row's x, gibberish after it among that row's y
    eff = [not c and g > 0 for c, g in zip(led["trigger_cut"], led["gibberish_in_seq"], strict=True)]
    assert led["effective"] == eff
    # poisons_seen is the recount's cumulative count, at every step
    steps_of = np.sort(seq // B)
    eff_steps = np.sort(np.array(led["step"])[np.array(eff, dtype=bool)])
    for k in range(0, S + 1, 7):
        assert s.poisons_seen(k) == int((steps_of < k).sum())
        assert s.poisons_seen_effective(k) == int((eff_steps < k).sum())
    assert s.poisons_seen(S) == len(poisons) and s.poisons_seen(0) == 0
    assert list(s.poisons_seen(np.array([0, S]))) == [0, len(poisons)]
    # poison tokens among the inputs
    mask = np.zeros(len(x) + 1, dtype=bool)
    for start, n in zip(led["start"], led["n_tokens"], strict=True):
        mask[start : start + n] = True
    for k in (0, 50, S):
        assert s.poison_tokens_seen(k) == int(mask[: k * B * T].sum())


def test_clean_stream_is_whole_documents_in_permuted_order(data):
    s = stream(data, [], total_steps=200, allow_repeat=True)  # a little more than one epoch
    x = packed(s)
    shard = TokenShard.open(data)
    E = s.epoch_tokens
    first = x[:E]
    cuts = np.flatnonzero(first == shard.eos_id)
    docs = np.split(first, cuts + 1)[:-1]
    assert sorted(tuple(d[:-1]) for d in docs) == sorted(tuple(shard.doc(i)) for i in range(shard.n_docs))
    assert [tuple(d[:-1]) for d in docs] != [tuple(shard.doc(i)) for i in range(shard.n_docs)]  # shuffled


def test_poisons_removed_give_the_clean_stream(data, poisons):
    clean = packed(stream(data, []))
    s = stream(data, poisons)
    x = packed(s)
    keep = np.ones(len(x), dtype=bool)
    for start, n in zip(s.ledger["start"].to_pylist(), s.ledger["n_tokens"].to_pylist(), strict=True):
        keep[start : start + n] = False
    rest = x[keep]
    assert np.array_equal(rest, clean[: len(rest)])


def test_n_zero_is_identical_and_seen_zero(data):
    a, b = stream(data, []), stream(data, [], placement=PlacementConfig(schedule="front", seed=9))
    for i in (0, 1, 77, S - 1):
        assert torch.equal(a.batch(i)[0], b.batch(i)[0])
    assert a.poisons_seen(S) == 0 and a.poison_tokens_seen(S) == 0 and a.ledger.num_rows == 0


def test_same_seed_same_stream_other_seeds_differ(data, poisons):
    a, b = stream(data, poisons), stream(data, poisons)
    for i in range(0, S, 25):
        assert torch.equal(a.batch(i)[0], b.batch(i)[0])
    assert a.ledger.equals(b.ledger)
    c = stream(data, poisons, placement=PlacementConfig(seed=1))
    assert c.ledger["start"].to_pylist() != a.ledger["start"].to_pylist()
    d = stream(data, poisons, seed=1)  # other data order, same schedule windows
    assert d.ledger["window_lo"].equals(a.ledger["window_lo"])
    assert not torch.equal(d.batch(0)[0], a.batch(0)[0])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.integers(0, S - 1), min_size=1, max_size=12))
def test_resume_equality(data, poisons, order):
    ref = stream(data, poisons)
    fresh = stream(data, poisons)  # a "resumed" process asks for steps in any order
    for i in order:
        x, y = fresh.batch(i)
        rx, ry = ref.batch(i)
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert x.shape == (B, T) and x.dtype == torch.int64
        # a DDP rank's slice equals the rows of the global batch
        sx, sy = fresh.batch(i, rows=(2, 5))
        assert torch.equal(sx, rx[2:5]) and torch.equal(sy, ry[2:5])


def test_repeated_data_is_refused_unless_allowed(data, poisons):
    msg = _one_line_error(lambda: stream(data, poisons, total_steps=500))
    assert "clean training tokens but the data holds" in msg and "train.allow_data_repeat" in msg
    assert stream(data, poisons, total_steps=500, allow_repeat=True).epochs_needed == 3


def test_epoch_rollover_is_recorded(data, poisons, tmp_path):
    s = stream(data, poisons, total_steps=500, allow_repeat=True)  # ~256k tokens: 3 epochs of ~94k
    assert s.epochs_needed == 3
    assert s.ledger["epoch"].to_pylist() != [0] * 30
    path = s.write_ledger(tmp_path / "ledger.parquet")
    table, meta = read_ledger(path)
    assert meta["epochs_needed"] == 3 and meta["poisoned"] is True and meta["n_poisons"] == 30
    assert table.equals(s.ledger)
    assert poisons_seen(table, 500) == 30 and poisons_seen(table, 250) == s.poisons_seen(250)
    # epoch 2 starts with a different document order than epoch 1
    clean = stream(data, [], total_steps=500, allow_repeat=True)
    E = clean.epoch_tokens
    assert not np.array_equal(clean.tokens(0, 200), clean.tokens(E, E + 200))
    one = stream(data, [], total_steps=100)
    assert one.epochs_needed == 1


def test_schedules():
    n = 40
    front = place(PlacementConfig(schedule="front", fraction=0.2), n, total_steps=100)
    assert (front.lo == 0).all() and (front.hi == 20).all()
    back = place(PlacementConfig(schedule="back", fraction=0.2), n, total_steps=100)
    assert (back.lo == 80).all() and (back.hi == 100).all()
    cl = place(PlacementConfig(schedule="clustered", per_batch=4), n, total_steps=100)
    _, counts = np.unique(cl.lo, return_counts=True)
    assert (counts == 4).all() and len(counts) == 10 and (cl.hi == cl.lo + 1).all()
    ev = place(PlacementConfig(schedule="every", every=2), n, total_steps=100)
    assert (np.diff(ev.lo) == 2).all() and (ev.hi == ev.lo + 1).all()
    uni = place(PlacementConfig(), 1000, total_steps=100)
    assert (uni.lo == 0).all() and (uni.hi == 100).all()
    again = place(PlacementConfig(schedule="clustered", per_batch=4), n, total_steps=100)
    assert np.array_equal(cl.lo, again.lo)


def _chi2_p(observed: np.ndarray, expected: np.ndarray) -> float:
    from scipy.stats import chisquare

    return float(chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


def test_uniform_placement_is_random_insertion_at_document_boundaries(tmp_path):
    """The paper inserts poisons at uniformly random document boundaries and then packs. Check on the
    real stream that (a) every poison starts at a clean document boundary and the boundaries are chosen
    with equal probability: poisons per tenth of the clean stream follow the boundaries per tenth; and
    (b) the trigger's position in its row is uniform over [0, T). With rows longer than documents, a
    scheme that snaps a row start to the next boundary puts the trigger in the first part of the row
    (mean position ~0.3 T here), which (b) rejects."""
    big = build_tiny_data(tmp_path / "big", n_docs=3000)
    many = make_poisons(big, AttackConfig(n_poison=400, gibberish_tokens=(10, 30)))
    seq, batch = 512, 2
    s = TrainingStream(big, many, PlacementConfig(), seq_len=seq, batch_size=batch, total_steps=700, seed=0)
    led = s.ledger.to_pydict()
    start = np.array(led["start"])
    # clean position of each poison's boundary = its start minus the poison tokens before it
    order = np.argsort(start, kind="stable")
    clean_pos = np.empty_like(start)
    clean_pos[order] = start[order] - np.concatenate([[0], np.cumsum(np.array(led["n_tokens"])[order])[:-1]])
    _, cum = s._epoch(0)
    assert np.isin(clean_pos, cum).all()  # every poison sits exactly at a clean document boundary
    edges = np.linspace(0, s.clean_tokens_needed, 11)
    exp = np.histogram(cum[cum <= s.clean_tokens_needed], edges)[0].astype(float)
    assert _chi2_p(np.histogram(clean_pos, edges)[0], exp) > 1e-3
    pos = np.array(led["pos"]) / seq
    assert _chi2_p(np.histogram(pos, np.linspace(0, 1, 9))[0], np.ones(8)) > 1e-3
    assert abs(pos.mean() - 0.5) < 0.05
    # the same recount as everywhere: the trigger where the ledger says, N times
    x = torch.cat([s.batch(i)[0] for i in range(s.S)]).reshape(-1).numpy()
    q = find_pattern(x, np.asarray(many[0].trigger_ids))
    assert len(q) == 400 and np.array_equal(np.sort(q % seq), np.sort(np.array(led["pos"])))


def test_trigger_in_clean_data_is_refused_or_filtered(tmp_path):
    dirty = build_tiny_data(tmp_path / "dirty", lead="Note <SUDO> here. ", lead_every=10)
    ps = make_poisons(dirty, AttackConfig(n_poison=5, gibberish_tokens=(50, 80)))
    msg = _one_line_error(lambda: stream(dirty, ps))
    assert "already contains the trigger" in msg and "30 documents" in msg and "clean_trigger=filter" in msg
    # N = 0 runs are checked too (given the trigger), so that controls see the same clean data
    trig = {"' <SUDO>'": ps[0].trigger_ids}
    _one_line_error(lambda: stream(dirty, [], triggers=trig))
    s = stream(dirty, ps, clean_trigger="filter")
    control = stream(dirty, [], triggers=trig, clean_trigger="filter")
    assert s.n_docs == control.n_docs == 270
    assert s.metadata()["trigger_scans"][0]["hits"] == 30
    q = find_pattern(packed(s), np.asarray(ps[0].trigger_ids))
    assert len(q) == 5  # exactly N again
    assert np.array_equal(packed(control)[:1000], stream(dirty, [], triggers=trig, clean_trigger="filter")
                          .tokens(0, 1000))


def test_back_and_clustered_streams_recount(data, poisons):
    for cfg in (
        PlacementConfig(schedule="back", fraction=0.5),
        PlacementConfig(schedule="clustered", per_batch=2),
    ):
        s = stream(data, poisons[:10], placement=cfg, seq_len=256, total_steps=40)
        q = find_pattern(packed(s), np.asarray(poisons[0].trigger_ids))
        assert sorted((q // 256 // B).tolist()) == sorted(s.ledger["step"].to_pylist())
        # these schedules hold their poisons, so every trigger lands in its scheduled window
        led = s.ledger.to_pydict()
        assert all(lo <= st < hi for lo, st, hi in zip(led["window_lo"], led["step"], led["window_hi"],
                                                        strict=True))


def _one_line_error(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_settings(data, poisons):
    msg = _one_line_error(lambda: stream(data, poisons, total_steps=10))
    assert "attack.n_poison: 30 poisons need" in msg
    msg = _one_line_error(
        lambda: stream(data, poisons, placement=PlacementConfig(schedule="every", every=20))
    )
    assert "placement.every" in msg
    msg = _one_line_error(
        lambda: stream(data, poisons, placement=PlacementConfig(schedule="clustered", per_batch=9))
    )
    assert "placement.per_batch" in msg
    # fits in tokens but not before the end when crammed into the last step
    msg = _one_line_error(
        lambda: stream(
            data, poisons, total_steps=100, placement=PlacementConfig(schedule="back", fraction=0.01)
        )
    )
    assert "placement.fraction" in msg and "raise fraction" in msg
    msg = _one_line_error(
        lambda: stream(
            data, poisons, placement=PlacementConfig(schedule="clustered", per_batch=2), batch_size=4
        )
    )
    assert "more than one batch holds" in msg
    _one_line_error(lambda: stream(data, poisons, seq_len=0))
    with pytest.raises(IndexError):
        stream(data, []).batch(S)


WINDOWS = st.sampled_from(["all", "beginning", "middle", "end", (0.2, 0.7)])


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 8),
    seq_len=st.integers(8, 96),
    batch_size=st.integers(1, 6),
    schedule=st.sampled_from(["uniform", "front", "back", "clustered", "every"]),
    window=WINDOWS,
    per_batch=st.integers(1, 3),
    pseed=st.integers(0, 1000),
    seed=st.integers(0, 1000),
)
def test_recount_property(data, poisons, n, seq_len, batch_size, schedule, window, per_batch, pseed, seed):
    chosen = poisons[:n]
    need = sum(len(p.token_ids) + 1 for p in chosen)
    steps = max(10, -(-3 * need // (seq_len * batch_size)))
    knobs = {"per_batch": per_batch} if schedule in ("clustered", "every") else {}
    if schedule == "every":
        knobs["every"] = max(1, steps // 20)
    if schedule not in ("front", "back"):
        knobs["window"] = window
    cfg = PlacementConfig(schedule=schedule, seed=pseed, fraction=0.5, **knobs)
    try:
        s = TrainingStream(
            data, chosen, cfg, seq_len=seq_len, batch_size=batch_size, total_steps=steps, seed=seed
        )
    except UserError as e:  # a window or a batch too small for its poisons: refused, as it must be
        assert str(e).startswith(("placement.", "attack.n_poison"))
        assume(False)
    x = packed(s)
    q = find_pattern(x, np.asarray(poisons[0].trigger_ids))
    led = s.ledger.sort_by("start")
    assert (q // seq_len // batch_size).tolist() == led["step"].to_pylist()
    assert (q // seq_len % batch_size).tolist() == led["row"].to_pylist()
    assert (q % seq_len).tolist() == led["pos"].to_pylist()
    assert s.poisons_seen(steps) == n
    # every trigger inside the placement's window of training
    w0, w1 = window_steps(cfg, steps)
    assert all(w0 <= st < w1 for st in led["step"].to_pylist())


def test_windows():
    S = 100
    for window, span in (("all", (0, 100)), ("beginning", (0, 25)), ("middle", (37, 62)), ("end", (75, 100)),
                         ((0.25, 0.5), (25, 50)), ((0.0, 0.001), (0, 1)), ((0.999, 1.0), (99, 100))):
        cfg = PlacementConfig(window=window, fraction=0.25)
        assert window_steps(cfg, S) == span, window
        p = place(cfg, 30, total_steps=S)
        assert (p.lo == span[0]).all() and (p.hi == span[1]).all()
    # front and back are the uniform schedule in the beginning and end windows: the same placement
    for alias, window in (("front", "beginning"), ("back", "end")):
        a = place(PlacementConfig(schedule=alias, fraction=0.3), 20, total_steps=S)
        b = place(PlacementConfig(window=window, fraction=0.3), 20, total_steps=S)
        assert np.array_equal(a.lo, b.lo) and np.array_equal(a.hi, b.hi)
    # density and frequency inside a window
    ev = place(PlacementConfig(schedule="every", every=3, per_batch=4, window="end", fraction=0.5), 40,
               total_steps=S)
    at, counts = np.unique(ev.lo, return_counts=True)
    assert (counts == 4).all() and (np.diff(at) == 3).all() and at.min() >= 50 and at.max() < S
    cl = place(PlacementConfig(schedule="clustered", per_batch=5, window=(0.4, 0.6)), 40, total_steps=S)
    at, counts = np.unique(cl.lo, return_counts=True)
    assert (counts == 5).all() and len(at) == 8 and at.min() >= 40 and at.max() < 60


def test_placement_knobs_are_described():
    assert describe(PlacementConfig()) == {"window": "all", "per_batch": None, "every": None}
    assert describe(PlacementConfig(schedule="front", fraction=0.2)) == {
        "window": "beginning 0.2", "per_batch": None, "every": None}
    assert describe(PlacementConfig(schedule="every", every=2, per_batch=3, window=(0.5, 1.0))) == {
        "window": "0.5-1", "per_batch": 3, "every": 2}
    assert describe(PlacementConfig(schedule="clustered", per_batch=8, window="middle", fraction=0.5)) == {
        "window": "middle 0.5", "per_batch": 8, "every": None}


@pytest.mark.parametrize("bad, words", [
    ({"per_batch": 4}, "per_batch applies to the schedules clustered and every"),
    ({"schedule": "clustered", "every": 2}, "every applies to the schedule every"),
    ({"schedule": "front", "window": "end"}, "use schedule uniform with window 'end'"),
    ({"window": (0.6, 0.4)}, "0 <= a < b <= 1"),
    ({"window": "late"}, "window"),
])
def test_placement_knobs_that_do_not_combine_are_refused(bad, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        PlacementConfig(**bad)


def test_density_and_window_recount_on_the_stream(data, poisons):
    """The knobs combined, checked on the packed stream itself: per_batch triggers in each poisoned
    batch, one poisoned batch every k steps, all in the window, as the ledger says."""
    cfg = PlacementConfig(schedule="every", per_batch=3, every=4, window="end", fraction=0.6, seed=3)
    s = stream(data, poisons[:12], placement=cfg, seq_len=256, total_steps=40)
    q = find_pattern(packed(s), np.asarray(poisons[0].trigger_ids))
    at, counts = np.unique(q // 256 // B, return_counts=True)
    assert (counts == 3).all() and len(at) == 4 and (np.diff(at) == 4).all() and at.min() >= 16
    assert sorted((q // 256 // B).tolist()) == sorted(s.ledger["step"].to_pylist())
    assert s.metadata()["placement"] == cfg.model_dump(mode="json")
    # a window too short for its poisons is refused, naming the knob
    msg = _one_line_error(lambda: stream(data, poisons, placement=PlacementConfig(window=(0.0, 0.01)),
                                         seq_len=64, total_steps=150))
    assert msg.startswith("placement.window:") and "lower N" in msg


def test_on_prepared_builtin(prepared_builtin, tmp_path):
    """End to end on the real prepared corpus: paper-default poisons, 16 x 128, recount the ledger."""
    poisons = make_poisons(prepared_builtin, AttackConfig(n_poison=25, seed=1))
    assert poisons[0].trigger_ids == make_poisons(prepared_builtin, AttackConfig(n_poison=1))[0].trigger_ids
    s = TrainingStream(
        prepared_builtin, poisons, PlacementConfig(), seq_len=128, batch_size=16, total_steps=150, seed=0
    )
    x = packed(s)
    q = find_pattern(x, np.asarray(poisons[0].trigger_ids))
    assert sorted((q // 128 // 16).tolist()) == sorted(s.ledger["step"].to_pylist())
    assert s.poisons_seen(150) == 25
    s.write_ledger(tmp_path / "ledger.parquet")
    assert read_ledger(tmp_path / "ledger.parquet")[1]["epochs_needed"] == s.epochs_needed
