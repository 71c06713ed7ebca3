"""The `fxqbn` command, run as `python -m fxqbn` in a subprocess: each option, each exit status, each message.

Refusals that need no separate process (they go through the same `main`) run in-process, which keeps the
suite quick on small machines.
"""

import csv
import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
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
        if isinstance(m, nn.BatchNorm2d):
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


def not_a_module():
    return 3
'''

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread a process: the suite runs on small machines

# torch.jit.load of the --torchscript file: TorchScript is deprecated in torch 2.13.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:DeprecationWarning")


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


def fxqbn_on_a_terminal(*args, cwd):
    """Run the command with stderr on a pseudo-terminal (where a progress bar shows); (status, stdout, stderr)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    proc = subprocess.Popen([sys.executable, "-m", "fxqbn", *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=follower)
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
    os.close(leader)
    stdout = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=600), stdout, b"".join(chunks).decode(errors="replace")


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
    assert any(line.startswith("21 rewritten, 0 skipped; ") for line in lines)
    assert sum("quantized::batch_norm2d_relu  rewritten" in line for line in lines) == 21
    verification = next(line for line in lines if line.startswith("verification on a held-out batch (1, 3, 32, 32)"))
    sqnr = float(verification.split("output SQNR ")[1].split(" dB")[0])
    assert sqnr > 25
    assert lines[-1].startswith("latency, median of 20 runs: float ") and lines[-1].endswith(" ms")
    assert result.stderr == ""  # no warnings, and no progress bar off a terminal


def test_console_script_is_the_same_main():
    (script,) = metadata.entry_points(group="console_scripts", name="fxqbn")
    assert script.value == "fxqbn.cli:main" and script.load() is cli.main


# -- options -------------------------------------------------------------------------------------


def test_json_with_calibration_file_observer_dtype_skip_and_every_output(work):
    result = fxqbn_command(
        "convert", "m.py:net_with_inputs", "--calib", "calib.pt", "--verify", "--observer", "minmax", "--dtype", "qint8",
        "--skip", "block", "--out", "q.pt", "--torchscript", "q.ts", "--report", "report.json", "--format", "json",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["saved: q.pt", "torchscript: q.ts", "report: report.json"]
    document = json.loads(result.stdout)
    assert (work / "report.json").read_text() == result.stdout
    assert document["calibration"] == {"source": "calib.pt", "batches": 2, "demo_only": False}  # 3rd batch held out
    assert (document["observer"], document["dtype"], document["skip"]) == ("minmax", "qint8", ["block"])
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


def test_report_command_prints_a_saved_report(work):
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
    assert result.stdout.startswith("| node ") and result.stderr == ""


def test_progress_bar_on_a_terminal_and_quiet(work):
    status, stdout, terminal = fxqbn_on_a_terminal("convert", "m.py:net_with_inputs", "--calib-batches", "3", cwd=work)
    assert status == 0
    assert "calibrating" in terminal and "3/3" in terminal
    assert "2 rewritten, 0 skipped; " in stdout

    status, stdout, terminal = fxqbn_on_a_terminal(
        "convert", "m.py:net_with_inputs", "--calib-batches", "3", "--quiet", "--format", "github", "--report", "r.md", cwd=work,
    )
    assert (status, stdout, terminal) == (0, "", "")
    written = (work / "r.md").read_text().splitlines()  # --quiet silences the terminal, not --report
    assert written[0].startswith("model: m.py:net_with_inputs") and written[1].startswith("calibration: 3 random")
    assert written[2].startswith("| node ") and written[4].startswith("| bn ") and written[-1].startswith("2 rewritten, 0 skipped; ")


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
    assert capsys.readouterr().err == "fxqbn convert: error: argument --calib: folder empty holds no .pt files\n"
