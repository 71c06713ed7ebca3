"""The user's model never changes, whatever is done to what fxqbn returns; fxqbn's own output,
training-mode BNs and bad statistics are refused where they are first known, naming the module."""

import pickle

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.nn.functional as F
from conftest import assert_unchanged, randomize_bn, snapshot
from torch import nn
from torch.ao.quantization import FakeQuantize, MinMaxObserver, QConfig, QConfigMapping, default_weight_observer

import fxqbn


class CachingBlock(nn.Module):
    """Caches a tensor per device in a dict in forward, as timm's LeViT caches its attention biases."""

    def __init__(self, c=4):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.attention_biases = nn.Parameter(torch.randn(c, 1, 1))
        self.attention_bias_cache = {}

    def forward(self, x):
        key = str(x.device)  # under tracing: the string of a Proxy
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases * 2
        return self.bn(x) + self.attention_bias_cache[key]


class Net(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.block = CachingBlock(c)
        self.bn = nn.BatchNorm2d(c)
        self.register_buffer("mean", torch.rand(c))
        self.register_buffer("var", torch.rand(c) + 0.5)

    def forward(self, x):
        y = F.relu(self.bn(self.block(self.conv(x))))
        return F.batch_norm(y, self.mean, self.var, eps=1e-3)


def batches(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 6, 6, generator=gen) for _ in range(n)]


def net():
    torch.manual_seed(0)
    return randomize_bn(Net()).eval()


def calibrated(model, train=False):
    observed = fxqbn.prepare(model, (batches()[0],), MinMaxObserver)
    if train:
        observed.train()
    with torch.no_grad():
        for x in batches():
            observed(x)
    return observed


def test_nothing_done_to_what_fxqbn_returns_reaches_the_users_model(tmp_path):
    model = net()
    expected = [model(x) for x in batches(2, seed=1)]  # fills the cache, as a user's eval run would
    before = snapshot(model)
    trained = calibrated(model, train=True)  # moves the observed model's BN statistics
    assert not torch.equal(trained.bn.running_mean, model.bn.running_mean)
    with pytest.raises(fxqbn.FxqbnError, match=r"BatchNorm 'block.bn' is in training mode: call \.eval\(\) on the observed model"):
        fxqbn.convert(trained)
    quantized = fxqbn.convert(calibrated(model))
    for _ in range(2):  # compare traces the model: twice, as a second trace met the first's proxies
        fxqbn.compare(model, quantized, batches(2, seed=1))
    fxqbn.save(quantized, tmp_path / "q.pt")
    loaded = fxqbn.load(tmp_path / "q.pt", model, (batches()[0],))
    assert_unchanged(model, before)
    assert all(torch.equal(model(x), y) for x, y in zip(batches(2, seed=1), expected))
    assert torch.equal(loaded(batches()[0]), quantized(batches()[0]))


def test_a_fresh_users_model_keeps_an_empty_cache():
    model = net()
    fxqbn.compare(model, fxqbn.convert(calibrated(model)), batches(1))
    assert model.block.attention_bias_cache == {}


def test_the_observed_model_owns_its_modules():
    model = net()
    observed = calibrated(model)
    owned = {id(t) for t in observed.state_dict(keep_vars=True).values()}
    assert not owned & {id(t) for t in model.state_dict(keep_vars=True).values()}


def test_an_uncopyable_model_is_refused_by_name():
    class Uncopyable(Net):
        def __deepcopy__(self, memo):
            raise TypeError("holds a lock")

    with pytest.raises(fxqbn.FxqbnError, match=r"Uncopyable cannot be copied: TypeError: holds a lock"):
        fxqbn.prepare(Uncopyable().eval(), (batches()[0],))


# -- fxqbn's own output -------------------------------------------------------------------------


def converted():
    return fxqbn.convert(calibrated(net()))


@pytest.mark.parametrize(
    "build, message",
    [
        (converted, r"this model was already converted by fxqbn: pass the float model"),
        (lambda: pickle.loads(pickle.dumps(converted())), r"this model was already converted by fxqbn"),
        (lambda: nn.Sequential(nn.Identity(), converted()), r"this model \(module '1'\) was already converted"),
        (lambda: nn.Sequential(fxqbn.nn.BatchNorm2d(4)), r"this model \(module '0'\) was already converted"),
        (lambda: calibrated(net()), r"this model was already prepared by fxqbn: calibrate it"),
    ],
    ids=["converted", "unpickled", "nested", "quantized-module", "prepared"],
)
def test_prepare_refuses_fxqbn_output(build, message):
    with pytest.raises(fxqbn.FxqbnError, match=message):
        fxqbn.prepare(build(), (batches()[0],))


# -- statistics known at prepare ------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, change, message",
    [
        ("bn", lambda bn: bn.running_var.__setitem__(1, float("nan")), r"BatchNorm 'bn' has non-finite running_var\[1\] = nan"),
        ("bn", lambda bn: bn.running_var.__setitem__(2, -1.0), r"BatchNorm 'bn' has negative running_var\[2\] = -1.0"),
        ("bn", lambda bn: bn.running_mean.__setitem__(0, float("inf")), r"'bn' has non-finite running_mean\[0\] = inf"),
        ("block.bn", lambda bn: bn.weight.__setitem__(3, float("nan")), r"'block.bn' has non-finite weight\[3\] = nan"),
        ("block.bn", lambda bn: bn.bias.__setitem__(0, float("-inf")), r"'block.bn' has non-finite bias\[0\] = -inf"),
        ("block.bn", lambda bn: (bn.running_var.__setitem__(2, 0.0), setattr(bn, "eps", 0.0)),
         r"'block.bn' has running_var \+ eps <= 0 at channel 2 \(eps = 0.0\): the channel would divide by zero; use eps > 0"),
        ("", lambda m: m.var.__setitem__(1, -2.0), r"BatchNorm 'batch_norm' has negative running_var\[1\] = -2.0"),
    ],
)
def test_bad_statistics_are_refused_at_prepare_naming_module_and_channel(where, change, message):
    model = net()
    with torch.no_grad():
        change(model.get_submodule(where))
    before = snapshot(model)
    with pytest.raises(fxqbn.FxqbnError, match=message):
        fxqbn.prepare(model, (batches()[0],), MinMaxObserver)
    assert_unchanged(model, before)


def test_bad_statistics_of_a_bn_left_float_are_not_refused():
    model = net()
    with torch.no_grad():
        model.bn.running_var[0] = -1.0
    observed = fxqbn.prepare(model, (batches()[0],), QConfigMapping().set_global(MinMaxObserver).set_module_name("bn", None))
    assert "excluded by qconfig" in {s.module: s.reason for s in observed.meta["fxqbn_prepared"].skips}["bn"]


# -- QAT observers ------------------------------------------------------------------------------------


def test_an_uncalibrated_fake_quantize_is_refused_like_an_idle_observer():
    observed = fxqbn.prepare(net(), (batches()[0],), FakeQuantize.with_args(observer=MinMaxObserver))
    with pytest.raises(fxqbn.FxqbnError, match=r"observers never saw data for BatchNorm .*'block.bn'.*run calibration"):
        fxqbn.convert(observed)


def test_a_calibrated_fake_quantize_converts_with_its_observers_qparams_and_range():
    observed = calibrated_fq = fxqbn.prepare(net(), (batches()[0],), FakeQuantize.with_args(observer=MinMaxObserver))
    with torch.no_grad():
        for x in batches():
            calibrated_fq(x)
    fake_quant = observed.fxqbn_observer_0
    scale, zero_point = fake_quant.activation_post_process.calculate_qparams()
    row = fxqbn.get_report(fxqbn.convert(observed)).rows[0]
    assert (row.input_scale, row.input_zero_point) == (scale.item(), zero_point.item())
    assert row.input_min == fake_quant.activation_post_process.min_val.item()


# -- torch.ao's fused modules ----------------------------------------------------------------------------


class Fused(nn.Module):
    def __init__(self):
        super().__init__()
        self.bnrelu = nni.BNReLU2d(nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.bnrelu(x))


@pytest.mark.parametrize("fused_entry", [None, "float"], ids=["no-fused-entry", "fused-entry-None"])
def test_a_fused_bnrelu_takes_the_qconfig_of_its_batchnorm_type(fused_entry):
    qconfig = QConfig(activation=MinMaxObserver.with_args(dtype=torch.qint8), weight=default_weight_observer)
    mapping = QConfigMapping().set_object_type(nn.BatchNorm2d, qconfig)  # global None: nothing else
    if fused_entry == "float":
        mapping.set_object_type(nni.BNReLU2d, None)  # torch.ao: the component's entry wins
    observed = fxqbn.prepare(randomize_bn(Fused()).eval(), (torch.randn(2, 4, 5, 5),), mapping)
    with torch.no_grad():
        observed(torch.randn(2, 4, 5, 5))
    rows = {row.module: row for row in fxqbn.get_report(fxqbn.convert(observed)).rows}
    assert (rows["bnrelu"].status, rows["bnrelu"].pattern, rows["bnrelu"].dtype) == ("rewritten", "BNReLU2d", "qint8")
    assert (rows["bn"].status, rows["bn"].dtype) == ("rewritten", "qint8")


def test_skipping_a_batchnorm_type_skips_the_fused_modules_made_of_it():
    observed = fxqbn.prepare(randomize_bn(Fused()).eval(), (torch.randn(2, 4, 5, 5),), skip=[nn.BatchNorm2d])
    assert {s.module for s in observed.meta["fxqbn_prepared"].skips} == {"bnrelu", "bn"}


def test_an_uncalibrated_torch_ao_qat_graph_is_refused_like_an_idle_one():
    from torch.ao.quantization import MovingAverageMinMaxObserver, default_weight_fake_quant
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    activation = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)

    model = randomize_bn(Fused()).train()
    mapping = QConfigMapping()
    for kind in (nn.BatchNorm2d, nn.ReLU, nni.BNReLU2d):  # torch.ao wants one qconfig for a fused module's parts
        mapping.set_object_type(kind, QConfig(activation=activation, weight=default_weight_fake_quant))
    observed = prepare_qat_fx(model, mapping, (torch.randn(2, 4, 5, 5),)).eval()
    with pytest.raises(fxqbn.FxqbnError, match=r"observers never saw data for BatchNorm 'bn', 'bnrelu'"):
        fxqbn.convert(observed)
