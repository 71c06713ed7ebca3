"""How long fxqbn.prepare / fxqbn.convert take against torch.ao's prepare_fx / convert_fx.

    python benchmarks/pass_speed.py [--sizes 100 400 1000] [--repeats 3]

One table: for BN chains of N BatchNorms (mixing BN, BN+ReLU and adds), each tool's median time
to prepare and to convert (MinMaxObserver, one calibration batch), the graph's node count, and
the ratios. Each run starts after a full garbage collection; convert and convert_fx runs alternate. torch.ao gets a BN-only QConfigMapping (BatchNorm2d, nn.ReLU). Runs on one thread.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings

import torch
from tabulate import tabulate
from torch import nn
from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping, default_weight_observer
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fxqbn

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


class BNChain(nn.Module):
    """N BatchNorms: every third followed by ReLU, every fifth output averaged with the last skip."""

    def __init__(self, n: int, channels: int = 4) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(n))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x
        for i, bn in enumerate(self.bns):
            x = bn(x)
            if i % 3 == 0:
                x = self.relu(x)
            if i % 5 == 4:
                x = (x + skip) * 0.5
                skip = x
        return x


def timed(fn, repeats, setup=lambda: None):
    """Median wall time of ``fn(setup())`` over ``repeats`` runs; the setup and a full garbage
    collection happen before each run, outside the timing."""
    times, result = [], None
    for _ in range(repeats):
        arg = setup()
        gc.collect()
        start = time.perf_counter()
        result = fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(n: int, repeats: int) -> list:
    model = BNChain(n).eval()
    x = torch.randn(1, 4, 4, 4)
    qconfig = QConfig(activation=MinMaxObserver, weight=default_weight_observer)
    mapping = QConfigMapping().set_object_type(nn.BatchNorm2d, qconfig).set_object_type(nn.ReLU, qconfig)

    ours_prepare, observed = timed(lambda _: fxqbn.prepare(model, (x,), MinMaxObserver), repeats)
    ao_prepare, ao_observed = timed(lambda m: prepare_fx(m, mapping, (x,)), repeats, lambda: copy.deepcopy(model))
    with torch.no_grad():
        observed(x)
        ao_observed(x)
    ours, theirs = [], []
    for _ in range(repeats):  # interleaved: the machine's load hits both alike
        ours.append(timed(lambda _: fxqbn.convert(observed), 1)[0])
        theirs.append(timed(convert_fx, 1, lambda: copy.deepcopy(ao_observed))[0])  # convert_fx works in place: on a copy
    ours_convert, ao_convert = statistics.median(ours), statistics.median(theirs)
    nodes = len(observed.graph.nodes)
    return [
        n, nodes,
        f"{ours_prepare * 1000:.0f}", f"{ao_prepare * 1000:.0f}", f"{ao_prepare / ours_prepare:.1f}x",
        f"{ours_convert * 1000:.0f}", f"{ao_convert * 1000:.0f}", f"{ao_convert / ours_convert:.1f}x",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 400, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sys.setrecursionlimit(20000)
    rows = [measure(n, args.repeats) for n in args.sizes]
    headers = ["BNs", "nodes", "fxqbn prepare ms", "prepare_fx ms", "speedup",
               "fxqbn convert ms", "convert_fx ms", "speedup"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    small, large = rows[0], rows[-1]
    for col, name in ((2, "prepare"), (5, "convert")):
        growth = float(large[col]) / float(small[col])
        print(f"fxqbn {name}: {large[0]} BNs take {growth:.1f}x the time of {small[0]} BNs ({large[0] / small[0]:.0f}x the BNs)")


if __name__ == "__main__":
    main()
