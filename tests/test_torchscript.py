"""torch.jit.script compiles converted models of both backends: same outputs, bit for bit, before and after save/load."""

import io

import pytest
import torch
from conftest import randomize_bn
from torch import nn
from torch.ao.quantization import MinMaxObserver

import fxqbn
from fxqbn import nn as qnn


class Mixed(nn.Module):
    """BN2d+ReLU, affine=False BN2d, then BN3d+ReLU: quantize, hand-over, dequantize, quantize again."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn, self.plain, self.bn3 = nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False), nn.BatchNorm3d(4)

    def forward(self, x):
        y = self.plain(torch.relu(self.bn(self.conv(x)))) + 1
        return self.bn3(y.unsqueeze(2)).relu()


pytestmark = [
    # TorchScript is deprecated in torch 2.13; fxqbn keeps it working for deployments that still use it.
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
    # torch checks its own GraphModule.__init__, whose annotations it does not support.
    pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level annotations:UserWarning"),
]


@pytest.fixture(scope="module", params=["native", "fused"])
def quantized(request):
    torch.manual_seed(0)
    model = randomize_bn(Mixed()).eval()
    observed = fxqbn.prepare(model, (torch.randn(1, 3, 8, 8),), MinMaxObserver)
    with torch.no_grad():
        for _ in range(3):
            observed(torch.randn(2, 3, 8, 8))
    return fxqbn.convert(observed, backend=request.param)


def test_scripted_model_equals_eager_before_and_after_save(quantized):
    scripted = torch.jit.script(quantized)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = quantized(x)
    assert torch.equal(scripted(x), expected)
    assert torch.equal(loaded(x), expected)


def test_scripting_leaves_the_converted_model_as_it_was(quantized):
    types = [(name, type(m)) for name, m in quantized.named_modules()]
    torch.jit.script(quantized)
    assert [(name, type(m)) for name, m in quantized.named_modules()] == types


@pytest.mark.parametrize("qcls, good", [(qnn.BatchNorm1d, (2, 4)), (qnn.BNReLU1d, (2, 4, 3)), (qnn.BNReLU3d, (1, 4, 2, 2, 2))])
def test_every_quantized_module_scripts(qcls, good):
    module = qcls.from_reference(randomize_bn(qcls._FLOAT_MODULE(4)).eval(), 0.05, 3)
    x = torch.quantize_per_tensor(torch.randn(*good), 0.1, 128, torch.quint8)
    assert torch.equal(torch.jit.script(module)(x).int_repr(), module(x).int_repr())


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(2, 4, 5),  # float, wrong rank
        torch.quantize_per_tensor(torch.randn(2, 3, 5, 5), 0.1, 0, torch.quint8),  # 3 channels, not 4
        torch.randn(2, 4, 5, 5),  # float
    ],
    ids=["rank", "channels", "float"],
)
def test_scripted_module_refuses_bad_input_before_the_kernel(x):
    scripted = torch.jit.script(qnn.BatchNorm2d(4))
    with pytest.raises(torch.jit.Error, match=r"FxqbnError: quantized BatchNorm2d with 4 channels expects"):
        scripted(x)
