"""Sensitivity (the model's output SQNR with only one BN pattern quantized), keep_float_below / --min-sqnr,
and the warning when a model's output SQNR is under 10 dB.

The oracle of a pattern's sensitivity is a conversion of that one BN alone (``prepare``'s ``skip`` names
every other), run on the held-out batches against the float model.
"""

import inspect
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, randomize_bn, snapshot
from torch import nn

import fxqbn
from fxqbn import cli

BACKENDS = ("native", "fused")


class Outlier(nn.Module):
    """bn1's channel 0 sits 200 above the others; conv2 ignores that channel, and reads the others."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


def plant_outlier(model: nn.Module) -> nn.Module:
    """bn1's channel 0 shifted by 200, a channel conv2 does not read."""
    with torch.no_grad():
        model.bn1.running_mean[0] = -200.0  # a mean shift of 200 on one channel
        model.conv2.weight[:, 0] = 0  # which the next conv does not read
    return model


def outlier() -> nn.Module:
    torch.manual_seed(0)
    return plant_outlier(Outlier().eval())


class Chain(nn.Module):
    """BN+ReLU read directly by BN+ReLU6 (their int8 values meet), then a conv and a plain BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.a, self.b, self.c = nn.BatchNorm2d(6), nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        y = torch.relu(self.a(self.conv(x)))
        y = nn.functional.relu6(self.b(y))
        return self.c(self.head(y))


def chain() -> nn.Module:
    torch.manual_seed(1)
    return randomize_bn(Chain(), seed=1).eval()


def data(n, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 12, 12, generator=gen) * scale for _ in range(n)]


CALIB = data(4, 10)
HELD = data(2, 11)


def observe(model, skip=()):
    observed = fxqbn.prepare(model, (CALIB[0],), skip=list(skip), fold=False)  # the BNs after convs stay BNs
    with torch.no_grad():
        for x in CALIB:
            observed(x)
    return observed


def output_sqnr(model, quantized, batches):
    signal = noise = 0.0
    with torch.no_grad():
        for x in batches:
            f, q = model(x).double(), quantized(x).double()
            signal += float(f.pow(2).sum())
            noise += float((q - f).pow(2).sum())
    return 10 * math.log10(signal / noise)


def alone(model, name, backend, batches):
    """The oracle: the model's output SQNR on ``batches`` with only BN ``name`` converted."""
    others = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and n != name]
    return output_sqnr(model, fxqbn.convert(observe(model, others), backend=backend), batches)


def rows(quantized):
    return {row.module: row for row in fxqbn.get_report(quantized).rows}


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_outlier_channel_hides_in_the_row_sqnr_and_shows_in_the_sensitivity(backend):
    model = outlier()
    quantized = fxqbn.convert(observe(model), backend=backend)
    with pytest.warns(fxqbn.AccuracyWarning, match=r"under 10 dB.*most sensitive BN patterns.*: 'bn1' \d+\.\d dB, 'bn2'"):
        report = fxqbn.compare(model, quantized, HELD)
    bn1 = {row.module: row for row in report.rows}["bn1"]
    assert bn1.sqnr_db > 40 and report.summary.model_sqnr_db < 10  # the row looks perfect, the model collapsed
    assert bn1.sensitivity_db == pytest.approx(alone(model, "bn1", backend, HELD), abs=1e-6) and bn1.sensitivity_db < 10
    assert "sens" in str(report).splitlines()[0].split()


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_float_below_keeps_the_sensitive_bn_float_and_the_model_recovers(backend):
    model, observed = outlier(), None
    observed = observe(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxqbn.AccuracyWarning)  # the model after is fine: no warning
        quantized = fxqbn.convert(observed, backend=backend, keep_float_below=20, inputs=HELD)
    report = fxqbn.get_report(quantized)
    bn1, bn2 = rows(quantized)["bn1"], rows(quantized)["bn2"]
    assert (bn1.status, bn2.status) == ("skipped", "rewritten")
    assert bn1.reason == f"kept float: sensitivity {bn1.sensitivity_db:.1f} dB < keep_float_below=20 dB"
    assert bn1.sensitivity_db == pytest.approx(alone(model, "bn1", backend, HELD), abs=1e-6)
    assert bn2.sensitivity_db == pytest.approx(alone(model, "bn2", backend, HELD), abs=1e-6) and bn2.sensitivity_db >= 20
    assert isinstance(quantized.get_submodule("bn1"), nn.BatchNorm2d)  # the float BN, no observer left around it
    assert not [n for n in quantized.graph.nodes if "observer" in n.name]
    s = report.summary
    assert (s.rewritten, s.skipped, s.kept_float, s.keep_float_below) == (1, 1, 1, 20.0)
    assert s.model_sqnr_db == pytest.approx(output_sqnr(model, quantized, HELD), abs=1e-6) and s.model_sqnr_db > 20
    assert "1 rewritten, 1 skipped (1 kept float: sensitivity under 20 dB)" in str(report)
    assert "model output SQNR" in str(report)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sensitivity_of_patterns_with_activations_and_shared_int8_edges_equals_converting_each_alone(backend):
    model = chain()
    quantized = fxqbn.convert(observe(model), backend=backend, inputs=HELD)
    found = rows(quantized)
    assert [found[n].pattern for n in "abc"] == ["BatchNorm2d+ReLU", "BatchNorm2d+ReLU6", "BatchNorm2d"]
    for name in "abc":
        assert found[name].sensitivity_db == pytest.approx(alone(model, name, backend, HELD), abs=1e-6), name
    assert fxqbn.get_report(quantized).summary.kept_float == 0 and fxqbn.get_report(quantized).summary.keep_float_below is None


def test_sensitivity_is_measured_on_the_held_out_inputs_not_the_calibration_ones():
    model = chain()
    held = data(2, 12, scale=3.0)  # wider than calibration: its values clip
    quantized = fxqbn.convert(observe(model), inputs=held)
    on_held, on_calib = alone(model, "a", "native", held), alone(model, "a", "native", CALIB)
    assert abs(on_held - on_calib) > 1  # the two inputs tell apart
    assert rows(quantized)["a"].sensitivity_db == pytest.approx(on_held, abs=1e-6)


def test_a_model_whose_bns_are_all_fine_keeps_nothing_float_and_does_not_warn():
    model = chain()
    observed = observe(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxqbn.AccuracyWarning)
        quantized = fxqbn.convert(observed, keep_float_below=20, inputs=HELD)
        report = fxqbn.compare(model, quantized, HELD)
    assert all(row.status == "rewritten" and row.sensitivity_db > 20 for row in report.rows)
    assert report.summary.kept_float == 0 and report.summary.model_sqnr_db > 20
    assert "(0 kept float: sensitivity under 20 dB)" in str(report)


def test_measuring_changes_neither_the_float_nor_the_observed_model():
    model = outlier()
    observed = observe(model)
    before_model, before_observed = snapshot(model), snapshot(observed)
    plain = fxqbn.convert(observed)
    with pytest.warns(fxqbn.AccuracyWarning):
        measured = fxqbn.convert(observed, inputs=HELD)
    fxqbn.convert(observed, keep_float_below=20, inputs=HELD)
    assert_unchanged(model, before_model)
    assert_unchanged(observed, before_observed)  # its observers passed the held-out values through
    x = HELD[0]
    assert torch.equal(plain(x), measured(x))  # measuring alone converts the same model


def test_compare_measures_sensitivity_when_asked_and_the_report_shows_it():
    model = chain()
    quantized = fxqbn.convert(observe(model))
    plain = fxqbn.compare(model, quantized, HELD)
    assert all(row.sensitivity_db is None for row in plain.rows) and "sens" not in str(plain).splitlines()[0].split()
    measured = fxqbn.compare(model, quantized, HELD, sensitivity=True)
    for row in measured.rows:
        assert row.sensitivity_db == pytest.approx(alone(model, row.module, "native", HELD), abs=1e-6)
    assert [row["sensitivity_db"] for row in json.loads(measured.format("json"))["rows"]] == [r.sensitivity_db for r in measured.rows]
    assert fxqbn.get_report(quantized) == measured


class ReluThenBn(nn.Module):
    """A BN torch.ao does not fold (a ReLU before it), with bn1's outlier channel; conv2 ignores it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn1(torch.relu(self.conv1(x))))


def test_a_prepare_fx_graph_keeps_its_sensitive_bn_float_and_its_observers_untouched():
    from torch.ao.quantization import HistogramObserver, QConfig, QConfigMapping, default_weight_observer, get_default_qconfig
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.manual_seed(0)
    model = plant_outlier(ReluThenBn().eval())
    qconfig = QConfig(activation=HistogramObserver.with_args(reduce_range=False), weight=default_weight_observer)
    mapping = QConfigMapping().set_object_type(nn.BatchNorm2d, qconfig).set_object_type(nn.Conv2d, get_default_qconfig("x86"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's own
        warnings.simplefilter("ignore", UserWarning)
        observed = prepare_fx(model, mapping, (CALIB[0],))
    with torch.no_grad():
        for x in CALIB:
            observed(x)
    before = snapshot(observed)
    with pytest.warns(fxqbn.AccuracyWarning, match="'bn1'"):
        fxqbn.convert(observed, inputs=HELD)
    kept = fxqbn.convert(observed, keep_float_below=20, inputs=HELD)
    assert_unchanged(observed, before)  # the conv observers torch.ao put there (dropped) observed nothing either
    assert rows(kept)["bn1"].reason.startswith("kept float: sensitivity ")
    assert torch.equal(kept(HELD[0]), model(HELD[0]))  # nothing quantized is left: the float model's outputs


def test_a_model_kept_partly_float_saves_and_loads(tmp_path):
    model = outlier()
    quantized = fxqbn.convert(observe(model), keep_float_below=20, inputs=HELD, inplace=True)
    fxqbn.save(quantized, tmp_path / "q.pt")
    loaded = fxqbn.load(tmp_path / "q.pt", model)
    assert fxqbn.get_report(loaded) == fxqbn.get_report(quantized)
    assert torch.equal(loaded(HELD[0]), quantized(HELD[0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_float_below": "20", "inputs": HELD}, r"keep_float_below must be a number of dB \(e.g. keep_float_below=20\), got str '20'"),
        ({"keep_float_below": True, "inputs": HELD}, "keep_float_below must be a number of dB"),
        ({"keep_float_below": math.nan, "inputs": HELD}, "keep_float_below must be a number of dB"),
        ({"keep_float_below": 20}, r"keep_float_below needs held-out inputs .*: pass inputs=\[batch, \.\.\.\]"),
        ({"inputs": []}, "inputs holds no batch"),
        ({"inputs": "x"}, "inputs must be a tensor, a tuple of tensors or a list of batches, got str"),
        ({"inputs": [torch.randn(1, 5, 4, 4)]}, r"held-out batch 0 \(\(1, 5, 4, 4\)\) does not fit the model: RuntimeError"),
    ],
)
def test_bad_arguments_are_refused_naming_what_to_pass(kwargs, message):
    observed = observe(outlier())
    before = snapshot(observed)
    with pytest.raises(fxqbn.FxqbnError, match=message):
        fxqbn.convert(observed, **kwargs)
    assert_unchanged(observed, before)


MODEL_FILE = f"""
import torch
from torch import nn


{inspect.getsource(Outlier)}

{inspect.getsource(plant_outlier)}

def outlier():
    torch.manual_seed(0)
    return plant_outlier(Outlier().eval()), (torch.randn(4, 3, 12, 12),)
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text(MODEL_FILE)
    torch.save([*CALIB, HELD[0]], tmp_path / "calib.pt")  # the last batch is held out
    torch.save([CALIB[0]], tmp_path / "one.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_command_min_sqnr_keeps_the_sensitive_bn_float(work, capsys):
    assert cli.main(["convert", "m.py:outlier", "--no-fold", "--calib", "calib.pt", "--min-sqnr", "20", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["min_sqnr"] == 20.0 and document["calibration"]["batches"] == len(CALIB)
    report = document["report"]
    assert [(r["module"], r["status"]) for r in report["rows"]] == [("bn1", "skipped"), ("bn2", "rewritten")]
    assert report["rows"][0]["reason"].startswith("kept float: sensitivity ")
    assert report["summary"]["kept_float"] == 1 and report["summary"]["model_sqnr_db"] > 20
    assert document["warnings"] == []
    expected = fxqbn.convert(observe(outlier()), keep_float_below=20, inputs=[HELD[0]])  # the command's held-out batch
    assert report["rows"][0]["sensitivity_db"] == pytest.approx(rows(expected)["bn1"].sensitivity_db, abs=1e-6)


def test_command_verify_warns_naming_the_most_sensitive_patterns(work, capsys):
    assert cli.main(["convert", "m.py:outlier", "--no-fold", "--calib", "calib.pt", "--verify"]) == 0
    out, err = capsys.readouterr()
    warning = [line for line in err.splitlines() if line.startswith("fxqbn: warning: ")]
    assert len(warning) == 1 and "under 10 dB" in warning[0], err
    assert "most sensitive BN patterns" in warning[0] and "'bn1' " in warning[0] and "--min-sqnr DB" in warning[0]
    assert "sens" in out.splitlines()[2].split()
    assert cli.main(["convert", "m.py:outlier", "--no-fold", "--calib", "calib.pt", "--verify", "--min-sqnr", "20"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and "kept float: sensitivity" in out


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--min-sqnr", "abc"], 2, "fxqbn convert: error: argument --min-sqnr: 'abc' is not a number of dB (e.g. 20)"),
        (["--min-sqnr", "nan"], 2, "fxqbn convert: error: argument --min-sqnr: 'nan' is not a number of dB"),
        (["--min-sqnr", "20", "--int8", "ao"], 2, "fxqbn convert: error: argument --int8: --min-sqnr is not supported with --int8"),
        (["--min-sqnr", "20", "--calib", "one.pt"], 1, "fxqbn: error: --min-sqnr needs a batch held out of calibration: one.pt holds 1 batch"),
    ],
)
def test_command_min_sqnr_refusals(work, capsys, args, status, message):
    assert cli.main(["convert", "m.py:outlier", "--no-fold", *args]) == status
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message), err


DOCS = Path(__file__).resolve().parent.parent / "docs" / "accuracy-guard.md"


def test_the_docs_python_blocks_and_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """docs/accuracy-guard.md: its ```python blocks run in order (the first three in one namespace, the model
    file as net.py), and its commands convert as it shows (statuses; figures move with the CPU's kernels)."""
    text = DOCS.read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, re.M | re.S)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with pytest.warns(fxqbn.AccuracyWarning):
        for block in blocks[:3]:
            exec(compile(block, str(DOCS), "exec"), namespace)
    assert [r.status for r in namespace["report"].rows] == ["skipped", "rewritten"]
    (tmp_path / "net.py").write_text(blocks[3])
    exec(compile(blocks[4], str(DOCS), "exec"), {})
    capsys.readouterr()
    for command in re.findall(r"^\$ fxqbn (.*)$", text, re.M):
        assert cli.main(command.split()) == 0
        out, err = capsys.readouterr()
        shown = text.split(f"$ fxqbn {command}\n")[1].split("```")[0]
        statuses = lambda lines: [line.split()[:3] for line in lines.splitlines() if line.startswith("bn")]
        assert statuses(out) == statuses(shown)
        assert ("fxqbn: warning: " in err) == ("fxqbn: warning: " in shown)
