"""Padding and resizing of spatial dimensions keep channel groups: ``F.pad`` (constant 0,
reflect, replicate, circular), padding modules, ``nn.Upsample`` and ``F.interpolate`` are
linear and per channel, so closed channels stay zero through them and are pruned on both
sides (TCN / WaveNet causal padding, U-Net decoders). Padding the channels themselves, or
with a non-zero value, leaves them ungated with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, randomise_gates
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import gate_

FORMS = [
    "pad_constant",
    "pad_reflect",
    "pad_replicate",
    "pad_circular",
    "module_pad",
    "upsample_nearest",
    "upsample_linear",
    "interpolate",
    "unet",
    "unet_transposed",
]


class Net1d(nn.Module):
    """Two causal convolutions with a residual around the second, then a spatial op, then a
    1x1 convolution reading the padded or resized channels."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a = nn.Conv1d(2, 8, 3)
        self.b = nn.Conv1d(8, 8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.c = nn.Conv1d(16 if form.startswith("unet") else 8, 6, 1)
        self.t = nn.ConvTranspose1d(8, 8, 2, stride=2)
        self.pad = nn.ConstantPad1d((2, 0), 0.0)
        self.up = nn.Upsample(
            scale_factor=2, mode="linear" if form == "upsample_linear" else "nearest"
        )
        self.down = nn.MaxPool1d(2)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(F.pad(x, (2, 0))))  # (B, 8, L), causal
        if self.form.startswith("pad_") and self.form != "pad_constant":
            mode = self.form.removeprefix("pad_")
            h = h + F.relu(self.bn(self.b(F.pad(h, (1, 1), mode=mode))))  # (B, 8, L)
        elif self.form == "module_pad":
            h = h + F.relu(self.bn(self.b(self.pad(h))))  # (B, 8, L)
        else:
            h = h + F.relu(self.bn(self.b(F.pad(h, [2, 0], "constant", 0.0))))  # (B, 8, L)
        if self.form.startswith("upsample"):
            h = self.up(self.down(h))  # (B, 8, L)
        elif self.form == "interpolate":
            h = F.interpolate(self.down(h), size=h.shape[-1], mode="linear")  # (B, 8, L)
        elif self.form == "unet":
            h = torch.cat([h, self.up(self.down(h))], dim=1)  # (B, 16, L), L even
        elif self.form == "unet_transposed":
            h = torch.cat([h, self.t(self.down(h))], dim=1)  # (B, 16, L), L even
        return self.head(F.relu(self.c(h)).mean(-1))  # (B, 2)


class Net2d(nn.Module):
    """Reflection padding and bilinear upsampling of 2-d maps."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.pad = nn.ReflectionPad2d(1)
        self.b = nn.Conv2d(8, 8, 3)
        self.up = nn.UpsamplingBilinear2d(scale_factor=2)
        self.c = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")))  # (B, 8, H, W)
        h = F.relu(self.b(self.pad(h)))  # (B, 8, H, W)
        return self.head(F.relu(self.c(self.up(h))).mean((2, 3)))  # (B, 2)


def _randomise(model: nn.Module, gen: torch.Generator) -> None:
    randomise_gates(model, gen)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)


@settings(max_examples=examples(20), deadline=None)
@given(form=st.sampled_from(FORMS), seed=st.integers(0, 2**31 - 1))
def test_channels_are_pruned_through_padding_and_resizing(form: str, seed: int) -> None:
    # before 2026-12-07 16:45 UTC: "node 'pad' is an op gate_ does not prune through" (and
    # the same for Upsample): the channels on either side stayed ungated
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 12, generator=gen)
    model = Net1d(form)
    summary = gate_(model, x)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert {"a", "b", "c"} <= gated, str(summary)
    if form == "unet_transposed":  # the transposed convolution is pruned on both sides
        assert "t" in gated, str(summary)
    _randomise(model, gen)
    check_pruned(model, x, gen, lambda: Net1d(form), batches=(1, 3))


@settings(max_examples=examples(5), deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_2d_padding_and_bilinear_upsampling(seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    model = Net2d()
    summary = gate_(model, x)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert {"a", "b", "c"} <= gated, str(summary)
    _randomise(model, gen)
    check_pruned(model, x, gen, Net2d, batches=(1, 3))


class PadsChannels(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv1d(2, 8, 3, padding=1), nn.Conv1d(10, 4, 1)
        self.ones = nn.ConstantPad1d(1, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))  # (B, 8, L)
        if self.how == "channels":
            h = F.pad(h, (0, 0, 1, 1))  # (B, 10, L): two zero channels
        elif self.how == "value":
            h = self.b.weight.new_zeros(1) + F.pad(h, (1, 1), value=1.0)[:, :, 1:-1]
            h = torch.cat([h, h[:, :2]], dim=1)  # (B, 10, L)
        else:
            h = torch.cat([self.ones(h)[:, :, 1:-1], h[:, :2]], dim=1)  # (B, 10, L)
        return self.b(h).mean(-1)  # (B, 4)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("channels", "pads the labelled dimension"),
        ("value", "pads with a non-zero value"),
        ("module", "pads with 1.0, not 0"),
    ],
)
def test_padding_that_would_change_closed_channels_keeps_them(how: str, reason: str) -> None:
    model = PadsChannels(how)
    x = torch.randn(2, 2, 7)
    summary = gate_(model, x)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert reason in reasons["a"], str(summary)
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


class Decoder(nn.Module):
    """Transposed convolutions (1-d or 2-d, stride, padding, output_padding, dilation),
    BatchNorm and a residual around a 3x3 at the upsampled resolution."""

    def __init__(self, dims: int, stride: int, output_padding: int, dilation: int) -> None:
        super().__init__()
        conv, convt, bn = (
            (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d)
            if dims == 1
            else (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)
        )
        self.dims = dims
        self.a = conv(2, 8, 3, padding=1)
        self.up = convt(
            8, 6, 3, stride=stride, padding=1, output_padding=output_padding, dilation=dilation
        )
        self.bn = bn(6)
        self.b = conv(6, 6, 3, padding=1)
        self.up2 = convt(6, 4, 2, stride=2, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.up(F.relu(self.a(x)))))  # (B, 6, *S')
        h = h + F.relu(self.b(h))  # (B, 6, *S')
        h = F.relu(self.up2(h))  # (B, 4, *S'')
        return self.head(h.flatten(2).mean(-1))  # (B, 2)


@settings(max_examples=examples(16), deadline=None)
@given(
    dims=st.sampled_from([1, 2]),
    stride=st.sampled_from([1, 2]),
    output_padding=st.sampled_from([0, 1]),
    dilation=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_transposed_convolutions_are_pruned(
    dims: int, stride: int, output_padding: int, dilation: int, seed: int
) -> None:
    # before 2026-12-07 17:00 UTC: "up (ConvTranspose1d) is not pruned through", and its own
    # channels were in no list of the summary
    assume(output_padding < max(stride, dilation))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, *([5] * dims), generator=gen)
    args = (dims, stride, output_padding, dilation)
    model = Decoder(*args)
    summary = gate_(model, x)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert {"a", "up", "up2"} <= gated, str(summary)
    _randomise(model, gen)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    check_pruned(model, x, gen, lambda: Decoder(*args), batches=(1, 3))


class GroupedTransposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(2, 8, 3, padding=1)
        self.up = nn.ConvTranspose1d(8, 8, 2, stride=2, groups=2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.up(F.relu(self.a(x)))).mean(-1))  # (B, 2)


def test_a_grouped_transposed_convolution_is_pruned() -> None:
    # before 2026-12-07: "up (ConvTranspose1d with groups > 1) is not pruned through" kept
    # a's channels whole, and up's own were "a layer gate_ does not prune" (more cases in
    # test_gate_pool3d_convt_groups.py)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 6, generator=gen)
    model = GroupedTransposed()
    summary = gate_(model, x)
    sizes = {producers[0]: n for producers, n in summary.channel_groups}
    assert sizes == {"a": 4, "up": 4}, str(summary)  # by position: 2 groups of 4 channels
    _randomise(model, gen)
    pruned = check_pruned(model, x, gen, GroupedTransposed, batches=(1, 3))
    up = pruned.get_submodule("up")
    assert isinstance(up, nn.ConvTranspose1d)
    assert up.groups == 2


def test_a_transposed_convolution_with_a_computed_weight_is_named_as_left_whole() -> None:
    from torch.nn.utils import parametrizations

    model = GroupedTransposed()
    parametrizations.weight_norm(model.up)
    summary = gate_(model, torch.randn(2, 2, 6))
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert "up (ParametrizedConvTranspose1d) computes its weight when it runs" in reasons["a"]
    assert (  # its own output channels
        "up (ParametrizedConvTranspose1d) is a layer gate_ does not prune: it computes its "
        "weight when it runs" in reasons["up"]
    )
