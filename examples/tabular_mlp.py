"""A tabular MLP with BatchNorm1d: Linear -> BatchNorm1d -> ReLU -> Dropout blocks, and a BN on the raw features.

Each BatchNorm1d becomes ``quantized::batch_norm1d`` (the input norm) or
``quantized::batch_norm1d_relu`` (the hidden blocks): torch.ao leaves BatchNorm1d float. The hidden
BNs follow the Linear that feeds them alone, which fxqbn.prepare would fold into it by default:
``fold=False`` (``--no-fold``) keeps them BNs.

    python examples/tabular_mlp.py                                          # the Python API
    fxqbn convert examples/tabular_mlp.py:build --no-fold --verify          # the command
"""

import torch
from torch import nn

import fxqbn
from fxqbn.models import estimate_bn_statistics


class TabularMLP(nn.Module):
    def __init__(self, features: int = 20, hidden: tuple[int, ...] = (64, 64, 32), num_classes: int = 2) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm1d(features)  # standardises the raw columns
        layers, width = [], features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.ReLU(), nn.Dropout(0.1)]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.input_norm(x)))


def build() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The factory `fxqbn convert` calls: the model in eval mode and an example batch of 8 rows."""
    torch.manual_seed(0)
    columns = torch.randn(256, 20) * torch.linspace(0.5, 20, 20) + torch.linspace(-5, 5, 20)  # unscaled features
    model = estimate_bn_statistics(TabularMLP(), list(columns.split(64)))
    return model, (columns[:8],)


def main() -> None:
    model, example = build()
    observed = fxqbn.prepare(model, example, fold=False)  # quantize the hidden BNs rather than fold them into the Linears
    with torch.no_grad():
        for _ in range(4):  # calibration: random rows stand in for real data
            observed(torch.randn(16, 20) * 10)
        quantized = fxqbn.convert(observed)
        x = torch.randn(16, 20) * 10
    print(fxqbn.compare(model, quantized, x))  # the report, with each BN's error and the model's output SQNR


if __name__ == "__main__":
    main()
