"""A fixed model for the report's golden test. Line numbers here are part of the golden files."""

import torch
import torch.nn.functional as F
from torch import nn


class ReportNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
        self.shared = nn.BatchNorm2d(4)
        self.excluded = nn.BatchNorm2d(4)
        self.batch_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.bn3d = nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.block(self.stem(x))
        s = self.shared(y)
        t = F.relu(s) + s  # two users: the ReLU stays float
        u = self.batch_stats(self.excluded(t))
        v = torch.relu(self.bn3d(u.unsqueeze(2)))
        return u, v
