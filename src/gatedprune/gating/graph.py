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

import builtins
import copy
import dataclasses
import functools
import inspect
import linecache
import operator
import os
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import ModelGating
from ..costs import (
    _forward_parameters,
    _handler_for,
    call_inputs,
    check_positional,
    counts_itself,
    is_code,
    unit_handler,
    watch_counted,
)
from ..functional_costs import FunctionalCounter
from ..hooks import hooks_detached
from ..rnn_slicing import StateSlicing
from .rnn import GatedGRU, GatedLSTM, GatedRNN
from .transformer import (
    GatedMultiheadAttention,
    GatedTransformerDecoderLayer,
    GatedTransformerEncoderLayer,
    PrunedMultiheadAttention,
    PrunedTransformerDecoderLayer,
    PrunedTransformerEncoderLayer,
)

__all__ = [
    "PACKED_PREFIX",
    "GateTracer",
    "InlinedCall",
    "ModuleCall",
    "TensorSpec",
    "TracedModel",
    "check_branch",
    "check_length",
    "costs_scale_with_batch",
    "example_entries",
    "example_specs",
    "inlined_calls",
    "is_constant",
    "keep_argument_names",
    "mutated_input",
    "node_owners",
    "optional_defaults",
    "owner_of",
    "record_bindings",
    "record_run",
    "scope_nodes",
    "static_pieces",
    "trace_model",
]

_MAX_OPAQUE = 64
# a ``concrete_args`` / plan ``bound`` key: "**kwargs" maps to the comma-separated names of
# the keywords a decorated forward's callers pack into its ``**kwargs`` (record_bindings)
PACKED_PREFIX = "**"
_LEAVES = (
    GatedMultiheadAttention,
    GatedTransformerEncoderLayer,
    GatedTransformerDecoderLayer,
    PrunedMultiheadAttention,
    PrunedTransformerEncoderLayer,
    PrunedTransformerDecoderLayer,
    GatedLSTM,
    GatedGRU,
    GatedRNN,
    StateSlicing,
)


@dataclass
class ModuleCall:
    """One call of a submodule in a traced graph: ``nodes``, the graph nodes fx recorded
    during the call in graph order (a leaf's ``call_module`` node, or the inlined code of a
    module traced through; shared ``get_attr`` nodes of its parameters may sit among them),
    and the call as the code made it, graph nodes for traced values: ``args``, ``kwargs``
    and the ``result`` it returned."""

    path: str
    nodes: list[fx.Node]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Any

    def inputs(self) -> list[fx.Node]:
        """The graph nodes among the call's arguments (what its hooks see as inputs)."""
        return _nodes_in((self.args, self.kwargs))

    def outputs(self) -> list[fx.Node]:
        """The graph nodes it returned, and for a leaf returning a tuple (an LSTM, attention)
        the items the code takes from it (what its forward hooks see as the output)."""
        out = _nodes_in(self.result)
        if len(self.nodes) == 1 and self.nodes[0].op == "call_module":
            out += [u for u in self.nodes[0].users if u.target is operator.getitem]
        return out


def _target_name(node: fx.Node) -> str:
    """``node``'s target as code names it (``chunk``, ``torch.split``, ``getattr``)."""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _nodes_in(a: Any) -> list[fx.Node]:
    """The graph nodes in a nested structure of arguments, each once, in order."""
    found: list[fx.Node] = []
    fx.node.map_aggregate(a, lambda v: found.append(v) if isinstance(v, fx.Node) else None)
    return list(dict.fromkeys(found))


def _as_nodes(a: Any) -> Any:
    """``a`` with each fx Proxy replaced by its graph node."""
    return fx.node.map_aggregate(a, lambda v: v.node if isinstance(v, fx.Proxy) else v)


def _literal_count(a: Any) -> bool:
    """``a`` is an int written in the code (not a bool, not a traced value)."""
    return isinstance(a, int) and not isinstance(a, bool)


def static_pieces(node: fx.Node) -> int | None:
    """The number of tensors split node ``node`` returns, when the code fixes it without the
    input's shape: ``chunk(n)`` (``n``; torch gives fewer when the ``n`` pieces cannot all
    be non-empty, which the run with the example input finds), ``split`` into a literal
    list or tuple of sections, ``tensor_split`` into ``n`` sections or at literal indices.
    None for any other node (``split(c)``, ``unbind``: the count depends on the shape).

    >>> g = fx.symbolic_trace(lambda x: x.chunk(3, 1)).graph
    >>> [static_pieces(n) for n in g.nodes]
    [None, 3, None]
    """
    meth, fn = node.op == "call_method", node.op == "call_function"
    arg: Any = node.args[1] if len(node.args) > 1 else None
    if (meth and node.target == "chunk") or (fn and node.target is torch.chunk):
        arg = node.kwargs.get("chunks", arg)
        return arg if _literal_count(arg) and arg > 0 else None
    if (meth and node.target == "split") or (fn and node.target is torch.split):
        for kw in ("split_size", "split_size_or_sections"):
            arg = node.kwargs.get(kw, arg)
        ok = isinstance(arg, list | tuple) and arg and all(_literal_count(a) for a in arg)
        return len(arg) if ok else None
    if (meth and node.target == "tensor_split") or (fn and node.target is torch.tensor_split):
        for kw in ("indices_or_sections", "sections", "indices", "tensor_indices_or_sections"):
            arg = node.kwargs.get(kw, arg)
        if _literal_count(arg) and arg > 0:
            return cast(int, arg)
        if isinstance(arg, list | tuple) and all(_literal_count(a) for a in arg):
            return len(arg) + 1
    return None


def _is_shape(node: fx.Node) -> bool:
    """``node`` is a traced shape: ``x.shape``, ``x.size()`` or a slice of one."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:2] == ("shape",)
    if node.op == "call_function" and node.target is operator.getitem:
        head = node.args[0]
        return isinstance(head, fx.Node) and _is_shape(head)
    return False


class ProxyIterationError(fx.proxy.TraceError):
    """fx cannot iterate a traced value; ``shape`` says whether it is a traced shape (Hugging
    Face's ``(*input_shape, -1, d)``) rather than the pieces of a split (see
    :func:`_trace_hint`)."""

    def __init__(self, what: str, shape: bool) -> None:
        super().__init__(
            f"Proxy object cannot be iterated: {what} (a loop, list(...), tuple(...) or a "
            "* unpacking over a traced value whose length the code does not fix)"
        )
        self.shape = shape


class _GateProxy(fx.Proxy):
    """fx Proxy whose ``len`` is the piece count of a split the code fixes
    (:func:`static_pieces`): ``list(x.chunk(2, 1))`` asks for it before iterating."""

    def __len__(self) -> int:
        count = static_pieces(self.node)
        if count is not None:
            return count
        tracer = self.tracer
        if isinstance(tracer, GateTracer):
            known = tracer.static_length(self.node)
            if known is not None:  # a traced shape of known rank (x.shape[:-1])
                return known
        return super().__len__()


@dataclass(frozen=True)
class TensorSpec:
    """The shape, dtype and device of an example tensor: what tracing reads of it (a zero
    tensor of this spec stands for it, :meth:`make`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(x: Tensor) -> TensorSpec:
        """The spec of tensor ``x``."""
        return TensorSpec(tuple(x.shape), x.dtype, x.device)

    def make(self) -> Tensor:
        """A zero tensor of this spec.

        >>> TensorSpec((2, 3), torch.int64, torch.device("cpu")).make().shape
        torch.Size([2, 3])
        """
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


# an example argument: its value at the example's batch size and at that plus one (_MISSING
# when unknown: inputs without one common batch dimension)
Example = tuple[Any, Any]
_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "<missing>"})()
_KNOWN = "gatedprune_example"  # node.meta key of a _Known
_DONE = "gatedprune_example_done"  # node.meta key: its _Known was computed (if known)


@dataclass(frozen=True)
class _Known:
    """What a node computes on the example inputs (``values``: at the example's batch size
    and at that plus one); ``static``: a value that is no tensor and reads only the
    inputs' shapes, dtypes and devices (never their values), so Python control flow may
    branch on it; ``sized``: it reads a size (it may depend on the batch size)."""

    values: Example
    static: bool
    sized: bool


# reads of a tensor's metadata, never of its values: what is computed from them alone is known
# from the example input's shape, dtype and device
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "is_sparse"})
_META_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex"}
)
_SIZE_READS = frozenset({"shape", "size", "numel", "nelement"})
# models traced with examples -> per forward argument, its example, for a later trace of the
# model without them (a submodule traced alone takes its decisions from _DECISIONS)
_CALL_EXAMPLES: weakref.WeakKeyDictionary[nn.Module, dict[str, Example] | None] = (
    weakref.WeakKeyDictionary()
)
# modules traced with examples -> the branches and lengths they decided in their code (and in
# their submodules'), by (what, source line): for a later trace in which the example run fails
# (prune's traces of sliced layers, whose attributes such as a Conv1D's nf keep dense sizes)
_DECISIONS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], Any]] = (
    weakref.WeakKeyDictionary()
)
_STATIC = "gatedprune_static"  # node.meta key: computed from metadata reads alone


_DTYPES = {
    str(d): d
    for d in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}


def example_entries(inputs: tuple[Tensor, ...]) -> list[dict[str, Any]]:
    """The shapes and dtypes of example inputs, as a plan keeps them.

    >>> example_entries((torch.zeros(2, 3, dtype=torch.int64),))
    [{'shape': [2, 3], 'dtype': 'torch.int64'}]
    """
    return [{"shape": list(x.shape), "dtype": str(x.dtype)} for x in inputs]


def example_specs(entries: list[Any], device: torch.device) -> tuple[TensorSpec, ...]:
    """The :class:`TensorSpec` of each entry of :func:`example_entries` on ``device``;
    ``ValueError`` naming a malformed entry.

    >>> example_specs([{"shape": [2, 3], "dtype": "torch.int64"}], torch.device("cpu"))[0].shape
    (2, 3)
    """
    out = []
    for e in entries:
        shape = e.get("shape") if isinstance(e, dict) else None
        dtype = _DTYPES.get(str(e.get("dtype"))) if isinstance(e, dict) else None
        ok = isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        )
        if not ok or dtype is None or set(e) != {"shape", "dtype"}:
            raise ValueError(
                "malformed plan: each entry of 'examples' must be {'shape': [sizes >= 0], "
                f"'dtype': one of {sorted(_DTYPES)}}}, got {e!r}"
            )
        out.append(TensorSpec(tuple(cast(list[int], shape)), dtype, device))
    return tuple(out)


def _spec(v: Any) -> Any:
    """A tensor as its :class:`TensorSpec` (another value as it is)."""
    return TensorSpec.of(v) if isinstance(v, Tensor) else v


def _has_tensor(v: Any) -> bool:
    """Whether ``v`` is a tensor or a list, tuple or dict holding one."""
    if isinstance(v, Tensor):
        return True
    if isinstance(v, list | tuple):
        return any(_has_tensor(a) for a in v)
    if isinstance(v, dict):
        return any(_has_tensor(a) for a in v.values())
    return False


def _metadata_read(node: fx.Node) -> tuple[bool, bool]:
    """Whether ``node`` reads only its first argument's metadata (``x.shape``, ``x.dtype``,
    ``x.size(1)``, ``x.dim()``), and whether that is a size."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        attr = node.args[1]
        return attr in _META_ATTRS, attr in _SIZE_READS
    if node.op == "call_method":
        return node.target in _META_METHODS, node.target in _SIZE_READS
    return False, False


@contextmanager
def _modules_unpatched() -> Iterator[None]:
    """While tracing, modules called as torch calls them (fx patches ``nn.Module.__call__``
    and ``__getattr__`` to record calls and parameters): for running examples."""
    from torch.fx import _symbolic_trace as st

    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__ = st._orig_module_call  # type: ignore[method-assign]
    nn.Module.__getattr__ = st._orig_module_getattr  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__ = call  # type: ignore[method-assign]
        nn.Module.__getattr__ = getattr_  # type: ignore[method-assign]


def _user_line() -> str:
    """``file:line: code`` of the innermost frame of the traced code (outside torch and this
    module)."""
    here = os.path.abspath(__file__)
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    frame = inspect.currentframe()
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name != here and not name.startswith(torch_dir):
            code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            return f"{frame.f_code.co_filename}:{frame.f_lineno}: {code}"
        frame = frame.f_back
    return "an unknown line"


@fx.node.has_side_effect
def check_branch(value: bool, expected: bool, where: str) -> None:
    """The runtime guard of a Python branch that tracing took as the example input ran it
    (:class:`GateTracer`): ``ValueError`` naming the source line ``where`` if ``value`` (the
    condition, computed from this input's shapes, dtypes or devices) differs from the
    example's ``expected``. Graphs ``prune`` rewrites call it where the branch was.

    >>> check_branch(3 > 1, True, "model.py:7: if q_len > 1:")
    """
    if value != expected:
        raise ValueError(
            f"the pruned model's code was traced with the example input, whose branch at "
            f"{where} was {expected}; this input's is {value}: run the pruned model on inputs "
            "that take the example's branches (gate_ another example for other sizes)"
        )


@fx.node.has_side_effect
def check_length(value: list[int], expected: int, where: str) -> None:
    """The runtime guard of unpacking a traced shape (``(*x.shape[:-1], -1, d)``), whose
    length tracing took from the example input: ``ValueError`` naming the source line
    ``where`` if ``value`` has another length than ``expected``.

    >>> check_length([2, 5], 2, "model.py:9: shape = (*x.shape[:-1], -1, 4)")
    """
    if len(value) != expected:
        raise ValueError(
            f"the pruned model's code was traced with the example input, which has "
            f"{expected} values at {where}; this input has {len(value)}: run the pruned "
            "model on inputs of the example's rank (gate_ another example for others)"
        )


class GateTracer(fx.Tracer):
    """fx tracer that keeps ``opaque`` submodules whole, remembers where tracing failed and
    records every submodule call (:class:`ModuleCall`).

    With ``examples`` (per ``forward`` argument, its example at the example input's batch
    size and at that plus one, tensors as :class:`TensorSpec`), the nodes compute their
    values on them when a branch or an unpacking asks (``node.meta``): Python control flow
    on values that read only shapes, dtypes and devices (``if x.dtype != torch.float16:``,
    ``if q_len == 1:``) takes the example's branch (a guard, listed in ``guards`` and
    recorded as a :func:`check_branch` node, which re-checks it whenever a rewritten graph
    runs), and a traced shape of known rank can be iterated (``(*x.shape[:-1], -1, d)``, a
    :func:`check_length` node). The example runs never write into the model: parameters and
    buffers are read as copies, and a module fx keeps whole runs as a copy unless torch or
    gatedprune defines it. A branch on a size that differs between the two batch sizes is a
    ``TraceError`` naming the line; control flow on tensor values stays one."""

    def __init__(
        self, opaque: set[str] | None = None, examples: dict[str, Example] | None = None
    ) -> None:
        super().__init__()
        self.opaque = opaque if opaque is not None else set()
        self.failed_in: str | None = None
        self.calls: list[ModuleCall] = []
        self.examples = examples
        self.guards: list[str] = []  # the source lines whose branch the examples decided
        self._cursor: fx.Node | None = None  # the last node whose example value is computed
        # per example (0, 1): copies of the parameters/buffers and modules its runs read
        self._copies: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        self._stack: list[str] = []  # the submodules whose forward is being traced
        # per module ("" the root): what its code decided (see _DECISIONS; _MISSING: calls
        # that decided differently)
        self._decisions: dict[str, dict[tuple[str, str], Any]] = {}

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
        proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None,
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        meta, _ = _metadata_read(node)
        head = node.args[0] if node.args else None
        inputs = node.all_input_nodes
        node.meta[_STATIC] = node.op in ("call_function", "call_method") and all(
            a.meta.get(_STATIC) or (meta and a is head) for a in inputs
        )
        return proxy

    def _known_of(self, node: fx.Node) -> _Known | None:
        """What ``node`` computes on the examples (None if unknown): computed when a branch
        or an unpacking asks, for it and every node traced before it (in order, once)."""
        if self.examples is None:
            return None
        if self._cursor is None or not self._cursor.meta.get(_DONE):
            n = next(iter(self.graph.nodes))
        else:
            n = self._cursor.next
        while not node.meta.get(_DONE) and n.op != "root":
            known = self._known(n)
            if known is not None:
                n.meta[_KNOWN] = known
            n.meta[_DONE] = True
            self._cursor, n = n, n.next
        return cast(_Known | None, node.meta.get(_KNOWN))

    def _example(self, a: fx.Node, k: int) -> Any:
        known = a.meta.get(_KNOWN)
        if known is not None:
            return known.values[k]
        if a.op == "get_attr":  # a parameter, buffer or constant fx made
            copies = self._copies[k]
            target = str(a.target)
            if target not in copies:  # a copy: an in-place op of the forward's writes into it
                obj: Any = self.root
                for part in target.split("."):
                    obj = getattr(obj, part)
                copies[target] = obj.detach().clone() if isinstance(obj, Tensor) else obj
            return copies[target]
        return _MISSING

    def _module(self, target: str, k: int) -> nn.Module:
        """The submodule ``target`` that example ``k`` runs: itself if torch or gatedprune
        defines it (their forwards write no state in eval mode), else a copy."""
        m = self.root.get_submodule(target)
        if type(m).__module__.split(".")[0] in ("torch", "gatedprune"):
            return m
        copies = self._copies[k]
        key = "module:" + target
        if key not in copies:
            copies[key] = copy.deepcopy(m)
        return cast(nn.Module, copies[key])

    def _run(self, node: fx.Node, k: int) -> Any:
        """``node``'s value on example ``k`` (:data:`_MISSING` if unknown or it fails)."""
        missing: list[bool] = []

        def value(a: Any) -> Any:
            v = self._example(a, k)
            if v is _MISSING:
                missing.append(True)
            return v.make() if isinstance(v, TensorSpec) else v

        if node.op == "placeholder":
            ex = (self.examples or {}).get(str(node.target))
            v = _MISSING if ex is None else ex[k]
            return v.make() if isinstance(v, TensorSpec) else v
        if node.op not in ("call_function", "call_method", "call_module"):
            return _MISSING
        try:
            with torch.no_grad(), warnings.catch_warnings(), _modules_unpatched():
                warnings.simplefilter("ignore")
                # (parameters read as they are, not as the Proxies fx's patch makes)
                args = fx.node.map_arg(node.args, value)
                kwargs = fx.node.map_arg(node.kwargs, value)
                if missing:
                    return _MISSING
                if node.op == "call_function":
                    return cast(Callable[..., Any], node.target)(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], str(node.target))(*args[1:], **kwargs)
                return self._module(str(node.target), k)(*args, **kwargs)
        except Exception:  # the example run is an aid: a failing op leaves the value unknown
            return _MISSING

    def _known(self, node: fx.Node) -> _Known | None:
        first = self._run(node, 0)
        if first is _MISSING:
            return None
        values = (first, self._run(node, 1))
        if node.op == "placeholder" or _has_tensor(first):
            return _Known(values, False, False)
        meta, size = _metadata_read(node)
        head = node.args[0] if node.args else None
        static, sized = True, False
        for a in node.all_input_nodes:
            known = a.meta.get(_KNOWN)
            if known is not None and known.static:
                sized = sized or known.sized
            elif meta and a is head:
                sized = sized or size
            else:
                static = False
        return _Known(values, static, sized)

    def _decide(self, node: fx.Node, what: str, view: Callable[[Any], Any]) -> Any:
        """``(view of node's value, whether the value is a bool)`` if the examples decide it
        (:meth:`_decided`), or, when their run failed, if an earlier trace of this module
        decided it at the same source line (:data:`_DECISIONS`), recorded as a guard of
        ``what``; else :data:`_MISSING`."""
        known = self._known_of(node)
        if known is not None and known.static:
            where = _user_line()
            value = (
                self._decided(node, what, view, where),
                isinstance(known.values[0], bool),
            )
        elif known is None and node.meta.get(_STATIC):
            where = _user_line()
            # this trace's own decision at that line first (an earlier call of the same code
            # whose example run did not fail), so a trace does not depend on earlier ones
            value = self._decisions.get("", {}).get((what, where), _MISSING)
            if value is _MISSING:
                value = _DECISIONS.get(self.root, {}).get((what, where), _MISSING)
            if value is _MISSING:
                return _MISSING
            self.guards.append(where)
        else:
            return _MISSING
        for scope in ("", *self._stack):
            seen = self._decisions.setdefault(scope, {})
            if seen.setdefault((what, where), value) != value:
                seen[(what, where)] = _MISSING
        return value

    def _decided(self, node: fx.Node, what: str, view: Callable[[Any], Any], where: str) -> Any:
        """``view`` of static node ``node``'s example value, recorded as a guard of ``what``
        (a branch, a length); a ``TraceError`` if it differs at the other batch size."""
        known = node.meta[_KNOWN]
        first = view(known.values[0])
        if known.sized:
            if known.values[1] is _MISSING:
                raise fx.proxy.TraceError(
                    f"{what} on a size read from the input ({where}): gate_ cannot tell "
                    "whether it depends on the batch size (the inputs share no batch "
                    "dimension 0)"
                )
            other = view(known.values[1])
            if other != first:
                raise fx.proxy.TraceError(
                    f"{what} on a size read from the input depends on the batch size "
                    f"({where}: {first!r} for the example input, {other!r} at one more "
                    "sample): a graph specialised to the example's batch size would be "
                    "wrong for others"
                )
        self.guards.append(where)
        return first

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on a value read from the inputs' shapes, dtypes or devices alone takes
        the example's way (see the class); any other traced value is fx's error."""
        decided = self._decide(obj.node, "Python control flow", bool)
        if decided is _MISSING:
            return bool(super().to_bool(obj))
        taken, is_bool = cast(tuple[bool, bool], decided)
        value = obj.node
        if not is_bool:  # (``if x.ndim:``)
            value = self.create_node("call_function", bool, (value,), {})
        # re-checked whenever a rewritten graph runs (the gated model runs the user's code)
        self.create_node("call_function", check_branch, (value, taken, self.guards[-1]), {})
        return taken

    def static_length(self, node: fx.Node) -> int | None:
        """The length of a traced shape (or tuple computed from shapes) of known rank, else
        None."""
        known = self._known_of(node)
        if known is not None and not isinstance(known.values[0], tuple | list):
            return None
        decided = self._decide(node, "a length", len)
        if decided is _MISSING:
            return None
        count = cast(tuple[int, bool], decided)[0]
        self.create_node("call_function", check_length, (node, count, self.guards[-1]), {})
        return count

    def publish_examples(self) -> None:
        """Make the examples known to later traces of the model, and what each module's code
        decided to traces of it alone (:data:`_DECISIONS`)."""
        if self.examples is not None:
            _CALL_EXAMPLES[self.root] = self.examples
        for name, decided in self._decisions.items():
            known = {k: v for k, v in decided.items() if v is not _MISSING}
            _DECISIONS[self.root.get_submodule(name) if name else self.root] = known

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque or isinstance(m, (ModelGating, *_LEAVES)):
            return True
        if counts_itself(m):  # gatedprune.cost counts it whole: so must the gated cost
            return True
        if unit_handler(m) is not None and any(True for _ in m.children()):
            return True  # a kind registered with register_cost: counted whole, kept whole
        return bool(super().is_leaf_module(m, module_qualified_name))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _GateProxy(node, self)

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        """Iterating the pieces of a split whose count the code fixes (C2f's
        ``list(self.cv1(x).chunk(2, 1))``, ``for t in x.split((c, c), 1)``, ``a, *b =
        x.chunk(3, 1)``) gives one ``getitem`` per piece (:func:`static_pieces`); any other
        traced value cannot be iterated (:class:`ProxyIterationError`)."""
        node = obj.node
        count = static_pieces(node)
        if count is None:
            count = self.static_length(node)  # a traced shape of known rank: its sizes
        if count is None:
            raise ProxyIterationError(f"{node.op} {_target_name(node)}", _is_shape(node))
        return iter([obj[i] for i in range(count)])  # type: ignore[index]

    def trace(
        self,
        root: nn.Module | Callable[..., Any],
        concrete_args: dict[str, Any] | None = None,
    ) -> fx.Graph:
        """fx's trace, with the torch calls of :data:`_TRACED_CALLS` recorded as graph nodes
        when a traced value is among their arguments (see :func:`_traced_calls`), and the
        functions registered with ``torch.fx.wrap`` traced through where they can be
        (:func:`_wrapped_traced_through`)."""
        with _traced_calls(), _wrapped_traced_through():
            return super().trace(root, concrete_args)

    def create_arg(self, a: Any) -> Any:
        """fx's, except that a dataclass mapping (Hugging Face's ``ModelOutput``, a dataclass
        and an ``OrderedDict``) is rebuilt by its class, as fx rebuilds other dataclasses
        (fx makes a plain ``dict`` of it: a rewritten forward then returned one, and the
        caller's ``out.last_hidden_state`` or ``out[0]`` failed)."""
        if isinstance(a, dict) and type(a) is not dict and dataclasses.is_dataclass(a):
            kwargs = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a)}
            return self.create_node("call_function", type(a), (), kwargs)
        return super().create_arg(a)

    def create_args_for_root(
        self,
        root_fn: Callable[..., Any],
        is_module: bool,
        concrete_args: dict[str, Any] | tuple[Any, ...] | None = None,
    ) -> tuple[Any, list[Any]]:
        """fx's placeholders for the root's parameters; a ``forward`` behind a
        ``functools.wraps`` decorator (Hugging Face's ``@can_return_tuple``, whose wrapper
        takes ``(self, *args, **kwargs)``) around a ``forward`` with ``*args``, ``**kwargs`` or
        keyword-only parameters gets one placeholder per named parameter of the decorated
        ``forward`` (``inspect.signature`` follows ``__wrapped__``), passed to the wrapper as
        callers pass them (required ones by position, optional ones by keyword, ``*args`` and
        ``**kwargs`` empty), so the wrapper's own code runs too (HF's
        ``@merge_with_config_defaults`` fills ``use_cache`` from the config). fx would
        instead rewrite the *wrapper's* code object to take the inner parameters: "code:
        co_varnames is too small", or the wrapper's ``kwargs`` bound to a traced value
        (before 2026-12-08). ``concrete_args["**kwargs"]`` (:data:`PACKED_PREFIX`; from
        :func:`record_bindings`) names, comma-separated, the keywords callers pack into
        ``**kwargs``: each is one more placeholder (after the others, default ``None``; fixed
        where ``concrete_args`` gives its value) passed in ``**kwargs`` by keyword, so the
        code forwarding ``**kwargs`` sees them (HF's ``attention_interface(..., **kwargs)``)
        and the rewritten ``forward`` takes them."""
        inner = inspect.unwrap(root_fn)
        code = getattr(inner, "__code__", None)
        varstuff = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS
        if (
            inner is root_fn
            or code is None
            or not (code.co_kwonlyargcount or code.co_flags & varstuff)
            or isinstance(concrete_args, tuple)
        ):
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        sig = inspect.signature(inner)
        params = list(sig.parameters.values())[1 if is_module else 0 :]
        positional: list[Any] = [self.root] if is_module else []
        keywords: dict[str, Any] = {}
        packed: list[str] = []
        for p in params:
            if p.kind is p.VAR_KEYWORD and concrete_args:
                packed = [n for n in str(concrete_args.get(PACKED_PREFIX + p.name, "")).split(",")]
                packed = [n for n in packed if n]
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue  # gate_ passes none: the traced code takes the named ones
            value = self._proxy_placeholder(p.name, concrete_args, sig, inner)
            required = p.default is p.empty and p.kind is not p.KEYWORD_ONLY
            if p.kind is p.POSITIONAL_ONLY or required:
                positional.append(value)
            else:  # by keyword, as callers pass optional arguments (HF's decorators read
                keywords[p.name] = value  # positional ones by the wrapper's own code object)
        clash = [n for n in packed if n in sig.parameters or not n.isidentifier()]
        if clash:
            raise ValueError(
                f"keywords packed into **kwargs must be identifiers other than the forward's "
                f"parameters, got {clash}"
            )
        packed_sig = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in packed]
        )
        for n in packed:  # into **kwargs, as the model's code passes them
            keywords[n] = self._proxy_placeholder(n, concrete_args, packed_sig, inner)

        def call(*args: Any) -> Any:
            return root_fn(*args, **keywords)

        return call, positional

    def call_through(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A call of ``fn``, a function registered with ``torch.fx.wrap`` (timm's
        ``resolve_self_attn_mask``), given traced values: its body traced like inline code
        (a ``None`` or an argument it returns unchanged adds no node); where that fails, the
        nodes it made are erased and the call is one ``call_function`` node, as fx makes it."""
        last = next(iter(reversed(self.graph.nodes)), None)
        calls, failed_in = len(self.calls), self.failed_in
        try:
            return fn(*args, **kwargs)
        except Exception:
            for n in reversed(_nodes_after(self.graph, last)):  # users erased before it
                self.graph.erase_node(n)
            del self.calls[calls:]
            self.failed_in = failed_in
        proxy = self.create_proxy("call_function", fn, args, kwargs)
        proxy.node.meta["is_wrapped"] = True
        return proxy

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            name = self.path_of_module(m)
        except NameError:  # not a submodule of the model: its code is traced inline
            return self._call_outside(m, forward, args, kwargs)
        if kwargs and self.is_leaf_module(m, name) and _positional_view(m):
            # a layer's leading inputs passed by keyword (torchaudio's `self.self_attn(
            # query=x, key=x, value=x, need_weights=False)`) become positional in the graph,
            # as the analysis reads them; the call computes the same (not behind a decorator:
            # HF's @merge_with_config_defaults reads positional ones by its own code object)
            inp = call_inputs(m, tuple(args), kwargs)
            moved = set(_forward_parameters(type(m))[len(args) : len(inp)])
            args, kwargs = inp, {k: v for k, v in kwargs.items() if k not in moved}
        last = next(iter(reversed(self.graph.nodes)), None)
        self._stack.append(name)
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module whose forward failed
                self.failed_in = name
            raise
        finally:
            self._stack.pop()
        nodes = _nodes_after(self.graph, last)  # fx appends: the call's nodes come last
        out = _as_nodes(result)
        leaf = isinstance(out, fx.Node) and out.op == "call_module" and out.target == name
        if leaf and nodes and nodes[-1] is out:  # (after the constants fx made for it)
            self.calls.append(ModuleCall(name, [out], out.args, dict(out.kwargs), out))
        else:
            self.calls.append(ModuleCall(name, nodes, _as_nodes(args), _as_nodes(kwargs), out))
        return result

    def _call_outside(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """A call of module ``m`` that is not in the model's hierarchy (a module-level
        instance called as a function: Hugging Face's ``apply_rotary_pos_emb`` made a module
        by ``@use_kernel_forward_from_hub``): traced inline as part of its caller's code, as
        a function would be; with parameters (which the model's parameters, and so pruning,
        do not include) an error naming it and its caller, which is then kept whole (before
        2026-12-08 every such call gave fx's "module is not installed as a submodule")."""
        stack = list(self.module_stack.values())
        caller = str(stack[-1][0]) if stack else ""
        caller_name = f"'{caller}'" if caller else "the model's forward"
        if any(True for _ in m.parameters()):
            raise NameError(
                f"module {type(m).__name__} called by {caller_name} is not a submodule of "
                "the model and holds parameters, which gate_ cannot prune or trace: make it "
                "a submodule (an attribute of the caller)"
            )
        return forward(*args, **kwargs)


def _nodes_after(graph: fx.Graph, last: fx.Node | None) -> list[fx.Node]:
    """The nodes appended to ``graph`` after ``last`` (every node if None), in graph order.

    >>> g = fx.Graph()
    >>> a = g.placeholder("a")
    >>> b = g.call_function(operator.neg, (a,))
    >>> [n.name for n in _nodes_after(g, a)], len(_nodes_after(g, None))
    (['neg'], 2)
    """
    made: list[fx.Node] = []
    for n in reversed(graph.nodes):
        if n is last:
            break
        made.append(n)
    made.reverse()
    return made


def _positional_view(m: nn.Module) -> bool:
    """Whether gate_'s graph records a keyword call of leaf ``m`` with its leading inputs made
    positional (:func:`call_inputs`): only for a kind whose inputs the analysis and cost read
    (a cost handler: torch's layers, ``register_cost`` kinds, ``flops_of``), and only when
    ``forward``'s signature is the one called. Any other leaf (code of yours or a library's
    kept whole) is called as the caller called it: a decorator whose ``(*args, **kwargs)``
    wrapper fills a keyword (Hugging Face's ``merge_with_config_defaults``,
    ``kwargs[arg_name] = ...``) would otherwise get it twice.

    >>> import functools
    >>> def fill(f):
    ...     @functools.wraps(f)
    ...     def wrapper(self, *args, **kwargs): return f(self, *args, **kwargs)
    ...     return wrapper
    >>> class Own(nn.Module):
    ...     @fill
    ...     def forward(self, x: Tensor, flag: bool = False) -> Tensor: return x
    >>> _positional_view(nn.Linear(2, 2)), _positional_view(Own())
    (True, False)
    """
    if _handler_for(m) is None and unit_handler(m) is None:
        return False
    return not hasattr(type(m).forward, "__wrapped__")


def _first_proxy(a: Any) -> fx.Proxy | None:
    """The first fx Proxy in a nested structure of arguments (slices included), else None."""
    found: list[fx.Proxy] = []

    def visit(v: Any) -> Any:
        if isinstance(v, fx.Proxy) and not found:
            found.append(v)
        return v

    fx.node.map_aggregate(a, visit)
    return found[0] if found else None


def _recorded(orig: Callable[..., Any]) -> Callable[..., Any]:
    """``orig``, recorded as a ``call_function`` node of ``orig`` itself when a traced value
    is among its arguments (``torch.finfo(x.dtype)``: fx would pass the Proxy to torch, whose
    ``finfo`` refuses it and whose ``iinfo`` reads it as ``torch.uint8``, 255 baked in), else
    called as it is."""

    @functools.wraps(orig, updated=())
    def call(*args: Any, **kwargs: Any) -> Any:
        proxy = _first_proxy((args, kwargs))
        if proxy is None:
            return orig(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", orig, args, kwargs)

    return call


def _sliced_by_proxy(index: Any) -> fx.Proxy | None:
    """The first fx Proxy among the bounds of a slice in ``index`` (``t[:, :n]``), else None
    (a Proxy given as an index itself, ``t[ids]``, torch hands to fx)."""
    items = index if isinstance(index, tuple) else (index,)
    bounds = [(v.start, v.stop, v.step) for v in items if isinstance(v, slice)]
    return _first_proxy(bounds)


def _tensor_getitem(orig: Callable[..., Any]) -> Callable[..., Any]:
    """``Tensor.__getitem__`` recording ``tensor[index]`` as an ``operator.getitem`` node on
    the tensor (a constant, as fx records ``self.mask.narrow(2, 0, t)``) when a slice of the
    index is bounded by a traced size: Hugging Face GPT-2's ``self.bias[:, :, k - q : k,
    :k]``, which torch's indexing refuses ("slice indices must be integers")."""

    @functools.wraps(orig)  # torch hands other traced indices to fx by this method's name
    def getitem(self: Tensor, index: Any) -> Any:
        proxy = _sliced_by_proxy(index)
        if proxy is None:
            return orig(self, index)
        return proxy.tracer.create_proxy("call_function", operator.getitem, (self, index), {})

    return getitem


# torch functions that take a traced dtype where torch wants a plain one (fx passes them the
# Proxy: finfo refuses it, iinfo silently reads uint8's): recorded as graph nodes while
# tracing, so the code reads them as it runs (torch.full(..., dtype=x.dtype) fx records)
_TRACED_CALLS = ("finfo", "iinfo")
_PATCHED: list[bool] = []  # non-empty while _traced_calls has them patched


@contextmanager
def _traced_calls() -> Iterator[None]:
    """While tracing: the torch functions of :data:`_TRACED_CALLS` and ``Tensor.__getitem__``
    record the calls given traced values (see :func:`_recorded`, :func:`_tensor_getitem`);
    restored afterwards.

    >>> def f(x):
    ...     return torch.full([], torch.finfo(x.dtype).min, dtype=x.dtype)
    >>> graph = GateTracer().trace(f)  # the dtype read as the code runs, not the example's
    >>> [getattr(n.target, "__name__", "") for n in graph.nodes if n.op == "call_function"]
    ['getattr', 'finfo', 'getattr', 'getattr', 'full']
    >>> graph = GateTracer().trace(lambda ids: ids.clamp(max=torch.iinfo(ids.dtype).max))
    >>> [getattr(n.target, "__name__", "") for n in graph.nodes if n.op == "call_function"]
    ['getattr', 'iinfo', 'getattr']
    >>> torch.finfo(torch.float16).min  # torch's own again
    -65504.0
    """
    if _PATCHED:  # a trace inside a trace: the calls are recorded already
        yield
        return
    saved = {name: getattr(torch, name) for name in _TRACED_CALLS}
    getitem = torch.Tensor.__getitem__
    _PATCHED.append(True)
    try:
        for name, orig in saved.items():
            setattr(torch, name, _recorded(orig))
        torch.Tensor.__getitem__ = _tensor_getitem(getitem)  # type: ignore[method-assign]
        yield
    finally:
        for name, orig in saved.items():
            setattr(torch, name, orig)
        torch.Tensor.__getitem__ = getitem  # type: ignore[method-assign]
        _PATCHED.clear()


def _traced_through(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, registered with ``torch.fx.wrap``, as :func:`_wrapped_traced_through`
    patches it: called as it is without traced values, else through
    :meth:`GateTracer.call_through` (or as fx records it, for another tracer)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        proxy = _first_proxy((args, kwargs))
        if proxy is None:
            return fn(*args, **kwargs)
        if isinstance(proxy.tracer, GateTracer):
            return proxy.tracer.call_through(fn, args, kwargs)
        out = proxy.tracer.create_proxy("call_function", fn, args, kwargs)
        out.node.meta["is_wrapped"] = True
        return out

    return call


@contextmanager
def _wrapped_traced_through() -> Iterator[None]:
    """While tracing: each function registered with ``torch.fx.wrap`` (fx's registry of
    module globals to patch) is patched by :func:`_traced_through` instead of fx's leaf
    wrapper, and taken out of the registry; both restored afterwards. Not thread-safe:
    fx's registry and the patched globals are process-wide (as fx's own patching is).

    >>> import torch.fx._symbolic_trace as st
    >>> before = dict(st._wrapped_fns_to_patch)
    >>> with _wrapped_traced_through():
    ...     pass
    >>> st._wrapped_fns_to_patch == before
    True
    """
    registry = fx._symbolic_trace._wrapped_fns_to_patch
    saved = dict(registry)
    # torch's own (fx's `_assert_is_none`, which its placeholders call) stay fx's leaves
    ours = {k: g for k, g in saved.items() if not _torch_module(str(g.get("__name__", "")))}
    if not ours:  # none registered, or a trace inside a trace: patched already
        yield
        return
    patched: list[tuple[dict[str, Any], str, bool, Any]] = []
    for key in ours:
        del registry[key]
    try:
        for (_, name), frame in ours.items():
            had = name in frame
            fn = frame[name] if had else getattr(builtins, name, None)
            if fn is None:
                continue
            patched.append((frame, name, had, frame.get(name)))
            frame[name] = _traced_through(fn)
        yield
    finally:
        for frame, name, had, old in reversed(patched):
            if had:
                frame[name] = old
            else:
                frame.pop(name, None)
        registry.clear()
        registry.update(saved)


def _torch_module(name: str) -> bool:
    """Whether module ``name`` is torch's own (not torchvision's or torchaudio's).

    >>> _torch_module("torch.fx._symbolic_trace"), _torch_module("torchvision.ops.misc")
    (True, False)
    """
    return name == "torch" or name.startswith("torch.")


@dataclass
class TracedModel:
    """The fx graph of a model plus what could not be traced."""

    graph_module: fx.GraphModule
    opaque: dict[str, str] = field(default_factory=dict)  # qualified name -> why
    # every submodule call, in the order the calls returned (an inner call before its caller)
    calls: list[ModuleCall] = field(default_factory=list)
    # qualified names of the submodules that carry hooks of the user's (gatedprune.hooks)
    hooked: frozenset[str] = frozenset()
    # the source lines whose Python branch the example inputs decided (GateTracer)
    guards: list[str] = field(default_factory=list)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def trace_model(
    model: nn.Module,
    opaque: dict[str, str] | None = None,
    *,
    warn: bool = True,
    concrete_args: dict[str, Any] | None = None,
    specialise: bool = True,
    inputs: int = 1,
    examples: tuple[Tensor, ...] | tuple[TensorSpec, ...] | None = None,
    training: bool = False,
) -> TracedModel:
    """Trace ``model`` with fx, turning submodules whose ``forward`` cannot be traced into
    opaque leaves (see the module docstring). The model is traced in eval mode whatever its
    mode (and left in it): fx bakes ``self.training`` into the graph, and the graph must be
    the eval-mode function that ``prune`` keeps (``F.dropout(x, p, self.training)`` or a
    drop-path ``if not self.training: return x`` in rewritten code must not act in eval mode).
    Optional ``forward`` arguments defaulting to ``None`` that Python control flow tests
    (``if mask is not None:``) are traced at ``None``, the value ``gate_``'s example inputs
    leave them at (fx would trace them as tensors and take the branch): the model is traced
    both ways and the specialised graph is taken where the two differ (not with
    ``specialise=False``: a submodule its caller passes such an argument is traced as called).
    So are arguments with another constant default (:func:`is_constant`; since 2026-12-08),
    such as HF's ``use_cache: bool = False`` passed down to the blocks and their attention,
    which fx would trace as values that ``if use_cache:`` cannot branch on; the code of a
    specialised graph keeps the arguments (by name) and checks their values when it runs.
    The first ``inputs`` parameters (the positional inputs ``gate_`` was given) are never
    fixed.
    With ``examples`` (those inputs, or their :class:`TensorSpec`), Python control flow on
    their shapes, dtypes and devices is traced as the examples run it (:class:`GateTracer`;
    since 2026-12-08); a submodule traced alone after its model was takes the branches that
    trace decided in its code (at the same source lines), and so does a trace whose example
    run fails.
    ``training=True`` traces the training-mode function instead (``gate_`` compares
    it with the eval-mode one to find modules called only in training, since 2026-12-08).

    >>> traced = trace_model(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    >>> [n.op for n in traced.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    given = _named_examples(model, examples) if examples is not None else None
    if given is None:
        given = _CALL_EXAMPLES.get(model)
    trace = functools.partial(_trace, examples=given)
    params = list(inspect.signature(model.forward).parameters.values())[inputs:]
    fixed = {p.name: p.default for p in params if is_constant(p.default)}
    if concrete_args is not None or not specialise or not fixed:
        return trace(model, opaque, warn=warn, concrete_args=concrete_args, training=training)
    nones = {k: v for k, v in fixed.items() if v is None}
    if nones == fixed:  # as before 2026-12-08
        try:
            traced = trace(model, opaque, warn=warn, concrete_args=None, training=training)
        except ValueError:  # fails unless specialised (HF BERT: `if input_ids is not None and
            # inputs_embeds is not None: raise`): the specialised trace, or its own error
            special = trace(model, opaque, warn=warn, concrete_args=nones, training=training)
            keep_argument_names(special.graph, set(nones))
            special.graph_module.recompile()
            return special
        try:
            special = trace(
                model, traced.opaque, warn=False, concrete_args=nones, training=training
            )
        except ValueError:
            return traced
        if _structure(special.graph) == _structure(traced.graph):
            return traced
        keep_argument_names(special.graph, set(nones))
        special.graph_module.recompile()
        return special
    # a flag at its constant default (HF's `use_cache: bool = False`), traced as a value:
    # Python branching on it fails (in the forward, or a submodule then kept whole), or an
    # identity test (`if use_cache is True:`) silently takes one branch. Bools and strings
    # are fixed; None and numbers only where the graph needs them fixed (a scale multiplied
    # by stays an input); traces are made afresh and the warnings said for the one taken
    first: ValueError | None = None
    plain: TracedModel | None = None
    try:
        plain = trace(model, opaque, warn=False, concrete_args=None, training=training)
    except ValueError as e:
        first = e
    chosen, kept = plain, fixed
    full: TracedModel | None = None
    with suppress(ValueError):
        full = trace(model, opaque, warn=False, concrete_args=fixed, training=training)
    flags = any(type(v) in (bool, str) for v in fixed.values())
    same = plain is not None and full is not None and _same_trace(full, plain, fixed)
    if full is not None and (
        plain is None or flags or not (same and _same_at(plain, full, fixed, fixed))
    ):
        chosen = full
        numbers = [[k] for k, v in fixed.items() if type(v) in (int, float)]
        for loose in [list(nones), *numbers]:  # each tried as an input
            trial = {k: v for k, v in kept.items() if k not in loose}
            if not loose or trial == kept:
                continue
            with suppress(ValueError):
                other = trace(
                    model, opaque, warn=False, concrete_args=trial or None, training=training
                )
                values = {k: kept[k] for k in loose if k in kept}
                if _same_trace(other, chosen, fixed) and _same_at(other, chosen, fixed, values):
                    chosen, kept = other, trial
        if kept:
            keep_argument_names(chosen.graph, set(kept))
            chosen.graph_module.recompile()
    if chosen is None:
        raise first if first is not None else ValueError("tracing failed")
    if warn:
        for name, why in chosen.opaque.items():
            if name not in (opaque or {}):
                warnings.warn(
                    f"gate_: submodule '{name}' ({type(model.get_submodule(name)).__name__}) "
                    f"cannot be traced by torch.fx ({why}); it is kept whole and not gated, "
                    "the rest of the model is gated",
                    stacklevel=2,
                )
    return chosen


def _named_examples(
    model: nn.Module, examples: tuple[Tensor, ...] | tuple[TensorSpec, ...]
) -> dict[str, Example]:
    """The examples of ``model``'s first ``forward`` parameters by name, each at its batch
    size and at one more sample (:data:`_MISSING` unless all share one batch dimension 0).

    >>> ex = _named_examples(nn.Linear(2, 3), (torch.zeros(4, 2),))["input"]
    >>> [e.shape for e in ex]
    [(4, 2), (5, 2)]
    """
    specs = [e if isinstance(e, TensorSpec) else TensorSpec.of(e) for e in examples]
    batches = {s.shape[0] if s.shape else 0 for s in specs}
    names = list(inspect.signature(model.forward).parameters)[: len(specs)]
    out: dict[str, Example] = {}
    for name, spec in zip(names, specs, strict=False):
        more: Any = _MISSING
        if len(batches) == 1 and 0 not in batches:
            more = TensorSpec((spec.shape[0] + 1, *spec.shape[1:]), spec.dtype, spec.device)
        out[name] = (spec, more)
    return out


def _same_trace(a: TracedModel, b: TracedModel, names: dict[str, Any]) -> bool:
    """The same opaque modules and computing nodes, what only reads arguments ``names``
    (fx's checks of those fixed) aside."""
    return a.opaque == b.opaque and _structure(a.graph, set(names)) == _structure(
        b.graph, set(names)
    )


def _same_at(
    loose: TracedModel, fixed: TracedModel, names: dict[str, Any], values: dict[str, Any]
) -> bool:
    """Whether graph ``loose``, with arguments ``values`` left inputs, computes what ``fixed``
    does with them fixed, when they take those values: every computing node reads the same
    constants and nodes (by name), an input of ``values`` read as its value. Code telling a
    traced value from a constant (HF LLaMA's ``slice(-logits_to_keep, None) if
    isinstance(logits_to_keep, int) else logits_to_keep``) gives the same nodes that read
    it otherwise (``h[:, 0, :]`` for ``h[:, 0:, :]``: before 2026-12-08 such an argument was
    left an input, a silently different graph)."""

    def nodes(t: TracedModel, fixed_here: set[str]) -> list[tuple[str, str, str]]:
        skip = _reads_only(t.graph, fixed_here)  # (fx's checks of the fixed ones)

        def norm(a: Any) -> Any:
            if a.op == "placeholder" and str(a.target) in values:
                return values[str(a.target)]
            return a.name

        return [
            (n.op, str(n.target), repr(fx.node.map_arg((n.args, n.kwargs), norm)))
            for n in t.graph.nodes
            if n.op not in ("placeholder", "output")
            and n not in skip
            and getattr(n.target, "__name__", "") != "_assert_is_none"
        ]

    return nodes(loose, set(names) - set(values)) == nodes(fixed, set(names))


def is_constant(v: object) -> bool:
    """Whether ``v`` is a constant an argument can be fixed at in rewritten code: ``None``,
    or exactly a bool, int, float or str (fx checks these when the code runs).

    >>> [is_constant(v) for v in (None, False, 3, 0.5, "mean", (1, 2), torch.ones(1))]
    [True, True, True, True, True, False, False]
    """
    return v is None or type(v) in (bool, int, float, str)


def keep_argument_names(graph: fx.Graph, names: set[str]) -> None:
    """Give the placeholders fx renamed when specialising arguments ``names`` (``mask`` to
    ``mask_1``) their names back, so the rewritten ``forward`` still takes them as keywords
    (Swin's ``self.attn(x, mask=None)``; before 2026-12-08 such a call raised ``TypeError``).

    >>> g = fx.Graph()
    >>> m = g.placeholder("mask_1")
    >>> keep_argument_names(g, {"mask"})
    >>> m.target
    'mask'
    """
    taken = {str(p.target) for p in graph.nodes if p.op == "placeholder"}
    for p in graph.nodes:
        if p.op != "placeholder":
            continue
        base = str(p.target).rpartition("_")[0]
        if base in names and base not in taken and str(p.target) == f"{base}_1":
            p.target = base
            taken.add(base)


def optional_defaults(m: nn.Module) -> dict[str, Any]:
    """Optional ``forward`` arguments of ``m`` with a constant default (``None``, a number,
    a string: :func:`is_constant`)."""
    params = list(inspect.signature(m.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and is_constant(p.default)
    }


def record_bindings(
    model: nn.Module, inputs: tuple[Tensor, ...], traced: TracedModel | None = None
) -> dict[str, dict[str, Any] | str]:
    """How the model's own code calls each submodule with optional arguments, from one eval
    forward on ``inputs`` (the model's positional inputs): ``{argument: value}`` for each
    optional argument every call leaves at its constant default or passes as the same
    constant (``None``, a bool, int, float or str: HF GPT-2's ``use_cache=False``), so a
    rewritten ``forward`` is traced with exactly those fixed and the others (a mask passed as
    a tensor) as inputs; a reason naming the arguments instead where calls differ. With
    ``traced`` (the model's fx trace), an argument passed as a traced value there (a size
    read from the input, an int when the model runs) stays an input. Modules the forward
    does not call are absent.

    >>> class A(nn.Module):
    ...     def forward(self, x, mask=None, scale=None, flag=False):
    ...         return x if mask is None else x + mask
    >>> class Net(nn.Module):
    ...     def __init__(self): super().__init__(); self.a = A()
    ...     def forward(self, x): return self.a(x, x, flag=True)
    >>> record_bindings(Net(), (torch.ones(2),))
    {'a': {'scale': None, 'flag': True}}
    """
    seen: dict[str, dict[str, Any] | str] = {}
    handles = []
    as_traced = _traced_arguments(model, traced) if traced is not None else None
    for path, m in model.named_modules():
        defaults = optional_defaults(m) if path else {}
        packed = _packed_parameters(type(m).forward) if path else ()
        if not path:
            continue
        sig = inspect.signature(m.forward)
        # required arguments every call passes as None (HF Mistral's attention_mask under
        # sdpa): fixed at None too, not traced as tensors (a branch on `is None` would be
        # taken silently the other way)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        required = [
            p.name
            for p in sig.parameters.values()
            if p.kind in kinds and p.default is inspect.Parameter.empty
        ]
        if not defaults and not packed and not required:
            continue
        # None: each argument passed as a constant is one (no trace to say otherwise)
        values = None if as_traced is None else as_traced.get(path, set(defaults))

        def pre(
            mod: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            path: str = path,
            sig: inspect.Signature = sig,
            defaults: dict[str, Any] = defaults,
            values: set[str] | None = values,
            packed: tuple[str, ...] = packed,
            required: list[str] = required,
        ) -> None:
            try:
                bound = sig.bind(*args, **kwargs).arguments
            except TypeError:
                seen[path] = "its calls do not fit its signature"
                return
            extra = [k for k in packed if bound.get(k)]
            by_position = [k for k in extra if not isinstance(bound[k], dict)]
            if by_position:  # (GateTracer.create_args_for_root traces *args empty)
                seen[path] = (
                    f"it is called with arguments its decorated forward takes in "
                    f"{', '.join(by_position)} ({_packed_names(bound, by_position)}), which "
                    "rewritten code does not take"
                )
                return
            # left at its default, or passed as a constant of the code (fx keeps the argument
            # in the rewritten code, checked against the value when it runs)
            fixed = {
                k: bound.get(k, d)
                for k, d in defaults.items()
                if k not in bound
                or bound[k] is None
                or (is_constant(bound[k]) and (values is None or k not in values))
            }
            fixed.update((k, None) for k in required if k in bound and bound[k] is None)
            # keywords packed into a decorated forward's **kwargs (HF's position_ids=,
            # use_cache=): their names under "**kwargs", the constants among them fixed
            for k in extra:
                given: dict[str, Any] = bound[k]
                fixed[PACKED_PREFIX + k] = ",".join(sorted(given))
                fixed.update(
                    (n, v)
                    for n, v in given.items()
                    if v is None or (is_constant(v) and (values is None or n not in values))
                )
            prev = seen.setdefault(path, fixed)
            if isinstance(prev, str) or _same_constants(prev, fixed):
                return
            said = [
                f"{k!r} ({_fixed_as(prev, k)} in one call, {_fixed_as(fixed, k)} in another)"
                for k in dict.fromkeys([*prev, *fixed])
                if not _same_constants(
                    {k: prev[k]} if k in prev else {}, {k: fixed[k]} if k in fixed else {}
                )
            ]
            seen[path] = (
                f"it is called with different optional arguments ({', '.join(said)}), and "
                "rewritten code serves one way of calling it"
            )

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    run_hooked(model, inputs, handles)
    return seen


def _packed_parameters(forward: Callable[..., Any]) -> tuple[str, ...]:
    """The ``*args`` and ``**kwargs`` parameters of a ``forward`` behind a ``functools.wraps``
    decorator, which :meth:`GateTracer.create_args_for_root` traces empty (none for a plain
    ``forward``, whose fx placeholders take them).

    >>> def deco(f):
    ...     @functools.wraps(f)
    ...     def w(*a, **k): return f(*a, **k)
    ...     return w
    >>> class A(nn.Module):
    ...     @deco
    ...     def forward(self, x, **kwargs): return x
    >>> _packed_parameters(A.forward), _packed_parameters(nn.Linear.forward)
    (('kwargs',), ())
    """
    inner = inspect.unwrap(forward)
    if inner is forward or not callable(inner):
        return ()
    packed = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return tuple(p.name for p in inspect.signature(inner).parameters.values() if p.kind in packed)


def _packed_names(bound: Mapping[str, Any], names: list[str]) -> str:
    """What a call packs into ``names`` (``*args``, ``**kwargs``): the keywords, else a count."""
    said = []
    for k in names:
        v = bound[k]
        said.append(", ".join(map(str, v)) if isinstance(v, dict) else f"{len(v)} positional")
    return "; ".join(said)


def _same_constants(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same arguments fixed at the same values of the same types (``False`` is not ``0``).

    >>> _same_constants({"f": False}, {"f": 0}), _same_constants({"f": 1}, {"f": 1})
    (False, True)
    """
    return a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and a[k] == b[k] for k in a)


def _fixed_as(fixed: dict[str, Any], name: str) -> str:
    """How a call passes argument ``name``: its constant, or an input (a tensor, a traced
    value)."""
    return repr(fixed[name]) if name in fixed else "an input"


def _traced_arguments(model: nn.Module, traced: TracedModel) -> dict[str, set[str]]:
    """Per submodule of ``model``, the arguments some call in its trace ``traced`` passes a
    traced value (all of them where a call cannot be matched to the signature)."""
    out: dict[str, set[str]] = {}
    for call in traced.calls:
        if not call.path:
            continue
        m = model.get_submodule(call.path)
        names = out.setdefault(call.path, set())
        sig = inspect.signature(m.forward)
        try:
            bound = sig.bind(*call.args, **call.kwargs).arguments
        except TypeError:
            names.update(sig.parameters)
            continue
        names.update(k for k, v in bound.items() if _nodes_in(v))
        for k in _packed_parameters(type(m).forward):  # keywords packed into **kwargs
            given = bound.get(k)
            if isinstance(given, dict):
                names.update(n for n, v in given.items() if _nodes_in(v))
    return out


def run_hooked(
    model: nn.Module, inputs: tuple[Tensor, ...], handles: list[torch.utils.hooks.RemovableHandle]
) -> None:
    """One eval-mode, no-grad forward ``model(*inputs)`` for the hooks
    ``handles``, which are removed afterwards; every module is left in its mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t


def _structure(graph: fx.Graph, fixed: set[str] | None = None) -> list[tuple[str, str]]:
    """The computing nodes of a graph (not its inputs, nor what only reads the arguments
    ``fixed``: fx's checks of specialised ones)."""
    skip = _reads_only(graph, fixed or set())
    return [
        (n.op, str(n.target))
        for n in graph.nodes
        if n.op not in ("placeholder", "output")
        and n not in skip
        and getattr(n.target, "__name__", "") != "_assert_is_none"
    ]


def _reads_only(graph: fx.Graph, names: set[str]) -> set[fx.Node]:
    """The placeholders of arguments ``names`` (as fx names them specialised too: ``mask_1``)
    and the nodes computed from them alone (fx's ``use_cache_1 == False`` and its assert).

    >>> g = fx.Graph()
    >>> flag = g.placeholder("flag_1")
    >>> check = g.call_function(torch._assert, (g.call_function(operator.eq, (flag, False)), ""))
    >>> sorted(n.name for n in _reads_only(g, {"flag"}))
    ['_assert', 'eq', 'flag_1']
    """
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            if str(n.target) in names or str(n.target).rpartition("_")[0] in names:
                out.add(n)
        elif n.all_input_nodes and all(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _trace(
    model: nn.Module,
    opaque: dict[str, str] | None,
    *,
    warn: bool,
    concrete_args: dict[str, Any] | None,
    examples: dict[str, Example] | None = None,
    training: bool = False,
) -> TracedModel:
    """One fx trace of ``model`` (see :func:`trace_model`)."""
    found: dict[str, str] = dict(opaque or {})
    with hooks_detached(model) as hooked_ids:  # not run on Proxies (hooks.hooks_detached)
        hooked = frozenset(p for p, m in model.named_modules() if id(m) in hooked_ids and p)
        return _trace_detached(
            model,
            found,
            hooked,
            warn=warn,
            concrete_args=concrete_args,
            examples=examples,
            training=training,
        )


def _trace_detached(
    model: nn.Module,
    found: dict[str, str],
    hooked: frozenset[str],
    *,
    warn: bool,
    concrete_args: dict[str, Any] | None,
    examples: dict[str, Example] | None = None,
    training: bool = False,
) -> TracedModel:
    """:func:`_trace` with the user's hooks taken off."""
    for _ in range(_MAX_OPAQUE):
        tracer = GateTracer(set(found), examples)
        state = _module_state(model)
        modes = [(m, m.training) for m in model.modules()]
        for m, _ in modes:  # code reading `self.training` is traced as the eval-mode function
            m.training = training  # (the training-mode one only when asked for)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
            traced = fx.GraphModule(tracer.root, graph)
        except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
            name = tracer.failed_in
            if name is None or name in found:
                hint = _trace_hint(e)  # the common causes: what to change, as for a submodule
                raise ValueError(
                    f"torch.fx cannot trace {type(model).__name__}.forward itself "
                    f"({type(e).__name__}: {e}){hint}; gate_ needs a traceable top-level "
                    "forward"
                ) from e
            found[name] = f"{type(e).__name__}: {e}{_trace_hint(e, submodule=True)}"
            if warn:
                warnings.warn(
                    f"gate_: submodule '{name}' ({type(model.get_submodule(name)).__name__}) "
                    f"cannot be traced by torch.fx ({found[name]}); it is kept whole "
                    "and not gated, the rest of the model is gated",
                    stacklevel=3,
                )
            continue
        finally:
            for m, mode in modes:
                m.training = mode
            # every module as it was: fx stores a tensor computed while tracing
            # (`self.scale[1:]`) on the model as `_tensor_constant<k>`, the first free k (the
            # next trace must name its nodes alike: a plan names them), and code run on
            # traced values may cache them (timm LeViT's `attention_bias_cache[str(device)]`)
            _restore_module_state(state)
        _check_no_proxies(model)
        if examples is not None:
            tracer.publish_examples()
        return TracedModel(traced, found, tracer.calls, hooked, tracer.guards)
    raise ValueError(f"gave up tracing {type(model).__name__}: too many untraceable submodules")


_ModuleState = list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]


def _module_state(model: nn.Module) -> _ModuleState:
    """Each module of ``model`` with its attributes (``vars``) and a shallow copy of those that
    are dicts, lists or sets (a cache a forward fills), for :func:`_restore_module_state`."""
    state: _ModuleState = []
    for m in model.modules():
        attrs = dict(vars(m))
        contents = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, dict | list | set)}
        state.append((m, attrs, contents))
    return state


def _same_items(now: Any, then: Any) -> bool:
    """Whether container ``now`` holds the very objects ``then`` (its earlier shallow copy)
    held, in the same places (values compared by identity: a Proxy's ``==`` is a node)."""
    if len(now) != len(then):
        return False
    if isinstance(now, dict):
        return all(k in now and now[k] is v for k, v in then.items())
    if isinstance(now, list):
        return all(a is b for a, b in zip(now, then, strict=True))
    return {id(v) for v in now} == {id(v) for v in then}


def _restore_module_state(state: _ModuleState) -> None:
    """Put every module of :func:`_module_state` back as it was: attributes added since
    removed, attributes set since set back, dicts, lists and sets refilled in place.

    >>> class Cached(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.cache: dict[str, Tensor] = {}
    ...     def forward(self, x: Tensor) -> Tensor:
    ...         self.cache[str(x.device)] = x  # a traced value, when traced
    ...         self.last = x
    ...         return x
    >>> m = Cached()
    >>> _ = trace_model(m)
    >>> m.cache, hasattr(m, "last")
    ({}, False)
    """
    for m, attrs, contents in state:
        now = vars(m)
        for k in [k for k in now if k not in attrs]:
            del now[k]
        for k, v in attrs.items():
            if now.get(k, _MISSING) is not v:
                now[k] = v
        for k, then in contents.items():
            v = attrs[k]
            if _same_items(v, then):
                continue
            v.clear()
            if isinstance(v, list):
                v.extend(then)
            else:
                v.update(then)


_MISSING = object()


def _check_no_proxies(model: nn.Module) -> None:
    """Raise ``ValueError`` if a traced value is left in the state of a module of ``model``
    (in an attribute, or a dict, list, tuple or set in one, nested): code that stores it
    deeper than :func:`_restore_module_state` restores, which a later trace or run would
    read."""
    for path, m in model.named_modules():
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            if _holds_proxy(v, 3):
                raise ValueError(
                    f"gate_: tracing left a traced value (an fx Proxy) in attribute {k!r} of "
                    f"module '{path or '<root>'}' ({type(m).__name__}), deeper than gate_ "
                    "restores (attributes and the dicts, lists and sets in them): do not "
                    "store values computed by forward on the module, or reset them in it"
                )


def _holds_proxy(v: Any, depth: int) -> bool:
    """Whether ``v`` is an fx Proxy or a dict, list, tuple or set holding one within
    ``depth`` levels."""
    if isinstance(v, fx.Proxy):
        return True
    if depth == 0:
        return False
    if isinstance(v, dict):
        return any(_holds_proxy(a, depth - 1) for a in (*v.keys(), *v.values()))
    if isinstance(v, list | tuple | set | frozenset):
        return any(_holds_proxy(a, depth - 1) for a in v)
    return False


def _trace_hint(e: Exception, *, submodule: bool = False) -> str:
    """What to change for a common fx tracing failure ("" for others); ``submodule``: the
    failure is in a submodule, which gate_ keeps whole (not in the top-level forward).

    >>> _trace_hint(TypeError("slice indices must be integers or None"))[:40]
    ' (a Python list or tuple sliced by a siz'
    >>> _trace_hint(TypeError("zeros() takes 1 positional argument but 2 were given"))[:60]
    ' (torch.zeros given sizes as separate arguments: with a size'
    """
    text = str(e)
    factory = re.search(
        r"\b(zeros|ones|empty|rand|randn)\(\) (takes 1 positional argument|received an "
        r"invalid combination of arguments - got \(\w*Proxy)",
        text,
    )
    if factory is not None:  # torch.zeros(t, t) with t = x.size(1): fx passes Proxies
        name = factory.group(1)
        return (
            f" (torch.{name} given sizes as separate arguments: with a size read from the "
            f"input (t = x.size(1)) fx cannot trace it; pass the sizes as one tuple, "
            f"torch.{name}((t, t)), which fx traces)"
        )
    if "slice indices must be integers" in text:
        # a tensor sliced so is traced (_tensor_getitem): a Python sequence is left
        return (
            " (a Python list or tuple sliced by a size read from the input, which fx cannot "
            "trace: slice a tensor instead, e.g. a buffer self.mask[:, :, :T, :T], which "
            "gate_ traces)"
        )
    if isinstance(e, ProxyIterationError) and not e.shape:
        return (
            " (the pieces of a split or another traced value iterated without a count the "
            "code fixes: unpack it with a known count: `a, b = x.chunk(2, 1)`, or split into "
            "literal sections, x.split((c, c), 1), or chunk(n) with a literal n, whose "
            "pieces gate_ can iterate)"
        )
    if "Proxy object cannot be iterated" in text:
        return (
            " (a traced shape unpacked with *, e.g. Hugging Face's hidden_shape = "
            "(*input_shape, -1, self.head_dim): write the dimensions out, "
            "x.view(x.size(0), x.size(1), -1, self.head_dim), which fx traces)"
        )
    if "symbolically traced variables cannot be used as inputs to control flow" in text:
        if submodule:  # already a submodule of its own (a mixture of experts' routing)
            return (
                " (Python control flow on a traced value, already in a submodule of its "
                "own: the submodule is kept whole; to gate inside it, compute it with tensor "
                "ops such as torch.where)"
            )
        return (
            " (Python control flow on a traced value: move it into a submodule of its own, "
            "which is then kept whole, or compute it with tensor ops such as torch.where)"
        )
    return ""


def ancestors(node: fx.Node) -> Iterator[fx.Node]:
    """``node`` and every node it is computed from, each once (depth first).

    >>> g = fx.Graph()
    >>> x = g.placeholder("x")
    >>> [n.name for n in ancestors(g.call_function(torch.relu, (x,)))]
    ['relu', 'x']
    """
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        v = stack.pop()
        if v not in seen:
            seen.add(v)
            yield v
            stack.extend(v.all_input_nodes)


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
    "reshape_as",
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


def node_owners(graph: fx.Graph) -> dict[fx.Node, str]:
    """:func:`owner_of` of every node of ``graph``, computed once for the many
    :func:`scope_nodes` calls on a graph that does not change in between.

    >>> g = fx.Graph()
    >>> x = g.placeholder("x")
    >>> node_owners(g) == {x: ""}
    True
    """
    return {n: owner_of(n) for n in graph.nodes}


def scope_nodes(
    graph: fx.Graph, scope: str, owners: Mapping[fx.Node, str] | None = None
) -> list[fx.Node]:
    """Nodes of ``graph`` (traced from the root) that belong to ``scope``'s forward or below.
    ``owners``: :func:`node_owners` of ``graph``, if known (a node it lacks is looked up).

    >>> g = fx.Graph()
    >>> x = g.placeholder("x")
    >>> [n.name for n in scope_nodes(g, "", node_owners(g))]
    []
    """
    if scope == "":
        return [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    inner = scope + "."
    found: list[fx.Node] = []
    for n in graph.nodes:
        owner = owners.get(n) if owners is not None else None
        if owner is None:
            owner = owner_of(n)
        if owner == scope or owner.startswith(inner):
            found.append(n)
    return found


@dataclass
class RunRecord:
    """Per-node values of one eval forward pass through the traced graph."""

    shapes: dict[fx.Node, tuple[int, ...] | None]  # tensor output shape, else None
    flops: dict[fx.Node, int]  # FLOPs of each call_module node (costs.py conventions), and of
    # the node returning each call of a childless submodule fx traced through
    arg_shapes: dict[fx.Node, list[tuple[int, ...] | None]]
    extra_flops: int = 0  # such submodules' calls that traced to no ops (a constant)
    # the nodes of such calls counted whole by a cost handler (register_cost): node -> path
    whole: dict[fx.Node, str] = field(default_factory=dict)
    # of those, the convolution (F.conv1d/2d/3d) each call of an nn.Conv1d/2d/3d subclass with
    # its own forward returns, reading the module's weight and bias as they are: the conv
    # handler counts it from the module's in/out channels, which prune keeps in step -> path;
    # likewise the F.linear of an nn.Linear subclass (its in/out features) -> path
    conv_layers: dict[fx.Node, str] = field(default_factory=dict)


class _Recorder(fx.Interpreter):
    """Records shapes and FLOPs per node; the matrix products called as functions
    (:mod:`gatedprune.functional_costs`) are counted on their node, except in ``inlined``
    nodes (calls of a childless module, counted whole)."""

    def __init__(self, gm: fx.GraphModule, inlined: set[fx.Node]) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
        self.flops: dict[fx.Node, int] = {}
        self.arg_shapes: dict[fx.Node, list[tuple[int, ...] | None]] = {}
        self.errors: list[str] = []
        self._current: fx.Node | None = None
        self._inlined = inlined

    def run_node(self, n: fx.Node) -> Any:
        self._current = n
        if n.op in ("call_function", "call_method") and n not in self._inlined:
            with FunctionalCounter() as counter:
                out = super().run_node(n)
            if counter.flops:
                self.flops[n] = counter.flops
        else:
            out = super().run_node(n)
        self.shapes[n] = tuple(out.shape) if isinstance(out, Tensor) else None
        count = static_pieces(n)
        if count is not None and isinstance(out, tuple | list) and len(out) < count:
            _check_pieces_read(n, len(out))
        return out

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        node = self._current
        assert node is not None
        m = self.fetch_attr(str(target))
        self.arg_shapes[node] = [tuple(a.shape) if isinstance(a, Tensor) else None for a in args]
        leaf = not any(True for _ in m.children())
        if leaf and is_code(m):  # kept whole (opaque), counted as cost() counts it: as code
            with FunctionalCounter() as counter:  # its matrix products; element-wise ops free
                out = m(*args, **kwargs)
            self.flops[node] = counter.flops
            return out
        if leaf or unit_handler(m) is not None:
            out = m(*args, **kwargs)
            handler = _handler_for(m) if leaf else unit_handler(m)
            if handler is None:
                self.errors.append(f"{target} ({type(m).__name__})")
                self.flops[node] = 0
            else:
                inp = call_inputs(m, tuple(args), kwargs)
                check_positional(str(target), m, inp, handler)
                self.flops[node] = int(handler(m, inp, out))
            return out
        # counted as cost() counts it: leaves and units (e.g. attention) whole, the matrix
        # products its forward calls as functions outside them too
        total = [0]
        counter = FunctionalCounter()

        def hook_for(name: str, leaf: nn.Module) -> Callable[..., None]:
            h = _handler_for(leaf)
            if h is None:
                self.errors.append(f"{target}.{name} ({type(leaf).__name__})")

            def hook(mod: nn.Module, i: tuple[Any, ...], o: Any) -> None:
                if h is not None:
                    total[0] += int(h(mod, i, o))

            return hook

        handles = watch_counted(m, counter, hook_for)
        try:
            with counter:
                out = m(*args, **kwargs)
        finally:
            for hd in handles:
                hd.remove()
        self.flops[node] = total[0] + counter.flops
        return out


def _check_pieces_read(n: fx.Node, got: int) -> None:
    """Split node ``n`` returned ``got`` pieces, fewer than its literal count (``chunk(4)``
    of 6 channels gives 3 of 2): a ``getitem`` past them was made by iterating it while
    tracing (``list(x.chunk(4, 1))``, :meth:`GateTracer.iter`), and is an error naming it."""
    for u in n.users:
        i = u.args[1] if u.op == "call_function" and u.target is operator.getitem else None
        if isinstance(i, int) and i >= got:
            raise ValueError(
                f"gate_: node '{n.name}' ({_target_name(n)} into {static_pieces(n)}, in "
                f"{owner_of(n) or 'the model'}) gives {got} pieces for the example input, not "
                f"{static_pieces(n)}: torch.chunk gives fewer when the pieces cannot all be "
                "non-empty; the code iterates it (a loop, list(...) or * unpacking), so write "
                "the pieces it gives, e.g. split with literal sections"
            )


@dataclass
class InlinedCall:
    """One call of a childless submodule whose ``forward`` fx traced through: its ops are
    inlined in the graph. ``inputs``: the outside nodes they read (the module's own
    ``get_attr`` nodes excepted, which fx shares between calls); ``outputs``: their nodes read
    outside the call."""

    path: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]


def inlined_calls(graph: fx.Graph, root: nn.Module) -> list[InlinedCall]:
    """The calls of childless submodules of ``root`` (the module ``graph`` was traced from)
    whose ops fx inlined into ``graph``, in graph order.

    >>> class Norm(nn.Module):
    ...     def forward(self, x: Tensor) -> Tensor:
    ...         return x / x.norm(dim=-1, keepdim=True)
    >>> net = nn.Sequential(Norm(), nn.Linear(2, 2), Norm())
    >>> [(c.path, len(c.nodes)) for c in inlined_calls(trace_model(net).graph, net)]
    [('0', 2), ('2', 2)]
    """
    calls: dict[str, InlinedCall] = {}
    for n in graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if n.op in ("placeholder", "output", "call_module") or not stack:
            continue
        key = list(stack)[-1]  # the innermost call (fx names repeated calls "path@k")
        entry = stack[key]
        path = str(entry[0] if isinstance(entry, tuple) else key)
        try:
            m = root.get_submodule(path)
        except AttributeError:
            continue
        if path and not any(True for _ in m.children()):
            calls.setdefault(key, InlinedCall(path, [], [], [])).nodes.append(n)
    for call in calls.values():
        inside = set(call.nodes)
        own = call.path + "."
        for n in call.nodes:
            for a in n.all_input_nodes:
                shared = a.op == "get_attr" and str(a.target).startswith(own)
                if a not in inside and a not in call.inputs and not shared:
                    call.inputs.append(a)
            if n.op != "get_attr" and any(u not in inside for u in n.users):
                call.outputs.append(n)
    return list(calls.values())


def _within_any(path: str, scopes: set[str]) -> bool:
    """Whether module ``path`` is one of ``scopes`` or inside one (a dotted prefix of it).

    >>> [_within_any(p, {"a.b"}) for p in ("a.b", "a.b.c", "a.bc", "a")]
    [True, True, False, False]
    """
    if path in scopes:
        return True
    parts = path.split(".")
    return any(".".join(parts[:k]) in scopes for k in range(1, len(parts)))


def _inlined_flops(
    root: nn.Module, graph: fx.Graph, inputs: tuple[Tensor, ...], errors: list[str]
) -> tuple[dict[fx.Node, int], int]:
    """FLOPs of the childless submodules fx traced through (``cost`` counts them whole, with
    their handler, on plain models): one run of ``root`` with hooks, each call's count put on
    the node that returns it (its call in the graph, in order). Calls the graph does not show
    (a ``forward`` that traced to no ops) are returned as a constant. Unknown modules are
    appended to ``errors``, as for leaves."""
    within = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    counts: dict[str, list[int]] = {}
    handles = []
    for path, m in root.named_modules():
        if not path or any(True for _ in m.children()):
            continue
        if _within_any(path, within):
            continue  # a leaf, or counted inside one (e.g. opaque modules)
        if is_code(m):
            continue  # counted as code: its products on their nodes, as cost() counts them
        handler = _handler_for(m)
        if handler is None:

            def unknown(mod: nn.Module, i: Any, o: Any, path: str = path) -> None:
                errors.append(f"{path} ({type(mod).__name__})")

            handles.append(m.register_forward_hook(unknown))
            continue

        def hook(
            mod: nn.Module,
            a: tuple[Any, ...],
            kw: dict[str, Any],
            o: Any,
            path: str = path,
            h: Any = handler,
        ) -> None:
            i = call_inputs(mod, a, kw)
            check_positional(path, mod, i, h)
            counts.setdefault(path, []).append(int(h(mod, i, o)))

        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    if not handles:  # no such submodule: nothing to count, no run needed
        return {}, 0
    run_hooked(root, inputs, handles)
    by_path: dict[str, list[InlinedCall]] = {}
    for call in inlined_calls(graph, root):
        by_path.setdefault(call.path, []).append(call)
    flops: dict[fx.Node, int] = {}
    extra = 0
    for path, values in counts.items():
        calls = by_path.get(path, [])
        for k, v in enumerate(values):
            if k < len(calls):
                c = calls[k]
                node = c.outputs[-1] if c.outputs else c.nodes[-1]
                flops[node] = flops.get(node, 0) + v
            else:
                extra += v
    return flops, extra


def record_run(traced: TracedModel, inputs: tuple[Tensor, ...], root: nn.Module) -> RunRecord:
    """Run the traced graph once on ``inputs``, the model's positional inputs (eval mode, no
    grad), and record shapes and FLOPs per call; FLOPs of submodules fx traced through are
    counted on ``root``, the traced model, as ``cost`` counts them.

    Raises ``TypeError`` for leaf modules that ``gatedprune.cost`` cannot count.
    """
    gm = traced.graph_module
    rec = _record(gm, inputs, root)
    inlined, extra = _inlined_flops(root, gm.graph, inputs, rec.errors)
    for node, f in inlined.items():
        rec.flops[node] = rec.flops.get(node, 0) + f
    if rec.errors:
        raise TypeError(
            "cost() does not know how to count these leaf modules: "
            + ", ".join(sorted(set(rec.errors)))
            + "; register them with gatedprune.costs.register_cost or give them a "
            "flops_of(inputs, output) method"
        )
    calls = inlined_calls(gm.graph, root)
    whole = {n: c.path for c in calls if not is_code(root.get_submodule(c.path)) for n in c.nodes}
    conv_layers = {
        c.outputs[0]: c.path
        for c in calls
        if len(c.outputs) == 1 and _conv_layer_output(root.get_submodule(c.path), c)
    }
    return RunRecord(rec.shapes, rec.flops, rec.arg_shapes, extra, whole, conv_layers)


_CONV_FUNCS = (F.conv1d, F.conv2d, F.conv3d)


def _conv_layer_output(m: nn.Module, call: InlinedCall) -> bool:
    """Whether ``call`` (of module ``m``) returns ``F.conv*d(x, weight, bias, ..., groups)``
    with ``m``'s own weight and bias (None iff ``m.bias`` is) and groups, ``m`` an
    ``nn.Conv1d/2d/3d`` (subclass) counted by the conv cost handler (no ``flops_of``); or
    ``F.linear(x, weight, bias)`` the same way, ``m`` an ``nn.Linear`` subclass (timm's
    ``Linear``)."""
    out = call.outputs[0]
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if callable(getattr(m, "flops_of", None)):
        return False
    if isinstance(m, nn.Linear):
        return _linear_layer_output(m, call.path, out)
    if not isinstance(m, convs):
        return False
    if out.op != "call_function" or out.target not in _CONV_FUNCS or out.kwargs:
        return False
    if len(out.args) < 2:
        return False
    args = list(out.args) + [None, 1, 0, 1, 1][len(out.args) - 2 :]
    if len(args) != 7:
        return False
    w, b, groups = args[1], args[2], args[6]
    if not isinstance(w, fx.Node) or w.op != "get_attr" or w.target != f"{call.path}.weight":
        return False
    if m.bias is None:
        return bool(b is None and groups == m.groups)
    ok_bias = isinstance(b, fx.Node) and b.op == "get_attr" and b.target == f"{call.path}.bias"
    return bool(ok_bias and groups == m.groups)


def _linear_layer_output(m: nn.Linear, path: str, out: fx.Node) -> bool:
    """Whether ``out`` is ``F.linear(x, weight, bias)`` with ``m``'s own weight and bias (None
    iff ``m.bias`` is), ``m`` called ``path``, positional or by keyword."""
    if out.op != "call_function" or out.target is not F.linear:
        return False
    names = ("input", "weight", "bias")
    if len(out.args) > 3 or set(out.kwargs) - set(names):
        return False
    w, b = (out.args[i] if len(out.args) > i else out.kwargs.get(names[i]) for i in (1, 2))
    if not isinstance(w, fx.Node) or w.op != "get_attr" or w.target != f"{path}.weight":
        return False
    if m.bias is None:
        return b is None
    return isinstance(b, fx.Node) and b.op == "get_attr" and b.target == f"{path}.bias"


def _record(gm: fx.GraphModule, inputs: tuple[Tensor, ...], root: nn.Module) -> _Recorder:
    """One eval-mode, no-grad run of ``gm(*inputs)`` through a :class:`_Recorder`."""
    was = [(m, m.training) for m in gm.modules()]
    gm.eval()
    whole = [c for c in inlined_calls(gm.graph, root) if not is_code(root.get_submodule(c.path))]
    rec = _Recorder(gm, {n for c in whole for n in c.nodes})
    try:
        with torch.no_grad():
            rec.run(*inputs)
    finally:
        for m, t in was:
            m.training = t
    return rec


def costs_scale_with_batch(
    traced: TracedModel, inputs: tuple[Tensor, ...], root: nn.Module, record: RunRecord
) -> bool:
    """Whether the FLOPs of every call (module calls, childless modules fx traced through,
    matrix products called as functions) are proportional to the batch size (dim 0 of every
    input, which must be the same for all): checked by two more runs at batch ``B + 1`` and
    ``2 B + 1``. A product over the batch (``x @ x.T``), a slice of it (``h[: B // 2]``) or a
    layer reading dim 0 as its length is not, so the cost of other batch sizes cannot be
    derived by scaling."""
    if any(x.dim() == 0 for x in inputs):
        return False
    batches = {int(x.shape[0]) for x in inputs}
    if len(batches) != 1 or 0 in batches:  # no common batch dimension
        return False
    (batch,) = batches
    base = {n.name: f for n, f in record.flops.items()}
    base[""] = record.extra_flops  # calls that traced to no ops
    for other in (batch + 1, 2 * batch + 1):
        index = torch.arange(other) % batch  # (other,) the example's samples, repeated
        xs = tuple(x[index.to(x.device)] for x in inputs)  # each (other, *x.shape[1:])
        errors: list[str] = []
        try:
            rec = _record(traced.graph_module, xs, root)
            inlined, extra = _inlined_flops(root, traced.graph_module.graph, xs, errors)
        except Exception:  # the model does not run at another batch size
            return False
        flops = {n.name: f for n, f in rec.flops.items()}
        flops[""] = extra
        for node, f in inlined.items():
            flops[node.name] = flops.get(node.name, 0) + f
        if any(flops.get(n, 0) * batch != base.get(n, 0) * other for n in {*base, *flops}):
            return False
    return True
