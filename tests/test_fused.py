"""fxqbn.fused: bit-exact with the installed torch's quantized ops (quantize, dequantize, every BN
pattern), with the C kernels and with the pure-torch kernels (the ``kernels`` fixture runs each test both ways)."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from conftest import randomize_bn
from torch import nn

from fxqbn import ckernels

import fxqbn
from fxqbn import fused, fused_io, qops
from fxqbn.fused import FusedBatchNorm
from fxqbn.qparams import DTYPE_RANGES, QParams

DTYPES = [torch.quint8, torch.qint8]
KERNELS = ["c", "torch"] if ckernels.EXT is not None else ["torch"]


@pytest.fixture(autouse=True, params=KERNELS)
def kernels(request, monkeypatch):
    """Every test here runs with the C kernels (when built) and with the pure-torch ones."""
    if request.param == "torch":
        monkeypatch.setattr(fused, "EXT", None)
        monkeypatch.setattr(fxqbn.fused_io, "EXT", None)
        monkeypatch.setattr(ckernels, "WHY_NOT", "FXQBN_NO_EXT is set")  # chosen: no warning
    return request.param
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (12,), 2: (4, 6), 3: (2, 3, 4)}
CL = {4: torch.channels_last, 5: torch.channels_last_3d}  # rank -> channels-last format


def layouts(x):
    """The same values as contiguous, channels-last (4-d/5-d), strided (non-dense) and odd-sized tensors."""
    yield "contiguous", x
    if x.dim() in CL:
        yield "channels_last", x.contiguous(memory_format=CL[x.dim()])
    yield "strided", x.transpose(0, -1).contiguous().transpose(0, -1)[..., 1:]
    yield "odd_numel", x.flatten()[:-1]


def random_qparams(gen, dtype):
    lo, hi = DTYPE_RANGES[dtype]
    scale = float(torch.exp(torch.randn(1, generator=gen, dtype=torch.float64) * 2) * 0.05)  # not float32-exact
    if torch.rand(1, generator=gen) < 0.5:
        scale = float(torch.tensor(scale, dtype=torch.float32))  # what observers produce
    return QParams(scale, int(torch.randint(lo, hi + 1, (1,), generator=gen)), dtype)


def floats_with_ties(gen, qp, shape):
    """Values k/scale +- 0 or 1 float32 ulp from the rounding ties, mixed with ordinary and extreme values."""
    scale = torch.tensor(qp.scale, dtype=torch.float32)
    k = torch.randint(-300, 300, shape, generator=gen).float() + 0.5
    ties = k * scale
    ties = torch.where(torch.rand(shape, generator=gen) < 0.3, torch.nextafter(ties, torch.tensor(1e30)), ties)
    ties = torch.where(torch.rand(shape, generator=gen) < 0.3, torch.nextafter(ties, torch.tensor(-1e30)), ties)
    plain = torch.randn(shape, generator=gen) * scale * 100
    x = torch.where(torch.rand(shape, generator=gen) < 0.6, ties, plain)
    x.view(-1)[:5] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30])
    return x


# -- boundaries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_and_dequantize_match_torch_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(40):
        qp = random_qparams(gen, dtype)
        for name, x in layouts(floats_with_ties(gen, qp, (4, 6, 5, 8))):
            ours = fused.quantize(x, qp.scale, qp.zero_point, dtype)
            theirs = qops.quantize(x, qp.scale, qp.zero_point, dtype)
            assert ours.dtype == fused.integer_dtype(dtype) and ours.shape == x.shape
            assert torch.equal(ours, theirs.int_repr()), name
            assert torch.equal(fused.dequantize(ours, qp.scale, qp.zero_point), qops.dequantize(theirs)), name
            checked += x.numel()
    assert checked > 100_000


def test_quantize_keeps_the_memory_format():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    q = fused.quantize(x, 0.1, 3, torch.quint8)
    assert q.is_contiguous(memory_format=torch.channels_last) and not q.is_contiguous()
    assert fused.dequantize(q, 0.1, 3).is_contiguous(memory_format=torch.channels_last)


def test_boundaries_refuse_what_they_cannot_take():
    with pytest.raises(fxqbn.FxqbnError, match="quint8 or torch.qint8, got torch.qint32"):
        fused.quantize(torch.randn(4), 0.1, 0, torch.qint32)
    with pytest.raises(fxqbn.FxqbnError, match="expects a float tensor, got torch.int64"):
        fused.quantize(torch.arange(4), 0.1, 0, torch.quint8)
    with pytest.raises(fxqbn.FxqbnError, match="expects uint8 or int8 codes, got torch.float32"):
        fused.dequantize(torch.randn(4), 0.1, 0)


# -- the BN map ------------------------------------------------------------------------------------


def every_code(dtype, channels, spatial, gen):
    """(256, C, *spatial) codes in which every channel sees every code (in a shuffled order)."""
    lo, hi = DTYPE_RANGES[dtype]
    order = torch.stack([torch.randperm(256, generator=gen) for _ in range(channels)], dim=1) + lo
    x = order.view(256, channels, *([1] * len(spatial))).expand(256, channels, *spatial)
    x = x + torch.randint(0, 2, x.shape, generator=gen) * 0  # a dense copy
    return x.to(fused.integer_dtype(dtype))


def native(bn, x_codes, qin, qout, dim, relu):
    xq = torch._make_per_tensor_quantized_tensor(x_codes.contiguous(), qin.scale, qin.zero_point)
    weight = bn.weight.detach() if bn.affine else torch.ones(bn.num_features)
    bias = bn.bias.detach() if bn.affine else torch.zeros(bn.num_features)
    out = qops.batch_norm(xq, weight, bias, bn.running_mean, bn.running_var, bn.eps, qout.scale, qout.zero_point, dim, relu)
    return out.int_repr()


def random_bn(dim, channels, gen):
    bn = BN[dim](channels, eps=[1e-5, 1e-3, 0.1][int(torch.randint(0, 3, (1,), generator=gen))]).eval()
    mag = float(torch.exp(torch.randn(1, generator=gen)))
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=gen) * mag)
        bn.bias.copy_(torch.randn(channels, generator=gen) * mag * 3)
        bn.running_mean.copy_(torch.randn(channels, generator=gen) * 2)
        bn.running_var.copy_(torch.rand(channels, generator=gen) * 2 * mag + 1e-4)
    return bn


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_every_code_of_every_channel_matches_the_native_kernel(dim, dtype, relu):
    gen = torch.Generator().manual_seed(dim * 10 + relu)
    checked = 0
    for channels in (1, 3, 8, 12, 36, 64, 100):  # below, at and past 32 (the native op's and the C kernel's vector width)
        bn = random_bn(dim, channels, gen)
        qin, qout = random_qparams(gen, dtype), random_qparams(gen, dtype)
        module = FusedBatchNorm.from_bn(bn, dim, relu, qin, qout)
        codes = every_code(dtype, channels, SPATIAL[dim], gen)
        expected = native(bn, codes, qin, qout, dim, relu)
        for name, x in layouts(codes):
            if name != "odd_numel":
                assert torch.equal(module(x), expected[..., 1:] if name == "strided" else expected), (channels, name)
                checked += x.numel()
        if dim == 1:  # (N, C) input
            flat = every_code(dtype, channels, (), gen)
            assert torch.equal(module(flat), native(bn, flat, qin, qout, dim, relu))
    assert checked > 500_000


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_round_half_to_even(dtype):
    """alpha = 1/2 exactly: half the codes land on .5; odd and even output zero points."""
    bn = nn.BatchNorm2d(4, eps=0.0).eval()
    with torch.no_grad():
        bn.running_var.fill_(1.0)
        bn.bias.copy_(torch.tensor([0.0, 0.25, -0.5, 1.5]))
    gen = torch.Generator().manual_seed(3)
    lo, _ = DTYPE_RANGES[dtype]
    for zin, zout in ((lo + 100, lo + 7), (lo + 101, lo + 120), (lo + 128, lo + 1)):
        qin, qout = QParams(0.1, zin, dtype), QParams(0.2, zout, dtype)
        assert float(fused.fold(bn, qin, qout)[0][0]) == 0.5
        codes = every_code(dtype, 4, (2, 2), gen)
        for relu in (False, True):
            assert torch.equal(FusedBatchNorm.from_bn(bn, 2, relu, qin, qout)(codes), native(bn, codes, qin, qout, 2, relu))


@pytest.mark.parametrize("dtype", DTYPES)
def test_table_mode_equals_the_native_kernel(dtype):
    gen = torch.Generator().manual_seed(5)
    bn = random_bn(2, 12, gen)
    qin, qout = random_qparams(gen, dtype), random_qparams(gen, dtype)
    module = FusedBatchNorm.from_bn(bn, 2, True, qin, qout, kernel="table")
    assert module.mode == "table"
    codes = every_code(dtype, 12, (2, 3), gen)
    for name, x in layouts(codes):
        if name in ("contiguous", "channels_last"):
            assert torch.equal(module(x), native(bn, codes, qin, qout, 2, True)), name


def test_output_memory_format_follows_the_input():
    module = FusedBatchNorm.from_bn(randomize_bn(nn.BatchNorm2d(8)).eval(), 2, False,
                                    QParams(0.1, 128, torch.quint8), QParams(0.1, 128, torch.quint8))
    x = torch.randint(0, 256, (2, 8, 4, 4), dtype=torch.uint8)
    assert module(x).is_contiguous()
    y = module(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, module(x))


def test_affine_false_and_repr():
    bn = randomize_bn(nn.BatchNorm3d(4, affine=False)).eval()
    qin, qout = QParams(0.05, 10, torch.quint8), QParams(0.03, 20, torch.quint8)
    module = FusedBatchNorm.from_bn(bn, 3, True, qin, qout)
    codes = every_code(torch.quint8, 4, (1, 2, 2), torch.Generator().manual_seed(1))
    assert torch.equal(module(codes), native(bn, codes, qin, qout, 3, True))
    assert repr(module) == "FusedBNReLU3d(4, quint8, mode=affine, input=(0.05, 10), output=(0.03, 20))"


def test_bad_input_and_bad_statistics_are_refused():
    bn = nn.BatchNorm2d(4).eval()
    qp = QParams(0.1, 0, torch.quint8)
    module = FusedBatchNorm.from_bn(bn, 2, False, qp, qp)
    with pytest.raises(fxqbn.FxqbnError, match=r"expects torch.uint8 codes of torch.quint8 input, got torch.float32.*fused.quantize"):
        module(torch.randn(2, 4, 3, 3))
    with pytest.raises(fxqbn.FxqbnError, match=r"got torch.quint8"):
        module(torch.quantize_per_tensor(torch.randn(2, 4, 3, 3), 0.1, 0, torch.quint8))
    with pytest.raises(fxqbn.FxqbnError, match=r"expects input of shape \(N, C, H, W\), got \(2, 4, 3\)"):
        module(torch.zeros(2, 4, 3, dtype=torch.uint8))
    with pytest.raises(fxqbn.FxqbnError, match=r"has 4 channels, got input of shape \(2, 5, 3, 3\) with 5 channels"):
        module(torch.zeros(2, 5, 3, 3, dtype=torch.uint8))
    broken = nn.BatchNorm2d(4, eps=0.0).eval()
    broken.running_var.zero_()
    with pytest.raises(fxqbn.FxqbnError, match=r"running_var \+ eps <= 0 at channel 0"):
        FusedBatchNorm.from_bn(broken, 2, False, qp, qp)
    with pytest.raises(fxqbn.FxqbnError, match="track_running_stats=False"):
        FusedBatchNorm.from_bn(nn.BatchNorm2d(4, track_running_stats=False), 2, False, qp, qp)




# -- exactness traps, clamps, any shape --------------------------------------------------------------


def test_huge_alpha_channels_follow_the_native_op_through_the_table(kernels):
    """KERNEL_FACTS: with |alpha * v + beta| >= 2^31 the native op clips to 2147483520 and adds the zero
    point in int32: code 0 (wrapped) for zero points >= 128, 255 below. Neither fast kernel follows
    both (the torch one saturates, the C one converts out-of-range to INT32_MIN), so each runs the table
    in such channels for one of the cases, and every code still equals the native op's."""
    c = 40  # the native op's vector path covers channels 0..31, its scalar tail 32..39
    bn = nn.BatchNorm2d(c, eps=0.0).eval()
    huge = torch.arange(c) % 3 == 0
    with torch.no_grad():
        bn.weight.copy_(torch.where(huge, torch.tensor(1e11), torch.linspace(0.5, 2, c)))
        bn.bias.copy_(torch.linspace(-1, 1, c))
    gen, ran_table = torch.Generator().manual_seed(2), False
    for zout in (100, 128, 200):
        qin, qout = QParams(0.05, 128, torch.quint8), QParams(0.05, zout, torch.quint8)
        module = FusedBatchNorm.from_bn(bn, 2, False, qin, qout)
        alpha, beta = fused.fold(bn, qin, qout)
        affine = fused.bn_formula(torch.arange(256, dtype=torch.uint8), alpha[:, None], beta[:, None], 128.0, zout, 0, 255)
        differs = (affine != module.table.to(torch.int32)).any(dim=1)
        assert not bool(differs[~huge].any()) and bool(differs[huge].all()) == (zout >= 128)  # the trap is there
        if kernels == "c":  # per channel (the torch kernel falls back for the whole module)
            assert set(module.table_channels) <= set(huge.nonzero().flatten().tolist())
        ran_table |= bool(module.table_channels)
        codes = every_code(torch.quint8, c, (3, 5), gen)
        expected = native(bn, codes, qin, qout, 2, False)
        for name, x in layouts(codes):
            if name != "odd_numel":
                assert torch.equal(module(x), expected[..., 1:] if name == "strided" else expected), (zout, name)
    assert ran_table


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_code_clamp_is_the_native_op_clamped(dtype):
    gen = torch.Generator().manual_seed(4)
    bn = random_bn(2, 20, gen)
    qin, qout = random_qparams(gen, dtype), random_qparams(gen, dtype)
    lo, hi = DTYPE_RANGES[dtype]
    codes = every_code(dtype, 20, (2, 3), gen)
    for relu in (False, True):
        module = FusedBatchNorm.from_bn(bn, 2, relu, qin, qout, clamp=(lo + 30, hi - 40))
        expected = native(bn, codes, qin, qout, 2, relu).clamp(lo + 30, hi - 40)
        for name, x in layouts(codes):
            if name in ("contiguous", "channels_last"):
                assert torch.equal(module(x), expected), (relu, name)
    with pytest.raises(fxqbn.FxqbnError, match=r"clamp must be two codes lo <= hi within"):
        FusedBatchNorm.from_bn(bn, 2, False, qin, qout, clamp=(hi, lo))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dim=st.sampled_from([1, 2, 3]), channels=st.integers(1, 300), dtype=st.sampled_from(DTYPES), relu=st.booleans(),
    batch=st.integers(1, 3), size=st.integers(1, 9), layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    seed=st.integers(0, 2**31),
)
def test_any_shape_and_layout_matches_the_native_op(dim, channels, dtype, relu, batch, size, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = random_bn(dim, channels, gen)
    qin, qout = random_qparams(gen, dtype), random_qparams(gen, dtype)
    module = FusedBatchNorm.from_bn(bn, dim, relu, qin, qout)
    lo, hi = DTYPE_RANGES[dtype]
    spatial = {1: (size,), 2: (size, 3), 3: (2, size, 2)}[dim]
    x = torch.randint(lo, hi + 1, (batch, channels, *spatial), generator=gen).to(fused.integer_dtype(dtype))
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    out = module(x)
    assert torch.equal(out, native(bn, x, qin, qout, dim, relu))
    assert out.movedim(1, -1).is_contiguous() if layout == "channels_last" else out.is_contiguous()


def test_threads_inside_and_around_the_kernels_give_the_same_codes():
    import threading

    gen = torch.Generator().manual_seed(9)
    bn = random_bn(2, 16, gen)
    qin, qout = random_qparams(gen, torch.quint8), random_qparams(gen, torch.quint8)
    module = FusedBatchNorm.from_bn(bn, 2, True, qin, qout)
    x = torch.randint(0, 256, (8, 16, 160, 160), generator=gen, dtype=torch.uint8)  # 3.3M codes: split over 3 threads
    expected = native(bn, x, qin, qout, 2, True)
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(module(x), expected)
            assert torch.equal(module(x.contiguous(memory_format=torch.channels_last)), expected)
    finally:
        torch.set_num_threads(before)
    results = [None] * 8

    def work(i):
        results[i] = [module(x[i % 4 :]) for _ in range(5)]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for i, outs in enumerate(results):
        assert all(torch.equal(o, expected[i % 4 :]) for o in outs), i


# -- boundaries: the installed torch's rounding --------------------------------------------------------


def test_the_rounding_probe_tells_the_two_torch_roundings_apart():
    """KERNEL_FACTS' example: 150 with torch 2.13's fma rounding, 149 with 2.14.1's."""
    r = fused.rounding()
    assert r is not None
    x = torch.full((64,), 0.19004565)
    theirs = qops.quantize(x, 0.0115179233, 133, torch.quint8).int_repr()
    assert torch.equal(fused.quantize(x, 0.0115179233, 133, torch.quint8), theirs)
    other = fused.Rounding(not r.mul_first, r.inv_in_f64)
    got = fxqbn.fused_io.quantize_formula(x, other.inverse(0.0115179233), 133, 0, 255, other.mul_first, torch.uint8)
    assert not torch.equal(got, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_inputs_with_inf_nan_and_huge_values_quantize_as_torch(dtype):
    gen = torch.Generator().manual_seed(6)
    qp = random_qparams(gen, dtype)
    x = floats_with_ties(gen, qp, (2_300_000,))  # split over 2 threads
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e10, -1e30, 3e9])
    spots = torch.randint(0, x.numel(), (50,), generator=gen)
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for data in (x, x.clone().index_put_((spots,), special.repeat(9)[:50])):
                theirs = qops.quantize(data, qp.scale, qp.zero_point, dtype).int_repr()
                assert torch.equal(fused.quantize(data, qp.scale, qp.zero_point, dtype), theirs)
                assert torch.equal(fused.dequantize(theirs, qp.scale, qp.zero_point), qops.dequantize(qops.from_codes(theirs, qp.scale, qp.zero_point)))
    finally:
        torch.set_num_threads(before)


def test_dequantize_falls_back_to_torch_where_the_fast_path_would_differ(monkeypatch):
    fast = fxqbn.fused_io._fast_dequantize
    monkeypatch.setattr(fxqbn.fused_io, "_fast_dequantize", lambda *args: torch.nextafter(fast(*args), torch.tensor(1e30)))
    fxqbn.fused_io._dequantize_exact.cache_clear()
    try:
        q = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        assert torch.equal(fused.dequantize(q, 0.1, 3), qops.dequantize(qops.from_codes(q, 0.1, 3)))
        assert not fxqbn.fused_io._dequantize_exact(0.1, 3, torch.uint8)
    finally:
        fxqbn.fused_io._dequantize_exact.cache_clear()


def test_fx_tracing_a_fused_model_records_aten_ops_with_the_same_outputs():
    from torch import fx

    model = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.BatchNorm2d(12)).eval()
    randomize_bn(model)
    observed = fxqbn.prepare(model, (torch.randn(1, 12, 4, 4),))
    with torch.no_grad():
        observed(torch.randn(8, 12, 4, 4))
    q = fxqbn.convert(observed, backend="fused")
    traced = fx.symbolic_trace(q)
    targets = {str(n.target) for n in traced.graph.nodes if n.op in ("call_function", "call_method")}
    assert not any("quantize" in t or "quantized" in t for t in targets), targets
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 12, 5, 6).contiguous(memory_format=layout)
        assert torch.equal(traced(x), q(x))


def test_eight_threads_running_one_fused_model_get_the_same_outputs():
    import threading

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.BatchNorm2d(16))).eval()
    observed = fxqbn.prepare(model, (torch.randn(1, 3, 8, 8),))
    with torch.no_grad():
        observed(torch.randn(8, 3, 8, 8))
    q = fxqbn.convert(observed, backend="fused")
    inputs = [torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        expected = [q(x) for x in inputs]
    results = [None] * 8

    def work(i):
        with torch.no_grad():
            results[i] = [q(inputs[i]) for _ in range(10)]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(torch.equal(out, expected[i]) for i, outs in enumerate(results) for out in outs)


def test_empty_inputs_and_a_bn_without_channels_give_empty_codes():
    qp = QParams(0.1, 3, torch.quint8)
    empty = FusedBatchNorm.from_bn(nn.BatchNorm2d(0).eval(), 2, False, qp, qp)
    assert empty(torch.zeros(2, 0, 3, 3, dtype=torch.uint8)).shape == (2, 0, 3, 3)
    module = FusedBatchNorm.from_bn(randomize_bn(nn.BatchNorm2d(4)).eval(), 2, True, qp, qp)
    out = module(torch.zeros(0, 4, 3, 3, dtype=torch.uint8))
    assert out.shape == (0, 4, 3, 3) and out.dtype == torch.uint8
    assert fused.quantize(torch.zeros(0, 4), 0.1, 3, torch.quint8).shape == (0, 4)
    assert fused.dequantize(torch.zeros(0, 4, dtype=torch.uint8), 0.1, 3).shape == (0, 4)


@pytest.mark.parametrize("mul_first", [False, True], ids=["fma", "mul_first"])
@pytest.mark.parametrize("zero_point", [0, 128, 200])
def test_the_traced_quantize_formula_saturates_as_the_native_boundary(mul_first, zero_point):
    x = torch.tensor([math.inf, math.nan, 1e30, 3e9, -math.inf, -1e30])
    codes = fused_io.quantize_formula(x, 1.0, zero_point, 0, 255, mul_first, torch.uint8)
    assert codes.tolist() == [255, 255, 255, 255, 0, 0]
    assert codes.tolist() == qops.quantize(x, 1.0, zero_point, torch.quint8).int_repr().tolist()


# -- building: refusals, and each check once ---------------------------------------------------------


def test_bad_arguments_are_refused_naming_the_batchnorm_before_the_native_op_sees_them():
    bn = randomize_bn(nn.BatchNorm2d(4)).eval()
    qin, qint8 = QParams(0.1, 10, torch.quint8), QParams(0.1, -100, torch.qint8)  # the native op raises a C++ error on this pair
    with pytest.raises(fxqbn.FxqbnError, match=r"^BatchNorm 'layer1\.bn': input dtype torch.quint8 and output dtype torch.qint8 differ"):
        FusedBatchNorm.from_tensors(bn, 2, False, qin, qint8, name="layer1.bn")
    good = FusedBatchNorm.from_bn(bn, 2, False, qin, qin)
    args = dict(dim=2, alpha=good.alpha, beta=good.beta, table=good.table, input_qparams=qin, output_qparams=qin, bounds=(0, 255))
    cases = [
        (dict(dim=4), r"^BatchNorm 'b': FusedBatchNorm dim must be 1, 2 or 3, got 4"),
        (dict(kernel="lut"), r"^BatchNorm 'b': kernel must be 'auto' or 'table', got 'lut'"),
        (dict(output_qparams=qint8), r"^BatchNorm 'b': input dtype torch.quint8 and output dtype torch.qint8 differ"),
        (dict(alpha=torch.full((4,), math.inf)), r"^BatchNorm 'b': the folded constants are not finite .*keep it float"),
        (dict(beta=torch.full((4,), math.nan), saved=True), r"^BatchNorm 'b': its constants alpha / beta are not finite: the file is damaged"),
        (dict(table=good.table[:, :255], saved=True), r"^BatchNorm 'b': its table is \(4, 255\), not \(4, 256\): the file is damaged"),
    ]
    for change, message in cases:
        with pytest.raises(fxqbn.FxqbnError, match=message):
            FusedBatchNorm(**{**args, **change}, name="b")


def test_building_a_module_runs_each_exactness_check_once(kernels, monkeypatch):
    """One pass of the affine formula over every code and one C kernel (checked in each of its paths)
    per module: built from a BN, and rebuilt from a file's tensors, whose table is checked with the same pass."""
    counts = {"formula": 0, "c_kernel": 0}
    formula, c_kernel = fused.affine_codes, fused._CKernel.__init__

    def counted(key, fn):
        def run(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(fused, "affine_codes", counted("formula", formula))
    monkeypatch.setattr(fused._CKernel, "__init__", counted("c_kernel", c_kernel))
    bn, qp = randomize_bn(nn.BatchNorm2d(6)).eval(), QParams(0.05, 128, torch.quint8)
    built = FusedBatchNorm.from_bn(bn, 2, True, qp, qp)
    assert counts == {"formula": 1, "c_kernel": int(kernels == "c")}
    again = FusedBatchNorm(2, built.alpha, built.beta, built.table, qp, qp, built.bounds, relu=True, name="bn", saved=True)
    assert counts == {"formula": 2, "c_kernel": 2 * int(kernels == "c")}
    codes = every_code(torch.quint8, 6, (2, 2), torch.Generator().manual_seed(3))
    assert torch.equal(again(codes), native(bn, codes, qp, qp, 2, True))


@pytest.mark.skipif(ckernels.EXT is None, reason=f"the C kernel's own check, and no C kernels in this process: {ckernels.WHY_NOT}")
@pytest.mark.parametrize("kernels", ["c"], indirect=True)  # the C kernel's own check: not the pure-torch run
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_c_check_names_exactly_the_channels_that_differ_from_the_table(kernels, dtype):
    gen = torch.Generator().manual_seed(5)
    module = FusedBatchNorm.from_bn(random_bn(2, 70, gen), 2, False, random_qparams(gen, dtype), random_qparams(gen, dtype))
    table = module._c.table  # the bytes the kernel is checked against (blocks of 64 channels: 64 and 69 in the second)
    assert module.mode == "affine" and not module._c.mismatches(dtype).any()
    for channel, code in [(0, 0), (63, 255), (64, 17), (69, 128)]:
        kept = table[channel, code].item()
        table[channel, code] = kept ^ 1
        assert module._c.mismatches(dtype).nonzero().flatten().tolist() == [channel], (channel, code)
        table[channel, code] = kept
