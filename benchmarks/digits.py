"""A real task fxqbn's accuracy is measured on: a small CNN trained on scikit-learn's digits.

The digits (``sklearn.datasets.load_digits``: 1797 8x8 grey images of the digits 0-9, pixels 0..16)
are split once, stratified, with a fixed seed: 1347 training images, 450 test images.
``DigitsNet`` holds a BatchNorm in every form fxqbn supports (see its docstring); its trained weights
are committed (``WEIGHTS``, a state_dict of about 50 KB) and ``train`` makes them again
(``python benchmarks/digits_accuracy.py --train``, a few seconds on one CPU thread).

scikit-learn is needed only to load the images (``pip install "fxqbn[bench]"``); importing this
module needs torch only. ``benchmarks/digits_accuracy.py`` runs every quantization route on it;
``tests/test_accuracy_bench.py`` and docs/accuracy.md import from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsNet", "Split", "WEIGHTS", "load_split", "load_trained", "train", "top1", "batches"]

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits_cnn.pt")
SPLIT_SEED = 0  # train_test_split's random_state
TEST_FRACTION = 0.25
TRAIN_SEED = 0  # torch.manual_seed before the weights are initialised and the batches shuffled


class DigitsNet(nn.Module):
    """A CNN for 1x8x8 digits with a BatchNorm in every form fxqbn supports, in this order:

    * ``bn1``: BatchNorm2d after a conv, then ReLU (foldable into ``conv1``);
    * ``bn2``: BatchNorm2d after a conv, no activation (foldable into ``conv2``), on a residual branch;
    * ``bn3``: a standalone BatchNorm2d after the residual add (pre-activation style), then ReLU;
    * ``bn4``: BatchNorm2d after a concat, then Identity -> Dropout -> ReLU6 (pass-throughs in eval);
    * ``F.batch_norm`` on buffers of the model after a 1x1 conv, then ReLU;
    * ``bn5``: BatchNorm1d on a 3-d input (N, C, L): the feature map flattened to a sequence;
    * ``bn6``: BatchNorm1d head after Linear -> ReLU, before the classifier.
    """

    def __init__(self, width: int = 16, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.bn3 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.identity = nn.Identity()
        self.dropout = nn.Dropout(0.1)
        self.relu6 = nn.ReLU6()
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 1, bias=False)
        self.f_weight = nn.Parameter(torch.ones(2 * width))
        self.f_bias = nn.Parameter(torch.zeros(2 * width))
        self.register_buffer("f_mean", torch.zeros(2 * width))
        self.register_buffer("f_var", torch.ones(2 * width))
        self.bn5 = nn.BatchNorm1d(2 * width)
        self.fc1 = nn.Linear(2 * width, hidden)
        self.bn6 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn3(x + self.bn2(self.conv2(x))))  # BN after an add
        x = self.pool(x)
        x = torch.cat([x, self.conv3(x)], 1)
        x = self.relu6(self.dropout(self.identity(self.bn4(x))))  # BN after a cat, through pass-throughs
        x = F.batch_norm(self.conv4(x), self.f_mean, self.f_var, self.f_weight, self.f_bias, self.training)
        x = self.bn5(F.relu(x).flatten(2))  # BatchNorm1d on (N, C, L)
        x = F.relu(self.fc1(x.mean(2)))
        return self.fc2(self.bn6(x))


@dataclass(frozen=True)
class Split:
    """The fixed split: images as float (N, 1, 8, 8) tensors in [0, 1], labels as int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_split() -> Split:
    """sklearn's digits, split 75/25, stratified, with ``SPLIT_SEED``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_i, test_i = train_test_split(
        list(range(len(y))), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    return Split(x[train_i], y[train_i], x[test_i], y[test_i])


def load_trained(path: str = WEIGHTS) -> DigitsNet:
    """``DigitsNet`` with the committed weights, in eval mode."""
    model = DigitsNet()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def batches(x: torch.Tensor, size: int = 64) -> list[torch.Tensor]:
    return list(torch.split(x, size))


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in percent."""
    logits = torch.cat([model(b) for b in batches(x)])
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def train(split: Split, epochs: int = 30, lr: float = 3e-3) -> DigitsNet:
    """``DigitsNet`` trained with Adam on the training split (deterministic: ``TRAIN_SEED``), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        model = DigitsNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(split.train_y))
            for i in torch.split(order, 32):
                optimizer.zero_grad()
                F.cross_entropy(model(split.train_x[i]), split.train_y[i]).backward()
                optimizer.step()
            schedule.step()
    return model.eval()
