"""The kinds of graph fxqbn rewrites, and how each marks a BN pattern's edges (``Boundary``).

One matcher (``passes.match``) serves every kind; what differs is said here, chosen once at the entry:

* ``PREPARED``: a float graph fxqbn.prepare traced; no boundary yet: ``passes.observe`` adds observers.
* ``AO_OBSERVED``: a graph torch.ao's ``prepare_fx`` observed: an observer feeds the BN and one observer
  reads the pattern's output.
* ``AO_INT8`` / ``PT2E_INT8``: whole-model int8 graphs of torch.ao ``convert_fx`` (quint8 tensors) and
  torchao ``convert_pt2e`` (plain codes): a dequantize feeds the BN, a per-tensor quantize reads the
  pattern's output (torch.ao may run pass-throughs and the activation on the quantized tensor after it)::

      dq = quantized_decomposed.dequantize_per_tensor(codes, 0.02, 128, 0, 255, torch.uint8)   # PT2E
      bn = aten.batch_norm(dq, w, b, mean, var, False, 0.1, 1e-5, False)
      act = aten.relu_(bn)
      q = quantized_decomposed.quantize_per_tensor(act, 0.01, 0, 0, 255, torch.uint8)

Every function here only reads the graph (and the qparams tensors it names).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxqbn import qops
from fxqbn.errors import FxqbnError
from fxqbn.qparams import DTYPE_RANGES, PLAIN_TO_QUANTIZED, QParams

from .graph_facts import describe
from .reading import BnCall
from .records import CODES, FLOAT, QUANTIZED, Boundary
from .registry import PASSTHROUGH_SPELLINGS, activation_spellings, passthrough_input, read_activation

__all__ = ["GraphKind", "PREPARED", "AO_OBSERVED", "AO_INT8", "PT2E_INT8", "int8_kind", "observer_nodes"]

Modules = dict[str, nn.Module]


@dataclass(frozen=True)
class GraphKind:
    """How one kind of graph marks a BN pattern's edges, and what matching may fuse in it."""

    name: str  # what reports and messages call the graphs
    holds: str  # what the graph holds at a pattern's edges: FLOAT, QUANTIZED or CODES
    boundary: Callable[..., Boundary | str] | None  # (graph, modules, call, chain end, clamp) -> the pattern's Boundary, or why none
    any_clamp: bool = False  # fuse any constant clamp (int8 graphs clamp codes), not only the rules' activations
    needs_dim: bool = True  # refuse a BN whose input rank the graph does not show (int8 graphs pick a kernel by rank)
    refuse_training: str = ""  # the FxqbnError for a matched BN in training mode ("": skip it, with the reason)


# -- observed graphs -------------------------------------------------------------------------------


def observer_nodes(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The observer and fake-quant modules that ``gm``'s call_module nodes call, by node name, in graph order."""
    from torch.ao.quantization import ObserverBase
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    modules = dict(gm.named_modules(remove_duplicate=False))  # torch.ao shares one observer between names
    return {
        node.name: modules[node.target]
        for node in gm.graph.nodes
        if node.op == "call_module" and isinstance(modules.get(node.target), (ObserverBase, FakeQuantizeBase))
    }


def _ao_observed(graph: fx.Graph, modules: Modules, call: BnCall, end: fx.Node, clamp: object) -> Boundary | str:
    """The torch.ao observers around a pattern: one on the BN's input, one the only reader of its output."""
    nodes = {node.name: node for node in graph.nodes}
    observers = {name: modules[str(nodes[name].target)] for name in _observer_names(graph, modules)}
    in_obs = nodes[call.node].args[0]
    users = list(end.users)
    out_obs = users[0] if len(users) == 1 else None
    if not (isinstance(in_obs, fx.Node) and in_obs.name in observers):
        return "torch.ao put no observer on its input"
    if out_obs is None or out_obs.name not in observers:
        return "torch.ao put no observer on its output"
    dtypes = {getattr(observers[in_obs.name], "dtype", None), getattr(observers[out_obs.name], "dtype", None)}
    if len(dtypes) != 1 or not dtypes <= set(DTYPE_RANGES):
        return f"torch.ao observes it as {', '.join(sorted(map(str, dtypes)))}; the kernel takes quint8 or qint8"
    return Boundary(input=in_obs.name, output=out_obs.name)


def _observer_names(graph: fx.Graph, modules: Modules) -> list[str]:
    from torch.ao.quantization import ObserverBase
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    kinds = (ObserverBase, FakeQuantizeBase)
    return [n.name for n in graph.nodes if n.op == "call_module" and isinstance(modules.get(str(n.target)), kinds)]


# -- int8 graphs: their quantize and dequantize ops ------------------------------------------------


@functools.cache
def _pt2e_ops() -> tuple[frozenset[object], frozenset[object]]:
    """(quantize ops, dequantize ops) of PT2E graphs (per tensor, scalar or tensor qparams); looked up
    once, on first use (registering ``quantized_decomposed`` imports torch.ao's quantization)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    ops = torch.ops.quantized_decomposed
    return (
        frozenset((ops.quantize_per_tensor.default, ops.quantize_per_tensor.tensor)),
        frozenset((ops.dequantize_per_tensor.default, ops.dequantize_per_tensor.tensor)),
    )


def _is_dequantize(node: fx.Node, holds: str) -> bool:
    if holds == CODES:
        return node.op == "call_function" and node.target in _pt2e_ops()[1]
    return (node.op == "call_method" and node.target == "dequantize") or (
        node.op == "call_function" and node.target is torch.dequantize and len(node.args) == 1
    )


def _is_quantize(node: fx.Node, holds: str) -> bool:
    if holds == CODES:
        return node.op == "call_function" and node.target in _pt2e_ops()[0]
    return node.op == "call_function" and node.target is torch.quantize_per_tensor


def _value(root: nn.Module, value: object) -> object:
    """A number, or the number a get_attr node's one-element tensor holds."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        value = operator.attrgetter(str(value.target))(root)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _qparams(node: fx.Node, root: nn.Module, holds: str) -> tuple[QParams, tuple[int, int]] | str:
    """(qparams, code range) of a quantize or dequantize node, or why they cannot be read."""
    args = [_value(root, a) for a in node.args[1:]]
    if node.kwargs or len(args) < (5 if holds == CODES else 3):
        return f"{node.name} passes its qparams as keywords: unsupported spelling"
    if holds == CODES:
        scale, zero_point, qmin, qmax, dtype = args[:5]
        dtype = PLAIN_TO_QUANTIZED.get(dtype)
    else:
        scale, zero_point, dtype = args[:3]
        qmin = qmax = None
    if dtype is None or not isinstance(scale, float) or not isinstance(zero_point, int):
        return f"{node.name} is not a per-tensor uint8/int8 quantization with constant qparams"
    try:
        qparams = QParams(scale, zero_point, dtype)
    except FxqbnError as exc:
        return f"{node.name}: {exc}"
    lo, hi = DTYPE_RANGES[dtype]
    return qparams, (lo if qmin is None else max(lo, qmin), hi if qmax is None else min(hi, qmax))


# torch.ao ops whose quantized output keeps its input's qparams: (node.op, target); modules by type.
# Every activation (a clamp) and pass-through spelling does; so do max-pools and the ops that only move
# or reshape values.
_KEEPS_QPARAMS = frozenset({
    *activation_spellings(), *((op, target) for op, target, _ in PASSTHROUGH_SPELLINGS),
    *(("call_module", t) for t in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten)),
    *(("call_function", f) for f in (torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d,
                                     torch.nn.functional.max_pool3d, torch.flatten)),
    *(("call_method", m) for m in ("flatten", "view", "reshape", "contiguous", "permute")),
})


def _ao_input_qparams(node: fx.Node, root: nn.Module, output: QParams) -> QParams | None:
    """The qparams of a torch.ao quantized value, when the graph shows them: the output of a quantize
    or of a quantized module (its ``scale``/``zero_point``; the dtype is assumed the output's), through
    ops that keep their input's qparams (max-pool, ReLU, Identity, flatten, ...)."""
    while node.args and isinstance(node.args[0], fx.Node):
        target = type(root.get_submodule(str(node.target))) if node.op == "call_module" else node.target
        if (node.op, target) not in _KEEPS_QPARAMS:
            break
        node = node.args[0]
    if _is_quantize(node, QUANTIZED):
        found = _qparams(node, root, QUANTIZED)
        return None if isinstance(found, str) else found[0]
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        scale, zero_point = getattr(module, "scale", None), getattr(module, "zero_point", None)
        if isinstance(scale, float) and isinstance(zero_point, int):
            try:
                return QParams(scale, zero_point, output.dtype)
            except FxqbnError:
                return None
    return None


def _input_qparams(dequantize: fx.Node, root: nn.Module, holds: str, qout: QParams) -> QParams | None | str:
    if holds == QUANTIZED:
        x = dequantize.args[0]
        return _ao_input_qparams(x, root, qout) if isinstance(x, fx.Node) else None
    found = _qparams(dequantize, root, holds)
    if isinstance(found, str):
        return found
    if found[0].dtype != qout.dtype:
        return f"its input is {found[0].dtype} and its output {qout.dtype}: the int8 kernels keep the dtype"
    return found[0]


def _code(value: float, quantize: fx.Node, holds: str, qparams: QParams) -> int:
    """The code the graph's own quantize gives ``value`` (so clamping codes equals clamping floats)."""
    x = torch.tensor([value], dtype=torch.float32)
    if holds == CODES:
        qmin, qmax, dtype = quantize.args[3:6]
        return int(qops.quantize_decomposed(x, qparams.scale, qparams.zero_point, qmin, qmax, dtype)[0])
    return int(qops.codes(qops.quantize(x, qparams.scale, qparams.zero_point, qparams.dtype))[0])


def _after(quantize: fx.Node, modules: Modules, clamp: tuple[float, float] | None) -> tuple[list[str], tuple[float, float] | None]:
    """torch.ao graphs run activations on quint8 tensors after the quantize: the pass-throughs and one
    activation that alone read its output, which the int8 BN absorbs (nodes, the clamp then)."""
    value, nodes = quantize, []
    while len(value.users) == 1:
        user = next(iter(value.users))
        activation = read_activation(user, modules)
        if activation is not None and activation.input == value.name and clamp is None:
            clamp = (activation.lo, activation.hi)
        elif passthrough_input(user, modules) is not value:
            break
        nodes.append(user.name)
        value = user
    return nodes, clamp


def _int8(holds: str) -> Callable[..., Boundary | str]:
    """The boundary finder of int8 graphs holding ``holds``: a dequantize feeds the BN, a quantize reads
    the chain's end; (graph, modules, call, end, clamp) -> Boundary, or why the BN is no such sandwich."""

    def boundary(graph: fx.Graph, modules: Modules, call: BnCall, end: fx.Node, clamp: tuple[float, float] | None) -> Boundary | str:
        root = modules[""]
        x = next(n for n in graph.nodes if n.name == call.input)
        if not _is_dequantize(x, holds):
            return f"its input {describe(x)} is float, not a dequantize: there is no int8 value to read"
        users = list(end.users)
        if len(users) != 1:
            return f"its output {end.name} has {len(users)} users; lowering needs exactly one, a quantize"
        quantize = users[0]
        if not (_is_quantize(quantize, holds) and quantize.args[0] is end):
            return f"its output reaches {describe(quantize)} in float, not a per-tensor quantize: nothing to lower into"
        after, clamp = _after(quantize, modules, clamp) if holds == QUANTIZED else ([], clamp)
        out = _qparams(quantize, root, holds)
        if isinstance(out, str):
            return out
        qout, codes = out
        qin = _input_qparams(x, root, holds, qout)
        if isinstance(qin, str):
            return qin
        if clamp is not None:
            lo = codes[0] if clamp[0] == -math.inf else _code(clamp[0], quantize, holds, qout)
            hi = codes[1] if clamp[1] == math.inf else _code(clamp[1], quantize, holds, qout)
            codes = (max(codes[0], lo), min(codes[1], hi))
        return Boundary(
            input=x.name, output=after[-1] if after else quantize.name, holds=holds, between=(quantize.name, *after),
            input_qparams=qin, output_qparams=qout, codes=codes, clamp=clamp,
        )

    return boundary


PREPARED = GraphKind(
    name="fxqbn.prepare", holds=FLOAT, boundary=None,
    refuse_training="BatchNorm '{name}' is in training mode: calibrating it would overwrite its running statistics. "
    "Call model.eval() before fxqbn.prepare",
)
AO_OBSERVED = GraphKind(
    name="torch.ao prepare_fx", holds=FLOAT, boundary=_ao_observed,
    refuse_training="BatchNorm '{name}' is in training mode: call .eval() on the observed model before fxqbn.convert",
)
AO_INT8 = GraphKind(name="torch.ao convert_fx", holds=QUANTIZED, boundary=_int8(QUANTIZED), any_clamp=True, needs_dim=False)
PT2E_INT8 = GraphKind(name="torchao convert_pt2e", holds=CODES, boundary=_int8(CODES), any_clamp=True, needs_dim=False)


def int8_kind(graph: fx.Graph) -> GraphKind:
    """``PT2E_INT8`` for a graph holding PT2E's quantize/dequantize ops, ``AO_INT8`` for torch.ao's;
    FxqbnError for neither."""
    quantize, dequantize = _pt2e_ops()
    targets = {node.target for node in graph.nodes if node.op == "call_function"}
    if targets & (quantize | dequantize):
        return PT2E_INT8
    if torch.quantize_per_tensor in targets or any(n.op == "call_method" and n.target == "dequantize" for n in graph.nodes):
        return AO_INT8
    raise FxqbnError(
        "fxqbn.lower expects a model converted to int8 by torch.ao convert_fx or torchao convert_pt2e; "
        "this graph has no quantize/dequantize nodes: quantize the whole model first"
    )
