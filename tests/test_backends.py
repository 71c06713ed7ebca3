"""Both backends through prepare/convert: the same behaviour, the same numbers; the fused graph
holds no quantized dtype and exports with torch.export."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, calls, randomize_bn, snapshot
from torch import fx, nn
from torch.ao.quantization import MinMaxObserver

import fxqbn
from fxqbn import fused

BACKENDS = ["native", "fused"]
BOUNDARIES = {"native": (fxqbn.nn.Quantize, fxqbn.nn.DeQuantize), "fused": (fused.FusedQuantize, fused.FusedDeQuantize)}


class Chain(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(c), nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn3(F.relu(self.bn2(self.bn1(x)))) + 1


class Net3d(nn.Module):
    """3-d BNs, ReLU spellings, a BN output read twice (ReLU left float) and a BN called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, 3, padding=1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm3d(8), nn.BatchNorm3d(8), nn.BatchNorm3d(8)

    def forward(self, x):
        y = self.bn1(self.conv(x)).relu_()
        z = self.bn2(y)
        w = torch.relu(z) + z
        return self.bn3(self.bn3(w) * 2)


CASES = {  # name -> (model, input shape, observer)
    "chain-quint8": (Chain, (2, 8, 6, 6), MinMaxObserver),
    "chain-qint8": (Chain, (2, 8, 6, 6), MinMaxObserver.with_args(dtype=torch.qint8)),
    "net3d": (Net3d, (2, 3, 4, 5, 5), None),
}


def calibrated(name, seed=0):
    model_cls, shape, observer = CASES[name]
    torch.manual_seed(seed)
    model = randomize_bn(model_cls(), seed).eval()
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(*shape, generator=gen) for _ in range(3)]
    observed = fxqbn.prepare(model, (data[0],), observer)
    with torch.no_grad():
        for x in data:
            observed(x)
    return model, observed, torch.randn(*shape, generator=gen)


def test_unknown_backend_is_refused_listing_the_choices():
    _, observed, _ = calibrated("chain-quint8")
    with pytest.raises(fxqbn.FxqbnError, match=r"unknown backend 'fbgemm': choose one of 'native', 'fused'"):
        fxqbn.convert(observed, backend="fbgemm")
    with pytest.raises(fxqbn.FxqbnError, match=r"unknown backend"):
        fxqbn.convert(Chain(), backend=None)


@pytest.mark.parametrize("case", CASES)
def test_fused_output_equals_native_output_bit_for_bit(case):
    model, observed, x = calibrated(case)
    native, fused_q = fxqbn.convert(observed), fxqbn.convert(observed, backend="fused")
    with torch.no_grad():
        expected, got = native(x), fused_q(x)
    assert torch.equal(got, expected)
    assert (got - model(x)).abs().max() < 1.0  # and both are near the float model
    native_rows, fused_rows = fxqbn.get_report(native).rows, fxqbn.get_report(fused_q).rows
    assert [(r.node, r.pattern, r.status, r.reason, r.input_scale, r.output_zero_point) for r in native_rows] == [
        (r.node, r.pattern, r.status, r.reason, r.input_scale, r.output_zero_point) for r in fused_rows
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_has_one_quantize_and_one_dequantize(backend):
    _, observed, _ = calibrated("chain-quint8")
    q = fxqbn.convert(observed, backend=backend)
    quantize, dequantize = BOUNDARIES[backend]
    assert len(calls(q, quantize)) == 1 and len(calls(q, dequantize)) == 1
    q.graph.lint()
    ops = [row.op for row in fxqbn.get_report(q).rows]
    if backend == "fused":
        assert ops == ["fxqbn.fused.batch_norm2d", "fxqbn.fused.batch_norm2d_relu", "fxqbn.fused.batch_norm2d"]
        assert all(type(q.get_submodule(n)) is fused.FusedBatchNorm for n in ("bn1", "bn2", "bn3"))
    else:
        assert ops == ["quantized::batch_norm2d", "quantized::batch_norm2d_relu", "quantized::batch_norm2d"]


class NoQuantizedValues(fx.Interpreter):
    def run_node(self, node):
        out = super().run_node(node)
        assert not (isinstance(out, torch.Tensor) and out.is_quantized), node.name
        return out


@pytest.mark.parametrize("case", CASES)
def test_no_quantized_dtype_appears_in_the_fused_graph(case):
    _, observed, x = calibrated(case)
    q = fxqbn.convert(observed, backend="fused")
    with torch.no_grad():
        out = NoQuantizedValues(q).run(x)
    assert torch.equal(out, q(x))
    modules = {type(m) for m in q.modules()}
    assert not modules & {fxqbn.nn.Quantize, fxqbn.nn.DeQuantize, fxqbn.nn.BatchNorm2d, fxqbn.nn.BNReLU2d, fxqbn.nn.BatchNorm3d, fxqbn.nn.BNReLU3d}


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_changes_neither_the_model_nor_the_observed_module(backend):
    model, observed, x = calibrated("net3d")
    before, code = snapshot(model), observed.code
    q = fxqbn.convert(observed, backend=backend)
    assert_unchanged(model, before)
    assert observed.code == code
    again = fxqbn.convert(observed, inplace=True, backend=backend)
    assert again is observed and torch.equal(again(x), q(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_keeps_the_numbers_and_the_report(backend):
    _, observed, x = calibrated("chain-qint8")
    q = fxqbn.convert(observed, backend=backend)
    c = copy.deepcopy(q)
    assert torch.equal(c(x), q(x)) and fxqbn.get_report(c) == fxqbn.get_report(q)


def test_fused_model_exports_and_the_program_gives_the_same_outputs():
    _, observed, x = calibrated("net3d")
    q = fxqbn.convert(observed, backend="fused")
    program = torch.export.export(q, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("quantize" in t or "quantized" in t for t in targets), targets
    exported = program.module()
    for seed in (1, 2):
        y = torch.randn_like(x, memory_format=torch.contiguous_format) * seed
        assert torch.equal(exported(y), q(y))


def test_torch_ao_quantized_bn_does_not_export():
    """Why export matters: torch.ao's quantized BN fails inside torch.export (torch 2.13)."""
    import torch.ao.nn.quantized as nnq

    class AoBn(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nnq.BatchNorm2d.from_reference(nn.BatchNorm2d(4).eval(), torch.tensor(0.1), torch.tensor(3))

        def forward(self, x):
            return self.bn(torch.quantize_per_tensor(x, 0.1, 3, torch.quint8)).dequantize()

    with pytest.raises(RuntimeError, match="Expected a value of type 'float' for argument 'output_scale'"):
        torch.export.export(AoBn(), (torch.randn(2, 4, 5, 5),))
