"""Plain PyTorch models to gate with ``gate_`` (for the demo and the benchmarks).

They contain nothing of gatedprune: they are ordinary user models.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["BasicBlock1d", "ResNet1d"]


def _positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1 (numpy integers too); ``TypeError`` for a bool, a float or a
    string (no silent truncation), ``ValueError`` for 0 or a negative number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _kernel_size(value: object) -> int:
    """``value`` as a positive odd int (a 'same'-padded convolution keeps the length)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"kernel_size must be a positive odd int, got {value!r}")
    if value < 1 or value % 2 != 1:
        raise ValueError(f"kernel_size must be a positive odd int, got {value!r}")
    return int(value)


def _stage_ints(name: str, values: object) -> tuple[int, ...]:
    """``values`` (a sequence or 1-d numpy array with one int >= 1 per stage) as a tuple of
    ints."""
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = list(values)  # numpy scalars: integer ones pass, float ones are refused
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints >= 1 (one per stage), got {values!r}")
    return tuple(_positive_int(f"{name}[{i}]", v) for i, v in enumerate(values))


class BasicBlock1d(nn.Module):
    """ResNet basic block over ``(B, C, L)``: two conv-BN layers, identity or projection
    shortcut, ReLU after the add.

    ``c_in``, ``c_out`` and ``stride`` are ints >= 1, ``kernel_size`` a positive odd int
    (numpy integers too; ``TypeError`` / ``ValueError`` otherwise).

    >>> BasicBlock1d(8, 16, stride=2)(torch.zeros(2, 8, 40)).shape
    torch.Size([2, 16, 20])
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel_size: int = 3) -> None:
        super().__init__()
        c_in = _positive_int("c_in", c_in)
        c_out = _positive_int("c_out", c_out)
        stride = _positive_int("stride", stride)
        kernel_size = _kernel_size(kernel_size)
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
    ``in_channels``, ``num_classes`` and every entry of ``widths`` and ``blocks`` are ints >= 1
    and ``kernel_size`` a positive odd int (numpy integers too; bools, floats and strings are a
    ``TypeError``, never truncated; out-of-range values a ``ValueError``).

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
        in_channels = _positive_int("in_channels", in_channels)
        num_classes = _positive_int("num_classes", num_classes)
        kernel_size = _kernel_size(kernel_size)
        widths = _stage_ints("widths", widths)
        blocks = _stage_ints("blocks", blocks)
        if len(widths) != len(blocks) or not widths:
            raise ValueError(
                f"widths and blocks need one entry per stage, got {widths!r} and {blocks!r}"
            )
        c = widths[0]
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
                layers.append(BasicBlock1d(c, w, stride, kernel_size))
                c = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.stem(x))  # (B, C, L')
        logits: Tensor = self.fc(torch.flatten(self.pool(h), 1))  # (B, num_classes)
        return logits
