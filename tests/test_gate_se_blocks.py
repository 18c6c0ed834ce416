"""Residual branches that end in a product: squeeze-and-excitation (SE-ResNet, EfficientNet's
MBConv), gated linear units and hand-written swish. The block gate scales the module that
produces one factor; the gated model scales it for every reader inside the branch (the SE
path too), the pruned model folds it into that module, and a closed gate zeroes the product,
so the whole block goes. Before, such branches got no block gate ("the branch ends in mul").
"""

from __future__ import annotations

import json

import pytest
import torch
from gating_helpers import inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gating import apply_plan, export_plan, gate_


class SEBasic(nn.Module):
    """SE-ResNet's basic block (squeeze-and-excitation on the branch, before the add)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Linear(c, c // 2), nn.Linear(c // 2, c)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))  # (B, C, H, W)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))  # (B, C)
        return torch.relu(x + y * s[:, :, None, None])


class MBConv(nn.Module):
    """EfficientNet's MBConv: expand, depthwise, SE with SiLU, project, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        e = 4 * c
        self.expand, self.bn0 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.dw, self.bn1 = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e)
        self.se1, self.se2 = nn.Conv2d(e, c // 2, 1), nn.Conv2d(c // 2, e, 1)
        self.project, self.bn2 = nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.silu(self.bn1(self.dw(nn.functional.silu(self.bn0(self.expand(x))))))
        s = torch.sigmoid(self.se2(nn.functional.silu(self.se1(h.mean((2, 3), keepdim=True)))))
        return x + self.bn2(self.project(h * s))  # (B, C, H, W)


class GLU(nn.Module):
    """A gated linear unit branch: a(x) * sigmoid(b(x))."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.a(x) * torch.sigmoid(self.b(x))


class Swish(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)  # (B, d)
        return x + y * torch.sigmoid(y)


class Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind in ("se", "mbconv"):
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            block = SEBasic if kind == "se" else MBConv
            self.blocks = nn.Sequential(*(block(8) for _ in range(3)))
            self.head = nn.Linear(8, 4)
        else:
            self.stem = nn.Linear(6, 8)  # type: ignore[assignment]
            block2 = GLU if kind == "glu" else Swish
            self.blocks = nn.Sequential(*(block2(8) for _ in range(3)))
            self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h.mean((2, 3)) if self.kind in ("se", "mbconv") else h)


def _input(kind: str, batch: int, gen: torch.Generator) -> Tensor:
    shape = (batch, 3, 6, 6) if kind in ("se", "mbconv") else (batch, 6)
    return torch.randn(*shape, generator=gen)


def _randomise(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)


KINDS = ["se", "mbconv", "glu", "swish"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_block_gets_a_gate(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    model = Net(kind).eval()
    summary = gate_(model, _input(kind, 2, gen))
    assert [owner for owner, _, _ in summary.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert not summary.ungated_adds


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS))
def test_block_gates_prune_exactly(seed: int, kind: str) -> None:
    """Closed blocks are removed, open ones keep their (possibly fractional) gate folded
    into the site: pruned == gated, hard cost == pruned cost, the plan replays."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Net(kind)
    _randomise(model, gen)
    model.eval()
    x = _input(kind, 2, gen)
    gate_(model, x)
    gating = inserted_gating(model)
    with torch.no_grad():  # closed, open, or in between (a fractional eval value)
        for g in (*gating.block_gates, *gating.group_gates):
            g.log_alpha.copy_(torch.empty(g.n).uniform_(-6.0, 3.0, generator=gen))
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (float(hard.flops), float(hard.params)) == (float(c.flops), float(c.params))
    fresh = apply_plan(Net(kind), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        xi = _input(kind, 3, gen)
        want = model(xi)
        assert (pruned(xi) - want).abs().max().item() <= 1e-5
        assert (fresh(xi) - want).abs().max().item() <= 1e-5
    closed = [not bool(g.is_open().all()) for g in gating.block_gates]
    if any(closed):
        assert c.flops < gatedprune.cost(Net(kind), x).flops


def test_closing_an_se_block_removes_its_squeeze_path_too() -> None:
    gen = torch.Generator().manual_seed(1)
    model = Net("se").eval()
    x = _input("se", 2, gen)
    gate_(model, x)
    gating = inserted_gating(model)
    gating.block_gates[1].force_(torch.zeros(1, dtype=torch.bool))
    pruned = gatedprune.prune(model)
    called: list[str] = []
    for name, m in pruned.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o, name=name: called.append(name))
    with torch.no_grad():
        out = pruned(x)
        assert (out - model(x)).abs().max().item() <= 1e-5
    assert "blocks.0.fc1" in called
    assert not any(n.startswith("blocks.1.") for n in called)


class SideOutput(nn.Module):
    """One factor is also read outside the branch (scaling it would change that reader), the
    other ends in a sigmoid (0 -> 0.5): no block gate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.fc2, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)  # (B, 4)
        out = x + y * torch.sigmoid(self.fc2(x))
        return self.head(torch.cat([out, y], dim=1))


def test_a_factor_read_outside_the_branch_gets_no_block_gate() -> None:
    summary = gate_(SideOutput().eval(), torch.randn(2, 4))
    assert not summary.blocks
    assert summary.ungated_adds == [
        ("add (in <root>)", "fc (in <root>) is read outside the branch")
    ]


class Unbounded(nn.Module):
    """The other factor depends on the gated one and is unbounded (rsqrt of its mean square,
    no epsilon): with the gate closed the product would be 0 * inf = NaN, not 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)  # (B, 4)
        return self.head(x + y * torch.rsqrt(y.pow(2).mean(1, keepdim=True)))


def test_an_unbounded_factor_that_depends_on_the_gated_one_gets_no_block_gate() -> None:
    summary = gate_(Unbounded().eval(), torch.randn(2, 4))
    assert not summary.blocks
    ((_, why),) = summary.ungated_adds
    assert "depends on fc and is not bounded" in why


def test_channels_multiplied_by_an_excitation_are_gated_with_it() -> None:
    """The excitation's channels (fc2 / se2 outputs) join the channels they multiply: the SE
    trunk and MBConv's expanded channels are gated (they were pinned: "multiplies by ungated
    channels")."""
    gen = torch.Generator().manual_seed(0)
    se = gate_(Net("se").eval(), _input("se", 2, gen))
    trunk = ["stem", "blocks.0.conv2", "blocks.0.fc2", "blocks.1.conv2", "blocks.1.fc2"]
    assert any(set(trunk) <= set(p) for p, _ in se.channel_groups)
    mb = gate_(Net("mbconv").eval(), _input("mbconv", 2, gen))
    assert (["blocks.0.expand", "blocks.0.se2"], 32) in mb.channel_groups


class ExcitationReadTwice(nn.Module):
    """The excitation is also added to the output: there a closed channel would be 0.5, not
    0, so those channels stay ungated."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(self.fc2(x))  # (B, 6)
        return self.head(torch.relu(self.fc(x)) * s + s)


def test_an_excitation_read_elsewhere_keeps_its_channels() -> None:
    torch.manual_seed(3)
    model = ExcitationReadTwice().eval()
    x = torch.randn(2, 4)
    summary = gate_(model, x)
    assert not summary.channel_groups
    assert ({"fc", "fc2"}, 6) in [(set(p), n) for p, n, _ in summary.ungated_groups]
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


class ExcitationIntoLinear(nn.Module):
    """The excitation also feeds a Linear, which would read 0.5 at a closed channel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.fc2 = nn.Linear(4, 6), nn.Linear(4, 6)
        self.head, self.side = nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(self.fc2(x))  # (B, 6)
        return self.head(torch.relu(self.fc(x)) * s) + self.side(s)


def test_an_excitation_read_by_a_linear_keeps_its_channels() -> None:
    torch.manual_seed(4)
    model = ExcitationIntoLinear().eval()
    x = torch.randn(2, 4)
    summary = gate_(model, x)
    reasons = {frozenset(p): why for p, _, why in summary.ungated_groups}
    why = reasons[frozenset({"fc", "fc2"})]
    assert "is not zero at closed channels and node 'side'" in why
    for g in gatedprune.gate_modules(model):
        g.force_(torch.zeros(g.n, dtype=torch.bool))
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5
