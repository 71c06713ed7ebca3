"""Quickstart: quantize the BatchNorms of a small CNN with fxqbn's Python API."""

from collections import OrderedDict

import torch
from torch import nn

import fxqbn

torch.manual_seed(0)
model = nn.Sequential(OrderedDict(
    conv=nn.Conv2d(3, 16, 3, padding=1), bn1=nn.BatchNorm2d(16), relu1=nn.ReLU(),  # BN+ReLU: one fused kernel
    bn2=nn.BatchNorm2d(16), relu2=nn.ReLU(),  # fed bn1's quantized output: no dequantize/quantize in between
)).eval()
observed = fxqbn.prepare(model, (torch.randn(1, 3, 32, 32),))
with torch.no_grad():
    for _ in range(8):  # calibration: real data in practice
        observed(torch.randn(4, 3, 32, 32))
quantized = fxqbn.convert(observed)
held_out = [torch.randn(4, 3, 32, 32) for _ in range(2)]
print(fxqbn.compare(model, quantized, held_out))  # the report, each BN's error and the model's SQNR filled in
