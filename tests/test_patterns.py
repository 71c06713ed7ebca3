"""ReLU spellings: what gets fused, what does not and why, numbers vs float (the tables themselves:
tests/test_registry.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import calls, randomize_bn, installed
from torch import nn
from torch.ao.quantization import MinMaxObserver

import fxqbn
from fxqbn.float_io import FloatIO

SPELLINGS = {  # name -> function applying ReLU to the BN output in forward
    "nn.ReLU": lambda self, y: self.relu(y),
    "nn.ReLU(inplace)": lambda self, y: self.relu_inplace(y),
    "F.relu": lambda self, y: F.relu(y),
    "F.relu(inplace)": lambda self, y: F.relu(y, inplace=True),
    "torch.relu": lambda self, y: torch.relu(y),
    "torch.relu_": lambda self, y: torch.relu_(y),
    ".relu()": lambda self, y: y.relu(),
    ".relu_()": lambda self, y: y.relu_(),
}
DIMS = {
    "1d": (nn.BatchNorm1d, (6, 4)),
    "1d-seq": (nn.BatchNorm1d, (2, 4, 7)),
    "2d": (nn.BatchNorm2d, (2, 4, 5, 5)),
    "3d": (nn.BatchNorm3d, (2, 4, 3, 4, 4)),
}


class BnRelu(nn.Module):
    def __init__(self, bn_type, spelling):
        super().__init__()
        self.bn = bn_type(4)
        self.relu, self.relu_inplace = nn.ReLU(), nn.ReLU(inplace=True)
        self.spelling = SPELLINGS[spelling]

    def forward(self, x):
        return self.spelling(self, self.bn(x)) * 2


def calibrated(model, shape, n=3):
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(*shape, generator=gen) for _ in range(n)]
    observed = fxqbn.prepare(model, (data[0],), MinMaxObserver)
    with torch.no_grad():
        for x in data:
            observed(x)
    return fxqbn.convert(observed)


def float_reference(bn, x, row, relu):
    """quantize -> dequantize -> float BN (-> ReLU) -> quantize -> dequantize with the report's qparams."""
    dtype = getattr(torch, row.dtype)
    xq = torch.quantize_per_tensor(x, row.input_scale, row.input_zero_point, dtype).dequantize()
    y = bn(xq)
    y = torch.relu(y) if relu else y
    return torch.quantize_per_tensor(y, row.output_scale, row.output_zero_point, dtype).dequantize()


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("dim", DIMS)
def test_relu_is_fused_in_every_spelling(dim, spelling):
    bn_type, shape = DIMS[dim]
    model = randomize_bn(BnRelu(bn_type, spelling)).eval()
    q = calibrated(model, shape)
    (row,) = fxqbn.get_report(q).rows
    d = dim[:2]
    assert (row.pattern, row.op, row.status, row.reason) == (
        f"BatchNorm{d}+ReLU", f"quantized::batch_norm{d}_relu", "rewritten", "",
    )
    assert type(installed(q, "bn")) is getattr(fxqbn.nn, f"BNReLU{d}")
    assert not any(n.op == "call_method" and "relu" in str(n.target) for n in q.graph.nodes)
    assert not any(n.op == "call_function" and n.target in (F.relu, torch.relu, torch.relu_) for n in q.graph.nodes)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    expected = float_reference(model.bn, x, row, relu=True) * 2
    assert (q(x) - expected).abs().max() <= 2 * row.output_scale * 1.0001  # one output step, times 2


@pytest.mark.parametrize("dim", DIMS)
def test_bn_alone_is_within_one_step_of_the_float_reference(dim):
    bn_type, shape = DIMS[dim]
    model = randomize_bn(nn.Sequential(bn_type(4))).eval()
    q = calibrated(model, shape)
    (row,) = fxqbn.get_report(q).rows
    assert row.pattern == f"BatchNorm{dim[:2]}"
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    assert (q(x) - float_reference(model[0], x, row, relu=False)).abs().max() <= row.output_scale * 1.0001


class SharedOutput(nn.Module):
    """The BN output is read by an inplace ReLU and by an add: eager semantics make the add see the ReLU."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(x)
        z = F.relu(y, inplace=True)
        return y + z


def test_relu_on_a_shared_bn_output_is_left_float_with_the_reason():
    model = randomize_bn(SharedOutput()).eval()
    q = calibrated(model, (2, 4, 5, 5))
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.status) == ("BatchNorm2d", "rewritten")
    assert row.reason == "ReLU not fused: the BN output has 2 users"
    assert type(installed(q, "bn")) is fxqbn.nn.BatchNorm2d
    assert len([n for n in q.graph.nodes if n.target is F.relu]) == 1
    assert len(calls(q, FloatIO)) == 1 and not calls(q, fxqbn.nn.DeQuantize)  # dequantized once, inside, for both users
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(7))
    out = q(x)
    assert (out >= 0).all()  # the inplace ReLU reached the add's other operand, as in eager
    assert (out - model(x)).abs().max() < 4 * row.output_scale


def test_relu_not_applied_to_the_bn_output_is_not_fused():
    class ReluFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(x)
            return torch.relu(x) + y

    q = calibrated(randomize_bn(ReluFirst()).eval(), (2, 4, 5, 5))
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.reason) == ("BatchNorm2d", "")
