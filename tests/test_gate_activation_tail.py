"""Residual branches that end in an activation (ultralytics' YOLO ``Bottleneck``: ``x +
cv2(cv1(x))`` with ``Conv = conv + BatchNorm + SiLU``, so ``x + silu(bn(conv(h)))``): the
block gate multiplies the activation's output, ``x + g * silu(...)``. A closed gate removes
the branch; an open one whose eval value is exactly 1 leaves the code as it is; a fractional
one stays exact as a ``GateScale`` around the activation (its multiply free, as the gated
model's is). Before 2026-12-08 such branches got no block gate ("the branch ends in ...
(SiLU)").
"""

from __future__ import annotations

import json

import pytest
import torch
from gating_helpers import (
    assert_first_block_cost_scales,
    budget_steps,
    check_pruned,
    inserted_gating,
    randomise_batchnorms,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import GateScale, apply_plan, export_plan, gate_


class Conv(nn.Module):
    """ultralytics' Conv: conv, BatchNorm, SiLU (an activation module of its own)."""

    def __init__(self, c1: int, c2: int, k: int = 1, inplace: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU(inplace=inplace)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))  # (B, C2, H, W)


class Bottleneck(nn.Module):
    """YOLO's Bottleneck with its shortcut: ``x + cv2(cv1(x))``."""

    def __init__(self, c: int, inplace: bool = False) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3, inplace=inplace)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x))  # (B, C, H, W)


class C3(nn.Module):
    """CSP block: two 1x1 convs, bottlenecks on one path (an nn.Sequential), concat, 1x1."""

    def __init__(self, c1: int, c2: int, n: int) -> None:
        super().__init__()
        h = c2 // 2
        self.cv1, self.cv2, self.cv3 = Conv(c1, h), Conv(c1, h), Conv(2 * h, c2)
        self.m = nn.Sequential(*(Bottleneck(h) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))  # (B, C2, H, W)


class C2f(nn.Module):
    """YOLOv8's C2f: split in two, each bottleneck of an nn.ModuleList reads the last piece,
    all pieces concatenated."""

    def __init__(self, c1: int, c2: int, n: int) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))  # 2 x (B, c, H, W)
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))  # (B, C2, H, W)


class Yolo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv(3, 8, 3)
        self.c3 = C3(8, 8, 2)
        self.c2f = C2f(8, 8, 2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.c2f(self.c3(self.stem(x))))  # (B, 4, H, W)


SITES = ["c3.m.0.cv2.act", "c3.m.1.cv2.act", "c2f.m.0.cv2.act", "c2f.m.1.cv2.act"]


def gated_yolo(seed: int = 0) -> tuple[Yolo, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Yolo()
    randomise_batchnorms(model, gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    gate_(model, x)
    return model, x


def fresh_yolo() -> Yolo:
    torch.manual_seed(0)
    return Yolo()


def test_bottlenecks_get_block_gates_after_their_activation() -> None:
    model, _ = gated_yolo()
    summary = inserted_gating(model).summary
    assert sorted(site for _, site, _ in summary.blocks) == sorted(SITES)
    assert not any("add" in label and "SiLU" in why for label, why in summary.ungated_adds)
    assert "gate after c3.m.0.cv2.act" in str(summary)


def set_block(gate: HardConcreteGate, state: str) -> None:
    """``state``: closed (eval 0), open (eval exactly 1) or half (a fractional eval value)."""
    with torch.no_grad():
        gate.log_alpha.fill_({"closed": -10.0, "open": 10.0, "half": 0.3}[state])


def test_fractional_gate_multiplies_the_activation_output() -> None:
    """The gated model computes ``x + g * silu(...)``: the hook sits after the SiLU."""
    model, x = gated_yolo()
    gating = inserted_gating(model)
    model.eval()
    for g in gating.block_gates:
        set_block(g, "open")
    set_block(gating.block_gates[0], "half")
    g0 = float(gating.block_gates[0].eval_value()[0].detach())  # type: ignore[operator]
    assert 0.0 < g0 < 1.0
    seen: dict[str, Tensor] = {}
    bott = model.c3.m[0]
    bott.cv2.act.register_forward_hook(lambda m, i, o: seen.__setitem__("act", o))
    bott.cv2.bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o))
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(seen["act"], g0 * nn.functional.silu(seen["bn"]))


@settings(max_examples=12, deadline=None)
@given(
    blocks=st.lists(st.sampled_from(["closed", "open", "half"]), min_size=4, max_size=4),
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
        assert isinstance(gate, HardConcreteGate)
        set_block(gate, state)
    pruned = check_pruned(model, x, gen, factory=fresh_yolo, batches=(1, 3))
    names = dict(pruned.named_modules())
    for site, state in zip(SITES, blocks, strict=True):  # the block order is the sites'
        if state == "half":
            assert isinstance(names[site], GateScale)
        elif state == "open":
            assert isinstance(names[site], nn.SiLU)  # exactly 1: the code as it was
        else:
            assert site not in names or not isinstance(names[site], GateScale)


def test_closed_block_removes_the_branch_and_its_flops() -> None:
    model, x = gated_yolo()
    gating = inserted_gating(model)
    model.eval()
    dense = gp.cost(model, x, hard=True).flops
    set_block(gating.block_gates[2], "closed")  # c2f.m.0
    fewer = gp.cost(model, x, hard=True).flops
    pruned = check_pruned(model, x, torch.Generator().manual_seed(1), factory=fresh_yolo)
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert c.flops == float(fewer) < float(dense)
    with torch.no_grad():
        assert torch.equal(pruned.c2f.m[0](x[:, :4]), x[:, :4])  # the identity is left


def test_expected_cost_counts_the_branch_times_its_open_probability() -> None:
    assert_first_block_cost_scales(*gated_yolo())


def test_plan_replays_with_the_gate_value() -> None:
    model, x = gated_yolo()
    gating = inserted_gating(model)
    model.eval()
    for g, state in zip(gating.block_gates, ["half", "open", "closed", "half"], strict=True):
        set_block(g, state)  # type: ignore[arg-type]
    plan = json.loads(json.dumps(export_plan(model)))
    assert plan["scaled"] == ["c3.m.0.cv2.act", "c2f.m.1.cv2.act"]
    pruned = gp.prune(model)
    fresh = apply_plan(fresh_yolo(), plan)
    assert isinstance(fresh.c3.m[0].cv2.act, GateScale)
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert (fresh(x) - model(x)).abs().max().item() <= 1e-5
    bad = {**plan, "scaled": ["c3.m.0.cv2.bn"]}
    bad.pop("checksum")
    with pytest.raises(ValueError, match="expected an activation a residual branch ends in"):
        apply_plan(fresh_yolo(), bad)


def test_budget_steps_then_prune() -> None:
    model, x = gated_yolo()
    gen = torch.Generator().manual_seed(3)
    budget = gp.Budget(model, x, flops=0.6)
    budget_steps(model, budget, 4, lambda: torch.randn(2, 3, 8, 8, generator=gen))
    model.eval()
    check_pruned(model, x, gen, factory=fresh_yolo)


class InplaceNet(nn.Module):
    """Bottlenecks whose branch ends in ``nn.SiLU(inplace=True)``; the BN output it overwrites
    is read by nothing else (``"alone"``), by a product inside the branch (``"inside"``:
    ``act_(z) * sigmoid(z)``, which reads the overwritten ``z``) or by the model's output
    (``"outside"``)."""

    def __init__(self, reader: str) -> None:
        super().__init__()
        self.reader = reader
        self.stem = Conv(3, 4, 3)
        self.b1 = Bottleneck(4, inplace=True)
        self.b2 = Bottleneck(4, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.b1(self.stem(x))  # (B, 4, H, W)
        if self.reader == "alone":
            return self.b2(h)
        z = self.b2.cv2.bn(self.b2.cv2.conv(self.b2.cv1(h)))  # (B, 4, H, W)
        u = self.b2.cv2.act(z)  # z is overwritten too
        if self.reader == "inside":
            return h + u * torch.sigmoid(z)
        return (h + u) * 2.0 + z


@pytest.mark.parametrize("reader", ["alone", "inside", "outside"])
@pytest.mark.parametrize("states", [("half", "closed"), ("closed", "half"), ("open", "half")])
def test_inplace_activation_tail_is_exact(reader: str, states: tuple[str, str]) -> None:
    """The gate multiplies the activation's result (a new tensor), as GateScale does, and
    what it overwrote in place is read unscaled by both models."""
    torch.manual_seed(0)
    model = InplaceNet(reader)
    x = torch.randn(2, 3, 6, 6)
    gate_(model, x)
    gating = inserted_gating(model)
    # outside: removing u from the add removes no layer (z is computed for the output): no
    # block there, and b2's SiLU runs either way
    sites = ["b1.cv2.act"] + (["b2.cv2.act"] if reader != "outside" else [])
    assert [site for _, site, _ in gating.summary.blocks] == sites
    model.eval()
    for gate, state in zip(gating.block_gates, states[: len(sites)], strict=True):
        assert isinstance(gate, HardConcreteGate)
        set_block(gate, state)
    check_pruned(model, x, torch.Generator().manual_seed(0), factory=lambda: InplaceNet(reader))


class SoftmaxTail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.sm = nn.Softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.sm(self.fc(x))  # (B, 6)


def test_tail_not_elementwise_is_refused_with_a_reason() -> None:
    summary = gate_(SoftmaxTail(), torch.randn(2, 6))
    assert not summary.blocks
    assert any("the branch ends in sm (Softmax)" in why for _, why in summary.ungated_adds)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_pruned_model_with_a_gate_scale_scripts() -> None:
    torch.manual_seed(0)
    model = InplaceNet("alone")
    x = torch.randn(2, 3, 6, 6)
    gate_(model, x)
    set_block(inserted_gating(model).block_gates[1], "half")  # type: ignore[arg-type]
    model.eval()
    pruned = gp.prune(model)
    assert isinstance(pruned.b2.cv2.act, GateScale)
    scripted = torch.jit.script(pruned)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), pruned(x), rtol=0.0, atol=0.0)


def test_float64_gate_value_is_kept_in_float64() -> None:
    model, x = gated_yolo()
    model.double()
    gating = inserted_gating(model)
    for gate in gating.block_gates:
        set_block(gate, "half")  # type: ignore[arg-type]
    model.eval()
    pruned = gp.prune(model)
    act = pruned.c3.m[0].cv2.act
    assert isinstance(act, GateScale)
    assert act.scale.dtype == torch.float64
    xd = x.double()
    with torch.no_grad():
        assert (pruned(xd) - model(xd)).abs().max().item() <= 1e-12
