"""Turning pruning decisions into a smaller model: folding gate values, slicing the user's own
modules in place, and rewriting (as fx ``GraphModule``) only the innermost modules whose code
must change because a residual branch disappeared.

A *plan* is plain JSON: which channels each module keeps, which residual adds lose their
branch, which modules are rewritten and which graph nodes are erased. :func:`apply_plan` replays
it on a freshly built dense model, so the pruned weights load with ``load_state_dict``.
"""

from __future__ import annotations

import inspect
import itertools
import operator
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..base import find_model_gating
from .graph import owner_of, scope_nodes, trace_model
from .rnn import apply_rnn_plan
from .transformer import build_pruned_attention, build_pruned_layer, prepare_encoders

__all__ = [
    "PLAN_FORMAT",
    "PrunedGraphModule",
    "ScaledAdd",
    "apply_plan",
    "fold_scale",
    "slice_module",
]

PLAN_FORMAT = "gatedprune.plan/1"


class ScaledAdd(nn.Module):
    """A surviving new shortcut in a pruned model: ``forward(x, s) = x + scale * s``.

    ``scale`` is a 0-dim buffer (the edge's gate value, in the ``state_dict``, not a
    parameter). It costs what it computes: a multiply and an add per output element.

    >>> m = ScaledAdd()
    >>> _ = m.scale.fill_(0.5)
    >>> m(torch.ones(2, 3), torch.full((2, 3), 4.0))[0, 0].item()
    3.0
    >>> m.flops_of((torch.ones(2, 3), torch.ones(2, 3)), torch.ones(2, 3))
    12
    """

    scale: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.zeros((), dtype=torch.float32))

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return x + self.scale * s  # same shape as x

    def flops_of(self, inputs: tuple[Any, ...], output: Any) -> int:
        """2 FLOPs per output element (the multiply and the add)."""
        return 2 * int(output.numel())


class PrunedGraphModule(fx.GraphModule):
    """A module whose ``forward`` was rewritten by pruning (fx generated code).

    Left with no submodules it only runs functional ops, which ``gatedprune.cost`` does not
    count: :meth:`flops_of` says so, so the cost of such a leaf is 0 rather than unknown.
    """

    def flops_of(self, inputs: tuple[Any, ...], output: Any) -> int:
        return 0

    def __reduce__(self) -> tuple[Any, ...]:
        rv = super().__reduce__()  # GraphModule pickles as a plain GraphModule: re-wrap it
        return (_restore_pruned, (rv[0], rv[1], type(self).__name__))


def _restore_pruned(fn: Any, args: tuple[Any, ...], name: str) -> PrunedGraphModule:
    gm = fn(*args)
    return PrunedGraphModule(gm, gm.graph, class_name=name)


def fold_scale(m: nn.Module, scale: Tensor) -> None:
    """Multiply the output channels of ``m`` by ``scale`` ``(C,)`` (or a scalar) in place."""
    with torch.no_grad():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            s = scale.to(m.weight.dtype).reshape(-1, *([1] * (m.weight.dim() - 1)))
            m.weight.mul_(s)
            if m.bias is not None:
                m.bias.mul_(s.reshape(-1))
        elif isinstance(m, nn.MultiheadAttention):  # a scalar (block gate) on its output
            m.out_proj.weight.mul_(scale.to(m.out_proj.weight.dtype))
            if m.out_proj.bias is not None:
                m.out_proj.bias.mul_(scale.to(m.out_proj.bias.dtype))
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.LayerNorm):
            if m.weight is None:
                raise TypeError(f"cannot fold a gate into {type(m).__name__} without affine")
            s = scale.to(m.weight.dtype)
            m.weight.mul_(s)
            if m.bias is not None:
                m.bias.mul_(s)
        else:
            raise TypeError(f"cannot fold a gate into {type(m).__name__}")


def _take(p: Tensor, dim: int, keep: list[int] | None) -> Tensor:
    if keep is None:
        return p.detach().clone()
    return p.detach().index_select(dim, torch.tensor(keep, dtype=torch.long)).clone()


def _set(m: nn.Module, name: str, value: Tensor, param: bool) -> None:
    if param:
        old = getattr(m, name)
        setattr(m, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(m, name, value)


def slice_module(
    m: nn.Module, kind: str, keep_in: list[int] | None, keep_out: list[int] | None
) -> None:
    """Keep only channels ``keep_in`` / ``keep_out`` (None: all) of ``m``, in place."""
    if kind == "linear":
        assert isinstance(m, nn.Linear)
        w = _take(_take(m.weight, 0, keep_out), 1, keep_in)
        _set(m, "weight", w, True)
        if m.bias is not None:
            _set(m, "bias", _take(m.bias, 0, keep_out), True)
        m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
    elif kind in ("conv", "dw"):
        assert isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        if kind == "dw":
            mult = m.out_channels // m.in_channels
            if keep_out is not None:
                keep_in = sorted({o // mult for o in keep_out})
            w = _take(m.weight, 0, keep_out)
            m.groups = len(keep_in) if keep_in is not None else m.groups
        else:
            w = _take(_take(m.weight, 0, keep_out), 1, keep_in)
        _set(m, "weight", w, True)
        if m.bias is not None:
            _set(m, "bias", _take(m.bias, 0, keep_out), True)
        m.out_channels = int(w.shape[0])
        m.in_channels = int(w.shape[1]) * m.groups
    elif kind == "bn":
        assert isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                _set(m, name, _take(getattr(m, name), 0, keep_out), True)
        for name in ("running_mean", "running_var"):
            if getattr(m, name) is not None:
                _set(m, name, _take(getattr(m, name), 0, keep_out), False)
        if keep_out is not None:
            m.num_features = len(keep_out)
    else:
        raise ValueError(f"unknown slice kind {kind!r}: expected linear, conv, dw or bn")


def _norm_target(node: fx.Node, scope: str) -> Any:
    if node.op in ("call_module", "get_attr") and scope:
        t = str(node.target)
        return t[len(scope) + 1 :] if t.startswith(scope + ".") else t
    return node.target


def _defaults(sub: nn.Module) -> dict[str, Any]:
    """Optional forward arguments with a constant default (assumed left at it by callers)."""
    params = list(inspect.signature(sub.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and (p.default is None or isinstance(p.default, bool | int | float))
    }


def _specialised(graph: fx.Graph, names: set[str]) -> set[fx.Node]:
    """Nodes that only check or use arguments specialised by ``concrete_args``."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            if str(n.target).rstrip("_1234567890") in names:
                out.add(n)
        elif n.all_input_nodes and all(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def local_trace(
    model: nn.Module, root_graph: fx.Graph, scope: str, opaque: dict[str, str]
) -> tuple[Any, dict[str, fx.Node]]:
    """Trace module ``scope`` alone and map the root graph's nodes in it to its own nodes.

    Raises ``RuntimeError`` when the two traces differ (the module cannot be rewritten).
    """
    sub = model if scope == "" else model.get_submodule(scope)
    prefix = scope + "." if scope else ""
    local_opaque = {k[len(prefix) :]: v for k, v in opaque.items() if k.startswith(prefix)}
    root_nodes = scope_nodes(root_graph, scope)
    defaults = _defaults(sub) if scope else {}
    for concrete in [None, defaults] if defaults else [None]:
        try:
            local = trace_model(sub, local_opaque, warn=False, concrete_args=concrete)
        except ValueError:
            continue
        skip = _specialised(local.graph, set(concrete)) if concrete else set()
        local_nodes = [
            n for n in local.graph.nodes if n.op not in ("placeholder", "output") and n not in skip
        ]
        same = len(root_nodes) == len(local_nodes) and all(
            r.op == n.op and _norm_target(r, scope) == n.target
            for r, n in zip(root_nodes, local_nodes, strict=False)
        )
        if same:
            return local, {r.name: n for r, n in zip(root_nodes, local_nodes, strict=True)}
    raise RuntimeError(
        f"cannot rewrite module '{scope}' ({type(sub).__name__}): tracing it alone gives a "
        "different graph than tracing the whole model"
    )


_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _mutates(n: fx.Node) -> bool:
    """Whether ``n`` may write into one of its inputs (an in-place op)."""
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    in_place = name.endswith("_") and not name.startswith("__")
    return in_place or (n.op == "call_function" and n.target in _INPLACE_FUNCS)


def _erase_dead(graph: fx.Graph, node: fx.Node, scope: str) -> None:
    """Erase ``node`` after the users it leaves dangling: values computed but never used,
    e.g. the ``_`` of ``a, _ = f(x)`` (users first, reverse topological order)."""
    for u in list(node.users):
        if u.op in ("output", "placeholder") or _mutates(u):
            break
        _erase_dead(graph, u, scope)
    if node.users:
        users = ", ".join(u.name for u in node.users)
        raise RuntimeError(
            f"node {node.name} in '{scope}' is still used by {users}; cannot erase it"
        )
    graph.erase_node(node)


def _rewrite_scope(
    model: nn.Module,
    root_graph: fx.Graph,
    scope: str,
    opaque: dict[str, str],
    cut: dict[str, int],
    erase: set[str],
    bypass: set[str],
    edges: list[dict[str, Any]],
) -> nn.Module:
    sub = model if scope == "" else model.get_submodule(scope)
    root_nodes = scope_nodes(root_graph, scope)
    local, mapping = local_trace(model, root_graph, scope, opaque)
    position = {n: i for i, n in enumerate(local.graph.nodes)}
    current: dict[str, fx.Node] = {}
    for e in edges:  # new shortcuts x_j <- x_j + w * out_i, a ScaledAdd (before cutting branches)
        src = mapping[e["src"]]
        dst = current.get(e["dst"], mapping[e["dst"]])
        users = [mapping[u] for u in e["users"]]
        shortcut = ScaledAdd()
        for owner in (sub, local.graph_module):
            owner.add_module(e["buffer"], shortcut)
        with local.graph.inserting_before(min(users, key=lambda n: position[n])):
            new_x = local.graph.call_module(e["buffer"], (dst, src))
        for u in users:
            u.replace_input_with(dst, new_x)
        current[e["dst"]] = new_x
    for add_name, pos in cut.items():
        if add_name not in mapping:
            continue
        ln = mapping[add_name]
        keep = ln.args[1 - pos]
        assert isinstance(keep, fx.Node)
        ln.replace_all_uses_with(keep)
        local.graph.erase_node(ln)
    for r in root_nodes:  # bypassed ReLUs (relu(relu(z)) = relu(z)) in graph order
        if r.name in bypass:
            ln = mapping[r.name]
            inp = ln.args[0]
            assert isinstance(inp, fx.Node)
            ln.replace_all_uses_with(inp)
            local.graph.erase_node(ln)
    for r in reversed(root_nodes):
        if r.name in erase:
            _erase_dead(local.graph, mapping[r.name], scope)
    for n in local.graph.nodes:  # string annotations (postponed evaluation) break pickling
        n.type = None
    local.graph.lint()
    nodes = list(local.graph.nodes)
    if len(nodes) == 2 and nodes[0].op == "placeholder" and nodes[1].args[0] is nodes[0]:
        return nn.Identity()  # nothing left: the module passes its input through
    new = PrunedGraphModule(sub, local.graph, class_name=f"Pruned{type(sub).__name__}")
    new.train(sub.training)
    return new


def _sizes(m: nn.Module, kind: str) -> tuple[int | None, int] | None:
    """(input, output) channel counts of a module sliced as ``kind``; None if it is not one."""
    if kind == "linear" and isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if kind in ("conv", "dw") and isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return (m.in_channels if kind == "conv" else None), m.out_channels
    if kind == "bn" and isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        return None, m.num_features
    return None


def _check_slice(name: str, m: nn.Module, spec: dict[str, Any]) -> None:
    """Refuse a slice that does not fit ``m``: a plan from another model, or applied twice."""
    sizes = _sizes(m, str(spec["kind"]))
    if sizes is None:
        raise ValueError(
            f"the plan slices module '{name}' as {spec['kind']!r}; it is {type(m).__name__}"
        )
    hint = "apply a plan once, to a fresh dense instance of the model it was exported from"
    for side, actual in zip(("in", "out"), sizes, strict=True):
        expected, keep = spec.get(f"n_{side}"), spec.get(side)
        if actual is None:
            continue
        if expected is not None and int(expected) != actual:
            raise ValueError(
                f"the plan expects module '{name}' to have {expected} {side}put channels, "
                f"it has {actual}: {hint}"
            )
        if keep and (max(keep) >= actual or min(keep) < 0):
            raise ValueError(
                f"the plan keeps {side}put channel {max(keep)} of module '{name}', which has "
                f"{actual}: {hint}"
            )


def _check_heads(name: str, att: nn.MultiheadAttention, heads: list[int]) -> None:
    if heads and (max(heads) >= att.num_heads or min(heads) < 0):
        raise ValueError(
            f"the plan keeps head {max(heads)} of '{name}', which has {att.num_heads} heads: "
            "apply a plan once, to a fresh dense instance of the model it was exported from"
        )


_SLICE_KINDS = ("linear", "conv", "dw", "bn")
_PLAN_FIELDS: dict[str, type] = {"opaque": dict, "slices": dict, "cut": dict, "scopes": list}
_PLAN_OPTIONAL: dict[str, type] = {
    "erase": list,
    "transformers": dict,
    "attention": dict,
    "rnn": dict,
    "bypass": list,
    "edges": list,
}


def _check_indices(where: str, value: object, *, optional: bool) -> None:
    """``value`` must be a strictly increasing list of ints >= 0 (or None if ``optional``)."""
    if value is None and optional:
        return
    ok = isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    )
    if not ok or any(a >= b for a, b in itertools.pairwise(cast(list[int], value))):
        kind = "None or a" if optional else "a"
        raise ValueError(
            f"malformed plan: {where} must be {kind} strictly increasing list of channel "
            f"indices >= 0, got {value!r}"
        )


def _check_plan(plan: object) -> dict[str, Any]:
    """``plan`` if it has the structure :func:`export_plan` produces, else ``ValueError``
    naming the first malformed entry (a truncated or hand-edited plan)."""
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        got = plan.get("format") if isinstance(plan, dict) else type(plan).__name__
        raise ValueError(
            f"not a gatedprune plan: expected a dict with format {PLAN_FORMAT!r}, got {got!r}"
        )
    for key, typ in [*_PLAN_FIELDS.items(), *_PLAN_OPTIONAL.items()]:
        if key not in plan and key in _PLAN_OPTIONAL:
            continue
        if not isinstance(plan.get(key), typ):
            raise ValueError(
                f"malformed plan: {key!r} must be a {typ.__name__}, "
                f"got {type(plan.get(key)).__name__}"
            )
    for name, spec in plan["slices"].items():
        if not isinstance(spec, dict) or spec.get("kind") not in _SLICE_KINDS:
            raise ValueError(
                f"malformed plan: slice {name!r} must be a dict with 'kind' one of "
                f"{_SLICE_KINDS}, got {spec!r}"
            )
        for side in ("in", "out"):
            _check_indices(f"slice {name!r} {side!r}", spec.get(side), optional=True)
            n = spec.get(f"n_{side}")
            if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
                raise ValueError(
                    f"malformed plan: slice {name!r} 'n_{side}' must be an int, got {n!r}"
                )
    for section, fields in (("transformers", ("heads", "units")), ("attention", ("heads",))):
        for name, spec in plan.get(section, {}).items():
            if not isinstance(spec, dict):
                raise ValueError(f"malformed plan: {section} entry {name!r} must be a dict")
            for f in fields:
                _check_indices(f"{section} {name!r} {f!r}", spec.get(f), optional=False)
            for f in ("attn", "ffn") if section == "transformers" else ():
                if not isinstance(spec.get(f), bool):
                    raise ValueError(
                        f"malformed plan: transformers {name!r} {f!r} must be a bool, "
                        f"got {spec.get(f)!r}"
                    )
    edge_keys = {"scope": str, "src": str, "dst": str, "users": list, "buffer": str}
    for e in plan.get("edges", []):
        if not isinstance(e, dict) or any(
            not isinstance(e.get(k), t) for k, t in edge_keys.items()
        ):
            raise ValueError(
                f"malformed plan: each edge must be a dict with str 'scope', 'src', 'dst', "
                f"'buffer' and a list 'users', got {e!r}"
            )
    for node, arg in plan["cut"].items():
        if isinstance(arg, bool) or not isinstance(arg, int):
            raise ValueError(f"malformed plan: cut {node!r} must name an int argument, got {arg!r}")
    return plan


def _check_rnn(name: str, m: nn.Module, spec: object) -> None:
    """Refuse a recurrent-module plan entry that does not fit ``m`` (before anything changes)."""
    if not isinstance(m, nn.LSTM | nn.GRU | nn.RNN):
        raise ValueError(f"the plan prunes '{name}' as a recurrent module; it is {type(m)}")
    if not isinstance(spec, dict):
        raise ValueError(f"malformed plan: rnn entry {name!r} must be a dict, got {spec!r}")
    hint = "apply a plan once, to a fresh dense instance of the model it was exported from"
    units, keep_in = spec.get("units"), spec.get("in")
    _check_indices(f"rnn {name!r} 'in'", keep_in, optional=True)
    if keep_in and keep_in[-1] >= m.input_size:
        raise ValueError(
            f"the plan keeps input feature {keep_in[-1]} of '{name}', which has "
            f"{m.input_size}: {hint}"
        )
    if units is None:
        return
    n_lists = m.num_layers * (2 if m.bidirectional else 1)
    if not isinstance(units, list) or len(units) != n_lists:
        raise ValueError(
            f"malformed plan: rnn {name!r} 'units' must be {n_lists} index lists (one per layer "
            f"and direction), got {units!r}"
        )
    for k, keep in enumerate(units):
        _check_indices(f"rnn {name!r} 'units'[{k}]", keep, optional=False)
        if keep and keep[-1] >= m.hidden_size:
            raise ValueError(
                f"the plan keeps unit {keep[-1]} of '{name}', which has {m.hidden_size}: {hint}"
            )


def _within(path: str, scope: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + ".")


def apply_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Apply a pruning plan (from :func:`gatedprune.export_plan`) to a dense, ungated instance of
    the same model: slices its modules in place and rewrites the modules that lose residual
    branches. Returns the pruned model (``model`` itself unless its own forward was rewritten).

    >>> import torch, gatedprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> plan = {"format": PLAN_FORMAT, "opaque": {}, "cut": {}, "scopes": [], "erase": [],
    ...         "slices": {"0": {"kind": "linear", "in": None, "out": [0, 1]},
    ...                    "2": {"kind": "linear", "in": [0, 1], "out": None}}}
    >>> apply_plan(net, plan)[0].out_features
    2
    """
    _check_plan(plan)
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_plan expects a torch.nn.Module, got {type(model).__name__}")
    if find_model_gating(model) is not None:
        raise ValueError(
            f"apply_plan needs a dense, ungated {type(model).__name__}; this one is gated "
            "(prune it with gatedprune.prune, or apply the plan to a fresh instance)"
        )

    def submodule(name: str, what: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(
                f"the plan {what} module '{name}', which the model does not have"
            ) from e

    # check everything before changing anything: a plan that does not fit leaves the model as is
    layers: list[tuple[str, nn.TransformerEncoderLayer, dict[str, Any]]] = []
    for name, spec in plan.get("transformers", {}).items():
        layer = submodule(name, "prunes")
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise ValueError(f"the plan prunes '{name}' as an encoder layer; it is {type(layer)}")
        _check_heads(name, layer.self_attn, list(spec["heads"]))
        units, width = list(spec["units"]), layer.linear1.out_features
        if units and (max(units) >= width or min(units) < 0):
            raise ValueError(
                f"the plan keeps FFN unit {max(units)} of '{name}', which has {width}: apply a "
                "plan once, to a fresh dense instance of the model it was exported from"
            )
        layers.append((name, layer, spec))
    attentions: list[tuple[str, nn.MultiheadAttention, list[int]]] = []
    for name, spec in plan.get("attention", {}).items():
        att = submodule(name, "prunes")
        if not isinstance(att, nn.MultiheadAttention):
            raise ValueError(f"the plan prunes '{name}' as attention; it is {type(att)}")
        _check_heads(name, att, list(spec["heads"]))
        attentions.append((name, att, list(spec["heads"])))
    for name, spec in plan["slices"].items():
        _check_slice(name, submodule(name, "slices"), spec)
    for name, spec in plan.get("rnn", {}).items():
        _check_rnn(name, submodule(name, "prunes"), spec)
    prepare_encoders(model)
    for name, layer, spec in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build_pruned_layer(layer, spec))
    for name, att, heads in attentions:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build_pruned_attention(att, heads))
    sliced = [(model.get_submodule(name), spec) for name, spec in plan["slices"].items()]
    apply_rnn_plan(model, plan.get("rnn", {}))
    for m, spec in sliced:
        slice_module(m, spec["kind"], spec["in"], spec["out"])
    scopes: list[str] = list(plan["scopes"])
    if not scopes:
        return model
    opaque: dict[str, str] = dict(plan["opaque"])
    traced = trace_model(model, opaque, warn=False)
    cut = {str(k): int(v) for k, v in plan["cut"].items()}
    erase = set(plan.get("erase", []))
    bypass = set(plan.get("bypass", []))
    known = {n.name for n in traced.graph.nodes}
    edge_nodes = [n for e in plan.get("edges", []) for n in (e["src"], e["dst"], *e["users"])]
    missing = [n for n in [*cut, *erase, *bypass, *edge_nodes] if n not in known]
    if missing:
        raise ValueError(f"the plan names graph nodes the model does not have: {missing[:5]}")
    owners = {n.name: owner_of(n) for n in traced.graph.nodes}
    result = model
    for scope in scopes:
        in_scope = {
            n
            for n in owners
            if scope == "" or owners[n] == scope or owners[n].startswith(scope + ".")
        }
        new = _rewrite_scope(
            model,
            traced.graph,
            scope,
            opaque,
            {k: v for k, v in cut.items() if k in in_scope},
            erase & in_scope,
            bypass & in_scope,
            [e for e in plan.get("edges", []) if _within(e["scope"], scope)],
        )
        if scope == "":
            result = new
        else:
            parent_name, _, child = scope.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    return result
