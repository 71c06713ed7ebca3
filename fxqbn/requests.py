"""What ``fxqbn convert`` and ``fxqbn report`` were asked to do, as typed records, and what the command line
(``fxqbn.cli``) and the work (``fxqbn.command``) both use: the built-in model, MODEL's file, usage errors.

Imports no torch: ``fxqbn.cli`` builds these records before PyTorch loads; ``fxqbn.command`` works from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .report import COLUMNS, DEFAULT_COLUMNS, FORMATS, WIDTH

__all__ = ["BUILTIN_MODEL", "UsageError", "usage", "first_line", "model_file",
           "Table", "Data", "Quantization", "Outputs", "ConvertRequest", "ReportRequest"]

BUILTIN_MODEL = "fxqbn.models:densenet_bc"


class UsageError(Exception):
    """The command line is wrong: exit status 2."""


def usage(prog: str, message: str) -> UsageError:
    return UsageError(f"{prog}: error: {message}")


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def model_file(spec: str | None) -> str | None:
    """The file MODEL names (``path/to/file.py:factory``), or None for ``package.module:factory``."""
    target = (spec or "").rpartition(":")[0]
    return target if target.endswith(".py") or "/" in target or os.sep in target else None


@dataclass(frozen=True)
class Table:
    """How the report is shown: ``--format``, ``--columns``, ``--wide``."""

    format: str = "plain"
    columns: tuple[str, ...] = DEFAULT_COLUMNS
    wide: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS or not set(self.columns) <= set(COLUMNS):
            raise ValueError(f"a format of {FORMATS} and columns of {tuple(COLUMNS)}, not {self}")

    @property
    def shown(self) -> tuple[str, ...]:
        """The columns of a table: every one with ``--wide`` alone."""
        return tuple(COLUMNS) if self.wide and self.columns == DEFAULT_COLUMNS else self.columns

    @property
    def width(self) -> int | None:
        return None if self.wide else WIDTH


@dataclass(frozen=True)
class Data:
    """The model's inputs (``--input-shape``, else the factory's) and the calibration batches: ``--calib``'s file or
    folder, else ``--calib-batches`` random ones; ``--seed`` seeds the random ones."""

    input_shapes: tuple[tuple[int, ...], ...] = ()
    calib: str | None = None
    calib_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calib_batches <= 0 or any(not shape or min(shape) <= 0 for shape in self.input_shapes):
            raise ValueError(f"calib_batches and every input shape's dimensions must be positive: {self}")


@dataclass(frozen=True)
class Quantization:
    """The BN-only conversion's ``--observer``, ``--dtype``, ``--skip``, ``--min-sqnr`` and ``--no-fold``, or
    ``--int8``'s whole-model route (``--bn``); ``--backend``."""

    observer: str = "histogram"
    dtype: str = "quint8"
    backend: str | None = None  # None: native, or fused with --int8 pt2e
    int8: str | None = None
    skip: tuple[str, ...] = ()
    bn: str = "int8"  # --int8 pt2e: "int8" (standalone BNs int8) or "float" (only the conv -> BN fold corrected)
    min_sqnr: float | None = None  # dB: keep float the BN patterns whose sensitivity is under it
    fold: bool = True  # fold a BN after a conv / linear into it (fxqbn.prepare's fold); --no-fold: False

    def describe(self) -> str:
        if self.int8:
            return f"whole-model int8 via {self.int8}, BNs " + ("kept float (fold corrected)" if self.bn == "float" else "lowered")
        kept = "" if self.min_sqnr is None else f", BNs with sensitivity under {self.min_sqnr:g} dB kept float"
        return f"{self.observer} observer, {self.dtype}{kept}" + ("" if self.fold else ", no folding")

    def settings(self) -> dict[str, Any]:
        """What the JSON document says was asked: --int8's route (its quantizer picks observers and dtypes;
        --skip, --min-sqnr and --no-fold are refused with it), or the BN-only conversion's observer, dtype,
        skipped modules, sensitivity threshold and folding."""
        if self.int8 == "pt2e":
            return {"int8": self.int8, "bn": self.bn}
        if self.int8:
            return {"int8": self.int8}
        return {"observer": self.observer, "dtype": self.dtype, "skip": list(self.skip), "min_sqnr": self.min_sqnr, "fold": self.fold}


@dataclass(frozen=True)
class Outputs:
    """The files ``fxqbn convert`` writes: ``--out`` (fxqbn.save), ``--torchscript``, ``--report``."""

    out: str | None = None
    torchscript: str | None = None
    report: str | None = None

    def named(self) -> dict[str, str]:
        """Each file asked for, by its option."""
        return {f"--{name}": path for name, path in vars(self).items() if path is not None}

    def written(self) -> list[str]:
        """The lines saying what was written (``saved: q.pt``)."""
        return [f"{what}: {path}" for what, path in (("saved", self.out), ("torchscript", self.torchscript), ("report", self.report)) if path]


@dataclass(frozen=True)
class ConvertRequest:
    """``fxqbn convert``: MODEL (None: the built-in DenseNet-BC), its data, the quantization, the outputs, the report."""

    model: str | None = None
    data: Data = Data()
    quantization: Quantization = Quantization()
    outputs: Outputs = Outputs()
    table: Table = Table()
    verify: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        """--out, --skip, --min-sqnr and --no-fold belong to the BN-only conversion: refused with --int8."""
        asked = {"--out": self.outputs.out, "--skip": self.quantization.skip, "--min-sqnr": self.quantization.min_sqnr is not None,
                 "--no-fold": not self.quantization.fold}
        refused = next((option for option, given in asked.items() if given), None)
        if self.quantization.int8 and refused:
            raise usage("fxqbn convert", f"argument --int8: {refused} is not supported with --int8 "
                        "(fxqbn.save stores BN-only conversions; --skip, --min-sqnr and --no-fold are fxqbn.prepare's / convert's)")

    @property
    def spec(self) -> str:
        return self.model or BUILTIN_MODEL

    @property
    def verifies(self) -> bool:
        """--verify, implied by `fxqbn convert` alone (no MODEL and no --calib)."""
        return self.verify or (self.model is None and self.data.calib is None)

    @property
    def held_out_for(self) -> str | None:
        """The option that needs a batch held out of calibration (--verify, else --min-sqnr), or None."""
        if self.verifies:
            return "--verify"
        return "--min-sqnr" if self.quantization.min_sqnr is not None else None


@dataclass(frozen=True)
class ReportRequest:
    """``fxqbn report PATH``: the saved model's file and how to show its report."""

    path: str
    table: Table = Table()
    quiet: bool = False
