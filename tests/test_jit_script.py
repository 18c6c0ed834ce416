"""torch.jit.script of pruned models: a gate_-pruned nn.TransformerEncoder classifier (and
attention pruned inside your own module), a pruned ShortcutConv1d / ShortcutMLP
(PlainShortcutNet, OffsetConv1d, the pooling modules) and a gate_-pruned ResNet with a kept new
shortcut (ScaledAdd) script and compute what the eager model computes.

Before 2026-12-07 21:00 UTC scripting failed with TorchScript compiler errors from gatedprune's
modules (keyword-only arguments of the attention function, PlainShortcutNet's nested function,
string annotations of OffsetConv1d's and ScaledAdd's buffers)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune
from gatedprune.plain import OffsetConv1d, PlainShortcutNet

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def _check(model: nn.Module, *args: Tensor | None, atol: float = 1e-6) -> torch.jit.ScriptModule:
    """``model`` scripted; its outputs within ``atol`` of the eager model's, with autograd
    recording and without (where the eager model takes other code paths)."""
    scripted = torch.jit.script(model)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            want, got = model(*args), scripted(*args)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= atol
    return scripted


class TfCls(nn.Module):
    def __init__(self, norm_first: bool, activation: str | nn.Module, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(
            16,
            4,
            32,
            dropout=0.0,
            batch_first=batch_first,
            norm_first=norm_first,
            activation=activation,
        )
        self.enc = nn.TransformerEncoder(
            layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor, mask: Tensor | None = None, kpm: Tensor | None = None) -> Tensor:
        h = self.inp(x)  # (B, L, E)
        if not self.batch_first:
            h = h.transpose(0, 1)  # (L, B, E)
        h = self.enc(h, mask=mask, src_key_padding_mask=kpm)
        return self.head(h.mean(1 if self.batch_first else 0))  # (B, 3)


CLOSE = ["head", "all_heads", "attn", "ffn", "units", "nothing"]


@pytest.mark.parametrize("close", CLOSE)
@pytest.mark.parametrize(
    ("norm_first", "activation", "batch_first"),
    [(False, "relu", True), (True, "gelu", False), (False, nn.GELU(), False)],
)
def test_pruned_transformer_scripts(
    close: str, norm_first: bool, activation: str | nn.Module, batch_first: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6)
    model = TfCls(norm_first, activation, batch_first).eval()
    torch.jit.script(model)  # the dense model scripts
    gatedprune.gate_(model, x, shortcuts=None)
    g = model.gatedprune
    _, gh, gu, ga, gf = g.transformers[0]
    gates = g.group_gates
    forced = {
        "head": (gh, torch.tensor([True, False, True, True])),
        "all_heads": (gh, torch.zeros(4, dtype=torch.bool)),
        "attn": (ga, torch.zeros(1, dtype=torch.bool)),
        "ffn": (gf, torch.zeros(1, dtype=torch.bool)),
        "units": (gu, torch.arange(32) % 3 != 0),
    }
    if close in forced:
        i, mask = forced[close]
        gates[i].force_(mask)
    small = gatedprune.prune(model).eval()
    kpm = torch.zeros(4, 5, dtype=torch.bool)
    kpm[:, -1] = True  # the last position of every sequence is padding
    causal = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -1e9)
    for args in [(x,), (x, causal), (x, None, kpm)]:
        _check(small, *args)


class OwnAttention(nn.Module):
    """nn.MultiheadAttention called by code of your own, with a per-head mask."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        y = self.att(x, x, x, attn_mask=mask, need_weights=False)[0]  # (B, L, E)
        return self.out(y)  # (B, L, 2)


def test_pruned_attention_in_own_module_scripts_with_per_head_masks() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    model = OwnAttention().eval()
    gatedprune.gate_(model, x)
    (_, gh), *_ = model.gatedprune.attentions
    model.gatedprune.group_gates[gh].force_(torch.tensor([False, True, False, True]))
    small = gatedprune.prune(model).eval()
    assert small.att.num_heads == 2
    per_head = torch.randn(3 * 4, 5, 5)  # (B * source heads, L, S): the kept heads' rows used
    _check(small, x)
    _check(small, x, per_head)
    with torch.no_grad():
        assert (small(x, per_head) - model(x, per_head)).abs().max().item() <= 1e-5


def _closed_at_random(net: nn.Module, seed: int, p_open: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for g in net.gates():  # type: ignore[operator]
        g.force_(torch.rand(g.n, generator=gen) < p_open)


@settings(max_examples=examples(15), deadline=None)
@given(
    seed=st.integers(0, 10_000),
    p_open=st.sampled_from([0.3, 0.6, 0.9]),
    spatial=st.booleans(),
    norm=st.booleans(),
    activation=st.sampled_from(["relu", "gelu", "tanh"]),
)
def test_pruned_shortcut_nets_script(
    seed: int, p_open: float, spatial: bool, norm: bool, activation: str
) -> None:
    torch.manual_seed(seed)
    net: nn.Module
    if spatial:
        net = gatedprune.ShortcutConv1d(
            2, [[6, 6], [8]], 4, kernel_size=3, input_length=16, norm=norm, activation=activation
        )
        inputs = [torch.randn(3, 2, 16), torch.randn(32, 2, 16)]  # 32: the channels-last path
    else:
        net = gatedprune.ShortcutMLP(5, [8, 8, 6], 3, norm=norm, activation=activation)
        inputs = [torch.randn(3, 5)]
    _closed_at_random(net, seed, p_open)
    small = gatedprune.prune(net.eval()).eval()
    assert isinstance(small, PlainShortcutNet)
    for x in inputs:
        _check(small, x, atol=1e-5 if len(x) >= 16 else 1e-6)  # other summation order


def test_pruned_conv_net_with_offset_map_scripts_and_saves() -> None:
    torch.manual_seed(0)
    net = gatedprune.ShortcutConv1d(2, [[6, 6], [8]], 4, kernel_size=3, input_length=16)
    _closed_at_random(net, 7, 0.5)  # removes a constant layer: an OffsetConv1d remains
    small = gatedprune.prune(net.eval()).eval()
    assert any(isinstance(m, OffsetConv1d) for m in small.modules())
    x = torch.randn(3, 2, 16)
    scripted = _check(small, x)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        assert (loaded(x) - small(x)).abs().max().item() <= 1e-6
    with pytest.raises(torch.jit.Error, match="expected inputs of length 16"):
        scripted(torch.randn(3, 2, 32))
    with pytest.raises(torch.jit.Error, match="expected input of 3 dimensions with 2 channels"):
        scripted(torch.randn(3, 3, 16))


def test_demo_network_scripts() -> None:
    from gatedprune.demo import build_demo_model

    torch.manual_seed(0)
    net = build_demo_model()
    _closed_at_random(net, 0, 0.7)
    small = gatedprune.prune(net.eval()).eval()
    for batch in (1, 32):
        _check(small, torch.randn(batch, 1, 40), atol=1e-5)


def test_gate_pruned_resnet_with_kept_shortcut_scripts() -> None:
    torch.manual_seed(0)
    model = gatedprune.ResNet1d(widths=(8, 16), blocks=(2, 2))
    x = torch.randn(4, 1, 40)
    gatedprune.gate_(model, x, shortcuts="dense")
    g = model.gatedprune
    for gate in g.group_gates:
        gate.force_(torch.arange(gate.n) % 3 != 0)
    for gate in g.block_gates:
        gate.force_(torch.tensor([False]))
    assert g.edge_gate is not None
    g.edge_gate.force_(torch.ones(g.edge_gate.n, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = gatedprune.prune(model.eval()).eval()
    assert any(type(m).__name__ == "ScaledAdd" for m in small.modules())
    _check(small, x)
