"""fxqbn.fused: bit-exact with the quantized op library (quantize, dequantize, every BN pattern), compiled and eager."""

import pytest
import torch
from conftest import randomize_bn
from torch import nn

import fxqbn
from fxqbn import fused, qops
from fxqbn.fused import FusedBatchNorm
from fxqbn.qparams import DTYPE_RANGES, QParams

DTYPES = [torch.quint8, torch.qint8]
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
    for channels in (1, 3, 8, 12, 36, 64):  # < 8, the kernel's vector width, its tail, and > 32
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


def test_a_channel_where_mul_add_differs_from_fma_gets_moved_constants():
    # Found by search: (x - 128) * alpha + beta with two float32 roundings gives one code a different
    # integer than the native fma; moving alpha/beta by a few ulps fixes every code of the channel.
    alpha = torch.tensor([1064146650], dtype=torch.int32).view(torch.float32)
    beta = torch.tensor([-1033517059], dtype=torch.int32).view(torch.float32)
    qin, qout = QParams(0.05, 128, torch.quint8), QParams(0.07, 100, torch.quint8)
    table = fused.native_codes(alpha, beta, qin, qout, False)
    assert int((fused._kernel_codes(alpha, beta, qin, qout, False) != table).sum()) == 1
    module = FusedBatchNorm(2, False, alpha, beta, qin, qout)
    assert module.mode == "affine"
    assert not torch.equal(module.kernel_a, alpha) or not torch.equal(module.kernel_b, beta)
    codes = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(module(codes).view(1, -1).to(torch.int32), table)


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


# -- the compiled path -------------------------------------------------------------------------------


def test_compiled_kernels_equal_eager_and_native(monkeypatch):
    """The one test that compiles (a few seconds per kernel): word kernels (contiguous and
    channels-last), the plain kernel (7x7 spatial) and quantize, against the native ops."""
    monkeypatch.setattr(fused, "COMPILE", True)
    gen = torch.Generator().manual_seed(11)
    bn = random_bn(2, 8, gen)
    for dtype in DTYPES:
        qin, qout = random_qparams(gen, dtype), random_qparams(gen, dtype)
        module = FusedBatchNorm.from_bn(bn, 2, True, qin, qout)
        # (2, 8, 4, 4) first: rows of 4 words, as many as the byte lanes; the kernel compiled for it
        # must not assume that for (4, 8, 8, 8), which reuses it.
        for shape in ((2, 8, 4, 4), (4, 8, 8, 8), (2, 8, 7, 7)):
            x = floats_with_ties(gen, qin, shape)
            for name, xx in layouts(x):
                if name not in ("contiguous", "channels_last"):
                    continue
                codes = fused.quantize(xx, qin.scale, qin.zero_point, dtype)
                xq = qops.quantize(xx, qin.scale, qin.zero_point, dtype)
                assert torch.equal(codes, xq.int_repr()), (dtype, shape, name)
                out = module(codes)
                assert torch.equal(out, native(bn, xq.int_repr(), qin, qout, 2, True)), (dtype, shape, name)
                assert torch.equal(fused.dequantize(out, qout.scale, qout.zero_point), (out.float() - qout.zero_point) * qout.scale)
    assert not fused._compile_failed
    assert fused._compiled_ok >= {fused._bn_words, fused._bn_plain, fused._quantize_words}


def test_a_failed_compile_warns_once_and_runs_eagerly(monkeypatch):
    def no_compiler(fn, args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused, "COMPILE", True)
    monkeypatch.setattr(fused, "_compile", no_compiler)
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_compiled_ok", set())
    monkeypatch.setattr(fused, "_compile_failed", [])
    x = torch.randn(2, 8, 4, 4)
    with pytest.warns(RuntimeWarning, match="compiling the kernels failed.*running them eagerly"):
        codes = fused.quantize(x, 0.05, 128, torch.quint8)
    assert fused._compile_failed == ["RuntimeError: no C++ compiler"]
    assert torch.equal(codes, qops.quantize(x, 0.05, 128, torch.quint8).int_repr())
    module = FusedBatchNorm.from_bn(randomize_bn(nn.BatchNorm2d(8)).eval(), 2, False,
                                    QParams(0.05, 128, torch.quint8), QParams(0.04, 120, torch.quint8))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        out = module(codes)
    monkeypatch.setattr(fused, "COMPILE", False)
    assert torch.equal(out, module(codes))
