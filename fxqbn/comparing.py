"""Numeric error of a converted model, per BatchNorm pattern and for the whole output.

For each rewritten pattern, the float model is run on the given inputs and the pattern's float
input ``x`` and float output ``y`` are captured; the quantized module then computes
``dequantize(qbn(quantize(x)))`` from the same ``x`` with the pattern's own qparams. The row gets
the SQNR of that against ``y`` (dB) and the largest ``|error|`` in output quantization steps:
the error the pattern itself adds, input quantization included. The summary gets the SQNR of
the quantized model's outputs against the float model's.

A row's SQNR can look perfect while the model collapses (an outlier channel dominates the BN's
output; the next layer reads the others): with ``sensitivity=True``, or when the model's output
SQNR is under 10 dB (which warns, ``fxqbn.AccuracyWarning``), each pattern's sensitivity is
measured too (``fxqbn.sensitivity``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fxqbn.passes import Prepared, Rewrite, observer_users

from .api import get_report
from .backends import BACKENDS
from .errors import FxqbnError
from .report import Report
from .state import CONVERTED_KEY, LOWERED_KEY, PREPARED_KEY, REPORT_KEY, attach, attached
from .copying import owned_copy
from .sensitivity import LOW_SQNR_DB, Probe, Reference, alone, batches_of, sqnr_db, tensors_in, warn_if_collapsed
from .tracing import trace

__all__ = ["compare", "sqnr_db", "tensors_in"]


class _Capture(fx.Interpreter):
    """Runs a float or observed graph, keeping copies of chosen values; observers pass values through."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str], bypass: set[str]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.wanted, self.bypass = wanted, bypass
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.bypass:
            result = self.env[n.args[0]]  # type: ignore[index]
        else:
            result = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = result.detach().clone()
        return result


def _float_graph(reference: nn.Module) -> fx.GraphModule:
    if attached(reference, PREPARED_KEY) is not None:
        return reference  # the observed graph: float BNs, observers bypassed by _Capture
    training = [name for name, m in reference.named_modules() if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if training:
        raise FxqbnError(f"fxqbn.compare runs the reference model, whose BatchNorm {training[0]!r} is in training mode: call .eval()")
    return trace(owned_copy(reference))  # tracing runs forward with proxies: never on the user's model


def compare(reference: nn.Module, quantized: fx.GraphModule, inputs: Any, sensitivity: bool = False) -> Report:
    """Fill the report's numeric columns by running the float and quantized models on ``inputs``.

    Args:
        reference: the float model given to ``prepare``, or the observed model ``prepare`` returned
            (its observers are bypassed, not fed).
        quantized: the model ``convert`` returned.
        inputs: a tensor, a tuple of tensors (one batch), or a list of batches.
        sensitivity: measure each rewritten pattern's sensitivity too (the model's output SQNR with
            only that pattern quantized): one more forward per pattern per batch.

    Returns:
        The report with ``sqnr_db``, ``max_error_steps`` and the model's output SQNR; it is also
        recorded on ``quantized`` so that ``get_report`` returns it from now on. A model output SQNR
        under 10 dB warns (``fxqbn.AccuracyWarning``) naming the most sensitive patterns, measured
        then unless the report has them already.
    """
    report = get_report(quantized)
    if attached(quantized, LOWERED_KEY) is not None:
        raise FxqbnError("fxqbn.compare takes models from fxqbn.convert; a lowered model's report has no BN-only pipelines to compare")
    rewrites: tuple[Rewrite, ...] = attached(quantized, CONVERTED_KEY).rewrites
    float_gm = _float_graph(reference)
    prepared: Prepared | None = attached(float_gm, PREPARED_KEY)
    bypass = set(observer_users(prepared.patterns if prepared else ()))
    ends, batches = _pattern_ends(float_gm, rewrites), batches_of(inputs)
    errors, model = _errors(float_gm, bypass, quantized, rewrites, ends, batches)
    result = report.with_numbers({name: (error.sqnr_db(), error.max_steps) for name, error in errors.items()}, model.sqnr_db())
    known = any(row.sensitivity_db is not None for row in result.rows)
    if sensitivity or (result.summary.model_sqnr_db < LOW_SQNR_DB and not known):
        probes = [Probe(name, *ends[name], error.pipeline) for name, error in errors.items()]
        result = result.with_sensitivity(Reference(float_gm, bypass, batches).sensitivities(probes))
    attach(quantized, REPORT_KEY, result)
    warn_if_collapsed(result)
    return result


def _errors(
    float_gm: fx.GraphModule, bypass: set[str], quantized: fx.GraphModule, rewrites: tuple[Rewrite, ...],
    ends: dict[str, tuple[str, str]], batches: list[tuple],
) -> tuple[dict[str, "_PatternError"], "_PatternError"]:
    """Each pattern's error (BN node -> its sums), and the model's, over ``batches``."""
    errors = {rw.match.bn_node: _PatternError(rw, quantized) for rw in rewrites}
    model = _PatternError(None, quantized)
    with torch.no_grad():
        for batch in batches:
            capture = _Capture(float_gm, {name for pair in ends.values() for name in pair}, bypass)
            float_out = capture.run(*batch)
            for name, error in errors.items():
                error.add(*(capture.values[n] for n in ends[name]))
            for f, q in zip(tensors_in(float_out), tensors_in(quantized(*batch))):
                model.add_error(f, q)
    return errors, model


def _pattern_ends(float_gm: fx.GraphModule, rewrites: tuple[Rewrite, ...]) -> dict[str, tuple[str, str]]:
    """BN node -> (its input node, the pattern's output node) in the reference graph, from the records."""
    nodes = {node.name for node in float_gm.graph.nodes}
    ends = {rw.match.bn_node: (rw.match.input_node, rw.match.output_node) for rw in rewrites}
    missing = [bn for bn, pair in ends.items() if not {bn, *pair} <= nodes]
    if missing:
        raise FxqbnError(f"the reference model has no BatchNorm node {missing[0]!r}: pass the model given to fxqbn.prepare")
    return ends


class _PatternError:
    """Sums of squares of signal and error (and max |error| in output steps) of one pattern, or of the model."""

    def __init__(self, rewrite: Rewrite | None, quantized: fx.GraphModule) -> None:
        self.signal = self.noise = self.max_steps = 0.0
        self.rewrite, self.pipeline = rewrite, None
        if rewrite is not None:  # the backend's boundaries around the installed module, built once
            backend = BACKENDS[rewrite.backend]
            self.pipeline = alone(
                backend.quantize(rewrite.plan.input.qparams), quantized.get_submodule(rewrite.qmodule),
                backend.dequantize(rewrite.plan.output.qparams),
            )

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The pattern run on its float input ``x`` against its float output ``y``."""
        error = self.add_error(y, self.pipeline(x))
        if error.numel():
            self.max_steps = max(self.max_steps, float(error.abs().max()) / self.rewrite.plan.output.qparams.scale)

    def add_error(self, reference: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
        error = got.double() - reference.double()
        self.signal += float(reference.double().pow(2).sum())
        self.noise += float(error.pow(2).sum())
        return error

    def sqnr_db(self) -> float:
        return sqnr_db(self.signal, self.noise)
