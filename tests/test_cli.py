"""The `fxqbn` command, run as `python -m fxqbn` in a subprocess: each option, each exit status, each message.

Refusals that need no separate process (they go through the same `main`) run in-process, which keeps the
suite quick on small machines.
"""

import csv
import dataclasses
import fcntl
import io
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from importlib import metadata

import pytest
import torch
from torch.ao.quantization import MinMaxObserver

import fxqbn
from fxqbn import cli

MODEL_FILE = '''
import torch
from torch import nn


def _stats(model):
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.block(self.bn(self.conv(x)))


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x, y):
        return torch.relu(self.a(x)) + self.b(y)


class Branchy(Net):
    def forward(self, x):
        return self.bn(x) if x.sum() > 0 else x


def net():
    torch.manual_seed(0)
    return _stats(Net())


def net_with_inputs():
    return net(), (torch.randn(2, 3, 8, 8),)


def two():
    return _stats(Two())


def branchy():
    return _stats(Branchy()), torch.randn(2, 4, 8, 8)


def broken():
    raise RuntimeError("no weights here")


class LongNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder_stage_with_a_rather_descriptive_name = nn.Sequential()
        self.encoder_stage_with_a_rather_descriptive_name.add_module("normalisation_of_the_first_block", nn.BatchNorm2d(3))
        self.normalisation_with_batch_statistics_only = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        return self.normalisation_with_batch_statistics_only(self.encoder_stage_with_a_rather_descriptive_name(x))


def long_names():
    return _stats(LongNames()), torch.randn(2, 3, 8, 8)


def no_bn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8)


def slow_factory():
    import pathlib
    import time

    pathlib.Path("factory-started").touch()
    time.sleep(600)


def not_a_module():
    return 3
'''

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread a process: the suite runs on small machines

# torch.jit.load of the --torchscript file: TorchScript is deprecated in torch 2.13.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated")  # Deprecation- (2.13) or FutureWarning (2.14)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with m.py (the factories above) and calibration files, as the current directory."""
    (tmp_path / "m.py").write_text(MODEL_FILE)
    gen = torch.Generator().manual_seed(3)
    torch.save([torch.randn(2, 3, 8, 8, generator=gen) for _ in range(3)], tmp_path / "calib.pt")
    torch.save([torch.randn(2, 4, 8, 8, generator=gen)], tmp_path / "wrong_shape.pt")
    (tmp_path / "garbage.pt").write_text("not a tensor file")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fxqbn_command(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fxqbn", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600,
    )


def fxqbn_on_a_terminal(*args, cwd, interrupt_at=None, env=ENV):
    """Run the command with stderr on a pseudo-terminal (where progress shows); (status, stdout, stderr).

    With ``interrupt_at``, the command gets SIGINT (Ctrl-C) as soon as that text shows on the terminal.
    """
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    proc = subprocess.Popen([sys.executable, "-m", "fxqbn", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
        if interrupt_at is not None and interrupt_at.encode() in b"".join(chunks):
            proc.send_signal(signal.SIGINT)
            interrupt_at = None
    os.close(leader)
    stdout = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=600), stdout, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def load_factories(work):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_test_models", work / "m.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the front door --------------------------------------------------------------------------------


def test_bare_convert_converts_the_builtin_densenet_and_verifies(tmp_path):
    """README's first command: `fxqbn convert`."""
    result = fxqbn_command("convert", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "model: fxqbn.models:densenet_bc, input (1, 3, 32, 32), histogram observer, quint8"
    assert lines[1].startswith("calibration: 8 random batches - DEMO ONLY")
    assert any(line.startswith("12 rewritten, 9 folded, 0 skipped; ") for line in lines)  # each norm2 follows conv1
    assert lines[2].split() == ["BN", "pattern", "status", "in", "scale@zp", "out", "scale@zp", "SQNR", "reason"]
    assert sum("BatchNorm2d+ReLU  rewritten" in line for line in lines) == 12
    assert sum("BatchNorm2d       folded     folded into features." in line for line in lines) == 9
    assert max(len(line) for line in lines) <= 100  # the default report fits a 100-column terminal
    verification = next(line for line in lines if line.startswith("verification on a held-out batch (1, 3, 32, 32)"))
    sqnr = float(verification.split("output SQNR ")[1].split(" dB")[0])
    assert sqnr > 25
    assert lines[-1].startswith("latency, median of 20 runs: float ") and lines[-1].endswith(" ms")
    assert result.stderr == ""  # no warnings, and no progress bar off a terminal


def test_the_torch_free_choices_name_the_tables_they_stand_for():
    from fxqbn import backends, command, whole_model

    assert (cli.OBSERVERS, cli.DTYPES, cli.BACKENDS) == (tuple(command.OBSERVERS), tuple(command.DTYPES), tuple(backends.BACKENDS))
    assert cli.INT8_ROUTES == tuple(whole_model.ROUTES)


LOWER_MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lower_models.py")


def test_int8_report_says_how_many_bns_went_into_the_int8_graph_and_drops_what_means_nothing(capsys):
    args = ["convert", f"{LOWER_MODELS}:timm_style_net", "--int8", "ao", "--calib-batches", "2"]
    assert cli.main([*args, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["int8"] == "ao" and not {"observer", "dtype", "skip"} & set(document)  # torch.ao's mapping chose them
    assert document["report"]["summary"] == {"rewritten": 3, "skipped": 0, "lowered_into": "torch.ao convert_fx", "folded": 0}
    assert all(not {"observer", "input_min", "output_max", "sqnr_db", "max_error_steps"} & set(row) for row in document["report"]["rows"])
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("BN "))  # after the wrapped model and calibration lines
    assert header.split() == ["BN", "pattern", "status", "in", "scale@zp", "out", "scale@zp", "reason"]
    assert "3 BNs lowered into the torch.ao convert_fx int8 graph, 0 skipped" in lines
    assert re.fullmatch(r"lowered in \d+ ms", lines[-1])


def test_console_script_is_the_same_main():
    (script,) = metadata.entry_points(group="console_scripts", name="fxqbn")
    assert script.value == "fxqbn.cli:main" and script.load() is cli.main


# -- the records: cli.py parses the command line into them, command.py works from them ----------------


def test_the_command_line_becomes_typed_records(work, monkeypatch):
    from fxqbn import command
    from fxqbn.requests import ConvertRequest, Data, Outputs, Quantization, ReportRequest, Table

    asked = []
    monkeypatch.setattr(command, "convert_command", lambda request, progress: asked.append(request) or 0)
    monkeypatch.setattr(command, "report_command", lambda request, progress: asked.append(request) or 0)
    assert cli.main(["convert", "m.py:two", "--input-shape", "2,3,4,4", "--input-shape", "1,3,4,4", "--calib", "calib.pt",
                     "--seed", "3", "--observer", "minmax", "--dtype", "qint8", "--backend", "fused", "--skip", "a",
                     "--skip", "b", "--out", "q.pt", "--report", "r.csv", "--format", "csv", "--columns", "bn,op", "--wide",
                     "--verify", "--quiet", "--no-fold"]) == 0
    assert cli.main(["convert"]) == 0
    assert cli.main(["report", "calib.pt", "--format", "json"]) == 0
    assert asked == [
        ConvertRequest("m.py:two", Data(((2, 3, 4, 4), (1, 3, 4, 4)), "calib.pt", 8, 3),
                       Quantization("minmax", "qint8", "fused", None, ("a", "b"), fold=False), Outputs("q.pt", None, "r.csv"),
                       Table("csv", ("bn", "op"), True), verify=True, quiet=True),
        ConvertRequest(),
        ReportRequest("calib.pt", Table("json")),
    ]
    assert (asked[0].spec, asked[0].verifies, asked[1].spec, asked[1].verifies) == ("m.py:two", True, cli.BUILTIN_MODEL, True)
    assert asked[0].outputs.named() == {"--out": "q.pt", "--report": "r.csv"}
    assert asked[0].outputs.written() == ["saved: q.pt", "report: r.csv"]


def test_records_refuse_what_the_command_line_refuses():
    from fxqbn.requests import ConvertRequest, Data, Outputs, Quantization, Table, UsageError

    with pytest.raises(UsageError, match=r"^fxqbn convert: error: argument --int8: --out is not supported with --int8"):
        ConvertRequest(quantization=Quantization(int8="ao", skip=("a",)), outputs=Outputs(out="q.pt"))
    with pytest.raises(UsageError, match=r"^fxqbn convert: error: argument --int8: --skip is not supported with --int8"):
        ConvertRequest(quantization=Quantization(int8="pt2e", skip=("a",)))
    with pytest.raises(UsageError, match=r"^fxqbn convert: error: argument --int8: --no-fold is not supported with --int8"):
        ConvertRequest(quantization=Quantization(int8="ao", fold=False))
    for bad in (lambda: Data(calib_batches=0), lambda: Data(input_shapes=((1, 0),)), lambda: Table("xml"), lambda: Table(columns=("colour",))):
        with pytest.raises(ValueError):
            bad()
    assert Table(wide=True).shown == tuple(fxqbn.report.COLUMNS) and Table(wide=True).width is None


def test_command_does_not_import_cli():
    """One direction: cli.py imports command.py (lazily); both import the torch-free requests.py."""
    import ast

    from fxqbn import command, requests

    def imported(module):
        return {node.module for node in ast.walk(ast.parse(open(module.__file__).read())) if isinstance(node, ast.ImportFrom)}

    assert "cli" not in imported(command) and "requests" in imported(command)
    assert not {"cli", "command"} & imported(requests)


# -- options -------------------------------------------------------------------------------------


def test_json_with_calibration_file_observer_dtype_skip_and_every_output(work):
    result = fxqbn_command(
        "convert", "m.py:net_with_inputs", "--calib", "calib.pt", "--verify", "--observer", "minmax", "--dtype", "qint8",
        "--skip", "block", "--out", "q.pt", "--torchscript", "q.ts", "--report", "report.json", "--format", "json",
        "--no-fold", cwd=work,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["saved: q.pt", "torchscript: q.ts", "report: report.json"]
    document = json.loads(result.stdout)
    assert (work / "report.json").read_text() == result.stdout
    assert document["calibration"] == {"source": "calib.pt", "batches": 2, "demo_only": False}  # 3rd batch held out
    assert (document["observer"], document["dtype"], document["skip"], document["fold"]) == ("minmax", "qint8", ["block"], False)
    rows = {row["module"]: row for row in document["report"]["rows"]}
    assert (rows["bn"]["status"], rows["bn"]["dtype"]) == ("rewritten", "qint8")
    assert (rows["block.0"]["status"], rows["block.0"]["reason"]) == ("skipped", "skipped on request (prepare's skip argument)")
    assert (document["report"]["summary"]["rewritten"], document["report"]["summary"]["skipped"]) == (1, 1)

    # The input qparams are a qint8 MinMaxObserver's over the conv outputs of the first two batches.
    model = load_factories(work).net()
    observer = MinMaxObserver(dtype=torch.qint8)
    calibration = torch.load(work / "calib.pt")
    with torch.no_grad():
        for x in calibration[:2]:
            observer(model.conv(x))
    scale, zero_point = observer.calculate_qparams()
    assert (rows["bn"]["input_scale"], rows["bn"]["input_zero_point"]) == (scale.item(), zero_point.item())

    verification = document["verification"]
    assert verification["batch"] == "(2, 3, 8, 8)" and verification["runs"] == 20
    assert verification["sqnr_db"] > 20 and verification["max_abs_error"] > 0
    assert verification["float_ms"] > 0 and verification["quantized_ms"] > 0

    # --out loads bit-identically to --torchscript's model, both from one conversion.
    loaded = fxqbn.load(work / "q.pt", load_factories(work).Net())
    assert fxqbn.get_report(loaded).to_dict() == document["report"]
    scripted = torch.jit.load(work / "q.ts")
    x = calibration[2]
    assert torch.equal(loaded(x), scripted(x))


def test_several_inputs_random_calibration_and_csv(work):
    result = fxqbn_command(
        "convert", "m.py:two", "--input-shape", "2,3,4,4", "--input-shape", "1,3,4,4", "--calib-batches", "3",
        "--format", "csv", cwd=work,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["module"], r["pattern"], r["status"]) for r in rows] == [
        ("a", "BatchNorm2d+ReLU", "rewritten"), ("b", "BatchNorm2d", "rewritten"),
    ]
    # the table stays a table: the other lines go to stderr
    assert result.stderr.splitlines()[0] == "model: m.py:two, input (2, 3, 4, 4), (1, 3, 4, 4), histogram observer, quint8"
    assert result.stderr.splitlines()[1].startswith("calibration: 3 random batches - DEMO ONLY")
    assert len(result.stderr.splitlines()) == 2  # no --verify: no verification


def test_the_default_folds_the_bn_after_the_conv_and_no_fold_quantizes_it(work, capsys):
    assert cli.main(["convert", "m.py:net_with_inputs", "--calib", "calib.pt", "--format", "json", "--out", "q.pt"]) == 0
    document = json.loads(capsys.readouterr().out)
    rows = {row["module"]: row for row in document["report"]["rows"]}
    assert document["fold"] is True
    assert (rows["bn"]["status"], rows["bn"]["reason"], rows["bn"]["op"]) == ("folded", "folded into conv", "")
    assert rows["block.0"]["status"] == "rewritten"
    assert {k: document["report"]["summary"][k] for k in ("rewritten", "folded", "skipped")} == {"rewritten": 1, "folded": 1, "skipped": 0}
    loaded = fxqbn.load(work / "q.pt", load_factories(work).net())
    assert fxqbn.get_report(loaded).to_dict() == document["report"]
    assert cli.main(["convert", "m.py:net_with_inputs", "--calib", "calib.pt", "--format", "json", "--no-fold"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["fold"] is False and [row["status"] for row in document["report"]["rows"]] == ["rewritten", "rewritten"]


def test_report_command_prints_a_saved_report(work, capsys):
    factories = load_factories(work)
    model = factories.net()
    observed = fxqbn.prepare(model, (torch.randn(2, 3, 8, 8),))
    with torch.no_grad():
        for x in torch.load(work / "calib.pt"):
            observed(x)
    quantized = fxqbn.convert(observed)
    fxqbn.save(quantized, work / "q.pt")
    result = fxqbn_command("report", "q.pt", "--format", "github", cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fxqbn.get_report(quantized).format("github")
    assert result.stdout.startswith("| BN ") and result.stderr == ""
    assert cli.main(["report", "q.pt", "--wide"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == fxqbn.get_report(quantized).format("plain", columns="all", width=None)
    assert cli.main(["report", "q.pt", "--columns", "bn,op"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:4]
    assert [row.split() for row in rows] == [["bn", "-"], ["block.0", "quantized::batch_norm2d_relu"]]  # bn folded into conv


def test_progress_bar_on_a_terminal_and_quiet(work):
    status, stdout, terminal = fxqbn_on_a_terminal("convert", "m.py:net_with_inputs", "--calib-batches", "3", cwd=work)
    assert status == 0
    assert "calibrating" in terminal and "3/3" in terminal
    assert "1 rewritten, 1 folded, 0 skipped; " in stdout

    status, stdout, terminal = fxqbn_on_a_terminal(
        "convert", "m.py:net_with_inputs", "--calib-batches", "3", "--quiet", "--format", "github", "--report", "r.md", cwd=work,
    )
    assert (status, stdout, terminal) == (0, "", "")
    written = (work / "r.md").read_text().splitlines()  # --quiet silences the terminal, not --report
    assert written[0].startswith("model: m.py:net_with_inputs") and written[1].startswith("calibration: 3 random")
    assert written[2].startswith("| BN ") and written[4].startswith("| bn ") and written[-2].startswith("1 rewritten, 1 folded, 0 skipped; ")


STEPS = r"^(.*)\.\.\. \d+\.\d s$"  # a finished step line on the terminal: "tracing... 0.3 s"


def test_each_step_shows_on_a_terminal(work):
    status, stdout, terminal = fxqbn_on_a_terminal(
        "convert", "m.py:net_with_inputs", "--calib-batches", "3", "--verify", "--out", "q.pt", "--torchscript", "q.ts", cwd=work,
    )
    assert status == 0, terminal
    assert re.findall(STEPS, terminal, re.M) == [
        "loading PyTorch", "building m.py:net_with_inputs", "tracing", "converting", "verifying", "saving q.pt", "compiling TorchScript",
    ]
    assert terminal.index("tracing...") < terminal.index("calibrating") < terminal.index("converting...")
    assert terminal.splitlines()[-2:] == ["saved: q.pt", "torchscript: q.ts"]
    assert "1 rewritten, 1 folded, 0 skipped; " in stdout


def test_the_fused_backend_needs_no_compile_step(work):
    status, stdout, terminal = fxqbn_on_a_terminal(
        "convert", "m.py:net_with_inputs", "--calib-batches", "2", "--verify", "--backend", "fused", cwd=work,
    )  # the C kernels are built by pip install: nothing compiles on first use
    assert status == 0, terminal
    assert re.findall(STEPS, terminal, re.M)[-2:] == ["converting", "verifying"]
    assert "1 rewritten, 1 folded, 0 skipped; " in stdout


@pytest.mark.parametrize(
    "args, moment",
    [
        (["m.py:net_with_inputs"], "loading PyTorch..."),  # start-up: torch is being imported
        (["m.py:slow_factory"], "building m.py:slow_factory..."),  # the user's factory is running
        (["m.py:net_with_inputs", "--calib-batches", "100000"], "calibrating:"),
    ],
    ids=["start-up", "factory", "calibration"],
)
def test_ctrl_c_prints_one_line_and_exits_130(work, args, moment):
    status, stdout, terminal = fxqbn_on_a_terminal("convert", *args, cwd=work, interrupt_at=moment)
    assert status == 130, terminal
    assert stdout == ""
    assert terminal.endswith("\nfxqbn: interrupted\n") and terminal.count("fxqbn: interrupted") == 1
    assert "Traceback" not in terminal and "KeyboardInterrupt" not in terminal


def test_ctrl_c_off_a_terminal_prints_one_line_and_exits_130(work):
    proc = subprocess.Popen([sys.executable, "-m", "fxqbn", "convert", "m.py:slow_factory"], cwd=work, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (work / "factory-started").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert (proc.returncode, stdout, stderr) == (130, "", "fxqbn: interrupted\n")


NO_TORCH = """
import contextlib, io, sys
from fxqbn import cli
for argv in {argvs!r}:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    print(repr((status, out.getvalue(), err.getvalue())))
print(sorted(name for name in sys.modules if name.split(".")[0] == "torch"))
"""


def test_help_version_and_usage_errors_answer_without_importing_torch(work):
    argvs = [
        ["--help"], ["--version"], ["convert", "--help"], ["report", "--help"],
        ["convert", "m.py:net", "--out", "m.py/q.pt"], ["convert", "--report", "m.py", "m.py:net"],
        ["convert", "--columns", "bn,colour"], ["convert", "--calib", "nothere.pt"], ["convert", "missing.py:net"],
        ["convert", "--calib", "empty"], ["convert", "--calib", "parts", "--out", "parts/a.pt"],
    ]
    (work / "empty").mkdir()
    (work / "parts").mkdir()
    (work / "parts" / "a.pt").write_bytes(b"a calibration file, never read here")
    result = subprocess.run([sys.executable, "-c", NO_TORCH.format(argvs=argvs)], cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    *answers, torch_modules = [eval(line) for line in result.stdout.splitlines()]
    assert torch_modules == []
    (help_status, help_text, _), (version_status, version, _), (convert_status, convert_help, _) = answers[:3]
    assert (help_status, version_status, convert_status) == (0, 0, 0)
    assert help_text.startswith("usage: fxqbn [-h] [--version] {convert,report}") and "130 interrupted" in help_text
    assert version == f"fxqbn {fxqbn.__version__} (torch {metadata.version('torch')})\n"
    assert metadata.version("fxqbn") == fxqbn.__version__  # the package metadata reads the same one place
    assert "--no-fold" in " ".join(convert_help.split()) and "quantize every BatchNorm" in " ".join(convert_help.split())
    assert "--backend {native,fused}" in convert_help and "--columns A,B,..." in convert_help and "--wide" in convert_help
    assert [status for status, _, _ in answers[4:]] == [2, 2, 2, 2, 2, 2, 2]
    assert answers[4][2].startswith("fxqbn convert: error: argument --out: m.py is a file, not a folder (in m.py/q.pt)")
    assert answers[5][2].startswith("fxqbn convert: error: argument --report: m.py is also MODEL's file")
    assert answers[9][2].startswith("fxqbn convert: error: argument --calib: folder empty holds no .pt files")
    assert answers[10][2].startswith("fxqbn convert: error: argument --out: parts/a.pt is also a file of --calib parts; writing it")


def test_columns_and_wide_choose_the_table(work, capsys):
    assert cli.main(["convert", "m.py:long_names", "--calib-batches", "2"]) == 0
    default = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in default) <= 100
    table = default[2:6]
    assert table[0].split() == ["BN", "pattern", "status", "in", "scale@zp", "out", "scale@zp", "SQNR", "reason"]
    modules = ["encoder_stage_with_a_rather_descriptive_name.normalisation_of_the_first_block", "normalisation_with_batch_statistics_only"]
    for line, module in zip(table[2:], modules):  # cut in the middle, keeping more of the leaf's end
        head, tail = line.split()[0].split("…")
        assert module.startswith(head) and module.endswith(tail) and len(tail) > len(head) > 0
    skipped = table[3].split(maxsplit=3)  # a skipped row's reason takes the empty number columns, and wraps
    reason = " ".join([skipped[3], *(line.strip() for line in default[6:] if line.startswith(" "))])
    assert skipped[1:3] == ["BatchNorm2d", "skipped"] and reason == "track_running_stats=False: normalises with batch statistics"

    assert cli.main(["convert", "m.py:long_names", "--calib-batches", "2", "--wide"]) == 0
    wide = capsys.readouterr().out.splitlines()[2:6]
    assert wide[0].split()[:3] == ["node", "BN", "pattern"] and wide[0].split()[-2:] == ["source", "reason"]
    assert wide[2].split()[1] == "encoder_stage_with_a_rather_descriptive_name.normalisation_of_the_first_block"
    assert wide[3].endswith("track_running_stats=False: normalises with batch statistics")

    assert cli.main(["convert", "m.py:long_names", "--calib-batches", "2", "--columns", "status,reason"]) == 0
    chosen = capsys.readouterr().out.splitlines()[2:6]
    assert chosen[0].split() == ["status", "reason"] and chosen[3] == "skipped    track_running_stats=False: normalises with batch statistics"

    assert cli.main(["convert", "m.py:long_names", "--calib-batches", "2", "--columns", "bn", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["report"]["rows"]
    assert list(rows[0]) == [f.name for f in dataclasses.fields(fxqbn.ReportRow)]  # JSON keeps every field


def test_an_unwritable_folder_is_named_before_any_work(work, capsys):
    folder = unwritable_folder(work)
    assert cli.main(["convert", "m.py:slow_factory", "--torchscript", f"{folder}/q.ts"]) == 2  # the factory never runs
    assert capsys.readouterr().err.startswith(f"fxqbn convert: error: argument --torchscript: cannot write in folder {folder}: ")


def unwritable_folder(work):
    """A folder this process cannot write in: a read-only one, or /sys when root writes anyway."""
    folder = work / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, "/sys"):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    pytest.skip(reason="no unwritable folder here: running as root, with /sys writable")


# -- refusals and usage errors, as the user sees them ---------------------------------------------------


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["missing.py:net"], 2, "fxqbn convert: error: model file missing.py does not exist"),
        (["m.py:net", "--input-shape", "1,4,8,8"], 1,
         "fxqbn: error: --input-shape (1, 4, 8, 8) does not fit the model: RuntimeError: Given groups=1, weight of size [4, 3, 3, 3]"),
        (["m.py:net_with_inputs", "--calib", "garbage.pt"], 1,
         "fxqbn: error: cannot read calibration file garbage.pt: it is not a file written by torch.save, or it is truncated"),
    ],
    ids=["missing-model-file", "shape-mismatch", "unreadable-calibration"],
)
def test_errors_are_one_line_with_the_exit_status(work, args, status, message):
    result = fxqbn_command("convert", *args, cwd=work)
    assert result.returncode == status
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(message)
    assert "Traceback" not in result.stderr


def test_debug_adds_the_traceback(work):
    result = fxqbn_command("convert", "m.py:broken", "--debug", cwd=work)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback")
    assert 'raise RuntimeError("no weights here")' in result.stderr
    assert result.stderr.splitlines()[-1] == "fxqbn: error: m.py:broken raised RuntimeError: no weights here"


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["m.py"], 2, "fxqbn convert: error: MODEL 'm.py' must be path/to/file.py:factory or package.module:factory"),
        (["m.py:net", "--dtype", "int4"], 2, "fxqbn convert: error: argument --dtype: invalid choice: 'int4'"),
        (["m.py:net", "--observer", "ema"], 2, "fxqbn convert: error: argument --observer: invalid choice: 'ema'"),
        (["m.py:net", "--format", "xml"], 2, "fxqbn convert: error: argument --format: invalid choice: 'xml'"),
        (["m.py:nett"], 2, "fxqbn convert: error: m.py has no attribute 'nett' (did you mean net"),
        (["no_such_package.models:f"], 2, "fxqbn convert: error: no module named 'no_such_package'"),
        (["m.py:net"], 2, "fxqbn convert: error: m.py:net returned no example inputs: give their shapes with --input-shape"),
        (["m.py:net", "--input-shape", "1,3,x"], 2, "fxqbn convert: error: argument --input-shape: '1,3,x' is not a shape"),
        (["m.py:net_with_inputs", "--skip", "blok"], 2,
         "fxqbn convert: error: argument --skip: the model has no module 'blok' (did you mean block"),
        (["m.py:net_with_inputs", "--calib", "nothere.pt"], 2, "fxqbn convert: error: argument --calib: nothere.pt does not exist"),
        (["m.py:net_with_inputs", "--out", "no/such/folder/q.pt"], 2, "fxqbn convert: error: argument --out: folder no/such/folder does not exist"),
        (["m.py:net_with_inputs", "--report", "."], 2, "fxqbn convert: error: argument --report: . is a folder; give a file name"),
        (["m.py:net_with_inputs", "--calib", "."], 1,  # a folder: its .pt files in name order, garbage.pt after calib.pt
         "fxqbn: error: cannot read calibration file ./garbage.pt: it is not a file written by torch.save"),
        (["m.py:net_with_inputs", "--calib", "calib.pt", "--calib-batches", "2"], 2,
         "fxqbn convert: error: argument --calib-batches: not allowed with argument --calib"),
        (["m.py:net_with_inputs", "--skip", "conv"], 2,
         "fxqbn convert: error: argument --skip: module 'conv' holds no BatchNorm; the BatchNorms are in block, bn"),
        (["m.py:no_bn"], 1, "fxqbn: error: the model (Sequential) holds no BatchNorm: nothing to quantize (fxqbn quantizes"),
        (["m.py:no_bn", "--int8", "ao"], 1, "fxqbn: error: the model (Sequential) holds no BatchNorm: nothing to quantize"),
        (["m.py:net_with_inputs", "--out", "m.py/q.pt"], 2,
         "fxqbn convert: error: argument --out: m.py is a file, not a folder (in m.py/q.pt)"),
        (["m.py:net_with_inputs", "--torchscript", "calib.pt/deeper/q.ts"], 2,
         "fxqbn convert: error: argument --torchscript: calib.pt is a file, not a folder (in calib.pt/deeper/q.ts)"),
        (["m.py:net_with_inputs", "--report", "m.py"], 2,
         "fxqbn convert: error: argument --report: m.py is also MODEL's file; writing it would destroy it"),
        (["m.py:net_with_inputs", "--calib", "calib.pt", "--out", "./calib.pt"], 2,
         "fxqbn convert: error: argument --out: ./calib.pt is also --calib; writing it would destroy it"),
        (["m.py:net_with_inputs", "--out", "q2.pt", "--report", "q2.pt"], 2,
         "fxqbn convert: error: arguments --out and --report both write q2.pt: give each its own file"),
        (["m.py:net_with_inputs", "--out", ""], 2, "fxqbn convert: error: argument --out: the path is empty; give a file name"),
        (["m.py:net_with_inputs", "--columns", "bn,colour"], 2,
         "fxqbn convert: error: argument --columns: unknown report column 'colour': choose from node, bn, pattern"),
        (["m.py:broken"], 1, "fxqbn: error: m.py:broken raised RuntimeError: no weights here"),
        (["m.py:not_a_module"], 1, "fxqbn: error: m.py:not_a_module returned int: return an nn.Module or (module, example_inputs)"),
        (["m.py:branchy"], 1, "fxqbn: error: torch.fx cannot trace Branchy: TraceError"),
        (["m.py:net_with_inputs", "--calib", "wrong_shape.pt"], 1,
         "fxqbn: error: calibration batch 0 (2, 4, 8, 8) does not fit the model: RuntimeError: Given groups=1"),
        (["m.py:two", "--input-shape", "2,3,4,4", "--input-shape", "2,3,4,4", "--calib", "calib.pt"], 1,
         "fxqbn: error: batch 0 of calibration file calib.pt has 1 tensors; the model takes 2 inputs"),
        (["m.py:net_with_inputs", "--calib", "wrong_shape.pt", "--verify"], 1,
         "fxqbn: error: --verify needs a batch held out of calibration: wrong_shape.pt holds 1 batch"),
        (["m.py:net_with_inputs", "--torchscript", "x.ts", "--calib", "q.pt"], 1,
         "fxqbn: error: cannot read calibration file q.pt: it holds pickled Python objects (found torch.nn"),
    ],
)
def test_refusals_and_usage_errors_in_process(work, capsys, args, status, message):
    torch.save(torch.nn.Linear(2, 2), work / "q.pt")  # a pickled module, which weights_only refuses
    assert cli.main(["convert", *args]) == status
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(message), err


def test_report_command_refusals(work, capsys):
    assert cli.main(["report", "nothere.pt"]) == 2
    assert capsys.readouterr().err == "fxqbn report: error: nothere.pt does not exist\n"
    assert cli.main(["report", "calib.pt"]) == 1
    assert capsys.readouterr().err.startswith("fxqbn: error: calib.pt is not an fxqbn.save file")


def test_seed_chooses_the_random_batches(work, capsys):
    def scales(*extra):
        assert cli.main(["convert", "m.py:net_with_inputs", "--calib-batches", "2", "--format", "json", *extra]) == 0
        return [row["input_scale"] for row in json.loads(capsys.readouterr().out)["report"]["rows"]]

    assert scales() == scales("--seed", "0") != scales("--seed", "1")


def test_calib_folder_reads_its_pt_files_in_name_order(work, capsys):
    batches = torch.load(work / "calib.pt")
    (work / "parts").mkdir()
    torch.save(batches[2], work / "parts" / "b.pt")  # one batch: a tensor
    torch.save(batches[:2], work / "parts" / "a.pt")  # a list of batches
    (work / "parts" / "notes.txt").write_text("not calibration data")
    reports = []
    for calib in ("calib.pt", "parts"):
        assert cli.main(["convert", "m.py:net_with_inputs", "--calib", calib, "--observer", "minmax", "--format", "json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[1]["calibration"] == {"source": "parts", "batches": 3, "demo_only": False}
    assert reports[0]["report"]["rows"] == reports[1]["report"]["rows"]  # the same batches, the same qparams
    (work / "empty").mkdir()
    assert cli.main(["convert", "m.py:net_with_inputs", "--calib", "empty"]) == 2
    assert capsys.readouterr().err == "fxqbn convert: error: argument --calib: folder empty holds no .pt files (see fxqbn convert --help)\n"


# -- what a newcomer tries -------------------------------------------------------------------------


class _ClosedPipe(io.TextIOBase):
    """stdout whose reader has gone (`fxqbn convert | head -3` after head's third line)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_ends_the_command_quietly_with_status_0(work, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert cli.main(["convert", "m.py:net_with_inputs", "--calib-batches", "2"]) == 0
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().err == ""


def test_a_reader_that_stops_reading_is_no_error_in_a_shell(work):
    """`true` exits before the command writes, so every write meets the closed pipe (`| head -3` may
    stop reading only after the command wrote everything into the pipe's buffer)."""
    for args in ("--version", "convert m.py:net_with_inputs --calib-batches 2"):
        result = subprocess.run(["bash", "-c", f'"{sys.executable}" -m fxqbn {args} | true; exit "${{PIPESTATUS[0]}}"'],
                                cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
        assert (result.returncode, result.stderr) == (0, ""), args


def test_a_module_of_the_current_folder_imports_as_under_python_m(work, capsys, monkeypatch):
    (work / "mymodels.py").write_text(MODEL_FILE)
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    path = list(sys.path)
    assert cli.main(["convert", "mymodels:net_with_inputs", "--calib-batches", "2", "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)["report"]["summary"]
    assert (summary["rewritten"], summary["folded"]) == (1, 1)  # the BN after the conv folds
    assert sys.path == path  # the current folder was first only while MODEL's module was imported
    sys.modules.pop("mymodels", None)
