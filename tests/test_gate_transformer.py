"""Transformer layers: heads, FFN units and whole sub-layers gated and pruned exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from gating_helpers import gate_all_open
from torch import Tensor, nn
from zoo import TinyViT

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, apply_plan, export_plan, gate_
from gatedprune.gating.transformer import PrunedMultiheadAttention, PrunedTransformerEncoderLayer


class MaskedEncoder(nn.Module):
    """Encoder with a causal mask buffer and a padding mask computed from the input."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        d, t = 12, 6
        self.embed = nn.Linear(2, d)
        layer = nn.TransformerEncoderLayer(
            d, 3, 20, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.register_buffer("causal", torch.ones(t, t, dtype=torch.bool).triu(1))
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        pad = (x[..., 0] > 1.2) & (torch.arange(x.shape[1]) > 0)  # (B, T) True = ignore
        h = self.encoder(self.embed(x), mask=self.causal, src_key_padding_mask=pad)
        return self.head(h[:, 0])


def _random_gates(model: nn.Module, seed: int) -> InsertedGating:
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.copy_(torch.empty(gate.n).uniform_(-4.0, 4.0, generator=gen))
    return gating


def test_masked_encoder_heads_units_sublayers_exact() -> None:
    for norm_first, seed in ((False, 0), (True, 1), (True, 5)):
        torch.manual_seed(seed)
        model = MaskedEncoder(norm_first).eval()
        x = torch.randn(4, 6, 2)
        with torch.no_grad():
            before = model(x)
        summary = gate_(model, x)
        assert [h for _, h, _ in summary.transformers] == [3, 3, 3]
        with torch.no_grad():
            assert (model(x) - before).abs().max().item() <= 1e-5
        gating = _random_gates(model, seed)
        hard = gatedprune.cost(model, x, hard=True)
        pruned = gatedprune.prune(model)
        with torch.no_grad():
            for _ in range(2):
                xi = torch.randn(4, 6, 2)
                assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
        c = gatedprune.cost(pruned, x)
        assert isinstance(c, Cost)
        assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
        plan = export_plan(model)
        for name, spec in plan["transformers"].items():
            layer = pruned.get_submodule(name)
            assert isinstance(layer, PrunedTransformerEncoderLayer)
            if spec["attn"]:
                assert layer.self_attn is not None
                assert layer.self_attn.num_heads == len(spec["heads"])
                assert layer.self_attn.head_dim == 4
            else:
                assert layer.self_attn is None
                assert (layer.norm1 is None) == norm_first
        assert gating.group_gates  # something was gated
        fresh = apply_plan(MaskedEncoder(norm_first), json.loads(json.dumps(plan)))
        fresh.load_state_dict(pruned.state_dict())
        fresh.eval()
        with torch.no_grad():
            assert (fresh(x) - model(x)).abs().max().item() <= 1e-5


def test_attention_cost_on_plain_models() -> None:
    e, h, n, t = 8, 2, 3, 5
    mha = nn.MultiheadAttention(e, h, batch_first=True)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: Tensor) -> Tensor:
            return self.mha(x, x, x)[0]

    c = gatedprune.cost(Wrap(), torch.randn(n, t, e))
    tokens = n * t
    proj = 4 * (2 * tokens * e * e + tokens * e)  # q, k, v, out projections with biases
    scores = 2 * 2 * n * t * t * e + n * h * t * t  # q k^T, weights v, softmax
    assert c == Cost(flops=proj + scores, params=4 * e * e + 4 * e)
    layer = nn.TransformerEncoderLayer(e, h, 16, batch_first=True).eval()
    c2 = gatedprune.cost(layer, torch.randn(n, t, e))
    ffn = 2 * tokens * e * 16 * 2 + tokens * 16 + tokens * e + tokens * 16
    assert c2.flops == proj + scores + ffn + 2 * 5 * tokens * e
    assert c2.params == sum(p.numel() for p in layer.parameters())


def test_hand_written_attention_heads_and_blocks() -> None:
    torch.manual_seed(3)
    model = TinyViT().eval()
    x = torch.randn(2, 6, 3)
    summary = gate_(model, x)
    assert summary.attentions == [("blocks.0.attn", 4), ("blocks.1.attn", 4)]
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    heads0 = gating.group_gates[gating.attentions[0][1]]
    heads0.force_(torch.tensor([True, False, True, False]))
    owners = [owner for owner, _, _ in summary.blocks]
    sites = [site for _, site, _ in summary.blocks]
    assert sites == ["blocks.0.attn", "blocks.0.fc2", "blocks.1.attn", "blocks.1.fc2"]
    assert owners == ["blocks.0", "blocks.0", "blocks.1", "blocks.1"]
    gating.block_gates[2].force_(torch.zeros(1, dtype=torch.bool))  # drop blocks.1 attention
    pruned = gatedprune.prune(model)
    att = pruned.get_submodule("blocks.0.attn")
    assert isinstance(att, PrunedMultiheadAttention)
    assert (att.num_heads, att.head_dim) == (2, 4)
    names = {n for n, _ in pruned.named_modules()}
    assert "blocks.1.attn" not in names
    assert "blocks.1.ln1" not in names  # only fed the removed attention
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5
    c = gatedprune.cost(pruned, x)
    hard = gatedprune.cost(model, x, hard=True)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))


def test_width_gates_are_ffn_units_not_heads_or_sublayers() -> None:
    """snap_to_budget(round_to=...) rounds widths only: FFN units, not heads or sub-layers."""
    from zoo import TransformerClassifier

    model = TransformerClassifier()
    gate_(model, torch.randn(2, 5, 3))
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    groups = gating._group_list()
    units = [groups[gu] for _, _, gu, _, _ in gating.transformers]
    assert [id(g) for g in gating.width_gates()] == [id(g) for g in units]
    assert [g.n for g in gating.width_gates()] == [24, 24]


class DecoderNet(nn.Module):
    """A gated Linear (``pre``) feeding an ungated decoder layer, decoder stack or Transformer."""

    def __init__(self, kind: str, batch_first: bool) -> None:
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        self.pre = nn.Linear(3, 16)
        self.embed = nn.Linear(16, 8)
        layer = nn.TransformerDecoderLayer(8, 2, 12, 0.0, batch_first=batch_first)
        self.dec: nn.Module
        if kind == "layer":
            self.dec = layer
        elif kind == "stack":
            self.dec = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(8))
        else:
            self.dec = nn.Transformer(8, 2, 1, 1, 12, 0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(torch.relu(self.pre(x)))  # (B, 5, 8) or (5, B, 8)
        mem = h[:, :3] if self.batch_first else h[:3]  # 3 memory positions
        y = self.dec(mem, h) if self.kind == "transformer" else self.dec(h, mem)
        return self.head(y.mean(1 if self.batch_first else 0))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize(
    ("kind", "batch_first"),
    [("layer", True), ("layer", False), ("stack", True), ("transformer", True),
     ("transformer", False)],
)  # fmt: skip
def test_ungated_decoder_is_counted_whole_in_the_gated_cost(kind: str, batch_first: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    model = DecoderNet(kind, batch_first).eval()
    dense = gatedprune.cost(model, x)
    assert isinstance(dense, Cost)
    # decoder layers are gated since 2026-12-08: filter_fn keeps them whole here
    # (nn.Transformer called whole stays whole anyway: its forward cannot be traced)
    summary = gate_(model, x, filter_fn=lambda m, name: name.split(".")[0] != "dec")
    if kind == "transformer":
        assert "nn.Transformer.forward cannot be traced" in dict(summary.ungated_layers)["dec"]
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    assert len(gating.group_gates) == 1  # only `pre`: the decoder is not gated
    with torch.no_grad():
        gate = gating.group_gates[0]
        assert isinstance(gate, HardConcreteGate)
        gate.log_alpha.fill_(8.0)
        gate.log_alpha[:8] = -10.0  # close half of `pre`
    model.eval()
    hard = gatedprune.cost(model, x, hard=True)
    assert not isinstance(hard, Cost)
    # removed: half of pre (2*10*8*3 + 80 FLOPs, 8*3 + 8 params), half of embed's inputs
    # (2*10*8*8 FLOPs, 8*8 params); the decoder keeps all its FLOPs
    assert hard.detach() == Cost(dense.flops - 560 - 1280, dense.params - 32 - 64)
    assert gatedprune.cost(gatedprune.prune(model), x) == hard.detach()
    fraction = gatedprune.Budget(model, x, flops=1.0).expected()["flops"]
    assert abs(fraction - hard.detach().flops / dense.flops) < 1e-3


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("kind", ["layer", "stack", "transformer"])
def test_seq_first_decoder_cost_is_not_scaled_along_the_sequence(kind: str) -> None:
    """Dim 0 of a seq-first decoder's input is the sequence: its cost is not linear in it."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3)  # (T, B, 3)
    longer = torch.randn(10, 2, 3)  # (2T, B, 3)
    original = DecoderNet(kind, batch_first=False).eval()
    model = copy.deepcopy(original)
    gate_all_open(model, x)
    dense = gatedprune.cost(original, x)
    assert isinstance(dense, Cost)
    assert gatedprune.cost(model, x).detach() == dense
    # attention is quadratic in the sequence length: no linear rescaling from the gated shape
    with pytest.raises(ValueError, match=r"gated with an input of shape \(5, 2, 3\)"):
        gatedprune.cost(model, longer)
    regated = copy.deepcopy(original)
    gate_all_open(regated, longer)
    expected = gatedprune.cost(regated, longer)
    assert not isinstance(expected, Cost)
    assert expected.detach() == gatedprune.cost(original, longer)
