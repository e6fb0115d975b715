"""What every page shares: the HTML shell (one stylesheet sized for a 1280-pixel window, the page
wrapper), number formatting and Markdown tables; charts are plots.py's. Pages are self-contained
(no script, font or image is fetched) and every string that reaches them is escaped by the page
that writes it.
"""
from __future__ import annotations

import html

# A 1080-px column leaves margins in a 1280-px window; figures are drawn 1040 px wide (plots.py)
# and shrink with the column; wide tables scroll inside their own box instead of widening the page.
CSS = """*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;max-width:1080px;margin:1.5em auto;padding:0 16px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;
vertical-align:top;text-align:left}th{background:#f3f3f3}
.scroll{overflow-x:auto;max-width:100%}
.alert{background:#fdd;font-weight:bold}.watch{background:#ffe9b3}.ok{background:#e9f7e9}.improved{background:#e3efff}
.note{color:#555;font-size:13px}
pre{white-space:pre-wrap;word-break:break-word;overflow-wrap:anywhere;max-width:100%}
svg{max-width:100%;height:auto;display:block}
.fig{margin:.5em 0 1em}
code{word-break:break-all}"""


def page(title: str, body: str, css: str = "", script: str = "") -> str:
    """A whole HTML document. `body` is already-escaped HTML; `script` is page code we wrote
    (never generated text)."""
    tail = f"<script>{script}</script>" if script else ""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}{css}</style></head><body>{body}{tail}</body></html>")


def fmt(x, nd: int = 3, sign: bool = False) -> str:
    """A number for a table cell: '–' for none, floats to `nd` places (signed if asked)."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"
    return str(x)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the header row, its rule and one line per row of cell texts."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])
