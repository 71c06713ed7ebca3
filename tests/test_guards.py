"""Bad input never reaches the quantized kernel: each case is refused or handled, never silent."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_unchanged, randomize_bn, snapshot, installed
from torch import nn
from torch.ao.quantization import MinMaxObserver
from torch.ao.quantization.observer import ObserverBase

import fxqbn
from fxqbn import nn as qnn


class Chain(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn2(self.bn1(x) * 2)


def observed_chain(model=None, observer=MinMaxObserver, shape=(2, 4, 5, 5)):
    model = model if model is not None else randomize_bn(Chain()).eval()
    observed = fxqbn.prepare(model, (torch.randn(*shape),), observer)
    with torch.no_grad():
        for seed in range(3):
            observed(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))
    return observed


# -- statistics -------------------------------------------------------------------------------------


def test_expanded_and_strided_statistics_are_materialised():
    plain = randomize_bn(Chain()).eval()
    odd = randomize_bn(Chain()).eval()
    with torch.no_grad():
        odd.bn1.weight = nn.Parameter(torch.full((1,), 1.5).expand(4))  # stride 0
        plain.bn1.weight.fill_(1.5)
        wide = torch.zeros(8)
        wide[::2] = plain.bn1.running_var
        odd.bn1.running_var = wide[::2]  # stride 2
    assert odd.bn1.weight.stride() == (0,) and odd.bn1.running_var.stride() == (2,)
    x = torch.randn(2, 4, 5, 5)
    q_odd, q_plain = fxqbn.convert(observed_chain(odd)), fxqbn.convert(observed_chain(plain))
    assert torch.equal(q_odd(x), q_plain(x))
    bn1 = installed(q_odd, "bn1")
    assert bn1.weight.is_contiguous() and bn1.running_var.is_contiguous()


@pytest.mark.parametrize(
    "tensor, channel, value, message",
    [
        ("running_mean", 2, float("nan"), r"'bn1' has non-finite running_mean\[2\] = nan"),
        ("running_var", 1, float("inf"), r"'bn1' has non-finite running_var\[1\] = inf"),
        ("weight", 3, float("-inf"), r"'bn1' has non-finite weight\[3\] = -inf"),
        ("bias", 0, float("nan"), r"'bn1' has non-finite bias\[0\] = nan"),
        ("running_var", 2, -0.5, r"'bn1' has negative running_var\[2\] = -0.5"),
    ],
)
def test_bad_statistics_are_refused_naming_module_and_channel(tensor, channel, value, message):
    observed = observed_chain()
    with torch.no_grad():
        getattr(observed.bn1, tensor)[channel] = value
    with pytest.raises(fxqbn.FxqbnError, match=message):
        fxqbn.convert(observed)


@pytest.mark.parametrize(
    "eps, message",
    [(-1e-3, r"eps = -0.001: eps must be a non-negative"), (float("nan"), r"eps = nan"), (0.0, r"running_var \+ eps <= 0 at channel 1")],
)
def test_bad_eps_is_refused(eps, message):
    observed = observed_chain()
    observed.bn1.eps = eps
    with torch.no_grad():
        observed.bn1.running_var[1] = 0.0
    with pytest.raises(fxqbn.FxqbnError, match=message):
        fxqbn.convert(observed, inplace=True)
    assert hasattr(observed, "fxqbn_observer_0")  # refused before the graph changed


def test_refusal_leaves_the_user_model_unchanged():
    model = randomize_bn(Chain()).eval()
    with torch.no_grad():
        model.bn2.running_var[0] = -1.0
    before = snapshot(model)
    with pytest.raises(fxqbn.FxqbnError):
        fxqbn.convert(observed_chain(model))
    assert_unchanged(model, before)


# -- qparams ---------------------------------------------------------------------------------------


class FixedObserver(ObserverBase):
    """Returns whatever qparams it is told to, after seeing data."""

    def __init__(self, scale=0.1, zero_point=0, dtype=torch.quint8):
        super().__init__(dtype=dtype)
        self.scale, self.zero_point = scale, zero_point
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def forward(self, x):
        self.min_val.fill_(x.min())
        self.max_val.fill_(x.max())
        return x

    def calculate_qparams(self):
        return torch.tensor([self.scale]), torch.tensor([self.zero_point])


@pytest.mark.parametrize(
    "scale, zero_point, message",
    [
        (0.0, 0, "scale 0.0 is not a finite, positive, normal"),
        (-0.1, 0, "scale -0.1"),
        (float("nan"), 0, "scale nan"),
        (float("inf"), 0, "scale inf"),
        (1e-40, 0, r"scale 9\.9+\d*e-41 is not a finite, positive, normal"),  # float32 subnormal
        (0.1, 300, r"zero point 300 is outside \[0, 255\]"),
        (0.1, -1, r"zero point -1 is outside \[0, 255\]"),
    ],
)
def test_bad_output_qparams_are_refused_naming_the_observer(scale, zero_point, message):
    observed = observed_chain(observer=FixedObserver.with_args(scale=scale, zero_point=zero_point))
    with pytest.raises(fxqbn.FxqbnError, match=rf"observer 'fxqbn_observer_0' \(for BatchNorm 'bn1'\): {message}"):
        fxqbn.convert(observed)


@pytest.mark.parametrize("observer", [MinMaxObserver, torch.ao.quantization.HistogramObserver, None])
@pytest.mark.parametrize(
    "batch, message",
    [
        (torch.full((2, 4, 5, 5), float("nan")), r"got NaN or infinite values \(range \[nan, nan\]\)"),
        (torch.randn(2, 4, 5, 5).index_fill_(1, torch.tensor([2]), float("-inf")), r"got NaN or infinite values \(range \[-inf, "),
        (torch.ones(2, 4, 5, 5, dtype=torch.int64), r"got a torch.int64 tensor: calibrate with the float inputs"),
    ],
    ids=["nan", "-inf", "int64"],
)
def test_bad_calibration_data_is_refused_naming_the_observer_before_the_observer_runs(observer, batch, message):
    observed = observed_chain(observer=observer)
    with torch.no_grad(), pytest.raises(fxqbn.FxqbnError, match=r"observer 'fxqbn_observer_0' \(input of BatchNorm 'bn1', node 'bn1'\) " + message):
        observed(batch)
    fxqbn.convert(observed)  # the refused batch left the observers as they were


def test_statistics_that_turn_bn_outputs_non_finite_after_prepare_are_named_at_the_output_observer():
    observed = observed_chain()
    observed.bn1.eps = 0.0
    with torch.no_grad():
        observed.bn1.running_var[1] = 0.0  # prepare refuses this; changed after it
        with pytest.raises(fxqbn.FxqbnError, match=r"observer 'fxqbn_observer_1' \(output of BatchNorm 'bn1'.*BatchNorm statistics"):
            observed(torch.randn(2, 4, 5, 5))


# -- run-time inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("qcls, shape", [(qnn.BatchNorm2d, (0, 4, 5, 5)), (qnn.BNReLU2d, (2, 4, 0, 5)), (qnn.BatchNorm3d, (1, 4, 2, 0, 3)), (qnn.BatchNorm1d, (0, 4))])
def test_empty_batches_carry_the_output_qparams(qcls, shape):
    q = qcls.from_reference(randomize_bn(qcls._FLOAT_MODULE(4)).eval(), 0.125, 3)
    x = torch.quantize_per_tensor(torch.randn(*shape), 0.05, 128, torch.quint8)
    out = q(x)
    assert out.shape == x.shape and (out.q_scale(), out.q_zero_point()) == (0.125, 3)


def test_empty_batch_through_a_converted_model():
    q = fxqbn.convert(observed_chain())
    assert q(torch.randn(0, 4, 5, 5)).shape == (0, 4, 5, 5)


def test_wrong_channel_count_at_run_time_names_the_expected_shape():
    q = fxqbn.convert(observed_chain())
    with pytest.raises(fxqbn.FxqbnError, match=r"QuantizedBatchNorm2d has 4 channels, got input of shape \(2, 3, 5, 5\)"):
        q(torch.randn(2, 3, 5, 5))


def test_wrong_rank_at_run_time_names_the_expected_shape():
    q = fxqbn.convert(observed_chain())
    with pytest.raises(fxqbn.FxqbnError, match=r"expects input of shape \(N, C, H, W\), got \(4, 5, 5\)"):
        q(torch.randn(4, 5, 5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_non_float32_inputs_to_a_converted_model_are_refused(dtype):
    q = fxqbn.convert(observed_chain())
    with pytest.raises(fxqbn.FxqbnError, match=rf"takes float32 CPU tensors, got {dtype} on cpu"):
        q(torch.randn(2, 4, 5, 5, dtype=dtype))


@pytest.mark.parametrize("convert_model", [lambda m: m.double(), lambda m: m.half()])
def test_non_float32_models_are_refused_at_prepare(convert_model):
    model = convert_model(randomize_bn(Chain()).eval())
    dtype = model.bn1.weight.dtype
    with pytest.raises(fxqbn.FxqbnError, match=rf"BatchNorm 'bn1' holds {dtype} statistics on cpu.*model.float\(\).cpu\(\)"):
        fxqbn.prepare(model, (torch.randn(2, 4, 5, 5, dtype=dtype),))


def test_meta_tensors_are_refused_at_prepare():
    model = Chain().eval().to("meta")
    with pytest.raises(fxqbn.FxqbnError, match=r"BatchNorm 'bn1' holds torch.float32 statistics on meta"):
        fxqbn.prepare(model, (torch.randn(2, 4, 5, 5, device="meta"),))


class FunctionalChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        return nn.functional.batch_norm(x, self.mean, self.var)


def test_example_inputs_the_model_rejects():
    # Models calling F.batch_norm run once on example_inputs at prepare (the kernel depends on the rank).
    with pytest.raises(fxqbn.FxqbnError, match=r"FunctionalChain failed on example_inputs: RuntimeError[\s\S]*test_guards.py"):
        fxqbn.prepare(FunctionalChain().eval(), (torch.randn(2, 3, 5, 5),))


def test_quantize_module_checks_its_qparams():
    with pytest.raises(fxqbn.FxqbnError, match="scale"):
        qnn.Quantize(math.nan, 0, torch.quint8)


# -- the float -> quantized boundary, the same on every supported torch ----------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from fxqbn import qops  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.quint8, torch.qint8]),
    zero_point=st.integers(0, 255),
    scale=st.floats(1e-4, 10.0),
    huge=st.sampled_from([math.inf, 1e30, 1e10, 3e9]),
    n=st.sampled_from([1, 7, 64, 1000]),
)
def test_values_past_the_code_range_saturate_on_every_torch(dtype, zero_point, scale, huge, n):
    zero_point = zero_point if dtype == torch.quint8 else zero_point - 128
    lo, hi = fxqbn.qparams.DTYPE_RANGES[dtype]
    x = torch.linspace(-3, 3, n)
    x[::3] = huge
    x[1::3] = -huge
    codes = qops.quantize(x, scale, zero_point, dtype).int_repr()
    assert (codes[::3] == hi).all() and (codes[1::3] == lo).all()  # torch 2.14.1 alone gives 0 for some
    inside = torch.ones(n, dtype=torch.bool)
    inside[::3] = inside[1::3] = False
    assert torch.equal(codes[inside], torch.quantize_per_tensor(x[inside], scale, zero_point, dtype).int_repr())


@pytest.mark.parametrize("dtype, zero_point", [(torch.quint8, 128), (torch.quint8, 0), (torch.qint8, 0), (torch.qint8, -100)])
def test_nan_at_the_quantize_boundary_takes_the_highest_code_on_every_torch(dtype, zero_point):
    x = torch.randn(64)
    x[::5] = math.nan
    codes = qops.quantize(x, 0.05, zero_point, dtype).int_repr()
    assert (codes[::5] == fxqbn.qparams.DTYPE_RANGES[dtype][1]).all()  # torch 2.14.1 alone gives 0 for quint8 at 128
    finite = ~torch.isnan(x)
    assert torch.equal(codes[finite], torch.quantize_per_tensor(x[finite], 0.05, zero_point, dtype).int_repr())


def test_the_native_boundary_rounds_ties_as_the_installed_torch_does():
    # docs/bad-input.md: the one place where the two supported torch versions give different codes.
    x = torch.full((64,), 0.19004565)
    expected = {"2.13": 150, "2.14": 149}[".".join(torch.__version__.split(".")[:2])]
    assert (qops.quantize(x, 0.0115179233, 133, torch.quint8).int_repr() == expected).all()


PROBE_ON_FIRST_USE = """
import torch
calls = []
real = torch.quantize_per_tensor
torch.quantize_per_tensor = lambda *args: (calls.append(args), real(*args))[1]
from fxqbn import qops
print(len(calls))
qops.quantize(torch.tensor([1.0, float("nan")]), 0.1, 0, torch.quint8)
print(len(calls) > 1, qops._torch_saturates())
"""


def test_whether_torch_saturates_is_probed_on_the_first_quantize_not_at_import():
    done = subprocess.run([sys.executable, "-c", PROBE_ON_FIRST_USE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    saturates = {"2.13": True, "2.14": False}[".".join(torch.__version__.split(".")[:2])]  # 2.14.1 wraps +inf, NaN to 0
    assert done.stdout.split() == ["0", "True", str(saturates)]
