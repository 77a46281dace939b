"""Building blocks of the self-contained HTML reports: sections, escaped tables, embedded PNGs, figures
drawn off-screen and written atomically, and estimates with their confidence intervals."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pathomics.io import atomic_path

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.note { color: #555; font-size: 0.9em; }
"""


@dataclass(frozen=True)
class Section:
    """One titled part of a report; ``body`` is an HTML fragment built with the helpers below."""

    title: str
    body: str


def html_report(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """A complete, self-contained HTML page (inline CSS, images as data URIs)."""
    parts = [f"<h2>{html.escape(s.title)}</h2>\n{s.body}" for s in sections]
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style>'
    lead = f'<p class="note">{html.escape(subtitle)}</p>' if subtitle else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head>\n<body><h1>{html.escape(title)}</h1>{lead}\n'
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def image_html(png: Path | bytes, alt: str) -> str:
    """An <img> with the PNG embedded as a base64 data URI."""
    data = png.read_bytes() if isinstance(png, Path) else png
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def link_html(href: str, text: str) -> str:
    """An escaped <a> link, for a ``raw`` column of ``table_html``."""
    return f'<a href="{html.escape(href)}">{html.escape(text)}</a>'


def table_html(frame: pd.DataFrame, digits: int = 3, raw: Sequence[str] = ()) -> str:
    """An escaped HTML table; floats rounded to ``digits`` significant digits, missing values as an em dash.
    Columns named in ``raw`` hold HTML already (e.g. from ``link_html``) and are written as they are."""

    def cell(value: Any, column: str) -> str:
        if column in raw:
            return str(value)
        if isinstance(value, (float, np.floating)):
            return "—" if not np.isfinite(value) else f"{value:.{digits}g}"
        return html.escape(str(value))

    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v, c)}</td>" for v, c in zip(row, frame.columns, strict=True)) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>"


def panels(n: int, width: float = 4.2, height: float = 3.6) -> tuple[Figure, np.ndarray]:
    """A figure of ``n`` side-by-side axes, drawn off-screen (no pyplot state)."""
    figure = Figure(figsize=(width * n, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, np.atleast_1d(figure.subplots(1, n, squeeze=False)[0])


def save_figure(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG, atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path


def format_ci(block: Mapping[str, float], digits: int = 3) -> str:
    """'0.691 (0.672–0.716)' from a metric block with ``estimate``, ``ci_low`` and ``ci_high``; the CI only if computed."""
    text = f"{block['estimate']:.{digits}f}"
    if np.isfinite(block["ci_low"]) and np.isfinite(block["ci_high"]):
        text += f" ({block['ci_low']:.{digits}f}–{block['ci_high']:.{digits}f})"
    return text


def write_report(path: Path, title: str, sections: Sequence[Section], subtitle: str = "") -> Path:
    """Write a self-contained HTML report atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(html_report(title, sections, subtitle=subtitle), encoding="utf-8")
    return path
