"""prune and apply_plan keep the memory format of the weights they slice: a channels_last
(channels_last_3d) convolution weight stays one (before 2026-12-07 21:00 UTC every sliced
convolution came back contiguous (NCHW) while the untouched ones kept channels_last: mixed
layouts, exact results, slower)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gatedprune
from gatedprune import apply_plan, export_plan

CL, CL3 = torch.channels_last, torch.channels_last_3d


def _conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def _grouped() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _transposed() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 12, 2, stride=2),
        nn.ReLU(),
        nn.Conv2d(12, 4, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _conv3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(3, 16, 3, padding=1),
        nn.BatchNorm3d(16),
        nn.ReLU(),
        nn.Conv3d(16, 8, 3, padding=1),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
    )


NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], torch.memory_format]] = {
    "conv2d": (_conv, (4, 3, 8, 8), CL),
    "grouped": (_grouped, (4, 3, 8, 8), CL),
    "transposed": (_transposed, (4, 3, 8, 8), CL),
    "conv3d": (_conv3d, (2, 3, 4, 6, 6), CL3),
}


def _conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    }


def _gated(
    kind: str, masks: list[list[bool]] | None, *, before: bool
) -> tuple[nn.Module, torch.Tensor]:
    make, shape, fmt = NETS[kind]
    torch.manual_seed(0)
    net = make()
    x = torch.randn(shape)
    if before:  # converted before gate_ or after: the same
        net = net.to(memory_format=fmt)
    gatedprune.gate_(net, x.contiguous(memory_format=fmt))
    net = net.to(memory_format=fmt).eval()
    for i, g in enumerate(net.gatedprune.group_gates):
        mask = torch.arange(g.n) % 4 != 0 if masks is None else torch.tensor(masks[i][: g.n])
        g.force_(mask)
    return net, x.contiguous(memory_format=fmt)


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("before", [True, False])
def test_sliced_weights_keep_channels_last(kind: str, before: bool) -> None:
    fmt = NETS[kind][2]
    net, x = _gated(kind, None, before=before)
    small = gatedprune.prune(net)
    weights, source = _conv_weights(small), _conv_weights(net)
    sliced = [n for n, w in weights.items() if w.shape != source[n].shape]
    assert sliced  # the test slices something
    for name, w in weights.items():
        assert source[name].is_contiguous(memory_format=fmt)
        assert w.is_contiguous(memory_format=fmt), (name, w.stride())
        if name in sliced and w[0].numel() > 1 and w.shape[1] > 1:
            assert not w.is_contiguous(), name  # really channels-last, not both at once
    with torch.no_grad():
        assert (small(x) - net(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", list(NETS))
def test_apply_plan_keeps_channels_last(kind: str) -> None:
    make, _, fmt = NETS[kind]
    net, x = _gated(kind, None, before=False)
    small = gatedprune.prune(net)
    torch.manual_seed(1)
    fresh = apply_plan(make().to(memory_format=fmt), export_plan(net))
    fresh.load_state_dict(small.state_dict())
    for name, w in _conv_weights(fresh).items():
        assert w.is_contiguous(memory_format=fmt), (name, w.stride())
    with torch.no_grad():
        assert (fresh.eval()(x) - small(x)).abs().max().item() <= 1e-5


def test_contiguous_weights_stay_contiguous() -> None:
    torch.manual_seed(0)
    net = _conv()
    x = torch.randn(4, 3, 8, 8)
    gatedprune.gate_(net, x)
    for g in net.gatedprune.group_gates:
        g.force_(torch.arange(g.n) % 4 != 0)
    small = gatedprune.prune(net.eval())
    for name, w in _conv_weights(small).items():
        assert w.is_contiguous(), name


@settings(max_examples=examples(12), deadline=None)
@given(
    kind=st.sampled_from(["conv2d", "conv3d"]),
    masks=st.lists(st.lists(st.booleans(), min_size=16, max_size=16), min_size=2, max_size=2),
)
def test_random_gate_states_keep_the_format(kind: str, masks: list[list[bool]]) -> None:
    fmt = NETS[kind][2]
    net, x = _gated(kind, masks, before=False)
    small = gatedprune.prune(net)
    for name, w in _conv_weights(small).items():
        assert w.is_contiguous(memory_format=fmt), (name, tuple(w.shape), w.stride())
    with torch.no_grad():
        assert (small(x) - net(x)).abs().max().item() <= 1e-5
