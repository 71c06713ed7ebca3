"""The PT2E route: torchao's ``prepare_pt2e`` / ``convert_pt2e`` with fxqbn's BatchNorm handling.

    from fxqbn import pt2e
    exported = torch.export.export(model.eval(), example_inputs).module()
    prepared = pt2e.prepare_pt2e(exported, quantizer)        # any torchao Quantizer
    for batch in calibration: prepared(batch)
    quantized = pt2e.convert_pt2e(prepared)                   # torchao's convert, then fxqbn.lower
    print(fxqbn.get_report(quantized))                        # every BN: folded, rewritten or skipped

What differs from torchao's own functions:

* The fold. torchao folds every conv -> BN into the conv, also where the conv's output or weights have
  other readers, which silently changes the model. Here a BN folds only where ``fxqbn.passes.fold``'s
  rule (the one ``fxqbn.prepare`` folds by) says the outputs keep; every other BN stays standalone. torchao folds inside ``prepare_pt2e``
  before any quantizer runs, so ``prepare_pt2e`` here runs torchao's steps itself around a correct
  fold (``_prepare_steps``; ``tests/test_pt2e.py`` fails the day torchao's own steps or fold change).
* Standalone BNs. With ``bn="int8"`` the user's quantizer is composed with ``BatchNormQuantizer``,
  and ``convert_pt2e`` lowers each annotated BN into one int8 BN (``fxqbn.lower``, every BN int8:
  integer-only targets need them all). ``bn="float"`` keeps them float: only the fold is corrected.
* The report: a row for every BN of the exported model, ``folded`` (into which conv), ``rewritten``
  or ``skipped`` with the reason.

Neither function changes its argument.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from fxqbn.passes import PT2E_INT8, find_patterns
from fxqbn.passes.boundaries import PREPARED
from fxqbn.passes.fold import Fold, decide, fold_attributes, index_of
from fxqbn.passes.records import Match

from .copying import graph_copy
from .errors import FxqbnError
from .report import Report, ReportRow, ReportSummary, folded_row
from .source import source_of
from .state import REPORT_KEY, attach, attached

__all__ = ["prepare_pt2e", "convert_pt2e", "BatchNormQuantizer", "BN_MODES"]  # noqa: F822 (BatchNormQuantizer: module __getattr__)

BN_MODES = ("int8", "float")
PT2E_KEY = "fxqbn_pt2e"  # Pt2eRecord of a model prepare_pt2e returned
_CONTROL_FLOW = (torch.ops.higher_order.scan, torch.ops.higher_order.while_loop)
EXTRA = 'the PT2E route needs torchao: pip install "fxqbn[pt2e]"'


@dataclass(frozen=True)
class Pt2eRecord:
    """What ``prepare_pt2e`` tells ``convert_pt2e``: the BNs of the exported model and what became of them."""

    bn: str  # "int8" or "float"
    order: tuple[str, ...]  # every BN's module (statistics owner), in the exported graph's order
    folded: tuple[ReportRow, ...]  # the BNs folded into their conv / linear
    kept: tuple[ReportRow, ...]  # the BNs skip= keeps float: skipped rows


def _torchao() -> Any:
    """torchao's PT2E module, imported quietly; FxqbnError naming the extra when it is missing."""
    from .whole_model import quiet_torchao_import

    try:
        with quiet_torchao_import():
            from torchao.quantization.pt2e import quantize_pt2e
    except ImportError as exc:
        raise FxqbnError(f"{EXTRA} ({exc})") from None
    return quantize_pt2e


def __getattr__(name: str) -> Any:
    if name == "BatchNormQuantizer":  # importing it imports torchao: only when asked for
        _torchao()
        from .bn_quantizer import BatchNormQuantizer

        return BatchNormQuantizer
    raise AttributeError(f"module 'fxqbn.pt2e' has no attribute {name!r}")


def _check_exported(model: object, what: str) -> None:
    if isinstance(model, torch.export.ExportedProgram):
        raise FxqbnError(f"{what} takes the exported module: pass exported.module() (got an ExportedProgram)")
    if not isinstance(model, fx.GraphModule):
        raise FxqbnError(f"{what} takes a model exported with torch.export.export(model, example_inputs).module(), "
                         f"got a {type(model).__name__}")
    if not any("val" in n.meta for n in model.graph.nodes if n.op == "placeholder"):
        raise FxqbnError(f"{what} takes a graph from torch.export.export(...).module(); this GraphModule records "
                         "no shapes (traced with torch.fx?): use fxqbn.prepare for fx graphs")


def _check_prepare(exported: object, quantizer: object, bn: str) -> None:
    _check_exported(exported, "fxqbn.pt2e.prepare_pt2e")
    if attached(exported, PT2E_KEY) is not None or any(n.op == "call_module" and "activation_post_process" in str(n.target)
                                                       for n in exported.graph.nodes):
        raise FxqbnError("this model is already prepared (it holds observers): prepare the exported model once, "
                         "calibrate it, then call fxqbn.pt2e.convert_pt2e")
    if attached(exported, REPORT_KEY) is not None:
        raise FxqbnError("this model was already converted by fxqbn: prepare the exported float model")
    loops = [n.name for n in exported.graph.nodes if n.op == "call_function" and n.target in _CONTROL_FLOW]
    if loops:
        raise FxqbnError(f"node '{loops[0]}' is a control-flow subgraph (scan / while_loop), "
                         "which fxqbn.pt2e does not quantize: use torchao's prepare_pt2e for this model")
    if bn not in BN_MODES:
        raise FxqbnError(f"bn={bn!r}: choose 'int8' (standalone BNs int8) or 'float' (only the fold corrected)")
    from torchao.quantization.pt2e.quantizer import Quantizer

    if not isinstance(quantizer, Quantizer):
        hint = " (torch.ao's PT2E quantizers are deprecated: use torchao's)" if "torch.ao" in type(quantizer).__module__ else ""
        raise FxqbnError(f"quantizer must be a torchao Quantizer, e.g. X86InductorQuantizer, got {type(quantizer).__name__}{hint}")


def _plan(model: fx.GraphModule, skip: frozenset[str]) -> tuple[list, list[Fold], tuple[ReportRow, ...]]:
    """(every BN match, the folds to make, the rows of BNs skip= keeps float) of an exported graph:
    a BN folds where ``passes.fold``'s rule says the outputs keep (torchao folds every conv -> BN)."""
    found = find_patterns(model.graph, model, PREPARED)
    index = index_of(model.graph, model)
    folds = [f for m in found.matches if m.module not in skip for f in [decide(model.graph, model, m, index)] if isinstance(f, Fold)]
    kept = tuple(ReportRow(node=m.bn.node, module=m.module, pattern=m.pattern, op="", status="skipped",
                           reason="kept float: skip=", source=m.source) for m in found.matches if m.module in skip)
    return found, folds, kept


def _checked_skip(skip: Iterable[str], model: fx.GraphModule) -> frozenset[str]:
    """``skip`` as a set of BN names, each the name of a BN of ``model``; FxqbnError otherwise."""
    names = frozenset((skip,) if isinstance(skip, str) else skip)
    bns = {m.module for m in find_patterns(model.graph, model, PREPARED).matches}
    unknown = sorted(str(name) for name in names - bns)
    if unknown:
        raise FxqbnError(f"skip names {', '.join(map(repr, unknown))}, which is no BN of this model: "
                         f"name BNs as the report does (the module owning the statistics): {', '.join(sorted(bns)) or 'none'}")
    return names


def _folded_rows(model: fx.GraphModule, folds: list[Fold]) -> tuple[ReportRow, ...]:
    nodes = {n.name: n for n in model.graph.nodes}
    return tuple(folded_row(f.bn.node, f.bn.owner, f.bn.spelling, f.into, source_of(nodes[f.bn.node])) for f in folds)


def _prepare_steps(model: fx.GraphModule, quantizer: Any) -> fx.GraphModule:
    """torchao 0.18's ``prepare_pt2e`` without its fold (done before, correctly): annotate, validate, observe."""
    from torchao.quantization.pt2e import quantize_pt2e as steps

    meta, scopes = model.meta, steps._get_node_name_to_scope(model)
    try:
        model = quantizer.transform_for_annotation(model)
        quantizer.annotate(model)
        quantizer.validate(model)
    except (ValueError, AssertionError, KeyError, RuntimeError) as exc:
        raise FxqbnError(_QUANTIZER_FAILED.format(name=_quantizer_names(quantizer), error=f"{type(exc).__name__}: {exc}")) from exc
    model = steps.prepare(model, scopes, is_qat=False, obs_or_fq_callback=quantizer.prepare_obs_or_fq_callback)
    model.meta.update(meta)
    return steps._disallow_eval_train(model)


_QUANTIZER_FAILED = (
    "the quantizer ({name}) failed on this model before anything was quantized: {error}. torchao's "
    "X86InductorQuantizer does so on a conv module called more than once and, under torch 2.14.1, on torchvision's "
    "ResNets. Quantize such a model through torch.ao instead (convert_fx, then fxqbn.lower; `fxqbn convert --int8 ao`), "
    "or its BNs only (fxqbn.prepare / fxqbn.convert)"
)


def _quantizer_names(quantizer: Any) -> str:
    parts = getattr(quantizer, "quantizers", None)
    return " + ".join(type(q).__name__ for q in parts) if parts else type(quantizer).__name__


def _convert_steps(model: fx.GraphModule) -> fx.GraphModule:
    """torchao 0.18's ``convert_pt2e`` without ``_fold_conv_bn_qat``: that step folds QAT conv-BN patterns,
    which prepare_pt2e's graphs do not have, and costs ~100 exports of its patterns whenever a BN is left."""
    from torch.fx.passes.infra.pass_manager import PassManager
    from torchao.quantization.pt2e import quantize_pt2e as steps

    meta = model.meta
    model = steps._convert_to_reference_decomposed_fx(model)
    model = PassManager([steps.DuplicateDQPass()])(model).graph_module
    model = PassManager([steps.PortNodeMetaForQDQ()])(model).graph_module
    steps.constant_fold(model, steps._quant_node_constraint)
    model.meta.update(meta)
    return steps._disallow_eval_train(model)


def prepare_pt2e(exported: fx.GraphModule, quantizer: Any, bn: str = "int8", skip: Iterable[str] = ()) -> fx.GraphModule:
    """torchao's ``prepare_pt2e`` with a correct fold and, with ``bn="int8"``, int8 standalone BNs.

    Args:
        exported: ``torch.export.export(model.eval(), example_inputs).module()``. Never changed.
        quantizer: any torchao ``Quantizer`` (e.g. ``X86InductorQuantizer().set_global(...)``).
        bn: ``"int8"``: compose ``quantizer`` with ``BatchNormQuantizer``, which annotates every BN that
            did not fold with the activation spec ``quantizer`` uses next to it; ``"float"``: leave them float.
        skip: BN names (the module owning the statistics, as the report shows them) to keep float.

    Returns:
        The observed model: calibrate it, then ``convert_pt2e`` it.
    """
    _torchao()
    _check_prepare(exported, quantizer, bn)
    from torchao.quantization.pt2e.quantizer import ComposableQuantizer

    from .bn_quantizer import BatchNormQuantizer

    model = graph_copy(exported)
    skip = _checked_skip(skip, model)
    found, folds, kept = _plan(model, skip)
    folded = _folded_rows(model, folds)
    fold_attributes(model.graph, model, folds)
    if found.matches or found.skips:  # as torchao's fold does whenever the graph has a BN: unread constants go
        model.graph.eliminate_dead_code()
    model.graph.lint()
    model.recompile()
    order = tuple(m.module for m in found.matches) + tuple(s.module for s in found.skips)
    if bn == "int8":
        quantizer = ComposableQuantizer([quantizer, BatchNormQuantizer(skip=skip)])
    prepared = _prepare_steps(model, quantizer)
    attach(prepared, PT2E_KEY, Pt2eRecord(bn=bn, order=_graph_order(exported, order), folded=folded, kept=kept))
    return prepared


def _graph_order(exported: fx.GraphModule, names: tuple[str, ...]) -> tuple[str, ...]:
    """The BN names sorted by where their statistics are first read in the exported graph."""
    first: dict[str, int] = {}
    for i, node in enumerate(exported.graph.nodes):
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                first.setdefault(str(arg.target).rpartition(".")[0], i)
    return tuple(sorted(dict.fromkeys(names), key=lambda name: first.get(name, len(first))))


def _uncalibrated(prepared: fx.GraphModule) -> list[str]:
    """The observers that have seen no data (an infinite ``min_val``)."""
    return [name for name, module in prepared.named_modules()
            if isinstance(getattr(module, "min_val", None), torch.Tensor) and module.min_val.numel()
            and bool(torch.isinf(module.min_val).all())]


def convert_pt2e(prepared: fx.GraphModule, backend: str | None = None) -> fx.GraphModule:
    """torchao's ``convert_pt2e``, then (``bn="int8"``) ``fxqbn.lower`` with every annotated BN int8.

    Args:
        prepared: the calibrated model ``prepare_pt2e`` returned. Never changed.
        backend: the int8 BN kernel: ``None`` / ``"fused"`` (fxqbn's kernel on the graph's plain codes;
            compiles with torch.compile as one graph) or ``"native"`` (PyTorch's quantized op).

    Returns:
        The int8 model; ``fxqbn.get_report`` lists every BN of the exported model.
    """
    _torchao()
    record = attached(prepared, PT2E_KEY)
    if record is None:
        _check_exported(prepared, "fxqbn.pt2e.convert_pt2e")
        raise FxqbnError("fxqbn.pt2e.convert_pt2e takes the model fxqbn.pt2e.prepare_pt2e returned (after calibration)")
    empty = _uncalibrated(prepared)
    if empty:
        raise FxqbnError(f"convert_pt2e before calibration: {len(empty)} observers have seen no data (e.g. '{empty[0]}'); "
                         "run the prepared model on calibration batches first")
    start = time.perf_counter()
    converted = _convert_steps(graph_copy(prepared))
    if record.bn == "int8":
        from .lowering import lower

        converted = lower(converted, backend=backend, bn="int8")  # every annotated BN int8: integer-only targets need them all
    attach(converted, REPORT_KEY, _report(converted, record, start))
    return converted


def _report(converted: fx.GraphModule, record: Pt2eRecord, start: float) -> Report:
    """Every BN of the exported model, in its graph order: lower's rows (bn="float": every BN left is
    skipped, float on purpose), then the rows of the BNs folded and of those skip= kept float."""
    lowered = attached(converted, REPORT_KEY)
    if lowered is None:
        found = find_patterns(converted.graph, converted, PT2E_INT8)
        rows = [ReportRow(node=f.bn.node if isinstance(f, Match) else f.node, module=f.module, pattern=f.pattern, op="",
                          status="skipped", reason="kept float: bn='float'", source=f.source)
                for f in sorted([*found.matches, *found.skips], key=lambda f: f.position)]
        lowered = Report(rows=(), summary=ReportSummary(0, 0, 0, 0, 0.0, lowered_into=PT2E_INT8.name))
    else:
        rows = list(lowered.rows)
    kept = {row.module for row in record.kept}
    rows = [row for row in rows if row.module not in kept] + list(record.kept) + list(record.folded)
    rank = {name: i for i, name in enumerate(record.order)}
    rows.sort(key=lambda row: rank.get(row.module, len(rank)))
    summary = replace(lowered.summary, rewritten=sum(r.status == "rewritten" for r in rows),
                      skipped=sum(r.status == "skipped" for r in rows), folded=len(record.folded),
                      convert_seconds=time.perf_counter() - start)
    return replace(lowered, rows=tuple(rows), summary=summary)
