"""fxqbn.lower: int8 BNs inside whole-model int8 graphs from torch.ao convert_fx and torchao convert_pt2e."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lower_models import ACTIVATIONS, PASSTHROUGHS, Sandwich, TimmStyleNet, models, trained
import torch.nn.functional as F
from torch import fx, nn

import fxqbn
from fxqbn import cli
from fxqbn.comparing import sqnr_db
from fxqbn.cost import COST_MODEL, Site, site_of
from fxqbn.fused import FusedBatchNorm
from fxqbn.lowered import ByRank
from fxqbn.passes import find_patterns, int8_kind, passthrough_input, read_activation, read_bn
from fxqbn.passes.boundaries import AO_OPS
from fxqbn.passes.rewrite import LOWERED_PREFIX
from fxqbn.tracing import propagate_shapes
from fxqbn.whole_model import import_pt2e, int8_model, quantize_whole_model

try:
    import_pt2e()
    PT2E_MISSING = ""
except fxqbn.FxqbnError as exc:
    PT2E_MISSING = str(exc)

ROUTES = ["ao", "pt2e"]  # hand-written graphs: PT2E's quantized_decomposed ops are torch's own
# whole models: PT2E needs torchao's prepare_pt2e / convert_pt2e
WHOLE_ROUTES = ["ao", pytest.param("pt2e", marks=pytest.mark.skipif(bool(PT2E_MISSING), reason=PT2E_MISSING or "-"))]
SHAPES = {1: (2, 5, 256), 2: (2, 5, 16, 16), 3: (2, 5, 4, 8, 8)}


def codes_of(value: torch.Tensor) -> torch.Tensor:
    return (value.int_repr() if value.is_quantized else value).to(torch.int32)


def find_lowerable(gm: fx.GraphModule):
    """The matches and skips of ``gm``'s BNs, as fxqbn.lower finds them."""
    return find_patterns(gm.graph, gm, int8_kind(gm.graph))


def graph_ops(gm: fx.GraphModule):
    """How ``gm`` spells its quantize and dequantize (torch.ao's when it has none left: nothing is sandwiched)."""
    try:
        return int8_kind(gm.graph).ops
    except fxqbn.FxqbnError:
        return AO_OPS


def sandwiched_float_bns(gm: fx.GraphModule) -> list[str]:
    """BN nodes still computing in float between a dequantize and a quantize (the structure lowering removes)."""
    ops, modules, found = graph_ops(gm), dict(gm.named_modules()), []
    for node in gm.graph.nodes:
        call = read_bn(node, modules)
        if call is None or isinstance(call, str) or not ops.is_dequantize(node.args[0]):
            continue
        value = next(n for n in gm.graph.nodes if n.name == call.output)
        while len(value.users) == 1:
            user = next(iter(value.users))
            if ops.is_quantize(user):
                found.append(node.name)
                break
            if passthrough_input(user, modules) is not value and read_activation(user, modules) is None:
                break
            value = user
    return found


def reference_codes(gm: fx.GraphModule, match, x: torch.Tensor) -> torch.Tensor:
    """What the float nodes of ``match`` in ``gm`` compute from ``x`` (the dequantize's input): the oracle."""
    interpreter = fx.Interpreter(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            interpreter.env[node] = interpreter.run_node(node)
    dequantize = nodes[match.boundary.input]
    interpreter.env[dequantize.args[0]] = x
    order = [dequantize.name, *match.nodes, *match.boundary.between]
    for name in order:
        interpreter.env[nodes[name]] = interpreter.run_node(nodes[name])
    return codes_of(interpreter.env[nodes[match.boundary.output]])


# -- one pattern, every spelling -------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("spelling", ["module", "functional", "aten", "aten_legit"])
def test_one_pattern_becomes_one_int8_bn_within_one_step(route, dim, activation, spelling):
    passthrough = list(PASSTHROUGHS)[(dim + len(activation)) % len(PASSTHROUGHS)]  # every pass-through somewhere
    model = Sandwich(route, dim, spelling, activation, passthrough, affine=dim != 3)
    gm = fx.symbolic_trace(model)
    before = gm.code
    lowered = fxqbn.lower(gm, bn="int8")  # every kernel (the cost model keeps the torch.ao one float: tests below)
    assert gm.code == before  # the input is not changed
    (match,), skips = find_lowerable(gm)
    assert not skips
    assert sandwiched_float_bns(gm) == [match.bn.node] and sandwiched_float_bns(lowered) == []
    lowered.graph.lint()
    ops = [n for n in lowered.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    assert [(n.op, n.target) for n in ops] == [("call_module", LOWERED_PREFIX + match.bn.node)]
    x = model.codes(SHAPES[dim])
    expected, actual = codes_of(gm(x)), codes_of(lowered(x))
    assert torch.equal(expected, reference_codes(gm, match, x))
    assert (actual - expected).abs().max() <= 1
    lo, hi = match.boundary.codes
    assert int(actual.min()) >= lo and int(actual.max()) <= hi  # the activation's clamp holds exactly
    (row,) = fxqbn.get_report(lowered).rows
    assert row.status == "rewritten" and row.node == match.bn.node and row.module == "bn"
    assert row.pattern.endswith(f"+{match.activation.name}") if match.activation.name else "+" not in row.pattern
    assert row.output_scale == model.qout[0] and row.output_zero_point == model.qout[1]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("backend", ["native", "fused"])
def test_both_backends_on_both_routes(route, backend):
    model = Sandwich(route, 2, "module", "ReLU6", "Identity", qout=(0.03, 40))
    gm = fx.symbolic_trace(model)
    lowered = fxqbn.lower(gm, backend=backend)
    (row,) = fxqbn.get_report(lowered).rows
    if route == "ao" and backend == "fused":  # a placeholder's qparams are only known at run time
        assert row.status == "skipped" and "backend='native'" in row.reason
        return
    assert row.status == "rewritten"
    kernel = "quantized::batch_norm2d_relu" if backend == "native" else "fxqbn.fused.batch_norm2d_relu"
    assert row.op == kernel + " + clamp[40, 240]"  # ReLU6 at scale 0.03: codes 40 .. 40 + 6 / 0.03
    x = model.codes(SHAPES[2])
    assert (codes_of(lowered(x)) - codes_of(gm(x))).abs().max() <= 1


@settings(max_examples=25, deadline=None)
@given(lo=st.floats(-4, 4), width=st.floats(0.01, 6), scale=st.floats(0.005, 0.2), zp=st.integers(0, 255),
       backend=st.sampled_from(["native", "fused"]))
def test_any_clamp_is_exact_in_code_space(lo, width, scale, zp, backend):
    hi = lo + width
    model = Sandwich("pt2e", 2, "module", "none", "none", qout=(scale, zp))
    model.act = lambda x: torch.clamp(x, lo, hi)
    gm = fx.symbolic_trace(model)
    lowered = fxqbn.lower(gm, backend=backend)
    x = model.codes(SHAPES[2])
    expected, actual = codes_of(gm(x)), codes_of(lowered(x))
    assert (actual - expected).abs().max() <= 1
    (match,), _ = find_lowerable(gm)
    assert int(actual.min()) >= match.boundary.codes[0] and int(actual.max()) <= match.boundary.codes[1]


@settings(max_examples=30, deadline=None)
@given(signed=st.booleans(), s_in=st.floats(0.002, 0.5), s_out=st.floats(0.002, 0.5), z_in=st.integers(0, 255),
       z_out=st.integers(0, 255), activation=st.sampled_from(["none", "ReLU", "ReLU6", "clamp(-1,2)"]),
       backend=st.sampled_from(["native", "fused"]), dim=st.sampled_from([1, 2, 3]))
def test_pt2e_uint8_and_int8_codes_with_any_qparams(signed, s_in, s_out, z_in, z_out, activation, backend, dim):
    shift = 128 if signed else 0  # int8 zero points lie in [-128, 127]
    model = Sandwich("pt2e", dim, "aten", activation, "none", qin=(s_in, z_in - shift), qout=(s_out, z_out - shift), signed=signed)
    gm = fx.symbolic_trace(model)
    lowered = fxqbn.lower(gm, backend=backend)
    (row,) = fxqbn.get_report(lowered).rows
    assert row.status == "rewritten" and row.dtype == ("qint8" if signed else "quint8")
    x = model.codes(SHAPES[dim])
    actual = lowered(x)
    assert actual.dtype == x.dtype
    assert (codes_of(actual) - codes_of(gm(x))).abs().max() <= 1


@settings(max_examples=40, deadline=None)
@given(route=st.sampled_from(ROUTES), backend=st.sampled_from(["native", "fused"]), dim=st.sampled_from([1, 2, 3]),
       activation=st.sampled_from(["ReLU6", "hardtanh(0,6)", "clamp(-1,2)", "clamp(0,6)"]), signed=st.booleans(),
       scale=st.floats(0.005, 0.1), zp=st.integers(0, 255), spelling=st.sampled_from(["module", "functional"]))
def test_the_clamp_inside_the_kernel_equals_the_kernel_then_the_clamp_bit_for_bit(
    route, backend, dim, activation, signed, scale, zp, spelling
):
    """The activation's code clamp runs inside the BN kernel; its codes are those of the same BN
    lowered without the activation, clamped to the match's code range afterwards."""
    signed = signed and route == "pt2e"  # torch.ao's graphs here hold quint8
    shift = 128 if signed else 0
    backend = "native" if route == "ao" else backend  # torch.ao input qparams are known at run time only
    qin, qout = (0.05, 120 - shift), (scale, zp - shift)
    model = Sandwich(route, dim, spelling, activation, "none", qin=qin, qout=qout, signed=signed)
    plain = Sandwich(route, dim, spelling, "none", "none", qin=qin, qout=qout, signed=signed)
    gm = fx.symbolic_trace(model)
    (match,), _ = find_lowerable(gm)
    lowered, unclamped = fxqbn.lower(gm, backend=backend), fxqbn.lower(fx.symbolic_trace(plain), backend=backend)
    x = model.codes(SHAPES[dim])
    assert torch.equal(codes_of(lowered(x)), codes_of(unclamped(x)).clamp(*match.boundary.codes))
    module = lowered.get_submodule(LOWERED_PREFIX + match.bn.node)
    if backend == "fused" and route == "pt2e":  # plain codes in and out: the kernel itself, its bounds the match's
        kernels = list(module.kernels.values()) if isinstance(module, ByRank) else [module]
        assert all(isinstance(k, FusedBatchNorm) and k.bounds == match.boundary.codes for k in kernels)


class SubclassedBatchNorm2d(nn.BatchNorm2d):
    """A BN subclass the graph keeps as one module call: it may compute something else than a BN."""


class KeepsSubclass(fx.Tracer):
    def is_leaf_module(self, m, name):
        return isinstance(m, SubclassedBatchNorm2d) or super().is_leaf_module(m, name)


@pytest.mark.parametrize("route", ROUTES)
def test_a_bn_subclass_module_stays_float_with_the_reason_as_in_convert(route):
    model = Sandwich(route, 2, "module", "ReLU", "none")
    subclassed = SubclassedBatchNorm2d(5).eval()
    subclassed.load_state_dict(model.bn.state_dict())
    model.bn = subclassed
    gm = fx.GraphModule(model, KeepsSubclass().trace(model))
    lowered = fxqbn.lower(gm)
    (row,) = fxqbn.get_report(lowered).rows
    assert (row.status, row.reason) == ("skipped", "no quantized rule for SubclassedBatchNorm2d")
    x = model.codes(SHAPES[2])
    assert torch.equal(codes_of(lowered(x)), codes_of(gm(x)))


@pytest.mark.parametrize("route", ROUTES)
def test_sync_batchnorm_in_eval_picks_its_kernel_by_rank(route):
    model = Sandwich(route, 2, "module", "ReLU", "none")
    sync = nn.SyncBatchNorm(5).eval()
    sync.load_state_dict(model.bn.state_dict())
    model.bn = sync
    gm = fx.symbolic_trace(model)
    lowered = fxqbn.lower(gm, bn="int8")
    (row,) = fxqbn.get_report(lowered).rows
    assert (row.pattern, row.status) == ("SyncBatchNorm+ReLU", "rewritten") and "batch_normNd" in row.op
    x = model.codes(SHAPES[2])
    assert (codes_of(lowered(x)) - codes_of(gm(x))).abs().max() <= 1


class QuantizedThrough(nn.Module):
    """torch.ao style: quantize, then an op on the quint8 tensor, then dequantize -> BN -> quantize."""

    def __init__(self, op):
        super().__init__()
        self.op, self.bn = op, Sandwich("ao", 2, "module", "none", "none").bn

    def forward(self, x):
        q = self.op(torch.quantize_per_tensor(x, 0.1, 10, torch.quint8))
        return torch.quantize_per_tensor(self.bn(q.dequantize()), 0.04, 90, torch.quint8)


ON_QUINT8 = {  # ops torch.ao graphs run on quantized tensors that keep the qparams
    "ReLU": nn.ReLU(), "ReLU6": nn.ReLU6(), "quantized ReLU6": torch.ao.nn.quantized.ReLU6(),
    "Hardtanh": nn.Hardtanh(0.0, 6.0), "Identity": nn.Identity(), "eval Dropout": nn.Dropout(0.5).eval(),
    "MaxPool2d": nn.MaxPool2d(1), "relu_": lambda q: q.relu_(), "torch.clamp": lambda q: torch.clamp(q, 0.0, 6.0),
    "F.hardtanh": lambda q: F.hardtanh(q, 0.0, 6.0), "reshape": lambda q: q.reshape(q.shape),
}


@pytest.mark.parametrize("op", list(ON_QUINT8))
def test_qparams_carry_through_every_activation_and_pass_through_spelling_to_the_fused_kernel(op):
    """The fused kernel needs its input qparams at build time: they are read off the quantize, through
    ops that keep them (every activation and pass-through spelling, max-pools, reshapes)."""
    gm = fx.symbolic_trace(QuantizedThrough(ON_QUINT8[op]))
    (row,) = fxqbn.get_report(fxqbn.lower(gm, backend="fused")).rows
    assert row.status == "rewritten" and (row.input_scale, row.input_zero_point) == (0.1, 10)
    lowered, x = fxqbn.lower(gm, backend="fused"), torch.randn(2, 5, 4, 4)
    assert (codes_of(lowered(x)) - codes_of(gm(x))).abs().max() <= 1


def test_native_relu6_equals_torch_ao_bn_then_relu6():
    """Native: the BN kernel then a quantized clamp equals torch.ao's quantized BN then its quantized ReLU6."""
    model = Sandwich("ao", 2, "module", "ReLU6", "none", qout=(0.02, 30))
    lowered = fxqbn.lower(fx.symbolic_trace(model), backend="native")
    x = model.codes(SHAPES[2])
    bn = model.bn
    theirs = torch.ops.quantized.batch_norm2d(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, 0.02, 30)
    theirs = torch.ao.nn.quantized.ReLU6()(theirs)
    assert torch.equal(codes_of(lowered(x)), codes_of(theirs))


# -- where a BN is not lowered -----------------------------------------------------------------------


class FloatReader(nn.Module):
    """dequantize -> BN -> quantize, where the dequantized value also feeds float code, and a BN
    whose output goes to float code."""

    def __init__(self):
        super().__init__()
        self.bn, self.bn2 = nn.BatchNorm2d(3).eval(), nn.BatchNorm2d(3).eval()

    def forward(self, x):
        y = x.dequantize()
        q = torch.quantize_per_tensor(self.bn(y), 0.05, 100, torch.quint8)
        return q.dequantize() + y.sum(), self.bn2(y) * 2


def test_a_dequantize_read_by_float_code_stays_and_unsandwiched_bns_are_reported():
    gm = fx.symbolic_trace(FloatReader())
    lowered = fxqbn.lower(gm, backend="native")
    targets = [n.target for n in lowered.graph.nodes if n.op == "call_method"]
    assert targets.count("dequantize") == 2  # the input's, kept for sum() and bn2; the output's
    report = fxqbn.get_report(lowered)
    assert [(r.node, r.status) for r in report.rows] == [("bn", "rewritten"), ("bn2", "skipped")]
    assert "in float, not a per-tensor quantize" in report.rows[1].reason
    x = torch.quantize_per_tensor(torch.randn(2, 3, 4, 4), 0.03, 128, torch.quint8)
    for a, b in zip(gm(x), lowered(x)):
        assert (a - b).abs().max() <= 0.05 + 1e-6  # one output step of bn; bn2 unchanged


def test_bad_input_is_refused():
    with pytest.raises(fxqbn.FxqbnError, match="expects the GraphModule returned by torch.ao convert_fx"):
        fxqbn.lower(nn.Linear(2, 2))
    with pytest.raises(fxqbn.FxqbnError, match="no quantize/dequantize nodes: quantize the whole model first"):
        fxqbn.lower(fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()))
    gm = fx.symbolic_trace(Sandwich("ao", 2, "module", "ReLU", "none"))
    with pytest.raises(fxqbn.FxqbnError, match="unknown backend 'int4'"):
        fxqbn.lower(gm, backend="int4")
    with pytest.raises(fxqbn.FxqbnError, match="already converted or lowered by fxqbn"):
        fxqbn.lower(fxqbn.lower(gm))
    with pytest.raises(fxqbn.FxqbnError, match="unknown bn='float'"):
        fxqbn.lower(gm, bn="float")
    lowered = fxqbn.lower(gm, backend="native")
    with pytest.raises(fxqbn.FxqbnError, match="fxqbn.save stores models converted by fxqbn.convert"):
        fxqbn.save(lowered, io.BytesIO())
    with pytest.raises(fxqbn.FxqbnError, match="fxqbn.compare takes models from fxqbn.convert"):
        fxqbn.compare(gm, lowered, torch.randn(1, 5, 4, 4))
    x = torch.randint(0, 255, (1, 5, 4, 4), dtype=torch.uint8)
    with pytest.raises(fxqbn.FxqbnError, match="expects a torch.quint8 quantized tensor"):
        lowered(x)


# -- whole models through both routes -----------------------------------------------------------------


@pytest.fixture(scope="module")
def nets():
    return models()


@pytest.fixture(scope="module")
def int8s(nets):
    """(name, route) -> the model quantized whole to int8, built once (convert_pt2e takes about a minute here)."""
    built = {}

    def get(name, route):
        if (name, route) not in built:
            model, example = nets[name]
            built[(name, route)] = int8_model(model, example, batches(model), route)
        return built[(name, route)]

    return get


def batches(model, n=4, batch=8):
    torch.manual_seed(3)
    return [model.example(batch) if hasattr(model, "example") else (torch.randn(batch, 3, 32, 32),) for _ in range(n)]


def tensors_of(gm):
    return {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_quantized}


def model_sqnr(reference, quantized, inputs) -> float:
    with torch.no_grad():
        ref = torch.cat([reference(*x).flatten() for x in inputs])
        out = torch.cat([quantized(*x).flatten() for x in inputs])
    return sqnr_db(float(ref.pow(2).sum()), float((ref - out).pow(2).sum()))


# (model, route) -> BNs the lowering must rewrite: torch.ao leaves float the F.batch_norm BNs and BN1d
# after ReLU; it quantizes DenseNet's BN+ReLU itself. PT2E folds conv -> BN and leaves the BN after the
# max-pool and DenseNet's BNs after cat/conv float; its MLP's BN reads a float ReLU (not int8).
EXPECTED_LOWERED = {
    ("timm_style", "ao"): 3, ("mlp", "ao"): 2, ("densenet_bc", "ao"): 0,
    ("timm_style", "pt2e"): 1, ("mlp", "pt2e"): 0, ("densenet_bc", "pt2e"): 11,
}


@pytest.mark.parametrize("route", WHOLE_ROUTES)
@pytest.mark.parametrize("name", ["timm_style", "mlp", "densenet_bc"])
def test_whole_model_end_to_end(nets, int8s, name, route):
    model, example = nets[name]
    int8 = int8s(name, route)
    snapshot = (int8.code, tensors_of(int8))
    lowered = fxqbn.lower(int8)
    assert int8.code == snapshot[0] and tensors_of(int8).keys() == snapshot[1].keys()
    assert all(torch.equal(v, snapshot[1][k]) for k, v in tensors_of(int8).items())
    report = fxqbn.get_report(lowered)
    assert report.summary.rewritten == len(report.rewritten) == EXPECTED_LOWERED[(name, route)]
    if route == "pt2e":  # export records every value's shape (not the dequantize's): each kernel's dim is fixed
        assert all("batch_normNd" not in row.op for row in report.rewritten)
    assert len(sandwiched_float_bns(int8)) == report.summary.rewritten and sandwiched_float_bns(lowered) == []
    assert all(row.reason for row in report.skipped)
    held_out = [model.example(4) if hasattr(model, "example") else (torch.randn(4, 3, 32, 32),) for _ in range(2)]
    assert model_sqnr(model, lowered, held_out) >= model_sqnr(model, int8, held_out) - 0.5
    matches, _ = find_lowerable(int8)
    check_each_bn_within_one_step(int8, lowered, matches, held_out[0])


def check_each_bn_within_one_step(int8, lowered, matches, inputs):
    """Every lowered BN, fed the int8 value it reads in the unlowered model, gives the codes
    dequantize -> float BN -> quantize gives, within one step."""
    recorded: dict[str, torch.Tensor] = {}
    class Record(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            recorded[node.name] = value
            return value

    Record(int8).run(*inputs)
    nodes = {n.name: n for n in int8.graph.nodes}
    for match in matches:
        x = recorded[nodes[match.boundary.input].args[0].name]
        module = lowered.get_submodule(LOWERED_PREFIX + match.bn.node)
        assert (codes_of(module(x)) - codes_of(recorded[match.boundary.output])).abs().max() <= 1, match.bn.node


@pytest.mark.skipif(bool(PT2E_MISSING), reason=PT2E_MISSING or "-")
def test_lowered_pt2e_model_exports_with_the_same_outputs(int8s):
    lowered = fxqbn.lower(int8s("densenet_bc", "pt2e"))
    exported = torch.export.export(lowered, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(exported.module()(x), lowered(x))
    kinds = {type(m).__name__ for m in lowered.modules()}
    assert "FusedBatchNorm" in kinds and "BatchNorm2d" not in kinds


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_timm_style_nets_of_every_dim_through_torch_ao(dim, act):
    model = trained(TimmStyleNet(dim, act))
    int8 = int8_model(model, model.example(), batches(model, n=2), "ao")
    lowered = fxqbn.lower(int8)
    assert sandwiched_float_bns(lowered) == [] and fxqbn.get_report(lowered).summary.rewritten == 3
    x = model.example(3)
    assert math.isfinite(model_sqnr(model, lowered, [x]))
    assert model_sqnr(model, lowered, [x]) >= model_sqnr(model, int8, [x]) - 0.5


def test_fused_backend_on_a_torch_ao_graph_reads_the_qparams_of_the_quantized_modules():
    model = trained(TimmStyleNet(2, nn.ReLU6))
    int8 = int8_model(model, model.example(), batches(model, n=2), "ao")
    lowered = fxqbn.lower(int8, backend="fused")
    report = fxqbn.get_report(lowered)
    assert [r.status for r in report.rows] == ["rewritten"] * 3 and all(r.op.startswith("fxqbn.fused.") for r in report.rows)
    assert all(r.input_scale is not None for r in report.rows)  # from the QuantizedConv2d / max-pool input
    matches, _ = find_lowerable(int8)
    check_each_bn_within_one_step(int8, lowered, matches, model.example(3))
    assert sandwiched_float_bns(lowered) == []


@pytest.mark.skipif(bool(PT2E_MISSING), reason=PT2E_MISSING or "-")
def test_mlp_skips_say_why_under_pt2e(int8s):
    report = fxqbn.get_report(fxqbn.lower(int8s("mlp", "pt2e")))
    assert [r.status for r in report.rows] == ["skipped", "skipped"]
    assert all("is float, not a dequantize" in r.reason for r in report.rows)


def test_densenet_under_torch_ao_lists_the_bns_torch_ao_quantized(int8s):
    report = fxqbn.get_report(fxqbn.lower(int8s("densenet_bc", "ao")))
    assert len(report.rows) == 12 and all("already int8 (torch.ao QuantizedBNReLU2d)" in r.reason for r in report.rows)


# -- the command ----------------------------------------------------------------------------------

MODELS_FILE = str(Path(__file__).resolve().parent / "lower_models.py")


def test_command_int8_ao_route_reports_and_verifies(capsys):
    assert cli.main(["convert", f"{MODELS_FILE}:timm_style_net", "--int8", "ao", "--calib-batches", "2",
                     "--verify", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    rows = document["report"]["rows"]
    # torch.ao ran Identity and ReLU on the quantized output: the int8 BN absorbs them (its ReLU variant);
    # the cost model picks the fused kernel (the graph shows every input's qparams)
    assert [(r["module"], r["pattern"], r["status"], r["op"]) for r in rows] == [
        (f"bn{k}", "F.batch_norm+ReLU", "rewritten", "fxqbn.fused.batch_normNd_relu") for k in (1, 2, 3)
    ]
    assert all(r["reason"].startswith("int8 fused kernel: cheaper than the float BN") for r in rows)
    assert document["verification"]["sqnr_db"] > 10


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_every_bn_has_a_row_when_torch_ao_folds_some_into_the_linear_before_them(capsys):
    """torch.ao's prepare_fx folds the MLP's Linear -> BatchNorm1d (its graph no longer holds those BNs)."""
    assert cli.main(["convert", f"{EXAMPLES / 'tabular_mlp.py'}:build", "--int8", "ao", "--calib-batches", "2", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert [(r["module"], r["status"], r["reason"]) for r in report["rows"][1:]] == [
        (f"body.{k + 1}", "folded", f"folded into body.{k} by torch.ao prepare_fx") for k in (0, 4, 8)
    ]
    assert report["rows"][0]["module"] == "input_norm" and report["rows"][0]["status"] == "skipped"  # reads the float input
    assert report["summary"]["folded"] == 3
    sys.path.insert(0, str(EXAMPLES))
    try:
        from tabular_mlp import build
    finally:
        sys.path.remove(str(EXAMPLES))
    model, example = build()
    api = fxqbn.get_report(quantize_whole_model(model, example, [example], "ao"))  # the Python route says the same
    assert [(r.module, r.status, r.reason) for r in api.rows] == [(r["module"], r["status"], r["reason"]) for r in report["rows"]]


def test_command_int8_refuses_what_it_cannot_do(capsys, tmp_path):
    assert cli.main(["convert", "--int8", "ao", "--out", str(tmp_path / "m.pt")]) == 2
    assert "--out is not supported with --int8" in capsys.readouterr().err
    assert cli.main(["convert", "--int8", "ao", "--skip", "features"]) == 2
    assert "--skip is not supported with --int8" in capsys.readouterr().err
    assert cli.main(["convert", "--int8", "int4"]) == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.skipif(bool(PT2E_MISSING), reason=PT2E_MISSING or "-")
def test_command_int8_pt2e_route_is_quiet_and_lowers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fxqbn", "convert", f"{MODELS_FILE}:timm_style_net", "--int8", "pt2e",
         "--calib-batches", "2", "--verify", "--columns", "bn,op,status"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no torchao log lines, no deprecation warnings
    lowered = [line for line in result.stdout.splitlines() if "rewritten" in line and "fxqbn.fused" in line]
    assert len(lowered) == 1 and "bn2" in lowered[0]  # the BN after the max-pool; PT2E folded the others
    folded = [line.split() for line in result.stdout.splitlines() if line.endswith(" folded")]
    assert [line[0] for line in folded] == ["bn1", "bn3"]  # every BN has a row
    assert "verification on a held-out batch" in result.stdout
    header = " ".join(result.stdout.split("calibration: ")[0].split())  # the header line, wrapped at 100 columns
    assert header.startswith("model: ") and header.endswith("whole-model int8 via pt2e, BNs lowered")


def test_the_command_factory_builds_the_same_model_every_call():
    from lower_models import timm_style_net

    (a, _), (b, _) = timm_style_net(), timm_style_net()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- the cost model (fxqbn.cost): which BNs the default lowers, on which kernel, and why -------------


def site(channels=16, qparams=True, c_kernels=True, shape=None, channels_last=None):
    return Site(channels, qparams, c_kernels, shape, channels_last)


@pytest.mark.parametrize("known, kernel, words", [
    (site(), "fused", ["int8 fused kernel", "cheaper than the float BN", "(cost model)"]),
    (site(3, shape=(1, 3, 8, 8), channels_last=True), "fused", ["int8 fused kernel"]),
    (site(16, qparams=False), "float", ["kept float", "16 channels", "input qparams the graph does not show", "backend= or bn='int8' forces int8"]),
    (site(16, c_kernels=False, shape=(16, 16, 24, 24), channels_last=True), "float", ["C kernels are not built"]),
    (site(128, qparams=False, shape=(16, 128, 28, 28), channels_last=True), "native", ["int8 native kernel", "channels-last"]),
    (site(128, qparams=False, shape=(16, 128, 28, 28), channels_last=False), "float", ["16x128x28x28 contiguous"]),
    (site(32, qparams=False, shape=(16, 32, 28, 28), channels_last=True), "float", ["32 channels"]),
    (site(512, qparams=False, shape=(1, 512, 7, 7), channels_last=True), "float", ["1x512x7x7"]),  # too few elements
    (site(256, qparams=False, shape=(64, 256)), "float", ["input 64x256"]),  # BatchNorm1d: no channels-last
])
def test_the_rule_on_constructed_sites(known, kernel, words):
    choice = COST_MODEL.choose(known)
    assert choice.kernel == kernel and all(w in choice.reason for w in words), choice.reason
    assert COST_MODEL.choose(known, int8=True).kernel == ("native" if kernel == "float" else kernel)


def rule_of(gm, example_inputs=None):
    """BN node -> what the cost model says of it, on the graph (and shapes) fxqbn.lower sees."""
    gm = copy.deepcopy(gm)
    if example_inputs is not None:
        propagate_shapes(gm, gm.graph, example_inputs)
    matches, _ = find_lowerable(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    return {m.bn.node: COST_MODEL.choose(site_of(nodes, gm, m)) for m in matches}


def check_default_follows_the_rule(gm, example_inputs=None):
    lowered = fxqbn.lower(gm, example_inputs=example_inputs)
    rows = {row.node: row for row in fxqbn.get_report(lowered).rows}
    for node, choice in rule_of(gm, example_inputs).items():
        row = rows[node]
        assert row.status == ("skipped" if choice.kernel == "float" else "rewritten") and row.reason.endswith(choice.reason)
        assert choice.kernel == "float" or (choice.kernel == "fused") == row.op.startswith("fxqbn.fused.")
    return lowered, rows


def test_the_default_keeps_float_a_bn_whose_int8_kernel_costs_more_and_says_why():
    """A torch.ao BN whose input qparams only the tensor carries, shape unknown: the native kernel at
    5 channels costs more than the float BN, the fused one cannot be built: kept float, codes unchanged."""
    model = Sandwich("ao", 2, "module", "ReLU", "none")
    gm = fx.symbolic_trace(model)
    lowered, rows = check_default_follows_the_rule(gm)
    assert rows["bn"].status == "skipped" and rows["bn"].reason.startswith("kept float: the int8 native kernel at 5 channels")
    assert sandwiched_float_bns(lowered) == ["bn"]
    x = model.codes(SHAPES[2])
    assert torch.equal(codes_of(lowered(x)), codes_of(gm(x)))
    for forced in ({"backend": "native"}, {"bn": "int8"}):
        (row,) = fxqbn.get_report(fxqbn.lower(gm, **forced)).rows
        assert row.status == "rewritten" and row.op.startswith("quantized::") and "forces int8" in row.reason


def test_example_inputs_give_the_rule_shape_and_layout():
    """The same BN at 64 channels: shape unknown, kept float; a channels-last 16x64x16x16 example: native."""
    model = Sandwich("ao", 2, "module", "ReLU", "none", channels=64)
    gm = fx.symbolic_trace(model)
    x = model.codes((16, 64, 16, 16)).contiguous(memory_format=torch.channels_last)
    _, rows = check_default_follows_the_rule(gm)
    assert rows["bn"].status == "skipped"
    lowered, rows = check_default_follows_the_rule(gm, (x,))
    assert rows["bn"].status == "rewritten" and rows["bn"].op == "quantized::batch_norm2d_relu"
    assert "16x64x16x16 channels-last" in rows["bn"].reason
    assert (codes_of(lowered(x)) - codes_of(gm(x))).abs().max() <= 1
    _, rows = check_default_follows_the_rule(gm, (x.contiguous(),))
    assert rows["bn"].status == "skipped" and "contiguous" in rows["bn"].reason


@pytest.mark.parametrize("width", [8, 128])
def test_forced_backends_and_bn_int8_lower_every_bn_and_the_default_follows_the_rule(width):
    model = trained(TimmStyleNet(2, nn.ReLU, width=width))
    int8 = int8_model(model, model.example(), batches(model, n=2), "ao")
    lowered, rows = check_default_follows_the_rule(int8)
    assert all(r.status == "rewritten" and r.reason.startswith("int8 fused kernel") for r in rows.values())
    check_default_follows_the_rule(int8, model.example(16))
    for forced, prefix in (({"backend": "native"}, "quantized::"), ({"backend": "fused"}, "fxqbn.fused."), ({"bn": "int8"}, "fxqbn.fused.")):
        report = fxqbn.get_report(fxqbn.lower(int8, **forced))
        assert [r.status for r in report.rows] == ["rewritten"] * 3 and all(r.op.startswith(prefix) for r in report.rows)
        assert all("forces int8" in r.reason or "(cost model)" in r.reason for r in report.rows)
    matches, _ = find_lowerable(int8)
    check_each_bn_within_one_step(int8, lowered, matches, model.example(3))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "rank3_channels_last"])
def test_the_fused_kernel_on_quantized_tensors_reads_and_writes_their_memory_as_on_codes(layout):
    """torch.ao graphs: the fused kernel runs on the quantized tensors' own memory (no int_repr copy);
    the codes equal those of the kernel on plain codes, and a dense input's layout is kept."""
    dim = 1 if layout.startswith("rank3") else 2
    gm = fx.symbolic_trace(QuantizedThrough(nn.Identity()) if dim == 2 else QuantizedThrough1d())
    module = fxqbn.lower(gm, backend="fused").get_submodule(LOWERED_PREFIX + "bn")
    kernel = module.kernel.kernels[str(dim)] if isinstance(module.kernel, ByRank) else module.kernel
    x = torch.quantize_per_tensor(torch.randn((3, 5, 6, 7) if dim == 2 else (3, 5, 9)) * 3, 0.1, 10, torch.quint8)
    x = {"contiguous": lambda: x, "channels_last": lambda: x.contiguous(memory_format=torch.channels_last),
         "strided": lambda: x[:, :, ::2], "rank3_channels_last": lambda: x.transpose(1, 2).contiguous().transpose(1, 2)}[layout]()
    y = module(x)
    assert y.is_quantized and (y.q_scale(), y.q_zero_point()) == (0.04, 90)
    assert torch.equal(y.int_repr(), kernel(x.int_repr()))
    if layout != "strided":
        assert y.stride() == x.stride()
    with pytest.raises(fxqbn.FxqbnError, match="expects a torch.quint8 quantized tensor"):
        kernel.forward_quantized(x.int_repr())


class QuantizedThrough1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(5).eval()

    def forward(self, x):
        q = torch.quantize_per_tensor(x, 0.1, 10, torch.quint8)
        return torch.quantize_per_tensor(self.bn(q.dequantize()), 0.04, 90, torch.quint8)
