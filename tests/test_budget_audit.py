"""Audit of Budget and snap_to_budget: ceilings with several targets, unreachable targets,
idempotence, local optimality of the snap on every model kind, bad arguments."""

from __future__ import annotations

import copy
import warnings

import hypothesis
import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune import Budget, cost, gate_modules, prune, snap_to_budget
from gatedprune.gating import ResNet1d, gate_


class _TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, 6) -> (B, 3)
        out: Tensor = self.out(self.enc(self.inp(x)).mean(1))
        return out


class _UserLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 12, num_layers=2, batch_first=True)
        self.out = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, 5) -> (B, 3)
        y, _ = self.lstm(x)
        out: Tensor = self.out(y[:, -1])
        return out


KINDS = ["mlp", "conv", "lstm", "wrapped", "resnet", "transformer", "user_lstm"]


def _model(kind: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    if kind == "mlp":
        return gp.ShortcutMLP(12, [16, 16, 16], 3), torch.zeros(1, 12)
    if kind == "conv":
        return gp.ShortcutConv1d(1, [[8, 8], [16]], 4, input_length=16), torch.zeros(1, 1, 16)
    if kind == "lstm":
        return gp.ShortcutLSTM(5, 12, 2, 3), torch.zeros(1, 7, 5)
    if kind == "wrapped":  # several gated networks in one wrapper
        net = nn.Sequential(
            gp.ShortcutMLP(12, [16, 16], 8), nn.ReLU(), gp.ShortcutMLP(8, [16, 16], 3)
        )
        return net, torch.zeros(1, 12)
    model: nn.Module
    if kind == "resnet":
        model, x = ResNet1d(widths=(8, 16), blocks=(1, 1)), torch.randn(2, 1, 16)
    elif kind == "transformer":
        model, x = _TinyTransformer(), torch.randn(2, 5, 6)
    else:
        model, x = _UserLSTM(), torch.randn(2, 7, 5)
    gate_(model, x)
    return model, x


def _randomize(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for g in gate_modules(model):
        assert isinstance(g, gp.HardConcreteGate)
        g.log_alpha.data = 2.0 * torch.randn(g.log_alpha.shape, generator=gen)


def _all_open(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    for g in gate_modules(out):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    return out


def _pruned_fraction(model: nn.Module, x: Tensor, measure: str) -> float:
    pruned = cost(prune(copy.deepcopy(model).eval()).eval(), x)
    dense = cost(prune(_all_open(model).eval()).eval(), x)
    return float(getattr(pruned, measure)) / float(getattr(dense, measure))


def _masks(model: nn.Module) -> list[Tensor]:
    return [g.is_open().clone() for g in gate_modules(model)]


def _one_opening_fits(budget: Budget, limits: dict[str, float]) -> bool:
    """Whether opening one more closed gate raises a cost and keeps every one at or below
    its target (the snap left an improvement on the table)."""
    before = budget.achieved()
    for g in gate_modules(budget.model):
        mask = g.is_open().clone()
        for i in range(0, g.n, g.group):
            if mask[i]:
                continue
            trial_mask = mask.clone()
            trial_mask[i : i + g.group] = True
            g.force_(trial_mask)
            trial = budget.achieved()
            g.force_(mask)
            raises = any(trial[k] > before[k] for k in limits)
            if raises and all(trial[k] <= t for k, t in limits.items()):
                return True
    return False


@settings(max_examples=examples(30), deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    target=st.floats(0.2, 0.95),
    both=st.booleans(),
    seed=st.integers(0, 2**16),
)
@hypothesis.example(kind="user_lstm", target=0.3, both=True, seed=0)  # was above the ceiling
@hypothesis.example(kind="transformer", target=0.3, both=False, seed=1)  # 2nd snap moved it
@hypothesis.example(kind="transformer", target=0.5, both=False, seed=8)  # no-op opening
def test_snap_is_a_ceiling_exact_idempotent_and_leaves_no_gate_to_reopen(
    kind: str, target: float, both: bool, seed: int
) -> None:
    model, x = _model(kind)
    _randomize(model, seed)
    limits = {"flops": target, "params": min(1.0, 1.1 * target)} if both else {"flops": target}
    budget = Budget(model, x, **limits)  # type: ignore[arg-type]
    got = snap_to_budget(budget, tolerance=0.01)
    assert got == budget.achieved()
    for k, t in limits.items():
        assert got[k] <= t, (k, got[k], t)  # a ceiling, with one target or two
        assert got[k] == pytest.approx(_pruned_fraction(model, x, k), abs=1e-12)
    inside = any(got[k] >= t - 0.01 for k, t in limits.items())
    # either the binding target is met within the tolerance, or no gate can be reopened
    assert inside or not _one_opening_fits(budget, limits), (got, limits)
    masks = _masks(model)
    assert snap_to_budget(budget, tolerance=0.01) == got  # snapping twice changes nothing
    assert all(torch.equal(a, b) for a, b in zip(masks, _masks(model), strict=True))


@settings(max_examples=examples(25), deadline=None)
@given(
    kind=st.sampled_from(["mlp", "conv", "wrapped", "resnet", "transformer"]),
    target=st.sampled_from([0.1, 0.25, 0.5]),
    both=st.booleans(),
    seed=st.integers(0, 2**16),
)
@hypothesis.example(kind="transformer", target=0.5, both=False, seed=8)  # was 0.449
@hypothesis.example(kind="transformer", target=0.1, both=False, seed=25939)  # was 0.078
@hypothesis.example(kind="resnet", target=0.5, both=False, seed=15976)  # was 0.478
def test_snap_reaches_the_issue_targets_within_two_points_on_fine_grained_models(
    kind: str, target: float, both: bool, seed: int
) -> None:
    """On models whose gates are fine-grained next to a 0.02 window (no shared LSTM hidden
    size), the snap lands within 0.02 below each of the targets 0.5 / 0.25 / 0.1 even from
    random gate states. It used to stop short where only a compound move reaches the window
    (open a closed transformer FFN sub-layer or ResNet block, close units elsewhere): 26 of
    300 random cases, up to 0.05 below."""
    model, x = _model(kind)
    _randomize(model, seed)
    limits = {"flops": target, "params": min(1.0, 1.1 * target)} if both else {"flops": target}
    budget = Budget(model, x, **limits)  # type: ignore[arg-type]
    got = snap_to_budget(budget, tolerance=0.01)
    assert all(got[k] <= t for k, t in limits.items()), (got, limits)
    assert min(t - got[k] for k, t in limits.items()) <= 0.02, (got, limits)
    assert got["flops"] == pytest.approx(_pruned_fraction(model, x, "flops"), abs=1e-12)
    assert snap_to_budget(budget, tolerance=0.01) == got  # still idempotent


def test_two_targets_on_a_gated_lstm_stay_at_or_below_both() -> None:
    """Closing one hidden unit of one layer of a gated nn.LSTM saves nothing (the layers
    share a hidden size), and params was already below its window: every closure was
    refused and FLOPs ended above their ceiling (0.306 > 0.3)."""
    model, x = _model("user_lstm")
    _randomize(model, 0)
    budget = Budget(model, x, flops=0.3, params=0.33)
    got = snap_to_budget(budget)
    assert got["flops"] <= 0.3, got
    assert got["params"] <= 0.33, got


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_a_target_below_the_all_closed_cost_warns_and_the_snap_closes_every_gate(
    kind: str,
) -> None:
    """A target below the all-closed cost used to be taken silently; the snap then ended
    above the ceiling with no word."""
    model, x = _model(kind)
    closed = copy.deepcopy(model)
    for g in gate_modules(closed):
        g.force_(torch.zeros(g.n, dtype=torch.bool))
    floor = Budget(closed, x, flops=1.0).achieved()["flops"]
    assert 0.0 < floor < 0.1
    with pytest.warns(UserWarning, match=r"flops=0\.0001 is below .*every gate closed"):
        budget = Budget(model, x, flops=1e-4)
    assert budget.floor == {"flops": floor}
    assert snap_to_budget(budget) == {"flops": floor}  # best effort: the closest decisions
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget = Budget(model, x, flops=floor)  # reachable: exactly every gate closed
    assert snap_to_budget(budget)["flops"] <= floor


def test_anti_windup_must_be_a_bool() -> None:
    model, x = _model("mlp")
    with pytest.raises(TypeError, match="anti_windup must be a bool, got 'False'"):
        Budget(model, x, flops=0.5, anti_windup="False")  # type: ignore[arg-type]


@settings(max_examples=examples(20), deadline=None)
@given(
    kind=st.sampled_from(["mlp", "conv", "grouped", "wrapped"]),
    target=st.sampled_from([0.15, 0.3, 0.5, 0.8]),
    multiple=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
)
@hypothesis.example(kind="mlp", target=0.15, multiple=4, seed=0)  # 0.122, then 0.113
def test_snap_with_round_to_is_idempotent(
    kind: str, target: float, multiple: int, seed: int
) -> None:
    """A second snap of rounded decisions used to move them again (they lie below the
    window, so the snap reopened gates and rounded anew), sometimes to a lower cost."""
    torch.manual_seed(seed)
    model: nn.Module
    if kind == "mlp":
        model, x = gp.ShortcutMLP(16, [20, 12, 24], 4), torch.zeros(1, 16)
    elif kind == "conv":
        model, x = gp.ShortcutConv1d(1, [[20, 12], [24]], 4, input_length=32), torch.zeros(1, 1, 32)
    elif kind == "grouped":
        model, x = gp.ShortcutMLP(16, [32, 32], 4, unit_group=4), torch.zeros(1, 16)
    else:
        model = nn.Sequential(gp.ShortcutMLP(16, [20, 24], 8), gp.ShortcutMLP(8, [24, 16], 4))
        x = torch.zeros(1, 16)
    _randomize(model, seed)
    budget = Budget(model, x, flops=target)
    got = snap_to_budget(budget, tolerance=0.02, round_to=multiple)
    assert got["flops"] <= target
    assert got["flops"] == pytest.approx(_pruned_fraction(model, x, "flops"), abs=1e-12)
    masks = _masks(model)
    assert snap_to_budget(budget, tolerance=0.02, round_to=multiple) == got
    assert all(torch.equal(a, b) for a, b in zip(masks, _masks(model), strict=True))


@pytest.mark.parametrize("value", [None, "no", 0])
def test_snap_at_most_must_be_a_bool(value: object) -> None:
    """``at_most=None`` used to switch silently to the symmetric window (above the ceiling)."""
    model, x = _model("mlp")
    budget = Budget(model, x, flops=0.5)
    before = _masks(model)
    with pytest.raises(TypeError, match=f"at_most must be a bool, got {value!r}"):
        snap_to_budget(budget, at_most=value)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(before, _masks(model), strict=True))


def test_a_round_to_that_splits_unit_groups_is_refused_before_any_gate_changes() -> None:
    """The group check used to run after the snap had already forced every gate."""
    torch.manual_seed(0)
    model = gp.ShortcutMLP(16, [32, 32], 4, unit_group=8)
    _randomize(model, 1)
    budget = Budget(model, torch.zeros(1, 16), flops=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"round_to=12 is not a multiple of .* group size 8"):
        snap_to_budget(budget, round_to=12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@settings(max_examples=examples(25), deadline=None)
@given(
    kind=st.sampled_from(["mlp", "conv", "resnet", "transformer"]),
    target=st.sampled_from([0.1, 0.25, 0.5]),
    slack=st.floats(1.0, 1.6),
    seed=st.integers(0, 2**16),
)
def test_snap_primary_brings_that_target_within_the_tolerance_and_keeps_the_others_ceilings(
    kind: str, target: float, slack: float, seed: int
) -> None:
    """``primary="flops"`` next to a looser second target (as a latency budget next to a
    FLOPs one): the FLOPs end within the tolerance below their target (or no single gate can
    be opened), the other target stays a ceiling, and snapping twice changes nothing.
    Without it the snap may stop once the other target is within its own tolerance, leaving
    the FLOPs further below (a demo run ended at 0.078 of the FLOPs for a 0.1 target)."""
    model, x = _model(kind)
    _randomize(model, seed)
    limits = {"flops": target, "params": min(1.0, slack * target)}
    budget = Budget(model, x, **limits)  # type: ignore[arg-type]
    got = snap_to_budget(budget, tolerance=0.01, primary="flops")
    assert got == budget.achieved()
    assert all(got[k] <= t for k, t in limits.items()), (got, limits)
    assert got["flops"] >= target - 0.01 or not _one_opening_fits(budget, limits), got
    masks = _masks(model)
    assert snap_to_budget(budget, tolerance=0.01, primary="flops") == got
    assert all(torch.equal(a, b) for a, b in zip(masks, _masks(model), strict=True))


def test_snap_primary_meets_the_flops_where_the_default_stops_at_the_other_target() -> None:
    """Without ``primary`` the snap stopped once params were within 0.01 of their (looser)
    target, at 0.249 of the FLOPs for a 0.3 target; with ``primary="flops"`` the FLOPs are."""
    model, x = _model("conv")
    _randomize(model, 0)
    other = copy.deepcopy(model)
    default = snap_to_budget(Budget(model, x, flops=0.3, params=0.33), tolerance=0.01)
    assert default["params"] >= 0.32
    assert default["flops"] < 0.29  # the case this guards: FLOPs left far below
    got = snap_to_budget(Budget(other, x, flops=0.3, params=0.33), tolerance=0.01, primary="flops")
    assert 0.29 <= got["flops"] <= 0.3, got
    assert got["params"] <= 0.33, got


def test_snap_round_to_moves_toward_the_primary_target() -> None:
    """With ``round_to``, the pair moves (one width a step up, another a step down) judge
    progress by the primary target: they judged it by whichever target was closest to its
    own, so a params ceiling 1.05x the FLOPs target stopped the rounding at 0.113 of the FLOPs
    for 0.15 (4 of 1440 random cases of this kind; none got worse)."""
    model, x = _model("conv")
    _randomize(model, 6)
    limits = {"flops": 0.15, "params": 1.05 * 0.15}
    budget = Budget(model, x, **limits)
    got = snap_to_budget(budget, tolerance=0.01, round_to=4, primary="flops")
    assert 0.14 <= got["flops"] <= 0.15, got
    assert got["params"] <= limits["params"], got
    widths = [int(g.is_open().sum()) for g in model.width_gates()]  # type: ignore[operator]
    assert all(w % 4 == 0 for w in widths), widths


@pytest.mark.parametrize(
    ("primary", "error", "message"),
    [
        ("latency", ValueError, r"primary='latency' is not a target of this budget: .*'flops'"),
        (3, TypeError, "primary must be a target name or None, got 3"),
    ],
)
def test_snap_primary_must_name_a_target(primary: object, error: type, message: str) -> None:
    model, x = _model("mlp")
    budget = Budget(model, x, flops=0.5)
    before = _masks(model)
    with pytest.raises(error, match=message):
        snap_to_budget(budget, primary=primary)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(before, _masks(model), strict=True))


def test_trainer_checks_snap_primary_before_training() -> None:
    from gatedprune.train import Trainer

    model, x = _model("mlp")
    data = (torch.randn(20, 12), torch.randint(0, 3, (20,)))
    budget = Budget(model, x, flops=0.5)
    trainer = Trainer(model, budget=budget, epochs=1, snap_primary="params", progress=False)
    with pytest.raises(ValueError, match=r"snap_primary='params' is not a target"):
        trainer.fit(train=data)
    no_budget = Trainer(model, epochs=1, snap_primary="flops", progress=False)
    with pytest.raises(ValueError, match="snap_primary names a budget target, but there is no"):
        no_budget.fit(train=data)


@settings(max_examples=examples(15), deadline=None)
@given(seed=st.integers(0, 2**16), eps=st.sampled_from([0.005, 0.02]))
def test_snap_primary_keeps_a_latency_ceiling_the_primary_window_cannot_share(
    seed: int, eps: float
) -> None:
    """A latency ceiling just above the all-closed latency, next to a FLOPs target whose
    window no block subset under that ceiling reaches: the snap must end under the ceiling
    (ceilings come first). It used to skip every closure that took the FLOPs below their
    window, and ended above the latency ceiling (52 of 80 random cases; a trained ResNet kept
    one block at 0.144 of the latency for a 0.125 ceiling)."""
    from tests.gating_helpers import fixed_latency_model

    torch.manual_seed(seed)
    model = ResNet1d(widths=(8, 16, 32), blocks=(2, 2, 2))
    x = torch.zeros(1, 1, 40)
    gate_(model, x, channels=False)
    _randomize(model, seed)
    lm = fixed_latency_model(model, (0.05, 0.02, 1e-8))
    floor = Budget(model, x, flops=0.3, latency=1.0, latency_model=lm).floor["latency"]
    budget = Budget(model, x, flops=0.3, latency=floor + eps, latency_model=lm)
    got = snap_to_budget(budget, primary="flops")
    assert got["latency"] <= floor + eps + 1e-12, got
    assert got["flops"] <= 0.3, got
    assert snap_to_budget(budget, primary="flops") == got
