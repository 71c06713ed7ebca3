"""One BN of a torch.ao int8 graph: the float segment torch.ao runs (dequantize, BN, quantize, ReLU on
quint8) against fxqbn.lower's native and fused modules on the same quint8 input, one thread, medians of
21 interleaved rounds; each shape contiguous and channels-last (docs/lower.md, "What was measured").

    OMP_NUM_THREADS=1 python benchmarks/lower_segment.py 16,16,24,24 1,16,24,24 1,3,8,8 16,64,28,28 \\
        16,256,14,14 1,512,7,7 1,64,56,56 16,32
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import fx, nn

import fxqbn
from fxqbn.passes.rewrite import LOWERED_PREFIX


class Segment(nn.Module):
    """dequantize -> F.batch_norm -> quantize -> ReLU: what torch.ao leaves around a BN it does not quantize."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(channels).eval(), nn.ReLU()
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.running_mean.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)
        bn = self.bn
        y = F.batch_norm(q.dequantize(), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, 1e-5)
        return self.act(torch.quantize_per_tensor(y, 0.04, 90, torch.quint8))


def medians(fns: list, x: torch.Tensor, rounds: int = 21, inner: int = 3) -> tuple[list[float], list[float]]:
    """Median us per call of each function, and the median per-round ratio to the first."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:  # warm-up
        for _ in range(3):
            fn(x)
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(inner):
                fn(x)
            times[k].append((time.perf_counter() - start) / inner * 1e6)
    return [statistics.median(t) for t in times], [statistics.median(b / a for a, b in zip(times[0], t)) for t in times]


def run(shape: tuple[int, ...], channels_last: bool) -> None:
    segment = Segment(shape[1])
    graph = fx.symbolic_trace(segment)
    lowered = {b: fxqbn.lower(graph, backend=b).get_submodule(LOWERED_PREFIX + "batch_norm") for b in ("native", "fused")}
    x = torch.quantize_per_tensor(torch.randn(shape) * 2, 0.05, 128, torch.quint8)
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = segment.bn

    def float_segment(q: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(q.dequantize(), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, 1e-5)
        return torch.relu(torch.quantize_per_tensor(y, 0.04, 90, torch.quint8))

    with torch.no_grad():
        (f, n, u), (_, rn, ru) = medians([float_segment, lowered["native"], lowered["fused"]], x)
    layout = "channels-last" if channels_last else "contiguous"
    print(f"{str(shape):20} {layout:13} float {f:8.1f} us  native {n:8.1f} us ({rn:.2f}x)  fused {u:8.1f} us ({ru:.2f}x)", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for spec in sys.argv[1:]:
        for channels_last in (False, True):
            run(tuple(int(v) for v in spec.split(",")), channels_last)
