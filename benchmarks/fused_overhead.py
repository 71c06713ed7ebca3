"""Per-call cost of one fused BN module on a tiny input, where the arithmetic is negligible.

    OMP_NUM_THREADS=1 python benchmarks/fused_overhead.py
"""

import timeit

import torch

from fxqbn.fused import FusedBatchNorm
from fxqbn.qparams import QParams

torch.set_num_threads(1)
bn = torch.nn.BatchNorm2d(8).eval()
m = FusedBatchNorm.from_bn(bn, 2, True, QParams(0.02, 128, torch.quint8), QParams(0.02, 0, torch.quint8))
x = torch.randint(0, 256, (1, 8, 4, 4), dtype=torch.uint8)
m(x)
print("fused BN call on (1, 8, 4, 4): best of 20 x 2000 calls, us per call:",
      round(min(timeit.repeat(lambda: m(x), number=2000, repeat=20)) / 2000 * 1e6, 2))
