"""Text tables that fit a width: the elastic columns give up characters, their cells cut with an ellipsis.

    render(["BN", "reason"], [["features.0.norm1", "excluded by qconfig"]], ["middle", "end"], width=24)

Plain (``simple``: two spaces between columns, a dashed line under the titles) and GitHub (Markdown)
styles. Titles are never cut; a column marked ``None`` is never cut; when even the narrowest elastic
columns do not fit, the table is as narrow as it can be and wider than ``width``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ELLIPSIS", "MIN_CUT", "cut", "render", "fit_lines"]

ELLIPSIS = "…"
MIN_CUT = 10  # an elastic column is never cut narrower than this (or its title)

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


def render(
    titles: Sequence[str], rows: Sequence[Sequence[str]], cuts: Sequence[str | None], width: int | None, style: str = "plain",
) -> str:
    """The table as lines of text, at most ``width`` characters each where it can be (``None``: never cut)."""
    if style not in _FRAME:
        raise ValueError(f"unknown table style {style!r}: choose plain or github")
    frame, gap = _FRAME[style]
    natural = [max([len(title), *(len(row[i]) for row in rows)]) for i, title in enumerate(titles)]
    if width is None:
        widths = natural
    else:
        floors = [None if where is None else max(len(title), MIN_CUT) for title, where in zip(titles, cuts)]
        widths = _widths(natural, floors, width - frame - gap * (len(titles) - 1))
    body = [[cut(cell, w, where) for cell, w, where in zip(row, widths, cuts)] for row in rows]
    if style == "plain":
        lines = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [list(titles), *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
    else:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |" for cells in [list(titles), *body]]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fit_lines(parts: Sequence[str], width: int | None, sep: str = "; ") -> list[str]:
    """``parts`` joined by ``sep`` into lines of at most ``width`` characters, breaking only between parts."""
    lines: list[str] = []
    for part in parts:
        if lines and (width is None or len(lines[-1]) + len(sep) + len(part) <= width):
            lines[-1] += sep + part
        else:
            if lines:
                lines[-1] += sep.rstrip()
            lines.append(part)
    return lines
