"""Run one documentation page's steps in order, in the current folder: ``python page_runner.py STEPS RESULTS``.

STEPS is a JSON list of ``{"kind": "run" | "python", "code": ...}``; RESULTS gets, per step, ``{"status",
"output"}``. A ``run`` step is a bash command (stdout and stderr together, in the order printed); every
``python`` step runs in one namespace, as the page's reader would paste them into one session: its
status is 1 when it raised or warned (the output then holds the traceback or the warnings), except for
the warnings a block names in a "# warns: Category" comment, which it must give. Used by
tests/test_docs.py; it imports no test framework.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
import re
import warnings

# Warnings a page's own calls may meet, which fxqbn does not raise and must not hide from its users:
# torch's deprecation of quantized tensors and of torch.ao.quantization (pytorch#184982; pyproject.toml
# ignores the same in pytest) and of TorchScript loading (torch 2.13 / 2.14).
IGNORED = (
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation functions",
    r"torch\.ao\.quantization is deprecated",
    r"`torch\.jit\.load` is deprecated",
    r"Please use quant_min and quant_max to specify the range for observers",
    r"`torch\.jit\.script_method` is deprecated",  # raised by torchao's import
)


def run_python(code: str, namespace: dict) -> dict:
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        warnings.simplefilter("always")
        for message in IGNORED:
            warnings.filterwarnings("ignore", message=message)
        try:
            exec(compile(code, "<page block>", "exec"), namespace)
        except BaseException:  # noqa: BLE001 - the page's error is the result
            return {"status": 1, "output": out.getvalue() + traceback.format_exc()}
    expected = set(re.findall(r"# warns: (?:\w+\.)*(\w+)", code))  # a block that shows a warning names it: "# warns: fxqbn.AccuracyWarning"
    unexpected = [w for w in caught if w.category.__name__ not in expected]
    missing = expected - {w.category.__name__ for w in caught}
    if unexpected or missing:
        said = "".join(f"warning: {w.category.__name__}: {w.message}\n" for w in unexpected)
        return {"status": 1, "output": out.getvalue() + said + "".join(f"expected warning not given: {m}\n" for m in sorted(missing))}
    return {"status": 0, "output": out.getvalue()}


def run_command(code: str) -> dict:
    done = subprocess.run(["bash", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return {"status": done.returncode, "output": done.stdout}


def main(steps_path: str, results_path: str) -> None:
    namespace: dict = {"__name__": "__page__"}
    results = []
    for step in json.load(open(steps_path)):
        results.append(run_python(step["code"], namespace) if step["kind"] == "python" else run_command(step["code"]))
    json.dump(results, open(results_path, "w"))


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # as `python` in the page's folder would have it
    main(*sys.argv[1:])
