"""prepare/convert/get_report: refusals, skips, the no-mutation guarantee, report contents."""

import copy

import pytest
import torch
from conftest import assert_unchanged, calls, randomize_bn, snapshot, installed
from torch import nn
from torch.ao.quantization import (
    HistogramObserver,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    QConfig,
    QConfigMapping,
    default_weight_observer,
)

import fxqbn


class Chain(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(c), nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.bn3(self.relu(self.bn2(self.bn1(x)))) + 1


def batches(n=3, shape=(2, 4, 6, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


def converted(model, qconfig=None, data=None):
    data = data or batches()
    observed = fxqbn.prepare(model, (data[0],), qconfig)
    with torch.no_grad():
        for x in data:
            observed(x)
    return fxqbn.convert(observed)


# -- the pipeline --------------------------------------------------------------------------------


def test_chain_hands_quantized_tensors_from_pattern_to_pattern():
    model = randomize_bn(Chain()).eval()
    q = converted(model, MinMaxObserver)
    assert len(calls(q, fxqbn.nn.Quantize)) == 1
    assert len(calls(q, fxqbn.nn.DeQuantize)) == 1
    assert [type(q.get_submodule(n)) for n in ("bn1", "bn2", "bn3")] == [
        fxqbn.nn.BatchNorm2d, fxqbn.nn.BNReLU2d, fxqbn.nn.BatchNorm2d,
    ]
    assert not any("observer" in name for name, _ in q.named_modules())
    q.graph.lint()
    x = batches(seed=1)[0]
    assert (q(x) - model(x)).abs().max() < 0.1


def test_output_qparams_of_one_pattern_are_the_input_qparams_of_the_next():
    q = converted(randomize_bn(Chain()).eval(), MinMaxObserver)
    rows = fxqbn.get_report(q).rows
    for before, after in zip(rows, rows[1:]):
        assert (before.output_scale, before.output_zero_point) == (after.input_scale, after.input_zero_point)


def test_prepare_and_convert_do_not_change_the_model():
    model = randomize_bn(Chain()).eval()
    before = snapshot(model)
    observed = fxqbn.prepare(model, (batches()[0],))
    with torch.no_grad():
        for x in batches():
            observed(x)
    fxqbn.convert(observed)
    assert_unchanged(model, before)
    assert all(type(m) is not fxqbn.nn.BatchNorm2d for m in model.modules())


def test_convert_leaves_the_observed_model_alone_unless_inplace():
    observed = fxqbn.prepare(randomize_bn(Chain()).eval(), (batches()[0],))
    with torch.no_grad():
        for x in batches():
            observed(x)
    code, modules = observed.code, dict(observed.named_modules())
    q = fxqbn.convert(observed)
    assert q is not observed
    assert observed.code == code and dict(observed.named_modules()) == modules
    q_again = fxqbn.convert(observed, inplace=True)
    assert q_again is observed
    x = batches(seed=2)[0]
    assert torch.equal(q(x), q_again(x))


def test_report_travels_with_the_module_and_survives_deepcopy():
    q = converted(randomize_bn(Chain()).eval())
    report = fxqbn.get_report(copy.deepcopy(q))
    assert report == fxqbn.get_report(q)
    assert [(r.node, r.module, r.pattern, r.op, r.status) for r in report.rows] == [
        ("bn1", "bn1", "BatchNorm2d", "quantized::batch_norm2d", "rewritten"),
        ("bn2", "bn2", "BatchNorm2d+ReLU", "quantized::batch_norm2d_relu", "rewritten"),
        ("bn3", "bn3", "BatchNorm2d", "quantized::batch_norm2d", "rewritten"),
    ]
    text = str(report)
    for column in ("BN", "pattern", "status", "in scale@zp", "out scale@zp", "SQNR", "reason"):
        assert column in text.splitlines()[0]
    assert "BatchNorm2d+ReLU" in text and "3 rewritten, 0 skipped" in text


def test_report_qparams_are_the_observers_qparams():
    model = randomize_bn(Chain()).eval()
    data = batches()
    q = converted(model, MinMaxObserver, data)
    obs = MinMaxObserver()
    for x in data:
        obs(x)
    scale, zero_point = obs.calculate_qparams()
    row = fxqbn.get_report(q).rows[0]
    assert row.input_scale == scale.item() and row.input_zero_point == zero_point.item()
    assert row.dtype == "quint8"


def test_bn_called_twice_gets_one_quantized_module_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.bn(x) * 3)

    model = randomize_bn(Twice()).eval()
    q = converted(model, MinMaxObserver)
    rows = fxqbn.get_report(q).rows
    assert [r.status for r in rows] == ["rewritten", "rewritten"]
    assert rows[0].output_scale != rows[1].output_scale
    assert isinstance(installed(q, "bn"), fxqbn.nn.BatchNorm2d) and isinstance(installed(q, "bn_1"), fxqbn.nn.BatchNorm2d)
    x = batches(seed=3)[0]
    assert (q(x) - model(x)).abs().max() < 0.2


# -- qconfig forms -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qconfig, observer_type",
    [
        (None, HistogramObserver),
        (MinMaxObserver, MinMaxObserver),
        (MinMaxObserver.with_args(dtype=torch.qint8), MinMaxObserver),
        (QConfig(activation=MinMaxObserver, weight=default_weight_observer), MinMaxObserver),
        (QConfigMapping().set_global(QConfig(activation=MinMaxObserver, weight=default_weight_observer)), MinMaxObserver),
    ],
)
def test_qconfig_forms_choose_the_observer(qconfig, observer_type):
    observed = fxqbn.prepare(randomize_bn(Chain()).eval(), (batches()[0],), qconfig)
    observers = [m for name, m in observed.named_modules() if name.startswith("fxqbn_observer_")]
    assert len(observers) == 4  # input, then one after each pattern (shared as the next input)
    assert all(type(o) is observer_type for o in observers)


def test_default_observer_is_a_full_range_quint8_histogram():
    observer = fxqbn.DEFAULT_OBSERVER()
    assert isinstance(observer, HistogramObserver)
    assert (observer.dtype, observer.quant_min, observer.quant_max, observer.reduce_range) == (torch.quint8, 0, 255, False)


def test_qconfig_mapping_by_name_type_and_regex():
    qc = QConfig(activation=MinMaxObserver, weight=default_weight_observer)
    mapping = (
        QConfigMapping()
        .set_object_type(nn.BatchNorm2d, qc)
        .set_module_name("bn2", None)
        .set_module_name_regex("bn3", None)
    )
    q = converted(randomize_bn(Chain()).eval(), mapping)
    rows = fxqbn.get_report(q).rows
    assert [r.status for r in rows] == ["rewritten", "skipped", "skipped"]
    assert all("excluded by qconfig" in r.reason for r in rows[1:])
    assert type(q.bn2) is nn.BatchNorm2d and type(q.bn3) is nn.BatchNorm2d


def test_qconfig_mapping_module_name_applies_to_children():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Chain()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.block(x))

    qc = QConfig(activation=MinMaxObserver, weight=default_weight_observer)
    mapping = QConfigMapping().set_global(qc).set_module_name("block", None)
    q = converted(randomize_bn(Outer()).eval(), mapping)
    status = {r.module: r.status for r in fxqbn.get_report(q).rows}
    assert status == {"block.bn1": "skipped", "block.bn2": "skipped", "block.bn3": "skipped", "bn": "rewritten"}


def test_track_running_stats_false_is_skipped_and_stays_float():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.BatchNorm2d(4, track_running_stats=False)
            self.b = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.b(self.a(x))

    model = randomize_bn(M()).eval()
    q = converted(model, MinMaxObserver)
    rows = fxqbn.get_report(q).rows
    assert (rows[0].module, rows[0].status) == ("a", "skipped")
    assert "track_running_stats=False" in rows[0].reason
    assert rows[0].input_scale is None and rows[0].op == ""
    assert type(q.a) is nn.BatchNorm2d and type(installed(q, "b")) is fxqbn.nn.BatchNorm2d
    assert "1 rewritten, 1 skipped" in str(fxqbn.get_report(q))
    assert fxqbn.get_report(q).rows[0].reason in fxqbn.get_report(q).format(width=None)  # nothing wrapped


# -- refusals ------------------------------------------------------------------------------------


def test_training_mode_bn_is_refused_at_prepare():
    model = Chain().train()
    before = snapshot(model)
    with pytest.raises(fxqbn.FxqbnError, match=r"'bn1' is in training mode.*model\.eval\(\)"):
        fxqbn.prepare(model, (batches()[0],))
    assert_unchanged(model, before)


def test_convert_without_calibration_lists_the_modules():
    observed = fxqbn.prepare(randomize_bn(Chain()).eval(), (batches()[0],))
    with pytest.raises(fxqbn.FxqbnError, match=r"never saw data for BatchNorm 'bn1', 'bn2', 'bn3'.*calibration"):
        fxqbn.convert(observed)


@pytest.mark.parametrize(
    "observer, message",
    [
        (PerChannelMinMaxObserver, r"'bn1'.*per_channel_affine.*per-tensor"),
        (PlaceholderObserver.with_args(dtype=torch.float16), r"'bn1'.*torch.float16.*8-bit"),
        (MinMaxObserver.with_args(dtype=torch.qint32), r"'bn1'.*torch.qint32.*8-bit"),
        (MinMaxObserver.with_args(quant_min=0, quant_max=1000), r"'bn1'.*quant range"),
    ],
)
def test_unsupported_activation_observers_are_refused(observer, message):
    with pytest.raises(fxqbn.FxqbnError, match=message):
        fxqbn.prepare(Chain().eval(), (batches()[0],), observer)


def test_bad_qconfig_argument():
    with pytest.raises(fxqbn.FxqbnError, match="qconfig must be"):
        fxqbn.prepare(Chain().eval(), (batches()[0],), "histogram")


def test_untraceable_model_names_the_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.bn(x)
            return x

    with pytest.raises(fxqbn.FxqbnError, match=r"cannot trace Branchy[\s\S]*test_api\.py:\d+: if x\.sum\(\) > 0:"):
        fxqbn.prepare(Branchy().eval(), (batches()[0],))


def test_convert_refuses_what_prepare_did_not_make():
    with pytest.raises(fxqbn.FxqbnError, match="expects the GraphModule returned by fxqbn.prepare"):
        fxqbn.convert(Chain().eval())
    q = converted(randomize_bn(Chain()).eval())
    with pytest.raises(fxqbn.FxqbnError, match="already converted"):
        fxqbn.convert(q)
    with pytest.raises(fxqbn.FxqbnError, match="no fxqbn report"):
        fxqbn.get_report(Chain())


def test_nan_calibration_data_is_refused_naming_the_observer():
    observed = fxqbn.prepare(randomize_bn(Chain()).eval(), (batches()[0],), MinMaxObserver)
    with torch.no_grad(), pytest.raises(fxqbn.FxqbnError, match=r"observer 'fxqbn_observer_0' \(input of BatchNorm 'bn1'.*NaN or infinite"):
        observed(torch.full((2, 4, 6, 6), float("inf")))


def test_non_module_and_bad_example_inputs():
    with pytest.raises(fxqbn.FxqbnError, match="expects a torch.nn.Module"):
        fxqbn.prepare(lambda x: x, (batches()[0],))
    with pytest.raises(fxqbn.FxqbnError, match="example_inputs must be a tuple"):
        fxqbn.prepare(Chain().eval(), {"x": batches()[0]})


def test_converted_model_shares_no_tensor_with_the_float_or_observed_model():
    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.register_buffer("offset", torch.ones(1))

        def forward(self, x):
            return self.bn(self.conv(x) + self.offset) + self.conv(x)  # conv called twice

    model = randomize_bn(WithConv()).eval()
    observed = fxqbn.prepare(model, (batches()[0],))
    with torch.no_grad():
        observed(batches()[0])
    q = fxqbn.convert(observed)
    originals = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not originals & {t.data_ptr() for t in list(q.parameters()) + list(q.buffers())}
    assert sum(isinstance(m, nn.Conv2d) for m in q.modules()) == 1  # one copy for both calls
    x = batches(seed=4)[0]
    expected = q(x)
    with torch.no_grad():
        model.conv.weight.add_(1.0)  # later changes to the float model do not reach the quantized one
    assert torch.equal(q(x), expected)


def test_prepare_refuses_a_model_without_batch_norm_as_the_command_does():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(fxqbn.FxqbnError, match=r"^the model \(Sequential\) holds no BatchNorm: nothing to quantize "
                       r"\(fxqbn quantizes BatchNorm1d/2d/3d, SyncBatchNorm and F.batch_norm"):
        fxqbn.prepare(model, (torch.randn(1, 3, 8, 8),))
    kept = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()  # every BN kept float: still a BN model
    report = fxqbn.get_report(fxqbn.convert(fxqbn.prepare(kept, (torch.randn(1, 3, 8, 8),), skip=["1"])))
    assert [row.status for row in report.rows] == ["skipped"]
