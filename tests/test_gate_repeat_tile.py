"""``t.repeat(...)`` / ``t.tile(...)`` copying gated channels along other dimensions (PointNet's
segmentation head: the global feature repeated to every point, then concatenated) passes the
channels through like ``expand`` does; a repeat of the channel dimension itself keeps them
whole with a reason. Before 2026-12-07 22:05 UTC every such repeat was "an op gate_ does not
prune through" and kept both sides whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, randomise_gates, train_under_budget
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp

FORMS = ("repeat", "repeat_tuple", "tile", "tile_short", "repeat_lead")


class PointSeg(nn.Module):
    """Per-point features, a global max feature copied to every point, both concatenated."""

    def __init__(self, form: str, c1: int = 8, c2: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.form = form
        self.c1, self.bn1 = nn.Conv1d(3, c1, 1), nn.BatchNorm1d(c1)
        self.c2, self.bn2 = nn.Conv1d(c1, c2, 1), nn.BatchNorm1d(c2)
        self.seg = nn.Conv1d(c1 + c2, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.c1(x)))  # (B, c1, N)
        g = F.relu(self.bn2(self.c2(h))).amax(2, keepdim=True)  # (B, c2, 1)
        n = x.shape[2]
        if self.form == "repeat":
            g = g.repeat(1, 1, n)  # (B, c2, N)
        elif self.form == "repeat_tuple":
            g = g.repeat((1, 1, n))
        elif self.form == "tile":
            g = g.tile((1, 1, n))
        elif self.form == "tile_short":
            g = g.tile((n,))  # tile pads its counts with 1s on the left: (1, 1, n)
        else:  # repeat_lead: a new leading dimension of size 1, then dropped
            g = g.repeat(1, 1, 1, n)[0]  # (1, B, c2, N) -> (B, c2, N)
        return self.seg(torch.cat([h, g], 1))  # (B, classes, N)


class RepeatChannels(nn.Module):
    """The channels themselves repeated: ``h.repeat(1, 2, 1)`` (kept whole, with a reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 6, 1), nn.Conv1d(12, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(F.relu(self.c1(x)).repeat(1, 2, 1))


def _x(b: int, n: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 3, n, generator=gen)


@pytest.mark.parametrize("form", FORMS)
def test_every_repeat_form_gates_both_sides_and_prunes_exactly(form: str) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = PointSeg(form)
    x = _x(4, 16, gen)
    summary = gp.gate_(model, x)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert {"c1", "c2"} <= gated, str(summary)
    budget = gp.Budget(model, x[:1], flops=0.5)
    train_under_budget(
        model,
        budget,
        5,
        lambda: (_x(4, 16, gen), torch.randint(0, 3, (4, 16), generator=gen)),
    )
    randomise_gates(model, gen)
    dense = gp.cost(PointSeg(form), x)
    pruned = check_pruned(model, x, gen, factory=lambda: PointSeg(form), batches=(1, 3))
    c = gp.cost(pruned, x)
    assert c.flops < dense.flops
    assert c.params < dense.params
    with torch.no_grad():  # another number of points: the repeat count is not rewritten
        xi = _x(2, 9, gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


def test_repeating_the_channel_dimension_keeps_them_whole_with_a_reason() -> None:
    model = RepeatChannels()
    summary = gp.gate_(model, torch.randn(2, 3, 5))
    assert not summary.channel_groups
    reasons = " ".join(why for _, _, why in summary.ungated_groups)
    assert "repeats the labelled channels" in reasons


@settings(max_examples=examples(15))
@given(
    form=st.sampled_from(FORMS),
    c1=st.integers(2, 6),
    c2=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_random_widths_and_gate_states_prune_exactly(
    form: str, c1: int, c2: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PointSeg(form, c1, c2)
    x = _x(3, 7, gen)
    gp.gate_(model, x)
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory=lambda: PointSeg(form, c1, c2), batches=(1, 2))
