"""Submodules whose ``forward`` takes a list of tensors (HRNet's multi-resolution fusion,
mmdet/mmpose necks): traced alone, ``xs[0]`` of the argument is a node; traced from the root,
where the caller passes a Python list of tensors, it is Python indexing and no node. Before
2026-12-07 22:50 UTC such a module could not be rewritten ("tracing it alone gives a different
graph than tracing the whole model") and every residual block in its code stayed ungated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import (
    check_pruned,
    examples,
    inserted_gating,
    randomise_gates,
    train_under_budget,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate


class Res(nn.Module):
    """The audit's minimal form: a residual block on the first tensor of a list."""

    def __init__(self, c: int = 8, mid: int = 12) -> None:
        super().__init__()
        self.a = nn.Sequential(
            nn.Conv2d(c, mid, 3, 1, 1),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, c, 3, 1, 1),
            nn.BatchNorm2d(c),
        )

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [xs[0] + self.a(xs[0]), xs[1]]


class Quick(nn.Module):
    def __init__(self, c: int = 8, mid: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 1, 1)
        self.r = Res(c, mid)
        self.fc = nn.Linear(c, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)  # (B, C, H, W)
        y = torch.relu(self.r([h, h])[0])  # (B, C, H, W)
        y = F.adaptive_avg_pool2d(y, 1)  # (B, C, 1, 1)
        return self.fc(y.view(y.size(0), -1))  # (B, 2)


def _body(c: int, mid: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c, mid, 3, 1, 1),
        nn.BatchNorm2d(mid),
        nn.ReLU(),
        nn.Conv2d(mid, c, 3, 1, 1),
        nn.BatchNorm2d(c),
    )


FORMS = ("index", "unpack", "tuple")


class Fuse(nn.Module):
    """HRNet-like two-branch module: a residual block on each resolution, written in its own
    code on the list's elements, then the exchange (low -> high upsampled, high -> low
    strided) and a list out. ``form``: how the elements are read (``xs[i]``, ``a, b = xs``,
    or a tuple argument)."""

    def __init__(self, c0: int, c1: int, mid: int, form: str) -> None:
        super().__init__()
        self.form = form
        self.b0, self.b1 = _body(c0, mid), _body(c1, mid)
        self.up = nn.Sequential(nn.Conv2d(c1, c0, 1), nn.BatchNorm2d(c0))
        self.down = nn.Sequential(nn.Conv2d(c0, c1, 3, 2, 1), nn.BatchNorm2d(c1))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        if self.form == "unpack":
            a, b = xs
        else:
            a, b = xs[0], xs[1]
        x0 = F.relu(a + self.b0(a))  # (B, C0, H, W)
        x1 = F.relu(b + self.b1(b))  # (B, C1, H/2, W/2)
        up = F.interpolate(self.up(x1), scale_factor=2.0, mode="nearest")  # (B, C0, H, W)
        y0 = F.relu(x0 + up)  # (B, C0, H, W)
        y1 = F.relu(x1 + self.down(x0))  # (B, C1, H/2, W/2)
        return [y0, y1]


class HRNetLike(nn.Module):
    def __init__(self, c0: int = 8, c1: int = 12, mid: int = 6, form: str = "index") -> None:
        super().__init__()
        self.form = form
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, 1, 1), nn.BatchNorm2d(c0), nn.ReLU())
        self.split = nn.Sequential(nn.Conv2d(c0, c1, 3, 2, 1), nn.BatchNorm2d(c1), nn.ReLU())
        self.fuse1 = Fuse(c0, c1, mid, form)
        self.fuse2 = Fuse(c0, c1, mid, form)
        self.head = nn.Linear(c0 + c1, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)  # (B, C0, H, W)
        xs = [h, self.split(h)]  # (B, C0, H, W), (B, C1, H/2, W/2)
        if self.form == "tuple":
            xs = self.fuse2(tuple(self.fuse1(tuple(xs))))  # type: ignore[arg-type]
        else:
            xs = self.fuse2(self.fuse1(xs))
        pooled = [t.mean((2, 3)) for t in xs]  # (B, C0), (B, C1)
        return self.head(torch.cat(pooled, 1))  # (B, 3)


def _x(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 3, 8, 8, generator=gen)


def _close_some_blocks(model: nn.Module, gen: torch.Generator) -> None:
    """Random gates, then every other block gate closed (log alpha -20)."""
    randomise_gates(model, gen)
    with torch.no_grad():
        for i, gate in enumerate(inserted_gating(model).block_gates):
            assert isinstance(gate, HardConcreteGate)
            if i % 2 == 0:
                gate.log_alpha.fill_(-20.0)


def test_the_audit_repro_gates_the_block_in_a_list_taking_module() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Quick()
    x = _x(4, gen)
    summary = gp.gate_(model, x)
    assert [owner for owner, _, _ in summary.blocks] == ["r"], str(summary)
    assert not summary.ungated_adds, str(summary)
    budget = gp.Budget(model, x[:1], flops=0.5)
    train_under_budget(model, budget, 3, lambda: (_x(4, gen), torch.randint(0, 2, (4,))))
    _close_some_blocks(model, gen)
    dense = gp.cost(Quick(), x)
    pruned = check_pruned(model, x, gen, factory=Quick, batches=(1, 3))
    c = gp.cost(pruned, x)
    assert c.flops < dense.flops
    assert c.params < dense.params
    # the rewritten module keeps its signature: one list argument, a list out
    h = torch.randn(2, 8, 8, 8, generator=gen)
    with torch.no_grad():
        out = pruned.r([h, h])
    assert isinstance(out, list)
    assert len(out) == 2
    assert torch.equal(out[1], h)


@pytest.mark.parametrize("form", FORMS)
def test_an_hrnet_like_fusion_gates_its_blocks_and_prunes_exactly(form: str) -> None:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = HRNetLike(form=form)
    x = _x(4, gen)
    summary = gp.gate_(model, x)
    # the block gate of each branch's residual (and of the strided exchange) in each module
    sites = {(owner, site) for owner, site, _ in summary.blocks}
    for f in ("fuse1", "fuse2"):
        assert {(f, f"{f}.b0.4"), (f, f"{f}.b1.4"), (f, f"{f}.down.1")} <= sites, str(summary)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert {"fuse1.b0.0", "fuse1.b1.0", "fuse2.b0.0", "fuse2.b1.0"} <= gated, str(summary)
    budget = gp.Budget(model, x[:1], flops=0.5)
    train_under_budget(model, budget, 3, lambda: (_x(4, gen), torch.randint(0, 3, (4,))))
    _close_some_blocks(model, gen)
    dense = gp.cost(HRNetLike(form=form), x)
    pruned = check_pruned(model, x, gen, factory=lambda: HRNetLike(form=form), batches=(1, 3))
    c = gp.cost(pruned, x)
    assert c.flops < dense.flops
    assert c.params < dense.params


class DictRes(nn.Module):
    """A residual block on a dict argument's entry, read with ``.get`` (not followed)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a = _body(c, 4)

    def forward(self, xs: dict[str, Tensor]) -> Tensor:
        h = xs.get("h")
        return h + self.a(h)


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.r = DictRes()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)  # (B, 8, H, W)
        y = self.r({"h": h})  # (B, 8, H, W)
        return self.fc(y.mean((2, 3)))  # (B, 2)


def test_a_container_read_in_a_form_not_followed_names_the_container() -> None:
    summary = gp.gate_(DictNet(), _x(2, torch.Generator().manual_seed(0)))
    assert not summary.blocks
    reasons = " ".join(why for _, why in summary.ungated_adds)
    assert "cannot rewrite module 'r'" in reasons, str(summary)
    assert "takes a list/tuple/dict argument (xs)" in reasons, str(summary)


@settings(max_examples=examples(10), deadline=None)
@given(
    c0=st.integers(2, 8),
    c1=st.integers(2, 8),
    mid=st.integers(1, 6),
    form=st.sampled_from(FORMS),
    seed=st.integers(0, 999),
)
def test_random_widths_and_gate_states_prune_exactly(
    c0: int, c1: int, mid: int, form: str, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = HRNetLike(c0, c1, mid, form)
    x = _x(3, gen)
    summary = gp.gate_(model, x)
    assert {owner for owner, _, _ in summary.blocks} == {"fuse1", "fuse2"}, str(summary)
    _close_some_blocks(model, gen)
    check_pruned(model, x, gen, factory=lambda: HRNetLike(c0, c1, mid, form), batches=(2,))


class WritesList(nn.Module):
    """HRNet's own ``xs[i] = branch(xs[i])``: fx cannot trace the write alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _body(8, 4)

    def forward(self, xs: list[Tensor]) -> Tensor:
        xs[0] = xs[0] + self.a(xs[0])
        return xs[0]


class WritesNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.r = WritesList()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.r([self.stem(x)])  # (B, 8, H, W)
        return self.fc(y.mean((2, 3)))  # (B, 2)


def test_a_list_argument_written_into_names_the_write() -> None:
    summary = gp.gate_(WritesNet(), _x(2, torch.Generator().manual_seed(0)))
    assert not summary.blocks
    reasons = " ".join(why for _, why in summary.ungated_adds)
    assert "takes a list/tuple/dict argument and writes into it" in reasons, str(summary)
