"""gate_ through GLU and pixel (un)shuffle (before 2026-12-08 both kept the channels around
them whole: "is an op gate_ does not prune through" / "(GLU) is not pruned through").

``F.glu(x, dim)`` / ``nn.GLU(dim)`` is ``a * sigmoid(b)`` of the halves of ``x`` along ``dim``:
along the gated channels, channel ``i`` of both halves is pruned together (the Conformer conv
module: pointwise Conv1d(d, 2d) -> GLU -> depthwise conv); along another dimension the labels
pass. ``pixel_shuffle(x, r)`` moves each run of ``r * r`` input channels into one output
channel: a run is one gate value, removed whole (ESPCN / EDSR upsamplers);
``pixel_unshuffle`` spreads input channel ``c`` over ``r * r`` output channels. Central check:
the pruned model equals the gated one in eval mode (<= 1e-5) at random gate states, costs
what the gated hard cost says (less than dense), and the exported plan replays."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import budget_steps, check_pruned, examples, inserted_gating, random_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import apply_plan, export_plan, gate_


class ConvGLU(nn.Module):
    """Conformer conv module: pointwise Conv1d(4, 2d) -> GLU over the channels -> depthwise
    conv -> BatchNorm -> SiLU -> pointwise Conv1d(d, 5); ``form`` picks how GLU is written."""

    def __init__(self, form: str, d: int = 6) -> None:
        super().__init__()
        self.form = form
        self.pw1 = nn.Conv1d(4, 2 * d, 1)
        self.glu = nn.GLU(dim=1) if form == "module" else nn.GLU(dim=-2)
        self.dw = nn.Conv1d(d, d, 3, padding=1, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.pw2 = nn.Conv1d(d, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pw1(x)  # (B, 2d, T)
        if self.form == "fn":
            h = F.glu(h, dim=1)  # (B, d, T)
        elif self.form == "fn_negative":
            h = F.glu(h, -2)  # (B, d, T)
        else:
            h = self.glu(h)  # (B, d, T)
        return self.pw2(F.silu(self.bn(self.dw(h))))  # (B, 5, T)


class GLUOverTime(nn.Module):
    """GLU over the time dimension (halving it), not the channels: the labels pass."""

    def __init__(self, module: bool) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 5, 1)
        self.glu = nn.GLU() if module else None  # dim=-1: time

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(x)  # (B, 8, T)
        h = self.glu(h) if self.glu is not None else F.glu(h, dim=2)  # (B, 8, T / 2)
        return self.c2(h)  # (B, 5, T / 2)


class Upsampler(nn.Module):
    """ESPCN: conv -> relu -> Conv2d(8, c * r * r) -> pixel_shuffle(r) -> conv (3 channels)."""

    def __init__(self, form: str, r: int = 2, c: int = 4) -> None:
        super().__init__()
        self.form, self.r = form, r
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Conv2d(8, c * r * r, 3, padding=1)
        self.ps = nn.PixelShuffle(r)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(torch.relu(self.c1(x)))  # (B, c r^2, H, W)
        if self.form == "module":
            h = self.ps(h)  # (B, c, rH, rW)
        elif self.form == "torch":
            h = torch.pixel_shuffle(h, 2)  # (B, c, 2H, 2W)
        else:
            h = F.pixel_shuffle(h, self.r)  # (B, c, rH, rW)
        return self.out(torch.relu(h))  # (B, 3, rH, rW)


class Downsampler(nn.Module):
    """conv (c channels) -> relu -> pixel_unshuffle(2) -> Conv2d(4c, 6) -> relu -> head."""

    def __init__(self, module: bool, c: int = 5) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.unshuffle = nn.PixelUnshuffle(2) if module else None
        self.c2 = nn.Conv2d(4 * c, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.c1(x))  # (B, c, H, W)
        u = self.unshuffle
        h = u(h) if u is not None else F.pixel_unshuffle(h, 2)  # (B, 4c, H / 2, W / 2)
        return self.head(torch.relu(self.c2(h)).mean((2, 3)))  # (B, 4)


Case = tuple[Callable[[], nn.Module], tuple[int, ...], list[int]]
CASES: dict[str, Case] = {  # model, input shape, channel-group sizes
    "glu_fn": (lambda: ConvGLU("fn"), (2, 4, 7), [6]),
    "glu_fn_negative_dim": (lambda: ConvGLU("fn_negative"), (2, 4, 7), [6]),
    "glu_module": (lambda: ConvGLU("module"), (2, 4, 7), [6]),
    "glu_module_negative_dim": (lambda: ConvGLU("module_negative"), (2, 4, 7), [6]),
    "glu_over_time_fn": (lambda: GLUOverTime(False), (2, 3, 6), [8]),
    "glu_over_time_module": (lambda: GLUOverTime(True), (2, 3, 6), [8]),
    "pixel_shuffle_module": (lambda: Upsampler("module"), (2, 3, 4, 4), [4, 8]),
    "pixel_shuffle_fn_r3": (lambda: Upsampler("fn", r=3, c=3), (2, 3, 4, 4), [3, 8]),
    "pixel_shuffle_torch": (lambda: Upsampler("torch"), (2, 3, 4, 4), [4, 8]),
    "pixel_unshuffle_module": (lambda: Downsampler(True), (2, 3, 6, 6), [5, 6]),
    "pixel_unshuffle_fn": (lambda: Downsampler(False), (2, 3, 6, 6), [5, 6]),
}


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                assert m.running_mean is not None
                assert m.running_var is not None
                m.running_mean.normal_(0.0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.bias.data.normal_(0.0, 0.5, generator=gen)


@pytest.mark.parametrize("key", sorted(CASES))
def test_each_form_is_gated(key: str) -> None:
    factory, shape, sizes = CASES[key]
    torch.manual_seed(0)
    model = factory()
    summary = gate_(model, torch.randn(*shape))
    assert sorted(n for _, n in summary.channel_groups) == sorted(sizes), str(summary)
    text = str(summary)
    assert "not prune through" not in text, text
    assert "not pruned through" not in text, text


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
    _randomise_bn(model, gen)
    random_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory, batches=(1, 3))
    closed = any((g.eval_value() == 0).any() for g in inserted_gating(model).group_gates if g.n > 0)
    dense, small = gp.cost(factory(), x), gp.cost(pruned, x)
    assert isinstance(dense, gp.Cost)
    assert isinstance(small, gp.Cost)
    if closed:
        assert small.flops < dense.flops
        assert small.params < dense.params


def test_glu_keeps_both_halves_of_a_kept_channel_and_drops_both_of_a_closed_one() -> None:
    torch.manual_seed(1)
    model = ConvGLU("fn")
    x = torch.randn(2, 4, 7)
    gate_(model, x)
    (g_pw1,) = inserted_gating(model).group_gates
    g_pw1.force_(torch.tensor([True, False, True, True, False, True]))
    model.eval()
    pruned = gp.prune(model)
    assert pruned.pw1.out_channels == 8  # 4 kept channels, both halves
    keep = [0, 2, 3, 5, 6, 8, 9, 11]
    assert torch.equal(pruned.pw1.bias, model.pw1.bias[keep])
    with torch.no_grad():
        xi = torch.randn(3, 4, 7)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


def test_pixel_shuffle_gates_whole_runs_of_r_squared_channels() -> None:
    torch.manual_seed(2)
    model = Upsampler("module")
    x = torch.randn(2, 3, 4, 4)
    gate_(model, x)
    gates = {g.n: g for g in inserted_gating(model).group_gates}
    gates[4].force_(torch.tensor([False, True, True, False]))  # output channels 1 and 2
    model.eval()
    pruned = gp.prune(model)
    assert pruned.up.out_channels == 8  # two runs of 4
    assert torch.equal(pruned.up.bias, model.up.bias[4:12])
    assert pruned.out.in_channels == 2
    with torch.no_grad():
        xi = torch.randn(3, 3, 4, 4)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("key", ["glu_fn", "pixel_shuffle_module", "pixel_unshuffle_fn"])
def test_trains_under_a_budget_then_prunes_exactly(key: str) -> None:
    factory, shape, sizes = CASES[key]
    torch.manual_seed(3)
    model = factory()
    x = torch.randn(*shape)
    summary = gate_(model, x)
    assert sorted(n for _, n in summary.channel_groups) == sorted(sizes), str(summary)
    budget = gp.Budget(model, x[:1], flops=0.5)
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(8, *shape[1:], generator=gen)
    budget_steps(model, budget, 5, lambda: xs)
    check_pruned(model, x, gen, factory)


class GLUComputedDim(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 8, 1), nn.Conv1d(4, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(x)  # (B, 8, T)
        return self.c2(F.glu(h, h.dim() - 2))  # (B, 5, T)


class ShuffleChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(x).permute(0, 2, 3, 1)  # (B, H, W, 8): the gated channels last
        h = F.pixel_shuffle(h, 2)  # (B, H / 4, 2W, 16)
        return self.fc(h).mean((1, 2))  # (B, 4)


@pytest.mark.parametrize(
    ("factory", "shape", "reason"),
    [
        (GLUComputedDim, (2, 3, 5), "not an int written in the code"),
        (ShuffleChannelsLast, (2, 3, 4, 2), "moves entries of the gated dimension 3"),
    ],
)
def test_forms_it_cannot_follow_keep_the_channels_whole_with_the_reason(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], reason: str
) -> None:
    model = factory()
    x = torch.randn(*shape)
    summary = gate_(model, x)
    whole = [why for producers, _, why in summary.ungated_groups if "c1" in producers]
    assert whole, str(summary)
    assert reason in whole[0], str(summary)
    model.eval()
    with torch.no_grad():
        assert (gp.prune(model)(x) - model(x)).abs().max().item() <= 1e-5


def test_a_plan_keeping_different_halves_or_part_of_a_run_is_refused() -> None:
    # before 2026-12-08 apply_plan accepted both: the GLU paired other channels silently
    torch.manual_seed(6)
    model = ConvGLU("fn")
    gate_(model, torch.randn(2, 4, 7))
    (gate,) = inserted_gating(model).group_gates
    gate.force_(torch.tensor([True, False, True, True, False, True]))
    model.eval()
    plan = export_plan(model)
    assert plan["slices"]["pw1"]["out"] == [0, 2, 3, 5, 6, 8, 9, 11]
    fresh = apply_plan(ConvGLU("fn"), copy.deepcopy(plan))  # as exported: accepted
    assert fresh.pw1.out_channels == 8
    plan["slices"]["pw1"]["out"] = [0, 2, 3, 5, 6, 7, 9, 11]  # the second half: 0, 1, 3, 5
    del plan["checksum"]  # a plan edited by hand
    with pytest.raises(ValueError, match=r"node glu \(GLU\) multiplies channel i"):
        apply_plan(ConvGLU("fn"), plan)
    torch.manual_seed(7)
    up = Upsampler("module")
    gate_(up, torch.randn(2, 3, 4, 4))
    gates = {g.n: g for g in inserted_gating(up).group_gates}
    gates[4].force_(torch.tensor([True, False, True, True]))
    up.eval()
    plan = export_plan(up)
    assert plan["slices"]["up"]["out"] == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]
    plan["slices"]["up"]["out"] = [0, 1, 2, 4, 8, 9, 10, 11, 12, 13, 14, 15]
    del plan["checksum"]
    with pytest.raises(ValueError, match=r"pixel shuffle by 2\) moves each run of 4"):
        apply_plan(Upsampler("module"), plan)
