"""fxqbn.save / fxqbn.load: data-only files, bit-identical rebuilds, refusals naming what differs."""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, randomize_bn, snapshot
from torch import nn
from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping, default_weight_observer

import fxqbn
from fxqbn import digests, serialize
from fxqbn.report import STATUSES


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
    assert payload["format"] == "fxqbn.quantized" and payload["version"] == 3 and payload["layout"] == "float_io"
    assert payload["inputs"] == [{"tensor": [2, 3, 6, 6], "dtype": "float32"}]
    assert payload["digests"]["tensors"].keys() == payload["state_dict"].keys()
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
    with pytest.raises(fxqbn.FxqbnError, match="format version 99; this fxqbn reads versions 1, 2, 3"):
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
    payload["digests"] = digests.seal(payload)  # edited on purpose: the digests agree, the records do not
    torch.save(payload, path)
    with pytest.raises(fxqbn.FxqbnError, match="is inconsistent: its state_dict's 'bn2.quantize.scale'"):
        fxqbn.load(path, model, (x,))


# -- format 3: the example inputs in the file, old formats, writing -------------------------------

GOLDEN = Path(__file__).parent / "golden"


class FunctionalBN(nn.Module):
    """F.batch_norm on the model's own buffers: its int8 kernel is picked by its input's rank, which only a
    run on example inputs shows. It takes an input of each kind a file stores, nested."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("mean", torch.linspace(-0.3, 0.3, 4))
        self.register_buffer("var", torch.linspace(0.5, 2.0, 4))

    def forward(self, x, pair, extra, scale, flag):
        y = self.conv(x + pair[0] * pair[1] + extra["shift"])
        return F.relu(F.batch_norm(y, self.mean, self.var, training=False)) * scale


def fbn_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 6, 6, generator=gen), (torch.randn(1, 3, 1, 1, generator=gen), torch.tensor(2)),
            {"shift": torch.randn(3, 1, 1, generator=gen)}, 1.5, None)


FBN_SPEC = [
    {"tensor": [2, 3, 6, 6], "dtype": "float32"},
    {"tuple": [{"tensor": [1, 3, 1, 1], "dtype": "float32"}, {"tensor": [], "dtype": "int64"}]},
    {"dict": {"shift": {"tensor": [3, 1, 1], "dtype": "float32"}}},
    {"value": 1.5},
    {"value": None},
]


def converted_fbn(backend="native", model=None, inputs=None):
    model = model if model is not None else FunctionalBN().eval()
    observed = fxqbn.prepare(model, inputs or fbn_inputs(), MinMaxObserver)
    with torch.no_grad():
        observed(*fbn_inputs(1))
    return fxqbn.convert(observed, backend=backend)


@pytest.mark.parametrize("backend", ["native", "fused"])
def test_a_functional_bn_model_loads_from_its_file_alone_with_its_outputs(backend, tmp_path):
    quantized = converted_fbn(backend)
    fxqbn.save(quantized, tmp_path / "fbn.pt")
    assert torch.load(tmp_path / "fbn.pt", weights_only=True)["inputs"] == FBN_SPEC
    loaded = fxqbn.load(tmp_path / "fbn.pt", FunctionalBN())  # no example_inputs: the file's shapes are traced
    assert fxqbn.get_report(loaded) == fxqbn.get_report(quantized)
    with torch.no_grad():
        for seed in (2, 3):
            assert torch.equal(loaded(*fbn_inputs(seed)), quantized(*fbn_inputs(seed)))
    fxqbn.save(loaded, tmp_path / "again.pt")  # the loaded model keeps the inputs for the next save
    assert torch.load(tmp_path / "again.pt", weights_only=True)["inputs"] == FBN_SPEC


def test_a_file_without_the_inputs_a_model_needs_names_load_s_example_inputs(tmp_path):
    fxqbn.save(converted_fbn(), tmp_path / "fbn.pt")
    payload = torch.load(tmp_path / "fbn.pt", weights_only=True)
    payload["inputs"] = None  # as for a model converted from a torch.ao-observed graph
    payload["digests"] = digests.seal(payload)
    torch.save(payload, tmp_path / "none.pt")
    with pytest.raises(fxqbn.FxqbnError, match=r"BatchNorm 'batch_norm' picks its int8 kernel by its input's rank.*none\.pt "
                       r"holds none .*: pass them, fxqbn\.load\(path, model, example_inputs=\(x,\)\)"):
        fxqbn.load(tmp_path / "none.pt", FunctionalBN())
    loaded = fxqbn.load(tmp_path / "none.pt", FunctionalBN(), fbn_inputs(4))
    assert fxqbn.get_report(loaded).rows == fxqbn.load_report(tmp_path / "fbn.pt").rows


class Opaque:
    """An input a file cannot store."""


class WithOpaque(FunctionalBN):
    def forward(self, x, opaque):
        return super().forward(x, (x, 1.0), {"shift": 0.0}, 1.0, None)


class ModuleBNWithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, opaque):
        return self.bn(x)


def test_inputs_a_file_cannot_store_are_refused_where_load_needs_them(tmp_path):
    x = fbn_inputs()[0]
    observed = fxqbn.prepare(WithOpaque().eval(), (x, Opaque()), MinMaxObserver)
    observed(x, Opaque())
    with pytest.raises(fxqbn.FxqbnError, match=r"cannot store the example inputs fxqbn\.prepare was given \(example_inputs\[1\] "
                       r"is a Opaque; a file stores tensors .*needs them for BatchNorm 'batch_norm'"):
        fxqbn.save(fxqbn.convert(observed), tmp_path / "opaque.pt")
    assert not (tmp_path / "opaque.pt").exists()
    model = randomize_bn(ModuleBNWithOpaque()).eval()
    observed = fxqbn.prepare(model, (x, Opaque()), MinMaxObserver)  # a BN module: load needs no inputs
    observed(x, Opaque())
    quantized = fxqbn.convert(observed)
    fxqbn.save(quantized, tmp_path / "module.pt")
    assert torch.load(tmp_path / "module.pt", weights_only=True)["inputs"] is None
    assert torch.equal(fxqbn.load(tmp_path / "module.pt", ModuleBNWithOpaque())(x, None), quantized(x, None))


def test_save_into_a_missing_folder_names_the_folder(saved, tmp_path):
    _, quantized, _ = saved
    with pytest.raises(fxqbn.FxqbnError, match=rf"fxqbn\.save cannot write .*m\.pt: folder {tmp_path}/no/such does not exist"):
        fxqbn.save(quantized, tmp_path / "no" / "such" / "m.pt")
    assert not (tmp_path / "no").exists()
    with pytest.raises(fxqbn.FxqbnError, match=rf"fxqbn\.save cannot write {tmp_path}: {tmp_path} is a folder"):
        fxqbn.save(quantized, tmp_path)


def _old_file_warnings(caught):
    return [w for w in caught if "holds no digests" in str(w.message)]


@pytest.mark.parametrize("backend", ["native", "fused"])
def test_format_2_files_load_with_one_warning_and_their_outputs(backend, tmp_path):
    """Files written by fxqbn before format 3 (tests/golden/format2.py wrote them): no digests, no inputs."""
    from golden.format2 import Format2Model

    path = tmp_path / f"format2_{backend}.pt"  # a name no other test loaded: the warning is said once per file
    shutil.copy(GOLDEN / path.name, path)
    assert torch.load(path, weights_only=True)["version"] == 2
    expected = torch.load(GOLDEN / f"format2_{backend}_io.pt", weights_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(fxqbn.FxqbnError, match=r"BatchNorm 'batch_norm' picks its int8 kernel by its input's rank, which a run on "
                           r"example inputs shows: .*format2_\w+\.pt is fxqbn\.save format 2, written before files held them: "
                           r"pass them, fxqbn\.load\(path, model, example_inputs=\(x,\)\)"):
            fxqbn.load(path, Format2Model())
        loaded = fxqbn.load(path, Format2Model(), (expected["input"],))
        fxqbn.load_report(path)
    assert [str(w.message) for w in _old_file_warnings(caught)] == [
        f"{path} is fxqbn.save format 2, which holds no digests: it loads with its contents checked for consistency, "
        "but damage that stays consistent goes unnoticed. Save it again (fxqbn.save writes format 3) to add them"
    ]
    with torch.no_grad():
        assert torch.equal(loaded(expected["input"]), expected["output"])


def test_a_format_1_file_warns_once(tmp_path):
    from golden.format1 import Format1Model

    path = tmp_path / "format1_native.pt"
    shutil.copy(GOLDEN / path.name, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            fxqbn.load(path, Format1Model())
    assert len(_old_file_warnings(caught)) == 1 and "format 1" in str(_old_file_warnings(caught)[0].message)


def test_a_file_with_digests_is_checked_whatever_its_version_says(saved, tmp_path):
    _, _, path = saved
    payload = torch.load(path, weights_only=True)
    payload["version"] = 2  # one bit of the version, flipped
    torch.save(payload, tmp_path / "v2.pt")
    with pytest.raises(fxqbn.FxqbnError, match=r"v2\.pt is damaged: field 'version' does not match its SHA-256 digest"):
        fxqbn.load(tmp_path / "v2.pt", Zoo())
    del payload["digests"]
    payload["version"] = 3
    torch.save(payload, tmp_path / "v3.pt")
    with pytest.raises(fxqbn.FxqbnError, match=r"v3\.pt is damaged: field 'digests' is missing"):
        fxqbn.load_report(tmp_path / "v3.pt")


def test_check_payload_accepts_every_report_status_and_folded_rows_need_no_qparams(saved):
    _, _, path = saved
    payload = torch.load(path, weights_only=True)
    row = next(row for row in payload["patterns"] if row["status"] == "skipped")
    for status in STATUSES:
        row["status"] = status
        if status != "rewritten":
            serialize.check_payload(payload, "f.pt")
    row["status"] = "fused"
    with pytest.raises(fxqbn.FxqbnError, match=rf"f\.pt is damaged: BatchNorm '{row['module']}' has status 'fused'"):
        serialize.check_payload(payload, "f.pt")


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
