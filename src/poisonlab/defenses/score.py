"""Scoring detectors: recall on poisons, false-positive rate on clean documents, and the web-scale cost.

The study's point is that a *constant* number of poisons suffices, so a filter must be judged by what it
costs on a corpus of web size: with 250 poisons hidden among D documents, a filter of recall r and
false-positive rate f discards f * D clean documents to catch r * 250 poisons, i.e.

    clean documents discarded per poison caught = f * D / (r * 250).

Clean documents for the false-positive rate are the held-out split (`eval`, never trained on) decoded
to text, topped up from the training split when it is short; calibration documents (perplexity
thresholds) are a separate random sample of the training split, so thresholds never see the scored
clean documents.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from poisonlab.defenses.base import DefenseContext, Detector, get_detector
from poisonlab.errors import UserError

DEFAULT_DETECTORS = [
    "gopher-quality",
    "gopher-repetition",
    "c4-quality",
    "fineweb-quality",
    "perplexity",
    "trigger-miner",
]
WEB_N_POISON = 250
WEB_SCALES = (10**6, 10**8, 10**10)
CORPUS_LEVEL = {"trigger-miner"}  # detectors that must see the whole scanned corpus at once


def discard_per_catch(fpr: float, recall: float, n_docs: float, n_poison: int = WEB_N_POISON) -> float:
    """Clean documents discarded per poison caught, `n_poison` poisons among `n_docs` documents."""
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


def _clean_texts(
    data_dir: Path, tok: Any, n_clean: int, n_calib: int, seed: int
) -> tuple[list[str], list[str], str]:
    """(scored clean texts, calibration texts, where the scored ones come from)."""
    from poisonlab.corpus.shards import TokenShard

    train = TokenShard.open(data_dir, "train")
    try:
        ev = TokenShard.open(data_dir, "eval")
        n_ev = min(ev.n_docs, n_clean)
    except UserError:
        ev, n_ev = None, 0
    rng = np.random.default_rng(seed)
    order = rng.permutation(train.n_docs)
    n_top = n_clean - n_ev
    if n_top + min(n_calib, 1) > train.n_docs:
        raise UserError(f"{data_dir}: {train.n_docs} training documents, too few for --n-clean {n_clean}")
    calib_idx = order[n_top : n_top + n_calib]
    clean = [tok.decode(ev.doc(i).tolist()) for i in range(n_ev)] if ev is not None else []
    clean += [tok.decode(train.doc(int(i)).tolist()) for i in order[:n_top]]
    calib = [tok.decode(train.doc(int(i)).tolist()) for i in calib_idx]
    where = "eval" if n_top == 0 else ("train" if n_ev == 0 else f"eval ({n_ev}) + train ({n_top})")
    return clean, calib, where


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


def defend(
    data_dir: str | Path,
    poisons_path: str | Path | Sequence[str | Path],
    detectors: Sequence[str | Detector] | None = None,
    n_clean: int = 1000,
    n_calib: int = 1000,
    seed: int = 0,
    poisons: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Score detectors against the poisons in `poisons_path` and clean documents of `data_dir`.

    Returns {"rows": [one per detector and recipe], "detectors": {name: settings}, "miner": {...}, ...}.
    `poisons` (recipe -> texts) may be given instead of files (tests, notebooks).
    """
    data_dir = Path(data_dir)
    paths = [poisons_path] if isinstance(poisons_path, str | Path) else list(poisons_path or [])
    by_recipe = poisons if poisons is not None else load_poison_texts(paths, data_dir)
    if n_clean < 1:
        raise UserError(f"--n-clean must be at least 1, got {n_clean}")
    ctx = DefenseContext(data_dir=data_dir, seed=seed)
    clean, calib, where = _clean_texts(data_dir, ctx.tokenizer, n_clean, n_calib, seed)
    ctx.calib_texts = calib
    specs = list(detectors or DEFAULT_DETECTORS)
    dets = [get_detector(d) if isinstance(d, str) else d for d in specs]
    # Rows are labelled by the spec as given (`perplexity:pct=99.9`), so two settings of one detector
    # stay apart; a detector object is labelled by its name.
    labels = [d.strip() if isinstance(d, str) else d.name for d in specs]

    rows: list[dict[str, Any]] = []
    infos: dict[str, Any] = {}
    miner: dict[str, Any] = {}
    for det, label in zip(dets, labels, strict=True):
        t0 = time.perf_counter()
        det.fit(ctx)
        clean_v = None if det.name in CORPUS_LEVEL else det.detect(clean)
        for recipe, ptexts in by_recipe.items():
            if clean_v is None:  # scan the mixed corpus, as a data team would
                v = det.detect(clean + ptexts)
                cv, pv = v[: len(clean)], v[len(clean) :]
                miner[recipe] = [c.as_dict() for c in getattr(det, "candidates", [])[:10]]
            else:
                cv, pv = clean_v, det.detect(ptexts)
            rows.append(_row(label, recipe, cv, pv))
        infos[label] = {**det.info(), "seconds": round(time.perf_counter() - t0, 2)}
        infos[label].pop("candidates", None)
    return {
        "title": "Defenses: data filters against the poisons",
        "notes": (
            f"recall on poisoned documents, false-positive rate (fpr) on {len(clean)} clean documents "
            f"({where}); fpr_hi95 = 95% upper bound on the fpr; discard_per_catch_1eK = clean documents "
            f"discarded per poison caught when {WEB_N_POISON} poisons hide among 10^K documents "
            "(fpr * 10^K / (recall * 250); empty = nothing caught)"
        ),
        "data": str(data_dir),
        "poisons": [str(p) for p in paths],
        "n_clean": len(clean),
        "clean_split": where,
        "n_calib": len(calib),
        "web_scale": {"n_poison": WEB_N_POISON, "corpus_docs": list(WEB_SCALES)},
        "detectors": infos,
        "miner": miner,
        "rows": rows,
    }


def _row(name: str, recipe: str, clean_v: Sequence[Any], poison_v: Sequence[Any]) -> dict[str, Any]:
    caught = sum(v.flagged for v in poison_v)
    fp = sum(v.flagged for v in clean_v)
    n_p, n_c = len(poison_v), len(clean_v)
    recall = caught / n_p if n_p else 0.0
    fpr = fp / n_c if n_c else 0.0
    reasons = Counter(v.reason for v in poison_v if v.flagged and v.reason)
    fp_reasons = Counter(v.reason for v in clean_v if v.flagged and v.reason)
    row: dict[str, Any] = {
        "detector": name,
        "recipe": recipe,
        "n_poison": n_p,
        "caught": caught,
        "recall": round(recall, 4),
        "n_clean": n_c,
        "false_pos": fp,
        "fpr": round(fpr, 5),
        "fpr_hi95": round(rate_upper(fp, n_c), 5),
    }
    for d in WEB_SCALES:
        x = discard_per_catch(fpr, recall, d)
        row[f"discard_per_catch_1e{round(math.log10(d))}"] = None if math.isinf(x) else round(x, 3)
    row["top_reason"] = reasons.most_common(1)[0][0] if reasons else ""
    row["top_fp_reason"] = fp_reasons.most_common(1)[0][0] if fp_reasons else ""
    return row


def render_table(result: dict[str, Any]) -> Any:
    """A rich Table of the rows."""
    from rich.table import Table

    t = Table(title=f"defenses: {result['n_clean']} clean docs ({result['clean_split']}); "
                    "discard/catch = clean docs lost per poison caught, 250 poisons in a corpus of N docs")
    cols = ["detector", "recipe", "recall", "fpr", "fpr_hi95"] + [
        f"discard_per_catch_1e{round(math.log10(d))}" for d in WEB_SCALES
    ] + ["top_reason", "top_fp_reason"]
    for c in cols:
        t.add_column(c.replace("discard_per_catch_", "discard/catch "), justify="left" if c in (
            "detector", "recipe", "top_reason", "top_fp_reason") else "right")
    for r in result["rows"]:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("inf" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        t.add_row(*cells)
    return t


def save_figure(result: dict[str, Any], path: str | Path) -> Path:
    """Two panels: recall vs false-positive rate; clean docs discarded per poison caught vs corpus size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    dets = sorted({r["detector"] for r in rows})
    recipes = sorted({r["recipe"] for r in rows})
    markers = "osD^vP*X"
    colors = plt.get_cmap("tab10")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.2))
    floor = 0.5 / max(result["n_clean"], 1)  # FPR 0 drawn at half a document, on a log axis
    for r in rows:
        di, ri = dets.index(r["detector"]), recipes.index(r["recipe"])
        mk = markers[ri % len(markers)]
        a1.scatter(max(r["fpr"], floor), r["recall"], color=colors(di % 10), marker=mk)
        if r["recall"] > 0:  # no false positive seen: draw the 95% upper bound, dashed
            f, ls = (r["fpr"], "-") if r["fpr"] > 0 else (r["fpr_hi95"], "--")
            ys = [discard_per_catch(f, r["recall"], d) for d in WEB_SCALES]
            a2.plot(WEB_SCALES, ys, color=colors(di % 10), marker=mk, lw=1, ls=ls)
    a1.set_xscale("log")
    a1.set_xlabel(f"false-positive rate on clean docs (0 drawn at {floor:.1g})")
    a1.set_ylabel("recall on poisons")
    a1.set_ylim(-0.03, 1.03)
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("documents in the corpus (250 poisons)")
    a2.set_ylabel("clean docs discarded per poison caught\n(dashed: none seen, 95% upper bound)")
    short = lambda d: re.sub(r"ref=([^:]+)", lambda m: "ref=" + Path(m.group(1)).name, d)  # no long paths
    handles = [plt.Line2D([], [], color=colors(i % 10), lw=3, label=short(d)) for i, d in enumerate(dets)]
    handles += [plt.Line2D([], [], color="k", ls="", marker=markers[i % len(markers)], label=r)
                for i, r in enumerate(recipes)]
    a2.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """`defenses.json` (the report reads its "rows") and `defenses.png` in out_dir."""
    from poisonlab.fsutil import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = save_figure(result, out / "defenses.png")
    write_json(out / "defenses.json", {**result, "figures": [fig.name]})  # paths relative to out_dir
    return {"json": out / "defenses.json", "figure": fig}
