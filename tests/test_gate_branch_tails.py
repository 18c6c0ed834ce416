"""Residual branches that end in ops moving elements after their last layer (ConvNeXt's
permute back to ``(B, C, H, W)`` and layer scale, MLP-Mixer's token mixing transposed back,
TCN's chomp ``x[:, :, :-s].contiguous()``) get a block gate: removing the branch is exact,
and the gate's value folds into that layer (the moves commute with its scalar)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, inserted_gating, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import gate_


class ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock: depthwise 7x7, permute to channels-last, LayerNorm, 4x MLP,
    layer scale, permute back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        h = self.fc2(F.gelu(self.fc1(self.norm(h))))  # (B, H, W, C)
        return x + (self.gamma * h).permute(0, 3, 1, 2)  # (B, C, H, W)


class MixerBlock(nn.Module):
    """MLP-Mixer: token mixing over the transposed patches, then channel mixing."""

    def __init__(self, tokens: int, c: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.t1, self.t2 = nn.Linear(tokens, 2 * tokens), nn.Linear(2 * tokens, tokens)
        self.c1, self.c2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x: Tensor) -> Tensor:
        h = self.n1(x).transpose(1, 2)  # (B, C, T)
        x = x + self.t2(F.gelu(self.t1(h))).transpose(1, 2)  # (B, T, C)
        return x + self.c2(F.gelu(self.c1(self.n2(x))))  # (B, T, C)


class TemporalBlock(nn.Module):
    """TCN block: dilated causal convolutions, padded on both sides and chomped."""

    def __init__(self, c: int, dilation: int) -> None:
        super().__init__()
        self.pad = 2 * dilation
        self.a = nn.Conv1d(c, c, 3, padding=self.pad, dilation=dilation)
        self.b = nn.Conv1d(c, c, 3, padding=self.pad, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x)[:, :, : -self.pad].contiguous())  # (B, C, L)
        return F.relu(x + self.b(h)[:, :, : -self.pad].contiguous())  # (B, C, L)


class Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "convnext":
            self.stem = nn.Conv2d(3, 8, 2, stride=2)
            self.blocks = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        elif kind == "mixer":
            self.stem = nn.Linear(3, 8)
            self.blocks = nn.Sequential(MixerBlock(6, 8), MixerBlock(6, 8))
        else:
            self.stem = nn.Conv1d(3, 8, 1)
            self.blocks = nn.Sequential(TemporalBlock(8, 1), TemporalBlock(8, 2))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x))
        pooled = h.mean(1) if self.kind == "mixer" else h.flatten(2).mean(-1)  # (B, 8)
        return self.head(pooled)  # (B, 2)


SHAPES = {"convnext": (2, 3, 8, 8), "mixer": (2, 6, 3), "tcn": (2, 3, 12)}


@settings(max_examples=examples(15), deadline=None)
@given(kind=st.sampled_from(sorted(SHAPES)), seed=st.integers(0, 2**31 - 1))
def test_branches_ending_in_moves_get_block_gates(kind: str, seed: int) -> None:
    # before 2026-12-07 16:30 UTC: no block gate ("the branch ends in permute_1, not a
    # module the gate can fold into"): ConvNeXt, Mixer and TCN could not lose depth
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Net(kind)
    x = torch.randn(*SHAPES[kind], generator=gen)
    summary = gate_(model, x)
    assert len(summary.blocks) == (4 if kind == "mixer" else 2), str(summary)
    randomise_gates(model, gen)
    closed = int(torch.randint(len(summary.blocks), (1,), generator=gen))
    inserted_gating(model).block_gates[closed].force_(torch.tensor([False]))  # type: ignore[operator]

    def factory() -> Net:
        torch.manual_seed(seed)
        return Net(kind)

    pruned = check_pruned(model, x, gen, factory, batches=(1, 3))
    c, dense = gp.cost(pruned, x), gp.cost(Net(kind), x)
    assert isinstance(c, gp.Cost)
    assert isinstance(dense, gp.Cost)
    assert c.flops < dense.flops
    assert c.params < dense.params


class TailReadsTensor(nn.Module):
    """A branch whose last op after its Linear indexes with a tensor of the input: not a
    move (``x[idx]`` with ``idx`` data), left without a block gate, with the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        order = x[0].argsort()  # (4,) data-dependent
        return self.head(x + self.fc(x)[:, order])  # (B, 2)


@pytest.mark.parametrize("factory", [TailReadsTensor])
def test_a_tail_reading_a_tensor_is_not_a_move(factory: type[nn.Module]) -> None:
    summary = gate_(factory(), torch.randn(3, 4))
    assert not summary.blocks
    reasons = [why for _, why in summary.ungated_adds]
    assert any("neither a module nor a linear map" in why for why in reasons), reasons


class BiasWithAlpha(nn.Module):
    """A branch ending in a parameter map whose bias is scaled by ``alpha``
    (``torch.sub(h @ W2, b2, alpha=2)``): left whole, with a reason naming ``alpha``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.W1, self.W2 = (
            nn.Parameter(torch.randn(8, 16) / 3),
            nn.Parameter(torch.randn(16, 8) / 4),
        )
        self.b2 = nn.Parameter(torch.randn(8))
        self.Wo = nn.Parameter(torch.randn(3, 8) / 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(x @ self.W1)  # (B, 16)
        if self.op == "sub":
            y = torch.sub(h @ self.W2, self.b2, alpha=2.0)  # (B, 8)
        else:
            y = torch.add(h @ self.W2, self.b2, alpha=3)  # (B, 8)
        return F.linear(x + y, self.Wo)  # (B, 3)


@pytest.mark.parametrize(("op", "alpha"), [("sub", "alpha=2.0"), ("add", "alpha=3")])
def test_a_bias_scaled_by_alpha_says_so(op: str, alpha: str) -> None:
    # before 2026-12-07: "the branch ends in sub, not a module the gate can fold into" and
    # "node 'sub' ... adds an ungated tensor or constant", though parameter maps take gates
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, generator=gen)

    def factory() -> BiasWithAlpha:
        torch.manual_seed(3)
        return BiasWithAlpha(op)

    model = factory()
    summary = gate_(model, x)
    assert not summary.blocks, str(summary)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert f"scaled by {alpha}" in reasons["W2"], str(summary)
    assert "fold the scale into the bias parameter" in reasons["W2"], str(summary)
    tails = [why for _, why in summary.ungated_adds]
    assert any("a bias added or subtracted without alpha" in why for why in tails), tails
    assert not any("not a module the gate can fold into" in why for why in tails), tails
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory)
