"""A layer whose weight is computed when it runs (a parametrization or the old weight_norm
pre-hook) added *after* gate_: prune must refuse it with a ValueError naming the layer.

Before 2026-12-07 21:00 UTC prune sliced or scaled the stored tensor: a layer that lost
channels was a bare KeyError from torch's parametrize ("attribute 'weight' already exists"),
one that only had gate values folded into it was silently wrong (pruned != gated), and one with
the old nn.utils.weight_norm hook gave a pruned model that failed at its first forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import gatedprune
from gatedprune import apply_plan
from gatedprune.gating.surgery import PLAN_FORMAT


class LoRA(nn.Module):
    """``w + A @ B``: a LoRA-style parametrization of a weight ``(out, in)``."""

    def __init__(self, out_f: int, in_f: int, r: int = 2) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(out_f, r) * 0.3)
        self.B = nn.Parameter(torch.randn(r, in_f) * 0.3)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.A @ self.B  # (out, in)


class AddHalf(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + 0.5


def _old_weight_norm(lin: nn.Module) -> None:
    with warnings.catch_warnings():  # deprecated in favour of parametrizations.weight_norm
        warnings.simplefilter("ignore")
        nn.utils.weight_norm(lin)


def _old_spectral_norm(lin: nn.Module) -> None:
    nn.utils.spectral_norm(lin)


ADD: dict[str, Callable[[nn.Module], object]] = {
    "weight_norm": lambda lin: nn.utils.parametrizations.weight_norm(lin),
    "lora": lambda lin: parametrize.register_parametrization(lin, "weight", LoRA(32, 8)),
    "bias": lambda lin: parametrize.register_parametrization(lin, "bias", AddHalf()),
    "old_weight_norm": _old_weight_norm,
    "old_spectral_norm": _old_spectral_norm,
}


def _gated() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(16, 8)
    gatedprune.gate_(net, x)
    return net, x


@pytest.mark.parametrize("kind", list(ADD))
@pytest.mark.parametrize("sliced", [True, False])
def test_parametrization_after_gate_is_a_clear_error(kind: str, sliced: bool) -> None:
    net, x = _gated()
    ADD[kind](net[0])
    gate = net.gatedprune.group_gates[0]
    if sliced:  # 8 channels closed: layer 0 loses output channels
        gate.force_(torch.arange(32) >= 8)
    else:  # every channel open, gate values strictly inside (0, 1): only folded
        with torch.no_grad():
            gate.log_alpha.copy_(torch.linspace(-1.0, 3.0, 32))
    budget = gatedprune.Budget(net, x[:1], flops=0.5)
    (net(x).square().mean() + budget.penalty()).backward()  # training still works
    attr = "bias" if kind == "bias" else "weight"
    with pytest.raises(ValueError, match=rf"module '0' \(.*\): it computes '{attr}' when it runs"):
        gatedprune.prune(net.eval())


def test_error_says_what_to_do() -> None:
    net, _ = _gated()
    ADD["lora"](net[0])
    with pytest.raises(ValueError, match="computes 'weight'") as info:
        gatedprune.prune(net.eval())
    text = str(info.value)
    assert "add parametrizations before gate_" in text
    assert "remove_parametrizations(module, name, leave_parametrized=True)" in text


def test_removing_it_first_prunes_exactly() -> None:
    """The workaround the error names: bake the parametrization in, then prune."""
    net, x = _gated()
    ADD["lora"](net[0])
    with torch.no_grad():
        net.gatedprune.group_gates[0].log_alpha.copy_(torch.linspace(-1.0, 3.0, 32))
        net.gatedprune.group_gates[0].log_alpha[:8] = -30.0  # closed
    net.eval()
    with torch.no_grad():
        before = net(x)
    parametrize.remove_parametrizations(net[0], "weight", leave_parametrized=True)
    small = gatedprune.prune(net)
    assert small[0].out_features == 24
    with torch.no_grad():
        assert (small(x) - before).abs().max().item() <= 1e-5


class ParamNet(nn.Module):
    """A linear map written with the model's own parameters: gate_ parametrizes W1 itself."""

    def __init__(self) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(8, 32) * 0.3)
        self.W2 = nn.Parameter(torch.randn(32, 4) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W1) @ self.W2  # (B, 4)


@pytest.mark.parametrize("sliced", [True, False])
def test_parametrization_on_a_gated_parameter_is_refused(sliced: bool) -> None:
    """A parametrization the user adds to W1 after gate_ joins gate_'s own on it: prune would
    remove both (before: pruned != gated by 2.5, silently)."""
    torch.manual_seed(0)
    net = ParamNet()
    x = torch.randn(16, 8)
    gatedprune.gate_(net, x)
    parametrize.register_parametrization(net, "W1", AddHalf())
    gate = net.gatedprune.group_gates[0]
    if sliced:
        gate.force_(torch.arange(32) >= 8)
    else:
        with torch.no_grad():
            gate.log_alpha.copy_(torch.linspace(-1.0, 3.0, 32))
    with pytest.raises(ValueError, match=r"module '<root>' .*computes 'W1'") as info:
        gatedprune.prune(net.eval())
    # removing it would bake gate_'s own gate into W1 as well: not suggested here
    assert "remove_parametrizations" not in str(info.value)


def test_untouched_parametrized_layer_still_prunes() -> None:
    """Only layers prune slices or folds into are refused: a weight-normed read-out behind a
    LayerNorm (which keeps the channels before it whole) is left as it is."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 4)
    )
    x = torch.randn(16, 8)
    gatedprune.gate_(net, x)
    nn.utils.parametrizations.weight_norm(net[4])
    net.gatedprune.group_gates[0].force_(torch.arange(32) >= 8)
    net.eval()
    small = gatedprune.prune(net)
    assert small[0].out_features == 24
    assert parametrize.is_parametrized(small[4], "weight")
    with torch.no_grad():
        assert (small(x) - net(x)).abs().max().item() <= 1e-5


def test_apply_plan_refuses_a_parametrized_module() -> None:
    """apply_plan onto a dense model whose sliced layer is parametrized: a ValueError naming
    it, and the model left as it was (before: torch's KeyError half-way through). Since
    2026-12-07 22:10 UTC weight_norm over the output channels (dim=0) is sliced (its g and v;
    tests/test_gate_weight_norm.py): weight_norm over the inputs is refused."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    nn.utils.parametrizations.weight_norm(net[0], dim=1)
    plan = {
        "format": PLAN_FORMAT,
        "opaque": {},
        "cut": {},
        "scopes": [],
        "erase": [],
        "slices": {
            "0": {"kind": "linear", "in": None, "out": [0, 1]},
            "2": {"kind": "linear", "in": [0, 1], "out": None},
        },
    }
    with pytest.raises(ValueError, match=r"cannot prune module '0' .*computes 'weight'"):
        apply_plan(net, plan)
    assert net[2].in_features == 8  # nothing changed
