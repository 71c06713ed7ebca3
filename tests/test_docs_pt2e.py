"""docs/pt2e.md's Python blocks run as written, and the first prints the report the page shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "pt2e.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```$", PAGE, re.MULTILINE | re.DOTALL)
# The first block's output: the indented lines after "Its output", up to the next blank line.
SHOWN = re.search(r"^Its output[^\n]*\n\n((?:    [^\n]*\n)+)", PAGE, re.MULTILINE).group(1)
DURATION = re.compile(r"\b\d+(?:\.\d+)? (ms|s)\b")
SQNR = re.compile(r"output SQNR (-?\d+\.\d) dB")

try:
    import torchao  # noqa: F401
    MISSING = ""
except ImportError as exc:
    MISSING = f"docs/pt2e.md's blocks need torchao ({exc})"


def run_block(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.skipif(bool(MISSING), reason=MISSING or "-")
@pytest.mark.parametrize("index", range(1, len(BLOCKS)))  # the first: below, with its output
def test_block_runs(index, tmp_path):
    done = run_block(BLOCKS[index], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(bool(MISSING), reason=MISSING or "-")
def test_first_block_prints_the_report_shown(tmp_path):
    done = run_block(BLOCKS[0], tmp_path)
    printed = [DURATION.sub("#", line) for line in done.stdout.strip().splitlines()]
    shown = [DURATION.sub("#", line[4:]) for line in SHOWN.strip("\n").splitlines()]
    assert [SQNR.sub("", line) for line in printed] == [SQNR.sub("", line) for line in shown]
    assert abs(float(SQNR.search(done.stdout).group(1)) - float(SQNR.search(SHOWN).group(1))) <= 0.5
