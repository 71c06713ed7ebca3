"""The public pipeline: ``prepare`` -> calibrate -> ``convert`` -> ``get_report``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from fxqbn.passes import (
    Prepared,
    Rewrite,
    Skip,
    collect_qparams,
    find_patterns,
    insert_observers,
    rewrite_patterns,
)

from .backends import backend_named
from .errors import FxqbnError
from .qconfig import ActivationConfig
from .report import Report, ReportRow
from .tracing import trace

__all__ = ["prepare", "convert", "get_report"]

PREPARED_KEY = "fxqbn_prepared"  # gm.meta key: the Prepared record convert reads
REPORT_KEY = "fxqbn_report"  # gm.meta key: the Report of a converted module


def prepare(model: nn.Module, example_inputs: Any, qconfig: Any = None) -> fx.GraphModule:
    """Trace a copy of ``model`` and insert observers around every quantizable BatchNorm pattern.

    Args:
        model: the float model, in eval mode (a BN in training mode is refused). Never changed.
        example_inputs: a tuple of example inputs (a single tensor is accepted too).
        qconfig: ``None`` (HistogramObserver, full quint8 range), a ``QConfig`` (its activation is
            used), an observer class or ``with_args`` partial, or a ``QConfigMapping`` (per module
            name/type; ``None`` keeps that BN float).

    Returns:
        An observed ``GraphModule``: run calibration batches through it, then call ``convert``.
    """
    if not isinstance(model, nn.Module):
        raise FxqbnError(f"fxqbn.prepare expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise FxqbnError(f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}")
    if isinstance(model, fx.GraphModule) and PREPARED_KEY in model.meta:
        raise FxqbnError("this model was already prepared by fxqbn: calibrate it and call fxqbn.convert")
    config = ActivationConfig(qconfig)
    gm = trace(copy.deepcopy(model))
    matches, skips = find_patterns(gm, config)
    observed = insert_observers(gm, matches)
    gm.graph.lint()
    gm.recompile()
    gm.meta[PREPARED_KEY] = Prepared(patterns=observed, skips=tuple(skips))
    return gm


def convert(observed: fx.GraphModule, inplace: bool = False, backend: str = "native") -> fx.GraphModule:
    """Replace every observed BatchNorm pattern with its quantized module.

    Args:
        observed: the result of ``prepare``, after calibration.
        inplace: rewrite ``observed`` itself instead of a deep copy.
        backend: ``"native"`` (PyTorch's quantized op library on quint8/qint8 tensors, ``fxqbn.nn``)
            or ``"fused"`` (a compiled integer map on plain uint8/int8 tensors, ``fxqbn.fused``).

    Returns:
        The quantized ``GraphModule``; ``get_report`` tells what happened to each BatchNorm.
    """
    chosen = backend_named(backend)
    if not isinstance(observed, fx.GraphModule) or PREPARED_KEY not in observed.meta:
        already = isinstance(observed, fx.GraphModule) and REPORT_KEY in observed.meta
        raise FxqbnError(
            "this model was already converted by fxqbn" if already
            else f"fxqbn.convert expects the GraphModule returned by fxqbn.prepare, got {type(observed).__name__}"
        )
    state: Prepared = observed.meta[PREPARED_KEY]
    qparams = collect_qparams(observed, state.patterns)  # refuse before copying or changing anything
    gm = observed if inplace else copy.deepcopy(observed)
    rewrites = rewrite_patterns(gm, state.patterns, qparams, chosen)
    gm.delete_all_unused_submodules()  # fused nn.ReLU modules
    gm.graph.lint()
    gm.recompile()
    del gm.meta[PREPARED_KEY]
    gm.meta[REPORT_KEY] = _report(rewrites, state.skips)
    return gm


def get_report(gm: nn.Module) -> Report:
    """The report ``convert`` recorded on ``gm``."""
    report = getattr(gm, "meta", {}).get(REPORT_KEY) if isinstance(gm, fx.GraphModule) else None
    if report is None:
        raise FxqbnError("no fxqbn report on this module: pass the GraphModule returned by fxqbn.convert")
    return report


def _report(rewrites: tuple[Rewrite, ...], skips: tuple[Skip, ...]) -> Report:
    rows: list[tuple[int, ReportRow]] = []
    for rewrite in rewrites:
        match = rewrite.observed.match
        qin, qout = rewrite.input_qparams, rewrite.output_qparams
        row = ReportRow(
            node=match.bn_node, module=match.module, pattern=match.rule.name, op=rewrite.op or match.rule.op,
            status="rewritten", reason=match.note, dtype=str(qout.dtype).removeprefix("torch."),
            input_scale=qin.scale, input_zero_point=qin.zero_point,
            output_scale=qout.scale, output_zero_point=qout.zero_point,
        )
        rows.append((match.position, row))
    for skip in skips:
        row = ReportRow(node=skip.node, module=skip.module, pattern=skip.pattern, op="", status="skipped", reason=skip.reason)
        rows.append((skip.position, row))
    return Report(rows=tuple(row for _, row in sorted(rows, key=lambda item: item[0])))
