"""gate_ through GroupNorm and InstanceNorm (before 2026-12-07 21:38 UTC both left their
channels ungated).

InstanceNorm normalises each channel alone: its channels are gated one by one, like
BatchNorm's, with the gate after the norm (folded into its affine weight and bias). GroupNorm
normalises runs of ``C / num_groups`` consecutive channels together: a run is one gate value and
is removed whole (``num_groups`` and ``num_channels`` shrink). Central check: the pruned model
equals the gated one in eval mode (<= 1e-5) with closed, fractional and open gates, costs what
the gated hard cost says, and the exported plan replays on a fresh model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import (
    check_pruned,
    examples,
    inserted_gating,
    random_gates,
    train_under_budget,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import gate_

Norm = Callable[[int], nn.Module]
NORMS_2D: dict[str, Norm] = {
    "in_affine": lambda c: nn.InstanceNorm2d(c, affine=True),
    "in_tracked": lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True),
    "gn_per_channel": lambda c: nn.GroupNorm(c, c),
    "gn_4": lambda c: nn.GroupNorm(c // 4, c),
    "gn_no_bias": lambda c: nn.GroupNorm(c // 2, c, bias=False),
}
NORMS_1D: dict[str, Norm] = {
    "in_affine": lambda c: nn.InstanceNorm1d(c, affine=True),
    "in_tracked": lambda c: nn.InstanceNorm1d(c, affine=True, track_running_stats=True),
    "gn_4": lambda c: nn.GroupNorm(c // 4, c),
}


def randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Random affine parameters and running statistics of every GroupNorm/InstanceNorm, so
    a closed channel's constant (the bias) and a folded gate are not no-ops."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm | nn.modules.instancenorm._InstanceNorm):
                if m.weight is not None:
                    m.weight.normal_(1.0, 0.3, generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.5, generator=gen)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.normal_(0.0, 0.5, generator=gen)
                    m.running_var.uniform_(0.5, 2.0, generator=gen)


class ConvNormNet(nn.Module):
    """conv -> norm -> relu -> conv -> norm -> relu -> global pool -> linear (1-d or 2-d)."""

    def __init__(self, norm: Norm, dims: int = 2, c: int = 8) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.c1, self.n1 = conv(3, c, 3, padding=1), norm(c)
        self.c2, self.n2 = conv(c, 2 * c, 3, padding=1), norm(2 * c)
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.n1(self.c1(x)))  # (B, C, *S)
        h = torch.relu(self.n2(self.c2(h)))  # (B, 2C, *S)
        return self.fc(h.flatten(2).mean(2))  # (B, 5)


class BasicBlockGN(nn.Module):
    """ResNet BasicBlock with GroupNorm: relu(x + gn2(conv2(relu(gn1(conv1(x))))))."""

    def __init__(self, c: int, g1: int, g2: int) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(g1, c)
        self.conv2, self.gn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(g2, c)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.gn1(self.conv1(x)))  # (B, C, H, W)
        return torch.relu(x + self.gn2(self.conv2(h)))  # (B, C, H, W)


class ResNetGN(nn.Module):
    """Stem conv + GroupNorm(g_stem) and two GN BasicBlocks sharing its channel space."""

    def __init__(self, c: int = 16, g_stem: int = 4, g1: int = 4, g2: int = 2) -> None:
        super().__init__()
        self.stem, self.gn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.GroupNorm(g_stem, c)
        self.b1, self.b2 = BasicBlockGN(c, g1, g2), BasicBlockGN(c, g1, g_stem)
        self.fc = nn.Linear(c, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.gn(self.stem(x)))  # (B, C, H, W)
        h = self.b2(self.b1(h))  # (B, C, H, W)
        return self.fc(h.mean((2, 3)))  # (B, 4)


def _prepared(model: nn.Module, x: Tensor, seed: int) -> torch.Generator:
    gen = torch.Generator().manual_seed(seed)
    randomise_norms(model, gen)
    random_gates(model, gen)
    return gen


def _values(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return torch.cat([g.eval_value() for g in inserted_gating(model).group_gates])  # (n,)


@pytest.mark.parametrize(("dims", "norms"), [(2, NORMS_2D), (1, NORMS_1D)])
def test_conv_nets_with_norms_prune_exactly(dims: int, norms: dict[str, Norm]) -> None:
    for seed, (key, norm) in enumerate(norms.items()):
        torch.manual_seed(seed)
        model = ConvNormNet(norm, dims)
        x = torch.randn(2, 3, *([6] * dims))
        summary = gate_(model, x)
        assert not summary.ungated_groups or all("fc" in p for p, *_ in summary.ungated_groups), (
            key,
            str(summary),
        )
        n1, n2 = model.n1, model.n2
        per = n1.num_channels // n1.num_groups if isinstance(n1, nn.GroupNorm) else 1
        assert [n for _, n in summary.channel_groups] == [8 // per, 16 // per], key
        gen = _prepared(model, x, seed)
        v = _values(model)
        assert (v == 0).any(), key  # closed,
        assert ((v > 0) & (v < 1)).any(), key  # and fractional
        pruned = check_pruned(model, x, gen, lambda norm=norm: ConvNormNet(norm, dims))
        dense = gp.cost(ConvNormNet(norm, dims), x)
        small = gp.cost(pruned, x)
        assert isinstance(small, gp.Cost)
        assert small.flops < dense.flops, key
        assert small.params < dense.params, key
        for m, old in ((pruned.n1, n1), (pruned.n2, n2)):
            if isinstance(m, nn.GroupNorm):  # whole groups: the run length is unchanged
                assert isinstance(old, nn.GroupNorm)
                assert m.num_channels // m.num_groups == old.num_channels // old.num_groups


def test_groupnorm_gate_is_one_value_per_group_and_prune_removes_whole_groups() -> None:
    torch.manual_seed(0)
    model = ConvNormNet(lambda c: nn.GroupNorm(c // 4, c))
    x = torch.randn(2, 3, 6, 6)
    summary = gate_(model, x)
    assert "one gate per group of n1 (GroupNorm(2, 8))" in str(summary)
    g1, g2 = inserted_gating(model).group_gates
    g1.force_(torch.tensor([False, True]))
    g2.force_(torch.tensor([True, False, False, True]))
    model.eval()
    pruned = gp.prune(model)
    assert (pruned.n1.num_groups, pruned.n1.num_channels) == (1, 4)
    assert (pruned.n2.num_groups, pruned.n2.num_channels) == (2, 8)
    assert pruned.c1.out_channels == 4
    assert pruned.c2.out_channels == 8
    with torch.no_grad():  # kept channels are groups 1 of n1 and 0, 3 of n2
        assert torch.equal(pruned.n1.weight, model.n1.weight[4:8])
        keep = [*range(0, 4), *range(12, 16)]
        assert torch.equal(pruned.n2.bias, model.n2.bias[keep])
        xi = torch.randn(3, 3, 6, 6)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


def test_resnet_groupnorm_blocks_prune_exactly_with_the_coarsest_common_grouping() -> None:
    # stem GN(4, 16) (runs of 4), gn2 GN(2, 16) (runs of 8) share the residual stream: 2 gates
    torch.manual_seed(1)
    model = ResNetGN()
    x = torch.randn(2, 3, 6, 6)
    summary = gate_(model, x)
    sizes = sorted(n for _, n in summary.channel_groups)
    assert sizes == [2, 4, 4], str(summary)  # the stream, and each block's inner GN(4, 16)
    assert len(summary.blocks) == 2  # the branches end in a GroupNorm: block gates fold there
    gen = _prepared(model, x, 1)
    pruned = check_pruned(model, x, gen, ResNetGN)
    for gn in (pruned.gn, pruned.b1.gn2, pruned.b2.gn2):
        if isinstance(gn, nn.GroupNorm):
            assert gn.num_channels in (0, 8, 16)


def test_resnet_groupnorm_trains_under_a_budget_then_prunes_exactly() -> None:
    torch.manual_seed(2)
    model = ResNetGN(g_stem=8, g1=8, g2=8)  # runs of 2 everywhere
    x = torch.randn(8, 3, 6, 6)
    gate_(model, x)
    budget = gp.Budget(model, x[:1], flops=0.5)
    gen = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    train_under_budget(model, budget, 30, lambda: (xs, ys), gate_lr=0.5)
    pruned = check_pruned(model, x, gen, lambda: ResNetGN(g_stem=8, g1=8, g2=8))
    dense = gp.cost(ResNetGN(g_stem=8, g1=8, g2=8), x[:1])
    small = gp.cost(pruned, x[:1])
    assert isinstance(small, gp.Cost)
    assert small.flops < dense.flops
    assert small.params < dense.params


def test_incompatible_groupnorms_leave_the_channels_ungated_with_the_reason() -> None:
    # runs of 4 (GN(3, 12)) and of 6 (GN(2, 12)) on one residual stream: only all 12 together
    model = ResNetGN(c=12, g_stem=3, g1=3, g2=2)
    x = torch.randn(2, 3, 6, 6)
    summary = gate_(model, x)
    why = [w for p, _, w in summary.ungated_groups if "stem" in p]
    assert len(why) == 1, str(summary)
    assert "leave no smaller unit than all of them" in why[0]
    random_gates(model, torch.Generator().manual_seed(0))
    check_pruned(model, x, torch.Generator().manual_seed(1))


def test_groupnorm_with_one_group_keeps_the_channels_whole_with_the_reason() -> None:
    model = ConvNormNet(lambda c: nn.GroupNorm(1, c))
    summary = gate_(model, torch.randn(2, 3, 6, 6))
    reasons = [w for _, _, w in summary.ungated_groups]
    assert any("n1 (GroupNorm(1, 8)) normalises all its channels together" in w for w in reasons)
    assert any("n2 (GroupNorm(1, 16)) normalises all its channels together" in w for w in reasons)
    assert summary.channel_groups == []


@pytest.mark.parametrize(
    "norm",
    [lambda c: nn.InstanceNorm2d(c), lambda c: nn.GroupNorm(2, c, affine=False)],
    ids=["instancenorm_default", "groupnorm_no_affine"],
)
def test_norms_without_affine_parameters_are_left_ungated_with_the_reason(norm: Norm) -> None:
    model = ConvNormNet(norm)
    summary = gate_(model, torch.randn(2, 3, 6, 6))
    reasons = [w for _, _, w in summary.ungated_groups]
    assert any("without affine parameters" in w and "affine=True" in w for w in reasons), str(
        summary
    )


def test_plan_refuses_a_groupnorm_slice_that_splits_a_group() -> None:
    from gatedprune.gating.surgery import slice_module

    gn = nn.GroupNorm(2, 8)
    slice_module(gn, "gn", None, [4, 5, 6, 7])
    assert (gn.num_groups, gn.num_channels, tuple(gn.weight.shape)) == (1, 4, (4,))
    from gatedprune.gating.surgery import _check_slice

    with pytest.raises(ValueError, match="must keep whole groups"):
        _check_slice("gn", nn.GroupNorm(2, 8), {"kind": "gn", "out": [0, 1, 4, 5]})


@settings(max_examples=examples(25), deadline=None)
@given(
    per=st.sampled_from([1, 2, 3, 4]),
    groups=st.integers(1, 5),
    dims=st.sampled_from([1, 2]),
    data=st.data(),
)
def test_groupnorm_random_sizes_and_closed_groups(
    per: int, groups: int, dims: int, data: st.DataObject
) -> None:
    c = per * groups
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    torch.manual_seed(0)

    def build() -> nn.Module:
        return nn.Sequential(
            conv(2, c, 3, padding=1),
            nn.GroupNorm(groups, c),
            nn.ReLU(),
            conv(c, 3, 1),
        )

    model = build()
    x = torch.randn(2, 2, *([5] * dims))
    summary = gate_(model, x)
    if groups == 1:
        assert summary.channel_groups == []
        return
    assert [n for _, n in summary.channel_groups] == [groups]
    closed = data.draw(st.sets(st.integers(0, groups - 1)))
    values = data.draw(st.lists(st.floats(-3.0, 6.0), min_size=groups, max_size=groups))
    gate = inserted_gating(model).group_gates[0]
    with torch.no_grad():
        la = torch.tensor(values)  # (groups,)
        la[sorted(closed)] = -1e4
        gate.log_alpha.copy_(la)
    gen = torch.Generator().manual_seed(per * 31 + groups)
    randomise_norms(model, gen)
    pruned = check_pruned(model, x, gen, build)
    kept = max(int((gate.eval_value() > 0).sum()), 1)  # all closed: one kept, folded to 0
    gn = pruned[1]
    assert isinstance(gn, nn.GroupNorm)
    assert (gn.num_groups, gn.num_channels) == (kept, kept * per)


def test_expected_cost_at_hard_gates_is_the_pruned_cost_with_norms() -> None:
    for norm in (*NORMS_2D.values(),):
        model = ConvNormNet(norm)
        x = torch.randn(1, 3, 5, 5)
        gate_(model, x)
        gen = torch.Generator().manual_seed(3)
        assert len(inserted_gating(model).group_gates) == 2  # both norms' channels gated
        for gate in inserted_gating(model).group_gates:
            gate.force_(torch.rand(gate.n, generator=gen) > 0.5)
        model.eval()
        soft = gp.cost(model, x)
        pruned = gp.cost(gp.prune(model), x)
        assert isinstance(pruned, gp.Cost)
        assert (float(soft.flops.detach()), float(soft.params.detach())) == (
            pruned.flops,
            pruned.params,
        )


def test_groupnorm_training_forward_uses_the_gates() -> None:
    # a closed group is zero after the norm in training mode too (the gate sits after it)
    model = ConvNormNet(lambda c: nn.GroupNorm(c // 4, c))
    x = torch.randn(2, 3, 6, 6)
    gate_(model, x)
    g1 = inserted_gating(model).group_gates[0]
    g1.force_(torch.tensor([False, True]))
    seen: list[Tensor] = []
    model.n1.register_forward_hook(lambda m, i, o: seen.append(o))
    model.train()
    model(x)
    assert seen[0][:, :4].abs().max().item() == 0.0
    assert F.relu(seen[0][:, 4:]).abs().max().item() > 0.0
