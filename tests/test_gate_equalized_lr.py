"""gate_ through parameter maps scaled by a Python number: equalized learning rate (StyleGAN's
mapping network, ProGAN), ``F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)``
and ``F.conv2d(x, self.weight * self.scale, ...)`` (before 2026-12-08 kept whole, "computed
from it when the model runs"). A number commutes with slicing and with the gates folded into
the parameter (``(W g) s = (W s) g``), so the pruned code keeps the expression with the sliced
parameter. Central check: pruned == gated in eval mode (<= 1e-5) at random gate states, its
cost equals the gated hard cost and is below dense, and the exported plan replays. Also: the
StyleGAN2 modulated convolution (its weight computed per sample from a style) names its
weight and the learned constant it reads as left whole, with the reason."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import budget_steps, check_pruned, examples, inserted_gating, random_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import gate_


class EqualLinear(nn.Module):
    """StyleGAN2's EqualLinear, with the scale written in one of several forms."""

    def __init__(self, i: int, o: int, form: str, lr_mul: float = 0.01) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / lr_mul)
        self.bias = nn.Parameter(torch.randn(o))
        self.scale = (1 / math.sqrt(i)) * lr_mul
        self.lr_mul = lr_mul
        self.form = form

    def forward(self, x: Tensor) -> Tensor:
        f, s = self.form, self.scale
        if f == "stylegan":
            out = F.linear(x, self.weight * self.scale, bias=self.bias * self.lr_mul)  # (B, o)
        elif f == "left":
            out = F.linear(x, s * self.weight, self.lr_mul * self.bias)  # (B, o)
        elif f == "divide":
            out = F.linear(x, self.weight / (1 / s), self.bias.mul(self.lr_mul))  # (B, o)
        elif f == "torch_mul":
            out = F.linear(x, torch.mul(self.weight, s), self.bias * self.lr_mul)  # (B, o)
        elif f == "matmul_t":  # x @ (W s).T + b: the number inside a transpose
            out = x @ (self.weight.mul(s)).T + self.bias  # (B, o)
        else:
            raise ValueError(f"form {f!r}")
        return F.leaky_relu(out, 0.2) * math.sqrt(2)  # (B, o)


class Mapping(nn.Module):
    def __init__(self, form: str, d: int = 8, n: int = 3) -> None:
        super().__init__()
        self.mapping = nn.Sequential(*[EqualLinear(d, d, form) for _ in range(n)])
        self.head = nn.Linear(d, 4)

    def forward(self, z: Tensor) -> Tensor:
        return self.head(self.mapping(z))  # (B, 4)


class EqualConv(nn.Module):
    """ProGAN's equalized conv: ``F.conv2d(x, self.weight * self.scale, self.bias * m)``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.randn(cout))
        self.scale = 1 / math.sqrt(cin * 9)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias * 0.5, padding=1)  # (B, cout, H, W)


class EqualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = EqualConv(3, 6), EqualConv(6, 5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.c1(x), 0.2)  # (B, 6, H, W)
        h = F.leaky_relu(self.c2(h), 0.2)  # (B, 5, H, W)
        return self.fc(h.mean((2, 3)))  # (B, 4)


Case = tuple[Callable[[], nn.Module], tuple[int, ...], list[int]]
CASES: dict[str, Case] = {
    **{f: (lambda f=f: Mapping(f), (3, 8), [8, 8, 8]) for f in ("stylegan", "left", "divide")},
    **{f: (lambda f=f: Mapping(f), (3, 8), [8, 8, 8]) for f in ("torch_mul", "matmul_t")},
    "conv": (EqualCNN, (2, 3, 5, 5), [5, 6]),
}


@pytest.mark.parametrize("key", sorted(CASES))
def test_scaled_parameter_maps_are_gated(key: str) -> None:
    factory, shape, sizes = CASES[key]
    model = factory()
    summary = gate_(model, torch.randn(*shape))
    assert sorted(n for _, n in summary.channel_groups) == sizes, str(summary)
    assert not summary.ungated_params, str(summary)


@pytest.mark.parametrize("key", sorted(CASES))
@settings(max_examples=examples(6), deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_pruned_equals_gated_at_random_gate_states(key: str, seed: int) -> None:
    factory, shape, sizes = CASES[key]
    torch.manual_seed(seed)
    model = factory()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    summary = gate_(model, x)
    assert sorted(n for _, n in summary.channel_groups) == sorted(sizes), str(summary)
    random_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory, batches=(1, 4))
    dense, small = gp.cost(factory(), x), gp.cost(pruned, x)
    assert isinstance(dense, gp.Cost)
    assert isinstance(small, gp.Cost)
    assert small.params <= dense.params


def test_closed_units_are_sliced_from_weight_and_bias_and_the_scale_stays() -> None:
    torch.manual_seed(4)
    model = Mapping("stylegan")
    x = torch.randn(3, 8)
    gate_(model, x)
    gating = inserted_gating(model)
    first = gating.group_gates[0]
    first.force_(torch.tensor([True, False, True, True, False, True, True, True]))
    for g in gating.group_gates[1:]:
        g.force_(torch.ones(g.n, dtype=torch.bool))
    model.eval()
    pruned = gp.prune(model)
    layer = pruned.mapping[0]
    assert tuple(layer.weight.shape) == (6, 8)
    assert tuple(layer.bias.shape) == (6,)
    assert tuple(pruned.mapping[1].weight.shape) == (8, 6)
    assert layer.scale == model.mapping[0].scale  # the code and its number are unchanged
    keep = [0, 2, 3, 5, 6, 7]
    with torch.no_grad():
        assert torch.equal(layer.bias, model.mapping[0].bias[keep])
        xi = torch.randn(5, 8)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    dense, small = gp.cost(Mapping("stylegan"), x), gp.cost(pruned, x)
    assert isinstance(dense, gp.Cost)
    assert isinstance(small, gp.Cost)
    assert small.flops < dense.flops
    assert small.params < dense.params


@pytest.mark.parametrize("key", ["stylegan", "conv"])
def test_trains_under_a_budget_then_prunes_exactly(key: str) -> None:
    factory, shape, sizes = CASES[key]
    torch.manual_seed(5)
    model = factory()
    x = torch.randn(*shape)
    summary = gate_(model, x)
    assert sorted(n for _, n in summary.channel_groups) == sorted(sizes), str(summary)
    budget = gp.Budget(model, x[:1], flops=0.5)
    gen = torch.Generator().manual_seed(5)
    xs = torch.randn(8, *shape[1:], generator=gen)
    budget_steps(model, budget, 5, lambda: xs)
    check_pruned(model, x, gen, factory)


class NotANumber(nn.Module):
    """Weights computed otherwise: reciprocal (``s / W``) and times a tensor buffer."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 8)
        self.W = nn.Parameter(torch.randn(5, 8))
        self.register_buffer("s", torch.tensor(0.5))
        self.form = form

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.l1(x))  # (B, 8)
        w = 2.0 / self.W if self.form == "reciprocal" else self.W * self.s  # (5, 8)
        return F.linear(h, w)  # (B, 5)


@pytest.mark.parametrize("form", ["reciprocal", "buffer"])
def test_other_computed_weights_stay_whole_with_the_reason(form: str) -> None:
    model = NotANumber(form)
    x = torch.randn(3, 4)
    summary = gate_(model, x)
    text = str(summary)
    assert "ungated   weight W: computed from it when the model runs" in text, text
    assert "l1" not in {p for ps, _ in summary.channel_groups for p in ps}, text
    model.eval()
    with torch.no_grad():
        assert (gp.prune(model)(x) - model(x)).abs().max().item() <= 1e-5


class ModConv(nn.Module):
    """StyleGAN2's modulated conv: the weight times a per-sample style, demodulated, run as a
    grouped conv over the batch."""

    def __init__(self, cin: int, cout: int, sdim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, cout, cin, 3, 3))
        self.scale = 1 / math.sqrt(cin * 9)
        self.modulation = nn.Linear(sdim, cin)
        self.cout = cout

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        b, c, h, w = x.shape
        s = self.modulation(style).view(b, 1, c, 1, 1)  # (B, 1, cin, 1, 1)
        weight = self.scale * self.weight * s  # (B, cout, cin, 3, 3)
        d = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)  # (B, cout)
        weight = (weight * d.view(b, self.cout, 1, 1, 1)).view(b * self.cout, c, 3, 3)
        out = F.conv2d(x.view(1, b * c, h, w), weight, padding=1, groups=b)  # (1, B cout, H, W)
        return out.view(b, self.cout, h, w)  # (B, cout, H, W)


class Synthesis(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.style = nn.Linear(6, 6)
        self.const = nn.Parameter(torch.randn(1, 4, 4, 4))
        self.conv = ModConv(4, 3, 6)

    def forward(self, z: Tensor) -> Tensor:
        w = self.style(z)  # (B, 6)
        x = self.const.repeat(z.shape[0], 1, 1, 1)  # (B, 4, 4, 4)
        return self.conv(x, w)  # (B, 3, 4, 4)


def test_modulated_conv_names_its_weight_and_the_constant_as_left_whole() -> None:
    model = Synthesis()
    z = torch.randn(2, 6)
    summary = gate_(model, z)
    whole = dict(summary.ungated_params)
    assert "computed per sample from the model's input" in whole["conv.weight"], str(summary)
    assert "read as the input channels of node 'conv2d'" in whole["const"], str(summary)
    assert "style.weight" not in whole, str(summary)
    model.eval()
    with torch.no_grad():
        assert (gp.prune(model)(z) - model(z)).abs().max().item() <= 1e-5
