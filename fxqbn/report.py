"""The conversion report: one row per BatchNorm pattern, rewritten or skipped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from tabulate import tabulate

__all__ = ["ReportRow", "Report"]


@dataclass(frozen=True)
class ReportRow:
    """What happened to one BatchNorm pattern."""

    node: str  # the BN node's name in the traced graph
    module: str  # qualified name of the BN module
    pattern: str  # e.g. "BatchNorm2d+ReLU"
    op: str  # the quantized kernel, e.g. "quantized::batch_norm2d_relu"; "" when skipped
    status: str  # "rewritten" or "skipped"
    reason: str  # why it was skipped, or a note on a rewritten pattern ("" when none)
    dtype: str = ""  # "quint8" / "qint8"
    input_scale: float | None = None
    input_zero_point: int | None = None
    output_scale: float | None = None
    output_zero_point: int | None = None

    def __post_init__(self) -> None:
        if self.status not in ("rewritten", "skipped"):
            raise ValueError(f"status must be 'rewritten' or 'skipped', got {self.status!r}")
        if self.status == "skipped" and not self.reason:
            raise ValueError(f"skipped row {self.node} has no reason")


@dataclass(frozen=True)
class Report:
    """Every BatchNorm pattern ``fxqbn.convert`` found, in graph order."""

    rows: tuple[ReportRow, ...]

    @property
    def rewritten(self) -> tuple[ReportRow, ...]:
        return tuple(row for row in self.rows if row.status == "rewritten")

    @property
    def skipped(self) -> tuple[ReportRow, ...]:
        return tuple(row for row in self.rows if row.status == "skipped")

    def to_dict(self) -> dict:
        return {"rows": [asdict(row) for row in self.rows]}

    def format(self, tablefmt: str = "simple") -> str:
        """The rows as a table in any ``tabulate`` format, with a summary line under it."""
        headers = [field.name for field in fields(ReportRow)]
        table = [[getattr(row, name) for name in headers] for row in self.rows]
        summary = f"{len(self.rewritten)} rewritten, {len(self.skipped)} skipped"
        return tabulate(table, headers=headers, tablefmt=tablefmt, floatfmt=".6g", missingval="-") + "\n" + summary

    def __str__(self) -> str:
        return self.format()
