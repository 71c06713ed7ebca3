"""The report: golden table and JSON, skip reasons, numeric columns, source lines, persistence.

Regenerate the golden files after an intended change with:
    FXQBN_REGEN_GOLDEN=1 python -m pytest tests/test_report.py
and review the diff.
"""

import copy
import dataclasses
import csv
import io
import json
import math
import os
import pickle
import re
import string
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import randomize_bn
from report_model import ReportNet
from torch import nn
from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping, default_weight_observer

import fxqbn
from fxqbn.report import COLUMNS, DEFAULT_COLUMNS, Report, ReportRow, ReportSummary

GOLDEN = Path(__file__).parent / "golden"


def batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 5, 5, generator=gen) for _ in range(n)]


def build():
    model = randomize_bn(ReportNet()).eval()
    qc = QConfig(activation=MinMaxObserver, weight=default_weight_observer)
    mapping = QConfigMapping().set_global(qc).set_module_name("excluded", None)
    observed = fxqbn.prepare(model, (batches(1, 0)[0],), mapping)
    with torch.no_grad():
        for x in batches(4, 1):
            observed(x)
    return model, observed, fxqbn.convert(observed)


@pytest.fixture(scope="module")
def converted():
    return build()


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FXQBN_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed: regenerate with FXQBN_REGEN_GOLDEN=1 if intended"


def without_time(report):
    return replace(report, summary=replace(report.summary, convert_seconds=0.0))


def test_golden_table(converted):
    check_golden("report.txt", without_time(fxqbn.get_report(converted[2])).format("plain") + "\n")


def test_golden_wide_table(converted):
    report = without_time(fxqbn.get_report(converted[2]))
    check_golden("report_wide.txt", report.format("plain", columns=list(COLUMNS), width=None) + "\n")


def test_str_is_the_default_table_and_fits_100_columns(converted):
    report = fxqbn.get_report(converted[2])
    assert str(report) == report.format("plain") == report.format("plain", DEFAULT_COLUMNS, 100)
    for fmt in ("plain", "github"):
        lines = report.format(fmt).splitlines()
        assert lines[0].replace("|", " ").split() == ["BN", "pattern", "status", "in", "scale@zp", "out", "scale@zp", "SQNR", "reason"]
    assert max(len(line) for line in str(report).splitlines()) <= 100


def test_columns_choose_and_unknown_columns_are_refused(converted):
    report = fxqbn.get_report(converted[2])
    lines = report.format("plain", columns=["status", "bn", "op"]).splitlines()
    assert lines[0].split() == ["status", "BN", "op"] and lines[2].split() == ["rewritten", "stem", "quantized::batch_norm2d"]
    with pytest.raises(ValueError, match="unknown report column 'colour': choose from node, bn, pattern"):
        report.format("plain", columns=["bn", "colour"])


def cells(table: str, rows: int, spanning: bool = True) -> list[list[str]]:
    """The cells of the first ``rows`` rows of a plain table, split where the dashed line has gaps; a
    wrapped cell's lines joined by spaces; a skipped row's spanning reason is its last cell."""
    lines = table.splitlines()
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]
    status = lines[0].split().index("status") if "status" in lines[0].split() else None
    found: list[list[str]] = []
    for line in lines[2:]:
        parts = [line[a:b].strip() for a, b in spans[:-1]] + [line[spans[-1][0]:].strip()]
        if spanning and status is not None and parts[status] == "skipped":
            parts = parts[: status + 1] + [line[spans[status + 1][0]:].strip()]  # the reason spans the number columns
        if parts[0]:
            if len(found) == rows:
                break
            found.append(parts)
        else:  # a continuation line
            found[-1][-1] = f"{found[-1][-1]} {line.strip()}"
    return found


NAMES = st.text(alphabet=string.ascii_lowercase + string.digits + "._", min_size=1, max_size=160)
REASONS = st.text(alphabet=string.ascii_letters + string.digits + " ()=:,;'.-", min_size=1, max_size=300).map(str.strip).filter(bool)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(NAMES, REASONS, st.booleans()), min_size=1, max_size=8))
def test_any_names_and_reasons_fit_100_columns_cut_with_an_ellipsis(rows):
    records = tuple(
        ReportRow(node=name.replace(".", "_"), module=name, pattern="BatchNorm2d+ReLU", op="", status="skipped" if skipped else "rewritten",
                  reason=reason, input_scale=0.0123456, input_zero_point=128, output_scale=1.5e-5, output_zero_point=0)
        for name, reason, skipped in rows
    )
    report = Report(rows=records, summary=ReportSummary(rewritten=0, skipped=len(records), quantize_nodes=0, dequantize_nodes=0, convert_seconds=0.1))
    table = report.format("plain")
    assert max(len(line) for line in table.splitlines()) <= 100
    for row, shown in zip(records, cells(table, len(records)), strict=True):
        name, reason = shown[0], shown[-1]
        if name != row.module:  # cut in the middle: the start and the (longer) end of the name
            head, tail = name.split("…")
            assert row.module.startswith(head) and row.module.endswith(tail) and len(head) <= len(tail)
        assert len(name) >= min(len(row.module), 10)
        assert reason.replace(" ", "") == row.reason.replace(" ", "")  # wrapped, not a character lost
    github = report.format("github").splitlines()  # Markdown: one line a row, nothing shortened
    assert len(github) == 2 + len(records) + 2 and all(f"| {row.module} " in github[2 + i] for i, row in enumerate(records))
    whole = report.format("plain", width=None)  # the default columns, nothing shortened
    assert all(f"{row.module}  " in whole and row.reason in whole for row in records)
    wide = report.format("plain", columns=list(COLUMNS), width=None)
    assert [[r[1], r[-1]] for r in cells(wide, len(records), spanning=False)] == [[row.module, row.reason] for row in records]


def test_summary_lines_fit_the_width_and_the_timing_never_moves_the_break():
    summary = ReportSummary(rewritten=1000, skipped=1000, quantize_nodes=1000, dequantize_nodes=1000, convert_seconds=12.5, model_sqnr_db=35.25)
    text = Report(rows=(), summary=summary).format("plain")
    assert text.splitlines()[-2:] == [
        "1000 rewritten, 1000 skipped; 1000 quantize and 1000 dequantize boundaries inserted",
        "model output SQNR 35.2 dB; converted in 12500 ms",
    ]
    assert Report(rows=(), summary=summary).format("plain", width=None).splitlines()[-1] == (
        "1000 rewritten, 1000 skipped; 1000 quantize and 1000 dequantize boundaries inserted; model output SQNR 35.2 dB; converted in 12500 ms"
    )


def test_golden_json(converted):
    check_golden("report.json", fxqbn.get_report(converted[2]).format("json") + "\n")


def test_json_is_deterministic_and_strict():
    first, second = build()[2], build()[2]
    assert fxqbn.get_report(first).format("json") == fxqbn.get_report(second).format("json")
    data = json.loads(fxqbn.get_report(first).format("json"))
    assert list(data) == ["rows", "summary", "dropped"] and "convert_seconds" not in data["summary"]
    assert list(data["rows"][0])[:5] == ["node", "module", "pattern", "op", "status"]


def test_every_skip_reason_reaches_the_report(converted):
    rows = {row.module: row for row in fxqbn.get_report(converted[2]).rows}
    assert rows["excluded"].status == "skipped" and "excluded by qconfig" in rows["excluded"].reason
    assert rows["batch_stats"].status == "skipped" and "track_running_stats=False" in rows["batch_stats"].reason
    assert rows["shared"].status == "rewritten" and rows["shared"].reason == "ReLU not fused: the BN output has 2 users"
    assert [r.module for r in fxqbn.get_report(converted[2]).rows] == [
        "stem", "block.0", "shared", "excluded", "batch_stats", "bn3d",
    ]
    for fmt in ("plain", "github", "csv", "json"):
        text = fxqbn.get_report(converted[2]).format(fmt, width=None)  # tables: nothing cut
        assert "excluded by qconfig (None for this module)" in text and "ReLU not fused: the BN output has 2 users" in text
        assert "track_running_stats=False: normalises with batch statistics" in text


def test_summary_counts(converted):
    summary = fxqbn.get_report(converted[2]).summary
    assert (summary.rewritten, summary.skipped) == (4, 2)
    # x -> stem -> block -> shared (quantized hand-over), then float; bn3d from float again.
    assert (summary.quantize_nodes, summary.dequantize_nodes) == (2, 2)
    assert summary.convert_seconds > 0
    assert "4 rewritten, 2 skipped; 2 quantize and 2 dequantize boundaries inserted" in str(fxqbn.get_report(converted[2]))


def test_observer_ranges_are_what_the_observers_saw(converted):
    row = fxqbn.get_report(converted[2]).rows[0]
    seen = torch.stack(batches(4, 1))
    assert (row.input_min, row.input_max) == (seen.min().item(), seen.max().item())
    assert row.observer == "MinMaxObserver" and row.dtype == "quint8"
    block = fxqbn.get_report(converted[2]).rows[1]
    assert block.output_min == 0.0  # observed after the fused ReLU


def test_source_points_at_the_bn_call_line(converted):
    lines = Path(ReportNet.__module__ + ".py")
    source = (Path(__file__).parent / lines).read_text().splitlines()
    for row in fxqbn.get_report(converted[2]).rows:
        file, line = row.source.split(":")
        assert file == "report_model.py"
        code = source[int(line) - 1]
        attr = row.module.split(".")[0]
        assert f"self.{attr}(" in code, (row.module, code)


def test_numeric_columns_agree_with_an_independent_computation():
    model, observed, q = build()
    inputs = batches(3, 2)
    report = fxqbn.compare(model, q, inputs)
    assert fxqbn.get_report(q) == report  # recorded on the module
    stem = report.rows[0]
    signal = noise = 0.0
    worst = 0.0
    for x in inputs:
        y = model.stem(x)
        xq = torch.quantize_per_tensor(x, stem.input_scale, stem.input_zero_point, torch.quint8)
        y_q = q.stem(xq).dequantize()
        signal += y.double().pow(2).sum().item()
        noise += (y_q - y).double().pow(2).sum().item()
        worst = max(worst, (y_q - y).abs().max().item() / stem.output_scale)
    assert stem.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)
    assert stem.max_error_steps == pytest.approx(worst, rel=1e-9)
    assert all(r.sqnr_db is None for r in report.skipped)
    assert all(r.sqnr_db is not None and r.sqnr_db > 20 for r in report.rewritten)
    f_sig = f_noise = 0.0
    for x in inputs:
        for f, o in zip(model(x), q(x)):
            f_sig += f.double().pow(2).sum().item()
            f_noise += (o.double() - f.double()).pow(2).sum().item()
    assert report.summary.model_sqnr_db == pytest.approx(10 * math.log10(f_sig / f_noise), rel=1e-9)
    assert fxqbn.compare(observed, q, inputs).rows == report.rows  # the observed model as reference
    assert "model output SQNR" in str(report)


def test_compare_does_not_feed_the_observers():
    model, observed, q = build()
    before = {k: v.clone() for k, v in observed.state_dict().items()}
    with pytest.warns(fxqbn.AccuracyWarning, match="under 10 dB"):  # the sensitivity it then measures feeds nothing either
        report = fxqbn.compare(observed, q, [torch.randn(2, 4, 5, 5) * 100])
    assert all(row.sensitivity_db is not None for row in report.rewritten)
    assert all(torch.equal(v, observed.state_dict()[k]) for k, v in before.items())


def test_compare_refuses_a_mismatched_reference():
    _, _, q = build()
    with pytest.raises(fxqbn.FxqbnError, match="no BatchNorm node"):
        fxqbn.compare(nn.Sequential(nn.Identity()), q, batches(1, 0))


def test_report_survives_deepcopy_pickle_and_torch_save(converted):
    q = converted[2]
    report = fxqbn.get_report(q)
    assert fxqbn.get_report(copy.deepcopy(q)) == report
    assert fxqbn.get_report(pickle.loads(pickle.dumps(q))) == report
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert fxqbn.get_report(loaded) == report
    assert fxqbn.get_report(copy.deepcopy(loaded)) == report
    assert pickle.loads(pickle.dumps(report)) == report


def test_formats(converted):
    report = fxqbn.get_report(converted[2])
    github = report.format("github")
    assert github.splitlines()[1].startswith("|-")
    rows = list(csv.DictReader(io.StringIO(report.format("csv"))))
    assert [r["module"] for r in rows] == [r.module for r in report.rows]
    assert float(rows[0]["input_scale"]) == report.rows[0].input_scale
    assert report.to_dict()["rows"][0]["node"] == "stem"
    with pytest.raises(ValueError, match="unknown report format 'xml'"):
        report.format("xml")


def test_no_source_when_the_model_has_no_code_of_its_own():
    # nn.Sequential's forward is torch's: the line calling prepare is not the BN's source.
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())).eval()
    observed = fxqbn.prepare(model, (batches(1, 0)[0],), MinMaxObserver)
    with torch.no_grad():
        observed(batches(1, 0)[0])
    (row,) = fxqbn.get_report(fxqbn.convert(observed)).rows
    assert row.source == ""


# -- reports of fxqbn.lower ---------------------------------------------------------------------------

LOWERED_FIELDS = {  # what a row of fxqbn.lower's report holds: no observer, observed range or per-BN error
    "node", "module", "pattern", "op", "status", "reason", "source", "dtype",
    "input_scale", "input_zero_point", "output_scale", "output_zero_point",
}


class TwoSandwiches(nn.Module):
    """Two one-BN int8 graphs of lower_models.Sandwich, the second BN's input float (skipped)."""

    def __init__(self, route):
        super().__init__()
        from lower_models import Sandwich

        self.a = Sandwich(route, 2, "module", "ReLU6", "none")
        self.b = nn.BatchNorm2d(5).eval()

    def forward(self, x):
        y = self.a(x)
        return y, self.b(torch.randn(1, 5, 2, 2))


@pytest.mark.parametrize("route, graph", [("ao", "torch.ao convert_fx"), ("pt2e", "torchao convert_pt2e")])
def test_a_lowered_report_says_what_was_lowered_into_which_graph_and_only_what_means_something(route, graph):
    # native: the cost model would keep torch.ao's BN float (its input qparams are known only at run time)
    report = fxqbn.get_report(fxqbn.lower(torch.fx.symbolic_trace(TwoSandwiches(route)), backend="native"))
    assert [r.status for r in report.rows] == ["rewritten", "skipped"]
    assert (report.summary.rewritten, report.summary.skipped, report.summary.lowered_into) == (1, 1, graph)
    counts, timing = report.summary_lines()
    assert counts == f"1 BN lowered into the {graph} int8 graph, 1 skipped"
    assert re.fullmatch(r"lowered in \d+ ms", timing)
    data = report.to_dict()
    assert data["summary"] == {"rewritten": 1, "skipped": 1, "lowered_into": graph, "folded": 0}
    assert all(set(row) == LOWERED_FIELDS for row in data["rows"])
    assert set(csv.DictReader(io.StringIO(report.format("csv"))).fieldnames) == LOWERED_FIELDS
    assert json.loads(report.format("json")) == data
    assert Report.from_dict(data).to_dict() == data  # the JSON reads back
    header = report.format("plain", columns="all", width=None).splitlines()[0].split()
    assert header == ["node", "BN", "pattern", "op", "status", "dtype", "in", "scale@zp", "out", "scale@zp", "source", "reason"]
    text = str(report)
    assert "SQNR" not in text and "quantize and" not in text and "converted in" not in text


def test_a_convert_report_keeps_every_field_and_says_nothing_of_lowering(converted):
    report = fxqbn.get_report(converted[2])
    assert report.summary.lowered_into == "" and "lowered_into" not in report.to_dict()["summary"]
    assert all(set(row) == {f.name for f in dataclasses.fields(ReportRow)} for row in report.to_dict()["rows"])
    assert str(report).splitlines()[0].split()[-2:] == ["SQNR", "reason"]


def test_a_folded_row_names_what_it_was_folded_into_and_counts_in_the_summary():
    from fxqbn.report import ReportRow, ReportSummary, Report, folded_row

    row = folded_row("bn", "features.bn", "BatchNorm2d", "features.conv")
    assert (row.status, row.reason, row.op) == ("folded", "folded into features.conv", "")
    report = Report(rows=(row,), summary=ReportSummary(rewritten=0, skipped=0, quantize_nodes=0, dequantize_nodes=0,
                                                       convert_seconds=0.0, folded=1))
    assert report.folded == (row,) and report.skipped == () and report.rewritten == ()
    assert "0 rewritten, 1 folded, 0 skipped" in str(report)
    assert "folded into features.conv" in str(report)
    assert Report.from_dict(report.to_dict()) == report
    with pytest.raises(ValueError, match="folded row bn has no reason"):
        ReportRow(node="bn", module="m", pattern="BatchNorm2d", op="", status="folded", reason="")
    with pytest.raises(ValueError, match="status must be one of rewritten, folded, skipped"):
        ReportRow(node="bn", module="m", pattern="BatchNorm2d", op="", status="fused", reason="x")
