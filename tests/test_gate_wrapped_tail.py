"""Residual branches whose last op is an activation that cannot carry the block gate itself:
ultralytics' class attribute ``Conv.default_act = nn.SiLU()`` (one module called by every
``Conv``) and activation functions (``F.silu``). The gate multiplies the output of the
innermost module of the model's own, called once, that returns the branch's value (``x + g *
cv2(h)``): prune removes a closed branch, leaves an exactly-open one as is and wraps that
module in a ``GateScale`` for a fractional value. Without such a module a positively
homogeneous tail (``relu``, ``leaky_relu``, ``prelu``, in-place or method forms) moves the
gate before it (``relu(g * z) == g * relu(z)`` for ``g >= 0``), folded as usual; any other
function tail stays ungated, with a reason saying what to do. Before 2026-12-08 these branches
got no block gate.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import (
    assert_first_block_cost_scales,
    check_pruned,
    inserted_gating,
    randomise_batchnorms,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import GateScale, apply_plan, export_plan, gate_


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """ultralytics' autopad (an int kernel): 'same' padding."""
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    """ultralytics' Conv, as written there: ``default_act`` is a class attribute, one SiLU
    module shared by every instance."""

    default_act = nn.SiLU()

    def __init__(
        self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))  # (B, C2, H, W)


class Bottleneck(nn.Module):
    """ultralytics' Bottleneck."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 3)
        self.cv2 = Conv(c_, c2, 3, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))  # (B, C2, H, W)


class C2f(nn.Module):
    """ultralytics' C2f."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = int(c2 * 0.5)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, e=1.0) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))  # 2 x (B, c, H, W)
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))  # (B, C2, H, W)


class Yolo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv(3, 8, 3, 2)
        self.c2f = C2f(8, 8, 2)
        self.down = Conv(8, 8, 3, 2)
        self.c2f2 = C2f(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.c2f2(self.down(self.c2f(self.stem(x)))))  # (B, 4, H/4, W/4)


SITES = ["c2f.m.0.cv2", "c2f.m.1.cv2", "c2f2.m.0.cv2"]


def fresh_yolo() -> Yolo:
    torch.manual_seed(0)
    return Yolo()


def gated_yolo() -> tuple[Yolo, Tensor]:
    gen = torch.Generator().manual_seed(0)
    model = fresh_yolo()
    randomise_batchnorms(model, gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    gate_(model, x)
    return model, x


def set_block(gate: object, state: str) -> None:
    """``state``: closed (eval 0), open (eval exactly 1) or half (a fractional eval value)."""
    assert isinstance(gate, HardConcreteGate)
    with torch.no_grad():
        gate.log_alpha.fill_({"closed": -10.0, "open": 10.0, "half": 0.3}[state])


def test_shared_activation_branches_are_gated_after_their_conv() -> None:
    model, _ = gated_yolo()
    summary = inserted_gating(model).summary
    assert [site for _, site, _ in summary.blocks] == SITES
    assert not summary.ungated_adds, summary.ungated_adds
    assert "gate after c2f.m.0.cv2," in str(summary)
    # the channels inside the gated Conv keep their channel gates
    producers = {p for ps, _ in summary.channel_groups for p in ps}
    assert {"c2f.m.0.cv1.conv", "c2f.m.1.cv1.conv", "c2f.m.0.cv2.conv"} <= producers


def test_fractional_gate_multiplies_the_conv_output() -> None:
    model, x = gated_yolo()
    gating = inserted_gating(model)
    model.eval()
    for g in gating.block_gates:
        set_block(g, "open")
    set_block(gating.block_gates[1], "half")
    g1 = float(gating.block_gates[1].eval_value()[0].detach())  # type: ignore[operator]
    assert 0.0 < g1 < 1.0
    seen: dict[str, Tensor] = {}
    bott = model.c2f.m[1]
    bott.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    bott.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0]))
    bott.cv2.bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o))
    with torch.no_grad():
        model(x)
    want = seen["in"] + g1 * F.silu(seen["bn"])  # (B, 4, H, W)
    torch.testing.assert_close(seen["out"], want)


@settings(max_examples=10, deadline=None)
@given(
    blocks=st.lists(st.sampled_from(["closed", "open", "half"]), min_size=3, max_size=3),
    channel_seed=st.integers(0, 2**16),
)
def test_pruned_equals_gated(blocks: list[str], channel_seed: int) -> None:
    model, x = gated_yolo()
    gating = inserted_gating(model)
    gen = torch.Generator().manual_seed(channel_seed)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)  # closed, open, in between
    for gate, state in zip(gating.block_gates, blocks, strict=True):
        set_block(gate, state)
    pruned = check_pruned(model, x, gen, factory=fresh_yolo, batches=(1, 3))
    names = dict(pruned.named_modules())
    for site, state in zip(SITES, blocks, strict=True):
        if state == "half":
            assert isinstance(names[site], GateScale)
            assert isinstance(names[site + ".module"], Conv)
        else:  # exactly 1: no multiply; closed: the branch is gone
            assert not isinstance(names.get(site), GateScale)


def test_closed_block_removes_the_branch_and_its_flops() -> None:
    model, x = gated_yolo()
    gating = inserted_gating(model)
    model.eval()
    dense = float(gp.cost(model, x, hard=True).flops)
    set_block(gating.block_gates[2], "closed")
    fewer = float(gp.cost(model, x, hard=True).flops)
    pruned = check_pruned(model, x, torch.Generator().manual_seed(1), factory=fresh_yolo)
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert c.flops == fewer < dense


def test_expected_cost_counts_the_branch_times_its_open_probability() -> None:
    assert_first_block_cost_scales(*gated_yolo())


def test_plan_replays_with_the_gate_value() -> None:
    model, _ = gated_yolo()
    gating = inserted_gating(model)
    model.eval()
    with torch.no_grad():
        gating.group_gates[0].log_alpha[:2].fill_(-10.0)  # type: ignore[index]
    for g, state in zip(gating.block_gates, ["half", "closed", "half"], strict=True):
        set_block(g, state)
    plan = json.loads(json.dumps(export_plan(model)))
    assert plan["scaled"] == ["c2f.m.0.cv2", "c2f2.m.0.cv2"]
    pruned = gp.prune(model)
    fresh = apply_plan(fresh_yolo(), plan)
    assert isinstance(fresh.c2f.m[0].cv2, GateScale)
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    gen = torch.Generator().manual_seed(5)
    for batch in (1, 3):
        x2 = torch.randn(batch, 3, 16, 16, generator=gen)
        with torch.no_grad():
            assert (fresh(x2) - model(x2)).abs().max().item() <= 1e-5
    bad = {**plan, "scaled": ["c2f.m.0.cv2.bn"]}
    bad.pop("checksum")
    with pytest.raises(ValueError, match="expected an activation a residual branch ends in"):
        apply_plan(fresh_yolo(), bad)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_pruned_model_with_a_wrapped_conv_scripts() -> None:
    """(Bottlenecks in an nn.Sequential: TorchScript evaluates C2f's ``y.extend(m(y[-1]) for m
    in self.m)`` as a list comprehension, every bottleneck reading the same ``y[-1]``, so a
    scripted C2f differs from the eager one, pruned or not.)"""
    torch.manual_seed(0)
    model = nn.Sequential(Conv(3, 8, 3), Bottleneck(8, 8), Bottleneck(8, 8), nn.Conv2d(8, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    gate_(model, x)
    gating = inserted_gating(model)
    assert [site for _, site, _ in gating.summary.blocks] == ["1.cv2", "2.cv2"]
    set_block(gating.block_gates[1], "half")
    model.eval()
    pruned = gp.prune(model)
    assert isinstance(pruned[2].cv2, GateScale)
    assert not any(m.training for m in pruned.modules())
    scripted = torch.jit.script(pruned)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), pruned(x), rtol=0.0, atol=0.0)
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


class SharedInBlock(nn.Module):
    """A shared activation called in the block's own forward: no module returns the branch's
    value alone, so the block stays ungated, with a reason saying what to do."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.conv2(self.act(self.conv1(x))))  # (B, 4, H, W)


def test_shared_activation_without_a_module_around_it_says_what_to_do() -> None:
    summary = gate_(nn.Sequential(nn.Conv2d(3, 4, 1), SharedInBlock()), torch.randn(2, 3, 6, 6))
    assert not summary.blocks
    assert dict(summary.ungated_adds)["add (in 1)"] == (
        "the branch ends in node '_1_act_1' (in 1): a call of 1.act (SiLU), one module called 2 "
        "times (use an activation module called once, e.g. nn.SiLU(), to gate this branch)"
    )


# ---------------------------------------------------------------- functional tails


FUNCTIONAL: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "F.silu": lambda h, w: F.silu(h),
    "F.gelu": lambda h, w: F.gelu(h),
    "F.relu6": lambda h, w: F.relu6(h),
    "torch.sigmoid": lambda h, w: torch.sigmoid(h),
    "F.relu": lambda h, w: F.relu(h),
    "torch.relu": lambda h, w: torch.relu(h),
    "h.relu()": lambda h, w: h.relu(),
    "F.leaky_relu": lambda h, w: F.leaky_relu(h, 0.1),
    "F.relu(inplace)": lambda h, w: F.relu(h, inplace=True),
    "h.relu_()": lambda h, w: h.relu_(),
    "torch.relu_": lambda h, w: torch.relu_(h),
    "F.leaky_relu_": lambda h, w: F.leaky_relu_(h, 0.2),
    "F.prelu": lambda h, w: F.prelu(h, w),
}
HOMOGENEOUS = [
    "F.relu",
    "torch.relu",
    "h.relu()",
    "F.leaky_relu",
    "F.relu(inplace)",
    "h.relu_()",
    "torch.relu_",
    "F.leaky_relu_",
    "F.prelu",
]


class FunctionalBlock(nn.Module):
    """``x + act(bn(conv(x)))`` with ``act`` a function written in the block's forward."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        # prelu's slopes (only for prelu: a parameter no op reads is another matter)
        slopes = torch.tensor([0.25, -0.5, 0.1, 2.0]) if form == "F.prelu" else torch.ones(4)
        self.w = nn.Parameter(slopes) if form == "F.prelu" else nn.Buffer(slopes)

    def forward(self, x: Tensor) -> Tensor:
        return x + FUNCTIONAL[self.form](self.bn(self.conv(x)), self.w)  # (B, 4, H, W)


class InnerFunctional(nn.Module):
    """A module of the model's own returning ``act(bn(conv(x)))`` (case (b): its output is
    gated)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        slopes = torch.tensor([0.25, -0.5, 0.1, 2.0]) if form == "F.prelu" else torch.ones(4)
        self.w = nn.Parameter(slopes) if form == "F.prelu" else nn.Buffer(slopes)

    def forward(self, x: Tensor) -> Tensor:
        return FUNCTIONAL[self.form](self.bn(self.conv(x)), self.w)  # (B, 4, H, W)


class InnerBlock(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.f = InnerFunctional(form)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)  # (B, 4, H, W)


class FunctionalNet(nn.Module):
    def __init__(self, form: str, inner: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        block = InnerBlock if inner else FunctionalBlock
        self.b1, self.b2 = block(form), block(form)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.b2(self.b1(self.stem(x))))  # (B, 2, H, W)


def functional_net(form: str, inner: bool) -> Callable[[], FunctionalNet]:
    def factory() -> FunctionalNet:
        torch.manual_seed(0)
        return FunctionalNet(form, inner)

    return factory


def test_other_function_tail_says_what_to_do() -> None:
    summary = gate_(FunctionalNet("F.silu", inner=False), torch.randn(2, 3, 6, 6))
    assert not summary.blocks
    assert dict(summary.ungated_adds)["add (in b1)"] == (
        "the branch ends in silu (in b1), an activation function no module of the model's own "
        "returns alone (use an activation module called once, e.g. nn.SiLU(), to gate this "
        "branch)"
    )


@pytest.mark.parametrize("form", HOMOGENEOUS)
def test_homogeneous_function_tail_moves_the_gate_before_it(form: str) -> None:
    model = functional_net(form, inner=False)()
    summary = gate_(model, torch.randn(2, 3, 6, 6))
    assert [site for _, site, _ in summary.blocks] == ["b1.bn", "b2.bn"]
    assert not summary.ungated_adds


@settings(max_examples=25, deadline=None)
@given(
    form=st.sampled_from(sorted(FUNCTIONAL)),
    inner=st.booleans(),
    states=st.lists(st.sampled_from(["closed", "open", "half"]), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_functional_tails_prune_exactly(
    form: str, inner: bool, states: list[str], seed: int
) -> None:
    if not inner and form not in HOMOGENEOUS:
        return  # no block gate (test_other_function_tail_says_what_to_do)
    factory = functional_net(form, inner)
    model = factory()
    gen = torch.Generator().manual_seed(seed)
    randomise_batchnorms(model, gen)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    summary = gate_(model, x)
    want = ["b1.f", "b2.f"] if inner else ["b1.bn", "b2.bn"]
    if inner and form in HOMOGENEOUS:
        want = ["b1.f.bn", "b2.f.bn"]  # the gate moves before the activation, folded
    assert [site for _, site, _ in summary.blocks] == want
    gating = inserted_gating(model)
    for gate, state in zip(gating.block_gates, states, strict=True):
        set_block(gate, state)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)
    pruned = check_pruned(model, x, gen, factory=factory, batches=(1, 3))
    scaled = [name for name, m in pruned.named_modules() if isinstance(m, GateScale)]
    wrapped = inner and form not in HOMOGENEOUS  # else folded into the BatchNorm
    assert scaled == [s for s, st_ in zip(want, states, strict=True) if st_ == "half" and wrapped]


@pytest.mark.parametrize("form", HOMOGENEOUS)
def test_homogeneous_tail_is_exact_in_training_mode(form: str) -> None:
    """Training mode, the gates' sampled values (hard concrete: in [0, 1]): the gated block is
    ``x + g * act(bn(conv(x)))`` with the gate moved before the activation, in-place forms too."""
    torch.manual_seed(0)
    model = FunctionalNet(form, inner=False)
    x = torch.randn(2, 3, 6, 6)
    gate_(model, x, channels=False)
    gating = inserted_gating(model)
    model.train()
    seen: dict[str, Tensor] = {}
    b1 = model.b1
    b1.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.clone()))
    b1.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0].clone()))
    b1.conv.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.clone()))
    for _ in range(5):
        with torch.no_grad():
            model(x)
            g = gating._values()[1][0][0]  # the block gate's sampled value of this forward
            assert 0.0 <= float(g) <= 1.0
            bn = b1.bn
            z = F.batch_norm(seen["conv"], None, None, bn.weight, bn.bias, training=True)
            want = seen["in"] + g * FUNCTIONAL[form](z, b1.w)  # (B, 4, H, W)
        torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-6)


class Inner(nn.Module):
    """A module holding a residual block of its own (ending in its own SiLU) and ending in a
    shared SiLU: the outer branch's gate sits on this module's output, the inner one's on
    its SiLU, so a pruned model may hold a GateScale inside a GateScale."""

    shared = nn.SiLU()

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.a = nn.SiLU()
        self.act = Inner.shared

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.a(self.c1(x))  # (B, 4, H, W)
        return self.act(self.bn(self.c2(h)))  # (B, 4, H, W)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.inner(x)  # (B, 4, H, W)


class NestedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv(3, 4, 3)
        self.o1, self.o2 = Outer(), Outer()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.o2(self.o1(self.stem(x))))  # (B, 2, H, W)


def fresh_nested() -> NestedNet:
    torch.manual_seed(0)
    return NestedNet()


@settings(max_examples=12, deadline=None)
@given(
    states=st.lists(st.sampled_from(["closed", "open", "half"]), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
@example(states=["half", "half", "closed", "half"], seed=0)
def test_nested_gate_scales_prune_exactly(states: list[str], seed: int) -> None:
    model = fresh_nested()
    gen = torch.Generator().manual_seed(seed)
    randomise_batchnorms(model, gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    summary = gate_(model, x)
    sites = ["o1.inner.a", "o1.inner", "o2.inner.a", "o2.inner"]
    assert [site for _, site, _ in summary.blocks] == sites
    gating = inserted_gating(model)
    for gate, state in zip(gating.block_gates, states, strict=True):
        set_block(gate, state)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)
    pruned = check_pruned(model, x, gen, factory=fresh_nested, batches=(1, 3))
    if states[:2] == ["half", "half"]:
        assert isinstance(pruned.o1.inner, GateScale)
        assert isinstance(pruned.o1.inner.module.a, GateScale)
