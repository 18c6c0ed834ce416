"""Property test: random residual stacks, random gate states -> prune is exact."""

from __future__ import annotations

import torch
from gating_helpers import examples, shortcut_flops
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, apply_plan, export_plan, gate_


class RandomBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, mid: int, conv: bool, bn: bool, post_act: bool):
        super().__init__()
        if conv:
            self.f1: nn.Module = nn.Conv1d(c_in, mid, 3, padding=1, bias=not bn)
            self.f2: nn.Module = nn.Conv1d(mid, c_out, 3, padding=1, bias=not bn)
            self.n1: nn.Module = nn.BatchNorm1d(mid) if bn else nn.Identity()
            self.n2: nn.Module = nn.BatchNorm1d(c_out) if bn else nn.Identity()
            self.proj: nn.Module | None = (
                nn.Conv1d(c_in, c_out, 1, bias=False) if c_in != c_out else None
            )
        else:
            self.f1 = nn.Linear(c_in, mid)
            self.f2 = nn.Linear(mid, c_out)
            self.n1 = nn.Identity()
            self.n2 = nn.Identity()
            self.proj = nn.Linear(c_in, c_out) if c_in != c_out else None
        self.act = nn.ReLU()
        self.post_act = post_act

    def forward(self, x: Tensor) -> Tensor:
        s = x if self.proj is None else self.proj(x)
        y = self.n2(self.f2(self.act(self.n1(self.f1(x))))) + s
        return self.act(y) if self.post_act else y


class RandomStack(nn.Module):
    def __init__(self, conv: bool, widths: list[int], mids: list[int], bn: bool, post: bool):
        super().__init__()
        self.conv = conv
        c0 = widths[0]
        self.stem: nn.Module = nn.Conv1d(2, c0, 3, padding=1) if conv else nn.Linear(5, c0)
        blocks = []
        c = c0
        for w, m in zip(widths, mids, strict=True):
            blocks.append(RandomBlock(c, w, m, conv, bn, post))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x))
        if self.conv:
            h = h.mean(dim=-1)
        return self.head(h)


@settings(max_examples=examples(12), deadline=None)
@given(
    conv=st.booleans(),
    widths=st.lists(st.integers(2, 6), min_size=1, max_size=4),
    bn=st.booleans(),
    post=st.booleans(),
    dense=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_random_residual_stacks_prune_exactly(
    conv: bool,
    widths: list[int],
    bn: bool,
    post: bool,
    dense: bool,
    seed: int,
    data: st.DataObject,
) -> None:
    torch.manual_seed(seed)
    mids = data.draw(st.lists(st.integers(2, 6), min_size=len(widths), max_size=len(widths)))
    model = RandomStack(conv, widths, mids, bn, post)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    x = torch.randn(3, 2, 7) if conv else torch.randn(3, 5)
    full = gatedprune.cost(model, x)
    assert isinstance(full, Cost)
    gate_(model, x, shortcuts="dense" if dense else None)
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    assert len(gating.block_gates) == len(widths)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        edge = [gating.edge_gate] if gating.edge_gate is not None else []
        for gate in [*gating.group_gates, *gating.block_gates, *edge]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.copy_(torch.empty(gate.n).uniform_(-4.0, 4.0, generator=gen))
    model.eval()
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        xi = torch.randn_like(x)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    closed_any = bool(gating.closed_blocks()) or any(
        not bool(g.is_open().all()) for g in gating.group_gates
    )
    if closed_any:  # kept new shortcuts cost 2 FLOPs per element (ScaledAdd), no params
        assert c.flops - shortcut_flops(pruned, x) < full.flops
        assert c.params < full.params
    fresh = apply_plan(RandomStack(conv, widths, mids, bn, post), export_plan(model))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5


class EncoderStack(nn.Module):
    def __init__(
        self,
        d: int,
        heads: int,
        ff: int,
        layers: int,
        norm_first: bool,
        batch_first: bool,
        act: str,
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(3, d)
        layer = nn.TransformerEncoderLayer(
            d, heads, ff, 0.0, act, batch_first=batch_first, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.embed(x))
        return self.head(h.mean(dim=1 if self.batch_first else 0))


@settings(max_examples=examples(10), deadline=None)
@given(
    d_heads=st.sampled_from([(8, 1), (8, 2), (8, 4), (12, 3)]),
    ff=st.integers(2, 12),
    layers=st.integers(1, 2),
    norm_first=st.booleans(),
    batch_first=st.booleans(),
    act=st.sampled_from(["relu", "gelu"]),
    seed=st.integers(0, 2**16),
)
def test_random_encoder_stacks_prune_exactly(
    d_heads: tuple[int, int],
    ff: int,
    layers: int,
    norm_first: bool,
    batch_first: bool,
    act: str,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    d, heads = d_heads
    model = EncoderStack(d, heads, ff, layers, norm_first, batch_first, act).eval()
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    dense = gatedprune.cost(model, x)
    assert isinstance(dense, Cost)
    summary = gate_(model, x)
    assert len(summary.transformers) == layers
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    all_open = gatedprune.cost(model, x, hard=True)
    assert (float(all_open.flops), float(all_open.params)) == (dense.flops, dense.params)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.copy_(torch.empty(gate.n).uniform_(-4.0, 4.0, generator=gen))
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        xi = torch.randn_like(x)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
