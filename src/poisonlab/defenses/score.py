"""Scoring detectors at a stated poison density: recall on poisons, false positives among the clean
documents the poisons hide among, and what that costs.

The study's point is that a *constant* number of poisons suffices, so a filter must be judged where
the poisons are rare: N poisons among n_clean clean documents, density N / n_clean ("1 in X").
Every row states its density. Defaults: 250 poisons among 100,000 clean documents (1 in 400), plus
any densities asked for (`density`) and that of a real run's stream (`run`: its poisons among the
clean documents its token budget consumed).

Two kinds of detector, judged differently:
- per document (heuristic filters, perplexity): each document is judged alone, so the false-positive
  rate is a per-document rate, measured on a random sample of `n_fpr` clean documents with an exact
  binomial bound, and the clean documents lost at n_clean (or at 10^6-10^10 documents) are that rate
  times the count. That scaling is exact in expectation, not an extrapolation of behaviour.
- corpus level (the trigger miner): what it flags depends on the whole scanned corpus (document
  frequencies, a bigram model of it), so it scans n_clean clean documents + the poisons for every
  size asked for, and only those measured points are reported: no linear projection.

Clean documents are the held-out split (`eval`, never trained on) followed by a random sample of the
training split; every size takes the first n_clean of that order, so smaller corpora are nested in
larger ones. Calibration documents (perplexity thresholds) are a separate random sample of the training
split, never scored.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from poisonlab.defenses.base import DefenseContext, Detector, Verdict, get_detector
from poisonlab.errors import UserError

DEFAULT_DETECTORS = [
    "gopher-quality",
    "gopher-repetition",
    "c4-quality",
    "fineweb-quality",
    "perplexity",
    "trigger-miner",
]
DEFAULT_N_CLEAN = 100_000  # clean documents the poisons hide among (250 poisons: 1 in 400)
DEFAULT_N_FPR = 10_000  # clean documents each per-document detector judges (its fpr sample)
WEB_N_POISON = 250
WEB_SCALES = (10**6, 10**8, 10**10)
PER_DOC, CORPUS = "per document", "corpus scan"


def discard_per_catch(fpr: float, recall: float, n_docs: float, n_poison: int = WEB_N_POISON) -> float:
    """Clean documents discarded per poison caught, `n_poison` poisons among `n_docs` documents, for a
    per-document detector (each document judged alone, so false positives scale with the count)."""
    if recall <= 0:
        return math.inf
    return fpr * n_docs / (recall * n_poison)


def _binom_cdf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        for i in range(k + 1)
    ]
    m = max(terms)
    return min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms))


def rate_upper(k: int, n: int, conf: float = 0.95) -> float:
    """One-sided exact (Clopper-Pearson) upper bound on a rate seen k times in n: 0 of n -> ~3/n."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _binom_cdf(k, n, mid) > 1 - conf:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class CleanPool:
    """The clean documents: token ids in scoring order (held-out first, then a random training
    sample), texts decoded on demand, and separate calibration texts."""

    ids: list[np.ndarray]
    calib: list[str]
    where: str
    tokenizer: Any

    def texts(self, n: int) -> list[str]:
        return self.tokenizer.decode_batch([d.tolist() for d in self.ids[:n]])


def clean_pool(data_dir: Path, tok: Any, n_clean: int, n_calib: int, seed: int) -> CleanPool:
    from poisonlab.corpus.shards import TokenShard

    train = TokenShard.open(data_dir, "train")
    try:
        ev = TokenShard.open(data_dir, "eval")
        n_ev = min(ev.n_docs, n_clean)
    except UserError:
        ev, n_ev = None, 0
    n_top = n_clean - n_ev
    if n_top + n_calib > train.n_docs:
        have = train.n_docs + (ev.n_docs if ev is not None else 0)
        raise UserError(
            f"{data_dir}: {have:,} documents, too few for {n_clean:,} clean + {n_calib:,} calibration "
            f"documents; prepare more (poisonlab prepare --max-tokens 0 --max-docs "
            f"{n_top + n_calib + 1000}) or score fewer (--n-clean, --density, --n-calib)"
        )
    order = np.random.default_rng(seed).permutation(train.n_docs)
    ids = [ev.doc(i) for i in range(n_ev)] if ev is not None else []
    ids += [train.doc(int(i)) for i in order[:n_top]]
    calib = tok.decode_batch([train.doc(int(i)).tolist() for i in order[n_top : n_top + n_calib]])
    where = "eval" if n_top == 0 else ("train" if n_ev == 0 else f"eval ({n_ev:,}) + train ({n_top:,})")
    return CleanPool(ids, calib, where, tok)


def load_poison_texts(
    paths: Sequence[str | Path], data_dir: str | Path | None = None
) -> dict[str, list[str]]:
    """Texts of the poisoned documents, grouped by recipe, from one or more poisons.jsonl files."""
    from poisonlab.attacks import read_poisons

    out: dict[str, list[str]] = {}
    for p in paths:
        for poison in read_poisons(p, data_dir=data_dir):
            out.setdefault(poison.recipe, []).append(poison.text)
    if not out:
        raise UserError(f"{', '.join(map(str, paths))}: no poisons to score")
    return out


def run_density(run_dir: str | Path) -> dict[str, Any]:
    """The poison density of a run's training stream: its poisons among the clean documents its token
    budget consumed (clean tokens from the ledger / mean tokens per training document, EOS included;
    documents seen again in a later epoch count again, as the stream holds them again)."""
    from poisonlab.config import load_run_config
    from poisonlab.corpus.shards import TokenShard
    from poisonlab.injection.stream import read_ledger

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_run_config(run_dir / "config.yaml")
    _, meta = read_ledger(run_dir / "ledger.parquet")
    n_poison = int(meta["n_poisons"])
    if n_poison == 0:
        raise UserError(f"{run_dir}/ledger.parquet: the run has no poisons, so no density to score at")
    # documents in the stream's clean order (the ledger says; older ledgers: the training split's)
    n_docs = int(meta.get("clean_docs") or TokenShard.open(cfg.data, "train").n_docs)
    clean_docs = int(meta["clean_tokens_needed"]) * n_docs / int(meta["epoch_tokens"])
    return {"run": str(run_dir), "data": str(cfg.data), "attack": cfg.attack, "n_poison": n_poison,
            "clean_tokens": int(meta["clean_tokens_needed"]), "clean_docs": round(clean_docs),
            "epochs": round(int(meta["clean_tokens_needed"]) / int(meta["epoch_tokens"]), 3),
            "density": n_poison / clean_docs}


def _sizes(n_clean: int | Sequence[int], density: float | Sequence[float] | None, n_poison: int,
           run: dict[str, Any] | None) -> list[int]:
    sizes = [int(n_clean)] if isinstance(n_clean, int | np.integer) else [int(x) for x in n_clean]
    dens = [] if density is None else [float(density)] if isinstance(density, int | float) else list(density)
    if run is not None:
        dens.append(run["density"])
    for d in dens:
        if not 0 < d <= 1e3:
            raise UserError(f"--density must be poisons per clean document in (0, 1000], got {d}")
        sizes.append(max(1, round(n_poison / d)))
    if not sizes or min(sizes) < 1:
        raise UserError(f"--n-clean must be at least 1, got {sizes}")
    return sorted(set(sizes))


def defend(
    data_dir: str | Path | None,
    poisons_path: str | Path | Sequence[str | Path] = (),
    detectors: Sequence[str | Detector] | None = None,
    n_clean: int | Sequence[int] = DEFAULT_N_CLEAN,
    *,
    density: float | Sequence[float] | None = None,
    run: str | Path | None = None,
    n_fpr: int = DEFAULT_N_FPR,
    n_calib: int = 1000,
    seed: int = 0,
    poisons: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Score detectors against the poisons in `poisons_path`, hidden among clean documents of
    `data_dir`, at every corpus size in `n_clean`, every `density` (poisons per clean document) and the
    density of the run `run` (a run directory; its data and poisons are the defaults).

    Returns {"rows": [one per detector, recipe and corpus size], "detectors": {...}, "miner": [...],
    "densities": [...], ...}. `poisons` (recipe -> texts) may be given instead of files.
    """
    run_info = run_density(run) if run is not None else None
    if data_dir is None:
        if run_info is None:
            raise UserError("defend: give the prepared data directory (--data) or a run (--run)")
        data_dir = run_info["data"]
    data_dir = Path(data_dir)
    paths = [poisons_path] if isinstance(poisons_path, str | Path) else list(poisons_path or [])
    if poisons is not None:
        by_recipe = poisons
    elif paths:
        by_recipe = load_poison_texts(paths, data_dir)
    elif run_info is not None:  # the run's own poisons, regenerated from its config and data
        from poisonlab.attacks import make_poisons

        attack = run_info["attack"]
        by_recipe = {attack.name: [p.text for p in make_poisons(run_info["data"], attack)]}
    else:
        raise UserError("defend: give poisons (--poisons) or a run (--run) to take them from")
    n_poison = max(len(v) for v in by_recipe.values())
    sizes = _sizes(n_clean, density, n_poison, run_info)
    if n_fpr < 1:
        raise UserError(f"--n-fpr must be at least 1, got {n_fpr}")

    ctx = DefenseContext(data_dir=data_dir, seed=seed)
    pool = clean_pool(data_dir, ctx.tokenizer, max(sizes), n_calib, seed)
    ctx.calib_texts = pool.calib
    specs = list(detectors or DEFAULT_DETECTORS)
    dets = [get_detector(d) if isinstance(d, str) else d for d in specs]
    n_judged = min(n_fpr, max(sizes))
    judged = pool.texts(n_judged) if not all(d.corpus_level for d in dets) else []
    # Rows are labelled by the spec as given (`perplexity:pct=99.9`), so two settings of one detector
    # stay apart; a detector object is labelled by its name.
    labels = [d.strip() if isinstance(d, str) else d.name for d in specs]

    rows: list[dict[str, Any]] = []
    infos: dict[str, Any] = {}
    miner: list[dict[str, Any]] = []
    for det, label in zip(dets, labels, strict=True):
        t0 = time.perf_counter()
        det.fit(ctx)
        if det.corpus_level:
            for recipe, ptexts in by_recipe.items():
                pids = _encode(ctx.tokenizer, ptexts)
                for n in sizes:  # a fresh scan of every corpus size: its verdicts depend on the corpus
                    v = _detect_corpus(det, pool, n, pids, ptexts)
                    rows.append(_row(label, recipe, CORPUS, n, v[:n], v[n:]))
                    miner.append({"detector": label, "recipe": recipe, "n_clean": n,
                                  "density_1_in": round(n / len(ptexts), 1),
                                  "ref_lcb": getattr(det, "ref_lcb", None),
                                  "candidates": [c.as_dict() for c in getattr(det, "candidates", [])[:10]]})
        else:
            clean_v = det.detect(judged)
            for recipe, ptexts in by_recipe.items():
                pv = det.detect(ptexts)
                rows += [_row(label, recipe, PER_DOC, n, clean_v, pv) for n in sizes]
        infos[label] = {**det.info(), "seconds": round(time.perf_counter() - t0, 2)}
        infos[label].pop("candidates", None)
    dens = [{"n_poison": n_poison, "n_clean": n, "density": _sig(n_poison / n),
             "density_1_in": round(n / n_poison, 1)} for n in sizes]
    return {
        "title": "Defenses: data filters against the poisons, at stated poison densities",
        "notes": _notes(sizes, n_poison, n_judged, pool.where, run_info),
        "data": str(data_dir),
        "poisons": [str(p) for p in paths],
        "n_poison": n_poison,
        "n_clean": sizes,
        "densities": dens,
        "run": {k: v for k, v in run_info.items() if k != "attack"} if run_info else None,
        "n_fpr": n_judged,
        "clean_split": pool.where,
        "n_calib": len(pool.calib),
        "web_scale": {"n_poison": WEB_N_POISON, "corpus_docs": list(WEB_SCALES),
                      "applies_to": "per-document detectors only"},
        "detectors": infos,
        "miner": miner,
        "rows": rows,
    }


def _encode(tok: Any, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.array(e.ids, dtype=np.int64) for e in tok.encode_batch(list(texts))]


def _detect_corpus(det: Detector, pool: CleanPool, n: int, pids: list[np.ndarray],
                   ptexts: list[str]) -> list[Verdict]:
    """Verdicts on the first n clean documents followed by the poisons, scanned together."""
    detect_tokens = getattr(det, "detect_tokens", None)
    if detect_tokens is not None:  # the shards hold the ids the tokenizer gives these texts
        return detect_tokens(pool.ids[:n] + pids)
    return det.detect(pool.texts(n) + list(ptexts))


def _sig(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def one_in(x: float) -> str:
    """A density as "1 in X" (X = clean documents per poison): "1 in 400", "1 in 20.5"."""
    return f"1 in {x:,.0f}" if x >= 100 else f"1 in {x:.3g}"


def _notes(sizes: list[int], n_poison: int, n_judged: int, where: str, run: dict[str, Any] | None) -> str:
    dens = ", ".join(f"{one_in(n / n_poison)} ({n:,} clean)" for n in sizes)
    out = (
        f"{n_poison} poisons per recipe among n_clean clean documents ({where}); densities: {dens}. "
        f"Per-document detectors: fpr measured on {n_judged:,} clean documents, each judged alone, "
        "fpr_hi95 = exact one-sided 95% binomial bound; clean_flagged = fpr x n_clean (expected); "
        "discard_per_catch_1eK = fpr x 10^K / (recall x 250), a per-document projection. "
        "Corpus scan (trigger miner): every size scanned in full, counts measured; not projected (-)."
    )
    if run is not None:
        out += (f" Run {run['run']}: {run['n_poison']} poisons among ~{run['clean_docs']:,} clean documents "
                f"({run['clean_tokens']:,} clean tokens, {run['epochs']} epochs): "
                f"{one_in(1 / run['density'])}.")
    return out


def _row(name: str, recipe: str, judged: str, n_clean: int, clean_v: Sequence[Verdict],
         poison_v: Sequence[Verdict]) -> dict[str, Any]:
    caught = sum(v.flagged for v in poison_v)
    fp = sum(v.flagged for v in clean_v)
    n_p, n_c = len(poison_v), len(clean_v)
    recall = caught / n_p if n_p else 0.0
    fpr = fp / n_c if n_c else 0.0
    per_doc = judged == PER_DOC
    flagged = fpr * n_clean if per_doc else float(fp)  # clean documents lost at this density
    hi = rate_upper(fp, n_c) if per_doc else None
    reasons = Counter(v.reason for v in poison_v if v.flagged and v.reason)
    fp_reasons = Counter(v.reason for v in clean_v if v.flagged and v.reason)
    row: dict[str, Any] = {
        "detector": name,
        "recipe": recipe,
        "judged": judged,
        "n_poison": n_p,
        "n_clean": n_clean,
        "density": _sig(n_p / n_clean) if n_clean else None,
        "density_1_in": round(n_clean / n_p, 1) if n_p else None,
        "caught": caught,
        "recall": round(recall, 4),
        "fpr_docs": n_c,
        "false_pos": fp,
        "fpr": _sig(fpr, 4),
        "fpr_hi95": _sig(hi, 4) if hi is not None else None,
        "clean_flagged": round(flagged, 1),
        "clean_flagged_hi95": round(hi * n_clean, 1) if hi is not None else None,
        "precision": round(caught / (caught + flagged), 4) if caught + flagged else None,
        "discard_per_catch": round(flagged / caught, 3) if caught else None,
    }
    for d in WEB_SCALES:
        x = discard_per_catch(fpr, recall, d) if per_doc else math.inf
        row[f"discard_per_catch_1e{round(math.log10(d))}"] = None if math.isinf(x) else _sig(x)
    row["top_reason"] = reasons.most_common(1)[0][0] if reasons else ""
    row["top_fp_reason"] = fp_reasons.most_common(1)[0][0] if fp_reasons else ""
    return row


def _fmt(r: dict[str, Any], c: str) -> str:
    v = r.get(c)
    if c == "density_1_in":
        return one_in(v) if v is not None else ""
    if v is None:
        if c.startswith("discard"):  # nothing caught, or a corpus-level detector (not projected)
            return "inf" if not r["caught"] else "-"
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


TABLE_COLUMNS = ["detector", "recipe", "judged", "n_clean", "density_1_in", "recall", "fpr", "fpr_hi95",
                 "clean_flagged", "precision", "discard_per_catch", "discard_per_catch_1e6",
                 "discard_per_catch_1e8", "discard_per_catch_1e10", "top_reason", "top_fp_reason"]


def render_table(result: dict[str, Any]) -> Any:
    """A rich Table of the rows."""
    from rich.table import Table

    dens = ", ".join(one_in(d["density_1_in"]) for d in result["densities"])
    t = Table(title=f"defenses: {result['n_poison']} poisons per recipe, densities {dens}",
              caption=result["notes"])
    for c in TABLE_COLUMNS:
        head = c.replace("discard_per_catch_", "discard/catch ").replace("discard_per_catch", "discard/catch")
        t.add_column(head.replace("density_1_in", "density"), justify="left" if c in (
            "detector", "recipe", "judged", "top_reason", "top_fp_reason") else "right")
    for r in result["rows"]:
        t.add_row(*[_fmt(r, c) for c in TABLE_COLUMNS])
    return t


def save_figure(result: dict[str, Any], path: str | Path) -> Path:
    """Two panels: recall vs false-positive rate; clean docs discarded per poison caught vs corpus size
    (measured points; per-document detectors also their per-document projection, dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    dets = sorted({r["detector"] for r in rows})
    recipes = sorted({r["recipe"] for r in rows})
    markers = "osD^vP*X"
    colors = plt.get_cmap("tab10")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6))
    floor = 0.5 / max(max(r["fpr_docs"] for r in rows), 1)  # fpr 0 drawn at half a document
    sizes = sorted({r["n_clean"] for r in rows})
    for (det, rec), group in _groups(rows).items():
        col, mk = colors(dets.index(det) % 10), markers[recipes.index(rec) % len(markers)]
        group.sort(key=lambda r: r["n_clean"])
        # panel 1: one point per corpus scan; a per-document detector's fpr is one measurement
        for r in group if group[0]["judged"] == CORPUS else group[-1:]:
            a1.scatter(max(r["fpr"], floor), r["recall"], color=col, marker=mk,
                       facecolors="none" if r["judged"] == CORPUS else col)
        hit = [r for r in group if r["caught"]]
        if not hit:
            continue
        xs = [r["n_clean"] for r in hit]
        ys = [max(r["discard_per_catch"], 1e-3) for r in hit]  # 0 lost drawn at 1e-3
        a2.plot(xs, ys, color=col, marker=mk, lw=1, ls="-" if hit[0]["judged"] == CORPUS else "none",
                fillstyle="none" if hit[0]["judged"] == CORPUS else "full")
        if hit[0]["judged"] == PER_DOC:  # the per-document projection (95% bound when none was seen)
            f = hit[0]["fpr"] or hit[0]["fpr_hi95"]
            xp = [sizes[0], *WEB_SCALES]
            a2.plot(xp, [discard_per_catch(f, hit[0]["recall"], x, hit[0]["n_poison"]) for x in xp],
                    color=col, lw=0.8, ls=":" if hit[0]["fpr"] else "--")
    a1.set_xscale("log")
    a1.set_xlabel(f"false-positive rate (0 drawn at {floor:.1g}; hollow: corpus scan)")
    a1.set_ylabel("recall on poisons")
    a1.set_ylim(-0.03, 1.03)
    a2.set_xscale("log")
    a2.set_yscale("log")
    n_p = result.get("n_poison", WEB_N_POISON)
    a2.set_xlabel(f"clean documents n among which {n_p} poisons hide")
    a2.set_ylabel("clean docs discarded per poison caught\n(markers: scored densities; 0 drawn at 1e-3)")
    for n in sizes:
        a2.axvline(n, color="0.85", lw=0.8, zorder=0)
        a2.annotate(one_in(n / n_p), (n, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, va="top", ha="right", color="0.4")
    a2.set_title("dotted: per-document fpr x corpus size (dashed: 95% bound, none seen); "
                 "solid: corpus scan, measured only", fontsize=8)
    short = lambda d: re.sub(r"ref=([^:]+)", lambda m: "ref=" + Path(m.group(1)).name, d)  # no long paths
    handles = [plt.Line2D([], [], color=colors(i % 10), lw=3, label=short(d)) for i, d in enumerate(dets)]
    handles += [plt.Line2D([], [], color="k", ls="", marker=markers[i % len(markers)], label=r)
                for i, r in enumerate(recipes)]
    a2.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{n_p} poisons per recipe; densities " + ", ".join(one_in(n / n_p) for n in sizes),
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["detector"], r["recipe"]), []).append(r)
    return out


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """`defenses.json` (the report reads its "rows") and `defenses.png` in out_dir."""
    from poisonlab.fsutil import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = save_figure(result, out / "defenses.png")
    write_json(out / "defenses.json", {**result, "figures": [fig.name]})  # paths relative to out_dir
    return {"json": out / "defenses.json", "figure": fig}
