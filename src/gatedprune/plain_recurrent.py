"""The plain (gate-free) recurrent shortcut network that pruned ``ShortcutLSTM`` models become.

Nodes are numbered ``0..L``: node 0 is the input sequence, node ``l`` the output sequence of
recurrent layer ``l`` (``D * hidden`` features, ``D = 2`` when bidirectional). Layer ``l``
reads the feature-wise concatenation of its source nodes (an empty input of width 0 when it
has none: its state still evolves from the biases); the read-out is a per-time-step
``nn.Linear`` on the concatenation of its source nodes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .rnn_slicing import RecurrentModule, State, _autocasting, make_rnn

__all__ = [
    "CELLS",
    "Cell",
    "PlainShortcutLSTM",
    "RecurrentLayerSpec",
    "RecurrentSpec",
    "check_dtypes",
    "check_sequence",
    "check_state",
]

Cell = Literal["lstm", "gru", "rnn"]

# Cell name -> (module class, gate blocks per unit). An explicit table.
CELLS: dict[str, tuple[type[RecurrentModule], int]] = {
    "lstm": (nn.LSTM, 4),
    "gru": (nn.GRU, 3),
    "rnn": (nn.RNN, 1),
}


def check_cell(cell: object) -> str:
    """Validate a cell name (``"lstm"``, ``"gru"`` or ``"rnn"``: an ``nn.RNN`` with tanh).

    >>> check_cell("gru")
    'gru'
    """
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}: expected one of {sorted(CELLS)}")
    return cell


@dataclass(frozen=True)
class RecurrentLayerSpec:
    """One recurrent layer: its source nodes and hidden size, plus where it came from.

    ``origin`` is the index of the layer of the gated network it was pruned from and
    ``units`` the indices of that layer's kept units (None: all of them, unpruned).

    >>> RecurrentLayerSpec(sources=(0,), hidden=2, origin=1, units=(0, 3)).hidden
    2
    """

    sources: tuple[int, ...]
    hidden: int
    origin: int
    units: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RecurrentSpec:
    """Structure of a recurrent shortcut network (gated or plain).

    ``origin_hidden`` lists the hidden sizes of the gated network's layers (for mapping
    initial states, :meth:`PlainShortcutLSTM.select_state`).

    >>> spec = RecurrentSpec("lstm", 3, (RecurrentLayerSpec((0,), 4, 0),), (0, 1), 2, (4,),
    ...                      bidirectional=True)
    >>> spec.node_width(1), RecurrentSpec.from_json(spec.to_json()) == spec
    (8, True)
    """

    cell: str
    input_size: int
    layers: tuple[RecurrentLayerSpec, ...]
    head_sources: tuple[int, ...]
    output_size: int
    origin_hidden: tuple[int, ...]
    bidirectional: bool = False
    batch_first: bool = True

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def node_width(self, node: int) -> int:
        if node == 0:
            return self.input_size
        return self.directions * self.layers[node - 1].hidden

    def to_json(self) -> dict[str, Any]:
        return {
            "cell": self.cell,
            "input_size": self.input_size,
            "layers": [
                {
                    "sources": list(x.sources),
                    "hidden": x.hidden,
                    "origin": x.origin,
                    "units": None if x.units is None else list(x.units),
                }
                for x in self.layers
            ],
            "head_sources": list(self.head_sources),
            "output_size": self.output_size,
            "origin_hidden": list(self.origin_hidden),
            "bidirectional": self.bidirectional,
            "batch_first": self.batch_first,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> RecurrentSpec:
        try:
            layers = tuple(
                RecurrentLayerSpec(
                    sources=tuple(int(s) for s in x["sources"]),
                    hidden=int(x["hidden"]),
                    origin=int(x["origin"]),
                    units=None if x["units"] is None else tuple(int(u) for u in x["units"]),
                )
                for x in d["layers"]
            )
            spec = RecurrentSpec(
                cell=check_cell(d["cell"]),
                input_size=int(d["input_size"]),
                layers=layers,
                head_sources=tuple(int(s) for s in d["head_sources"]),
                output_size=int(d["output_size"]),
                origin_hidden=tuple(int(h) for h in d["origin_hidden"]),
                bidirectional=bool(d["bidirectional"]),
                batch_first=bool(d["batch_first"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed recurrent network structure: {e!r}") from e
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise ``ValueError`` if the structure is inconsistent."""
        check_cell(self.cell)
        if self.input_size < 1 or self.output_size < 1:
            raise ValueError(
                f"input_size and output_size must be >= 1, got {self.input_size}, "
                f"{self.output_size}"
            )
        for i, layer in enumerate(self.layers, start=1):
            if layer.hidden < 1:
                raise ValueError(f"layer {i} has hidden size {layer.hidden}, expected >= 1")
            if not 0 <= layer.origin < len(self.origin_hidden):
                raise ValueError(f"layer {i} has origin {layer.origin} outside the original net")
            full = self.origin_hidden[layer.origin]
            if layer.units is not None and (
                len(layer.units) != layer.hidden
                or len(set(layer.units)) != len(layer.units)
                or any(not 0 <= u < full for u in layer.units)
            ):
                raise ValueError(f"layer {i}: units {layer.units} do not fit hidden {layer.hidden}")
            if layer.units is None and layer.hidden != full:
                raise ValueError(f"layer {i}: hidden {layer.hidden} != origin hidden {full}")
            for j in layer.sources:
                if not 0 <= j < i:
                    raise ValueError(f"layer {i} reads node {j}, expected a node in [0, {i})")
        for j in self.head_sources:
            if not 0 <= j <= len(self.layers):
                raise ValueError(f"head reads node {j}, expected a node in [0, {len(self.layers)}]")


def check_sequence(x: object, input_size: int, batch_first: bool) -> tuple[Tensor, int]:
    """Validate a sequence input; returns its data tensor and batch size.

    Accepted: a batched tensor ``(B, T, input_size)`` (``(T, B, input_size)`` when not
    ``batch_first``) with ``B, T >= 1``, or a ``PackedSequence`` of such sequences.

    >>> check_sequence(torch.zeros(7, 2, 3), 3, batch_first=False)[1]
    2
    """
    if isinstance(x, PackedSequence):
        data = x.data
        if data.dim() != 2 or data.shape[1] != input_size:
            raise ValueError(
                f"expected packed sequences with {input_size} features, got packed data of "
                f"shape {tuple(data.shape)}"
            )
        if not data.is_floating_point():
            raise TypeError(f"expected a floating-point input, got dtype {data.dtype}")
        return data, int(x.batch_sizes[0])
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor or PackedSequence input, got {type(x).__name__}")
    layout = "(B, T, F)" if batch_first else "(T, B, F)"
    if x.dim() != 3:
        raise ValueError(
            f"expected a batched sequence {layout} with F = {input_size}, got a "
            f"{x.dim()}-dim tensor of shape {tuple(x.shape)}"
            + ("; add a batch dimension for a single sequence" if x.dim() == 2 else "")
        )
    if x.shape[2] != input_size:
        raise ValueError(
            f"expected {input_size} input features in {layout}, got shape {tuple(x.shape)}"
        )
    batch, length = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    if batch == 0 or length == 0:
        raise ValueError(
            f"empty input {tuple(x.shape)}: need at least one sequence of at least one step"
        )
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got dtype {x.dtype}")
    return x, batch  # no int(): a symbolic batch size stays symbolic under torch.export


def check_state(
    hx: object, cell: str, hidden: Sequence[int], directions: int, batch: int, hint: str = ""
) -> list[State | None]:
    """Validate per-layer initial states: None, or a list with one entry per layer, each None
    or ``h0`` (GRU, RNN) / ``(h0, c0)`` (LSTM) of shape ``(D, B, hidden_l)``; ``hint`` ends
    every shape or length error.

    >>> check_state([None, torch.zeros(1, 5, 3)], "gru", [4, 3], 1, 5)[1].shape
    torch.Size([1, 5, 3])
    """
    n = len(hidden)
    if hx is None:
        return [None] * n
    if isinstance(hx, Tensor | str | bytes) or not isinstance(hx, Sequence) or len(hx) != n:
        raise ValueError(
            f"hx must be None or a list with one initial state (or None) per layer ({n} "
            f"layers), got {type(hx).__name__}"
            + (f" of length {len(hx)}" if isinstance(hx, Sequence) else "")
            + hint
        )
    out: list[State | None] = []
    for i, (state, h) in enumerate(zip(hx, hidden, strict=True)):
        if state is None:
            out.append(None)
            continue
        shape = (directions, batch, h)
        if cell == "lstm":
            if not isinstance(state, tuple | list) or len(state) != 2:
                raise TypeError(
                    f"hx[{i}]: an LSTM state must be a pair (h0, c0), got {type(state).__name__}"
                )
            parts: list[object] = list(state)
        else:
            parts = [state]
        for name, t in zip(("h0", "c0"), parts, strict=False):
            if not isinstance(t, Tensor):
                raise TypeError(f"hx[{i}] {name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"hx[{i}] {name} must have shape (directions, batch, hidden) = {shape}, "
                    f"got {tuple(t.shape)}{hint}"
                )
        out.append((parts[0], parts[1]) if cell == "lstm" else parts[0])  # type: ignore[arg-type]
    return out


def check_dtypes(data: Tensor, states: Sequence[State | None], dtype: torch.dtype) -> None:
    """Raise a ValueError if the input or an initial state is not of the model's ``dtype``,
    outside autocast (the message of ``nn.LSTM``/``nn.GRU``, which the pruned model runs; also
    for packed inputs and initial states, which those modules do not check clearly).

    >>> check_dtypes(torch.zeros(2, 3), [None], torch.float64)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: RNN input dtype (torch.float32) does not match weight dtype (torch.float64)...
    """
    if _autocasting():  # the kernels cast, and nn.LSTM skips its check too
        return
    if data.dtype != dtype:
        raise ValueError(
            f"RNN input dtype ({data.dtype}) does not match weight dtype ({dtype}). Convert "
            f"input: input.to({dtype}), or convert model: model.to({data.dtype})"
        )
    for i, state in enumerate(states):
        for t in state if isinstance(state, tuple) else (state,):
            if t is not None and t.dtype != dtype:
                raise ValueError(
                    f"hx[{i}] dtype ({t.dtype}) does not match weight dtype ({dtype}): "
                    f"convert the initial state with .to({dtype})"
                )


def _repack(data: Tensor, like: PackedSequence) -> PackedSequence:
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class PlainShortcutLSTM(nn.Module):
    """A recurrent shortcut network without gates: what :func:`gatedprune.prune` returns for
    :class:`~gatedprune.ShortcutLSTM`.

    Built from single-layer ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` modules (PyTorch's fused
    kernels) and one ``nn.Linear`` read-out, wired by a :class:`RecurrentSpec`;
    ``to_config``/``from_config`` round-trip its structure through JSON.
    ``forward(x, hx=None)`` maps ``(B, T, input_size)`` (or ``(T, B, .)``, or a
    ``PackedSequence``) to ``(B, T, output_size)`` (or packed); ``hx`` is None or one initial
    state per layer of *this* network (:meth:`select_state` maps the gated network's states).

    >>> spec = RecurrentSpec("gru", 3, (RecurrentLayerSpec((0,), 4, 0),), (1,), 2, (4,))
    >>> PlainShortcutLSTM(spec)(torch.zeros(5, 7, 3)).shape
    torch.Size([5, 7, 2])
    """

    def __init__(self, spec: RecurrentSpec) -> None:
        super().__init__()
        spec.validate()
        self.spec = spec
        cls = CELLS[spec.cell][0]
        self.layers = nn.ModuleList(
            [
                make_rnn(
                    cls,
                    sum(spec.node_width(j) for j in layer.sources),
                    layer.hidden,
                    batch_first=spec.batch_first,
                    bidirectional=spec.bidirectional,
                )
                for layer in spec.layers
            ]
        )
        n_head = sum(spec.node_width(j) for j in spec.head_sources)
        with warnings.catch_warnings():  # a closed read-out has zero inputs: nothing to init
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.head = nn.Linear(n_head, spec.output_size)

    def forward(
        self, x: Tensor | PackedSequence, hx: Sequence[State | None] | None = None
    ) -> Tensor | PackedSequence:
        spec = self.spec
        data, batch = check_sequence(x, spec.input_size, spec.batch_first)
        states = check_state(
            hx,
            spec.cell,
            [ls.hidden for ls in spec.layers],
            spec.directions,
            batch,
            hint=(
                " (this is a pruned network: map the gated network's initial states with"
                " select_state(hx), which drops removed layers and pruned units)"
            ),
        )
        check_dtypes(data, states, self.head.weight.dtype)
        nodes: list[Tensor] = [data]
        for ls, rnn, state in zip(spec.layers, self.layers, states, strict=True):
            if ls.sources:
                parts = [nodes[j] for j in ls.sources]
                inp = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (.., n_in)
            else:
                inp = data.new_zeros((*data.shape[:-1], 0))  # (.., 0): no input left
            seq: Tensor | PackedSequence = _repack(inp, x) if isinstance(x, PackedSequence) else inp
            out, _ = rnn(seq, state)
            nodes.append(out.data if isinstance(out, PackedSequence) else out)  # (.., D * H)
        if spec.head_sources:
            feats = [nodes[j] for j in spec.head_sources]
            feat = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)  # (.., n_head_in)
        else:
            feat = data.new_zeros((*data.shape[:-1], 0))  # the read-out is closed: constant
        y: Tensor = self.head(feat)  # (.., output_size)
        return _repack(y, x) if isinstance(x, PackedSequence) else y

    def select_state(self, hx: Sequence[State | None] | None) -> list[State | None]:
        """Map initial states of the *gated* network (one per original layer, full hidden
        sizes) to this pruned network: removed layers are dropped, kept units selected.

        ``pruned(x, pruned.select_state(hx)) == gated(x, hx)`` in eval mode (``hx=None``:
        zero states, a list of None).

        >>> spec = RecurrentSpec("gru", 1, (RecurrentLayerSpec((0,), 1, 1, (2,)),), (1,), 1, (2, 3))
        >>> [h.shape for h in PlainShortcutLSTM(spec).select_state([None, torch.zeros(1, 4, 3)])]
        [torch.Size([1, 4, 1])]
        """
        spec = self.spec
        if hx is None:
            return [None] * len(spec.layers)
        if isinstance(hx, Tensor) or not isinstance(hx, Sequence):
            raise TypeError(f"hx must be None or a list of states, got {type(hx).__name__}")
        if len(hx) != len(spec.origin_hidden):
            raise ValueError(
                f"hx must hold one state (or None) per layer of the original network "
                f"({len(spec.origin_hidden)}), got {len(hx)}"
            )
        out: list[State | None] = []
        for ls in spec.layers:
            state = hx[ls.origin]
            if state is None or ls.units is None:
                out.append(state)
                continue
            full = spec.origin_hidden[ls.origin]
            lstm = spec.cell == "lstm"
            if lstm and isinstance(state, tuple | list) and len(state) == 2:
                parts: list[object] = list(state)
            elif not lstm and isinstance(state, Tensor):
                parts = [state]
            else:
                raise TypeError(
                    f"hx[{ls.origin}] must be "
                    + ("a pair (h0, c0)" if lstm else "a tensor h0")
                    + f" for a {spec.cell.upper()} layer, got {type(state).__name__}"
                )
            picked: list[Tensor] = []
            for name, t in zip(("h0", "c0"), parts, strict=False):
                if not isinstance(t, Tensor):
                    raise TypeError(f"hx[{ls.origin}] {name} must be a tensor, got {t!r}")
                if t.dim() != 3 or t.shape[2] != full:
                    raise ValueError(
                        f"hx[{ls.origin}] {name} must have shape (directions, batch, {full}), "
                        f"got {tuple(t.shape)}"
                    )
                idx = torch.tensor(ls.units, dtype=torch.long, device=t.device)
                picked.append(t.index_select(2, idx))  # (D, B, len(ls.units))
            out.append((picked[0], picked[1]) if lstm else picked[0])
        return out

    def to_config(self) -> dict[str, Any]:
        """JSON-able structure (weights excluded)."""
        return self.spec.to_json()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PlainShortcutLSTM:
        """Rebuild an (untrained) network from :meth:`to_config` output."""
        return cls(RecurrentSpec.from_json(config))


def _register() -> None:
    from .io import register_model_class

    register_model_class("plain_shortcut_lstm", PlainShortcutLSTM)


_register()
