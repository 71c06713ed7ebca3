"""Instructions one fxqbn.convert and one torch.ao convert_fx execute, counted by valgrind: a
measure the machine's load does not move, beside pass_speed.py's wall times (same models).

    python benchmarks/pass_instructions.py [--sizes 1000] [--models chain conv] [--jobs 2]

Each count is one process under ``valgrind --tool=callgrind`` (about a minute at 1,000 BNs): it
builds and calibrates the model, converts once to warm up, then counts one more convert (fxqbn:
the same observed model; convert_fx: a fresh deep copy, as it works in place). Collection is
switched on and off around that call by a ten-line C extension this script compiles (callgrind's
client request), so it needs valgrind, its headers and a C compiler. One thread, fixed hash seed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

_TOGGLE_C = r"""
#include <Python.h>
#include <valgrind/callgrind.h>
static PyObject* toggle(PyObject* self, PyObject* args) { CALLGRIND_TOGGLE_COLLECT; Py_RETURN_NONE; }
static PyMethodDef methods[] = {{"toggle", toggle, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "cgtoggle", NULL, -1, methods};
PyMODINIT_FUNC PyInit_cgtoggle(void) { return PyModule_Create(&module); }
"""


def build_toggle(folder: Path) -> None:
    """``cgtoggle.toggle()``, compiled into ``folder``."""
    source = folder / "cgtoggle.c"
    source.write_text(_TOGGLE_C)
    target = folder / f"cgtoggle{sysconfig.get_config_var('EXT_SUFFIX')}"
    include = sysconfig.get_paths()["include"]
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", f"-I{include}", str(source), "-o", str(target)], check=True)


def child(kind: str, n: int, tool: str) -> None:
    """Runs under valgrind: set up, warm up, count one conversion."""
    import copy
    import gc
    import warnings

    import torch
    from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping, default_weight_observer
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    import cgtoggle
    import fxqbn
    from pass_speed import MODELS

    warnings.filterwarnings("ignore")
    cls, observed_types = MODELS[kind]
    model, x = cls(n).eval(), torch.randn(1, 4, 4, 4)
    if tool == "fxqbn":
        observed = fxqbn.prepare(model, (x,), MinMaxObserver)
        run, fresh = fxqbn.convert, lambda: observed
    else:
        mapping = QConfigMapping()
        for observed_type in observed_types:
            mapping = mapping.set_object_type(observed_type, QConfig(activation=MinMaxObserver, weight=default_weight_observer))
        observed = prepare_fx(model, mapping, (x,))
        run, fresh = convert_fx, lambda: copy.deepcopy(observed)
    with torch.no_grad():
        observed(x)
    run(fresh())
    arg = fresh()
    gc.collect()
    cgtoggle.toggle()
    run(arg)
    cgtoggle.toggle()


def count(kind: str, n: int, tool: str, folder: Path) -> subprocess.Popen:
    out = folder / f"{kind}-{n}-{tool}.out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([str(folder), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    command = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, __file__, "--child", kind, str(n), tool]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def instructions(path: Path) -> int:
    """The event total callgrind wrote (its ``summary:`` or ``totals:`` line)."""
    match = re.search(r"^(?:summary|totals):\s*(\d+)", path.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"no instruction total in {path}: did valgrind run?")
    return int(match.group(1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000])
    parser.add_argument("--models", nargs="+", choices=["chain", "conv"], default=["chain", "conv"])
    parser.add_argument("--jobs", type=int, default=2, help="valgrind processes at once")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, n, tool = args.child
        return child(kind, int(n), tool)
    from tabulate import tabulate

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_toggle(folder)
        jobs = [(kind, n, tool) for kind in args.models for n in args.sizes for tool in ("fxqbn", "ao")]
        for start in range(0, len(jobs), args.jobs):
            running = [(job, count(*job, folder)) for job in jobs[start:start + args.jobs]]
            for job, process in running:
                if process.wait() != 0:
                    raise SystemExit(f"valgrind failed on {job}")
        rows = []
        for kind in args.models:
            for n in args.sizes:
                ours, theirs = (instructions(folder / f"{kind}-{n}-{tool}.out") for tool in ("fxqbn", "ao"))
                rows.append([kind, n, f"{ours / 1e6:.0f}", f"{theirs / 1e6:.0f}", f"{theirs / ours:.1f}x"])
    print(tabulate(rows, headers=["model", "BNs", "fxqbn convert M instr", "convert_fx M instr", "ratio"], tablefmt="github"))


if __name__ == "__main__":
    main()
