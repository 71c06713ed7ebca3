"""Every script in examples/ runs (as `python examples/NAME.py`), and converts with the command too."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxqbn import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> (its report's summary line, the statuses of its rows by pattern)
# (fxqbn.prepare folds a BN after the conv feeding it alone: as torch.ao's prepare_fx folds 8 of preact_resnet's 17)
SCRIPTS = {
    "quickstart.py": ("1 rewritten, 1 folded, 0 skipped", {"BatchNorm2d+ReLU": {"rewritten"}, "BatchNorm2d": {"folded"}}),
    "densenet_bc.py": ("15 rewritten, 12 folded, 12 skipped", {"BatchNorm2d+ReLU": {"rewritten"}, "BatchNorm2d": {"folded", "skipped"}}),
    "preact_resnet.py": ("9 rewritten, 8 folded, 0 skipped", {"BatchNorm2d+ReLU": {"rewritten"}, "BatchNorm2d": {"folded"}}),
    "cnn3d.py": ("15 rewritten, 0 skipped", {"BatchNorm3d+ReLU": {"rewritten"}, "BatchNorm3d": {"rewritten"}}),
    "tabular_mlp.py": ("4 rewritten, 0 skipped", {"BatchNorm1d": {"rewritten"}, "BatchNorm1d+ReLU": {"rewritten"}}),
}
# the command each example's docstring shows (`fxqbn convert examples/NAME.py:build`), with fewer calibration batches
COMMANDS = {
    "quickstart.py": [],
    "densenet_bc.py": ["--skip", "features.4"],
    "preact_resnet.py": [],
    "cnn3d.py": ["--no-fold"],
    "tabular_mlp.py": ["--no-fold"],
}


def test_every_example_is_listed_here():
    assert {path.name for path in EXAMPLES.glob("*.py")} == set(SCRIPTS)
    assert set(COMMANDS) == set(SCRIPTS)


def report_rows(stdout: str) -> list[list[str]]:
    """The rows of a plain report table: the lines between the dashes and the summary; each fits 100 columns."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"-+(  -+)+", line)) + 1
    end = next(i for i, line in enumerate(lines) if re.match(r"\d+ rewritten, (\d+ folded, )?\d+ skipped; ", line))
    assert all(len(line) <= 100 for line in lines[start - 2:end + 2])
    return [line.split() for line in lines[start:end] if not line.startswith(" ")]  # not a wrapped reason's next line


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_script_runs(name, tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warning: fxqbn filters the quantized-tensor deprecation it triggers knowingly
    summary, statuses = SCRIPTS[name]
    assert any(line.startswith(summary + "; ") for line in result.stdout.splitlines())
    seen: dict[str, set[str]] = {}
    for row in report_rows(result.stdout):
        pattern = row[1]  # the default table: BN, pattern, status, ...
        seen.setdefault(pattern, set()).add(next(status for status in ("rewritten", "folded", "skipped") if status in row))
    assert seen == statuses
    sqnr = float(re.search(r"model output SQNR ([\d.]+) dB", result.stdout).group(1))
    assert sqnr > 20


@pytest.mark.parametrize("name", COMMANDS)
def test_example_converts_with_the_command(name, capsys):
    args = ["convert", f"{EXAMPLES / name}:build", *COMMANDS[name], "--calib-batches", "2", "--verify", "--format", "json"]
    assert cli.main(args) == 0
    document = json.loads(capsys.readouterr().out)
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (\w+)", SCRIPTS[name][0]))
    summary = document["report"]["summary"]
    assert {kind: summary[kind] for kind in ("rewritten", "folded", "skipped")} == {"folded": 0, **counts}
    verification = document["verification"]
    assert verification["sqnr_db"] > 15 and verification["max_abs_error"] > 0
