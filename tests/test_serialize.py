"""fxqbn.save / fxqbn.load: data-only files, bit-identical rebuilds, refusals naming what differs."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, randomize_bn, snapshot
from torch import nn
from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping, default_weight_observer

import fxqbn
from fxqbn import serialize


class Zoo(nn.Module):
    """Every kind of row: BN+ReLU, a BN called twice, a qint8 BN, skips of three kinds, BN3d, a Dropout."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn1, self.twice, self.signed = nn.BatchNorm2d(c), nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.excluded, self.batch_stats = nn.BatchNorm2d(c), nn.BatchNorm2d(c, track_running_stats=False)
        self.bn1d, self.bn3d = nn.BatchNorm1d(c), nn.BatchNorm3d(c)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv(x)))
        y = self.twice(self.twice(y) * 2)
        y = self.batch_stats(self.excluded(self.signed(y)))
        z = self.bn1d(y.flatten(2)).unflatten(2, y.shape[2:])
        return self.drop(self.bn3d(z.unsqueeze(2)).relu())


QCONFIG = (
    QConfigMapping()
    .set_global(QConfig(activation=MinMaxObserver, weight=default_weight_observer))
    .set_module_name("signed", QConfig(activation=MinMaxObserver.with_args(dtype=torch.qint8), weight=default_weight_observer))
    .set_module_name("excluded", None)
)


def batches(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 6, 6, generator=gen) for _ in range(n)]


def zoo(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(Zoo(), seed).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = zoo()
    observed = fxqbn.prepare(model, (batches()[0],), QCONFIG, fold=False)  # every BN a row of its kind (folds: below)
    with torch.no_grad():
        for x in batches():
            observed(x)
    quantized = fxqbn.convert(observed)
    path = tmp_path_factory.mktemp("saved") / "zoo.pt"
    fxqbn.save(quantized, path)
    return model, quantized, path


def test_the_file_is_plain_data_that_weights_only_load_reads(saved):
    _, quantized, path = saved
    payload = torch.load(path, weights_only=True)

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool, torch.Tensor))

    assert plain(payload)
    assert payload["format"] == "fxqbn.quantized" and payload["version"] == 2
    assert payload["report"] == fxqbn.get_report(quantized).to_dict()
    assert payload["state_dict"].keys() == quantized.state_dict().keys()


def test_load_rebuilds_bit_identical_outputs_and_report_from_a_fresh_model(saved):
    model, quantized, path = saved
    fresh = Zoo()  # other weights, training mode: load takes the architecture only
    before = snapshot(fresh)
    loaded = fxqbn.load(path, fresh)
    assert_unchanged(fresh, before)
    assert loaded.code == quantized.code
    assert fxqbn.get_report(loaded) == fxqbn.get_report(quantized)
    assert [(n, type(m)) for n, m in loaded.named_modules() if n] == [(n, type(m)) for n, m in quantized.named_modules() if n]
    for x in batches(4, seed=1):
        assert torch.equal(loaded(x), quantized(x))
    assert not torch.equal(Zoo().eval()(x), model(x))  # the saved weights were used, not fresh's


def test_report_rows_cover_every_kind_the_file_replays(saved):
    _, quantized, _ = saved
    rows = {(r.node, r.status, r.dtype) for r in fxqbn.get_report(quantized).rows}
    assert {("twice", "rewritten", "quint8"), ("twice_1", "rewritten", "quint8"), ("signed", "rewritten", "qint8"),
            ("excluded", "skipped", ""), ("batch_stats", "skipped", ""), ("bn1d", "rewritten", "quint8"),
            ("bn3d", "rewritten", "quint8")} <= rows


def test_training_flags_are_restored(tmp_path):
    observed = fxqbn.prepare(zoo(), (batches()[0],), QCONFIG)
    with torch.no_grad():
        for x in batches():
            observed(x)
    quantized = fxqbn.convert(observed)
    quantized.drop.train()
    fxqbn.save(quantized, tmp_path / "q.pt")
    loaded = fxqbn.load(tmp_path / "q.pt", Zoo())
    assert loaded.drop.training and not loaded.training
    assert [(n, m.training) for n, m in loaded.named_modules()] == [(n, m.training) for n, m in quantized.named_modules()]


def test_load_report_reads_the_report_alone(saved):
    _, quantized, path = saved
    assert fxqbn.load_report(path) == fxqbn.get_report(quantized)


# -- refusals ------------------------------------------------------------------------------------


class Fewer(Zoo):
    def __init__(self):
        super().__init__()
        del self.signed

    def forward(self, x):
        y = self.twice(self.twice(F.relu(self.bn1(self.conv(x)))) * 2)
        y = self.batch_stats(self.excluded(y))
        return self.drop(self.bn3d(self.bn1d(y.flatten(2)).unflatten(2, y.shape[2:]).unsqueeze(2)).relu())


class Unfused(Zoo):
    def forward(self, x):
        y = self.bn1(self.conv(x))  # no ReLU after bn1
        y = self.twice(self.twice(y) * 2)
        y = self.batch_stats(self.excluded(self.signed(y)))
        return self.drop(self.bn3d(self.bn1d(y.flatten(2)).unflatten(2, y.shape[2:]).unsqueeze(2)).relu())


class OtherForward(Zoo):
    def forward(self, x):
        return super().forward(x) * 3  # same BNs, one more op


class Wider(Zoo):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, padding=2)


@pytest.mark.parametrize(
    "model, message",
    [
        (Fewer, r"the model does not match .*zoo\.pt: BatchNorm 'signed' in the file, not in the model\. Pass the float model"),
        (Unfused, r"BatchNorm 'bn1' \(node 'bn1'\) is BatchNorm2d\+ReLU \(rewritten\) in the file, BatchNorm2d \(rewritten\)"),
        (OtherForward, r"node %(\d+) \('mul_1' from the model\) of the converted graph is `output output \(\('%\d+',\), \{\}\)` in the file and `call_function _operator.mul \(\('%\d+', 3\), \{\}\)` from the model"),
        (Wider, r"tensors do not match .*: 'conv.weight' is \(4, 3, 3, 3\) torch.float32 in the file, \(4, 3, 5, 5\)"),
    ],
    ids=["fewer-bns", "relu-removed", "forward-changed", "tensor-shape"],
)
def test_load_refuses_a_model_that_differs_naming_the_difference(saved, model, message):
    _, _, path = saved
    with pytest.raises(fxqbn.FxqbnError, match=message):
        fxqbn.load(path, model())


def test_load_refuses_files_it_did_not_write(saved, tmp_path):
    _, quantized, path = saved
    whole = tmp_path / "whole.pt"
    torch.save(quantized, whole)  # a pickled GraphModule: loading it would run code
    with pytest.raises(fxqbn.FxqbnError, match=r"whole\.pt: it holds pickled Python objects \(found torch\.fx"):
        fxqbn.load(whole, Zoo())
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.ones(2), tensor)
    with pytest.raises(fxqbn.FxqbnError, match=r"tensor\.pt is not an fxqbn\.save file"):
        fxqbn.load(tensor, Zoo())
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(fxqbn.FxqbnError, match=r"text\.pt: it is not a file written by torch\.save"):
        fxqbn.load_report(tmp_path / "text.pt")
    with pytest.raises(fxqbn.FxqbnError, match=r"missing\.pt: no such file"):
        fxqbn.load(tmp_path / "missing.pt", Zoo())
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(fxqbn.FxqbnError, match="format version 99; this fxqbn reads versions 1, 2"):
        fxqbn.load(tmp_path / "future.pt", Zoo())
    with pytest.raises(fxqbn.FxqbnError, match="expects the float torch.nn.Module, got str"):
        fxqbn.load(path, "Zoo")


def test_save_refuses_what_convert_did_not_make(tmp_path):
    observed = fxqbn.prepare(zoo(), (batches()[0],), QCONFIG)
    for model in (zoo(), observed):
        with pytest.raises(fxqbn.FxqbnError, match="fxqbn.save expects the GraphModule returned by fxqbn.convert"):
            fxqbn.save(model, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_stored_qparams_observer_returns_exactly_what_it_was_given():
    observer = serialize.StoredQParams(torch.qint8)
    observer.qparams = (0.1 + 1e-12, -3)  # not a float32 number: kept exactly
    scale, zero_point = observer.calculate_qparams()
    assert scale.item() == 0.1 + 1e-12 and zero_point.item() == -3
    assert torch.equal(observer(torch.ones(2)), torch.ones(2))


class _NamedLikeABoundary(nn.Module):
    """A user module whose name looks like one of fxqbn's boundaries."""

    def __init__(self) -> None:
        super().__init__()
        self.fxqbn_quantize_0 = nn.Conv2d(3, 3, 1)
        self.bn1 = nn.BatchNorm2d(3)
        self.fxqbn_dequantize_0 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(self.fxqbn_dequantize_0(self.bn1(self.fxqbn_quantize_0(x))))


def _saved_named_like_boundaries(tmp_path, backend):
    torch.manual_seed(0)
    model = randomize_bn(_NamedLikeABoundary()).eval()
    x = torch.randn(2, 3, 5, 5)
    observed = fxqbn.prepare(model, (x,), MinMaxObserver, fold=False)  # both BNs between float convs
    with torch.no_grad():
        observed(x)
    quantized = fxqbn.convert(observed, backend=backend)
    path = tmp_path / "m.pt"
    fxqbn.save(quantized, path)
    return model, x, quantized, path


@pytest.mark.parametrize("backend", ["native", "fused"])
def test_boundaries_are_found_by_the_conversion_record_not_by_name(tmp_path, backend):
    model, x, quantized, path = _saved_named_like_boundaries(tmp_path, backend)
    loaded = fxqbn.load(path, model, (x,))
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    assert isinstance(loaded.fxqbn_quantize_0, nn.Conv2d) and isinstance(loaded.fxqbn_dequantize_0, nn.Conv2d)


def test_a_boundary_the_records_disagree_with_is_refused_beside_user_modules_of_such_names(tmp_path):
    model, x, _, path = _saved_named_like_boundaries(tmp_path, "native")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["bn2.quantize.scale"] = payload["state_dict"]["bn2.quantize.scale"] * 2  # bn2: a FloatIO
    torch.save(payload, path)
    with pytest.raises(fxqbn.FxqbnError, match="'bn2.quantize.scale'"):
        fxqbn.load(path, model, (x,))


# -- folded BNs ----------------------------------------------------------------------------------


def _saved_folded(tmp_path):
    observed = fxqbn.prepare(zoo(), (batches()[0],), QCONFIG)  # folds bn1 into conv
    with torch.no_grad():
        for x in batches():
            observed(x)
    quantized = fxqbn.convert(observed)
    fxqbn.save(quantized, tmp_path / "folded.pt")
    return quantized, tmp_path / "folded.pt"


def test_a_model_with_a_folded_bn_saves_and_loads_bit_identically(tmp_path):
    quantized, path = _saved_folded(tmp_path)
    payload = torch.load(path, weights_only=True)
    assert [(r["module"], r["status"]) for r in payload["patterns"]][0] == ("bn1", "folded")
    loaded = fxqbn.load(path, Zoo())  # fresh weights: the file's folded conv replaces them
    assert fxqbn.get_report(loaded) == fxqbn.get_report(quantized)
    assert not hasattr(loaded, "bn1") and torch.equal(loaded.conv.weight, quantized.conv.weight)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))


class Reused(Zoo):
    def forward(self, x):
        y = self.conv(x)
        return super().forward(x) + y.mean()  # conv called twice: bn1 cannot fold


def test_load_refuses_a_model_whose_saved_fold_no_longer_applies(tmp_path):
    _, path = _saved_folded(tmp_path)
    with pytest.raises(fxqbn.FxqbnError, match=r"BatchNorm 'bn1' \(node 'bn1'\) is BatchNorm2d \(folded\) in the file, "
                       r"BatchNorm2d\+ReLU \(rewritten\) .* \('bn1' not folded: Conv2d 'conv' is called 2 times"):
        fxqbn.load(path, Reused())


def test_a_file_saved_without_folding_loads_without_folding(saved):
    model, quantized, path = saved  # fold=False: bn1 after conv was quantized
    loaded = fxqbn.load(path, model)
    assert [r.status for r in fxqbn.get_report(loaded).rows if r.module == "bn1"] == ["rewritten"]
    assert type(loaded.conv) is nn.Conv2d and torch.equal(loaded.conv.weight, model.conv.weight)
