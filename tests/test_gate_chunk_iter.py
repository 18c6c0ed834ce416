"""Iterating the pieces of a split whose count the code fixes (ultralytics' C2f:
``list(self.cv1(x).chunk(2, 1))``), and the sections of one ``chunk``/``split`` pruned apart
when nothing combines them channel by channel (audit of 2026-12-07: every C2f was kept whole,
and a conv split (8, 8) into two independent convs got one 8-gate group)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import (
    budget_steps,
    check_pruned,
    inserted_gating,
    randomise_batchnorms,
    randomise_gates,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import apply_plan, export_plan, gate_

MODES = ("list_chunk", "list_split", "tuple_chunk", "for_chunk", "star")


class Conv(nn.Module):
    """ultralytics' Conv: conv, BatchNorm, SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, 1, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))  # (B, C2, H, W)


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x))  # (B, C, H, W)


class C2f(nn.Module):
    """C2f as ultralytics writes it, the pieces of cv1 iterated in ``mode``'s way."""

    def __init__(self, c1: int, c2: int, n: int, mode: str) -> None:
        super().__init__()
        self.c, self.mode = c2 // 2, mode
        self.cv1 = Conv(c1, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        h = self.cv1(x)  # (B, 2c, H, W)
        if self.mode == "list_chunk":
            y = list(h.chunk(2, 1))
        elif self.mode == "list_split":
            y = list(h.split((self.c, self.c), 1))
        elif self.mode == "tuple_chunk":
            y = [*tuple(torch.chunk(h, 2, dim=1))]
        elif self.mode == "for_chunk":
            y = []
            for t in h.chunk(2, 1):  # (B, c, H, W) each
                y.append(t)
        else:
            first, *rest = h.chunk(2, 1)
            y = [first, *rest]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))  # (B, c2, H, W)


class Net(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.stem = Conv(3, 8, 3)
        self.block = C2f(8, 16, 2, mode)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))  # (B, 3)


def _sample(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 3, 6, 6, generator=gen)


@pytest.mark.parametrize("mode", MODES)
def test_c2f_traces_and_each_section_is_a_group(mode: str) -> None:
    # before: "Proxy object cannot be iterated", the C2f kept whole (list(...)/for/star)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no submodule kept whole
        summary = gate_(Net(mode).eval(), _sample(2, torch.Generator().manual_seed(0)))
    assert summary.opaque == {}
    groups = [(list(g[0]), g[1]) for g in summary.channel_groups]
    assert groups.count((["block.cv1.conv"], 8)) == 2  # the two sections apart
    assert (["block.m.0.cv1.conv"], 8) in groups
    assert (["block.cv2.conv"], 16) in groups


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), data=st.data())
def test_c2f_sections_closed_independently_prune_exactly(mode: str, data: st.DataObject) -> None:
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = Net(mode)
    randomise_batchnorms(model, gen)
    model.eval()
    x = _sample(3, gen)
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    gating = inserted_gating(model)
    sections = [
        i for i, (p, *_) in enumerate(summary.channel_groups) if list(p) == ["block.cv1.conv"]
    ]
    assert len(sections) == 2
    kept = []
    for i, gate in enumerate(gating.group_gates):
        mask = data.draw(st.lists(st.booleans(), min_size=gate.n, max_size=gate.n), label=f"g{i}")
        first = 1 if i == sections[0] else 0
        if first:
            mask[0] = False  # section 0 loses a channel at least
        mask[data.draw(st.integers(first, gate.n - 1), label=f"open{i}")] = True  # >= 1 open
        gate.force_(torch.tensor(mask))  # type: ignore[operator]
        kept.append(sum(mask))
    pruned = check_pruned(model, x, gen, factory=lambda: Net(mode), batches=(1, 4))
    cv1 = pruned.get_submodule("block.cv1.conv")
    assert isinstance(cv1, nn.Conv2d)
    # each section keeps its own channels (before: section 1 lost section 0's closed ones)
    assert cv1.out_channels == kept[sections[0]] + kept[sections[1]]
    got = gp.cost(pruned, x)
    assert isinstance(got, gp.Cost)
    assert isinstance(dense, gp.Cost)
    assert got.flops < dense.flops
    assert got.params < dense.params


@pytest.mark.parametrize("mode", ["list_chunk", "star"])
def test_c2f_budget_steps_then_prune_and_replay(mode: str) -> None:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = Net(mode)
    randomise_batchnorms(model, gen)
    x = _sample(3, gen)
    dense = gp.cost(model.eval(), x)
    gate_(model, x)
    budget = gp.Budget(model, x, flops=0.5)
    budget_steps(model, budget, 3, lambda: _sample(3, gen))
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in gating.group_gates:
            gate.log_alpha.uniform_(-3.0, 3.0, generator=gen)  # type: ignore[operator]
            gate.log_alpha.view(-1)[0] = -9.0  # type: ignore[operator]
            gate.log_alpha.view(-1)[-1] = 9.0  # type: ignore[operator]
    model.eval()
    pruned = gp.prune(model).eval()
    got = gp.cost(pruned, x)
    assert isinstance(got, gp.Cost)
    assert isinstance(dense, gp.Cost)
    assert got.flops < dense.flops
    assert got.params < dense.params
    fresh = apply_plan(Net(mode), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        xi = _sample(4, gen)
        want = model(xi)  # (4, 3)
        assert (pruned(xi) - want).abs().max().item() <= 1e-5
        assert (fresh(xi) - want).abs().max().item() <= 1e-5


class TwoConvs(nn.Module):
    """A conv cut into two pieces read by two independent convs."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c, self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c(x)  # (B, 16, H, W)
        if self.how == "chunk":
            p, q = h.chunk(2, 1)
        elif self.how == "split_int":
            p, q = h.split(8, 1)
        else:
            p, q = h.split((8, 8), 1)
        return torch.cat([self.a(p), self.b(q)], 1)  # (B, 8, H, W)


@pytest.mark.parametrize("how", ["chunk", "split_int", "split_list"])
def test_sections_read_apart_are_pruned_apart(how: str) -> None:
    # before: one 8-gate group for both sections; closing channel 0 of section 0 removed
    # channel 0 of section 1 too (pruned code split([7, 7]))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    model = TwoConvs(how).eval()
    summary = gate_(model, x)
    assert [(list(g[0]), g[1]) for g in summary.channel_groups] == [(["c"], 8), (["c"], 8)]
    gating = inserted_gating(model)
    gating.group_gates[0].force_(torch.arange(8) != 0)  # type: ignore[operator]
    gating.group_gates[1].force_(torch.ones(8, dtype=torch.bool))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, factory=lambda: TwoConvs(how), batches=(1, 3))
    a, b = pruned.get_submodule("a"), pruned.get_submodule("b")
    assert isinstance(a, nn.Conv2d)
    assert isinstance(b, nn.Conv2d)
    assert (a.in_channels, b.in_channels) == (7, 8)


class Glu(nn.Module):
    """SwiGLU (or halves added): the halves combined channel by channel stay pruned together
    (F.glu itself is not pruned through: kept whole)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.up, self.down = nn.Linear(4, 16), nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)  # (B, 16)
        if self.how == "split_added":
            a, b = h.split(8, -1)  # (B, 8) each
            return self.down(a + torch.tanh(b))  # (B, 4)
        a, b = h.chunk(2, -1)  # (B, 8) each
        return self.down(a * F.silu(b))  # (B, 4)


@pytest.mark.parametrize("how", ["swiglu", "split_added"])
def test_glu_halves_stay_pruned_together(how: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, generator=gen)
    model = Glu(how).eval()
    summary = gate_(model, x)
    assert [g[1] for g in summary.channel_groups] == [8]
    gating = inserted_gating(model)
    gating.group_gates[0].force_(torch.arange(8) % 3 != 0)  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, factory=lambda: Glu(how), batches=(1, 5))
    up = pruned.get_submodule("up")
    assert isinstance(up, nn.Linear)
    assert up.out_features == 10


class Iterated(nn.Module):
    """Pieces of a split whose count depends on the input's shape, iterated."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([t * 2 for t in self.c(x).split(4, 1)], 1)  # (B, 8, H, W)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.o = Iterated(), nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.o(self.inner(x))  # (B, 2, H, W)


def test_iteration_of_unknown_count_hints_a_known_count() -> None:
    # before: the hint suggested Hugging Face's *input_shape fix
    with pytest.warns(UserWarning, match="cannot be traced") as record:
        summary = gate_(Outer().eval(), torch.randn(2, 3, 4, 4))
    text = " ".join(str(w.message) for w in record)
    assert "unpack it with a known count: `a, b = x.chunk(2, 1)`" in text
    assert "input_shape" not in text
    assert list(summary.opaque) == ["inner"]


class FewerPieces(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.o = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.o(torch.cat(list(self.c(x).chunk(4, 1)), 1))  # 3 pieces of 2


def test_chunk_iterated_past_its_pieces_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="gives 3 pieces for the example input, not 4"):
        gate_(FewerPieces().eval(), torch.randn(2, 3, 4, 4))


def test_plan_giving_one_section_of_a_chunk_is_refused() -> None:
    x = torch.randn(2, 3, 4, 4)
    model = TwoConvs("chunk").eval()
    gate_(model, x)
    inserted_gating(model).group_gates[0].force_(torch.arange(8) != 0)  # type: ignore[operator]
    plan = export_plan(model)
    chunk = next(k for k, v in plan["sizes"].items() if any(e[0] == "section_0" for e in v))
    plan["sizes"][chunk] = [e for e in plan["sizes"][chunk] if e[0] == "section_0"]
    del plan["checksum"]  # (edited by hand)
    with pytest.raises(ValueError, match=r"\(chunk\) the sections \[0\] alone: .* every section"):
        apply_plan(TwoConvs("chunk"), plan)


class ChunkBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.a, self.b = nn.Conv2d(4, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        p, q = self.c(x).chunk(2, 1)  # (B, 4, H, W) each
        return self.a(p) + self.b(q)  # (B, 4, H, W)


class CalledTwice(nn.Module):
    """A block holding a chunk called twice: prune cannot rewrite its code."""

    def __init__(self) -> None:
        super().__init__()
        self.s, self.blk, self.o = nn.Conv2d(3, 4, 1), ChunkBlock(), nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.o(self.blk(self.blk(self.s(x))))  # (B, 2, H, W)


def test_chunk_in_code_prune_cannot_rewrite_keeps_pieces_pruned_by_position() -> None:
    # (sections pruned apart would need a new split there: they were left ungated)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    model = CalledTwice().eval()
    summary = gate_(model, x)
    assert (["blk.c"], 4) in [(list(g[0]), g[1]) for g in summary.channel_groups]
    for _ in range(3):
        randomise_gates(model, gen)
        check_pruned(model, x, gen, factory=CalledTwice, batches=(1, 3))


class _DictC2f(C2f):
    """C2f whose bottlenecks live in an ``nn.ModuleDict`` (read by key)."""

    def __init__(self) -> None:
        super().__init__(8, 16, 2, "list_chunk")
        self.md = nn.ModuleDict({"a": Bottleneck(self.c), "b": Bottleneck(self.c)})
        del self.m

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))  # (B, c, H, W) each
        y.append(self.md["a"](y[-1]))
        y.append(self.md["b"](y[-1]))
        return self.cv2(torch.cat(y, 1))  # (B, 16, H, W)


class _DictNet(Net):
    def __init__(self) -> None:
        super().__init__("list_chunk")
        self.block = _DictC2f()


@pytest.mark.parametrize("dict_blocks", [False, True])
def test_a_rewritten_module_keeps_its_module_list_and_dict(dict_blocks: bool) -> None:
    # before 2026-12-08 01:02 UTC the C2f rewritten for its chunk (-> split at the kept
    # widths) held its bottlenecks in a bare nn.Module: pruned.block.m[0] was a TypeError
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model: Net = _DictNet() if dict_blocks else Net("list_chunk")
    model.eval()
    x = _sample(2, gen)
    gate_(model, x)
    for gate in inserted_gating(model).group_gates:
        mask = [True] * gate.n
        mask[0] = False
        gate.force_(torch.tensor(mask))  # type: ignore[operator]
    factory = _DictNet if dict_blocks else (lambda: Net("list_chunk"))
    pruned = check_pruned(model, x, gen, factory=factory, batches=(1, 3))
    block = pruned.get_submodule("block")
    assert type(block).__name__.startswith("Pruned")  # its code was rewritten
    if dict_blocks:
        assert type(block.md) is nn.ModuleDict
        assert isinstance(block.md["a"].get_submodule("cv1.conv"), nn.Conv2d)
    else:
        assert type(block.m) is nn.ModuleList
        assert len(block.m) == 2
        # (the bottlenecks' code is inlined in the block's: their parts are kept, by path)
        assert isinstance(block.m[0].get_submodule("cv1.conv"), nn.Conv2d)
