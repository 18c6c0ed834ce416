"""Layers of third-party model libraries that fx traces through to functional calls on their
own parameters, replicated without importing those libraries: timm's ``Linear`` (an
``nn.Linear`` subclass whose ``forward`` calls ``F.linear(input, self.weight, self.bias)``), its
``BatchNormAct2d`` (an ``nn.BatchNorm2d`` subclass with ``drop`` and ``act`` children whose
``forward`` calls ``F.batch_norm`` on its own parameters and buffers) and LeViT's
``LinearNorm`` (``self.bn(x.flatten(0, 1)).reshape_as(x)``). Each is gated and pruned like the
plain layer (before 2026-12-08 they kept the channels around them whole)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gating_helpers import (
    check_pruned,
    examples,
    random_gates,
    randomise_batchnorms,
    randomise_gates,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import gate_


class TimmLinear(nn.Linear):
    """timm/layers/linear.py:14, ``class Linear(nn.Linear)``."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            bias = self.bias.to(dtype=input.dtype) if self.bias is not None else None
            return F.linear(input, self.weight.to(dtype=input.dtype), bias=bias)
        else:
            return F.linear(input, self.weight, self.bias)  # (..., out)


class Head(nn.Module):
    """MobileNetV3's head: conv_head, act, pool, flatten, then timm's Linear classifier."""

    def __init__(self, width: int = 12, bias: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_head = nn.Conv2d(6, width, 1)
        self.fc = TimmLinear(width, 7, bias=bias)
        self.classifier = TimmLinear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv_head(F.relu(self.stem(x))))  # (B, W, H, W)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)  # (B, W)
        return self.classifier(F.relu(self.fc(h)))  # (B, 3)


def _gated(summary: gp.GatingSummary) -> set[str]:
    return {p for ps, _ in summary.channel_groups for p in ps}


def test_linear_subclass_input_and_output_gated() -> None:
    torch.manual_seed(0)
    model = Head().eval()
    summary = gate_(model, torch.randn(2, 3, 6, 6))
    assert {"conv_head", "fc.weight", "stem"} <= _gated(summary)
    assert "counts whole" not in str(summary)


@settings(max_examples=examples(6), deadline=None)
@given(width=st.integers(2, 16), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_subclass_pruned_exact(width: int, bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Head(width, bias)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    gate_(model, x)
    random_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory=lambda: Head(width, bias), batches=(1, 3))
    for m in (pruned.fc, pruned.classifier):
        assert type(m) is TimmLinear
        assert (m.out_features, m.in_features) == tuple(m.weight.shape)


class LinearNorm(nn.Module):
    """timm/models/levit.py:110, ``self.bn(x.flatten(0, 1)).reshape_as(x)``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)  # (B, N, C)
        return self.bn(x.flatten(0, 1)).reshape_as(x)  # (B, N, C)


class LevitMlp(nn.Module):
    """LeViT's residual MLP (timm/models/levit.py:494): ln1, act, ln2, added to its input."""

    def __init__(self, dim: int = 8, hidden: int = 12, view: bool = False) -> None:
        super().__init__()
        self.embed = LinearNorm(5, dim)
        self.ln1 = LinearNorm(dim, hidden)
        self.ln2 = LinearNorm(hidden, dim)
        self.head = nn.Linear(dim, 3)
        self.view = view

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, N, D)
        if self.view:  # the same through view_as
            h = F.relu(h.flatten(0, 1).view_as(h))  # (B, N, D)
        h = h + self.ln2(F.hardswish(self.ln1(h)))  # (B, N, D)
        return self.head(h.mean(1))  # (B, 3)


def test_reshape_as_gated() -> None:
    torch.manual_seed(3)
    model = LevitMlp().eval()
    summary = gate_(model, torch.randn(2, 4, 5))
    assert [sorted(ps) for ps, _ in summary.channel_groups] == [
        ["embed.linear", "ln2.linear"],
        ["ln1.linear"],
    ]
    assert "does not prune through" not in str(summary)
    assert [site for _, site, _ in summary.blocks] == ["ln2.bn"]  # through the reshape_as


@settings(max_examples=examples(6), deadline=None)
@given(
    dim=st.integers(2, 10),
    hidden=st.integers(2, 10),
    view=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reshape_as_pruned_exact(dim: int, hidden: int, view: bool, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LevitMlp(dim, hidden, view)
    randomise_batchnorms(model, gen)
    x = torch.randn(2, 4, 5, generator=gen)
    gate_(model, x)
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory=lambda: LevitMlp(dim, hidden, view), batches=(1, 3))


class OtherShape(nn.Module):
    """``reshape_as`` of a tensor carrying other channels of the same width: pruned alike."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, b = F.relu(self.a(x)), F.relu(self.b(x))  # (B, N, 6)
        return self.head(a.flatten(0, 1).reshape_as(b) * b)  # (B, N, 2)


def test_reshape_as_couples_the_shape_donor() -> None:
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    model = OtherShape()
    x = torch.randn(2, 3, 4, generator=gen)
    summary = gate_(model, x)
    assert [sorted(ps) for ps, _ in summary.channel_groups] == [["a", "b"]]
    random_gates(model, gen)
    check_pruned(model, x, gen, factory=OtherShape)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm/layers/norm_act.py:56, BatchNorm + activation: a ``BatchNorm2d`` subclass with
    ``drop`` and ``act`` children whose forward is a copy of ``BatchNorm2d.forward``."""

    def __init__(
        self,
        num_features: int,
        act_layer: type[nn.Module] | None = nn.ReLU,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, track_running_stats=track_running_stats)
        self.drop = nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.momentum is None:  # noqa: SIM108 (as timm writes it)
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:  # noqa: SIM102 (as timm writes it)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # use cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:  # use exponential moving average
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(  # timm/layers/norm_act.py:136
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )  # (B, C, H, W)
        x = self.drop(x)
        x = self.act(x)
        return x  # (B, C, H, W)


class InvertedResidual(nn.Module):
    """timm's InvertedResidual (MobileNetV2/V3, EfficientNet): 1x1 expand, depthwise, 1x1
    project, each with a BatchNormAct2d (the last without activation), added to the input."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv_pw = nn.Conv2d(dim, hidden, 1, bias=False)
        self.bn1 = BatchNormAct2d(hidden, act)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = BatchNormAct2d(hidden, act)
        self.conv_pwl = nn.Conv2d(hidden, dim, 1, bias=False)
        self.bn3 = BatchNormAct2d(dim, None)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))  # (B, hidden, H, W)
        return x + self.bn3(self.conv_pwl(h))  # (B, dim, H, W)


class EffNet(nn.Module):
    """A stem conv with BatchNormAct2d, two inverted residuals, a 1x1 head and a classifier."""

    def __init__(
        self, dim: int = 6, hidden: int = 10, act: type[nn.Module] = nn.SiLU, track: bool = True
    ) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, dim, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(dim, act, track_running_stats=track)
        self.blocks = nn.Sequential(*[InvertedResidual(dim, hidden, act) for _ in range(2)])
        self.conv_head = nn.Conv2d(dim, 12, 1, bias=False)
        self.bn2 = BatchNormAct2d(12, act)
        self.classifier = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.bn1(self.conv_stem(x)))  # (B, dim, H, W)
        h = self.bn2(self.conv_head(h))  # (B, 12, H, W)
        return self.classifier(h.mean((2, 3)))  # (B, 3)


def test_batchnorm_act_channels_and_blocks_gated() -> None:
    torch.manual_seed(5)
    model = EffNet()
    summary = gate_(model, torch.randn(2, 3, 8, 8))
    gated = _gated(summary)
    assert gated == {
        "conv_stem",
        "blocks.0.conv_pwl",
        "blocks.1.conv_pwl",
        "blocks.0.conv_pw",
        "blocks.1.conv_pw",
        "conv_head",
    }
    assert "does not prune through" not in str(summary)
    assert len(summary.blocks) == 2


@settings(max_examples=examples(8), deadline=None)
@given(
    dim=st.integers(2, 8),
    hidden=st.integers(2, 12),
    act=st.sampled_from([nn.SiLU, nn.ReLU, nn.Hardswish]),
    track=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batchnorm_act_pruned_exact(
    dim: int, hidden: int, act: type[nn.Module], track: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = EffNet(dim, hidden, act, track)
    with torch.no_grad():  # random affine parameters (and running statistics, if tracked)
        for m in model.modules():
            if isinstance(m, BatchNormAct2d):
                m.weight.normal_(1.0, 0.3, generator=gen)
                m.bias.normal_(0.0, 0.3, generator=gen)
                if m.running_mean is not None and m.running_var is not None:
                    m.running_mean.normal_(0.0, 0.5, generator=gen)
                    m.running_var.uniform_(0.5, 2.0, generator=gen)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    gate_(model, x)
    model.train()
    model(x).pow(2).mean().backward()  # the gates in the norm's weight get gradients
    gating = model.gatedprune
    assert len(gating.group_gates) == 4
    assert all(g.log_alpha.grad is not None for g in gating.group_gates)
    randomise_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory=lambda: EffNet(dim, hidden, act, track))
    for m in pruned.modules():
        if isinstance(m, BatchNormAct2d):
            assert m.num_features == m.weight.shape[0] == m.bias.shape[0]
            if m.running_mean is not None:
                assert m.running_mean.shape == m.weight.shape


class GroupNormAct(nn.GroupNorm):
    """timm/layers/norm_act.py:402, GroupNorm + activation (``_fast_norm`` off)."""

    def __init__(self, num_channels: int, num_groups: int, act_layer: type[nn.Module]) -> None:
        super().__init__(num_groups, num_channels)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)  # (B, C, H, W)
        x = self.drop(x)
        x = self.act(x)
        return x  # (B, C, H, W)


class GNNet(nn.Module):
    """Convs with GroupNormAct after them, one residual branch ending in a GroupNormAct."""

    def __init__(self, groups: int = 3, per: int = 2, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        width = groups * per
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, width, 3, padding=1)
        self.n1 = GroupNormAct(width, groups, act)
        self.c2 = nn.Conv2d(width, 4, 1)
        self.n2 = GroupNormAct(4, 2, nn.ReLU)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))  # (B, 4, H, W)
        h = h + self.n2(self.c2(self.n1(self.c1(h))))  # (B, 4, H, W)
        return self.head(h.mean((2, 3)))  # (B, 3)


def test_group_norm_act_gated_by_runs() -> None:
    torch.manual_seed(6)
    model = GNNet()
    summary = gate_(model, torch.randn(2, 3, 6, 6))
    groups = [(sorted(ps), k) for ps, k in summary.channel_groups]
    assert groups == [(["c2", "stem"], 2), (["c1"], 3)]  # a gate per run each norm normalises
    assert [site for _, site, _ in summary.blocks] == ["n2.weight"]


@settings(max_examples=examples(6), deadline=None)
@given(
    groups=st.integers(2, 4),
    per=st.integers(1, 3),
    act=st.sampled_from([nn.SiLU, nn.ReLU]),
    seed=st.integers(0, 2**16),
)
def test_group_norm_act_pruned_exact(
    groups: int, per: int, act: type[nn.Module], seed: int
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = GNNet(groups, per, act)
    with torch.no_grad():
        for m in (model.n1, model.n2):
            m.weight.normal_(1.0, 0.3, generator=gen)
            m.bias.normal_(0.0, 0.3, generator=gen)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    gate_(model, x)
    assert len(model.gatedprune.group_gates) == 2
    randomise_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory=lambda: GNNet(groups, per, act), batches=(1, 3))
    runs = {"n1": per, "n2": 2}  # channels per group, unchanged by pruning whole runs
    for name, m in pruned.named_modules():  # (none when the block gate removed the branch)
        if isinstance(m, GroupNormAct):
            assert m.num_channels == m.weight.shape[0] == m.num_groups * runs[name]
