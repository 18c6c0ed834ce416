"""New adaptive shortcuts (``shortcuts="dense"``): gated edges from each residual block's output
to the inputs of later blocks whose input has the same shape and the same channels.

Only residual blocks that are modules called once with one tensor input are connected (their
input and output are module boundaries, so forward hooks can add the edges without rewriting
the user's code while training). An edge ``i -> j`` turns block ``j``'s input ``x_j`` into
``x_j + e_ij * out_i``; its gate starts *closed* (exactly 0, for sigmoid gates too), so gating
does not change the function. A block whose output a later in-place op overwrites (the next
block's ``x += f(x)``) has its output copied for the edges leaving it. Pruning turns every
surviving edge into real code: the innermost module holding both blocks (the parent looping
over a ModuleList) is rewritten to call a :class:`~gatedprune.gating.surgery.ScaledAdd`
submodule, ``x_j + e_ij * out_i`` with ``e_ij`` a buffer in its ``state_dict``.

Cost: a kept edge costs what it computes, 2 FLOPs per element of ``x_j`` (multiply and add) and
no parameters; the expected cost charges it with the probability that its gate is open (and that
no removed block kills it), so the budget weighs it against the blocks and channels. An edge is
computed whenever its gate is open, whether or not its two blocks survive: if block ``i`` is
removed, ``out_i`` is the trunk that flows past it, so the edge adds a scaled copy of the trunk;
if block ``j`` is removed, ``x_j + e_ij * out_i`` flows on through ``j``'s identity path. Only
with nested blocks can a removed block kill an edge (every reader of ``x_j`` is in its removed
branch); an edge whose source is in a removed branch keeps that source computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.fx as fx
from torch import Tensor, nn

from .blocks import Block
from .channels import ChannelAnalysis
from .graph import RunRecord, mutated_input, owner_of, run_hooked

__all__ = ["Edge", "find_dense_edges"]


@dataclass
class Edge:
    """A candidate shortcut from block module ``src`` to block module ``dst``."""

    src: str  # module whose output is added
    dst: str  # module whose input receives it
    src_node: str  # fx node of src's output
    dst_node: str  # fx node of dst's input
    scope: str  # innermost module holding both
    users: list[str]  # fx nodes inside dst that read its input
    buffer: str  # name of the ScaledAdd submodule in the rewritten scope
    numel: int = 0  # elements of dst's input for the example input (the edge costs 2 each)
    clone_src: bool = False  # src's output is later modified in place: keep a copy of it


def _in_scope(n: fx.Node, s: str) -> bool:
    o = owner_of(n)
    return o == s or o.startswith(s + ".")


def _common(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    out = []
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


def _code_owner(model: nn.Module, scope: str) -> str:
    """The innermost module at or above ``scope`` with a ``forward`` of its own: a ModuleList
    or ModuleDict is looped over by its parent's code, which is what a shortcut rewrites."""
    while scope and isinstance(model.get_submodule(scope), nn.ModuleList | nn.ModuleDict):
        scope = scope.rpartition(".")[0]
    return scope


def _same_channels(ca: ChannelAnalysis, a: fx.Node, b: fx.Node) -> bool:
    la, lb = ca.labels.get(a), ca.labels.get(b)
    if la is None or lb is None:
        return la is None and lb is None
    if la.dim != lb.dim or len(la.atoms) != len(lb.atoms):
        return False
    ga = np.stack([ca.atom_group[la.atoms], ca.atom_gidx[la.atoms]])
    gb = np.stack([ca.atom_group[lb.atoms], ca.atom_gidx[lb.atoms]])
    return bool((ga == gb).all())


def find_dense_edges(
    model: nn.Module,
    gm: fx.GraphModule,
    record: RunRecord,
    ca: ChannelAnalysis,
    blocks: list[Block],
    inputs: tuple[Tensor, ...],
) -> tuple[list[Edge], list[tuple[str, str]]]:
    """Candidate dense shortcuts, and (block module, reason) for blocks left unconnected."""
    skipped: list[tuple[str, str]] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    modules: list[str] = []
    for b in sorted(blocks, key=lambda b: order[b.add]):
        if b.owner == "":
            skipped.append((b.add.name, "the add is in the model's own forward, not a module"))
        elif b.owner not in modules:
            modules.append(b.owner)
    # module boundaries: one tensor in, one tensor out, called once
    calls: dict[str, list[tuple[int, bool, bool]]] = {m: [] for m in modules}
    returned: dict[str, tuple[Tensor, int]] = {}  # output and its version counter

    def make_hook(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            ok_in = len(args) == 1 and isinstance(args[0], Tensor)
            calls[name].append((len(args), ok_in, isinstance(out, Tensor)))
            if isinstance(out, Tensor):
                returned[name] = (out, out._version)

        return hook

    handles = [model.get_submodule(m).register_forward_hook(make_hook(m)) for m in modules]
    run_hooked(model, inputs, handles)  # every module left in its own mode
    # blocks whose output a later in-place op overwrites (`x += f(x); return x` in the next one)
    mutated = {m for m, (out, version) in returned.items() if out._version != version}
    info: list[tuple[str, fx.Node, fx.Node, list[str]]] = []
    for m in modules:
        c = calls[m]
        if len(c) != 1 or not (c[0][1] and c[0][2]):
            skipped.append((m, "not called once with one tensor input and output"))
            continue
        nodes = [n for n in gm.graph.nodes if _in_scope(n, m)]
        node_set = set(nodes)
        ins = {
            a for n in nodes for a in n.all_input_nodes if a not in node_set and a.op != "get_attr"
        }
        outs = [n for n in nodes if any(u not in node_set for u in n.users)]
        if len(ins) != 1 or len(outs) != 1:
            skipped.append((m, "its graph has several inputs or outputs"))
            continue
        x = next(iter(ins))
        users = [n.name for n in nodes if x in n.all_input_nodes]
        info.append((m, x, outs[0], users))
    # writes the graph itself keeps (`self.relu(x)` with inplace=True, `x.relu_()`): they stay
    # in place in the pruned code, where a shortcut reads its source when the destination
    # block starts; the gated model reads a copy taken when the source block returned
    writes: dict[fx.Node, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        w = mutated_input(n, gm)
        if w is not None:
            writes.setdefault(w, []).append(n)
    by_name = {n.name: n for n in gm.graph.nodes}
    edges: list[Edge] = []
    for j, (dst, x_j, _, users) in enumerate(info):
        for src, _, out_i, _ in info[:j]:
            if out_i is x_j or order[out_i] >= order[x_j]:
                continue
            if record.shapes.get(out_i) != record.shapes.get(x_j) or record.shapes.get(x_j) is None:
                continue
            if not _same_channels(ca, out_i, x_j):
                continue
            read_at = min(order[by_name[u]] for u in users)
            over = [w for w in writes.get(out_i, []) if order[out_i] < order[w] < read_at]
            if over:
                w = over[0]
                by = str(w.target) if w.op == "call_module" else w.name
                skipped.append((src, f"{by} overwrites its output in place before {dst} reads it"))
                continue
            scope = _code_owner(model, _common(src, dst))
            if scope in (src, dst):
                continue
            buffer = f"gp_shortcut_{src.replace('.', '_')}__{dst.replace('.', '_')}"
            numel = int(np.prod(record.shapes[x_j] or ()))
            edge = Edge(src, dst, out_i.name, x_j.name, scope, list(users), buffer, numel)
            edge.clone_src = src in mutated
            edges.append(edge)
    return edges, skipped
