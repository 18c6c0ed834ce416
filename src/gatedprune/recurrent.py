"""Gated shortcut recurrent networks (LSTM, GRU, RNN) whose hidden units, layers and
connections prune themselves.

Layer ``l`` reads the gated concatenation of the raw input and every lower layer's output
sequence; the read-out (a per-time-step linear layer) reads every node the same way::

    x_l(t) = [ g_{l,j} * s_j * h_j(t) ]_{j < l}            (edge gates g, node scales s_j)
    h_l    = LSTM_l(x_l) with W_hh columns scaled by u_l     (unit gates u_l)
    s_j    = v_j * u_j                                      (layer gate v_j, per feature)
    y(t)   = V [ g_{out,j} * s_j * h_j(t) ]_j + c

Exactness of pruning: a unit gate ``u_{l,k}`` multiplies unit ``k``'s hidden state wherever it
is read: in the layer's own recurrence (column ``k`` of ``W_hh``) and in every consumer. A
closed unit still runs but influences nothing, so removing it (its rows in all gate blocks of
``W_ih``, ``W_hh``, ``b_ih``, ``b_hh``, its column of ``W_hh`` and its columns in the
consumers) gives exactly the same outputs. Gate values are folded into weight columns and the
layers run on PyTorch's fused kernels (``torch.lstm`` / ``torch.gru``), so the gated forward
costs little more than a plain stacked LSTM.

Liveness: a layer is *alive* when its layer gate and some unit are open and a live consumer
(a layer or the read-out) reads it through an open edge. A layer whose every input edge is
closed is **not** a constant (its state evolves over time from the biases): it stays, running
on an empty input (``input_size == 0``, see :func:`gatedprune.rnn_slicing.make_rnn`).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .base import GatedModule, gate_probs
from .costs import (
    FLOPS_PER_MAC,
    GRU_ELEMENTWISE,
    LSTM_ELEMENTWISE,
    RNN_ELEMENTWISE,
)
from .gates import Gate, GateKind, resolve_gate
from .layout import check_flag
from .plain_recurrent import (
    CELLS,
    Cell,
    PlainShortcutLSTM,
    RecurrentLayerSpec,
    RecurrentSpec,
    check_cell,
    check_dtypes,
    check_sequence,
    check_state,
)
from .rnn_slicing import State, output_features, scaled_forward, slice_rnn

__all__ = ["ShortcutLSTM"]

_ELEMENTWISE = {"lstm": LSTM_ELEMENTWISE, "gru": GRU_ELEMENTWISE, "rnn": RNN_ELEMENTWISE}


def _check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int >= ``low`` (numpy integers accepted, as gates accept them):
    TypeError for a non-integer (bools too), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class ShortcutLSTM(GatedModule):
    """A stacked recurrent network with gated shortcuts over depth, unit gates, layer gates and
    a gated read-out from every layer; ``gatedprune.prune`` turns it into a
    :class:`~gatedprune.plain_recurrent.PlainShortcutLSTM` of plain ``nn.LSTM``/``nn.GRU``
    layers.

    Maps ``(B, T, input_size)`` to ``(B, T, output_size)`` (``(T, B, .)`` when
    ``batch_first=False``); a ``PackedSequence`` input gives a ``PackedSequence`` output.
    ``hidden_size`` is one int for all layers or one per layer. ``cell`` is ``"lstm"``,
    ``"gru"`` or ``"rnn"`` (tanh). ``shortcuts=False`` gives a plain chain (each layer reads
    the previous one, the read-out reads the last; no edge gates). ``layer_gates`` adds one
    gate per layer on its output. ``forward(x, hx=None)``: ``hx`` is None or a list with one
    initial state per layer (``h0`` or ``(h0, c0)``, each ``(D, B, hidden_l)``, or None).

    Costs (:meth:`expected_cost`) take the input shape ``(B, T, input_size)``; packed inputs
    run but are not costed (use a padded example input for budgets).

    >>> net = ShortcutLSTM(1, 16, 2, 10)
    >>> net(torch.randn(4, 40, 1)).shape
    torch.Size([4, 40, 10])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int | Sequence[int],
        num_layers: int,
        output_size: int,
        *,
        cell: Cell = "lstm",
        batch_first: bool = True,
        bidirectional: bool = False,
        gate: GateKind = "hard_concrete",
        shortcuts: bool = True,
        layer_gates: bool = True,
    ) -> None:
        super().__init__()
        input_size = _check_int("input_size", input_size, 1)
        output_size = _check_int("output_size", output_size, 1)
        num_layers = _check_int("num_layers", num_layers, 1)
        sizes: tuple[object, ...]
        if isinstance(hidden_size, numbers.Integral) and not isinstance(hidden_size, bool):
            sizes = (hidden_size,) * num_layers
        elif isinstance(hidden_size, Sequence) and not isinstance(hidden_size, str):
            sizes = tuple(hidden_size)
        else:
            raise TypeError(f"hidden_size must be an int or a list of ints, got {hidden_size!r}")
        if len(sizes) != num_layers:
            raise ValueError(f"hidden_size lists {len(sizes)} sizes but num_layers is {num_layers}")
        hidden = tuple(_check_int("hidden_size", h, 1) for h in sizes)
        check_cell(cell)
        for name, flag in (
            ("batch_first", batch_first),
            ("bidirectional", bidirectional),
            ("shortcuts", shortcuts),
            ("layer_gates", layer_gates),
        ):
            check_flag(name, flag)
        kind = resolve_gate(gate)
        self.spec = RecurrentSpec(
            cell=cell,
            input_size=input_size,
            layers=tuple(
                RecurrentLayerSpec(
                    sources=tuple(range(i + 1)) if shortcuts else (i,), hidden=h, origin=i
                )
                for i, h in enumerate(hidden)
            ),
            head_sources=tuple(range(num_layers + 1)) if shortcuts else (num_layers,),
            output_size=output_size,
            origin_hidden=hidden,
            bidirectional=bidirectional,
            batch_first=batch_first,
        )
        self.spec.validate()
        self.shortcuts = shortcuts
        cls = CELLS[cell][0]
        spec = self.spec
        self.cells = nn.ModuleList(
            [
                cls(
                    sum(spec.node_width(j) for j in layer.sources),
                    layer.hidden,
                    batch_first=batch_first,
                    bidirectional=bidirectional,
                )
                for layer in spec.layers
            ]
        )
        self.unit_gates = nn.ModuleList([kind.make(h) for h in hidden])
        self.edge_gates = (
            nn.ModuleList([kind.make(len(layer.sources)) for layer in spec.layers])
            if shortcuts
            else None
        )
        self.layer_gate: Gate | None = kind.make(num_layers) if layer_gates else None
        self.head = nn.Linear(sum(spec.node_width(j) for j in spec.head_sources), output_size)
        self.head_gate: Gate | None = kind.make(len(spec.head_sources)) if shortcuts else None

    # ------------------------------------------------------------------ forward
    def width_gates(self) -> list[Gate]:
        """The layers' hidden-unit gates."""
        return [cast(Gate, g) for g in self.unit_gates]

    def _gate_values(
        self, values: bool
    ) -> tuple[list[Tensor | None], list[Tensor], Tensor | None, Tensor | None]:
        """Gate values (forward samples, or eval values with ``values``): per layer edges and
        units, layer gates, head edges."""

        def get(g: nn.Module | None) -> Tensor | None:
            if g is None:
                return None
            gate = cast(Gate, g)
            return gate.eval_value() if values else gate()

        edges = [
            get(self.edge_gates[i] if self.edge_gates is not None else None)
            for i in range(len(self.cells))
        ]
        units = [cast(Tensor, get(g)) for g in self.unit_gates]
        return edges, units, get(self.layer_gate), get(self.head_gate)

    def _node_scales(self, units: list[Tensor], layer: Tensor | None) -> list[Tensor | None]:
        """Per node, the scale ``(width,)`` of its output features (None for the input)."""
        d = self.spec.directions
        scales: list[Tensor | None] = [None]
        for i, u in enumerate(units):
            s = u if layer is None else u * layer[i]
            scales.append(s.repeat(d) if d > 1 else s)  # (D * H,)
        return scales

    def _colscale(
        self, sources: Sequence[int], edge: Tensor | None, node_scale: list[Tensor | None]
    ) -> Tensor | None:
        """Column scale of a consumer reading ``sources`` (None: all ones)."""
        if edge is None and all(node_scale[j] is None for j in sources):
            return None
        parts = []
        for k, j in enumerate(sources):
            s = node_scale[j]
            if s is None:
                ref = self.head.weight
                s = ref.new_ones(self.spec.node_width(j))  # (node_width(j),)
            parts.append(s if edge is None else s * edge[k])
        return torch.cat(parts)  # (sum widths,)

    def forward(
        self, x: Tensor | PackedSequence, hx: Sequence[State | None] | None = None
    ) -> Tensor | PackedSequence:
        """Outputs ``(B, T, output_size)`` for ``x`` of shape ``(B, T, input_size)`` (both
        ``(T, B, .)`` when ``batch_first=False``; a ``PackedSequence`` gives one). ``hx``: None
        or one initial state per layer (``h0`` or ``(h0, c0)``, each ``(D, B, hidden_l)``).

        >>> ShortcutLSTM(2, 4, 1, 3, batch_first=False)(torch.randn(7, 5, 2)).shape
        torch.Size([7, 5, 3])
        """
        spec = self.spec
        data, batch = check_sequence(x, spec.input_size, spec.batch_first)
        states = check_state(
            hx, spec.cell, [ls.hidden for ls in spec.layers], spec.directions, batch
        )
        check_dtypes(data, states, self.head.weight.dtype)  # skipped under autocast
        edges, units, layer, head_edge = self._gate_values(False)
        node_scale = self._node_scales(units, layer)
        nodes: list[Tensor] = [data]
        for i, (ls, rnn) in enumerate(zip(spec.layers, self.cells, strict=True)):
            parts = [nodes[j] for j in ls.sources]
            inp = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (.., n_in)
            seq: Tensor | PackedSequence = (
                PackedSequence(inp, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
                if isinstance(x, PackedSequence)
                else inp
            )
            out, _ = scaled_forward(
                rnn,
                seq,
                states[i],
                input_scale=self._colscale(ls.sources, edges[i], node_scale),
                hidden_scale=units[i],
            )
            nodes.append(out.data if isinstance(out, PackedSequence) else out)  # (.., D * H)
        feats = [nodes[j] for j in spec.head_sources]
        feat = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)  # (.., n_head)
        w = self.head.weight
        scale = self._colscale(spec.head_sources, head_edge, node_scale)
        if scale is not None:
            w = w * scale[None, :]
        y = F.linear(feat, w, self.head.bias)  # (.., output_size)
        if isinstance(x, PackedSequence):
            return PackedSequence(y, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
        return y

    # ------------------------------------------------------------------ structure
    def _probs(self, hard: bool, like: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """Open probabilities (float64): per layer edges and units, layer gates, head edges."""
        spec = self.spec
        n = len(spec.layers)
        edges = [
            gate_probs(
                cast(Gate, self.edge_gates[i]) if self.edge_gates is not None else None,
                len(ls.sources),
                hard=hard,
                like=like,
            )
            for i, ls in enumerate(spec.layers)
        ]
        units = [
            gate_probs(cast(Gate, g), ls.hidden, hard=hard, like=like)
            for g, ls in zip(self.unit_gates, spec.layers, strict=True)
        ]
        layer = gate_probs(self.layer_gate, n, hard=hard, like=like)
        head = gate_probs(self.head_gate, len(spec.head_sources), hard=hard, like=like)
        return edges, units, layer, head

    def _liveness(
        self, edges: list[Tensor], units: list[Tensor], layer: Tensor, head: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Per node: expected output width W (features), P(emits: layer gate and some unit
        open) o, P(alive: emits and is read by a live consumer) A and P(read by a live
        consumer) R (A = o R). Exact 0/1 at hard gates; products assume independent gates
        otherwise."""
        spec = self.spec
        one = layer.new_ones(())
        d = spec.directions
        W: list[Tensor] = [one * spec.input_size]
        o: list[Tensor] = [one]
        for i in range(len(spec.layers)):
            W.append(d * layer[i] * units[i].sum())
            o.append(layer[i] * (1 - torch.prod(1 - units[i])))
        n_nodes = len(spec.layers) + 1
        unread: list[Tensor] = [one for _ in range(n_nodes)]
        for h, j in enumerate(spec.head_sources):
            unread[j] = unread[j] * (1 - head[h])
        A: list[Tensor] = [one for _ in range(n_nodes)]
        R: list[Tensor] = [one for _ in range(n_nodes)]
        for node in range(n_nodes - 1, 0, -1):
            R[node] = 1 - unread[node]
            A[node] = o[node] * R[node]
            for e, j in enumerate(spec.layers[node - 1].sources):
                unread[j] = unread[j] * (1 - edges[node - 1][e] * A[node])
        return W, o, A, R

    def expected_cost(
        self, input_shape: Sequence[int], *, hard: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(flops, params)`` as 0-dim float64 tensors for a padded input of ``input_shape``
        ``(B, T, input_size)`` (``(T, B, .)`` when ``batch_first=False``): expected under the
        gates' open probabilities (differentiable), or with ``hard`` the exact cost of
        ``prune(net)``.

        >>> net = ShortcutLSTM(2, 4, 1, 3)
        >>> [float(c) for c in net.expected_cost((1, 7, 2), hard=True)]  # every gate open
        [2205.0, 149.0]
        """
        spec = self.spec
        try:  # a float would be truncated (5.5 costed as 5), a string parsed
            shape = tuple(operator.index(n) for n in input_shape)
        except TypeError:
            raise TypeError(
                f"input_shape must be a sequence of ints, got {input_shape!r}"
            ) from None
        if len(shape) != 3:
            raise ValueError(
                f"expected_cost needs a batched input shape (B, T, F) / (T, B, F), got {shape}"
            )
        if shape[2] != spec.input_size:
            raise ValueError(
                f"expected_cost needs {spec.input_size} input features (input_size) in the last "
                f"dimension of the input shape, got {shape}"
            )
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"expected_cost needs a non-empty input shape, got {shape}")
        steps = shape[0] * shape[1]
        like = torch.zeros((), dtype=torch.float64)
        edges, units, layer, head = self._probs(hard, like)
        W, _, _, R = self._liveness(edges, units, layer, head)
        g = CELLS[spec.cell][1]
        elem = _ELEMENTWISE[spec.cell]
        d = spec.directions
        flops = like.clone()
        params = like.clone()
        for i, ls in enumerate(spec.layers):
            node = i + 1
            p = units[i]
            s = p.sum()
            # P(layer gate open and read by a live consumer): A without P(some unit open),
            # which the open count already carries (E[S 1{some open}] = E[S])
            kept_if_open = layer[i] * R[node]
            h = kept_if_open * s  # kept units
            h2 = kept_if_open * (s * s + (p * (1 - p)).sum())  # E[kept^2] (independent gates)
            # (n_sources,) -> (): expected input width
            n_in = (edges[i] * torch.stack([W[j] for j in ls.sources])).sum()
            weights = g * (h * n_in + h2)
            params = params + d * (weights + 2 * g * h)
            flops = flops + steps * d * (FLOPS_PER_MAC * weights + 2 * g * h + elem * h)
        # (n_head_sources,) -> (): expected head input width
        head_in = (head * torch.stack([W[j] for j in spec.head_sources])).sum()
        out = spec.output_size
        flops = flops + steps * (FLOPS_PER_MAC * head_in * out + out)
        params = params + head_in * out + out
        return flops, params

    @torch.no_grad()
    def connectivity(self) -> dict[str, Any]:
        """What survives pruning: per layer its kept units, kept incoming edges and whether it
        is alive, plus totals (the format of ``ShortcutMLP.connectivity``, for the plots).

        >>> ShortcutLSTM(2, 4, 3, 1).connectivity()["layers_total"]
        3
        """
        spec = self.spec
        like = torch.zeros((), dtype=torch.float64)
        p_edges, p_units, p_layer, p_head = self._probs(True, like)
        _, o, A, _ = self._liveness(p_edges, p_units, p_layer, p_head)
        edges, units, _, head = self._gate_values(True)
        emits = [True] + [bool(v > 0.5) for v in o[1:]]
        layers: list[dict[str, Any]] = []
        for i, ls in enumerate(spec.layers):
            alive = bool(A[i + 1] > 0.5)
            kept = [
                alive and bool(p_edges[i][e] > 0.5) and emits[j] for e, j in enumerate(ls.sources)
            ]
            e_vals = edges[i]
            layers.append(
                {
                    "width": ls.hidden,
                    "kept_units": int((units[i] > 0).sum()) if alive else 0,
                    "alive": alive,
                    "sources": list(ls.sources),
                    "edge_values": [1.0] * len(ls.sources)
                    if e_vals is None
                    else [float(v) for v in e_vals],
                    "edges_kept": kept,
                }
            )
        head_kept = [bool(p_head[h] > 0.5) and emits[j] for h, j in enumerate(spec.head_sources)]
        n_edges = sum(len(x["sources"]) for x in layers) + len(spec.head_sources)
        return {
            "layers": layers,
            "head": {
                "sources": list(spec.head_sources),
                "edge_values": [1.0] * len(spec.head_sources)
                if head is None
                else [float(v) for v in head],
                "edges_kept": head_kept,
            },
            "layers_total": len(layers),
            "layers_kept": sum(x["alive"] for x in layers),
            "units_total": sum(x["width"] for x in layers),
            "units_kept": sum(x["kept_units"] for x in layers),
            "edges_total": n_edges,
            "edges_kept": sum(sum(x["edges_kept"]) for x in layers) + sum(head_kept),
        }

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def pruned_module(self) -> PlainShortcutLSTM:
        """The plain network computing, in eval mode, this network's eval-mode function, in this
        network's train/eval mode. Built in eval mode; every submodule's own mode is restored.

        >>> net = ShortcutLSTM(2, 8, 2, 1).eval()
        >>> net.unit_gates[0].force_(torch.arange(8) < 3)  # keep 3 units of layer 1
        >>> small = net.pruned_module()
        >>> [m.hidden_size for m in small.layers]
        [3, 8]
        >>> x = torch.randn(4, 9, 2)
        >>> bool((small(x) - net(x)).abs().max() <= 1e-5)
        True
        """
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            plain = self._build_pruned()
        finally:  # every submodule's own mode back (a frozen gate stays in eval mode)
            for m, mode in modes:
                m.training = mode
        plain.train(self.training)  # the model's train/eval mode, as gatedprune.prune says
        return plain

    def _build_pruned(self) -> PlainShortcutLSTM:
        spec = self.spec
        like = torch.zeros((), dtype=torch.float64)
        p_edges, p_units, p_layer, p_head = self._probs(True, like)
        _, o, A, _ = self._liveness(p_edges, p_units, p_layer, p_head)
        alive = [True] + [bool(a > 0.5) for a in A[1:]]
        emits = [True] + [bool(v > 0.5) for v in o[1:]]
        edges, units, layer, head_edge = self._gate_values(True)
        node_scale = self._node_scales(units, layer)
        ref = self.head.weight
        # per node (input first): (n_kept_j,) kept unit indices
        kept_units = [torch.arange(spec.input_size, device=ref.device)] + [
            torch.nonzero(u > 0).flatten() for u in units
        ]
        # Features of node j that survive, as indices into its full output.
        kept_feats = [kept_units[0]] + [
            output_features(kept_units[j], spec.layers[j - 1].hidden, spec.bidirectional)
            for j in range(1, len(spec.layers) + 1)
        ]

        def reads(sources: Sequence[int], open_: Tensor) -> list[tuple[int, int]]:
            return [(e, j) for e, j in enumerate(sources) if bool(open_[e] > 0.5) and emits[j]]

        def columns(sources: Sequence[int], kept: list[tuple[int, int]]) -> Tensor:
            """Kept input columns of a consumer reading ``sources`` through ``kept`` edges."""
            widths = [spec.node_width(j) for j in sources]
            offsets = [sum(widths[:e]) for e in range(len(widths))]
            cols = [offsets[e] + kept_feats[j] for e, j in kept]
            if not cols:
                return torch.zeros(0, dtype=torch.long, device=ref.device)
            return torch.cat(cols)  # (n_kept,)

        new_index = {0: 0}
        for i in range(len(spec.layers)):
            if alive[i + 1]:
                new_index[i + 1] = len(new_index)
        layer_specs: list[RecurrentLayerSpec] = []
        plan: list[tuple[int, Tensor, Tensor | None]] = []
        for i, ls in enumerate(spec.layers):
            if not alive[i + 1]:
                continue
            kept = reads(ls.sources, p_edges[i])
            cols = columns(ls.sources, kept)
            layer_specs.append(
                RecurrentLayerSpec(
                    sources=tuple(new_index[j] for _, j in kept),
                    hidden=int(kept_units[i + 1].numel()),
                    origin=i,
                    units=tuple(int(u) for u in kept_units[i + 1]),
                )
            )
            plan.append((i, cols, self._colscale(ls.sources, edges[i], node_scale)))
        head_kept = reads(spec.head_sources, p_head)
        new_spec = RecurrentSpec(
            cell=spec.cell,
            input_size=spec.input_size,
            layers=tuple(layer_specs),
            head_sources=tuple(new_index[j] for _, j in head_kept),
            output_size=spec.output_size,
            origin_hidden=spec.origin_hidden,
            bidirectional=spec.bidirectional,
            batch_first=spec.batch_first,
        )
        plain = PlainShortcutLSTM(new_spec).to(device=ref.device, dtype=ref.dtype)
        for (i, cols, colscale), target in zip(plan, plain.layers, strict=True):
            sliced = slice_rnn(
                self.cells[i],
                kept_units[i + 1],
                keep_input=cols,
                input_scale=colscale,
                hidden_scale=units[i],
            )
            target.load_state_dict(sliced.state_dict())
        cols = columns(spec.head_sources, head_kept)
        w = self.head.weight
        scale = self._colscale(spec.head_sources, head_edge, node_scale)
        if scale is not None:
            w = w * scale[None, :]
        plain.head.weight.copy_(w[:, cols])
        plain.head.bias.copy_(self.head.bias)
        return plain
