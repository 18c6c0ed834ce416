"""Budget and Trainer options: None, bools and non-finite values where a number is required.

``target_start=None`` and a non-bool ``progress`` were accepted before; the sweeps over the
other options pin down what the audit found already refused (they guard against regressions).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gatedprune as gp
from gatedprune.train import Trainer


def _net() -> gp.ShortcutMLP:
    torch.manual_seed(0)
    return gp.ShortcutMLP(8, [8, 8], 3)


def test_target_start_none_is_refused() -> None:
    # before: None silently became 1.0 although the annotation says float
    with pytest.raises(TypeError, match=r"target_start must be a float in \(0, 1\], got None"):
        gp.Budget(_net(), torch.zeros(1, 8), flops=0.5, target_start=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error"),
    [(True, TypeError), ("0.5", TypeError), (math.nan, ValueError), (math.inf, ValueError),
     (0.0, ValueError), (1.5, ValueError)],
)  # fmt: skip
def test_target_start_bad_values(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="target_start"):
        gp.Budget(_net(), torch.zeros(1, 8), flops=0.5, target_start=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.5, 1.0, np.float32(0.75), 1])
def test_target_start_numbers_still_accepted(value: object) -> None:
    budget = gp.Budget(_net(), torch.zeros(1, 8), flops=0.25, target_start=value)  # type: ignore[arg-type]
    assert budget.target_start == pytest.approx(float(value))  # type: ignore[arg-type]
    assert isinstance(budget.target_start, float)


@pytest.mark.parametrize("name", ["flops", "params"])
@pytest.mark.parametrize("value", [True, math.nan, math.inf, -math.inf])
def test_targets_bool_and_non_finite(name: str, value: float) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        gp.Budget(_net(), torch.zeros(1, 8), **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["warmup_steps", "delay_steps"])
@pytest.mark.parametrize("value", [None, True, 2.0, math.nan])
def test_step_counts_must_be_ints(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"{name} must be an int"):
        gp.Budget(_net(), torch.zeros(1, 8), flops=0.5, **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, 1, "yes", math.nan])
def test_trainer_progress_must_be_a_bool(value: object) -> None:
    # before: any value was accepted and used for its truth value (nan, "no": a bar)
    with pytest.raises(TypeError, match=f"progress must be a bool, got {value!r}"):
        Trainer(_net(), progress=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["lr", "gate_lr", "budget_lr", "weight_decay", "snap_tolerance", "harden_at", "snap_at"],
)
@pytest.mark.parametrize("value", [True, math.nan, math.inf])
def test_trainer_numbers_refuse_bools_and_non_finite(name: str, value: object) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        Trainer(_net(), **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["epochs", "batch_size", "lr", "seed", "snap_tolerance"])
def test_trainer_required_numbers_refuse_none(name: str) -> None:
    with pytest.raises(TypeError, match=name):
        Trainer(_net(), **{name: None})  # type: ignore[arg-type]


def test_nan_gate_is_refused_by_the_hard_cost_and_the_budget_reports() -> None:
    # before: cost(hard=True) counted the NaN gate as some state and Budget.expected() gave nan
    net = gp.ShortcutLSTM(3, 4, 2, 2).eval()
    x = torch.randn(1, 5, 3)
    budget = gp.Budget(net, x, params=0.5)
    assert budget.expected()["params"] <= 1.0
    with torch.no_grad():
        net.unit_gates[1].log_alpha[2] = float("nan")
    match = r"gate parameter 'unit_gates.1.log_alpha' holds 1 NaN value\(s\)"
    with pytest.raises(ValueError, match=match):
        gp.cost(net, x, hard=True)
    with pytest.raises(ValueError, match=match):
        budget.expected()
    with pytest.raises(ValueError, match=match):
        budget.achieved()
    assert math.isnan(float(gp.cost(net, x).params.detach()))  # the expectation is not refused
