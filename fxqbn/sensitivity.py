"""Sensitivity: the model's output SQNR against float with only one BN pattern quantized, on held-out inputs.

A pattern's row SQNR (``fxqbn.compare``) measures its error against its own output, which a few large
channels may dominate while the rest of the model reads the small ones. Sensitivity measures what the
rest of the model reads: the float graph (the observed model with its observers passing values
through, or the traced float model) is run once per held-out batch for the reference outputs, then
once more per pattern per batch with that pattern's output replaced by its int8 module's (behind its
own quantize and dequantize, on the pattern's float input). Nothing is observed or changed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import fx, nn

from .errors import AccuracyWarning, FxqbnError
from .report import Report

__all__ = ["LOW_SQNR_DB", "Probe", "Reference", "alone", "batches_of", "sqnr_db", "tensors_in", "warn_if_collapsed",
           "collapse_head", "collapse_message", "check_threshold"]

LOW_SQNR_DB = 10.0  # a model output SQNR under this warns (AccuracyWarning): its outputs are mostly error
NAMED = 3  # the most sensitive patterns a warning names


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise), with signal and noise sums of squares; inf when noise is 0."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    return []


def batches_of(inputs: Any, what: str = "inputs") -> list[tuple]:
    """A tensor, a tuple of tensors (one batch) or an iterable of batches, as a list of argument tuples."""
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    if isinstance(inputs, tuple):
        return [inputs]
    if isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes, dict)):
        batches = [batch if isinstance(batch, tuple) else (batch,) for batch in inputs]
        if not batches:
            raise FxqbnError(f"{what} holds no batch: pass a tensor, a tuple of tensors or a non-empty list of batches")
        return batches
    raise FxqbnError(f"{what} must be a tensor, a tuple of tensors or a list of batches, got {type(inputs).__name__}")


def check_threshold(value: Any, name: str = "keep_float_below") -> float:
    """A threshold in dB: a real, non-NaN number (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise FxqbnError(f"{name} must be a number of dB (e.g. {name}=20), got {type(value).__name__} {value!r}")
    return float(value)


def alone(quantize: nn.Module, module: nn.Module, dequantize: nn.Module) -> nn.Module:
    """A pattern's int8 module between its own quantize and dequantize: what it computes between float code."""
    return nn.Sequential(quantize, module, dequantize)


class Probe(NamedTuple):
    """One pattern to quantize alone: its BN node (the report's row), its ends in the float graph, its module."""

    node: str
    input: str  # the node whose value the pattern reads
    output: str  # the node whose value the pattern gives its readers
    module: nn.Module  # float in, float out (``alone``)


class _Run(fx.Interpreter):
    """The float graph, observers passing values through, with (optionally) one pattern's output replaced."""

    def __init__(self, gm: fx.GraphModule, bypass: set[str], probe: Probe | None) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.bypass, self.probe, self.entry = bypass, probe, None

    def run_node(self, n: fx.Node) -> Any:
        if self.probe is not None and n.name == self.probe.output:
            return self.probe.module(self.entry)
        result = self.env[n.args[0]] if n.name in self.bypass else super().run_node(n)  # type: ignore[index]
        if self.probe is not None and n.name == self.probe.input:
            self.entry = result  # kept: the values of the fused nodes between are freed before the output
        return result


def _floats(value: Any) -> list[torch.Tensor]:
    return [t.detach().double() for t in tensors_in(value) if t.is_floating_point()]


class Reference:
    """The float graph's outputs on held-out batches, against which a model's or one pattern's are measured.

    ``gm``: a float graph; ``bypass``: its observer nodes (they pass their input through and observe nothing).
    """

    def __init__(self, gm: fx.GraphModule, bypass: Iterable[str], batches: Sequence[tuple]) -> None:
        self.gm, self.bypass, self.batches = gm, set(bypass), list(batches)
        self.outputs = [_floats(self._guarded(lambda b: _Run(gm, self.bypass, None).run(*b), i)) for i in range(len(self.batches))]

    def _guarded(self, run: Callable[[tuple], Any], i: int) -> Any:
        batch = self.batches[i]
        try:
            with torch.no_grad():
                return run(batch)
        except FxqbnError:
            raise
        except Exception as exc:
            shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in batch)
            raise FxqbnError(f"held-out batch {i} ({shapes}) does not fit the model: {type(exc).__name__}: {exc}") from exc

    def sqnr_of(self, run: Callable[[tuple], Any]) -> float:
        """The SQNR (dB) of ``run``'s outputs against the float ones, over every batch."""
        signal = noise = 0.0
        for i, reference in enumerate(self.outputs):
            got = _floats(self._guarded(run, i))
            for r, g in zip(reference, got):
                signal += float(r.pow(2).sum())
                noise += float((g - r).pow(2).sum())
        return sqnr_db(signal, noise)

    def sensitivity(self, probe: Probe) -> float:
        """The model's output SQNR with only ``probe``'s pattern quantized: one forward per batch."""
        return self.sqnr_of(lambda batch: _Run(self.gm, self.bypass, probe).run(*batch))

    def sensitivities(self, probes: Iterable[Probe]) -> dict[str, float]:
        """BN node -> sensitivity (dB) of each probe's pattern."""
        return {probe.node: self.sensitivity(probe) for probe in probes}

    def model_sqnr(self, model: nn.Module) -> float:
        """The SQNR (dB) of ``model``'s outputs against the float ones."""
        return self.sqnr_of(lambda batch: model(*batch))


def _most_sensitive(report: Report) -> list[str]:
    rows = [(row.sensitivity_db, i, row) for i, row in enumerate(report.rows) if row.sensitivity_db is not None]
    return [f"'{row.module}' {db:.1f} dB" for db, _, row in sorted(rows, key=lambda item: item[:2])[:NAMED]]


def collapse_head(sqnr: float) -> str:
    """What a model output SQNR under LOW_SQNR_DB says (the start of every collapse warning)."""
    return f"the quantized model's output SQNR is {sqnr:.1f} dB (under {LOW_SQNR_DB:g} dB): its outputs are mostly error"


def collapse_message(report: Report) -> str | None:
    """What a model output SQNR under LOW_SQNR_DB means and what to do (None when it is not under)."""
    sqnr = report.summary.model_sqnr_db
    if sqnr is None or sqnr >= LOW_SQNR_DB:
        return None
    head = collapse_head(sqnr)
    named = _most_sensitive(report)
    if not named:
        return (f"{head}; measure each BN pattern's sensitivity with fxqbn.compare(..., sensitivity=True) or "
                "fxqbn.convert(observed, inputs=held_out)")
    return (f"{head}; the most sensitive BN patterns (the model's output SQNR with only that one quantized): "
            f"{', '.join(named)}; keep such patterns float with fxqbn.convert(observed, keep_float_below=DB, "
            "inputs=held_out) or `fxqbn convert --min-sqnr DB`")


def warn_if_collapsed(report: Report, stacklevel: int = 3) -> None:
    """An ``AccuracyWarning`` when the report's model output SQNR is under LOW_SQNR_DB."""
    message = collapse_message(report)
    if message is not None:
        warnings.warn(message, AccuracyWarning, stacklevel=stacklevel)

