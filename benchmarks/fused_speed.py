"""Speed of quantized BatchNorm: float vs torch.ao (BN-only) vs fxqbn native vs fxqbn fused.

    python benchmarks/fused_speed.py            # both tables, 1 thread (a few minutes on 2 cores)
    python benchmarks/fused_speed.py --quick    # fewer repeats, for a smoke run

Prints two markdown tables: single BN kernels (one quantized BN module on codes, against float
BatchNorm on floats) and whole models (float input -> float output, boundaries included). Times are
the median of interleaved repeats with the interquartile range; ratios are medians over medians.
The fused kernels are compiled before timing; their first-call cost is printed separately.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn

import fxqbn
from fxqbn import fused, qops
from fxqbn.qparams import QParams

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")


# -- models ------------------------------------------------------------------------------------------


class BNChain(nn.Module):
    """Four BatchNorm2d, two of them followed by ReLU: nothing but BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(4))

    def forward(self, x):
        for i, bn in enumerate(self.bns):
            x = torch.relu(bn(x)) if i % 2 else bn(x)
        return x


class Small3d(nn.Module):
    """Conv3d -> BN3d+ReLU, twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(3, 16, 3, padding=1), nn.BatchNorm3d(16)
        self.conv2, self.bn2 = nn.Conv3d(16, 16, 3, padding=1), nn.BatchNorm3d(16)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class DenseBlock(nn.Module):
    """DenseNet-style: each layer is BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 on the concatenation so far."""

    def __init__(self, c: int = 16, growth: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(layers):
            cin = c + i * growth
            self.layers.append(nn.Sequential(
                nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1),
                nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1),
            ))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


@dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]  # without the batch dimension


MODELS = [
    ModelCase("BN chain C=8 56x56", lambda: BNChain(8), (8, 56, 56)),
    ModelCase("BN chain C=64 28x28", lambda: BNChain(64), (64, 28, 28)),
    ModelCase("3-D CNN C=16 8x16x16", Small3d, (3, 8, 16, 16)),
    ModelCase("dense block C=16..32 28x28", DenseBlock, (16, 28, 28)),
]
KERNELS = [(1, 8, 56, 56), (16, 8, 56, 56), (32, 16, 28, 28), (32, 64, 28, 28), (32, 256, 14, 14)]
BATCHES = (1, 32)
LAYOUTS = ("NCHW", "channels_last")


# -- timing ------------------------------------------------------------------------------------------


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Interleaved repeats; each sample runs enough calls for ~5 ms. -> name: (median ms, IQR ms)."""
    calls = {}
    with torch.no_grad():
        for name, fn in fns.items():
            fn()
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < 0.005:
                fn()
                n += 1
            calls[name] = max(n, 1)
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                samples[name].append((time.perf_counter() - start) / calls[name] * 1e3)
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4)
        out[name] = (statistics.median(values), q[2] - q[0])
    return out


def fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.3f} ±{ms[1]:.3f}"


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "NCHW" or x.dim() not in (4, 5):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


# -- the two tables ----------------------------------------------------------------------------------


def kernel_table(repeats: int) -> list[list[str]]:
    rows = []
    for shape in KERNELS:
        c = shape[1]
        bn = nn.BatchNorm2d(c).eval()
        with torch.no_grad():
            bn.running_var.uniform_(0.5, 2)
            bn.running_mean.uniform_(-1, 1)
        qin, qout = QParams(0.05, 128, torch.quint8), QParams(0.04, 120, torch.quint8)
        module = fused.FusedBatchNorm.from_bn(bn, 2, False, qin, qout)
        weight, bias = bn.weight.detach(), bn.bias.detach()
        for name in LAYOUTS:
            xf = layout(torch.randn(shape), name)
            codes = fused.quantize(xf, qin.scale, qin.zero_point, qin.dtype)
            xq = qops.quantize(xf, qin.scale, qin.zero_point, qin.dtype)
            t = timed({
                "float": lambda: bn(xf),
                "native": lambda: qops.batch_norm(xq, weight, bias, bn.running_mean, bn.running_var, bn.eps, qout.scale, qout.zero_point, 2, False),
                "fused": lambda: module(codes),
            }, repeats)
            rows.append([str(shape), name, fmt(t["float"]), fmt(t["native"]), fmt(t["fused"]),
                         f"{t['native'][0] / t['fused'][0]:.1f}x", f"{t['float'][0] / t['fused'][0]:.2f}x"])
    return rows


def calibrated(model: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, ...]:
    from torch.ao.quantization import QConfig, QConfigMapping, default_weight_observer
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    data = [torch.randn(4, *shape) for _ in range(4)]
    observed = fxqbn.prepare(model, (data[0],))
    mapping = QConfigMapping()
    qconfig = QConfig(activation=fxqbn.DEFAULT_OBSERVER, weight=default_weight_observer)
    for op in (nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, torch.relu, nn.functional.relu):  # BN, and ReLUs it fuses
        mapping = mapping.set_object_type(op, qconfig)
    try:
        ao = prepare_fx(model, mapping, (data[0],))
    except LookupError:  # torch.ao cannot fuse BN+ReLU next to an unquantized conv with a BN-only mapping
        ao = None
    with torch.no_grad():
        for x in data:
            observed(x)
            if ao is not None:
                ao(x)
    return fxqbn.convert(observed), fxqbn.convert(observed, backend="fused"), (convert_fx(ao) if ao is not None else None)


def model_table(repeats: int) -> tuple[list[list[str]], list[str]]:
    rows, first_calls = [], []
    for case in MODELS:
        torch.manual_seed(0)
        model = case.build().eval()
        native, fused_model, ao = calibrated(model, case.shape)
        for batch in BATCHES:
            for name in LAYOUTS:
                x = layout(torch.randn(batch, *case.shape), name)
                start = time.perf_counter()
                with torch.no_grad():
                    fused_model(x)
                first_calls.append(f"{case.name}, batch {batch}, {name}: {time.perf_counter() - start:.2f} s")
                fns = {"float": lambda: model(x), "torch.ao": lambda: ao(x), "native": lambda: native(x),
                       "fused": lambda: fused_model(x)}
                if ao is None:
                    del fns["torch.ao"]
                t = timed(fns, repeats)
                ao_ms = fmt(t["torch.ao"]) if ao is not None else "fails"
                rows.append([case.name, batch, name, fmt(t["float"]), ao_ms, fmt(t["native"]), fmt(t["fused"]),
                             f"{t['native'][0] / t['fused'][0]:.1f}x", f"{t['float'][0] / t['fused'][0]:.2f}x"])
    return rows, first_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 15")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 15
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
          f"median ms ±IQR of {repeats} interleaved repeats\n")
    start = time.perf_counter()
    with torch.no_grad():
        fused.FusedBatchNorm.from_bn(nn.BatchNorm2d(8).eval(), 2, False, QParams(0.1, 0, torch.quint8),
                                     QParams(0.1, 0, torch.quint8))(torch.zeros(1, 8, 4, 4, dtype=torch.uint8))
    print(f"first fused call in this process (compiles the word kernel): {time.perf_counter() - start:.1f} s\n")
    headers = ["BN input", "layout", "float BN ms", "native ms", "fused ms", "native/fused", "float/fused"]
    print(tabulate(kernel_table(repeats), headers=headers, tablefmt="github"))
    print()
    rows, first_calls = model_table(repeats)
    headers = ["model", "batch", "layout", "float ms", "torch.ao ms", "native ms", "fused ms", "native/fused", "float/fused"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print("\nfirst call of each fused model (compiling new kernels or shapes):")
    for line in first_calls:
        print("  " + line)


if __name__ == "__main__":
    main()
