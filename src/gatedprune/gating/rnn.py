"""``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` in user models: hidden-unit gates, cost and pruning.

``gate_`` puts one gate vector on every (layer, direction) hidden state of a recurrent module
and switches the module to a subclass (:class:`GatedLSTM`, ...; same parameters and
``state_dict`` keys) that runs :func:`~gatedprune.rnn_slicing.scaled_forward`: the gate of unit
``k`` scales what *reads* the unit, column ``k`` of ``W_hh`` (its own recurrence), the next
layer's ``W_ih`` columns, and the module's output ``out[..., k]`` as the model's code sees it.
A closed unit therefore has no effect at all, through time included, and removing it is exact.

A gate on an output cannot be folded into the recurrent layer itself (``h = o * tanh(c)``), so
the output gates are folded into the *consumers*: the input columns of the Linear/Conv or
recurrent module reading the output. That needs every op between the two to commute with a
per-feature scale ``g >= 0`` (ReLU, dropout, indexing a time step, mean/sum/max over time,
reshapes, transposes, concatenation); the channel analysis checks it and otherwise leaves the
module ungated, with the reason in the summary. The final hidden state may be read as ``h_n[i]``
(one layer and direction; gated and folded the same way). Also left ungated (with a reason):
``proj_size > 0``, ``c_n`` or the whole ``h_n`` read by the model, an output or final state fed
as another recurrent module's initial state, an output joined to other channels by an add, a
module called more than once, unbatched input. An initial state ``hx`` passed in
(``torch.zeros(num_layers, B, hidden_size)`` as tutorials write it, or any other tensor not
computed from gated channels) is fine: a closed unit's initial state is read only by its own
(unread) recurrence, so the pruned module, a :class:`~gatedprune.rnn_slicing.StateSlicingLSTM`
(GRU, RNN), takes the state at the width the model's code builds and keeps the kept units'
entries.

PyTorch gives every layer and both directions of one module the same ``hidden_size``, so
pruning keeps the user's class with a *common kept width* ``k``: the largest number of open
units over its (layer, direction) states; the others are padded with their lowest-index closed
units, whose gate value 0 is folded into every weight that reads them (they compute but are
never read). The cost model knows this: at hard gates every state counts ``k`` units (exactly
``cost(prune(model))``); the differentiable expected cost uses ``k = max`` over the states of
their expected open counts, so a budget only pays for shrinking the widest state.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..base import TRANSPOSED_CONVS, computed_weight
from ..costs import FLOPS_PER_MAC, GRU_ELEMENTWISE, LSTM_ELEMENTWISE, RNN_ELEMENTWISE, seq_dims
from ..rnn_slicing import (
    State,
    fold_rnn_,
    gates_per_unit,
    scaled_forward,
    slice_rnn_,
    slice_state_,
)
from .transformer import _Ref

if TYPE_CHECKING:
    from .channels import ChannelAnalysis

__all__ = [
    "RNN_TYPES",
    "GatedGRU",
    "GatedLSTM",
    "GatedRNN",
    "RNNConsumer",
    "RNNInfo",
    "apply_rnn_plan",
    "consumer_ok",
    "item_index",
    "pad_to_width",
    "rnn_cost_rows",
    "setup_rnns",
    "state_item",
    "width_values",
]

RNN_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)


def consumer_ok(m: nn.Module, in_shape: tuple[int, ...] | None) -> bool:
    """True if the input features of recurrent module ``m`` can be sliced (and gated).

    >>> consumer_ok(nn.GRU(3, 4), (5, 2, 3)), consumer_ok(nn.GRU(3, 4), (5, 3))
    (True, False)
    """
    return (
        type(m) in RNN_TYPES
        and int(getattr(m, "proj_size", 0)) == 0
        and not computed_weight(m)
        and in_shape is not None
        and len(in_shape) == 3
    )


def gateable_rnn(m: nn.Module) -> str | None:
    """None if ``gate_`` can gate the hidden units of ``m``, else why not.

    >>> gateable_rnn(nn.LSTM(3, 4, proj_size=2))
    'proj_size=2 is not supported (the projection would need pruning too)'
    """
    if type(m) not in RNN_TYPES:
        return "not a plain nn.LSTM, nn.GRU or nn.RNN"
    proj = int(getattr(m, "proj_size", 0))
    if proj > 0:
        return f"proj_size={proj} is not supported (the projection would need pruning too)"
    if computed_weight(m):
        return (
            "it computes its weights when it runs (a forward pre-hook such as the old "
            "nn.utils.weight_norm): slicing the stored weights would not slice them"
        )
    return None


@dataclass
class RNNInfo:
    """A gated recurrent module: its gate vectors, one per (layer, direction), layer major."""

    name: str
    groups: list[int]
    layers: int
    directions: int
    hidden: int
    state: bool = False  # called with an initial state hx (sliced in the pruned module)


@dataclass
class RNNConsumer:
    """A module reading gated recurrent outputs (or a gated recurrent module's input).

    ``segments``: (gated group, input positions, gate indices) of the inputs whose gate must be
    folded into this module's input columns (recurrent outputs only); ``in_group``/``in_gidx``:
    for a recurrent consumer, the gated group and index of each input feature (-1: ungated).
    """

    name: str
    kind: str  # linear | conv | rnn
    segments: list[tuple[int, Tensor, Tensor]]
    in_group: np.ndarray | None = None
    in_gidx: np.ndarray | None = None


class _RNNRef(_Ref):
    def scales(self) -> list[Tensor]:
        return list(self.gating.rnn_scales(self.index))


def _gated_forward(m: Any, x: Any, hx: State | None) -> tuple[Any, State]:
    scales: list[Tensor] = m._gp_ref.scales()  # per layer (D * H,)
    out, state = scaled_forward(m, x, hx, hidden_scale=scales)
    if isinstance(out, Tensor):
        out = out * scales[-1].to(out.dtype)  # (..., D * H): consumers read gated units
    elif isinstance(out, PackedSequence):  # its data holds every step of every sequence
        out = out._replace(data=out.data * scales[-1].to(out.data.dtype))  # (sum T, D * H)
    h = state[0] if isinstance(state, tuple) else state  # (L * D, B, H)
    g = torch.stack(scales).view(h.shape[0], 1, h.shape[-1]).to(h.dtype)  # (L * D, 1, H)
    if isinstance(state, tuple):
        return out, (h * g, state[1])  # c_n stays raw (the model may not read it)
    return out, h * g


class GatedLSTM(nn.LSTM):
    """``nn.LSTM`` with hidden-unit gates (set by ``gate_``; same parameters)."""

    _gp_ref: _RNNRef

    def forward(self, input: Any, hx: Any = None) -> Any:
        return _gated_forward(self, input, hx)


class GatedGRU(nn.GRU):
    """``nn.GRU`` with hidden-unit gates (set by ``gate_``; same parameters)."""

    _gp_ref: _RNNRef

    def forward(self, input: Any, hx: Any = None) -> Any:
        return _gated_forward(self, input, hx)


class GatedRNN(nn.RNN):
    """``nn.RNN`` with hidden-unit gates (set by ``gate_``; same parameters)."""

    _gp_ref: _RNNRef

    def forward(self, input: Any, hx: Any = None) -> Any:
        return _gated_forward(self, input, hx)


GATED: dict[type[nn.Module], type[nn.Module]] = {
    nn.LSTM: GatedLSTM,
    nn.GRU: GatedGRU,
    nn.RNN: GatedRNN,
}


def switch(m: nn.Module, gating: Any, index: int) -> None:
    """Switch recurrent module ``m`` to its gated subclass reading gates ``index`` of ``gating``."""
    base = type(m)
    m.__class__ = GATED[base]
    m.__dict__["_gp_ref"] = _RNNRef(gating, index, base, "rnn")


def width_values(values: list[Tensor], rnns: list[RNNInfo]) -> list[Tensor]:
    """Expected open counts of every recurrent module's states made equal to their maximum
    (the common kept width; see the module docstring): each state's vector is rescaled.

    >>> r = RNNInfo("lstm", [0, 1], 2, 1, 2)
    >>> probs = [torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0])]
    >>> [v.tolist() for v in width_values(probs, [r])]
    [[1.0, 1.0], [2.0, 0.0]]
    """
    out = list(values)
    for r in rnns:
        sums = torch.stack([values[g].to(torch.float64).sum() for g in r.groups])  # (L D,)
        width = sums.max()
        for g, s in zip(r.groups, sums, strict=True):
            out[g] = values[g].to(torch.float64) * (width / s.clamp_min(1e-12))
    return out


def pad_to_width(opens: list[Tensor], rnns: list[RNNInfo]) -> list[Tensor]:
    """Kept masks (float 0/1) with every state of a module padded to the common width by its
    lowest-index closed units.

    >>> r = RNNInfo("gru", [0, 1], 1, 2, 3)
    >>> opens = [torch.tensor([1.0, 0, 1]), torch.tensor([0, 0, 1.0])]
    >>> [o.tolist() for o in pad_to_width(opens, [r])]
    [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    """
    out = list(opens)
    for r in rnns:
        width = max(int(opens[g].sum()) for g in r.groups)
        for g in r.groups:
            o = opens[g].clone()
            closed = torch.nonzero(o == 0).flatten()  # (n_closed,) indices
            o[closed[: width - int(o.sum())]] = 1.0
            out[g] = o
    return out


def rnn_cost_rows(
    m: nn.Module,
    in_shape: tuple[int, ...],
    fi: int,
    mi: float,
    fw: int,
    mw: float,
) -> tuple[list[tuple[float, int, int]], list[tuple[float, int, int]]]:
    """(FLOPs rows, params rows) ``(coef, factor a, factor b)`` of a recurrent module whose
    layer-0 input has ``mi * kept(fi)`` features and whose width is ``mw * kept(fw)`` units
    (factor -1: the constant 1), mirroring ``costs._recurrent`` term by term.

    >>> from gatedprune.costs import cost
    >>> m, shape = nn.LSTM(3, 4, num_layers=2), (5, 2, 3)
    >>> flops, params = rnn_cost_rows(m, shape, -1, 3.0, -1, 4.0)
    >>> c = cost(m, torch.zeros(shape))
    >>> (sum(f for f, _, _ in flops), sum(p for p, _, _ in params)) == (c.flops, c.params)
    True
    """
    assert isinstance(m, nn.LSTM | nn.GRU | nn.RNN)
    batch, length = seq_dims(torch.empty(in_shape, device="meta"), m.batch_first)
    steps = batch * length
    g = gates_per_unit(m)
    elem = (
        LSTM_ELEMENTWISE
        if isinstance(m, nn.LSTM)
        else GRU_ELEMENTWISE
        if isinstance(m, nn.GRU)
        else RNN_ELEMENTWISE
    )
    d = 2 if m.bidirectional else 1
    b = 1 if m.bias else 0
    mac = FLOPS_PER_MAC * g
    flops: list[tuple[float, int, int]] = []
    params: list[tuple[float, int, int]] = []
    for layer in range(m.num_layers):
        if layer == 0:  # W_ih (G k, n), W_hh (G k, k) per direction
            flops.append((float(steps * d * mac) * mw * mi, fw, fi))
            flops.append((float(steps * d * mac) * mw * mw, fw, fw))
            params.append((float(d * g) * mw * mi, fw, fi))
            params.append((float(d * g) * mw * mw, fw, fw))
        else:  # W_ih (G k, D k), W_hh (G k, k)
            flops.append((float(steps * d * mac * (d + 1)) * mw * mw, fw, fw))
            params.append((float(d * g * (d + 1)) * mw * mw, fw, fw))
        flops.append((float(steps * d * (elem + 2 * g * b)) * mw, fw, -1))
        if b:
            params.append((float(d * 2 * g) * mw, fw, -1))
    return flops, params


@torch.no_grad()
def fold_rnns(
    model: nn.Module,
    rnns: list[RNNInfo],
    consumers: list[RNNConsumer],
    groups: list[Tensor],
) -> None:
    """Fold eval gate values into the recurrent modules and the consumers of their outputs
    (``InsertedGating.prune_model`` calls it on the deep copy it prunes).

    >>> net = nn.Sequential(nn.GRU(2, 3))
    >>> fold_rnns(net, [RNNInfo("0", [0], 1, 1, 3)], [], [torch.tensor([1.0, 0.0, 1.0])])
    >>> net[0].weight_hh_l0[:, 1].abs().sum().item()
    0.0
    """
    for r in rnns:
        m = model.get_submodule(r.name)
        scales = []
        for layer in range(r.layers):
            parts = [groups[g] for g in r.groups[layer * r.directions : (layer + 1) * r.directions]]
            scales.append(torch.cat(parts))  # (D * H,)
        fold_rnn_(m, scales)
    for c in consumers:
        if not c.segments:
            continue
        m = model.get_submodule(c.name)
        in_dim = 1  # the weight dimension of the consumer's inputs
        if c.kind == "rnn":
            assert isinstance(m, nn.LSTM | nn.GRU | nn.RNN)
            n_in = m.input_size
        elif isinstance(m, nn.Linear):
            n_in = m.in_features
        elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and m.groups == 1:
            n_in = m.in_channels
        elif isinstance(m, TRANSPOSED_CONVS) and m.groups == 1:  # weight (C_in, C_out, *k)
            n_in, in_dim = m.in_channels, 0
        else:
            raise TypeError(
                f"cannot fold the gates of a recurrent output into {c.name} "
                f"({type(m).__name__}); expected a Linear, a convolution with groups=1 or a "
                "recurrent module"
            )
        vec = torch.ones(n_in, dtype=torch.float64)  # (in,)
        for g, pos, gidx in c.segments:
            vec[pos] = groups[g][gidx].to(torch.float64)
        if c.kind == "rnn":
            assert isinstance(m, nn.LSTM | nn.GRU | nn.RNN)
            w_ih = m.weight_ih_l0
            assert isinstance(w_ih, Tensor)
            fold_rnn_(m, [None] * m.num_layers, input_scale=vec.to(w_ih.dtype))
        else:
            w = m.weight
            assert isinstance(w, Tensor)
            shape = [1] * w.dim()
            shape[in_dim] = -1
            # (out, in, *k) *= (1, in, 1, ...), or (in, out, *k) *= (in, 1, ...) if transposed
            w.mul_(vec.to(w.dtype).view(shape))


def rnn_plan(
    opens: list[np.ndarray],
    rnns: list[RNNInfo],
    consumers: list[RNNConsumer],
) -> dict[str, dict[str, Any]]:
    """Plan entries ``{name: {"units": [...] or None, "in": [...] or None}}`` (opens padded).

    >>> rnn_plan([np.array([True, False, True])], [RNNInfo("lstm", [0], 1, 1, 3)], [])
    {'lstm': {'units': [[0, 2]], 'in': None}}
    """
    plan: dict[str, dict[str, Any]] = {}
    for r in rnns:
        if all(opens[g].all() for g in r.groups):
            continue
        plan[r.name] = {"units": [np.flatnonzero(opens[g]).tolist() for g in r.groups], "in": None}
        if r.state:  # the pruned module takes the initial state at its full width
            plan[r.name]["state"] = True
    for c in consumers:
        if c.kind != "rnn" or c.in_group is None or c.in_gidx is None:
            continue
        mask = np.ones(len(c.in_group), dtype=bool)
        for g, o in enumerate(opens):
            sel = c.in_group == g
            mask[sel] = o[c.in_gidx[sel]]
        if mask.all():
            continue
        entry = plan.setdefault(c.name, {"units": None, "in": None})
        entry["in"] = np.flatnonzero(mask).tolist()
    return plan


def apply_rnn_plan(model: nn.Module, plan: dict[str, Any]) -> None:
    """Slice the recurrent modules named in ``plan`` (:func:`rnn_plan` entries) in place.

    >>> net = nn.Sequential(nn.LSTM(3, 4))
    >>> apply_rnn_plan(net, {"0": {"units": [[0, 2]], "in": [1]}})
    >>> net[0]
    LSTM(1, 2)
    """
    for name, spec in plan.items():
        m = model.get_submodule(name)
        if not isinstance(m, nn.LSTM | nn.GRU | nn.RNN):
            raise ValueError(f"the plan prunes '{name}' as a recurrent module; it is {type(m)}")
        full = m.hidden_size
        slice_rnn_(m, spec["units"], spec["in"])
        if spec.get("state") and spec["units"] is not None:
            slice_state_(m, spec["units"], full)


def _is_getitem(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2


def _used(n: fx.Node) -> bool:
    """Whether anything but unused ``getitem`` unpacking reads ``n``."""
    return any(not _is_getitem(u) or _used(u) for u in n.users)


def _int_item(n: fx.Node) -> bool:
    return _is_getitem(n) and isinstance(n.args[1], int)


def item_index(n: fx.Node, length: int) -> int | None:
    """The int index of ``getitem`` node ``n`` into a sequence of ``length``, a negative one
    made positive (``-1`` -> ``length - 1``); None if ``n`` is not an int ``getitem``. An
    out-of-range index is returned unchanged.

    >>> g = fx.Graph()
    >>> t = g.placeholder("t")
    >>> [item_index(g.call_function(operator.getitem, (t, i)), 2) for i in (0, -1, -2, 5)]
    [0, 1, 0, 5]
    """
    if not _int_item(n):
        return None
    i = int(n.args[1])  # type: ignore[arg-type]
    return i + length if -length <= i < 0 else i


def state_item(n: fx.Node, rows: int) -> int | None:
    """The row of ``h_n`` (``(L * D, B, H)``, ``rows`` = L * D) that node ``n`` reads whole:
    ``h_n[i]``, ``h_n[i, :, :]``, ``h_n[i, ...]``, or ``h_n.squeeze(0)`` of a one-row state;
    a negative index made positive. None for any other read.

    >>> g = fx.Graph()
    >>> h = g.placeholder("h")
    >>> full = slice(None)
    >>> reads = [(h, -1), (h, (-1, full, full)), (h, (0, ...)), (h, (0, 1)), (h, full)]
    >>> [state_item(g.call_function(operator.getitem, r), 2) for r in reads]
    [1, 1, 0, None, None]
    >>> [state_item(g.call_method("squeeze", (h, 0)), k) for k in (1, 2)]
    [0, None]
    """
    i: object = None
    if n.op == "call_method" and n.target == "squeeze" and rows == 1:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        i = 0 if dim == 0 and len(n.args) <= 2 else None
    elif _is_getitem(n):
        idx = n.args[1]
        if isinstance(idx, tuple) and idx and len(idx) <= 3:
            rest = idx[1:]
            full = all(r == slice(None) for r in rest) or rest == (Ellipsis,)
            idx = idx[0] if full else None
        i = idx
    if not isinstance(i, int) or isinstance(i, bool) or not -rows <= i < rows:
        return None
    return i + rows if i < 0 else i


def _hx_nodes(call: fx.Node) -> list[fx.Node]:
    """The graph nodes passed to recurrent module call ``call`` as its initial state (``hx``
    positionally or by keyword; an explicit ``None`` is no state)."""
    found: list[fx.Node] = []
    stack: list[Any] = [*call.args[1:], *call.kwargs.values()]
    while stack:
        a = stack.pop()
        if isinstance(a, fx.Node):
            found.append(a)
        elif isinstance(a, list | tuple):
            stack.extend(a)
    return found


def _output_use(node: fx.Node, lstm: bool, rows: int) -> str | None:
    """Why the model's use of a recurrent module's outputs is not supported (None: it is):
    ``out`` and ``h_n[i]`` (one layer and direction, see :func:`state_item`; ``rows`` rows)
    may be read, ``c_n`` may not."""
    for u in node.users:
        i = item_index(u, 2)  # (out, state)
        if i is None:
            return "its output tuple is used whole (supported: out, h_n[i])"
        if i == 0 or not _used(u):
            continue
        hs = [u]  # the nodes holding h_n
        if lstm:
            hs = []
            for v in u.users:
                j = item_index(v, 2)  # (h_n, c_n)
                if j is None:
                    return "its final state (h_n, c_n) is used whole (supported: h_n[i])"
                if j == 1 and _used(v):
                    return "its final cell state c_n is used by the model"
                if j == 0:
                    hs.append(v)
        for w in (w for h in hs for w in h.users):
            if state_item(w, rows) is None:
                return "its final state h_n is used other than as h_n[i] (one layer, direction)"
    return None


def setup_rnns(
    gm: fx.GraphModule,
    ca: ChannelAnalysis,
    allowed: Callable[[str], bool],
    enabled: bool,
    group_map: np.ndarray,
    sizes: list[int],
    clamp: list[bool],
) -> tuple[list[RNNInfo], list[RNNConsumer], list[tuple[str, str]]]:
    """Decide which recurrent modules get gates; extend ``sizes``/``clamp``/``group_map`` with
    their gate vectors. Returns the gated modules, the consumers of gated inputs and outputs,
    and (name, reason) of the modules left ungated. ``gate_`` calls it:

    >>> from gatedprune.gating import gate_
    >>> class Net(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.lstm, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)
    ...     def forward(self, x: Tensor) -> Tensor:
    ...         return self.head(self.lstm(x)[0][:, -1])
    >>> gate_(Net(), torch.zeros(2, 5, 3)).rnns
    [('lstm', 1, 1, 4)]
    """
    nodes: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            nodes.setdefault(str(n.target), []).append(n)
    # channel groups read as the initial state of a recurrent module: hx keeps its full width
    hx_readers: dict[int, str] = {}
    for name, calls in nodes.items():
        if isinstance(gm.get_submodule(name), nn.RNNBase):
            for c in calls:
                for a in _hx_nodes(c):
                    lab = ca.labels.get(a)
                    if lab is not None:
                        for gi in np.unique(ca.atom_group[lab.atoms]).tolist():
                            hx_readers.setdefault(int(gi), name)
    rnns: list[RNNInfo] = []
    ungated: list[tuple[str, str]] = []
    out_groups: set[int] = set()
    for name, calls in nodes.items():
        m = gm.get_submodule(name)
        if not isinstance(m, nn.RNNBase):
            continue
        outs = ca.rnn_outputs.get(name, [])
        why = gateable_rnn(m)
        if why is None and not outs:
            why = "its input is not a batched (B, T, F) / (T, B, F) tensor"
        if why is None and not enabled:
            why = "channels=False"
        if why is None and m.hidden_size < 2:
            why = "a single unit"
        if why is None and len(calls) != 1:
            why = "called more than once"
        if why is None:
            rows = m.num_layers * (2 if m.bidirectional else 1)
            why = _output_use(calls[0], isinstance(m, nn.LSTM), rows)
        if why is None:
            for atoms in outs:
                reader = hx_readers.get(int(ca.atom_group[atoms[0]]))
                if reader is not None:
                    why = f"its final state feeds the initial state hx of '{reader}'"
                    break
                grp = ca.groups[int(ca.atom_group[atoms[0]])]
                if grp.pinned is not None:
                    why = f"its output cannot be pruned: {grp.pinned}"
                elif len(grp.producers) > 1:
                    why = f"its output is joined to other channels ({', '.join(grp.producers)})"
                elif grp.unfoldable is not None:
                    why = f"its output gate cannot be folded into its consumers: {grp.unfoldable}"
                elif grp.size != m.hidden_size:
                    why = (
                        f"its output's {m.hidden_size} units are pruned in {grp.size} ties "
                        "(pieces of the output pruned together: split, chunked, viewed as "
                        "heads or read by a grouped layer): one gate per unit cannot follow them"
                    )
                if why is not None:
                    break
        if why is None and not allowed(name):
            why = "filter_fn rejected it"
        if why is not None:
            ungated.append((name, why))
            continue
        assert isinstance(m, nn.LSTM | nn.GRU | nn.RNN)
        groups: list[int] = []
        for atoms in outs:  # (layer, direction), layer major
            gi = int(ca.atom_group[atoms[0]])
            group_map[gi] = len(sizes)
            out_groups.add(gi)
            groups.append(len(sizes))
            sizes.append(m.hidden_size)
            clamp.append(True)
        d = 2 if m.bidirectional else 1
        state = bool(_hx_nodes(calls[0]))
        rnns.append(RNNInfo(name, groups, m.num_layers, d, m.hidden_size, state))
    consumers: list[RNNConsumer] = []
    inputs = [(k, ca.kinds[k], a) for k, a in ca.module_in_atoms.items() if k in ca.kinds]
    inputs += [(k, "rnn", a) for k, a in ca.rnn_in_atoms.items()]
    for name, kind, atoms in inputs:
        groups_of = ca.atom_group[atoms]
        segs = []
        folded = np.isin(groups_of, sorted(out_groups))
        gg = np.where(folded, group_map[groups_of], -1)
        for g in sorted(set(gg.tolist()) - {-1}):
            pos = np.flatnonzero(gg == g)
            segs.append(
                (
                    int(g),
                    torch.tensor(pos, dtype=torch.long),
                    torch.tensor(ca.atom_gidx[atoms][pos], dtype=torch.long),
                )
            )
        mapped = group_map[groups_of]
        if kind == "rnn" and (mapped >= 0).any():
            consumers.append(RNNConsumer(name, kind, segs, mapped, ca.atom_gidx[atoms]))
        elif segs:
            consumers.append(RNNConsumer(name, kind, segs))
    return rnns, consumers, ungated
