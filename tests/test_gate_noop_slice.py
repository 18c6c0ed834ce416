"""A slice written to keep every channel (GhostNet's ``torch.cat([x1, x2], 1)[:, : self.oup]``
with ``oup`` the concatenated width) passes the channels: Python clamps slices, so after
pruning it still keeps them all. Before 2026-12-07 22:55 UTC it was "indexes the labelled
dimension" and, through the residual stream, left GhostNet with 0 gates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, randomise_gates, train_under_budget
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp


class Ghost(nn.Module):
    """GhostNet's ghost module: a primary 1x1 conv, a cheap depthwise conv of its output, both
    concatenated and sliced to ``oup`` channels (``stop`` overrides the slice's end)."""

    def __init__(self, inp: int, oup: int, stop: int | None = None, form: str = "short") -> None:
        super().__init__()
        self.oup, self.stop, self.form = oup, oup if stop is None else stop, form
        init = (oup + 1) // 2
        self.primary = nn.Sequential(nn.Conv2d(inp, init, 1, bias=False), nn.BatchNorm2d(init))
        self.cheap = nn.Sequential(
            nn.Conv2d(init, init, 3, padding=1, groups=init, bias=False), nn.BatchNorm2d(init)
        )

    def forward(self, x: Tensor) -> Tensor:
        x1 = F.relu(self.primary(x))  # (B, init, H, W)
        x2 = F.relu(self.cheap(x1))  # (B, init, H, W)
        out = torch.cat([x1, x2], 1)  # (B, 2 * init, H, W)
        if self.form == "short":
            return out[:, : self.stop]
        if self.form == "long":
            return out[:, 0 : self.stop : 1, :, :]
        return out[..., : self.stop, :, :]  # "ellipsis": the channels counted from the end


class GhostNet(nn.Module):
    def __init__(self, width: int = 8, stop: int | None = None, form: str = "short") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width))
        self.g1 = Ghost(width, 2 * width, form=form)
        self.g2 = Ghost(2 * width, width, stop=stop, form=form)
        self.head = nn.Linear(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))  # (B, C, H, W)
        h = h + self.g2(self.g1(h))  # (B, C, H, W)
        return self.head(h.mean((2, 3)))  # (B, 4)


def _x(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 3, 6, 6, generator=gen)


@pytest.mark.parametrize("form", ["short", "long", "ellipsis"])
def test_a_slice_keeping_every_channel_is_gated_through_and_prunes_exactly(form: str) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = GhostNet(form=form)
    x = _x(4, gen)
    summary = gp.gate_(model, x)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert {"stem.0", "g1.primary.0", "g2.primary.0"} <= gated, str(summary)
    budget = gp.Budget(model, x[:1], flops=0.5)
    train_under_budget(model, budget, 4, lambda: (_x(4, gen), torch.randint(0, 4, (4,))))
    randomise_gates(model, gen)
    dense = gp.cost(GhostNet(form=form), x)
    pruned = check_pruned(model, x, gen, factory=lambda: GhostNet(form=form), batches=(1, 3))
    c = gp.cost(pruned, x)
    assert c.flops < dense.flops
    assert c.params < dense.params


def test_a_slice_dropping_channels_is_a_section_pruned_exactly() -> None:
    """Since 2026-12-08 a literal slice dropping channels is a section of them, as a split's
    (before, "indexes the labelled dimension" kept them whole)."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = GhostNet(width=7)  # g2: init 4, cat 8 wide, [:7] drops one channel
    x = _x(4, gen)
    summary = gp.gate_(model, x)
    assert "indexes the labelled dimension" not in str(summary)
    assert "g2.primary.0" in {p for producers, _ in summary.channel_groups for p in producers}
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory=lambda: GhostNet(width=7), batches=(1, 3))


@settings(max_examples=examples(15))
@given(width=st.integers(2, 9), form=st.sampled_from(["short", "long"]), seed=st.integers(0, 999))
def test_random_widths_and_gate_states_prune_exactly(width: int, form: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GhostNet(width, form=form)
    x = _x(3, gen)
    gp.gate_(model, x)
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory=lambda: GhostNet(width, form=form), batches=(2,))
