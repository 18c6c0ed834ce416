"""Tracing a user model with ``torch.fx`` and recording shapes and per-call costs.

Why ``torch.fx.symbolic_trace`` (and not ``torch.export``): fx keeps the user's module
hierarchy (``call_module`` nodes name the real submodules, ``nn_module_stack`` says whose
``forward`` each node belongs to), so pruning can slice the user's own modules in place and
rewrite only the innermost module whose code must change. Its limits: Python control flow that
depends on tensor *values* or shapes cannot be traced. When a submodule's ``forward`` fails to
trace, that submodule is kept whole as an opaque leaf (its inputs and outputs are not pruned, a
warning names it and the error) and the rest of the model is still analysed; a failure in the
model's own ``forward`` is an error.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..base import ModelGating
from ..costs import _handler_for, check_positional, counts_itself, unit_handler
from .rnn import GatedGRU, GatedLSTM, GatedRNN
from .transformer import (
    GatedMultiheadAttention,
    GatedTransformerEncoderLayer,
    PrunedMultiheadAttention,
    PrunedTransformerEncoderLayer,
)

__all__ = [
    "TracedModel",
    "mutated_input",
    "owner_of",
    "record_run",
    "scope_nodes",
    "trace_model",
]

_MAX_OPAQUE = 64
_LEAVES = (
    GatedMultiheadAttention,
    GatedTransformerEncoderLayer,
    PrunedMultiheadAttention,
    PrunedTransformerEncoderLayer,
    GatedLSTM,
    GatedGRU,
    GatedRNN,
)


class GateTracer(fx.Tracer):
    """fx tracer that keeps ``opaque`` submodules whole and remembers where tracing failed."""

    def __init__(self, opaque: set[str] | None = None) -> None:
        super().__init__()
        self.opaque = opaque if opaque is not None else set()
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque or isinstance(m, (ModelGating, *_LEAVES)):
            return True
        if counts_itself(m):  # gatedprune.cost counts it whole: so must the gated cost
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        name = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module whose forward failed
                self.failed_in = name
            raise


@dataclass
class TracedModel:
    """The fx graph of a model plus what could not be traced."""

    graph_module: fx.GraphModule
    opaque: dict[str, str] = field(default_factory=dict)  # qualified name -> why

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def trace_model(
    model: nn.Module,
    opaque: dict[str, str] | None = None,
    *,
    warn: bool = True,
    concrete_args: dict[str, Any] | None = None,
) -> TracedModel:
    """Trace ``model`` with fx, turning submodules whose ``forward`` cannot be traced into
    opaque leaves (see the module docstring). The model is traced in eval mode whatever its
    mode (and left in it): fx bakes ``self.training`` into the graph, and the graph must be
    the eval-mode function that ``prune`` keeps (``F.dropout(x, p, self.training)`` or a
    drop-path ``if not self.training: return x`` in rewritten code must not act in eval mode).
    Optional ``forward`` arguments defaulting to ``None`` that Python control flow tests
    (``if mask is not None:``) are traced at ``None``, the value ``gate_``'s one example input
    leaves them at (fx would trace them as tensors and take the branch): the model is traced
    both ways and the specialised graph is taken where the two differ.

    >>> traced = trace_model(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    >>> [n.op for n in traced.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    traced = _trace(model, opaque, warn=warn, concrete_args=concrete_args)
    if concrete_args is not None:
        return traced
    params = inspect.signature(model.forward).parameters.values()
    nones = {p.name: None for p in params if p.default is None}
    if not nones:
        return traced
    try:
        special = _trace(model, traced.opaque, warn=False, concrete_args=nones)
    except ValueError:
        return traced
    return special if _structure(special.graph) != _structure(traced.graph) else traced


def _structure(graph: fx.Graph) -> list[tuple[str, str]]:
    """The computing nodes of a graph (not its inputs, nor fx's checks of specialised ones)."""
    return [
        (n.op, str(n.target))
        for n in graph.nodes
        if n.op not in ("placeholder", "output")
        and getattr(n.target, "__name__", "") != "_assert_is_none"
    ]


def _trace(
    model: nn.Module,
    opaque: dict[str, str] | None,
    *,
    warn: bool,
    concrete_args: dict[str, Any] | None,
) -> TracedModel:
    """One fx trace of ``model`` (see :func:`trace_model`)."""
    found: dict[str, str] = dict(opaque or {})
    for _ in range(_MAX_OPAQUE):
        tracer = GateTracer(set(found))
        modes = [(m, m.training) for m in model.modules()]
        for m, _ in modes:  # code reading `self.training` is traced as the eval-mode function
            m.training = False
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
            name = tracer.failed_in
            if name is None or name in found:
                raise ValueError(
                    f"torch.fx cannot trace {type(model).__name__}.forward itself "
                    f"({type(e).__name__}: {e}); gate_ needs a traceable top-level forward "
                    "(move data-dependent control flow into a submodule)"
                ) from e
            found[name] = f"{type(e).__name__}: {e}"
            if warn:
                warnings.warn(
                    f"gate_: submodule '{name}' ({type(model.get_submodule(name)).__name__}) "
                    f"cannot be traced by torch.fx ({type(e).__name__}: {e}); it is kept whole "
                    "and not gated, the rest of the model is gated",
                    stacklevel=3,
                )
            continue
        finally:
            for m, mode in modes:
                m.training = mode
        return TracedModel(fx.GraphModule(tracer.root, graph), found)
    raise ValueError(f"gave up tracing {type(model).__name__}: too many untraceable submodules")


def owner_of(node: fx.Node) -> str:
    """Qualified name of the module whose ``forward`` contains ``node`` (``""``: the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    keys = list(stack.keys())
    paths = [stack[k][0] if isinstance(stack[k], tuple) else k for k in keys]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return str(paths[-1]) if paths else ""


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
# ops whose result may share memory with their first argument: writing into it writes the base
_VIEW_NAMES = {
    "getitem",
    "narrow",
    "view",
    "view_as",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "transpose",
    "permute",
    "movedim",
    "t",
    "select",
    "split",
    "chunk",
    "unbind",
    "tensor_split",
    "expand",
    "expand_as",
    "diagonal",
    "as_strided",
    "detach",
    "contiguous",
}


def _view_name(node: fx.Node) -> str:
    if node.op not in ("call_method", "call_function"):
        return ""
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def mutated_input(node: fx.Node, gm: fx.GraphModule | None = None) -> fx.Node | None:
    """The tensor that ``node`` writes into in place (``y.relu_()``, ``torch.relu_(y)``,
    ``F.relu(y, inplace=True)``, ``y += z``, an ``inplace=True`` module of ``gm``), else None;
    a write into a view (``y[:, :4].relu_()``) is a write into the viewed tensor ``y``.

    fx records such a call as a node of its own, but the code may go on reading ``y`` and drop
    the node's return value: liveness must then follow the write, not the data flow.

    >>> g = fx.Graph()
    >>> y = g.placeholder("y")
    >>> [mutated_input(n) is y for n in (g.call_method("relu_", (y,)), g.call_method("relu", (y,)))]
    [True, False]
    >>> mutated_input(g.call_method("zero_", (g.call_method("narrow", (y, 1, 0, 2)),))) is y
    True
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    in_place = False
    if node.op in ("call_method", "call_function"):
        dunder = name.startswith("__") and name.endswith("__")
        in_place = (name.endswith("_") and not dunder) or node.kwargs.get("inplace") is True
        in_place = in_place or (node.op == "call_function" and target in _INPLACE_OPERATORS)
    elif node.op == "call_module" and gm is not None:
        in_place = getattr(gm.get_submodule(str(target)), "inplace", False) is True
    if not in_place:
        return None
    base = node.args[0]
    while _view_name(base) in _VIEW_NAMES and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    return base


def _in_scope(node: fx.Node, scope: str) -> bool:
    if scope == "":
        return node.op not in ("placeholder", "output")
    owner = owner_of(node)
    return owner == scope or owner.startswith(scope + ".")


def scope_nodes(graph: fx.Graph, scope: str) -> list[fx.Node]:
    """Nodes of ``graph`` (traced from the root) that belong to ``scope``'s forward or below."""
    return [n for n in graph.nodes if _in_scope(n, scope)]


@dataclass
class RunRecord:
    """Per-node values of one eval forward pass through the traced graph."""

    shapes: dict[fx.Node, tuple[int, ...] | None]  # tensor output shape, else None
    flops: dict[fx.Node, int]  # FLOPs of each call_module node (costs.py conventions)
    arg_shapes: dict[fx.Node, list[tuple[int, ...] | None]]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
        self.flops: dict[fx.Node, int] = {}
        self.arg_shapes: dict[fx.Node, list[tuple[int, ...] | None]] = {}
        self.errors: list[str] = []
        self._current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self._current = n
        out = super().run_node(n)
        self.shapes[n] = tuple(out.shape) if isinstance(out, Tensor) else None
        return out

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        node = self._current
        assert node is not None
        m = self.fetch_attr(str(target))
        self.arg_shapes[node] = [tuple(a.shape) if isinstance(a, Tensor) else None for a in args]
        leaf = not any(True for _ in m.children())
        if leaf or unit_handler(m) is not None:
            out = m(*args, **kwargs)
            handler = _handler_for(m) if leaf else unit_handler(m)
            if handler is None:
                self.errors.append(f"{target} ({type(m).__name__})")
                self.flops[node] = 0
            else:
                check_positional(str(target), m, tuple(args), handler)
                self.flops[node] = int(handler(m, args, out))
            return out
        total = [0]
        handles = []
        for name, leaf in m.named_modules():
            if any(True for _ in leaf.children()):
                continue
            h = _handler_for(leaf)
            if h is None:
                self.errors.append(f"{target}.{name} ({type(leaf).__name__})")
                continue

            def hook(mod: nn.Module, i: tuple[Any, ...], o: Any, h: Any = h) -> None:
                total[0] += int(h(mod, i, o))

            handles.append(leaf.register_forward_hook(hook))
        try:
            out = m(*args, **kwargs)
        finally:
            for hd in handles:
                hd.remove()
        self.flops[node] = total[0]
        return out


def record_run(traced: TracedModel, example_input: Tensor) -> RunRecord:
    """Run the traced graph once (eval mode, no grad) and record shapes and FLOPs per call.

    Raises ``TypeError`` for leaf modules that ``gatedprune.cost`` cannot count.
    """
    gm = traced.graph_module
    was = [(m, m.training) for m in gm.modules()]
    gm.eval()
    rec = _Recorder(gm)
    try:
        with torch.no_grad():
            rec.run(example_input)
    finally:
        for m, t in was:
            m.training = t
    if rec.errors:
        raise TypeError(
            "cost() does not know how to count these leaf modules: "
            + ", ".join(sorted(set(rec.errors)))
            + "; register them with gatedprune.costs.register_cost or give them a "
            "flops_of(inputs, output) method"
        )
    return RunRecord(rec.shapes, rec.flops, rec.arg_shapes)
