"""Work ``gate_`` and ``prune`` need not do (2026-12-07 evening, ResNet-1D of 50 blocks):

- the nodes of a module's code were found by looking up the owner of every graph node once
  per module checked (``scope_nodes``: blocks x nodes lookups); now once per graph.

The results are unchanged (the other test files check them); these tests count the work.
"""

from __future__ import annotations

import pytest
import torch
from gating_helpers import randomise_gates
from torch import fx

import gatedprune
from gatedprune.demo_resnet import ResNet1d
from gatedprune.gating import gate_
from gatedprune.gating import graph as graph_mod
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
