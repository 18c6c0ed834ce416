"""Layers called with their inputs by keyword (torchaudio's Conformer, fairseq:
``self.self_attn(query=x, key=x, value=x, need_weights=False)``, ``layer(src=x)``,
``gru(input=x)``): ``cost`` counts them and ``gate_`` gates and prunes them as the positional
calls."""

from __future__ import annotations

import torch
from gating_helpers import budget_steps, check_pruned, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import gate_


def _randomise_every_gate(model: nn.Module, gen: torch.Generator) -> int:
    """Every gate of the gating (channels, blocks, heads, layers, units) at a random log alpha
    in [-4, 4); returns how many entries are closed in eval mode."""
    closed = 0
    with torch.no_grad():
        for g in inserted_gating(model).modules():
            if isinstance(g, HardConcreteGate):
                g.log_alpha.uniform_(-4.0, 4.0, generator=gen)
                closed += int((~g.is_open()).sum())
    return closed


class _Block(nn.Module):
    """A pre-LN attention + FFN block (sequence-first, as torchaudio's Conformer), its
    attention called with keywords, or positionally (``keywords=False``, the twin)."""

    def __init__(self, d: int, heads: int, ffn: int, keywords: bool) -> None:
        super().__init__()
        self.keywords = keywords
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ffn)
        self.ff2 = nn.Linear(ffn, d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)  # (T, B, D)
        if self.keywords:  # the keyword order differs from forward's on purpose
            a, _ = self.self_attn(value=h, query=h, key=h, need_weights=False)  # (T, B, D)
        else:
            a, _ = self.self_attn(h, h, h, need_weights=False)  # (T, B, D)
        x = x + a
        return x + self.ff2(torch.relu(self.ff1(self.norm2(x))))  # (T, B, D)


class _Net(nn.Module):
    def __init__(self, keywords: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.ModuleList([_Block(8, 4, 12, keywords) for _ in range(2)])
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x).transpose(0, 1)  # (T, B, D)
        for b in self.blocks:
            h = b(h)
        return self.out(h.transpose(0, 1))  # (B, T, 3)


def _sample(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 6, 5, generator=gen)  # (B, T, F)


def test_cost_of_keyword_calls_equals_the_positional_twin() -> None:
    x = _sample(2, torch.Generator().manual_seed(0))
    kw, pos = gp.cost(_Net(True), x), gp.cost(_Net(False), x)
    assert (kw.flops, kw.params) == (pos.flops, pos.params)
    assert kw.flops > 0


def test_keyword_attention_gets_heads_and_blocks_like_the_positional_twin() -> None:
    x = _sample(2, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    kw = _Net(True)
    torch.manual_seed(0)
    pos = _Net(False)
    s_kw, s_pos = gate_(kw, x), gate_(pos, x)
    heads = [("blocks.0.self_attn", 4), ("blocks.1.self_attn", 4)]
    assert s_kw.attentions == s_pos.attentions == heads
    assert len(s_kw.blocks) == len(s_pos.blocks) == 4
    assert s_kw.n_gates == s_pos.n_gates
    assert not any("self_attn" in name for name, _ in s_kw.ungated_layers)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_keyword_attention_prunes_exactly(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _Net(True)
    x = _sample(2, gen)
    gate_(model, x)
    closed = _randomise_every_gate(model, gen)
    pruned = check_pruned(model, x, gen, factory=lambda: _Net(True), batches=(1, 3))
    if closed:
        c, dense = gp.cost(pruned, x), gp.cost(_Net(True), x)
        assert c.flops < dense.flops
        assert c.params < dense.params


def test_keyword_attention_trains_under_a_budget_then_prunes() -> None:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = _Net(True)
    x = _sample(2, gen)
    gate_(model, x)
    budget = gp.Budget(model, x, flops=0.5)
    budget_steps(model, budget, 5, lambda: _sample(8, gen))
    check_pruned(model, x, gen, factory=lambda: _Net(True))


class _KeywordInput(nn.Module):
    """An encoder layer, or a recurrent module read by a Linear head, called with its input
    as a keyword (was a TypeError in gate_ and cost)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, 0.0, batch_first=True)
        self.gru = nn.GRU(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "layer":
            return self.layer(src=x).mean(1)  # (B, 4)
        return self.head(self.gru(input=x)[0].mean(1))  # (B, 2)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["layer", "gru"]))
def test_layer_and_rnn_called_by_keyword_are_gated_and_pruned(seed: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _KeywordInput(kind).eval()
    x = torch.randn(2, 5, 4, generator=gen)
    summary = gate_(model, x)
    if kind == "layer":
        assert [name for name, *_ in summary.transformers] == ["layer"]
    else:
        assert [name for name, *_ in summary.rnns] == ["gru"]
    closed = _randomise_every_gate(model, gen)
    pruned = check_pruned(model, x, gen, factory=lambda: _KeywordInput(kind), batches=(1, 3))
    if closed:
        assert gp.cost(pruned, x).params < gp.cost(_KeywordInput(kind), x).params
