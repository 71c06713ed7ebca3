"""A small DenseNet-BC shipped with fxqbn, so ``fxqbn convert`` has a real BN-heavy model to convert.

DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", 2017) for 32x32 images:
every dense layer is BN -> ReLU -> 1x1 conv (bottleneck) -> BN -> ReLU -> 3x3 conv, and reads the
concatenation of all earlier feature maps of its block, so its first BN follows a ``torch.cat`` and
its second a convolution; transitions (BN -> ReLU -> 1x1 conv -> avg-pool) halve the channels.

No trained weights ship with fxqbn: ``densenet_bc()`` initialises the weights from a fixed seed and
estimates every BatchNorm's running statistics on random images, so the BNs normalise the
activations they see, as trained ones would.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DenseNetBC", "densenet_bc", "estimate_bn_statistics", "DEFAULT_INPUT_SHAPE"]

DEFAULT_INPUT_SHAPE = (1, 3, 32, 32)  # what `fxqbn convert` feeds the built-in model


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 producing ``growth`` new channels, appended to its input."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        width = bottleneck * growth
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)  # the BN after a cat
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))  # conv -> BN -> ReLU -> conv


class DenseBlock(nn.Module):
    def __init__(self, layers: int, in_channels: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_channels + i * growth, growth, bottleneck) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool: compresses the channels and halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(2),
        )


class DenseNetBC(nn.Module):
    """DenseNet-BC for 32x32 inputs: a 3x3 stem, dense blocks joined by transitions, BN-ReLU-pool-linear head.

    ``DenseNetBC(growth=12, block_layers=(16, 16, 16))`` is the paper's DenseNet-BC (L=100, k=12).
    """

    def __init__(
        self,
        growth: int = 12,
        block_layers: tuple[int, ...] = (3, 3, 3),
        bottleneck: int = 4,
        compression: float = 0.5,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        channels = 2 * growth
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, layers in enumerate(block_layers):
            stages.append(DenseBlock(layers, channels, growth, bottleneck))
            channels += layers * growth
            if i < len(block_layers) - 1:
                out = int(channels * compression)
                stages.append(Transition(channels, out))
                channels = out
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.features(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


@torch.no_grad()
def estimate_bn_statistics(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Set every BN's running statistics to their average over ``batches`` (in place); eval mode after."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches
    for batch in batches:
        model(batch)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    return model.eval()


def densenet_bc(seed: int = 0) -> tuple[DenseNetBC, tuple[torch.Tensor]]:
    """The built-in model of ``fxqbn convert``: DenseNet-BC (k=12, 3 blocks of 3 layers, 31 BNs), in eval mode.

    Returns the model and an example input of ``DEFAULT_INPUT_SHAPE``. The global RNG is left alone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DenseNetBC()
        images = [torch.randn(8, 3, 32, 32) for _ in range(2)]
        estimate_bn_statistics(model, images)
        return model, (torch.randn(*DEFAULT_INPUT_SHAPE),)
