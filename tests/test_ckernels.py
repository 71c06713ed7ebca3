"""The C extension is optional: without it (not built, or FXQBN_NO_EXT=1) fxqbn runs the pure-torch
kernels with the same results, and says so once when it was not built."""

import subprocess
import sys

import pytest

from fxqbn import ckernels

SCRIPT = r"""
import sys, warnings
{setup}
import torch
from torch import nn
import fxqbn
from fxqbn import ckernels

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 40, 1), nn.BatchNorm2d(40), nn.ReLU(), nn.BatchNorm2d(40)).eval()
with torch.no_grad():
    for bn in (model[1], model[3]):
        bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2); bn.weight.uniform_(-2, 2)
observed = fxqbn.prepare(model, (torch.randn(1, 3, 6, 6),))
with torch.no_grad():
    observed(torch.randn(4, 3, 6, 6) * 3)
native, fused = fxqbn.convert(observed), fxqbn.convert(observed, backend="fused")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for x in (torch.randn(2, 3, 6, 6) * 4, torch.randn(3, 3, 5, 7).contiguous(memory_format=torch.channels_last)):
        for _ in range(2):
            assert torch.equal(fused(x), native(x))
print("EXT", ckernels.EXT is not None)
print("WARNINGS", [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
"""
BLOCK_EXTENSION = "sys.modules['fxqbn._ckernels'] = None  # as if the build had failed: importing it raises ImportError"


def run(setup: str, env: dict[str, str]) -> list[str]:
    import os

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(setup=setup)], capture_output=True, text=True, env=full_env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_fxqbn_no_ext_runs_the_torch_kernels_with_the_same_results_and_no_warning():
    assert run("", {"FXQBN_NO_EXT": "1"}) == ["EXT False", "WARNINGS []"]


def test_a_missing_build_warns_once_and_gives_the_same_results():
    lines = run(BLOCK_EXTENSION, {"FXQBN_NO_EXT": "0"})
    assert lines[0] == "EXT False"
    assert lines[1].count("fxqbn.fused: the C extension fxqbn._ckernels is not built") == 1
    assert "same results, slower" in lines[1] and "C compiler" in lines[1]


def test_an_out_of_date_build_is_not_used_and_says_so_once():
    lines = run("import types; sys.modules['fxqbn._ckernels'] = types.ModuleType('fxqbn._ckernels')  # no entry points",
                {"FXQBN_NO_EXT": "0"})
    assert lines[0] == "EXT False"
    assert lines[1].count("fxqbn._ckernels is out of date (it has no bn, mismatches, quantize, dequantize, isa)") == 1


@pytest.mark.skipif(ckernels.EXT is None, reason=f"no C kernels in this process: {ckernels.WHY_NOT}")
def test_the_built_extension_runs_and_agrees():
    assert run("", {"FXQBN_NO_EXT": "0"}) == ["EXT True", "WARNINGS []"]
