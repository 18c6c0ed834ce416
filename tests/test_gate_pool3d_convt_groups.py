"""gate_ prunes through 3-d pooling (``nn.MaxPool3d``, ``nn.AvgPool3d``, the adaptive ones and
their functional forms, batched ``(B, C, D, H, W)`` or unbatched ``(C, D, H, W)``) and through
grouped and depthwise transposed convolutions (``nn.ConvTranspose1d/2d/3d`` with ``groups >
1``), as consumers of gated channels and as producers of their own: the pruned model equals
the gated one, costs what the gated model's hard cost says, and its plan replays on a fresh
model. A max pool's indices (``return_indices=True``), which are not zero at closed channels,
keep the channels whole when the code reads them, with the reason."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import (
    check_pruned,
    examples,
    inserted_gating,
    randomise_batchnorms,
    randomise_gates,
    train_under_budget,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import GatingSummary, apply_plan, gate_
from gatedprune.gating.surgery import PLAN_FORMAT


def _gated(summary: GatingSummary) -> set[str]:
    return {p for producers, _ in summary.channel_groups for p in producers}


def _reasons(summary: GatingSummary) -> dict[str, str]:
    return {p: why for producers, _, why in summary.ungated_groups for p in producers}


# ------------------------------------------------------------------------ 3-d pooling

POOLS: dict[str, Callable[[], Callable[[Tensor], Tensor]]] = {
    "MaxPool3d": lambda: nn.MaxPool3d(2),
    "MaxPool3d_ceil": lambda: nn.MaxPool3d(2, ceil_mode=True),
    "MaxPool3d_padded": lambda: nn.MaxPool3d(3, stride=2, padding=1, dilation=1),
    "AvgPool3d": lambda: nn.AvgPool3d(2),
    "AvgPool3d_ceil": lambda: nn.AvgPool3d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    "AdaptiveAvgPool3d": lambda: nn.AdaptiveAvgPool3d((2, 3, 2)),
    "AdaptiveMaxPool3d": lambda: nn.AdaptiveMaxPool3d(2),
    "max_pool3d": lambda: lambda h: F.max_pool3d(h, 2),
    "max_pool3d_ceil": lambda: lambda h: F.max_pool3d(h, 2, ceil_mode=True),
    "avg_pool3d": lambda: lambda h: F.avg_pool3d(h, 2),
    "adaptive_avg_pool3d": lambda: lambda h: F.adaptive_avg_pool3d(h, (1, 2, 2)),
    "adaptive_max_pool3d": lambda: lambda h: F.adaptive_max_pool3d(h, 2),
}
# the same, returning (values, indices) whose indices the code drops
INDEX_POOLS: dict[str, Callable[[], Callable[[Tensor], Tensor]]] = {
    "MaxPool3d_indices": lambda: _Values(nn.MaxPool3d(2, return_indices=True)),
    "AdaptiveMaxPool3d_indices": lambda: _Values(nn.AdaptiveMaxPool3d(2, return_indices=True)),
    "max_pool3d_indices": lambda: lambda h: F.max_pool3d(h, 2, return_indices=True)[0],
    "adaptive_max_pool3d_indices": lambda: (
        lambda h: F.adaptive_max_pool3d(h, 2, return_indices=True)[0]
    ),
}


class _Values:
    """Calls a pooling module returning ``(values, indices)`` and keeps the values (traced
    inline: a plain callable, not a module)."""

    def __init__(self, pool: nn.Module) -> None:
        self.pool = pool

    def __call__(self, h: Tensor) -> Tensor:
        values, _ = self.pool(h)
        return values


class Pool3dNet(nn.Module):
    """Conv3d -> ReLU -> 3-d pool -> a residual block at the pooled size -> Conv3d -> mean ->
    Linear; the pool is a module (registered) or a function."""

    def __init__(self, form: str, c: int, mid: int) -> None:
        super().__init__()
        self.a = nn.Conv3d(2, c, 3, padding=1)
        made = {**POOLS, **INDEX_POOLS}[form]()
        self.p = made if isinstance(made, nn.Module) else None
        self.p_values = made.pool if isinstance(made, _Values) else None  # a registered module
        self.pool_fn = None if isinstance(made, nn.Module) else made
        self.b = nn.Conv3d(c, mid, 1)
        self.bn = nn.BatchNorm3d(mid)
        self.b2 = nn.Conv3d(mid, c, 3, padding=1)
        self.c = nn.Conv3d(c, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))  # (B, c, D, H, W)
        if self.p is not None:
            h = self.p(h)
        else:
            assert self.pool_fn is not None
            h = self.pool_fn(h)  # (B, c, D', H', W')
        h = h + self.b2(F.relu(self.bn(self.b(h))))  # (B, c, D', H', W')
        return self.head(F.relu(self.c(h)).mean((2, 3, 4)))  # (B, 2)


@settings(max_examples=examples(24), deadline=None)
@given(
    form=st.sampled_from(sorted({*POOLS, *INDEX_POOLS})),
    c=st.integers(2, 6),
    mid=st.integers(2, 5),
    size=st.sampled_from([(4, 4, 4), (5, 4, 6)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_3d_pools_pass_channels_through(
    form: str, c: int, mid: int, size: tuple[int, int, int], seed: int
) -> None:
    # before 2026-12-07: "a: p (MaxPool3d) is not pruned through" (and "node 'max_pool3d'
    # ... is an op gate_ does not prune through"): the channels on both sides stayed whole
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, *size, generator=gen)
    model = Pool3dNet(form, c, mid)
    summary = gate_(model, x)
    assert {"a", "b", "c"} <= _gated(summary), str(summary)
    assert "b2" in _gated(summary)  # the residual's output: one group with a's channels
    randomise_gates(model, gen)
    randomise_batchnorms(model, gen)
    check_pruned(model, x, gen, lambda: Pool3dNet(form, c, mid), batches=(1, 3))


def test_a_pool3d_net_prunes_to_fewer_channels() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 4, 4, 4, generator=gen)
    model = Pool3dNet("MaxPool3d", 6, 4)
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    gate_(model, x)
    for gate in inserted_gating(model).group_gates:
        gate.force_(torch.arange(gate.n) % 2 == 0)  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, lambda: Pool3dNet("MaxPool3d", 6, 4))
    a = pruned.get_submodule("a")
    assert isinstance(a, nn.Conv3d)
    assert a.out_channels == 3
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert c.flops < dense.flops
    assert c.params < dense.params


class Voxels(nn.Module):
    """Per-voxel features ``(D, H, W, F)`` (or ``(B, D, H, W, F)``): a Linear, the features
    moved first, a 3-d pool, moved back, a Linear. Unbatched, the pool reads ``(C, D, H,
    W)`` with the channels at dimension 0."""

    def __init__(self, form: str, batched: bool) -> None:
        super().__init__()
        self.f1 = nn.Linear(3, 8)
        made = POOLS[form]()
        self.p = made if isinstance(made, nn.Module) else None
        self.pool_fn = None if isinstance(made, nn.Module) else made
        self.f2 = nn.Linear(8, 2)
        self.batched = batched

    def pool(self, h: Tensor) -> Tensor:
        if self.p is not None:
            return self.p(h)  # type: ignore[no-any-return]
        assert self.pool_fn is not None
        return self.pool_fn(h)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.f1(x))  # (D, H, W, 8) or (B, D, H, W, 8)
        if self.batched:
            h = self.pool(h.permute(0, 4, 1, 2, 3).contiguous())  # (B, 8, D', H', W')
            return self.f2(h.permute(0, 2, 3, 4, 1))  # (B, D', H', W', 2)
        h = self.pool(h.permute(3, 0, 1, 2).contiguous())  # (8, D', H', W')
        return self.f2(h.permute(1, 2, 3, 0))  # (D', H', W', 2)


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
@pytest.mark.parametrize("form", sorted(POOLS))
def test_3d_pools_of_unbatched_inputs_keep_dimension_0(form: str, batched: bool) -> None:
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*((2,) if batched else ()), 4, 5, 4, 3, generator=gen)
    model = Voxels(form, batched)
    summary = gate_(model, x)
    assert "f1" in _gated(summary), str(summary)
    randomise_gates(model, gen)
    check_pruned(model, x, gen, lambda: Voxels(form, batched))


class PoolsTheChannels(nn.Module):
    """Features ``(D, F, H, W)`` labelled at dimension 1: a 3-d pool reads the 4-d tensor as
    an unbatched ``(C, D, H, W)`` and pools over the features (a 2-d pool would not)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.f1 = nn.Linear(3, 8)
        self.form = form
        self.p3 = nn.MaxPool3d(2)
        self.p2 = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.f1(x)).permute(0, 3, 1, 2).contiguous()  # (D, 8, H, W)
        if self.form == "MaxPool3d":
            return self.p3(h)  # (D/2, 4, H/2, W/2)
        if self.form == "max_pool3d":
            return F.max_pool3d(h, 2)
        if self.form == "adaptive_avg_pool3d":
            return F.adaptive_avg_pool3d(h, 2)
        return self.p2(h)  # "MaxPool2d": (D, 8, H/2, W/2), batched: channels kept


@pytest.mark.parametrize("form", ["MaxPool3d", "max_pool3d", "adaptive_avg_pool3d"])
def test_a_3d_pool_over_the_labelled_dimension_keeps_it_whole(form: str) -> None:
    x = torch.randn(4, 4, 4, 3)
    summary = gate_(PoolsTheChannels(form), x)
    assert "pools over the labelled dimension" in _reasons(summary)["f1"], str(summary)
    # the same tensor pooled in 2-d is (B, C, H, W): its channels pass (then the output)
    summary = gate_(PoolsTheChannels("MaxPool2d"), x)
    assert _reasons(summary)["f1"] == "reaches the model output", str(summary)


class ReadsIndices(nn.Module):
    """A max pool returning ``(values, indices)`` whose indices the code reads: added to the
    values (module or function), or unpooled (SegNet's decoder, ``F.max_unpool2d``)."""

    def __init__(self, how: str, dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        self.how, self.dims = how, dims
        self.a = conv(2, 8, 3, padding=1)
        self.p = pool(2, return_indices=True)
        self.c = conv(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))  # (B, 8, *S)
        if self.how == "functional":
            pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
            v, i = pool(h, 2, return_indices=True)  # (B, 8, *S / 2) twice
        else:
            v, i = self.p(h)  # (B, 8, *S / 2) twice
        if self.how == "unpool":
            unpool = F.max_unpool2d if self.dims == 2 else F.max_unpool3d
            h = unpool(v, i, 2)  # (B, 8, *S)
        else:
            h = v + i.float()  # (B, 8, *S / 2): a closed channel's indices are not 0
        return F.relu(self.c(h)).mean(tuple(range(2, 2 + self.dims)))  # (B, 4)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("how", ["added", "functional", "unpool"])
def test_read_pool_indices_keep_the_channels_whole(how: str, dims: int) -> None:
    # before 2026-12-07, with MaxPool2d: a's channels were gated but the labels stopped at the
    # (values, indices) pair, so c was not sliced and the pruned model failed with a channel
    # mismatch (3-d pools were not pruned through at all)
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, *([4] * dims), generator=gen)
    model = ReadsIndices(how, dims)
    summary = gate_(model, x)
    why = _reasons(summary)["a"]
    assert "returns indices (return_indices=True), which are not zero at closed channels" in why
    randomise_gates(model, gen)
    check_pruned(model, x, gen, lambda: ReadsIndices(how, dims))


class DropsIndices(nn.Module):
    """``v, _ = MaxPool2d(2, return_indices=True)(h)``: only the values are read."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 8, 3, padding=1)
        self.p = nn.MaxPool2d(2, return_indices=True)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        v, _ = self.p(F.relu(self.a(x)))  # (B, 8, H/2, W/2)
        return F.relu(self.c(v)).mean((2, 3))  # (B, 4)


def test_a_2d_pool_with_unread_indices_prunes_its_consumer() -> None:
    # before 2026-12-07: a was gated, c was not sliced, and the pruned model failed
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 6, 6, generator=gen)
    model = DropsIndices()
    assert "a" in _gated(gate_(model, x))
    randomise_gates(model, gen)
    pruned = check_pruned(model, x, gen, DropsIndices, batches=(1, 3))
    a, c = pruned.get_submodule("a"), pruned.get_submodule("c")
    assert isinstance(a, nn.Conv2d)
    assert isinstance(c, nn.Conv2d)
    assert a.out_channels == c.in_channels


class ReturnsPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(2, 8, 3, padding=1)
        self.p = nn.AdaptiveMaxPool3d(2, return_indices=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.p(F.relu(self.a(x)))  # type: ignore[no-any-return]


def test_a_pool_pair_read_whole_keeps_the_channels_whole() -> None:
    x = torch.randn(2, 2, 4, 4, 4)
    model = ReturnsPair()
    summary = gate_(model, x)
    assert "node 'output' (output output) reads the (values, indices)" in _reasons(summary)["a"]
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        for got, want in zip(pruned(x), model(x), strict=True):
            assert torch.equal(got, want)


# ---------------------------------------------- grouped and depthwise transposed convolutions

_LAYERS = {
    1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d),
}


class UpNet(nn.Module):
    """A stem conv, an upsampling transposed conv with ``groups`` (grouped or depthwise; stride,
    padding, output_padding, dilation) [-> BatchNorm] -> ReLU, a residual block whose branch
    ends in a stride-1 transposed conv with ``groups2`` (its block gate folds into it), then a
    1x1 conv, a spatial mean and a Linear."""

    def __init__(
        self,
        dims: int,
        c: int,
        out: int,
        groups: int,
        groups2: int,
        up: tuple[int, int, int],
        bias: bool,
        bn: bool,
    ) -> None:
        super().__init__()
        conv, convt, norm = _LAYERS[dims]
        stride, output_padding, dilation = up
        self.dims = dims
        self.stem = conv(2, c, 3, padding=1)
        self.up = convt(
            c,
            out,
            3,
            stride=stride,
            padding=1,
            output_padding=output_padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.bn: nn.Module = norm(out) if bn else nn.Identity()
        self.r1 = conv(out, out, 1)
        self.r2 = convt(out, out, 3, padding=1, groups=groups2)
        self.c = conv(out, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))  # (B, c, *S)
        h = F.relu(self.bn(self.up(h)))  # (B, out, *S')
        h = h + self.r2(F.relu(self.r1(h)))  # (B, out, *S')
        return self.head(F.relu(self.c(h)).mean(tuple(range(2, 2 + self.dims))))  # (B, 2)


@st.composite
def _up_nets(draw: st.DrawFn) -> tuple[int, int, int, int, int, tuple[int, int, int], bool, bool]:
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([2, 3]))
    if draw(st.booleans()):  # depthwise: groups == in_channels, mult outputs per input
        c, out = groups, groups * draw(st.integers(1, 2))
    else:
        c, out = groups * draw(st.integers(2, 3)), groups * draw(st.integers(1, 3))
    groups2 = draw(st.sampled_from([g for g in (1, 2, 3, out) if out % g == 0]))
    stride, dilation = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    up = (stride, output_padding, dilation)
    return dims, c, out, groups, groups2, up, draw(st.booleans()), draw(st.booleans())


def _transposed(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    return {
        n: (m.in_channels, m.out_channels, m.groups)
        for n, m in model.named_modules()
        if isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d)
    }


@settings(max_examples=examples(30), deadline=None)
@given(spec=_up_nets(), seed=st.integers(0, 2**31 - 1))
def test_grouped_and_depthwise_transposed_convolutions_are_pruned(
    spec: tuple[int, int, int, int, int, tuple[int, int, int], bool, bool], seed: int
) -> None:
    # before 2026-12-07: "up (ConvTranspose2d with groups > 1) is not pruned through" and "is a
    # layer gate_ does not prune": the channels on both sides stayed whole
    dims = spec[0]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, *([3] * dims), generator=gen)
    model = UpNet(*spec)
    summary = gate_(model, x)
    gating = inserted_gating(model)
    # no group is stopped by a transposed conv (coupled positions may leave a single channel)
    # (a group of producers of unlike widths gets them named after the reason: "a single
    # channel (1 entry; channels: stem 2, r2 4)")
    reasons = {why.split(" (")[0] for why in _reasons(summary).values()}
    assert reasons <= {"a single channel", "reaches the model output"}, str(summary)
    assert {"up", "r2"} <= set(gating.slices) or "a single channel" in reasons
    assert "r2" in gating.sites  # the residual block's gate folds into r2
    assert gating.sites["r2"].blocks
    randomise_gates(model, gen)
    randomise_batchnorms(model, gen)
    pruned = check_pruned(model, x, gen, lambda: UpNet(*spec), batches=(1, 3))
    dense = _transposed(UpNet(*spec))
    for name, (c_in, c_out, groups) in _transposed(pruned).items():
        d_in, d_out, d_groups = dense[name]
        if d_groups == d_in:  # depthwise stays depthwise: whole groups removed
            assert groups == c_in
            assert c_out == c_in * (d_out // d_in)
        else:  # grouped stays grouped with its groups: positions removed in every group
            assert groups == d_groups
        up = pruned.get_submodule(name)
        want = UpNet(*spec).get_submodule(name)
        assert isinstance(up, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d)
        assert isinstance(want, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d)
        kept = (up.stride, up.padding, up.output_padding, up.dilation, up.kernel_size)
        assert kept == (
            want.stride,
            want.padding,
            want.output_padding,
            want.dilation,
            want.kernel_size,
        )


class OneUp(nn.Module):
    def __init__(self, c: int, out: int, groups: int) -> None:
        super().__init__()
        self.a = nn.Conv1d(2, c, 1)
        self.up = nn.ConvTranspose1d(c, out, 2, stride=2, groups=groups)
        self.b = nn.Conv1d(out, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(self.up(F.relu(self.a(x)))))  # (B, 3, 2 L)


def _force(model: nn.Module, summary: GatingSummary, opens: dict[str, list[bool]]) -> None:
    """Gates of the groups named by their first producer at ``opens``; the others open."""
    gating = inserted_gating(model)
    for (producers, _), gate in zip(summary.channel_groups, gating.group_gates, strict=True):
        want = opens.get(producers[0], [True] * gate.n)  # type: ignore[arg-type]
        gate.force_(torch.tensor(want))  # type: ignore[operator]


def test_a_closed_position_removes_one_channel_of_every_group() -> None:
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 5, generator=gen)
    model = OneUp(12, 8, 4)  # 4 groups: 3 inputs and 2 outputs each
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    summary = gate_(model, x)
    assert dict((p[0], n) for p, n in summary.channel_groups) == {"a": 3, "up": 2}
    _force(model, summary, {"a": [True, False, True], "up": [False, True]})
    pruned = check_pruned(model, x, gen, lambda: OneUp(12, 8, 4), batches=(1, 3))
    up = pruned.get_submodule("up")
    assert isinstance(up, nn.ConvTranspose1d)
    assert (up.in_channels, up.out_channels, up.groups) == (8, 4, 4)
    assert tuple(up.weight.shape) == (8, 1, 2)  # (in, out / groups, k)
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert c.flops < dense.flops
    assert c.params < dense.params


def test_a_depthwise_transposed_convolution_loses_whole_groups() -> None:
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 5, generator=gen)
    model = OneUp(6, 12, 6)  # depthwise, 2 outputs per input
    summary = gate_(model, x)
    assert dict((p[0], n) for p, n in summary.channel_groups) == {"a": 6}
    _force(model, summary, {"a": [True, False, True, True, False, True]})
    pruned = check_pruned(model, x, gen, lambda: OneUp(6, 12, 6), batches=(1, 3))
    up, b = pruned.get_submodule("up"), pruned.get_submodule("b")
    assert isinstance(up, nn.ConvTranspose1d)
    assert isinstance(b, nn.Conv1d)
    assert (up.in_channels, up.out_channels, up.groups) == (4, 8, 4)
    assert tuple(up.weight.shape) == (4, 2, 2)
    assert b.in_channels == 8


def _plan(slices: dict[str, dict[str, object]]) -> dict[str, object]:
    return {"format": PLAN_FORMAT, "opaque": {}, "cut": {}, "scopes": [], "slices": slices}


def _net(c: int, out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, c, 1),
        nn.ConvTranspose1d(c, out, 2, stride=2, groups=groups),
        nn.Conv1d(out, 2, 1),
    )


def test_plans_for_grouped_transposed_convolutions_apply() -> None:
    net = _net(8, 6, 2)  # 4 inputs and 3 outputs per group
    plan = _plan(
        {
            "0": {"kind": "conv", "in": None, "out": [1, 3, 5, 7]},
            "1": {"kind": "gconvt", "in": [1, 3, 5, 7], "out": [0, 2, 3, 5]},
            "2": {"kind": "conv", "in": [0, 2, 3, 5], "out": None},
        }
    )
    small = apply_plan(copy.deepcopy(net), plan)
    up = small.get_submodule("1")
    assert isinstance(up, nn.ConvTranspose1d)
    assert (up.in_channels, up.out_channels, up.groups) == (4, 4, 2)
    x = torch.randn(2, 2, 5)
    assert small(x).shape == (2, 2, 10)
    net = _net(4, 8, 4)  # depthwise, 2 outputs per input
    plan = _plan(
        {
            "0": {"kind": "conv", "in": None, "out": [0, 3]},
            "1": {"kind": "dwt", "in": None, "out": [0, 1, 6, 7]},
            "2": {"kind": "conv", "in": [0, 1, 6, 7], "out": None},
        }
    )
    small = apply_plan(copy.deepcopy(net), plan)
    up = small.get_submodule("1")
    assert isinstance(up, nn.ConvTranspose1d)
    assert (up.in_channels, up.out_channels, up.groups) == (2, 4, 2)
    assert small(x).shape == (2, 2, 10)


@pytest.mark.parametrize(
    ("net", "spec", "match"),
    [
        (
            (8, 6, 2),
            {"kind": "gconvt", "in": None, "out": [0, 1, 3]},
            r"output channels \[0, 1, 3\] of grouped module '1'.*e\.g\. \[0, 1, 3, 4\]",
        ),
        (
            (8, 6, 2),
            {"kind": "gconvt", "in": [0, 1, 4], "out": None},
            r"input channels \[0, 1, 4\] of grouped module '1'.*same positions",
        ),
        (
            (4, 8, 4),
            {"kind": "dwt", "in": None, "out": [0, 1, 2, 5]},
            r"output channels \[0, 1, 2, 5\] of depthwise transposed module '1'.*e\.g\. "
            r"\[0, 1, 2, 3, 4, 5\]",
        ),
        (
            (4, 8, 4),
            {"kind": "dwt", "in": [0, 1], "out": [0, 1, 6, 7]},
            r"input channels \[0, 1\] of depthwise module '1' but output channels \[0, 1, 6, 7\]",
        ),
        (
            (8, 6, 2),
            {"kind": "convt", "in": None, "out": [0, 1, 3, 4]},
            r"as 'convt', expected for a transposed convolution with groups=1; it has groups=2",
        ),
        (
            (4, 8, 1),
            {"kind": "gconvt", "in": None, "out": [0, 1]},
            r"as 'gconvt', expected for a grouped one .*; it has groups=1",
        ),
        (
            (8, 6, 2),
            {"kind": "dwt", "in": None, "out": [0, 1]},
            r"as 'dwt', expected for a depthwise one; it has groups=2",
        ),
        (
            (8, 6, 2),
            {"kind": "gconv", "in": None, "out": [0, 3]},
            r"slices module '1' as 'gconv'; it is ConvTranspose1d",
        ),
    ],
)
def test_plans_that_do_not_fit_a_grouped_transposed_convolution_are_refused(
    net: tuple[int, int, int], spec: dict[str, object], match: str
) -> None:
    model = _net(*net)
    with pytest.raises(ValueError, match=match):
        apply_plan(model, _plan({"1": spec}))


class RnnUp(nn.Module):
    """A GRU's output read by a grouped transposed convolution (over time)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.up = nn.ConvTranspose1d(8, 6, 2, stride=2, groups=2)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)  # (B, T, 8)
        return self.head(F.relu(self.up(h.transpose(1, 2))).mean(-1))  # (B, 2)


def test_a_recurrent_output_read_by_a_grouped_transposed_convolution_stays_whole() -> None:
    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 3, generator=gen)
    model = RnnUp()
    summary = gate_(model, x)
    assert "rnn" not in {r.name for r in inserted_gating(model).rnns}
    layers = dict(summary.ungated_layers)
    assert "up (grouped) does not take a folded input gate" in layers["rnn"], str(summary)
    assert "up" in _gated(summary)  # its own output channels
    randomise_gates(model, gen)
    check_pruned(model, x, gen, RnnUp, batches=(1, 3))


class UNet3d(nn.Module):
    """A tiny 3-d U-Net: conv, max pool, conv, grouped transposed conv back up, the skip
    concatenated, a depthwise transposed conv, then a per-voxel 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv3d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool3d(2)
        self.mid = nn.Conv3d(8, 12, 3, padding=1)
        self.bn = nn.BatchNorm3d(12)
        self.up = nn.ConvTranspose3d(12, 8, 2, stride=2, groups=4)
        self.dec = nn.Conv3d(16, 8, 1)
        self.dw = nn.ConvTranspose3d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Conv3d(8, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        e = F.relu(self.enc(x))  # (B, 8, D, H, W)
        m = F.relu(self.bn(self.mid(self.pool(e))))  # (B, 12, D/2, H/2, W/2)
        h = torch.cat([e, F.relu(self.up(m))], dim=1)  # (B, 16, D, H, W)
        h = F.relu(self.dec(h))  # (B, 8, D, H, W)
        return self.head(F.relu(self.dw(h)) + F.adaptive_avg_pool3d(h, 1))  # (B, 3, D, H, W)


def test_a_3d_unet_trains_under_a_budget_and_prunes() -> None:
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1, 4, 4, 4, generator=gen)
    model = UNet3d()
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    summary = gate_(model, x)
    gating = inserted_gating(model)
    assert {"enc", "mid", "up", "dec", "dw"} <= set(gating.slices), str(summary)
    budget = gp.Budget(model, x, flops=0.4, warmup_steps=5)

    def batch() -> tuple[Tensor, Tensor]:
        xb = torch.randn(2, 1, 4, 4, 4, generator=gen)
        return xb, xb.expand(-1, 3, -1, -1, -1)

    train_under_budget(model, budget, 30, batch, loss=F.mse_loss)
    pruned = check_pruned(model, x, gen, UNet3d, batches=(1, 3))
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert c.flops < dense.flops
    widths = _transposed(pruned)  # name -> (in, out, groups)
    assert widths["up"][2] == 4  # grouped: positions removed, groups kept
    assert widths["up"][0] < 12 or widths["up"][1] < 8
    assert widths["dw"][0] == widths["dw"][1] == widths["dw"][2] < 8  # whole groups removed
