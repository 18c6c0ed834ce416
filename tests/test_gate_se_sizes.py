"""Squeeze-and-excitation written with the channel count read from the input (the common
SENet/CBAM repository idiom ``b, c, _, _ = x.size(); y = pool(x).view(b, c); x * fc(y).view(b,
c, 1, 1)``): the excitation's channels are pruned with the ones it multiplies, so the pruned
code reshapes it with the pruned count and stays exact. Before 2026-12-07 22:50 UTC the read
size pinned the whole residual stream ("node 'view_1' computes with the labelled width that
node 'size' reads"); ``torch.flatten`` and ``[:, :, None, None]`` were gated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, randomise_gates, train_under_budget
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp

FORMS = ("size", "shape", "size_dims")


class SE(nn.Module):
    def __init__(self, c: int, form: str) -> None:
        super().__init__()
        self.form = form
        self.fc = nn.Sequential(
            nn.Linear(c, max(c // 2, 1)), nn.SiLU(), nn.Linear(max(c // 2, 1), c), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.form == "size":
            b, c, _, _ = x.size()
        elif self.form == "shape":
            b, c = x.shape[0], x.shape[1]
        else:
            b, c = x.size(0), x.size(1)
        y = F.adaptive_avg_pool2d(x, 1).view(b, c)  # (B, C)
        return x * self.fc(y).view(b, c, 1, 1)  # (B, C, H, W)


class SENet(nn.Module):
    def __init__(self, c: int = 8, mid: int = 6, form: str = "size") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c))
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 3, padding=1), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, c, 3, padding=1), nn.BatchNorm2d(c)
        self.se = SE(c, form)
        self.head = nn.Linear(c, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))  # (B, C, H, W)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h)))))  # (B, C, H, W)
        h = F.relu(h + self.se(out))  # (B, C, H, W)
        return self.head(h.mean((2, 3)))  # (B, 4)


def _x(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 3, 6, 6, generator=gen)


@pytest.mark.parametrize("form", FORMS)
def test_the_stream_read_by_an_se_size_is_gated_and_prunes_exactly(form: str) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SENet(form=form)
    x = _x(4, gen)
    summary = gp.gate_(model, x)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert {"stem.0", "conv2", "se.fc.2"} <= gated, str(summary)
    budget = gp.Budget(model, x[:1], flops=0.5)
    train_under_budget(model, budget, 4, lambda: (_x(4, gen), torch.randint(0, 4, (4,))))
    randomise_gates(model, gen)
    dense = gp.cost(SENet(form=form), x)
    pruned = check_pruned(model, x, gen, factory=lambda: SENet(form=form), batches=(1, 3))
    c = gp.cost(pruned, x)
    assert c.flops < dense.flops
    assert c.params < dense.params


class SizeDivides(nn.Module):
    """The read width used as a number, not a reshape: still kept whole."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.c1(x))  # (B, 6, H, W)
        return self.c2(h / h.size(1))  # (B, 2, H, W)


def test_a_size_computed_with_stays_whole() -> None:
    summary = gp.gate_(SizeDivides(), torch.randn(2, 3, 4, 4))
    assert not summary.channel_groups
    reasons = " ".join(why for _, _, why in summary.ungated_groups)
    assert "computes with the labelled width" in reasons


@settings(max_examples=examples(15))
@given(
    c=st.integers(2, 9),
    mid=st.integers(1, 6),
    form=st.sampled_from(FORMS),
    seed=st.integers(0, 999),
)
def test_random_widths_and_gate_states_prune_exactly(
    c: int, mid: int, form: str, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SENet(c, mid, form)
    x = _x(3, gen)
    gp.gate_(model, x)
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory=lambda: SENet(c, mid, form), batches=(2,))
