"""fxqbn.pt2e: torchao's PT2E with a correct conv -> BN fold, int8 standalone BNs, a row for every BN."""

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import fxqbn
from fxqbn.comparing import sqnr_db
from tests.conftest import randomize_bn

try:
    from fxqbn import pt2e
    from fxqbn.whole_model import import_pt2e

    torchao_prepare, torchao_convert, X86Quantizer, x86_config = import_pt2e()
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer
    MISSING = ""
except fxqbn.FxqbnError as exc:
    MISSING = str(exc)

pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "-")


class AnnotateNothing(Quantizer if not MISSING else object):
    def annotate(self, model):
        return model

    def validate(self, model):
        pass


class ConvFeedsBnAndResidual(nn.Module):  # ../shared/repro/pt2e_fold.py
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class OneConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x.flip(-1)))


class PreActBlock(nn.Module):
    """A CIFAR-style pre-activation stem and block: the block's BN reads the stem conv, which the shortcut reads too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1)
        self.bn_out, self.drop = nn.BatchNorm2d(16), nn.Dropout(0.2)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv1(torch.relu(self.bn1(x)))
        y = self.conv2(torch.relu(self.bn2(y)))  # conv1 feeds bn2 alone: folds
        return nn.functional.relu6(self.drop(self.bn_out(x + y)))


class Head(nn.Module):
    """Linear -> BN1d folds; Linear -> ReLU -> BN1d and a Linear -> BN1d on 3-d input do not."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(12, 16), nn.BatchNorm1d(16)
        self.fc2, self.bn2 = nn.Linear(16, 8), nn.BatchNorm1d(8)
        self.fc3, self.bn3 = nn.Linear(12, 12), nn.BatchNorm1d(4)

    def forward(self, x):
        a = self.bn2(torch.relu(self.fc2(self.bn1(self.fc1(x[:, 0])))))
        return a.sum(1, keepdim=True) + self.bn3(self.fc3(x)).mean((1, 2)).unsqueeze(1)


class GroupedTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.bn = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2), nn.BatchNorm2d(8)
        self.up1, self.bn1 = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.up(x)).mean() + self.bn1(self.up1(x)).mean((2, 3))


# model -> (input shape, {BN: what the fold does: "folded into X" or a phrase of the reason it stays})
CASES = {
    "residual": (ConvFeedsBnAndResidual, (2, 3, 8, 8), {"bn": "output has 2 users"}),
    "called_twice": (OneConvCalledTwice, (2, 3, 8, 8), {"bn1": "is used by other calls too", "bn2": "is used by other calls too"}),
    "preact": (PreActBlock, (2, 3, 8, 8), {"bn1": "output has 2 users", "bn2": "folded into conv1", "bn_out": "is not a conv / linear"}),
    "head": (Head, (4, 4, 12), {"bn1": "folded into fc1", "bn2": "is not a conv / linear", "bn3": "on 2-d values only"}),
    "transpose": (GroupedTranspose, (2, 8, 4, 4), {"bn": "groups=2: fxqbn folds transposed convs with groups=1 only", "bn1": "folded into up1"}),
}


def build(name, seed=0):
    cls, shape, expected = CASES[name]
    torch.manual_seed(seed)
    model = randomize_bn(cls().eval(), seed)
    x = torch.randn(*shape)
    return model, x, expected


def export(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x,)).module()


def calibrated(exported, x, quantizer, **kwargs):
    prepared = pt2e.prepare_pt2e(exported, quantizer, **kwargs)
    with torch.no_grad():
        for i in range(3):
            prepared(x + 0.1 * i)
    return prepared


def model_sqnr(reference, model, x):
    with torch.no_grad():
        want, got = reference(x), model(x)
    return sqnr_db(float(want.pow(2).sum()), float((want - got).pow(2).sum()))


def x86():
    return X86Quantizer().set_global(x86_config())


# -- torchao itself: these fail the day torchao's fold or steps change, so we notice ------------------


def test_torchao_prepare_pt2e_still_folds_a_conv_whose_output_has_other_users():
    model, x, _ = build("residual")
    prepared = torchao_prepare(export(model, x), AnnotateNothing())
    with torch.no_grad():
        assert float((model(x) - prepared(x)).abs().max()) > 0.1  # wrong: fxqbn.pt2e exists for this


@pytest.mark.parametrize("bn_free", [True, False])
def test_our_prepare_and_convert_steps_are_torchaos_where_its_fold_is_right(bn_free):
    """Without a BN, or with only BNs that fold correctly, our steps give torchao's graph and numbers."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)] if bn_free else [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()]
    model, x = randomize_bn(nn.Sequential(*layers).eval()), torch.randn(2, 3, 12, 12)
    ours = calibrated(export(model, x), x, x86(), bn="float")
    theirs = torchao_prepare(export(model, x), x86())
    with torch.no_grad():
        for i in range(3):
            theirs(x + 0.1 * i)
    assert ours.code == theirs.code
    ours_q, theirs_q = pt2e.convert_pt2e(ours), torchao_convert(theirs)
    assert ours_q.code == theirs_q.code
    with torch.no_grad():
        assert torch.equal(ours_q(x), theirs_q(x))


# -- the fold --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_the_fold_keeps_the_outputs_and_reports_every_bn(name):
    model, x, expected = build(name)
    exported = export(model, x)
    code, state = exported.code, {k: v.clone() for k, v in exported.state_dict().items()}
    prepared = calibrated(exported, x, AnnotateNothing(), bn="float")
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-5)
    assert exported.code == code and all(torch.equal(v, state[k]) for k, v in exported.state_dict().items())
    rows = {row.module: row for row in fxqbn.get_report(pt2e.convert_pt2e(prepared)).rows}
    assert set(rows) == set(expected)
    for bn, outcome in expected.items():
        if outcome.startswith("folded"):
            assert (rows[bn].status, rows[bn].reason) == ("folded", outcome)
        else:
            assert rows[bn].status == "skipped" and rows[bn].reason == "kept float: bn='float'"


@pytest.mark.parametrize("name", CASES)
def test_each_fold_refusal_says_why(name):
    from fxqbn.passes import find_patterns
    from fxqbn.passes.boundaries import PREPARED
    from fxqbn.passes.fold import Fold, decide

    model, x, expected = build(name)
    exported = export(model, x)
    for match in find_patterns(exported.graph, exported, PREPARED).matches:
        decided = decide(exported.graph, exported, match)
        want = expected[match.module]
        if want.startswith("folded"):
            assert isinstance(decided, Fold) and f"folded into {decided.into}" == want
        else:
            assert isinstance(decided, str) and want in decided, (match.module, decided)


# -- int8 standalone BNs ---------------------------------------------------------------------------


def float_bns(gm):
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]


@pytest.mark.parametrize("name", ["residual", "preact", "head"])
def test_int8_route_leaves_no_standalone_bn_float_and_is_close_to_the_correct_fold(name):
    model, x, expected = build(name)
    exported = export(model, x)
    as_float = pt2e.convert_pt2e(calibrated(exported, x, x86(), bn="float"))
    as_int8 = pt2e.convert_pt2e(calibrated(exported, x, x86(), bn="int8"))
    assert float_bns(as_int8) == []
    report = fxqbn.get_report(as_int8)
    assert {row.module for row in report.rows} == set(expected)
    standalone = {bn for bn, outcome in expected.items() if not outcome.startswith("folded")}
    assert {row.module for row in report.rewritten} == standalone
    assert report.summary.folded == len(expected) - len(standalone)
    # int8 BNs cost a little: these small models quantize little else (the benchmarks' models: within 2 dB)
    assert model_sqnr(model, as_int8, x) >= max(35.0, model_sqnr(model, as_float, x) - 3.0)


def test_stock_pt2e_breaks_the_residual_model_and_the_route_does_not():
    model, x, _ = build("preact")
    stock = torchao_prepare(export(model, x), x86())
    with torch.no_grad():
        for i in range(3):
            stock(x + 0.1 * i)
    stock_sqnr = model_sqnr(model, pt2e._convert_steps(stock), x)  # torchao's convert, without its slow QAT-only step
    ours = model_sqnr(model, pt2e.convert_pt2e(calibrated(export(model, x), x, x86())), x)
    assert ours > 25 and ours > stock_sqnr + 10, (ours, stock_sqnr)


class Int8Everywhere(Quantizer if not MISSING else object):
    """An XNNPACK-style quantizer: every conv's input and output int8, symmetric."""

    def __init__(self):
        super().__init__()
        from torchao.quantization.pt2e.observer import MinMaxObserver

        self.spec = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
                                     observer_or_fake_quant_ctr=MinMaxObserver.with_args(qscheme=torch.per_tensor_symmetric, dtype=torch.qint8))

    def annotate(self, model):
        for node in model.graph.nodes:
            if node.target == torch.ops.aten.conv2d.default:
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={node.args[0]: self.spec}, output_qspec=self.spec, _annotated=True)
        return model

    def validate(self, model):
        pass


def test_bn_takes_its_neighbours_spec_so_one_quantize_serves_both():
    model, x, _ = build("residual")
    converted = pt2e.convert_pt2e(calibrated(export(model, x), x, Int8Everywhere()))
    quantizes = [n for n in converted.graph.nodes if "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target)]
    conv = next(n for n in converted.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    assert len([q for q in quantizes if q.args[0] is conv]) == 1  # the conv's output: quantized once, read by BN and add
    assert all(q.args[-1] == torch.int8 for q in quantizes)
    row = fxqbn.get_report(converted).rewritten[0]
    assert row.module == "bn" and row.dtype == "qint8"


def test_skip_keeps_a_bn_float_and_says_so():
    model, x, _ = build("preact")
    report = fxqbn.get_report(pt2e.convert_pt2e(calibrated(export(model, x), x, x86(), skip=["bn_out"])))
    row = next(r for r in report.rows if r.module == "bn_out")
    assert (row.status, row.reason) == ("skipped", "kept float: skip=")
    assert {r.module for r in report.rewritten} == {"bn1"}
    model, x, _ = build("preact")
    with pytest.raises(fxqbn.FxqbnError, match=r"skip names 'bn9', which is no BN of this model: .*bn1, bn2, bn_out"):
        pt2e.prepare_pt2e(export(model, x), x86(), skip="bn9")


def test_batchnorm_quantizer_composes_with_torchaos_own_prepare():
    from torchao.quantization.pt2e.quantizer import ComposableQuantizer

    model, x, _ = build("preact")
    prepared = torchao_prepare(export(model, x), ComposableQuantizer([x86(), pt2e.BatchNormQuantizer()]))
    with torch.no_grad():
        prepared(x)
    lowered = fxqbn.lower(pt2e._convert_steps(prepared))  # torchao's convert, without its slow QAT-only step
    assert {r.module for r in fxqbn.get_report(lowered).rewritten} == {"bn_out"}  # torchao folded bn1 (wrongly) and bn2
    assert "cannot correct torchao's fold" in pt2e.BatchNormQuantizer.__doc__ and "fxqbn.pt2e.prepare_pt2e" in pt2e.BatchNormQuantizer.__doc__


def test_the_route_compiles_as_one_graph():
    model, x, _ = build("preact")
    converted = pt2e.convert_pt2e(calibrated(export(model, x), x, x86()))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(converted)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_a_dynamic_batch_export_compiles_once_for_every_batch_size_as_the_float_model_does():
    from tests.test_compile import graphs_compiled

    model, x, _ = build("preact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, (torch.randn(4, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)).module()
    prepared = pt2e.prepare_pt2e(exported, x86())
    with torch.no_grad():
        prepared(torch.randn(5, 3, 8, 8))
    converted = pt2e.convert_pt2e(prepared)
    inputs = [torch.randn(batch, 3, 8, 8) for batch in (2, 3, 5, 7)]
    assert graphs_compiled(converted, inputs, True) == graphs_compiled(exported, inputs, True) == 1
    with torch.no_grad():
        assert converted(torch.randn(1, 3, 8, 8)).shape == (1, 16, 8, 8)


# -- bad input -------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_what_to_do():
    model, x, _ = build("residual")
    exported = export(model, x)
    with pytest.raises(fxqbn.FxqbnError, match=r"torch.export.export\(model, example_inputs\).module\(\), got a ConvFeedsBnAndResidual"):
        pt2e.prepare_pt2e(model, x86())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,))
    with pytest.raises(fxqbn.FxqbnError, match=r"pass exported.module\(\)"):
        pt2e.prepare_pt2e(program, x86())
    with pytest.raises(fxqbn.FxqbnError, match="records no shapes"):
        pt2e.prepare_pt2e(torch.fx.symbolic_trace(model), x86())
    with pytest.raises(fxqbn.FxqbnError, match="quantizer must be a torchao Quantizer, e.g. X86InductorQuantizer, got str"):
        pt2e.prepare_pt2e(exported, "x86")
    with pytest.raises(fxqbn.FxqbnError, match="bn='int4': choose 'int8'"):
        pt2e.prepare_pt2e(exported, x86(), bn="int4")
    prepared = pt2e.prepare_pt2e(exported, x86())
    with pytest.raises(fxqbn.FxqbnError, match="already prepared"):
        pt2e.prepare_pt2e(prepared, x86())
    with pytest.raises(fxqbn.FxqbnError, match="convert_pt2e before calibration: .* observers have seen no data"):
        pt2e.convert_pt2e(prepared)
    with pytest.raises(fxqbn.FxqbnError, match="takes the model fxqbn.pt2e.prepare_pt2e returned"):
        pt2e.convert_pt2e(exported)


def test_a_quantizer_failing_on_the_graph_is_said_clearly():
    model, x, _ = build("called_twice")
    with pytest.raises(fxqbn.FxqbnError, match=r"the quantizer \(X86InductorQuantizer \+ BatchNormQuantizer\) failed on this "
                       r"model before anything was quantized: ValueError: conv partition has more than one output node\. "
                       r".*--int8 ao"):
        pt2e.prepare_pt2e(export(model, x), x86())


def test_without_torchao_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e", None)
    model, x, _ = build("residual")
    with pytest.raises(fxqbn.FxqbnError, match=r'pip install "fxqbn\[pt2e\]"'):
        pt2e.prepare_pt2e(export(model, x), object())


def test_prepared_model_is_left_unchanged_by_convert():
    model, x, _ = build("preact")
    prepared = calibrated(export(model, x), x, x86())
    code, state = prepared.code, copy.deepcopy(prepared.state_dict())
    pt2e.convert_pt2e(prepared)
    assert prepared.code == code and all(torch.equal(v, state[k]) for k, v in prepared.state_dict().items())


# -- the command -----------------------------------------------------------------------------------

MODEL_FILE = '''
import torch
from torch import nn


{source}

def build():
    torch.manual_seed(0)
    return PreActBlock().eval(), (torch.randn(2, 3, 8, 8),)
'''


@pytest.mark.parametrize("bn", ["int8", "float"])
def test_command_int8_pt2e_takes_the_route_and_reports_every_bn(tmp_path, capsys, bn):
    import inspect

    from fxqbn import cli

    (tmp_path / "preact.py").write_text(MODEL_FILE.format(source=inspect.getsource(PreActBlock)))
    argv = ["convert", f"{tmp_path}/preact.py:build", "--int8", "pt2e", "--bn", bn, "--calib-batches", "2",
            "--columns", "bn,status,reason"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.splitlines() if line.startswith("bn")}
    assert rows["bn2"] == ["folded", "folded into conv1"]
    for name in ("bn1", "bn_out"):
        if bn == "int8":  # the row says which kernel and why
            assert rows[name][0] == "rewritten" and rows[name][1].startswith("int8 fused kernel"), rows[name]
        else:
            assert rows[name] == ["skipped", "kept float: bn='float'"]
    assert ("BNs kept float (fold corrected)" in out) == (bn == "float")


def test_x86_quantizers_failure_on_torchvision_resnet_under_2_14_is_said_not_a_crash():
    """torch 2.14.1's X86InductorQuantizer raises deep inside on torchvision's ResNets: fxqbn says so and what to use."""
    torchvision = pytest.importorskip("torchvision", reason="torchvision is installed only beside torch 2.14.1 (.ci/run)")
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    exported = export(model, x)
    if torch.__version__.startswith("2.14"):
        with pytest.raises(fxqbn.FxqbnError, match="Input partition has more than one output node.*--int8 ao"):
            pt2e.prepare_pt2e(exported, x86())
    else:
        assert fxqbn.get_report(pt2e.convert_pt2e(calibrated(exported, x, x86()))).summary.folded == 20
