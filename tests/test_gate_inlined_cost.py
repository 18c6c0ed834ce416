"""Childless user modules that fx traces through (``gate_`` sees their ops, not a call):
the gated cost counts them as ``cost`` counts them on plain models (whole, with their
handler), rewritten code still calls them, and unknown ones are refused up front.

Before: ``cost(gated, hard=True)`` left out torchvision's ``LayerNorm2d`` (an ``nn.LayerNorm``
subclass with its own ``forward``) and every ``register_cost``'d module (RMSNorm, DropPath),
so the budget's reference and ``cost(prune(model))`` disagreed; a forward rewritten by
``prune`` inlined them (their class and ``eps`` gone, their FLOPs no longer counted); an
unregistered one was free in the gated cost and a ``TypeError`` in ``cost(dense)``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import inserted_gating, random_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gating import gate_


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: normalises the channels of (B, C, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Scale(nn.Module):
    """An element-wise module on prunable channels (its cost scales with them)."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x


class Unknown(nn.Module):
    """A leaf cost() does not know, holding a tensor (a parameter-free one is code)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("two", torch.tensor(2.0))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.two


gatedprune.register_cost(RMSNorm, lambda m, i, o: 4 * o.numel())
gatedprune.register_cost(Scale, lambda m, i, o: o.numel())


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.norm = LayerNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.scale = Scale()
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.scale(self.conv(self.norm(self.stem(x)))))  # (B, 16, H, W)
        return self.head(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = RMSNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.scale = Scale()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.scale(torch.relu(self.fc1(self.norm(x)))))


class Stack(nn.Module):
    def __init__(self, d: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def _check(model: nn.Module, x: Tensor, gen: torch.Generator) -> nn.Module:
    """hard cost == cost(prune), prune == gated on fresh inputs; returns the pruned model."""
    model.eval()
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (float(hard.flops), float(hard.params)) == (float(c.flops), float(c.params))
    with torch.no_grad():
        xi = torch.randn(5, *x.shape[1:], generator=gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    return pruned


@pytest.mark.parametrize("factory", [ConvNet, Stack])
def test_all_open_gated_cost_equals_the_dense_cost(factory: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 3, 16, 16) if factory is ConvNet else torch.randn(2, 8)
    dense = gatedprune.cost(copy.deepcopy(model), x)
    assert isinstance(dense, Cost)
    gate_(model, x, shortcuts="dense" if factory is Stack else None)
    hard = gatedprune.cost(model, x, hard=True)  # new shortcuts start closed
    assert (float(hard.flops), float(hard.params)) == (dense.flops, dense.params)
    gating = inserted_gating(model)
    for g in (*gating.group_gates, *gating.block_gates):  # surely open: P(open) = 1
        g.force_(torch.ones(g.n, dtype=torch.bool))
    if gating.edge_gate is not None:  # and the new shortcuts surely closed
        gating.edge_gate.force_(torch.zeros(gating.edge_gate.n, dtype=torch.bool))
    expected = gatedprune.cost(model, x)
    assert float(expected.flops.detach()) == pytest.approx(dense.flops, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shortcuts=st.booleans())
def test_random_gates_hard_cost_is_the_pruned_cost(seed: int, shortcuts: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Stack()
    x = torch.randn(2, 8, generator=gen)
    gate_(model, x, shortcuts="dense" if shortcuts else None)
    gating = inserted_gating(model)
    random_gates(model, gen, low=-6.0)
    with torch.no_grad():  # blocks and new shortcuts at random too
        for g in (*gating.block_gates, gating.edge_gate):
            if g is not None:
                g.log_alpha.copy_(torch.empty(g.n).uniform_(-6.0, 4.0, generator=gen))
    _check(model, x, gen)


def test_conv_net_with_layernorm2d_and_closed_channels() -> None:
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    model = ConvNet()
    x = torch.randn(2, 3, 16, 16)
    gate_(model, x)
    for g in gatedprune.gate_modules(model):  # close half of every gated group
        g.force_(torch.arange(g.n) % 2 == 0)
    pruned = _check(model, x, gen)
    dense = gatedprune.cost(ConvNet(), x)
    assert gatedprune.cost(pruned, x).flops < dense.flops
    assert isinstance(pruned.get_submodule("norm"), LayerNorm2d)


def test_rewritten_forward_still_calls_the_users_modules() -> None:
    """A closed block makes prune rewrite the stack's forward; its RMSNorm and Scale modules
    stay modules (class, eps) rather than inlined copies of their ops."""
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    model = Stack()
    x = torch.randn(2, 8)
    gate_(model, x, shortcuts="dense")
    gating = inserted_gating(model)
    assert gating.block_gates
    gating.block_gates[1].force_(torch.zeros(1, dtype=torch.bool))
    pruned = _check(model, x, gen)
    called: list[str] = []
    for name, m in pruned.named_modules():
        if isinstance(m, RMSNorm | Scale):
            m.register_forward_hook(lambda mod, i, o, name=name: called.append(name))
    with torch.no_grad():
        pruned(x)
    assert "norm" in called
    assert "blocks.0.norm" in called
    assert "blocks.0.scale" in called
    assert not any(n.startswith("blocks.1.") for n in called)  # the closed block is gone
    norm = pruned.get_submodule("norm")
    assert isinstance(norm, RMSNorm)
    with torch.no_grad():
        before = pruned(x)
        norm.eps = 10.0  # its setting is read at run time, not baked into the code
        assert (pruned(x) - before).abs().max().item() > 1e-3


def test_unregistered_traced_through_module_is_refused_by_gate() -> None:
    """cost(dense) refuses it: gate_ (which builds the gated cost) does too, naming it."""
    net = nn.Sequential(nn.Linear(4, 8), Unknown(), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"does not know how to count.*1 \(Unknown\)"):
        gatedprune.cost(net, x)
    with pytest.raises(TypeError, match=r"does not know how to count.*1 \(Unknown\)"):
        gate_(net, x)
