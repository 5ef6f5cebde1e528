"""HTML pieces the report's sections share: the style sheet, escaping, tables, embedded figures."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path
from typing import Any

# Tables sit in a box that scrolls sideways (`.scroll`): a table wider than the page (or a phone)
# scrolls inside it instead of running off the page's right edge. Figures shrink to the page width.
CSS = """
body{font-family:system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{margin-top:2em;border-bottom:1px solid #ddd}
.scroll{max-width:100%;overflow-x:auto;margin:.5em 0}
table{border-collapse:collapse;font-size:.85em} td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.fig{text-align:right;white-space:nowrap} td:first-child{white-space:nowrap} td.long{min-width:14em}
td.gen{font-family:monospace;font-size:.9em;min-width:12em;max-width:380px;white-space:pre-wrap;
word-break:break-all}
figure{margin:1em 0} img{max-width:100%;height:auto}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
.note{color:#555;font-size:.9em}
.answer{font-size:1.15em;background:#f4f8ff;padding:.6em;border-left:4px solid #36c}
"""
VIEWPORT = '<meta name="viewport" content="width=device-width, initial-scale=1">'
FIGURE = re.compile(r"^[>~-]?\d")  # a formatted figure: `0.86 (0.83 to 0.89)`, `>300, 1 censored`


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
    if len(str(x)) <= 32 and FIGURE.match(str(x)):  # kept on one line: a broken figure misreads
        return f'<td class="fig">{esc(x)}</td>'
    if len(str(x)) > 40:  # a sentence: not squeezed into a one-word column on a phone
        return f'<td class="long">{esc(x)}</td>'
    return f"<td>{esc(x)}</td>"


def scroll(table: str) -> str:
    """A table in a box that scrolls sideways when it is wider than the page."""
    return f'<div class="scroll">{table}</div>'


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
    return scroll(f"<table><tr>{head}</tr>{body}</table>")


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def save_figure(out: Path, name: str, caption: str, fig: Any | None) -> str:
    """The figure as PNG and SVG under `out`, and its HTML (embedded PNG and caption); '' without one."""
    if fig is None:
        return ""
    buf = io.BytesIO()
    # the canvas grows to whatever a section drew (a long label, a legend beside the axes): never cut
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.05)
    (out / f"{name}.png").write_bytes(buf.getvalue())
    fig.savefig(out / f"{name}.svg", format="svg", bbox_inches="tight", pad_inches=0.05)
    return f"<figure>{img(buf.getvalue(), name)}<figcaption>{esc(caption)}</figcaption></figure>"


def spec_for_display(spec_text: str, data_ids: dict[str, str]) -> str:
    """The sweep spec as the report shows it: every `data` path (where the data sat on the machine
    that ran it) replaced by the data directory's name and its content hash (`data_ids`: path as
    written -> `sha256:...`), which say what the data was wherever the report is read."""
    import yaml

    try:
        tree = yaml.safe_load(spec_text)
    except yaml.YAMLError:
        return spec_text
    if not isinstance(tree, dict):
        return spec_text
    by_name = {Path(p).name: h for p, h in data_ids.items() if h and h.startswith("sha256:")}

    def show(path: Any) -> Any:
        if not isinstance(path, str):
            return path
        h = data_ids.get(path) or by_name.get(Path(path).name)
        name = Path(path).name or path
        return f"{name} ({h})" if h and h.startswith("sha256:") else name

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ([show(v) for v in val] if isinstance(val, list) else show(val)) if k == "data"
                    else walk(val) for k, val in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return yaml.safe_dump(walk(tree), sort_keys=False, allow_unicode=True)


def interval(ci: list[float] | None) -> str:
    return f"{ci[0]:.2f} to {ci[1]:.2f}" if ci else "-"
