"""The gating structure of a model as plain data (names, index arrays), and its cost model.

Everything here is built once by ``gate_`` from the fx analysis and holds no fx objects, so a
gated model deep-copies and pickles like any model. The cost model mirrors ``costs.py`` term by
term: every leaf-module call contributes ``coef * kept(a) * kept(b)`` FLOPs where ``kept`` counts
the open channels of a label vector (a constant for ungated channels), times the probability
that the call survives the block gates; every parameter unit likewise. A new shortcut (dense
shortcuts) costs its ``ScaledAdd``, 2 FLOPs per element, times the probability that its gate is
open and that no removed block kills it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import weight_norm_layer
from .blocks import Block, live_nodes, outermost
from .channels import ChannelAnalysis, Labels
from .graph import RunRecord, mutated_input, owner_of
from .rnn import rnn_cost_rows
from .shortcuts import Edge
from .transformer import attention_cost, decoder_layer_cost, layer_cost

__all__ = ["CostTerms", "GraphInfo", "ParamSite", "SiteInfo", "SliceInfo", "build_cost_terms"]


@dataclass
class GraphInfo:
    """Node-name level view of the traced graph (enough for liveness and rewrite scopes)."""

    inputs: dict[str, list[str]]
    owners: dict[str, str]
    output: str
    base_live: frozenset[str]
    relu: dict[str, str] = field(default_factory=dict)  # ReLU node -> its input (graph order)
    writes: dict[str, str] = field(default_factory=dict)  # in-place op -> the input it writes

    @staticmethod
    def of(gm: fx.GraphModule, keep: frozenset[str] = frozenset()) -> GraphInfo:
        """The view of ``gm``'s graph; the ReLU nodes named in ``keep`` (in the calls of
        modules carrying hooks of the user's) are never bypassed."""
        nodes = list(gm.graph.nodes)
        out = next(n for n in reversed(nodes) if n.op == "output")
        relu = {}
        for n in nodes:
            if n.name in keep:
                continue
            if n.args and isinstance(n.args[0], fx.Node) and _is_relu(gm, n):
                relu[n.name] = n.args[0].name
        return GraphInfo(
            inputs={n.name: [a.name for a in n.all_input_nodes] for n in nodes},
            owners={n.name: owner_of(n) for n in nodes},
            output=out.name,
            base_live=frozenset(n.name for n in live_nodes(gm.graph, {})),
            relu=relu,
            writes={n.name: w.name for n in nodes if (w := mutated_input(n, gm)) is not None},
        )

    def live(
        self, cut: dict[str, str], edges: Sequence[tuple[str, str, list[str]]] = ()
    ) -> set[str]:
        """Names of nodes reaching the output when add ``a`` drops its input ``cut[a]``; each
        new shortcut ``(source, destination input, its readers)`` in ``edges`` makes its readers
        read the source too (it keeps alive a source inside a removed branch)."""
        extra: dict[str, list[str]] = {}
        for src, _, users in edges:
            for u in users:
                extra.setdefault(u, []).append(src)
        live: set[str] = set()
        stack = [self.output]
        while stack:
            while stack:
                n = stack.pop()
                if n in live:
                    continue
                live.add(n)
                drop = cut.get(n)
                stack.extend(a for a in self.inputs[n] if a != drop and a not in live)
                stack.extend(a for a in extra.get(n, []) if a not in live)
            # an in-place op whose result the code drops lives as long as what it writes
            writes = getattr(self, "writes", {})  # absent in models pickled before it existed
            stack = [n for n, w in writes.items() if w in live and n not in live]
        return live

    def bypass(
        self, cut: dict[str, str], live: set[str], edges: Sequence[tuple[str, str, list[str]]] = ()
    ) -> list[str]:
        """ReLUs made redundant by removed branches: once ``s + F(x)`` is just ``s``, a ReLU
        after it whose input is itself a ReLU output computes ``relu(relu(z)) = relu(z)``.

        ``edges`` are the kept new shortcuts ``(source, destination input, its readers)``: a
        reader then sees ``x + w * source`` (``w >= 0``), which is a ReLU output's equal only
        if the source is non-negative too."""
        subst: dict[str, str] = {}
        for add, branch in cut.items():
            others = [a for a in self.inputs[add] if a != branch]
            if len(others) == 1:
                subst[add] = others[0]
        into: dict[tuple[str, str], list[str]] = {}
        for src, dst, users in edges:
            for u in users:
                into.setdefault((u, dst), []).append(src)

        def nonneg(reader: str, node: str) -> tuple[bool, str]:
            """Whether ``node`` as read by ``reader`` is >= 0, and the ReLU it reduces to."""
            while True:
                if not all(nonneg("", e)[0] for e in into.get((reader, node), [])):
                    return False, node
                if node not in subst:
                    return node in self.relu, node
                reader, node = node, subst[node]

        bypassed: list[str] = []
        for r, src in self.relu.items():  # graph order
            if r not in live or src not in subst:
                continue
            ok, seen = nonneg(r, src)
            if ok:
                subst[r] = seen
                bypassed.append(r)
        return bypassed

    def scopes(
        self, cut: dict[str, str], edges: Sequence[tuple[str, str, list[str]]] = ()
    ) -> tuple[list[str], list[str], list[str]]:
        """Outermost modules to rewrite, dead nodes to erase and ReLUs to bypass (see
        :meth:`bypass`) once the branches in ``cut`` are removed and ``edges`` kept."""
        live = self.live(cut, edges)
        dead = {n for n in self.base_live if n not in live}
        # code the model already computed for nothing that reads a removed value goes too
        # (the rewrite erases a removed node's dangling users: ``unused = f(h)``)
        users: dict[str, list[str]] = {}
        for n, ins in self.inputs.items():
            for a in ins:
                users.setdefault(a, []).append(n)
        stack = list(dead)
        while stack:
            for u in users.get(stack.pop(), []):
                if u not in live and u not in dead and u != self.output:
                    dead.add(u)
                    stack.append(u)
        erase = sorted(dead)
        bypass = self.bypass(cut, live, edges)
        changed = [*cut, *erase, *bypass]
        scopes = [self.owners[n] for n in changed]
        for n in erase:  # a removed value a module returns: its caller drops the call
            own = self.owners[n]
            for u in users.get(n, []):
                if not _inside(self.owners[u], own):
                    scopes.append(_common_scope(own, self.owners[u]))
        return outermost(scopes), erase, bypass


def _inside(name: str, scope: str) -> bool:
    return scope == "" or name == scope or name.startswith(scope + ".")


def _common_scope(a: str, b: str) -> str:
    """The innermost module path containing both ``a`` and ``b`` (``""``: the root).

    >>> _common_scope("layer.sub", "layer.output"), _common_scope("a.b", "c")
    ('layer', '')
    """
    common = []
    for x, y in zip(a.split(".") if a else [], b.split(".") if b else [], strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


@dataclass
class SiteInfo:
    """A module whose output is multiplied by gates: channel segments and block gates."""

    dim: int  # channel dimension of the output (negative: from the end)
    n_channels: int
    segments: list[tuple[int, Tensor, Tensor]]  # (gated group, channel positions, gate indices)
    blocks: list[int] = field(default_factory=list)


@dataclass
class ParamSite:
    """The output units of a linear map written with the model's own parameters (see
    :class:`~gatedprune.gating.channels.ParamLinear`), gated by scaling its weight's
    ``out_dim`` and its bias: ``x @ (W g) + b g = (x @ W + b) g``. The gate of a residual
    block whose branch ends in the map (``blocks``) scales all of its units alike."""

    weight: str  # qualified parameter names
    bias: str | None
    out_dim: int  # the weight's dimension of output units
    n_out: int
    segments: list[tuple[int, Tensor, Tensor]]  # (gated group, unit positions, gate indices)
    blocks: list[int] = field(default_factory=list)


@dataclass
class SliceInfo:
    """How a Linear/Conv/BatchNorm (or a parameter of a linear map written with it: matrix,
    matrix_t, vector) is sliced: per input/output channel, (gated group, index)."""

    # channels.module_kind (linear | conv | dw | gconv | convt | dwt | gconvt | bn |
    # embedding), or a parameter's matrix | matrix_t | vector | scale (a per-channel factor)
    kind: str
    in_group: np.ndarray | None  # (in,) gated group index or -1
    in_gidx: np.ndarray | None
    out_group: np.ndarray | None
    out_gidx: np.ndarray | None
    dim: int | None = None  # a per-head score term ("heads"): its dimension of the heads


@dataclass
class SizeInfo:
    """A size the code of graph node ``node`` gives a pruned dimension (a reshape's size of
    the dimension ``key``, or a split's ``"split_size"``): in the pruned model, ``factor``
    times the kept channels of (gated group, index) ``group`` / ``gidx``."""

    node: str
    key: int | str
    group: np.ndarray
    gidx: np.ndarray
    factor: int


@dataclass
class CostTerms:
    """Vectorised cost model for one input shape."""

    f_coef: Tensor  # (T,) float64
    f_a: Tensor  # (T,) long, factor index (F = the constant 1)
    f_b: Tensor
    f_member: Tensor  # (T, B) float64 block membership
    f_nodes: list[str]
    p_coef: Tensor  # (P,)
    p_a: Tensor
    p_b: Tensor
    p_member: Tensor  # (P, B)
    p_paths: list[str]  # module / attribute path of each parameter term
    p_refs: list[list[str]]  # nodes referencing it (empty: never referenced)
    k_const: Tensor  # (F,)
    k_counts: list[Tensor]  # per gated group (F, n_g)
    # new shortcuts (ScaledAdd, 2 FLOPs per element): per kept channel, factor, block membership
    e_coef: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))  # (E,)
    e_a: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (E,)
    # (E, B)
    e_member: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))

    def kept(self, values: list[Tensor]) -> Tensor:
        """Kept-channel counts of every factor, plus a trailing constant 1: (F + 1,)."""
        k = self.k_const
        for c, v in zip(self.k_counts, values, strict=True):
            k = k + c @ v.to(torch.float64)  # (F,) + (F, n_g) @ (n_g,)
        return torch.cat([k, k.new_ones(1)])  # (F + 1,)


class _Factors:
    def __init__(self, atom_ggroup: np.ndarray, atom_gidx: np.ndarray, sizes: list[int]) -> None:
        self.atom_ggroup = atom_ggroup
        self.atom_gidx = atom_gidx
        self.sizes = sizes
        self.keys: dict[bytes, int] = {}
        self.const: list[float] = []
        self.counts: list[list[np.ndarray]] = [[] for _ in sizes]
        self._zero_rows: dict[int, np.ndarray] = {}

    def vector(self, g: int) -> int:
        """Factor counting the open entries of gated vector ``g``."""
        key = f"vector:{g}".encode()
        if key not in self.keys:
            self.keys[key] = len(self.const)
            self.const.append(0.0)
            for j, size in enumerate(self.sizes):
                self.counts[j].append(np.ones(size) if j == g else np.zeros(size))
        return self.keys[key]

    def get(self, atoms: np.ndarray | None, full: int) -> tuple[int, float]:
        """(factor index, multiplier): ungated or unlabelled -> (-1, full size)."""
        if atoms is None:
            return -1, float(full)
        gg = self.atom_ggroup[atoms]
        if (gg < 0).all():
            return -1, float(len(atoms))
        key = atoms.tobytes()
        if key not in self.keys:
            self.keys[key] = len(self.const)
            self.const.append(float((gg < 0).sum()))
            gidx = self.atom_gidx[atoms]
            present = set(np.unique(gg[gg >= 0]).tolist())
            for g, size in enumerate(self.sizes):
                if g in present:
                    self.counts[g].append(np.bincount(gidx[gg == g], minlength=size))
                else:  # (stacked into a new tensor later: one zero row shared)
                    self.counts[g].append(self._zeros(size))
        return self.keys[key], 1.0

    def _zeros(self, size: int) -> np.ndarray:
        """The counts of a gated vector of ``size`` entries none of which an entry reads (as
        ``np.bincount`` of no indices gives them)."""
        if size not in self._zero_rows:
            self._zero_rows[size] = np.zeros(size, dtype=np.intp)
        return self._zero_rows[size]


def _scaled_row(
    flops: float, lab: Labels | None, fac: _Factors, node: str
) -> tuple[float, int, int, str]:
    """The FLOPs row of a call whose cost is proportional to its output's channels (counted at
    full width ``flops``): scaled by the kept fraction of its labelled channels when the count
    divides evenly among them, else constant."""
    n = len(lab.atoms) if lab is not None else 0
    if lab is not None and n and flops % n == 0:
        fo, mo = fac.get(lab.atoms, n)
        return (float(flops // n) * mo, fo, -1, node)
    return (flops, -1, -1, node)


def build_cost_terms(
    gm: fx.GraphModule,
    record: RunRecord,
    ca: ChannelAnalysis,
    blocks: list[Block],
    group_map: np.ndarray,
    sizes: list[int],
    orphans: list[tuple[str, int]],
    transformers: dict[str, tuple[int, int, int, int]],
    attentions: dict[str, int],
    edges: Sequence[Edge] = (),
    rnns: dict[str, int] | None = None,
    decoders: dict[str, tuple[int, ...]] | None = None,
) -> CostTerms:
    """Cost terms of every module call and parameter unit, and of the new shortcuts ``edges``
    (see the module docstring)."""
    atom_ggroup = group_map[ca.atom_group] if len(ca.atom_group) else ca.atom_group
    fac = _Factors(atom_ggroup, ca.atom_gidx, sizes)
    n_blocks = len(blocks)
    member: dict[str, list[int]] = {}
    for b in blocks:
        for d in b.dead:
            member.setdefault(d.name, []).append(b.index)
    f_rows: list[tuple[float, int, int, str]] = []
    p_rows: list[tuple[float, int, int, str, str]] = []  # coef, a, b, node, path
    refs: dict[str, list[str]] = {}
    first_call: dict[str, str] = {}
    # A parameter that several modules hold, or that the forward also reads directly (tied
    # weights), is one row, counted once and alive while any of its readers is (gate_ leaves
    # whatever touches it ungated, so the row is a constant).
    readers: dict[int, dict[str, str]] = {}  # parameter id -> {reading node: holder path}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            for p in gm.get_submodule(str(n.target)).parameters():
                readers.setdefault(id(p), {})[n.name] = str(n.target)
        elif n.op == "get_attr" and _is_param(gm, str(n.target)):
            readers.setdefault(id(gm.get_parameter(str(n.target))), {})[n.name] = str(n.target)
    tied = {k for k, nodes in readers.items() if len(set(nodes.values())) > 1}
    # linear maps written with parameters: FLOPs and parameters scaled like an nn.Linear's
    linear_nodes = {pl.node: pl for pl in ca.param_linears}
    param_terms: dict[str, tuple[float, int, int]] = {}  # parameter -> (coef, a, b)
    for pl in ca.param_linears:
        fi, mi = fac.get(pl.in_atoms, pl.n_in)
        fo, mo = fac.get(pl.out_atoms, pl.n_out)
        param_terms[pl.weight] = (mi * mo * pl.taps, fi, fo)
        if pl.bias is not None:
            param_terms[pl.bias] = (mo, fo, -1)
    for bn in dict.fromkeys(ca.fused_norms.values()):  # a norm's own F.batch_norm/group_norm
        atoms = ca.module_atoms.get(bn)
        for path in (f"{bn}.weight", f"{bn}.bias"):
            if _is_param(gm, path):
                fo, mo = fac.get(atoms, gm.get_parameter(path).numel())
                param_terms[path] = (mo, fo, -1)
    for ps in ca.param_scales:  # a per-channel factor (layer scale): one entry per channel
        fo, mo = fac.get(ps.atoms, ps.n)
        param_terms[ps.path] = (mo, fo, -1)
    for hb in ca.head_biases:  # a per-head score term: its entries per head, times the heads
        if _is_param(gm, hb.path):
            fo, mo = fac.get(hb.atoms, hb.n)
            per_head = gm.get_parameter(hb.path).numel() // hb.n
            param_terms[hb.path] = (mo * per_head, fo, -1)
    tied_rows: dict[int, list[str]] = {}  # p_rows index -> every node reading the parameter
    counted: set[int] = set()

    def tied_params(params: Iterable[nn.Parameter], node: str, path: str) -> None:
        for p in params:
            if id(p) not in counted:
                counted.add(id(p))
                tied_rows[len(p_rows)] = list(readers[id(p)])
                p_rows.append((float(p.numel()), -1, -1, node, path))

    for n in gm.graph.nodes:
        if n.op == "get_attr":
            refs.setdefault(str(n.target), []).append(n.name)
            attr = gm.get_parameter(str(n.target)) if _is_param(gm, str(n.target)) else None
            if attr is not None and id(attr) in tied:
                tied_params([attr], n.name, str(n.target))
            elif attr is not None and str(n.target) not in first_call:
                first_call[str(n.target)] = n.name
                coef, fa, fb = param_terms.get(str(n.target), (float(attr.numel()), -1, -1))
                p_rows.append((coef, fa, fb, n.name, str(n.target)))
            continue
        lin = linear_nodes.get(n.name)
        shape = record.shapes.get(n)
        if lin is not None and shape is not None:  # 2 * rows * in * taps * out (+ rows * out)
            n_rows = int(np.prod(shape)) // lin.n_out  # a convolution's: batch * positions
            fi, mi = fac.get(lin.in_atoms, lin.n_in)
            fo, mo = fac.get(lin.out_atoms, lin.n_out)
            f_rows.append((2.0 * n_rows * mi * mo * lin.taps, fi, fo, n.name))
            if lin.bias_flops:
                f_rows.append((float(n_rows) * mo, fo, -1, n.name))
            continue
        if n.op != "call_module":
            inlined = record.flops.get(n, 0)
            if inlined:  # a call of a childless module fx traced through, counted whole
                lab = ca.labels.get(n) or ca.nonzero.get(n)
                f_rows.append(_scaled_row(float(inlined), lab, fac, n.name))
            continue
        name = str(n.target)
        refs.setdefault(name, []).append(n.name)
        m = gm.get_submodule(name)
        shape = record.shapes.get(n)
        kind = ca.kinds.get(name)
        f0 = record.flops.get(n, 0)
        new_module = name not in first_call
        if new_module:
            first_call[name] = n.name
            if any(id(p) in tied for p in m.parameters()):
                tied_params(m.parameters(), n.name, name)
                new_module = False  # its parameters are counted: only its FLOPs below
        if name in transformers:
            assert isinstance(m, nn.TransformerEncoderLayer)
            in_shape = record.arg_shapes[n][0]
            assert in_shape is not None
            lc = layer_cost(m, in_shape)
            gh, gu, ga, gf = (fac.vector(v) for v in transformers[name])
            nf = bool(m.norm_first)
            rows = [
                (lc.head, gh, ga),
                (lc.attn0, ga, -1),
                (lc.unit, gu, gf),
                (lc.ffn0, gf, -1),
                (lc.norm1, ga if nf else -1, -1),
                (lc.norm2, gf if nf else -1, -1),
            ]
            for (fl, pa), fa, fb in rows:
                f_rows.append((float(fl), fa, fb, n.name))
                if new_module:
                    p_rows.append((float(pa), fa, fb, n.name, name))
            continue
        dec = (decoders or {}).get(name)
        if dec is not None:  # heads, cross heads, units, self-attn, cross-attn, FFN groups
            assert isinstance(m, nn.TransformerDecoderLayer)
            x_shape, mem_shape = record.arg_shapes[n][0], record.arg_shapes[n][1]
            assert x_shape is not None
            assert mem_shape is not None
            dc = decoder_layer_cost(m, x_shape, mem_shape)
            vh, vc, vu, va, vx, vf = (fac.vector(v) for v in dec)
            nf = bool(m.norm_first)
            drows = [
                (dc.head, vh, va),
                (dc.attn0, va, -1),
                (dc.cross_head, vc, vx),
                (dc.cross0, vx, -1),
                (dc.unit, vu, vf),
                (dc.ffn0, vf, -1),
                (dc.norms[0], va if nf else -1, -1),
                (dc.norms[1], vx if nf else -1, -1),
                (dc.norms[2], vf if nf else -1, -1),
            ]
            for (fl, pa), fa, fb in drows:
                f_rows.append((float(fl), fa, fb, n.name))
                if new_module:
                    p_rows.append((float(pa), fa, fb, n.name, name))
            continue
        rnn_width = (rnns or {}).get(name)
        if rnn_width is not None or name in ca.rnn_in_atoms:  # recurrent (gate_ rnn.py)
            in_shape = record.arg_shapes[n][0]
            assert in_shape is not None
            assert isinstance(m, nn.LSTM | nn.GRU | nn.RNN)
            fi, mi = fac.get(ca.rnn_in_atoms.get(name), m.input_size)
            fw, mw = (
                (-1, float(m.hidden_size)) if rnn_width is None else (fac.vector(rnn_width), 1.0)
            )
            rf, rp = rnn_cost_rows(m, in_shape, fi, mi, fw, mw)
            f_rows.extend((c, a, b_, n.name) for c, a, b_ in rf)
            if new_module:
                p_rows.extend((c, a, b_, n.name, name) for c, a, b_ in rp)
            continue
        if name in attentions:
            assert isinstance(m, nn.MultiheadAttention)
            q_shape, kv_shape = record.arg_shapes[n][0], record.arg_shapes[n][1]
            assert q_shape is not None
            assert kv_shape is not None
            (hf, hp), (af, ap) = attention_cost(m, q_shape, kv_shape)
            gh = fac.vector(attentions[name])
            f_rows.append((float(hf), gh, -1, n.name))
            f_rows.append((float(af), -1, -1, n.name))
            if new_module:
                p_rows.append((float(hp), gh, -1, n.name, name))
                p_rows.append((float(ap), -1, -1, n.name, name))
            continue
        if kind in ("convt", "dwt", "gconvt") and shape is not None:
            # every input element meets the C_out / groups * k weights of its group
            assert isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d)
            in_shape = record.arg_shapes[n][0]
            assert in_shape is not None
            k = int(np.prod(m.kernel_size))
            in_positions = int(np.prod(in_shape)) // m.in_channels  # (B, C_in, *S): B * S
            out_positions = int(np.prod(shape)) // m.out_channels
            fo, mo = fac.get(ca.module_atoms.get(name), m.out_channels)
            in_atoms = ca.module_in_atoms.get(name)
            if kind == "dwt":  # C_in * C_out / groups = C_out: the kept outputs
                fi, mi = -1, 1.0
            elif kind == "gconvt":  # C_in * C_out / groups = (kept positions of one group's
                per_group = m.in_channels // m.groups  # inputs) * (kept outputs)
                fi, mi = fac.get(None if in_atoms is None else in_atoms[:per_group], per_group)
            else:
                fi, mi = fac.get(in_atoms, m.in_channels)
            f_rows.append((2.0 * in_positions * k * mi * mo, fi, fo, n.name))
            if m.bias is not None:
                f_rows.append((float(out_positions) * mo, fo, -1, n.name))
            if new_module:
                p_rows.append((float(k) * mi * mo, fi, fo, n.name, name))
                if m.bias is not None:
                    p_rows.append((mo, fo, -1, n.name, name))
            continue
        if kind in ("linear", "conv", "dw", "gconv") and shape is not None:
            assert isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
            out_n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            in_n = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            k = 1 if isinstance(m, nn.Linear) else int(np.prod(m.kernel_size))
            positions = int(np.prod(shape)) // out_n
            fo, mo = fac.get(ca.module_atoms.get(name), out_n)
            in_atoms = ca.module_in_atoms.get(name)
            if kind == "dw":
                fi, mi = -1, 1.0
            elif kind == "gconv":  # each output reads its own group's inputs: the kept
                assert isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)  # positions, as
                per_group = in_n // m.groups  # counted in the first group (all are alike)
                fi, mi = fac.get(None if in_atoms is None else in_atoms[:per_group], per_group)
            else:
                fi, mi = fac.get(in_atoms, in_n)
            has_bias = m.bias is not None
            f_rows.append((2.0 * positions * k * mi * mo, fi, fo, n.name))
            if has_bias:
                f_rows.append((float(positions) * mo, fo, -1, n.name))
            if new_module:
                p_rows.append((float(k) * mi * mo, fi, fo, n.name, name))
                if has_bias:
                    p_rows.append((mo, fo, -1, n.name, name))
                if weight_norm_layer(m):  # weight_norm: g, one per output channel (and v)
                    p_rows.append((mo, fo, -1, n.name, name))
            continue
        lab = ca.labels.get(n) or ca.nonzero.get(n)  # an nn.Sigmoid excitation: its channels
        f_rows.append(_scaled_row(float(f0), lab, fac, n.name))
        if new_module:
            if kind == "embedding":  # its weight (num_embeddings, embedding_dim): by column
                assert isinstance(m, nn.Embedding | nn.EmbeddingBag)
                fo, mo = fac.get(ca.module_atoms.get(name), m.embedding_dim)
                p_rows.append((float(m.num_embeddings) * mo, fo, -1, n.name, name))
            elif kind in ("bn", "in", "gn"):  # per channel: a weight and (unless None) a bias
                width = int(m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features)  # type: ignore[arg-type]
                per = float(sum(p.numel() for p in m.parameters()) // width)
                fo, mo = fac.get(ca.module_atoms.get(name), width)
                p_rows.append((per * mo, fo, -1, n.name, name))
            else:
                n_params = sum(p.numel() for p in m.parameters())
                if n_params:
                    p_rows.append((float(n_params), -1, -1, n.name, name))
    if record.extra_flops:  # traced-through modules whose calls traced to no ops
        f_rows.append((float(record.extra_flops), -1, -1, ""))
    for path, numel in orphans:
        p_rows.append((float(numel), -1, -1, "", path))
    by_name = {n.name: n for n in gm.graph.nodes}
    e_rows: list[tuple[float, int]] = []
    e_member = torch.zeros(len(edges), n_blocks, dtype=torch.float64)  # (E, B)
    for k, e in enumerate(edges):  # x_j + w * out_i: 2 FLOPs per element of x_j
        lab = ca.labels.get(by_name[e.dst_node])
        if lab is not None and len(lab.atoms) and e.numel % len(lab.atoms) == 0:
            fo, mo = fac.get(lab.atoms, len(lab.atoms))
            e_rows.append((2.0 * (e.numel // len(lab.atoms)) * mo, fo))
        else:
            e_rows.append((2.0 * e.numel, -1))
        # removing block b kills the edge if all its readers are in b's dead set (a source in
        # a removed branch is kept alive by the edge)
        kills = set.intersection(*(set(member.get(u, [])) for u in e.users))
        for bi in kills:
            e_member[k, bi] = 1.0
    n_f = len(fac.const)

    def idx(v: int) -> int:
        return n_f if v < 0 else v

    def membership(nodes: list[str]) -> Tensor:
        mat = torch.zeros(len(nodes), n_blocks, dtype=torch.float64)  # (len(nodes), B)
        for i, name in enumerate(nodes):
            for b in member.get(name, []):
                mat[i, b] = 1.0
        return mat

    f_nodes = [r[3] for r in f_rows]
    p_nodes = [r[3] for r in p_rows]
    p_member = membership(p_nodes)
    for i, nodes in tied_rows.items():  # removed with a block only if every reader is
        p_member[i] = membership(nodes).amin(dim=0)
    return CostTerms(
        f_coef=torch.tensor([r[0] for r in f_rows], dtype=torch.float64),
        f_a=torch.tensor([idx(r[1]) for r in f_rows], dtype=torch.long),
        f_b=torch.tensor([idx(r[2]) for r in f_rows], dtype=torch.long),
        f_member=membership(f_nodes),
        f_nodes=f_nodes,
        p_coef=torch.tensor([r[0] for r in p_rows], dtype=torch.float64),
        p_a=torch.tensor([idx(r[1]) for r in p_rows], dtype=torch.long),
        p_b=torch.tensor([idx(r[2]) for r in p_rows], dtype=torch.long),
        p_member=p_member,
        p_paths=[r[4] for r in p_rows],
        p_refs=[
            tied_rows[i] if i in tied_rows else refs.get(r[4], []) if r[3] else []
            for i, r in enumerate(p_rows)
        ],
        e_coef=torch.tensor([r[0] for r in e_rows], dtype=torch.float64),
        e_a=torch.tensor([idx(r[1]) for r in e_rows], dtype=torch.long),
        e_member=e_member,
        k_const=torch.tensor(fac.const, dtype=torch.float64),
        k_counts=[
            torch.tensor(np.stack(c), dtype=torch.float64)
            if c
            else torch.zeros(0, s, dtype=torch.float64)  # (0, n_g): no factors
            for c, s in zip(fac.counts, sizes, strict=True)
        ],
    )


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), nn.ReLU)
    if n.op == "call_function":
        return n.target in (F.relu, torch.relu)
    return n.op == "call_method" and n.target in ("relu", "relu_")


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True
