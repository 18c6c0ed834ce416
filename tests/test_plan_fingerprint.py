"""An exported plan names the dense model it came from (modules, tensors, traced code) and
carries a checksum of its content: ``apply_plan`` refuses another model, or a plan edited
since, before changing anything; a plan written by hand (neither) is checked as before, and
refused before the model changes when a size or recurrent entry does not fit."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from gating_helpers import assert_state_unchanged, inserted_gating, state_copy
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import apply_plan, export_plan, gate_


class Attention(nn.Module):
    """Hand-written attention whose head count is a Python int in ``forward``: 4 and 2 heads
    have the same parameters."""

    def __init__(self, heads: int, act: str = "relu") -> None:
        super().__init__()
        self.h, self.act = heads, act
        self.qkv, self.o, self.head = nn.Linear(12, 36), nn.Linear(12, 12), nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)  # (B, T, C) each
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        h = self.o(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)
        h = torch.relu(h) if self.act == "relu" else torch.tanh(h)
        return self.head(h).mean(1)  # (B, 2)


def _plan(model: nn.Module, x: Tensor) -> dict[str, Any]:
    gate_(model, x)
    gating = inserted_gating(model)
    for gate in gating.group_gates:
        mask = torch.ones(gate.n, dtype=torch.bool)
        mask[0] = False
        gate.force_(mask)  # type: ignore[operator]
    model.eval()
    return json.loads(json.dumps(export_plan(model)))


def _intact(model: nn.Module, before: dict[str, Tensor], text: str) -> None:
    assert repr(model) == text
    assert_state_unchanged(model, before)


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (lambda: Attention(2), "forward code differs"),  # same tensors, another head count
        (lambda: Attention(4, act="tanh"), "forward code differs"),  # another activation
        (lambda: nn.Sequential(nn.Linear(12, 2)), "exported from another model"),
    ],
)
def test_a_plan_is_refused_for_another_model(other: Any, match: str) -> None:
    # before 2026-12-07: the 2-head model took the 4-head plan and failed at its first forward,
    # the tanh model took it and silently computed something else
    x = torch.randn(2, 5, 12)
    plan = _plan(Attention(4), x)
    model = other()
    before, text = state_copy(model), repr(model)
    with pytest.raises(ValueError, match=match):
        apply_plan(model, plan)
    _intact(model, before, text)
    apply_plan(Attention(4), plan)  # the model it came from takes it


def test_a_transformer_plan_is_refused_for_another_activation() -> None:
    def encoder(act: str) -> nn.Module:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, activation=act)
        return nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))

    x = torch.randn(2, 5, 8)
    model = encoder("relu")
    gate_(model, x)
    gating = inserted_gating(model)
    for gate in gating.group_gates:
        gate.force_(torch.arange(gate.n) > 0)  # type: ignore[operator]
    plan = json.loads(json.dumps(export_plan(model.eval())))
    with pytest.raises(ValueError, match="activation"):
        apply_plan(encoder("gelu"), plan)
    apply_plan(encoder("relu"), plan)


def test_an_edited_plan_is_refused_and_a_hand_written_one_is_checked() -> None:
    x = torch.randn(2, 5, 12)
    plan = _plan(Attention(4), x)
    edited = copy.deepcopy(plan)
    edited["sizes"].clear()  # would give a model that fails at its first forward
    model = Attention(4)
    before, text = state_copy(model), repr(model)
    with pytest.raises(ValueError, match="changed after export_plan wrote it"):
        apply_plan(model, edited)
    _intact(model, before, text)
    # without its checksum: a plan written by hand, applied after the usual checks
    hand = {k: v for k, v in plan.items() if k != "checksum"}
    pruned = apply_plan(Attention(4), hand)
    assert isinstance(pruned, nn.Module)


def test_a_bad_size_entry_is_refused_before_the_model_changes() -> None:
    # before: the model's Linear layers were already sliced when the size was found not to fit
    x = torch.randn(2, 5, 12)
    plan = _plan(Attention(4), x)
    hand = {k: v for k, v in plan.items() if k != "checksum"}
    name = next(iter(hand["sizes"]))
    for bad in ([[99, 3]], [["x", 3]], [[-2, 0]], "no"):
        hand["sizes"] = {name: bad}
        model = Attention(4)
        before, text = state_copy(model), repr(model)
        with pytest.raises(ValueError, match=name):
            apply_plan(model, hand)
        _intact(model, before, text)


class TwoLSTMs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.LSTM(3, 6, batch_first=True)
        self.b = nn.LSTM(6, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.b(self.a(x)[0])[0]).mean(1)  # (B, 2)


def test_unequal_recurrent_unit_counts_are_refused_before_the_model_changes() -> None:
    # before: the first LSTM was sliced, then the second entry raised
    x = torch.randn(2, 4, 3)
    model = TwoLSTMs()
    gate_(model, x)
    gating = inserted_gating(model)
    for gate in gating.group_gates:
        gate.force_(torch.arange(gate.n) % 3 > 0)  # type: ignore[operator]
    plan = json.loads(json.dumps(export_plan(model.eval())))
    hand = {k: v for k, v in plan.items() if k != "checksum"}
    hand["rnn"]["b"]["units"][0] = hand["rnn"]["b"]["units"][0][:-1]
    fresh = TwoLSTMs()
    before, text = state_copy(fresh), repr(fresh)
    with pytest.raises(ValueError, match="same number"):
        apply_plan(fresh, hand)
    _intact(fresh, before, text)
    del hand["rnn"]["b"]["units"]
    with pytest.raises(ValueError, match="has no 'units'"):
        apply_plan(TwoLSTMs(), hand)


def test_the_pruned_weights_load_into_the_replayed_plan() -> None:
    x = torch.randn(2, 5, 12)
    model = Attention(4)
    plan = _plan(model, x)
    assert isinstance(plan["checksum"], str)
    assert {"modules", "parameters", "buffers", "graph"} <= set(plan["model"])
    pruned = gp.prune(model)
    fresh = apply_plan(Attention(4), plan)
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert (fresh(x) - model(x)).abs().max().item() <= 1e-5


class ShowsItsFunction(nn.Module):
    """A module whose ``extra_repr`` prints an object (with its memory address)."""

    def __init__(self) -> None:
        super().__init__()
        self.fn = lambda t: t * 2.0
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def extra_repr(self) -> str:
        return f"fn={self.fn}"

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x)))  # (B, 2)


def test_a_fresh_instance_printing_an_object_takes_the_plan() -> None:
    # the printed address differs between instances: not part of the fingerprint
    x = torch.randn(4, 3)
    model = ShowsItsFunction()
    gate_(model, x)
    for gate in inserted_gating(model).group_gates:
        gate.force_(torch.arange(gate.n) % 2 == 0)  # type: ignore[operator]
    plan = json.loads(json.dumps(export_plan(model.eval())))
    fresh = apply_plan(ShowsItsFunction(), plan)
    fresh.load_state_dict(gp.prune(model).state_dict())
    fresh.eval()
    with torch.no_grad():
        assert (fresh(x) - model(x)).abs().max().item() <= 1e-5
