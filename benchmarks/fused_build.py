"""What it costs to build fused-backend modules: one FusedBatchNorm, and fxqbn.convert of a BN chain.

    OMP_NUM_THREADS=1 python benchmarks/fused_build.py [--sizes 100 1000] [--repeats 5] [--profile]

Two tables. Per module: ``FusedBatchNorm.from_tensors`` (fold, the native op on all 256 codes of
every channel, the exactness checks of both kernels) for 4, 64 and 256 channels, against the
native backend's ``fxqbn.nn.BatchNorm2d.from_tensors``, in microseconds (the fastest of 4 x repeats runs of 10). Per model:
``fxqbn.convert`` of ``benchmarks/pass_speed.py``'s BN chain (MinMax observers) with each backend,
and the fused one's cost per BN above the native one. Runs interleave the two backends, each after
a full garbage collection; the figures are the fastest run (this machine is shared).
``--profile`` prints the top of a cProfile of one fused convert of the largest chain.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import sys
import time
import warnings
from typing import Callable

import torch
from tabulate import tabulate
from torch.ao.quantization import MinMaxObserver

import fxqbn
from fxqbn import nn as qnn
from fxqbn.backends import BnTensors
from fxqbn.fused import FusedBatchNorm
from fxqbn.qparams import QParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pass_speed import BNChain  # noqa: E402

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")

QIN, QOUT = QParams(0.05, 128, torch.quint8), QParams(0.04, 120, torch.quint8)


def fastest(fns: dict[str, Callable[[], object]], repeats: int, number: int = 1) -> dict[str, float]:
    """name -> the fastest of ``repeats`` interleaved runs of ``number`` calls, seconds per call."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            for _ in range(number):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / number)
    return best


def tensors(channels: int) -> BnTensors:
    gen = torch.Generator().manual_seed(channels)
    mean, var = torch.randn(channels, generator=gen), torch.rand(channels, generator=gen) + 0.5
    weight, bias = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
    return BnTensors(mean, var, weight, bias, 1e-5, 0.1)


def module_rows(repeats: int) -> list[list[str]]:
    rows = []
    for c in (4, 64, 256):
        t = tensors(c)
        best = fastest({
            "native": lambda: qnn.BatchNorm2d.from_tensors(t.running_mean, t.running_var, t.weight, t.bias, t.eps, t.momentum,
                                                           QOUT, name="bn", checked=True),
            "fused": lambda: FusedBatchNorm.from_tensors(t, 2, True, QIN, QOUT, name="bn", checked=True),
        }, 4 * repeats, number=10)  # many short runs: on a loaded machine the fastest is the cleanest
        rows.append([c, f"{best['native'] * 1e6:.0f}", f"{best['fused'] * 1e6:.0f}", f"{best['fused'] / best['native']:.1f}x"])
    return rows


def calibrated_chain(n: int) -> torch.fx.GraphModule:
    x = torch.randn(1, 4, 4, 4)
    observed = fxqbn.prepare(BNChain(n).eval(), (x,), MinMaxObserver)
    with torch.no_grad():
        observed(x)
    return observed


def convert_rows(sizes: list[int], repeats: int) -> list[list[str]]:
    rows = []
    for n in sizes:
        observed = calibrated_chain(n)
        best = fastest({backend: lambda b=backend: fxqbn.convert(observed, backend=b) for backend in ("native", "fused")}, repeats)
        extra = (best["fused"] - best["native"]) / n * 1e6
        rows.append([n, f"{best['native'] * 1e3:.0f}", f"{best['fused'] * 1e3:.0f}", f"{best['fused'] / best['native']:.2f}x", f"{extra:.0f}"])
    return rows


def profile(n: int) -> None:
    observed = calibrated_chain(n)
    profiler = cProfile.Profile()
    profiler.runcall(fxqbn.convert, observed, backend="fused")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.setrecursionlimit(20000)
    print(f"torch {torch.__version__}; fastest of {args.repeats} interleaved runs\n")
    headers = ["channels", "native module us", "FusedBatchNorm us", "fused/native"]
    print(tabulate(module_rows(args.repeats), headers=headers, tablefmt="github", disable_numparse=True))
    print()
    headers = ["BNs", "convert native ms", "convert fused ms", "fused/native", "fused extra us per BN"]
    print(tabulate(convert_rows(args.sizes, args.repeats), headers=headers, tablefmt="github", disable_numparse=True))
    if args.profile:
        profile(max(args.sizes))


if __name__ == "__main__":
    main()
