"""A module whose caller passes it a constant of the caller's trace (added 2026-12-08): a
registered buffer (``self.dec(x, self.causal)``, Swin's ``self.attn(x, mask=self.attn_mask)``)
or a tensor built from constants (``torch.triu(torch.full((T, T), -inf), 1)``) is read by fx
as a constant in the whole model's trace and as an input when the module is traced alone.
Such a module is rewritten all the same (its residual branches cut, its heads pruned); what
it computes from the argument stays in its code, a size read from it is the caller's. Gates
at random: pruned == gated on fresh inputs, fewer parameters and FLOPs, the plan replays. A
genuinely different graph is still refused, the reason naming the argument."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate_head_bias import Swin
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_

D, H, T = 16, 4, 5


def _causal(t: int) -> Tensor:
    """``(t, t)``: 0 on and below the diagonal, -inf above."""
    return torch.triu(torch.full((t, t), float("-inf")), diagonal=1)


class Attention(nn.Module):
    """Hand-written self-attention, ``mask`` added to the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, H, d // H).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        q, k, v = qkv.unbind(0)  # (B, H, T, hd) each
        att = q @ k.transpose(-2, -1) * (d // H) ** -0.5 + mask  # (B, H, T, T)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.o(y)  # (B, T, D)


class Decoder(nn.Module):
    """A decoder block written by hand: attention and MLP residual branches, the mask an
    argument passed on to the attention."""

    def __init__(self) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention()
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.n1(x), mask)  # (B, T, D)
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))  # (B, T, D)


class Net(nn.Module):
    """Two decoder blocks called with a causal mask: ``"buffer"`` a registered buffer,
    ``"triu"`` built in the forward from constants, ``"sliced"`` a buffer's unsqueezed view
    (computed from a buffer, a constant too)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.inp = nn.Linear(6, D)
        self.blocks = nn.ModuleList([Decoder(), Decoder()])
        self.head = nn.Linear(D, 3)
        self.register_buffer("causal", _causal(T))

    def forward(self, x: Tensor) -> Tensor:
        if self.form == "buffer":
            mask = self.causal
        elif self.form == "triu":
            mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        else:
            mask = self.causal.unsqueeze(0).unsqueeze(0)  # (1, 1, T, T)
        h = self.inp(x)  # (B, T, D)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(h).mean(1)  # (B, 3)


class MhaDecoder(nn.Module):
    """``nn.MultiheadAttention`` and an MLP as residual branches, the mask an argument."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.n1(x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])  # (B, T, D)
        return self.n2(x + self.fc2(F.relu(self.fc1(x))))  # (B, T, D)


class MhaNet(nn.Module):
    """A decoder with ``nn.MultiheadAttention`` called with a causal-mask buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, D)
        self.dec = MhaDecoder()
        self.head = nn.Linear(D, 3)
        self.register_buffer("causal", _causal(T))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dec(self.inp(x), self.causal)).mean(1)  # (B, 3)


def _tokens(g: torch.Generator, b: int = 2) -> Tensor:
    return torch.randn(b, T, 6, generator=g)  # (B, T, 6)


def _image(g: torch.Generator, b: int = 2) -> Tensor:
    return torch.randn(b, 3, 8, 8, generator=g)  # (B, 3, 8, 8)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[..., Tensor]]] = {
    "buffer": (lambda: Net("buffer"), _tokens),
    "triu": (lambda: Net("triu"), _tokens),
    "sliced": (lambda: Net("sliced"), _tokens),
    "mha": (MhaNet, _tokens),
    "swin": (Swin, _image),
}
# the modules called with the constant, whose residual branches must be gated
CALLED = {
    "buffer": ["blocks.0", "blocks.1"],
    "triu": ["blocks.0", "blocks.1"],
    "sliced": ["blocks.0", "blocks.1"],
    "mha": ["dec"],
    "swin": ["blocks.1"],
}
HEADS = {
    "buffer": ["blocks.0.attn.qkv", "blocks.1.attn.qkv"],
    "triu": ["blocks.0.attn.qkv", "blocks.1.attn.qkv"],
    "sliced": ["blocks.0.attn.qkv", "blocks.1.attn.qkv"],
    "mha": [],
    "swin": ["blocks.1.attn.qkv"],
}


@pytest.mark.parametrize("form", sorted(MODELS))
def test_modules_called_with_a_constant_are_gated(form: str) -> None:
    factory, sample = MODELS[form]
    torch.manual_seed(0)
    model = factory()
    summary = gate_(model, sample(torch.Generator().manual_seed(0)))
    owners = [owner for owner, _, _ in summary.blocks]
    for scope in CALLED[form]:
        assert owners.count(scope) == 2  # its two residual branches
    assert "different graph" not in str(summary)
    heads = {p: n for producers, n in summary.channel_groups for p in producers}
    for qkv in HEADS[form]:
        assert heads[qkv] == H


@settings(max_examples=10, deadline=None)
@given(form=st.sampled_from(sorted(MODELS)), seed=st.integers(0, 2**16))
def test_random_gates_prune_exactly(form: str, seed: int) -> None:
    factory, sample = MODELS[form]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = factory()
    x = sample(gen)
    dense = gp.cost(model, x)
    gate_(model, x)
    gating = inserted_gating(model)
    with torch.no_grad():  # random states, one head (or channel) and one block closed
        for gate in [*gating.group_gates, *gating.block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)
        for gate in (gating.group_gates[0], gating.block_gates[0]):
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.view(-1)[0] = -8.0
    model.eval()
    plan = json.loads(json.dumps(export_plan(model)))
    pruned = gp.prune(model)
    fresh = sample(gen, 3)
    with torch.no_grad():
        assert (pruned(fresh) - model(fresh)).abs().max().item() <= 1e-5
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert isinstance(dense, Cost)
    assert c.params < dense.params
    assert c.flops < dense.flops
    torch.manual_seed(seed)
    replayed = apply_plan(factory(), plan)
    replayed.load_state_dict(pruned.state_dict())
    replayed.eval()
    with torch.no_grad():
        assert (replayed(fresh) - pruned(fresh)).abs().max().item() <= 1e-5


def test_the_attention_keeps_reading_the_mask_it_is_passed() -> None:
    """The rewritten module reads the argument at run time: a caller changing its buffer
    after pruning changes the pruned model's output as it changes the gated model's."""
    torch.manual_seed(0)
    model = Net("buffer")
    x = torch.randn(2, T, 6)
    gate_(model, x)
    with torch.no_grad():
        inserted_gating(model).block_gates[0].log_alpha.fill_(-8.0)  # type: ignore[operator]
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        for m in (model, pruned):
            m.get_buffer("causal").zero_()  # no mask now
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


class Probing(nn.Module):
    """Adds its argument, then takes a branch only a tensor (not an fx input) takes: traced
    alone, the graph differs from the whole model's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = x + mask  # (B, T, D)
        if isinstance(mask, Tensor):
            h = h * 2.0
        return h + self.fc(h)  # (B, T, D)


class ProbingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, D)
        self.probe = Probing()
        self.head = nn.Linear(D, 3)
        self.register_buffer("offset", torch.randn(T, D))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.probe(self.inp(x), self.offset)).mean(1)  # (B, 3)


def test_a_genuinely_different_graph_is_refused_naming_the_argument() -> None:
    torch.manual_seed(0)
    model = ProbingNet()
    x = torch.randn(2, T, 6)
    summary = gate_(model, x)
    text = str(summary)
    assert "cannot rewrite module 'probe'" in text
    assert "argument 'mask' is a buffer of the caller ('offset')" in text
    assert [owner for owner, _, _ in summary.blocks if owner == "probe"] == []
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5
