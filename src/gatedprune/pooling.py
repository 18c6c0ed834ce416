"""Average pooling over non-overlapping windows along the last axis, as strided slices.

``F.avg_pool1d`` is slow on CPU for the thin, short feature maps of pruned networks (765 µs
for a (256, 23, 40) tensor and window 2, against 65 µs for the same mean as two strided
slices, measured on 1 thread). On small tensors (batch 1) the one torch call is cheaper than
``k`` slices, so the slices are used from ``SLICE_MIN_PER_WINDOW * k`` elements on (measured
crossovers: about 4-8 k elements for ``k`` = 2, 30 k for ``k`` = 8). Shortcut networks and
their pruned plain versions pool with these functions. Under ``torch.export``/``torch.compile``
(ONNX export included) the one ``F.avg_pool1d`` call is always used: the choice depends on the
batch size, which is symbolic there, and the compilers and runtimes optimize pooling themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._jit_internal import is_scripting  # torch.jit.is_scripting (mypy: not re-exported)

__all__ = [
    "AdaptiveMeanPool1d",
    "MeanPool1d",
    "adaptive_mean_pool1d",
    "mean_pool1d",
    "mean_pool_rows",
]

SLICE_MIN_PER_WINDOW = 2048
"""Strided slices from ``SLICE_MIN_PER_WINDOW * k`` input elements on, ``F.avg_pool1d`` below."""


def mean_pool1d(x: Tensor, k: int) -> Tensor:
    """Mean over windows of ``k`` along the last axis, stride ``k``, a short tail dropped:
    the function of ``F.avg_pool1d(x, k, k)``.

    >>> import torch
    >>> mean_pool1d(torch.arange(5.0).view(1, 1, 5), 2)
    tensor([[[0.5000, 2.5000]]])
    """
    if k == 1:
        return x
    n = x.shape[-1] // k
    if torch.compiler.is_compiling() or n == 0 or x.numel() < SLICE_MIN_PER_WINDOW * k:
        # small: one call is cheaper (too short: torch's error); traced: no shape branch
        return F.avg_pool1d(x, k, k)
    x = x[..., : n * k]  # (..., n * k)
    s = x[..., 0::k] + x[..., 1::k]  # (..., n), a new tensor: the rest is done in place
    for i in range(2, k):
        s.add_(x[..., i::k])
    return s.mul_(1.0 / k)


def mean_pool_rows(x: Tensor, k: int) -> Tensor:
    """:func:`mean_pool1d` for channels-last maps: the mean over windows of ``k`` along the
    middle axis of a ``(B, L, C)`` tensor, stride ``k``, a short tail dropped; the result is
    a contiguous ``(B, L // k, C)`` tensor.

    >>> import torch
    >>> mean_pool_rows(torch.arange(5.0).view(1, 5, 1), 2).flatten().tolist()
    [0.5, 2.5]
    """
    if k == 1:
        return x
    n = x.shape[1] // k
    rows = x[:, : n * k].reshape(x.shape[0], n, k, x.shape[2])  # (B, n, k, C)
    s = rows[:, :, 0] + rows[:, :, 1]  # (B, n, C), a new tensor: the rest is done in place
    for i in range(2, k):
        s.add_(rows[:, :, i])
    return s.mul_(1.0 / k)


def adaptive_mean_pool1d(x: Tensor, size: int) -> Tensor:
    """``F.adaptive_avg_pool1d(x, size)``; as :func:`mean_pool1d` when ``size`` divides the
    length (equal windows).

    >>> import torch
    >>> adaptive_mean_pool1d(torch.arange(4.0).view(1, 1, 4), 2)
    tensor([[[0.5000, 2.5000]]])
    """
    length = x.shape[-1]
    if length % size == 0:
        return mean_pool1d(x, length // size)
    return F.adaptive_avg_pool1d(x, size)


def _one(size: Any) -> int:
    """The single size torch's 1-d pooling modules store as an int or a 1-tuple."""
    return int(size if isinstance(size, int) else size[0])


class MeanPool1d(nn.AvgPool1d):
    """``nn.AvgPool1d(k)`` computed by :func:`mean_pool1d` (counted by :func:`gatedprune.cost`
    as an ``AvgPool1d``).

    >>> import torch
    >>> MeanPool1d(2)(torch.ones(1, 3, 8)).shape
    torch.Size([1, 3, 4])
    """

    def __init__(self, kernel_size: int) -> None:
        super().__init__(kernel_size, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if is_scripting():  # torch.jit.script: nn.AvgPool1d's call
            return F.avg_pool1d(
                x,
                self.kernel_size,
                self.stride,
                self.padding,
                self.ceil_mode,
                self.count_include_pad,
            )
        return mean_pool1d(x, _one(self.kernel_size))


class AdaptiveMeanPool1d(nn.AdaptiveAvgPool1d):
    """``nn.AdaptiveAvgPool1d(size)`` computed by :func:`adaptive_mean_pool1d`.

    >>> import torch
    >>> AdaptiveMeanPool1d(5)(torch.ones(2, 3, 40)).shape
    torch.Size([2, 3, 5])
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)

    def forward(self, x: Tensor) -> Tensor:
        if is_scripting():  # torch.jit.script: nn.AdaptiveAvgPool1d's call
            return F.adaptive_avg_pool1d(x, self.output_size)
        return adaptive_mean_pool1d(x, _one(self.output_size))
