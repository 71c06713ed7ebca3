"""Property tests: random small graphs of BN (1/2/3-d), ReLU spellings, add, cat and reshape.

For every generated model and calibration: each rewritten pattern's integer output is within one
step of quantize(float BN(dequantize(quantize(x)))) on the same input, the graph lints, the report
has one row per BN, and the float model is untouched.
"""

import copy

import torch
import torch.nn.functional as F
from conftest import assert_unchanged, snapshot, installed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization import MinMaxObserver

import fxqbn

BN_TYPES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
RELUS = {
    "module": lambda m, y: m.relu(y),
    "F.relu": lambda m, y: F.relu(y),
    "F.relu_": lambda m, y: F.relu(y, inplace=True),
    "torch.relu": lambda m, y: torch.relu(y),
    "method": lambda m, y: y.relu(),
    "method_": lambda m, y: y.relu_(),
}
OPS = ["bn", "bn_relu", "add", "cat", "reshape"]


class RandomNet(nn.Module):
    """Applies ``ops`` in order to one running tensor; channel count changes only at cat."""

    def __init__(self, dim, channels, ops, relus, stats):
        super().__init__()
        self.ops, self.relus = ops, relus
        self.relu = nn.ReLU()
        self.bns = nn.ModuleList()
        c = channels
        for op in ops:
            if op.startswith("bn"):
                bn = BN_TYPES[dim](c, affine=bool(stats.pop()))
                with torch.no_grad():
                    bn.running_mean.copy_(torch.tensor(stats.pop()).repeat(c)[:c] * torch.linspace(-1, 1, c))
                    bn.running_var.copy_(torch.tensor(abs(stats.pop()) + 0.1).repeat(c) * torch.linspace(0.5, 2, c))
                    if bn.affine:
                        bn.weight.copy_(torch.linspace(-2, 2, c) * stats.pop())
                        bn.bias.copy_(torch.linspace(1, -1, c) * stats.pop())
                self.bns.append(bn)
            elif op == "cat":
                c *= 2

    def forward(self, x):
        bns, relus = iter(self.bns), iter(self.relus)
        for op in self.ops:
            if op == "bn":
                x = next(bns)(x)
            elif op == "bn_relu":
                x = RELUS[next(relus)](self, next(bns)(x))
            elif op == "add":
                x = x + 0.5
            elif op == "cat":
                x = torch.cat([x, x * -1.5], 1)
            elif op == "reshape":
                x = x.reshape(x.shape[0], x.shape[1], -1).reshape(x.shape)
        return x


@st.composite
def cases(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    ops = draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=6).filter(lambda o: any(p.startswith("bn") for p in o)))
    ops = ops[: 3 + ops.count("cat")] if ops.count("cat") > 2 else ops
    relus = [draw(st.sampled_from(sorted(RELUS))) for op in ops if op == "bn_relu"]
    stats = draw(st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=5 * len(ops), max_size=5 * len(ops)))
    channels = draw(st.integers(1, 5))
    spatial = {1: draw(st.sampled_from([(), (3,)])), 2: (3, 4), 3: (2, 2, 3)}[dim]
    batch = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.quint8, torch.qint8]))
    seed = draw(st.integers(0, 2**16))
    return dim, ops, relus, stats, channels, spatial, batch, dtype, seed


def observer_inputs(model, bn_names, x):
    """The float input of every BN module, from a copy of the model with hooks."""
    probe = copy.deepcopy(model)
    seen = {}
    for name in bn_names:
        probe.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].clone()))
    with torch.no_grad():
        probe(x)
    return seen


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_graphs_are_within_one_step_per_pattern(case):
    dim, ops, relus, stats, channels, spatial, batch, dtype, seed = case
    model = RandomNet(dim, channels, ops, relus, list(stats)).eval()
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(batch, channels, *spatial, generator=gen) * 2 for _ in range(2)]
    before = snapshot(model)
    observed = fxqbn.prepare(model, (data[0],), MinMaxObserver.with_args(dtype=dtype))
    with torch.no_grad():
        for x in data:
            observed(x)
    q = fxqbn.convert(observed)
    assert_unchanged(model, before)
    q.graph.lint()
    report = fxqbn.get_report(q)
    assert len(report.rows) == len(model.bns) and all(r.status == "rewritten" for r in report.rows)
    x = data[0]
    inputs = observer_inputs(model, [r.module for r in report.rows], x)
    with torch.no_grad():
        for row in report.rows:
            qin = torch.quantize_per_tensor(inputs[row.module], row.input_scale, row.input_zero_point, dtype)
            ours = installed(q, row.module)(qin).int_repr().int()
            y = model.get_submodule(row.module)(qin.dequantize())
            y = torch.relu(y) if row.pattern.endswith("+ReLU") else y
            ref = torch.quantize_per_tensor(y, row.output_scale, row.output_zero_point, dtype).int_repr().int()
            assert (ours - ref).abs().max().item() <= 1, row
        out = q(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()
