"""Rewrite observed patterns into quantized modules, with quantize/dequantize only at boundaries.

Before (one pattern, input x from float code, output read by float code)::

    x_obs = fxqbn_observer_0(x)
    bn = bn(x_obs)
    relu = relu(bn)
    out_obs = fxqbn_observer_1(relu)
    y = add(out_obs, 1)

After::

    q = fxqbn.qops.quantize(x, 0.02, 128, torch.quint8)
    bn = bn(q)                      # fxqbn.nn.BNReLU2d holding the output qparams
    dq = fxqbn.qops.dequantize(bn)
    y = add(dq, 1)

A pattern reading another pattern's output takes its quantized tensor directly: no
dequantize/quantize pair between them. The ``Backend`` record (``fxqbn.backends``) supplies the
replacement modules and the quantize/dequantize targets; the default is the native one above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import fx, nn

from fxqbn.backends import NATIVE, Backend
from fxqbn.errors import FxqbnError
from fxqbn.qparams import QParams, observer_has_data, qparams_from_observer

from .records import Observed, Rewrite

__all__ = ["collect_qparams", "rewrite_patterns"]


def collect_qparams(gm: fx.GraphModule, patterns: Sequence[Observed]) -> dict[str, QParams]:
    """QParams of every observer node the patterns use, each computed once.

    Raises FxqbnError listing the BN modules whose observers never saw data, or naming the
    observer whose qparams the kernel cannot take.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    users: dict[str, list[str]] = {}
    for pattern in patterns:
        for name in (pattern.input_observer, pattern.output_observer):
            users.setdefault(name, []).append(pattern.match.module)
    observers = {name: gm.get_submodule(str(nodes[name].target)) for name in users}
    idle = [name for name, observer in observers.items() if not observer_has_data(observer)]
    if idle:
        modules = sorted({module for name in idle for module in users[name]})
        raise FxqbnError(
            f"observers never saw data for BatchNorm {', '.join(repr(m) for m in modules)}: run calibration "
            "batches through the prepared model (in eval mode, under torch.no_grad()) before fxqbn.convert"
        )
    qparams = {}
    for name, observer in observers.items():
        try:
            qparams[name] = qparams_from_observer(observer)
        except FxqbnError as exc:
            raise FxqbnError(
                f"observer '{name}' (for BatchNorm {', '.join(repr(m) for m in users[name])}): {exc}. "
                "Check the calibration data for NaN or infinite values"
            ) from None
    return qparams


def _install(gm: fx.GraphModule, name: str, module: nn.Module, taken: set[str]) -> str:
    """Put ``module`` at ``name`` (replacing the float BN); a BN called twice gets a fresh name."""
    target, k = name, 0
    while target in taken:
        k += 1
        target = f"{name}_{k}"
    taken.add(target)
    parent_name, _, leaf = target.rpartition(".")
    gm.get_submodule(parent_name).add_module(leaf, module)
    return target


def rewrite_patterns(
    gm: fx.GraphModule, patterns: Sequence[Observed], qparams: Mapping[str, QParams], backend: Backend = NATIVE
) -> tuple[Rewrite, ...]:
    """Replace every observed pattern (in graph order) with ``backend``'s modules and remove all their observers.

    The caller lints and recompiles ``gm``.
    """
    graph = gm.graph
    nodes = {node.name: node for node in graph.nodes}
    modules = dict(gm.named_modules())
    quantized: dict[fx.Node, fx.Node] = {}  # observer node -> node holding the quantized value
    taken: set[str] = set()
    rewrites = []

    # 1. A quantized twin for every pattern, reading quantized inputs.
    for pattern in patterns:
        match = pattern.match
        bn = nodes[match.bn_node]
        in_obs, out_obs = nodes[pattern.input_observer], nodes[pattern.output_observer]
        if bn.args[0] is not in_obs:
            raise FxqbnError(f"the graph changed since fxqbn.prepare: BatchNorm node '{bn.name}' no longer reads its observer")
        q_in = quantized.get(in_obs)
        if q_in is None:
            qp = qparams[in_obs.name]
            with graph.inserting_before(bn):
                q_in = graph.call_function(backend.quantize, (in_obs, qp.scale, qp.zero_point, qp.dtype))
            quantized[in_obs] = q_in
        in_qp, out_qp = qparams[in_obs.name], qparams[out_obs.name]
        qmodule = backend.module_for(match.rule, modules[match.module], in_qp, out_qp)
        target = _install(gm, match.module, qmodule, taken)
        with graph.inserting_before(out_obs):
            quantized[out_obs] = graph.call_module(target, (q_in,))
        rewrites.append(Rewrite(pattern, target, in_qp, out_qp, backend.op_for(match.rule)))

    # 2. Last to first, so later patterns' BN nodes are gone: whatever still reads a pattern's
    #    output observer is float code and gets one dequantize. Then the float nodes go.
    for pattern in reversed(patterns):
        out_obs = nodes[pattern.output_observer]
        readers = list(out_obs.users)
        if readers:
            q_out = quantized[out_obs]
            with graph.inserting_after(q_out):
                dq = graph.call_function(backend.dequantize, backend.dequantize_args(q_out, qparams[out_obs.name]))
            for reader in readers:
                reader.replace_input_with(out_obs, dq)
        for name in (pattern.output_observer, pattern.match.relu_node, pattern.match.bn_node):
            if name is not None:
                graph.erase_node(nodes[name])

    # 3. Input observers that no pattern produced: their readers get the float value back.
    outputs = {pattern.output_observer for pattern in patterns}
    for name in dict.fromkeys(pattern.input_observer for pattern in patterns):
        if name not in outputs:
            observer = nodes[name]
            observer.replace_all_uses_with(observer.args[0])
            graph.erase_node(observer)
    for name in dict.fromkeys(n for pattern in patterns for n in (pattern.input_observer, pattern.output_observer)):
        gm.delete_submodule(str(nodes[name].target))
    return tuple(rewrites)
