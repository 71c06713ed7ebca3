"""``fxqbn.lower``: int8 BatchNorms inside whole-model int8 graphs (torch.ao ``convert_fx``, torchao ``convert_pt2e``).

    q = convert_pt2e(prepare_pt2e(...))   # or convert_fx(prepare_fx(...))
    lowered = fxqbn.lower(q)             # every float BN between a dequantize and a quantize -> one int8 BN
    print(fxqbn.get_report(lowered))

No calibration: the qparams are the graph's. The steps: check the arguments, copy the graph module,
match (``passes.find_patterns`` with the graph's kind), then the steps every entry shares
(``fxqbn.pipeline``): plan, build, rewrite, install, report.
"""

from __future__ import annotations

import time

from torch import fx

from fxqbn.passes import find_patterns, int8_kind, plan_patterns, rewrite_patterns
from fxqbn.passes.boundaries import GraphKind

from . import pipeline
from .backends import BACKENDS, Backend, backend_named
from .copying import graph_copy
from .errors import FxqbnError
from .state import LOWERED_KEY, REPORT_KEY, attach, attached

__all__ = ["lower"]


def _check(gm: object, backend: object) -> tuple[GraphKind, Backend]:
    """(the graph's kind, the backend) for valid arguments; FxqbnError otherwise. By default the backend
    works on what the graph holds: quantized tensors (torch.ao) or plain codes (PT2E)."""
    if not isinstance(gm, fx.GraphModule):
        raise FxqbnError(
            f"fxqbn.lower expects the GraphModule returned by torch.ao convert_fx or torchao convert_pt2e, "
            f"got {type(gm).__name__}"
        )
    if attached(gm, REPORT_KEY) is not None:
        raise FxqbnError("this model was already converted or lowered by fxqbn: lower the torch.ao / PT2E result itself")
    chosen = None if backend is None else backend_named(backend)
    kind = int8_kind(gm.graph)
    return kind, chosen or next(b for b in BACKENDS.values() if b.consumes == kind.holds)


def lower(gm: fx.GraphModule, backend: str | None = None) -> fx.GraphModule:
    """Replace every float BN pattern of a whole-model int8 graph that sits between a dequantize and a
    per-tensor quantize (BN, any spelling and dim, then Identity / eval Dropout, then ReLU, ReLU6 or a
    constant clamp) by one int8 BN that reads the int8 value and produces the quantize's codes.

    Args:
        gm: a GraphModule returned by torch.ao ``convert_fx`` or torchao ``convert_pt2e``. Never changed.
        backend: ``None`` (torch.ao graphs: ``"native"``, on their quantized tensors; PT2E graphs:
            ``"fused"``, on their plain codes, and the result still exports with ``torch.export``),
            or ``"native"`` / ``"fused"`` to choose; the module converts at its edges when the kernel
            works on the other kind of tensor.

    Returns:
        A new GraphModule; ``fxqbn.get_report`` lists every BN: lowered, or skipped with the reason.
    """
    start = time.perf_counter()
    kind, chosen = _check(gm, backend)
    out = graph_copy(gm)
    matches, skips = find_patterns(out.graph, out, kind)
    plans, refused = pipeline.refuse_unbuildable(plan_patterns(matches, {}, chosen), chosen)
    modules = pipeline.build_modules(out, plans, chosen)  # all built before any edit
    read_before = [str(n.target) for n in out.graph.nodes if n.op == "get_attr"]
    graph, converted, new = rewrite_patterns(out.graph, out, plans, modules, chosen)
    pipeline.install(out, graph, new)
    pipeline.drop_unread_attributes(out, read_before)
    attach(out, REPORT_KEY, pipeline.report(converted, skips + refused, start, lowered_into=kind.name))
    attach(out, LOWERED_KEY, tuple(p.match for p in plans))
    return out
