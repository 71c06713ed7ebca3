"""The conversion report: one row per BatchNorm pattern, rewritten or skipped, and a summary.

Plain frozen dataclasses: they pickle, deep-copy and compare by value.

Formats: ``str(report)`` is a terminal table of the columns a person reads first (DEFAULT_COLUMNS),
fitted to 100 characters; ``report.format(fmt, columns, width)`` takes ``"plain"``, ``"github"`` (Markdown),
``"json"`` or ``"csv"``, any of COLUMNS, and another width (``None``: nothing shortened). JSON and
CSV keep every field that means something for the report's kind (a report of ``fxqbn.lower`` has
no observers, observed ranges, boundaries or per-BN errors: ``NOT_LOWERED``) and are deterministic
for the same model, qparams and inputs (fields in declaration order, rows in graph order, floats as
numbers, an infinite SQNR as ``null``); the conversion time is left out of them so that two reports
can be diffed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .table import render

__all__ = [
    "ReportRow", "ReportSummary", "Report", "skipped_row", "folded_row", "STATUSES", "FORMATS", "COLUMNS", "DEFAULT_COLUMNS", "WIDTH", "column_names", "NOT_LOWERED",
]

FORMATS = ("plain", "github", "json", "csv")
# What became of a BN: quantized in place, folded into the conv / linear that feeds it (its reason names
# which), or left float (its reason says why).
STATUSES = ("rewritten", "folded", "skipped")


@dataclass(frozen=True)
class ReportRow:
    """What happened to one BatchNorm pattern."""

    node: str  # the BN node's name in the traced graph
    module: str  # qualified name of the BN module
    pattern: str  # e.g. "BatchNorm2d+ReLU"
    op: str  # the quantized kernel, e.g. "quantized::batch_norm2d_relu"; "" when skipped
    status: str  # one of STATUSES: "rewritten", "folded" (into the conv/linear before it) or "skipped"
    reason: str  # why it was skipped, what it was folded into, or a note on a rewritten pattern ("" when none)
    source: str = ""  # "file.py:123" of the BN call in the model's code
    dtype: str = ""  # "quint8" / "qint8"
    observer: str = ""  # the activation observer's class
    input_scale: float | None = None
    input_zero_point: int | None = None
    input_min: float | None = None  # observed float range of the input
    input_max: float | None = None
    output_scale: float | None = None
    output_zero_point: int | None = None
    output_min: float | None = None  # observed float range of the output (after a fused ReLU)
    output_max: float | None = None
    sqnr_db: float | None = None  # filled by fxqbn.compare: quantized vs float output of this pattern
    max_error_steps: float | None = None  # filled by fxqbn.compare: max |error| / output_scale
    sensitivity_db: float | None = None  # the model's output SQNR vs float with only this pattern quantized (held-out inputs)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")
        if self.status != "rewritten" and not self.reason:
            raise ValueError(f"{self.status} row {self.node} has no reason")


def skipped_row(skip: Any) -> ReportRow:
    """The row of a BatchNorm left float (a ``passes.Skip``: node, module, pattern, reason, source)."""
    return ReportRow(node=skip.node, module=skip.module, pattern=skip.pattern, op="", status="skipped", reason=skip.reason, source=skip.source)


def folded_row(node: str, module: str, pattern: str, into: str, source: str = "", by: str = "") -> ReportRow:
    """The row of a BatchNorm folded into the conv / linear ``into`` that feeds it (no int8 BN left);
    ``into`` "" when not known; ``by`` names what folded it when not fxqbn (e.g. "torch.ao prepare_fx")."""
    reason = "folded" + (f" into {into}" if into else "") + (f" by {by}" if by else "")
    return ReportRow(node=node, module=module, pattern=pattern, op="", status="folded", reason=reason, source=source)


@dataclass(frozen=True)
class ReportSummary:
    """Totals under the table."""

    rewritten: int
    skipped: int
    quantize_nodes: int  # float -> quantized boundaries inserted (nodes, or inside FloatIO modules; the key predates FloatIO)
    dequantize_nodes: int  # quantized -> float boundaries inserted (the same)
    convert_seconds: float  # wall time of fxqbn.convert or fxqbn.lower (not in JSON/CSV)
    model_sqnr_db: float | None = None  # filled by fxqbn.compare, or fxqbn.convert given inputs: whole model output vs float
    lowered_into: str = ""  # fxqbn.lower: the int8 graph its BNs went into ("torch.ao convert_fx"); "" for convert
    folded: int = 0  # BNs folded into the conv / linear that feeds them (rows with status "folded")
    keep_float_below: float | None = None  # fxqbn.convert's threshold (dB): patterns whose sensitivity is under it stay float
    kept_float: int = 0  # the skipped patterns kept float by keep_float_below


# Fields that mean nothing in a report of fxqbn.lower (left out of its data and tables): it inserts no
# boundaries, observes nothing (the qparams are the graph's) and fxqbn.compare takes no lowered model.
NOT_LOWERED = frozenset({
    "quantize_nodes", "dequantize_nodes", "model_sqnr_db",  # summary
    "keep_float_below", "kept_float",
    "observer", "input_min", "input_max", "output_min", "output_max", "sqnr_db", "max_error_steps", "sensitivity_db",  # rows
})
_LOWERED_ONLY = frozenset({"lowered_into"})  # left out of the data of fxqbn.convert's reports


def _qparams(scale: float | None, zero_point: int | None) -> str:
    return "-" if scale is None else f"{scale:.4g} @ {zero_point}"


def _range(lo: float | None, hi: float | None) -> str:
    return "-" if lo is None or hi is None else f"[{lo:.4g}, {hi:.4g}]"


def _number(value: float | None, digits: str = ".1f") -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, digits)


@dataclass(frozen=True)
class Column:
    """One column of the report's tables."""

    name: str  # what ``columns=`` and ``--columns`` take
    title: str  # its heading
    cell: Callable[[ReportRow], str]
    shows: tuple[str, ...]  # the ReportRow fields it shows
    cut: str | None = None  # how a long cell fits the width: "middle" / "end" (ellipsis), "wrap", None (never shortened)
    blank_when_skipped: bool = False  # "-" on a skipped or folded row: in plain tables a trailing reason spans such columns
    when_filled: bool = False  # left out of a table when no row has a value for it


# Every column of the tables, in the order ``columns="all"`` shows them.
COLUMNS = {c.name: c for c in (
    Column("node", "node", lambda r: r.node, ("node",), "middle"),
    Column("bn", "BN", lambda r: r.module, ("module",), "middle"),  # the BN module's qualified name
    Column("pattern", "pattern", lambda r: r.pattern, ("pattern",), "end"),
    Column("op", "op", lambda r: r.op or "-", ("op",), "end", blank_when_skipped=True),
    Column("status", "status", lambda r: r.status, ("status",)),
    Column("dtype", "dtype", lambda r: r.dtype or "-", ("dtype",), blank_when_skipped=True),
    Column("observer", "observer", lambda r: r.observer or "-", ("observer",), "end", blank_when_skipped=True),
    Column("in", "in scale@zp", lambda r: _qparams(r.input_scale, r.input_zero_point), ("input_scale", "input_zero_point"), blank_when_skipped=True),
    Column("in_range", "in range", lambda r: _range(r.input_min, r.input_max), ("input_min", "input_max"), blank_when_skipped=True),
    Column("out", "out scale@zp", lambda r: _qparams(r.output_scale, r.output_zero_point), ("output_scale", "output_zero_point"), blank_when_skipped=True),
    Column("out_range", "out range", lambda r: _range(r.output_min, r.output_max), ("output_min", "output_max"), blank_when_skipped=True),
    Column("sqnr", "SQNR", lambda r: _number(r.sqnr_db), ("sqnr_db",), blank_when_skipped=True),
    Column("max_err", "max err steps", lambda r: _number(r.max_error_steps, ".2f"), ("max_error_steps",), blank_when_skipped=True),
    # a kept-float row's sensitivity is in its reason; the column shows once sensitivity was measured
    Column("sens", "sens", lambda r: _number(r.sensitivity_db), ("sensitivity_db",), blank_when_skipped=True, when_filled=True),
    Column("source", "source", lambda r: r.source or "-", ("source",), "middle"),
    Column("reason", "reason", lambda r: r.reason or "-", ("reason",), "wrap"),
)}
# What a person reads first: ``str(report)`` and the command show these, fitted to WIDTH characters.
DEFAULT_COLUMNS = ("bn", "pattern", "status", "in", "out", "sqnr", "sens", "reason")
WIDTH = 100


def column_names(text: str) -> tuple[str, ...]:
    """``"bn,status,reason"`` as column names, checked against COLUMNS; ``"all"`` is every column."""
    if text.strip().lower() == "all":
        return tuple(COLUMNS)
    names = tuple(name.strip().lower() for name in text.split(","))
    unknown = [name for name in names if name not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown report column {', '.join(map(repr, unknown))}: choose from {', '.join(COLUMNS)}, or all")
    return names


def _cells(chosen: Sequence[Column], row: ReportRow, spanning: bool) -> list[str]:
    """A row's cells; with ``spanning``, a skipped row's reason (when last) takes the blank columns before it."""
    cells = [c.cell(row) for c in chosen]
    if not spanning or row.status == "rewritten" or chosen[-1].name != "reason":
        return cells
    start = len(chosen) - 1
    while start > 0 and chosen[start - 1].blank_when_skipped:
        start -= 1
    return cells[:start] + cells[-1:]


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True)
class Report:
    """Every BatchNorm pattern ``fxqbn.convert`` (or ``fxqbn.lower``) found, in graph order, and the totals."""

    rows: tuple[ReportRow, ...]
    summary: ReportSummary
    dropped: tuple[str, ...] = ()  # observers found outside any BN pattern (torch.ao graphs), removed

    @property
    def rewritten(self) -> tuple[ReportRow, ...]:
        return tuple(row for row in self.rows if row.status == "rewritten")

    @property
    def skipped(self) -> tuple[ReportRow, ...]:
        return tuple(row for row in self.rows if row.status == "skipped")

    @property
    def folded(self) -> tuple[ReportRow, ...]:
        return tuple(row for row in self.rows if row.status == "folded")

    @property
    def unused(self) -> frozenset[str]:
        """The fields that mean nothing for this report's kind: ``NOT_LOWERED`` for ``fxqbn.lower``'s."""
        return NOT_LOWERED if self.summary.lowered_into else _LOWERED_ONLY

    def to_dict(self) -> dict:
        """JSON-ready data: rows and summary, without the conversion time and the ``unused`` fields;
        inf/NaN become None."""
        leave_out = self.unused | {"convert_seconds"}
        summary = {k: _finite(v) for k, v in asdict(self.summary).items() if k not in leave_out}
        rows = [{k: _finite(v) for k, v in asdict(row).items() if k not in leave_out} for row in self.rows]
        return {"rows": rows, "summary": summary, "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, data: dict, convert_seconds: float = 0.0) -> "Report":
        """The inverse of ``to_dict`` (which leaves out the conversion time: pass it if known)."""
        rows = tuple(ReportRow(**row) for row in data["rows"])
        boundaries = {"quantize_nodes": 0, "dequantize_nodes": 0} if data["summary"].get("lowered_into") else {}
        summary = ReportSummary(**{**boundaries, **data["summary"]}, convert_seconds=convert_seconds)
        return cls(rows=rows, summary=summary, dropped=tuple(data.get("dropped", ())))

    def _counts(self) -> list[str]:
        s = self.summary
        folded = f"{s.folded} folded, " if s.folded else ""
        if s.lowered_into:
            bns = "BN" if s.rewritten == 1 else "BNs"
            return [f"{s.rewritten} {bns} lowered into the {s.lowered_into} int8 graph, {folded}{s.skipped} skipped"]
        kept = "" if s.keep_float_below is None else f" ({s.kept_float} kept float: sensitivity under {s.keep_float_below:g} dB)"
        return [f"{s.rewritten} rewritten, {folded}{s.skipped} skipped{kept}",
                f"{s.quantize_nodes} quantize and {s.dequantize_nodes} dequantize boundaries inserted"]

    def summary_lines(self, width: int | None = WIDTH) -> list[str]:
        """The totals under the table: on one line with ``width=None``, else counts on one line and
        the model's SQNR and the conversion time on the next (where the timing cannot move the break)."""
        s, counts = self.summary, self._counts()
        numbers = [] if s.model_sqnr_db is None else [f"model output SQNR {_number(s.model_sqnr_db)} dB"]
        numbers.append(f"{'lowered' if s.lowered_into else 'converted'} in {s.convert_seconds * 1000:.0f} ms")
        return ["; ".join(counts + numbers)] if width is None else ["; ".join(counts), "; ".join(numbers)]

    def format(self, fmt: str = "plain", columns: Sequence[str] | str = DEFAULT_COLUMNS, width: int | None = WIDTH) -> str:
        """The report as text: ``plain`` or ``github`` tables, ``json`` or ``csv`` data (every field but
        the ``unused`` ones).

        ``columns`` names the table's columns (keys of COLUMNS, or ``"all"``); a column showing only
        ``unused`` fields is left out, and ``sens`` when no row has a sensitivity. To fit ``width`` characters, a long name is cut in the middle
        with an ellipsis and a long reason wraps onto the next lines; ``width=None`` shortens nothing.
        ``github`` tables are Markdown, which the browser lays out: they are never shortened.
        """
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if fmt == "csv":
            out = io.StringIO()
            names = [f.name for f in fields(ReportRow) if f.name not in self.unused]
            writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.to_dict()["rows"])
            return out.getvalue()
        if fmt not in ("plain", "github"):
            raise ValueError(f"unknown report format {fmt!r}: choose one of {', '.join(FORMATS)}")
        named = [COLUMNS[name] for name in column_names(columns if isinstance(columns, str) else ",".join(columns))]
        chosen = [c for c in named if not set(c.shows) <= self.unused and not (c.when_filled and not self._filled(c))]
        table = [_cells(chosen, row, spanning=fmt == "plain") for row in self.rows]
        text = render([c.title for c in chosen], table, [c.cut for c in chosen], width if fmt == "plain" else None, fmt)
        lines = [text, *self.summary_lines(width)]
        if self.dropped:
            lines += ["observers removed without conversion:", *(f"  {line}" for line in self.dropped)]
        return "\n".join(lines)

    def _filled(self, column: Column) -> bool:
        return any(getattr(row, name) is not None for row in self.rows for name in column.shows)

    def with_sensitivity(self, sensitivity: dict[str, float]) -> "Report":
        """A copy with ``sensitivity_db`` filled for the rows whose node is in ``sensitivity`` (BN node -> dB)."""
        rows = tuple(replace(row, sensitivity_db=sensitivity[row.node]) if row.node in sensitivity else row for row in self.rows)
        return replace(self, rows=rows)

    def with_numbers(self, numbers: dict[str, tuple[float, float]], model_sqnr_db: float | None) -> "Report":
        """A copy with ``sqnr_db`` / ``max_error_steps`` filled for the rows whose node is in ``numbers``."""
        rows = tuple(
            replace(row, sqnr_db=numbers[row.node][0], max_error_steps=numbers[row.node][1]) if row.node in numbers else row
            for row in self.rows
        )
        return replace(self, rows=rows, summary=replace(self.summary, model_sqnr_db=model_sqnr_db))

    def __str__(self) -> str:
        return self.format("plain")
