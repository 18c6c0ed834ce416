"""The exact (hard) cost of a model gated with gate_ is cached by the gates' decisions: it
must follow every flip of any gate kind on one model, and revisiting a state must give the
value computed from scratch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import GatedLatencyModel, InsertedGating, ResNet1d, gate_
from tests.gating_helpers import fixed_latency_model, inserted_gating, module_calls


def _force_random(model: nn.Module, gen: torch.Generator, p_open: float) -> None:
    """Every gate of ``model`` set to a random exact state (whole groups together)."""
    for g in inserted_gating(model).gates():
        mask = torch.rand(g.n_groups, generator=gen) < p_open  # (groups,)
        g.force_(mask.repeat_interleave(g.n // g.n_groups))


@settings(max_examples=examples(15), deadline=None)
@given(seed=st.integers(0, 10_000), dense=st.booleans())
def test_hard_cost_and_ops_follow_gate_flips_on_one_model(seed: int, dense: bool) -> None:
    torch.manual_seed(seed)
    model = ResNet1d(widths=(4, 8), blocks=(2, 2))
    x = torch.randn(2, 1, 16)
    gate_(model, x, shortcuts="dense" if dense else None)
    model.eval()
    gating = inserted_gating(model)
    gen = torch.Generator().manual_seed(seed)
    states: list[tuple[dict[str, Tensor], tuple[float, float, float]]] = []
    for i in range(6):
        _force_random(model, gen, p_open=[0.2, 0.5, 0.8][i % 3])
        flops, params = gating.expected_cost(gating.input_shape, hard=True)
        ops = float(gating.expected_ops(hard=True))
        pruned = gp.prune(model)
        c = gp.cost(pruned, x)
        assert isinstance(c, gp.Cost)
        assert (float(flops), float(params)) == (c.flops, c.params)
        assert ops == module_calls(pruned, x)
        states.append(
            (
                {k: v.clone() for k, v in gating.state_dict().items()},
                (float(flops), float(params), ops),
            )
        )
    for state, expected in states:  # revisit: cached, and equal to a fresh computation
        gating.load_state_dict(state)
        flops, params = gating.expected_cost(gating.input_shape, hard=True)
        cached = (float(flops), float(params), float(gating.expected_ops(hard=True)))
        gating.__dict__.pop("_hard_totals_cache", None)
        flops, params = gating.expected_cost(gating.input_shape, hard=True)
        fresh = (float(flops), float(params), float(gating.expected_ops(hard=True)))
        assert cached == fresh == expected


def _flops_latency_budget() -> tuple[nn.Module, InsertedGating, GatedLatencyModel, gp.Budget]:
    """A small gated ResNet with dense shortcuts under a FLOPs + latency budget (a fixed
    latency model): the model, its gating, the latency model, the budget."""
    torch.manual_seed(0)
    model = ResNet1d(widths=(4, 8), blocks=(2, 2))
    x = torch.zeros(1, 1, 16)
    gate_(model, x, shortcuts="dense")
    gating = inserted_gating(model)
    lm = fixed_latency_model(model, (0.01, 0.002, 1e-6))
    budget = gp.Budget(model, x, flops=0.5, latency=0.6, latency_model=lm)
    return model, gating, lm, budget


def test_latency_budget_shares_the_flops_with_the_cost_program() -> None:
    """A FLOPs + latency budget predicts the same latency as the latency model on its own
    (the FLOPs feature taken from the budget's program instead of computed again)."""
    model, gating, lm, budget = _flops_latency_budget()
    _force_random(model, torch.Generator().manual_seed(3), p_open=0.5)
    with torch.no_grad():  # forced gates are +-inf (no gradient): finite, same decisions
        for p in gating.gate_parameters():
            p.copy_(p.clamp(-4.0, 4.0))
    for hard in (False, True):
        with torch.no_grad():
            got = budget.fractions(hard=hard)["latency"] * budget.dense["latency"]
            assert float(got) == float(lm.expected(model, hard=hard))
    soft = budget.fractions()["latency"]
    soft.backward()  # still differentiable through the shared FLOPs
    assert any(
        p.grad is not None and bool(p.grad.abs().sum() > 0) for p in gating.gate_parameters()
    )


def test_a_flops_and_latency_budget_builds_the_decision_key_once_and_follows_flips() -> None:
    """The exact cost and the exact module calls of one budget evaluation share the gates'
    decision key (it was built twice per step, ~0.9 ms each on a 12-block ResNet); outside
    the evaluation a flip is still seen."""
    model, gating, lm, budget = _flops_latency_budget()
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        _force_random(model, gen, p_open=0.5)
        budget.achieved()  # fills the cache for these decisions
        built = 0
        original = gating.gates

        def counting_gates(original: Callable[[], list[gp.Gate]] = original) -> list[gp.Gate]:
            nonlocal built
            built += 1
            return original()

        gating.gates = counting_gates  # type: ignore[method-assign]
        try:
            got = budget.achieved()
        finally:
            del gating.gates
        assert built == 1, built  # one key for both the cost and the module calls
        gating.__dict__.pop("_hard_totals_cache", None)  # a fresh computation agrees
        flops, _ = gating.expected_cost(gating.input_shape, hard=True)
        assert got["flops"] == float(flops) / float(budget.dense["flops"])
        assert got["latency"] == float(lm.expected(model, hard=True)) / float(
            budget.dense["latency"]
        )
        assert gating.__dict__["_held_key"] is False  # not holding outside the evaluation
