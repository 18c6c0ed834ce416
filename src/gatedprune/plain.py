"""Plain (gate-free) modules that pruned shortcut networks are rebuilt from."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._jit_internal import is_scripting  # torch.jit.is_scripting (mypy: not re-exported)

from .base import batchnorm_affine
from .layout import ACTIVATIONS, NetSpec, check_activation, check_int
from .pooling import AdaptiveMeanPool1d, MeanPool1d, mean_pool_rows

__all__ = ["CHANNELS_LAST_MIN_BATCH", "OffsetConv1d", "PlainShortcutNet"]

CHANNELS_LAST_MIN_BATCH = 16
"""Spatial plain networks in eval mode compute in channels-last layout from this batch size on
(see :meth:`PlainShortcutNet._forward_channels_last`)."""


def _compiled() -> bool:
    """Whether the forward runs under ``torch.jit.trace``, ``torch.compile`` or
    ``torch.export``: the channels-last path (cached folded weights, a branch on the batch
    size) is then not taken, so the program records the ``(B, C, L)`` ops on the module's own
    parameters for every batch size (a trace from 16 samples on failed torch's check, or,
    after an eager forward, recorded the cached weights as constants that a later
    ``load_state_dict`` did not reach; an export with a dynamic batch could not span 16).

    >>> _compiled()
    False
    """
    tracing = bool(torch._C._is_tracing())  # torch.jit.is_tracing() (untyped), outside script
    return tracing or torch.compiler.is_compiling() or torch.compiler.is_exporting()


class OffsetConv1d(nn.Conv1d):
    """A 'same'-padded Conv1d plus a fixed additive ``(out_channels, length)`` map.

    Pruning produces it where a removed constant layer fed a convolution: zero padding makes
    that constant's contribution depend on the position, so it is kept as a map. Inputs must
    have the length the map was built for. Channel counts may be 0 (a pruned layer whose
    inputs were all removed); ``kernel_size`` must be odd ('same' padding keeps the length only
    then) and ``length`` at least 1.

    >>> m = OffsetConv1d(2, 3, 3, length=8)
    >>> m(torch.zeros(1, 2, 8)).shape
    torch.Size([1, 3, 8])
    >>> OffsetConv1d(2, 3, 4, length=8)
    Traceback (most recent call last):
    ...
    ValueError: OffsetConv1d kernel_size must be odd ('same' padding keeps the length ...), got 4
    """

    if TYPE_CHECKING:  # for mypy only: TorchScript cannot read this string annotation
        offset: Tensor

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, length: int):
        in_channels = check_int("OffsetConv1d in_channels", in_channels, minimum=0)
        out_channels = check_int("OffsetConv1d out_channels", out_channels, minimum=0)
        kernel_size = check_int("OffsetConv1d kernel_size", kernel_size)
        length = check_int("OffsetConv1d length", length)
        if kernel_size % 2 == 0:
            raise ValueError(
                "OffsetConv1d kernel_size must be odd ('same' padding keeps the length only for "
                f"odd kernels), got {kernel_size}"
            )
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.register_buffer("offset", torch.zeros(out_channels, length))  # (C, L)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.offset.shape[-1]:
            raise ValueError(
                f"this pruned layer was built for inputs of length {self.offset.shape[-1]} "
                f"(a removed constant layer left a position-dependent offset), got {x.shape[-1]}"
            )
        # nn.Conv1d.forward's call (TorchScript compiles no super().forward)
        out: Tensor = self._conv_forward(x, self.weight, self.bias) + self.offset  # (B, C, L)
        return out

    def flops_of(self, inputs: tuple[Tensor, ...], output: Tensor) -> int:
        k = self.kernel_size[0]
        macs = output.numel() * (self.in_channels // self.groups) * k
        return 2 * macs + 2 * output.numel()  # bias add + offset add


def _gather(
    reads: tuple[tuple[int, int], ...],
    hs: list[Tensor],
    pooled: list[Tensor | None],
    make_pooled: Callable[[int, int], Tensor],
    dim: int,
) -> Tensor:
    """A layer's input: its sources ``(node, pooled copy or -1)`` concatenated along ``dim``;
    a pooled copy is made by ``make_pooled(copy, node)`` on first use and kept in ``pooled``."""
    parts = []
    for j, pool in reads:
        if pool < 0:
            parts.append(hs[j])
            continue
        p = pooled[pool]
        if p is None:
            p = pooled[pool] = make_pooled(pool, j)
        parts.append(p)
    # dim 1: (B, sum C, L) or (B, sum C); dim 2: (B, L, sum C)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _activate(act: nn.Module, z: Tensor) -> Tensor:
    """``act(z)`` for a fresh map ``z`` that nothing else holds (the channels-last path, no
    autograd): a ReLU in place, one pass over the map and no second map of its size.

    >>> _activate(nn.ReLU(), torch.tensor([-1.0, 2.0])).tolist()
    [0.0, 2.0]
    """
    if type(act) is nn.ReLU:
        return torch.relu_(z)
    out: Tensor = act(z)
    return out


def _conv_one_channel(
    x: Tensor, weight: Tensor, bias: Tensor | None, offset: Tensor | None
) -> Tensor:
    """A 'same'-padded convolution of a one-channel ``(B, L, 1)`` map, as one matrix product
    of its ``(B * L, k)`` windows with the ``(k, C)`` kernel: the channels-last output
    ``(B, L, C)`` directly. (oneDNN reads a one-channel input as ``(B, C, L)``, ambiguous as it
    is, and returns that layout: a strided activation and a transposing copy that cost about
    as much as the convolution of a thin demo layer.) ``weight``: ``(C, 1, 1, k)``, ``offset``:
    an :class:`OffsetConv1d`'s ``(C, 1, L)`` map or None.

    >>> x, w = torch.randn(2, 6, 1), torch.randn(4, 1, 1, 3)
    >>> ref = F.conv1d(x.transpose(1, 2), w.view(4, 1, 3), padding=1).transpose(1, 2)
    >>> torch.allclose(_conv_one_channel(x, w, None, None), ref, atol=1e-6)
    True
    """
    b, length, _ = x.shape
    c, k = weight.shape[0], weight.shape[-1]
    padded = F.pad(x.view(b, length), (k // 2, k // 2))  # (B, L + k - 1)
    windows = padded.unfold(1, k, 1).reshape(b * length, k)  # (B * L, k)
    kernel = weight.reshape(c, k).t()  # (k, C)
    z = windows @ kernel if bias is None else torch.addmm(bias, windows, kernel)  # (B * L, C)
    z = z.view(b, length, c)  # (B, L, C)
    if offset is not None:
        z = z + offset.reshape(c, length).t()  # (B, L, C)
    return z


def _fold_batchnorm(
    bn: nn.Module | None, weight: Tensor, bias: Tensor | None, offset: Tensor | None, user: str
) -> tuple[Tensor, Tensor, Tensor | None]:
    """An eval-mode BatchNorm folded into the layer before it: ``a * (W x + b + offset - mean)
    + beta`` with ``a = gamma / sqrt(var + eps)`` becomes ``(a W) x + a (b - mean) + beta +
    a offset``. Returns ``(a W, a (b - mean) + beta, a offset)``; ``user`` names the caller in
    the error for a BatchNorm without running statistics."""
    if bn is None:
        raise ValueError(f"{user} needs BatchNorm layers with running statistics")
    a, c = batchnorm_affine(bn, user)  # (C,) each, float64
    b = (c if bias is None else a * bias.to(torch.float64) + c).to(weight.dtype)  # (C,)

    def scaled(t: Tensor) -> Tensor:
        return (t.to(torch.float64) * a.view(-1, *([1] * (t.dim() - 1)))).to(t.dtype)  # (C, ...)

    return scaled(weight), b, None if offset is None else scaled(offset)


def _is_size(size: object, n: int) -> bool:
    """Whether a 1-d pooling module's stored size (an int or a 1-tuple) is ``n``."""
    return size == n or size == (n,)


class _PlainLayer(nn.Module):
    def __init__(self, spec: NetSpec, index: int) -> None:
        super().__init__()
        layer = spec.layers[index]
        n_in = sum(spec.node_width(j) for j in layer.sources)
        self.op: nn.Module
        if not spec.spatial:
            self.op = nn.Linear(n_in, layer.width)
        elif layer.has_offset:
            if spec.input_length is None:
                raise ValueError("a layer with an offset map needs spec.input_length")
            length = spec.stage_length(spec.input_length, layer.stage)
            self.op = OffsetConv1d(n_in, layer.width, spec.kernel_size, length=length)
        else:
            self.op = nn.Conv1d(n_in, layer.width, spec.kernel_size, padding=spec.kernel_size // 2)
        self.norm = nn.BatchNorm1d(layer.width) if spec.norm else None
        self.act = ACTIVATIONS[spec.activation][1]()

    def forward(self, x: Tensor) -> Tensor:
        z = self.op(x)  # (B, C, L) or (B, C)
        if self.norm is not None:
            z = self.norm(z)
        out: Tensor = self.act(z)
        return out


def _script_rule(spec: NetSpec) -> tuple[bool, int, int, int, tuple[int, ...]]:
    """``(spatial, input channels, minimal length, required length or 0, the node each pooled
    copy pools)`` of ``spec``, for :meth:`PlainShortcutNet._forward_scripted` (TorchScript
    reads no ``NetSpec``, nor an empty list).

    >>> from gatedprune.layout import LayerSpec, NetSpec
    >>> _script_rule(NetSpec(True, 1, (LayerSpec((0,), 4, stage=1),), (1,), 2, 3, 2, True))
    (True, 1, 2, 0, (0,))
    """
    min_length = 2 ** max((ls.stage for ls in spec.layers), default=0)
    nodes = tuple(j for j, _ in spec.pool_pairs())
    return spec.spatial, spec.in_width, min_length, spec.input_length or 0, nodes


def check_input_dtype(x: Tensor, weight: Tensor) -> None:
    """Refuse an input whose floating dtype differs from the weights' (outside autocast, which
    casts for itself): a clear ``ValueError`` instead of torch's error from deep inside a layer.

    >>> check_input_dtype(torch.zeros(1, dtype=torch.float64), torch.zeros(1))
    Traceback (most recent call last):
    ...
    ValueError: input dtype (torch.float64) does not match the weights' (torch.float32): ...
    """
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"input dtype ({x.dtype}) does not match the weights' ({weight.dtype}): convert "
            f"the input with .to({weight.dtype}) or the model with .to({x.dtype})"
        )


class PlainShortcutNet(nn.Module):
    """A shortcut network without gates: what :func:`gatedprune.prune` returns for
    :class:`~gatedprune.ShortcutMLP` and :class:`~gatedprune.ShortcutConv1d`.

    Built only from ``nn.Linear``/``nn.Conv1d``/``nn.BatchNorm1d``/activation/pooling modules,
    wired by a :class:`~gatedprune.layout.NetSpec`; ``to_config``/``from_config`` round-trip
    its structure through JSON.

    >>> from gatedprune.layout import LayerSpec, NetSpec
    >>> spec = NetSpec(False, 3, (LayerSpec((0,), 4),), (1,), 2)
    >>> PlainShortcutNet(spec)(torch.zeros(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(self, spec: NetSpec) -> None:
        if not isinstance(spec, NetSpec):
            raise TypeError(
                f"PlainShortcutNet expects a gatedprune.layout.NetSpec, got {type(spec).__name__}"
                " (rebuild a saved structure with PlainShortcutNet.from_config)"
            )
        super().__init__()
        spec.validate()
        self.spec = spec
        self.layers = nn.ModuleList([_PlainLayer(spec, i) for i in range(len(spec.layers))])
        self._pool_keys = spec.pool_pairs()
        self.pools = nn.ModuleList(
            [MeanPool1d(2 ** (s - spec.node_stage(j))) for j, s in self._pool_keys]
        )
        self._reads = self._resolve_reads()
        self._head_reads = tuple(spec.head_sources)
        self._min_length = 2 ** max((ls.stage for ls in spec.layers), default=0)
        self._script_rule = _script_rule(spec)
        self._calls = self._resolve_calls()
        self._folded_convs: tuple[Tensor, list[object], list[Any]] | None = None
        self._pool_from, self._pooled_copies = self._resolve_pool_reuse()
        self.channels_last = True
        """Eval-mode forwards of spatial networks from ``CHANNELS_LAST_MIN_BATCH`` samples on
        compute in channels-last layout (faster on CPU); ``False`` keeps ``(B, C, L)``."""
        self.register_buffer("_head_order", self._resolve_head_order(), persistent=False)
        self.head_pools = nn.ModuleList(
            [AdaptiveMeanPool1d(spec.head_pool) for _ in spec.head_sources] if spec.spatial else []
        )
        n_head = sum(spec.node_width(j) * spec.head_pool for j in spec.head_sources)
        with warnings.catch_warnings():  # a closed read-out has zero inputs: nothing to init
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.head = nn.Linear(n_head, spec.out_features)

    def _resolve_reads(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """The wiring, resolved once: per layer its (source node, pool index or -1) pairs, so
        the forward does no lookups (at batch 1 the per-layer Python work is most of the time:
        this made the pruned demo net ~1.4x faster there)."""
        spec = self.spec
        return tuple(
            tuple(
                (j, self._pool_keys.index((j, ls.stage)) if spec.node_stage(j) < ls.stage else -1)
                for j in ls.sources
            )
            for ls in spec.layers
        )

    def _resolve_pool_reuse(
        self,
    ) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[tuple[int, int], ...], ...]]:
        """For the channels-last path: per pooled copy ``(j, stage)`` the index of the
        coarsest copy of ``j`` made before it (-1: none, pool ``j`` itself) and the window
        left to pool; per node its pooled copies ``(index, window)``, coarsest first, for the
        read-out. A mean of equal-window means is the mean over the joined window (up to float
        rounding)."""
        spec = self.spec
        pool_from: list[tuple[int, int]] = []
        for idx, (j, stage) in enumerate(self._pool_keys):
            src, src_stage = -1, spec.node_stage(j)
            for prev, (pj, ps) in enumerate(self._pool_keys[:idx]):
                if pj == j and src_stage < ps < stage:
                    src, src_stage = prev, ps
            pool_from.append((src, 2 ** (stage - src_stage)))
        copies = tuple(
            tuple(
                sorted(
                    (
                        (i, 2 ** (ps - spec.node_stage(node)))
                        for i, (pj, ps) in enumerate(self._pool_keys)
                        if pj == node
                    ),
                    key=lambda pair: -pair[1],
                )
            )
            for node in range(len(spec.layers) + 1)
        )
        return tuple(pool_from), copies

    def _resolve_calls(self) -> tuple[tuple[nn.Module, nn.Module | None, nn.Module], ...]:
        """Per layer its (op, norm or None, activation) modules, so the forward reads no
        submodule attributes (each one is an ``nn.Module.__getattr__`` lookup; at batch 1 the
        pruned chain MLP ran ~20% slower than the same modules in an ``nn.Sequential``)."""
        return tuple(
            (layer.op, layer.norm, layer.act)
            for layer in (cast(_PlainLayer, m) for m in self.layers)
        )

    def _calls_key(self) -> list[tuple[nn.Module | None, ...]]:
        """The modules every layer holds, to notice a replaced one by identity."""
        # dictionary reads: no Module.__getattr__
        layers = cast(nn.Module, self._modules["layers"])._modules
        return [tuple(layer._modules.values()) for layer in layers.values() if layer is not None]

    def _current_calls(self) -> tuple[tuple[nn.Module, nn.Module | None, nn.Module], ...]:
        """:attr:`_calls`, resolved again when a layer or one of its modules was replaced
        (``net.layers[0].act = nn.GELU()``); the check costs ~1 us for 8 layers."""
        key = self._calls_key()
        if key != self.__dict__.get("_resolved_key"):
            self._calls = self._resolve_calls()
            self._resolved_key = key
        return self._calls

    def _standard_modules(self) -> bool:
        """Whether every submodule is what the constructor builds (exact types, stride-1
        'same' convolutions, running-stats BatchNorm, known elementwise activations, the
        expected pools): the channels-last path computes their function with its own code, so
        a replaced module (or a BatchNorm put back in training mode) sends the forward down
        the ``(B, C, L)`` path, which calls it."""
        acts = tuple(cls for _, cls in ACTIVATIONS.values())
        for op, norm, act in self._calls:
            if type(op) not in (nn.Conv1d, OffsetConv1d) or type(act) not in acts:
                return False
            conv = cast(nn.Conv1d, op)
            k = conv.kernel_size[0]
            if (
                conv.stride != (1,)
                or conv.dilation != (1,)
                or conv.groups != 1
                or conv.padding != (k // 2,)
                or conv.padding_mode != "zeros"
                or k % 2 == 0
            ):
                return False
            if norm is not None and (
                type(norm) is not nn.BatchNorm1d
                or norm.training
                or norm.running_mean is None
                or norm.running_var is None
            ):
                return False
        spec = self.spec
        pools_ok = len(self.pools) == len(self._pool_keys) and all(
            type(pool) is MeanPool1d and _is_size(pool.kernel_size, 2 ** (s - spec.node_stage(j)))
            for pool, (j, s) in zip(self.pools, self._pool_keys, strict=False)
        )
        heads_ok = len(self.head_pools) == len(self._head_reads) and all(
            type(pool) is AdaptiveMeanPool1d and _is_size(pool.output_size, spec.head_pool)
            for pool in self.head_pools
        )
        return pools_ok and heads_ok and type(self.head) is nn.Linear

    def __setstate__(self, state: dict[str, Any]) -> None:
        # whole models pickled (torch.save) before the wiring was resolved at construction
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        if "_reads" not in self.__dict__:
            self._reads = self._resolve_reads()
        if "_head_reads" not in self.__dict__:
            self._head_reads = tuple(self.spec.head_sources)
        if "_calls" not in self.__dict__:
            self._calls = self._resolve_calls()
        if "_min_length" not in self.__dict__:
            self._min_length = 2 ** max((ls.stage for ls in self.spec.layers), default=0)
        if "_script_rule" not in self.__dict__:
            self._script_rule = _script_rule(self.spec)
        if not isinstance(self.__dict__.get("_folded_convs"), tuple):
            self._folded_convs = None  # absent, or the per-layer cache of earlier versions
        if "channels_last" not in self.__dict__:
            self.channels_last = True
        if "_pool_from" not in self.__dict__:
            self._pool_from, self._pooled_copies = self._resolve_pool_reuse()
        if "_head_order" not in self._buffers:
            self.register_buffer("_head_order", self._resolve_head_order(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if is_scripting():  # torch.jit.script compiles this branch only
            return self._forward_scripted(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        """The forward (see :meth:`_forward_scripted` for the one TorchScript compiles)."""
        spec = self.spec
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got dtype {x.dtype}")
        if x.dim() != (3 if spec.spatial else 2) or x.shape[1] != spec.in_width:
            raise ValueError(
                f"expected input of shape (B, {spec.in_width}{', L' if spec.spatial else ''}),"
                f" got {tuple(x.shape)}"
            )
        if spec.spatial and x.shape[2] < self._min_length:
            raise ValueError(
                f"expected input of shape (B, {spec.in_width}, L) with L >= {self._min_length}"
                f" (each later stage halves the length), got {tuple(x.shape)}"
            )
        if spec.spatial and spec.input_length is not None and x.shape[2] != spec.input_length:
            raise ValueError(
                f"this pruned network was built for inputs of length {spec.input_length} (a"
                f" removed constant layer's position-dependent output was folded in), got"
                f" {x.shape[2]}"
            )
        if x.dtype != self.head.weight.dtype:
            check_input_dtype(x, self.head.weight)
        self._current_calls()  # re-resolved if a module was replaced
        if (
            spec.spatial
            and self.channels_last
            and not self.training
            and not _compiled()  # first: no guard on the batch size below
            and x.shape[0] >= CHANNELS_LAST_MIN_BATCH
            and not (torch.is_grad_enabled() and self._needs_grad(x))
            and not self._hooked()
            and self._standard_modules()
        ):
            return self._forward_channels_last(x)
        hs: list[Tensor] = [x]
        pooled: list[Tensor | None] = [None] * len(self._pool_keys)

        def make_pooled(pool: int, j: int) -> Tensor:
            return cast(Tensor, self.pools[pool](hs[j]))  # (B, C_j, L_stage)

        for reads, (op, norm, act) in zip(self._reads, self._calls, strict=True):
            if len(reads) == 1 and reads[0][1] < 0:  # one source, same resolution
                inp = hs[reads[0][0]]
            else:
                inp = _gather(reads, hs, pooled, make_pooled, dim=1)  # (B, sum C, L)
            z = op(inp)  # (B, C, L) or (B, C)
            hs.append(act(z if norm is None else norm(z)))
        if len(self._head_reads) == 1 and not spec.spatial:
            feat = hs[self._head_reads[0]]  # (B, C)
        elif not self._head_reads:
            feat = x.new_zeros(x.shape[0], 0)  # the read-out is closed: constant output
        else:
            feats = []
            for i, j in enumerate(self._head_reads):
                h = hs[j]
                if spec.spatial:
                    h = torch.flatten(self.head_pools[i](h), 1)  # (B, C_j * P)
                feats.append(h)
            # (B, sum C_j * P) or (B, sum C)
            feat = feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)
        out: Tensor = self.head(feat)  # (B, out_features)
        return out

    def _forward_scripted(self, x: Tensor) -> Tensor:
        """The forward ``torch.jit.script`` compiles: the ``(B, C, L)`` path, calling every
        module (each pooled copy made when its node is); the same function as the eager
        forward, whose cached module tuples, closure and channels-last path TorchScript
        cannot compile (they make the eager forward faster at batch 1 and 256)."""
        spatial, in_width, min_length, input_length, pool_nodes = self._script_rule
        if x.dim() != (3 if spatial else 2) or x.shape[1] != in_width:
            raise ValueError(
                f"expected input of {3 if spatial else 2} dimensions with {in_width} channels "
                f"(B, C, L) or features (B, C), got {x.shape}"
            )
        if spatial and (x.shape[2] < min_length or 0 < input_length != x.shape[2]):
            raise ValueError(
                f"expected inputs of length {input_length} (if > 0) and at least {min_length} "
                f"(each later stage halves the length), got {x.shape}"
            )
        hs: list[Tensor] = [x]
        pooled: list[Tensor | None] = [None for _ in range(len(self.pools))]
        for i, pool in enumerate(self.pools):  # copies of the input
            if pool_nodes[i] == 0:
                pooled[i] = pool(x)  # (B, C_in, L_stage)
        for layer, reads in zip(self.layers, self._reads):  # noqa: B905 (TorchScript: no strict)
            parts: list[Tensor] = []
            for j, copy_index in reads:
                part = hs[j] if copy_index < 0 else pooled[copy_index]
                if part is None:  # (made with its node; refines the type for TorchScript)
                    raise RuntimeError(f"pooled copy {copy_index} of node {j} is missing")
                parts.append(part)
            # (B, sum C, L) or (B, sum C)
            h = layer(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
            hs.append(h)  # (B, C, L) or (B, C)
            for i, pool in enumerate(self.pools):
                if pool_nodes[i] == len(hs) - 1:
                    pooled[i] = pool(h)  # (B, C, L_stage)
        if len(self._head_reads) == 0:
            feat = x.new_zeros(x.shape[0], 0)  # the read-out is closed: constant output
        elif spatial:
            feats: list[Tensor] = []
            for head_pool, j in zip(self.head_pools, self._head_reads):  # noqa: B905
                feats.append(torch.flatten(head_pool(hs[j]), 1))  # (B, C_j * P)
            feat = torch.cat(feats, dim=1)  # (B, sum C_j * P)
        else:
            feat = torch.cat([hs[j] for j in self._head_reads], dim=1)  # (B, sum C)
        out: Tensor = self.head(feat)  # (B, out_features)
        return out

    def _hooked(self) -> bool:
        """Whether forward hooks watch any submodule (e.g. :func:`gatedprune.cost` counting
        FLOPs per module): the channels-last path bypasses the modules' own forwards, so it
        is not taken then."""
        registry = nn.modules.module
        if getattr(registry, "_global_forward_hooks", None) or getattr(
            registry, "_global_forward_pre_hooks", None
        ):
            return True
        return any(
            m._forward_hooks or m._forward_pre_hooks for m in self.modules() if m is not self
        )

    def _needs_grad(self, x: Tensor) -> bool:
        """Whether a forward would be recorded by autograd (the channels-last path uses
        detached weight copies, so it is taken only when nothing is recorded)."""
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _folded_weights(self) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        """Every layer's convolution with its eval-mode BatchNorm folded in (as
        :meth:`fold_batchnorm` does): the weight as a channels-last ``(C_out, C_in, 1, k)``
        tensor, the bias and the scaled offset map of an :class:`OffsetConv1d` (``(C, 1, L)``).
        Cached, and recomputed whenever any value involved differs from the cached copy: a
        version counter would miss edits through ``.data``, so the values are compared (one
        concatenation and one comparison per forward, far cheaper than the convolutions)."""
        sources: list[Tensor] = []
        layout: list[object] = []  # which tensors exist, and the BatchNorm eps values
        for conv, norm, _ in self._calls:
            bn = cast(nn.BatchNorm1d | None, norm)
            extra = conv.offset if isinstance(conv, OffsetConv1d) else None
            stats = () if bn is None else (bn.weight, bn.bias, bn.running_mean, bn.running_var)
            for t in (cast(nn.Conv1d, conv).weight, cast(nn.Conv1d, conv).bias, extra, *stats):
                layout.append(t is None)
                if t is not None:
                    sources.append(t.detach().reshape(-1))  # (t.numel(),)
            layout.append(None if bn is None else bn.eps)
        if not sources:
            return []
        flat = torch.cat(sources)  # (n,) every value the folded weights depend on
        cached = self._folded_convs
        if (
            cached is not None
            and cached[1] == layout
            and cached[0].dtype == flat.dtype
            and cached[0].device == flat.device
            and cached[0].shape == flat.shape
            and torch.equal(cached[0], flat)
        ):
            hit: list[tuple[Tensor, Tensor | None, Tensor | None]] = cached[2]
            return hit
        folded = []
        with torch.no_grad():
            for conv, norm, _ in self._calls:
                op = cast(nn.Conv1d, conv)
                w = op.weight.detach()  # (C, C_in, k)
                b = None if op.bias is None else op.bias.detach()  # (C,)
                # (C, 1, L)
                offset = op.offset.unsqueeze(1) if isinstance(op, OffsetConv1d) else None
                if norm is not None:  # (C, C_in, k), (C,), (C, 1, L)
                    w, b, offset = _fold_batchnorm(norm, w, b, offset, "the channels-last path")
                w4 = w.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # (C, C_in, 1, k)
                folded.append((w4, b, offset))
        self._folded_convs = (flat, layout, folded)
        return folded

    def _forward_channels_last(self, x: Tensor) -> Tensor:
        """The eval-mode forward of a spatial network with every feature map kept as a
        contiguous ``(B, L, C)`` tensor: each convolution runs as a channels-last 2-d
        convolution (oneDNN's ``nwc`` kernels, which do not pad the channels to blocks of 16),
        eval-mode BatchNorm is folded into the convolution (cached weights, as
        :meth:`fold_batchnorm`), concatenations and pooling work on contiguous channel rows
        (pooled copies made from the coarsest copy pooled before), and the read-out's weight
        columns are permuted to the ``(position, channel)`` order of the pooled maps. Same
        function as the ``(B, C, L)`` path up to float rounding; at batch 256 (1 thread) the
        demo network and its pruned versions run 1.19-1.23x faster (``bench.budget_sweep``).
        Taken in eval mode from ``CHANNELS_LAST_MIN_BATCH`` samples on, when autograd records
        nothing (inference mode, ``no_grad`` or frozen parameters)."""
        spec = self.spec
        batch = x.shape[0]
        hs: list[Tensor] = [x.transpose(1, 2).contiguous()]  # (B, L, C_in)
        pooled: list[Tensor | None] = [None] * len(self._pool_keys)

        def make_pooled(pool: int, j: int) -> Tensor:
            src, k = self._pool_from[pool]  # a coarser copy made before, if any
            base = hs[j] if src < 0 else cast(Tensor, pooled[src])
            return mean_pool_rows(base, k)  # (B, L_stage, C_j)

        folded = self._folded_weights()
        for reads, (op, _, act), (weight, bias, offset) in zip(
            self._reads, self._calls, folded, strict=True
        ):
            inp = _gather(reads, hs, pooled, make_pooled, dim=2)  # (B, L, sum C)
            k = cast(nn.Conv1d, op).kernel_size[0]
            if inp.shape[2] == 1:
                hs.append(_activate(act, _conv_one_channel(inp, weight, bias, offset)))  # (B, L, C)
                continue
            z = F.conv2d(
                inp.transpose(1, 2).unsqueeze(2),  # (B, C_in, 1, L) channels-last
                weight,
                bias,
                padding=(0, k // 2),
            )  # (B, C, 1, L) channels-last
            if offset is not None:
                z = z + offset  # (B, C, 1, L)
            hs.append(_activate(act, z).squeeze(2).transpose(1, 2).contiguous())  # (B, L, C)
        if not self._head_reads:
            return cast(Tensor, self.head(x.new_zeros(batch, 0)))  # a closed read-out
        feats = []
        for j in self._head_reads:
            h = hs[j]  # (B, L_j, C_j)
            length = h.shape[1]
            if length % spec.head_pool == 0:
                for idx, window in self._pooled_copies[j]:  # the coarsest copy that nests
                    coarse = cast(Tensor, pooled[idx])  # (B, L', C_j)
                    if coarse.shape[1] * window == length and coarse.shape[1] % spec.head_pool == 0:
                        h = coarse
                        break
                feats.append(mean_pool_rows(h, h.shape[1] // spec.head_pool))  # (B, P, C_j)
            else:
                h = F.adaptive_avg_pool1d(h.transpose(1, 2), spec.head_pool)  # (B, C_j, P)
                feats.append(h.transpose(1, 2))  # (B, P, C_j)
        feat = feats[0] if len(feats) == 1 else torch.cat(feats, dim=2)  # (B, P, sum C)
        order = cast(Tensor, self._head_order)
        weight = self.head.weight.index_select(1, order)  # (out, P * sum C)
        flat = feat.reshape(batch, -1)  # (B, P * sum C)
        bias = self.head.bias
        n_out = weight.shape[0]
        if bias is None or not 1 < n_out < 48 or n_out % 16 == 0:
            return F.linear(flat, weight, bias)  # (B, out)
        # (out, F) @ (F, B) instead: for a few outputs, not a multiple of 16, oneMKL's product
        # with the batch as the long side is 1.2-2.3x faster (ad hoc, 1 thread, batch 256)
        return torch.addmm(bias[:, None], weight, flat.t()).t().contiguous()  # (B, out)

    def _resolve_head_order(self) -> Tensor:
        """Column order of the read-out's weight for features flattened as (position,
        channel) instead of (channel, position) per source."""
        spec = self.spec
        if not spec.spatial:
            return torch.zeros(0, dtype=torch.long)
        pool = spec.head_pool
        positions = torch.arange(pool)[:, None]  # (P, 1)
        blocks, start = [], 0
        for j in spec.head_sources:
            width = spec.node_width(j)
            blocks.append(start + torch.arange(width)[None, :] * pool + positions)  # (P, C_j)
            start += width * pool
        if not blocks:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(blocks, dim=1).flatten()  # (P * sum C,) position-major

    @torch.no_grad()
    def fold_batchnorm(self) -> PlainShortcutNet:
        """A copy for deployment with every BatchNorm folded into the convolution (or Linear)
        before it: ``a * (W x + b + offset - mean) + beta`` with ``a = gamma / sqrt(var + eps)``
        becomes ``(a W) x + a (b - mean) + beta + a offset``. Same function in eval mode (up to
        float rounding), one element-wise pass less per layer.

        >>> from gatedprune.layout import LayerSpec, NetSpec
        >>> net = PlainShortcutNet(NetSpec(True, 1, (LayerSpec((0,), 4),), (1,), 2, 3, 2, True))
        >>> net.eval().fold_batchnorm().spec.norm
        False
        """
        if not self.spec.norm:
            raise ValueError("this network has no BatchNorm to fold")
        folded = PlainShortcutNet(replace(self.spec, norm=False)).to(self.head.weight)
        for src, dst in zip(self.layers, folded.layers, strict=True):
            src = cast(_PlainLayer, src)
            dst = cast(_PlainLayer, dst)
            offset = src.op.offset if isinstance(src.op, OffsetConv1d) else None  # (C, L)
            w, b, offset = _fold_batchnorm(
                src.norm,
                cast(Tensor, src.op.weight),
                cast(Tensor, src.op.bias),
                offset,
                "fold_batchnorm",
            )
            dst.op.weight.copy_(w)  # type: ignore[operator]
            dst.op.bias.copy_(b)  # type: ignore[operator]
            if offset is not None and isinstance(dst.op, OffsetConv1d):
                dst.op.offset.copy_(offset)
            dst.act = copy.deepcopy(src.act)  # a replaced activation stays (net.layers[0].act)
        folded.head.load_state_dict(self.head.state_dict())
        folded.channels_last = self.channels_last  # a path switched off stays off
        return folded.train(self.training)

    def to_config(self) -> dict[str, Any]:
        """JSON-able structure (weights excluded): the spec's, plus an ``"overrides"`` entry
        when layers hold other settings than the spec builds: per-layer ``"activation"`` names
        (an activation replaced by another class of :data:`~gatedprune.layout.ACTIVATIONS`,
        ``net.layers[0].act = nn.Tanh()``) and BatchNorm ``"norm_eps"`` / ``"norm_momentum"``,
        one entry per layer, and ``"channels_last": false`` when a spatial network's
        channels-last eval path is switched off. Modules it cannot describe (another activation
        class, an edited convolution) keep the spec's entry: :func:`gatedprune.save` refuses
        such a model.

        >>> from gatedprune.layout import LayerSpec, NetSpec
        >>> net = PlainShortcutNet(NetSpec(False, 3, (LayerSpec((0,), 4),), (1,), 2))
        >>> net.layers[0].act = nn.Tanh()
        >>> net.to_config()["overrides"]
        {'activation': ['tanh']}
        >>> type(PlainShortcutNet.from_config(net.to_config()).layers[0].act).__name__
        'Tanh'
        """
        config = self.spec.to_json()
        overrides = self._overrides()
        if overrides:
            config[_OVERRIDES] = overrides
        return config

    def _overrides(self) -> dict[str, Any]:
        """Per-layer settings that differ from what the spec builds, one list entry per layer
        for each kind of setting that differs somewhere (see :meth:`to_config`), and
        ``"channels_last": false`` for a spatial network with that eval path switched off."""
        acts: list[str] = []
        eps: list[float] = []
        momentum: list[float | None] = []
        for layer in self.layers:  # a module the config cannot describe keeps the default
            act = getattr(layer, "act", None)  # and gatedprune.save refuses it, naming it
            acts.append(
                (_activation_name(act) if isinstance(act, nn.Module) else None)
                or self.spec.activation
            )
            norm = getattr(layer, "norm", None)
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm too
                eps.append(_real(norm.eps, _BN_EPS))
                m = norm.momentum
                momentum.append(None if m is None else _real(m, _BN_MOMENTUM))
            else:
                eps.append(_BN_EPS)
                momentum.append(_BN_MOMENTUM)
        out: dict[str, Any] = {}
        if self.spec.spatial and not self.__dict__.get("channels_last", True):
            out["channels_last"] = False
        if any(a != self.spec.activation for a in acts):
            out["activation"] = acts
        if self.spec.norm and any(e != _BN_EPS for e in eps):
            out["norm_eps"] = eps
        if self.spec.norm and any(m != _BN_MOMENTUM for m in momentum):
            out["norm_momentum"] = momentum
        return out

    def _apply_overrides(self, overrides: object) -> None:
        """Set the per-layer settings of :meth:`to_config`'s ``"overrides"`` entry (validated:
        ``ValueError`` for anything else)."""
        if not isinstance(overrides, dict):
            raise ValueError(f"overrides must be a JSON object, got {overrides!r}")
        known = {"activation", "norm_eps", "norm_momentum", "channels_last"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown overrides {unknown} (this gatedprune knows {sorted(known)}; a newer "
                "version may have written them)"
            )
        if "channels_last" in overrides:
            flag = overrides["channels_last"]
            if not isinstance(flag, bool):
                raise ValueError(f"overrides 'channels_last' must be true or false, got {flag!r}")
            self.channels_last = flag
        n = len(self.layers)
        for key, values in overrides.items():
            if key == "channels_last":
                continue
            if not isinstance(values, list) or len(values) != n:
                raise ValueError(f"overrides {key!r} must be a list of {n} entries, got {values!r}")
            if key != "activation" and not self.spec.norm:
                raise ValueError(f"overrides {key!r} given, but the network has no BatchNorm")
        layers = cast(list[_PlainLayer], list(self.layers))
        for layer, name in zip(layers, overrides.get("activation", []), strict=False):
            layer.act = ACTIVATIONS[check_activation(name)][1]()
        for layer, e in zip(layers, overrides.get("norm_eps", []), strict=False):
            if not _is_real(e) or not 0 <= e < math.inf:
                raise ValueError(f"overrides 'norm_eps' must hold finite numbers >= 0, got {e!r}")
            cast(nn.BatchNorm1d, layer.norm).eps = float(e)
        for layer, m in zip(layers, overrides.get("norm_momentum", []), strict=False):
            if m is not None and (not _is_real(m) or not math.isfinite(m)):
                raise ValueError(
                    f"overrides 'norm_momentum' must hold finite numbers or null, got {m!r}"
                )
            cast(nn.BatchNorm1d, layer.norm).momentum = None if m is None else float(m)
        self._calls = self._resolve_calls()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PlainShortcutNet:
        """Rebuild an (untrained) network from :meth:`to_config` output (older configs, without
        ``"overrides"``, too)."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        net = cls(NetSpec.from_json(config))
        if _OVERRIDES in config:
            net._apply_overrides(config[_OVERRIDES])
        return net


_OVERRIDES = "overrides"  # gatedprune.io.OVERRIDES_KEY: such configs are saved as version 2
_BN_EPS = 1e-5  # nn.BatchNorm1d's defaults, which _PlainLayer builds
_BN_MOMENTUM = 0.1


def _is_real(v: object) -> bool:
    """Whether ``v`` is a real number (an int or float, not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def _real(v: object, default: float) -> float:
    """``v`` as a float if it is a real number, else ``default`` (what the config can say)."""
    return float(v) if _is_real(v) else default  # type: ignore[arg-type]


def _activation_name(act: nn.Module) -> str | None:
    """The :data:`~gatedprune.layout.ACTIVATIONS` name of ``act`` if it is one of those modules
    with its default settings, else None.

    >>> _activation_name(nn.Tanh()), _activation_name(nn.GELU(approximate="tanh"))
    ('tanh', None)
    """
    for name, (_, cls) in ACTIVATIONS.items():
        if type(act) is cls and act.extra_repr() == cls().extra_repr():
            return name
    return None
