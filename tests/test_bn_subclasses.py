"""BatchNorm subclasses whose forward calls torch's (``super().forward(x)``), as timm's SyncBatchNormAct
(what ``timm.layers.convert_sync_batchnorm`` and timm's ``train.py --sync-bn`` leave) does: torch's
forward checks the input's rank in Python, which fx cannot trace; fxqbn records the eval-mode
``F.batch_norm`` call it makes, so the BN and its activation are quantized like any other."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, randomize_bn, snapshot
from torch import nn
from torch.ao.quantization import MinMaxObserver

import fxqbn
from fxqbn import tracing
from fxqbn.backends import BACKENDS


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct: SyncBatchNorm's own forward, then drop (Identity / eval Dropout), then act."""

    def __init__(self, c, act=nn.ReLU, drop=nn.Identity):
        super().__init__(c)
        self.drop, self.act = drop(), act()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ScaledBatchNorm1d(nn.BatchNorm1d):
    """A user's BatchNorm1d that post-scales its output, calling BatchNorm1d's forward."""

    def forward(self, x):
        return super().forward(x) * 0.5


class SyncTrained(nn.Module):
    """A timm-style net after timm's convert_sync_batchnorm: SyncBatchNormAct with ReLU, with eval
    Dropout and ReLU, with ReLU6, without activation; and a BatchNorm1d subclass on (N, C, L)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = SyncBatchNormAct(8)
        self.bn2 = SyncBatchNormAct(8, drop=lambda: nn.Dropout(0.2))
        self.bn3 = SyncBatchNormAct(8, act=nn.ReLU6)
        self.bn4 = SyncBatchNormAct(8, act=nn.SiLU)
        self.bn1d = ScaledBatchNorm1d(8)

    def forward(self, x):
        y = self.bn4(self.bn3(self.bn2(self.bn1(self.stem(x)))))
        return self.bn1d(y.flatten(2))


PATTERNS = ["F.batch_norm2d+ReLU", "F.batch_norm2d+ReLU", "F.batch_norm2d+ReLU6", "F.batch_norm2d", "F.batch_norm1d"]


def observed_model(seed=0):
    torch.manual_seed(seed)
    model = randomize_bn(SyncTrained()).eval()
    data = [torch.randn(2, 3, 6, 6) * 2 for _ in range(3)]
    observed = fxqbn.prepare(model, (data[0],), MinMaxObserver)
    with torch.no_grad():
        for x in data:
            observed(x)
    return model, observed


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_subclass_bns_calling_torchs_forward_are_rewritten_with_their_activation(backend):
    model, observed = observed_model()
    before = snapshot(model)
    q = fxqbn.convert(observed, backend=backend)
    rows = fxqbn.get_report(q).rows
    assert [(r.module, r.pattern, r.status) for r in rows] == [
        (name, pattern, "rewritten") for name, pattern in zip(["bn1", "bn2", "bn3", "bn4", "bn1d"], PATTERNS)
    ]
    left = {type(m) for m in q.modules()} & {nn.ReLU, nn.ReLU6, nn.Dropout, SyncBatchNormAct, ScaledBatchNorm1d}
    assert not left
    x = torch.randn(2, 3, 6, 6) * 2
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert (out - ref).abs().max() < 0.1 * float(ref.abs().max())
    assert_unchanged(model, before)


def test_the_recorded_call_computes_what_the_subclass_computes():
    """The traced graph holds one F.batch_norm per subclass BN and returns the model's output, bit for bit."""
    torch.manual_seed(0)
    model = randomize_bn(SyncTrained()).eval()
    traced = tracing.trace(model)
    assert sum(n.op == "call_function" and n.target is F.batch_norm for n in traced.graph.nodes) == 5
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_a_subclass_bn_in_training_mode_is_refused_by_name():
    model = SyncTrained().eval()
    model.bn2.train()
    with pytest.raises(fxqbn.FxqbnError, match=r"BatchNorm 'bn2' \(SyncBatchNormAct\) is in training mode.*model.eval\(\)"):
        fxqbn.prepare(model, (torch.randn(2, 3, 6, 6),), MinMaxObserver)


def test_torchs_batchnorm_forwards_are_restored_after_tracing():
    forwards = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
    model = SyncTrained().eval()
    fxqbn.prepare(model, (torch.randn(2, 3, 6, 6),), MinMaxObserver)
    model.bn1.train()
    with pytest.raises(fxqbn.FxqbnError):
        fxqbn.prepare(model, (torch.randn(2, 3, 6, 6),), MinMaxObserver)
    assert (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward) == forwards
    with pytest.raises(ValueError, match="expected 2D or 3D input"):  # torch's own check, in eager mode
        model.bn1d(torch.randn(2, 8, 3, 3))
