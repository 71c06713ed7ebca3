"""passes.fold: which BNs fold into the conv / linear before them (with the reason when not), and
the rewrite: module graphs (fxqbn.prepare's traces) and ATen graphs (torch.export) alike."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxqbn.passes.fold import FOLDS, Fold, decide, fold_attributes, fold_modules, needs_ranks
from fxqbn.tracing import propagate_shapes

from conftest import randomize_bn

aten = torch.ops.aten


def traced(model: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(randomize_bn(model).eval())


def bn_node(gm: fx.GraphModule, target: str = "bn") -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target == target)


class Seq(nn.Module):
    def __init__(self, producer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = copy.deepcopy(producer), copy.deepcopy(bn)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


FOLDABLE = [
    (nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), (2, 3, 9)),
    (nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), (2, 3, 7, 7)),
    (nn.Conv3d(3, 4, 3, groups=1), nn.BatchNorm3d(4), (2, 3, 5, 5, 5)),
    (nn.Conv2d(4, 4, 3, groups=2, padding=1), nn.BatchNorm2d(4, affine=False), (2, 4, 7, 7)),
    (nn.ConvTranspose1d(3, 4, 3), nn.BatchNorm1d(4), (2, 3, 9)),
    (nn.ConvTranspose2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), (2, 3, 5, 5)),
    (nn.ConvTranspose3d(3, 4, 2), nn.BatchNorm3d(4), (2, 3, 3, 3, 3)),
    (nn.Linear(5, 4), nn.BatchNorm1d(4), (3, 5)),
]


@pytest.mark.parametrize("producer,bn,shape", FOLDABLE, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_module_fold_matches_conv_then_bn(producer, bn, shape):
    gm = traced(Seq(producer, bn))
    x = torch.randn(shape)
    expected = gm(x)
    propagate_shapes(gm, gm.graph, (x,))
    fold = decide(gm.graph, gm, bn_node(gm))
    assert isinstance(fold, Fold), fold
    assert (fold.into, fold.rule.name, fold.bn.node) == ("conv", type(producer).__name__, "bn")
    original = gm.conv
    fold_modules(gm.graph, gm, [fold])
    gm.recompile()
    assert gm.conv is not original and type(gm.conv) is type(original)
    assert not any(n.target == "bn" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


def test_every_aten_producer_and_module_is_in_the_table():
    names = {rule.name for rule in FOLDS}
    assert {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear"} <= names
    targets = {rule.target for rule in FOLDS if rule.op == "call_function"}
    assert {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv_transpose1d.default,
            aten.conv_transpose2d.input, aten.conv_transpose3d.input, aten.linear.default} <= targets


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn2(self.conv(x * 2))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.other = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 3)
        self.other.weight = self.conv.weight

    def forward(self, x):
        return self.bn(self.conv(x)) + self.other(x)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        b = self.bn
        return F.batch_norm(self.conv(x), b.running_mean, b.running_var, b.weight, b.bias, False, 0.1, b.eps)


class MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x - x.mean())


REFUSED = [
    (TwoUsers(), "bn", r"Conv2d 'conv''s output has 2 users"),
    (CalledTwice(), "bn", r"Conv2d 'conv' is called 2 times"),
    (Tied(), "bn", r"Conv2d 'conv''s weight is shared"),
    (Seq(nn.Linear(5, 4), nn.BatchNorm2d(4)), "bn", r"Linear 'conv' feeds BatchNorm2d: only BatchNorm1d folds into a Linear"),
    (Seq(nn.Conv1d(3, 4, 3), nn.BatchNorm2d(4)), "bn", r"Conv1d 'conv' feeds BatchNorm2d"),
    (Seq(nn.ReLU(), nn.BatchNorm2d(4)), "bn", r"its input conv \(call_module conv\) is not a conv / linear"),
    (Seq(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)), "bn", r"feeds SyncBatchNorm"),
    (Seq(nn.ConvTranspose2d(4, 4, 3, groups=2), nn.BatchNorm2d(4)), "bn", r"groups=2"),
    (Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), "bn", r"track_running_stats=False"),
]


@pytest.mark.parametrize("model,target,reason", REFUSED, ids=[r[2][:30] for r in REFUSED])
def test_refusals_say_why(model, target, reason):
    gm = traced(model)
    found = decide(gm.graph, gm, bn_node(gm, target))
    assert isinstance(found, str), found
    assert re.search(reason, found), found


def test_a_conv_subclass_kept_as_one_call_stays():
    class Leaves(fx.Tracer):  # as a tracer that keeps it one call_module node
        def is_leaf_module(self, m, name):
            return isinstance(m, MyConv) or super().is_leaf_module(m, name)

    model = randomize_bn(Seq(MyConv(3, 4, 3), nn.BatchNorm2d(4))).eval()
    gm = fx.GraphModule(model, Leaves().trace(model))
    assert "its input conv (call_module conv) is not a conv / linear" in decide(gm.graph, gm, "bn")  # its forward may compute more


def test_functional_bn_after_a_module_conv_stays():
    gm = traced(Functional())
    node = next(n for n in gm.graph.nodes if n.target is F.batch_norm)
    assert "feeds F.batch_norm: only BatchNorm2d folds" in decide(gm.graph, gm, node)


def test_training_bn_is_refused():
    gm = traced(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    gm.bn.train()
    assert "training" in decide(gm.graph, gm, "bn")


def test_hooked_conv_stays():
    gm = traced(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    gm.conv.register_forward_hook(lambda m, i, o: None)
    assert "forward hooks" in decide(gm.graph, gm, "bn")


def test_linear_on_3d_values_does_not_fold_into_bn1d():
    class Seq3d(nn.Module):  # (N, C=4, L=4): BN1d's channels are dim 1, the linear's features the last
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x))

    gm = traced(Seq3d())
    assert needs_ranks(gm.graph, gm)
    assert "rank of Linear 'fc''s output is not recorded" in decide(gm.graph, gm, "bn")
    propagate_shapes(gm, gm.graph, (torch.randn(2, 4, 4),))
    assert not needs_ranks(gm.graph, gm)
    assert "output has rank 3: a Linear folds into BatchNorm1d on 2-d values only" in decide(gm.graph, gm, "bn")


def test_conv2d_into_bn2d_needs_no_ranks():
    gm = traced(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert not needs_ranks(gm.graph, gm)


# -- ATen graphs (torch.export) ---------------------------------------------------------------------


def exported(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    return torch.export.export(randomize_bn(model).eval(), (x,)).module()


def aten_bn(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))


@pytest.mark.parametrize("producer,bn,shape", FOLDABLE, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_aten_fold_matches_conv_then_bn(producer, bn, shape):
    x = torch.randn(shape)
    gm = exported(Seq(producer, bn), x)
    expected = gm(x)
    fold = decide(gm.graph, gm, aten_bn(gm))
    assert isinstance(fold, Fold), fold
    assert fold.rule.name.startswith("aten.") and fold.module is None
    fold_attributes(gm.graph, gm, [fold])
    gm.graph.lint()
    gm.recompile()
    assert not any("batch_norm" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


def test_aten_conv_called_twice_is_refused():
    x = torch.randn(2, 3, 6, 6)
    gm = exported(CalledTwice(), x)
    bns = [n for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    for node in bns:
        assert "is used by other calls too" in decide(gm.graph, gm, node)


def test_the_user_model_is_not_changed_by_a_module_fold():
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    before = copy.deepcopy(model.state_dict())
    gm = fx.symbolic_trace(copy.deepcopy(model))
    fold_modules(gm.graph, gm, [decide(gm.graph, gm, "bn")])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- fxqbn.prepare folds what torch.ao's prepare_fx folds ---------------------------------------------

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import fxqbn  # noqa: E402
from fxqbn.models import densenet_bc  # noqa: E402
from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping, default_weight_observer  # noqa: E402
from torch.ao.quantization.quantize_fx import prepare_fx  # noqa: E402

from models import CASES  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import cnn3d  # noqa: E402
import densenet_bc as densenet_example  # noqa: E402
import preact_resnet  # noqa: E402
import tabular_mlp  # noqa: E402


class Mixed(nn.Module):
    """Foldable and not: ConvTranspose2d -> BN, a conv read twice, a conv called twice, Linear -> BN1d."""

    def __init__(self):
        super().__init__()
        self.up, self.bn_up = nn.ConvTranspose2d(3, 4, 2, stride=2), nn.BatchNorm2d(4)
        self.conv, self.bn_a, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.fc, self.bn_fc = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.bn_up(self.up(x))  # no ReLU: torch.ao would fuse BN+ReLU first (it has no ConvTranspose+BN+ReLU)
        z = self.conv(y)
        y = self.bn_a(z) + z
        return self.bn_fc(self.fc(y.mean((2, 3))))


PARITY = {
    "preact_resnet": preact_resnet.build,
    "densenet_bc (examples)": densenet_example.build,
    "densenet_bc (fxqbn.models)": densenet_bc,
    "cnn3d": cnn3d.build,
    "tabular_mlp": tabular_mlp.build,
    "mixed": lambda: (randomize_bn(Mixed()).eval(), (torch.randn(2, 3, 4, 4),)),
    **{f"models.{c.name}": (lambda c=c: (randomize_bn(c.build()).eval(), c.inputs())) for c in CASES},
}


def torch_ao_folded(model: nn.Module, inputs: tuple) -> set[str]:
    """The BN modules torch.ao's prepare_fx folds away, given a mapping that quantizes only the BNs."""
    qconfig = QConfig(activation=MinMaxObserver, weight=default_weight_observer)
    mapping = QConfigMapping()
    bns = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in bns:
        mapping.set_module_name(name, qconfig)
    prepared = prepare_fx(copy.deepcopy(model), mapping, inputs)
    called = {str(n.target) for n in prepared.graph.nodes if n.op == "call_module"}
    traced_bns = {str(n.target) for n in fx.symbolic_trace(model).graph.nodes if n.op == "call_module" and n.target in bns}
    return {name for name in traced_bns if name not in called}


@pytest.mark.parametrize("name", PARITY)
def test_prepare_folds_the_bns_torch_ao_prepare_fx_folds(name):
    torch.manual_seed(0)
    model, inputs = PARITY[name]()
    report_rows = fxqbn.get_report(fxqbn.convert(_calibrated(model, inputs))).rows
    ours = {row.module for row in report_rows if row.status == "folded"}
    assert ours == torch_ao_folded(model, inputs)
    if name == "preact_resnet":
        assert len(ours) == 8 and len(report_rows) == 17
    assert all(row.reason.startswith("folded into ") for row in report_rows if row.status == "folded")


def _calibrated(model, inputs, **kwargs):
    observed = fxqbn.prepare(model, inputs, MinMaxObserver, **kwargs)
    with torch.no_grad():
        observed(*inputs)
    return observed


def test_torch_ao_folds_a_conv_called_twice_and_fxqbn_does_not():
    model, x = randomize_bn(CalledTwice()).eval(), (torch.randn(2, 3, 6, 6),)
    assert torch_ao_folded(model, x) == {"bn", "bn2"}  # one conv, folded with bn for both calls: wrong for at least one
    rows = {r.module: r for r in fxqbn.get_report(fxqbn.convert(_calibrated(model, x))).rows}
    assert (rows["bn"].status, rows["bn2"].status) == ("rewritten", "rewritten")
    assert rows["bn"].reason == "not folded: Conv2d 'conv' is called 2 times (folding would change every call)"


def test_prepare_folds_into_a_copy_and_the_quantized_model_is_not_worse():
    torch.manual_seed(0)
    model, inputs = preact_resnet.build()
    before = copy.deepcopy(model.state_dict())
    observed = _calibrated(model, inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is unchanged
    modules = dict(observed.named_modules())
    assert modules["blocks.0.conv1"] is not model.blocks[0].conv1 and type(modules["blocks.0.conv1"]) is nn.Conv2d
    assert "blocks.0.bn2" not in modules
    assert not any(n.op == "call_module" and n.target == "blocks.0.bn2" for n in observed.graph.nodes)
    with torch.no_grad():  # the folded conv computes conv -> bn
        y = torch.randn(2, 16, 32, 32)
        expected = model.blocks[0].bn2(model.blocks[0].conv1(y))
        torch.testing.assert_close(modules["blocks.0.conv1"](y), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sqnr = {}
    for fold in (True, False):
        observed = fxqbn.prepare(model, inputs, MinMaxObserver, fold=fold)
        with torch.no_grad():
            for b in batches[:2]:
                observed(b)
        sqnr[fold] = fxqbn.compare(model, fxqbn.convert(observed), batches[2:]).summary.model_sqnr_db
    assert sqnr[True] >= sqnr[False]


def test_fold_false_quantizes_every_bn_and_a_bn_without_qconfig_stays_float():
    model, x = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval(), (torch.randn(2, 3, 6, 6),)
    (row,) = fxqbn.get_report(fxqbn.convert(_calibrated(model, x, fold=False))).rows
    assert (row.status, row.reason) == ("rewritten", "")
    (row,) = fxqbn.get_report(fxqbn.convert(_calibrated(model, x))).rows
    assert (row.status, row.reason, row.pattern) == ("folded", "folded into conv; the ReLU after it stays float", "BatchNorm2d")
    (row,) = fxqbn.get_report(fxqbn.convert(_calibrated(model, x, skip=["bn"]))).rows
    assert row.status == "skipped"
    with pytest.raises(fxqbn.FxqbnError, match="fold must be True or False"):
        fxqbn.prepare(model, x, fold="yes")


def test_an_exported_graph_handed_to_prepare_folds_its_aten_conv():
    model, x = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval(), torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,)).module()
    q = fxqbn.convert(_calibrated(exported, (x,)))
    (row,) = fxqbn.get_report(q).rows
    assert row.status == "folded" and row.reason.startswith("folded into conv")
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-5)
