"""Residual blocks: ``y = s + F(x)`` adds where one operand is a branch of parametrised layers.

For every add of two same-shaped tensors, the *dead set* of an operand is what disappears when
that operand is dropped from the add (the fx nodes that no longer reach the output). The operand
whose dead set holds the most FLOPs is the branch ``F``; the other one is the shortcut (identity
or projection). The block gate ``g`` multiplies ``F``'s last module output (walking back through
dropout/ReLU, which commute with ``g >= 0``), so the gated block is ``y = s + g * F(x)``; with
``g = 0`` the add is replaced by ``s`` and the dead set is removed: depth pruning. A branch
ending in a linear map written with the model's own parameters (``relu(x @ W1) @ W2 (+ b2)``,
GPT-2's ``Conv1D``) has it as its site: the gate scales the weight's output units and the bias,
``(x W + b) g = x (W g) + b g``. A branch ending in an element-wise activation module called
once (YOLO's ``Bottleneck``, ``x + silu(bn(conv(h)))``, see ``ACTIVATION_TAILS``) has that
activation as its site: the gate multiplies its output, ``x + g * act(z)``, and ``prune`` keeps
a value strictly between 0 and 1 as a ``GateScale`` around it. An activation that cannot
carry the gate (one module shared by many calls, ultralytics' ``Conv.default_act``, or a
function, ``F.silu``) hands it to the innermost module of the model's own, called once, that
returns the branch's value (``x + g * cv2(h)``); a positively homogeneous function tail
(``h.relu()``, ``F.prelu(h, w)``) lets it move before it, as ``F.relu`` does.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .channels import (
    ADD_METHODS,
    ADD_TARGETS,
    EXCITE_FUNCS,
    EXCITE_METHODS,
    EXCITE_MODULES,
    HOMOGENEOUS_FUNCS,
    HOMOGENEOUS_MODULES,
    RESHAPE_FUNCS,
    RESHAPE_METHODS,
    module_kind,
    zero_literal,
)
from .graph import RunRecord, ancestors, mutated_input, owner_of

__all__ = ["ACTIVATION_TAILS", "Block", "find_blocks", "graph_writes", "live_nodes", "node_label"]


@dataclass
class Block:
    """One gated residual branch."""

    index: int
    add: fx.Node
    branch_pos: int  # position of F in add.args
    site: str  # module whose output the block gate multiplies
    dead: frozenset[fx.Node]  # removed when this block alone closes
    owner: str  # module whose forward holds the add
    flops: int  # FLOPs of the dead set (dense)
    param: bool = False  # ``site`` is the weight of a linear map written with parameters
    # ``site``'s output is multiplied by the gate, not folded: an activation module, or a module
    # traced through that the branch ends in (``x + g * m(h)``); a GateScale when pruned
    scaled: bool = False


def graph_writes(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """``(op, tensor it writes)`` for every in-place op of ``graph`` (see ``mutated_input``)."""
    gm = graph.owning_module if isinstance(graph.owning_module, fx.GraphModule) else None
    return [(n, w) for n in graph.nodes if (w := mutated_input(n, gm)) is not None]


def live_nodes(
    graph: fx.Graph,
    cut: dict[fx.Node, int],
    writes: list[tuple[fx.Node, fx.Node]] | None = None,
) -> set[fx.Node]:
    """Nodes that reach the output, with the operand ``cut[add]`` of each cut add dropped; an
    in-place op whose result the code drops (``y.relu_()``) is live when what it writes is
    (``writes``: :func:`graph_writes` of ``graph``, computed if not given)."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    if writes is None:
        writes = graph_writes(graph)
    live: set[fx.Node] = set()
    stack = [out]
    while stack:
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            if n in cut:
                pos = cut[n]
                drop = n.args[pos]
                others = [a for i, a in enumerate(n.args) if i != pos]
                keep = [a for a in n.all_input_nodes if a is not drop or a in others]
            else:
                keep = list(n.all_input_nodes)
            stack.extend(a for a in keep if a not in live)
        stack = [n for n, w in writes if w in live and n not in live]
    return live


def _is_add(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in ADD_TARGETS and n.target is not _SUB:
        return "alpha" not in n.kwargs
    return n.op == "call_method" and n.target in ADD_METHODS and "alpha" not in n.kwargs


_SUB = operator.sub
_SCALE_FUNCS = {operator.mul, operator.truediv, torch.mul}


# finite whatever the input: the excitations, tanh and softmax
_BOUNDED_FUNCS = EXCITE_FUNCS | {torch.tanh, torch.softmax, F.softmax}
_BOUNDED_METHODS = EXCITE_METHODS | {"tanh", "softmax"}
_BOUNDED_MODULES = (*EXCITE_MODULES, nn.Tanh, nn.Softmax)
_SHAPE_FUNCS = RESHAPE_FUNCS | {operator.getitem}
_SHAPE_METHODS = RESHAPE_METHODS | {"expand", "expand_as", "contiguous"}


def _bounded(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n`` is a sigmoid / hardsigmoid / tanh / softmax output (finite whatever its
    input), possibly reshaped or indexed."""
    while True:
        fn = n.op == "call_function" and n.target in _SHAPE_FUNCS
        if fn or (n.op == "call_method" and n.target in _SHAPE_METHODS):
            n = n.args[0]  # type: ignore[assignment]
        else:
            break
        if not isinstance(n, fx.Node):
            return False
    if n.op == "call_function":
        return n.target in _BOUNDED_FUNCS
    if n.op == "call_method":
        return n.target in _BOUNDED_METHODS
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), _BOUNDED_MODULES)
    return False


def _independent(n: fx.Node, site: str, ends: dict[fx.Node, str] | None = None) -> bool:
    """Whether ``n`` is computed without the output of module ``site`` (or of the linear map
    whose weight is ``site``: a node of ``ends`` naming it) (so a gate on that output leaves
    it as it was)."""
    ends = ends or {}
    return not any(
        (v.op == "call_module" and v.target == site) or ends.get(v) == site for v in ancestors(n)
    )


def _site_of(
    gm: fx.GraphModule,
    u: fx.Node,
    calls: dict[str, int],
    opaque: set[str],
    inside: frozenset[fx.Node],
    ends: dict[fx.Node, str] | None = None,
    wraps: dict[fx.Node, str] | None = None,
) -> tuple[str | None, str | None]:
    """The module whose output the block gate scales (folded into it when pruning), walking
    back from the branch output ``u`` through ops that keep a zero at zero; ``inside``: the
    branch's nodes and its add. A value on the way may have other readers inside the branch
    (a squeeze-and-excitation ``y * sigmoid(fc(pool(y)))``): the gated model scales ``y`` for
    all of them, as the pruned one does with the gate folded into its producer, and a closed
    gate still zeroes the product. A product of two tensors is followed through whichever
    factor leads to a site. ``ends``: the nodes that end a linear map written with the
    model's own parameters whose output units gate_ can scale (the product, or the add of its
    bias), by the weight's name, which is then the site. ``wraps``: the values a module of
    the model's own code called once returns (its call's result, by the innermost such
    module's name): a branch ending in an activation that cannot carry the gate (a shared
    module, a function) has that module as its site, ``x + g * m(h)``."""
    ends = ends or {}
    wraps = wraps or {}
    n = u
    while True:
        if any(w not in inside for w in n.users):
            return None, f"{node_label(n)} is read outside the branch"
        if n in ends:
            return ends[n], None
        two = [a for a in n.args if isinstance(a, fx.Node)]
        is_mul = (n.op == "call_function" and n.target in (operator.mul, torch.mul)) or (
            n.op == "call_method" and n.target == "mul"
        )
        if is_mul and len(two) == 2 and len(n.args) == 2 and not n.kwargs:
            reasons = []
            for factor, other in ((two[0], two[1]), (two[1], two[0])):
                site, why = _site_of(gm, factor, calls, opaque, inside, ends, wraps)
                if site is not None and not (
                    _bounded(gm, other) or _independent(other, site, {**ends, **wraps})
                ):
                    # 0 * inf: with the gate closed the product could be NaN, not 0
                    site, why = (
                        None,
                        (
                            f"the other factor of {node_label(n)} depends on {site} and is not "
                            "bounded (a sigmoid, hardsigmoid, tanh or softmax)"
                        ),
                    )
                if site is not None:
                    return site, None
                reasons.append(why)
            return None, reasons[0]
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if isinstance(m, HOMOGENEOUS_MODULES) and n.args:
                n = n.args[0]  # type: ignore[assignment]
                continue
            foldable = module_kind(m) is not None or (
                isinstance(m, nn.LayerNorm) and m.weight is not None
            )
            # an element-wise activation called once: the gate multiplies its output, g * act(z)
            act = isinstance(m, ACTIVATION_TAILS) and n.target not in opaque
            if not foldable and act and calls[str(n.target)] == 1:
                return str(n.target), None
            if not foldable and act and n in wraps:  # shared: the module it ends is gated
                return wraps[n], None
            if not foldable:
                whole = " kept whole: torch.fx cannot trace it" if n.target in opaque else ""
                what = f"{n.target} ({type(m).__name__}{whole})"
                k = calls[str(n.target)]
                if k > 1:  # one module shared by many (ultralytics' Conv.default_act)
                    what = f"{call_site(n)}: a call of {what}, one module called {k} times"
                    if act:
                        what += f" ({_NO_WRAP})"
                return None, f"the branch ends in {what}"
            if calls[str(n.target)] != 1:
                return None, f"{n.target} is called more than once (here at {call_site(n)})"
            return str(n.target), None
        if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0:
            src = n.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module":
                m = gm.get_submodule(str(src.target))
                if type(m) is nn.MultiheadAttention and calls[str(src.target)] == 1:
                    return str(src.target), None  # attention output: fold into out_proj
            return None, f"the branch ends in {node_label(n)}, not a module the gate can fold into"
        if _plus_zero(n):  # g * (z + 0) = g * z + 0, g * (0 - z) = 0 - g * z
            n = next(a for a in n.args if isinstance(a, fx.Node))
            continue
        scalar_op = (n.op == "call_function" and n.target in _SCALE_FUNCS) or (
            n.op == "call_method" and n.target in ("mul", "div")
        )
        if scalar_op and len(n.args) == 2 and not n.kwargs:
            nodes = [a for a in n.args if isinstance(a, fx.Node)]
            consts = [a for a in n.args if isinstance(a, int | float) and not isinstance(a, bool)]
            divides = n.target in (operator.truediv, "div")
            if len(nodes) == 1 and len(consts) == 1 and (not divides or n.args[0] is nodes[0]):
                n = nodes[0]  # g * (c * z) = c * (g * z)
                continue
        shaped_as = n.op == "call_method" and n.target in ("reshape_as", "view_as")
        if (n.op == "call_function" and n.target in HOMOGENEOUS_FUNCS and n.args) or _moves(n):
            n = n.args[0]  # type: ignore[assignment]
            if not isinstance(n, fx.Node):
                return None, "unexpected argument"
            continue
        if shaped_as and len(n.args) == 2 and not n.kwargs:  # LeViT's bn(...).reshape_as(x):
            n = n.args[0]  # type: ignore[assignment]  # the other tensor gives only its shape
            if not isinstance(n, fx.Node):
                return None, "unexpected argument"
            continue
        if _homogeneous_tail(n):  # act(g * z) = g * act(z) for g >= 0: the gate moves before it
            n = n.args[0]  # type: ignore[assignment]
            continue
        if _activation_call(n):
            if n in wraps:  # x + g * m(h), the module m ending in this activation
                return wraps[n], None
            return None, (
                f"the branch ends in {node_label(n)}, an activation function no module of the "
                f"model's own returns alone ({_NO_WRAP})"
            )
        return None, (
            f"the branch ends in {node_label(n)}, neither a module nor a linear map with the "
            "model's parameters (x @ W, F.linear, addmm, a bias added or subtracted without "
            "alpha) the gate can fold into"
        )


# element-wise activations (per channel for PReLU) a branch may end in: the block gate
# multiplies their output (``x + g * act(z)``), which cannot be folded into a weight; a closed
# gate removes the branch, an open one keeps the product (see ``GateScale``)
ACTIVATION_TAILS: tuple[type[nn.Module], ...] = (
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Mish,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.PReLU,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardshrink,
    nn.Softshrink,
)


# positively homogeneous (``act(g * z) == g * act(z)`` for ``g >= 0``, as every gate value
# is) beyond HOMOGENEOUS_FUNCS: in-place and method forms, and prelu with a parameter weight
_HOMOGENEOUS_TAIL_FUNCS = {torch.relu_, F.leaky_relu_}
_HOMOGENEOUS_TAIL_METHODS = {"relu", "relu_"}
_PRELU_FUNCS = {F.prelu, torch.prelu}
# element-wise activation functions that are not: a branch ending in one is gated on the
# output of the module of the model's own returning it (``wraps`` of ``_site_of``), if any
_ACTIVATION_FUNCS = {
    F.silu,
    F.gelu,
    F.hardswish,
    F.mish,
    F.elu,
    F.elu_,
    F.celu,
    torch.celu_,
    F.selu,
    torch.selu_,
    F.relu6,
    F.hardtanh,
    F.hardtanh_,
    torch.sigmoid,
    F.sigmoid,
    F.hardsigmoid,
    torch.tanh,
    F.tanh,
    F.softplus,
    F.logsigmoid,
    F.softsign,
    F.tanhshrink,
    F.hardshrink,
    F.softshrink,
}
_ACTIVATION_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}
_NO_WRAP = "use an activation module called once, e.g. nn.SiLU(), to gate this branch"


def _homogeneous_tail(n: fx.Node) -> bool:
    """Whether ``n`` is ``relu_(z)``, ``z.relu()``, ``z.relu_()``, ``leaky_relu_(z, s)`` or
    ``prelu(z, w)`` with a parameter ``w``: ``act(g * z) == g * act(z)`` for a gate value
    ``g >= 0``, so the block gate can scale ``z`` instead, as for ``F.relu``."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.op == "call_method" and n.target in _HOMOGENEOUS_TAIL_METHODS:
        return True
    if n.op == "call_function" and n.target in _HOMOGENEOUS_TAIL_FUNCS:
        return True
    prelu = (n.op == "call_function" and n.target in _PRELU_FUNCS) or (
        n.op == "call_method" and n.target == "prelu"
    )
    weight = n.args[1] if len(n.args) == 2 else n.kwargs.get("weight")
    return prelu and isinstance(weight, fx.Node) and weight.op == "get_attr"


def _activation_call(n: fx.Node) -> bool:
    """Whether ``n`` is an element-wise activation function of a tensor (``F.silu(z)``,
    ``z.sigmoid()``) that is not positively homogeneous (see :func:`_homogeneous_tail`)."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    return (n.op == "call_function" and n.target in _ACTIVATION_FUNCS) or (
        n.op == "call_method" and n.target in _ACTIVATION_METHODS
    )


def call_site(n: fx.Node) -> str:
    """Where module call ``n`` is, for a module called more than once (one module shared by
    several blocks, as ultralytics' class attribute ``Conv.default_act = nn.SiLU()`` is):
    the graph node and the module whose ``forward`` calls it, since the module's own name
    (the first path torch.fx found it at) does not say which call is meant.

    >>> import torch.nn as nn
    >>> class Shared(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.act = nn.SiLU()
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return self.act(self.act(x))
    >>> g = fx.symbolic_trace(Shared()).graph
    >>> call_site([n for n in g.nodes if n.op == "call_module"][1])
    "node 'act_1' (in <root>)"
    """
    return f"node '{n.name}' (in {owner_of(n) or '<root>'})"


def _plus_zero(n: fx.Node) -> bool:
    """Whether ``n`` adds the number 0 to a tensor or subtracts one from 0 or 0 from it
    (``z + 0``, ``0 + z``, ``z - 0``, ``0 - z``, as ``id_out = 0; ... + id_out`` traces),
    which commutes with the block gate's scalar."""
    add = (n.op == "call_function" and n.target in (*ADD_TARGETS, torch.sub)) or (
        n.op == "call_method" and n.target in (*ADD_METHODS, "sub")
    )
    if not add or len(n.args) != 2 or n.kwargs:
        return False
    a, b = n.args
    return (isinstance(a, fx.Node) and zero_literal(b)) or (
        isinstance(b, fx.Node) and zero_literal(a)
    )


_MOVE_FUNCS = {
    *RESHAPE_FUNCS,
    *(torch.permute, torch.transpose, torch.movedim, torch.narrow, torch.roll),
}
_MOVE_METHODS = {
    *RESHAPE_METHODS,
    *("permute", "transpose", "movedim", "narrow", "contiguous", "clone", "t", "expand", "roll"),
}


def _moves(n: fx.Node) -> bool:
    """Whether ``n`` only moves or selects the elements of its first argument, so it commutes
    with the block gate's scalar (ConvNeXt's permute back to ``(B, C, H, W)``, MLP-Mixer's
    transpose back, TCN's chomp ``x[:, :, :-s].contiguous()``, Swin's ``torch.roll`` of the
    shifted windows back): its other arguments are
    sizes, dimensions or slices, never tensors."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    rest = (*n.args[1:], *n.kwargs.values())
    if n.op == "call_function" and n.target is operator.getitem:
        item = n.args[1] if len(n.args) > 1 else None
        return isinstance(item, slice | tuple) and _is_size(item)  # a tensor, not a tuple
    moves = (n.op == "call_function" and n.target in _MOVE_FUNCS) or (
        n.op == "call_method" and n.target in _MOVE_METHODS
    )
    return moves and _is_size(rest)


_SIZE_ARITH = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg}


def _is_size(a: object) -> bool:
    """Whether ``a`` is made of plain numbers, ``None``, ``...``, slices and sizes read from
    tensors (``x.size(1)``, ``x.shape[-1] // 2``), with no tensor among them."""
    if a is None or a is Ellipsis or isinstance(a, int | float | bool):
        return True
    if isinstance(a, slice):
        return _is_size((a.start, a.stop, a.step))
    if isinstance(a, list | tuple):
        return all(_is_size(v) for v in a)
    if not isinstance(a, fx.Node):
        return False
    if a.op == "call_method":
        return a.target in ("size", "dim")
    if a.op != "call_function":
        return False
    if a.target is getattr:
        return len(a.args) > 1 and a.args[1] == "shape"
    if a.target is operator.getitem:  # an item of a size tuple
        return _is_size(a.args[0]) and _is_size(a.args[1:])
    return a.target in _SIZE_ARITH and _is_size(a.args)


def node_label(n: fx.Node) -> str:
    """A graph node as the summary names it: its fx name and the module whose ``forward``
    holds it (fx names alone, ``add_3``, do not say which block is meant).

    >>> g = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2))).graph
    >>> node_label(list(g.nodes)[1])
    '_0 (in <root>)'
    """
    return f"{n.name} (in {owner_of(n) or '<root>'})"


def _residual_like(n: fx.Node) -> bool:
    """A subtraction or an add with ``alpha=`` of two tensors: residual forms not gated."""
    sub = (n.op == "call_function" and n.target in (_SUB, torch.sub)) or (
        n.op == "call_method" and n.target in ("sub", "sub_")
    )
    alpha = "alpha" in n.kwargs and (
        (n.op == "call_function" and n.target in ADD_TARGETS)
        or (n.op == "call_method" and n.target in ADD_METHODS)
    )
    args = [a for a in n.args if isinstance(a, fx.Node)]
    return (sub or alpha) and len(n.args) == 2 and len(args) == 2


_OTHER_FORM = (
    "a subtraction or an add with alpha= is not a residual add gate_ gates (write x + f(x), "
    "or x + c * f(x) with a number c)"
)


def find_blocks(
    gm: fx.GraphModule,
    record: RunRecord,
    opaque: Iterable[str] = (),
    param_ends: dict[fx.Node, str] | None = None,
    wraps: dict[fx.Node, str] | None = None,
) -> tuple[list[Block], list[tuple[str, str]]]:
    """Residual blocks of ``gm``, and (add node label, reason) for adds that are not gated
    (``opaque``: modules kept whole because fx cannot trace them, named as such;
    ``param_ends``: the nodes ending a linear map written with the model's own parameters
    whose output units can be scaled, by its weight's name; ``wraps``: the results of the
    calls of modules traced through, called once, that could stay calls of their module, by
    the innermost such module's name; see :func:`_site_of`)."""
    ends = param_ends or {}
    graph = gm.graph
    kept_whole = set(opaque)
    writes = graph_writes(graph)
    base = live_nodes(graph, {}, writes)
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    blocks: list[Block] = []
    skipped: list[tuple[str, str]] = []
    for n in graph.nodes:
        other_form = _residual_like(n)  # reported, not gated
        if not (_is_add(n) or other_form) or n not in base or len(n.args) != 2:
            continue
        shape = record.shapes.get(n)
        a, b = n.args
        if not (
            isinstance(a, fx.Node)
            and isinstance(b, fx.Node)
            and a is not b
            and shape is not None
            and record.shapes.get(a) == shape
            and record.shapes.get(b) == shape
        ):
            continue
        # the branch: the operand whose removal drops the most FLOPs among those holding a
        # module with parameters, or else (no module on either side) a linear map written with
        # parameters (``x + relu(x @ W1) @ W2``; a LoRA Linear's ``F.linear(x, W, b) +
        # up(down(x))`` keeps its base map and gates the adapter, as before such maps counted)
        best: tuple[tuple[bool, int], int, frozenset[fx.Node]] | None = None
        for pos in (0, 1):
            dead = frozenset(base - live_nodes(graph, {n: pos}, writes))
            module_params = any(
                d.op == "call_module"
                and any(True for _ in gm.get_submodule(str(d.target)).parameters())
                for d in dead
            )
            if not (module_params or any(d in ends for d in dead)):
                continue
            key = (module_params, sum(record.flops.get(d, 0) for d in dead))
            if best is None or key > best[0]:
                best = (key, pos, dead)
        if best is None:
            continue
        if other_form:
            skipped.append((node_label(n), _OTHER_FORM))
            continue
        (_, flops), pos, dead = best
        branch = n.args[pos]
        assert isinstance(branch, fx.Node)
        site, why = _site_of(gm, branch, calls, kept_whole, dead | {n}, ends, wraps)
        if site is None:
            skipped.append((node_label(n), why or "no site"))
            continue
        param = site in ends.values()
        # the gate multiplies an output no weight can fold: an activation's or a traced
        # module's (kept as a GateScale for a value strictly between 0 and 1)
        scaled = not param and (
            site not in calls or isinstance(gm.get_submodule(site), ACTIVATION_TAILS)
        )
        block = Block(len(blocks), n, pos, site, dead, owner_of(n), flops, param, scaled)
        blocks.append(block)
    return blocks, skipped


def outermost(scopes: Iterable[str]) -> list[str]:
    """The scopes that are not inside another one of them."""
    result: list[str] = []
    for s in sorted(set(scopes), key=lambda v: (v.count(".") if v else -1, v)):
        if any(t == "" or s == t or s.startswith(t + ".") for t in result):
            continue
        result.append(s)
    return result
