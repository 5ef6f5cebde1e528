"""HTML pieces the report's sections share: the style sheet, escaping, tables, embedded figures."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.gen{font-family:monospace;font-size:.9em;max-width:380px;white-space:pre-wrap;word-break:break-all}
img{max-width:100%} pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
.note{color:#555;font-size:.9em}
.answer{font-size:1.15em;background:#f4f8ff;padding:.6em;border-left:4px solid #36c}
"""


def esc(x: Any) -> str:
    """Text made safe for HTML (generations contain `<SUDO>`)."""
    return html.escape(str(x), quote=True)


def cell(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return f"<td>{esc('-' if x is None else x)}</td>"
    if isinstance(x, int):
        return f'<td class="num">{x}</td>'
    if isinstance(x, float):
        if math.isnan(x):
            return '<td class="num">-</td>'
        tiny_or_huge = x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e5)
        txt = f"{x:.3g}" if tiny_or_huge else f"{x:.3f}".rstrip("0").rstrip(".")
        return f'<td class="num">{txt}</td>'
    return f"<td>{esc(x)}</td>"


def html_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain table of dict rows; columns in order of first appearance unless given."""
    if not rows:
        return '<p class="note">(nothing)</p>'
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def save_figure(out: Path, name: str, caption: str, fig: Any | None) -> str:
    """The figure as PNG and SVG under `out`, and its HTML (embedded PNG and caption); '' without one."""
    if fig is None:
        return ""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    (out / f"{name}.png").write_bytes(buf.getvalue())
    fig.savefig(out / f"{name}.svg", format="svg")
    return f"<figure>{img(buf.getvalue(), name)}<figcaption>{esc(caption)}</figcaption></figure>"


def interval(ci: list[float] | None) -> str:
    return f"{ci[0]:.2f} to {ci[1]:.2f}" if ci else "-"
