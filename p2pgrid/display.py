"""Small HTML tables for notebooks (``_repr_html_``); every cell is escaped.

Peers name their own objects, tags and descriptions: in a notebook that text is
rendered as HTML, so nothing from a record reaches the page unescaped."""

from __future__ import annotations

import html
from typing import Any, Iterable, Sequence


def cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    elif isinstance(value, (list, tuple)) and not isinstance(value, str):
        value = ", ".join(str(v) for v in value)
    return html.escape("" if value is None else str(value), quote=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    """An HTML table with escaped `headers`, `rows` and `caption`."""
    head = "".join(f"<th>{cell(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{cell(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
