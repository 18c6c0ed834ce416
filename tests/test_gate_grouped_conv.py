"""gate_ on grouped convolutions (1 < groups < in_channels, ResNeXt): their channels are pruned
by position, the same positions in every group, so the pruned module is still a grouped
convolution with the same ``groups``; exact, cheaper, and replayable from the JSON plan."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import (
    examples,
    inserted_gating,
    random_gates,
    randomise_batchnorms,
    train_under_budget,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_
from gatedprune.gating.surgery import PLAN_FORMAT


class GroupedBlock(nn.Module):
    """1x1 conv -> grouped kxk conv (groups ``g1``) [-> grouped conv (groups ``g2``)] -> 1x1
    conv, BatchNorms optional, with a residual add or without."""

    def __init__(
        self, c: int, mid: int, g1: int, g2: int | None, bn: bool, residual: bool, dims: int
    ) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.a = conv(c, mid, 1, bias=not bn)
        self.na: nn.Module = norm(mid) if bn else nn.Identity()
        self.g = conv(mid, mid, 3, padding=1, groups=g1, bias=not bn)
        self.ng: nn.Module = norm(mid) if bn else nn.Identity()
        self.g2: nn.Module | None = conv(mid, mid, 1, groups=g2) if g2 is not None else None
        self.b = conv(mid, c, 1)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.na(self.a(x)))  # (B, mid, *S)
        h = F.relu(self.ng(self.g(h)))
        if self.g2 is not None:
            h = F.relu(self.g2(h))
        y = self.b(h)  # (B, c, *S)
        return x + y if self.residual else F.relu(y)


class GroupedNet(nn.Module):
    def __init__(self, blocks: list[tuple[int, int, int | None, bool, bool]], dims: int) -> None:
        super().__init__()
        c = 6
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.stem = conv(2, c, 3, padding=1)
        self.blocks = nn.Sequential(
            *(GroupedBlock(c, mid, g1, g2, bn, res, dims) for mid, g1, g2, bn, res in blocks)
        )
        self.head = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(F.relu(self.stem(x)))
        return self.head(h.flatten(2).mean(-1))


def _grouped(model: nn.Module) -> dict[str, nn.Conv1d | nn.Conv2d]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv1d | nn.Conv2d) and 1 < m.groups < m.in_channels
    }


@st.composite
def _nets(draw: st.DrawFn) -> tuple[list[tuple[int, int, int | None, bool, bool]], int]:
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        g1 = draw(st.sampled_from([2, 3, 4]))
        mid = g1 * draw(st.integers(2, 4))  # at least 2 channels per group: not depthwise
        g2 = draw(st.sampled_from([None, 2])) if mid % 2 == 0 and mid // 2 >= 2 else None
        blocks.append((mid, g1, g2, draw(st.booleans()), draw(st.booleans())))
    return blocks, draw(st.sampled_from([1, 2]))


@settings(max_examples=examples(25), deadline=None)
@given(spec=_nets(), seed=st.integers(0, 2**31 - 1))
def test_random_grouped_stacks_prune_exactly(
    spec: tuple[list[tuple[int, int, int | None, bool, bool]], int], seed: int
) -> None:
    blocks, dims = spec
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shape = (3, 2, 10) if dims == 1 else (2, 2, 5, 5)
    model = GroupedNet(blocks, dims)
    randomise_batchnorms(model, gen)
    model.eval()
    x = torch.randn(*shape, generator=gen)
    dense = gp.cost(model, x)
    assert isinstance(dense, Cost)
    gate_(model, x)
    gating = inserted_gating(model)
    # every grouped conv is now part of a gated channel group (none left "not pruned")
    assert set(_grouped(model)) <= set(gating.slices)
    random_gates(model, gen)
    with torch.no_grad():
        for gate in gating.block_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-5.0, 4.0, generator=gen)
    model.eval()
    hard = gp.cost(model, x, hard=True)
    pruned = gp.prune(model)
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    assert c.flops <= dense.flops
    with torch.no_grad():
        for _ in range(2):
            xi = torch.randn(*shape, generator=gen)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    # grouped convs stay grouped, with their groups
    before = _grouped(GroupedNet(blocks, dims))
    for name, m in _grouped(pruned).items():
        assert m.groups == before[name].groups
    plan = json.loads(json.dumps(export_plan(model)))
    fresh = apply_plan(GroupedNet(blocks, dims), plan)
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        xi = torch.randn(*shape, generator=gen)
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5


def test_a_closed_position_removes_one_channel_of_every_group() -> None:
    torch.manual_seed(0)
    model = GroupedNet([(12, 4, None, True, True)], 1).eval()  # 4 groups of 3 channels
    x = torch.randn(2, 2, 10)
    dense = gp.cost(model, x)
    assert isinstance(dense, Cost)
    summary = gate_(model, x)
    sizes = dict((producers[0], n) for producers, n in summary.channel_groups)
    assert sizes["blocks.0.a"] == 3  # one gate per position, not per channel
    assert sizes["blocks.0.g"] == 3
    gating = inserted_gating(model)
    gates = {producers[0]: gating.group_gates[i] for i, (producers, _) in
             enumerate(summary.channel_groups)}  # fmt: skip
    for gate in gating.group_gates:
        gate.force_(torch.ones(gate.n, dtype=torch.bool))  # type: ignore[operator]
    gates["blocks.0.a"].force_(torch.tensor([True, False, True]))  # type: ignore[operator]
    gates["blocks.0.g"].force_(torch.tensor([False, False, True]))  # type: ignore[operator]
    pruned = gp.prune(model)
    g = pruned.get_submodule("blocks.0.g")
    assert isinstance(g, nn.Conv1d)
    assert (g.in_channels, g.out_channels, g.groups) == (8, 4, 4)
    assert tuple(g.weight.shape) == (4, 2, 3)  # (out, in per group, k)
    with torch.no_grad():
        xi = torch.randn(4, 2, 10)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert c.flops < dense.flops
    assert c.params < dense.params


def test_resnext_trains_under_a_budget_and_prunes_grouped_channels() -> None:
    from zoo import ZOO

    factory, shape = ZOO["resnext1d"]
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    model = factory()
    x = torch.randn(*shape, generator=gen)
    dense = gp.cost(model, x)
    assert isinstance(dense, Cost)
    gate_(model, x)
    budget = gp.Budget(model, x, flops=0.4, warmup_steps=10)
    train_under_budget(
        model,
        budget,
        60,
        lambda: (
            torch.randn(*shape, generator=gen),
            torch.randint(0, 10, (shape[0],), generator=gen),
        ),
    )
    model.eval()
    pruned = gp.prune(model)
    widths = {n: m.in_channels for n, m in _grouped(pruned).items()}
    full = {n: m.in_channels for n, m in _grouped(factory()).items()}
    assert any(widths[n] < full[n] for n in widths)  # grouped channels were pruned
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert c.flops < 0.8 * dense.flops
    with torch.no_grad():
        xi = torch.randn(*shape, generator=gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


def _grouped_plan(keep_in: list[int] | None, keep_out: list[int] | None) -> dict[str, object]:
    return {
        "format": PLAN_FORMAT, "opaque": {}, "cut": {}, "scopes": [],
        "slices": {"0": {"kind": "gconv", "in": keep_in, "out": keep_out}},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("keep_in", "keep_out", "match"),
    [
        ([0, 1, 4], None, r"input channels \[0, 1, 4\] of grouped module '0'.*same positions"),
        (None, [0, 1, 2, 4], r"output channels \[0, 1, 2, 4\] of grouped module '0'"),
        ([1, 3, 5, 7], [0, 1, 2], r"output channels \[0, 1, 2\].*e\.g\. \[0, 1, 2, 4, 5, 6\]"),
    ],
)
def test_plan_keeping_other_positions_per_group_is_refused(
    keep_in: list[int] | None, keep_out: list[int] | None, match: str
) -> None:
    net = nn.Sequential(nn.Conv1d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv1d(8, 2, 1))
    with pytest.raises(ValueError, match=match):
        apply_plan(copy.deepcopy(net), _grouped_plan(keep_in, keep_out))


def test_plan_gconv_kind_on_other_convs_is_refused() -> None:
    for conv in (nn.Conv1d(8, 8, 3), nn.Conv1d(8, 8, 3, groups=8)):
        with pytest.raises(ValueError, match=r"as 'gconv', expected for a grouped one"):
            apply_plan(nn.Sequential(conv), _grouped_plan(None, [0, 1]))


def test_plan_for_a_grouped_conv_applies() -> None:
    net = nn.Sequential(nn.Conv1d(8, 6, 3, groups=2), nn.ReLU(), nn.Conv1d(6, 2, 1))
    plan = _grouped_plan([1, 2, 3, 5, 6, 7], [0, 2, 3, 5])
    with pytest.raises(ValueError, match=r"module '0' \(slice 'gconv'\) keeps input channels"):
        apply_plan(copy.deepcopy(net), plan)  # the model's input is never pruned
    net = nn.Sequential(nn.Conv1d(2, 8, 1), nn.Conv1d(8, 6, 3, groups=2), nn.Conv1d(6, 2, 1))
    plan = {
        "format": PLAN_FORMAT, "opaque": {}, "cut": {}, "scopes": [],
        "slices": {
            "0": {"kind": "conv", "in": None, "out": [1, 2, 3, 5, 6, 7]},
            "1": {"kind": "gconv", "in": [1, 2, 3, 5, 6, 7], "out": [0, 2, 3, 5]},
            "2": {"kind": "conv", "in": [0, 2, 3, 5], "out": None},
        },
    }  # fmt: skip
    out = apply_plan(copy.deepcopy(net), plan)
    g = out[1]
    assert isinstance(g, nn.Conv1d)
    assert (g.in_channels, g.out_channels, g.groups) == (6, 4, 2)
    torch.testing.assert_close(g.weight, net[1].weight[[0, 2, 3, 5]][:, [1, 2, 3]])
    assert out(torch.randn(1, 2, 5)).shape == (1, 2, 3)
