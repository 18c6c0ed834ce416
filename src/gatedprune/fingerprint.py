"""What identifies a model's architecture, read without running it.

A checkpoint is resumed into, and a pruning plan applied to, the model it was written for
only: :func:`model_fingerprint` records every module (qualified name, class and settings,
including the ones ``extra_repr`` hides, such as an encoder layer's activation) and every
parameter and persistent buffer (name, shape and, for checkpoints, dtype);
:func:`fingerprint_difference` names the first difference between two records.
:func:`graph_fingerprint` hashes a traced ``forward`` (each node's kind, target and constant
arguments: a head count written in ``view(B, T, self.n_head, -1)``, an activation called as
a function), and :func:`json_checksum` a JSON object's content (a plan edited after it was
exported is refused).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = ["fingerprint_difference", "graph_fingerprint", "json_checksum", "model_fingerprint"]

# Settings that change what a module computes but that its extra_repr() does not show.
_HIDDEN_SETTINGS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.RNNBase, ("mode", "nonlinearity")),  # nn.RNN(nonlinearity="relu") prints as tanh's
    (
        nn.MultiheadAttention,
        ("embed_dim", "num_heads", "batch_first", "dropout", "kdim", "vdim", "add_zero_attn"),
    ),
    (nn.TransformerEncoderLayer, ("norm_first", "activation")),
    (nn.TransformerDecoderLayer, ("norm_first", "activation")),
)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # an object's repr: differs between instances


def _name_of(obj: object) -> str:
    """A stable name for a function or class (no memory address)."""
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return f"{module}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _setting(value: object) -> str:
    """A module setting as text: a function by its qualified name (not its address)."""
    if callable(value) and not isinstance(value, nn.Module) and hasattr(value, "__qualname__"):
        return _name_of(value)
    return _ADDRESS.sub("", repr(value))


def _module_settings(m: nn.Module) -> list[str]:
    """What identifies a module's computation beyond its tensors: the ``extra_repr()`` of
    torch's and gatedprune's layers (without memory addresses; yours may print learned values,
    which a fresh instance does not have), the settings that hides
    (:data:`_HIDDEN_SETTINGS`; a pruned transformer layer's ``norm_first``), a gatedprune
    network's structure (``spec``: activation, wiring, stages, ...) and, for an fx
    ``GraphModule``, a hash of its code."""
    from .gating.transformer import PrunedTransformerDecoderLayer, PrunedTransformerEncoderLayer
    from .layout import NetSpec
    from .plain_recurrent import RecurrentSpec

    # torch's and gatedprune's layers print their configuration; yours may print learned values
    ours = type(m).__module__.split(".")[0] in ("torch", "gatedprune")
    text = _ADDRESS.sub("", m.extra_repr()) if ours else ""
    parts = [text] if text else []
    hidden: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
        *_HIDDEN_SETTINGS,
        (PrunedTransformerEncoderLayer, ("norm_first", "activation")),
        (PrunedTransformerDecoderLayer, ("norm_first", "activation")),
    )
    parts += [
        f"{a}={_setting(getattr(m, a, None))}"
        for cls, attrs in hidden
        if isinstance(m, cls)
        for a in attrs
    ]
    spec = getattr(m, "spec", None)
    if isinstance(spec, NetSpec | RecurrentSpec):
        parts += [f"spec.{k}={json.dumps(v)}" for k, v in sorted(spec.to_json().items())]
    if isinstance(m, fx.GraphModule):
        parts.append(f"code=sha256 {hashlib.sha256(m.code.encode()).hexdigest()[:16]}")
    return parts


def _class_name(m: nn.Module) -> str:
    cls = type(m)
    return cls.__name__ if isinstance(m, fx.GraphModule) else cls.__qualname__


def _tensor_entry(name: str, t: Tensor, dtypes: bool) -> list[Any]:
    shape: Any = (
        "uninitialized"  # a lazy module not yet run
        if isinstance(t, nn.UninitializedParameter | nn.UninitializedBuffer)
        else list(t.shape)
    )
    return [name, shape, str(t.dtype)] if dtypes else [name, shape]


def model_fingerprint(model: nn.Module, *, dtypes: bool = True) -> dict[str, Any]:
    """The model's architecture as JSON: every module's qualified name, class name and
    settings (the root is the entry named ``""``), every parameter's and persistent buffer's
    name, shape and (with ``dtypes``) dtype. Values (weights, gate states) are left out:
    training changes them; without ``dtypes`` a model converted to another dtype matches.

    >>> fp = model_fingerprint(nn.Sequential(nn.Linear(2, 3), nn.Tanh()))
    >>> fp["modules"][1:]
    [['0', 'Linear', ['in_features=2, out_features=3, bias=True']], ['1', 'Tanh', []]]
    >>> fp["parameters"][0], model_fingerprint(nn.Linear(2, 3), dtypes=False)["parameters"][0]
    (['0.weight', [3, 2], 'torch.float32'], ['weight', [3, 2]])
    """
    persistent = set(model.state_dict())
    return {
        "modules": [
            [name, _class_name(m), _module_settings(m)]
            for name, m in model.named_modules(remove_duplicate=False)
        ],
        "parameters": [
            _tensor_entry(name, p, dtypes)
            for name, p in model.named_parameters(remove_duplicate=False)
        ],
        "buffers": [
            _tensor_entry(name, b, dtypes)
            for name, b in model.named_buffers(remove_duplicate=False)
            if name in persistent
        ],
    }


def _describe_entry(kind: str, entry: object, named: bool = True) -> str:
    """A fingerprint entry for a message: ``'name': Class(settings)`` for a module, ``'name':
    shape [..], dtype`` for a tensor (without the name when ``named`` is False)."""
    if not isinstance(entry, list) or len(entry) not in (2, 3):
        return repr(entry)
    name, second, *rest = entry
    if kind == "module" and rest and isinstance(rest[0], list):
        what = f"{second}({', '.join(map(str, rest[0]))})"
    else:
        what = ", ".join([f"shape {second}", *map(str, rest)])
    return f"{name!r}: {what}" if named else what


def fingerprint_difference(
    saved: object, now: dict[str, Any], source: str = "checkpoint"
) -> str | None:
    """The first difference between a recorded fingerprint (:func:`model_fingerprint`) and
    the current model's, or None when they agree; ``source`` names the record in the message.
    Two modules of the same name and class are told apart by their first differing setting.

    >>> a = model_fingerprint(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    >>> fingerprint_difference(a, model_fingerprint(nn.Sequential(nn.Linear(2, 3), nn.Tanh())))
    "module '1': checkpoint ReLU() vs now Tanh()"
    """
    if not isinstance(saved, dict):
        return f"the {source}'s model record is a {type(saved).__name__}, not a JSON object"
    for key, kind in (("modules", "module"), ("parameters", "parameter"), ("buffers", "buffer")):
        theirs, ours = saved.get(key), now[key]
        if not isinstance(theirs, list):
            return f"the {source}'s model record has no list of {key}"
        for i in range(max(len(theirs), len(ours))):
            a = theirs[i] if i < len(theirs) else None
            b = ours[i] if i < len(ours) else None
            if a == b:
                continue
            if b is None:
                return f"the {source}'s model has {kind} {_describe_entry(kind, a)}; this one not"
            if a is None:
                return f"this model has {kind} {_describe_entry(kind, b)}; the {source}'s not"
            same_name = isinstance(a, list) and a[:1] == b[:1]
            where = f"{kind} {b[0]!r}" if same_name else f"{kind} #{i}"
            if kind == "module" and b[0] == "" and same_name:
                where = "the model itself"
            if kind == "module" and same_name and a[1:2] == b[1:2] and isinstance(a[2], list):
                for x, y in zip([*a[2], None], [*b[2], None], strict=False):
                    if x != y:
                        return f"{where} ({b[1]}): {source} {x!r} vs now {y!r}"
            return (
                f"{where}: {source} {_describe_entry(kind, a, not same_name)} vs now "
                f"{_describe_entry(kind, b, not same_name)}"
            )
    return None


_SIMPLE = (int, float, bool, str, type(None))


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
    if isinstance(a, torch.dtype | torch.device | torch.memory_format | torch.layout):
        return str(a)  # .to(torch.float64) and .to(torch.bfloat16) differ
    return _name_of(a) if callable(a) else type(a).__name__


def graph_fingerprint(graph: fx.Graph) -> str:
    """A hash of a traced ``forward``: every node's kind, target and arguments.

    >>> def trace(): return fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU())).graph
    >>> graph_fingerprint(trace()) == graph_fingerprint(trace())
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


def json_checksum(obj: dict[str, Any], without: str = "checksum") -> str:
    """A hash of everything in the JSON object ``obj`` but its key ``without``.

    >>> json_checksum({"a": [1, 2]}) == json_checksum({"a": [1, 2], "checksum": "x"})
    True
    """
    body = {k: v for k, v in obj.items() if k != without}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
