"""shortcuts="dense": new gated edges between residual blocks; survivors become real code."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn
from zoo import BasicBlock, randomise_norms

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, apply_plan, export_plan, gate_


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
