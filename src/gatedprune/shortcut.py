"""Adaptive shortcut networks: every layer reads a gated concatenation of all earlier layers.

    h_l = act(norm(sum_{j<l} g_{l,j} * W_{l,j} h_j + b_l)) * u_l       (edge gates g, unit gates u)
    y   = sum_j g_{out,j} * V_j h_j + c                                 (gated read-out)

A closed edge removes the block ``W_{l,j}``; a closed unit removes its row of ``W_l`` and its
column in every consumer; a layer with no open input becomes a constant (folded into its
consumers), a layer with no open consumer disappears. See ``DESIGN.md`` section 2.
"""

from __future__ import annotations

import functools
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autodiff import CompiledFormula, refuse_create_graph
from .base import GatedModule
from .costs import ACT_FLOPS, BATCHNORM_FLOPS, FLOPS_PER_MAC, _adaptive_window_sum
from .gates import (
    Gate,
    GateKind,
    HardConcreteGate,
    _hc_eval,
    _hc_prob_open,
    _hc_sample,
    _same_hard_concrete,
    gate_is_open,
    gate_prob_open,
    gate_values,
    resolve_gate,
)
from .layout import (
    ACTIVATIONS,
    Activation,
    LayerSpec,
    NetSpec,
    check_activation,
    check_flag,
    check_int,
    check_sizes,
)
from .plain import OffsetConv1d, PlainShortcutNet, _PlainLayer, check_input_dtype
from .pooling import adaptive_mean_pool1d, mean_pool1d

__all__ = ["LATENCY_FEATURES", "ShortcutConv1d", "ShortcutMLP"]


def _flat_values(gates: Sequence[Gate]) -> Tensor:
    """``torch.cat(gate_values(gates))`` without splitting and concatenating again (the same
    values and random draws; fewer autograd nodes in every training step)."""
    beta = _same_hard_concrete(gates)
    if beta is None or not gates[0].training:
        return torch.cat(gate_values(gates))  # (n_gates,)
    log_alpha = torch.cat([cast(HardConcreteGate, g).log_alpha for g in gates])  # (n_gates,)
    return _hc_sample(log_alpha, beta)


@torch.no_grad()
def _flat_is_open(gates: Sequence[Gate]) -> Tensor:
    """``torch.cat(gate_is_open(gates))``, likewise in one pass (no split and re-join)."""
    if _same_hard_concrete(gates) is None:
        return torch.cat(gate_is_open(gates))  # (n_gates,) bool
    log_alpha = torch.cat([cast(HardConcreteGate, g).log_alpha for g in gates])  # (n_gates,)
    return _hc_eval(log_alpha) > 0  # (n_gates,) bool


def _identity(t: Tensor) -> Tensor:
    """The ``"identity"`` activation, picklable (unlike a lambda)."""
    return t


def _prod(xs: Iterable[Any]) -> Any:
    out: Any = 1.0
    for x in xs:
        out = x * out
    return out


class _GatedLayer(nn.Module):
    src_widths: Tensor

    def __init__(
        self, spec: NetSpec, index: int, gate_kind: GateKind, edge_gated: bool, unit_group: int
    ) -> None:
        super().__init__()
        layer = spec.layers[index]
        kind = resolve_gate(gate_kind)
        widths = [spec.node_width(j) for j in layer.sources]
        n_in = sum(widths)
        self.op: nn.Linear | nn.Conv1d
        if spec.spatial:
            self.op = nn.Conv1d(n_in, layer.width, spec.kernel_size, padding=spec.kernel_size // 2)
        else:
            self.op = nn.Linear(n_in, layer.width)
        self.norm = nn.BatchNorm1d(layer.width) if spec.norm else None
        self.edge_gate: Gate | None = kind.make(len(widths)) if edge_gated else None
        self.unit_gate: Gate = kind.make(layer.width, group=unit_group)
        self.register_buffer("src_widths", torch.tensor(widths, dtype=torch.long), persistent=False)


def _unpack(
    spec: NetSpec, z: Sequence[Any]
) -> tuple[list[Any], list[Any], list[list[Any]], list[Any]]:
    n_layers = len(spec.layers)
    S, o = list(z[:n_layers]), list(z[n_layers : 2 * n_layers])
    pos = 2 * n_layers
    E = []
    for layer in spec.layers:
        E.append(list(z[pos : pos + len(layer.sources)]))
        pos += len(layer.sources)
    return S, o, E, list(z[pos:])


def _liveness(
    spec: NetSpec, S_l: list[Any], o_l: list[Any], E: list[list[Any]], H: list[Any]
) -> tuple[list[Any], list[Any], list[Any], list[Any], list[Any], list[Any]]:
    """Per node: expected open count S, P(some unit open) o, P(depends on the input) N,
    P(alive: depends on the input and is read by a live consumer) A, P(some source that
    depends on the input reaches it through an open edge) Ni (so N = Ni o) and P(read by a live
    consumer, given that it is live) R (so A = N R). Exact 0/1 at hard gates; products assume
    independent gates otherwise. Works on floats and on :class:`~gatedprune.autodiff.Var`
    alike.

    Expectations of counts use Ni and R rather than N and A: an open count S is positive only
    if some unit is open (``E[S 1{some open}] = E[S]``), and once a node is live a consumer
    that reads it through an open edge has an input, so neither event may be counted twice."""
    S: list[Any] = [float(spec.in_width), *S_l]
    o: list[Any] = [1.0, *o_l]
    N: list[Any] = [1.0]
    Ni: list[Any] = [1.0]
    for i, layer in enumerate(spec.layers):
        no_input = _prod(1 - e * N[j] for e, j in zip(E[i], layer.sources, strict=True))
        Ni.append(1 - no_input)
        N.append((1 - no_input) * o[i + 1])
    n_nodes = len(spec.layers) + 1
    unread: list[Any] = [1.0] * n_nodes
    for h, j in zip(H, spec.head_sources, strict=True):
        unread[j] = unread[j] * (1 - h)
    A: list[Any] = [1.0] * n_nodes
    R: list[Any] = [1.0] * n_nodes
    for node in range(n_nodes - 1, -1, -1):
        R[node] = 1 - unread[node]
        A[node] = N[node] * R[node]
        if node > 0:
            # a consumer of a live source has an input: it is alive if some unit is open and
            # something live reads it
            live_if_read = o[node] * R[node]
            for e, j in zip(E[node - 1], spec.layers[node - 1].sources, strict=True):
                unread[j] = unread[j] * (1 - e * live_if_read)
    return S, o, N, A, Ni, R


LATENCY_FEATURES = ("const", "layers", "edges", "macs", "in_elements", "out_elements", "pooled")
"""What :class:`~gatedprune.latency.LatencyModel` predicts latency from, per sample of the pruned
network: a constant, its layers, its edges (layer inputs and read-out sources), the
multiply-accumulates of its layers, the input elements its layers read (concatenated
sources: a copy each), their output elements (normalisation, activation) and the source
elements pooled for shortcuts across stages."""


def _cost_formula(spec: NetSpec, input_shape: Sequence[int], z: Sequence[Any]) -> list[Any]:
    """[flops, params] of the pruned network implied by the summary ``z`` (see
    :meth:`_ShortcutNet._summary`); mirrors exactly what :meth:`_ShortcutNet.pruned_module`
    builds."""
    terms = _cost_terms(spec, input_shape, z, features=False)
    return [terms["flops"], terms["params"]]


def _latency_formula(
    spec: NetSpec, input_shape: Sequence[int], z: Sequence[Any], coef: Sequence[float]
) -> list[Any]:
    """[latency] of the pruned network implied by ``z``: ``sum(coef * features)`` over
    ``LATENCY_FEATURES``."""
    terms = _cost_terms(spec, input_shape, z, features=True)
    total: Any = 0.0
    for name, c in zip(LATENCY_FEATURES, coef, strict=True):
        if c != 0.0:
            total = total + terms[name] * c
    return [total]


def _cost_terms(
    spec: NetSpec, input_shape: Sequence[int], z: Sequence[Any], *, features: bool
) -> dict[str, Any]:
    """FLOPs (for the batch of ``input_shape``), params and, with ``features``, the
    per-sample ``LATENCY_FEATURES`` of the pruned network implied by ``z``; exact at hard
    gates, expectations under independence otherwise. Works on floats and on
    :class:`~gatedprune.autodiff.Var` alike."""
    S_l, o_l, E, H = _unpack(spec, z)
    S, o, N, A, Ni, R = _liveness(spec, S_l, o_l, E, H)
    batch = int(input_shape[0])
    length0 = int(input_shape[2]) if spec.spatial else 1
    k = spec.kernel_size if spec.spatial else 1
    elem_flops = (BATCHNORM_FLOPS if spec.norm else 0) + (
        0 if spec.activation == "identity" else ACT_FLOPS
    )
    flops: Any = 0.0
    params: Any = 0.0
    f: dict[str, Any] = dict.fromkeys(LATENCY_FEATURES, 0.0)
    f["const"] = 1.0
    for i, layer in enumerate(spec.layers):
        node = i + 1
        positions = spec.stage_length(length0, layer.stage) if spec.spatial else 1
        n_in: Any = 0.0
        for e, j in zip(E[i], layer.sources, strict=True):
            n_in = n_in + e * (Ni[j] * S[j])
        live = o[node] * R[node]  # alive, given a live source reaches it
        out = Ni[node] * R[node] * S[node]  # open units of the layer if alive
        weights = n_in * (R[node] * S[node]) * k
        flops = flops + weights * (FLOPS_PER_MAC * positions) + out * positions
        flops = flops + out * (elem_flops * positions)
        params = params + weights + out * (3 if spec.norm else 1)
        if spec.spatial:
            no_const = _prod(
                1 - e * ((1 - N[j]) * o[j])
                for e, j in zip(E[i], layer.sources, strict=True)
                if j > 0
            )
            flops = flops + (1 - no_const) * out * positions
        if features:
            f["layers"] = f["layers"] + A[node]
            for e, j in zip(E[i], layer.sources, strict=True):
                f["edges"] = f["edges"] + e * N[j] * live
            f["macs"] = f["macs"] + weights * positions
            f["in_elements"] = f["in_elements"] + n_in * live * positions
            f["out_elements"] = f["out_elements"] + out * positions
    if spec.spatial:
        for j, stage in spec.pool_pairs():
            unused = _prod(
                1 - E[i][layer.sources.index(j)] * o[i + 1] * R[i + 1]
                for i, layer in enumerate(spec.layers)
                if layer.stage == stage and j in layer.sources
            )
            pooled = Ni[j] * (1 - unused) * S[j]
            read = spec.stage_length(length0, spec.node_stage(j))
            flops = flops + pooled * (
                2 ** (stage - spec.node_stage(j)) * spec.stage_length(length0, stage)
            )
            if features:
                f["pooled"] = f["pooled"] + pooled * read
    head_in: Any = 0.0
    for h, j in zip(H, spec.head_sources, strict=True):
        read = h * Ni[j] * S[j]
        head_in = head_in + read * spec.head_pool
        if features:
            f["edges"] = f["edges"] + h * N[j]
        if spec.spatial:
            node_len = spec.stage_length(length0, spec.node_stage(j))
            flops = flops + read * _adaptive_window_sum(node_len, spec.head_pool)
    flops = flops + head_in * (FLOPS_PER_MAC * spec.out_features) + spec.out_features
    params = params + head_in * spec.out_features + spec.out_features
    return {"flops": flops * batch, "params": params, **(f if features else {})}


def _summary_size(spec: NetSpec) -> int:
    return 2 * len(spec.layers) + sum(len(x.sources) for x in spec.layers) + len(spec.head_sources)


@functools.lru_cache(maxsize=64)
def _compiled_cost(spec: NetSpec, input_shape: tuple[int, ...]) -> CompiledFormula:
    """:func:`_cost_formula` for one structure and input shape, compiled (traced once)."""
    return CompiledFormula(lambda z: _cost_formula(spec, input_shape, z), _summary_size(spec))


@functools.lru_cache(maxsize=16)
def _compiled_latency(
    spec: NetSpec, input_shape: tuple[int, ...], coef: tuple[float, ...]
) -> CompiledFormula:
    """:func:`_latency_formula` for one structure, input shape and coefficients, compiled."""
    return CompiledFormula(
        lambda z: _latency_formula(spec, input_shape, z, coef), _summary_size(spec)
    )


class _ExpectedCost(torch.autograd.Function):
    """``[flops, params]`` (float64) from all gates' open probabilities ``p``, concatenated in
    :meth:`_ShortcutNet._gate_list` order. Computes what :meth:`_ShortcutNet._summary` and
    :func:`_cost_formula` compute, with the same float operations, as one autograd node: the
    summary without recording, the formula's values and Jacobian by its compiled code, and the
    gradient w.r.t. ``p`` in a few vector ops."""

    @staticmethod
    def forward(ctx: Any, p: Tensor, net: _ShortcutNet, formula: CompiledFormula) -> Tensor:
        return _expected_forward(ctx, p, net, formula)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        return _expected_backward(ctx, grad_out).to(ctx.p_dtype), None, None


class _ExpectedCostHC(torch.autograd.Function):
    """:class:`_ExpectedCost` of hard concrete gates (ungrouped, one ``beta``) from their
    ``log_alpha`` tensors: the open probabilities are computed inside, and the backward returns
    each tensor's gradient as a view of one vector. Same values and gradient bits as
    ``_ExpectedCost(_hc_prob_open(torch.cat(log_alphas)))`` (the sigmoid's gradient by the same
    ATen kernel), with one autograd node instead of four and no per-gate ``narrow`` in every
    training step's backward."""

    @staticmethod
    def forward(
        ctx: Any, net: _ShortcutNet, formula: CompiledFormula, beta: float, *log_alphas: Tensor
    ) -> Tensor:
        p = _hc_prob_open(torch.cat(log_alphas), beta)  # (n_gates,)
        ctx.p = p
        ctx.sizes = [t.numel() for t in log_alphas]
        return _expected_forward(ctx, p, net, formula)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        p: Tensor = ctx.p
        g_p = _expected_backward(ctx, grad_out).to(p.dtype)  # (n_gates,)
        g = torch.ops.aten.sigmoid_backward(g_p, p)  # (n_gates,) as SigmoidBackward0
        return (None, None, None, *torch.split(g, ctx.sizes))


def _expected_forward(ctx: Any, p: Tensor, net: _ShortcutNet, formula: CompiledFormula) -> Tensor:
    seg = net.unit_segment
    n_units, n_layers = seg.numel(), len(net.spec.layers)
    pd = p.detach().double()  # (n_gates,)
    pu = pd[:n_units]  # (sum of widths,)
    S = pu.new_zeros(n_layers).index_add(0, seg, pu)  # (L,) expected open units
    clamped = pu.clamp(max=1.0 - 1e-12)
    # P(all units of a layer closed) = prod over its gates of (1 - p), as a segment sum of
    # logs; a gate shared by a group of g units appears g times, each weighted 1/g
    log_closed = torch.log1p(-clamped) / net.unit_group  # (sum of widths,)
    closed = torch.exp(pu.new_zeros(n_layers).index_add(0, seg, log_closed))  # (L,) P(all closed)
    edges = torch.cat([pd[n_units:], pd.new_ones(1)])[net.edge_slot]  # (n_edges + n_head,)
    z = torch.cat([S, 1 - closed, edges])  # (2 L + n_edges + n_head,)
    values, jac = formula(z.tolist())
    jac_t = torch.tensor(jac, dtype=pd.dtype, device=pd.device)  # (2, 2 L + n_edges + n_head)
    ctx.save_for_backward(jac_t, clamped, closed, pu <= 1.0 - 1e-12)
    ctx.net = net
    ctx.p_dtype = p.dtype
    ctx.n_edge_gates = p.numel() - n_units
    return torch.tensor(values, dtype=pd.dtype, device=pd.device)  # (2,)


def _expected_backward(ctx: Any, grad_out: Tensor) -> Tensor:
    """The float64 gradient w.r.t. ``p`` of :func:`_expected_forward`'s output."""
    refuse_create_graph()
    jac, clamped, closed, unclamped = ctx.saved_tensors
    net: _ShortcutNet = ctx.net
    seg = net.unit_segment
    n_layers = len(net.spec.layers)
    gz = grad_out @ jac  # (2 L + n_edges + n_head,)
    g_S, g_o, g_e = gz[:n_layers], gz[n_layers : 2 * n_layers], gz[2 * n_layers :]
    # d o / d p_u = closed / (g (1 - p_u)) for a unit whose gate is shared by g units (the
    # group's g copies sum to prod_{other gates} (1 - p)); zero where p was clamped
    g_o_units = (g_o * closed)[seg] / (net.unit_group * (1 - clamped))  # (sum of widths,)
    g_units = g_S[seg] + torch.where(unclamped, g_o_units, 0.0)  # (sum of widths,)
    # (n_edge_gates,)
    g_edges = gz.new_zeros(ctx.n_edge_gates + 1).index_add(0, net.edge_slot, g_e)[:-1]
    return torch.cat([g_units, g_edges])  # (n_gates,)


def _expected_apply(net: _ShortcutNet, formula: CompiledFormula) -> Tensor:
    """The expected ``formula`` outputs of ``net``'s gates (one autograd node)."""
    gates = net._gate_list()
    beta = _same_hard_concrete(gates)
    out: Tensor
    if beta is None:
        p = torch.cat(gate_prob_open(gates))  # (n_gates,)
        out = _ExpectedCost.apply(p, net, formula)  # type: ignore[no-untyped-call]
    else:
        log_alphas = [cast(HardConcreteGate, g).log_alpha for g in gates]
        out = _ExpectedCostHC.apply(net, formula, beta, *log_alphas)  # type: ignore[no-untyped-call]
    return out


_OP_ATTRS = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)


def _check_attrs(what: str, m: nn.Module, expected: dict[str, object], hint: str) -> None:
    """``ValueError`` naming every attribute of ``m`` (``"weight.shape"``: of its weight)
    that differs from ``expected``."""
    wrong = []
    for name, want in expected.items():
        owner, _, attr = name.rpartition(".")
        got = getattr(getattr(m, owner) if owner else m, attr)
        got = tuple(got) if isinstance(got, torch.Size) else got
        if got != want:
            wrong.append(f"{name}={got!r}, expected {want!r}")
    if wrong:
        raise ValueError(f"{what} has {'; '.join(wrong)} (the network's spec: {hint})")


class _ShortcutNet(GatedModule):
    """Shared engine of :class:`ShortcutMLP` and :class:`ShortcutConv1d`."""

    head_widths: Tensor
    col_unit: Tensor
    col_edge: Tensor
    unit_segment: Tensor
    edge_slot: Tensor

    def __init__(self, spec: NetSpec, gate: GateKind, shortcuts: bool, unit_group: int = 1) -> None:
        super().__init__()
        spec.validate()
        resolve_gate(gate)  # clear error for unknown kinds before building anything
        group: object = unit_group  # numpy integers accepted, as for the sizes
        if isinstance(group, bool) or not isinstance(group, numbers.Integral):
            raise TypeError(f"unit_group must be a positive int, got {unit_group!r}")
        if group < 1:
            raise ValueError(f"unit_group must be a positive int, got {unit_group!r}")
        unit_group = int(group)
        for i, layer in enumerate(spec.layers):
            if layer.width % unit_group:
                raise ValueError(
                    f"unit_group={unit_group} must divide every layer's width; layer {i} has "
                    f"{layer.width}"
                )
        self.spec = spec
        self.shortcuts = shortcuts
        self.unit_group = unit_group
        self.layers = nn.ModuleList(
            [_GatedLayer(spec, i, gate, shortcuts, unit_group) for i in range(len(spec.layers))]
        )
        head_widths = [spec.node_width(j) * spec.head_pool for j in spec.head_sources]
        self.head = nn.Linear(sum(head_widths), spec.out_features)
        self.head_gate: Gate | None = (
            resolve_gate(gate).make(len(head_widths)) if shortcuts else None
        )
        self.register_buffer(
            "head_widths", torch.tensor(head_widths, dtype=torch.long), persistent=False
        )
        # Column scales of every layer's input and of the head's (head channels repeated
        # head_pool times), as the product of two gathers from [1, every gate value in
        # _gate_list order]: the source unit's gate (the 1 for the input's channels) and the
        # edge's gate (the 1 where there is none).
        n_units = sum(layer.width for layer in spec.layers)
        unit_start = [0, 1]  # node j >= 1: its first unit gate's position
        for layer in spec.layers[:-1]:
            unit_start.append(unit_start[-1] + layer.width)
        col_unit: list[int] = []
        col_edge: list[int] = []
        self.col_sizes: list[int] = []
        edge_start = 1 + n_units
        readers = [
            (x.sources, cast(_GatedLayer, m).edge_gate, 1)
            for x, m in zip(spec.layers, self.layers, strict=True)
        ]
        readers.append((spec.head_sources, self.head_gate, spec.head_pool))
        for sources, edge_gate, repeat in readers:
            for e, j in enumerate(sources):
                for k in range(spec.node_width(j)):
                    unit = 0 if j == 0 else unit_start[j] + k
                    edge = 0 if edge_gate is None else edge_start + e
                    col_unit += [unit] * repeat
                    col_edge += [edge] * repeat
            self.col_sizes.append(sum(spec.node_width(j) for j in sources) * repeat)
            edge_start += 0 if edge_gate is None else len(sources)
        self.register_buffer("col_unit", torch.tensor(col_unit, dtype=torch.long), persistent=False)
        self.register_buffer("col_edge", torch.tensor(col_edge, dtype=torch.long), persistent=False)
        self.edge_gated = any(edge > 0 for edge in col_edge)
        segment = [i for i, layer in enumerate(spec.layers) for _ in range(layer.width)]
        self.register_buffer(
            "unit_segment", torch.tensor(segment, dtype=torch.long), persistent=False
        )
        # For every edge of the cost summary (layer by layer, then the head): its position among
        # the edge and head gates in _gate_list order, or one past them where there is no gate.
        gated = [cast(_GatedLayer, x).edge_gate is not None for x in self.layers]
        n_edge_gates = sum(len(x.sources) for x, g in zip(spec.layers, gated, strict=True) if g)
        n_edge_gates += len(spec.head_sources) if self.head_gate is not None else 0
        slots: list[int] = []
        pos = 0
        for n, g in [(len(x.sources), g) for x, g in zip(spec.layers, gated, strict=True)] + [
            (len(spec.head_sources), self.head_gate is not None)
        ]:
            slots += range(pos, pos + n) if g else [n_edge_gates] * n
            pos += n if g else 0
        self.register_buffer("edge_slot", torch.tensor(slots, dtype=torch.long), persistent=False)
        self._hard_costs: dict[tuple[tuple[int, ...], bytes], tuple[float, float]] = {}
        self._hard_latencies: dict[tuple[tuple[int, ...], tuple[float, ...], bytes], float] = {}
        # a module-level function, not the table's lambda: the network must pickle (torch.save)
        self._act = _identity if spec.activation == "identity" else ACTIVATIONS[spec.activation][0]

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: object) -> Tensor:
        spec = self.spec
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got dtype {x.dtype}")
        if spec.spatial:
            min_len = 2 ** max((s.stage for s in spec.layers), default=0)
            if x.dim() != 3 or x.shape[1] != spec.in_width or x.shape[2] < min_len:
                raise ValueError(
                    f"expected input of shape (B, {spec.in_width}, L) with L >= {min_len}, "
                    f"got {tuple(x.shape)}"
                )
        elif x.dim() != 2 or x.shape[1] != spec.in_width:
            raise ValueError(f"expected input of shape (B, {spec.in_width}), got {tuple(x.shape)}")
        if x.dtype != self.head.weight.dtype:  # one comparison per forward when they agree
            check_input_dtype(x, self.head.weight)
        return x

    def _gather(self, hs: list[Tensor], index: int, cache: dict[tuple[int, int], Tensor]) -> Tensor:
        spec = self.spec
        stage = spec.layers[index].stage
        parts = []
        for j in spec.layers[index].sources:
            s_j = spec.node_stage(j)
            if s_j < stage:
                key = (j, stage)
                if key not in cache:
                    f = 2 ** (stage - s_j)
                    cache[key] = mean_pool1d(hs[j], f)  # (B, C_j, L_stage)
                parts.append(cache[key])
            else:
                parts.append(hs[j])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, sum C, L)

    def _colscales(self, values: Tensor) -> list[Tensor]:
        """Per layer, then for the head: the scale of every input column (the source unit's
        gate times the edge's gate), from all gates' values in :meth:`_gate_list` order."""
        v = torch.cat([values.new_ones(1), values])  # (1 + n_gates,)
        scale = v[self.col_unit]  # (sum of all readers' input columns,)
        if self.edge_gated:
            scale = scale * v[self.col_edge]
        return list(torch.split(scale, self.col_sizes))  # per layer, then the head: (n_cols,)

    def _preact(self, index: int, inp: Tensor, colscale: Tensor) -> Tensor:
        """Layer input -> pre-normalisation output. Source unit gates and edge gates
        (``colscale``, one per input channel) scale the input columns: of the weight or of the
        input, whichever is smaller (the same product; this keeps the gated step close to the
        plain one for wide MLPs and for CNNs alike)."""
        layer = cast(_GatedLayer, self.layers[index])
        w = layer.op.weight
        spatial = self.spec.spatial
        per_column = colscale[None, :, None] if spatial else colscale[None, :]
        if inp.numel() < w.numel():
            inp = inp * per_column  # (B, sum C, L) or (B, sum C)
        else:
            w = w * per_column
        if spatial:
            k = self.spec.kernel_size
            return F.conv1d(inp, w, layer.op.bias, padding=k // 2)  # (B, C, L)
        return F.linear(inp, w, layer.op.bias)  # (B, C)

    def _post(self, index: int, z: Tensor) -> Tensor:
        """Normalisation and activation. The layer's unit gates are applied by its consumers."""
        layer = cast(_GatedLayer, self.layers[index])
        if layer.norm is not None:
            z = layer.norm(z)
        return self._act(z)  # (B, C, L) or (B, C)

    def _head(self, hs: list[Tensor], colscale: Tensor) -> Tensor:
        spec = self.spec
        feats = []
        for j in spec.head_sources:
            h = hs[j]
            if spec.spatial:
                h = torch.flatten(adaptive_mean_pool1d(h, spec.head_pool), 1)  # (B, C_j * P)
            feats.append(h)
        feat = feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)  # (B, sum C_j * P)
        return F.linear(feat, self.head.weight * colscale[None, :], self.head.bias)  # (B, out)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs ``(B, out_features)`` for ``x`` of shape ``(B, in_features)`` (MLP) or
        ``(B, in_channels, L)`` (Conv1d), each gate multiplying what it gates (sampled gate
        values in training, deterministic ones in eval mode).

        >>> ShortcutConv1d(1, [[4]], 2, input_length=8)(torch.randn(3, 1, 8)).shape
        torch.Size([3, 2])
        """
        x = self._check_input(x)
        self._check_ops()  # a replaced op of other settings would be computed with the spec's
        hs: list[Tensor] = [x]
        cache: dict[tuple[int, int], Tensor] = {}
        values = _flat_values(self._gate_list())  # (n_gates,)
        if values.dtype != x.dtype:  # x has the weights' dtype (checked above)
            self._check_gate_dtype()
        scales = self._colscales(values)
        for i in range(len(self.layers)):
            z = self._preact(i, self._gather(hs, i, cache), scales[i])
            hs.append(self._post(i, z))
        return self._head(hs, scales[-1])

    def _check_gate_dtype(self) -> None:
        """Refuse gates of another floating dtype than the weights (e.g. ``gate.double()`` on
        a float32 network), which would fail deep in a matmul or silently promote."""
        want = self.head.weight.dtype
        for name, p in self.named_parameters():
            owner = self.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, Gate) and p.dtype != want:
                raise ValueError(
                    f"gate parameter {name!r} is {p.dtype}, but the network's weights are "
                    f"{want}: convert the whole network with .to(dtype)"
                )

    def _gate_list(self) -> list[Gate]:
        """Every gate module: the layers' unit gates, their edge gates, the head's. Read from
        the module dictionaries (no ``nn.Module.__getattr__``: every training step asks for
        this list three times; ~16 us -> ~3 us for 6 layers)."""
        layers = [layer._modules for layer in cast(nn.Module, self._modules["layers"]).children()]
        gates = [cast(Gate, m["unit_gate"]) for m in layers]
        gates += [cast(Gate, m["edge_gate"]) for m in layers if m.get("edge_gate") is not None]
        head = self._modules.get("head_gate")
        if head is not None:
            gates.append(cast(Gate, head))
        return gates

    def width_gates(self) -> list[Gate]:
        """The layers' unit/channel gates."""
        return [cast(_GatedLayer, layer).unit_gate for layer in self.layers]

    def _gate_values(
        self, compute: Callable[[Sequence[Gate]], list[Tensor]]
    ) -> tuple[list[Tensor], list[Tensor | None], Tensor | None]:
        """Per layer unit and edge gate values and the head's, all computed by one call."""
        layers = [cast(_GatedLayer, layer) for layer in self.layers]
        values = iter(compute(self._gate_list()))
        units = [next(values) for _ in layers]
        edges = [next(values) if layer.edge_gate is not None else None for layer in layers]
        head = next(values) if self.head_gate is not None else None
        return units, edges, head

    # ------------------------------------------------------------------ structure
    def _summary(self, hard: bool) -> tuple[Tensor, list[float]]:
        """Everything the cost depends on, as one float64 vector ``z`` (and its values):
        per layer the expected open units ``S_l = sum p`` and ``o_l = P(some unit open)``,
        then every edge's open probability, then the head's. Exact 0/1 decisions with
        ``hard`` (missing gates of plain chains count as open). :class:`_ExpectedCost` computes
        the soft summary the same way without recording it; this one is its reference."""
        if hard:
            with torch.no_grad():
                units, edges, head = self._gate_values(gate_is_open)
        else:
            units, edges, head = self._gate_values(gate_prob_open)
        ref = self.head.weight
        p_units = torch.cat(units).double()  # (sum of widths,)
        n_layers = len(self.layers)
        seg = self.unit_segment
        S = p_units.new_zeros(n_layers).index_add(0, seg, p_units)  # (L,) expected open units
        # P(some unit open) = 1 - prod(1 - p), as a segment sum of logs (p kept below 1)
        if hard:  # exact decisions: some unit is open iff the count is positive
            o = (S > 0).double()  # (L,)
        else:
            # a gate shared by g units appears g times: each copy's log weighs 1/g
            log_closed = torch.log1p(-p_units.clamp(max=1.0 - 1e-12)) / self.unit_group
            o = 1 - torch.exp(p_units.new_zeros(n_layers).index_add(0, seg, log_closed))  # (L,)
        parts: list[Tensor] = [S, o]
        for e, layer in zip(edges, self.spec.layers, strict=True):
            parts.append(ref.new_ones(len(layer.sources)) if e is None else e)  # (n_sources,)
        # (n_head_sources,)
        parts.append(ref.new_ones(len(self.spec.head_sources)) if head is None else head)
        z = torch.cat([p.double() for p in parts])  # (2 L + n_edges + n_head,)
        return z, z.detach().tolist()

    def _check_cost_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """``input_shape`` as ints, if it is a shape :meth:`forward` accepts: ``(B, F)`` or
        ``(B, C, L)`` with ``L`` at least ``2 ** last stage`` (a wrong shape would otherwise
        give a cost for some other network, or a negative one)."""
        spec = self.spec
        try:
            shape = tuple(operator.index(d) for d in input_shape)
        except TypeError:
            raise TypeError(
                f"input_shape must be a sequence of ints, got {input_shape!r}"
            ) from None
        min_len = 2 ** max((s.stage for s in spec.layers), default=0)
        if spec.spatial:
            ok = len(shape) == 3 and shape[1] == spec.in_width and shape[2] >= min_len
            expected = f"(B, {spec.in_width}, L) with L >= {min_len}"
        else:
            ok = len(shape) == 2 and shape[1] == spec.in_width
            expected = f"(B, {spec.in_width})"
        if not ok or shape[0] < 0:
            raise ValueError(f"expected an input_shape {expected} and B >= 0, got {input_shape!r}")
        self._check_ops()  # the cost is the spec's: a replaced op must match it
        return shape

    def expected_cost(
        self, input_shape: Sequence[int], *, hard: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(flops, params)`` as 0-dim float64 tensors for an input of ``input_shape``
        (``(B, F)`` or ``(B, C, L)``): expected under the gates' open probabilities
        (differentiable), or with ``hard`` the exact cost of ``prune(net)``.

        >>> net = ShortcutMLP(4, [6], 2)
        >>> [float(c) for c in net.expected_cost((1, 4), hard=True)]  # every gate open
        [102.0, 52.0]
        >>> net.expected_cost((1, 4))[0].requires_grad
        True
        """
        shape = self._check_cost_shape(input_shape)
        if hard:
            hard_flops, hard_params = self._hard_cost(shape)
            return torch.tensor(hard_flops, dtype=torch.float64), torch.tensor(
                hard_params, dtype=torch.float64
            )
        out = _expected_apply(self, _compiled_cost(self.spec, shape))
        flops, params = out.unbind()
        return flops, params

    def expected_latency(
        self, input_shape: Sequence[int], coef: Sequence[float], *, hard: bool = False
    ) -> Tensor:
        """``sum(coef * features)`` of the pruned network over ``LATENCY_FEATURES`` (see
        :class:`~gatedprune.latency.LatencyModel`), as a differentiable float64 scalar: the
        expectation under the gates' open probabilities, or with ``hard`` at the exact
        decisions (then equal to the features of ``prune(self)``).

        >>> net = ShortcutMLP(4, [3], 2)
        >>> float(net.expected_latency((1, 4), [1.0, 0, 0, 0, 0, 0, 0], hard=True))
        1.0
        """
        shape = self._check_cost_shape(input_shape)
        c = tuple(float(x) for x in coef)
        if len(c) != len(LATENCY_FEATURES):
            raise ValueError(f"expected {len(LATENCY_FEATURES)} coefficients, got {len(c)}")
        if hard:
            is_open = _flat_is_open(self._gate_list())  # (n_gates,) bool
            key = (shape, c, is_open.cpu().numpy().tobytes())
            # (a network unpickled from before latency budgets has no cache yet)
            cache = self.__dict__.setdefault("_hard_latencies", {})
            cached = cache.get(key)
            if cached is None:
                _, values = self._summary(True)
                cached = float(_latency_formula(self.spec, shape, values, c)[0])
                if len(cache) >= 256:  # bounded, as the hard costs
                    cache.clear()
                cache[key] = cached
            return torch.tensor(cached, dtype=torch.float64)
        out = _expected_apply(self, _compiled_latency(self.spec, shape, c))
        latency: Tensor = out[0]
        return latency

    def _hard_cost(self, shape: tuple[int, ...]) -> tuple[float, float]:
        """Cost at the exact decisions, cached by the decisions (they change only when a gate
        flips; computing them is cheap, the summary and formula are not)."""
        is_open = _flat_is_open(self._gate_list())  # (n_gates,) bool
        key = (shape, is_open.cpu().numpy().tobytes())
        cached = self._hard_costs.get(key)
        if cached is None:
            _, values = self._summary(True)
            flops, params = _cost_formula(self.spec, shape, values)
            cached = (float(flops), float(params))
            if len(self._hard_costs) >= 256:  # bounded: gates flip back and forth in training
                self._hard_costs.clear()
            self._hard_costs[key] = cached
        return cached

    def _hard_liveness(
        self,
    ) -> tuple[list[bool], list[bool], list[bool], list[list[bool]], list[bool]]:
        """Exact decisions: per node some-unit-open, depends-on-input, alive; edges; head."""
        _, values = self._summary(True)
        S_l, o_l, E, H = _unpack(self.spec, values)
        _, o, N, A, _, _ = _liveness(self.spec, S_l, o_l, E, H)
        return (
            [x > 0.5 for x in o],
            [x > 0.5 for x in N],
            [x > 0.5 for x in A],
            [[x > 0.5 for x in row] for row in E],
            [x > 0.5 for x in H],
        )

    @torch.no_grad()
    def connectivity(self) -> dict[str, Any]:
        """What survives pruning: per layer its kept units, kept incoming edges and whether it is
        alive, plus totals (JSON-able; used by the demo's table and plots).

        >>> net = ShortcutMLP(4, [3, 3], 2)
        >>> net.connectivity()["layers_total"]
        2
        """
        spec = self.spec
        _, nonconst, alive_node, open_edges, open_head = self._hard_liveness()
        edges, units, head = self._eval_values()
        layers: list[dict[str, Any]] = []
        for i, layer in enumerate(spec.layers):
            alive = alive_node[i + 1]
            kept = [alive and open_edges[i][e] and nonconst[j] for e, j in enumerate(layer.sources)]
            e_vals = edges[i]
            layers.append(
                {
                    "stage": layer.stage,
                    "width": layer.width,
                    "kept_units": int((units[i] > 0).sum()) if alive else 0,
                    "alive": alive,
                    "sources": list(layer.sources),
                    "edge_values": [1.0] * len(layer.sources)
                    if e_vals is None
                    else [float(v) for v in e_vals],
                    "edges_kept": kept,
                }
            )
        head_kept = [open_head[h] and nonconst[j] for h, j in enumerate(spec.head_sources)]
        n_edges = sum(len(layer.sources) for layer in spec.layers) + len(spec.head_sources)
        kept_layers = [bool(x["alive"]) for x in layers]
        kept_units_per_layer = [int(x["kept_units"]) for x in layers]
        kept_edges = sum(sum(bool(k) for k in x["edges_kept"]) for x in layers)
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
            "layers_kept": sum(kept_layers),
            "units_total": sum(layer.width for layer in spec.layers),
            "units_kept": sum(kept_units_per_layer),
            "edges_total": n_edges,
            "edges_kept": kept_edges + sum(head_kept),
        }

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def pruned_module(self) -> PlainShortcutNet:
        """The plain network computing this one's eval-mode function, in this network's
        train/eval mode (each BatchNorm in its counterpart's mode). Built in eval mode; every
        submodule's own mode is restored afterwards (a frozen BatchNorm stays frozen)."""
        self._check_gate_dtype()
        self._check_layer_modules()
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            plain = self._build_pruned()
        finally:
            for m, mode in modes:
                m.training = mode
        plain.train(self.training)
        kept = [cast(_GatedLayer, self.layers[i]).norm for i in self._kept_layer_indices()]
        for norm, target in zip(kept, plain.layers, strict=True):
            tn = cast(_PlainLayer, target).norm
            if norm is not None and tn is not None:
                tn.train(norm.training)
        return plain

    def _check_ops(self) -> None:
        """Refuse a layer op or head replaced by a module of other settings or shape.

        The gated forward, the cost and ``prune`` use only the ops' weights and biases, with
        the sizes, kernel size and padding of ``spec``: another stride, dilation, padding, ...
        would be silently ignored, another size gives a wrong cost or an unclear crash."""
        signature = self._op_signature()
        if self.__dict__.get("_ops_checked") == signature:  # the cost calls this every step
            return
        spec = self.spec
        hint = "replace its weights, not the module"
        for i, layer in enumerate(self.layers):
            op = cast(_GatedLayer, layer).op
            n_in = sum(spec.node_width(j) for j in spec.layers[i].sources)
            width = spec.layers[i].width
            op_type = nn.Conv1d if spec.spatial else nn.Linear
            if type(op) is not op_type or op.bias is None:
                raise TypeError(
                    f"layer {i}'s op is {op!r}; prune rebuilds a {op_type.__name__} with a "
                    f"bias ({hint})"
                )
            k = spec.kernel_size
            expected: dict[str, object] = (
                {
                    "in_channels": n_in,
                    "out_channels": width,
                    "kernel_size": (k,),
                    "stride": (1,),
                    "padding": (k // 2,),
                    "dilation": (1,),
                    "groups": 1,
                    "padding_mode": "zeros",
                    "weight.shape": (width, n_in, k),
                }
                if spec.spatial
                else {"in_features": n_in, "out_features": width, "weight.shape": (width, n_in)}
            )
            expected["bias.shape"] = (width,)
            _check_attrs(f"layer {i}'s op", op, expected, hint)
        n_head = int(self.head_widths.sum())
        if type(self.head) is not nn.Linear or self.head.bias is None:
            raise TypeError(
                f"the head is {self.head!r}; prune rebuilds an nn.Linear with a bias ({hint})"
            )
        head = {
            "in_features": n_head,
            "out_features": spec.out_features,
            "weight.shape": (spec.out_features, n_head),
            "bias.shape": (spec.out_features,),
        }
        _check_attrs("the head", self.head, head, hint)
        self.__dict__["_ops_checked"] = signature

    def _op_signature(self) -> tuple[object, ...]:
        """What :meth:`_check_ops` checks of every op and the head, read without the
        ``nn.Module`` attribute machinery (cheap enough for every cost evaluation)."""
        ops = [layer._modules["op"] for layer in self.layers._modules.values()]
        signature: list[object] = []
        for op in [*ops, self._modules["head"]]:
            d = op.__dict__ if op is not None else {}
            params = d.get("_parameters", {})
            w, b = params.get("weight"), params.get("bias")
            shapes = (None if w is None else w.shape, None if b is None else b.shape)
            signature.append((type(op), *shapes, *map(d.get, _OP_ATTRS)))  # map: no genexpr
        return tuple(signature)

    def _check_layer_modules(self) -> None:
        """Refuse layers whose modules were replaced by ones the plain network cannot rebuild
        (the forward calls a replaced normalisation, so dropping or re-creating it would
        silently change the function)."""
        spec = self.spec
        self._check_ops()
        for i, layer in enumerate(self.layers):
            gl = cast(_GatedLayer, layer)
            norm = gl.norm
            if not spec.norm:
                if norm is not None:
                    raise TypeError(
                        f"layer {i} was built without normalisation (norm=False) but holds "
                        f"{norm!r}; prune cannot rebuild it: construct the network with norm=True"
                    )
                continue
            if (
                type(norm) is not nn.BatchNorm1d
                or not norm.affine
                or norm.running_mean is None
                or norm.running_var is None
                or norm.num_features != spec.layers[i].width
            ):
                raise TypeError(
                    f"layer {i}'s norm is {norm!r}; prune rebuilds an affine "
                    f"BatchNorm1d({spec.layers[i].width}) with running statistics"
                )

    def _kept_layer_indices(self) -> list[int]:
        """The layers :meth:`_build_pruned` keeps (the alive ones), in order."""
        alive = self._hard_liveness()[2]
        return [i for i in range(len(self.spec.layers)) if alive[i + 1]]

    def _eval_values(self) -> tuple[list[Tensor | None], list[Tensor], Tensor | None]:
        edges: list[Tensor | None] = []
        units: list[Tensor] = []
        for layer in self.layers:
            layer = cast(_GatedLayer, layer)
            edges.append(layer.edge_gate.eval_value() if layer.edge_gate is not None else None)
            units.append(layer.unit_gate.eval_value())
        head = self.head_gate.eval_value() if self.head_gate is not None else None
        return edges, units, head

    def _build_pruned(self) -> PlainShortcutNet:
        spec = self.spec
        some_open, nonconst, alive, open_edges, open_head = self._hard_liveness()
        edges, units, head_edge = self._eval_values()
        ref = self.head.weight
        # per node (input first): (C_kept_j,) kept unit indices
        kept_units = [torch.arange(spec.in_width, device=ref.device)] + [
            torch.nonzero(u > 0).flatten() for u in units
        ]
        # per node: (C_j,)
        unit_scale = [torch.ones(spec.in_width, device=ref.device, dtype=ref.dtype), *units]

        def edge_val(e: Tensor | None, idx: int) -> Tensor:
            return e[idx] if e is not None else ref.new_ones(())  # ()

        # Constants: outputs of layers that do not depend on the input, for a batch of one.
        needs_consts = any(
            alive[i + 1]
            and any(
                not nonconst[j] and some_open[j] and open_edges[i][e]
                for e, j in enumerate(layer.sources)
            )
            for i, layer in enumerate(spec.layers)
        ) or any(
            not nonconst[j] and some_open[j] and open_head[h]
            for h, j in enumerate(spec.head_sources)
        )
        length = spec.input_length
        if spec.spatial and needs_consts and length is None:
            raise ValueError(
                "this gate state leaves a layer that computes a constant feeding live layers; "
                "folding it into a convolution needs the input length: construct "
                "ShortcutConv1d with input_length=..."
            )
        # without input_length no constant is folded, so any length the stages accept will do
        probe = length or 2 ** max((ls.stage for ls in spec.layers), default=0)
        shape = (1, spec.in_width, probe) if spec.spatial else (1, spec.in_width)
        hs: list[Tensor] = [ref.new_zeros(shape)]  # [(1, C_in, L) or (1, C_in)]
        pre: list[Tensor] = []
        cache: dict[tuple[int, int], Tensor] = {}
        # per layer, then the head: (n_cols,)
        scales = self._colscales(torch.cat([g.eval_value() for g in self._gate_list()]))
        for i in range(len(spec.layers)):
            z = self._preact(i, self._gather(hs, i, cache), scales[i])
            pre.append(z)
            h = self._post(i, z)
            hs.append(torch.zeros_like(h) if nonconst[i + 1] else h)
        head_const = self._head(hs, scales[-1])[0]  # (out,)

        new_index = {0: 0}
        layer_specs: list[LayerSpec] = []
        for i in range(len(spec.layers)):
            if alive[i + 1]:
                new_index[i + 1] = len(new_index)
        new_layers: list[tuple[int, LayerSpec, list[int]]] = []
        for i, layer in enumerate(spec.layers):
            if not alive[i + 1]:
                continue
            srcs = [j for e, j in enumerate(layer.sources) if open_edges[i][e] and nonconst[j]]
            has_offset = spec.spatial and any(
                not nonconst[j] and some_open[j] and open_edges[i][e]
                for e, j in enumerate(layer.sources)
            )
            ls = LayerSpec(
                sources=tuple(new_index[j] for j in srcs),
                width=int(kept_units[i + 1].numel()),
                stage=layer.stage,
                has_offset=has_offset,
            )
            layer_specs.append(ls)
            new_layers.append((i, ls, srcs))
        head_srcs = [
            (h, j) for h, j in enumerate(spec.head_sources) if open_head[h] and nonconst[j]
        ]
        new_spec = NetSpec(
            spatial=spec.spatial,
            in_width=spec.in_width,
            layers=tuple(layer_specs),
            head_sources=tuple(new_index[j] for _, j in head_srcs),
            out_features=spec.out_features,
            kernel_size=spec.kernel_size,
            head_pool=spec.head_pool,
            norm=spec.norm,
            activation=spec.activation,
            # a constant map read by a convolution (an offset) or by the read-out (folded into
            # its bias after pooling) depends on the position: the pruned net keeps the length
            input_length=length
            if any(ls.has_offset for ls in layer_specs)
            or (
                spec.spatial
                and any(
                    not nonconst[j] and some_open[j] and open_head[h]
                    for h, j in enumerate(spec.head_sources)
                )
            )
            else None,
        )
        plain = PlainShortcutNet(new_spec).to(device=ref.device, dtype=ref.dtype)
        for (i, _, srcs), target in zip(new_layers, plain.layers, strict=True):
            gl = cast(_GatedLayer, self.layers[i])
            rows = kept_units[i + 1]
            col_blocks, scales = [], []
            offsets = torch.cumsum(gl.src_widths, 0) - gl.src_widths
            for j in srcs:
                e = spec.layers[i].sources.index(j)
                col_blocks.append(offsets[e] + kept_units[j])
                scales.append(edge_val(edges[i], e) * unit_scale[j][kept_units[j]])
            cols = torch.cat(col_blocks)  # (n_in,)
            colscale = torch.cat(scales)  # (n_in,)
            w = gl.op.weight[rows][:, cols]  # (C_kept, n_in) or (C_kept, n_in, k)
            w = w * (colscale[None, :, None] if spec.spatial else colscale[None, :])
            op = cast(nn.Module, target.op)
            op.weight.copy_(w)  # type: ignore[operator]
            bias = gl.op.bias
            if bias is None:  # pragma: no cover - every gated layer is built with a bias
                raise RuntimeError("gated layers always have a bias")
            z_const = pre[i][0][rows]  # (C,) or (C, L): bias plus constant inputs
            if not spec.spatial:
                op.bias.copy_(z_const)  # type: ignore[operator]
            else:
                op.bias.copy_(bias[rows])  # type: ignore[operator]
                if isinstance(op, OffsetConv1d):
                    op.offset.copy_(z_const - bias[rows][:, None])
            tn = cast(_PlainLayer, target).norm
            if gl.norm is not None and tn is not None:
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(tn, name).copy_(getattr(gl.norm, name)[rows])
                src_count = gl.norm.num_batches_tracked
                if tn.num_batches_tracked is not None and src_count is not None:
                    tn.num_batches_tracked.copy_(src_count)
                tn.eps = gl.norm.eps
                tn.momentum = gl.norm.momentum
        # Head.
        col_blocks, scales = [], []
        offsets = torch.cumsum(self.head_widths, 0) - self.head_widths
        P = spec.head_pool
        for hi, j in head_srcs:
            kept = kept_units[j]
            pos = torch.arange(P, device=ref.device)
            # (C_kept * P,) head columns, (channel, position) order
            col_blocks.append((offsets[hi] + kept[:, None] * P + pos[None, :]).flatten())
            head_scale = edge_val(head_edge, hi) * unit_scale[j][kept]  # (C_kept,)
            scales.append(head_scale.repeat_interleave(P))
        if col_blocks:
            cols = torch.cat(col_blocks)  # (n_cols,)
            # (out, n_cols)
            plain.head.weight.copy_(self.head.weight[:, cols] * torch.cat(scales)[None, :])
        plain.head.bias.copy_(head_const)
        plain.train(self.training)
        return plain


class ShortcutMLP(_ShortcutNet):
    """A gated MLP in which every layer reads every earlier layer (and the input).

    ``widths`` gives the hidden layers; ``shortcuts=False`` makes it a plain chain (ablation):
    each layer reads only the previous one, no edge gates, the head reads the last layer.
    ``unit_group=g`` gates units in groups of ``g`` consecutive units (g must divide every
    width), so every kept width is a multiple of ``g``.

    >>> net = ShortcutMLP(40, [64, 64], 10)
    >>> net(torch.randn(8, 40)).shape
    torch.Size([8, 10])
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        out_features: int,
        *,
        gate: GateKind = "hard_concrete",
        shortcuts: bool = True,
        activation: Activation = "relu",
        norm: bool = False,
        unit_group: int = 1,
    ) -> None:
        ws = check_sizes("widths", widths)
        in_features, out_features = check_sizes(
            "in_features/out_features", [in_features, out_features]
        )
        shortcuts, norm = check_flag("shortcuts", shortcuts), check_flag("norm", norm)
        n = len(ws)
        layers = tuple(
            LayerSpec(sources=tuple(range(i + 1)) if shortcuts else (i,), width=w)
            for i, w in enumerate(ws)
        )
        spec = NetSpec(
            spatial=False,
            in_width=in_features,
            layers=layers,
            head_sources=tuple(range(n + 1)) if shortcuts else (n,),
            out_features=out_features,
            norm=norm,
            activation=check_activation(activation),
        )
        super().__init__(spec, gate, shortcuts, unit_group)


class ShortcutConv1d(_ShortcutNet):
    """A gated 1D CNN with dense gated shortcuts, resolution stages and a classifier head.

    ``stages`` lists the channels of each layer, stage by stage; each stage after the first
    halves the length (sources from earlier stages are average-pooled to it). The head
    adaptively pools every source to ``head_pool`` positions, flattens and reads it through
    gated edges. ``input_length`` lets ``prune`` fold layers that became constant.
    ``unit_group=g`` gates channels in groups of ``g`` (g must divide every layer's channels),
    so every kept layer has a multiple of ``g`` channels: the channel blocks the convolution
    kernels compute in (16 for oneDNN on AVX-512 CPUs, 8 on AVX2).

    >>> net = ShortcutConv1d(1, [[16, 16], [32]], 10, input_length=40)
    >>> net(torch.randn(4, 1, 40)).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        in_channels: int,
        stages: Sequence[Sequence[int]],
        out_features: int,
        *,
        kernel_size: int = 5,
        head_pool: int = 5,
        input_length: int | None = None,
        gate: GateKind = "hard_concrete",
        shortcuts: bool = True,
        activation: Activation = "relu",
        norm: bool = True,
        unit_group: int = 1,
    ) -> None:
        in_channels, out_features = check_sizes(
            "in_channels/out_features", [in_channels, out_features]
        )
        if isinstance(stages, int | str) or not isinstance(stages, Sequence) or not stages:
            raise ValueError(
                f"stages must be a non-empty list of lists of channels, got {stages!r}"
            )
        per_stage = [check_sizes(f"stages[{s}]", st) for s, st in enumerate(stages)]
        kernel_size = check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        head_pool = check_int("head_pool", head_pool)
        if input_length is not None:
            input_length = check_int("input_length", input_length, 2 ** (len(stages) - 1))
        shortcuts, norm = check_flag("shortcuts", shortcuts), check_flag("norm", norm)
        flat = [(s, w) for s, ws in enumerate(per_stage) for w in ws]
        layers = tuple(
            LayerSpec(sources=tuple(range(i + 1)) if shortcuts else (i,), width=w, stage=s)
            for i, (s, w) in enumerate(flat)
        )
        n = len(flat)
        spec = NetSpec(
            spatial=True,
            in_width=in_channels,
            layers=layers,
            head_sources=tuple(range(n + 1)) if shortcuts else (n,),
            out_features=out_features,
            kernel_size=kernel_size,
            head_pool=head_pool,
            norm=norm,
            activation=check_activation(activation),
            input_length=input_length,
        )
        super().__init__(spec, gate, shortcuts, unit_group)
