"""Planning: each match, with the qparams at its edges, becomes a ``Plan``: which kernel variant, which
clamp after it, and the op the report names. Pure: no graph edits, no modules built.

Where the qparams come from is the match's ``Boundary``'s business: observed graphs read them off the
observers (``readings``), int8 graphs show them. Observed graphs compute the rule's activation (its
ReLU variant, then a clamp to its float bounds); int8 graphs clamp to the output codes the graph's
quantize and activation allow, so that clamping codes equals what the float graph computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from fxqbn.qparams import DTYPE_RANGES, Observation, QParams

from .records import FLOAT, Match, Plan

__all__ = ["BackendOps", "plan_patterns", "finite_clamp"]


class BackendOps(Protocol):
    """What planning asks of a backend (``fxqbn.backends.Backend``)."""

    def op_name(self, dim: int | None, relu: bool, clamp: bool, activation: str) -> str: ...


def _code_values(codes: tuple[int, int], qparams: QParams) -> tuple[float, float]:
    """The float values of two codes: each quantizes back to its code, so a clamp to them (the native
    kernel's quantized clamp, or the fused kernel's bounds) keeps exactly the codes between."""
    return tuple((code - qparams.zero_point) * qparams.scale for code in codes)  # type: ignore[return-value]


def finite_clamp(lo: float, hi: float, qparams: QParams) -> tuple[float, float]:
    """(lo, hi) with an unbounded side replaced by the float value of the dtype's extreme code."""
    low, high = _code_values(DTYPE_RANGES[qparams.dtype], qparams)
    return min(max(lo, low), high), max(min(hi, high), low)


def _observed(match: Match, readings: Mapping[str, Observation], backend: BackendOps) -> Plan:
    """A pattern of an observed graph: its observers' qparams, its activation's kernel."""
    qin, qout = readings[match.boundary.input], readings[match.boundary.output]
    act = match.activation
    clamp = finite_clamp(act.lo, act.hi, qout.qparams) if act.clamp else None
    return Plan(match, qin, qout, act.relu, clamp, backend.op_name(match.dim, act.relu, act.clamp, act.name))


def _int8(match: Match, backend: BackendOps) -> Plan:
    """A pattern of an int8 graph: the graph's qparams; the kernel's ReLU variant where the output codes
    start at the zero point, and a clamp to the codes where they are narrower still."""
    b = match.boundary
    qout = b.output_qparams
    lo, hi = DTYPE_RANGES[qout.dtype]
    relu = b.codes[0] == qout.zero_point and qout.zero_point > lo
    codes = None if b.codes == (qout.zero_point if relu else lo, hi) else b.codes
    op = backend.op_name(match.dim, relu, False, "ReLU" if relu else "") + ("" if codes is None else f" + clamp[{codes[0]}, {codes[1]}]")
    qin = None if b.input_qparams is None else Observation(b.input_qparams, "", None, None)
    clamp = None if codes is None else _code_values(codes, qout)
    return Plan(match, qin, Observation(qout, "", None, None), relu, clamp, op)


def plan_patterns(matches: Sequence[Match], readings: Mapping[str, Observation], backend: BackendOps) -> list[Plan]:
    """The plan of each match (in order): observed graphs' qparams from ``readings`` (observer node ->
    Observation), int8 graphs' from their boundaries."""
    return [_observed(m, readings, backend) if m.boundary.holds == FLOAT else _int8(m, backend) for m in matches]
