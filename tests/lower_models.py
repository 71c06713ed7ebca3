"""Models for fxqbn.lower's tests and benchmarks/lower_speed.py: float nets whose BNs whole-model
int8 leaves float, and hand-written int8 graphs of one BN pattern in every spelling."""

from __future__ import annotations

import math

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (quantized_decomposed ops)
import torch.nn.functional as F
from torch import nn

from fxqbn.models import densenet_bc, estimate_bn_statistics

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIDE = {1: 16, 2: 8, 3: 4}  # spatial size per dim: inputs (N, C, *[SIDE] * dim)


class BatchNormAct(nn.Module):
    """timm's BatchNormAct2d, any dim: F.batch_norm on its own statistics, then Identity, then the activation."""

    def __init__(self, dim: int, channels: int, act: nn.Module, affine: bool = True) -> None:
        super().__init__()
        bn = BN[dim](channels, affine=affine)
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.eps, self.momentum = bn.eps, bn.momentum
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class TimmStyleNet(nn.Module):
    """conv -> BatchNormAct -> max-pool -> BatchNormAct(affine=False) -> conv -> BatchNormAct -> pool -> linear.

    The BN after the max-pool does not follow a conv, so PT2E cannot fold it either.
    """

    def __init__(self, dim: int = 2, act: type[nn.Module] = nn.ReLU, width: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.stem = CONV[dim](3, width, 3, padding=1)
        self.bn1 = BatchNormAct(dim, width, act())
        self.pool = POOL[dim](2)
        self.bn2 = BatchNormAct(dim, width, act(), affine=False)
        self.conv = CONV[dim](width, width, 3, padding=1)
        self.bn3 = BatchNormAct(dim, width, act())
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn3(self.conv(self.bn2(self.pool(self.bn1(self.stem(x))))))
        return self.head(torch.flatten(x.mean(dim=tuple(range(2, 2 + self.dim))), 1))

    def example(self, batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 3, *[SIDE[self.dim]] * self.dim),)


class MLP(nn.Module):
    """Linear -> ReLU -> BatchNorm1d (torch.ao folds Linear -> BN, not this) -> Linear -> ReLU -> BatchNorm1d -> Linear."""

    def __init__(self, features: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.relu1, self.bn1 = nn.Linear(features, hidden), nn.ReLU(), nn.BatchNorm1d(hidden)
        self.fc2, self.relu2, self.bn2 = nn.Linear(hidden, hidden), nn.ReLU(), nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn2(self.relu2(self.fc2(self.bn1(self.relu1(self.fc1(x)))))))

    def example(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 16),)


def trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with seeded weights and BN statistics estimated on random inputs, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in model.parameters():
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.05)
        batches = [model.example(8)[0] for _ in range(2)]
        return estimate_bn_statistics(model, batches)


def seeded(factory, seed: int = 0) -> nn.Module:
    """``trained(factory())`` with the model's initial weights seeded too: the same model every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return trained(factory(), seed)


def models() -> dict[str, tuple[nn.Module, tuple[torch.Tensor]]]:
    """name -> (float model in eval mode, example input), the three nets the lowering targets name."""
    timm, mlp = seeded(TimmStyleNet), seeded(MLP)
    densenet, example = densenet_bc()
    return {"timm_style": (timm, timm.example()), "mlp": (mlp, mlp.example()), "densenet_bc": (densenet, example)}


# -- hand-written int8 graphs: dequantize -> BN -> [pass-through] -> [activation] -> quantize ---------

ACTIVATIONS = {  # name -> (callable on a float tensor, the float clamp it computes)
    "none": (lambda x: x, (-math.inf, math.inf)),
    "ReLU": (nn.ReLU(), (0.0, math.inf)),
    "F.relu_inplace": (lambda x: F.relu(x, inplace=True), (0.0, math.inf)),
    "torch.relu": (torch.relu, (0.0, math.inf)),
    "relu_method": (lambda x: x.relu(), (0.0, math.inf)),
    "ReLU6": (nn.ReLU6(), (0.0, 6.0)),
    "F.relu6": (F.relu6, (0.0, 6.0)),
    "hardtanh(0,6)": (lambda x: F.hardtanh(x, 0.0, 6.0), (0.0, 6.0)),
    "clamp(0,6)": (lambda x: torch.clamp(x, 0.0, 6.0), (0.0, 6.0)),
    "clamp(-1,2)": (lambda x: x.clamp(-1.0, 2.0), (-1.0, 2.0)),
}
PASSTHROUGHS = {
    "none": lambda x: x,
    "Identity": nn.Identity(),
    "eval Dropout": nn.Dropout(0.3).eval(),
    "F.dropout(training=False)": lambda x: F.dropout(x, 0.2, training=False),
}


class Sandwich(nn.Module):
    """One float BN between a dequantize and a quantize, as torch.ao ("ao") or PT2E ("pt2e") spell them.

    spelling: "module" (self.bn(x)), "functional" (F.batch_norm), "aten" (aten.batch_norm),
        "aten_legit" (aten._native_batch_norm_legit_no_training, then getitem 0).
    """

    def __init__(self, route: str, dim: int, spelling: str, activation: str, passthrough: str, channels: int = 5,
                 qin: tuple[float, int] = (0.05, 120), qout: tuple[float, int] = (0.04, 90), affine: bool = True,
                 signed: bool = False) -> None:
        super().__init__()
        self.route, self.spelling, self.qin, self.qout = route, spelling, qin, qout
        # PT2E codes: uint8 in [0, 255], or int8 in [-128, 127] (signed; zero points are then given in that range)
        self.codes_dtype, self.range = (torch.int8, (-128, 127)) if signed else (torch.uint8, (0, 255))
        self.bn = BN[dim](channels, affine=affine).eval()
        gen = torch.Generator().manual_seed(dim * 7 + channels)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.rand(channels, generator=gen) * 4 - 2)
            self.bn.running_var.copy_(torch.rand(channels, generator=gen) * 2 + 0.3)
            if affine:
                self.bn.weight.copy_(torch.rand(channels, generator=gen) * 2 - 0.5)
                self.bn.bias.copy_(torch.rand(channels, generator=gen) * 2 - 1)
        self.through = PASSTHROUGHS[passthrough]
        self.act = ACTIVATIONS[activation][0]
        self.register_buffer("out_scale", torch.tensor(qout[0], dtype=torch.float64))
        self.register_buffer("out_zero_point", torch.tensor(qout[1]))

    def _bn(self, x: torch.Tensor) -> torch.Tensor:
        bn, aten = self.bn, torch.ops.aten
        if self.spelling == "module":
            return bn(x)
        if self.spelling == "aten":  # what torch.export records
            return aten.batch_norm.default(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.1, bn.eps, False)
        if self.spelling == "aten_legit":  # what run_decompositions leaves
            return aten._native_batch_norm_legit_no_training.default(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, bn.eps)[0]
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        lo, hi = self.range
        if self.route == "pt2e":
            y = ops.dequantize_per_tensor.default(x, self.qin[0], self.qin[1], lo, hi, self.codes_dtype)
        else:
            y = x.dequantize()
        y = self.act(self.through(self._bn(y)))
        if self.route == "pt2e":
            return ops.quantize_per_tensor.default(y, self.qout[0], self.qout[1], lo, hi, self.codes_dtype)
        return torch.quantize_per_tensor(y, self.out_scale, self.out_zero_point, torch.quint8)

    def codes(self, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
        """Every input code (0..255) in every channel, as the graph's input (codes or a quint8 tensor)."""
        gen, (lo, hi) = torch.Generator().manual_seed(seed), self.range
        x = torch.randint(lo, hi + 1, shape, generator=gen, dtype=self.codes_dtype)
        x.view(shape[0], shape[1], -1)[0, :, :256] = torch.arange(lo, hi + 1, dtype=torch.int32).to(self.codes_dtype)
        return x if self.route == "pt2e" else torch._make_per_tensor_quantized_tensor(x, *self.qin)


def timm_style_net() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A factory for the command: ``fxqbn convert tests/lower_models.py:timm_style_net --int8 pt2e``."""
    model = seeded(TimmStyleNet)
    return model, model.example()


class WideNet(TimmStyleNet):
    """The timm-style net at 128 channels (inputs 14x14): many channels, small images."""

    def __init__(self) -> None:
        super().__init__(2, nn.ReLU, width=128)

    def example(self, batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 3, 14, 14),)


class PreActNet(nn.Module):
    """Pre-activation residual blocks (BN -> ReLU -> conv, added to the block's input), timm's
    BatchNormAct: the BN reads an add, not a conv, so nothing folds it."""

    def __init__(self, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bns = nn.ModuleList(BatchNormAct(2, width, nn.ReLU()) for _ in range(blocks))
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(blocks))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for bn, conv in zip(self.bns, self.convs):
            x = x + conv(bn(x))
        return self.head(torch.flatten(x.mean(dim=(2, 3)), 1))

    def example(self, batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 3, 16, 16),)


def cost_models() -> dict[str, tuple[nn.Module, tuple[torch.Tensor]]]:
    """name -> (float model, example input): the nets benchmarks/lower_cost.py times lower's default on."""
    nets = {
        "timm_style_16ch_24x24": seeded(lambda: TimmStyleNet(2, width=16)), "wide_128ch_14x14": seeded(WideNet),
        "preact_32ch_16x16": seeded(PreActNet), "bn1d_head_mlp": seeded(MLP),
    }
    inputs = {"timm_style_16ch_24x24": (torch.randn(2, 3, 24, 24),)}
    return {name: (net, inputs.get(name, net.example())) for name, net in nets.items()}
