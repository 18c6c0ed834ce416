"""snap_to_budget's swap search: when the greedy rounds and the compound moves end below the
window, a swap (reopen one closed gate, close one open one) that lands in the window is
found; decisions already in the window are kept; ``tolerance`` is bounded by the target."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from gating_helpers import examples
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import gatedprune as gp
import gatedprune.snap as snap_module
from gatedprune import Budget, gate_modules
from gatedprune.train import snap_to_budget


def _randomize(net: nn.Module, uniform: bool) -> None:
    """A random, unconverged gate state (as a training run stopped early leaves it), drawn
    from the global RNG (seeded before the network is built, as in the reproducers)."""
    with torch.no_grad():
        for g in gate_modules(net):
            assert isinstance(g, gp.HardConcreteGate)
            if uniform:
                g.log_alpha.uniform_(-3, 3)
            else:
                g.log_alpha.normal_(float(torch.empty(()).uniform_(-3, 3)), 2.0)


def _decisions(net: nn.Module) -> list[list[bool]]:
    return [g.is_open().reshape(-1).tolist() for g in gate_modules(net)]


def _inside(
    c: dict[str, float],
    targets: dict[str, float],
    tol: float,
    at_most: bool = True,
    primary: str | None = None,
) -> bool:
    """The snap's window: under every ceiling (``tol`` above it without ``at_most``) and a
    binding target (``primary``, else any) at most ``tol`` below its target."""
    above = 0.0 if at_most else tol
    binding = targets if primary is None else {primary: targets[primary]}
    under = all(c[k] <= t + above for k, t in targets.items())
    return under and any(c[k] >= t - tol for k, t in binding.items())


def _swaps(budget: Budget) -> Iterator[dict[str, float]]:
    """The cost fractions after every single swap (open one closed gate or group, close one
    open one) from the current decisions; the gates are left as they were."""
    gates = gate_modules(budget.model)
    slots = [(g, j) for g in gates for j in range(0, g.n, g.group)]

    def put(g: gp.Gate, j: int, is_open: bool) -> None:
        mask = g.is_open().reshape(-1).clone()
        mask[j : j + g.group] = is_open
        g.force_(mask)

    closed = [s for s in slots if not bool(s[0].is_open().reshape(-1)[s[1]])]
    opened = [s for s in slots if bool(s[0].is_open().reshape(-1)[s[1]])]
    for a in closed:
        put(*a, True)
        for b in opened:
            put(*b, False)
            yield {k: float(v) for k, v in budget.fractions(hard=True).items()}
            put(*b, True)
        put(*a, False)


def _without_swaps(mp: pytest.MonkeyPatch, budget: Budget, **kwargs: object) -> dict[str, float]:
    """The snap as it was before the swap search (patched where the snap looks it up: a
    missing name raises, so the patch cannot silently do nothing)."""
    with mp.context() as m:
        m.setattr(snap_module, "_swap_search", lambda *a: a[5])  # a[5]: current
        return snap_to_budget(budget, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [33, 1, 16])
def test_the_readme_architecture_lands_in_the_window(seed: int) -> None:
    """ShortcutMLP(20, [32, 32], 4), random gates, 0.5 FLOPs: the snap ended at 0.4852 /
    0.4878 / 0.4882 although 38 single swaps land in [0.49, 0.50]."""
    torch.manual_seed(seed)
    net = gp.ShortcutMLP(20, [32, 32], 4)
    _randomize(net, uniform=True)
    twin = copy.deepcopy(net)
    budget = Budget(net, torch.zeros(1, 20), flops=0.5)
    got = snap_to_budget(budget)
    assert 0.49 <= got["flops"] <= 0.5, got
    assert got == budget.achieved()
    assert snap_to_budget(budget) == got  # snapping twice changes nothing
    again = Budget(twin, torch.zeros(1, 20), flops=0.5)
    assert snap_to_budget(again) == got  # deterministic
    assert _decisions(twin) == _decisions(net)


@pytest.mark.parametrize(("seed", "uniform"), [(14, False), (31, True), (39, True)])
def test_three_flips_land_in_the_window_when_no_swap_does(seed: int, uniform: bool) -> None:
    """ShortcutMLP(6, [8, 8], 5) at 0.5 FLOPs: no single swap from where the compound moves
    end (0.487) lands in [0.49, 0.50]; opening one gate and closing two, or the reverse, does."""
    torch.manual_seed(seed)
    net = gp.ShortcutMLP(6, [8, 8], 5)
    _randomize(net, uniform)
    before = copy.deepcopy(net)
    budget = Budget(before, torch.zeros(1, 6), flops=0.5)
    mp = pytest.MonkeyPatch()
    with mp.context() as m:  # no three-flip moves: the swaps alone
        m.setattr(snap_module, "_TRIPLE_EVALS", 0)
        assert snap_to_budget(budget)["flops"] < 0.49
    got = snap_to_budget(Budget(net, torch.zeros(1, 6), flops=0.5))
    assert 0.49 <= got["flops"] <= 0.5, got


_MLP6 = ("mlp6", {"flops": 0.5}, None)


@pytest.mark.parametrize(
    ("kind", "limits", "primary", "seed", "uniform"),
    [
        (*_MLP6, 3, True),
        (*_MLP6, 6, True),
        (*_MLP6, 7, True),
        ("mlp6", {"flops": 0.25}, None, 1, False),
        ("mlp6", {"flops": 0.25}, None, 13, True),
        ("mlp6", {"flops": 0.5, "params": 0.55}, "flops", 8, True),
        ("grouped", {"flops": 0.5}, None, 13, False),
        ("grouped", {"flops": 0.5}, None, 21, True),
    ],
)
def test_where_a_swap_reaches_the_window_the_snap_does(
    kind: str, limits: dict[str, float], primary: str | None, seed: int, uniform: bool
) -> None:
    """ShortcutMLP(6, [8, 8], 5) (17 of 40 snaps at 0.5 FLOPs, 24 of 40 at 0.25 ended more
    than 0.01 below) and one gated in groups of 4 units: the greedy and the compound moves end
    below the window, a single swap from there lands in it, and the snap now does."""

    def build() -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(seed)
        if kind == "mlp6":
            net: nn.Module = gp.ShortcutMLP(6, [8, 8], 5)
        else:
            net = gp.ShortcutMLP(8, [16, 12], 3, unit_group=4)
        _randomize(net, uniform)
        return net, torch.zeros(1, 6 if kind == "mlp6" else 8)

    net, x = build()
    old_budget = Budget(net, x, **limits)  # type: ignore[arg-type]
    old = _without_swaps(pytest.MonkeyPatch(), old_budget, primary=primary)
    assert not _inside(old, limits, 0.01, primary=primary)
    assert any(_inside(c, limits, 0.01, primary=primary) for c in _swaps(old_budget))
    net, x = build()
    budget = Budget(net, x, **limits)  # type: ignore[arg-type]
    got = snap_to_budget(budget, primary=primary)
    assert _inside(got, limits, 0.01, primary=primary), (old, got)
    assert got == budget.achieved()
    assert snap_to_budget(budget, primary=primary) == got  # snapping twice changes nothing


@st.composite
def _small_nets(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """Small ShortcutMLPs (some with units gated in groups of 4) and ShortcutConv1ds, at
    most 32 gates and groups (so every swap is among the search's candidates), with a random
    gate state."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["mlp", "mlp6", "mlp6", "grouped", "conv"]))
    net: nn.Module
    if kind == "mlp":
        n_in = draw(st.integers(2, 10))
        widths = draw(st.lists(st.integers(2, 12), min_size=1, max_size=2))
        net, x = gp.ShortcutMLP(n_in, widths, draw(st.integers(1, 5))), torch.zeros(1, n_in)
    elif kind == "mlp6":  # 17 of 40 snaps at 0.5 FLOPs ended more than 0.01 below
        net, x = gp.ShortcutMLP(6, [8, 8], 5), torch.zeros(1, 6)
    elif kind == "grouped":
        widths = [4 * draw(st.integers(1, 6)) for _ in range(draw(st.integers(1, 3)))]
        net, x = gp.ShortcutMLP(8, widths, 3, unit_group=4), torch.zeros(1, 8)
    else:
        first = draw(st.lists(st.integers(2, 7), min_size=1, max_size=2))
        stages = [first, [draw(st.integers(2, 7))]]
        net = gp.ShortcutConv1d(1, stages, 3, input_length=16)
        x = torch.zeros(1, 1, 16)
    assert sum(g.n // g.group for g in gate_modules(net)) <= 32
    _randomize(net, uniform=draw(st.booleans()))
    return net, x


def _limits(draw: st.DrawFn) -> tuple[dict[str, float], str | None]:
    target = draw(st.sampled_from([0.1, 0.25, 0.4, 0.5, 0.5, 0.7]))
    if draw(st.booleans()):
        return {"flops": target}, None
    other = min(1.0, target * draw(st.sampled_from([0.9, 1.1, 1.5])))
    return {"flops": target, "params": other}, draw(st.sampled_from([None, "flops"]))


@settings(max_examples=examples(60), deadline=None)
@given(net_x=_small_nets(), data=st.data(), tol=st.sampled_from([0.01, 0.02]))
def test_a_swap_that_reaches_the_window_is_found(
    net_x: tuple[nn.Module, torch.Tensor], data: st.DataObject, tol: float
) -> None:
    net, x = net_x
    limits, primary = _limits(data.draw)
    at_most = data.draw(st.booleans())
    old_net = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a target below the floor
        old_budget = Budget(old_net, x, **limits)  # type: ignore[arg-type]
        budget = Budget(net, x, **limits)  # type: ignore[arg-type]
    kwargs = {"tolerance": tol, "at_most": at_most, "primary": primary}
    old = _without_swaps(pytest.MonkeyPatch(), old_budget, **kwargs)
    got = snap_to_budget(budget, **kwargs)  # type: ignore[arg-type]
    assert got == budget.achieved()
    reachable = {k: t for k, t in limits.items() if t > budget.floor[k]}  # else: the floor
    if at_most:
        assert all(got[k] <= t for k, t in reachable.items()), (got, limits)  # ceilings
    if _inside(old, limits, tol, at_most, primary):
        event("the greedy lands in the window")
        assert _decisions(net) == _decisions(old_net)  # the greedy's decisions are kept
    elif any(_inside(c, limits, tol, at_most, primary) for c in _swaps(old_budget)):
        # the search finds most such swaps, not all: it only reopens gates whose opening
        # alone reaches the window and closes gates whose closing alone saves cost, which
        # misses swaps whose two flips interact (a closing that saves only once the other
        # gate is open); it never ends further from the window than the greedy
        found = _inside(got, limits, tol, at_most, primary)
        event("a swap lands in the window: " + ("found" if found else "missed"))
        if not found:
            assert got == old, (old, got, limits)
    above = 0.0 if at_most else tol
    if all(got[k] <= t + above for k, t in limits.items()):  # snapping twice changes nothing
        assert snap_to_budget(budget, **kwargs) == got  # type: ignore[arg-type]


@settings(max_examples=examples(20), deadline=None)
@given(
    seed=st.integers(0, 2**16),
    wide=st.booleans(),
    target=st.floats(0.1, 0.9),
    round_to=st.sampled_from([None, 8]),
)
def test_decisions_in_the_window_are_unchanged(
    seed: int, wide: bool, target: float, round_to: int | None
) -> None:
    """Where the snap without the swap search ends in the window it returns the same
    decisions; with ``round_to`` (its own pair moves, no swaps) it always does."""
    torch.manual_seed(seed)
    net = gp.ShortcutMLP(16, [24, 24, 24], 4) if wide else gp.ShortcutMLP(8, [16, 8], 3)
    x = torch.zeros(1, 16 if wide else 8)
    _randomize(net, uniform=seed % 2 == 1)
    old_net = copy.deepcopy(net)
    old = _without_swaps(pytest.MonkeyPatch(), Budget(old_net, x, flops=target), round_to=round_to)
    got = snap_to_budget(Budget(net, x, flops=target), round_to=round_to)
    if round_to is not None or _inside(old, {"flops": target}, 0.01):
        event("kept: in the window, or rounded")
        assert got == old
        assert _decisions(net) == _decisions(old_net)


def test_the_swap_search_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no window to land in (tolerance 0), the search evaluates at most the candidates'
    single flips, every swap between them and the three-flip budget."""
    torch.manual_seed(0)
    net = gp.ShortcutMLP(16, [64, 64, 64], 4)
    _randomize(net, uniform=True)
    budget = Budget(net, torch.zeros(1, 16), flops=0.37)
    state = {"searches": 0, "searching": False, "evaluations": 0}
    search, achieved = snap_module._swap_search, snap_module._Decisions.achieved

    def counted_search(*args: object) -> dict[str, float]:
        state["searches"] += 1
        state["searching"] = True
        try:
            return search(*args)  # type: ignore[arg-type]
        finally:
            state["searching"] = False

    def counted(self: snap_module._Decisions) -> dict[str, float]:
        state["evaluations"] += state["searching"]
        return achieved(self)

    monkeypatch.setattr(snap_module, "_swap_search", counted_search)
    monkeypatch.setattr(snap_module._Decisions, "achieved", counted)
    got = snap_to_budget(budget, tolerance=0.0)
    assert got["flops"] <= 0.37
    assert state["searches"] == 1
    k = snap_module._SWAP_CANDIDATES
    bound = 2 * snap_module._SWAP_SCAN + k * k + snap_module._TRIPLE_EVALS
    assert 0 < state["evaluations"] <= bound


def _net_and_budget(**limits: float) -> tuple[nn.Module, Budget]:
    torch.manual_seed(0)
    net = gp.ShortcutMLP(8, [16, 16], 3)
    _randomize(net, uniform=True)
    return net, Budget(net, torch.zeros(1, 8), **limits)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tolerance", "match"),
    [
        (5, r"below the target .* \(flops=0\.5\), got 5"),
        (0.5, r"below the target .* \(flops=0\.5\), got 0\.5"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (-0.01, ">= 0"),
    ],
)
def test_tolerance_must_lie_below_the_target(tolerance: float, match: str) -> None:
    """snap_to_budget(tolerance=5) at a 0.5 target accepted any decisions under the ceiling
    (it ended at 0.27)."""
    net, budget = _net_and_budget(flops=0.5)
    before = _decisions(net)
    with pytest.raises(ValueError, match=match):
        snap_to_budget(budget, tolerance=tolerance)
    assert _decisions(net) == before  # refused before any gate changes
    assert 0.5 - 0.49 <= snap_to_budget(budget, tolerance=0.49)["flops"] <= 0.5


def test_the_tolerance_bound_is_the_target_the_snap_must_reach() -> None:
    """Without ``primary`` every target may be the binding one: the smallest bounds the
    tolerance; with ``primary`` its target does."""
    _, budget = _net_and_budget(flops=0.5, params=0.3)
    with pytest.raises(ValueError, match=r"\(params=0\.3\), got 0\.4"):
        snap_to_budget(budget, tolerance=0.4)
    with pytest.raises(ValueError, match=r"\(params=0\.3\), got 0\.3"):
        snap_to_budget(budget, tolerance=0.3, primary="params")
    got = snap_to_budget(budget, tolerance=0.4, primary="flops")
    assert got["flops"] <= 0.5
    assert got["params"] <= 0.3


def test_a_target_at_or_below_the_floor_takes_any_tolerance() -> None:
    """No decisions reach such a target: the snap ends at the floor whatever the tolerance
    (the default 0.01 is above a 1e-4 target)."""
    net = gp.ShortcutMLP(12, [16, 16, 16], 3)
    with pytest.warns(UserWarning, match="below the smallest reachable fraction"):
        budget = Budget(net, torch.zeros(1, 12), flops=1e-4)
    assert snap_to_budget(budget, tolerance=0.5) == budget.floor
