"""The registry (``fxqbn.passes.registry`` and ``fxqbn.backends.BACKENDS``), entry by entry.

Every BN spelling, activation spelling and pass-through of the tables is exercised here by name: an
entry no case exercises fails the completeness tests, naming it. A new BN spelling, a new activation
and a new backend are each one entry (a backend, plus its kernels): shown below end to end.
"""

import math

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from conftest import randomize_bn
from torch import fx, nn
from torch.ao.quantization import MinMaxObserver

import fxqbn
from fxqbn import backends
from fxqbn.backends import BACKENDS, Backend
from fxqbn.passes import ACTIVATIONS, BN_SPELLINGS, CLAMP_SPELLINGS, PASSTHROUGH_SPELLINGS, QUANTIZED, RULES, Activation
from fxqbn.passes import registry
from fxqbn.passes.reading import module_bn

aten = torch.ops.aten
SHAPES = {1: (6, 4), 2: (2, 4, 5, 5), 3: (2, 4, 3, 4, 4)}


def calibrated(model, shape=SHAPES[2], n=2):
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(*shape, generator=gen) * 2 for _ in range(n)]
    observed = fxqbn.prepare(model, (data[0],), MinMaxObserver)
    with torch.no_grad():
        for x in data:
            observed(x)
    return observed, data[0]


def spellings_in(gm: fx.GraphModule) -> set[str]:
    modules = dict(gm.named_modules())
    return {s.name for s in (registry.bn_spelling(n, modules) for n in gm.graph.nodes) if s is not None}


# -- every rule ------------------------------------------------------------------------------------


def test_every_rule_is_consistent_and_reachable():
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names))
    for rule in RULES:
        assert registry.find_rule(rule.kind, rule.dim, rule.activation) is rule
        assert rule.name == f"{rule.kind}{rule.dim}d" + (f"+{rule.activation.name}" if rule.activation.name and not rule.prefused else "")
    kinds = {s.kind for s in BN_SPELLINGS if s.read is not registry.reading.already_int8}
    assert {(r.kind, r.dim) for r in RULES} == {(k, d) for k in kinds for d in (1, 2, 3) if k != "BNReLU" or d != 1}


def test_every_rule_has_a_module_and_an_op_on_every_backend():
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(4))).eval()[0]
    tensors = backends.BnTensors(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, bn.momentum)
    q = fxqbn.QParams(0.05, 3, torch.quint8)
    for rule in RULES:
        for backend in BACKENDS.values():
            assert backend.op_for(rule), (rule.name, backend.name)
            assert isinstance(backend.module_for(rule, tensors, q, q, "bn"), nn.Module)


@pytest.mark.parametrize("lo, hi, relu, clamp", [
    (-math.inf, math.inf, False, False), (0.0, math.inf, True, False), (0.0, 6.0, True, True), (-1.0, 2.0, False, True),
    (0.5, math.inf, False, True), (-math.inf, 3.0, False, True),
])
def test_an_activation_computes_in_code_space_what_its_clamp_says(lo, hi, relu, clamp):
    activation = Activation("" if (lo, hi) == (-math.inf, math.inf) else "act", lo, hi)
    assert (activation.relu, activation.clamp) == (relu, clamp)


# -- every BN spelling, by name ----------------------------------------------------------------------


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        b = self.bn
        return F.batch_norm(x, b.running_mean, b.running_var, b.weight, b.bias, False, 0.1, b.eps) * 2


def _module(bn, shape):
    return lambda: (randomize_bn(nn.Sequential(bn)).eval(), shape)


def _exported(decomposed):
    def build():
        x = torch.randn(*SHAPES[2])
        program = torch.export.export(randomize_bn(nn.Sequential(nn.BatchNorm2d(4))).eval(), (x,))
        return (program.run_decompositions() if decomposed else program).module(), SHAPES[2]
    return build


FLOAT_CASES = {  # spelling name -> (model in eval mode, input shape) holding it, and the pattern fxqbn.convert reports
    "BatchNorm1d": (_module(nn.BatchNorm1d(4), SHAPES[1]), "BatchNorm1d"),
    "BatchNorm2d": (_module(nn.BatchNorm2d(4), SHAPES[2]), "BatchNorm2d"),
    "BatchNorm3d": (_module(nn.BatchNorm3d(4), SHAPES[3]), "BatchNorm3d"),
    "SyncBatchNorm": (_module(nn.SyncBatchNorm(4), SHAPES[3]), "BatchNorm3d"),
    "BNReLU2d": (_module(nni.BNReLU2d(nn.BatchNorm2d(4), nn.ReLU()), SHAPES[2]), "BNReLU2d"),
    "BNReLU3d": (_module(nni.BNReLU3d(nn.BatchNorm3d(4), nn.ReLU()), SHAPES[3]), "BNReLU3d"),
    "F.batch_norm": (lambda: (randomize_bn(Functional()).eval(), SHAPES[2]), "F.batch_norm2d"),
    "aten.batch_norm": (_exported(False), "F.batch_norm2d"),
    "aten._native_batch_norm_legit_no_training": (_exported(True), "F.batch_norm2d"),
}


class Int8(nn.Module):
    """A hand-written torch.ao int8 graph around one of torch.ao's own int8 BNs."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return self.bn(torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)).dequantize()


INT8_CASES = {  # spelling name -> the torch.ao int8 BN module: reported as already int8 by fxqbn.lower
    "nnq.BatchNorm2d": (nnq.BatchNorm2d(4), SHAPES[2]),
    "nnq.BatchNorm3d": (nnq.BatchNorm3d(4), SHAPES[3]),
    "nniq.BNReLU2d": (nniq.BNReLU2d(4), SHAPES[2]),
    "nniq.BNReLU3d": (nniq.BNReLU3d(4), SHAPES[3]),
}


def test_every_bn_spelling_is_exercised_by_name():
    missing = [s.name for s in BN_SPELLINGS if s.name not in FLOAT_CASES and s.name not in INT8_CASES]
    assert not missing, f"no case in tests/test_registry.py exercises the BN spelling(s) {missing}"


@pytest.mark.parametrize("name", FLOAT_CASES)
def test_each_float_bn_spelling_is_found_and_rewritten(name):
    build, pattern = FLOAT_CASES[name]
    model, shape = build()
    observed, x = calibrated(model, shape)
    assert name in spellings_in(observed)
    q = fxqbn.convert(observed)
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.status) == (pattern, "rewritten")
    with torch.no_grad():
        assert (q(x) - model(x)).abs().max() <= 2 * row.output_scale * 2


@pytest.mark.parametrize("name", INT8_CASES)
def test_each_int8_bn_spelling_is_found_and_reported_already_int8(name):
    bn, shape = INT8_CASES[name]
    gm = fx.symbolic_trace(Int8(bn))
    assert name in spellings_in(gm)
    (row,) = fxqbn.get_report(fxqbn.lower(gm)).rows
    assert row.status == "skipped" and row.reason.startswith("already int8 (torch.ao Quantized")


# -- every activation, clamp and pass-through spelling, by name ------------------------------------

ACTIVATION_CASES = {  # (node.op, target) -> how a forward spells it on the BN output y, the clamp it means
    ("call_module", nn.ReLU): (lambda m, y: m.relu(y), (0.0, math.inf)),
    ("call_function", F.relu): (lambda m, y: F.relu(y), (0.0, math.inf)),
    ("call_function", torch.relu): (lambda m, y: torch.relu(y), (0.0, math.inf)),
    ("call_function", torch.relu_): (lambda m, y: torch.relu_(y), (0.0, math.inf)),
    ("call_method", "relu"): (lambda m, y: y.relu(), (0.0, math.inf)),
    ("call_method", "relu_"): (lambda m, y: y.relu_(), (0.0, math.inf)),
    ("call_function", aten.relu.default): (lambda m, y: aten.relu.default(y), (0.0, math.inf)),
    ("call_function", aten.relu_.default): (lambda m, y: aten.relu_.default(y), (0.0, math.inf)),
    ("call_module", nn.ReLU6): (lambda m, y: m.relu6(y), (0.0, 6.0)),
    ("call_module", nnq.ReLU6): (None, (0.0, 6.0)),  # only in torch.ao int8 graphs: tests/test_lower.py (ao, ReLU6)
    ("call_function", F.relu6): (lambda m, y: F.relu6(y), (0.0, 6.0)),
    ("call_function", aten.relu6.default): (lambda m, y: aten.relu6.default(y), (0.0, 6.0)),
    ("call_module", nn.Hardtanh): (lambda m, y: m.hardtanh(y), (0.0, 6.0)),
    ("call_function", F.hardtanh): (lambda m, y: F.hardtanh(y, 0.0, 6.0), (0.0, 6.0)),
    ("call_function", F.hardtanh_): (lambda m, y: F.hardtanh_(y, 0.0, 6.0), (0.0, 6.0)),
    ("call_function", aten.hardtanh.default): (lambda m, y: aten.hardtanh.default(y, 0.0, 6.0), (0.0, 6.0)),
    ("call_function", aten.hardtanh_.default): (lambda m, y: aten.hardtanh_.default(y, 0.0, 6.0), (0.0, 6.0)),
    ("call_function", torch.clamp): (lambda m, y: torch.clamp(y, 0.0, 6.0), (0.0, 6.0)),
    ("call_method", "clamp"): (lambda m, y: y.clamp(0.0, 6.0), (0.0, 6.0)),
    ("call_method", "clamp_"): (lambda m, y: y.clamp_(min=0.0), (0.0, math.inf)),
    ("call_function", aten.clamp.default): (lambda m, y: aten.clamp.default(y, 0.0, 6.0), (0.0, 6.0)),
    ("call_function", aten.clamp_.default): (lambda m, y: aten.clamp_.default(y, 0.0), (0.0, math.inf)),
}
PASSTHROUGH_CASES = {  # (node.op, target) -> how a forward spells it between the BN and a ReLU
    ("call_module", nn.Identity): lambda m, y: m.identity(y),
    **{("call_module", kind): (lambda kind: lambda m, y: getattr(m, kind.__name__.lower())(y))(kind) for kind in registry._DROPOUTS},
    ("call_function", F.dropout): lambda m, y: F.dropout(y, 0.5, training=False),
    ("call_function", aten.dropout.default): lambda m, y: aten.dropout.default(y, 0.5, False),
}


class Spelled(nn.Module):
    def __init__(self, activation, passthrough=lambda m, y: y, bn=nn.BatchNorm2d):
        super().__init__()
        self.bn = bn(4)
        self.relu, self.relu6, self.hardtanh, self.identity = nn.ReLU(), nn.ReLU6(), nn.Hardtanh(0.0, 6.0), nn.Identity()
        for kind in registry._DROPOUTS:
            setattr(self, kind.__name__.lower(), kind(0.3))
        self.activation, self.passthrough = activation, passthrough

    def forward(self, x):
        return self.activation(self, self.passthrough(self, self.bn(x))) + 1


def test_every_activation_clamp_and_passthrough_spelling_is_exercised_by_name():
    spelled = [s for a in ACTIVATIONS for s in a.spellings] + [(op, target) for op, target, _ in CLAMP_SPELLINGS]
    missing = [s for s in spelled if s not in ACTIVATION_CASES]
    missing += [(op, target) for op, target, _ in PASSTHROUGH_SPELLINGS if (op, target) not in PASSTHROUGH_CASES]
    assert not missing, f"no case in tests/test_registry.py exercises the spelling(s) {missing}"


@pytest.mark.parametrize("spelling", [s for s, (act, _) in ACTIVATION_CASES.items() if act is not None], ids=str)
def test_each_activation_spelling_is_fused_as_its_clamp(spelling):
    act, clamp = ACTIVATION_CASES[spelling]
    model = randomize_bn(Spelled(act)).eval()
    observed, x = calibrated(model)
    q = fxqbn.convert(observed)
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.status, row.reason) == (f"BatchNorm2d+{registry.activation_name(*clamp)}", "rewritten", "")
    assert [n.op for n in q.graph.nodes] == ["placeholder", "call_module", "call_function", "output"]
    with torch.no_grad():
        assert (q(x) - model(x)).abs().max() <= 2 * row.output_scale


@pytest.mark.parametrize("spelling", PASSTHROUGH_CASES, ids=str)
def test_each_passthrough_spelling_is_fused_before_the_activation(spelling):
    one_d = spelling[1] is nn.Dropout1d  # which takes (N, C, L) inputs only
    model = randomize_bn(Spelled(lambda m, y: F.relu(y), PASSTHROUGH_CASES[spelling], nn.BatchNorm1d if one_d else nn.BatchNorm2d)).eval()
    observed, x = calibrated(model, (2, 4, 7) if one_d else SHAPES[2])
    q = fxqbn.convert(observed)
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.status, row.reason) == (f"BatchNorm{1 if one_d else 2}d+ReLU", "rewritten", "")
    assert [n.op for n in q.graph.nodes] == ["placeholder", "call_module", "call_function", "output"]


# -- one entry each --------------------------------------------------------------------------------


class MyBatchNorm(nn.BatchNorm2d):
    """A user's BN subclass: traced through (its F.batch_norm is matched) until the registry names it."""


def test_a_new_bn_spelling_is_one_registry_entry(monkeypatch):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), MyBatchNorm(4), nn.ReLU())).eval()
    observed, x = calibrated(model, (2, 3, 5, 5))
    (before,) = fxqbn.get_report(fxqbn.convert(observed)).rows
    assert before.pattern == "F.batch_norm2d+ReLU"  # traced through to torch's F.batch_norm
    entry = registry.BnSpelling("MyBatchNorm", "call_module", MyBatchNorm, module_bn, kind="MyBatchNorm", dim=2)
    monkeypatch.setattr(registry, "BN_SPELLINGS", registry.BN_SPELLINGS + (entry,))
    monkeypatch.setattr(registry, "RULES", registry.derive_rules())
    observed, x = calibrated(model, (2, 3, 5, 5))
    assert "MyBatchNorm" in spellings_in(observed)
    for backend in BACKENDS:
        q = fxqbn.convert(observed, backend=backend)
        (row,) = fxqbn.get_report(q).rows
        assert (row.node, row.module, row.pattern, row.status) == ("_1", "1", "MyBatchNorm2d+ReLU", "rewritten")
        with torch.no_grad():
            assert (q(x) - model(x)).abs().max() <= 2 * row.output_scale


def test_a_new_activation_is_one_registry_entry(monkeypatch):
    relu1 = Activation("ReLU1", 0.0, 1.0)  # hardtanh(0, 1) / clamp(0, 1), in any spelling
    monkeypatch.setattr(registry, "ACTIVATIONS", ACTIVATIONS + (relu1,))
    monkeypatch.setattr(registry, "RULES", registry.derive_rules())
    assert (relu1.relu, relu1.clamp) == (True, True)  # the ReLU kernel, then a clamp of the codes to 1
    model = randomize_bn(Spelled(lambda m, y: F.hardtanh(y, 0.0, 1.0))).eval()
    observed, x = calibrated(model)
    outs = []
    for backend in BACKENDS:
        q = fxqbn.convert(observed, backend=backend)
        (row,) = fxqbn.get_report(q).rows
        assert (row.pattern, row.status) == ("BatchNorm2d+ReLU1", "rewritten")
        xq = torch.quantize_per_tensor(x, row.input_scale, row.input_zero_point, torch.quint8).dequantize()
        y = torch.quantize_per_tensor(model.bn(xq).clamp(0, 1), row.output_scale, row.output_zero_point, torch.quint8)
        outs.append(q(x))
        assert (outs[-1] - (y.dequantize() + 1)).abs().max() <= row.output_scale * 1.0001
    assert torch.equal(*outs)


class ReferenceBatchNorm(nn.Module):
    """The kernel of a test backend: dequantize, float BN, the activation's clamp, quantize."""

    def __init__(self, tensors, relu, qout, clamp):
        super().__init__()
        self.tensors, self.relu, self.qout, self.clamp = tensors, relu, qout, clamp

    def forward(self, x):
        t = self.tensors
        y = F.batch_norm(x.dequantize(), t.running_mean, t.running_var, t.weight, t.bias, False, 0.0, t.eps)
        y = y.clamp(min=0.0) if self.relu else y
        y = y.clamp(*self.clamp) if self.clamp else y
        return torch.quantize_per_tensor(y, self.qout.scale, self.qout.zero_point, self.qout.dtype)


def test_a_new_backend_is_one_registry_entry_plus_its_kernels(monkeypatch):
    def build(dim, relu, tensors, qin, qout, clamp, name):
        return ReferenceBatchNorm(tensors, relu, qout, clamp)

    reference = Backend(
        name="reference", consumes=QUANTIZED, build=build, rebuild=build, quantize=BACKENDS["native"].quantize,
        dequantize=BACKENDS["native"].dequantize, op_names=lambda dim, relu, clamp, act: f"reference{dim}d" + ("_relu" if relu else ""),
    )
    monkeypatch.setitem(BACKENDS, "reference", reference)
    model = randomize_bn(Spelled(lambda m, y: F.relu6(y))).eval()
    observed, x = calibrated(model)
    q, native = fxqbn.convert(observed, backend="reference"), fxqbn.convert(observed)
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.op, row.status) == ("BatchNorm2d+ReLU6", "reference2d_relu", "rewritten")
    assert (q(x) - native(x)).abs().max() <= row.output_scale * 1.0001  # float BN vs the integer kernel: one step
    with pytest.raises(ValueError, match="consumes"):
        Backend("bad", "floats", build, build, reference.quantize, reference.dequantize, reference.op_names)


@pytest.mark.parametrize("name", ["aten.batch_norm", "aten._native_batch_norm_legit_no_training"])
def test_skip_and_qconfig_name_the_aten_spellings_as_f_batch_norm(name):
    """A user names every functional BN F.batch_norm, also where torch.export spelled it in ATen."""
    build, _ = FLOAT_CASES[name]
    model, shape = build()
    observed = fxqbn.prepare(model, (torch.randn(*shape),), skip=[F.batch_norm])
    (skip,) = fxqbn.get_report(fxqbn.convert(observed)).rows
    assert (skip.status, skip.reason) == ("skipped", "skipped on request (prepare's skip argument)")
    mapping = torch.ao.quantization.QConfigMapping().set_global(MinMaxObserver).set_object_type(F.batch_norm, None)
    (row,) = fxqbn.get_report(fxqbn.convert(fxqbn.prepare(model, (torch.randn(*shape),), mapping))).rows
    assert (row.status, row.reason) == ("skipped", "excluded by qconfig (None for this module)")
