"""gate_ on nn.TransformerDecoderLayer: self-attention heads, cross-attention heads, FFN units
and the three sub-layers (self-attention, cross-attention, FFN) gated and pruned exactly, in a
seq2seq model (nn.TransformerEncoder + nn.TransformerDecoder with masks, two inputs) and in a
model calling nn.Transformer's encoder and decoder.

Before 2026-12-08 decoder layers (and nn.TransformerDecoder stacks) were kept whole: a
seq2seq model's decoder could not be pruned."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import budget_optimizer, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost
from gatedprune.gating import apply_plan, export_plan, gate_
from gatedprune.gating.transformer import (
    PrunedMultiheadAttention,
    PrunedTransformerDecoderLayer,
)

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")

E, HEADS, FF = 16, 4, 24
ACTIVATIONS: dict[str, str | Callable[[Tensor], Tensor] | nn.Module] = {
    "relu": "relu",
    "gelu": "gelu",
    "callable": F.silu,
    "module": nn.GELU(),
}


class Seq2Seq(nn.Module):
    """Encoder-decoder on (src, tgt) feature sequences: a causal ``tgt_mask``, padding masks
    computed from the inputs (position 0 never padded) for tgt and memory keys."""

    def __init__(self, norm_first: bool, batch_first: bool, activation: str) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.src_emb = nn.Linear(3, E)
        self.tgt_emb = nn.Linear(2, E)
        kw = {"dropout": 0.0, "batch_first": batch_first, "norm_first": norm_first}
        act = ACTIVATIONS[activation]
        enc = nn.TransformerEncoderLayer(E, HEADS, FF, activation=act, **kw)  # type: ignore[arg-type]
        dec = nn.TransformerDecoderLayer(E, HEADS, FF, activation=act, **kw)  # type: ignore[arg-type]
        self.encoder = nn.TransformerEncoder(enc, 1, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, 2, norm=nn.LayerNorm(E))
        self.register_buffer("causal", torch.ones(32, 32, dtype=torch.bool).triu(1))
        self.out = nn.Linear(E, 5)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        t = tgt.shape[1]
        src_pad = (src[..., 0] > 1.0) & (torch.arange(src.shape[1]) > 0)  # (B, S) True: pad
        tgt_pad = (tgt[..., 0] > 1.5) & (torch.arange(t) > 0)  # (B, T)
        s, y = self.src_emb(src), self.tgt_emb(tgt)  # (B, S, E), (B, T, E)
        if not self.batch_first:
            s, y = s.transpose(0, 1), y.transpose(0, 1)  # (S, B, E), (T, B, E)
        mem = self.encoder(s, src_key_padding_mask=src_pad)
        h = self.decoder(
            y,
            mem,
            tgt_mask=self.causal[:t, :t],
            tgt_key_padding_mask=tgt_pad,
            memory_key_padding_mask=src_pad,
        )
        if not self.batch_first:
            h = h.transpose(0, 1)  # (B, T, E)
        return self.out(h)  # (B, T, 5)


def _inputs(batch: int, s: int, t: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, s, 3, generator=gen), torch.randn(batch, t, 2, generator=gen)


def _force(model: nn.Module, states: list[list[bool]]) -> None:
    gates = inserted_gating(model).group_gates
    for gate, state in zip(gates, states, strict=True):
        gate.force_(torch.tensor(state))  # type: ignore[operator]


def _states(data: st.DataObject, sizes: list[int]) -> list[list[bool]]:
    """One state per gate group: all open, all closed, or each gate open at random."""
    out = []
    for n in sizes:
        mode = data.draw(st.sampled_from(["open", "closed", "random", "random"]))
        if mode == "random":
            out.append(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        else:
            out.append([mode == "open"] * n)
    return out


def _embedded(batch: int, s: int, t: int, seed: int) -> tuple[Tensor, Tensor]:
    """(tgt, memory) of width E for a model without embeddings."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, t, E, generator=gen), torch.randn(batch, s, E, generator=gen)


def _check_pruned(
    model: nn.Module,
    example: tuple[Tensor, Tensor],
    dense: Cost,
    make: Callable[[int, int, int, int], tuple[Tensor, Tensor]] = _inputs,
) -> nn.Module:
    """prune(model) computes what the gated model computes (on inputs of other lengths too),
    costs what its hard cost says, and is no larger (smaller if a decoder gate is closed)."""
    gating = inserted_gating(model)
    model.eval()
    hard = gp.cost(model, example, hard=True)
    assert not isinstance(hard, Cost)
    pruned = gp.prune(model).eval()
    with torch.no_grad():
        for k, (s, t) in enumerate([(7, 5), (9, 3), (4, 8)]):
            xs = make(3, s, t, 100 + k)
            assert (pruned(*xs) - model(*xs)).abs().max().item() <= 1e-5
    c = gp.cost(pruned, example)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    closed = any(
        not bool(gating.group_gates[g].is_open().all())  # type: ignore[operator]
        for _, *groups in gating.decoders
        for g in groups
    )
    assert c.params <= dense.params
    assert c.flops <= dense.flops
    if closed:
        assert c.params < dense.params
        assert c.flops < dense.flops
    return pruned


@settings(max_examples=20, deadline=None)
@given(
    st.booleans(),
    st.booleans(),
    st.sampled_from(sorted(ACTIVATIONS)),
    st.integers(0, 2**16),
    st.data(),
)
def test_seq2seq_decoder_gates_prune_exactly(
    norm_first: bool, batch_first: bool, activation: str, seed: int, data: st.DataObject
) -> None:
    torch.manual_seed(seed)
    model = Seq2Seq(norm_first, batch_first, activation).eval()
    example = _inputs(2, 6, 5, seed)
    dense = gp.cost(model, example)
    assert isinstance(dense, Cost)
    with torch.no_grad():
        before = model(*example)
    summary = gate_(model, example)
    assert [d[0] for d in summary.decoders] == ["decoder.layers.0", "decoder.layers.1"]
    assert [d[1:] for d in summary.decoders] == [(HEADS, HEADS, FF)] * 2
    with torch.no_grad():
        assert (model(*example) - before).abs().max().item() <= 1e-5  # gates open: same
    gating = inserted_gating(model)
    assert gp.cost(model, example, hard=True).detach() == dense  # type: ignore[union-attr]
    _force(model, _states(data, [g.n for g in gating.group_gates]))  # type: ignore[misc]
    pruned = _check_pruned(model, example, dense)
    plan = export_plan(model)
    for name, spec in plan.get("decoders", {}).items():
        layer = pruned.get_submodule(name)
        assert isinstance(layer, PrunedTransformerDecoderLayer)
        for attr, sub, heads in (
            ("self_attn", "attn", "heads"),
            ("multihead_attn", "cross", "cross_heads"),
        ):
            att = getattr(layer, attr)
            if spec[sub]:
                assert isinstance(att, PrunedMultiheadAttention)
                assert list(att.kept_heads) == spec[heads]
            else:
                assert att is None
        assert (layer.linear1 is None) == (not spec["ffn"])
        if spec["ffn"]:
            assert layer.linear1 is not None
            assert layer.linear1.out_features == len(spec["units"])
        norms = (layer.norm1, layer.norm2, layer.norm3)
        kept = (spec["attn"], spec["cross"], spec["ffn"])
        assert [n is not None for n in norms] == [k or not norm_first for k in kept]
    fresh = apply_plan(
        Seq2Seq(norm_first, batch_first, activation), json.loads(json.dumps(plan))
    ).eval()
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        xs = _inputs(2, 8, 6, seed + 1)
        assert (fresh(*xs) - model(*xs)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("norm_first", "batch_first"), [(False, True), (True, False)])
def test_cross_attention_heads_prune_apart_from_self_attention(
    norm_first: bool, batch_first: bool
) -> None:
    torch.manual_seed(0)
    model = Seq2Seq(norm_first, batch_first, "relu").eval()
    example = _inputs(2, 6, 5, 0)
    dense = gp.cost(model, example)
    assert isinstance(dense, Cost)
    gate_(model, example)
    gating = inserted_gating(model)
    _, gh, gc, *_ = gating.decoders[0]
    sizes = [g.n for g in gating.group_gates]  # type: ignore[misc]
    states = [[True] * n for n in sizes]
    states[gc] = [False, True, False, True]  # cross-attention loses heads 0 and 2
    states[gh] = [True, True, True, False]  # self-attention loses head 3
    _, _, _, _, _, gx1, gf1 = gating.decoders[1]
    states[gx1] = [False]  # layer 1 loses its cross-attention sub-layer
    states[gf1] = [False]  # and its FFN
    _force(model, states)
    pruned = _check_pruned(model, example, dense)
    layer0 = pruned.get_submodule("decoder.layers.0")
    assert isinstance(layer0, PrunedTransformerDecoderLayer)
    assert layer0.self_attn is not None
    assert layer0.multihead_attn is not None
    assert layer0.self_attn.kept_heads == (0, 1, 2)
    assert layer0.multihead_attn.kept_heads == (1, 3)
    assert layer0.linear1 is not None
    assert layer0.linear1.out_features == FF
    layer1 = pruned.get_submodule("decoder.layers.1")
    assert isinstance(layer1, PrunedTransformerDecoderLayer)
    assert layer1.multihead_attn is None
    assert layer1.linear1 is None
    assert layer1.activation is None
    assert (layer1.norm2 is None, layer1.norm3 is None) == (norm_first, norm_first)
    names = {n for n, _ in layer1.named_parameters()}
    assert "self_attn.in_proj_weight" in names
    assert "self_attn.out_proj.weight" in names
    assert not any(n.startswith(("multihead_attn.", "linear")) for n in names)


class TransformerParts(nn.Module):
    """Calls an nn.Transformer's encoder and decoder itself (nn.Transformer.forward cannot
    be traced)."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.emb = nn.Linear(3, E)
        self.t = nn.Transformer(E, HEADS, 1, 2, FF, 0.0, batch_first=True, norm_first=norm_first)
        self.out = nn.Linear(E, 2)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        memory = self.t.encoder(self.emb(src))  # (B, S, E)
        return self.out(self.t.decoder(self.emb(tgt), memory))  # (B, T, 2)


class WholeTransformer(TransformerParts):
    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        return self.out(self.t(self.emb(src), self.emb(tgt)))  # (B, T, 2)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_and_decoder_called_by_the_model(norm_first: bool) -> None:
    torch.manual_seed(1)
    model = TransformerParts(norm_first).eval()
    example = (torch.randn(2, 6, 3), torch.randn(2, 4, 3))
    dense = gp.cost(model, example)
    assert isinstance(dense, Cost)
    summary = gate_(model, example)
    assert [d[0] for d in summary.decoders] == ["t.decoder.layers.0", "t.decoder.layers.1"]
    assert [t[0] for t in summary.transformers] == ["t.encoder.layers.0"]
    gating = inserted_gating(model)
    gen = torch.Generator().manual_seed(3)
    states = [(torch.rand(g.n, generator=gen) > 0.4).tolist() for g in gating.group_gates]  # type: ignore[misc]
    _force(model, states)
    pruned = gp.prune(model).eval()
    hard = gp.cost(model, example, hard=True)
    assert not isinstance(hard, Cost)
    assert gp.cost(pruned, example) == hard.detach()
    with torch.no_grad():
        xs = (torch.randn(3, 9, 3), torch.randn(3, 7, 3))
        assert (pruned(*xs) - model(*xs)).abs().max().item() <= 1e-5
    fresh = apply_plan(TransformerParts(norm_first), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert (fresh.eval()(*xs) - model(*xs)).abs().max().item() <= 1e-5


def test_whole_transformer_call_is_kept_whole_and_says_why() -> None:
    torch.manual_seed(0)
    model = WholeTransformer(False).eval()
    example = (torch.randn(2, 6, 3), torch.randn(2, 4, 3))
    summary = gate_(model, example)
    assert summary.decoders == []
    assert summary.transformers == []
    why = dict(summary.ungated_layers)["t"]
    assert "nn.Transformer.forward cannot be traced by torch.fx" in why
    assert ".encoder and .decoder" in why


def test_decoder_layer_called_with_memory_by_name_is_gated() -> None:
    class ByName(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(3, E)
            self.dec = nn.TransformerDecoderLayer(E, HEADS, FF, 0.0, batch_first=True)
            self.out = nn.Linear(E, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.emb(x)  # (B, T, E)
            return self.out(self.dec(h, memory=h[:, :3]))  # (B, T, 2)

    torch.manual_seed(0)
    model = ByName().eval()
    x = torch.randn(2, 5, 3)
    dense = gp.cost(model, x)
    assert isinstance(dense, Cost)
    summary = gate_(model, x)
    assert summary.decoders == [("dec", HEADS, HEADS, FF)]
    _, gh, gc, gu, *_ = inserted_gating(model).decoders[0]
    sizes = [g.n for g in inserted_gating(model).group_gates]  # type: ignore[misc]
    states = [[True] * n for n in sizes]
    states[gh], states[gc] = [False, True, True, True], [True, False, False, True]
    states[gu] = [i % 2 == 0 for i in range(FF)]
    _force(model, states)
    pruned = gp.prune(model).eval()
    hard = gp.cost(model, x, hard=True)
    assert not isinstance(hard, Cost)
    assert gp.cost(pruned, x) == hard.detach()
    with torch.no_grad():
        xi = torch.randn(3, 7, 3)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


class OneLayer(nn.Module):
    """A decoder layer with an nn.PReLU activation (a module holding a parameter)."""

    def __init__(self, stacked: bool) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(
            E, HEADS, FF, 0.0, activation=nn.PReLU(init=-2.0), batch_first=True
        )
        self.dec: nn.Module = nn.TransformerDecoder(layer, 2) if stacked else layer
        self.out = nn.Linear(E, 2)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        return self.out(self.dec(tgt, memory))  # (B, T, 2)


@pytest.mark.parametrize("close", [True, False])
def test_module_activation_survives_prune(close: bool) -> None:
    """prune deep-copies the gated model: PyTorch's TransformerDecoderLayer.__setstate__
    would replace the PReLU by F.relu in the copy (before the fix: pruned != gated)."""
    torch.manual_seed(0)
    model = OneLayer(stacked=False).eval()
    example = (torch.randn(2, 5, E), torch.randn(2, 7, E))
    dense = gp.cost(model, example)
    assert isinstance(dense, Cost)
    gate_(model, example)
    gating = inserted_gating(model)
    if close:
        _, gh, *_ = gating.decoders[0]
        gating.group_gates[gh].force_(torch.tensor([True, False, True, True]))  # type: ignore[operator]
    pruned = _check_pruned(model, example, dense, _embedded)
    assert isinstance(pruned.get_submodule("dec.activation"), nn.PReLU)


def test_decoder_stack_with_a_shadowed_activation_module_is_kept_whole() -> None:
    """nn.TransformerDecoder's copies of a layer with a PReLU call F.relu (PyTorch's
    __setstate__), the PReLU's weight unused: kept whole, the reason names it."""
    model = OneLayer(stacked=True).eval()
    example = (torch.randn(2, 5, E), torch.randn(2, 7, E))
    dense = gp.cost(model, example)
    summary = gate_(model, example)
    assert summary.decoders == []
    why = dict(summary.ungated_layers)["dec.layers.0"]
    assert "activation module (PReLU, holding tensors) is not what it calls (relu)" in why
    assert gp.cost(model, example, hard=True).detach() == dense  # type: ignore[union-attr]


def test_budget_steps_close_decoder_gates() -> None:
    torch.manual_seed(0)
    model = Seq2Seq(True, True, "gelu")
    example = _inputs(2, 6, 5, 0)
    gate_(model, example)
    budget = gp.Budget(model, example, flops=0.3)
    start = float(budget.program.evaluate().flops.detach())
    opt = budget_optimizer(model, budget, gate_lr=0.5)
    model.train()
    for step in range(10):
        xs = _inputs(2, 6, 5, step)
        loss = model(*xs).pow(2).mean() * 0.0 + budget.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(budget.program.evaluate().flops.detach()) < start
    gating = inserted_gating(model)
    for _, *groups in gating.decoders:  # every decoder gate received gradients
        for g in groups:
            grads = [p.grad for p in gating.group_gates[g].parameters()]
            assert all(gr is not None and bool(gr.abs().sum() > 0) for gr in grads)


def test_decoder_plan_entries_are_checked() -> None:
    torch.manual_seed(0)
    model = Seq2Seq(False, True, "relu").eval()
    example = _inputs(2, 6, 5, 0)
    gate_(model, example)
    gating = inserted_gating(model)
    _, gh, *_ = gating.decoders[0]
    gating.group_gates[gh].force_(torch.tensor([True, False, True, True]))  # type: ignore[operator]
    plan = export_plan(model)
    plan.pop("checksum")
    assert plan["decoders"]["decoder.layers.0"]["heads"] == [0, 2, 3]
    bad = json.loads(json.dumps(plan))
    bad["decoders"]["decoder.layers.0"]["cross"] = 1
    with pytest.raises(ValueError, match=r"decoders 'decoder.layers.0' 'cross' must be a bool"):
        apply_plan(Seq2Seq(False, True, "relu"), bad)
    bad = json.loads(json.dumps(plan))
    bad["decoders"]["decoder.layers.0"]["cross_heads"] = [0, 4]
    with pytest.raises(ValueError, match=r"keeps head 4 of 'decoder.layers.0.multihead_attn'"):
        apply_plan(Seq2Seq(False, True, "relu"), bad)
    bad = json.loads(json.dumps(plan))
    bad["decoders"]["encoder.layers.0"] = bad["decoders"].pop("decoder.layers.0")
    with pytest.raises(ValueError, match=r"as a decoder layer"):
        apply_plan(Seq2Seq(False, True, "relu"), bad)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.filterwarnings("ignore:.norm. was found in ScriptModule constants")
@pytest.mark.parametrize(
    ("norm_first", "whole_layer"), [(False, False), (True, False), (False, True)]
)
def test_pruned_decoder_scripts(norm_first: bool, whole_layer: bool) -> None:
    torch.manual_seed(0)
    model = Seq2Seq(norm_first, False, "gelu").eval()
    example = _inputs(2, 6, 5, 0)
    gate_(model, example)
    gating = inserted_gating(model)
    _, gh, gc, *_ = gating.decoders[0]
    for g, state in ((gh, [True, False, True, False]), (gc, [False] * 4)):
        gating.group_gates[g].force_(torch.tensor(state))  # type: ignore[operator]
    if not whole_layer:  # else layer 1 is left as it is: a plain nn.TransformerDecoderLayer
        gating.group_gates[gating.decoders[1][6]].force_(torch.tensor([False]))  # type: ignore[operator]
    pruned = gp.prune(model).eval()
    assert isinstance(pruned.decoder.layers[0], PrunedTransformerDecoderLayer)
    second = pruned.decoder.layers[1]
    assert type(second) is (
        nn.TransformerDecoderLayer if whole_layer else PrunedTransformerDecoderLayer
    )
    scripted = torch.jit.script(pruned.decoder)
    xs = (torch.randn(5, 3, E), torch.randn(7, 3, E))  # (T, B, E), (S, B, E)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    with torch.no_grad():
        want = pruned.decoder(*xs, tgt_mask=mask)
        got = scripted(*xs, tgt_mask=mask)
    assert (got - want).abs().max().item() <= 1e-6
