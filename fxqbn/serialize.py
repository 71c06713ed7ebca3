"""Save and load converted models as plain data, loadable with ``torch.load(weights_only=True)``.

A converted model pickled whole can only be loaded with ``weights_only=False``, which runs code
from the file. ``save`` writes data only (tensors, numbers, strings, lists, dicts)::

    {"format": "fxqbn.quantized", "version": 3, "torch": "2.13.0",
     "layout": "float_io",     # or "nodes": every boundary a node (the layout of format 1 files)
     "patterns": [{"node", "module", "pattern", "status", "dtype", "input": [scale, zero_point],
                   "output": [scale, zero_point]}, ...],   # every BatchNorm, in graph order;
                                                           # status "rewritten", "folded" or "skipped"
     "state_dict": {...},      # the converted model's tensors, quantized modules' qparams included
     "training": [...],        # names of the modules in training mode
     "graph": [...],           # the converted graph as data (graph_structure), to check the rebuild against
     "code": "...",            # the converted graph's Python code, for people (and files without "graph")
     "report": {...},          # Report.to_dict()
     "inputs": [...],          # prepare's example inputs as shapes and dtypes (input_specs), or None
     "digests": {...}}         # SHA-256 of every other field and of every tensor (digests.seal)

The structure of a converted model is a function of the float model, of which BatchNorms were
rewritten with which dtype, and of each observer's qparams. ``load`` replays those decisions on the
float model: ``prepare`` (on inputs rebuilt from the stored shapes) with a qconfig that quantizes
exactly the saved modules, folding exactly the BNs the file says were folded (none in files saved
before prepare folded), observers that hold the saved qparams instead of observing data, and the
ordinary ``convert`` (in the file's layout). No calibration runs.
Everything read is checked: the digests first (damage), then as ``convert`` checks what it reads
(``check_payload``; each quantized BN is rebuilt from the file's tensors; the result must equal the
file's state_dict bit for bit). Formats 1 and 2 (no digests, no inputs, the layout told by the
version) still load, with one warning that they are unverified.
"""

from __future__ import annotations

import copy
import errno
import functools
import os
import pickle
import re
import warnings
from collections.abc import Sequence
from itertools import chain
from typing import IO, Any, Union

import torch
from torch import fx, nn
from torch.ao.quantization import QConfigMapping

from . import digests, input_specs
from .api import convert_laid_out, get_report, prepare_owned, refuse_fxqbn_output
from .errors import FxqbnError
from .backends import BACKENDS
from .paths import output_problem
from .qparams import DTYPE_RANGES, QParams
from .report import STATUSES, Report
from .copying import owned_copy
from .state import CONVERTED_KEY, INPUTS_KEY, LOWERED_KEY, PREPARED_KEY, REPORT_KEY, attach, attached

__all__ = ["save", "load", "load_report", "describe_load_error", "check_payload", "graph_structure", "FORMAT", "VERSION"]

FORMAT = "fxqbn.quantized"
VERSION = 3  # 3: digests, example inputs, the layout a field; 2: a BN between float code is one FloatIO; 1: boundaries are nodes
_READS = (1, 2, 3)
LAYOUTS = ("float_io", "nodes")  # format 3's "layout"; in formats 2 and 1 the version tells it

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPE_RANGES}  # "quint8" -> torch.quint8


class StoredQParams(nn.Module):
    """Stands in for an observer on ``load``: observes nothing, returns the qparams read from the file."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.qscheme = torch.per_tensor_affine
        self.qparams: tuple[float, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qparams is None:
            raise FxqbnError("internal: a stored-qparams observer was not given its qparams")
        scale, zero_point = self.qparams
        return torch.tensor([scale], dtype=torch.float64), torch.tensor([zero_point], dtype=torch.int64)


# -- save ---------------------------------------------------------------------------------------


def _plan(report: Report) -> list[dict[str, Any]]:
    """What ``load`` replays: every BN pattern in graph order, with the qparams of rewritten ones."""
    return [
        {
            "node": row.node, "module": row.module, "pattern": row.pattern, "status": row.status, "dtype": row.dtype,
            "input": [row.input_scale, row.input_zero_point], "output": [row.output_scale, row.output_zero_point],
        }
        for row in report.rows
    ]


def _layout(converted: Any) -> str:
    """The layout ``load`` must rebuild: "float_io" when the model holds a FloatIO; else "nodes", which
    rebuilds every boundary as a node (what a model without FloatIO has, whichever fxqbn made it)."""
    return "float_io" if converted.float_io else "nodes"


def _refuse_unsaveable(quantized: Any) -> None:
    if attached(quantized, REPORT_KEY) is None or attached(quantized, CONVERTED_KEY) is None and attached(quantized, LOWERED_KEY) is None:
        raise FxqbnError(
            f"fxqbn.save expects the GraphModule returned by fxqbn.convert, got {type(quantized).__name__}"
        )
    if attached(quantized, LOWERED_KEY) is not None:
        raise FxqbnError(
            "fxqbn.save stores models converted by fxqbn.convert; a model fxqbn.lower returned is a torch.ao / PT2E "
            "graph it cannot rebuild: export a PT2E one with torch.export.save(torch.export.export(model, inputs), path)"
        )


def _inputs(quantized: fx.GraphModule) -> list | None:
    """The example inputs' spec; None when unknown (a torch.ao-observed graph) or unstorable and unneeded."""
    stored = attached(quantized, INPUTS_KEY)
    if stored is None or stored.spec is not None or not stored.needed_by:
        return None if stored is None else stored.spec
    raise FxqbnError(
        f"fxqbn.save cannot store the example inputs fxqbn.prepare was given ({stored.why_not}; a file stores "
        f"{input_specs.STORABLE}), and fxqbn.load needs them for BatchNorm {', '.join(map(repr, stored.needed_by))}: "
        "prepare with example inputs of those kinds"
    )


def _payload(quantized: fx.GraphModule) -> dict[str, Any]:
    report, converted = get_report(quantized), attached(quantized, CONVERTED_KEY)
    return {
        "format": FORMAT,
        "version": VERSION,
        "torch": str(torch.__version__),
        "layout": _layout(converted),
        "patterns": _plan(report),
        "state_dict": dict(quantized.state_dict()),
        "training": [name for name, module in quantized.named_modules() if module.training],
        "code": quantized.code,
        "graph": graph_structure(quantized),
        "report": report.to_dict(),
        "convert_seconds": report.summary.convert_seconds,  # the one field to_dict leaves out
        "backend": next((rw.backend for rw in converted.rewrites), "native"),
        "inputs": _inputs(quantized),
    }


def _write(payload: dict[str, Any], path: PathOrFile) -> None:
    """``torch.save``, refused with FxqbnError naming the path (or its missing folder) where it cannot write."""
    where = _name(path)
    problem = output_problem(where) if isinstance(path, (str, os.PathLike)) else None
    if problem is not None:
        raise FxqbnError(f"fxqbn.save cannot write {where}: {problem}")
    try:
        torch.save(payload, path)
    except (OSError, RuntimeError) as exc:
        raise FxqbnError(f"fxqbn.save cannot write {where}: {describe_load_error(exc)}") from exc


def save(quantized: fx.GraphModule, path: PathOrFile) -> None:
    """Write the converted model ``quantized`` to ``path`` as data only (no pickled code), with a
    SHA-256 digest of every tensor and field, and the shapes and dtypes of prepare's example inputs.

    Load it with ``fxqbn.load(path, float_model)``, or read it with ``torch.load(path, weights_only=True)``.
    """
    _refuse_unsaveable(quantized)
    payload = _payload(quantized)
    payload["digests"] = digests.seal(payload)
    _write(payload, path)


# -- load ---------------------------------------------------------------------------------------


def _name(path: PathOrFile) -> str:
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "<file object>")


def describe_load_error(exc: Exception) -> str:
    """One line on why ``torch.load(..., weights_only=True)`` failed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch's message has terminal bold codes
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    refused = re.search(r"GLOBAL (\S+)", text)  # "Unsupported global: GLOBAL x", "unsupported GLOBAL x whose module is blocked"
    if refused:
        return f"it holds pickled Python objects (found {refused.group(1)}), which weights_only=True refuses to run"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    truncated_zip = isinstance(exc, OSError) and exc.errno == errno.EINVAL  # torch's zip reader seeking before the start
    if "PytorchStreamReader" in text or truncated_zip or isinstance(exc, (KeyError, EOFError, pickle.UnpicklingError)):
        return "it is not a file written by torch.save, or it is truncated"
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _read(path: PathOrFile) -> dict[str, Any]:
    """The saved dict, read with ``weights_only=True``; FxqbnError when it is no fxqbn file or is damaged."""
    where = _name(path)
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch.load's errors for missing, non-torch, pickled-code or truncated files
        raise FxqbnError(
            f"cannot read {where}: {describe_load_error(exc)}; write it with fxqbn.save (or `fxqbn convert --out`)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FxqbnError(f"{where} is not an fxqbn.save file: write it with fxqbn.save (or `fxqbn convert --out`)")
    if payload.get("version") not in _READS:
        raise FxqbnError(
            f"{where} is fxqbn.save format version {payload.get('version')}; this fxqbn reads versions "
            f"{', '.join(map(str, _READS))}"
        )
    _verify(payload, where)
    check_payload(payload, where)
    return payload


_UNVERIFIED_NOTED: set[str] = set()  # the files of formats 1 and 2 already warned about


def _verify(payload: dict[str, Any], where: str) -> None:
    """Refuse a file whose fields or tensors differ from its digests, naming the first; a file of
    format 1 or 2 has none (a file holding digests is checked whatever its version says)."""
    if payload["version"] < 3 and "digests" not in payload:
        if where not in _UNVERIFIED_NOTED:
            _UNVERIFIED_NOTED.add(where)
            warnings.warn(
                f"{where} is fxqbn.save format {payload['version']}, which holds no digests: it loads with its contents "
                "checked for consistency, but damage that stays consistent goes unnoticed. Save it again "
                f"(fxqbn.save writes format {VERSION}) to add them", UserWarning, stacklevel=4,
            )
        return
    problem = digests.first_difference(payload)
    if problem is not None:
        raise FxqbnError(
            f"{where} is damaged: {problem}; the file changed after fxqbn.save wrote it (a bad copy, a truncated "
            "or mixed-up file): use a good copy or write it again with fxqbn.save"
        )


# The fields of an fxqbn.save file: (accepted types, required), checked before any is used.
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "torch": ((str,), True),
    "patterns": ((list,), True),
    "state_dict": ((dict,), True),
    "training": ((list,), True),
    "code": ((str,), True),
    "report": ((dict,), True),
    "convert_seconds": ((int, float), False),
    "backend": ((str,), False),
    "graph": ((list,), False),  # absent in files written before it was added: the code is compared then
    "layout": ((str,), False),  # formats 3 on (LAYOUTS); before, the version told it
    "inputs": ((list, type(None)), False),  # formats 3 on: input_specs' spec, or None when unknown
    "digests": ((dict,), False),  # formats 3 on: checked by _verify before check_payload
}
_ROW_FIELDS = {"node": str, "module": str, "pattern": str, "status": str, "dtype": str, "input": list, "output": list}


def _damaged(where: str, what: str) -> FxqbnError:
    return FxqbnError(f"{where} is damaged: {what}; write it again with fxqbn.save")


def _check_row(row: Any, i: int, where: str) -> None:
    """One pattern record: its fields, and for a rewritten BN qparams that ``QParams`` accepts."""
    if not isinstance(row, dict):
        raise _damaged(where, f"patterns[{i}] is a {type(row).__name__}, not a dict")
    for key, kind in _ROW_FIELDS.items():
        if not isinstance(row.get(key), kind):
            raise _damaged(where, f"patterns[{i}] ({row.get('module', '?')!r}) has {key} = {row.get(key)!r}, not a {kind.__name__}")
    if row["status"] not in STATUSES:
        raise _damaged(where, f"BatchNorm '{row['module']}' has status {row['status']!r}")
    if row["status"] != "rewritten":  # skipped, or folded into the conv before it: no int8 BN, no qparams
        return
    if row["dtype"] not in _DTYPES:
        raise FxqbnError(f"{where}: BatchNorm '{row['module']}' has dtype {row['dtype']!r}, not one of {sorted(_DTYPES)}")
    for key in ("input", "output"):
        pair = row[key]
        if len(pair) != 2 or isinstance(pair[0], bool) or not isinstance(pair[0], (int, float)) or type(pair[1]) is not int:
            raise _damaged(where, f"BatchNorm '{row['module']}' has {key} qparams {pair!r}, not [scale, zero_point]")
        try:
            QParams(float(pair[0]), pair[1], _DTYPES[row["dtype"]])
        except FxqbnError as exc:
            raise FxqbnError(f"{where}: BatchNorm '{row['module']}' has bad {key} qparams: {exc}; write it again with fxqbn.save") from None


def check_payload(payload: dict[str, Any], where: str) -> None:
    """Refuse, naming the field or module, a file whose fields are missing or of the wrong type."""
    for key, (kinds, required) in _FIELDS.items():
        if key not in payload:
            if required:
                raise _damaged(where, f"field {key!r} is missing")
        elif not isinstance(payload[key], kinds) or isinstance(payload[key], bool):
            raise _damaged(where, f"field {key!r} is a {type(payload[key]).__name__}")
    for i, row in enumerate(payload["patterns"]):
        _check_row(row, i, where)
    bad = next((k for k, v in payload["state_dict"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise _damaged(where, f"state_dict entry {bad!r} is a {type(payload['state_dict'][bad]).__name__}, not a tensor")
    if not all(isinstance(name, str) for name in payload["training"]):
        raise _damaged(where, "field 'training' holds something other than module names")
    if payload.get("backend", "native") not in BACKENDS:
        raise _damaged(where, f"backend {payload['backend']!r} is none of {sorted(BACKENDS)}")
    if payload["version"] >= 3 and payload.get("layout") not in LAYOUTS:
        raise _damaged(where, f"field 'layout' is {payload.get('layout')!r}, none of {', '.join(LAYOUTS)}")
    if payload.get("inputs") is not None:
        try:
            input_specs.rebuild(payload["inputs"], "meta")  # tensors that allocate nothing
        except ValueError as exc:
            raise _damaged(where, f"field 'inputs': {exc}") from None


def _report_from_dict(data: dict[str, Any], where: str, convert_seconds: float = 0.0) -> Report:
    try:
        return Report.from_dict(data, convert_seconds)
    except (KeyError, TypeError, ValueError) as exc:
        raise FxqbnError(f"the report in {where} does not fit this fxqbn's Report ({exc}): re-save it with this version") from None


def _saved_report(payload: dict[str, Any], where: str) -> Report:
    """The file's report, refused when its rows disagree with the pattern records ``load`` replays."""
    report = _report_from_dict(payload["report"], where, payload.get("convert_seconds", 0.0))
    for ours, theirs in zip(_plan(report), payload["patterns"]):
        if ours != theirs:
            raise FxqbnError(
                f"{where} is inconsistent: its report says BatchNorm '{ours['module']}' is {ours}, its pattern "
                f"record {theirs}; write it again with fxqbn.save"
            )
    if len(report.rows) != len(payload["patterns"]):
        raise FxqbnError(f"{where} is inconsistent: {len(report.rows)} report rows, {len(payload['patterns'])} pattern records")
    return report


def load_report(path: PathOrFile) -> Report:
    """The report stored in an ``fxqbn.save`` file, without the float model."""
    payload = _read(path)
    return _saved_report(payload, _name(path))


def _replay_qconfig(plan: Sequence[dict[str, Any]], where: str) -> QConfigMapping:
    """Quantize exactly the saved modules, each with a stored-qparams observer of its saved dtype;
    the folded ones are patterns too (which prepare then folds: ``_folded``)."""
    mapping = QConfigMapping()  # global None: every other BN stays float
    for row in plan:
        if row["status"] == "rewritten":  # its dtype was checked by check_payload
            mapping.set_module_name(row["module"], functools.partial(StoredQParams, _DTYPES[row["dtype"]]))
        elif row["status"] == "folded":
            mapping.set_module_name(row["module"], functools.partial(StoredQParams, torch.quint8))
    return mapping


def _folded(plan: Sequence[dict[str, Any]]) -> frozenset[str]:
    """The BN modules the file says were folded (none in files saved before prepare folded)."""
    return frozenset(row["module"] for row in plan if row["status"] == "folded")


def _describe_mismatch(saved: list[tuple[str, str, str, str]], rebuilt: list[tuple[str, str, str, str]]) -> str:
    """Name the first difference between the saved and the rebuilt BN patterns (node, module, pattern, status)."""
    saved_modules = {module for _, module, _, _ in saved}
    model_modules = {module for _, module, _, _ in rebuilt}
    parts = []
    missing = sorted(saved_modules - model_modules)
    extra = sorted(model_modules - saved_modules)
    if missing:
        parts.append("BatchNorm " + ", ".join(repr(m) for m in missing) + " in the file, not in the model")
    if extra:
        parts.append("BatchNorm " + ", ".join(repr(m) for m in extra) + " in the model, not in the file")
    if not parts:
        if len(saved) != len(rebuilt):
            parts.append(f"{len(saved)} BatchNorm calls in the file, {len(rebuilt)} in the model")
        else:
            for (node, module, pattern, status), theirs in zip(saved, rebuilt):
                if (node, module, pattern, status) != theirs:
                    parts.append(
                        f"BatchNorm '{module}' (node '{node}') is {pattern} ({status}) in the file, "
                        f"{theirs[2]} ({theirs[3]}) at node '{theirs[0]}' in the model"
                    )
                    break
    return "; ".join(parts)


def _fill_observers(observed: fx.GraphModule, plan: Sequence[dict[str, Any]], where: str) -> None:
    """Give every stored-qparams observer its saved qparams, after checking the patterns are the saved ones."""
    state = attached(observed, PREPARED_KEY)
    rows = [(s.position, (s.node, s.module, s.pattern, "skipped")) for s in state.skips]
    rows += [(p.position, (p.bn_node, p.module, p.pattern, "rewritten")) for p in state.patterns]
    rows += [(f.position, (f.node, f.module, f.pattern, "folded")) for f in state.folded]
    rebuilt = [row for _, row in sorted(rows)]
    saved = [(row["node"], row["module"], row["pattern"], row["status"]) for row in plan]
    if rebuilt != saved:
        folded = _folded(plan)
        why = "".join(f" ('{p.module}' {p.note})" for p in state.patterns if p.module in folded and p.note)
        raise FxqbnError(
            f"the model does not match {where}: {_describe_mismatch(saved, rebuilt)}{why}. "
            "Pass the float model the file was converted from"
        )
    nodes = {node.name: node for node in observed.graph.nodes}
    rewritten = [row for row in plan if row["status"] == "rewritten"]
    for pattern, row in zip(state.patterns, rewritten):
        for observer_node, key in ((pattern.boundary.input, "input"), (pattern.boundary.output, "output")):
            observer = observed.get_submodule(str(nodes[observer_node].target))
            scale, zero_point = row[key]
            qparams = (float(scale), int(zero_point))
            if observer.qparams not in (None, qparams):
                raise FxqbnError(f"{where} is inconsistent: BatchNorm '{row['module']}' has {key} qparams {qparams}, "
                                 f"its neighbour {observer.qparams}")
            observer.qparams = qparams


def graph_structure(gm: fx.GraphModule) -> list[str]:
    """``gm``'s graph as data that node names do not enter (they change when a GraphModule is
    unpickled): one line per node, with its op, target and arguments, nodes by position."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    lines = []
    for node in gm.graph.nodes:
        target = node.target
        if not isinstance(target, str):
            target = f"{getattr(target, '__module__', None) or ''}.{getattr(target, '__qualname__', repr(target))}"
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        lines.append(f"{node.op} {target} {args!r}")
    return lines


def _check_structure(quantized: fx.GraphModule, payload: dict[str, Any], where: str) -> None:
    """Refuse when the rebuilt graph differs from the saved one, naming the first differing node."""
    if "graph" in payload:
        saved, rebuilt, what = [str(line) for line in payload["graph"]], graph_structure(quantized), "node"
    else:  # an older file: its generated code is all there is
        saved, rebuilt, what = payload["code"].strip().splitlines(), quantized.code.strip().splitlines(), "line"
    if saved == rebuilt:
        return
    i = next((i for i, (a, b) in enumerate(zip(saved, rebuilt)) if a != b), min(len(saved), len(rebuilt)))
    theirs = saved[i].strip() if i < len(saved) else "<end>"
    ours = rebuilt[i].strip() if i < len(rebuilt) else "<end>"
    if what == "node" and i < len(quantized.graph.nodes):
        what = f"node %{i} ('{list(quantized.graph.nodes)[i].name}' from the model)"
    else:
        what = f"{what} {i + 1}"
    versions = "" if payload["torch"] == str(torch.__version__) else f" (saved with torch {payload['torch']}, this is {torch.__version__})"
    raise FxqbnError(
        f"the model does not match {where}{versions}: {what} of the converted graph is "
        f"`{theirs}` in the file and `{ours}` from the model. Pass the float model the file was converted from"
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        return torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    return torch.equal(a, b)


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent), leaf, module)


def _rebuild_from_file(quantized: fx.GraphModule, backend: str, where: str) -> None:
    """Replace each quantized BN (holding the file's tensors) with one built afresh from them and
    the pattern record's qparams: the checks ``convert`` makes, made on what the file holds."""
    for rewrite in attached(quantized, CONVERTED_KEY).rewrites:
        match, plan = rewrite.match, rewrite.plan
        loaded = quantized.get_submodule(rewrite.qmodule)
        try:
            rebuilt = BACKENDS[backend].rebuild(
                match.dim, plan.relu, loaded, plan.input.qparams, plan.output.qparams, plan.clamp, match.module
            )
        except FxqbnError as exc:
            named = "" if f"'{match.module}'" in str(exc) else f"BatchNorm '{match.module}': "
            raise FxqbnError(f"{where}: {named}{exc}") from None
        _set_module(quantized, rewrite.qmodule, rebuilt)


def _load_state(quantized: fx.GraphModule, state: dict[str, torch.Tensor], where: str, backend: str) -> None:
    """Load the file's tensors; keep what the pattern records define (boundaries, qparams) and
    refuse, naming the tensor, a file whose tensors disagree with its records."""
    ours = quantized.state_dict()
    problems = [f"'{key}' missing from the model" for key in state if key not in ours]
    problems += [f"'{key}' not in the file" for key in ours if key not in state]
    problems += [
        f"'{key}' is {tuple(state[key].shape)} {state[key].dtype} in the file, {tuple(ours[key].shape)} {ours[key].dtype} in the model"
        for key in state
        if key in ours and (state[key].shape != ours[key].shape or state[key].dtype != ours[key].dtype)
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise FxqbnError(f"the model's tensors do not match {where}: {'; '.join(problems[:3])}{more}")
    targets = attached(quantized, CONVERTED_KEY).boundary_targets(quantized.graph)
    boundaries = copy.deepcopy({target: quantized.get_submodule(target) for target in targets})  # from the records alone; shared stay shared
    quantized.load_state_dict(state, strict=True)
    _rebuild_from_file(quantized, backend, where)
    for target, module in boundaries.items():
        _set_module(quantized, target, module)
    rebuilt = quantized.state_dict()
    differing = [key for key in state if not _same(rebuilt[key], state[key])]
    if differing:
        key = differing[0]
        module = key.rpartition(".")[0]
        raise FxqbnError(
            f"{where} is inconsistent: its state_dict's '{key}' ({_brief(state[key])}) is not what module "
            f"'{module}' gets from the file's pattern records and tensors ({_brief(rebuilt[key])})"
            + (f" (and {len(differing) - 1} more tensors)" if len(differing) > 1 else "")
            + "; write it again with fxqbn.save"
        )


def _brief(t: torch.Tensor) -> str:
    return repr(t.item()) if t.numel() == 1 else f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _example_inputs(given: Any, payload: dict[str, Any], model: nn.Module) -> tuple | None:
    """The inputs to trace ``model`` with: ``given``, else those rebuilt from the file (zeros of the
    stored shapes and dtypes, on the model's device), else None (none known)."""
    if given is None:
        if payload.get("inputs") is None:
            return None
        held = next(chain(model.parameters(), model.buffers()), None)
        return input_specs.rebuild(payload["inputs"], held.device if held is not None else "cpu")
    if isinstance(given, torch.Tensor):
        return (given,)
    if not isinstance(given, (tuple, list)):
        raise FxqbnError(f"fxqbn.load's example_inputs must be a tuple of inputs, got {type(given).__name__}")
    return tuple(given)


def _no_inputs(payload: dict[str, Any], where: str) -> str:
    """What to do when the model needs example inputs the file does not hold."""
    why = (f"{where} is fxqbn.save format {payload['version']}, written before files held them" if payload["version"] < 3
           else f"{where} holds none (its model was not converted from an fxqbn.prepare graph)")
    return f"{why}: pass them, fxqbn.load(path, model, example_inputs=(x,)) with x an input the model takes"


def _replay(payload: dict[str, Any], float_model: nn.Module, inputs: tuple | None, where: str) -> fx.GraphModule:
    """``prepare`` with the saved qparams, ``convert`` in the file's layout, the file's tensors loaded."""
    plan = payload["patterns"]
    observed = prepare_owned(float_model, inputs, _replay_qconfig(plan, where), no_inputs=_no_inputs(payload, where),
                             fold=_folded(plan))
    _fill_observers(observed, plan, where)
    # a new GraphModule: modules in the same order as the saved one's
    backend = payload.get("backend", "native")
    float_io = payload["layout"] == "float_io" if payload["version"] >= 3 else payload["version"] >= 2
    quantized = convert_laid_out(observed, False, backend, float_io=float_io)
    _check_structure(quantized, payload, where)
    _load_state(quantized, payload["state_dict"], where, backend)
    return quantized


def load(path: PathOrFile, model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """Rebuild the converted model saved at ``path`` from its float ``model``, without calibration.

    Args:
        path: a file written by ``fxqbn.save``; read with ``torch.load(weights_only=True)``, its
            SHA-256 digests checked.
        model: the float model it was converted from (same architecture; its weights are replaced by
            the saved ones). Never changed.
        example_inputs: inputs to trace ``model`` with, as ``fxqbn.prepare`` takes them. Needed only
            by models that call ``F.batch_norm`` (or hold a ``SyncBatchNorm``), and only for files of
            formats 1 and 2: format 3 files hold the shapes and dtypes of prepare's inputs.

    Returns:
        The converted ``GraphModule``, with outputs bit-identical to the saved one, and its report.
    """
    where = _name(path)
    payload = _read(path)
    if not isinstance(model, nn.Module):
        raise FxqbnError(f"fxqbn.load expects the float torch.nn.Module, got {type(model).__name__}")
    report = _saved_report(payload, where)
    refuse_fxqbn_output(model)
    float_model = owned_copy(model).eval()  # the saved BNs were in eval mode; prepare refuses others
    quantized = _replay(payload, float_model, _example_inputs(example_inputs, payload, float_model), where)
    training = set(payload["training"])
    for name, module in quantized.named_modules():
        module.training = name in training
    attach(quantized, REPORT_KEY, report)
    return quantized
