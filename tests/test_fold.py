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
