"""Convolutions written with the model's own parameters: an ``nn.Conv1d`` / ``nn.Conv2d``
subclass with its own ``forward`` (the causal convolution of WaveNet/TCN code: pad, then
``super().forward`` or ``self._conv_forward``), which fx traces to ``F.conv1d(x, self.weight,
self.bias, ...)``, is gated and pruned like the layer (before 2026-12-07 22:37 UTC it got no gate
and no summary line). A weight computed when the model runs (weight standardisation) or a
grouped one is kept whole, with the reason in the summary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gating_helpers import budget_optimizer, check_pruned, examples, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import gate_


class CausalConv1d(nn.Conv1d):
    """Left-padded so output t sees inputs <= t; ``super().forward``."""

    def forward(self, x: Tensor) -> Tensor:
        left = self.dilation[0] * (self.kernel_size[0] - 1)
        return super().forward(F.pad(x, (left, 0)))  # (B, C_out, L)


class CausalConvForward1d(nn.Conv1d):
    """The same, through ``self._conv_forward(x, self.weight, self.bias)``."""

    def forward(self, x: Tensor) -> Tensor:
        left = self.dilation[0] * (self.kernel_size[0] - 1)
        return self._conv_forward(F.pad(x, (left, 0)), self.weight, self.bias)  # (B, C_out, L)


class SameConv2d(nn.Conv2d):
    """'same' output size for an even kernel: asymmetric padding (right and bottom)."""

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size[0] - 1
        return super().forward(F.pad(x, (k // 2, k - k // 2, k // 2, k - k // 2)))  # (B, C, H, W)


class WSConv2d(nn.Conv2d):
    """Weight standardisation: the weight is computed when the model runs, never sliced."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)  # (O, I, k, k)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)  # (B, O, H, W)


class TCN(nn.Module):
    """A WaveNet/TCN-style stack: causal stem, residual blocks (dilated causal conv, 1x1)."""

    def __init__(self, conv: type[nn.Conv1d], width: int = 12, hidden: int = 10) -> None:
        super().__init__()
        self.stem = conv(3, width, 2)
        self.dil = nn.ModuleList([conv(width, hidden, 2, dilation=d) for d in (1, 2)])
        self.mix = nn.ModuleList([conv(hidden, width, 1) for _ in (1, 2)])
        self.head = nn.Conv1d(width, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))  # (B, W, L)
        for dil, mix in zip(self.dil, self.mix, strict=True):
            h = h + mix(torch.relu(dil(h)))  # (B, W, L)
        return self.head(h)  # (B, 2, L)


class SameNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = SameConv2d(3, 8, 2)
        self.c2 = SameConv2d(8, 6, 4)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))))  # (B, 2, H, W)


class WholeNet(nn.Module):
    """A weight-standardised conv and a grouped subclass between plain convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.ws = WSConv2d(8, 8, 3, padding=1)
        self.grouped = SameConv2d(8, 8, 2, groups=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.ws(torch.relu(self.c1(x))))  # (B, 8, H, W)
        return self.head(torch.relu(self.grouped(h)))  # (B, 2, H, W)


def _train(model: nn.Module, x: Tensor, gen: torch.Generator, steps: int = 3) -> None:
    budget = gp.Budget(model, x, flops=0.6)
    opt = budget_optimizer(model, budget)
    model.train()
    for _ in range(steps):
        xb = torch.randn(x.shape, generator=gen)
        out = model(xb)
        loss = out.pow(2).mean() + budget.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _set_gates(model: nn.Module, gen: torch.Generator, closed: float = 0.4) -> None:
    """Some channels closed, the rest open at fractional (and whole) values."""
    with torch.no_grad():
        for gate in inserted_gating(model).group_gates:
            assert isinstance(gate, HardConcreteGate)
            la = torch.empty(gate.n).uniform_(-1.0, 4.0, generator=gen)
            shut = torch.rand(gate.n, generator=gen) < closed
            la[shut] = -10.0
            la[0] = 4.0  # one kept everywhere
            gate.log_alpha.copy_(la)


def _check_subclass_layers(pruned: nn.Module, cls: type[nn.Module]) -> None:
    """The pruned model keeps the user's class, whose in/out channels follow its weight."""
    found = [m for m in pruned.modules() if type(m) is cls]
    assert found, f"no {cls.__name__} left in the pruned model"
    for m in found:
        assert isinstance(m, nn.Conv1d | nn.Conv2d)
        assert (m.out_channels, m.in_channels) == tuple(m.weight.shape[:2])
        assert f"{cls.__name__}({m.in_channels}, {m.out_channels}" in repr(m)


def test_tcn_subclass_summary_names_its_weights() -> None:
    torch.manual_seed(0)
    model = TCN(CausalConv1d).eval()
    summary = gate_(model, torch.randn(2, 3, 20))
    producers = {p for ps, _ in summary.channel_groups for p in ps}
    assert "stem.weight" in producers
    assert {"dil.0.weight", "dil.1.weight"} <= producers
    assert summary.n_gates > 0


def test_tcn_subclass_gated_trained_pruned_exact() -> None:
    for conv in (CausalConv1d, CausalConvForward1d):
        torch.manual_seed(1)
        gen = torch.Generator().manual_seed(1)
        model = TCN(conv)
        x = torch.randn(3, 3, 20, generator=gen)
        dense = gp.cost(model, x)
        gate_(model, x)
        _train(model, x, gen)
        _set_gates(model, gen)
        pruned = check_pruned(model, x, gen, factory=lambda conv=conv: TCN(conv), batches=(2, 5))
        assert isinstance(dense, gp.Cost)
        c = gp.cost(pruned, x)
        assert isinstance(c, gp.Cost)
        assert c.flops < dense.flops
        assert c.params < dense.params
        _check_subclass_layers(pruned, conv)
        with torch.no_grad():  # another length: the causal padding is the module's own code
            x2 = torch.randn(2, 3, 33, generator=gen)
            assert (pruned(x2) - model(x2)).abs().max().item() <= 1e-5


def test_same_padding_conv2d_subclass_pruned_exact() -> None:
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    model = SameNet()
    x = torch.randn(2, 3, 9, 9, generator=gen)
    summary = gate_(model, x)
    assert {p for ps, _ in summary.channel_groups for p in ps} == {"c1.weight", "c2.weight"}
    _train(model, x, gen)
    _set_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory=SameNet, batches=(1, 3))
    _check_subclass_layers(pruned, SameConv2d)
    with torch.no_grad():
        x2 = torch.randn(2, 3, 12, 7, generator=gen)
        assert (pruned(x2) - model(x2)).abs().max().item() <= 1e-5


def test_standardised_and_grouped_weights_kept_whole_with_reason() -> None:
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    model = WholeNet()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    summary = gate_(model, x)
    whole = dict(summary.ungated_params)
    assert "computed from it" in whole["ws.weight"]
    assert "groups=2" in whole["grouped.weight"]
    assert "ws.weight" in str(summary)
    assert "grouped.weight" in str(summary)
    assert summary.channel_groups == []  # every group reads or feeds a weight kept whole
    ws_before = model.ws.weight.detach().clone()
    pruned = check_pruned(model, x, gen, factory=WholeNet)
    assert isinstance(pruned.ws, WSConv2d)
    assert torch.equal(pruned.ws.weight, ws_before)


@settings(max_examples=examples(8), deadline=None)
@given(
    width=st.integers(2, 9),
    hidden=st.integers(2, 9),
    closed=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    forward=st.sampled_from([CausalConv1d, CausalConvForward1d]),
)
def test_tcn_random_widths_and_closed_sets(
    width: int, hidden: int, closed: float, seed: int, forward: type[nn.Conv1d]
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TCN(forward, width, hidden).eval()
    x = torch.randn(2, 3, 11, generator=gen)
    summary = gate_(model, x)
    gated = {p for ps, _ in summary.channel_groups for p in ps}
    assert gated == {"stem.weight", "mix.0.weight", "mix.1.weight", "dil.0.weight", "dil.1.weight"}
    _set_gates(model, gen, closed)
    check_pruned(model, x, gen, factory=lambda: TCN(forward, width, hidden))
