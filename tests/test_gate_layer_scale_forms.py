"""Layer scale in the forms timm, torchvision and the ConvNeXt repository write: the parameter
shaped to broadcast by a chain of ``view`` / ``reshape`` / ``unsqueeze`` / ``None``-indexing /
``.to(dtype)`` / ``.type_as(x)`` (``x.mul_(gamma.view(1, -1, 1, 1))``, ``self.gamma[:, None,
None] * x``), each node read only by the next, is sliced with the kept channels; a literal
channel count in a ``view``/``reshape`` of the chain (``gamma.view(1, 64, 1, 1)``) becomes the
kept width in the pruned code. A chain read elsewhere, or another op on the parameter, keeps
the channels whole with a reason naming it. Before 2026-12-07 22:25 UTC every such form kept
the channels whole ("computed from it when the model runs")."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import budget_steps, inserted_gating, randomise_batchnorms
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_

# (branch h (B, C, H, W), the model's gamma, the width C) -> h times gamma, per channel
Form = Callable[[Tensor, Tensor, int], Tensor]
FORMS: dict[str, Form] = {
    "x.mul_(g.view(1, -1, 1, 1))": lambda h, g, c: h.mul_(g.view(1, -1, 1, 1)),
    "x * g.view(1, -1, 1, 1)": lambda h, g, c: h * g.view(1, -1, 1, 1),
    "x.mul(g.reshape(1, -1, 1, 1))": lambda h, g, c: h.mul(g.reshape(1, -1, 1, 1)),
    "g[:, None, None] * x": lambda h, g, c: g[:, None, None] * h,
    "g[None, :, None, None] * x": lambda h, g, c: g[None, :, None, None] * h,
    "g.unsqueeze(-1).unsqueeze(-1) * x": lambda h, g, c: g.unsqueeze(-1).unsqueeze(-1) * h,
    "x * g.view(1, -1, 1, 1).to(x.dtype)": lambda h, g, c: h * g.view(1, -1, 1, 1).to(h.dtype),
    "g.type_as(x)[:, None, None] * x": lambda h, g, c: g.type_as(h)[:, None, None] * h,
    "x * g.view(1, C, 1, 1)": lambda h, g, c: h * g.view(1, c, 1, 1),
    "x / torch.reshape(g, (C, 1, 1))": lambda h, g, c: h / torch.reshape(g, (c, 1, 1)),
    "x.mul_(g[..., None].view(1, C, 1, 1))": lambda h, g, c: h.mul_(g[..., None].view(1, c, 1, 1)),
    "x * g.view(1, x.size(1), 1, 1)": lambda h, g, c: h * g.view(1, h.size(1), 1, 1),
    "x * g.reshape(x.shape[1], 1, 1)": lambda h, g, c: h * g.reshape(h.shape[1], 1, 1),
}
LITERAL = [name for name in FORMS if ", C" in name or "(C" in name]


class ChannelsFirstLayerNorm(nn.Module):
    """The ConvNeXt repository's ``LayerNorm(data_format="channels_first")``: it normalises
    over the channels (kept whole) and applies ``weight[:, None, None]``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)  # (B, 1, H, W)
        s = (x - u).pow(2).mean(1, keepdim=True)  # (B, 1, H, W)
        x = (x - u) / torch.sqrt(s + 1e-6)  # (B, C, H, W)
        return self.weight[:, None, None] * x + self.bias[:, None, None]  # (B, C, H, W)


class ConvNeXtBlock(nn.Module):
    """A stem (conv, BatchNorm: the residual stream) and a ConvNeXt block on it: depthwise
    7x7 conv, a norm (BatchNorm, or channels-first LayerNorm), 1x1 convs C -> 4C -> C, layer
    scale ``gamma (C,)`` in form ``form``, residual add; a 1x1 conv head."""

    def __init__(self, form: str, c: int = 8, channels_first_ln: bool = False) -> None:
        super().__init__()
        self.form, self.c = FORMS[form], c
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm: nn.Module = ChannelsFirstLayerNorm(c) if channels_first_ln else nn.BatchNorm2d(c)
        self.pw1 = nn.Conv2d(c, 4 * c, 1)
        self.pw2 = nn.Conv2d(4 * c, c, 1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.stem(x))  # (B, C, H, W)
        h = self.pw2(F.gelu(self.pw1(self.norm(self.dw(x)))))  # (B, C, H, W)
        x = x + self.form(h, self.gamma, self.c)  # (B, C, H, W)
        return self.head(x).mean((2, 3))  # (B, 3)


class LayerScale2d(nn.Module):
    """timm's ``LayerScale2d``: ``gamma.view(1, -1, 1, 1)``, in place or not."""

    def __init__(self, dim: int, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.gamma.view(1, -1, 1, 1)  # (1, C, 1, 1)
        return x.mul_(gamma) if self.inplace else x * gamma  # (B, C, H, W)


class BNStream(nn.Module):
    """Two residual blocks with a timm ``LayerScale2d`` on a BatchNorm stream."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pw1 = nn.ModuleList([nn.Conv2d(16, 32, 1) for _ in range(2)])
        self.pw2 = nn.ModuleList([nn.Conv2d(32, 16, 1) for _ in range(2)])
        self.ls = nn.ModuleList([LayerScale2d(16, inplace) for _ in range(2)])
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.inp(x))  # (B, 16, H, W)
        for pw1, pw2, ls in zip(self.pw1, self.pw2, self.ls, strict=True):
            x = x + ls(pw2(F.gelu(pw1(x))))  # (B, 16, H, W)
        return self.head(x).mean((2, 3))  # (B, 4)


class SharedChain(nn.Module):
    """``gamma.view(1, -1, 1, 1)`` read by the product and by another node (``shared="view"``),
    or ``gamma`` itself read again (``shared="param"``), or ``gamma`` flipped before it is
    shaped (``shared="flip"``, an op outside the chain), or split by a view (``"split"``):
    kept whole."""

    def __init__(self, shared: str) -> None:
        super().__init__()
        self.shared = shared
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.pw(F.relu(self.stem(x))))  # (B, 8, H, W)
        if self.shared == "flip":
            return self.head(h * self.gamma.flip(0).view(1, -1, 1, 1)).mean((2, 3))  # (B, 3)
        if self.shared == "split":
            g = self.gamma.view(2, -1)[None, :, :, None].reshape(1, -1, 1, 1)  # (1, 8, 1, 1)
            return self.head(h * g).mean((2, 3))  # (B, 3)
        g = self.gamma.view(1, -1, 1, 1)  # (1, 8, 1, 1)
        extra = g.sum() if self.shared == "view" else self.gamma.sum()  # ()
        return self.head(h * g).mean((2, 3)) + extra  # (B, 3)


def _img(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 3, 6, 6, generator=gen)


def _set_gates(model: nn.Module, gen: torch.Generator) -> None:
    """Every group gate at a random log alpha (some closed, some open at a fraction); block
    gates open at a fraction (the branch, and its layer scale, kept)."""
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-3.0, 1.0, generator=gen)
        for gate in gating.block_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.fill_(0.5)


def _exact(model: nn.Module, factory: Callable[[], nn.Module], gen: torch.Generator) -> nn.Module:
    """Prune ``model`` (gated, in eval mode): the pruned model costs the hard expected cost and
    equals the gated one on fresh inputs, as does the exported plan replayed on a fresh
    instance. Returns the pruned model."""
    x = _img(3, gen)
    hard = gp.cost(model, x, hard=True)
    pruned = gp.prune(model)
    got = gp.cost(pruned, x)
    assert isinstance(got, gp.Cost)
    assert (got.flops, got.params) == (float(hard.flops), float(hard.params))
    fresh = apply_plan(factory(), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        for b in (1, 4):
            xi = _img(b, gen)
            want = model(xi)
            assert (pruned(xi) - want).abs().max().item() <= 1e-5
            assert (fresh(xi) - want).abs().max().item() <= 1e-5
    return pruned


def _train_and_prune(
    factory: Callable[[], nn.Module], seed: int = 0
) -> tuple[nn.Module, nn.Module, gp.Cost]:
    """gate_, a few steps under a FLOPs budget, random fractional gates, prune (checked by
    :func:`_exact`). Returns (gated, pruned, dense cost)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = factory()
    randomise_batchnorms(model, gen)
    x = _img(3, gen)
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    gate_(model, x)
    budget = gp.Budget(model, x, flops=0.6)
    budget_steps(model, budget, 3, lambda: _img(3, gen))
    _set_gates(model, gen)
    model.eval()
    return model, _exact(model, factory, gen), dense


def _gated(summary: gp.GatingSummary) -> set[str]:
    return {p for producers, _ in summary.channel_groups for p in producers}


def _ungated(summary: gp.GatingSummary) -> dict[str, str]:
    return {p: why for producers, _, why in summary.ungated_groups for p in producers}


@pytest.mark.parametrize("form", list(FORMS))
def test_a_layer_scale_shaped_to_broadcast_is_sliced(form: str) -> None:
    summary = gate_(ConvNeXtBlock(form), torch.randn(2, 3, 6, 6))
    assert {"stem", "pw2"} <= _gated(summary)  # the stream, through gamma
    assert "pw1" in _gated(summary)
    assert not any("gamma" in why for why in _ungated(summary).values())
    _, pruned, dense = _train_and_prune(lambda: ConvNeXtBlock(form))
    bn, pw2 = pruned.get_submodule("bn"), pruned.get_submodule("pw2")
    assert isinstance(bn, nn.BatchNorm2d)
    assert isinstance(pw2, nn.Conv2d)
    assert pruned.get_parameter("gamma").shape == (bn.num_features,) == (pw2.out_channels,)
    assert bn.num_features < 8
    small = gp.cost(pruned, torch.randn(3, 3, 6, 6))
    assert isinstance(small, gp.Cost)
    assert small.params < dense.params
    assert small.flops < dense.flops


@pytest.mark.parametrize("form", LITERAL)
def test_a_literal_channel_count_in_the_chain_becomes_the_kept_width(form: str) -> None:
    model = ConvNeXtBlock(form)
    gate_(model, torch.randn(2, 3, 6, 6))
    plan = export_plan(model)
    assert not plan.get("sizes")  # every channel open: nothing to rewrite
    gating = inserted_gating(model)
    for g in gating.group_gates:
        g.force_(torch.arange(g.n) % 3 != 0)  # C = 8: keep 5
    for g in gating.block_gates:
        g.force_(torch.ones(g.n, dtype=torch.bool))  # the branch kept
    model.eval()
    plan = export_plan(model)
    assert plan["slices"]["gamma"]["kind"] == "scale"
    assert [size for entries in plan["sizes"].values() for _, size in entries] == [5]
    pruned = _exact(model, lambda: ConvNeXtBlock(form), torch.Generator().manual_seed(3))
    assert pruned.get_parameter("gamma").shape == (5,)


@pytest.mark.parametrize("inplace", [True, False])
def test_timm_layer_scale_2d_on_a_batchnorm_stream_is_sliced(inplace: bool) -> None:
    summary = gate_(BNStream(inplace), torch.randn(2, 3, 6, 6))
    assert {"inp", "pw2.0", "pw2.1"} <= _gated(summary)
    assert not any("gamma" in why for why in _ungated(summary).values())
    for seed in (0, 1):
        _, pruned, dense = _train_and_prune(lambda: BNStream(inplace), seed)
        assert isinstance(pruned, BNStream)
        for ls in pruned.ls:
            assert isinstance(ls, LayerScale2d)
            assert ls.gamma.shape == (pruned.bn.num_features,)
        assert pruned.bn.num_features < 16
        small = gp.cost(pruned, torch.randn(3, 3, 6, 6))
        assert isinstance(small, gp.Cost)
        assert (small.flops, small.params) < (dense.flops, dense.params)


def test_a_channels_first_layer_norm_keeps_the_stream_and_gates_the_mlp() -> None:
    form = "g[:, None, None] * x"
    summary = gate_(ConvNeXtBlock(form, channels_first_ln=True), torch.randn(2, 3, 6, 6))
    assert "pw1" in _gated(summary)
    assert "stem" in _ungated(summary)
    _, pruned, _ = _train_and_prune(lambda: ConvNeXtBlock(form, channels_first_ln=True))
    assert isinstance(pruned, ConvNeXtBlock)
    assert pruned.gamma.shape == (8,)
    assert pruned.pw1.out_channels < 32


@pytest.mark.parametrize(
    ("shared", "reason"),
    [
        ("view", "parameter 'gamma' per channel, through node 'view', also read by node(s) 'sum"),
        ("param", "parameter 'gamma' per channel, also read by node(s) 'sum"),
        ("flip", "parameter 'gamma' per channel, computed from it when the model runs"),
        ("split", "parameter 'gamma' per channel, reshaped by node 'view' to (2, 4)"),
    ],
)
def test_a_chain_read_elsewhere_keeps_the_channels_whole_naming_gamma(
    shared: str, reason: str
) -> None:
    summary = gate_(SharedChain(shared), torch.randn(2, 3, 6, 6))
    assert reason in _ungated(summary)["pw"]
    model = SharedChain(shared)
    gate_(model, torch.randn(2, 3, 6, 6))
    _set_gates(model, torch.Generator().manual_seed(0))
    model.eval()
    pruned = _exact(model, lambda: SharedChain(shared), torch.Generator().manual_seed(1))
    assert isinstance(pruned, SharedChain)
    assert pruned.gamma.shape == (8,)


@settings(max_examples=15, deadline=None)
@given(width=st.integers(2, 12), form=st.sampled_from(list(FORMS)), data=st.data())
def test_random_widths_forms_and_closed_sets_prune_exactly(
    width: int, form: str, data: st.DataObject
) -> None:
    def factory() -> nn.Module:
        torch.manual_seed(1)
        return ConvNeXtBlock(form, width)

    model = factory()
    gen = torch.Generator().manual_seed(2)
    randomise_batchnorms(model, gen)
    summary = gate_(model, _img(2, gen))
    assert sorted(size for _, size in summary.channel_groups) == sorted([width, 4 * width])
    gating = inserted_gating(model)
    with torch.no_grad():
        for g in gating.group_gates:
            assert isinstance(g, HardConcreteGate)
            closed = data.draw(st.lists(st.booleans(), min_size=g.n, max_size=g.n))
            # closed, or open at a fractional value (log alpha in [0, 1])
            opened = data.draw(st.lists(st.floats(0.0, 1.0), min_size=g.n, max_size=g.n))
            la = [-10.0 if c else v for c, v in zip(closed, opened, strict=True)]
            g.log_alpha.copy_(torch.tensor(la))
        for g in gating.block_gates:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.fill_(0.5)
    model.eval()
    _exact(model, factory, gen)


def test_a_plan_keeping_other_entries_of_a_viewed_scale_names_the_parameter() -> None:
    """A hand-edited plan slicing ``gamma`` (read as ``gamma.view(1, -1, 1, 1)``) at other
    channels than those it multiplies is refused naming ``gamma`` (the message named the
    ``view`` node's method until 2026-12-07 23:12 UTC)."""
    form = "x * g.view(1, -1, 1, 1)"
    model = ConvNeXtBlock(form)
    gate_(model, torch.randn(2, 3, 8, 8))
    for g in gp.gate_modules(model):
        g.force_(torch.arange(g.n) % 2 == 0)
    plan = export_plan(model)
    assert plan["slices"]["gamma"]["kind"] == "scale"
    plan.pop("checksum", None)
    kept = plan["slices"]["gamma"]["out"]
    plan["slices"]["gamma"]["out"] = [c for c in range(8) if c not in kept][: len(kept)]
    with pytest.raises(ValueError, match="per-channel factor 'gamma'"):
        apply_plan(ConvNeXtBlock(form), plan)
