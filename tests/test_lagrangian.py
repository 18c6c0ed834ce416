"""``Budget.penalty`` computes the Lagrangian as one autograd node; it must give the same bits
as the same expression written with tensor ops (value, the gates' gradients and the
multipliers' reversed gradients), so training is unchanged by the fusion."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import gatedprune as gp
from gatedprune.budget import Budget


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


def _reference_penalty(budget: Budget) -> Tensor:
    """The Lagrangian with tensor ops (the formulation before the fused node)."""
    soft = budget.fractions()
    if budget.straight_through:
        with torch.no_grad():
            hard = budget.fractions(hard=True)
        soft = {k: v + (hard[k] - v).detach() for k, v in soft.items()}
    targets = budget.target()
    total = torch.zeros((), dtype=torch.float64)
    for k, s in soft.items():
        gap = s - targets[k]
        l1 = _Reverse.apply(budget.lambda1[k])
        l2 = _Reverse.apply(budget.lambda2[k])
        total = total + l1 * gap + l2 * gap * gap
    return total.float()


def _grads(budget: Budget, loss: Tensor) -> list[Tensor]:
    params = [*budget.model.parameters(), *budget.parameters()]
    for p in params:
        p.grad = None
    (loss * 3.0).backward()  # an upstream gradient other than 1
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


@settings(max_examples=examples(30), deadline=None)
@given(
    seed=st.integers(0, 10_000),
    targets=st.sampled_from([("flops",), ("params",), ("flops", "params")]),
    straight_through=st.booleans(),
    lambdas=st.lists(st.floats(-5.0, 5.0), min_size=4, max_size=4),
    warm=st.integers(0, 50),
    float32_multipliers=st.booleans(),
)
def test_fused_penalty_is_bit_identical_to_the_tensor_formulation(
    seed: int,
    targets: tuple[str, ...],
    straight_through: bool,
    lambdas: list[float],
    warm: int,
    float32_multipliers: bool,
) -> None:
    torch.manual_seed(seed)
    net = gp.ShortcutMLP(6, [5, 7, 4], 3)
    with torch.no_grad():
        for g in net.gates():
            g.log_alpha.normal_(0.0, 3.0)  # some gates closed, some open, some in between
    x = torch.randn(1, 6)
    fractions = {"flops": 0.3, "params": 0.6}
    budget = gp.Budget(
        net, x, **{k: fractions[k] for k in targets}, warmup_steps=40, anti_windup=False
    )
    budget.straight_through = straight_through
    budget.step.fill_(warm)
    with torch.no_grad():
        for i, k in enumerate(targets):
            budget.lambda1[k].fill_(lambdas[2 * i])
            budget.lambda2[k].fill_(abs(lambdas[2 * i + 1]))
    if float32_multipliers:  # each gradient comes back in its input's dtype
        budget.float()
    net.eval()  # penalty() does not advance the warm-up in eval mode: both see one target
    ref = _reference_penalty(budget)
    ref_grads = _grads(budget, ref)
    out = budget.penalty()
    out_grads = _grads(budget, out)
    assert out.dtype == ref.dtype == torch.float32
    assert torch.equal(out, ref)
    for a, b in zip(out_grads, ref_grads, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    assert any(bool(g.abs().sum() > 0) for g in out_grads)  # something to compare


@pytest.mark.parametrize("gate", ["hard_concrete", "sigmoid"])
def test_second_derivatives_are_refused_not_silently_wrong(gate: str) -> None:
    # the penalty's and the expected cost's backward are computed, not recorded: a second
    # derivative through them would silently miss terms (it did before: create_graph=True
    # recorded the gates' sigmoid with the cost's gradient as a constant), so it is an error
    torch.manual_seed(0)
    net = gp.ShortcutMLP(6, [5, 4], 3, gate=gate)  # type: ignore[arg-type]
    x = torch.randn(1, 6)
    budget = gp.Budget(net, x, flops=0.3)
    with torch.no_grad():
        budget.lambda1["flops"].fill_(1.0)
        budget.lambda2["flops"].fill_(2.0)
    params = net.gate_parameters()
    for value in (budget.penalty(), gp.cost(net, x).flops):
        with pytest.raises(RuntimeError, match="first derivatives only"):
            torch.autograd.grad(value, params, create_graph=True)
        assert all(g.abs().sum() > 0 for g in torch.autograd.grad(value, params))  # first ones work
