"""How long fxqbn.prepare / fxqbn.convert take against torch.ao's prepare_fx / convert_fx.

    python benchmarks/pass_speed.py [--sizes 100 400 1000] [--repeats 3] [--models chain conv]

One table: for models of N BatchNorms, each tool's median time to prepare and to convert
(MinMaxObserver, one calibration batch), the graph's node count, and the ratios. "chain": BNs one
after another (mixing BN, BN+ReLU and adds: BNs read each other's quantized output); "conv": each
BN between float convs (its quantize and dequantize per BN: one FloatIO call in fxqbn's graph, a
quantize, a BN and a dequantize node in torch.ao's, as in CNNs). Each run starts after a full
garbage collection; convert and convert_fx runs alternate (convert_fx, which works in place, on a
copy made outside its timing), and the convert speedup is the median of each adjacent pair's
ratio (a load that drifts during the run cancels). torch.ao gets a BN-only QConfigMapping
(BatchNorm2d and the activation). Runs on one thread.
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


class ConvBNs(nn.Module):
    """N (1x1 conv -> scale -> BatchNorm -> F.relu) blocks, every second one residual: each BN sits
    between float ops, so each gets its own quantize and dequantize (fxqbn: inside one FloatIO;
    torch.ao folds no conv -> BN here: the scale is between them)."""

    def __init__(self, n: int, channels: int = 4) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(n))
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = torch.relu(bn(conv(x) * 0.5))
            x = y + x if i % 2 else y
        return x


MODELS = {"chain": (BNChain, (nn.BatchNorm2d, nn.ReLU)), "conv": (ConvBNs, (nn.BatchNorm2d, torch.relu))}


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


def measure(kind: str, n: int, repeats: int) -> list:
    cls, observed_types = MODELS[kind]
    model = cls(n).eval()
    x = torch.randn(1, 4, 4, 4)
    qconfig = QConfig(activation=MinMaxObserver, weight=default_weight_observer)
    mapping = QConfigMapping()
    for observed_type in observed_types:
        mapping = mapping.set_object_type(observed_type, qconfig)

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
    speedup = statistics.median(t / o for o, t in zip(ours, theirs))  # of adjacent pairs: a drifting load cancels
    nodes = len(observed.graph.nodes)
    return [
        kind, n, nodes,
        f"{ours_prepare * 1000:.0f}", f"{ao_prepare * 1000:.0f}", f"{ao_prepare / ours_prepare:.1f}x",
        f"{ours_convert * 1000:.0f}", f"{ao_convert * 1000:.0f}", f"{speedup:.1f}x",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 400, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sys.setrecursionlimit(20000)
    rows = [measure(kind, n, args.repeats) for kind in args.models for n in args.sizes]
    headers = ["model", "BNs", "nodes", "fxqbn prepare ms", "prepare_fx ms", "speedup",
               "fxqbn convert ms", "convert_fx ms", "speedup"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    for kind in args.models:
        mine = [row for row in rows if row[0] == kind]
        small, large = mine[0], mine[-1]
        for col, name in ((3, "prepare"), (6, "convert")):
            growth = float(large[col]) / float(small[col])
            print(f"{kind}: fxqbn {name}: {large[1]} BNs take {growth:.1f}x the time of {small[1]} BNs ({large[1] / small[1]:.0f}x the BNs)")


if __name__ == "__main__":
    main()
