"""ShuffleNetV2's channel shuffle, ``x.view(b, g, c // g, h, w)``, transposed and merged back,
with ``c`` read from the shuffled tensor: channel ``j`` of every group is pruned with channel
``j`` of the others, so the pruned code's shuffle of the pruned width interleaves the kept
channels as the original does. Before 2026-12-08 00:03 UTC the ``c // g`` pinned every channel
group around a shuffle ("node 'floordiv' computes with the labelled width that node 'size'
reads"); the width used as a number (``h / (c // 2)``) is still kept whole."""

from __future__ import annotations

import pytest
import torch
from gating_helpers import check_pruned, examples, inserted_gating, train_under_budget
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate

# how the shuffle reads the width and reshapes: torchvision's (the width read once, merged
# back with it), -1 in the merge, x.size(1), x.shape, reshape instead of view, -1 for the
# group size, the widths written as ints
FORMS = ("torchvision", "minus_one", "size1", "shape", "reshape", "split_minus_one", "literal")


def channel_shuffle(x: Tensor, groups: int, form: str, width: int) -> Tensor:
    """ShuffleNet's channel shuffle of ``x`` (B, C, H, W) written in ``form`` (``width``: C,
    written as an int by the ``"literal"`` form)."""
    if form == "torchvision":
        b, c, h, w = x.size()
        per = c // groups
        x = x.view(b, groups, per, h, w)  # (B, G, C // G, H, W)
        x = torch.transpose(x, 1, 2).contiguous()  # (B, C // G, G, H, W)
        return x.view(b, c, h, w)  # (B, C, H, W)
    if form == "minus_one":
        b, c, h, w = x.size()
        x = x.view(b, groups, c // groups, h, w)  # (B, G, C // G, H, W)
        x = torch.transpose(x, 1, 2).contiguous()  # (B, C // G, G, H, W)
        return x.view(b, -1, h, w)  # (B, C, H, W)
    if form == "size1":
        c = x.size(1)
        x = x.view(x.size(0), groups, c // groups, x.size(2), x.size(3))  # (B, G, C // G, H, W)
        return x.transpose(1, 2).reshape(x.size(0), -1, x.size(3), x.size(4))  # (B, C, H, W)
    if form == "shape":
        b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        x = x.view(b, groups, c // groups, h, w)  # (B, G, C // G, H, W)
        return x.transpose(1, 2).contiguous().view(b, c, h, w)  # (B, C, H, W)
    if form == "split_minus_one":
        b, _, h, w = x.size()
        x = x.view(b, groups, -1, h, w)  # (B, G, C // G, H, W)
        return torch.transpose(x, 1, 2).contiguous().view(b, -1, h, w)  # (B, C, H, W)
    if form == "literal":
        b, _, h, w = x.size()
        x = x.view(b, groups, width // groups, h, w)  # (B, G, C // G, H, W)
        return torch.transpose(x, 1, 2).contiguous().view(b, width, h, w)  # (B, C, H, W)
    b, c, h, w = x.size()
    x = x.reshape(b, groups, c // groups, h, w)  # (B, G, C // G, H, W)
    return torch.transpose(x, 1, 2).reshape(b, -1, h, w)  # (B, C, H, W)


def cbr(i: int, o: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """ShuffleNetV2's unit (torchvision's, tiny widths)."""

    def __init__(self, inp: int, oup: int, stride: int, form: str) -> None:
        super().__init__()
        self.stride, self.form, self.width = stride, form, oup
        bf = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, bf, 1, bias=False),
                nn.BatchNorm2d(bf),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else bf, bf, 1, bias=False),
            nn.BatchNorm2d(bf),
            nn.ReLU(inplace=True),
            nn.Conv2d(bf, bf, 3, stride, 1, groups=bf, bias=False),
            nn.BatchNorm2d(bf),
            nn.Conv2d(bf, bf, 1, bias=False),
            nn.BatchNorm2d(bf),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)  # (B, C / 2, H, W) each
            out = torch.cat((x1, self.branch2(x2)), dim=1)  # (B, C, H, W)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)  # (B, C, H', W')
        return channel_shuffle(out, 2, self.form, self.width)


class ShuffleNet(nn.Module):
    def __init__(self, form: str = "torchvision") -> None:
        super().__init__()
        self.conv1 = cbr(3, 8, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(
            InvertedResidual(8, 16, 2, form), InvertedResidual(16, 16, 1, form)
        )
        self.stage3 = nn.Sequential(
            InvertedResidual(16, 32, 2, form), InvertedResidual(32, 32, 1, form)
        )
        self.conv5 = cbr(32, 64, 1)
        self.fc = nn.Linear(64, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))  # (B, 8, H / 4, W / 4)
        x = self.conv5(self.stage3(self.stage2(x)))  # (B, 64, H / 16, W / 16)
        return self.fc(x.mean([2, 3]))  # (B, 5)


class GroupShuffle(nn.Module):
    """ShuffleNet v1's pattern: a convolution's output shuffled in ``groups`` groups, read by a
    depthwise convolution."""

    def __init__(self, groups: int, per: int, form: str) -> None:
        super().__init__()
        self.groups, self.form = groups, form
        self.c = c = groups * per
        self.a = nn.Sequential(nn.Conv2d(3, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c))
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = channel_shuffle(self.a(x), self.groups, self.form, self.c)  # (B, C, H, W)
        return self.head(torch.relu(self.b(y)))  # (B, 2, H, W)


def _img(b: int, gen: torch.Generator, side: int = 32) -> Tensor:
    return torch.randn(b, 3, side, side, generator=gen)


def _reasons(summary: gp.GateSummary) -> str:
    return " | ".join(why for _, _, why in summary.ungated_groups)


def _set_gates(model: nn.Module, states: list[int]) -> None:
    """Gate entries closed (0), open (1) or in between (2), cycling through ``states``."""
    values = {0: -20.0, 1: 20.0, 2: 0.5}
    k = 0
    with torch.no_grad():
        for gate in inserted_gating(model).group_gates:
            assert isinstance(gate, HardConcreteGate)
            for i in range(gate.n):
                gate.log_alpha[i] = values[states[k % len(states)]]
                k += 1


@pytest.mark.parametrize("form", FORMS)
def test_shufflenet_is_gated_around_its_shuffles(form: str) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ShuffleNet(form)
    summary = gp.gate_(model, _img(2, gen))
    reasons = _reasons(summary)
    assert "floordiv" not in reasons, str(summary)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    branches = {
        "stage2.0.branch1.2",
        "stage2.0.branch2.5",
        "stage2.1.branch2.5",
        "stage3.0.branch1.2",
        "stage3.0.branch2.5",
        "stage3.1.branch2.5",
    }
    assert branches <= gated, str(summary)
    # each shuffle pairs channel j of its two halves: the stage's 16 (32) output channels
    # are 8 (16) gates (the next unit's chunk(2, 1) prunes its two halves apart; before
    # 2026-12-08 00:22 UTC it paired them again: 4 (8) gates)
    sizes = {producers[0]: size for producers, size in summary.channel_groups}
    assert sizes["stage2.0.branch1.2"] == 8
    assert sizes["stage3.0.branch1.2"] == 16


@settings(max_examples=examples(12))
@given(
    form=st.sampled_from(FORMS),
    states=st.lists(st.integers(0, 2), min_size=1, max_size=24),
    seed=st.integers(0, 999),
)
def test_random_gate_states_prune_exactly(form: str, states: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ShuffleNet(form)
    x = _img(2, gen)
    gp.gate_(model, x)
    _set_gates(model, states)
    pruned = check_pruned(model, x, gen, factory=lambda: ShuffleNet(form), batches=(1, 3))
    if 0 in states:
        dense = gp.cost(ShuffleNet(form), x)
        c = gp.cost(pruned, x)
        assert c.params < dense.params
        assert c.flops < dense.flops


@settings(max_examples=examples(12))
@given(
    groups=st.integers(2, 4),
    per=st.integers(2, 4),
    form=st.sampled_from(FORMS),
    states=st.lists(st.integers(0, 2), min_size=1, max_size=12),
    seed=st.integers(0, 999),
)
def test_a_shuffle_of_g_groups_prunes_exactly(
    groups: int, per: int, form: str, states: list[int], seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GroupShuffle(groups, per, form)
    x = _img(2, gen, side=5)
    summary = gp.gate_(model, x)
    assert summary.channel_groups == [(["a.0"], per)], str(summary)
    _set_gates(model, states)
    check_pruned(model, x, gen, factory=lambda: GroupShuffle(groups, per, form), batches=(1,))


def test_a_budget_trains_and_the_pruned_shufflenet_is_smaller() -> None:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = ShuffleNet()
    x = _img(2, gen)
    gp.gate_(model, x)
    budget = gp.Budget(model, x[:1], flops=0.4)
    train_under_budget(
        model, budget, 6, lambda: (_img(4, gen), torch.randint(0, 5, (4,))), gate_lr=0.5
    )
    with torch.no_grad():  # some pairs closed for sure, whatever the few steps reached
        for gate in inserted_gating(model).group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha[: gate.n // 2] = -20.0
    pruned = check_pruned(model, x, gen, factory=ShuffleNet, batches=(1, 3))
    assert isinstance(pruned, ShuffleNet)
    down = pruned.stage2[0]
    assert isinstance(down, InvertedResidual)
    b1, b2 = down.branch1[2], down.branch2[5]
    assert isinstance(b1, nn.Conv2d)
    assert isinstance(b2, nn.Conv2d)
    # the shuffle pairs the branches' channels: both keep the same count, fewer than 8
    assert b1.out_channels == b2.out_channels < 8
    last = pruned.get_submodule("stage3.1.branch2.5")  # (its unit rewritten: chunk -> split)
    assert isinstance(last, nn.Conv2d)
    assert last.out_channels < 16
    dense, c = gp.cost(ShuffleNet(), x), gp.cost(pruned, x)
    assert c.params < dense.params
    assert c.flops < dense.flops


class WidthUsed(nn.Module):
    """The shuffle's ``c // 2`` also used as a number: the channels are kept whole."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.a(x))  # (B, 8, H, W)
        b, c, h, w = y.size()
        per = c // 2
        if self.how == "divides":
            y = y / per  # (B, 8, H, W)
            y = y.view(b, 2, per, h, w)  # (B, 2, 4, H, W)
        elif self.how == "only_arithmetic":
            return self.b(y / (c // 2))  # (B, 2, H, W)
        else:  # (c // 4, 4): not a literal number of groups
            y = y.view(b, c // 4, 4, h, w)  # (B, 2, 4, H, W)
        y = y.transpose(1, 2).reshape(b, -1, h, w)  # (B, 8, H, W)
        return self.b(y)  # (B, 2, H, W)


@pytest.mark.parametrize("how", ["divides", "only_arithmetic", "groups_computed"])
def test_the_width_used_otherwise_keeps_the_channels_whole(how: str) -> None:
    gen = torch.Generator().manual_seed(2)
    model = WidthUsed(how)
    x = _img(2, gen, side=4)
    summary = gp.gate_(model, x)
    assert not summary.channel_groups, str(summary)
    assert "computes with the labelled width" in _reasons(summary), str(summary)
    expected = model(x)
    assert torch.allclose(gp.prune(model)(x), expected, atol=1e-5)


class _WidthReadAttention(nn.Module):
    """Attention splitting its heads with the head size computed from the width it reads,
    ``q.view(B, T, H, C // H)``, the same code as a shuffle's split: it must stay a head split
    (one gate per head) and prune exactly."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.size()
        h = self.heads
        q = self.q(x).view(b, t, h, c // h).transpose(1, 2)  # (B, H, T, C // H)
        k = self.k(x).view(b, t, h, c // h).transpose(1, 2)  # (B, H, T, C // H)
        v = self.v(x).view(b, t, h, c // h).transpose(1, 2)  # (B, H, T, C // H)
        w = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # (B, H, T, T)
        y = (w @ v).transpose(1, 2).reshape(b, t, -1)  # (B, T, C')
        return self.o(y)  # (B, T, 3)


@settings(max_examples=examples(10), deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_attention_with_head_size_read_from_the_width_prunes_exactly(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _WidthReadAttention()
    x = torch.randn(2, 5, 8, generator=gen)
    summary = gp.gate_(model, x)
    assert summary.channel_groups == [(["q", "k", "v"], 2)]
    assert summary.head_groups == [0]
    with torch.no_grad():
        for g in inserted_gating(model).modules():
            if isinstance(g, HardConcreteGate):
                g.log_alpha.uniform_(-4.0, 4.0, generator=gen)
    check_pruned(model, x, gen, factory=_WidthReadAttention, batches=(1, 3))
