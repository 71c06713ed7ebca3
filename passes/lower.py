"""Matching for ``fxqbn.lower``: the float BNs of a whole-model int8 graph sandwiched between a
dequantize and a per-tensor quantize. Reads the graph (and the qparams tensors it names); never edits it.

A torch.ao ``convert_fx`` graph (quint8 tensors)::

    dq = conv.dequantize()                                  # or torch.dequantize(conv)
    bn = F.batch_norm(dq, mean, var, w, b, False, 0.1, 1e-5) # any BN spelling (passes.spellings)
    act = relu(identity(bn))                                 # optional pass-throughs and one activation
    q = torch.quantize_per_tensor(act, bn_scale_0, bn_zero_point_0, torch.quint8)

A torchao ``convert_pt2e`` graph (plain uint8/int8 codes)::

    dq = quantized_decomposed.dequantize_per_tensor(codes, 0.02, 128, 0, 255, torch.uint8)
    bn = aten.batch_norm(dq, w, b, mean, var, False, 0.1, 1e-5, False)
    act = aten.relu_(bn)
    q = quantized_decomposed.quantize_per_tensor(act, 0.01, 0, 0, 255, torch.uint8)

Each such BN becomes a ``LowerMatch``; every other BN a ``Skip`` with the reason.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxqbn import qops
from fxqbn.errors import FxqbnError
from fxqbn.fused_io import QUANTIZED_DTYPES
from fxqbn.qparams import DTYPE_RANGES, QParams

from .graph_facts import describe, rank, tensor_problem
from .match import source_of
from .patterns import RANK_TO_DIM
from .records import Skip
from .spellings import (
    ACTIVATION_SPELLINGS, PASSTHROUGH_SPELLINGS, BnCall, activation_name, passthrough_input, read_activation, read_bn,
)

__all__ = ["LowerMatch", "ROUTES", "graph_route", "require_route", "find_lowerable"]

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


# route -> the graphs it names: torch.ao convert_fx's (quantized tensors), torchao convert_pt2e's (plain codes)
ROUTES = {"ao": "torch.ao convert_fx", "pt2e": "torchao convert_pt2e"}


@dataclass(frozen=True)
class LowerMatch:
    """A float BN pattern between a dequantize and a per-tensor quantize: one int8 BN replaces it."""

    bn: BnCall  # the BN, normalised
    position: int  # the BN node's index in graph order, for the report
    dim: int | None  # kernel dim (from the module type or the input's rank); None: picked by rank at run time
    dequantize: str  # the dequantize node the BN reads; its input is the int8 value the new BN takes
    quantize: str  # the quantize node whose codes the new BN produces
    chain: tuple[str, ...]  # nodes between the BN's output and the quantize (pass-throughs, activation)
    after: tuple[str, ...]  # torch.ao: pass-throughs and an activation run on the quantize's quint8 output
    activation: str  # "", "ReLU", "ReLU6" or "clamp(lo, hi)"
    codes: tuple[int, int]  # the output code range: the activation's clamp and the quantize's range
    input_qparams: QParams | None  # None: a torch.ao tensor whose qparams the graph does not show
    output_qparams: QParams
    route: str  # "ao" or "pt2e"
    source: str = ""  # "file.py:123" of the BN call in the user's code

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {tuple(ROUTES)}, got {self.route!r}")
        lo, hi = DTYPE_RANGES[self.output_qparams.dtype]
        if not lo <= self.codes[0] <= self.codes[1] <= hi:
            raise ValueError(f"code range {self.codes} outside {self.output_qparams.dtype}'s")

    # What ``passes.rewrite.bn_tensors`` reads besides ``bn``: the constants are the record's (read off the
    # graph being lowered), and an inference graph keeps no momentum.
    bn_module = None
    momentum = None

    @property
    def output(self) -> str:
        """The node whose value the int8 BN produces: the quantize, or the last node absorbed after it."""
        return self.after[-1] if self.after else self.quantize

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes the rewrite removes, last to first (the dequantize too when nothing else reads it)."""
        getitem = (self.bn.output,) if self.bn.output != self.bn.node else ()
        return (*reversed(self.after), self.quantize, *reversed(self.chain), *getitem, self.bn.node)


# -- boundaries ----------------------------------------------------------------------------------


def graph_route(graph: fx.Graph) -> str | None:
    """"pt2e" for a graph holding PT2E's quantize/dequantize ops, "ao" for torch.ao's, None for neither."""
    quantize, dequantize = _pt2e_ops()
    targets = {node.target for node in graph.nodes if node.op == "call_function"}
    if targets & (quantize | dequantize):
        return "pt2e"
    if torch.quantize_per_tensor in targets or any(n.op == "call_method" and n.target == "dequantize" for n in graph.nodes):
        return "ao"
    return None


def _is_dequantize(node: fx.Node, route: str) -> bool:
    if route == "pt2e":
        return node.op == "call_function" and node.target in _pt2e_ops()[1]
    return (node.op == "call_method" and node.target == "dequantize") or (
        node.op == "call_function" and node.target is torch.dequantize and len(node.args) == 1
    )


def _is_quantize(node: fx.Node, route: str) -> bool:
    if route == "pt2e":
        return node.op == "call_function" and node.target in _pt2e_ops()[0]
    return node.op == "call_function" and node.target is torch.quantize_per_tensor


def _value(root: nn.Module, value: object) -> object:
    """A number, or the number a get_attr node's one-element tensor holds."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        value = operator.attrgetter(str(value.target))(root)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _boundary(node: fx.Node, root: nn.Module, route: str) -> tuple[QParams, tuple[int, int]] | str:
    """(qparams, code range) of a quantize or dequantize node, or why they cannot be read."""
    args = [_value(root, a) for a in node.args[1:]]
    if node.kwargs or len(args) < (5 if route == "pt2e" else 3):
        return f"{node.name} passes its qparams as keywords: unsupported spelling"
    if route == "pt2e":
        scale, zero_point, qmin, qmax, dtype = args[:5]
        dtype = QUANTIZED_DTYPES.get(dtype)
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
    *((op, target) for op, target, _ in ACTIVATION_SPELLINGS + PASSTHROUGH_SPELLINGS),
    *(("call_module", t) for t in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten)),
    *(("call_function", f) for f in (F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten)),
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
    if _is_quantize(node, "ao"):
        found = _boundary(node, root, "ao")
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


def _code(value: float, quantize: fx.Node, root: nn.Module, route: str, qparams: QParams) -> int:
    """The code the graph's own quantize gives ``value`` (so clamping codes equals clamping floats)."""
    x = torch.tensor([value], dtype=torch.float32)
    if route == "pt2e":
        qmin, qmax, dtype = quantize.args[3:6]
        return int(qops.quantize_decomposed(x, qparams.scale, qparams.zero_point, qmin, qmax, dtype)[0])
    return int(qops.codes(qops.quantize(x, qparams.scale, qparams.zero_point, qparams.dtype))[0])


class _Matcher:
    def __init__(self, gm: fx.GraphModule, route: str) -> None:
        self.gm, self.route = gm, route
        self.modules = dict(gm.named_modules(remove_duplicate=False))
        self.nodes = {node.name: node for node in gm.graph.nodes}

    def skip(self, position: int, node: fx.Node, call: BnCall | None, reason: str) -> Skip:
        if node.op == "call_module":
            module, spelling = str(node.target), type(self.modules[str(node.target)]).__name__
        else:
            module = call.owner if call is not None else node.name
            spelling = call.spelling if call is not None else getattr(node.target, "__name__", str(node.target))
        return Skip(position=position, node=node.name, module=module, pattern=spelling, reason=reason, source=source_of(node))

    def match(self, position: int, node: fx.Node) -> LowerMatch | Skip | None:
        call = read_bn(node, self.modules)
        if call is None or isinstance(call, str):
            return None if call is None else self.skip(position, node, None, call)
        found = self._sandwich(call, position)
        return self.skip(position, node, call, found) if isinstance(found, str) else found

    def _chain(self, call: BnCall) -> tuple[list[str], tuple[float, float] | None, fx.Node] | str:
        """(pass-through and activation nodes, the activation's clamp, the quantize) after the BN, or why not."""
        value, chain = self.nodes[call.output], []
        clamp = (0.0, math.inf) if call.activation == "ReLU" else None
        while True:
            users = list(value.users)
            if len(users) != 1:
                return f"its output {value.name} has {len(users)} users; lowering needs exactly one, a quantize"
            user = users[0]
            if _is_quantize(user, self.route) and user.args[0] is value:
                return chain, clamp, user
            activation = read_activation(user, self.modules)
            if passthrough_input(user, self.modules) is value:
                chain.append(user.name)
            elif activation is not None and activation.input == value.name and clamp is None:
                chain.append(user.name)
                clamp = (activation.lo, activation.hi)
            else:
                return f"its output reaches {describe(user)} in float, not a per-tensor quantize: nothing to lower into"
            value = user

    def _after(self, quantize: fx.Node, clamp: tuple[float, float] | None) -> tuple[list[str], tuple[float, float] | None]:
        """torch.ao graphs run activations on quint8 tensors after the quantize: the pass-throughs and one
        activation that alone read its output, which the int8 BN absorbs (nodes, the clamp then)."""
        value, nodes = quantize, []
        while self.route == "ao" and len(value.users) == 1:
            user = next(iter(value.users))
            activation = read_activation(user, self.modules)
            if activation is not None and activation.input == value.name and clamp is None:
                clamp = (activation.lo, activation.hi)
            elif passthrough_input(user, self.modules) is not value:
                break
            nodes.append(user.name)
            value = user
        return nodes, clamp

    def _sandwich(self, call: BnCall, position: int) -> LowerMatch | str:
        x = self.nodes[call.input]
        if not _is_dequantize(x, self.route):
            return f"its input {describe(x)} is float, not a dequantize: there is no int8 value to read"
        chain = self._chain(call)
        if isinstance(chain, str):
            return chain
        nodes, clamp, quantize = chain
        after, clamp = self._after(quantize, clamp)
        problem = tensor_problem(operator.attrgetter(call.running_mean)(self.gm))
        out = _boundary(quantize, self.gm, self.route)
        if problem or isinstance(out, str):
            return problem or out
        qout, codes = out
        qin = self._input_qparams(x, qout)
        if isinstance(qin, str):
            return qin
        dim = self._dim(call, x)
        if isinstance(dim, str):
            return dim
        if clamp is not None:
            lo = codes[0] if clamp[0] == -math.inf else _code(clamp[0], quantize, self.gm, self.route, qout)
            hi = codes[1] if clamp[1] == math.inf else _code(clamp[1], quantize, self.gm, self.route, qout)
            codes = (max(codes[0], lo), min(codes[1], hi))
        return LowerMatch(
            bn=call, position=position, dim=dim, dequantize=x.name, quantize=quantize.name,
            chain=tuple(nodes), after=tuple(after), activation=activation_name(*clamp) if clamp else "", codes=codes,
            input_qparams=qin, output_qparams=qout, route=self.route, source=source_of(self.nodes[call.node]),
        )

    def _input_qparams(self, dequantize: fx.Node, qout: QParams) -> QParams | None | str:
        if self.route == "ao":
            return _ao_input_qparams(dequantize.args[0], self.gm, qout) if isinstance(dequantize.args[0], fx.Node) else None
        found = _boundary(dequantize, self.gm, self.route)
        if isinstance(found, str):
            return found
        if found[0].dtype != qout.dtype:
            return f"its input is {found[0].dtype} and its output {qout.dtype}: the int8 kernels keep the dtype"
        return found[0]

    def _dim(self, call: BnCall, x: fx.Node) -> int | None | str:
        found = rank(x) if rank(x) is not None else rank(self.nodes[call.output])  # a BN keeps the shape
        if found is None:
            return call.dim
        dim = RANK_TO_DIM.get(found)
        if dim is None or (call.dim is not None and call.dim != dim):
            return f"its input has rank {found}: no int8 {call.spelling} kernel takes it"
        return dim


def require_route(graph: fx.Graph) -> str:
    """``graph_route``, or FxqbnError when the graph is neither a torch.ao nor a PT2E int8 graph."""
    route = graph_route(graph)
    if route is None:
        raise FxqbnError(
            "fxqbn.lower expects a model converted to int8 by torch.ao convert_fx or torchao convert_pt2e; "
            "this graph has no quantize/dequantize nodes: quantize the whole model first"
        )
    return route


def find_lowerable(gm: fx.GraphModule) -> tuple[list[LowerMatch], list[Skip]]:
    """Every BN of a converted int8 graph, in graph order: lowerable, or skipped with the reason.

    Raises FxqbnError when ``gm`` is neither a torch.ao ``convert_fx`` nor a PT2E ``convert_pt2e`` graph.
    """
    matcher = _Matcher(gm, require_route(gm.graph))
    matches: list[LowerMatch] = []
    skips: list[Skip] = []
    for position, node in enumerate(gm.graph.nodes):
        found = matcher.match(position, node)
        if found is not None:
            (matches if isinstance(found, LowerMatch) else skips).append(found)
    return matches, skips
