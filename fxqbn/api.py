"""The public pipeline: ``prepare`` -> calibrate -> ``convert`` -> ``get_report``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from fxqbn.passes import (
    Converted,
    Observed,
    Prepared,
    Rewrite,
    Skip,
    adopt_observers,
    find_patterns,
    insert_observers,
    is_torch_ao_observed,
    needs_shapes,
    read_observers,
    rewrite_patterns,
)
from fxqbn.passes.modules import ModuleIndex
from fxqbn.passes.rewrite import bn_tensors

from . import fused
from . import nn as qnn
from .errors import FxqbnError
from .float_io import FloatIO
from .backends import Backend, backend_named
from .qconfig import ActivationConfig
from .report import Report, ReportRow, ReportSummary, skipped_row
from .state import CONVERTED_KEY, PREPARED_KEY, REPORT_KEY, attach, attached, detach
from .copying import owned_copies, owned_copy
from .tracing import build_graph_module, propagate_shapes, set_training_flags, trace_graph

__all__ = ["prepare", "convert", "get_report"]


def prepare(model: nn.Module, example_inputs: Any, qconfig: Any = None, skip: Iterable[Any] = ()) -> fx.GraphModule:
    """Trace ``model`` and insert observers around every quantizable BatchNorm pattern.

    Args:
        model: the float model, in eval mode (a BN in training mode is refused). Never changed.
        example_inputs: a tuple of example inputs (a single tensor is accepted too).
        qconfig: ``None`` (HistogramObserver, full quint8 range), a ``QConfig`` (its activation is
            used), an observer class or ``with_args`` partial, or a ``QConfigMapping`` (per module
            name/type; ``None`` keeps that BN float).
        skip: BNs to keep float: module names (a name covers the modules inside it) and types
            (e.g. ``nn.BatchNorm1d``, or ``torch.nn.functional.batch_norm``); reported as skipped.

    ``model`` is run once on ``example_inputs`` (in eval mode, without gradients) when it calls
    ``F.batch_norm``, whose kernel depends on the input's rank; otherwise it is only traced.

    Returns:
        An observed ``GraphModule``: run calibration batches through it, then call ``convert``.
        It owns a copy of ``model`` (tracing runs forward on that copy too): nothing done to it,
        ``train()`` and calibration included, reaches ``model``. ``convert`` returns a model
        that shares nothing with either.
    """
    if not isinstance(model, nn.Module):
        raise FxqbnError(f"fxqbn.prepare expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise FxqbnError(f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}")
    refuse_fxqbn_output(model)
    return prepare_owned(owned_copy(model), tuple(example_inputs), qconfig, skip)


def prepare_owned(model: nn.Module, example_inputs: tuple, qconfig: Any = None, skip: Iterable[Any] = ()) -> fx.GraphModule:
    """``prepare`` of a model nobody else holds (e.g. ``fxqbn.load``'s own copy): the observed
    model takes its modules, uncopied."""
    config = ActivationConfig(qconfig)
    skip_requested = _skip_predicate(model, skip)
    graph = trace_graph(model)
    if needs_shapes(graph, model):
        propagate_shapes(model, graph, example_inputs)  # F.batch_norm's, SyncBatchNorm's kernel: the input's rank
    matches, skips = find_patterns(graph, model, config, skip_requested)
    # Known now: refuse bad statistics before calibration meets them (convert checks again).
    index = ModuleIndex(model)
    qnn.check_many([(match.module, bn_tensors(model, match, index)) for match in matches])
    observed, observers = insert_observers(graph, model, matches)
    graph.lint()
    gm = build_graph_module(model, graph, observers)
    attach(gm, PREPARED_KEY, Prepared(patterns=observed, skips=tuple(skips)))
    return gm


# What convert installs: a model holding one of these was converted already.
_CONVERTED_MODULES = (
    qnn._QuantizedBatchNorm, qnn.Quantize, qnn.DeQuantize, fused.FusedBatchNorm, fused.FusedQuantize, fused.FusedDeQuantize, FloatIO,
)


def refuse_fxqbn_output(model: nn.Module) -> None:
    """Refuse a model (or one holding a module) that fxqbn already prepared or converted."""
    for name, module in model.named_modules():
        where = f" (module '{name}')" if name else ""
        if attached(module, PREPARED_KEY) is not None:
            raise FxqbnError(f"this model{where} was already prepared by fxqbn: calibrate it and call fxqbn.convert")
        if attached(module, REPORT_KEY) is not None or isinstance(module, _CONVERTED_MODULES):
            raise FxqbnError(
                f"this model{where} was already converted by fxqbn: pass the float model it was converted from"
            )


def _refuse_training(index: ModuleIndex, patterns: Iterable[Observed]) -> None:
    """Refuse BN modules in training mode: their float forward uses batch statistics, not the
    running ones a quantized BN computes with (and calibration in training mode moved those)."""
    for pattern in patterns:
        match, name = pattern.match, pattern.match.module
        if match.bn_module is not None and index.module(match.bn_module).training:
            raise FxqbnError(
                f"BatchNorm '{name}' is in training mode: call .eval() on the observed model before fxqbn.convert "
                "(calibration in training mode moved its running statistics: prepare again from the float model)"
            )


def convert(observed: fx.GraphModule, inplace: bool = False, backend: str = "native") -> fx.GraphModule:
    """Replace every observed BatchNorm pattern with its quantized module.

    Args:
        observed: the result of ``prepare``, after calibration; or a GraphModule observed and
            calibrated by torch.ao's ``prepare_fx``: its observed BN / BN+ReLU patterns are
            converted, its other observers removed (listed in the report's ``dropped``).
        inplace: rewrite ``observed`` itself instead of building a new GraphModule.
        backend: ``"native"`` (PyTorch's quantized op library on quint8/qint8 tensors, ``fxqbn.nn``)
            or ``"fused"`` (fxqbn's C integer kernels on plain uint8/int8 tensors, ``fxqbn.fused``).

    Returns:
        The quantized ``GraphModule``; ``get_report`` tells what happened to each BatchNorm. It
        holds its own copies of everything it keeps from the float model. A pattern between float
        code is one ``fxqbn.float_io.FloatIO`` (quantize, quantized module, dequantize).
    """
    return convert_laid_out(observed, inplace, backend, float_io=True)


def convert_laid_out(observed: fx.GraphModule, inplace: bool, backend: str, float_io: bool) -> fx.GraphModule:
    """``convert``, choosing the layout: ``float_io`` False keeps every boundary a node of its own (the
    layout of fxqbn.save format 1 files, which ``load`` rebuilds)."""
    start = time.perf_counter()
    gm, state, converted = _convert(observed, inplace, backend_named(backend), float_io)
    attach(gm, REPORT_KEY, _report(state, converted, time.perf_counter() - start))
    return gm


def _convert(observed: fx.GraphModule, inplace: bool, chosen: Backend, float_io: bool) -> tuple[fx.GraphModule, Prepared, Converted]:
    """convert's steps: read the state, refuse, read the observers, rewrite a graph, install it."""
    state = _prepared_state(observed)
    index = ModuleIndex(observed)  # observed's tree does not change until _install
    _refuse_training(index, state.patterns)
    readings = read_observers(observed, state.patterns, index)  # refuse before copying or changing anything
    graph, converted, new_modules = rewrite_patterns(
        observed.graph, observed, state.patterns, readings, chosen, state.dropped, index, float_io
    )
    gm = _install(observed, graph, new_modules, inplace, index)
    detach(gm, PREPARED_KEY)
    attach(gm, CONVERTED_KEY, converted)
    return gm, state, converted


def _prepared_state(observed: nn.Module) -> Prepared:
    """What ``prepare`` recorded on ``observed``, or what a torch.ao-observed graph holds."""
    state: Prepared | None = attached(observed, PREPARED_KEY)
    if state is None and attached(observed, REPORT_KEY) is None and is_torch_ao_observed(observed):
        state = adopt_observers(observed)
    if state is None:
        raise FxqbnError(
            "this model was already converted by fxqbn" if attached(observed, REPORT_KEY) is not None
            else f"fxqbn.convert expects the GraphModule returned by fxqbn.prepare, got {type(observed).__name__}"
        )
    return state


def _install(
    observed: fx.GraphModule, graph: fx.Graph, new_modules: dict[str, nn.Module], inplace: bool, index: ModuleIndex
) -> fx.GraphModule:
    """The converted GraphModule: ``observed`` updated in place, or a new one; either way owning
    copies of its float parts (a torch.ao-observed graph shares them with the model ``prepare_fx`` took).
    ``graph`` is not linted here: ``rewrite_patterns`` emits it in one pass in the observed graph's
    order, and the tests lint what it emits (about 4% of convert on 1,000 BNs)."""
    if inplace:
        gm = observed
        set_training_flags(new_modules, observed)  # from observed's tree before the additions
        for target, module in new_modules.items():
            parent, _, leaf = target.rpartition(".")
            try:
                index.module(parent).add_module(leaf, module)
            except AttributeError:  # a new container
                gm.add_submodule(target, module)
        gm.graph = graph  # generates its code
        gm.delete_all_unused_submodules()  # observers, fused activation modules
    else:
        gm = build_graph_module(observed, graph, new_modules, class_name=type(observed).__name__)
    _own_float_parts(gm, new_modules)
    return gm


def _report(state: Prepared, converted: Converted, seconds: float) -> Report:
    summary = ReportSummary(
        rewritten=len(converted.rewrites),
        skipped=len(state.skips),
        quantize_nodes=converted.boundary_counts()[0],
        dequantize_nodes=converted.boundary_counts()[1],
        convert_seconds=seconds,
    )
    dropped = tuple(f"{d.observer} on {d.observed}: not part of a BN pattern; removed, left float" for d in state.dropped)
    return Report(rows=_rows(converted.rewrites, state.skips), summary=summary, dropped=dropped)


def get_report(gm: nn.Module) -> Report:
    """The report ``convert`` recorded on ``gm`` (with numbers once ``fxqbn.compare`` ran)."""
    report = attached(gm, REPORT_KEY)
    if report is None:
        raise FxqbnError("no fxqbn report on this module: pass the GraphModule returned by fxqbn.convert")
    return report


def _own_float_parts(gm: fx.GraphModule, ours: Iterable[str]) -> None:
    """Give ``gm`` its own copies of the modules and tensors it still shares with the float model
    (one copy per shared object, so a module called twice stays one module); ``ours`` are the
    targets of the modules convert made."""
    ours, index = set(ours), ModuleIndex(gm)
    places: list[tuple[nn.Module, str, Any]] = []  # (parent, leaf name, the shared module or tensor)
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in ours:
            parent_name, _, leaf = str(node.target).rpartition(".")
            parent = index.module(parent_name)
            value = getattr(parent, leaf)
            if isinstance(value, (nn.Module, torch.Tensor)):
                places.append((parent, leaf, value))
    # one copy per shared object; a Parameter stays a Parameter; a module's copy detaches what its forward cached
    shared = list({id(v): v for _, _, v in places}.values())
    copies = dict(zip(map(id, shared), owned_copies(shared)))
    for parent, leaf, value in places:
        if isinstance(value, nn.Module):
            parent.add_module(leaf, copies[id(value)])
        else:
            setattr(parent, leaf, copies[id(value)])


def _skip_predicate(model: nn.Module, skip: Iterable[Any]) -> Callable[[str, object], bool]:
    """(module name, module type or function) -> whether ``prepare``'s ``skip`` names it."""
    if isinstance(skip, (str, type)):
        skip = [skip]
    names, kinds = set(), set()
    for item in skip:
        if isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError:
                raise FxqbnError(f"skip names module {item!r}, which the model does not have") from None
            names.add(item)
        elif isinstance(item, type) or callable(item):
            kinds.add(item)
        else:
            raise FxqbnError(f"skip takes module names and types, got {item!r}")

    def requested(name: str, kind: object) -> bool:
        return kind in kinds or any(name == n or name.startswith(n + ".") for n in names)

    return requested


def _rows(rewrites: tuple[Rewrite, ...], skips: tuple[Skip, ...]) -> tuple[ReportRow, ...]:
    rows: list[tuple[int, ReportRow]] = []
    for rewrite in rewrites:
        match, obs_in, obs_out = rewrite.observed.match, rewrite.input, rewrite.output
        row = ReportRow(
            node=match.bn_node, module=match.module, pattern=match.rule.name, op=rewrite.op,
            status="rewritten", reason=match.note, source=match.source,
            dtype=str(obs_out.qparams.dtype).removeprefix("torch."), observer=obs_out.observer,
            input_scale=obs_in.qparams.scale, input_zero_point=obs_in.qparams.zero_point,
            input_min=obs_in.min_val, input_max=obs_in.max_val,
            output_scale=obs_out.qparams.scale, output_zero_point=obs_out.qparams.zero_point,
            output_min=obs_out.min_val, output_max=obs_out.max_val,
        )
        rows.append((match.position, row))
    rows += [(skip.position, skipped_row(skip)) for skip in skips]
    return tuple(row for _, row in sorted(rows, key=lambda item: item[0]))
