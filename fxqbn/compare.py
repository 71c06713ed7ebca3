"""Numeric error of a converted model, per BatchNorm pattern and for the whole output.

For each rewritten pattern, the float model is run on the given inputs and the pattern's float
input ``x`` and float output ``y`` are captured; the quantized module then computes
``dequantize(qbn(quantize(x)))`` from the same ``x`` with the pattern's own qparams. The row gets
the SQNR of that against ``y`` (dB) and the largest ``|error|`` in output quantization steps:
the error the pattern itself adds, input quantization included. The summary gets the SQNR of
the quantized model's outputs against the float model's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from fxqbn.passes import Rewrite
from fxqbn.passes.observe import OBSERVER_PREFIX

from .api import get_report
from .backends import BACKENDS
from .errors import FxqbnError
from .report import Report
from .state import LOWERED_KEY, PREPARED_KEY, REPORT_KEY, REWRITES_KEY, attach, attached
from .tracing import owned_copy, trace

__all__ = ["compare", "sqnr_db", "tensors_in"]


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise), with signal and noise sums of squares; inf when noise is 0."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


class _Capture(fx.Interpreter):
    """Runs a float or observed graph, keeping copies of chosen values; observers pass values through."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and str(n.target).startswith(OBSERVER_PREFIX):
            result = self.env[n.args[0]]  # type: ignore[index]
        else:
            result = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = result.detach().clone()
        return result


def _batches(inputs: Any) -> list[tuple]:
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    if isinstance(inputs, tuple):
        return [inputs]
    if isinstance(inputs, Iterable):
        return [batch if isinstance(batch, tuple) else (batch,) for batch in inputs]
    raise FxqbnError(f"inputs must be a tensor, a tuple of tensors or a list of batches, got {type(inputs).__name__}")


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    return []


def _float_graph(reference: nn.Module) -> fx.GraphModule:
    if attached(reference, PREPARED_KEY) is not None:
        return reference  # the observed graph: float BNs, observers bypassed by _Capture
    training = [name for name, m in reference.named_modules() if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if training:
        raise FxqbnError(f"fxqbn.compare runs the reference model, whose BatchNorm {training[0]!r} is in training mode: call .eval()")
    return trace(owned_copy(reference))  # tracing runs forward with proxies: never on the user's model


def compare(reference: nn.Module, quantized: fx.GraphModule, inputs: Any) -> Report:
    """Fill the report's numeric columns by running the float and quantized models on ``inputs``.

    Args:
        reference: the float model given to ``prepare``, or the observed model ``prepare`` returned
            (its observers are bypassed, not fed).
        quantized: the model ``convert`` returned.
        inputs: a tensor, a tuple of tensors (one batch), or a list of batches.

    Returns:
        The report with ``sqnr_db``, ``max_error_steps`` and the model's output SQNR; it is also
        recorded on ``quantized`` so that ``get_report`` returns it from now on.
    """
    report = get_report(quantized)
    if attached(quantized, LOWERED_KEY) is not None:
        raise FxqbnError("fxqbn.compare takes models from fxqbn.convert; a lowered model's report has no BN-only pipelines to compare")
    rewrites: tuple[Rewrite, ...] = attached(quantized, REWRITES_KEY)
    float_gm = _float_graph(reference)
    nodes = {node.name: node for node in float_gm.graph.nodes}
    missing = [rw.observed.match.bn_node for rw in rewrites if rw.observed.match.bn_node not in nodes]
    if missing:
        raise FxqbnError(f"the reference model has no BatchNorm node {missing[0]!r}: pass the model given to fxqbn.prepare")
    ends = {rw.observed.match.bn_node: (nodes[rw.observed.match.bn_node].args[0].name, rw.observed.match.output_node) for rw in rewrites}
    wanted = {name for pair in ends.values() for name in pair}
    sums = {name: [0.0, 0.0, 0.0] for name in ends}  # signal, noise, max |error| in steps
    # Each pattern on its own: the backend's boundaries around the installed module, built once.
    pipelines = {
        rw.observed.match.bn_node: torch.nn.Sequential(
            BACKENDS[rw.backend].quantize(rw.input.qparams),
            quantized.get_submodule(rw.qmodule),
            BACKENDS[rw.backend].dequantize(rw.output.qparams),
        )
        for rw in rewrites
    }
    model_signal = model_noise = 0.0
    with torch.no_grad():
        for batch in _batches(inputs):
            capture = _Capture(float_gm, wanted)
            float_out = capture.run(*batch)
            for rw in rewrites:
                name = rw.observed.match.bn_node
                x, y = (capture.values[n] for n in ends[name])
                error = (pipelines[name](x) - y).double()
                acc = sums[name]
                acc[0] += float(y.double().pow(2).sum())
                acc[1] += float(error.pow(2).sum())
                acc[2] = max(acc[2], float(error.abs().max()) / rw.output.qparams.scale if error.numel() else 0.0)
            for f, q in zip(tensors_in(float_out), tensors_in(quantized(*batch))):
                model_signal += float(f.double().pow(2).sum())
                model_noise += float((q.double() - f.double()).pow(2).sum())
    numbers = {name: (sqnr_db(s, n), m) for name, (s, n, m) in sums.items()}
    result = report.with_numbers(numbers, sqnr_db(model_signal, model_noise))
    attach(quantized, REPORT_KEY, result)
    return result
