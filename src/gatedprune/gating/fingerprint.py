"""What identifies a dense model's architecture, so a plan is applied to the model it came from.

:func:`model_fingerprint` records, without running the model, every module (name, class,
``extra_repr`` and, for torch's own layers, their configuration attributes such as an encoder
layer's activation) and every parameter and buffer (name and shape); :func:`graph_fingerprint`
hashes the traced ``forward`` code: each node's kind, target and constant arguments (the
head count written in ``view(B, T, self.n_head, -1)``, an activation called as a function).
:func:`check_structure` and :func:`check_graph` name the first difference; :func:`plan_checksum`
is a hash of a plan's content, so a plan edited after :func:`gatedprune.export_plan` wrote it
is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = [
    "check_graph",
    "check_structure",
    "graph_fingerprint",
    "model_fingerprint",
    "plan_checksum",
]

_SIMPLE = (int, float, bool, str, type(None))


def _name_of(obj: object) -> str:
    """A stable name for a function or class (no memory address)."""
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return f"{module}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _config(value: object) -> object | None:
    """A JSON form of a configuration value, or None if it is not one (tensors, state)."""
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, tuple | list) and all(isinstance(v, _SIMPLE) for v in value):
        return list(value)
    if callable(value) and not isinstance(value, nn.Module):
        return _name_of(value)
    return None


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # an object's repr: differs between instances


def _module_row(name: str, m: nn.Module) -> list[Any]:
    row: list[Any] = [name, _name_of(type(m)), _ADDRESS.sub("", m.extra_repr())]
    if type(m).__module__.startswith("torch.nn."):  # torch's layers: their settings
        settings = {
            k: c
            for k, v in sorted(vars(m).items())
            if not k.startswith("_") and k != "training" and (c := _config(v)) is not None
        }
        row.append(settings)
    return row


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Modules and tensors of ``model`` (JSON-serialisable lists).

    >>> fp = model_fingerprint(nn.Sequential(nn.Linear(2, 3)))
    >>> fp["tensors"]
    [['0.weight', [3, 2]], ['0.bias', [3]]]
    """
    modules = [_module_row(name, m) for name, m in model.named_modules()]
    tensors = [
        [name, list(t.shape)] for name, t in [*model.named_parameters(), *model.named_buffers()]
    ]
    return {"modules": modules, "tensors": tensors}


def _arg(a: object, index: dict[fx.Node, int]) -> object:
    """A node argument's structure: nodes by position, constants by value."""
    if isinstance(a, fx.Node):
        return ["node", index[a]] if a in index else ["node", a.name]
    if isinstance(a, tuple | list):
        return [_arg(v, index) for v in a]
    if isinstance(a, dict):
        return {str(k): _arg(v, index) for k, v in sorted(a.items(), key=lambda kv: str(kv[0]))}
    if isinstance(a, slice):
        return ["slice", _arg(a.start, index), _arg(a.stop, index), _arg(a.step, index)]
    if isinstance(a, _SIMPLE):
        return a
    return _name_of(a) if callable(a) else type(a).__name__


def graph_fingerprint(graph: fx.Graph) -> str:
    """A hash of a traced ``forward``: every node's kind, target and arguments.

    >>> g = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU())).graph
    >>> graph_fingerprint(g) == graph_fingerprint(fx.symbolic_trace(nn.Sequential(
    ...     nn.Linear(2, 3), nn.ReLU())).graph)
    True
    """
    index: dict[fx.Node, int] = {}
    rows = []
    for i, n in enumerate(graph.nodes):
        index[n] = i
        target = n.target if isinstance(n.target, str) else _name_of(n.target)
        rows.append([n.op, target, _arg(n.args, index), _arg(n.kwargs, index)])
    text = json.dumps(rows, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_HINT = "apply a plan to a fresh dense instance of the model it was exported from"


def check_structure(recorded: dict[str, Any], model: nn.Module) -> None:
    """``ValueError`` naming the first module, parameter or buffer in which ``model`` differs
    from the recorded fingerprint."""
    here = model_fingerprint(model)
    for key, what in (("modules", "module"), ("tensors", "parameter or buffer")):
        theirs = recorded.get(key)
        if not isinstance(theirs, list):
            raise ValueError(f"malformed plan: 'model' {key!r} must be a list")
        mine = json.loads(json.dumps(here[key]))  # as the plan's, after JSON
        for a, b in zip(theirs, mine, strict=False):
            if a != b:
                raise ValueError(
                    f"the plan was exported from a model whose {what} {a!r} differs from this "
                    f"model's {b!r}: {_HINT}"
                )
        if len(theirs) != len(mine):
            extra = (theirs if len(theirs) > len(mine) else mine)[min(len(theirs), len(mine))]
            raise ValueError(
                f"the plan's model has {len(theirs)} {what} entries, this one {len(mine)} "
                f"(first unmatched: {extra!r}): {_HINT}"
            )


def check_graph(recorded: dict[str, Any], graph: fx.Graph) -> None:
    """``ValueError`` if ``graph`` (the model's trace) is not the recorded one."""
    want = recorded.get("graph")
    if want is not None and graph_fingerprint(graph) != want:
        raise ValueError(
            "the plan was exported from a model whose forward code differs from this model's "
            "(the same modules and tensors, another traced graph: an activation, a head count "
            f"or another constant in forward): {_HINT}"
        )


def plan_checksum(plan: dict[str, Any]) -> str:
    """A hash of everything in ``plan`` but its ``"checksum"``.

    >>> plan_checksum({"a": [1, 2]}) == plan_checksum({"a": [1, 2], "checksum": "x"})
    True
    """
    body = {k: v for k, v in plan.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
