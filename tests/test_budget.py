"""Budget: validation, the Lagrangian's gradient directions, warm-up, and hitting targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import gatedprune as gp


def _net() -> tuple[gp.ShortcutMLP, torch.Tensor]:
    torch.manual_seed(0)
    return gp.ShortcutMLP(12, [16, 16], 3), torch.zeros(1, 12)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_refused(value: float) -> None:
    net, x = _net()
    with pytest.raises(ValueError, match=r"flops must be a fraction in \(0, 1\]"):
        gp.Budget(net, x, flops=value)


def test_other_bad_budgets() -> None:
    net, x = _net()
    with pytest.raises(ValueError, match="needs a target"):
        gp.Budget(net, x)
    with pytest.raises(TypeError, match="params must be a float"):
        gp.Budget(net, x, params="0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no gates"):
        gp.Budget(nn.Linear(12, 3), x, flops=0.5)
    with pytest.raises(ValueError, match=r"\(B, 12\)"):
        gp.Budget(net, torch.zeros(1, 13), flops=0.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        gp.Budget(net, x, flops=0.5, warmup_steps=-1)
    with pytest.raises(TypeError, match=r"delay_steps must be an int >= 0, got 1\.5"):
        gp.Budget(net, x, flops=0.5, delay_steps=1.5)  # type: ignore[arg-type]


def test_dense_cost_is_the_all_open_cost_and_gates_are_untouched() -> None:
    net, x = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    budget = gp.Budget(net, x, flops=0.5, params=0.5)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    dense = net
    for g in gp.gate_modules(dense):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    plain = gp.cost(gp.prune(dense), x)
    assert isinstance(plain, gp.Cost)
    assert budget.dense == {"flops": plain.flops, "params": plain.params}
    assert budget.achieved() == {"flops": 1.0, "params": 1.0}


def test_penalty_descends_on_cost_and_ascends_on_multipliers() -> None:
    net, x = _net()
    budget = gp.Budget(net, x, flops=0.25)
    with torch.no_grad():
        budget.lambda1["flops"].fill_(1.0)
    net.train()
    budget.penalty().backward()
    # ascent: the cost is above target, so the (reversed) gradient of lambda1 is negative,
    # and an optimizer step (p -= lr * grad) increases lambda1
    assert budget.lambda1["flops"].grad is not None
    assert float(budget.lambda1["flops"].grad) < 0
    # descent on the gates: a positive lambda1 pushes open probabilities down
    grads = torch.cat([p.grad.flatten() for p in net.gate_parameters() if p.grad is not None])
    assert bool((grads >= 0).all())
    assert float(grads.sum()) > 0
    opt = torch.optim.SGD(budget.parameters(), lr=0.1)
    opt.step()
    assert float(budget.lambda1["flops"].detach()) > 1.0
    assert float(budget.lambda2["flops"].detach()) > 0.0


def test_target_warms_up_linearly_during_training_only() -> None:
    net, x = _net()
    budget = gp.Budget(net, x, flops=0.2, warmup_steps=4, target_start=1.0)
    net.eval()
    budget.penalty()
    assert budget.target()["flops"] == 1.0  # eval-mode calls do not advance the warm-up
    net.train()
    seen = []
    for _ in range(6):
        budget.penalty()
        seen.append(round(budget.target()["flops"], 6))
    assert seen == [0.8, 0.6, 0.4, 0.2, 0.2, 0.2]


def test_delay_means_no_pressure_then_the_warm_up_starts() -> None:
    net, x = _net()
    budget = gp.Budget(net, x, flops=0.2, warmup_steps=2, delay_steps=3)
    with torch.no_grad():
        budget.lambda1["flops"].fill_(1.0)
        budget.lambda2["flops"].fill_(1.0)  # pressure even where anti-windup resets lambda1
    net.train()
    seen = []
    for _ in range(6):
        net.zero_grad()
        budget.zero_grad()
        was_active = budget.active
        loss = budget.penalty()
        loss.backward()
        gate_grads = [p.grad for p in net.gate_parameters() if p.grad is not None]
        lam = budget.lambda1["flops"].grad
        if not was_active:
            # an exact zero: no pull on the gates, no move of the multipliers
            assert float(loss.detach()) == 0.0
            assert all(bool((g == 0).all()) for g in gate_grads)
            assert lam is not None
            assert float(lam) == 0.0
        else:
            assert float(loss.detach()) != 0.0
            assert lam is not None
            assert float(lam) != 0.0
        seen.append(round(budget.target()["flops"], 6))
    assert seen == [1.0, 1.0, 1.0, 0.6, 0.2, 0.2]
    # without a warm-up the target jumps from the start value to the budget when the delay ends
    jump = gp.Budget(net, x, flops=0.2, delay_steps=2)
    targets = []
    for _ in range(3):
        targets.append(jump.target()["flops"])
        jump.penalty()
    assert targets == pytest.approx([1.0, 1.0, 0.2])


def test_straight_through_uses_the_achieved_fraction() -> None:
    net, x = _net()
    budget = gp.Budget(net, x, flops=0.5)
    with torch.no_grad():
        budget.lambda1["flops"].fill_(1.0)
    soft = float(budget.penalty().detach())
    budget.straight_through = True
    hard = float(budget.penalty().detach())
    expected = budget.expected()["flops"]
    achieved = budget.achieved()["flops"]
    assert soft == pytest.approx(expected - 0.5, abs=1e-6)
    assert hard == pytest.approx(achieved - 0.5, abs=1e-6)
    assert expected != achieved


@pytest.mark.parametrize("target", [0.5, 0.25, 0.1])
def test_training_lands_within_0_02_of_the_target(target: float) -> None:
    """The whole mechanism end to end: Lagrangian with warm-up, then the snap and fine-tuning;
    the exact cost of the pruned model is measured, not the expected one."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1200, 16, generator=g)  # (N, F)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)  # (N,)
    torch.manual_seed(0)
    net = gp.ShortcutMLP(16, [48, 48, 48], 4)
    example = x[:1]
    budget = gp.Budget(net, example, flops=target, warmup_steps=120)
    gp.Trainer(net, budget=budget, epochs=10, batch_size=50, progress=False).fit((x, y))
    net.eval()
    pruned = gp.prune(net)
    for gate in gp.gate_modules(net):
        gate.force_(torch.ones(gate.n, dtype=torch.bool))
    dense = gp.cost(gp.prune(net), example)
    got = gp.cost(pruned, example)
    assert isinstance(got, gp.Cost)
    assert isinstance(dense, gp.Cost)
    assert abs(got.flops / dense.flops - target) <= 0.02


def test_anti_windup_resets_a_multiplier_that_pushes_away_from_the_target() -> None:
    net, x = _net()
    budget = gp.Budget(net, x, flops=0.9)  # no warm-up: the target is 0.9 from the start
    net.train()
    below = budget.expected()["flops"] < 0.9
    with torch.no_grad():
        # a multiplier whose sign pushes the cost further from the target
        budget.lambda1["flops"].fill_(1.0 if below else -1.0)
    budget.penalty()
    assert float(budget.lambda1["flops"].detach()) == 0.0
    with torch.no_grad():  # one that pulls towards the target is kept
        budget.lambda1["flops"].fill_(-1.0 if below else 1.0)
    budget.penalty()
    assert float(budget.lambda1["flops"].detach()) == (-1.0 if below else 1.0)
    # eval-mode calls (reporting) never touch the multipliers; neither does anti_windup=False
    with torch.no_grad():
        budget.lambda1["flops"].fill_(1.0 if below else -1.0)
    net.eval()
    budget.penalty()
    assert float(budget.lambda1["flops"].detach()) == (1.0 if below else -1.0)
    plain = gp.Budget(net.train(), x, flops=0.9, anti_windup=False)
    with torch.no_grad():
        plain.lambda1["flops"].fill_(1.0 if below else -1.0)
    plain.penalty()
    assert float(plain.lambda1["flops"].detach()) == (1.0 if below else -1.0)


def test_numpy_settings_are_accepted_and_stored_as_python_numbers() -> None:
    net, x = _net()
    budget = gp.Budget(
        net,
        x,
        flops=np.float64(0.5),
        target_start=np.float32(0.9),
        warmup_steps=np.int64(4),  # a ValueError before ("must be an int")
        delay_steps=np.int64(1),
    )
    assert (budget.warmup_steps, budget.delay_steps) == (4, 1)
    net.train()
    for _ in range(3):
        budget.penalty()
    target = budget.target()["flops"]
    assert type(target) is float  # was numpy.float32 (not JSON serialisable)
    assert target == pytest.approx(0.9 - 0.4 * 2 / 4)
    json.dumps(budget.target())
