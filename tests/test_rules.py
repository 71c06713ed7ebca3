"""Every rule on every backend (parametrised over RULES x BACKENDS, so a new rule is tested without a
new test), ReLU6 against torch.ao (a new activation as one table entry: tests/test_registry.py), and in-repo models that
mimic timm's BatchNormAct2d, MobileNetV2's inverted residual and a DDP-trained model."""

import math

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn
from torch.ao.quantization import MinMaxObserver

import fxqbn
from fxqbn.backends import BACKENDS
from fxqbn.float_io import FloatIO
from fxqbn.passes import RULES
from fxqbn.passes import registry as patterns
from fxqbn.state import PREPARED_KEY, attached

SHAPES = {1: (6, 4), 2: (2, 4, 5, 5), 3: (2, 4, 3, 4, 4)}
BN_TYPES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def apply_activation(activation, y):
    if activation.name == "":
        return y
    if activation.name == "ReLU":
        return torch.relu(y)
    if activation.name == "ReLU6":
        return F.relu6(y)
    return torch.clamp(y, activation.lo, None if math.isinf(activation.hi) else activation.hi)


class RuleModel(nn.Module):
    """One pattern of ``rule``: its BN spelling, then its activation."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule
        bn = BN_TYPES[rule.dim](4)
        self.bn = nni.BNReLU2d(bn, nn.ReLU()) if rule.kind == "BNReLU" and rule.dim == 2 else (
            nni.BNReLU3d(bn, nn.ReLU()) if rule.kind == "BNReLU" else bn
        )

    def forward(self, x):
        if self.rule.kind == "F.batch_norm":
            b = self.bn
            y = F.batch_norm(x, b.running_mean, b.running_var, b.weight, b.bias, False, 0.1, b.eps)
        else:
            y = self.bn(x)
        return (y if self.rule.prefused else apply_activation(self.rule.activation, y)) * 2


def float_bn(model, x):
    bn = model.bn[0] if model.rule.prefused else model.bn
    return bn(x)


def calibrate(model, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(*shape, generator=gen) * 3 for _ in range(3)]
    observed = fxqbn.prepare(model, (data[0],), MinMaxObserver, fold=False)  # every BN a pattern (conv -> BN included)
    with torch.no_grad():
        for x in data:
            observed(x)
    return observed, torch.randn(*shape, generator=gen) * 3


def reference(model, x, row, activation):
    """quantize -> dequantize -> float BN -> activation -> quantize -> dequantize, with the report's qparams."""
    dtype = getattr(torch, row.dtype)
    xq = torch.quantize_per_tensor(x, row.input_scale, row.input_zero_point, dtype).dequantize()
    y = apply_activation(activation, float_bn(model, xq))
    return torch.quantize_per_tensor(y, row.output_scale, row.output_zero_point, dtype).dequantize()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_every_rule_is_rewritten_on_every_backend_within_one_step(rule, backend):
    model = randomize_bn(RuleModel(rule)).eval()
    observed, x = calibrate(model, SHAPES[rule.dim])
    q = fxqbn.convert(observed, backend=backend)
    q.graph.lint()  # convert builds its graph in one pass and does not lint it: the tests do
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.op, row.status) == (rule.name, BACKENDS[backend].op_for(rule), "rewritten")
    activations = {"relu", "relu6", "clamp"}
    assert not any(getattr(n.target, "__name__", str(n.target)) in activations for n in q.graph.nodes)
    with torch.no_grad():
        expected = reference(model, x, row, rule.activation) * 2
        assert (q(x) - expected).abs().max() <= 2 * row.output_scale * 1.0001  # one output step, times 2
        assert torch.equal(q(x), fxqbn.convert(observed, backend="native")(x))  # backends agree bit for bit


@pytest.mark.parametrize("dtype", [torch.quint8, torch.qint8])
@pytest.mark.parametrize("dim", [2, 3])
def test_bn_relu6_equals_torch_ao_quantizing_bn_then_relu6(dim, dtype):
    """torch.ao quantizes BN with the output qparams, then runs quantized ReLU6 on the same qparams."""
    bn = randomize_bn(nn.Sequential(BN_TYPES[dim](4))).eval()[0]
    gen = torch.Generator().manual_seed(dim)
    for scale, zero_point in ((0.01, 0 if dtype == torch.quint8 else -128), (0.05, 10), (0.004, 3)):
        qout = fxqbn.QParams(scale, zero_point, dtype)
        x = torch.quantize_per_tensor(torch.randn(*SHAPES[dim], generator=gen) * 4, 0.03, 5, dtype)
        ao_bn = (nnq.BatchNorm2d if dim == 2 else nnq.BatchNorm3d).from_reference(bn, torch.tensor(scale), torch.tensor(zero_point))
        theirs = nnq.ReLU6()(ao_bn(x))
        ours = BACKENDS["native"].module_for(
            patterns.find_rule("BatchNorm", dim, patterns.RELU6), fxqbn.backends.BnTensors(
                bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, bn.momentum),
            fxqbn.QParams(0.03, 5, dtype), qout, "bn",
        )
        assert torch.equal(ours(x).int_repr(), theirs.int_repr())


# -- models that mimic the real ones ------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: F.batch_norm, then drop (nn.Identity, or drop_block), then the activation."""

    def __init__(self, c, act=nn.ReLU, drop=nn.Identity):
        super().__init__(c)
        self.drop, self.act = drop(), act()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(self.drop(x))


class TimmLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BatchNormAct2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = BatchNormAct2d(8, drop=lambda: nn.Dropout(0.2))  # eval Dropout between BN and act
        self.bn3 = BatchNormAct2d(8, act=nn.ReLU6)

    def forward(self, x):
        return self.bn3(self.bn2(self.conv(self.bn1(self.stem(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 conv -> BN -> ReLU6, depthwise conv -> BN -> ReLU6, 1x1 conv -> BN, + x."""

    def __init__(self, c=8, expand=3):
        super().__init__()
        h = c * expand
        self.conv = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return x + self.conv(x)


class DdpTrained(nn.Module):
    """What DDP training leaves: SyncBatchNorm (convert_sync_batchnorm) in 1-d, 2-d and 3-d positions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn2d, self.bn3d, self.bn1d = nn.BatchNorm2d(8), nn.BatchNorm3d(8), nn.BatchNorm1d(8)

    def forward(self, x):
        y = F.relu(self.bn2d(self.conv(x)))
        z = self.bn3d(y.unsqueeze(2)).squeeze(2)
        return self.bn1d(z.flatten(2)).relu()


MODELS = {  # name -> (model factory, expected patterns in graph order)
    "timm-BatchNormAct2d": (TimmLike, ["F.batch_norm2d+ReLU", "F.batch_norm2d+ReLU", "F.batch_norm2d+ReLU6"]),
    "mobilenetv2-block": (lambda: nn.Sequential(InvertedResidual(), InvertedResidual()),
                          ["BatchNorm2d+ReLU6", "BatchNorm2d+ReLU6", "BatchNorm2d"] * 2),
    "ddp-syncbn": (lambda: nn.SyncBatchNorm.convert_sync_batchnorm(DdpTrained()),
                   ["BatchNorm2d+ReLU", "BatchNorm3d", "BatchNorm1d+ReLU"]),
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", MODELS)
def test_every_bn_act_of_models_like_the_real_ones_is_fused_and_rewritten(name, backend):
    factory, expected = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(factory()).eval()
    observed, x = calibrate(model, (2, 3, 6, 6) if name != "mobilenetv2-block" else (2, 8, 6, 6))
    q = fxqbn.convert(observed, backend=backend)
    rows = fxqbn.get_report(q).rows
    assert [(r.pattern, r.status, r.reason) for r in rows] == [(p, "rewritten", "") for p in expected]
    left = {type(m) for m in q.modules()} & {nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.BatchNorm2d, nn.SyncBatchNorm}
    assert not left
    with torch.no_grad():
        assert (q(x) - model(x)).abs().max() < 0.25 * float(model(x).abs().max())


RELU6_SPELLINGS = {  # every way a model spells ReLU6 on the BN output
    "nn.ReLU6": lambda m, y: m.relu6(y),
    "nn.ReLU6(inplace)": lambda m, y: m.relu6_inplace(y),
    "F.relu6": lambda m, y: F.relu6(y),
    "nn.Hardtanh(0, 6)": lambda m, y: m.hardtanh(y),
    "F.hardtanh(0, 6)": lambda m, y: F.hardtanh(y, 0.0, 6.0),
    "F.hardtanh_(0, 6)": lambda m, y: F.hardtanh_(y, 0.0, 6.0),
    "torch.clamp(0, 6)": lambda m, y: torch.clamp(y, 0, 6),
    ".clamp(min=0, max=6)": lambda m, y: y.clamp(min=0.0, max=6.0),
    ".clamp_(0, 6)": lambda m, y: y.clamp_(0, 6),
}
PASSTHROUGHS = {  # what may sit between the BN and its activation
    "none": lambda m, y: y,
    "nn.Identity": lambda m, y: m.identity(y),
    "eval nn.Dropout": lambda m, y: m.dropout(y),
    "eval nn.Dropout2d then Identity": lambda m, y: m.identity(m.dropout2d(y)),
    "F.dropout(training=False)": lambda m, y: F.dropout(y, 0.5, training=False),
}


class Spelled(nn.Module):
    def __init__(self, activation, passthrough):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.relu6, self.relu6_inplace, self.hardtanh = nn.ReLU6(), nn.ReLU6(inplace=True), nn.Hardtanh(0.0, 6.0)
        self.identity, self.dropout, self.dropout2d = nn.Identity(), nn.Dropout(0.3), nn.Dropout2d(0.3)
        self.activation, self.passthrough = RELU6_SPELLINGS[activation], PASSTHROUGHS[passthrough]
        self.rule = patterns.find_rule("BatchNorm", 2, patterns.RELU6)

    def forward(self, x):
        return self.activation(self, self.passthrough(self, self.bn(x))) + 1


@pytest.mark.parametrize("passthrough", PASSTHROUGHS)
@pytest.mark.parametrize("activation", RELU6_SPELLINGS)
def test_relu6_is_fused_in_every_spelling_through_every_passthrough(activation, passthrough):
    model = randomize_bn(Spelled(activation, passthrough)).eval()
    observed, x = calibrate(model, SHAPES[2])
    q = fxqbn.convert(observed)
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.status, row.reason) == ("BatchNorm2d+ReLU6", "rewritten", "")
    assert [n.op for n in q.graph.nodes] == ["placeholder", "call_module", "call_function", "output"]  # FloatIO, + 1
    assert type(q.bn) is FloatIO and type(q.bn.bn) is fxqbn.nn.BNReLU2d  # the ReLU kernel, then the clamp to 6
    with torch.no_grad():
        expected = reference(model, x, row, patterns.RELU6) + 1
        assert (q(x) - expected).abs().max() <= row.output_scale * 1.0001


def test_an_activation_after_a_shared_passthrough_is_left_float_with_the_reason():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.identity = nn.BatchNorm2d(4), nn.Identity()

        def forward(self, x):
            y = self.identity(self.bn(x))
            return F.relu6(y) + y

    model = randomize_bn(Shared()).eval()
    observed, x = calibrate(model, SHAPES[2])
    q = fxqbn.convert(observed)
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.status, row.reason) == ("BatchNorm2d", "rewritten", "ReLU6 not fused: the BN output has 2 users")
    with torch.no_grad():
        assert (q(x) - model(x)).abs().max() < 4 * row.output_scale


def test_a_clamp_no_rule_names_is_left_float_with_the_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return F.hardtanh(self.bn(x), -1.0, 1.0)

    observed, x = calibrate(randomize_bn(Odd()).eval(), SHAPES[2])
    (row,) = fxqbn.get_report(fxqbn.convert(observed)).rows
    assert (row.pattern, row.status, row.reason) == ("BatchNorm2d", "rewritten", "clamp(-1, 1) not fused: no rule has that activation")


class ConvBnAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu6(self.bn(self.conv(x)))


@pytest.mark.parametrize("decomposed", [False, True], ids=["aten.batch_norm", "_native_batch_norm_legit_no_training"])
def test_the_aten_forms_of_torch_export_graphs_are_matched_like_f_batch_norm(decomposed):
    model = randomize_bn(ConvBnAct()).eval()
    model.bn.momentum = 0.3  # not the default, and not eps, which sits next to it in both aten forms
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    program = torch.export.export(model, (x,))
    exported = (program.run_decompositions() if decomposed else program).module()
    observed = fxqbn.prepare(exported, (x,), MinMaxObserver, fold=False)  # folded by default: test_fold.py
    (pattern,) = attached(observed, PREPARED_KEY).patterns
    assert pattern.momentum == pytest.approx(0.3)  # each spelling's momentum from its own position
    with torch.no_grad():
        observed(x)
    q = fxqbn.convert(observed)
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.status, row.module) == ("F.batch_norm2d+ReLU6", "rewritten", "bn")
    targets = {str(n.target) for n in q.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t or "relu6" in t for t in targets), targets
    with torch.no_grad():
        assert (q(x) - model(x)).abs().max() <= 2 * row.output_scale


def test_without_a_rule_for_the_activation_the_bn_is_quantized_alone_and_the_report_says_why(monkeypatch):
    relu6_2d = patterns.find_rule("BatchNorm", 2, patterns.RELU6)
    monkeypatch.setattr(patterns, "RULES", tuple(r for r in RULES if r is not relu6_2d))
    model = randomize_bn(Spelled("F.relu6", "nn.Identity")).eval()
    observed, x = calibrate(model, SHAPES[2])
    q = fxqbn.convert(observed)
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.status, row.reason) == ("BatchNorm2d", "rewritten", "ReLU6 not fused: no rule for BatchNorm 2d + ReLU6")
    assert any(n.target is F.relu6 for n in q.graph.nodes)
    with torch.no_grad():
        assert (q(x) - model(x)).abs().max() <= 2 * row.output_scale


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")  # as in test_torchscript.py
@pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level annotations:UserWarning")
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_relu6_model_scripts_and_the_script_equals_eager(backend):
    model = randomize_bn(Spelled("nn.ReLU6", "eval nn.Dropout")).eval()
    observed, x = calibrate(model, SHAPES[2])
    q = fxqbn.convert(observed, backend=backend)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(q)(x), q(x))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", MODELS)
def test_the_real_model_likes_save_and_load_to_the_same_numbers(name, backend, tmp_path):
    factory, _ = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(factory()).eval()
    observed, x = calibrate(model, (2, 3, 6, 6) if name != "mobilenetv2-block" else (2, 8, 6, 6))
    q = fxqbn.convert(observed, backend=backend)
    fxqbn.save(q, tmp_path / "q.pt")
    loaded = fxqbn.load(tmp_path / "q.pt", model, (x,))
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert fxqbn.get_report(loaded).rows == fxqbn.get_report(q).rows
