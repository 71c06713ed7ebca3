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
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.quantization import ObserverBase
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from fxqbn import qops
from fxqbn.errors import FxqbnError
from fxqbn.qparams import DTYPE_RANGES, PLAIN_TO_QUANTIZED, QParams

from .graph_facts import describe
from .reading import BnCall
from .records import CODES, FLOAT, QUANTIZED, Boundary
from .registry import PASSTHROUGH_SPELLINGS, activation_spellings, passthrough_input, read_activation

__all__ = ["GraphKind", "Int8Ops", "PREPARED", "AO_OBSERVED", "AO_INT8", "PT2E_INT8", "int8_kind", "observer_nodes"]

Modules = dict[str, nn.Module]
Nodes = dict[str, fx.Node]


@dataclass(frozen=True)
class GraphKind:
    """How one kind of graph marks a BN pattern's edges, and what matching may fuse in it."""

    name: str  # what reports and messages call the graphs
    holds: str  # what the graph holds at a pattern's edges: FLOAT, QUANTIZED or CODES
    boundary: Callable[..., Boundary | str] | None  # (nodes by name, modules, call, chain end, clamp) -> the pattern's Boundary, or why none
    any_clamp: bool = False  # fuse any constant clamp (int8 graphs clamp codes), not only the rules' activations
    needs_dim: bool = True  # refuse a BN whose input rank the graph does not show (int8 graphs pick a kernel by rank)
    refuse_training: str = ""  # the FxqbnError for a matched BN in training mode ("": skip it, with the reason)
    ops: "Int8Ops | None" = None  # int8 graphs: how they spell quantize and dequantize


# -- observed graphs -------------------------------------------------------------------------------


def _observer(node: object, modules: Modules) -> nn.Module | None:
    """The observer or fake-quant module a call_module node calls; None for any other node."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    module = modules.get(str(node.target))
    return module if isinstance(module, (ObserverBase, FakeQuantizeBase)) else None


def observer_nodes(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The observer and fake-quant modules that ``gm``'s call_module nodes call, by node name, in graph order."""
    modules = dict(gm.named_modules(remove_duplicate=False))  # torch.ao shares one observer between names
    return {node.name: found for node in gm.graph.nodes if (found := _observer(node, modules)) is not None}


def _ao_observed(nodes: Nodes, modules: Modules, call: BnCall, end: fx.Node, clamp: object) -> Boundary | str:
    """The torch.ao observers around a pattern: one on the BN's input, one the only reader of its output."""
    in_obs = nodes[call.node].args[0]
    users = list(end.users)
    out_obs = users[0] if len(users) == 1 else None
    observed_in, observed_out = _observer(in_obs, modules), _observer(out_obs, modules)
    if observed_in is None:
        return "torch.ao put no observer on its input"
    if observed_out is None:
        return "torch.ao put no observer on its output"
    dtypes = {getattr(observed_in, "dtype", None), getattr(observed_out, "dtype", None)}
    if len(dtypes) != 1 or not dtypes <= set(DTYPE_RANGES):
        return f"torch.ao observes it as {', '.join(sorted(map(str, dtypes)))}; the kernel takes quint8 or qint8"
    return Boundary(input=in_obs.name, output=out_obs.name)


# -- int8 graphs: how each spells its quantize and dequantize ---------------------------------------


@dataclass(frozen=True)
class Int8Ops:
    """How one kind of int8 graph spells the ops around a float BN."""

    holds: str  # QUANTIZED or CODES: what flows between those ops
    is_quantize: Callable[[fx.Node], bool]
    is_dequantize: Callable[[fx.Node], bool]
    qparams: Callable[[fx.Node, nn.Module], "tuple[QParams, tuple[int, int]] | str"]  # of a quantize / dequantize, and its code range
    input_qparams: Callable[[fx.Node, nn.Module, QParams], "QParams | None | str"]  # of the value a dequantize reads (None: unknown)
    code: Callable[[float, fx.Node, QParams], int]  # the code the graph's own quantize gives a value
    absorbs_after: bool  # the graph runs pass-throughs and activations on the quantize's int8 output


def _value(root: nn.Module, value: object) -> object:
    """A number, or the number a get_attr node's one-element tensor holds."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        value = operator.attrgetter(str(value.target))(root)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _checked(node: fx.Node, scale: object, zero_point: object, dtype: object, qmin: object, qmax: object) -> tuple[QParams, tuple[int, int]] | str:
    """(qparams, code range) of constant per-tensor qparams, or why they are not."""
    if dtype is None or not isinstance(scale, float) or not isinstance(zero_point, int):
        return f"{node.name} is not a per-tensor uint8/int8 quantization with constant qparams"
    try:
        qparams = QParams(scale, zero_point, dtype)
    except FxqbnError as exc:
        return f"{node.name}: {exc}"
    lo, hi = DTYPE_RANGES[dtype]
    return qparams, (lo if qmin is None else max(lo, qmin), hi if qmax is None else min(hi, qmax))


def _positional(node: fx.Node, root: nn.Module, count: int) -> list | str:
    args = [_value(root, a) for a in node.args[1:]]
    if node.kwargs or len(args) < count:
        return f"{node.name} passes its qparams as keywords: unsupported spelling"
    return args[:count]


# torch.ao convert_fx: x.dequantize() / torch.dequantize(x); torch.quantize_per_tensor(x, scale, zero_point, dtype)


def _ao_quantize(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.quantize_per_tensor


def _ao_dequantize(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "dequantize") or (
        node.op == "call_function" and node.target is torch.dequantize and len(node.args) == 1
    )


def _ao_qparams(node: fx.Node, root: nn.Module) -> tuple[QParams, tuple[int, int]] | str:
    args = _positional(node, root, 3)
    return args if isinstance(args, str) else _checked(node, *args, None, None)


# torch.ao ops whose quantized output keeps its input's qparams: (node.op, target); modules by type.
# Every activation (a clamp) and pass-through spelling does; so do max-pools and the ops that only move
# or reshape values.
_KEEPS_QPARAMS = frozenset({
    *activation_spellings(), *((op, target) for op, target, _ in PASSTHROUGH_SPELLINGS),
    *(("call_module", t) for t in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten)),
    *(("call_function", f) for f in (F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten)),
    *(("call_method", m) for m in ("flatten", "view", "reshape", "contiguous", "permute")),
})


def _ao_input_qparams(dequantize: fx.Node, root: nn.Module, output: QParams) -> QParams | None:
    """The qparams of the quint8 value a torch.ao dequantize reads, when the graph shows them: the output
    of a quantize or of a quantized module (its ``scale``/``zero_point``; the dtype is assumed the
    output's), through ops that keep their input's qparams (max-pool, ReLU, Identity, flatten, ...)."""
    node = dequantize.args[0]
    while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node):
        target = type(root.get_submodule(str(node.target))) if node.op == "call_module" else node.target
        if (node.op, target) not in _KEEPS_QPARAMS:
            break
        node = node.args[0]
    if isinstance(node, fx.Node) and _ao_quantize(node):
        found = _ao_qparams(node, root)
        return None if isinstance(found, str) else found[0]
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = root.get_submodule(str(node.target))
        scale, zero_point = getattr(module, "scale", None), getattr(module, "zero_point", None)
        if isinstance(scale, float) and isinstance(zero_point, int):
            try:
                return QParams(scale, zero_point, output.dtype)
            except FxqbnError:
                return None
    return None


def _ao_code(value: float, quantize: fx.Node, qparams: QParams) -> int:
    x = torch.tensor([value], dtype=torch.float32)
    return int(qops.codes(qops.quantize(x, qparams.scale, qparams.zero_point, qparams.dtype))[0])


# torchao convert_pt2e: quantized_decomposed.(de)quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)


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


def _pt2e_qparams(node: fx.Node, root: nn.Module) -> tuple[QParams, tuple[int, int]] | str:
    args = _positional(node, root, 5)
    if isinstance(args, str):
        return args
    scale, zero_point, qmin, qmax, dtype = args
    return _checked(node, scale, zero_point, PLAIN_TO_QUANTIZED.get(dtype), qmin, qmax)


def _pt2e_input_qparams(dequantize: fx.Node, root: nn.Module, output: QParams) -> QParams | str:
    found = _pt2e_qparams(dequantize, root)
    if isinstance(found, str):
        return found
    if found[0].dtype != output.dtype:
        return f"its input is {found[0].dtype} and its output {output.dtype}: the int8 kernels keep the dtype"
    return found[0]


def _pt2e_code(value: float, quantize: fx.Node, qparams: QParams) -> int:
    qmin, qmax, dtype = quantize.args[3:6]
    x = torch.tensor([value], dtype=torch.float32)
    return int(qops.quantize_decomposed(x, qparams.scale, qparams.zero_point, qmin, qmax, dtype)[0])


AO_OPS = Int8Ops(QUANTIZED, _ao_quantize, _ao_dequantize, _ao_qparams, _ao_input_qparams, _ao_code, absorbs_after=True)
PT2E_OPS = Int8Ops(
    CODES,
    lambda n: n.op == "call_function" and n.target in _pt2e_ops()[0],
    lambda n: n.op == "call_function" and n.target in _pt2e_ops()[1],
    _pt2e_qparams, _pt2e_input_qparams, _pt2e_code, absorbs_after=False,
)


def _after(quantize: fx.Node, modules: Modules, clamp: tuple[float, float] | None) -> tuple[list[str], tuple[float, float] | None]:
    """The pass-throughs and one activation that alone read the quantize's int8 output (torch.ao runs
    them on quint8 tensors), which the int8 BN absorbs: (nodes, the clamp then)."""
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


def _codes(codes: tuple[int, int], clamp: tuple[float, float] | None, ops: Int8Ops, quantize: fx.Node, qout: QParams) -> tuple[int, int]:
    """The output code range narrowed to the activation's clamp, as the graph's own quantize codes its bounds."""
    if clamp is None:
        return codes
    lo = codes[0] if clamp[0] == -math.inf else ops.code(clamp[0], quantize, qout)
    hi = codes[1] if clamp[1] == math.inf else ops.code(clamp[1], quantize, qout)
    return max(codes[0], lo), min(codes[1], hi)


def _int8(ops: Int8Ops) -> Callable[..., Boundary | str]:
    """The boundary finder of int8 graphs spelled with ``ops``: a dequantize feeds the BN, a quantize reads
    the chain's end; (nodes, modules, call, end, clamp) -> Boundary, or why the BN is no such sandwich."""

    def boundary(nodes: Nodes, modules: Modules, call: BnCall, end: fx.Node, clamp: tuple[float, float] | None) -> Boundary | str:
        root = modules[""]
        x = nodes[call.input]
        if not ops.is_dequantize(x):
            return f"its input {describe(x)} is float, not a dequantize: there is no int8 value to read"
        users = list(end.users)
        if len(users) != 1:
            return f"its output {end.name} has {len(users)} users; lowering needs exactly one, a quantize"
        quantize = users[0]
        if not (ops.is_quantize(quantize) and quantize.args[0] is end):
            return f"its output reaches {describe(quantize)} in float, not a per-tensor quantize: nothing to lower into"
        after, clamp = _after(quantize, modules, clamp) if ops.absorbs_after else ([], clamp)
        out = ops.qparams(quantize, root)
        if isinstance(out, str):
            return out
        qin = ops.input_qparams(x, root, out[0])
        if isinstance(qin, str):
            return qin
        return Boundary(
            input=x.name, output=after[-1] if after else quantize.name, holds=ops.holds, between=(quantize.name, *after),
            input_qparams=qin, output_qparams=out[0], codes=_codes(out[1], clamp, ops, quantize, out[0]), clamp=clamp,
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


def _int8_kind(name: str, ops: Int8Ops) -> GraphKind:
    """An int8 graph's kind: any constant clamp is fused (in code space), a kernel may be picked by rank."""
    return GraphKind(name=name, holds=ops.holds, boundary=_int8(ops), any_clamp=True, needs_dim=False, ops=ops)


AO_INT8 = _int8_kind("torch.ao convert_fx", AO_OPS)
PT2E_INT8 = _int8_kind("torchao convert_pt2e", PT2E_OPS)


def int8_kind(graph: fx.Graph) -> GraphKind:
    """The kind of a whole-model int8 graph: ``PT2E_INT8`` where PT2E's quantize/dequantize ops are,
    else ``AO_INT8`` where torch.ao's are; FxqbnError for neither."""
    for kind in (PT2E_INT8, AO_INT8):
        if any(kind.ops.is_quantize(n) or kind.ops.is_dequantize(n) for n in graph.nodes):
            return kind
    raise FxqbnError(
        "fxqbn.lower expects a model converted to int8 by torch.ao convert_fx or torchao convert_pt2e; "
        "this graph has no quantize/dequantize nodes: quantize the whole model first"
    )
