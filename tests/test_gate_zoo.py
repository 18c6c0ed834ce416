"""gate_ on a zoo of ordinary PyTorch models: gated, trained with a budget, pruned, exact."""

from __future__ import annotations

import json

import pytest
import torch
from gating_helpers import train_under_budget
from torch import nn
from zoo import ZOO, randomise_norms

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, apply_plan, export_plan, gate_


def _gating(model: nn.Module) -> InsertedGating:
    g = model.gatedprune
    assert isinstance(g, InsertedGating)
    return g


def _close_randomly(model: nn.Module, gen: torch.Generator, p_block: float = 0.5) -> None:
    """Random closed channels, fractional open values, random closed blocks."""
    g = _gating(model)
    with torch.no_grad():
        for gate in g.group_gates:
            assert isinstance(gate, HardConcreteGate)
            la = torch.empty(gate.n).uniform_(-4.0, 4.0, generator=gen)
            gate.log_alpha.copy_(la)
        for gate in g.block_gates:
            assert isinstance(gate, HardConcreteGate)
            closed = bool(torch.rand((), generator=gen) < p_block)
            gate.log_alpha.fill_(-5.0 if closed else float(torch.empty(()).uniform_(-1, 4)))


def _check_pruned(model: nn.Module, shape: tuple[int, ...], gen: torch.Generator) -> nn.Module:
    model.eval()
    x = torch.randn(*shape, generator=gen)
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    assert not any(isinstance(m, InsertedGating) for m in pruned.modules())
    with torch.no_grad():
        for _ in range(2):
            xi = torch.randn(*shape, generator=gen)
            diff = (pruned(xi) - model(xi)).abs().max().item()
            assert diff <= 1e-5
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert c.flops == int(hard.flops)
    assert float(hard.flops) == c.flops
    assert c.params == int(hard.params)
    assert float(hard.params) == c.params
    return pruned


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_gate_prune_exact(name: str) -> None:
    factory, shape = ZOO[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    torch.manual_seed(sum(map(ord, name)))
    model = factory()
    randomise_norms(model, gen)
    model.eval()
    x = torch.randn(*shape, generator=gen)
    dense = gatedprune.cost(model, x)
    assert isinstance(dense, Cost)
    with torch.no_grad():
        before = model(x)
    summary = gate_(model, x)
    assert summary.n_gates > 0
    assert str(summary).startswith("gatedprune.gate_")
    with torch.no_grad():  # gates start open: same function (attention written out: ~1e-7)
        if name.startswith("transformer"):
            assert (model(x) - before).abs().max().item() <= 1e-5
        else:
            assert torch.equal(model(x), before)
    all_open = gatedprune.cost(model, x, hard=True)
    assert (float(all_open.flops), float(all_open.params)) == (dense.flops, dense.params)
    # prune with everything open: same model, same cost
    _check_pruned(model, shape, gen)
    _close_randomly(model, gen)
    pruned = _check_pruned(model, shape, gen)
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert c.flops < dense.flops
    assert c.params < dense.params
    # replay the JSON plan on a fresh dense instance and load the pruned weights
    plan = json.loads(json.dumps(export_plan(model)))
    fresh = apply_plan(factory(), plan)
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        xi = torch.randn(*shape, generator=gen)
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "name", ["resmlp", "resnet1d_bottleneck", "densenet", "mobilenet", "transformer_postnorm"]
)
def test_zoo_budget_training(name: str) -> None:
    factory, shape = ZOO[name]
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    model = factory()
    x = torch.randn(*shape, generator=gen)
    gate_(model, x)
    budget = gatedprune.Budget(model, x, flops=0.5)
    start = budget.expected()["flops"]
    model.train()
    n_out = model(x).shape[-1]
    train_under_budget(
        model,
        budget,
        25,
        lambda: (
            torch.randn(*shape, generator=gen),
            torch.randint(0, n_out, (shape[0],), generator=gen),
        ),
    )
    assert budget.expected()["flops"] < start  # the budget pushes the gates
    _close_randomly(model, gen, p_block=0.3)
    _check_pruned(model, shape, gen)


def test_sigmoid_gates_harden_then_prune() -> None:
    factory, shape = ZOO["resnet1d_basic"]
    gen = torch.Generator().manual_seed(3)
    model = factory()
    randomise_norms(model, gen)
    gate_(model, torch.randn(*shape, generator=gen), gate="sigmoid")
    g = _gating(model)
    with torch.no_grad():
        for gate in [*g.group_gates, *g.block_gates]:
            theta = gate.theta
            theta.copy_(torch.randn(theta.shape, generator=gen))
    assert gatedprune.harden(model) == len(g.group_gates) + len(g.block_gates)
    _check_pruned(model, shape, gen)


def test_layernorm_groups_left_ungated_with_reason() -> None:
    factory, shape = ZOO["resmlp"]
    model = factory()
    summary = gate_(model, torch.randn(*shape))
    reasons = " ".join(why for _, _, why in summary.ungated_groups)
    assert "LayerNorm" in reasons
    gated = [p for producers, _ in summary.channel_groups for p in producers]
    assert "fc1.0" in gated
    assert "inp" not in gated
    assert len(summary.blocks) == 3


def test_closed_block_is_removed_from_the_model() -> None:
    factory, shape = ZOO["resnet1d_basic"]
    model = factory().eval()
    x = torch.randn(*shape)
    gate_(model, x)
    g = _gating(model)
    for gate in g.block_gates:
        gate.force_(torch.ones(1, dtype=torch.bool))
    g.block_gates[1].force_(torch.zeros(1, dtype=torch.bool))  # layers.1: identity shortcut
    g.block_gates[2].force_(torch.zeros(1, dtype=torch.bool))  # layers.2: projection shortcut
    pruned = gatedprune.prune(model)
    names = {n for n, _ in pruned.named_modules()}
    assert "layers.1.conv1" not in names
    assert "layers.1.bn2" not in names
    assert "layers.2.conv1" not in names
    assert "layers.2.downsample.0" in names
    assert "layers.0.conv1" in names
    assert type(pruned).__name__ == "ResNet"  # the user's class is kept outside rewritten blocks
    layers = pruned.get_submodule("layers")
    assert isinstance(layers[1], nn.Identity)  # relu(relu(z)) = relu(z): nothing left
    assert type(layers[2]).__name__ == "PrunedBasicBlock"  # projection + ReLU remain
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5
