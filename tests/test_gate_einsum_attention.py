"""gate_ on attention written with torch.einsum: heads are gated and pruned whole as for
``q @ k^T`` (the equation names no sizes, so it stays as written), exact, cheaper, with the
einsum FLOPs in the expected and pruned costs; an einsum summing over the heads leaves them
ungated with the reason."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import examples, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate_hand_attention import _check, _head_groups
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import gate_

FORMS = {  # scores, weighted values, and whether q, k, v are (B, H, T, D) or (B, T, H, D)
    "bhqd": ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd", True),
    "ellipsis": ("...qd,...kd->...qk", "...qk,...kd->...qd", True),
    "bthd": ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", False),
}


class EinsumAttention(nn.Module):
    def __init__(self, d: int, heads: int, form: str) -> None:
        super().__init__()
        self.heads, self.form = heads, form
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        scores_eq, values_eq, transposed = FORMS[self.form]
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, T, C) each
        q = q.reshape(b, t, self.heads, -1)  # (B, T, H, D)
        k = k.reshape(b, t, self.heads, -1)  # (B, T, H, D)
        v = v.reshape(b, t, self.heads, -1)  # (B, T, H, D)
        if transposed:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        att = torch.einsum(scores_eq, q, k) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        y = torch.einsum(values_eq, F.softmax(att, dim=-1), v)  # (B, H, T, D) or (B, T, H, D)
        if transposed:
            y = y.transpose(1, 2)  # (B, T, H, D)
        return self.proj(y.reshape(b, t, c))  # (B, T, C)


class Net(nn.Module):
    def __init__(self, d: int, heads: int, form: str, n: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))
        self.attns = nn.ModuleList(EinsumAttention(d, heads, form) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, T, d)
        for norm, attn in zip(self.norms, self.attns, strict=True):
            h = h + attn(norm(h))  # (B, T, d)
        return self.head(h.mean(1))  # (B, 4)


def _attn_head_groups(model: nn.Module, heads: int) -> list[int]:
    summary = inserted_gating(model).summary
    return [
        i
        for i, (producers, size) in enumerate(summary.channel_groups)
        if size == heads and any("attns" in p for p in producers)
    ]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_einsum_attention_heads_are_pruned(form: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=gen)
    model = Net(16, 4, form).eval()
    dense = gp.cost(model, x)
    assert isinstance(dense, Cost)
    summary = gate_(model, x)
    groups = _attn_head_groups(model, 4)
    assert len(groups) == 2, str(summary)
    assert summary.head_groups == groups
    gating = inserted_gating(model)
    for gate in gating.group_gates:
        gate.force_(torch.ones(gate.n, dtype=torch.bool))  # type: ignore[operator]
    assert float(gp.cost(model, x, hard=True).flops) == dense.flops  # einsums counted alike
    gating.group_gates[groups[0]].force_(torch.tensor([True, False, True, False]))  # type: ignore[operator]
    gating.group_gates[groups[1]].force_(torch.tensor([False, False, False, True]))  # type: ignore[operator]
    pruned = _check(model, lambda: Net(16, 4, form), x, gen)
    assert pruned.get_submodule("attns.0.proj").in_features == 8  # 2 heads of 4
    assert pruned.get_submodule("attns.1.proj").in_features == 4
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert c.flops < dense.flops
    assert c.params < dense.params


@settings(max_examples=examples(15), deadline=None)
@given(
    heads=st.integers(2, 4),
    head_dim=st.integers(1, 3),
    form=st.sampled_from(sorted(FORMS)),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_einsum_attention_and_gate_states_prune_exactly(
    heads: int, head_dim: int, form: str, seed: int
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    d = heads * head_dim
    x = torch.randn(2, 5, 3, generator=gen)
    model = Net(d, heads, form)
    gate_(model, x)
    with torch.no_grad():
        for gate in [*inserted_gating(model).group_gates, *inserted_gating(model).block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)
    _check(model, lambda: Net(d, heads, form), x, gen)


class SumsHeads(nn.Module):
    """Scores summed over the heads (``bhqd,bhkd->bqk``): the heads cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, 2, 4).transpose(1, 2)  # (B, H, T, D)
        att = torch.einsum("bhqd,bhkd->bqk", q, q).softmax(-1)  # (B, T, T)
        return torch.einsum("bqk,bkc->bqc", att, self.v(x))  # (B, T, C)


def test_an_einsum_over_the_heads_leaves_them_ungated() -> None:
    model, x = SumsHeads(), torch.randn(2, 5, 8)
    summary = gate_(model, x)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert "contracts or keeps labelled channels" in reasons["q"]
    assert _head_groups(model, 2) == []
    model.eval()
    with torch.no_grad():
        assert (gp.prune(model)(x) - model(x)).abs().max().item() <= 1e-5
