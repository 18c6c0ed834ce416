"""A trace of a model does not depend on earlier traces of it: a branch on a shape whose
example value could not be computed (the example run of an op failed on gate_'s zero inputs)
takes the decision an earlier call of the same code made in the same trace. Before 2026-12-08
it took only decisions published by earlier traces, so the first trace kept the module whole
and a second one traced it: plans of torchvision's Swin named nodes a fresh instance's trace
did not have ("the plan names graph node 'add_9' (cut) that the model does not have")."""

from __future__ import annotations

import json

import torch
from gating_helpers import check_pruned, randomise_gates
from torch import Tensor, nn

from gatedprune.gating import apply_plan, export_plan, gate_
from gatedprune.gating.graph import trace_model


class Mix(nn.Module):
    """``g = x^T x + mean(x^2) I`` or, with ``spd``, its Cholesky factor (which fails on the
    zero examples: g = 0), then a branch on its shape at one source line for both calls."""

    def __init__(self, spd: bool) -> None:
        super().__init__()
        self.spd = spd
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        g = x.t() @ x + x.pow(2).mean() * torch.eye(4)  # (4, 4)
        f = torch.linalg.cholesky(g) if self.spd else g  # (4, 4)
        h = self.fc2(torch.relu(self.fc1(x)))  # (B, 4)
        if f.shape[-1] > 2:  # the same line decides both calls
            h = h @ (f / 100.0)  # (B, 4)
        return x + h  # (B, 4)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Mix(spd=False), Mix(spd=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.b(self.a(x)))  # (B, 3)


def _names(model: nn.Module, x: Tensor) -> list[str]:
    return [n.name for n in trace_model(model, examples=(x,)).graph.nodes]


def test_a_second_trace_equals_the_first() -> None:
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 4)
    first = _names(net, x)
    assert first == _names(net, x)
    assert first == _names(Net().eval(), x)
    assert "b_fc1" in first  # traced through, not kept whole


def test_plan_replays_on_a_fresh_instance() -> None:
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(3, 4)
    summary = gate_(net, x)
    assert len(summary.channel_groups) == 2  # a.fc1 and b.fc1
    gen = torch.Generator().manual_seed(2)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: Net().eval())
    fresh = apply_plan(Net().eval(), json.loads(json.dumps(export_plan(net))))
    assert fresh is not None
