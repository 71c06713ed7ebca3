"""README.md's and every docs/*.md page's code, checked: the pages cannot drift from what the code does.

Every ```python block of a page runs, in page order, in one namespace per page (as a reader pasting
them into one session), and must neither raise nor warn. A block that must not run is preceded by
``<!-- docs-test: skip: REASON -->`` (the reason is required). A fenced block right after
``<!-- readme-test: run -->`` (or ``<!-- docs-test: run -->``) is a shell session: each ``$ command`` line
runs in bash, stdout and stderr together, in the order printed, and the lines after it, up to the next
``$``, are what it must print. A trailing ``# exit N`` is the exit status it must have (default 0).
Durations (``241 ms``, ``3.2 s``) match any duration; a line ``(N more rows ...)`` stands for exactly N
lines. Each page runs in a folder of its own holding README.md, docs/ and examples/, so a block may read
the files an earlier block of the same page wrote. New pages are picked up as they are added.

A whole model's output error (``output SQNR 29.9 dB``, ``max abs error 0.01234``) matches within
0.5 dB and 5%: it moves with the CPU's kernels. The preact example (ten logits) printed 29.9 dB and
0.01234 where its page was written, 30.1 dB and 0.01219 on an AVX-512 machine, and 29.9 dB and
0.01238 there with ``ATEN_CPU_CAPABILITY=default``. Everything else matches exactly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUNNER = Path(__file__).resolve().parent / "page_runner.py"
BLOCK = re.compile(r"^(?:<!-- (?:readme|docs)-test: (run|python|skip)(?::\s*(.*?))? -->\n)?```([a-z]*)\n(.*?)^```$", re.M | re.S)
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
    """Every block of ``text`` that runs, in order, as the commands to run and what they must print."""
    found = []
    for marker, reason, language, body in BLOCK.findall(text):
        if marker == "skip":
            if not reason.strip():
                raise ValueError(f"a skipped block needs its reason (<!-- docs-test: skip: REASON -->):\n{body}")
            continue
        if language == "python":
            found.append(Step("python", body))
        elif marker == "run":
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


def run_page(page: Path, folder: Path) -> list[tuple[Step, dict]]:
    """Run ``page``'s steps in ``folder`` (one process: one Python namespace); each step with its result."""
    for name in ("README.md", "docs", "examples"):
        (folder / name).symlink_to(ROOT / name)
    page_steps = steps(page.read_text())
    (folder / ".steps.json").write_text(json.dumps([{"kind": s.kind, "code": s.code} for s in page_steps]))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(RUNNER), ".steps.json", ".results.json"], cwd=folder, env=env, check=True, timeout=1800)
    return list(zip(page_steps, json.loads((folder / ".results.json").read_text())))


def problems(results: list[tuple[Step, dict]]) -> list[str]:
    found = []
    for step, result in results:
        if step.kind == "python":
            if result["status"]:
                found.append(f"python block failed:\n{step.code}\n{result['output']}")
            continue
        actual = result["output"].rstrip("\n").split("\n")
        if result["status"] != step.status or not matches(step.expected, actual):
            found.append(f"$ {step.code}  (exit {result['status']}, the page says {step.status})\n" + result["output"])
    return found


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_runs_as_written(page, tmp_path):
    found = problems(run_page(page, tmp_path))
    assert not found, f"{page.relative_to(ROOT)} is out of date:\n\n" + "\n\n".join(found)


def test_readme_opens_with_its_two_commands_and_runs_its_first():
    text = README.read_text()
    first = text.split("```")[1].strip().splitlines()
    assert first[0].startswith("pip install ") and first[0].endswith(" && fxqbn convert")
    assert first[1].startswith("pip install ") and first[1].endswith("&& python -m pytest -q -rs")
    assert [step.code for step in steps(text) if step.kind == "run"][0] == "OMP_NUM_THREADS=1 fxqbn convert"
    assert any(step.kind == "python" for step in steps(text))


def test_ci_runs_the_test_command_readme_gives():
    command = README.read_text().split("```")[1].strip().splitlines()[1].split("&& ", 1)[1]
    ci = (ROOT / ".ci" / "run").read_text()
    arguments = command.removeprefix("python ")  # "-m pytest ..."
    assert ci.count(f"python3 {arguments}\n") == 1 and ci.count(f'"$venv214/bin/python" {arguments}\n') == 1


def test_every_python_block_runs_or_says_why_not():
    with pytest.raises(ValueError, match="needs its reason"):
        steps("<!-- docs-test: skip -->\n```python\nx = 1\n```\n")
    assert steps("<!-- docs-test: skip: needs a GPU -->\n```python\nx = 1\n```\n```python\ny = 2\n```\n") == [Step("python", "y = 2\n")]
    assert [s.kind for s in steps("```console\n$ true\n```\n<!-- docs-test: run -->\n```console\n$ true\n```\n")] == ["run"]


def test_a_page_runs_its_python_blocks_in_one_namespace(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 41\n```\n<!-- docs-test: run -->\n```console\n$ echo hi\nhi\n```\n"
                    "```python\nassert x + 1 == 42\nimport warnings\n```\n```python\nwarnings.warn('a page warns')\n```\n")
    folder = tmp_path / "run"
    folder.mkdir()
    results = run_page(page, folder)
    assert [r["status"] for _, r in results] == [0, 0, 0, 1]
    assert problems(results[:3]) == [] and "a page warns" in problems(results)[0]


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
