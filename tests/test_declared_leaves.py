"""Modules and functions a model library declares untraceable (timm's notrace registry, which timm's
own fx feature extraction honours) stay one node when fxqbn traces, unless they hold a BatchNorm.
timm's tf_* models need it: ``Conv2dSame`` pads by the input's size. The registry is stood in for
by a module at ``timm.layers._fx``, as timm >= 0.9 lays it out."""

import io
import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, randomize_bn, snapshot
from torch import nn
from torch.ao.quantization import MinMaxObserver

import fxqbn


def pad_same(x, k):
    """timm's pad_same, shortened: 'same' padding for a k x k kernel, decided on the input's size."""
    if x.size(-1) >= k:  # control flow on a size: fx cannot trace through it
        x = F.pad(x, [k // 2] * 4)
    return x


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: 'same' padding computed in forward."""

    def forward(self, x):
        return F.conv2d(pad_same(x, self.kernel_size[0]), self.weight, self.bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, which timm declares untraceable too: fxqbn traces it for its BN."""

    def __init__(self, c):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(self.drop(x))


class Attention(nn.Module):
    """timm's LocalWindowAttention / MobileVitBlock, shortened: declared untraceable, holds a BN, and
    caches a tensor computed from its parameters in forward (as LeViT-style attention biases)."""

    def __init__(self, c):
        super().__init__()
        self.proj, self.norm, self.bn, self.cache = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.BatchNorm2d(c), {}

    def forward(self, x):
        if x.size(-1) not in self.cache:  # control flow on a size
            self.cache[x.size(-1)] = self.proj.weight.sum() * 0 + 1  # carries autograd history
        return self.bn(self.norm(self.proj(x))) * self.cache[x.size(-1)]


class TfStyleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = Conv2dSame(3, 8, 3), BatchNormAct2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
        self.attn = Attention(8)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        return self.attn(self.bn2(self.conv2(pad_same(y, 3))))


@pytest.fixture
def timm_registry(monkeypatch):
    registry = types.ModuleType("timm.layers._fx")
    registry.get_notrace_modules = lambda: [Conv2dSame, BatchNormAct2d, Attention]
    registry.get_notrace_functions = lambda: [pad_same]
    monkeypatch.setitem(__import__("sys").modules, "timm.layers._fx", registry)
    return registry


def _observed(seed=0):
    """The model and its observed copy, calibrated with autograd on (the leaf's cache keeps history)."""
    torch.manual_seed(seed)
    model = randomize_bn(TfStyleNet()).eval()
    data = [torch.randn(2, 3, 9, 9) for _ in range(3)]  # a size prepare's shape run did not cache
    observed = fxqbn.prepare(model, (torch.randn(2, 3, 7, 7),), MinMaxObserver, fold=False)  # bn2 follows a conv
    for x in data:
        observed(x)
    return model, observed


@pytest.mark.parametrize("backend", ["native", "fused"])
def test_declared_untraceable_parts_stay_one_node_and_the_bns_are_quantized(timm_registry, backend):
    """... and a BN inside such a part is reported as skipped; a part's cached autograd tensor is copied detached."""
    model, observed = _observed()
    before = snapshot(model)
    q = fxqbn.convert(observed, backend=backend)
    assert_unchanged(model, before)  # before the reference run below fills the model's own cache
    rows = fxqbn.get_report(q).rows
    assert [(r.module, r.pattern, r.status) for r in rows] == [
        ("bn1", "F.batch_norm2d+ReLU", "rewritten"), ("bn2", "BatchNorm2d", "rewritten"),
        ("attn.bn", "BatchNorm2d", "skipped"), ("attn.norm", "BatchNorm2d", "skipped")]
    assert rows[2].reason == "inside Attention 'attn', which the tracer keeps as one call (a leaf module): kept float"
    modules = dict(q.named_modules())
    leaves = [n.target for n in q.graph.nodes if n.op == "call_module" and type(modules[n.target]) in (Conv2dSame, Attention)]
    assert leaves == ["conv1", "attn"]
    assert type(q.attn.bn) is nn.BatchNorm2d and q.attn is not model.attn  # float, and the converted model's own
    assert [n.target for n in q.graph.nodes if n.op == "call_function"].count(pad_same) == 1
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert 10 * math.log10(float(ref.pow(2).sum() / (out - ref).pow(2).sum())) > 25


def test_without_the_registry_such_a_model_is_refused_naming_the_line(monkeypatch):
    monkeypatch.delitem(__import__("sys").modules, "timm.layers._fx", raising=False)
    with pytest.raises(fxqbn.FxqbnError, match=r"torch.fx cannot trace TfStyleNet.*\n  at .*test_declared_leaves.py"):
        _observed()


def test_a_registry_without_its_functions_is_no_registry(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm.layers._fx", types.ModuleType("timm.layers._fx"))
    with pytest.raises(fxqbn.FxqbnError, match="torch.fx cannot trace TfStyleNet"):
        _observed()



@pytest.mark.parametrize("backend", ["native", "fused"])
def test_a_model_with_bns_inside_leaves_saves_and_loads_bit_identically(timm_registry, backend):
    model, observed = _observed()
    q = fxqbn.convert(observed, backend=backend)
    buffer = io.BytesIO()
    fxqbn.save(q, buffer)
    buffer.seek(0)
    loaded = fxqbn.load(buffer, model, (torch.randn(2, 3, 7, 7),))
    assert [(r.module, r.status) for r in fxqbn.get_report(loaded).rows] == [(r.module, r.status) for r in fxqbn.get_report(q).rows]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
