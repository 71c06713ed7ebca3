"""The conversion report: one row per BatchNorm pattern, rewritten or skipped, and a summary.

Plain frozen dataclasses: they pickle, deep-copy and compare by value.

Formats: ``str(report)`` is a terminal table; ``report.format(fmt)`` takes ``"plain"``,
``"github"``, ``"json"`` or ``"csv"``. JSON and CSV are deterministic for the same model,
qparams and inputs (fields in declaration order, rows in graph order, floats as numbers,
an infinite SQNR as ``null``); the conversion time is left out of them so that two reports
can be diffed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields, replace

from tabulate import tabulate

__all__ = ["ReportRow", "ReportSummary", "Report", "FORMATS"]

FORMATS = ("plain", "github", "json", "csv")


@dataclass(frozen=True)
class ReportRow:
    """What happened to one BatchNorm pattern."""

    node: str  # the BN node's name in the traced graph
    module: str  # qualified name of the BN module
    pattern: str  # e.g. "BatchNorm2d+ReLU"
    op: str  # the quantized kernel, e.g. "quantized::batch_norm2d_relu"; "" when skipped
    status: str  # "rewritten" or "skipped"
    reason: str  # why it was skipped, or a note on a rewritten pattern ("" when none)
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

    def __post_init__(self) -> None:
        if self.status not in ("rewritten", "skipped"):
            raise ValueError(f"status must be 'rewritten' or 'skipped', got {self.status!r}")
        if self.status == "skipped" and not self.reason:
            raise ValueError(f"skipped row {self.node} has no reason")


@dataclass(frozen=True)
class ReportSummary:
    """Totals under the table."""

    rewritten: int
    skipped: int
    quantize_nodes: int  # float -> quantized boundaries inserted
    dequantize_nodes: int  # quantized -> float boundaries inserted
    convert_seconds: float  # wall time of fxqbn.convert (not in JSON/CSV)
    model_sqnr_db: float | None = None  # filled by fxqbn.compare: whole model output vs float


def _qparams(scale: float | None, zero_point: int | None) -> str:
    return "-" if scale is None else f"{scale:.4g} @ {zero_point}"


def _range(lo: float | None, hi: float | None) -> str:
    return "-" if lo is None or hi is None else f"[{lo:.4g}, {hi:.4g}]"


def _number(value: float | None, digits: str = ".1f") -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, digits)


# The terminal table: column title -> cell of a row.
_COLUMNS = {
    "node": lambda r: r.node,
    "module": lambda r: r.module,
    "pattern": lambda r: r.pattern,
    "op": lambda r: r.op or "-",
    "status": lambda r: r.status,
    "dtype": lambda r: r.dtype or "-",
    "observer": lambda r: r.observer or "-",
    "input scale @ zp": lambda r: _qparams(r.input_scale, r.input_zero_point),
    "input range": lambda r: _range(r.input_min, r.input_max),
    "output scale @ zp": lambda r: _qparams(r.output_scale, r.output_zero_point),
    "output range": lambda r: _range(r.output_min, r.output_max),
    "SQNR dB": lambda r: _number(r.sqnr_db),
    "max err (steps)": lambda r: _number(r.max_error_steps, ".2f"),
    "source": lambda r: r.source or "-",
    "reason": lambda r: r.reason or "-",
}


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True)
class Report:
    """Every BatchNorm pattern ``fxqbn.convert`` found, in graph order, and the totals."""

    rows: tuple[ReportRow, ...]
    summary: ReportSummary
    dropped: tuple[str, ...] = ()  # observers found outside any BN pattern (torch.ao graphs), removed

    @property
    def rewritten(self) -> tuple[ReportRow, ...]:
        return tuple(row for row in self.rows if row.status == "rewritten")

    @property
    def skipped(self) -> tuple[ReportRow, ...]:
        return tuple(row for row in self.rows if row.status == "skipped")

    def to_dict(self) -> dict:
        """JSON-ready data: rows and summary, without the conversion time; inf/NaN become None."""
        summary = {k: _finite(v) for k, v in asdict(self.summary).items() if k != "convert_seconds"}
        rows = [{k: _finite(v) for k, v in asdict(row).items()} for row in self.rows]
        return {"rows": rows, "summary": summary, "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, data: dict, convert_seconds: float = 0.0) -> "Report":
        """The inverse of ``to_dict`` (which leaves out the conversion time: pass it if known)."""
        rows = tuple(ReportRow(**row) for row in data["rows"])
        summary = ReportSummary(**data["summary"], convert_seconds=convert_seconds)
        return cls(rows=rows, summary=summary, dropped=tuple(data.get("dropped", ())))

    def summary_line(self) -> str:
        s = self.summary
        line = (
            f"{s.rewritten} rewritten, {s.skipped} skipped; {s.quantize_nodes} quantize and "
            f"{s.dequantize_nodes} dequantize nodes inserted; converted in {s.convert_seconds * 1000:.0f} ms"
        )
        if s.model_sqnr_db is not None:
            line += f"; model output SQNR {_number(s.model_sqnr_db)} dB"
        return line

    def format(self, fmt: str = "plain") -> str:
        """The report as text: ``plain`` or ``github`` tables, ``json`` or ``csv`` data."""
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if fmt == "csv":
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(ReportRow)], lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.to_dict()["rows"])
            return out.getvalue()
        if fmt not in ("plain", "github"):
            raise ValueError(f"unknown report format {fmt!r}: choose one of {', '.join(FORMATS)}")
        table = [[cell(row) for cell in _COLUMNS.values()] for row in self.rows]
        style = "simple" if fmt == "plain" else "github"
        text = tabulate(table, headers=list(_COLUMNS), tablefmt=style, disable_numparse=True) + "\n" + self.summary_line()
        if self.dropped:
            text += "\nobservers removed without conversion:\n" + "\n".join(f"  {line}" for line in self.dropped)
        return text

    def with_numbers(self, numbers: dict[str, tuple[float, float]], model_sqnr_db: float | None) -> "Report":
        """A copy with ``sqnr_db`` / ``max_error_steps`` filled for the rows whose node is in ``numbers``."""
        rows = tuple(
            replace(row, sqnr_db=numbers[row.node][0], max_error_steps=numbers[row.node][1]) if row.node in numbers else row
            for row in self.rows
        )
        return replace(self, rows=rows, summary=replace(self.summary, model_sqnr_db=model_sqnr_db))

    def __str__(self) -> str:
        return self.format("plain")
