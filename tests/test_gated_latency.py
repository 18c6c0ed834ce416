"""GatedLatencyModel: latency budgets for models gated with gate_ (module-call counts exact
at hard gates, their expectation exact over independent block gates, fitting, JSON, Budget)."""

from __future__ import annotations

import itertools
import json
import warnings
from typing import Any

import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import ResNet1d, gate_
from gatedprune.gating.latency import GATED_LATENCY_FEATURES
from tests.gating_helpers import fixed_latency_model, inserted_gating, module_calls


@settings(max_examples=examples(30), deadline=None)
@given(
    seed=st.integers(0, 10_000),
    stages=st.lists(st.tuples(st.sampled_from([4, 8]), st.integers(1, 3)), min_size=1, max_size=3),
    dense=st.booleans(),
    p_open=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
)
def test_hard_ops_are_the_pruned_models_module_calls(
    seed: int, stages: list[tuple[int, int]], dense: bool, p_open: float
) -> None:
    """At exact decisions (blocks, channels, new shortcuts) the ops feature is the number of
    module calls of ``prune(model)``: closed branches, bypassed ReLUs and closed shortcuts
    are gone, each kept shortcut adds one."""
    torch.manual_seed(seed)
    widths, blocks = zip(*stages, strict=True)
    model = ResNet1d(widths=widths, blocks=blocks)
    x = torch.randn(2, 1, 16)
    gate_(model, x, shortcuts="dense" if dense else None)
    gen = torch.Generator().manual_seed(seed)
    for g in inserted_gating(model).gates():
        g.force_(torch.rand(g.n, generator=gen) < p_open)
    model.eval()
    lm = fixed_latency_model(model, (0.0, 1.0, 0.0))
    assert lm.features(model, hard=True)["ops"] == module_calls(gp.prune(model), x)
    flops = lm.features(model, hard=True)["flops"]
    assert flops == pytest.approx(float(gp.cost(model, x, hard=True).flops) / 2, rel=1e-12)


class _Residual(nn.Module):
    def __init__(self, width: int, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.act = nn.Tanh()
        self.inner = inner
        self.b = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.a(x))  # (B, W)
        if self.inner is not None:
            h = self.inner(h)
        return x + self.b(h)  # (B, W)


@pytest.mark.parametrize("nested", [False, True])
def test_expected_ops_is_the_exact_expectation_over_block_states(nested: bool) -> None:
    """Enumerating every open/closed state of the (independent) block gates, weighted by
    their probabilities, gives the differentiable expectation, nested blocks included."""
    torch.manual_seed(0)
    first = _Residual(6, _Residual(6) if nested else None)
    model = nn.Sequential(nn.Linear(3, 6), first, _Residual(6), _Residual(6), nn.Linear(6, 2))
    x = torch.randn(2, 3)
    gate_(model, x, channels=False)
    g = inserted_gating(model)
    blocks = list(g.block_gates)
    with torch.no_grad():
        for k, gate in enumerate(blocks):
            gate.log_alpha.fill_(0.7 * k - 1.0)  # type: ignore[operator]
    with torch.no_grad():
        p = [float(gate.prob_open()[0]) for gate in blocks]  # type: ignore[operator]
    with torch.no_grad():
        soft = float(g.expected_ops())
    saved = {k: v.clone() for k, v in g.state_dict().items()}
    exact = 0.0
    for state in itertools.product([False, True], repeat=len(blocks)):
        weight = 1.0
        for gate, is_open, pk in zip(blocks, state, p, strict=True):
            gate.force_(torch.tensor([is_open]))  # type: ignore[operator]
            weight *= pk if is_open else 1.0 - pk
        model.eval()
        calls = float(g.expected_ops(hard=True))
        pruned = gp.prune(model)
        assert calls == module_calls(pruned, x)
        with torch.no_grad():  # nested closed blocks prune exactly (their adds are erased)
            assert (pruned(x) - model(x)).abs().max() <= 1e-5
        exact += weight * calls
    g.load_state_dict(saved)
    assert soft == pytest.approx(exact, rel=1e-9)


def test_expected_latency_is_differentiable() -> None:
    torch.manual_seed(0)
    model = ResNet1d(widths=(8, 16), blocks=(2, 2))
    x = torch.zeros(1, 1, 24)
    gate_(model, x)
    lm = fixed_latency_model(model, (0.05, 0.01, 1e-6))
    value = lm.expected(model)
    value.backward()
    g = inserted_gating(model)
    for gate in [*g.block_gates, *g.group_gates]:
        grad = gate.log_alpha.grad  # type: ignore[union-attr]
        assert grad is not None
        assert bool((grad > 0).all())


def test_calibrate_fits_restores_the_gates_and_round_trips_through_json() -> None:
    torch.manual_seed(0)
    model = ResNet1d(widths=(8, 16), blocks=(2, 2))
    x = torch.zeros(1, 1, 40)
    gate_(model, x, shortcuts="dense")
    g = inserted_gating(model)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    lm = gp.GatedLatencyModel.calibrate(model, x, samples=6, rounds=1)
    after = g.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(lm.coef) == len(GATED_LATENCY_FEATURES)
    assert all(c >= 0 for c in lm.coef)
    assert any(c > 0 for c in lm.coef)
    assert lm.input_shape == (1, 1, 40)
    assert lm.batch_size == 1
    assert lm.samples == 6
    assert 0 <= lm.median_error <= lm.max_error < float("inf")
    assert float(lm.expected(model, hard=True)) > 0
    assert gp.GatedLatencyModel.from_json(lm.to_json()) == lm


def test_calibrate_recovers_the_coefficients_of_a_noiseless_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With timings that are an exact combination of the features (0.1 ms + 0.02 ms per
    module call + 1e-7 ms per FLOP), the fit returns those coefficients and no error; the
    first timed model is the all-open one."""
    import gatedprune.gating.latency as gl

    torch.manual_seed(0)
    model = ResNet1d(widths=(8, 16), blocks=(2, 2))
    x = torch.zeros(1, 1, 40)
    gate_(model, x)
    dense_calls = module_calls(gp.prune(model.eval()), x)
    dense_flops = float(gp.cost(model, x, hard=True).flops)
    seen: dict[str, int] = {}

    def fake(models: dict[str, nn.Module], xb: Tensor, **_: object) -> dict[str, float]:
        times = {}
        for name, m in models.items():
            seen[name] = module_calls(m, x)
            flops = gp.cost(m, x).flops
            times[name] = 1e-3 * (0.1 + 0.02 * seen[name] + 1e-7 * flops)  # seconds
        return times

    monkeypatch.setattr(gl, "compare_latency", fake)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a perfect fit does not warn
        lm = gp.GatedLatencyModel.calibrate(model, x, samples=12)
    assert seen["0"] == dense_calls
    assert float(lm.expected(model, hard=True)) == pytest.approx(
        0.1 + 0.02 * dense_calls + 1e-7 * dense_flops, rel=1e-9
    )
    assert lm.coef == pytest.approx((0.1, 0.02, 1e-7), rel=1e-6)
    assert lm.max_error < 1e-9


def test_snap_meets_a_latency_budget_on_a_gated_model() -> None:
    """Budget + snap_to_budget steer the predicted latency of a gate_ model; the achieved
    fraction is the model's prediction for the pruned architecture."""
    torch.manual_seed(0)
    model = ResNet1d(widths=(8, 16, 32), blocks=(2, 2, 2))
    x = torch.zeros(1, 1, 40)
    gate_(model, x)
    lm = fixed_latency_model(model, (0.05, 0.01, 2e-7))
    budget = gp.Budget(model, x, flops=0.6, latency=0.5, latency_model=lm)
    assert budget.achieved() == pytest.approx({"flops": 1.0, "latency": 1.0})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in inserted_gating(model).gates():
            gate.log_alpha.copy_(torch.empty(gate.log_alpha.shape).uniform_(-3, 3, generator=gen))  # type: ignore[operator]
    achieved = gp.snap_to_budget(budget)
    assert achieved["latency"] <= 0.5 + 1e-9
    assert achieved["flops"] <= 0.6 + 1e-9
    dense = budget.dense["latency"]
    assert achieved["latency"] == pytest.approx(float(lm.expected(model, hard=True)) / dense)


def _train(latency: float | None) -> tuple[dict[str, float], int, float]:
    """A small gated ResNet trained under a FLOPs budget of 0.5 (and a latency budget):
    (achieved fractions, closed blocks, predicted latency fraction of the pruned model)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 1, 24, generator=g)  # (N, 1, L)
    y = (x.mean(dim=(1, 2)) > 0).long()  # (N,)
    torch.manual_seed(0)
    model = ResNet1d(widths=(8, 16), blocks=(2, 2), num_classes=2)
    gate_(model, x[:1])
    lm = fixed_latency_model(model, (0.05, 0.01, 2e-7))
    extra: dict[str, Any] = {} if latency is None else {"latency": latency, "latency_model": lm}
    budget = gp.Budget(model, x[:1], flops=0.5, warmup_steps=40, **extra)
    gp.Trainer(model, budget=budget, epochs=6, batch_size=50, progress=False).fit((x, y))
    gating = inserted_gating(model)
    achieved, closed = budget.achieved(), len(gating.closed_blocks())
    predicted = float(lm.expected(model, hard=True))
    for gate in gating.gates():
        gate.force_(torch.ones(gate.n, dtype=torch.bool))
    return achieved, closed, predicted / float(lm.expected(model, hard=True))


def test_training_under_flops_and_latency_budgets_meets_both() -> None:
    """End to end with the Trainer: where the FLOPs budget alone leaves the predicted latency
    above 0.6, adding latency=0.6 closes more blocks and meets both constraints."""
    alone, closed_alone, latency_alone = _train(None)
    assert alone["flops"] <= 0.5 + 1e-9
    assert latency_alone > 0.6
    both, closed_both, latency_both = _train(0.6)
    assert both["flops"] <= 0.5 + 1e-9
    assert both["latency"] <= 0.6 + 1e-9
    assert both["latency"] == pytest.approx(latency_both)
    assert closed_both > closed_alone


def test_bad_gated_latency_models_are_refused() -> None:
    torch.manual_seed(0)
    model = ResNet1d(widths=(8,), blocks=(2,))
    x = torch.zeros(1, 1, 16)
    with pytest.raises(TypeError, match=r"not gated with gatedprune\.gate_"):
        gp.GatedLatencyModel.calibrate(model, x)
    gate_(model, x)
    with pytest.raises(ValueError, match=r"gated with an input of shape \(1, 1, 16\)"):
        gp.GatedLatencyModel.calibrate(model, torch.zeros(1, 1, 20))
    with pytest.raises(ValueError, match="samples must be an int >= 4"):
        gp.GatedLatencyModel.calibrate(model, x, samples=2)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        gp.GatedLatencyModel.calibrate(model, x, batch_size=True)
    lm = fixed_latency_model(model, (0.05, 0.01, 1e-6))
    other = ResNet1d(widths=(8,), blocks=(3,))
    gate_(other, x)
    with pytest.raises(ValueError, match="calibrated for another gated model"):
        gp.Budget(other, x, latency=0.5, latency_model=lm)
    with pytest.raises(ValueError, match=r"calibrated with an example_input of shape"):
        gp.Budget(model, torch.zeros(2, 1, 16), latency=0.5, latency_model=lm)
    with pytest.raises(TypeError, match="LatencyModel or GatedLatencyModel"):
        gp.Budget(model, x, latency=0.5, latency_model="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coef must be finite and >= 0"):
        gp.GatedLatencyModel((-1.0, 0.0, 0.0), 1, 1, (1, 1, 16), "k", 0.0, 0.0, 4)
    with pytest.raises(ValueError, match="coef must have 3 entries"):
        gp.GatedLatencyModel((1.0,), 1, 1, (1, 1, 16), "k", 0.0, 0.0, 4)
    text = json.loads(lm.to_json())
    for broken in ("{}", "[1]", json.dumps({**text, "structure": 3})):
        with pytest.raises(ValueError, match=r"GatedLatencyModel JSON|structure must be"):
            gp.GatedLatencyModel.from_json(broken)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        gp.GatedLatencyModel.from_json(json.dumps({**text, "batch_size": 2.5}))


def test_calibrate_warns_when_the_timings_are_too_noisy_to_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timings with +-80% random noise (a busy machine) fit badly: calibrate warns instead
    of returning an unreliable model silently."""
    import gatedprune.gating.latency as gl

    torch.manual_seed(0)
    model = ResNet1d(widths=(8, 16), blocks=(2, 2))
    x = torch.zeros(1, 1, 40)
    gate_(model, x)
    gen = torch.Generator().manual_seed(0)

    def noisy(models: dict[str, nn.Module], xb: Tensor, **_: object) -> dict[str, float]:
        out = {}
        for name, m in models.items():
            factor = 1.0 + 0.8 * (2.0 * float(torch.rand((), generator=gen)) - 1.0)
            out[name] = 1e-3 * (0.1 + 1e-7 * gp.cost(m, x).flops) * factor  # seconds
        return out

    monkeypatch.setattr(gl, "compare_latency", noisy)
    with pytest.warns(UserWarning, match=r"GatedLatencyModel.calibrate: held-out median"):
        lm = gp.GatedLatencyModel.calibrate(model, x, samples=12)
    assert lm.median_error > 0.1


@pytest.mark.parametrize("other", [{"kernel_size": 5}, {"num_classes": 5}])
def test_a_model_with_other_layer_settings_is_refused(other: dict[str, int]) -> None:
    # before: the structure key had gates, blocks and calls only: a ResNet1d with another kernel
    # size or class count (other FLOPs per sample) was accepted
    x = torch.zeros(1, 1, 32)
    model = ResNet1d(widths=(8, 16), blocks=(1, 1))
    gate_(model, x)
    lm = fixed_latency_model(model, (0.01, 0.002, 1e-6))
    twin = ResNet1d(widths=(8, 16), blocks=(1, 1))
    gate_(twin, x)
    gp.Budget(twin, x, latency=0.5, latency_model=lm)  # the same structure: accepted
    changed = ResNet1d(widths=(8, 16), blocks=(1, 1), **other)
    gate_(changed, x)
    with pytest.raises(ValueError, match="calibrated for another gated model"):
        gp.Budget(changed, x, latency=0.5, latency_model=lm)
