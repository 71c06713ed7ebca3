"""Coming from torch.ao: fused BNReLU modules, prepare_fx-observed graphs, eager observers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import calls, randomize_bn, installed
from models import CASES, randomize_batchnorms
from torch import nn
from torch.ao.quantization import (
    MinMaxObserver,
    QConfig,
    QConfigMapping,
    default_weight_observer,
    fuse_modules,
    get_default_qconfig,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fxqbn
from fxqbn.float_io import FloatIO

QCONFIG = QConfig(activation=MinMaxObserver, weight=default_weight_observer)


def bn_only_mapping():
    mapping = QConfigMapping()
    for kind in (nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, F.relu):
        mapping.set_object_type(kind, QCONFIG)
    return mapping


def calibrate(observed, case, n=3):
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(n):
            observed(*case.inputs())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_converting_a_prepare_fx_graph_equals_convert_fx(case):
    torch.manual_seed(0)
    model = randomize_batchnorms(case.build())
    observed = prepare_fx(model, bn_only_mapping(), case.inputs())
    calibrate(observed, case)
    theirs = convert_fx(copy.deepcopy(observed))
    ours = fxqbn.convert(observed)  # a deep copy unless inplace=True
    assert any(n.op == "call_module" and "activation_post_process" in str(n.target) for n in observed.graph.nodes)
    ours.graph.lint()
    assert not any("activation_post_process" in name for name, _ in ours.named_modules())
    report = fxqbn.get_report(ours)
    assert len(report.rewritten) == case.num_bns and not report.skipped
    torch.manual_seed(2)
    for _ in range(2):
        x = case.inputs(scale=2.0)
        expected, actual = theirs(*x), ours(*x)
        expected, actual = (expected, actual) if isinstance(expected, tuple) else ((expected,), (actual,))
        assert len(expected) == len(actual)
        for a, b in zip(expected, actual):
            assert torch.equal(a, b)


class ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x) * 0.5)))


def test_observers_on_other_ops_are_removed_and_listed():
    model = randomize_bn(ConvBnNet()).eval()
    mapping = bn_only_mapping().set_object_type(nn.Conv2d, get_default_qconfig("x86"))
    x = torch.randn(2, 4, 6, 6)
    observed = prepare_fx(model, mapping, (x,))
    with torch.no_grad():
        for _ in range(3):
            observed(torch.randn(2, 4, 6, 6))
    q = fxqbn.convert(observed)
    report = fxqbn.get_report(q)
    assert [(r.module, r.pattern, r.status) for r in report.rows] == [("bn", "BNReLU2d", "rewritten")]
    assert type(q.conv) is nn.Conv2d and type(q.head) is nn.Conv2d  # left float
    assert any("on conv (call_module conv)" in line for line in report.dropped)
    assert any("on head (call_module head)" in line for line in report.dropped)
    assert "observers removed without conversion" in str(report)
    assert report.to_dict()["dropped"] == list(report.dropped)
    with torch.no_grad():
        assert (q(x) - model(x)).abs().max() < 0.2


def test_fused_bnrelu_modules_from_fuse_modules_are_patterns():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Identity())).eval()
    fused = fuse_modules(model, [["0", "1"]])
    x = [torch.randn(2, 4, 5, 5) for _ in range(3)]
    observed = fxqbn.prepare(fused, (x[0],), MinMaxObserver)
    with torch.no_grad():
        for b in x:
            observed(b)
    q = fxqbn.convert(observed)
    (row,) = fxqbn.get_report(q).rows
    assert (row.module, row.pattern, row.op) == ("0", "BNReLU2d", "quantized::batch_norm2d_relu")
    assert type(installed(q, "0")) is fxqbn.nn.BNReLU2d
    # torch.ao on the same fused model and calibration: the same numbers
    theirs = prepare_fx(fused, QConfigMapping().set_global(QCONFIG), (x[0],))
    with torch.no_grad():
        for b in x:
            theirs(b)
    theirs = convert_fx(theirs)
    probe = torch.randn(2, 4, 5, 5)
    assert torch.equal(q(probe), theirs(probe))
    assert len(calls(q, FloatIO)) == 1 and not calls(q, fxqbn.nn.Quantize)  # between float code: one FloatIO


def test_fused_bnrelu3d_module():
    fused = fuse_modules(randomize_bn(nn.Sequential(nn.BatchNorm3d(4), nn.ReLU())).eval(), [["0", "1"]])
    observed = fxqbn.prepare(fused, (torch.randn(1, 4, 2, 3, 3),), MinMaxObserver)
    observed(torch.randn(2, 4, 2, 3, 3))
    (row,) = fxqbn.get_report(fxqbn.convert(observed)).rows
    assert (row.pattern, row.op) == ("BNReLU3d", "quantized::batch_norm3d_relu")


def test_a_torch_ao_graph_whose_observers_never_ran_is_refused():
    model = randomize_bn(ConvBnNet()).eval()
    observed = prepare_fx(model, bn_only_mapping(), (torch.randn(1, 4, 6, 6),))
    with pytest.raises(fxqbn.FxqbnError, match=r"never saw data for BatchNorm 'bn'"):
        fxqbn.convert(observed)


def test_a_pattern_torch_ao_left_unobserved_is_skipped_under_its_rule_name():
    class HalfObserved(nn.Module):
        def __init__(self):
            super().__init__()
            self.obs, self.bn, self.relu = MinMaxObserver(), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.obs(x)))  # no observer on the output

    class KeepsObservers(torch.fx.Tracer):  # as prepare_fx leaves them: one node each
        def is_leaf_module(self, m, name):
            return isinstance(m, MinMaxObserver) or super().is_leaf_module(m, name)

    model = HalfObserved().eval()
    gm = torch.fx.GraphModule(model, KeepsObservers().trace(model))
    gm(torch.randn(2, 4, 3, 3))
    (row,) = fxqbn.get_report(fxqbn.convert(gm)).rows
    assert (row.module, row.pattern, row.status, row.reason) == (
        "bn", "BatchNorm2d+ReLU", "skipped", "torch.ao put no observer on its output",
    )
