"""Shared set-up for tests of models gated by ``gate_``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, ScaledAdd, apply_plan, export_plan, gate_
from gatedprune.gating.latency import structure_key


def gate_all_open(model: nn.Module, x: Tensor) -> InsertedGating:
    """``gate_(model, x)`` with every channel-group gate open with probability 1, in eval mode."""
    gate_(model, x)
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.fill_(20.0)  # open with probability 1
    model.eval()
    return gating


def inserted_gating(model: nn.Module) -> InsertedGating:
    """The gating ``gate_`` attached to ``model``."""
    g = model.gatedprune
    assert isinstance(g, InsertedGating)
    return g


def fixed_latency_model(model: nn.Module, coef: tuple[float, float, float]) -> gp.GatedLatencyModel:
    """A GatedLatencyModel for ``model`` (gated with ``gate_``) with the given coefficients
    (constant ms, ms per module call, ms per FLOP) instead of calibrated ones."""
    g = inserted_gating(model)
    return gp.GatedLatencyModel(
        coef=coef,
        batch_size=1,
        threads=1,
        input_shape=tuple(g.input_shape),
        structure=structure_key(g),
        median_error=0.0,
        max_error=0.0,
        samples=4,
    )


def module_calls(model: nn.Module, x: Tensor) -> int:
    """Module calls of one forward (nn.Identity placeholders of removed blocks aside)."""
    count = [0]

    def hook(*_: object) -> None:
        count[0] += 1

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves if not isinstance(m, nn.Identity)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return count[0]


def random_gates(model: nn.Module, gen: torch.Generator, low: float = -4.0) -> None:
    """Every channel-group gate of a ``gate_`` model at a random log alpha in ``[low, 4)``."""
    with torch.no_grad():
        for gate in inserted_gating(model).group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.copy_(torch.empty(gate.n).uniform_(low, 4.0, generator=gen))


def randomise_gates(model: nn.Module, gen: torch.Generator) -> None:
    """Every channel-group and block gate of a ``gate_`` model at a random log alpha in
    ``[-4, 4)`` (open, closed and in-between values)."""
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in [*gating.group_gates, *gating.block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)


def check_pruned(
    model: nn.Module,
    x: Tensor,
    gen: torch.Generator,
    factory: Callable[[], nn.Module] | None = None,
    batches: Sequence[int] = (),
) -> nn.Module:
    """``prune(model)`` of a gated model, checked in eval mode: its cost equals the gated hard
    cost, it equals the gated model (<= 1e-5) on fresh inputs of each batch size in
    ``batches`` (default: ``x``'s), and, with ``factory``, the exported plan replays on
    ``factory()`` with the pruned weights. Returns the pruned model."""
    model.eval()
    hard = gp.cost(model, x, hard=True)
    pruned = gp.prune(model)
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    with torch.no_grad():
        for b in batches or (x.shape[0],):
            xi = torch.randn(b, *x.shape[1:], generator=gen)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    if factory is not None:
        fresh = apply_plan(factory(), json.loads(json.dumps(export_plan(model))))
        fresh.load_state_dict(pruned.state_dict())
        fresh.eval()
        with torch.no_grad():
            assert (fresh(x) - model(x)).abs().max().item() <= 1e-5
    return pruned


def assert_first_block_cost_scales(model: nn.Module, x: Tensor) -> None:
    """The expected FLOPs of ``model`` (gated, every gate forced open) count its first block
    times that block gate's open probability, and the block's FLOPs are the summary's."""
    import pytest

    gating = inserted_gating(model)
    for g in [*gating.block_gates, *gating.group_gates]:
        assert isinstance(g, HardConcreteGate)
        g.force_(torch.ones(g.n, dtype=torch.bool))  # open with probability exactly 1
    first = gating.block_gates[0]
    assert isinstance(first, HardConcreteGate)
    full = float(gp.cost(model, x).flops.detach())
    first.force_(torch.zeros(1, dtype=torch.bool))
    without = float(gp.cost(model, x).flops.detach())
    with torch.no_grad():
        first.log_alpha.fill_(0.0)
    p = float(first.prob_open()[0].detach())
    assert 0.0 < p < 1.0
    expected = float(gp.cost(model, x).flops.detach())
    assert expected == pytest.approx(without + p * (full - without), rel=1e-9)
    assert full - without == gating.summary.blocks[0][2] > 0


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``model.state_dict()`` (to check later that nothing changed)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    """``model``'s state equals ``before`` (:func:`state_copy`), every tensor bit for bit."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def shortcut_flops(model: nn.Module, x: Tensor) -> int:
    """FLOPs of the ScaledAdd modules (kept new shortcuts, 2 per element) of a pruned model."""
    total = [0]

    def hook(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        total[0] += 2 * out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ScaledAdd)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


def randomise_batchnorms(model: nn.Module, gen: torch.Generator) -> None:
    """Random running statistics and affine parameters for every affine BatchNorm (any
    ``_BatchNorm``: 1d/2d/3d and SyncBatchNorm), so folding them is not a no-op."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                assert m.running_mean is not None
                assert m.running_var is not None
                m.running_mean.normal_(0.0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.normal_(1.0, 0.3, generator=gen)
                m.bias.normal_(0.0, 0.3, generator=gen)


def examples(n: int) -> int:
    """A hypothesis test's ``max_examples``: ``n`` times ``GATEDPRUNE_HYPOTHESIS_SCALE``
    (default 1; e.g. 20 for a long search for rare failures, not for CI)."""
    scale = int(os.environ.get("GATEDPRUNE_HYPOTHESIS_SCALE", "1"))
    if scale < 1:
        raise ValueError(f"GATEDPRUNE_HYPOTHESIS_SCALE must be an int >= 1, got {scale}")
    return n * scale


def budget_optimizer(model: nn.Module, budget: gp.Budget, gate_lr: float = 0.2) -> torch.optim.Adam:
    """Adam over a ``gate_`` model's weights (lr 1e-3), its gates (``gate_lr``) and the
    budget's multipliers (0.05)."""
    gating = inserted_gating(model)
    gate_ids = {id(p) for p in gating.parameters()}
    return torch.optim.Adam(
        [
            {"params": [p for p in model.parameters() if id(p) not in gate_ids], "lr": 1e-3},
            {"params": list(gating.parameters()), "lr": gate_lr},
            {"params": list(budget.parameters()), "lr": 0.05},
        ]
    )


def train_under_budget(
    model: nn.Module,
    budget: gp.Budget,
    steps: int,
    batch: Callable[[], tuple[Tensor, Tensor]],
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    gate_lr: float = 0.2,
) -> None:
    """``steps`` training steps of ``model`` in training mode on ``batch()`` pairs (input,
    target) with ``loss`` plus the budget's penalty (:func:`budget_optimizer`)."""
    opt = budget_optimizer(model, budget, gate_lr)
    model.train()
    for _ in range(steps):
        xb, yb = batch()
        total = loss(model(xb), yb) + budget.penalty()
        opt.zero_grad()
        total.backward()
        opt.step()


def budget_steps(
    model: nn.Module, budget: gp.Budget, steps: int, sample: Callable[[], Tensor]
) -> None:
    """``steps`` training steps of ``model`` under ``budget`` on inputs ``sample()`` with the
    loss ``mean(model(x) ** 2)`` (no targets: the gates and weights move, the budget pulls),
    as :func:`train_under_budget` does with a task loss."""
    train_under_budget(
        model, budget, steps, lambda: (sample(), torch.empty(0)), lambda out, _: out.pow(2).mean()
    )


class ParamMapNet(nn.Module):
    """Parameter maps on the root: ``x @ W1 + b1`` (W1 stored (in, out)), ``F.linear(h, W2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(6, 24) / 6**0.5)
        self.b1 = nn.Parameter(torch.zeros(24))
        self.W2 = nn.Parameter(torch.randn(16, 24) / 24**0.5)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(x @ self.W1 + self.b1)  # (B, 24)
        return self.head(torch.relu(F.linear(h, self.W2)))  # (B, 4)
