"""Text tables that fit a width: the elastic columns give up characters, their long cells cut or wrapped.

    render(["BN", "reason"], [["features.0.norm1", "excluded by qconfig"]], ["middle", "wrap"], width=30)

A row with fewer cells than titles has its last cell span the columns left, and the room up to the
width (plain style only).
Each column says what happens to a cell wider than the column: ``"middle"`` or ``"end"`` cut it with
an ellipsis, ``"wrap"`` continues it on the next lines (plain style; GitHub's Markdown rows are one
line, so there it is cut at the end), ``None`` never shortens it. Plain (``simple``: two spaces between
columns, a dashed line under the titles) and GitHub styles. Titles are never cut; when even the
narrowest elastic columns do not fit, the table is as narrow as they allow, and wider than ``width``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

__all__ = ["ELLIPSIS", "FLOORS", "cut", "render"]

ELLIPSIS = "…"
FLOORS = {"middle": 10, "end": 10, "wrap": 20}  # the narrowest an elastic column gets (or its title)

# style -> (characters around the whole row, characters between two cells)
_FRAME = {"plain": (0, 2), "github": (4, 3)}


def cut(text: str, width: int, where: str | None) -> str:
    """``text`` in at most ``width`` characters: its middle or its end replaced by an ellipsis."""
    if where is None or len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    if where == "middle":  # a third of the start, two thirds of the end, which names the leaf module
        head = (width - 1) // 3
        return text[:head] + ELLIPSIS + text[len(text) - (width - 1 - head):]
    if where == "end":
        return text[: width - 1] + ELLIPSIS
    raise ValueError(f"cut where={where!r}: choose 'middle', 'end' or None")


def _widths(natural: list[int], floors: list[int | None], budget: int) -> list[int]:
    """Column widths summing to at most ``budget`` where the floors allow: the widest elastic column shrinks first."""
    widths = list(natural)
    excess = sum(widths) - budget
    while excess > 0:
        elastic = [i for i, floor in enumerate(floors) if floor is not None and widths[i] > floor]
        if not elastic:
            break
        widest = max(elastic, key=lambda i: widths[i])
        others = max((widths[i] for i in elastic if i != widest), default=floors[widest])
        step = min(excess, widths[widest] - max(others, floors[widest]) or 1)  # down to the next widest, at least 1
        widths[widest] -= step
        excess -= step
    return widths


def _lines(text: str, width: int, where: str | None) -> list[str]:
    """The lines a cell takes in a column ``width`` wide."""
    if where == "wrap" and len(text) > width:
        return textwrap.wrap(text, width, break_on_hyphens=False) or [""]
    return [cut(text, width, where)]


def _row(cells: Sequence[Sequence[str]], widths: list[int], style: str) -> list[str]:
    """The text lines of one row whose cells may take several lines."""
    lines = []
    for k in range(max(len(cell) for cell in cells)):
        parts = [(cell[k] if k < len(cell) else "").ljust(w) for cell, w in zip(cells, widths)]
        lines.append("  ".join(parts).rstrip() if style == "plain" else "| " + " | ".join(parts) + " |")
    return lines


def render(
    titles: Sequence[str], rows: Sequence[Sequence[str]], cuts: Sequence[str | None], width: int | None, style: str = "plain",
) -> str:
    """The table as lines of text, at most ``width`` characters each where it can be (``None``: nothing shortened)."""
    if style not in _FRAME:
        raise ValueError(f"unknown table style {style!r}: choose plain or github")
    if style == "github":  # a Markdown row is one line: cut what would wrap
        cuts = ["end" if where == "wrap" else where for where in cuts]
    frame, gap = _FRAME[style]
    natural = [max([len(title), *(len(row[i]) for row in rows if i < len(row) - 1 or len(row) == len(titles))])
               for i, title in enumerate(titles)]  # a spanning cell widens no column
    if width is None:  # nothing shortened: no cut, no wrap
        widths, cuts = natural, [None] * len(titles)
    else:
        floors = [None if where is None else max(len(title), FLOORS[where]) for title, where in zip(titles, cuts)]
        widths = _widths(natural, floors, width - frame - gap * (len(titles) - 1))
    lines = _row([[title] for title in titles], widths, style)
    lines.append("  ".join("-" * w for w in widths) if style == "plain" else "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        if len(row) < len(titles) and style != "plain":
            raise ValueError("a row with fewer cells than titles (a spanning cell) needs the plain style")
        start = len(row) - 1
        span = sum(widths[start:]) + gap * (len(titles) - len(row))
        if width is not None:  # a spanning cell may use the room left up to the width
            span = max(span, width - frame - sum(widths[:start]) - gap * start)
        spans = widths[:start] + [span]
        own = list(cuts[: len(row) - 1]) + [cuts[-1]]  # a spanning cell fits like the last column
        lines += _row([_lines(cell, w, where) for cell, w, where in zip(row, spans, own)], spans, style)
    return "\n".join(lines)
