"""Gradient accumulation with a Budget: ``penalty(advance=False)`` for every micro-batch and
``budget.step_()`` once per optimizer step, so ``delay_steps``/``warmup_steps`` count optimizer
steps and the micro-batches of a step share one target; a penalty computed only to log it does
not move the schedule either. ``penalty()`` alone still advances once per call in training
mode (unchanged). Before 2026-12-07 21:00 UTC there was no way to say 'one step': with 4
micro-batches the delay ended 4x too soon and each micro-batch saw another target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gatedprune

ACCUM = 4


def _setup(
    delay: int = 8, warmup: int = 8
) -> tuple[nn.Module, gatedprune.Budget, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(32, 8)
    gatedprune.gate_(net, x)
    budget = gatedprune.Budget(net, x[:1], flops=0.3, delay_steps=delay, warmup_steps=warmup)
    opt = torch.optim.Adam(
        [{"params": net.parameters()}, {"params": budget.parameters(), "weight_decay": 0}],
        lr=1e-2,
    )
    return net.train(), budget, opt, x


def _expected_target(step: int, delay: int, warmup: int, target: float = 0.3) -> float:
    frac = min(1.0, max(0, step - delay) / warmup) if step >= delay else 0.0
    return 1.0 + (target - 1.0) * frac


def test_accumulation_counts_optimizer_steps() -> None:
    net, budget, opt, x = _setup()
    for step in range(20):
        opt.zero_grad()
        targets, active = set(), set()
        for micro in x.chunk(ACCUM):
            pen = budget.penalty(advance=False)
            targets.add(budget.target()["flops"])
            active.add(budget.active)
            if not budget.active:
                assert float(pen.detach()) == 0.0  # the delay: an exact zero
            ((net(micro).square().mean() + pen) / ACCUM).backward()
        opt.step()
        budget.step_()
        assert len(targets) == 1  # every micro-batch of the step saw the same target
        assert targets.pop() == pytest.approx(_expected_target(step, 8, 8))
        assert active == {step >= 8}
        assert int(budget.step) == step + 1


def test_step_after_penalty_without_advance_is_penalty() -> None:
    """``penalty(advance=False)`` + ``step_()`` after the optimizer step trains exactly as
    ``penalty()`` does (anti-windup and the multipliers included)."""
    runs = []
    for explicit in (False, True):
        net, budget, opt, x = _setup(delay=3, warmup=6)
        for _ in range(15):
            opt.zero_grad()
            pen = budget.penalty(advance=False) if explicit else budget.penalty()
            (net(x).square().mean() + pen).backward()
            opt.step()
            if explicit:
                budget.step_()
        runs.append((net, budget))
    (net_a, budget_a), (net_b, budget_b) = runs
    assert int(budget_a.step) == int(budget_b.step) == 15
    for a, b in zip(
        [*net_a.state_dict().values(), *budget_a.state_dict().values()],
        [*net_b.state_dict().values(), *budget_b.state_dict().values()],
        strict=True,
    ):
        assert torch.equal(a, b)
    assert float(budget_a.lambda2["flops"].detach()) > 0.0  # the budget did act


def test_default_penalty_still_counts_calls_in_training() -> None:
    net, budget, _, _ = _setup()
    budget.penalty()
    budget.penalty()
    assert int(budget.step) == 2
    budget.penalty(advance=False)  # e.g. computed only to log it
    assert int(budget.step) == 2
    net.eval()
    budget.penalty()  # eval mode never advances
    assert int(budget.step) == 2
    budget.step_()  # explicit: advances in any mode
    assert int(budget.step) == 3


def test_logging_penalty_leaves_the_next_step_alone() -> None:
    _, budget, _, _ = _setup(delay=1, warmup=4)
    budget.penalty()  # step 0 -> 1: the delay is over
    before = budget.target()
    with torch.no_grad():
        budget.penalty(advance=False)
    assert budget.target() == before


@pytest.mark.parametrize("bad", [1, "no", None])
def test_advance_must_be_a_bool(bad: object) -> None:
    _, budget, _, _ = _setup()
    with pytest.raises(TypeError, match="advance must be a bool"):
        budget.penalty(advance=bad)  # type: ignore[arg-type]
    assert int(budget.step) == 0
