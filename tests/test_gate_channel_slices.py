"""Constant slices of the channels, ``x[:, a:b]``, pruned as sections of a split: ReXNet's
partial residual (``timm/models/rexnet.py:135``, ``x = torch.cat([x[:, 0:self.in_channels] +
shortcut, x[:, self.in_channels:]], dim=1)``) adds its input to the first channels of a wider
block output and passes the rest on. Before 2026-12-08 the slice "indexes the labelled
dimension" kept the convolutions around it whole. Replica with tiny widths; timm is not
imported."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from gating_helpers import examples, randomise_batchnorms, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost
from gatedprune.gating import apply_plan, export_plan, gate_


class LinearBottleneck(nn.Module):
    """timm/models/rexnet.py:48 ``LinearBottleneck`` (no SE): 1x1 expand, depthwise, 1x1
    project to ``out_chs >= in_chs``, the input added to the first ``in_chs`` channels."""

    def __init__(self, in_chs: int, out_chs: int, exp: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_chs, out_chs
        mid = in_chs * exp
        self.conv_exp = nn.Sequential(nn.Conv2d(in_chs, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv_dw = nn.Sequential(
            nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        )
        self.conv_pwl = nn.Sequential(
            nn.Conv2d(mid, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs)
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = F.silu(self.conv_exp(x))  # (B, mid, H, W)
        x = F.relu6(self.conv_dw(x))  # (B, mid, H, W)
        x = self.conv_pwl(x)  # (B, out, H, W)
        x = torch.cat(  # timm/models/rexnet.py:135
            [x[:, 0 : self.in_channels] + shortcut, x[:, self.in_channels :]], dim=1
        )  # (B, out, H, W)
        return x


class ReXNet(nn.Module):
    """A stem, two partial residual bottlenecks widening the channels, a head."""

    def __init__(self, c0: int = 4, c1: int = 6, c2: int = 7) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, padding=1), nn.BatchNorm2d(c0))
        self.blocks = nn.Sequential(LinearBottleneck(c0, c1, 2), LinearBottleneck(c1, c2, 2))
        self.head = nn.Linear(c2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(F.silu(self.stem(x)))  # (B, c2, H, W)
        return self.head(h.mean((2, 3)))  # (B, 3)


def test_partial_residual_gated() -> None:
    torch.manual_seed(0)
    model = ReXNet()
    summary = gate_(model, torch.randn(2, 3, 6, 6))
    text = str(summary)
    assert "indexes the labelled dimension" not in text, text
    gated = {p for ps, _ in summary.channel_groups for p in ps}
    assert {"stem.0", "blocks.0.conv_pwl.0", "blocks.1.conv_pwl.0"} <= gated, text


@settings(max_examples=examples(8), deadline=None)
@given(
    c0=st.integers(1, 4),
    d1=st.integers(0, 3),
    d2=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_partial_residual_pruned_exact_and_replayed(c0: int, d1: int, d2: int, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    c1, c2 = c0 + d1, c0 + d1 + d2
    model = ReXNet(c0, c1, c2)
    randomise_batchnorms(model, gen)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    gate_(model, x)
    randomise_gates(model, gen)
    model.eval()
    hard = gp.cost(model, x, hard=True)
    plan = json.loads(json.dumps(export_plan(model)))
    pruned = gp.prune(model).eval()
    fresh = torch.randn(3, 3, 5, 5, generator=gen)
    with torch.no_grad():
        assert (pruned(fresh) - model(fresh)).abs().max().item() <= 1e-5
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (hard.flops.item(), hard.params.item())
    torch.manual_seed(seed)
    replayed = apply_plan(ReXNet(c0, c1, c2), plan)
    replayed.load_state_dict(pruned.state_dict())
    replayed.eval()
    with torch.no_grad():
        assert (replayed(fresh) - pruned(fresh)).abs().max().item() <= 1e-5
