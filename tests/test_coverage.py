"""Beyond torch.ao: BatchNorm1d, functional BN, affine=False, DenseNet-style BN-only, skip=."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, calls, randomize_bn, snapshot, installed
from torch import nn
from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping, default_weight_observer
from torch.ao.quantization.quantize_fx import prepare_fx

import fxqbn
from fxqbn.float_io import FloatIO


def convert(model, shape, qconfig=MinMaxObserver, n=4, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(*shape, generator=gen) for _ in range(n)]
    observed = fxqbn.prepare(model, (data[0],), qconfig, **kwargs)
    with torch.no_grad():
        for x in data:
            observed(x)
    return fxqbn.convert(observed)


def reference(bn_fn, x, row, relu=False):
    """quantize -> dequantize -> float BN (-> ReLU) -> quantize -> dequantize with the row's qparams."""
    dtype = getattr(torch, row.dtype)
    xq = torch.quantize_per_tensor(x, row.input_scale, row.input_zero_point, dtype).dequantize()
    y = bn_fn(xq)
    y = torch.relu(y) if relu else y
    return torch.quantize_per_tensor(y, row.output_scale, row.output_zero_point, dtype).dequantize()


def within_one_step(actual, expected, row):
    return (actual - expected).abs().max().item() <= row.output_scale * 1.0001


# -- BatchNorm1d ----------------------------------------------------------------------------------


class TabularMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn1, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.bn1(self.fc1(x))))


def test_tabular_mlp_quantizes_batchnorm1d_with_relu():
    torch.manual_seed(0)
    model = randomize_bn(TabularMLP()).eval()
    q = convert(model, (32, 8), fold=False)  # folded into fc1 by default
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.op) == ("BatchNorm1d+ReLU", "quantized::batch_norm1d_relu")
    assert type(q.bn1) is FloatIO and type(q.bn1.bn) is fxqbn.nn.BNReLU1d  # between two Linears
    x = torch.randn(16, 8)
    h = model.fc1(x)
    with torch.no_grad():
        xq = torch.quantize_per_tensor(h, row.input_scale, row.input_zero_point, torch.quint8)
        assert within_one_step(q.bn1.bn(xq).dequantize(), reference(model.bn1, h, row, relu=True), row)


@pytest.mark.parametrize("shape", [(6, 4), (2, 4, 9)])
def test_batchnorm1d_on_both_input_ranks(shape):
    model = randomize_bn(nn.Sequential(nn.BatchNorm1d(4))).eval()
    q = convert(model, shape)
    (row,) = fxqbn.get_report(q).rows
    x = torch.randn(*shape)
    assert row.op == "quantized::batch_norm1d"
    assert within_one_step(q(x), reference(model[0], x, row), row)


# -- functional batch_norm -----------------------------------------------------------------------


class FunctionalBN(nn.Module):
    def __init__(self, c=4, affine=True, training=False, relu=True):
        super().__init__()
        self.register_buffer("mean", torch.rand(c) - 0.5)
        self.register_buffer("var", torch.rand(c) + 0.5)
        self.weight = nn.Parameter(torch.rand(c) + 0.5) if affine else None
        self.bias = nn.Parameter(torch.rand(c) - 0.5) if affine else None
        self.training_flag, self.relu = training, relu

    def forward(self, x):
        y = F.batch_norm(x, self.mean, self.var, self.weight, self.bias, self.training_flag, 0.1, 1e-3)
        return y.relu() if self.relu else y


@pytest.mark.parametrize("shape, dim", [((6, 4), 1), ((2, 4, 5, 5), 2), ((2, 4, 2, 3, 3), 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_functional_batch_norm_with_attribute_statistics_is_rewritten(shape, dim, affine):
    torch.manual_seed(1)
    model = nn.Sequential()
    model.add_module("block", FunctionalBN(affine=affine))
    model.eval()
    q = convert(model, shape)
    (row,) = fxqbn.get_report(q).rows
    assert (row.pattern, row.op, row.module) == (f"F.batch_norm{dim}d+ReLU", f"quantized::batch_norm{dim}d_relu", "block")
    assert not any(n.target is F.batch_norm for n in q.graph.nodes)
    assert not any(n.op == "get_attr" for n in q.graph.nodes)
    x = torch.randn(*shape)
    block = model.block
    expected = reference(lambda t: F.batch_norm(t, block.mean, block.var, block.weight, block.bias, False, 0.1, 1e-3), x, row, relu=True)
    assert within_one_step(q(x), expected, row)


def test_functional_batch_norm_forms_that_stay_float_are_reported():
    class Forms(nn.Module):
        def __init__(self):
            super().__init__()
            self.training_bn = FunctionalBN(training=True, relu=False)
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            a = self.training_bn(x)
            mean = x.mean(dim=(0, 2, 3))  # statistics computed in forward, not module attributes
            return F.batch_norm(a, mean, self.var, training=False)

    q = convert(Forms().eval(), (2, 4, 5, 5))
    reasons = [row.reason for row in fxqbn.get_report(q).rows]
    assert [row.status for row in fxqbn.get_report(q).rows] == ["skipped", "skipped"]
    assert "training=True" in reasons[0]
    assert "statistics or affine tensors are not module attributes" in reasons[1]


# -- affine=False -------------------------------------------------------------------------------


@pytest.mark.parametrize("bn_type, shape", [(nn.BatchNorm1d, (6, 4)), (nn.BatchNorm2d, (2, 4, 5, 5)), (nn.BatchNorm3d, (2, 4, 2, 3, 3))])
def test_affine_false_bns_are_quantized(bn_type, shape):
    model = randomize_bn(nn.Sequential(bn_type(4, affine=False), nn.ReLU())).eval()
    q = convert(model, shape)
    (row,) = fxqbn.get_report(q).rows
    assert row.status == "rewritten" and installed(q, "0").weight is None
    x = torch.randn(*shape)
    assert within_one_step(q(x), reference(model[0], x, row, relu=True), row)


# -- DenseNet-style, BN only -----------------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, c_in, growth):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(y)))  # conv -> BN -> ReLU -> conv


class DenseBlock(nn.Module):
    def __init__(self, c=8, growth=4, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(c + i * growth, growth) for i in range(layers))
        self.norm = nn.BatchNorm2d(c + layers * growth)

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))  # BN after cat
        return self.norm(torch.cat(features, 1))


def test_densenet_style_block_with_bn_only_quantization():
    torch.manual_seed(2)
    model = randomize_bn(DenseBlock()).eval()
    qc = QConfig(activation=MinMaxObserver, weight=default_weight_observer)
    mapping = QConfigMapping().set_object_type(nn.BatchNorm2d, qc).set_object_type(F.relu, qc)
    with pytest.raises(LookupError):  # what torch.ao does with this model and mapping
        prepare_fx(model, mapping, (torch.randn(1, 8, 6, 6),))
    before = snapshot(model)
    q = convert(model, (2, 8, 6, 6), qconfig=mapping, fold=False)  # every norm2 follows a conv: folded by default
    assert_unchanged(model, before)
    report = fxqbn.get_report(q)
    assert [r.pattern for r in report.rows] == ["BatchNorm2d+ReLU"] * 6 + ["BatchNorm2d"]
    assert all(r.status == "rewritten" for r in report.rows)
    assert sum(isinstance(m, nn.Conv2d) for m in q.modules()) == 6  # convs stay float
    result = fxqbn.compare(model, q, [torch.randn(2, 8, 6, 6) for _ in range(2)])
    assert result.summary.model_sqnr_db > 25
    assert all(r.sqnr_db > 30 for r in result.rows)


# -- skip= --------------------------------------------------------------------------------------


def test_skip_by_name_and_type():
    model = randomize_bn(DenseBlock()).eval()
    q = convert(model, (2, 8, 6, 6), skip=["layers.1", nn.BatchNorm1d])
    rows = {r.module: r for r in fxqbn.get_report(q).rows}
    assert rows["layers.1.norm1"].status == rows["layers.1.norm2"].status == "skipped"
    assert "skipped on request" in rows["layers.1.norm1"].reason
    assert rows["layers.0.norm1"].status == "rewritten"
    q2 = convert(model, (2, 8, 6, 6), skip=[nn.BatchNorm2d])
    assert all(r.status == "skipped" for r in fxqbn.get_report(q2).rows)
    assert not calls(q2, fxqbn.nn.Quantize)


def test_skip_refuses_unknown_names():
    with pytest.raises(fxqbn.FxqbnError, match="skip names module 'layers.9'"):
        fxqbn.prepare(DenseBlock().eval(), (torch.randn(1, 8, 6, 6),), skip=["layers.9"])
