"""Speed of quantized BatchNorm: float vs torch.ao (BN-only) vs fxqbn native vs fxqbn fused (C kernels).

    python benchmarks/fused_speed.py            # every table, 1 and 2 threads (several minutes on 2 cores)
    python benchmarks/fused_speed.py --quick    # fewer shapes and repeats, for a smoke run
    python benchmarks/fused_speed.py --best     # ratios of the fastest rounds (for a machine others load)
    OMP_NUM_THREADS=1 python benchmarks/fused_speed.py --tables boundaries --threads 1   # quantize/dequantize only

Prints three markdown tables: the BN map on codes (float BatchNorm on floats, the native op, the fused
C kernel and a uint8 ``copy_`` of the same size, as ratios to float BN), the boundaries (fused
quantize/dequantize against torch's), and whole models (float input -> float output). Times are the
medians of interleaved rounds (A B C A B C ...), so that load from other jobs hits every column alike;
the ratios are what to read on a shared machine. The boundaries take well under a millisecond, so
their table is always the fastest of many short interleaved rounds (``BOUNDARY_ROUNDS``).
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
from fxqbn import ckernels, fused, qops
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
KERNELS = [(1, 8, 4, 4), (1, 8, 56, 56), (16, 8, 56, 56), (32, 16, 28, 28), (32, 64, 28, 28), (32, 256, 14, 14),
           (8, 16, 8, 28, 28)]  # the shapes of ../shared/KERNEL_FACTS.md, and a tiny one that shows the per-call cost
QUICK_KERNELS = [(1, 8, 4, 4), (16, 8, 56, 56), (32, 64, 28, 28), (32, 256, 14, 14)]
BOUNDARY_SHAPES = [(16, 8, 56, 56), (32, 64, 28, 28)]
BOUNDARY_ROUNDS, BOUNDARY_CALLS = 40, 3  # the boundary table: the fastest of 40 interleaved rounds of 3 calls
BATCHES = (1, 32)
LAYOUTS = ("NCHW", "channels_last")


# -- timing ------------------------------------------------------------------------------------------


class Timings(dict):
    """name -> per-round times (ms) of interleaved rounds."""

    best = False  # --best: the fastest round of each (what the code costs when nothing else runs)

    def ms(self, name: str) -> float:
        return min(self[name]) if self.best else statistics.median(self[name])

    def ratio(self, name: str, base: str) -> float:
        """The median over rounds of name/base within one round (load that hits a round hits both),
        or with --best the ratio of the fastest rounds."""
        if self.best:
            return min(self[name]) / min(self[base])
        return statistics.median(a / b for a, b in zip(self[name], self[base]))


def timed(fns: dict[str, Callable[[], object]], repeats: int, calls: int | None = None) -> Timings:
    """Interleaved rounds (A B C A B C ...); each sample runs ``calls`` calls, or enough for ~4 ms."""
    with torch.no_grad():
        counts = {name: _calls(fn, calls) for name, fn in fns.items()}
        samples = Timings({name: [] for name in fns})
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(counts[name]):
                    fn()
                samples[name].append((time.perf_counter() - start) / counts[name] * 1e3)
    return samples


def _calls(fn: Callable[[], object], calls: int | None) -> int:
    """``calls``, or as many calls as take ~4 ms; ``fn`` runs once first either way (a warm-up)."""
    fn()
    if calls:
        return calls
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.004:
        fn()
        n += 1
    return max(n, 1)


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "NCHW" or x.dim() not in (4, 5):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


# -- the tables ----------------------------------------------------------------------------------------


def bn_case(shape: tuple[int, ...]) -> tuple[nn.Module, fused.FusedBatchNorm, QParams, QParams]:
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm3d)(shape[1]).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 2)
    qin, qout = QParams(0.05, 128, torch.quint8), QParams(0.04, 120, torch.quint8)
    return bn, fused.FusedBatchNorm.from_bn(bn, len(shape) - 2, True, qin, qout), qin, qout


def kernel_table(shapes: list[tuple[int, ...]], threads: tuple[int, ...], repeats: int) -> list[list[str]]:
    rows = []
    for shape in shapes:
        bn, module, qin, qout = bn_case(shape)
        weight, bias, dim = bn.weight.detach(), bn.bias.detach(), len(shape) - 2
        for name in LAYOUTS:
            xf = layout(torch.randn(shape), name)
            codes = fused.quantize(xf, qin.scale, qin.zero_point, qin.dtype)
            xq, target = qops.from_codes(codes, qin.scale, qin.zero_point), torch.empty_like(codes)
            for n in threads:
                torch.set_num_threads(n)
                t = timed({
                    "float": lambda: bn(xf),
                    "native": lambda: qops.batch_norm(xq, weight, bias, bn.running_mean, bn.running_var, bn.eps, qout.scale, qout.zero_point, dim, True),
                    "fused": lambda: module(codes),
                    "copy": lambda: target.copy_(codes),
                }, repeats)
                rows.append([str(shape), name, n, f"{t.ms('float'):.3f}", f"{t.ratio('native', 'float'):.2f}x",
                             f"{t.ratio('fused', 'float'):.2f}x", f"{t.ratio('copy', 'float'):.2f}x",
                             f"{t.ratio('fused', 'copy'):.1f}", f"{t.ratio('native', 'fused'):.1f}x"])
    return rows


def boundary_table(shapes: list[tuple[int, ...]], threads: tuple[int, ...]) -> list[list[str]]:
    """fused.quantize / fused.dequantize against torch.quantize_per_tensor / Tensor.dequantize() on the
    same input, quint8 and qint8: the fastest of ``BOUNDARY_ROUNDS`` interleaved rounds (whatever --best says)."""
    rows = []
    for shape in shapes:
        for name in LAYOUTS:
            xf = layout(torch.randn(shape), name)
            for dtype, zero_point in ((torch.quint8, 128), (torch.qint8, 0)):
                xq = torch.quantize_per_tensor(xf, 0.05, zero_point, dtype)
                codes = xq.int_repr()
                assert torch.equal(fused.quantize(xf, 0.05, zero_point, dtype), codes)
                assert torch.equal(fused.dequantize(codes, 0.05, zero_point), xq.dequantize())
                for n in threads:
                    torch.set_num_threads(n)
                    t = timed({
                        "tq": lambda: torch.quantize_per_tensor(xf, 0.05, zero_point, dtype),
                        "fq": lambda: fused.quantize(xf, 0.05, zero_point, dtype),
                        "td": lambda: xq.dequantize(),
                        "fd": lambda: fused.dequantize(codes, 0.05, zero_point),
                    }, BOUNDARY_ROUNDS, BOUNDARY_CALLS)
                    t.best = True
                    rows.append([str(shape), name, str(dtype).removeprefix("torch."), n, f"{t.ms('tq'):.3f}",
                                 f"{t.ratio('fq', 'tq'):.2f}x", f"{t.ms('td'):.3f}", f"{t.ratio('fd', 'td'):.2f}x"])
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


def model_table(cases: list[ModelCase], batches: tuple[int, ...], threads: tuple[int, ...], repeats: int) -> list[list[str]]:
    rows = []
    for case in cases:
        torch.manual_seed(0)
        model = case.build().eval()
        native, fused_model, ao = calibrated(model, case.shape)
        for batch in batches:
            for name in LAYOUTS:
                x = layout(torch.randn(batch, *case.shape), name)
                fns = {"float": lambda: model(x), "torch.ao": lambda: ao(x), "native": lambda: native(x),
                       "fused": lambda: fused_model(x)}
                if ao is None:
                    del fns["torch.ao"]
                for n in threads:
                    torch.set_num_threads(n)
                    t = timed(fns, repeats)
                    ao_x = f"{t.ratio('torch.ao', 'float'):.2f}x" if ao is not None else "fails"
                    rows.append([case.name, batch, name, n, f"{t.ms('float'):.3f}", ao_x, f"{t.ratio('native', 'float'):.2f}x",
                                 f"{t.ratio('fused', 'float'):.2f}x", f"{t.ratio('native', 'fused'):.1f}x"])
    return rows


TABLES = ("kernels", "boundaries", "models")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and models, 7 rounds instead of 15")
    parser.add_argument("--best", action="store_true", help="ratios of the fastest rounds instead of medians of per-round ratios")
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES), help="which tables to print (default: all)")
    args = parser.parse_args()
    Timings.best = args.best
    repeats, threads = (7 if args.quick else 15), tuple(args.threads)
    isa = ckernels.EXT.isa() if ckernels.EXT is not None else f"not used: {ckernels.WHY_NOT}"
    print(f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, fxqbn C kernels: {isa}; "
          f"{'fastest' if args.best else 'medians over'} of {repeats} interleaved rounds{'' if args.best else ' of per-round ratios'}\n")
    if "kernels" in args.tables:
        print("BN+ReLU on codes (times as a ratio to float BatchNorm on the same shape; fused/copy in uint8 copies):\n")
        headers = ["BN input", "layout", "threads", "float BN ms", "native", "fused", "uint8 copy", "fused/copy", "native/fused"]
        print(tabulate(kernel_table(QUICK_KERNELS if args.quick else KERNELS, threads, repeats), headers=headers, tablefmt="github"))
    if "boundaries" in args.tables:
        print(f"\nBoundaries (fused as a ratio to torch's; fastest of {BOUNDARY_ROUNDS} interleaved rounds of {BOUNDARY_CALLS} calls):\n")
        headers = ["input", "layout", "dtype", "threads", "quantize_per_tensor ms", "fused.quantize", "dequantize() ms", "fused.dequantize"]
        print(tabulate(boundary_table(BOUNDARY_SHAPES[:1] if args.quick else BOUNDARY_SHAPES, threads), headers=headers, tablefmt="github"))
    if "models" in args.tables:
        print("\nWhole models, float in -> float out (ratios to the float model):\n")
        cases, batches = (MODELS[:1], (32,)) if args.quick else (MODELS, BATCHES)
        headers = ["model", "batch", "layout", "threads", "float ms", "torch.ao", "native", "fused", "native/fused"]
        print(tabulate(model_table(cases, batches, threads, repeats), headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
