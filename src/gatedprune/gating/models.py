"""Plain PyTorch models to gate with ``gate_`` (for the demo and the benchmarks).

They contain nothing of gatedprune: they are ordinary user models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock1d", "ResNet1d"]


class BasicBlock1d(nn.Module):
    """ResNet basic block over ``(B, C, L)``: two conv-BN layers, identity or projection
    shortcut, ReLU after the add.

    >>> BasicBlock1d(8, 16, stride=2)(torch.zeros(2, 8, 40)).shape
    torch.Size([2, 16, 20])
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel_size, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(c_out, c_out, kernel_size, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm1d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, C_out, L')
        out = self.relu(self.bn1(self.conv1(x)))  # (B, C_out, L')
        out = self.bn2(self.conv2(out))
        y: Tensor = self.relu(out + identity)
        return y


class ResNet1d(nn.Module):
    """A 1D ResNet for sequences such as MNIST-1D (``(B, in_channels, L)`` -> logits).

    ``widths[i]`` channels and ``blocks[i]`` basic blocks in stage ``i``; every stage after
    the first halves the length (its first block has a projection shortcut).

    >>> net = ResNet1d(widths=(8, 16), blocks=(2, 2))
    >>> net(torch.zeros(3, 1, 40)).shape
    torch.Size([3, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        blocks: Sequence[int] = (2, 2, 2),
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(
                f"widths and blocks need one entry per stage, got {widths!r} and {blocks!r}"
            )
        if any(w < 1 for w in widths) or any(b < 1 for b in blocks):
            raise ValueError(f"widths and blocks must be >= 1, got {widths!r}, {blocks!r}")
        c = int(widths[0])
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, c, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm1d(c),
            nn.ReLU(),
        )
        stages = []
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock1d(c, int(w), stride, kernel_size))
                c = int(w)
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.stem(x))  # (B, C, L')
        logits: Tensor = self.fc(torch.flatten(self.pool(h), 1))  # (B, num_classes)
        return logits
