"""``fxqbn.lower``: int8 BatchNorms inside whole-model int8 graphs (torch.ao ``convert_fx``, torchao ``convert_pt2e``).

    q = convert_pt2e(prepare_pt2e(...))   # or convert_fx(prepare_fx(...))
    lowered = fxqbn.lower(q)             # every float BN between a dequantize and a quantize -> one int8 BN
    print(fxqbn.get_report(lowered))

No calibration: the qparams are the graph's. The steps: check the arguments, copy the graph module,
match (``passes.lower``), plan (which kernel, which clamp), rewrite (``passes.lower_rewrite``), report.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence

import torch.nn.functional as F
from torch import fx, nn

from fxqbn.passes.lower import ROUTES, LowerMatch, find_lowerable, require_route
from fxqbn.passes.lower_rewrite import rewrite_lowerable
from fxqbn.passes.patterns import rule_for
from fxqbn.passes.modules import ModuleIndex
from fxqbn.passes.records import Skip
from fxqbn.passes.rewrite import bn_tensors

from .backends import FUSED, NATIVE, Backend, BnTensors, Kernel, backend_named
from .errors import FxqbnError
from .lowered import ByRank, LoweredBatchNorm
from .qparams import DTYPE_RANGES, QParams
from .report import Report, ReportRow, ReportSummary, skipped_row
from .state import LOWERED_KEY, REPORT_KEY, attach, attached

__all__ = ["lower", "DEFAULT_BACKENDS"]

DEFAULT_BACKENDS = {"ao": NATIVE, "pt2e": FUSED}  # what each route's graph holds: quantized tensors / plain codes


def _check(gm: object, backend: object) -> tuple[str, Backend]:
    """(route, backend) for valid arguments; FxqbnError otherwise."""
    if not isinstance(gm, fx.GraphModule):
        raise FxqbnError(
            f"fxqbn.lower expects the GraphModule returned by torch.ao convert_fx or torchao convert_pt2e, "
            f"got {type(gm).__name__}"
        )
    if attached(gm, REPORT_KEY) is not None:
        raise FxqbnError("this model was already converted or lowered by fxqbn: lower the torch.ao / PT2E result itself")
    chosen = None if backend is None else backend_named(backend)
    route = require_route(gm.graph)
    return route, chosen or DEFAULT_BACKENDS[route]


def _plan(matches: list[LowerMatch], backend: Backend) -> tuple[list[LowerMatch], list[Skip]]:
    """Matches the backend can build; the others become skips with the reason."""
    kept, skips = [], []
    for m in matches:
        if backend is FUSED and m.input_qparams is None:
            skips.append(Skip(
                position=m.position, node=m.bn.node, module=m.bn.owner, pattern=m.bn.spelling, source=m.source,
                reason=f"the graph does not show the qparams of its input {m.dequantize}'s value, which the fused "
                       "kernel needs at build time: use backend='native', which reads them off the tensor",
            ))
        else:
            kept.append(m)
    return kept, skips


def _kernel_clamp(m: LowerMatch) -> tuple[bool, tuple[int, int] | None]:
    """(use the kernel's ReLU variant, extra output code clamp or None) for the match's code range."""
    lo, hi = DTYPE_RANGES[m.output_qparams.dtype]
    zero_point = m.output_qparams.zero_point
    relu = m.codes[0] == zero_point and zero_point > lo
    own = (zero_point if relu else lo, hi)
    return relu, (None if m.codes == own else m.codes)


def _code_values(codes: tuple[int, int], qout: QParams) -> tuple[float, float]:
    """The float values of two output codes: each quantizes back to its code, so a clamp to them (the
    native kernel's quantized clamp, or the fused kernel's bounds, ``qops.clamp_bounds``) keeps exactly
    the codes between."""
    return tuple((code - qout.zero_point) * qout.scale for code in codes)  # type: ignore[return-value]


def _build(tensors: BnTensors, m: LowerMatch, backend: Backend, relu: bool, clamp: tuple[int, int] | None) -> nn.Module:
    """The int8 BN of one match: the backend's kernel (``clamp``, output codes, inside it, as for the
    backend's own BN+activation modules), wrapped when the graph holds the other kind of tensor."""
    qin, qout = m.input_qparams or m.output_qparams, m.output_qparams
    kernel, bounds = Kernel(relu=relu, clamp=clamp is not None), None if clamp is None else _code_values(clamp, qout)
    dims = (m.dim,) if m.dim is not None else (1, 2, 3)
    kernels = {d: backend.build(d, kernel, tensors, qin, qout, bounds, m.bn.owner or m.bn.node) for d in dims}
    module = kernels[m.dim] if m.dim is not None else ByRank(kernels)
    codes = m.route == "pt2e"
    if backend is FUSED and codes:
        return module  # PT2E codes in and out, dtypes checked when matching: no wrapper needed
    return LoweredBatchNorm(module, backend is FUSED, codes, m.input_qparams, qout)


def _op(m: LowerMatch, backend: Backend, relu: bool, clamp: tuple[int, int] | None) -> str:
    op = backend.op_for(rule_for(F.batch_norm, relu, m.dim or 2))
    op = op if m.dim is not None else op.replace("2d", "Nd")
    return op + ("" if clamp is None else f" + clamp[{clamp[0]}, {clamp[1]}]")


def _row(m: LowerMatch, op: str) -> ReportRow:
    qin, qout = m.input_qparams, m.output_qparams
    return ReportRow(
        node=m.bn.node, module=m.bn.owner, pattern=m.bn.spelling + (f"+{m.activation}" if m.activation else ""),
        op=op, status="rewritten", reason="", source=m.source, dtype=str(qout.dtype).removeprefix("torch."),
        input_scale=qin.scale if qin else None, input_zero_point=qin.zero_point if qin else None,
        output_scale=qout.scale, output_zero_point=qout.zero_point,
    )


def _report(rows: Sequence[tuple[int, ReportRow]], route: str, lowered: int, skipped: int, start: float) -> Report:
    summary = ReportSummary(
        rewritten=lowered, skipped=skipped, quantize_nodes=0, dequantize_nodes=0, convert_seconds=time.perf_counter() - start,
        lowered_into=ROUTES[route],
    )
    return Report(rows=tuple(row for _, row in sorted(rows, key=lambda item: item[0])), summary=summary)


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
    route, chosen = _check(gm, backend)
    with warnings.catch_warnings():  # torch's own deprecation, raised while copying an exported module's pytree specs
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
        out = copy.deepcopy(gm)
    matches, skips = find_lowerable(out)
    matches, refused = _plan(matches, chosen)
    kernels = [_kernel_clamp(m) for m in matches]
    index = ModuleIndex(out)
    modules = [_build(bn_tensors(out, m, index), m, chosen, *k) for m, k in zip(matches, kernels)]  # all built before any edit
    rows = [(m.position, _row(m, _op(m, chosen, relu, clamp))) for m, (relu, clamp) in zip(matches, kernels)]
    rows += [(s.position, skipped_row(s)) for s in skips + refused]
    for target, module in rewrite_lowerable(out.graph, out, matches, modules).items():
        out.add_submodule(target, module)
    out.graph.lint()
    out.delete_all_unused_submodules()
    out.recompile()
    attach(out, REPORT_KEY, _report(rows, route, len(matches), len(skips) + len(refused), start))
    attach(out, LOWERED_KEY, tuple(matches))
    return out
