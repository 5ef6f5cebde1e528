"""Data filters and detectors, and how they are scored against poisons (`poisonlab defend`).

A detector is one class with `@register_detector("name")`; see `base.py`. Built in: the datatrove
heuristic filters (`heuristics.py`), a perplexity filter (`perplexity.py`) and a trigger miner
(`miner.py`); `score.py` measures recall, false positives and their cost at stated poison densities.
"""

from __future__ import annotations

# the built-in detectors: importing their modules runs their @register_detector lines (the table is
# base.py's; base imports none of its plug-ins)
from poisonlab.defenses import heuristics, miner, perplexity  # noqa: F401, E402
from poisonlab.defenses.base import (
    DefenseContext,
    Detector,
    Verdict,
    detector_names,
    get_detector,
    register_detector,
)
from poisonlab.defenses.score import (
    DEFAULT_DETECTORS,
    DEFAULT_N_CLEAN,
    DEFAULT_N_FPR,
    defend,
    discard_per_catch,
    rate_upper,
    render_table,
    run_density,
    save_figure,
    write_outputs,
)

__all__ = [
    "DEFAULT_DETECTORS",
    "DEFAULT_N_CLEAN",
    "DEFAULT_N_FPR",
    "DefenseContext",
    "Detector",
    "Verdict",
    "defend",
    "detector_names",
    "discard_per_catch",
    "get_detector",
    "rate_upper",
    "register_detector",
    "render_table",
    "run_density",
    "save_figure",
    "write_outputs",
]
