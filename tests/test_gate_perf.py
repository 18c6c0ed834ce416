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

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import inserted_gating, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, fx, nn

import gatedprune
from gatedprune.demo_resnet import ResNet1d
from gatedprune.gating import gate_
from gatedprune.gating import graph as graph_mod
from gatedprune.gating.core import InsertedGating
from gatedprune.gating.graph import owner_of, scope_nodes, trace_model


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
