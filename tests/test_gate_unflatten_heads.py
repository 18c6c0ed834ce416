"""gate_ on attention that splits its heads with ``unflatten(-1, (heads, head_size))``: the
heads are gated and pruned, the pruned code's ``unflatten`` sizes rewritten; a dimension
counted from the front is left ungated with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import examples, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate_hand_attention import _check
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import gate_


class UnflattenAttention(nn.Module):
    def __init__(self, d: int, heads: int, head_size: int, form: str) -> None:
        super().__init__()
        self.heads, self.head_size, self.form = heads, head_size, form
        self.q, self.k, self.v = (nn.Linear(d, heads * head_size) for _ in range(3))
        self.proj = nn.Linear(heads * head_size, d)

    def split(self, t: Tensor) -> Tensor:
        if self.form == "method":
            return t.unflatten(-1, (self.heads, self.head_size)).transpose(1, 2)  # (B, H, T, D)
        if self.form == "function":
            return torch.unflatten(t, -1, (self.heads, -1)).transpose(1, 2)  # (B, H, T, D)
        return t.unflatten(2, (self.heads, self.head_size)).transpose(1, 2)  # "front"

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).flatten(-2))  # (B, T, d)


class Net(nn.Module):
    def __init__(self, heads: int, head_size: int, form: str) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = UnflattenAttention(8, heads, head_size, form)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, T, 8)
        return self.head((h + self.attn(h)).mean(1))  # (B, 2)


def _heads(model: nn.Module, heads: int) -> list[int]:
    summary = inserted_gating(model).summary
    return [i for i in summary.head_groups if summary.channel_groups[i][1] == heads]


@pytest.mark.parametrize("form", ["method", "function"])
def test_unflatten_heads_are_pruned(form: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=gen)
    model = Net(4, 3, form).eval()
    dense = gp.cost(model, x)
    assert isinstance(dense, Cost)
    gate_(model, x, blocks=False)
    groups = _heads(model, 4)
    assert len(groups) == 1
    gating = inserted_gating(model)
    for gate in gating.group_gates:
        gate.force_(torch.ones(gate.n, dtype=torch.bool))  # type: ignore[operator]
    gating.group_gates[groups[0]].force_(torch.tensor([False, True, False, True]))  # type: ignore[operator]
    pruned = _check(model, lambda: Net(4, 3, form), x, gen)
    assert pruned.get_submodule("attn.proj").in_features == 6  # 2 heads of 3
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert c.flops < dense.flops


@settings(max_examples=examples(10), deadline=None)
@given(heads=st.integers(2, 4), head_size=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_random_unflatten_gate_states_prune_exactly(heads: int, head_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, generator=gen)
    model = Net(heads, head_size, "method")
    gate_(model, x)
    with torch.no_grad():
        for gate in [*inserted_gating(model).group_gates, *inserted_gating(model).block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)
    _check(model, lambda: Net(heads, head_size, "method"), x, gen)


def test_unflatten_from_the_front_is_left_ungated_with_the_reason() -> None:
    model, x = Net(2, 3, "front"), torch.randn(2, 5, 3)
    summary = gate_(model, x)
    reasons = [why for _, _, why in summary.ungated_groups]
    assert any("unflattens a dimension counted from the front" in why for why in reasons)
    assert _heads(model, 2) == []
    model.eval()
    with torch.no_grad():
        assert (gp.prune(model)(x) - model(x)).abs().max().item() <= 1e-5
