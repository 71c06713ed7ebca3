"""fxqbn.nn quantized modules: construction, state_dict, repr, input checks, torch.ao parity."""

import copy
import io

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from conftest import randomize_bn
from torch import nn
from torch.ao.quantization import MinMaxObserver

import fxqbn
from fxqbn import nn as qnn

CASES = [  # (fxqbn module, float BN, torch.ao's quantized module or None, input shape)
    (qnn.BatchNorm2d, nn.BatchNorm2d, nnq.BatchNorm2d, (2, 4, 5, 5)),
    (qnn.BNReLU2d, nn.BatchNorm2d, nniq.BNReLU2d, (2, 4, 5, 5)),
    (qnn.BatchNorm3d, nn.BatchNorm3d, nnq.BatchNorm3d, (2, 4, 3, 5, 5)),
    (qnn.BNReLU3d, nn.BatchNorm3d, nniq.BNReLU3d, (2, 4, 3, 5, 5)),
]
IDS = [case[0].__name__ for case in CASES]


def fused(bn, tcls):
    """The float module torch.ao's ``tcls`` is built from: the BN, or BN+ReLU fused."""
    if tcls is nniq.BNReLU2d:
        return nni.BNReLU2d(bn, nn.ReLU())
    if tcls is nniq.BNReLU3d:
        return nni.BNReLU3d(bn, nn.ReLU())
    return bn


def qinput(shape, scale=0.05, zero_point=128, dtype=torch.quint8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.quantize_per_tensor(torch.randn(*shape, generator=gen), scale, zero_point, dtype)


@pytest.mark.parametrize("qcls, fcls, tcls, shape", CASES, ids=IDS)
def test_from_reference_matches_torch_ao(qcls, fcls, tcls, shape):
    bn = randomize_bn(fcls(4)).eval()
    reference = fused(bn, tcls)
    theirs = tcls.from_reference(reference, torch.tensor(0.03), torch.tensor(70))
    x = qinput(shape)
    for ours in (qcls.from_reference(bn, 0.03, 70), qcls.from_reference(reference, 0.03, 70)):
        assert torch.equal(ours(x).int_repr(), theirs(x).int_repr())
        assert (ours(x).q_scale(), ours(x).q_zero_point()) == (0.03, 70)


@pytest.mark.parametrize("qcls, fcls, tcls, shape", CASES, ids=IDS)
def test_from_float_matches_torch_ao_and_keeps_momentum(qcls, fcls, tcls, shape):
    bn = randomize_bn(fcls(4, momentum=0.25)).eval()
    float_mod = fused(bn, tcls)
    float_mod.activation_post_process = MinMaxObserver()
    float_mod.activation_post_process(torch.randn(8, 4) * 3)
    ours = qcls.from_float(float_mod)
    theirs = tcls.from_float(float_mod)
    assert ours.momentum == 0.25 and theirs.momentum != 0.25  # torch.ao drops it
    x = qinput(shape)
    assert torch.equal(ours(x).int_repr(), theirs(x).int_repr())


def test_from_float_errors_name_what_is_missing():
    bn = nn.BatchNorm2d(4).eval()
    with pytest.raises(fxqbn.FxqbnError, match="no activation_post_process"):
        qnn.BatchNorm2d.from_float(bn)
    bn.activation_post_process = MinMaxObserver()
    with pytest.raises(fxqbn.FxqbnError, match="never saw data"):
        qnn.BatchNorm2d.from_float(bn)
    bn.activation_post_process(torch.randn(3))
    with pytest.raises(fxqbn.FxqbnError, match="expects BatchNorm3d, got BatchNorm2d"):
        qnn.BatchNorm3d.from_float(bn)


@pytest.mark.parametrize("qcls, fcls, tcls, shape", CASES, ids=IDS)
def test_affine_false_works_and_equals_unit_affine(qcls, fcls, tcls, shape):
    plain = randomize_bn(fcls(4, affine=False)).eval()
    unit = fcls(4).eval()
    unit.load_state_dict(plain.state_dict(), strict=False)
    with pytest.raises(AttributeError):  # torch.ao crashes on weight=None
        tcls.from_reference(fused(plain, tcls), torch.tensor(0.03), torch.tensor(70))
    ours = qcls.from_reference(plain, 0.03, 70)
    x = qinput(shape)
    assert ours.weight is None and "weight" not in ours.state_dict()
    assert torch.equal(ours(x).int_repr(), qcls.from_reference(unit, 0.03, 70)(x).int_repr())


@pytest.mark.parametrize("qcls, fcls, tcls, shape", CASES, ids=IDS)
def test_state_dict_round_trip_carries_qparams(qcls, fcls, tcls, shape):
    source = qcls.from_reference(randomize_bn(fcls(4)).eval(), 0.0421, 17)
    state = source.state_dict()
    assert float(state["scale"]) == 0.0421 and int(state["zero_point"]) == 17
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    target = qcls(4)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    x = qinput(shape)
    out = target(x)
    assert (out.q_scale(), out.q_zero_point()) == (0.0421, 17)
    assert torch.equal(out.int_repr(), source(x).int_repr())


def test_statistics_are_contiguous_float32_copies():
    bn = randomize_bn(nn.BatchNorm2d(4)).eval()
    q = qnn.BatchNorm2d.from_reference(bn, 0.1, 0)
    for name in ("weight", "bias", "running_mean", "running_var"):
        ours, theirs = getattr(q, name), getattr(bn, name)
        assert ours.is_contiguous() and ours.dtype == torch.float32
        assert ours.data_ptr() != theirs.data_ptr()
    with torch.no_grad():
        bn.running_mean.add_(10)
    assert not torch.equal(q.running_mean, bn.running_mean)


def test_repr_is_readable():
    q = qnn.BNReLU2d.from_reference(nn.BatchNorm2d(8).eval(), 0.125, 3)
    assert repr(q) == "QuantizedBNReLU2d(8, eps=1e-05, momentum=0.1, affine=True, scale=0.125, zero_point=3)"


@pytest.mark.parametrize(
    "qcls, shape, message",
    [
        (qnn.BatchNorm2d, (2, 4, 5), r"expects input of shape \(N, C, H, W\), got \(2, 4, 5\)"),
        (qnn.BatchNorm3d, (2, 4, 5, 5), r"expects input of shape \(N, C, D, H, W\), got \(2, 4, 5, 5\)"),
        (qnn.BatchNorm2d, (2, 3, 5, 5), r"has 4 channels, got input of shape \(2, 3, 5, 5\) with 3 channels"),
    ],
)
def test_bad_input_is_refused_before_the_kernel(qcls, shape, message):
    q = qcls(4)
    with pytest.raises(fxqbn.FxqbnError, match=message):
        q(qinput(shape))


def test_float_input_is_refused_before_the_kernel():
    with pytest.raises(fxqbn.FxqbnError, match="per-tensor quantized input.*got torch.float32"):
        qnn.BatchNorm2d(4)(torch.randn(2, 4, 5, 5))


def test_deepcopy_keeps_qparams():
    q = qnn.BatchNorm3d.from_reference(randomize_bn(nn.BatchNorm3d(4)).eval(), 0.07, 9)
    c = copy.deepcopy(q)
    x = qinput((1, 4, 2, 3, 3))
    assert torch.equal(c(x).int_repr(), q(x).int_repr()) and c(x).q_scale() == 0.07
