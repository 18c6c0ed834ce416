"""shortcuts="dense": new gated edges between residual blocks; survivors become real code."""

from __future__ import annotations

import json

import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from zoo import BasicBlock, randomise_norms

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, ResNet1d, ScaledAdd, apply_plan, export_plan, gate_


class DeepResNet1d(nn.Module):
    def __init__(self, per_stage: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU())
        self.stage1 = nn.Sequential(*[BasicBlock(8, 8) for _ in range(per_stage)])
        self.stage2 = nn.Sequential(
            BasicBlock(8, 12, 2), *[BasicBlock(12, 12) for _ in range(per_stage - 1)]
        )
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.stage2(self.stage1(self.stem(x))).mean(dim=-1))


def test_dense_shortcuts_start_closed_and_prune_exactly() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = DeepResNet1d()
    randomise_norms(model, gen)
    model.eval()
    x = torch.randn(3, 1, 16, generator=gen)
    dense = gatedprune.cost(model, x)
    with torch.no_grad():
        before = model(x)
    summary = gate_(model, x, shortcuts="dense")
    assert ("stage1.0", "stage1.2") in summary.shortcuts
    assert ("stage1.3", "stage2.0") not in summary.shortcuts  # the edge is already there
    assert ("stage1.0", "stage2.1") not in summary.shortcuts  # shapes differ
    assert len(summary.shortcuts) == 3 + 3 + 3
    with torch.no_grad():
        assert torch.equal(model(x), before)  # new shortcuts start closed
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    assert gating.edge_gate is not None
    all_open = gatedprune.cost(model, x, hard=True)
    assert (float(all_open.flops), float(all_open.params)) == (dense.flops, dense.params)
    for seed in range(3):
        g2 = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for gate in [*gating.group_gates, *gating.block_gates, gating.edge_gate]:
                assert isinstance(gate, HardConcreteGate)
                gate.log_alpha.copy_(torch.empty(gate.n).uniform_(-4.0, 4.0, generator=g2))
        opened = gating.open_edges()
        assert opened
        hard = gatedprune.cost(model, x, hard=True)
        pruned = gatedprune.prune(model)
        with torch.no_grad():
            xi = torch.randn(3, 1, 16, generator=g2)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
        c = gatedprune.cost(pruned, x)
        assert isinstance(c, Cost)
        assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
        buffers = [k for k, _ in pruned.named_buffers() if "gp_shortcut_" in k]
        assert len(buffers) == len(opened)  # surviving shortcuts are real code
        fresh = apply_plan(DeepResNet1d(), json.loads(json.dumps(export_plan(model))))
        fresh.load_state_dict(pruned.state_dict())
        fresh.eval()
        with torch.no_grad():
            assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5


def test_dense_shortcut_gates_learn() -> None:
    torch.manual_seed(1)
    model = DeepResNet1d(3)
    x = torch.randn(4, 1, 16)
    gate_(model, x, shortcuts="dense")
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    assert gating.edge_gate is not None
    budget = gatedprune.Budget(model, x, flops=0.5)
    model.train()
    loss = model(x).pow(2).mean() + budget.penalty()
    loss.backward()
    grad = gating.edge_gate.log_alpha.grad
    assert grad is not None
    assert grad.abs().sum() > 0


def test_bad_shortcuts_value() -> None:
    with pytest.raises(ValueError, match="shortcuts"):
        gate_(DeepResNet1d(), torch.randn(2, 1, 16), shortcuts="all")  # type: ignore[arg-type]


def _force(gate: HardConcreteGate, opened: list[bool]) -> None:
    """Set a hard concrete gate's entries exactly open / closed (in eval)."""
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([8.0 if o else -8.0 for o in opened]))


def _scaled_adds(model: nn.Module) -> list[ScaledAdd]:
    return [m for m in model.modules() if isinstance(m, ScaledAdd)]


def test_scaled_add_is_the_shortcut_and_counts_two_flops_per_element() -> None:
    m = ScaledAdd()
    assert [k for k, _ in m.named_buffers()] == ["scale"]
    assert not list(m.parameters())  # the scale is a buffer: 0 params
    with torch.no_grad():
        m.scale.fill_(0.25)
    x, s = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert torch.equal(m(x, s), x + 0.25 * s)
    c = gatedprune.cost(_Wrap(m), x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (2 * 2 * 3 * 5, 0)


class _Wrap(nn.Module):
    def __init__(self, inner: ScaledAdd) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x, x)


@pytest.mark.parametrize("source_removed", [False, True])
def test_kept_shortcut_costs_two_flops_per_element_hand_computed(source_removed: bool) -> None:
    """ResNet1d with 3 identity blocks of 4 channels: one candidate edge, block 0 -> block 2."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ResNet1d(widths=(4,), blocks=(3,)).eval()
    randomise_norms(model, gen)
    x = torch.randn(2, 1, 10, generator=gen)  # B=2, L=10
    dense = gatedprune.cost(model, x)
    assert isinstance(dense, Cost)
    summary = gate_(model, x, channels=False, shortcuts="dense")
    assert summary.shortcuts == [("stages.0.0", "stages.0.2")]
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    assert isinstance(gating.edge_gate, HardConcreteGate)
    _force(gating.edge_gate, [True])
    for i, g in enumerate(gating.block_gates):
        assert isinstance(g, HardConcreteGate)
        _force(g, [not (source_removed and i == 0)])
    shortcut = 2 * 2 * 4 * 10  # multiply and add per element of (2, 4, 10)
    # block 0's branch: 2 convs 4->4 (k=3, no bias), 2 BatchNorms, its ReLU, and the ReLU after
    # the add (relu(relu(z)) once the branch is gone), 0 for the kept shortcut
    branch_flops = 2 * (2 * 2 * 10 * 4 * 4 * 3) + 2 * (2 * 2 * 4 * 10) + 2 * (2 * 4 * 10)
    branch_params = 2 * (4 * 4 * 3) + 2 * (2 * 4)
    removed = (branch_flops, branch_params) if source_removed else (0, 0)
    want = (dense.flops + shortcut - removed[0], dense.params - removed[1])
    hard = gatedprune.cost(model, x, hard=True)
    assert (float(hard.flops), float(hard.params)) == want
    pruned = gatedprune.prune(model)
    assert len(_scaled_adds(pruned)) == 1
    assert float(_scaled_adds(pruned)[0].scale) == 1.0
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == want
    with torch.no_grad():
        xi = torch.randn(2, 1, 10, generator=gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    soft = gatedprune.cost(model, x)
    p_open = float(gating.edge_gate.prob_open().detach()[0])
    _force(gating.edge_gate, [False])
    closed = gatedprune.cost(model, x, hard=True)
    assert float(closed.flops) == want[0] - shortcut
    assert not _scaled_adds(gatedprune.prune(model))
    # the soft expected cost charges the edge by its open probability
    soft_closed = gatedprune.cost(model, x)
    p_closed = float(gating.edge_gate.prob_open().detach()[0])
    charged = float(soft.flops.detach() - soft_closed.flops.detach())
    assert abs(charged - shortcut * (p_open - p_closed)) < 1e-9 * shortcut


@settings(max_examples=examples(15), deadline=None)
@given(seed=st.integers(0, 2**16), data=st.data())
def test_resnet1d_dense_shortcuts_hard_cost_is_pruned_cost(seed: int, data: st.DataObject) -> None:
    """Random open/closed channels, blocks and shortcuts (sources and destinations removed or
    not): cost at hard gates == cost of the pruned model, which is exact and replays."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    widths, blocks = (4, 6), (3, 3)
    model = ResNet1d(widths=widths, blocks=blocks, num_classes=3).eval()
    randomise_norms(model, gen)
    x = torch.randn(2, 1, 12, generator=gen)
    gate_(model, x, shortcuts="dense")
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    assert gating.edge_gate is not None
    for g in [*gating.group_gates, *gating.block_gates, gating.edge_gate]:
        assert isinstance(g, HardConcreteGate)
        opened = data.draw(st.lists(st.booleans(), min_size=g.n, max_size=g.n))
        _force(g, opened)
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        xi = torch.randn(2, 1, 12, generator=gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    kept = gating.kept_edges()
    assert kept == gating.open_edges()  # no nested blocks: every open edge is computed
    assert len(_scaled_adds(pruned)) == len(kept)
    # the JSON plan replays on a fresh dense model; the shortcut scales load with the weights
    fresh = apply_plan(
        ResNet1d(widths=widths, blocks=blocks, num_classes=3),
        json.loads(json.dumps(export_plan(model))),
    )
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    assert [float(m.scale) for m in _scaled_adds(fresh)] == [1.0] * len(kept)
    c_fresh = gatedprune.cost(fresh, x)
    assert isinstance(c_fresh, Cost)
    assert (c_fresh.flops, c_fresh.params) == (c.flops, c.params)
    with torch.no_grad():
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5
    # what the shortcuts add: exactly 2 FLOPs per element of each kept one
    numels: list[int] = []
    handles = [
        m.register_forward_hook(lambda m, i, o: numels.append(o.numel()))
        for m in _scaled_adds(pruned)
    ]
    with torch.no_grad():
        pruned(x)
    for h in handles:
        h.remove()
    edge_flops = 2 * sum(numels)
    _force(gating.edge_gate, [False] * gating.edge_gate.n)
    hard_closed = gatedprune.cost(model, x, hard=True)
    assert float(hard.flops - hard_closed.flops) == edge_flops
    assert float(hard.params - hard_closed.params) == 0.0


class _MixedBlock(nn.Module):
    def __init__(self, c: int, post_act: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(c, c, 3, padding=1)
        self.c2 = nn.Conv1d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.post_act = post_act

    def forward(self, x: Tensor) -> Tensor:
        y = self.c2(self.act(self.c1(x))) + x
        return self.act(y) if self.post_act else y


class _MixedNet(nn.Module):
    """Block ``a`` ends without a ReLU (its output can be negative), block ``b`` with one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 3, padding=1)
        self.a = _MixedBlock(4, False)
        self.r = nn.ReLU()
        self.b = _MixedBlock(4, True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.b(self.r(self.a(self.stem(x)))).mean(dim=-1))


@pytest.mark.parametrize("edge_open", [False, True])
def test_removed_block_keeps_its_relu_when_a_shortcut_can_make_its_input_negative(
    edge_open: bool,
) -> None:
    """With ``b`` removed, ``relu(x_b)`` is ``x_b`` (a ReLU output) and the ReLU is bypassed;
    with the shortcut a -> b open, ``b`` reads ``x_b + w * out_a``, which can be negative."""
    torch.manual_seed(0)
    model = _MixedNet().eval()
    x = torch.randn(2, 1, 8)
    summary = gate_(model, x, channels=False, shortcuts="dense")
    assert summary.shortcuts == [("a", "b")]
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    assert isinstance(gating.edge_gate, HardConcreteGate)
    _force(gating.edge_gate, [edge_open])
    for g, opened in zip(gating.block_gates, [True, False], strict=True):
        assert isinstance(g, HardConcreteGate)
        _force(g, [opened])
    assert gating.plan()["bypass"] == ([] if edge_open else ["b_act_1"])
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        xi = torch.randn(5, 1, 8)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))


class _Outer(nn.Module):
    """A residual block whose branch holds two residual blocks (nested blocks)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(_MixedBlock(c, True), _MixedBlock(c, True))
        self.out = nn.Conv1d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.inner(x)) + x


class _NestedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 3, padding=1)
        self.o = _Outer(4)
        self.c = _MixedBlock(4, True)
        self.d = _MixedBlock(4, True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.d(self.c(self.o(self.stem(x)))).mean(dim=-1))


@pytest.mark.parametrize("closed", [[2], [2, 0], [2, 4], [0, 1]])
def test_shortcut_from_a_removed_outer_branch_keeps_its_source(closed: list[int]) -> None:
    """Closing the outer block ``o`` kills its branch, but open shortcuts from the blocks inside
    it (o.inner.0/1 -> c, d) still read their outputs: those stay computed, exactly, and
    are counted."""
    torch.manual_seed(0)
    model = _NestedNet().eval()
    x = torch.randn(2, 1, 8)
    summary = gate_(model, x, channels=False, shortcuts="dense")
    assert [b[0] for b in summary.blocks] == ["o.inner.0", "o.inner.1", "o", "c", "d"]
    assert ("o.inner.1", "d") in summary.shortcuts
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    assert isinstance(gating.edge_gate, HardConcreteGate)
    _force(gating.edge_gate, [True] * gating.edge_gate.n)
    for i, g in enumerate(gating.block_gates):
        assert isinstance(g, HardConcreteGate)
        _force(g, [i not in closed])
    assert gating.kept_edges() == gating.open_edges()
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        xi = torch.randn(3, 1, 8)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    assert len(_scaled_adds(pruned)) == len(gating.open_edges())


def test_gate_with_new_shortcuts_leaves_every_module_in_its_mode() -> None:
    # before: the run that finds shortcut candidates restored the root's mode only, so a
    # BatchNorm frozen in eval mode inside a training model came back training
    model = ResNet1d(widths=(8, 16), blocks=(2, 2))
    model.train()
    frozen = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    frozen.eval()
    gate_(model, torch.randn(2, 1, 40), shortcuts="dense")
    assert model.training
    assert not frozen.training
