"""Exact hidden-unit surgery on ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (pure functions).

A hidden unit ``k`` of a recurrent layer with ``G`` gate blocks (LSTM 4: i, f, g, o; GRU 3:
r, z, n; RNN 1) is one structure: rows ``k, H + k, ..., (G - 1) H + k`` of ``W_ih``, ``W_hh``,
``b_ih`` and ``b_hh`` (in both directions of a bidirectional layer), column ``k`` of ``W_hh``,
and output features ``k`` (and ``H + k`` for the reverse direction) in every consumer (ISS,
Wen et al. 2018; DESIGN.md section 5).

Gating convention, shared by :func:`scaled_forward` (the gated computation) and
:func:`slice_rnn` (its pruned form): an ``input_scale`` multiplies the input features (folded
into the columns of ``W_ih``); a ``hidden_scale`` multiplies the hidden state *as the layer's
recurrence sees it* (folded into the columns of ``W_hh``). A unit whose scale is 0 therefore
still computes its own state but cannot influence any other unit, so removing it is exact.
The module's *output* is the raw ``h_t``: its consumers fold the same scale into their own
input columns (for a stacked module, :func:`scaled_forward` does that for the next layer).

Invariant (tested): with ``m2 = slice_rnn(m, keep_hidden, keep_input=ki, input_scale=s,
hidden_scale=u)``, for every input ``x`` (and initial state ``hx``)::

    m2(x[..., ki], hx[..., keep_hidden])  ==  scaled_forward(m, x, hx, input_scale=s,
                                                             hidden_scale=u)[..., kept features]

whenever ``s`` is 0 outside ``ki`` and ``u`` is 0 outside ``keep_hidden`` (what a gate does).

Limits: ``proj_size > 0`` LSTMs are refused (``ValueError``). A multi-layer module is split
into single-layer modules (:func:`split_layers`, :func:`slice_rnn_layers`) because one
``nn.LSTM`` forces one hidden size on all its layers; the split form is exact in eval mode
(inter-layer dropout is only active in training). A layer may keep zero input features: the
result is an ``nn.LSTM`` with ``input_size == 0`` fed a ``(..., 0)`` input (see
:func:`make_rnn`), because a recurrent layer without input is not a constant: its state still
evolves from the biases.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

__all__ = [
    "RNNStack",
    "RecurrentModule",
    "State",
    "StateSlicing",
    "StateSlicingGRU",
    "StateSlicingLSTM",
    "StateSlicingRNN",
    "fold_rnn_",
    "gates_per_unit",
    "make_rnn",
    "output_features",
    "scaled_forward",
    "slice_rnn",
    "slice_rnn_",
    "slice_rnn_layers",
    "slice_state_",
    "split_layers",
    "unit_rows",
]

RecurrentModule = nn.LSTM | nn.GRU | nn.RNN
"""The recurrent module types this module handles."""

State = Tensor | tuple[Tensor, Tensor]
"""A recurrent state: ``h`` (GRU, RNN) or ``(h, c)`` (LSTM), each ``(layers * D, B, H)``."""

# Gate blocks per hidden unit. An explicit table: these classes and their subclasses only.
_GATES: tuple[tuple[type[nn.Module], int], ...] = ((nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1))


def gates_per_unit(module: nn.Module) -> int:
    """Number of gate blocks stacked in the weights: LSTM 4, GRU 3, RNN 1.

    >>> gates_per_unit(nn.GRU(3, 5))
    3
    """
    for cls, g in _GATES:
        if isinstance(module, cls):
            return g
    raise TypeError(f"expected an nn.LSTM, nn.GRU or nn.RNN, got {type(module).__name__}")


def _check_module(module: object, *, single_layer: bool) -> RecurrentModule:
    if not isinstance(module, nn.LSTM | nn.GRU | nn.RNN):
        raise TypeError(f"expected an nn.LSTM, nn.GRU or nn.RNN, got {type(module).__name__}")
    if getattr(module, "proj_size", 0) > 0:
        raise ValueError(
            f"{type(module).__name__} with proj_size={module.proj_size} is not supported: "
            "pruning its hidden units would also need the projection; use proj_size=0"
        )
    if single_layer and module.num_layers != 1:
        raise ValueError(
            f"expected a single-layer {type(module).__name__}, got num_layers="
            f"{module.num_layers}; use slice_rnn_layers (or split_layers) for stacked modules"
        )
    return module


def _as_index(name: str, idx: object, size: int, device: torch.device) -> Tensor:
    """A 1-D long tensor of distinct indices in ``[0, size)`` from indices or a bool mask."""
    if isinstance(idx, Tensor):
        t = idx.detach()
    elif isinstance(idx, Sequence) and not isinstance(idx, str):
        # No dtype= here: a list of bools is a mask and a list of floats is refused below
        # (converting to long would read [True, False] as the indices [1, 0]).
        try:
            t = torch.as_tensor(list(idx))
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"{name} must be a tensor of indices or a bool mask, got {idx!r}"
            ) from e
    else:
        raise TypeError(f"{name} must be a tensor of indices or a bool mask, got {idx!r}")
    if t.dtype == torch.bool:
        if t.shape != (size,):
            raise ValueError(f"{name}: a bool mask must have shape ({size},), got {tuple(t.shape)}")
        t = torch.nonzero(t).flatten()  # (k,) indices of the True entries
    if t.dim() != 1 or (t.numel() > 0 and t.is_floating_point()) or t.is_complex():
        raise ValueError(f"{name} must be a 1-D tensor of integer indices, got {t!r}")
    t = t.to(device=device, dtype=torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise ValueError(f"{name} holds indices outside [0, {size}): {t.tolist()}")
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"{name} holds repeated indices: {t.tolist()}")
    return t


def _as_scale(name: str, scale: Tensor | None, size: int, ref: Tensor) -> Tensor | None:
    if scale is None:
        return None
    if not isinstance(scale, Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({size},) or None, got {scale!r}")
    if scale.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(scale.shape)}")
    return scale.to(device=ref.device, dtype=ref.dtype)


def unit_rows(keep_hidden: Tensor, hidden_size: int, gates: int) -> Tensor:
    """Row indices ``(gates * k,)`` of the kept units in a stacked ``(gates * H, ...)`` weight.

    >>> unit_rows(torch.tensor([0, 2]), 3, 2).tolist()
    [0, 2, 3, 5]
    """
    blocks = torch.arange(gates, device=keep_hidden.device)[:, None] * hidden_size  # (G, 1)
    return (blocks + keep_hidden[None, :]).flatten()  # (G * k,)


def output_features(keep_hidden: Tensor, hidden_size: int, bidirectional: bool) -> Tensor:
    """Indices of the kept units' features in the layer's output ``(..., D * H)``.

    >>> output_features(torch.tensor([1]), 3, True).tolist()
    [1, 4]
    """
    if not bidirectional:
        return keep_hidden
    return torch.cat([keep_hidden, keep_hidden + hidden_size])  # (2k,)


def _ref(module: RecurrentModule) -> Tensor:
    """A weight of ``module`` (for its device and dtype)."""
    w = module.weight_hh_l0
    assert isinstance(w, Tensor)
    return w


def _suffixes(module: RecurrentModule) -> tuple[str, ...]:
    return ("", "_reverse") if module.bidirectional else ("",)


def make_rnn(
    cell: type[RecurrentModule],
    input_size: int,
    hidden_size: int,
    *,
    bias: bool = True,
    batch_first: bool = False,
    bidirectional: bool = False,
    nonlinearity: str = "tanh",
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> RecurrentModule:
    """A single-layer ``cell`` module; ``input_size`` may be 0 (``W_ih`` of shape ``(G H, 0)``).

    ``nn.LSTM`` refuses ``input_size=0`` in its constructor but computes correctly with it (the
    input contributes nothing, the biases and the recurrence remain); pruning needs that for a
    layer whose every input was removed. ``nonlinearity`` applies to ``nn.RNN`` only.

    >>> m = make_rnn(nn.LSTM, 0, 4, batch_first=True)
    >>> m(torch.zeros(2, 5, 0))[0].shape
    torch.Size([2, 5, 4])
    """
    if not isinstance(cell, type) or not issubclass(cell, nn.LSTM | nn.GRU | nn.RNN):
        raise TypeError(f"cell must be nn.LSTM, nn.GRU or nn.RNN, got {cell!r}")
    for name, v, low in (("input_size", input_size, 0), ("hidden_size", hidden_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int >= {low}, got {v!r}")
        if v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    kw: dict[str, Any] = {
        "bias": bias,
        "batch_first": batch_first,
        "bidirectional": bidirectional,
        "device": device,
        "dtype": dtype,
    }
    if issubclass(cell, nn.RNN):
        kw["nonlinearity"] = nonlinearity
    module = cell(max(input_size, 1), hidden_size, 1, **kw)
    if input_size == 0:
        g = gates_per_unit(module)
        for sfx in _suffixes(module):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Initializing zero-element tensors")
                # (g * H, 0)
                w = nn.Parameter(torch.empty(g * hidden_size, 0, device=device, dtype=dtype))
            setattr(module, f"weight_ih_l0{sfx}", w)  # RNNBase.__setattr__ refreshes its list
        module.input_size = 0
    return module


def _like(module: RecurrentModule, input_size: int, hidden_size: int) -> RecurrentModule:
    ref = _ref(module)
    return make_rnn(
        type(module),
        input_size,
        hidden_size,
        bias=module.bias,
        batch_first=module.batch_first,
        bidirectional=module.bidirectional,
        nonlinearity=getattr(module, "nonlinearity", "tanh"),
        device=ref.device,
        dtype=ref.dtype,
    )


def _layer_input_size(module: RecurrentModule, layer: int) -> int:
    d = 2 if module.bidirectional else 1
    return module.input_size if layer == 0 else d * module.hidden_size


@torch.no_grad()
def split_layers(module: nn.Module) -> list[RecurrentModule]:
    """Copies of each layer of a stacked module as single-layer modules (same flags).

    Running them one after another equals the stacked module in eval mode (in training mode
    the stacked module also applies its inter-layer ``dropout``).

    >>> parts = split_layers(nn.GRU(3, 4, num_layers=2))
    >>> [p.input_size for p in parts]
    [3, 4]
    """
    m = _check_module(module, single_layer=False)
    out: list[RecurrentModule] = []
    for layer in range(m.num_layers):
        new = _like(m, _layer_input_size(m, layer), m.hidden_size)
        for sfx in _suffixes(m):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if kind.startswith("bias") and not m.bias:
                    continue
                src = getattr(m, f"{kind}_l{layer}{sfx}")
                getattr(new, f"{kind}_l0{sfx}").copy_(src)
        new.train(m.training)
        out.append(new)
    return out


@torch.no_grad()
def slice_rnn(
    module: nn.Module,
    keep_hidden: Tensor | Sequence[int],
    *,
    keep_input: Tensor | Sequence[int] | None = None,
    input_scale: Tensor | None = None,
    hidden_scale: Tensor | None = None,
) -> RecurrentModule:
    """A new single-layer module computing exactly the kept units of a gated ``module``.

    ``keep_hidden``: kept unit indices (or a bool mask of length ``hidden_size``), applied to
    both directions; the new ``hidden_size`` is their count (at least 1). ``keep_input``: kept
    input features (None: all; may be empty). ``input_scale`` ``(input_size,)`` and
    ``hidden_scale`` ``(hidden_size,)`` are the gate values to fold (see the module docstring):
    they scale the columns of ``W_ih`` and ``W_hh``. Unit order and feature order follow the
    given indices. See the module docstring for the exact invariant.

    >>> lstm = nn.LSTM(3, 4, batch_first=True)
    >>> small = slice_rnn(lstm, torch.tensor([0, 3]), keep_input=torch.tensor([1, 2]))
    >>> small
    LSTM(2, 2, batch_first=True)
    """
    m = _check_module(module, single_layer=True)
    ref = _ref(m)
    keep_h = _as_index("keep_hidden", keep_hidden, m.hidden_size, ref.device)
    if keep_h.numel() == 0:
        raise ValueError(
            "keep_hidden keeps no unit: a layer without units is dead, remove it instead"
        )
    if keep_input is None:
        keep_i = torch.arange(m.input_size, device=ref.device)
    else:
        keep_i = _as_index("keep_input", keep_input, m.input_size, ref.device)
    in_s = _as_scale("input_scale", input_scale, m.input_size, ref)
    hid_s = _as_scale("hidden_scale", hidden_scale, m.hidden_size, ref)
    g = gates_per_unit(m)
    rows = unit_rows(keep_h, m.hidden_size, g)
    new = _like(m, int(keep_i.numel()), int(keep_h.numel()))
    for sfx in _suffixes(m):
        w_ih = getattr(m, f"weight_ih_l0{sfx}")
        w_hh = getattr(m, f"weight_hh_l0{sfx}")
        if in_s is not None:
            w_ih = w_ih * in_s[None, :]
        if hid_s is not None:
            w_hh = w_hh * hid_s[None, :]
        getattr(new, f"weight_ih_l0{sfx}").copy_(w_ih[rows][:, keep_i])
        getattr(new, f"weight_hh_l0{sfx}").copy_(w_hh[rows][:, keep_h])
        if m.bias:
            getattr(new, f"bias_ih_l0{sfx}").copy_(getattr(m, f"bias_ih_l0{sfx}")[rows])
            getattr(new, f"bias_hh_l0{sfx}").copy_(getattr(m, f"bias_hh_l0{sfx}")[rows])
    new.train(m.training)
    return new


def slice_rnn_layers(
    module: nn.Module,
    keep_hidden: Sequence[Tensor | Sequence[int]],
    *,
    keep_input: Tensor | Sequence[int] | None = None,
    input_scale: Tensor | None = None,
    hidden_scale: Sequence[Tensor | None] | None = None,
) -> list[RecurrentModule]:
    """Split a (stacked) module and slice every layer: layer ``l`` keeps ``keep_hidden[l]``.

    Layer ``l > 0`` keeps the output features of the kept units of layer ``l - 1`` and folds
    ``hidden_scale[l - 1]`` into its input columns, matching :func:`scaled_forward`. Running
    the returned layers in sequence equals ``scaled_forward(module, x, input_scale=...,
    hidden_scale=...)`` restricted to the last layer's kept output features.

    >>> parts = slice_rnn_layers(nn.LSTM(3, 4, num_layers=2), [[0, 1], [2]])
    >>> [(p.input_size, p.hidden_size) for p in parts]
    [(3, 2), (2, 1)]
    """
    m = _check_module(module, single_layer=False)
    if isinstance(keep_hidden, Tensor) or len(keep_hidden) != m.num_layers:
        raise ValueError(
            f"keep_hidden must be a list of {m.num_layers} index tensors (one per layer), "
            f"got {keep_hidden!r}"
        )
    scales: Sequence[Tensor | None] = (
        [None] * m.num_layers if hidden_scale is None else hidden_scale
    )
    if isinstance(scales, Tensor) or len(scales) != m.num_layers:
        raise ValueError(
            f"hidden_scale must be None or a list of {m.num_layers} tensors/None (one per layer)"
        )
    layers = split_layers(m)
    out: list[RecurrentModule] = []
    ref = _ref(m)
    prev: Tensor | None = None
    for layer, part in enumerate(layers):
        keep_h = _as_index(f"keep_hidden[{layer}]", keep_hidden[layer], m.hidden_size, ref.device)
        if layer == 0:
            k_in: Tensor | Sequence[int] | None = keep_input
            s_in = input_scale
        else:
            assert prev is not None
            k_in = output_features(prev, m.hidden_size, m.bidirectional)
            s = _as_scale(f"hidden_scale[{layer - 1}]", scales[layer - 1], m.hidden_size, ref)
            s_in = None if s is None else (torch.cat([s, s]) if m.bidirectional else s)  # (D * H,)
        out.append(
            slice_rnn(part, keep_h, keep_input=k_in, input_scale=s_in, hidden_scale=scales[layer])
        )
        prev = keep_h
    return out


@torch.no_grad()
def fold_rnn_(
    module: nn.Module,
    hidden_scale: Sequence[Tensor | None],
    input_scale: Tensor | None = None,
) -> None:
    """Fold gate values into ``module``'s weights in place, as :func:`scaled_forward` applies
    them: afterwards ``module(x) == scaled_forward(module_before, x, ...)``.

    ``hidden_scale`` holds one ``(H,)`` or ``(D * H,)`` tensor (or None) per layer.

    >>> gru = nn.GRU(2, 3, num_layers=2)
    >>> x = torch.randn(4, 1, 2)
    >>> s = [torch.tensor([1.0, 0.0, 0.5]), None]
    >>> want = scaled_forward(gru, x, hidden_scale=s)[0]
    >>> fold_rnn_(gru, s)
    >>> bool((gru(x)[0] - want).abs().max() < 1e-6)
    True
    """
    m = _check_module(module, single_layer=False)
    if isinstance(hidden_scale, Tensor) or len(hidden_scale) != m.num_layers:
        raise ValueError(
            f"hidden_scale must be a list of {m.num_layers} tensors/None (one per layer), "
            f"got {hidden_scale!r}"
        )
    ref = _ref(m)
    in_s = _as_scale("input_scale", input_scale, m.input_size, ref)
    checked = [_hidden_scale(f"hidden_scale[{i}]", s, m, ref) for i, s in enumerate(hidden_scale)]
    for name, w in zip(m._flat_weights_names, _scaled_weights(m, in_s, checked), strict=True):
        getattr(m, name).copy_(w)


@torch.no_grad()
def slice_rnn_(
    module: nn.Module,
    keep_hidden: Sequence[Sequence[int]] | None,
    keep_input: Sequence[int] | None = None,
) -> None:
    """Keep hidden units and input features of a (stacked, bidirectional) module in place.

    ``keep_hidden`` (None: all units) holds one index list per layer and direction (layer
    major: ``[l0 forward, l0 reverse, l1 forward, ...]``), all of the same length ``k``, the new
    ``hidden_size`` (PyTorch gives all layers of one module one hidden size). Layer ``l > 0``
    keeps the output features of the units kept by layer ``l - 1``. ``keep_input`` (None: all;
    may be empty) are the input features of layer 0 kept. The class, parameter names and the
    fused kernels stay; parameters are replaced by smaller ones.

    >>> lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    >>> slice_rnn_(lstm, [[0, 1], [1, 3], [2, 3], [0, 1]], keep_input=[2])
    >>> lstm
    LSTM(1, 2, num_layers=2, bidirectional=True)
    >>> lstm(torch.randn(5, 2, 1))[0].shape
    torch.Size([5, 2, 4])
    """
    m = _check_module(module, single_layer=False)
    ref = _ref(m)
    h, d = m.hidden_size, (2 if m.bidirectional else 1)
    if keep_hidden is None:
        keep_hidden = [list(range(h))] * (m.num_layers * d)
    if isinstance(keep_hidden, Tensor) or len(keep_hidden) != m.num_layers * d:
        raise ValueError(
            f"keep_hidden must hold {m.num_layers * d} index lists (one per layer and "
            f"direction), got {keep_hidden!r}"
        )
    keeps = [_as_index(f"keep_hidden[{i}]", k, h, ref.device) for i, k in enumerate(keep_hidden)]
    k = int(keeps[0].numel())
    if k == 0 or any(int(t.numel()) != k for t in keeps):
        raise ValueError(
            "every layer and direction must keep the same number (>= 1) of units, got "
            f"{[int(t.numel()) for t in keeps]}"
        )
    if keep_input is None:
        keep_i = torch.arange(m.input_size, device=ref.device)
    else:
        keep_i = _as_index("keep_input", keep_input, m.input_size, ref.device)
    g = gates_per_unit(m)
    cols = keep_i
    for layer in range(m.num_layers):
        layer_keeps = keeps[layer * d : (layer + 1) * d]
        for j, sfx in enumerate(_suffixes(m)):
            rows = unit_rows(layer_keeps[j], h, g)  # (G k,)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if kind.startswith("bias") and not m.bias:
                    continue
                name = f"{kind}_l{layer}{sfx}"
                old = getattr(m, name)
                new = old[rows]
                if kind == "weight_ih":
                    new = new[:, cols]
                elif kind == "weight_hh":
                    new = new[:, layer_keeps[j]]
                setattr(m, name, nn.Parameter(new.clone(), requires_grad=old.requires_grad))
        cols = torch.cat([t + j * h for j, t in enumerate(layer_keeps)])  # (D k,)
    m.hidden_size = k
    m.input_size = int(keep_i.numel())
    m.flatten_parameters()


def _autocasting() -> bool:
    """Whether autocast is on (then the kernels cast, and ``nn.LSTM`` skips its dtype check)."""
    return bool(torch._C._is_any_autocast_enabled())


def _check_hx(m: RecurrentModule, hx: object, batch: int, ref: Tensor) -> list[Tensor]:
    """Initial states as the kernel's list: ``[h]`` or ``[h, c]``, each ``(L * D, B, H)``."""
    d = 2 if m.bidirectional else 1
    shape = (m.num_layers * d, batch, m.hidden_size)
    is_lstm = isinstance(m, nn.LSTM)
    if hx is None:
        z = ref.new_zeros(shape)  # (L * D, B, H)
        return [z, z] if is_lstm else [z]
    parts: list[object]
    if is_lstm:
        if not isinstance(hx, tuple | list) or len(hx) != 2:
            raise TypeError(f"an LSTM state must be a pair (h0, c0), got {type(hx).__name__}")
        parts = list(hx)
    else:
        if not isinstance(hx, Tensor):
            raise TypeError(
                f"a {type(m).__name__} state must be a tensor h0, got {type(hx).__name__}"
            )
        parts = [hx]
    out: list[Tensor] = []
    for name, t in zip(("h0", "c0"), parts, strict=False):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have shape (num_layers * num_directions, batch, hidden) = "
                f"{shape}, got {tuple(t.shape)}"
            )
        if t.dtype != ref.dtype and not _autocasting():
            raise ValueError(
                f"{name} dtype ({t.dtype}) does not match weight dtype ({ref.dtype}): "
                f"convert the initial state with .to({ref.dtype})"
            )
        out.append(t)
    return out


def _hidden_scale(
    name: str, scale: Tensor | None, m: RecurrentModule, ref: Tensor
) -> Tensor | None:
    """A layer's hidden scale as ``(D * H,)``: given ``(H,)`` (both directions) or ``(D * H,)``."""
    if scale is None:
        return None
    h = m.hidden_size
    d = 2 if m.bidirectional else 1
    if isinstance(scale, Tensor) and d == 2 and scale.shape == (d * h,):
        return scale.to(device=ref.device, dtype=ref.dtype)
    s = _as_scale(name, scale, h, ref)
    assert s is not None
    return torch.cat([s, s]) if d == 2 else s  # (D * H,)


def _scaled_weights(
    m: RecurrentModule,
    input_scale: Tensor | None,
    hidden_scale: Sequence[Tensor | None],
) -> list[Tensor]:
    """The module's flat weights (``_flat_weights_names`` order) with the scales folded in;
    ``hidden_scale[l]`` is ``(D * H,)`` (forward units, then reverse units) or None."""
    weights: list[Tensor] = []
    h = m.hidden_size
    for layer in range(m.num_layers):
        s_in = input_scale if layer == 0 else hidden_scale[layer - 1]  # (in,) or None
        full = hidden_scale[layer]
        for k, sfx in enumerate(_suffixes(m)):
            s_h = None if full is None else full[k * h : (k + 1) * h]  # (H,)
            w_ih = getattr(m, f"weight_ih_l{layer}{sfx}")
            w_hh = getattr(m, f"weight_hh_l{layer}{sfx}")
            weights.append(w_ih if s_in is None else w_ih * s_in[None, :])  # (G H, in)
            weights.append(w_hh if s_h is None else w_hh * s_h[None, :])  # (G H, H)
            if m.bias:
                weights.append(getattr(m, f"bias_ih_l{layer}{sfx}"))
                weights.append(getattr(m, f"bias_hh_l{layer}{sfx}"))
    return weights


def scaled_forward(
    module: nn.Module,
    x: Tensor | PackedSequence,
    hx: State | None = None,
    *,
    input_scale: Tensor | None = None,
    hidden_scale: Tensor | Sequence[Tensor | None] | None = None,
) -> tuple[Tensor | PackedSequence, State]:
    """Run ``module`` with gate values folded into its weights, on PyTorch's fused kernels.

    ``input_scale`` ``(input_size,)`` multiplies the input features; ``hidden_scale`` (a
    ``(hidden_size,)`` tensor, or one tensor/None per layer) multiplies each layer's hidden
    state where it is read: by its own recurrence and by the next layer. A per-layer entry may
    also be ``(2 * hidden_size,)`` for a bidirectional module: forward units, then reverse
    units (one scale per direction, in the layer's output feature order). The returned output
    is the last layer's raw ``h_t`` (a consumer folds the last scale itself); the state is the
    final ``h`` (GRU, RNN) or ``(h, c)`` (LSTM) as ``module`` returns them. Gradients flow to
    the weights and to the scales. Inputs: batched ``(B, T, F)`` / ``(T, B, F)`` tensors or a
    ``PackedSequence`` (output is then packed too).

    >>> lstm = nn.LSTM(3, 4, batch_first=True)
    >>> x = torch.randn(2, 5, 3)
    >>> out, (h, c) = scaled_forward(lstm, x, hidden_scale=torch.ones(4))
    >>> bool((out - lstm(x)[0]).abs().max() < 1e-6)
    True
    """
    m = _check_module(module, single_layer=False)
    if isinstance(hidden_scale, Tensor) or hidden_scale is None:
        if hidden_scale is not None and m.num_layers != 1:
            raise ValueError(
                f"hidden_scale for a {m.num_layers}-layer module must be a list of one "
                "tensor (or None) per layer"
            )
        scales: list[Tensor | None] = [hidden_scale] + [None] * (m.num_layers - 1)
    else:
        scales = list(hidden_scale)
        if len(scales) != m.num_layers:
            raise ValueError(
                f"hidden_scale must hold {m.num_layers} entries (one per layer), got {len(scales)}"
            )
    ref = _ref(m)
    in_s = _as_scale("input_scale", input_scale, m.input_size, ref)
    checked = [_hidden_scale(f"hidden_scale[{i}]", s, m, ref) for i, s in enumerate(scales)]
    weights = _scaled_weights(m, in_s, checked)
    packed = isinstance(x, PackedSequence)
    data = x.data if isinstance(x, PackedSequence) else x
    if not isinstance(data, Tensor):
        raise TypeError(f"expected a Tensor or PackedSequence input, got {type(x).__name__}")
    want = 2 if packed else 3
    if data.dim() != want or data.shape[-1] != m.input_size:
        raise ValueError(
            f"expected {'packed data (N, F)' if packed else 'a batched (B, T, F) input'} with "
            f"F = input_size = {m.input_size}, got shape {tuple(data.shape)}"
        )
    if not packed and data.shape[1 if m.batch_first else 0] == 0:
        raise ValueError(
            f"expected a sequence of at least one step, got shape {tuple(data.shape)} "
            f"(T = 0; batch_first={m.batch_first})"
        )
    if not data.is_floating_point():
        raise TypeError(f"expected a floating-point input, got dtype {data.dtype}")
    if data.dtype != ref.dtype and not _autocasting():
        raise ValueError(
            f"RNN input dtype ({data.dtype}) does not match weight dtype ({ref.dtype}). Convert "
            f"input: input.to({ref.dtype}), or convert model: model.to({data.dtype})"
        )
    if isinstance(x, PackedSequence):
        batch = int(x.batch_sizes[0])
    else:
        batch = int(x.shape[0] if m.batch_first else x.shape[1])
    states = _check_hx(m, hx, batch, ref)
    if isinstance(x, PackedSequence) and hx is not None and x.sorted_indices is not None:
        states = [s.index_select(1, x.sorted_indices) for s in states]  # (L * D, B, H) each, sorted
    dropout = float(m.dropout)
    train = m.training
    d = m.bidirectional
    out: Tensor
    final: list[Tensor]
    if isinstance(x, PackedSequence):
        bs = x.batch_sizes
        if isinstance(m, nn.LSTM):
            # out (N, D * H) packed data; h, c (L * D, B, H)
            out, h, c = torch.lstm(
                x.data, bs, states, weights, m.bias, m.num_layers, dropout, train, d
            )
            final = [h, c]
        elif isinstance(m, nn.GRU):
            # out (N, D * H) packed data; h (L * D, B, H)
            out, h = torch.gru(
                x.data, bs, states[0], weights, m.bias, m.num_layers, dropout, train, d
            )
            final = [h]
        else:
            fn = torch.rnn_tanh if m.nonlinearity == "tanh" else torch.rnn_relu
            # out (N, D * H) packed data; h (L * D, B, H)
            out, h = fn(x.data, bs, states[0], weights, m.bias, m.num_layers, dropout, train, d)
            final = [h]
        if x.unsorted_indices is not None:
            final = [s.index_select(1, x.unsorted_indices) for s in final]  # (L * D, B, H) each
        result: Tensor | PackedSequence = PackedSequence(
            out, x.batch_sizes, x.sorted_indices, x.unsorted_indices
        )
    else:
        bf = m.batch_first
        if isinstance(m, nn.LSTM):
            # out (B, T, D * H) or (T, B, D * H); h, c (L * D, B, H)
            out, h, c = torch.lstm(x, states, weights, m.bias, m.num_layers, dropout, train, d, bf)
            final = [h, c]
        elif isinstance(m, nn.GRU):
            # out (B, T, D * H) or (T, B, D * H); h (L * D, B, H)
            out, h = torch.gru(x, states[0], weights, m.bias, m.num_layers, dropout, train, d, bf)
            final = [h]
        else:
            fn = torch.rnn_tanh if m.nonlinearity == "tanh" else torch.rnn_relu
            # out (B, T, D * H) or (T, B, D * H); h (L * D, B, H)
            out, h = fn(x, states[0], weights, m.bias, m.num_layers, dropout, train, d, bf)
            final = [h]
        result = out
    state: State = (final[0], final[1]) if len(final) == 2 else final[0]
    return result, state


class RNNStack(nn.Module):
    """Single-layer recurrent modules run one after another (a split stacked module).

    What a per-layer-pruned multi-layer ``nn.LSTM`` becomes (its layers may have different
    hidden sizes). ``forward(x, hx=None)`` returns ``(output, states)``: the last layer's
    output and a list with each layer's final state; ``hx`` is None or such a list.

    >>> stack = RNNStack(slice_rnn_layers(nn.LSTM(3, 4, num_layers=2), [[0, 1], [2]]))
    >>> stack(torch.randn(5, 2, 3))[0].shape
    torch.Size([5, 2, 1])
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        if not layers:
            raise ValueError("RNNStack needs at least one layer")
        for i, layer in enumerate(layers):
            m = _check_module(layer, single_layer=True)
            if i > 0:
                prev = _check_module(layers[i - 1], single_layer=True)
                d = 2 if prev.bidirectional else 1
                if m.input_size != d * prev.hidden_size or m.batch_first != prev.batch_first:
                    raise ValueError(
                        f"layer {i} reads {m.input_size} features (batch_first={m.batch_first})"
                        f" but layer {i - 1} outputs {d * prev.hidden_size} "
                        f"(batch_first={prev.batch_first})"
                    )
        self.layers = nn.ModuleList(layers)

    def forward(
        self, x: Tensor | PackedSequence, hx: Sequence[State | None] | None = None
    ) -> tuple[Tensor | PackedSequence, list[State]]:
        if isinstance(hx, Tensor):
            raise TypeError(
                f"hx must be None or a list with one state (or None) per layer "
                f"({len(self.layers)}), not one tensor of shape {tuple(hx.shape)}"
            )
        if hx is not None and len(hx) != len(self.layers):
            raise ValueError(
                f"hx must hold one state (or None) per layer: {len(self.layers)}, got {len(hx)}"
            )
        states: list[State] = []
        out: Any = x
        for i, layer in enumerate(self.layers):
            out, state = layer(out, None if hx is None else hx[i])
            states.append(state)
        return out, states


def _sliced_state(m: Any, hx: object) -> Any:
    """``hx`` of the unpruned width ``m.full_hidden_size`` cut to the kept units
    (``m.state_index``, one row of unit indices per layer and direction); a state already at
    the kept width ``m.hidden_size`` (built by code reading the pruned module's
    ``hidden_size``, as the tutorials' ``torch.zeros(lstm.num_layers, B, lstm.hidden_size)``)
    is taken as it is if it gives every unit the same value (zeros, ones): which unit before
    pruning each entry of another one belongs to is unknown, so it is a ``ValueError``."""
    if hx is None:
        return None
    idx: Tensor = m.state_index  # (L * D, k)
    full = int(m.full_hidden_size)
    kept = int(m.hidden_size)

    def one(name: str, h: object) -> Tensor:
        if not isinstance(h, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(h).__name__}")
        if h.dim() != 3 or h.shape[0] != idx.shape[0] or h.shape[2] not in (full, kept):
            raise ValueError(
                f"{type(m).__name__}: {name} must have shape (num_layers * num_directions, "
                f"batch, {full}), the hidden size before pruning (the pruned units' entries "
                f"are dropped here), or (num_layers * num_directions, batch, {kept}), the "
                f"kept units' entries, got {tuple(h.shape)}"
            )
        if h.shape[2] == kept and kept != full:
            if kept > 1 and not bool((h == h[..., :1]).all()):
                raise ValueError(
                    f"{type(m).__name__}: {name} has the kept width {kept} (the hidden size "
                    f"after pruning) and different values per unit; which of the {full} units "
                    "before pruning each entry belongs to is unknown: pass it at the width "
                    f"{full} (the kept units' entries are taken here)"
                )
            return h  # (L * D, B, k) the same value for every unit: already cut
        return h.gather(2, idx[:, None, :].expand(-1, h.shape[1], -1))  # (L * D, B, k)

    if isinstance(m, nn.LSTM):
        if not isinstance(hx, tuple | list) or len(hx) != 2:
            raise TypeError(f"an LSTM state must be a pair (h0, c0), got {type(hx).__name__}")
        return (one("h0", hx[0]), one("c0", hx[1]))
    return one("h0", hx)


class StateSlicing(nn.Module):
    """Base of :class:`StateSlicingLSTM` / ``GRU`` / ``RNN``: a pruned recurrent module that
    takes its initial state at the hidden size it had before pruning (``full_hidden_size``,
    as the model's code builds it) and keeps the kept units' entries (``state_index``, one
    row per layer and direction). Made by :func:`slice_state_`."""

    state_index: Tensor
    full_hidden_size: int

    def forward(self, input: Any, hx: Any = None) -> Any:
        return super().forward(input, _sliced_state(self, hx))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_hidden_size={self.full_hidden_size}"


class StateSlicingLSTM(StateSlicing, nn.LSTM):
    """:class:`StateSlicing` ``nn.LSTM`` (initial state ``(h0, c0)``)."""


class StateSlicingGRU(StateSlicing, nn.GRU):
    """:class:`StateSlicing` ``nn.GRU`` (initial state ``h0``)."""


class StateSlicingRNN(StateSlicing, nn.RNN):
    """:class:`StateSlicing` ``nn.RNN`` (initial state ``h0``)."""


_STATE_SLICING: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.LSTM, StateSlicingLSTM),
    (nn.GRU, StateSlicingGRU),
    (nn.RNN, StateSlicingRNN),
)


def slice_state_(
    module: nn.Module, keep_hidden: Sequence[Sequence[int]], full_hidden_size: int
) -> None:
    """Make a module pruned by :func:`slice_rnn_` take its initial state at the width before
    pruning: its class becomes :class:`StateSlicingLSTM` (GRU, RNN), which keeps the entries
    ``keep_hidden`` (the same lists as for :func:`slice_rnn_`) of each layer and direction.

    >>> lstm = nn.LSTM(3, 4, num_layers=2)
    >>> slice_rnn_(lstm, [[0, 2], [1, 3]])
    >>> slice_state_(lstm, [[0, 2], [1, 3]], 4)
    >>> h0 = torch.zeros(2, 5, 4)  # (L, B, H before pruning)
    >>> lstm(torch.randn(7, 5, 3), (h0, h0))[0].shape
    torch.Size([7, 5, 2])
    """
    m = _check_module(module, single_layer=False)
    base = next((b for b, _ in _STATE_SLICING if type(m) is b), None)
    if base is None:
        raise TypeError(f"slice_state_ expects a plain nn.LSTM, nn.GRU or nn.RNN, got {type(m)}")
    rows = m.num_layers * (2 if m.bidirectional else 1)
    idx = torch.as_tensor([list(k) for k in keep_hidden], dtype=torch.long)  # (L * D, k)
    if idx.dim() != 2 or idx.shape != (rows, m.hidden_size):
        raise ValueError(
            f"keep_hidden must hold {rows} index lists of {m.hidden_size} units (the pruned "
            f"hidden size), got shape {tuple(idx.shape)}"
        )
    if isinstance(full_hidden_size, bool) or not isinstance(full_hidden_size, int):
        raise TypeError(f"full_hidden_size must be an int, got {full_hidden_size!r}")
    if idx.numel() and not (int(idx.min()) >= 0 and int(idx.max()) < full_hidden_size):
        raise ValueError(f"keep_hidden holds units outside 0..{full_hidden_size - 1}")
    sliced: Any = dict(_STATE_SLICING)[base]
    m.__class__ = sliced
    m.register_buffer("state_index", idx.to(_ref(m).device), persistent=False)
    m.full_hidden_size = full_hidden_size
