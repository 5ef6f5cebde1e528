"""Every archive under docs/findings holds the figures its runs give: the report's JSON (summary, fits,
and the placement, persistence, language and fine-tuning sections' files), rebuilt from the archived
runs with today's code, equals the JSON committed beside them. A figure can then never drift from its
data: after a change to the analysis, `make findings` (poisonlab report DIR --write-archive-json on
every archive) rewrites them, and docs/findings.md is re-read against the diff."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from poisonlab.report.page import report_json

FINDINGS = Path(__file__).resolve().parent.parent / "docs" / "findings"
ARCHIVES = sorted(p.name for p in FINDINGS.iterdir() if (p / "runs").is_dir())
NOT_REPORT = {"plan.json"}  # the sweep's own plan (poisonlab sweep writes it), not a report figure


def differences(got: Any, want: Any, where: str = "") -> list[str]:
    """Where two JSON trees differ: numbers beyond a relative 1e-6 (the fits' optimizer may round
    differently on another CPU), anything else at all."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: missing" for k in want.keys() - got.keys()]
        out += [f"{where}.{k}: not committed" for k in got.keys() - want.keys()]
        for k in want.keys() & got.keys():
            out += differences(got[k], want[k], f"{where}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items, committed {len(want)}"]
        pairs = enumerate(zip(got, want, strict=True))
        return [d for i, (g, w) in pairs for d in differences(g, w, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(want, numbers) and isinstance(got, numbers) and not isinstance(want, bool):
        if math.isnan(want) and math.isnan(got) or math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
            return []
    elif got == want:
        return []
    return [f"{where}: {got!r}, committed {want!r}"]


@pytest.mark.parametrize("name", ARCHIVES)
def test_the_committed_figures_are_what_the_archive_rebuilds(name: str) -> None:
    root = FINDINGS / name
    rebuilt = json.loads(json.dumps(report_json(root), default=str))  # as the report writes it
    committed = {p.name for p in root.glob("*.json")} - NOT_REPORT
    assert committed == set(rebuilt), f"{name}: commit the report's JSON (make findings)"
    for file in sorted(rebuilt):
        diff = differences(rebuilt[file], json.loads((root / file).read_text()), file)
        assert not diff, f"{name}: {len(diff)} figure(s) differ from the runs (make findings): " + "; ".join(
            diff[:8])


def test_a_stale_figure_is_caught() -> None:
    fits = {"groups": [{"fits": {"per_n": {"slope": -0.14, "ci": [-0.21, -0.08], "runs": 45}}}]}
    stale = json.loads(json.dumps(fits))
    stale["groups"][0]["fits"]["per_n"]["slope"] = -0.15
    assert differences(fits, json.loads(json.dumps(fits))) == []
    assert differences(stale, fits) == [".groups[0].fits.per_n.slope: -0.15, committed -0.14"]
    assert differences({"a": 1}, {"a": 1, "b": None}) == [".b: missing"]
    assert differences({"d": float("nan")}, {"d": float("nan")}) == []


def test_archive_json_is_written_at_the_specs_settings_only(tmp_path, capsys) -> None:
    """`--write-archive-json` with another threshold or bootstrap would commit figures the test above
    then calls stale: refused in one line (exit 2), before anything is written."""
    from poisonlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path), "--write-archive-json", "--threshold", "0.6"])
    assert e.value.code == 2 and "spec's settings" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_density_ladder_table_in_findings_is_what_its_archive_gives() -> None:
    # the per-run table docs/findings.md quotes (docs/findings/ladder_table.py), rebuilt from the archive
    import importlib.util

    spec = importlib.util.spec_from_file_location("ladder_table", FINDINGS / "ladder_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (FINDINGS.parent / "findings.md").read_text(encoding="utf-8")
    rows = module.rows(FINDINGS / "density-ladder")
    assert rows and [r for r in rows if r not in page] == []
