"""Inference latency and peak memory of converted models: float, torch.ao BN-only, fxqbn.

    python benchmarks/model_speed.py [--repeats 15] [--models bn_chain preact_resnet ...]

For each model, memory format (contiguous or channels_last input), batch (1, 32) and thread count
(1, 2): the median latency of the float model, of torch.ao's conversion with a BN-only
QConfigMapping (prepare_fx/convert_fx; "n/a" where torch.ao refuses the model) and of fxqbn's, run
interleaved so drift hits all three alike, with the ratios. "noise" is the largest interquartile
range of the three, relative to its median: ratios inside 1 +- noise are ties. A second table gives
the peak memory of live tensors during one batch-32 forward (parameters and buffers excluded).
All variants use MinMaxObserver over the same calibration batches.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping, default_weight_observer
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch.utils._python_dispatch import TorchDispatchMode

import fxqbn
from fxqbn.models import densenet_bc, estimate_bn_statistics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import cnn3d  # noqa: E402
import preact_resnet  # noqa: E402

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


class BNChain(nn.Module):
    """BN -> BN+ReLU -> ... on few channels: where BN quantization is used most."""

    def __init__(self, dim: int = 2, channels: int = 8, depth: int = 8) -> None:
        super().__init__()
        bn = nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d
        self.bns = nn.ModuleList(bn(channels) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, bn in enumerate(self.bns):
            x = bn(x)
            if i % 2:
                x = F.relu(x)
        return x


def _chain(dim: int, shape: tuple[int, ...]) -> Callable[[], tuple[nn.Module, tuple[int, ...]]]:
    def build():
        torch.manual_seed(0)
        return estimate_bn_statistics(BNChain(dim), [torch.randn(4, *shape) * 2 for _ in range(2)]), shape

    return build


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {  # name -> (model, input shape without batch)
    "bn_chain": _chain(2, (8, 28, 28)),
    "bn_chain_3d": _chain(3, (8, 4, 14, 14)),
    "preact_resnet": lambda: (preact_resnet.build()[0], (3, 32, 32)),
    "densenet_bc": lambda: (densenet_bc()[0], (3, 32, 32)),
    "cnn3d": lambda: (cnn3d.build()[0], (3, 8, 32, 32)),
}

QCONFIG = QConfig(activation=MinMaxObserver, weight=default_weight_observer)


def torch_ao(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module | None:
    mapping = QConfigMapping()
    for kind in (nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, F.relu):
        mapping.set_object_type(kind, QCONFIG)
    try:
        observed = prepare_fx(copy.deepcopy(model), mapping, (batches[0],))
    except LookupError:  # conv -> BN -> ReLU with a BN-only mapping
        return None
    with torch.no_grad():
        for x in batches:
            observed(x)
    return convert_fx(observed)


def ours(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    observed = fxqbn.prepare(model, (batches[0],), MinMaxObserver)
    with torch.no_grad():
        for x in batches:
            observed(x)
    return fxqbn.convert(observed)


def latencies(variants: dict[str, nn.Module | None], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {name: [] for name, m in variants.items() if m is not None}
    with torch.no_grad():
        for name in runs:
            variants[name](x)  # warm-up
        for _ in range(repeats):
            for name in runs:
                start = time.perf_counter()
                variants[name](x)
                runs[name].append(time.perf_counter() - start)
    return runs


def iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


class _PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage allocated by ops and still alive, at its highest."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def peak_memory(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), _PeakMemory() as probe:
        model(x)
    return probe.peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    rows, memory = [], []
    for name in args.models:
        model, shape = MODELS[name]()
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randn(8, *shape, generator=gen) for _ in range(4)]
        variants = {"float": model, "torch.ao": torch_ao(model, batches), "fxqbn": ours(model, batches)}
        channels_last = torch.channels_last if len(shape) == 3 else torch.channels_last_3d
        for batch in (1, 32):
            x = torch.randn(batch, *shape, generator=gen)
            for fmt, tensor in (("contiguous", x), ("channels_last", x.contiguous(memory_format=channels_last))):
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    runs = latencies(variants, tensor, args.repeats)
                    med = {k: statistics.median(v) * 1000 for k, v in runs.items()}
                    noise = max(iqr(v) for v in runs.values())
                    ao = med.get("torch.ao")
                    rows.append([
                        name, batch, fmt, threads, f"{med['float']:.2f}", f"{ao:.2f}" if ao else "n/a", f"{med['fxqbn']:.2f}",
                        f"{med['fxqbn'] / med['float']:.2f}", f"{med['fxqbn'] / ao:.2f}" if ao else "n/a", f"{noise:.0%}",
                    ])
        torch.set_num_threads(1)
        x = torch.randn(32, *shape, generator=gen)
        peaks = {k: peak_memory(m, x) / 2**20 for k, m in variants.items() if m is not None}
        memory.append([name, f"{peaks['float']:.1f}", f"{peaks['torch.ao']:.1f}" if "torch.ao" in peaks else "n/a", f"{peaks['fxqbn']:.1f}"])
        print(f"{name}: done", file=sys.stderr)
    headers = ["model", "batch", "input", "threads", "float ms", "torch.ao ms", "fxqbn ms", "fxqbn/float", "fxqbn/torch.ao", "noise"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    print()
    print(tabulate(memory, headers=["model (batch 32)", "float MiB", "torch.ao MiB", "fxqbn MiB"], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
