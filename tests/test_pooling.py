"""The strided-slice pooling that shortcut networks and their pruned versions share computes
what torch's average pooling computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import gatedprune as gp
from gatedprune.pooling import AdaptiveMeanPool1d, MeanPool1d, adaptive_mean_pool1d, mean_pool1d


@settings(max_examples=examples(40), deadline=None)
@given(
    batch=st.sampled_from([1, 4, 300]),  # 300: large enough for the strided slices
    channels=st.integers(1, 5),
    length=st.integers(1, 45),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_mean_pool_is_avg_pool(batch: int, channels: int, length: int, k: int, seed: int) -> None:
    x = torch.randn(batch, channels, length, generator=torch.Generator().manual_seed(seed))
    if length < k:  # too short for one window: torch's own error
        with pytest.raises(RuntimeError):
            mean_pool1d(x, k)
        return
    want = F.avg_pool1d(x, k, k)  # (B, C, L // k), the tail dropped
    got = mean_pool1d(x, k)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("length", "size"), [(40, 5), (20, 5), (10, 5), (5, 5), (7, 3), (40, 1)])
def test_adaptive_mean_pool_is_adaptive_avg_pool(length: int, size: int) -> None:
    x = torch.randn(3, 4, length)  # (B, C, L)
    want = F.adaptive_avg_pool1d(x, size)
    assert torch.allclose(adaptive_mean_pool1d(x, size), want, atol=1e-6, rtol=1e-6)
    assert torch.allclose(AdaptiveMeanPool1d(size)(x), want, atol=1e-6, rtol=1e-6)


def test_the_modules_are_counted_as_the_pooling_they_replace() -> None:
    x = torch.randn(2, 3, 16)  # (B, C, L)
    assert gp.cost(MeanPool1d(2), x).flops == gp.cost(torch.nn.AvgPool1d(2), x).flops > 0
    assert (
        gp.cost(AdaptiveMeanPool1d(4), x).flops
        == gp.cost(torch.nn.AdaptiveAvgPool1d(4), x).flops
        > 0
    )
