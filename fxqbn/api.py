"""The public pipeline: ``prepare`` -> calibrate -> ``convert`` -> ``get_report``."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import fx, nn

from fxqbn.passes import PREPARED, Match, Prepared, adopt_observers, find_patterns, insert_observers, is_torch_ao_observed, observer_users
from fxqbn.passes import plan_patterns, rewrite_patterns, shapes_needed_by
from fxqbn.passes.fold import fold_patterns, needs_ranks

from . import nn as qnn
from . import pipeline
from .backends import BACKENDS, backend_named
from .copying import owned_copies, owned_copy
from .errors import FxqbnError, no_batch_norm
from .float_io import FloatIO
from .input_specs import record as record_inputs
from .lowered import ByRank, LoweredBatchNorm
from .qconfig import ActivationConfig
from .report import Report
from .sensitivity import Reference, batches_of, check_threshold, warn_if_collapsed
from .state import CONVERTED_KEY, INPUTS_KEY, PREPARED_KEY, REPORT_KEY, attach, attached, detach
from .tracing import build_graph_module, propagate_shapes, trace_graph

__all__ = ["prepare", "convert", "get_report"]


def prepare(
    model: nn.Module, example_inputs: Any, qconfig: Any = None, skip: Iterable[Any] = (), fold: bool = True,
) -> fx.GraphModule:
    """Trace ``model``, fold the BatchNorms that follow a conv / linear into it, and insert observers
    around every other quantizable BatchNorm pattern.

    Args:
        model: the float model, in eval mode (a BN in training mode is refused). Never changed.
        example_inputs: a tuple of example inputs (a single tensor is accepted too).
        qconfig: ``None`` (HistogramObserver, full quint8 range), a ``QConfig`` (its activation is
            used), an observer class or ``with_args`` partial, or a ``QConfigMapping`` (per module
            name/type; ``None`` keeps that BN float).
        skip: BNs to keep float: module names (a name covers the modules inside it) and types
            (e.g. ``nn.BatchNorm1d``, or ``torch.nn.functional.batch_norm``); reported as skipped.
        fold: fold each BatchNorm module fxqbn would quantize into (a copy of) the conv / transposed
            conv / Linear feeding it alone, as torch.ao's ``prepare_fx`` does (a ReLU after it stays
            float); reported folded. ``False`` quantizes every BatchNorm. The rule: ``fxqbn.passes.fold``.

    ``model`` is run once on ``example_inputs`` (in eval mode, without gradients) when it calls
    ``F.batch_norm``, whose kernel depends on the input's rank, or when a ``Linear`` or ``Conv1d``
    feeds a ``BatchNorm1d`` (folded only on the ranks it is right for); otherwise it is only traced. Their
    shapes and dtypes are kept: ``fxqbn.save`` stores them, so ``fxqbn.load`` can trace without them.

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
    if not isinstance(fold, bool):
        raise FxqbnError(f"fold must be True or False, got {fold!r}")
    refuse_fxqbn_output(model)
    return prepare_owned(owned_copy(model), tuple(example_inputs), qconfig, skip, fold=fold)


def prepare_owned(
    model: nn.Module, example_inputs: tuple | None, qconfig: Any = None, skip: Iterable[Any] = (), no_inputs: str = "",
    fold: bool | Collection[str] = True,
) -> fx.GraphModule:
    """``prepare`` of a model nobody else holds (e.g. ``fxqbn.load``'s own copy): the observed
    model takes its modules, uncopied. ``example_inputs`` None: none are known (``no_inputs`` says
    what to pass when a BN needs them). ``fold``: True, False, or the BN modules that may fold
    (``fxqbn.load`` replays the file's)."""
    choose = _chooser(model, ActivationConfig(qconfig), skip)
    graph = trace_graph(model)
    kernels = shapes_needed_by(graph, model)
    folds = tuple(name for name in needs_ranks(graph, model) if name not in kernels) if fold else ()
    needed_by = (*kernels, *folds)  # a fold into a Linear / Conv1d is right on some ranks only
    if needed_by and example_inputs is None:
        said = f"BatchNorm {', '.join(map(repr, kernels))} picks its int8 kernel" if kernels else \
            f"whether BatchNorm {', '.join(map(repr, folds))} folds depends on"
        raise FxqbnError(f"{said} by its input's rank, which a run on example inputs shows: {no_inputs}")
    if needed_by:
        propagate_shapes(model, graph, example_inputs)  # F.batch_norm's, SyncBatchNorm's kernel, a fold: the input's rank
    matches, skips = find_patterns(graph, model, PREPARED, choose)
    if not matches and not skips:
        raise no_batch_norm(f"the model ({type(model).__name__})")
    matches, folded = fold_patterns(graph, model, matches, _fold_wanted(fold))
    # Known now: refuse bad statistics before calibration meets them (convert checks again).
    qnn.check_many([(match.module, pipeline.bn_tensors(model, match)) for match in matches])
    observed, observers = insert_observers(graph, model, matches)
    gm = build_graph_module(model, graph, observers)
    attach(gm, PREPARED_KEY, Prepared(patterns=observed, skips=tuple(skips), folded=tuple(folded)))
    attach(gm, INPUTS_KEY, record_inputs(() if example_inputs is None else example_inputs, needed_by, example_inputs is not None))
    return gm


def _fold_wanted(fold: bool | Collection[str]) -> Callable[[Match], bool]:
    """Which matched BNs may fold: all, none, or those of the named modules."""
    if isinstance(fold, bool):
        return lambda match: fold
    names = frozenset(fold)
    return lambda match: match.module in names


def _converted_modules() -> tuple[type, ...]:
    """The module types fxqbn installs: every backend's, and the wrappers around them."""
    return (FloatIO, LoweredBatchNorm, ByRank, *(t for backend in BACKENDS.values() for t in backend.modules))


def refuse_fxqbn_output(model: nn.Module) -> None:
    """Refuse a model (or one holding a module) that fxqbn already prepared or converted."""
    installed = _converted_modules()  # a model holding one of these was converted already
    for name, module in model.named_modules():
        where = f" (module '{name}')" if name else ""
        if attached(module, PREPARED_KEY) is not None:
            raise FxqbnError(f"this model{where} was already prepared by fxqbn: calibrate it and call fxqbn.convert")
        if attached(module, REPORT_KEY) is not None or isinstance(module, installed):
            raise FxqbnError(
                f"this model{where} was already converted by fxqbn: pass the float model it was converted from"
            )


def _refuse_training(observed: fx.GraphModule, patterns: Iterable[Match]) -> None:
    """Refuse BN modules in training mode: their float forward uses batch statistics, not the
    running ones a quantized BN computes with (and calibration in training mode moved those)."""
    for match in patterns:
        if match.bn.module is not None and observed.get_submodule(match.bn.module).training:
            raise FxqbnError(
                f"BatchNorm '{match.module}' is in training mode: call .eval() on the observed model before fxqbn.convert "
                "(calibration in training mode moved its running statistics: prepare again from the float model)"
            )


def convert(
    observed: fx.GraphModule, inplace: bool = False, backend: str = "native",
    keep_float_below: float | None = None, inputs: Any = None,
) -> fx.GraphModule:
    """Replace every observed BatchNorm pattern with its quantized module.

    Args:
        observed: the result of ``prepare``, after calibration; or a GraphModule observed and
            calibrated by torch.ao's ``prepare_fx``: its observed BN / BN+ReLU patterns are
            converted, its other observers removed (listed in the report's ``dropped``).
        inplace: rewrite ``observed`` itself instead of building a new GraphModule.
        backend: ``"native"`` (PyTorch's quantized op library on quint8/qint8 tensors, ``fxqbn.nn``)
            or ``"fused"`` (fxqbn's C integer kernels on plain uint8/int8 tensors, ``fxqbn.fused``).
        keep_float_below: a threshold in dB: keep float every pattern whose sensitivity is under it
            (reported skipped, with the figure). Needs ``inputs``.
        inputs: held-out batches (not the calibration ones: a tensor, a tuple of tensors or a list of
            batches). Each pattern's *sensitivity*, the model's output SQNR against float with only that
            pattern quantized, goes into the report's ``sensitivity_db``, and the converted model's output
            SQNR into its summary; an output SQNR under 10 dB warns (``fxqbn.AccuracyWarning``). Costs
            one float forward per batch, plus one per pattern per batch, plus the converted model's.

    Returns:
        The quantized ``GraphModule``; ``get_report`` tells what happened to each BatchNorm. It
        holds its own copies of everything it keeps from the float model. A pattern between float
        code is one ``fxqbn.float_io.FloatIO`` (quantize, quantized module, dequantize).
    """
    if keep_float_below is not None:
        keep_float_below = check_threshold(keep_float_below)
        if inputs is None:
            raise FxqbnError("keep_float_below needs held-out inputs to measure each pattern's sensitivity on: pass "
                             "inputs=[batch, ...] (batches not used for calibration)")
    batches = None if inputs is None else batches_of(inputs, "inputs")
    return convert_laid_out(observed, inplace, backend, float_io=True, keep_float_below=keep_float_below, held_out=batches)


def convert_laid_out(
    observed: fx.GraphModule, inplace: bool, backend: str, float_io: bool,
    keep_float_below: float | None = None, held_out: list[tuple] | None = None,
) -> fx.GraphModule:
    """``convert``, choosing the layout: ``float_io`` False keeps every boundary a node of its own (the
    layout of fxqbn.save format 1 files, which ``load`` rebuilds). The steps: read what prepare
    recorded, refuse, read the observers, plan, build, [measure, keep float], rewrite a new graph,
    install it, report."""
    start, chosen = time.perf_counter(), backend_named(backend)
    state = _prepared_state(observed)
    _refuse_training(observed, state.patterns)
    readings = pipeline.read_observers(observed, state.patterns)  # refuse before copying or changing anything
    reference = None if held_out is None else _reference(observed, state, held_out)
    plans = plan_patterns(state.patterns, readings, chosen)
    modules = pipeline.build_modules(observed, plans, chosen)
    sensitivity = {} if reference is None else reference.sensitivities(pipeline.probes(plans, modules, chosen))
    kept, kept_float = state.patterns, []
    if keep_float_below is not None:  # planned again: the patterns under the threshold are skips like any other
        kept, kept_float = pipeline.keep_float(state.patterns, sensitivity, keep_float_below)
        plans = plan_patterns(kept, readings, chosen)
        modules = pipeline.build_modules(observed, plans, chosen)
    released = pipeline.released_observers(state.patterns, kept)
    graph, converted, new = rewrite_patterns(observed.graph, observed, plans, modules, chosen, [*state.dropped, *released], float_io)
    gm = pipeline.install(observed, graph, new) if inplace else build_graph_module(observed, graph, new, class_name=type(observed).__name__)
    _own_float_parts(gm, new)
    detach(gm, PREPARED_KEY)
    if attached(observed, INPUTS_KEY) is not None:
        attach(gm, INPUTS_KEY, attached(observed, INPUTS_KEY))
    attach(gm, CONVERTED_KEY, converted)
    report = pipeline.report(converted, [*state.skips, *kept_float], start, state.dropped, folded=state.folded)
    if reference is not None:
        report = pipeline.measured(report, sensitivity, reference.model_sqnr(gm), keep_float_below, len(kept_float))
    attach(gm, REPORT_KEY, report)
    if reference is not None:
        warn_if_collapsed(report, stacklevel=4)
    return gm


def _reference(observed: fx.GraphModule, state: Prepared, batches: list[tuple]) -> Reference:
    """The observed model's float outputs on the held-out batches, its observers passing values through."""
    bypass = set(observer_users(state.patterns)) | {d.observer for d in state.dropped}
    return Reference(observed, bypass, batches)


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
    ours = set(ours)
    places: list[tuple[nn.Module, str, Any]] = []  # (parent, leaf name, the shared module or tensor)
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in ours:
            parent_name, _, leaf = str(node.target).rpartition(".")
            parent = gm.get_submodule(parent_name)
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


def _chooser(model: nn.Module, config: ActivationConfig, skip: Iterable[Any]) -> Callable[[str, object, object], Any]:
    """(module name, module type or function, a fused module's BatchNorm type) -> the observer of that
    BN's pattern, or why it stays float: ``prepare``'s ``skip`` names it, or its qconfig is None."""
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

    def choose(name: str, kind: object, component: object) -> Any:
        if kind in kinds or component in kinds or any(name == n or name.startswith(n + ".") for n in names):
            return "skipped on request (prepare's skip argument)"
        spec = config.spec_for(name, kind, first_component=component)
        return "excluded by qconfig (None for this module)" if spec is None else spec

    return choose
