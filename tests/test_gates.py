"""Gates: open probability vs Monte Carlo, gradients, exact extremes, hardening."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

import gatedprune as gp
from gatedprune.gates import HardConcreteGate, SigmoidGate, resolve_gate


def test_hard_concrete_prob_open_matches_monte_carlo() -> None:
    torch.manual_seed(0)
    g = HardConcreteGate(7)
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0]))
    g.train()
    samples = torch.stack([g() for _ in range(20000)])  # (S, n)
    mc = (samples > 0).float().mean(0)
    assert torch.allclose(mc, g.prob_open().detach(), atol=0.015)


def test_hard_concrete_samples_in_unit_interval_and_hit_both_ends() -> None:
    torch.manual_seed(1)
    g = HardConcreteGate(1000, init_log_alpha=0.0).train()
    z = g().detach()
    assert float(z.min()) == 0.0
    assert float(z.max()) == 1.0
    assert bool(((z >= 0) & (z <= 1)).all())


def test_hard_concrete_eval_exact_extremes() -> None:
    g = HardConcreteGate(4).eval()
    ln11 = math.log(11.0)
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([-ln11 - 1e-3, -ln11 - 5, ln11 + 1e-3, ln11 + 5]))
    v = g()
    assert v.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert g.is_open().tolist() == [False, False, True, True]
    with torch.no_grad():
        g.log_alpha.fill_(0.0)
    assert 0.0 < float(g()[0].detach()) < 1.0


def test_gradients_reach_gate_parameters() -> None:
    torch.manual_seed(0)
    hc = HardConcreteGate(5).train()
    (hc() * torch.arange(5.0)).sum().backward()
    assert hc.log_alpha.grad is not None
    assert hc.log_alpha.grad.abs().sum() > 0
    hc.zero_grad()
    hc.prob_open().sum().backward()
    assert hc.log_alpha.grad is not None
    assert bool((hc.log_alpha.grad > 0).all())
    sg = SigmoidGate(3)
    sg().sum().backward()
    assert sg.theta.grad is not None
    assert bool((sg.theta.grad > 0).all())


def test_sigmoid_harden_gives_exact_values_and_straight_through_grad() -> None:
    sg = SigmoidGate(4, init_theta=0.5)
    with torch.no_grad():
        sg.theta.copy_(torch.tensor([-2.0, -0.1, 0.1, 2.0]))
    assert 0 < float(sg.eval()().min().detach()) < 1
    assert sg.is_open().all()  # a soft sigmoid never closes
    sg.harden()
    assert sg.eval()().tolist() == [0.0, 0.0, 1.0, 1.0]
    sg.train()
    sg().sum().backward()
    assert sg.theta.grad is not None
    assert bool((sg.theta.grad > 0).all())


def test_force_sets_confident_states() -> None:
    for g in (HardConcreteGate(3), SigmoidGate(3)):
        g.force_(torch.tensor([True, False, True]))
        assert g.eval()().tolist() == [1.0, 0.0, 1.0]


def test_grouped_gates_repeat_one_value_per_group() -> None:
    for g in (HardConcreteGate(6, group=3), SigmoidGate(6, group=3)):
        g.force_(torch.tensor([True] * 3 + [False] * 3))
        assert g.eval()().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        assert g.prob_open().shape == (6,)
        assert sum(p.numel() for p in g.parameters()) == 2
        g.train()
        g().sum().backward()  # every copy's gradient reaches the group's parameter
        assert all(p.grad is not None and p.grad.shape == (2,) for p in g.parameters())
    with pytest.raises(ValueError, match="6 % 4 != 0"):
        HardConcreteGate(6, group=4)
    with pytest.raises(ValueError, match="group must be a positive int"):
        SigmoidGate(6, group=0)
    with pytest.raises(TypeError, match="group must be a positive int"):
        SigmoidGate(6, group=2.0)  # type: ignore[arg-type]


def test_resolve_gate_rejects_unknown_kinds() -> None:
    assert isinstance(resolve_gate("hard_concrete"), gp.HardConcrete)
    with pytest.raises(ValueError, match="unknown gate kind 'l1'"):
        resolve_gate("l1")
    with pytest.raises(ValueError, match="unknown gate kind"):
        gp.ShortcutMLP(4, [4], 2, gate="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n >= 1"):
        HardConcreteGate(0)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: gp.HardConcrete(init_log_alpha=NAN), "init_log_alpha must be finite, got nan"),
        (lambda: gp.HardConcrete(init_log_alpha=-INF), "init_log_alpha must be finite, got -inf"),
        (lambda: gp.HardConcrete(beta=0.0), "beta must be > 0, got 0.0"),
        (lambda: gp.HardConcrete(beta=-1.0), "beta must be > 0, got -1.0"),
        (lambda: gp.HardConcrete(beta=INF), "beta must be finite, got inf"),
        (lambda: gp.HardConcrete(beta=NAN), "beta must be finite, got nan"),
        (lambda: gp.HardConcrete(init_drop=0.0), r"init_drop must be in \(0, 1\), got 0.0"),
        (lambda: gp.HardConcrete(init_drop=NAN), "init_drop must be finite, got nan"),
        (lambda: gp.Sigmoid(init_theta=NAN), "init_theta must be finite, got nan"),
        (lambda: gp.Sigmoid(init_theta=INF), "init_theta must be finite, got inf"),
        (lambda: gp.Sigmoid(temperature=0.0), "temperature must be > 0, got 0.0"),
        (lambda: gp.Sigmoid(temperature=INF), "temperature must be finite, got inf"),
        (lambda: HardConcreteGate(3, init_log_alpha=NAN), "init_log_alpha must be finite"),
        (lambda: HardConcreteGate(3, init_log_alpha=INF), "init_log_alpha must be finite"),
        (lambda: HardConcreteGate(3, beta=0.0), "beta must be > 0, got 0.0"),
        (lambda: HardConcreteGate(3, beta=-2.0), "beta must be > 0, got -2.0"),
        (lambda: HardConcreteGate(3, init_std=-0.1), "init_std must be >= 0, got -0.1"),
        (lambda: HardConcreteGate(3, init_std=NAN), "init_std must be finite, got nan"),
        (lambda: SigmoidGate(3, init_theta=NAN), "init_theta must be finite, got nan"),
        (lambda: SigmoidGate(3, init_theta=-INF), "init_theta must be finite, got -inf"),
        (lambda: SigmoidGate(3, temperature=NAN), "temperature must be finite, got nan"),
        (lambda: SigmoidGate(3, temperature=-1.0), "temperature must be > 0, got -1.0"),
    ],
)
def test_gate_settings_must_be_finite_and_in_range(build: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: HardConcreteGate(2.5), r"n must be an int \(the number of gates\), got 2\.5"),  # type: ignore[arg-type]
        (lambda: HardConcreteGate("3"), r"n must be an int .*, got '3'"),  # type: ignore[arg-type]
        (lambda: HardConcreteGate(True), r"n must be an int .*, got True"),
        (lambda: SigmoidGate(2.0), r"n must be an int .*, got 2\.0"),  # type: ignore[arg-type]
        (lambda: HardConcreteGate(3, beta="1"), "beta must be a real number, got '1'"),  # type: ignore[arg-type]
        (lambda: SigmoidGate(3, init_theta=True), "init_theta must be a real number, got True"),
        (lambda: gp.HardConcrete(init_drop="0.5"), "init_drop must be a real number"),  # type: ignore[arg-type]
        (lambda: gp.Sigmoid(temperature=None), "temperature must be a real number, got None"),  # type: ignore[arg-type]
    ],
)
def test_gate_settings_of_the_wrong_type_are_type_errors(
    build: Callable[[], object], match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        build()


def test_valid_gate_settings_are_accepted() -> None:
    g = gp.HardConcrete(init_log_alpha=-1, beta=np.float32(0.5)).make(np.int64(4))
    assert isinstance(g, HardConcreteGate)
    assert (g.n, g.beta) == (4, 0.5)
    assert g.log_alpha.shape == (4,)
    s = gp.Sigmoid(init_theta=-2, temperature=0.25).make(2)
    assert isinstance(s, SigmoidGate)
    assert s.theta.tolist() == [-2.0, -2.0]
    assert HardConcreteGate(3, init_std=0.0).log_alpha.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("group", [1, 2])
def test_forced_hard_concrete_gates_are_exact_in_training_too(group: int) -> None:
    # before: force_ set log alpha to +-2 ln 11, exact in eval only; in training a closed gate
    # opened in 3.9% of forwards (and an open one fell below 1 as often)
    torch.manual_seed(0)
    g = HardConcreteGate(8, group=group).train()
    mask = torch.tensor([True, True, False, False, True, True, False, False])
    g.force_(mask)
    samples = torch.stack([g() for _ in range(5000)])  # (S, 8)
    assert torch.equal(samples, mask.float().expand(5000, 8))
    assert torch.equal(g.prob_open().detach(), mask.float())
    assert torch.equal(g.eval_value(), mask.float())
    (g() * torch.arange(8.0)).sum().backward()
    grad = g.log_alpha.grad
    assert grad is not None
    assert torch.equal(grad, torch.zeros_like(grad))  # fixed: no gradient, and no NaN
    opt = torch.optim.AdamW(g.parameters(), lr=0.1, weight_decay=0.0)
    opt.step()  # a fixed gate stays fixed under the optimizer
    assert torch.equal(g.eval_value(), mask.float())
    assert not torch.isnan(g.log_alpha).any()


@pytest.mark.parametrize(
    ("make_opt", "steps"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4), 300),
        (lambda ps: torch.optim.SGD(ps, lr=0.5, weight_decay=0.1), 50),
        (lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-4), 300),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.01, weight_decay=1e-4), 300),
        (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), 300),
        (lambda ps: torch.optim.Adafactor(ps, lr=0.01), 300),
    ],
    ids=["sgd-momentum-wd", "sgd-strong-wd", "adam-l2", "rmsprop-l2", "adamw", "adafactor"],
)
def test_forced_gates_survive_optimizers_that_decay_or_scale_by_them(
    make_opt: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], steps: int
) -> None:
    """The standard torchvision recipe, SGD with weight decay on every parameter, gates
    included: with force_'s log alpha at +-inf the decay term (wd * inf) made every forced
    gate NaN at the first step after the snap (and Adam's L2, RMSprop's, Adafactor's
    parameter scale alike); a finite log alpha far beyond the exact range stays fixed."""
    torch.manual_seed(0)
    g = HardConcreteGate(6).train()
    mask = torch.tensor([True, False, True, False, False, True])
    g.force_(mask)
    opt = make_opt(list(g.parameters()))
    for _ in range(steps):
        opt.zero_grad()
        (g() * torch.arange(6.0)).sum().backward()
        opt.step()
        assert torch.equal(g(), mask.float())  # exact samples in training, every step
    assert torch.isfinite(g.log_alpha).all()
    assert torch.equal(g.eval_value(), mask.float())
    assert torch.equal(g.prob_open().detach(), mask.float())


def test_snapped_network_trains_the_function_prune_returns() -> None:
    # before: after the snap the remaining training steps ran a noisy network (up to 0.27 off)
    torch.manual_seed(0)
    net = gp.ShortcutMLP(6, [8, 8], 3)
    gen = torch.Generator().manual_seed(1)
    for g in gp.gate_modules(net):
        g.force_(torch.rand(g.n, generator=gen) < 0.6)
    x = torch.randn(16, 6)
    pruned = gp.prune(net.eval()).eval()
    net.train()
    for m in net.modules():  # BatchNorm in eval: the gates are what is compared
        if isinstance(m, torch.nn.BatchNorm1d):
            m.eval()
    with torch.no_grad():
        for _ in range(20):
            assert float((net(x) - pruned(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize(("start", "init_theta"), [("open", 0.0), ("open", -2.0), ("closed", 2.0)])
def test_harden_keeps_the_state_an_inserted_sigmoid_gate_starts_in(
    start: str, init_theta: float
) -> None:
    # before: hardening thresholded at theta > 0 whatever the start: an open start with
    # init_theta <= 0 closed, a closed start with init_theta > 0 opened
    g = SigmoidGate(3, init_theta=init_theta, start=start)  # type: ignore[arg-type]
    before = g.eval_value().detach().clone()
    g.harden()
    assert torch.equal(g.eval_value().detach(), before)
    assert before.tolist() == ([1.0] * 3 if start == "open" else [0.0] * 3)
