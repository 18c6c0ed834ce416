"""gate_ on LLaMA-style attention whose rotary position embeddings (RoPE) split each head's
``head_dim`` in two: ``x1, x2 = x.chunk(2, dim=-1)``, ``torch.split(x, hd // 2, dim=-1)`` or
``x.split(hd // 2, dim=-1)``, then ``torch.cat((-x2, x1), dim=-1)`` (Hugging Face's
``rotate_half``); interleaved pairs (``x1, x2 = x.unflatten(-1, (hd // 2, 2)).unbind(-1)``,
``torch.stack((-x2, x1), -1).flatten(-2)``); or Meta's complex form (``torch.view_as_complex``
of q reshaped to ``(..., hd / 2, 2)``, times a complex ``freqs_cis`` buffer,
``torch.view_as_real(...).flatten(3).type_as(q)``). The split is along ``head_dim``, not the
heads, so each piece carries the heads: q, k and v get one gate per head (per key/value head
with grouped-query attention, per query head with multi-query attention), and ``prune``
removes closed heads exactly, the split's sizes left as written."""

from __future__ import annotations

import json
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_

FORMS = ["chunk", "torch_split", "split_method", "interleaved", "complex"]
D_MODEL = 16
MAX_T = 32


class RopeAttention(nn.Module):
    """Causal self-attention with ``heads`` query heads and ``kv`` key/value heads of
    ``head_dim`` (q, k, v, o Linears without bias), RoPE on q and k in the given ``form``;
    k and v repeated for the query heads as Hugging Face's ``repeat_kv`` (sizes written out)
    when ``kv < heads``; SDPA."""

    def __init__(self, heads: int = 4, kv: int = 4, head_dim: int = 4, form: str = "chunk"):
        super().__init__()
        self.h, self.kv, self.hd, self.form = heads, kv, head_dim, form
        self.q_proj = nn.Linear(D_MODEL, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(D_MODEL, kv * head_dim, bias=False)
        self.v_proj = nn.Linear(D_MODEL, kv * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, D_MODEL, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (D / 2,)
        freqs = torch.outer(torch.arange(MAX_T).float(), inv)  # (T, D / 2)
        emb = torch.cat([freqs, freqs], -1)  # (T, D)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        cis = torch.polar(torch.ones_like(freqs), freqs)  # (T, D / 2) complex
        self.register_buffer("freqs_cis", cis, persistent=False)

    def rotate_half(self, x: Tensor) -> Tensor:
        """``(-x2, x1)`` of the halves of the last dimension of ``x`` ``(B, H, T, D)``."""
        half = self.hd // 2
        if self.form == "chunk":
            x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D / 2) each
        elif self.form == "torch_split":
            x1, x2 = torch.split(x, half, dim=-1)  # (B, H, T, D / 2) each
        elif self.form == "interleaved":  # pairs (x[2i], x[2i + 1]) -> (-x[2i + 1], x[2i])
            pairs = x.unflatten(-1, (half, 2))  # (B, H, T, D / 2, 2)
            x1, x2 = pairs.unbind(-1)  # (B, H, T, D / 2) each
            return torch.stack((-x2, x1), dim=-1).flatten(-2)  # (B, H, T, D)
        else:
            x1, x2 = x.split(half, dim=3)  # (B, H, T, D / 2) each
        return torch.cat((-x2, x1), dim=-1)  # (B, H, T, D)

    def rope(self, x: Tensor, n_heads: int) -> Tensor:
        """Rotary embeddings of ``x`` ``(B, T, H, D)``."""
        b, t = x.shape[0], x.shape[1]
        if self.form == "complex":  # Meta's llama/model.py apply_rotary_emb
            xc = torch.view_as_complex(x.float().reshape(b, t, n_heads, self.hd // 2, 2))
            fc = self.freqs_cis.narrow(0, 0, t).view(1, t, 1, self.hd // 2)  # (1, T, 1, D / 2)
            return torch.view_as_real(xc * fc).flatten(3).type_as(x)  # (B, T, H, D)
        x = x.transpose(1, 2)  # (B, H, T, D)
        cos = self.cos.narrow(0, 0, t)  # (T, D)
        sin = self.sin.narrow(0, 0, t)  # (T, D)
        return (x * cos + self.rotate_half(x) * sin).transpose(1, 2)  # (B, T, H, D)

    def repeat_kv(self, x: Tensor) -> Tensor:
        """Key/value heads ``(B, KV, T, D)`` repeated for the query heads ``(B, H, T, D)``."""
        if self.kv == self.h:
            return x
        b, _, t, d = x.shape
        r = self.h // self.kv
        x = x[:, :, None, :, :].expand(b, self.kv, r, t, d)  # (B, KV, r, T, D)
        return x.reshape(b, self.h, t, d)  # (B, H, T, D)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.rope(self.q_proj(x).view(b, t, self.h, self.hd), self.h)  # (B, T, H, D)
        k = self.rope(self.k_proj(x).view(b, t, self.kv, self.hd), self.kv)  # (B, T, KV, D)
        v = self.v_proj(x).view(b, t, self.kv, self.hd)  # (B, T, KV, D)
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = self.repeat_kv(k.transpose(1, 2))  # (B, H, T, D)
        v = self.repeat_kv(v.transpose(1, 2))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.h * self.hd)  # (B, T, H D)
        return cast(Tensor, self.o_proj(y))


class Net(nn.Module):
    """``layers`` pre-norm blocks of RoPE attention and a SwiGLU MLP, each a residual
    branch, on inputs ``(B, T, 3)``."""

    def __init__(
        self, heads: int = 4, kv: int = 4, head_dim: int = 4, form: str = "chunk", layers: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(3, D_MODEL)
        self.ln = nn.ModuleList(nn.LayerNorm(D_MODEL) for _ in range(2 * layers))
        self.attn = nn.ModuleList(RopeAttention(heads, kv, head_dim, form) for _ in range(layers))
        self.gate_proj = nn.ModuleList(nn.Linear(D_MODEL, 24, bias=False) for _ in range(layers))
        self.up_proj = nn.ModuleList(nn.Linear(D_MODEL, 24, bias=False) for _ in range(layers))
        self.down_proj = nn.ModuleList(nn.Linear(24, D_MODEL, bias=False) for _ in range(layers))
        self.head = nn.Linear(D_MODEL, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, T, 16)
        for i, attn in enumerate(self.attn):
            h = h + attn(self.ln[2 * i](h))  # (B, T, 16)
            a = self.ln[2 * i + 1](h)  # (B, T, 16)
            h = h + self.down_proj[i](F.silu(self.gate_proj[i](a)) * self.up_proj[i](a))
        return cast(Tensor, self.head(h))  # (B, T, 4)


def _factory(heads: int, kv: int, head_dim: int, form: str, layers: int = 2) -> Net:
    torch.manual_seed(0)
    return Net(heads, kv, head_dim, form, layers).eval()


def _head_gates(model: nn.Module, summary: gp.GatingSummary) -> list[HardConcreteGate]:
    gating = inserted_gating(model)
    gates = [gating.group_gates[i] for i in summary.head_groups]
    assert all(isinstance(g, HardConcreteGate) for g in gates)
    return cast(list[HardConcreteGate], gates)


def _set_heads(gate: HardConcreteGate, closed: set[int], gen: torch.Generator) -> None:
    """Gate entries in ``closed`` shut; the others open at fractional eval values."""
    with torch.no_grad():
        for i in range(gate.n):
            value = (
                -5.0 if i in closed else float(torch.empty(()).uniform_(-1.5, 1.5, generator=gen))
            )
            gate.log_alpha[i] = value
    fractional = [v for i, v in enumerate(gate.eval_value().tolist()) if i not in closed]
    assert all(0.0 < v < 1.0 for v in fractional), fractional


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kv", [4, 2])
def test_rope_keeps_head_gates_and_prunes_exactly(form: str, kv: int) -> None:
    # before 2026-12-07 22:20 UTC: "node 'chunk' ... returns a non-tensor (a split of the
    # channels, such as q, k, v of a fused projection)" (the split and torch.split forms
    # likewise; the complex form: "view_as_complex ... is an op gate_ does not prune
    # through"), then "heads that are not all labelled alike" for v: every head kept
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 3, generator=gen)
    model = _factory(4, kv, 4, form)
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    with torch.no_grad():
        before = model(x)
    summary = gate_(model, x)
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-5  # gates start open
    assert len(summary.head_groups) == 2, str(summary)  # one per layer
    for i, gi in enumerate(summary.head_groups):
        producers, size = summary.channel_groups[gi]
        assert sorted(producers) == [f"attn.{i}.{p}_proj" for p in "kqv"], str(summary)
        assert size == kv, str(summary)  # a gate per (key/value) head
    assert "(one gate per head)" in str(summary)
    reasons = " ".join(why for _, _, why in summary.ungated_groups)
    assert "non-tensor" not in reasons
    assert "not all labelled alike" not in reasons
    gates = _head_gates(model, summary)
    _set_heads(gates[0], {1}, gen)
    closed_1 = {0, kv - 1} if kv > 2 else {0}
    _set_heads(gates[1], closed_1, gen)
    factory = lambda: _factory(4, kv, 4, form)  # noqa: E731
    pruned = check_pruned(model, x, gen, factory, (1, 3))
    with torch.no_grad():  # another sequence length (the split sizes are along head_dim)
        for t in (9, 1):
            xi = torch.randn(2, t, 3, generator=gen)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    r = 4 // kv  # query heads per key/value head
    kept = [kv - 1, kv - len(closed_1)]  # key/value heads kept in each layer
    for i, k in enumerate(kept):
        attn = pruned.get_submodule(f"attn.{i}")
        assert attn.get_submodule("q_proj").out_features == k * r * 4
        assert attn.get_submodule("k_proj").out_features == k * 4
        assert attn.get_submodule("v_proj").out_features == k * 4
        assert attn.get_submodule("o_proj").in_features == k * r * 4
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert c.flops < dense.flops
    assert c.params < dense.params


@pytest.mark.parametrize("form", FORMS)
def test_rope_plan_round_trip(form: str) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 3, generator=gen)
    model = _factory(4, 2, 4, form)
    summary = gate_(model, x)
    gates = _head_gates(model, summary)
    assert len(gates) == 2, str(summary)
    _set_heads(gates[0], {0}, gen)
    _set_heads(gates[1], set(), gen)
    pruned = gp.prune(model).eval()
    plan = json.loads(json.dumps(export_plan(model)))
    fresh = apply_plan(_factory(4, 2, 4, form), plan).eval()
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        xi = torch.randn(3, 11, 3, generator=gen)
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5
    assert fresh.get_submodule("attn.0.k_proj").out_features == 4


@settings(max_examples=25, deadline=None)
@given(
    heads=st.sampled_from([2, 3, 4, 6]),
    head_dim=st.sampled_from([2, 4, 6]),
    group=st.sampled_from([1, 2, 3]),
    form=st.sampled_from(FORMS),
    data=st.data(),
)
def test_rope_random_structures(
    heads: int, head_dim: int, group: int, form: str, data: st.DataObject
) -> None:
    kv = heads // group if heads % group == 0 else heads
    n = heads if kv == 1 else kv  # multi-query attention: a gate per query head
    closed = data.draw(st.sets(st.integers(0, n - 1), max_size=n - 1), label="closed")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, generator=gen)
    model = _factory(heads, kv, head_dim, form, layers=1)
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    summary = gate_(model, x)
    gates = _head_gates(model, summary)
    assert [g.n for g in gates] == [n], str(summary)
    _set_heads(gates[0], closed, gen)
    pruned = check_pruned(model, x, gen, lambda: _factory(heads, kv, head_dim, form, 1))
    with torch.no_grad():
        xi = torch.randn(1, 7, 3, generator=gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    kept = n - len(closed)
    q = pruned.get_submodule("attn.0.q_proj")
    assert q.out_features == kept * (heads // n) * head_dim
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    if closed:
        assert c.flops < dense.flops
        assert c.params < dense.params


class _Splits(nn.Module):
    """q ``(B, T, 12)`` of a Linear, split by ``how`` along its channels or its heads'
    ``head_dim``, read back by a Linear."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.q = nn.Linear(8, 12)
        self.o = nn.Linear(12, 8)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.q(x)  # (B, T, 12)
        if self.how == "unequal_split":  # 12 channels in pieces of 5, 5, 2
            a, c, e = h.split(5, dim=-1)
            h = torch.cat((c, a, e), dim=-1)  # (B, T, 12)
        elif self.how == "unbind_channels":
            h = torch.stack(h.unbind(-1)[::-1], dim=-1)  # (B, T, 12)
        elif self.how == "cat_pieces":  # the pieces read together, not one by one
            q = h.view(b, t, 3, 4)  # (B, T, 3, 4)
            h = torch.cat(q.chunk(2, dim=-1), dim=-1).reshape(b, t, 12)  # (B, T, 12)
        else:  # "reversed_pieces": a slice of the tuple of pieces
            q = h.view(b, t, 3, 4)  # (B, T, 3, 4)
            h = torch.cat(q.chunk(2, dim=-1)[::-1], dim=-1).reshape(b, t, 12)  # (B, T, 12)
        return cast(Tensor, self.o(F.relu(h)))


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("unequal_split", "splits the labelled dimension (12 channels) by 5 into pieces"),
        ("unbind_channels", "unbinds the labelled dimension (one tensor per channel)"),
        ("cat_pieces", "reads the pieces of node 'chunk' (call_method chunk) together"),
        ("reversed_pieces", "reads a split of the channels as a whole"),
    ],
)
def test_splits_not_followed_say_why(how: str, reason: str) -> None:
    # before 2026-12-07 22:20 UTC: the first two claimed "(a split of the channels, such as
    # q, k, v of a fused projection)"; torch.cat of the pieces' tuple raised AssertionError;
    # a slice of the pieces of a split along head_dim pinned nothing
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 8, generator=gen)
    model = _Splits(how).eval()
    summary = gate_(model, x)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert reason in reasons["q"], str(summary)
    assert "fused projection" not in str(summary)
    assert summary.n_gates == 0
    check_pruned(model, x, gen)
