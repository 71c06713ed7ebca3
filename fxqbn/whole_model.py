"""Whole-model int8, then lowering: the pipeline behind ``fxqbn convert MODEL --int8 ao|pt2e``.

* ``ao``: torch.ao FX, ``prepare_fx`` with ``get_default_qconfig_mapping("x86")``, calibrate, ``convert_fx``;
* ``pt2e``: ``torch.export``, ``prepare_pt2e`` with ``X86InductorQuantizer``, calibrate, ``convert_pt2e``
  (needs the optional dependency: ``pip install "fxqbn[pt2e]"``).

``quantize_whole_model`` returns the int8 model with its BNs int8 too: torch.ao's through ``fxqbn.lower``
(``lower_every_bn``: every BN of the float model gets a row; those ``prepare_fx`` folded into the conv
or linear before them are gone from the int8 graph, and are reported "folded"), PT2E's through
``fxqbn.pt2e`` (a correct conv -> BN fold, ``BatchNormQuantizer``; its report has every row). ``int8_model``
gives what torch.ao or torchao's own functions make, before lowering. The user's model is never
changed. The deprecation notices torch.ao prints on every call, the log lines torchao's import writes
about its CUDA-only extensions, and the "No CUDA runtime" line of torch's CUDA builds without a GPU
are silenced here (message by message, around those calls and imports only).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import replace
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn

from fxqbn.passes import AO_INT8, PREPARED, PT2E_INT8, Skip, find_patterns, needs_shapes
from fxqbn.passes.fold import fold_rule

from .copying import owned_copy
from .errors import FxqbnError
from .lowering import lower
from .report import folded_row
from .state import REPORT_KEY, attach, attached
from .tracing import propagate_shapes, trace_graph

__all__ = ["ROUTES", "FOLDED_BY", "int8_model", "lower_every_bn", "quantize_whole_model", "import_pt2e"]

ROUTES = {"ao": AO_INT8.name, "pt2e": PT2E_INT8.name}  # `--int8 ROUTE` -> the int8 graphs it makes
FOLDED_BY = {"ao": "torch.ao prepare_fx", "pt2e": "torchao prepare_pt2e"}  # what folds BNs on each route
# Warnings torch.ao emits on every call of prepare_fx / convert_fx (regexes matched at the message start).
_AO_WARNINGS = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max to specify the range for observers",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation functions",
)
# Log records torchao's import writes on a CPU machine: its CUDA-only extensions fail to load, and
# torch warns about one of its enums. (logger name, message prefix)
_TORCHAO_IMPORT_LOGS = (
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass"),
    # torch's CUDA builds on a machine without a GPU (torch 2.14.1 here), when the PT2E result's fused
    # kernels compile with inductor, which imports torch.utils.cpp_extension: imported here, quietly
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _quiet_logs(rules: Iterable[tuple[str, str]]) -> Iterator[None]:
    installed = [(logging.getLogger(name), _DropPrefix(prefix)) for name, prefix in rules]
    for logger, rule in installed:
        logger.addFilter(rule)
    try:
        yield
    finally:
        for logger, rule in installed:
            logger.removeFilter(rule)


@contextlib.contextmanager
def _quiet_ao() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _AO_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


@contextlib.contextmanager
def quiet_torchao_import() -> Iterator[None]:
    """Around an import of torchao: without the log lines its CPU import writes (see _TORCHAO_IMPORT_LOGS)."""
    with _quiet_logs(_TORCHAO_IMPORT_LOGS):
        import torch.utils.cpp_extension  # noqa: F401

        yield


def import_pt2e() -> tuple[Any, Any, Any, Any]:
    """(prepare_pt2e, convert_pt2e, X86InductorQuantizer, its default config), imported quietly;
    FxqbnError naming the extra when torchao is not installed."""
    try:
        with quiet_torchao_import():
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer,
                get_default_x86_inductor_quantization_config,
            )
    except ImportError as exc:
        raise FxqbnError(f'the PT2E route needs torchao: pip install "fxqbn[pt2e]" ({exc})') from None
    return prepare_pt2e, convert_pt2e, X86InductorQuantizer, get_default_x86_inductor_quantization_config


def _calibrate(model: nn.Module, batches: Iterable[tuple]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(*batch)


def _ao(model: nn.Module, example_inputs: tuple, batches: list[tuple]) -> fx.GraphModule:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with _quiet_ao():
        observed = prepare_fx(owned_copy(model), get_default_qconfig_mapping("x86"), example_inputs)
        _calibrate(observed, batches)
        return convert_fx(observed)


def _exported(model: nn.Module, example_inputs: tuple, batches: list[tuple]) -> fx.GraphModule:
    """``model`` exported with a dynamic batch dimension, from the inputs with the largest batch (export fixes a batch of 1)."""
    sample = max([example_inputs, *batches], key=lambda b: b[0].shape[0] if b and isinstance(b[0], torch.Tensor) and b[0].dim() else 0)
    batch = tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() else None for x in sample)
    return torch.export.export(owned_copy(model), sample, dynamic_shapes=batch).module()


def _pt2e(model: nn.Module, example_inputs: tuple, batches: list[tuple]) -> fx.GraphModule:
    prepare_pt2e, convert_pt2e, quantizer_class, default_config = import_pt2e()
    exported = _exported(model, example_inputs, batches)
    quantizer = quantizer_class().set_global(default_config())
    observed = prepare_pt2e(exported, quantizer)
    _calibrate(observed, batches)
    return convert_pt2e(observed)


def int8_model(model: nn.Module, example_inputs: Any, calib_batches: Iterable[Any], route: str) -> fx.GraphModule:
    """``model`` quantized whole to int8 through ``route`` ("ao" or "pt2e"), calibrated on ``calib_batches``
    (tensors or tuples of inputs), before lowering."""
    if route not in ROUTES:
        raise FxqbnError(f"unknown int8 route {route!r}: choose one of {', '.join(repr(r) for r in ROUTES)}")
    return (_ao if route == "ao" else _pt2e)(*_checked(model, example_inputs, calib_batches))


def _checked(model: nn.Module, example_inputs: Any, calib_batches: Iterable[Any]) -> tuple[nn.Module, tuple, list[tuple]]:
    """(model, example inputs as a tuple, batches as tuples) once they are fit to quantize; FxqbnError otherwise."""
    if not isinstance(model, nn.Module):
        raise FxqbnError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise FxqbnError("the model is in training mode: call model.eval() before quantizing it")
    example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    batches = [(b,) if isinstance(b, torch.Tensor) else tuple(b) for b in calib_batches]
    if not batches:
        raise FxqbnError("no calibration batches: pass at least one")
    return model, example, batches


def quantize_whole_model(
    model: nn.Module, example_inputs: Any, calib_batches: Iterable[Any], route: str, backend: str | None = None, bn: str = "int8",
) -> fx.GraphModule:
    """Whole-model int8 with int8 BNs: ``ao``: ``int8_model`` then ``fxqbn.lower``; ``pt2e``: ``fxqbn.pt2e``'s
    route (a correct conv -> BN fold; with ``bn="int8"`` every BN that does not fold int8)."""
    if route != "pt2e":
        return lower_every_bn(model, example_inputs, int8_model(model, example_inputs, calib_batches, route), route, backend)
    return _fxqbn_pt2e(*_checked(model, example_inputs, calib_batches), backend, bn)


def _fxqbn_pt2e(model: nn.Module, example_inputs: tuple, batches: list[tuple], backend: str | None, bn: str) -> fx.GraphModule:
    from . import pt2e

    _, _, quantizer_class, default_config = import_pt2e()
    prepared = pt2e.prepare_pt2e(_exported(model, example_inputs, batches), quantizer_class().set_global(default_config()), bn=bn)
    _calibrate(prepared, batches)
    return pt2e.convert_pt2e(prepared, backend=backend)


def lower_every_bn(model: nn.Module, example_inputs: Any, int8: fx.GraphModule, route: str,
                   backend: str | None = None) -> fx.GraphModule:
    """``fxqbn.lower(int8)``, whose report then has a row for every BN of the float ``model`` that
    ``int8`` (made from it through ``route``) no longer holds: status "folded", naming the conv or
    linear it went into where the float graph shows one, and what folded it."""
    lowered = lower(int8, backend=backend)
    report = attached(lowered, REPORT_KEY)
    reported = {row.module for row in report.rows}
    bns, nodes = _float_bns(model, example_inputs)
    folded = [folded_row(bn.node, bn.module, bn.pattern, _fed_by(nodes[bn.node], model), bn.source, by=FOLDED_BY[route])
              for bn in bns if bn.module not in reported]
    if folded:
        order = {bn.module: i for i, bn in enumerate(bns)}  # rows the float model does not name go last
        rows = tuple(sorted([*report.rows, *folded], key=lambda row: order.get(row.module, len(order))))
        attach(lowered, REPORT_KEY, replace(report, rows=rows, summary=replace(report.summary, folded=report.summary.folded + len(folded))))
    return lowered


def _float_bns(model: nn.Module, example_inputs: Any) -> tuple[list[Skip], dict[str, fx.Node]]:
    """Every BN of the float ``model``, found as ``fxqbn.prepare`` finds them (as skips: nothing is
    observed), in graph order; and the traced graph's nodes by name."""
    copy = owned_copy(model)
    graph = trace_graph(copy)
    if needs_shapes(graph, copy):  # an F.batch_norm's kind is its input's rank
        propagate_shapes(copy, graph, (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs))
    found = find_patterns(graph, copy, PREPARED, lambda *_: "not observed")
    return found.skips, {node.name: node for node in graph.nodes}


def _fed_by(bn: fx.Node, model: nn.Module) -> str:
    """The conv / linear module (a producer of ``passes.fold.FOLDS``) whose call feeds ``bn`` ("" when another node does)."""
    source = bn.args[0] if bn.args else None
    if isinstance(source, fx.Node) and source.op == "call_module" and fold_rule(source, {str(source.target): model.get_submodule(str(source.target))}):
        return str(source.target)
    return ""
