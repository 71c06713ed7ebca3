"""README.md's commands and outputs, checked: they cannot drift from what the code prints.

A fenced block right after ``<!-- readme-test: run -->`` is a shell session: each ``$ command`` line
runs (in bash, from a folder holding README.md and examples/, stdout and stderr together, in the
order printed), and the lines after it, up to the next ``$``, are what it must print. A trailing
``# exit N`` is the exit status it must have (default 0). Durations (``241 ms``, ``3.2 s``) match
any duration; a line ``(N more rows ...)`` stands for exactly N lines. A ``python`` block right after
``<!-- readme-test: python -->`` must run without an error or a warning. Blocks run in README order,
in one folder, so a block may read the files an earlier one wrote.

A whole model's output error (``output SQNR 29.9 dB``, ``max abs error 0.01234``) matches within
0.5 dB and 5%: it moves with the CPU's kernels. The preact example (ten logits) printed 29.9 dB and
0.01234 where README.md was written, 30.1 dB and 0.01219 on an AVX-512 machine, and 29.9 dB and
0.01238 there with ``ATEN_CPU_CAPABILITY=default``. Everything else matches exactly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- readme-test: (run|python) -->\n```[a-z]*\n(.*?)^```$", re.M | re.S)
DURATION = re.compile(r"\b\d+(?:\.\d+)? (ms|s)\b")
ELIDED = re.compile(r"^\((\d+) more (?:rows|lines)\b[^)]*\)$")
EXIT = re.compile(r"\s+# exit (\d+)$")
TOLERANCE = {"output SQNR": lambda dB: 0.5, "max abs error": lambda error: 0.05 * error}  # of a whole model's error
MODEL_ERROR = re.compile(rf"\b({'|'.join(TOLERANCE)}) (\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Step:
    kind: str  # "run": a shell command; "python": a Python block
    code: str
    expected: tuple[str, ...] = ()  # the output lines ("run")
    status: int = 0


def steps(text: str) -> list[Step]:
    """Every marked block of ``text``, as the commands to run and what they must print."""
    found = []
    for kind, body in MARKER.findall(text):
        if kind == "python":
            found.append(Step("python", body))
            continue
        for chunk in re.split(r"^\$ ", body, flags=re.M)[1:]:
            command, *output = chunk.rstrip("\n").split("\n")
            status = EXIT.search(command)
            found.append(Step("run", EXIT.sub("", command), tuple(output), int(status.group(1)) if status else 0))
    return found


def matches(expected: tuple[str, ...], actual: list[str]) -> bool:
    """Whether ``actual`` is ``expected``, durations aside, each elision standing for its count of lines."""
    i = 0
    for line in expected:
        elided = ELIDED.match(line)
        if elided:
            i += int(elided.group(1))
            continue
        if i >= len(actual) or not same_line(line, actual[i]):
            return False
        i += 1
    return i == len(actual)


def same_line(expected: str, actual: str) -> bool:
    """Whether two output lines agree, durations aside and model errors within their tolerance."""
    def masked(line: str) -> str:
        return MODEL_ERROR.sub(r"\1 <e>", DURATION.sub("<t>", line))

    def errors(line: str) -> list[tuple[str, float]]:
        return [(name, float(value)) for name, value in MODEL_ERROR.findall(line)]

    if masked(expected) != masked(actual):
        return False
    return all(abs(a - e) <= TOLERANCE[name](e) for (name, e), (_, a) in zip(errors(expected), errors(actual)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with README.md and examples/ (links to this checkout's)."""
    path = tmp_path_factory.mktemp("readme")
    (path / "examples").symlink_to(ROOT / "examples")
    (path / "README.md").symlink_to(README)
    return path


def run(step: Step, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if step.kind == "python":  # torch 2.14 warns on the README's own torch.jit.load, which fxqbn leaves alone
        command = [sys.executable, "-W", "ignore:`torch.jit.load` is deprecated:FutureWarning", "-c", step.code]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.run(["bash", "-c", step.code], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)


def test_readme_marks_its_first_command():
    commands = [step.code for step in steps(README.read_text()) if step.kind == "run"]
    assert commands[0] == "OMP_NUM_THREADS=1 fxqbn convert"
    assert any(step.kind == "python" for step in steps(README.read_text()))


def test_readme_commands_print_what_it_shows(folder):
    problems = []
    for step in steps(README.read_text()):
        result = run(step, folder)
        if step.kind == "python":
            if result.returncode != 0 or result.stderr:
                problems.append(f"python block failed ({result.returncode}):\n{step.code}\n{result.stderr}")
            continue
        actual = result.stdout.rstrip("\n").split("\n")
        if result.returncode != step.status or not matches(step.expected, actual):
            problems.append(f"$ {step.code}  (exit {result.returncode}, README says {step.status})\n" + result.stdout)
    assert not problems, "README.md is out of date:\n\n" + "\n\n".join(problems)


@pytest.mark.parametrize(
    "expected, actual, same",
    [
        (("converted in 241 ms", "b"), ["converted in 9 ms", "b"], True),
        (("a", "(2 more rows like this one)", "d"), ["a", "b", "c", "d"], True),
        (("a", "(1 more rows)", "d"), ["a", "b", "c", "d"], False),
        (("SQNR 36.7 dB",), ["SQNR 36.8 dB"], False),
        (("model output SQNR 29.9 dB; converted in 288 ms",), ["model output SQNR 30.1 dB; converted in 5 ms"], True),
        (("model output SQNR 29.9 dB",), ["model output SQNR 30.6 dB"], False),
        (("output SQNR 29.9 dB, max abs error 0.01234",), ["output SQNR 30.1 dB, max abs error 0.01219"], True),
        (("output SQNR 29.9 dB, max abs error 0.01234",), ["output SQNR 29.9 dB, max abs error 0.01334"], False),
        (("bn  38.2  -",), ["bn  38.3  -"], False),
        (("a",), ["a", "b"], False),
    ],
)
def test_matching_ignores_durations_bounds_model_errors_and_counts_elided_rows(expected, actual, same):
    assert matches(expected, actual) is same
