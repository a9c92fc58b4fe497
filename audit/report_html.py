"""The report's building blocks: the section registry and the HTML helpers (escaping, number
formatting, tables, matplotlib figures embedded as base64 PNG). `audit.report` (the core sections
and the entry point) and `audit.report_analysis` (the analysis sections) both build on it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SectionRenderer:
    kind: str
    title: str
    render: Callable[[dict[str, Any]], str]  # JSON result -> HTML fragment
    order: int = 100


SECTION_RENDERERS: dict[str, SectionRenderer] = {}


def register_section(kind: str, title: str, order: int = 100) -> Callable[[Callable[[dict[str, Any]], str]],
                                                                          Callable[[dict[str, Any]], str]]:
    """Decorator: render results of `kind` with this function (sections sorted by `order`)."""
    def deco(fn: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
        SECTION_RENDERERS[kind] = SectionRenderer(kind, title, fn, order)
        return fn

    return deco


# ---------------------------------------------------------------------------- html helpers


def esc(x: Any) -> str:
    return html.escape(str(x))


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return esc(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def titled_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """A table under an <h3> `title` (HTML), or "" when there are no rows: the section leaves it out."""
    return f"<h3>{title}</h3>" + table(headers, rows, cls) if rows else ""


def figure(draw: Callable[[Any], None], caption: str, size: tuple[float, float] = (6.4, 3.6)) -> str:
    """Render `draw(ax)` with matplotlib (Agg) as an embedded PNG <figure>."""
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency, loaded only for reports

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:  # pragma: no cover - depends on the environment
        return f"<p><em>matplotlib is not installed: figure “{esc(caption)}” omitted.</em></p>"
    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}"/>'
            f"<figcaption>{esc(caption)}</figcaption></figure>")
