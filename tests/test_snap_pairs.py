"""snap_to_budget(round_to=...) pair moves: when no single width step fits under the ceiling
and the cost is still below the window, one width grows a step while another shrinks one."""

from __future__ import annotations

import warnings

import pytest
import torch
from gating_helpers import examples
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gatedprune as gp
import gatedprune.snap as snap_module
from gatedprune.gates import HardConcreteGate
from gatedprune.train import snap_to_budget


def _net(seed: int, conv: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if conv:
        net: nn.Module = gp.ShortcutConv1d(1, [[32, 48], [64]], 4)
        x = torch.zeros(1, 1, 16)  # (B, C, L)
    else:
        net = gp.ShortcutMLP(8, [64, 48, 32], 4)
        x = torch.zeros(1, 8)  # (B, F)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, HardConcreteGate):
                m.log_alpha.copy_(torch.randn(m.log_alpha.shape, generator=gen) * 3)
    return net, x


def _snap(
    seed: int,
    conv: bool,
    target: float,
    pairs: bool,
    mp: pytest.MonkeyPatch,
    fill: bool = True,
    in_property: bool = False,
) -> float:
    net, x = _net(seed, conv)
    with mp.context() as m:
        if not pairs:
            m.setattr(snap_module, "_best_pair", lambda *a, **k: None)
        if not fill:  # no reopening of single gates after the rounding (nor in the rounds)
            m.setattr(
                snap_module,
                "_fill",
                lambda budget, *a: {k: float(v) for k, v in budget.fractions(hard=True).items()},
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a target near the floor
            budget = gp.Budget(net, x, flops=target)
        first = snap_to_budget(budget, round_to=16)["flops"]
        if fill:
            assert snap_to_budget(budget, round_to=16)["flops"] == first  # idempotent
    assert first <= target  # a ceiling
    counts = [int(layer.unit_gate.is_open().sum()) for layer in net.layers]  # type: ignore[attr-defined]
    full = [layer.unit_gate.n for layer in net.layers]  # type: ignore[attr-defined]
    rounded = all(k in (0, n) or k % 16 == 0 for k, n in zip(counts, full, strict=True))
    # the documented exception: where the rounded widths cannot meet the target, the snap keeps
    # the unrounded decisions (tests/test_train.py tests it); no pair move is involved then
    if in_property:
        assume(rounded)
    else:
        assert rounded
    return first


def test_a_pair_move_brings_a_rounded_snap_into_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pair moves this net ends 0.046 below a 0.5 FLOPs target (the single 16-channel
    steps left all overshoot it); with them 0.016 below."""
    single = _snap(0, True, 0.5, pairs=False, mp=monkeypatch)
    paired = _snap(0, True, 0.5, pairs=True, mp=monkeypatch)
    assert 0.5 - single > 0.04
    assert 0.5 - paired <= 0.02


@settings(max_examples=examples(10))
@given(seed=st.integers(0, 1000), conv=st.booleans(), target=st.sampled_from([0.3, 0.5, 0.7]))
def test_pair_moves_never_leave_the_rounding_further_from_the_target(
    seed: int, conv: bool, target: float
) -> None:
    """The rounding alone (no single-gate fill afterwards, which depends on the room left):
    pair moves only start where single steps stop, and each one raises the cost under the
    ceiling. The full snap (fill included) keeps its ceiling, rounding and idempotence."""
    mp = pytest.MonkeyPatch()
    try:
        single = _snap(seed, conv, target, pairs=False, mp=mp, fill=False, in_property=True)
        paired = _snap(seed, conv, target, pairs=True, mp=mp, fill=False, in_property=True)
        _snap(seed, conv, target, pairs=True, mp=mp, in_property=True)
    finally:
        mp.undo()
    assert paired >= single
