"""Work ``gate_`` and ``prune`` need not do (2026-12-07 evening, ResNet-1D of 50 blocks):

- the nodes of a module's code were found by looking up the owner of every graph node once
  per module checked (``scope_nodes``: blocks x nodes lookups); now once per graph;
- ``gate_`` ran the whole model three more times to count childless modules fx traced
  through, also when the model has none (nothing to count);
- ``prune`` deep-copied the model's gating (graphs, cost terms, summary) with the model and
  dropped the copy at once.

The results are unchanged (the other test files check them); these tests count the work.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gating_helpers import inserted_gating, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, fx, nn
from zoo import DenseBlockNet

import gatedprune
from gatedprune.demo_resnet import ResNet1d
from gatedprune.gating import gate_
from gatedprune.gating import graph as graph_mod
from gatedprune.gating.core import InsertedGating, _kept_mask
from gatedprune.gating.graph import owner_of, scope_nodes, trace_model
from gatedprune.gating.rnn import pad_to_width
from gatedprune.gating.structure import _Factors


def _resnet() -> ResNet1d:
    torch.manual_seed(0)
    return ResNet1d(widths=(8, 16), blocks=(4, 4))


def _count_owner_lookups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]

    def counted(node: fx.Node) -> str:
        calls[0] += 1
        return owner_of(node)

    monkeypatch.setattr(graph_mod, "owner_of", counted)
    return calls


def test_gate_and_prune_look_up_each_node_owner_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _resnet()
    x = torch.randn(2, 1, 24)  # (B, C, L)
    n_nodes = len(trace_model(model).graph.nodes)
    calls = _count_owner_lookups(monkeypatch)
    summary = gate_(model, x)
    assert len(summary.blocks) == 8  # every block is checked for a rewrite
    # before: once per node for each of the 8 blocks' modules (8 x n_nodes and more)
    assert calls[0] <= 2 * n_nodes
    randomise_gates(model, torch.Generator().manual_seed(1))
    model.eval()
    calls[0] = 0
    small = gatedprune.prune(model)
    assert calls[0] <= 2 * n_nodes
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


def test_scope_nodes_with_owners_is_scope_nodes() -> None:
    """``owners`` computed before a node was added: the new node is looked up."""
    model = _resnet()
    graph = trace_model(model).graph
    owners = graph_mod.node_owners(graph)
    relu = next(n for n in graph.nodes if owner_of(n) == "stages.1.2" and n.op == "call_module")
    with graph.inserting_after(relu):
        extra = graph.call_method("clone", (relu,))
    extra.meta["nn_module_stack"] = dict(relu.meta["nn_module_stack"])
    scopes = {"", *(name for name, _ in model.named_modules())}
    for scope in sorted(scopes):
        assert scope_nodes(graph, scope, owners) == scope_nodes(graph, scope), scope
    assert extra in scope_nodes(graph, "stages.1.2", owners)
    assert extra in scope_nodes(graph, "stages.1", owners)
    assert extra not in scope_nodes(graph, "stages.1.1", owners)


def _count_model_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    runs = [0]
    original = graph_mod.run_hooked

    def counted(*args: Any) -> None:
        runs[0] += 1
        original(*args)

    monkeypatch.setattr(graph_mod, "run_hooked", counted)
    return runs


def test_gate_runs_a_model_without_inlined_modules_once(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _count_model_runs(monkeypatch)
    gate_(_resnet(), torch.randn(2, 1, 24))
    assert runs[0] == 1  # how the model calls its modules (record_bindings); before: 4


class MyNorm(nn.LayerNorm):
    """A childless module of one's own that fx traces through, counted as a LayerNorm."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # (B, C)


class BatchMix(nn.Module):
    """Optionally mixes the samples of a batch (FLOPs growing with the batch squared)."""

    def __init__(self, norm: bool, mix: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.mix = nn.Linear(4, 8), nn.Linear(8, 2), mix
        self.norm = MyNorm(8) if norm else nn.LayerNorm(8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(torch.relu(self.fc1(x)))  # (B, 8)
        if self.mix:
            h = (h @ h.T) @ h  # (B, 8)
        return self.fc2(h)  # (B, 2)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("mix", [False, True])
def test_batch_scaling_is_still_checked_with_and_without_inlined_modules(
    norm: bool, mix: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = BatchMix(norm, mix)
    runs = _count_model_runs(monkeypatch)
    gate_(model, torch.randn(3, 4))
    assert inserted_gating(model).batch_scalable is (not mix)
    # a module to count: record_run and each batch check run (the first one failing ends
    # the checks) the model too
    assert runs[0] == ((2 + (1 if mix else 2)) if norm else 1)
    small = gatedprune.prune(model.eval())
    x = torch.randn(5, 4)  # (B, C)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "ab", "0", "1"]), min_size=1, max_size=4),
    st.lists(
        st.lists(st.sampled_from(["a", "b", "ab", "0", "1"]), min_size=1, max_size=3),
        max_size=4,
    ).map(lambda parts: {".".join(p) for p in parts}),
)
def test_within_any_is_the_prefix_test(parts: list[str], scopes: set[str]) -> None:
    path = ".".join(parts)
    expected = any(path == t or path.startswith(t + ".") for t in scopes)
    assert graph_mod._within_any(path, scopes) is expected


def test_prune_does_not_copy_the_gating(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _resnet()
    x = torch.randn(2, 1, 24)  # (B, C, L)
    gate_(model, x)
    randomise_gates(model, torch.Generator().manual_seed(2))
    model.eval()
    gating = inserted_gating(model)
    before = copy.deepcopy(model)

    def refuse(self: InsertedGating, memo: dict[int, Any]) -> InsertedGating:
        raise AssertionError("prune deep-copied the gating")

    monkeypatch.setattr(InsertedGating, "__deepcopy__", refuse, raising=False)
    small = gatedprune.prune(model)
    monkeypatch.undo()
    assert not any(isinstance(m, InsertedGating) for m in small.modules())
    assert inserted_gating(model) is gating  # the gated model keeps its gating, unchanged
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)
        assert torch.equal(model(x), before(x))
    assert not _reaches(small, gating)
    again = gatedprune.prune(model)  # the gating still prunes
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def _reaches(model: nn.Module, target: object) -> bool:
    """Whether ``target`` is reachable from ``model`` through instance attributes,
    containers and the hooks of its modules."""
    seen: set[int] = set()
    stack: list[object] = [model]
    while stack:
        obj = stack.pop()
        if obj is target:
            return True
        if id(obj) in seen or isinstance(obj, (type, Tensor, str, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return False


# The per-group loops of the decisions and cost terms visit only the groups an entry reads
# (before: every group of the model for each sliced module or cost factor). The results are
# those of the loops as they were, written out below.


def _kept_mask_reference(opens: list[np.ndarray], groups: np.ndarray, gidx: np.ndarray) -> Any:
    mask = np.ones(len(groups), dtype=bool)
    for g, o in enumerate(opens):
        sel = groups == g
        mask[sel] = o[gidx[sel]]
    return mask


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_kept_mask_is_the_loop_over_every_group(data: st.DataObject) -> None:
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=6))
    opens = [np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n))) for n in sizes]
    n = data.draw(st.integers(0, 12))
    # -1: ungated; len(sizes): a group without decisions (left kept, as before)
    groups = np.array(data.draw(st.lists(st.integers(-1, len(sizes)), min_size=n, max_size=n)))
    gidx = np.array(
        [data.draw(st.integers(0, sizes[g] - 1)) if 0 <= g < len(sizes) else 0 for g in groups],
        dtype=np.int64,
    )
    got = _kept_mask(opens, groups.astype(np.int64), gidx)
    expected = _kept_mask_reference(opens, groups.astype(np.int64), gidx)
    assert got.dtype == expected.dtype
    assert np.array_equal(got, expected)


def _hard_open_reference(gating: InsertedGating) -> list[Tensor]:
    out = []
    for g, clamp in zip(gating.group_gates, gating.clamp, strict=True):
        o = g.is_open().to(torch.float64)  # type: ignore[operator]
        if clamp and o.sum() == 0:
            o = o.clone()
            o[0] = 1.0
        out.append(o)
    for s in gating.slices.values():
        for grp, gidx in ((s.out_group, s.out_gidx), (s.in_group, s.in_gidx)):
            if grp is None or gidx is None or not len(grp) or bool((grp < 0).any()):
                continue
            if not all(gating.clamp[int(k)] for k in np.unique(grp)):
                continue
            if any(bool(out[int(k)][int(i)] > 0) for k, i in zip(grp, gidx, strict=True)):
                continue
            k, i = int(grp[0]), int(gidx[0])
            out[k] = out[k].clone()
            out[k][i] = 1.0
    return pad_to_width(out, gating.rnns)


class CatSum(nn.Module):
    """Two convolutions concatenated into one group with a third (the add): each holds a
    part of the group, kept with one channel when its part closes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(1, 3, 3, padding=1), nn.Conv1d(1, 3, 3, padding=1)
        self.c, self.head = nn.Conv1d(1, 6, 3, padding=1), nn.Conv1d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.a(x), self.b(x)], dim=1) + self.c(x)  # (B, 6, L)
        return self.head(torch.relu(h))  # (B, 2, L)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([DenseBlockNet, CatSum]), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_hard_open_is_the_loop_over_every_channel(
    net: type[nn.Module], seed: int, p_open: float
) -> None:
    """Convolutions reading or writing parts of groups, which close entirely at low
    ``p_open``."""
    torch.manual_seed(0)
    model = net()
    gate_(model, torch.randn(2, 1, 10))
    gating = inserted_gating(model)
    gen = torch.Generator().manual_seed(seed)
    for gate in gating.group_gates:
        gate.force_(torch.rand(gate.n, generator=gen) < p_open)  # type: ignore[operator]
    got, expected = gating.hard_open(), _hard_open_reference(gating)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_cost_factors_are_the_loop_over_every_group(data: st.DataObject) -> None:
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=6))
    n_atoms = data.draw(st.integers(1, 20))
    ggroup = np.array(
        data.draw(st.lists(st.integers(-1, len(sizes) - 1), min_size=n_atoms, max_size=n_atoms)),
        dtype=np.int64,
    )
    gidx = np.array(
        [data.draw(st.integers(0, sizes[g] - 1)) if g >= 0 else 0 for g in ggroup], dtype=np.int64
    )
    fac = _Factors(ggroup, gidx, sizes)
    reads = data.draw(
        st.lists(st.lists(st.integers(0, n_atoms - 1), min_size=1, max_size=8), max_size=6)
    )
    for r in reads:
        atoms = np.array(r, dtype=np.int64)
        index, _ = fac.get(atoms, len(atoms))
        gg = ggroup[atoms]
        if (gg < 0).all():
            assert index == -1
            continue
        for g, size in enumerate(sizes):
            expected = np.bincount(gidx[atoms][gg == g], minlength=size)
            row = fac.counts[g][index]
            assert row.dtype == expected.dtype
            assert np.array_equal(row, expected)
