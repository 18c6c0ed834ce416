"""Turning pruning decisions into a smaller model: folding gate values, slicing the user's own
modules in place, and rewriting (as fx ``GraphModule``) only the innermost modules whose code
must change because a residual branch disappeared.

A *plan* is plain JSON: which channels each module keeps, which residual adds lose their
branch, which modules are rewritten and which graph nodes are erased. :func:`apply_plan` replays
it on a freshly built dense model, so the pruned weights load with ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, cast

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..base import (
    BATCH_NORMS,
    INSTANCE_NORMS,
    TRANSPOSED_CONVS,
    find_model_gating,
    weight_norm_layer,
)
from ..fingerprint import (
    fingerprint_difference,
    graph_fingerprint,
    json_checksum,
    model_fingerprint,
)
from ..functional_costs import FunctionalCounter
from ..hooks import copy_hooks, describe_hooks
from .blocks import ACTIVATION_TAILS, graph_writes, live_nodes
from .channels import bias_attr, linear_operands, scale_chain, weight_source
from .graph import (
    GateTracer,
    ModuleCall,
    TensorSpec,
    TracedModel,
    example_specs,
    inlined_calls,
    is_constant,
    keep_argument_names,
    node_owners,
    optional_defaults,
    owner_of,
    scope_nodes,
    trace_model,
)
from .rnn import apply_rnn_plan
from .transformer import (
    build_pruned_attention,
    build_pruned_decoder_layer,
    build_pruned_layer,
    prepare_encoders,
)

__all__ = [
    "PLAN_FORMAT",
    "PrunedGraphModule",
    "ScaledAdd",
    "apply_plan",
    "computed_tensors",
    "fold_input_scale",
    "fold_param_scale",
    "fold_scale",
    "scale_dim",
    "slice_module",
    "slice_param",
]

PLAN_FORMAT = "gatedprune.plan/1"
_SIZE_KEYS = ("split_size", "repeats")  # the sizes a plan rewrites besides dimensions
# + i: a split's section i, a tensor_split's index i, the start / stop of a slice of the
# channels at item i of a getitem's index (x[:, a:b])
_SECTION_KEYS = ("section_", "index_", "start_", "stop_")


def _section_key(key: object) -> tuple[str, int] | None:
    """``("section", i)`` / ``("index", i)`` for a plan's size key ``"section_i"`` (section
    ``i`` of ``split((d, kv * hd, kv * hd))``) / ``"index_i"`` (index ``i`` of
    ``tensor_split((d, d + kv * hd))``), else None.

    >>> _section_key("section_2"), _section_key("index_0"), _section_key("section_x")
    (('section', 2), ('index', 0), None)
    >>> _section_key("stop_1")
    ('stop', 1)
    """
    if not isinstance(key, str):
        return None
    for prefix in _SECTION_KEYS:
        rest = key.removeprefix(prefix)
        if rest != key and rest.isdigit() and rest.isascii():
            return prefix[:-1], int(rest)
    return None


def _size_key(key: object) -> bool:
    """Whether ``key`` names a size a plan may rewrite: an output dimension (an int), a
    split's ``"split_size"`` or section, a ``tensor_split``'s index, or ``"repeats"``."""
    dim = isinstance(key, int) and not isinstance(key, bool)
    return dim or key in _SIZE_KEYS or _section_key(key) is not None


_CONVT = TRANSPOSED_CONVS
# a convolution or transposed convolution, 1-d, 2-d or 3-d
_AnyConv = (
    nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
)


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

    if TYPE_CHECKING:  # for mypy only: TorchScript cannot read this string annotation
        scale: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.zeros((), dtype=torch.float32))

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return x + self.scale * s  # same shape as x

    def flops_of(self, inputs: tuple[Any, ...], output: Any) -> int:
        """2 FLOPs per output element (the multiply and the add)."""
        return 2 * int(output.numel())


class GateScale(nn.Module):
    """An activation a residual branch ends in, with its block gate's value kept, in a pruned
    model: ``forward(x) = module(x) * scale`` (``x + g * act(z)``, which no weight can
    fold). ``scale`` is a 0-dim buffer (the gate value in the gates' dtype, in the
    ``state_dict``, not a parameter); its multiply is an element-wise op, free as the gated
    model's is.

    >>> m = GateScale(nn.Hardtanh())
    >>> _ = m.scale.fill_(0.5)
    >>> m(torch.tensor([[-1.0, 4.0]])).tolist()
    [[-0.5, 0.5]]
    """

    if TYPE_CHECKING:  # for mypy only
        scale: Tensor

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.module(x)  # x's shape
        return y * self.scale


class PrunedGraphModule(fx.GraphModule):
    """A module whose ``forward`` was rewritten by pruning (fx generated code).

    Left with no submodules it only runs functional ops: :meth:`flops_of` counts the matrix
    products among them (:mod:`gatedprune.functional_costs`), as ``gatedprune.cost`` counts
    them in any ``forward``; element-wise ops are free. It is the user's code (``gatedprune.
    costs.is_code``), as the module it was rewritten from was: ``gate_`` traces through it and
    gates the maps written with its parameters again.
    """

    gatedprune_rewritten: ClassVar[bool] = True

    def flops_of(self, inputs: tuple[Any, ...], output: Any) -> int:
        """The FLOPs of the products its code runs on ``inputs`` (run again, without hooks)."""
        with torch.no_grad(), FunctionalCounter() as counter:
            try:
                self.forward(*inputs)
            except TypeError as e:  # e.g. called with keyword arguments the hook cannot see
                raise TypeError(
                    f"cannot count the FLOPs of pruned module {type(self).__name__}: running "
                    f"its forward again on its positional inputs failed ({e})"
                ) from e
        return int(counter.flops)

    def __deepcopy__(self, memo: dict[int, Any]) -> fx.GraphModule:
        copied = super().__deepcopy__(memo)
        type(copied).__name__ = type(self).__name__  # fx names a copy's class "GraphModule"
        return copied

    def __reduce__(self) -> tuple[Any, ...]:
        rv = super().__reduce__()  # GraphModule pickles as a plain GraphModule: re-wrap it
        return (_restore_pruned, (rv[0], rv[1], type(self).__name__))


def _restore_pruned(fn: Any, args: tuple[Any, ...], name: str) -> PrunedGraphModule:
    gm = fn(*args)
    return PrunedGraphModule(gm, gm.graph, class_name=name)


def fold_scale(m: nn.Module, scale: Tensor) -> None:
    """Multiply the output channels of ``m`` by ``scale`` ``(C,)`` (or a scalar) in place.

    >>> t = nn.ConvTranspose1d(4, 4, 1, groups=2, bias=False)  # weight (4, 2, 1)
    >>> _ = t.weight.data.fill_(1.0)
    >>> fold_scale(t, torch.tensor([1.0, 0.0, 2.0, 3.0]))
    >>> t(torch.ones(1, 4, 1)).flatten().tolist()  # each output sums its group's 2 inputs
    [2.0, 0.0, 4.0, 6.0]
    """
    with torch.no_grad():
        if weight_norm_layer(m):  # weight g * v / ||v||: the rows' scale goes into g
            mag = _weight_norm_parts(m)[0]  # (C, 1, ...)
            mag.mul_(scale.to(mag.dtype).reshape(-1, *([1] * (mag.dim() - 1))))
            bias = cast(Tensor | None, m.bias)
            if bias is not None:
                bias.mul_(scale.to(bias.dtype).reshape(-1))  # (C,) or (1,)
        elif isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            # (C, 1, ...), or (1, 1, ...) for a scalar scale
            s = scale.to(m.weight.dtype).reshape(-1, *([1] * (m.weight.dim() - 1)))
            m.weight.mul_(s)
            if m.bias is not None:
                m.bias.mul_(s.reshape(-1))  # (C,) or (1,)
        elif isinstance(m, _CONVT):  # weight (C_in, C_out / groups, *k)
            g, k = m.groups, [1] * (m.weight.dim() - 2)
            s = scale.to(m.weight.dtype).reshape(-1)  # (C_out,) or (1,)
            if s.numel() > 1:  # output o: column o % (C_out / g) of group o // (C_out / g)'s rows
                per_in = m.in_channels // g
                s = s.reshape(g, 1, -1).expand(g, per_in, -1)  # (g, C_in / g, C_out / g)
                m.weight.mul_(s.reshape(m.in_channels, -1, *k))  # (C_in, C_out / g, 1, ...)
            else:
                m.weight.mul_(s)
            if m.bias is not None:
                m.bias.mul_(scale.to(m.bias.dtype).reshape(-1))  # (C_out,) or (1,)
        elif isinstance(m, nn.Embedding | nn.EmbeddingBag):  # weight (V, D): its columns
            m.weight.mul_(scale.to(m.weight.dtype).reshape(1, -1))  # (1, D) or (1, 1)
        elif isinstance(m, nn.MultiheadAttention):  # a scalar (block gate) on its output
            m.out_proj.weight.mul_(scale.to(m.out_proj.weight.dtype))
            if m.out_proj.bias is not None:
                m.out_proj.bias.mul_(scale.to(m.out_proj.bias.dtype))
        elif isinstance(m, (BATCH_NORMS, INSTANCE_NORMS, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is None:
                raise TypeError(f"cannot fold a gate into {type(m).__name__} without affine")
            s = scale.to(m.weight.dtype)
            m.weight.mul_(s)
            if m.bias is not None:
                m.bias.mul_(s)
        else:
            raise TypeError(f"cannot fold a gate into {type(m).__name__}")


def _weight_norm_parts(m: nn.Module) -> tuple[Tensor, Tensor]:
    """``(g, v)`` of a :func:`weight_norm_layer` ``m``: ``g`` ``(C_out, 1, ...)``, ``v`` the
    shape of the weight."""
    plist = cast(nn.Module, m.parametrizations.weight)  # type: ignore[union-attr]
    return cast(Tensor, plist.original0), cast(Tensor, plist.original1)


def _set_weight_norm(m: nn.Module, g_rows: Tensor, v_rows: Tensor, v: Tensor) -> None:
    """Give the :func:`weight_norm_layer` ``m`` the direction ``v`` and the magnitudes that
    keep each row of its weight the same where ``v`` differs from ``v_rows`` (its rows of the
    old direction, cut or scaled by column): ``g = g_rows * ||v|| / ||v_rows||``, computed in
    float64. A row ``v`` zeroes (its weight row is zero) gets ``g = 0`` and a direction of
    ones, not ``0 / 0``.

    >>> lin = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    >>> before = lin.weight.detach()[:, :2].clone()
    >>> g, v = _weight_norm_parts(lin)
    >>> _set_weight_norm(lin, g, v, v[:, :2])  # keep input features 0 and 1
    >>> bool(torch.allclose(lin.weight, before))
    True
    """
    old = v_rows.detach().flatten(1).to(torch.float64).norm(dim=1)  # (C_out,)
    new = v.detach().flatten(1).to(torch.float64).norm(dim=1)  # (C_out,)
    gone = old == 0  # a zero direction (its weight row 0 / 0 already): left as it is
    ratio = torch.where(gone, torch.ones_like(new), new / torch.where(gone, 1.0, old))
    zero = (new == 0) & ~gone
    shape = (-1, *([1] * (v.dim() - 1)))
    g_new = (g_rows.detach().to(torch.float64) * ratio.reshape(shape)).to(g_rows.dtype)
    v_new = v.detach().clone()
    if bool(zero.any()):
        v_new[zero] = 1.0
    plist = cast(nn.Module, m.parametrizations.weight)  # type: ignore[union-attr]
    _set(plist, "original0", g_new, True)  # (C_out, 1, ...)
    _set(plist, "original1", v_new, True)


def _parametrizations(m: nn.Module) -> dict[str, list[nn.Module]]:
    """The parametrizations of ``m`` (``torch.nn.utils.parametrize``) by attribute name."""
    if not parametrize.is_parametrized(m):
        return {}
    plists = cast(nn.ModuleDict, m.parametrizations)
    return {attr: list(cast(nn.ModuleList, plist)) for attr, plist in plists.items()}


def computed_tensors(
    m: nn.Module, own: tuple[type[nn.Module], ...] = (), *, weight_norm: bool = False
) -> list[str]:
    """The tensors of ``m`` (by attribute name) that it computes when it runs, so that slicing
    or scaling what it stores would not change them: an attribute with a parametrization
    (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm``, a LoRA-style one) that
    is not only of the classes ``own``, or one set by a forward pre-hook of the old
    ``nn.utils.weight_norm`` / ``spectral_norm``. With ``weight_norm``, not the weight of a
    :func:`weight_norm_layer` (:func:`slice_module` and the folds slice and scale its ``g``
    and ``v``).

    >>> computed_tensors(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2)))
    ['weight']
    >>> computed_tensors(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2)), weight_norm=True)
    []
    >>> computed_tensors(nn.Linear(2, 2))
    []
    """
    if weight_norm and weight_norm_layer(m):
        return []
    names = [a for a, ps in _parametrizations(m).items() if any(not isinstance(p, own) for p in ps)]
    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm | SpectralNorm):
            names.append(str(hook.name))
    return names


def refuse_computed(
    name: str,
    m: nn.Module,
    attrs: list[str] | None = None,
    own: tuple[type[nn.Module], ...] = (),
    *,
    weight_norm: bool = False,
) -> None:
    """``ValueError`` if module ``name`` (``m``), which prune slices or scales, computes any of
    the tensors ``attrs`` (None: any) when it runs (see :func:`computed_tensors`, which
    ``weight_norm`` is passed to): a parametrization added after ``gate_``, whose stored
    tensor prune would slice or scale while the layer computes another one (a bare
    ``KeyError`` from torch, or silently wrong weights, before 2026-12-07 21:00 UTC).

    >>> refuse_computed("fc", nn.Linear(2, 2))  # stored weights: nothing to refuse
    """
    found = [
        a for a in computed_tensors(m, own, weight_norm=weight_norm) if attrs is None or a in attrs
    ]
    if not found:
        return
    what = ", ".join(f"'{a}'" for a in found)
    plists = _parametrizations(m)
    gated = [a for a in found if any(isinstance(p, own) for p in plists.get(a, []))]
    fix = (
        "add parametrizations before gate_ (which then keeps such a layer whole)"
        if gated  # removing it would bake the gate into the tensor too
        else "add parametrizations before gate_ (which then keeps such a layer whole), or "
        "remove them before pruning (torch.nn.utils.parametrize.remove_parametrizations("
        "module, name, leave_parametrized=True) keeps their current value)"
    )
    raise ValueError(
        f"cannot prune module '{name}' ({type(m).__name__}): it computes {what} when it runs "
        "(a parametrization such as weight_norm or a LoRA-style one, or the old "
        "nn.utils.weight_norm/spectral_norm pre-hook), so slicing or scaling the stored "
        f"tensors would not change what it computes; {fix}"
    )


def _param_owner(
    model: nn.Module, path: str, buffers: bool = False
) -> tuple[nn.Module, str, Tensor]:
    """``(module holding it, attribute name, parameter)`` of the parameter ``path`` (or, if
    ``buffers``, of the buffer ``path``)."""
    owner_path, _, attr = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    p = owner._parameters.get(attr)
    if buffers and p is None:
        b = owner._buffers.get(attr)
        if isinstance(b, Tensor):
            return owner, attr, b
    if not isinstance(p, nn.Parameter):
        raise AttributeError(f"{type(owner).__name__} has no parameter '{attr}'")
    return owner, attr, p


def fold_param_scale(model: nn.Module, path: str, dim: int, scale: Tensor) -> None:
    """Multiply parameter ``path`` of ``model`` along ``dim`` by ``scale`` ``(n,)`` in place:
    a gate on the output units of a linear map written with it (``x @ W``: ``dim=1``).

    >>> net = nn.Module()
    >>> net.w = nn.Parameter(torch.ones(2, 3))
    >>> fold_param_scale(net, "w", 1, torch.tensor([1.0, 0.0, 2.0]))
    >>> net.w.tolist()
    [[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]]
    """
    _, _, p = _param_owner(model, path)
    shape = [1] * p.dim()
    shape[dim] = -1
    with torch.no_grad():
        p.mul_(scale.to(p.dtype).reshape(shape))  # (n, 1) / (1, n) / (n,)


_PARAM_KINDS = ("matrix", "matrix_t", "kernel", "vector", "scale", "heads")


def scale_dim(shape: Sequence[int]) -> int | None:
    """The dimension holding the channels of a per-channel factor of ``shape`` (a layer scale
    ``(C,)``, ``(C, 1, 1)``, ``(1, C, 1)``, ...): its only dimension of size > 1; None if it
    has none or several.

    >>> scale_dim((1, 8, 1)), scale_dim((8,)), scale_dim((2, 8))
    (1, 0, None)
    """
    big = [i for i, v in enumerate(shape) if v != 1]
    return big[0] if len(big) == 1 else None


def slice_param(
    model: nn.Module,
    path: str,
    kind: str,
    keep_in: list[int] | None,
    keep_out: list[int] | None,
    dim: int | None = None,
) -> None:
    """Keep only input features ``keep_in`` and output units ``keep_out`` (None: all) of
    parameter ``path`` of ``model``, replaced in place by a new ``nn.Parameter`` of the same
    name: ``kind`` ``"matrix"`` for a weight ``(out, in)`` (as ``F.linear`` reads it),
    ``"matrix_t"`` for ``(in, out)`` (as ``x @ W`` reads it), ``"kernel"`` for a convolution's
    weight ``(out, in, *kernel)`` (as ``F.conv2d`` reads it), ``"vector"`` for a bias
    ``(out,)``, ``"scale"`` for a per-channel factor (layer scale, ``(C,)``, ``(C, 1, 1)``,
    ..., sliced along its one dimension of size > 1: :func:`scale_dim`), ``"heads"`` for a
    per-head term of attention scores (a parameter or buffer, sliced along ``dim``: Swin's
    relative position bias table, ALiBi's slopes). An ``nn.Linear``
    holding it gets its new ``in_features`` / ``out_features``, an ``nn.Conv*d`` (subclass)
    its new ``in_channels`` / ``out_channels``.

    >>> net = nn.Module()
    >>> net.w = nn.Parameter(torch.arange(6.0).reshape(2, 3))
    >>> slice_param(net, "w", "matrix_t", [1], [0, 2])
    >>> net.w.tolist()
    [[3.0, 5.0]]
    """
    owner, attr, p = _param_owner(model, path, buffers=kind == "heads")
    if kind == "heads":
        if dim is None or not 0 <= dim < p.dim():
            raise ValueError(
                f"a 'heads' slice of '{path}' (shape {tuple(p.shape)}) needs the dimension "
                f"of its heads, got dim={dim!r}"
            )
        _set(owner, attr, _take(p, dim, keep_out), isinstance(p, nn.Parameter))
        return
    if kind in ("matrix", "kernel"):
        w = _take(_take(p, 0, keep_out), 1, keep_in)
    elif kind == "matrix_t":
        w = _take(_take(p, 1, keep_out), 0, keep_in)
    elif kind == "vector":
        w = _take(p, 0, keep_out)
    elif kind == "scale":
        dim = scale_dim(p.shape)
        if dim is None:
            raise ValueError(
                f"parameter '{path}' of shape {tuple(p.shape)} is not a per-channel factor "
                "(expected exactly one dimension of size > 1)"
            )
        w = _take(p, dim, keep_out)
    else:
        raise ValueError(f"unknown parameter slice kind {kind!r}: expected one of {_PARAM_KINDS}")
    _set(owner, attr, w, True)
    if isinstance(owner, nn.Linear):
        owner.out_features, owner.in_features = (int(d) for d in owner.weight.shape)
    if kind == "kernel" and isinstance(owner, nn.modules.conv._ConvNd) and attr == "weight":
        # its own forward (super().forward, repr) reads them; a sliced weight has groups=1
        owner.out_channels, owner.in_channels = (int(d) for d in owner.weight.shape[:2])


def fold_input_scale(m: nn.Module, scale: Tensor) -> None:
    """Multiply the input features of Linear ``m`` by ``scale`` ``(C_in,)`` in place: its
    weight's columns, so ``m(x)`` becomes ``m(x * scale)`` (its bias unchanged).

    >>> lin = nn.Linear(2, 1, bias=False)
    >>> _ = lin.weight.data.fill_(1.0)
    >>> fold_input_scale(lin, torch.tensor([0.5, 0.0]))
    >>> lin.weight.tolist()
    [[0.5, 0.0]]
    """
    if not isinstance(m, nn.Linear):
        raise TypeError(f"cannot fold an input gate into {type(m).__name__} (expected nn.Linear)")
    if scale.shape != (m.in_features,):
        raise ValueError(
            f"expected an input scale of shape ({m.in_features},), got {tuple(scale.shape)}"
        )
    if weight_norm_layer(m):  # its weight's columns scaled: v's, g rescaled to match
        g, v = _weight_norm_parts(m)
        _set_weight_norm(m, g, v, v.detach() * scale.to(v.dtype).reshape(1, -1))  # (1, C_in)
        return
    with torch.no_grad():
        m.weight.mul_(scale.to(m.weight.dtype).reshape(1, -1))  # (1, C_in)


def _take(p: Tensor, dim: int, keep: list[int] | None) -> Tensor:
    if keep is None:
        return p.detach().clone()
    return p.detach().index_select(dim, torch.tensor(keep, dtype=torch.long)).clone()


_MEMORY_FORMATS = ((4, torch.channels_last), (5, torch.channels_last_3d))


def _same_format(src: Tensor, t: Tensor) -> Tensor:
    """``t`` (a slice of ``src``) in ``src``'s memory format: a ``channels_last`` (4-d) or
    ``channels_last_3d`` (5-d) tensor stays one (``index_select`` returns a contiguous tensor;
    before 2026-12-07 21:00 UTC every sliced convolution of a ``channels_last`` model came back
    contiguous, its untouched ones not).

    >>> w = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    >>> _same_format(w, w[:2].contiguous()).is_contiguous(memory_format=torch.channels_last)
    True
    """
    for dim, fmt in _MEMORY_FORMATS:
        ambiguous = src.is_contiguous()  # e.g. 1 x 1 kernels: both layouts at once
        if src.dim() == dim == t.dim() and not ambiguous and src.is_contiguous(memory_format=fmt):
            return t.contiguous(memory_format=fmt)
    return t


def _set(m: nn.Module, name: str, value: Tensor, param: bool) -> None:
    old = getattr(m, name)
    if isinstance(old, Tensor):
        value = _same_format(old, value)  # (a channels_last weight stays channels_last)
    if param:
        setattr(m, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(m, name, value)


def _cut_weight(
    m: nn.Module, cut: Callable[[Tensor], Tensor], keep_out: list[int] | None
) -> Tensor:
    """Set ``m``'s weight to ``cut`` of it (rows ``keep_out`` and kept columns) and return the
    new weight (its direction ``v`` for a :func:`weight_norm_layer`, whose ``g`` is sliced to
    the kept rows and rescaled so that each kept row of the weight keeps its kept columns'
    values)."""
    if not weight_norm_layer(m):
        w = cut(cast(Tensor, m.weight))
        _set(m, "weight", w, True)
        return w
    g, v = _weight_norm_parts(m)
    v_new = cut(v)  # (out', in', *k)
    _set_weight_norm(m, _take(g, 0, keep_out), _take(v, 0, keep_out), v_new)
    return v_new


def slice_module(
    m: nn.Module, kind: str, keep_in: list[int] | None, keep_out: list[int] | None
) -> None:
    """Keep only channels ``keep_in`` / ``keep_out`` (None: all) of ``m``, in place.

    >>> t = nn.ConvTranspose1d(6, 4, 2, groups=2)  # 3 inputs and 2 outputs per group
    >>> slice_module(t, "gconvt", [0, 2, 3, 5], [1, 3])  # the same positions in each group
    >>> t, tuple(t.weight.shape)
    (ConvTranspose1d(4, 2, kernel_size=(2,), stride=(1,), groups=2), (4, 1, 2))
    """
    if kind == "embedding":  # weight (num_embeddings, embedding_dim): its columns
        assert isinstance(m, nn.Embedding | nn.EmbeddingBag)
        _set(m, "weight", _take(m.weight, 1, keep_out), True)
        m.embedding_dim = int(m.weight.shape[1])
    elif kind == "linear":
        assert isinstance(m, nn.Linear)
        w = _cut_weight(m, lambda t: _take(_take(t, 0, keep_out), 1, keep_in), keep_out)
        if m.bias is not None:
            _set(m, "bias", _take(m.bias, 0, keep_out), True)
        m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
    elif kind in ("conv", "dw", "gconv"):
        assert isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        if kind == "dw":
            mult = m.out_channels // m.in_channels
            if keep_out is not None:
                keep_in = sorted({o // mult for o in keep_out})
            w = _cut_weight(m, lambda t: _take(t, 0, keep_out), keep_out)
            m.groups = len(keep_in) if keep_in is not None else m.groups
        elif kind == "gconv":  # the same positions in every group (checked by the plan)
            per_group = m.in_channels // m.groups
            positions = None if keep_in is None else [c for c in keep_in if c < per_group]
            # (out, in / groups, *k)
            w = _cut_weight(m, lambda t: _take(_take(t, 0, keep_out), 1, positions), keep_out)
        else:
            w = _cut_weight(m, lambda t: _take(_take(t, 0, keep_out), 1, keep_in), keep_out)
        if m.bias is not None:
            _set(m, "bias", _take(m.bias, 0, keep_out), True)
        m.out_channels = int(w.shape[0])
        m.in_channels = int(w.shape[1]) * m.groups
    elif kind in ("convt", "dwt", "gconvt"):  # weight (C_in, C_out / groups, *k)
        assert isinstance(m, _CONVT)
        per_group = m.out_channels // m.groups  # output positions of each group
        if kind == "dwt" and keep_out is not None:  # whole groups: those of the kept outputs
            keep_in = sorted({o // per_group for o in keep_out})
        # the same output positions in every kept group (checked by the plan)
        positions = None if keep_out is None else sorted({o % per_group for o in keep_out})
        w = _take(_take(m.weight, 1, positions), 0, keep_in)  # (in, out / groups, *k)
        if kind == "dwt" and keep_in is not None:
            m.groups = len(keep_in)
        _set(m, "weight", w, True)
        if m.bias is not None:
            _set(m, "bias", _take(m.bias, 0, keep_out), True)
        m.in_channels, m.out_channels = int(w.shape[0]), int(w.shape[1]) * m.groups
    elif kind in ("bn", "in", "gn"):  # per-channel weight, bias (and running statistics)
        assert isinstance(m, (BATCH_NORMS, INSTANCE_NORMS, nn.GroupNorm))
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                _set(m, name, _take(getattr(m, name), 0, keep_out), True)
        for name in ("running_mean", "running_var"):
            if getattr(m, name, None) is not None:
                _set(m, name, _take(getattr(m, name), 0, keep_out), False)
        if keep_out is not None and isinstance(m, nn.GroupNorm):  # whole groups (checked)
            per_group = m.num_channels // m.num_groups
            m.num_groups, m.num_channels = len(keep_out) // per_group, len(keep_out)
        elif keep_out is not None:
            m.num_features = len(keep_out)
    else:
        raise ValueError(
            f"unknown slice kind {kind!r}: expected linear, conv, dw, gconv, convt, dwt, "
            "gconvt, bn, in, gn or embedding"
        )


def _norm_target(node: fx.Node, scope: str) -> Any:
    if node.op in ("call_module", "get_attr") and scope:
        t = str(node.target)
        return t[len(scope) + 1 :] if t.startswith(scope + ".") else t
    return node.target


def _resolve(root: nn.Module, path: str) -> object:
    obj: object = root
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj


def _same_target(model: nn.Module, sub: nn.Module, r: fx.Node, n: fx.Node, scope: str) -> bool:
    """Whether root-graph node ``r`` and local-graph node ``n`` do the same thing. A module or
    attribute is compared as an object: fx names a module used in several places (one
    ``nn.ReLU()`` reused) by the first path it finds, which may lie outside ``scope``."""
    if r.op != n.op:
        return False
    if r.op in ("call_module", "get_attr"):
        if _norm_target(r, scope) == n.target:
            return True
        constants = (str(r.target), str(n.target))
        if r.op == "get_attr" and all(t.startswith("_tensor_constant") for t in constants):
            # made while tracing, numbered per trace: the same tensor under another number
            a = getattr(r.graph.owning_module, constants[0], None)
            b = getattr(n.graph.owning_module, constants[1], None)
            return isinstance(a, Tensor) and isinstance(b, Tensor) and _same_tensor(a, b)
        root = r.graph.owning_module or model  # the traced modules, before any rewrite
        try:
            return _resolve(root, str(r.target)) is _resolve(sub, str(n.target))
        except AttributeError:
            return False
    return bool(r.target == n.target)


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Same shape, dtype and values (NaNs equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))


def _concrete_choices(defaults: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
    """What a caller may have left at their defaults: nothing, everything, then every subset
    (largest first; for up to 6 optional arguments), as HF BERT's ``self(hidden, mask)``
    passes one optional argument and leaves the others at ``None``.

    >>> [sorted(c) if c is not None else c for c in _concrete_choices({"a": None, "b": 0})]
    [None, ['a', 'b'], ['a'], ['b']]
    """
    yield None
    if not defaults:
        return
    yield defaults
    names = list(defaults)
    if len(names) > 6:
        return
    for k in range(len(names) - 1, 0, -1):
        for subset in itertools.combinations(names, k):
            yield {name: defaults[name] for name in subset}


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


_CONTAINER_METHODS = {"get", "keys", "values", "items", "index", "count"}  # of a dict/list


def _selects_input(n: object, containers: set[fx.Node] | None = None) -> bool:
    """Whether ``n`` is an input of its graph or selects an element of one with a constant
    key (``xs[0]``, ``xs["a"]``, ``xs[1:]``, ``xs[0][1]``), from the placeholders
    ``containers`` only if given (None: any).

    >>> g = fx.Graph()
    >>> xs = g.placeholder("xs")
    >>> first = g.call_function(operator.getitem, (xs, 0))
    >>> _selects_input(first), _selects_input(g.call_function(torch.relu, (first,)))
    (True, False)
    """
    while isinstance(n, fx.Node) and n.op != "placeholder":
        key = n.args[1] if len(n.args) == 2 else None
        if n.op != "call_function" or n.target is not operator.getitem or n.kwargs:
            return False
        if not isinstance(key, int | str | slice) or isinstance(key, bool):
            return False
        if isinstance(key, slice) and not all(
            isinstance(v, int | None) for v in (key.start, key.stop, key.step)
        ):
            return False
        n = n.args[0]
    return isinstance(n, fx.Node) and (containers is None or n in containers)


def _container_choices(graph: fx.Graph) -> Iterator[tuple[set[fx.Node], set[fx.Node]]]:
    """Which placeholders of a module's own trace to read as lists/tuples/dicts of tensors,
    with the nodes that then only select their elements: none first, then every subset of
    those indexed with a constant key (smallest first; up to 6). Traced alone, ``xs[0]`` of
    an argument ``xs`` is a node; traced from the root, where the caller passes a Python list
    of tensors (HRNet's fusion, mmdet necks), it is Python indexing, no node. A tensor
    argument indexed the same way (``x[0]``) is a node in both, so each reading is tried.

    >>> g = fx.Graph()
    >>> xs = g.placeholder("xs")
    >>> _ = g.call_function(operator.getitem, (xs, 0))
    >>> [sorted(str(p) for p in c) for c, _ in _container_choices(g)]
    [[], ['xs']]
    """
    yield set(), set()
    indexed = [
        p
        for p in graph.nodes
        if p.op == "placeholder" and any(_selects_input(u, {p}) for u in p.users)
    ]
    if len(indexed) > 6:
        return
    for k in range(1, len(indexed) + 1):
        for subset in itertools.combinations(indexed, k):
            chosen = set(subset)
            yield (
                chosen,
                {n for n in graph.nodes if n.op != "placeholder" and _selects_input(n, chosen)},
            )


def _caller_constant(r: fx.Node, scope: str) -> str | None:
    """What root-graph node ``r`` of module ``scope`` reads if it is a constant of a caller's
    trace that the module alone takes as an argument: a buffer (or parameter) outside
    ``scope`` (``self.attn(x, mask=self.attn_mask)``) or a tensor fx made from constants
    (``torch.triu(torch.full((T, T), -inf), 1)``, or what the module computes from such a
    value, which the whole model's trace folds); None otherwise.

    >>> g = fx.Graph()
    >>> m = g.get_attr("blocks.1.attn_mask")
    >>> _caller_constant(m, "blocks.1.attn"), _caller_constant(m, "blocks.1")
    ("a buffer of the caller ('blocks.1.attn_mask')", None)
    """
    if r.op != "get_attr":
        return None
    target = str(r.target)
    if target.rpartition(".")[2].startswith("_tensor_constant"):
        return "a tensor the caller builds from constants"
    if scope and not target.startswith(scope + "."):
        return f"a buffer of the caller ({target!r})"
    return None


def _constant_choices(
    graph: fx.Graph, excluded: set[fx.Node]
) -> Iterator[tuple[set[fx.Node], set[fx.Node]]]:
    """Which placeholders of a module's own trace to read as constants of the caller's trace
    (a buffer or a tensor built from constants it passes, Swin's ``mask=self.attn_mask``),
    with the nodes computed from them alone (and from buffers), which the whole model's trace
    folds into constants: none first, then every subset of those with such nodes or
    ``excluded`` from comparison (smallest first; up to 6).

    >>> g = fx.Graph()
    >>> x, mask = g.placeholder("x"), g.placeholder("mask")
    >>> m = g.call_method("unsqueeze", (mask, 0))
    >>> _ = g.call_function(operator.add, (x, m))
    >>> choices = _constant_choices(g, set())
    >>> [(sorted(p.name for p in c), sorted(n.name for n in d)) for c, d in choices]
    [([], []), (['mask'], ['mask', 'unsqueeze'])]
    """
    yield set(), set()
    placeholders = [p for p in graph.nodes if p.op == "placeholder" and p not in excluded]
    owner = graph.owning_module

    def folded(chosen: set[fx.Node]) -> set[fx.Node]:
        out = set(chosen)
        for n in graph.nodes:
            if n.op in ("placeholder", "output", "get_attr", "call_module") or n in out:
                continue
            ins = n.all_input_nodes
            buffers = [a for a in ins if a.op == "get_attr" and not _is_parameter(owner, a)]
            if any(a in out for a in ins) and all(a in out or a in buffers for a in ins):
                out.add(n)
        for n in graph.nodes:  # a buffer read only by such nodes is folded with them
            if n.op == "get_attr" and n.users and all(u in out for u in n.users):
                out.add(n)
        return out

    candidates = [p for p in placeholders if len(folded({p})) > 1]
    if not candidates or len(candidates) > 6:
        return
    for k in range(1, len(candidates) + 1):
        for subset in itertools.combinations(candidates, k):
            yield set(subset), folded(set(subset))


def _is_parameter(owner: nn.Module | None, n: fx.Node) -> bool:
    """Whether get_attr node ``n`` reads a parameter of ``owner`` (fx traces parameters as
    values, buffers as constants)."""
    try:
        return owner is not None and isinstance(_resolve(owner, str(n.target)), nn.Parameter)
    except AttributeError:
        return False


def _align(
    model: nn.Module,
    sub: nn.Module,
    scope: str,
    root_nodes: list[fx.Node],
    local_nodes: list[fx.Node],
) -> tuple[list[tuple[fx.Node, fx.Node]], bool]:
    """Pair root-graph nodes with local nodes doing the same thing, in order; a root node
    reading a constant of the caller's trace (:func:`_caller_constant`) may stand for nothing
    among the local nodes (the module takes that value as an argument). Returns the pairs
    made and whether all nodes were paired."""
    pairs: list[tuple[fx.Node, fx.Node]] = []
    i = 0
    for r in root_nodes:
        if i < len(local_nodes) and _same_target(model, sub, r, local_nodes[i], scope):
            pairs.append((r, local_nodes[i]))
            i += 1
        elif _caller_constant(r, scope) is None:
            return pairs, False
    return pairs, i == len(local_nodes)


def _flat_args(args: Any) -> list[Any]:
    """The values in ``args`` (nested tuples, lists and dicts flattened), in order."""
    if isinstance(args, list | tuple):
        return [v for a in args for v in _flat_args(a)]
    if isinstance(args, dict):
        return [v for a in args.values() for v in _flat_args(a)]
    return [args]


def _reads_constants_alike(
    pairs: list[tuple[fx.Node, fx.Node]], folded: set[fx.Node], scope: str
) -> bool:
    """Whether, in each pair of nodes, the local node reads a value computed from an
    argument taken as the caller's constant (``folded``) only where the root node reads a
    constant of the caller or a literal, and reads an argument (or such a value) wherever the
    root node reads a constant of the caller that stands for nothing locally: so the
    argument is a constant there, not a tensor the caller computes (a dict entry
    ``xs.get("h")``)."""
    paired = {r for r, _ in pairs}
    for r, n in pairs:
        ra = _flat_args((r.args, r.kwargs))
        na = _flat_args((n.args, n.kwargs))
        if len(ra) != len(na):
            return False
        for a, b in zip(ra, na, strict=True):
            constant = (
                isinstance(a, fx.Node)
                and a not in paired
                and _caller_constant(a, scope) is not None
            )
            local = isinstance(b, fx.Node) and b in folded  # (b may be a slice: unhashable)
            if local and isinstance(a, fx.Node) and not constant:
                return False
            if constant and not (isinstance(b, fx.Node) and (b in folded or b.op == "placeholder")):
                return False
    return True


def _pin_literals(root_arg: Any, local_arg: Any, folded: set[fx.Node]) -> Any:
    """``local_arg`` with each value computed from a caller's constant (a node in ``folded``)
    replaced by the literal the whole model's trace has there (``nw = mask.shape[0]``: the
    caller's constant size), so the rewritten code is what was analysed.

    >>> g = fx.Graph()
    >>> n = g.placeholder("mask")
    >>> _pin_literals((1, 4), (1, n), {n})
    (1, 4)
    """
    if isinstance(local_arg, fx.Node):
        if local_arg in folded and not isinstance(root_arg, fx.Node):
            return root_arg
        return local_arg
    same_kind = type(root_arg) is type(local_arg)
    if isinstance(local_arg, list | tuple) and same_kind and len(root_arg) == len(local_arg):
        return type(local_arg)(
            _pin_literals(a, b, folded) for a, b in zip(root_arg, local_arg, strict=True)
        )
    if isinstance(local_arg, dict) and same_kind and root_arg.keys() == local_arg.keys():
        return {k: _pin_literals(root_arg[k], v, folded) for k, v in local_arg.items()}
    return local_arg


def _use_caller_constants(
    graph: fx.Graph, pairs: list[tuple[fx.Node, fx.Node]], folded: set[fx.Node]
) -> None:
    """Pin the literals the caller's constants give (:func:`_pin_literals`) in the paired
    local nodes, then drop the nodes computed from those constants that nothing reads now."""
    for r, n in pairs:
        n.args = _pin_literals(r.args, n.args, folded)
        n.kwargs = _pin_literals(r.kwargs, n.kwargs, folded)
    for n in reversed(list(graph.nodes)):
        if n in folded and n.op != "placeholder" and not n.users:
            graph.erase_node(n)


def _constant_reason(
    root_nodes: list[fx.Node], pairs: list[tuple[fx.Node, fx.Node]], scope: str
) -> str:
    """Why the module's own trace may differ: which arguments (found through the nodes
    ``pairs`` paired so far) the whole model's trace reads as constants of the caller."""
    local_of = dict(pairs)
    said: list[str] = []
    for r in root_nodes:
        what = _caller_constant(r, scope)
        if what is None:
            continue
        name = None
        for u in r.users:
            n = local_of.get(u)
            if n is None:
                continue
            flat_r = [*u.args, *u.kwargs.values()]
            flat_n = [*n.args, *n.kwargs.values()]
            for a, b in zip(flat_r, flat_n, strict=False):
                if a is r and isinstance(b, fx.Node):
                    while b.op != "placeholder" and b.all_input_nodes:
                        b = b.all_input_nodes[0]
                    if b.op == "placeholder":
                        name = str(b.target)
        said.append(f"argument {name!r} is {what}" if name else f"it reads {what}")
    if not said:
        return ""
    return (
        f" ({'; '.join(dict.fromkeys(said))} in the whole model's trace, an input traced "
        "alone; what the module computes from it could not be matched)"
    )


def _output_mapping(n: fx.Node) -> bool:
    """Whether ``n`` builds the module's output mapping (Hugging Face's ``ModelOutput``) for
    the output alone: the caller's trace reads its fields, so it has no such node."""
    return (
        n.op == "call_function"
        and isinstance(n.target, type)
        and issubclass(n.target, dict)
        and dataclasses.is_dataclass(n.target)
        and all(u.op == "output" for u in n.users)
    )


def local_trace(
    model: nn.Module,
    root_graph: fx.Graph,
    scope: str,
    opaque: dict[str, str],
    bound: dict[str, Any] | str | None = None,
    owners: Mapping[fx.Node, str] | None = None,
    inputs: int = 1,
) -> tuple[Any, dict[str, fx.Node]]:
    """Trace module ``scope`` alone and map the root graph's nodes in it to its own nodes.
    ``bound``: how the model calls it (:func:`record_bindings`): the optional arguments to fix
    at the values its calls give them (the others are inputs); a reason if the calls differ;
    None if unknown (a plan written before 2026-12-07: each choice of arguments left at their
    defaults is tried, the first whose graph matches taken). ``owners``: ``node_owners`` of
    ``root_graph``, if known (callers checking many scopes of one graph compute it once).
    ``inputs``: the number of positional inputs the model was gated with (the root's first
    ``inputs`` parameters stay inputs, see :func:`trace_model`).

    Raises ``RuntimeError`` when the two traces differ (the module cannot be rewritten).
    """
    sub = model if scope == "" else model.get_submodule(scope)
    if isinstance(bound, str):
        raise RuntimeError(f"cannot rewrite module '{scope}' ({type(sub).__name__}): {bound}")
    prefix = scope + "." if scope else ""
    local_opaque = {k[len(prefix) :]: v for k, v in opaque.items() if k.startswith(prefix)}
    root_nodes = scope_nodes(root_graph, scope, owners)
    defaults = optional_defaults(sub) if scope else {}
    choices = _concrete_choices(defaults) if bound is None or not scope else iter([bound or None])
    traced_any, failure = False, ""
    indexed: set[str] = set()  # arguments read as lists/tuples/dicts, for the reason
    best: list[tuple[fx.Node, fx.Node]] = []  # the longest pairing with constants, for it
    for concrete in choices:
        try:
            # None: the root as gate_ traced it; a submodule as called, with every argument
            # its caller passes (HF BERT's mask)
            local = trace_model(
                sub,
                local_opaque,
                warn=False,
                concrete_args=concrete,
                specialise=not scope,
                inputs=inputs if not scope else 1,
            )
        except ValueError as e:
            failure = failure or str(e)
            continue
        traced_any = True
        keep_argument_names(local.graph, set(concrete or ()))
        skip = _specialised(local.graph, set(concrete)) if concrete else set()
        # an argument the caller passes as a list of tensors: its element selections are no
        # nodes in the root graph, and stand for the tensors they select
        for containers, selections in _container_choices(local.graph):
            excluded = skip | selections
            # an argument the caller passes as a constant of its trace (a buffer, a tensor
            # built from constants): what the module computes from it alone is folded there
            for _, folded in _constant_choices(local.graph, excluded):
                local_nodes = [
                    n
                    for n in local.graph.nodes
                    if n.op not in ("placeholder", "output")
                    and n not in excluded | folded
                    and not _output_mapping(n)
                ]
                pairs, same = _align(model, sub, scope, root_nodes, local_nodes)
                if same and (
                    (not folded and len(pairs) == len(root_nodes))  # as before 2026-12-08
                    or _reads_constants_alike(pairs, folded, scope)
                ):
                    _use_caller_constants(local.graph, pairs, folded)
                    return local, {r.name: n for r, n in pairs}
                if len(pairs) > len(best):
                    best = pairs
            indexed |= {str(p.target) for p in containers}
        indexed |= {
            str(u.args[0])
            for u in local.graph.nodes
            if u.op == "call_method"
            and u.target in _CONTAINER_METHODS
            and u.args
            and isinstance(u.args[0], fx.Node)
            and u.args[0].op == "placeholder"
        }
    if not traced_any and failure:  # say why, rather than "a different graph"
        hint = ""
        if "does not support item assignment" in failure:  # HRNet's xs[i] = branch(xs[i])
            hint = (
                "; it takes a list/tuple/dict argument and writes into it, which fx cannot "
                "trace alone (write the results into a new list instead)"
            )
        raise RuntimeError(
            f"cannot rewrite module '{scope}' ({type(sub).__name__}): tracing it alone fails "
            f"({failure}){hint}"
        )
    why = ""
    if indexed:
        why = (
            f" (it takes a list/tuple/dict argument ({', '.join(sorted(indexed))}), whose "
            "use here could not be matched element by element: only constant-key element "
            "selections such as xs[0] are followed)"
        )
    why += _constant_reason(root_nodes, best, scope)
    raise RuntimeError(
        f"cannot rewrite module '{scope}' ({type(sub).__name__}): tracing it alone gives a "
        f"different graph than tracing the whole model{why}"
    )


_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _mutates(n: fx.Node) -> bool:
    """Whether ``n`` may write into one of its inputs (an in-place op)."""
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    in_place = name.endswith("_") and not name.startswith("__")
    return in_place or (n.op == "call_function" and n.target in _INPLACE_FUNCS)


def _erase_dead(
    graph: fx.Graph, node: fx.Node, scope: str, unread: frozenset[fx.Node] = frozenset()
) -> None:
    """Erase ``node`` after the users it leaves dangling: values computed but never used,
    e.g. the ``_`` of ``a, _ = f(x)`` (users first, reverse topological order). A node of
    ``unread`` (values the module returns that no caller reads in the whole model's trace:
    HF BERT's attention weights, ``a, _ = self.attention(h)``) is returned as ``None``
    instead (before 2026-12-08: "still used by output; cannot erase it")."""
    for u in list(node.users):
        if u.op == "output" and node in unread:
            u.args = fx.node.map_arg(u.args, lambda a: None if a is node else a)
            continue
        if u.op in ("output", "placeholder") or _mutates(u):
            break
        _erase_dead(graph, u, scope, unread)
    if node.users:
        users = ", ".join(u.name for u in node.users)
        raise RuntimeError(
            f"node {node.name} in '{scope}' is still used by {users}; cannot erase it"
        )
    graph.erase_node(node)


def _one_argument(m: nn.Module) -> bool:
    """Whether ``m.forward`` takes exactly one argument (positional, no defaults or others)."""
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len(params) == 1 and params[0].kind in kinds


def refold_calls(graph: fx.Graph, root: nn.Module, changed: frozenset[str] = frozenset()) -> None:
    """Replace the inlined ops of each call of a childless submodule of ``root`` by a call of
    the module itself, where that is unambiguous: its ``forward`` takes one argument, the call
    reads one outside value and returns one. Rewritten code then still calls the user's
    module (its class, its settings such as ``eps``, what ``cost`` counts for it, and its
    training-mode behaviour, which the eval-mode trace baked out), instead of fx's copy of
    its ops. Not the calls of the modules in ``changed`` (paths), whose inlined ops the
    rewrite changed (a size set to the kept width, as in GPT-2's ``Conv1D``, whose
    ``view(x.size()[:-1] + (self.nf,))`` its own code would give the unpruned width): their
    ops stay.

    >>> class Norm(nn.Module):
    ...     def forward(self, x: Tensor) -> Tensor:
    ...         return x / x.norm(dim=-1, keepdim=True)
    >>> net = nn.Sequential(Norm(), nn.Linear(2, 2))
    >>> g = trace_model(net).graph
    >>> refold_calls(g, net)
    >>> [(n.op, n.target) for n in g.nodes][1:3]
    [('call_module', '0'), ('call_module', '1')]
    """
    replaced: dict[fx.Node, fx.Node] = {}  # an earlier call's output -> its module call
    for call in inlined_calls(graph, root):
        m = root.get_submodule(call.path)
        if len(call.inputs) != 1 or len(call.outputs) != 1 or not _one_argument(m):
            continue
        if call.path in changed:
            continue
        inp = replaced.get(call.inputs[0], call.inputs[0])  # b(a(h)): a's output is gone
        out = call.outputs[0]
        owner = graph.owning_module
        if isinstance(owner, fx.GraphModule):  # fx copied only what the trace referenced
            owner.add_submodule(call.path, m)
        with graph.inserting_after(out):
            new = graph.call_module(call.path, (inp,))
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        replaced[out] = new
        for n in reversed(call.nodes):
            if not n.users:  # a get_attr another call shares stays until that one goes
                graph.erase_node(n)
    for n in list(graph.nodes):  # attributes read only by the ops just replaced
        if n.op == "get_attr" and not n.users:
            graph.erase_node(n)


_PLAIN = (
    type(None),
    bool,
    int,
    float,
    str,
    torch.dtype,
    torch.device,
    torch.memory_format,
    torch.layout,
)  # constants fx writes into generated code


def _unwritable(a: Any) -> str | None:
    """The type of a value in argument structure ``a`` that generated code cannot hold (a
    tensor, an object of the user's), or None."""
    bad: list[str] = []

    def check(v: Any) -> Any:
        if not isinstance(v, (fx.Node, *_PLAIN)):
            bad.append(type(v).__name__)
        return v

    fx.node.map_aggregate(a, check)
    return bad[0] if bad else None


def is_leaf_call(call: ModuleCall) -> bool:
    """Whether ``call`` is a ``call_module`` node of its own (a leaf module)."""
    return (
        len(call.nodes) == 1
        and call.nodes[0].op == "call_module"
        and call.nodes[0].target == call.path
    )


def hooked_call_problem(call: ModuleCall) -> str | None:
    """Why the inlined code of ``call`` could not be replaced by a call of its module (so its
    hooks would not run in a rewritten ``forward``), or None if it can: it must return a
    graph value or a flat tuple or list of them (and constants), computed in the call, take
    arguments generated code can hold, and no other value of its code may be read outside.

    >>> class Scale(nn.Module):
    ...     def forward(self, x: Tensor) -> Tensor:
    ...         return 2 * x
    >>> net = nn.Sequential(Scale(), nn.ReLU())
    >>> call = trace_model(net).calls[0]
    >>> call.path, [n.name for n in call.nodes], hooked_call_problem(call)
    ('0', ['mul'], None)
    """
    if is_leaf_call(call):
        return None
    inside = set(call.nodes)
    if not inside:
        return "fx recorded no code for its call (it returns what it was given)"
    bad = _unwritable((call.args, call.kwargs))
    if bad is not None:
        return f"it is called with a {bad} argument"
    result = call.result
    items = list(result) if isinstance(result, tuple | list) else [result]
    flat = all(isinstance(r, (fx.Node, *_PLAIN)) for r in items)
    if not isinstance(result, fx.Node) and not (isinstance(result, tuple | list) and flat):
        return f"it returns a {type(result).__name__} (a tensor, or a flat tuple or list of them)"
    outs = [r for r in items if isinstance(r, fx.Node)]
    if any(o not in inside for o in outs):
        return "it returns a value computed before it was called"
    for n in call.nodes:
        if n.op == "get_attr" or n in outs:
            continue
        reader = next((u for u in n.users if u not in inside), None)
        if reader is not None:
            return f"its value '{n.name}' is read outside the call (by '{reader.name}')"
    return None


def _hooked_calls(traced: TracedModel) -> list[ModuleCall]:
    """The outermost calls of modules carrying hooks of the user's (a hooked module called by
    another one's code is called by it), in graph order."""
    calls = [c for c in traced.calls if c.path in traced.hooked]
    calls.sort(key=lambda c: -len(c.nodes))
    covered: set[fx.Node] = set()
    outer: list[ModuleCall] = []
    for c in calls:
        if c.nodes and c.nodes[0] in covered:
            continue
        covered.update(c.nodes)
        outer.append(c)
    order = {n: i for i, n in enumerate(traced.graph.nodes)}
    outer.sort(key=lambda c: order[c.nodes[0]] if c.nodes else -1)
    return outer


def _refold_hooked(
    graph: fx.Graph, root: nn.Module, call: ModuleCall, replaced: dict[fx.Node, fx.Node]
) -> None:
    """Replace the inlined code of ``call`` (checked by :func:`hooked_call_problem`) in
    ``graph``, traced from ``root``, by a call of its module with the same arguments, so that
    the module's hooks run. ``replaced``: nodes the rewrite replaced (a cut add -> the operand
    it keeps), which the call's recorded arguments may name."""
    if is_leaf_call(call):
        return
    present = set(graph.nodes)
    inside = [n for n in call.nodes if n in present]

    def current(v: Any) -> Any:
        while isinstance(v, fx.Node) and v in replaced:
            v = replaced[v]
        return v

    args = fx.node.map_aggregate(call.args, current)
    kwargs = fx.node.map_aggregate(call.kwargs, current)
    result = call.result
    outs = [result] if isinstance(result, fx.Node) else list(result)
    owner = graph.owning_module
    if isinstance(owner, fx.GraphModule):  # fx copied only what the trace referenced
        owner.add_submodule(call.path, root.get_submodule(call.path))
    with graph.inserting_before(inside[0]):
        new = graph.call_module(call.path, tuple(args), dict(kwargs))
    last = next(o for o in reversed(outs) if isinstance(o, fx.Node))
    new.meta = dict(last.meta)
    if isinstance(result, fx.Node):
        result.replace_all_uses_with(new)
    else:
        anchor = new
        for i, o in enumerate(outs):
            if isinstance(o, fx.Node):
                with graph.inserting_after(anchor):
                    item = graph.call_function(operator.getitem, (new, i))
                item.meta = dict(o.meta)
                o.replace_all_uses_with(item)
                anchor = item
    for n in reversed(inside):
        if not n.users:
            graph.erase_node(n)
        elif n.op != "get_attr":  # a parameter another call reads too stays
            raise RuntimeError(
                f"cannot call module '{call.path}' as a module in the rewritten code: its value "
                f"'{n.name}' is still read by {', '.join(u.name for u in n.users)}"
            )


# ops `h op= x` is recorded as by fx (no __iadd__ on a Proxy): its left operand may be written
_AUGMENTABLE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv}
_AUGMENTABLE_METHODS = {"add", "sub", "mul", "div"}


class _Aliases:
    """What the cuts make share memory in the pruned model: a cut add becomes the operand it
    keeps, so a write into it (or into a closed module's output that returns its input)
    reaches every tensor down that chain. A copy is needed where one of them is read
    elsewhere: an outer residual, a new shortcut, the model's input."""

    def __init__(self, traced: TracedModel, cut: dict[str, int], edges: list[dict[str, Any]]):
        graph = traced.graph
        self.by_name = {n.name: n for n in graph.nodes}
        self.writes = graph_writes(graph)
        self.cut = {self.by_name[k]: v for k, v in cut.items()}
        self.live = live_nodes(graph, self.cut, self.writes)
        self.shortcut_ends = {name for e in edges for name in (e["src"], e["dst"])}
        stack = [self.by_name[e["src"]] for e in edges]  # what a kept shortcut reads is live
        while stack:  # (all its ancestors: a superset, so a copy too many at worst)
            v = stack.pop()
            if v not in self.live:
                self.live.add(v)
                stack.extend(v.all_input_nodes)

    def read_elsewhere(self, value: object, cut_add: fx.Node | None) -> bool:
        """Whether ``value``, what ``cut_add`` keeps (or what it aliases through more cut
        adds), is the model's input, a shortcut's end, or read by a live node outside the
        chain of cut adds (unknown: True)."""
        chain = [] if cut_add is None else [cut_add]
        aliases: list[fx.Node] = []
        while isinstance(value, fx.Node):
            aliases.append(value)
            if value not in self.cut:
                break
            chain.append(value)
            value = value.args[1 - self.cut[value]]
        if not isinstance(value, fx.Node):
            return True
        return any(
            a.op == "placeholder"
            or a.name in self.shortcut_ends
            or any(u not in chain and u in self.live for u in a.users)
            for a in aliases
        )

    def written_cuts(self, bypass: set[str]) -> set[str]:
        """The cut adds whose sum an in-place op writes into (an inplace ReLU after the block)
        while what the cut keeps is read elsewhere: the rewrite keeps a copy of it there."""
        out: set[str] = set()
        for add, pos in self.cut.items():
            if not any(w is add and n.name not in bypass for n, w in self.writes):
                continue  # (a writer the rewrite drops as dead gets a copy too many at worst)
            if add.name in self.shortcut_ends or self.read_elsewhere(add.args[1 - pos], add):
                out.add(add.name)
        return out


def _resize_slice(node: fx.Node, end: tuple[str, int], value: int) -> None:
    """Give ``getitem`` node ``node`` (``x[:, a:b]``) the bound ``value`` for the start or stop
    (``end`` is ``("start", i)`` / ``("stop", i)``) of the slice at item ``i`` of its index,
    in place."""
    kind, i = end
    idx = node.args[1] if node.target is operator.getitem and len(node.args) == 2 else None
    it = idx[i] if isinstance(idx, tuple) and 0 <= i < len(idx) else None
    if node.op != "call_function" or not isinstance(idx, tuple) or not isinstance(it, slice):
        raise ValueError(f"cannot give node '{node.name}' a new {kind} {i}: not a slice there")
    items = list(idx)
    items[i] = (
        slice(value, it.stop, it.step) if kind == "start" else slice(it.start, value, it.step)
    )
    node.update_arg(1, tuple(items))


def _resize_section(node: fx.Node, section: tuple[str, int], value: int) -> None:
    """Give ``split`` node ``node`` the size ``value`` for its section ``i`` (``section`` is
    ``("section", i)``), or ``tensor_split`` node ``node`` the index ``value`` for its index
    ``i`` (``("index", i)``), in place; other sections (indices) as they are."""
    kind, i = section
    if kind == "section":
        name = "split"
        kws: tuple[str, ...] = ("split_size", "split_size_or_sections")
    else:
        name = "tensor_split"
        kws = ("indices_or_sections", "indices", "tensor_indices_or_sections")
    fn = node.op == "call_function" and getattr(node.target, "__name__", None) == name
    if not (fn or (node.op == "call_method" and node.target == name)):
        raise ValueError(f"cannot give node '{node.name}' a new {kind} {i}: not {name}")
    kw = next((k for k in kws if k in node.kwargs), None)
    old = node.args[1] if len(node.args) > 1 else node.kwargs.get(kw) if kw else None
    if not isinstance(old, list | tuple) or not 0 <= i < len(old):
        raise ValueError(f"cannot give node '{node.name}' a new {kind} {i}: it has {kind}s {old!r}")
    new = list(old)
    new[i] = value
    if len(node.args) > 1:
        node.update_arg(1, type(old)(new))
    else:
        node.update_kwarg(str(kw), type(old)(new))


def _as_sections(node: fx.Node, keys: Sequence[int | str]) -> None:
    """Before ``node`` gets the sizes of the plan's ``keys``: a ``chunk(n)`` or ``split(c)``
    (literal) given sizes per section (``"section_i"``, its pieces pruned apart) becomes
    ``split`` into a list of sections, one per section the plan gives, all of which it must
    give (the sizes are then written in). Other nodes as they are.

    >>> g = fx.symbolic_trace(lambda x: x.chunk(2, 1)).graph
    >>> n = next(n for n in g.nodes if n.op == "call_method")
    >>> _as_sections(n, ["section_0", "section_1"]); n.target, n.args[1]
    ('split', [0, 0])
    """
    found = [_section_key(k) for k in keys]
    given = sorted(s[1] for s in found if s is not None and s[0] == "section")
    if not given:
        return
    meth, fn = node.op == "call_method", node.op == "call_function"
    chunk = (meth and node.target == "chunk") or (fn and node.target is torch.chunk)
    split = (meth and node.target == "split") or (fn and node.target is torch.split)
    kws = ("chunks",) if chunk else ("split_size", "split_size_or_sections")
    kw = next((k for k in kws if k in node.kwargs), None)
    old = node.args[1] if len(node.args) > 1 else node.kwargs.get(kw) if kw else None
    if not (chunk or (split and isinstance(old, int))):
        return  # a split into a list already (or not a split: _resize_section says so)
    count = len(given) if not chunk else old if isinstance(old, int) else -1
    if given != list(range(count)):  # (split(c): torch refuses sections not adding up)
        raise ValueError(
            f"cannot give node '{node.name}' ({'' if meth else 'torch.'}"
            f"{'chunk' if chunk else 'split'}) the sections {given} alone: the plan must give "
            "every section 0, 1, ... of it"
        )
    sections = [0] * len(given)  # (each written in by _resize_section)
    if meth:
        node.target = "split"
    else:
        node.target = torch.split
    if len(node.args) > 1:
        node.update_arg(1, sections)
    else:
        kwargs = dict(node.kwargs)
        del kwargs[str(kw)]
        kwargs["split_size" if meth else "split_size_or_sections"] = sections
        node.kwargs = kwargs


def _resize(node: fx.Node, key: int | str, value: int) -> None:
    """Give graph node ``node`` (a ``view``/``reshape``/``expand``, a ``split`` or a
    ``repeat_interleave``) the size ``value`` for output dimension ``key`` (negative: counted
    from the end; or its ``"split_size"``, or its ``"repeats"``), in place; in a shape built
    as ``x.size()[:-1] + (h, d)``, in its literal tail."""
    if key == "repeats":  # t.repeat_interleave(r, dim): r -> value
        if not (node.op == "call_method" and node.target == "repeat_interleave"):
            raise ValueError(f"cannot give node '{node.name}' new repeats: not repeat_interleave")
        if len(node.args) > 1:
            node.update_arg(1, value)
        else:
            node.update_kwarg("repeats", value)
        return
    section = _section_key(key)
    if section is not None and section[0] in ("start", "stop"):  # x[:, a:b]
        _resize_slice(node, section, value)
        return
    if section is not None:  # split((d, kv * hd, kv * hd)) / tensor_split((d, d + kv * hd))
        _resize_section(node, section, value)
        return
    if key == "split_size":  # split(c), or split([c, c, c]): each piece c -> value
        kw = "split_size" if node.op == "call_method" else "split_size_or_sections"
        old = node.args[1] if len(node.args) > 1 else node.kwargs.get(kw)
        new: Any = [value] * len(old) if isinstance(old, list | tuple) else value
        if len(node.args) > 1:
            node.update_arg(1, new)
        else:
            node.update_kwarg(kw, new)
        return
    assert isinstance(key, int)
    where: tuple[str, int | str] | None = None  # ("arg", index) or ("kwarg", name)
    shape: Any = None
    is_unflatten = (node.op == "call_method" and node.target == "unflatten") or (
        node.op == "call_function" and node.target is torch.unflatten
    )
    if is_unflatten:  # unflatten(dim, sizes), dim < 0: the block ends at output dim ``dim``
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        where = ("arg", 2) if len(node.args) > 2 else ("kwarg", "sizes")
        shape = node.args[2] if len(node.args) > 2 else node.kwargs.get("sizes")
        if not isinstance(dim, int) or dim >= 0 or not isinstance(shape, list | tuple):
            raise ValueError(f"cannot give node '{node.name}' a new size: unflatten({dim}, ...)")
        key = len(shape) - 1 + key - dim  # the index in its sizes
        if not 0 <= key < len(shape):
            raise ValueError(f"node '{node.name}' has no size for that dimension")
    elif node.op == "call_method" and node.target in ("view", "reshape", "expand"):
        if len(node.args) == 2 and isinstance(node.args[1], list | tuple | fx.Node):
            where, shape = ("arg", 1), node.args[1]
        else:  # sizes as separate arguments
            n_sizes = len(node.args) - 1
            index = key if key >= 0 else n_sizes + key
            if not 0 <= index < n_sizes:
                raise ValueError(f"node '{node.name}' has no size for dimension {key}")
            node.update_arg(1 + index, value)
            return
    elif node.op == "call_function" and node.target is torch.reshape:
        where = ("arg", 1) if len(node.args) > 1 else ("kwarg", "shape")
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
    if isinstance(shape, fx.Node):  # head + (h, d): resize the literal tail
        tail = shape.args[1] if shape.op == "call_function" and len(shape.args) == 2 else None
        if shape.target is not operator.add or not isinstance(tail, tuple) or key >= 0:
            raise ValueError(f"cannot give node '{node.name}' a new size: its shape is {shape}")
        sizes = list(tail)
        sizes[key] = value
        shape.update_arg(1, tuple(sizes))
        return
    if not isinstance(shape, list | tuple) or where is None:
        raise ValueError(f"cannot give node '{node.name}' ({node.op} {node.target}) a new size")
    sizes = list(shape)
    sizes[key] = value
    if where[0] == "arg":
        node.update_arg(int(where[1]), tuple(sizes))
    else:
        node.update_kwarg(str(where[1]), tuple(sizes))


def _rewrite_scope(
    model: nn.Module,
    root_graph: fx.Graph,
    scope: str,
    opaque: dict[str, str],
    cut: dict[str, int],
    erase: set[str],
    bypass: set[str],
    edges: list[dict[str, Any]],
    written: set[str],
    left_operands: set[str],
    aliases: _Aliases,
    sizes: dict[str, list[list[Any]]] | None = None,
    bound: dict[str, Any] | None = None,
    bounds: dict[str, Any] | None = None,
    owners: Mapping[fx.Node, str] | None = None,
    inputs: int = 1,
) -> nn.Module:
    """Rewrite module ``scope``'s forward (``written``: the cut adds whose sum an in-place op
    writes into, anywhere in the model; ``left_operands``: nodes the code uses as the left
    operand of arithmetic, which an augmented assignment would write into; ``bound``: the
    optional arguments its calls fix, see :func:`local_trace`; ``bounds``: the same for every
    module, by qualified name; ``owners``: ``node_owners`` of ``root_graph``, if known;
    ``inputs``: the number of positional inputs the model was gated with).

    A module inside ``scope`` carrying hooks of the user's stays a call of that module in the
    new code, so its hooks run; where the rewrite changes its code, it is rewritten first, on
    its own, and keeps its hooks. The new module gets ``scope``'s own hooks."""
    sub = model if scope == "" else model.get_submodule(scope)
    root_nodes = scope_nodes(root_graph, scope, owners)
    local, mapping = local_trace(model, root_graph, scope, opaque, bound, owners, inputs)
    local_out = next(n for n in local.graph.nodes if n.op == "output").args[0]
    returned = next((r for r, n in mapping.items() if n is local_out), None)
    hooked = _hooked_calls(local)
    if hooked:
        cut, erase, bypass, sizes = _rewrite_hooked(
            model,
            root_graph,
            scope,
            opaque,
            hooked,
            mapping,
            cut,
            erase,
            bypass,
            edges,
            written,
            left_operands,
            aliases,
            sizes or {},
            bounds or {},
        )
    replaced: dict[fx.Node, fx.Node] = {}  # (for the recorded arguments of hooked calls)
    root_by_name = {r.name: r for r in root_nodes}
    # local placeholder a cut keeps -> its root value and that cut add
    kept_inputs: dict[fx.Node, tuple[object, fx.Node | None]] = {}
    position = {n: i for i, n in enumerate(local.graph.nodes)}
    # what each reader of a shortcut's destination reads for it now: shortcuts into the same
    # tensor chain (x + w a + w' b), an outer block's before a nested block's (its readers are
    # a superset), as the gated model's hooks apply them
    current: dict[tuple[str, str], fx.Node] = {}
    for e in sorted(edges, key=lambda e: -len(e["users"])):  # new shortcuts x_j <- x_j + w out_i
        src = mapping[e["src"]]
        reads = {current.get((e["dst"], u), mapping[e["dst"]]) for u in e["users"]}
        if len(reads) != 1:
            raise RuntimeError(
                f"cannot write shortcut {e['src']} -> {e['dst']}: its readers read different "
                "values of its destination"
            )
        dst = reads.pop()
        users = [mapping[u] for u in e["users"]]
        shortcut = ScaledAdd()
        for owner in (sub, local.graph_module):
            owner.add_module(e["buffer"], shortcut)
        with local.graph.inserting_before(min(users, key=lambda n: position[n])):
            new_x = local.graph.call_module(e["buffer"], (dst, src))
        for u in users:
            u.replace_input_with(dst, new_x)
        for u in e["users"]:
            current[(e["dst"], u)] = new_x
    for add_name, pos in cut.items():
        if add_name not in mapping:
            continue
        ln = mapping[add_name]
        keep = ln.args[1 - pos]
        assert isinstance(keep, fx.Node)
        if add_name in written:  # an in-place op writes into the sum (an inplace ReLU after
            # the block): it must not write into the kept operand, which others may read
            with local.graph.inserting_before(ln):
                keep = local.graph.call_method("clone", (keep,))
        if _selects_input(keep):  # the value the caller passed in, as the root graph has it
            # (an argument, or an element of a list of tensors passed)
            root_add = root_by_name[add_name]
            kept_inputs[keep] = (root_add.args[1 - pos], root_add)
        ln.replace_all_uses_with(keep)
        replaced[ln] = keep
        local.graph.erase_node(ln)
    for r in root_nodes:  # bypassed ReLUs (relu(relu(z)) = relu(z)) in graph order
        if r.name in bypass:
            ln = mapping[r.name]
            inp = ln.args[0]
            assert isinstance(inp, fx.Node)
            ln.replace_all_uses_with(inp)
            replaced[ln] = inp
            local.graph.erase_node(ln)
    for name, entries in (sizes or {}).items():  # the pruned widths (attention heads)
        if name in mapping:
            _as_sections(mapping[name], [key for key, _ in entries])
            for key, value in entries:
                _resize(mapping[name], key, int(value))
    inside = set(root_nodes)  # values only read inside the scope: returned to no reader
    unread = frozenset(
        mapping[r.name] for r in root_nodes if r.name in mapping and set(r.users) <= inside
    )
    for r in reversed(root_nodes):  # (a caller's constant is no node here: an argument)
        if r.name in erase and r.name in mapping:
            _erase_dead(local.graph, mapping[r.name], scope, unread)
    for call in hooked:  # called as modules again (their hooks run)
        _refold_hooked(local.graph, sub, call, replaced)
    output = next(n for n in local.graph.nodes if n.op == "output")
    for n in list(reversed(local.graph.nodes)):  # element selections of a list argument unread
        if not n.users and n.op != "placeholder" and _selects_input(n):
            local.graph.erase_node(n)
    ret = output.args[0]
    if (
        isinstance(ret, fx.Node)
        and _selects_input(ret)
        and returned in left_operands
        and aliases.read_elsewhere(*kept_inputs.get(ret, (None, None)))
    ):
        # the module now returns its input, the caller's code computes on its output in a
        # form `h += x` may have been (fx records it as h + x), and that input is read
        # elsewhere (or is the model's input): a copy, so no write reaches it
        with local.graph.inserting_before(output):
            output.args = (local.graph.call_method("clone", (ret,)),)
    # a childless submodule whose inlined ops changed keeps them (its own code would not
    # give the kept widths or drop what was cut)
    touched = {*cut, *erase, *bypass, *(sizes or {})}
    inner = {owner_of(r) for r in root_nodes if r.name in touched} - {scope}
    refold_calls(local.graph, sub, frozenset(p[len(scope) + 1 :] if scope else p for p in inner))
    for n in local.graph.nodes:  # string annotations (postponed evaluation) break pickling
        n.type = None
    local.graph.lint()
    nodes = list(local.graph.nodes)
    if len(nodes) == 2 and nodes[0].op == "placeholder" and nodes[1].args[0] is nodes[0]:
        identity = nn.Identity()  # nothing left: the module passes its input through
        identity.train(sub.training)
        copy_hooks(sub, identity)
        return identity
    # tensors fx made while tracing (`torch.full((d,), 2.0)`) live on the traced graph module,
    # not on the model (see graph._trace): the new module takes them from there
    constants = {
        str(n.target)
        for n in local.graph.nodes
        if n.op == "get_attr"
        and str(n.target).startswith("_tensor_constant")
        and not hasattr(sub, str(n.target))
    }
    for name in constants:
        setattr(sub, name, getattr(local.graph_module, name))
    try:
        new = PrunedGraphModule(sub, local.graph, class_name=f"Pruned{type(sub).__name__}")
    finally:
        for name in constants:
            delattr(sub, name)
    new.train(sub.training)
    _keep_containers(sub, new)
    copy_hooks(sub, new)
    return new


def _keep_containers(old: nn.Module, new: nn.Module) -> None:
    """Give a rewritten module the container classes of the module it was rewritten from
    where fx left a bare ``nn.Module`` holding their kept children: an ``nn.ModuleDict``, and
    an ``nn.ModuleList`` or ``nn.Sequential`` whose children are all kept (so ``m.blocks[0]``
    still indexes it); one that lost children stays a bare module (its children keep their
    names, as the state dict and plans name them).

    >>> old = nn.Module()
    >>> old.blocks = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
    >>> new = nn.Module()
    >>> new.blocks = nn.Module()
    >>> new.blocks.add_module("0", old.blocks[0]); new.blocks.add_module("1", old.blocks[1])
    >>> _keep_containers(old, new)
    >>> type(new.blocks).__name__, type(new.blocks[1]).__name__
    ('ModuleList', 'ReLU')
    """
    for name, child in list(new.named_children()):
        orig = old._modules.get(name)
        if orig is None or type(child) is not nn.Module:
            continue  # a module of the model itself (kept as it is), or nothing to match
        _keep_containers(orig, child)
        if any(True for _ in child.parameters(recurse=False)) or any(
            True for _ in child.buffers(recurse=False)
        ):
            continue
        kept = dict(child.named_children())
        replacement: nn.Module | None = None
        if type(orig) is nn.ModuleDict:
            replacement = nn.ModuleDict(kept)
        elif type(orig) in (nn.ModuleList, nn.Sequential) and list(kept) == [
            str(i) for i in range(len(cast(nn.ModuleList, orig)))
        ]:
            listed = list(kept.values())
            replacement = (
                nn.ModuleList(listed) if type(orig) is nn.ModuleList else nn.Sequential(*listed)
            )
        if replacement is not None:
            replacement.train(child.training)
            setattr(new, name, replacement)


def _rewrite_hooked(
    model: nn.Module,
    root_graph: fx.Graph,
    scope: str,
    opaque: dict[str, str],
    hooked: list[ModuleCall],
    mapping: dict[str, fx.Node],
    cut: dict[str, int],
    erase: set[str],
    bypass: set[str],
    edges: list[dict[str, Any]],
    written: set[str],
    left_operands: set[str],
    aliases: _Aliases,
    sizes: dict[str, list[list[Any]]],
    bounds: dict[str, Any],
) -> tuple[dict[str, int], set[str], set[str], dict[str, list[list[Any]]]]:
    """For :func:`_rewrite_scope`: check that each call of a hooked module inside ``scope``
    (``hooked``, in its local graph) can stay a call of the module, and rewrite first, on its
    own, each such module whose code the rewrite changes. Returns the changes left to
    ``scope``'s own rewrite (cut, erase, bypass, sizes). ``RuntimeError`` naming the module
    and its hooks where the call cannot stay (``gate_`` leaves such blocks ungated)."""
    sub = model if scope == "" else model.get_submodule(scope)
    root_name = {n: r for r, n in mapping.items()}  # local node -> root node name
    edge_names = {n for e in edges for n in (e["src"], e["dst"], *e["users"])}
    prefix = f"{scope}." if scope else ""
    for call in hooked:
        m = sub.get_submodule(call.path)
        what = (
            f"cannot rewrite module '{scope}' ({type(sub).__name__}) around module "
            f"'{prefix}{call.path}' ({type(m).__name__}), which {describe_hooks(m)}"
        )
        problem = hooked_call_problem(call)
        if problem is not None:
            raise RuntimeError(
                f"{what}: {problem}, so it could not stay a call of the module (its hooks "
                "would not run)"
            )
        names = {root_name[n] for n in call.nodes if n in root_name}
        outs = {root_name.get(n) for n in _call_outputs(call)}
        if outs & erase:
            raise RuntimeError(f"{what}: its call would be removed (its hooks would not run)")
        if names & edge_names:
            raise RuntimeError(f"{what}: a new shortcut would change its code")
        if not names & {*cut, *erase, *bypass, *sizes}:
            continue
        if is_leaf_call(call):
            raise RuntimeError(f"{what}: the rewrite would remove its call")
        full = prefix + call.path
        new = _rewrite_scope(
            model,
            root_graph,
            full,
            opaque,
            {k: v for k, v in cut.items() if k in names},
            erase & names,
            bypass & names,
            [],
            written,
            left_operands,
            aliases,
            {k: v for k, v in sizes.items() if k in names},
            bounds.get(full),
            bounds,
        )
        parent_name, _, child = full.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        cut = {k: v for k, v in cut.items() if k not in names}
        erase, bypass = erase - names, bypass - names
        sizes = {k: v for k, v in sizes.items() if k not in names}
    return cut, erase, bypass, sizes


def _call_outputs(call: ModuleCall) -> list[fx.Node]:
    """The graph nodes ``call`` returns."""
    result = call.result
    items = [result] if isinstance(result, fx.Node) else list(result)
    return [r for r in items if isinstance(r, fx.Node)]


def _sizes(m: nn.Module, kind: str) -> tuple[int | None, int] | None:
    """(input, output) channel counts of a module sliced as ``kind``; None if it is not one."""
    if kind == "linear" and isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if kind in ("conv", "dw", "gconv") and isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return (None if kind == "dw" else m.in_channels), m.out_channels
    if kind in ("convt", "dwt", "gconvt") and isinstance(m, _CONVT):
        return (None if kind == "dwt" else m.in_channels), m.out_channels
    if kind == "bn" and isinstance(m, BATCH_NORMS):
        return None, m.num_features
    if kind == "in" and isinstance(m, INSTANCE_NORMS):
        return None, m.num_features
    if kind == "gn" and isinstance(m, nn.GroupNorm):
        return None, m.num_channels
    if kind == "embedding" and isinstance(m, nn.Embedding | nn.EmbeddingBag):
        return None, m.embedding_dim
    return None


def _check_slice(name: str, m: nn.Module, spec: dict[str, Any]) -> None:
    """Refuse a slice that does not fit ``m``: a plan from another model, or applied twice."""
    sizes = _sizes(m, str(spec["kind"]))
    if sizes is None:
        raise ValueError(
            f"the plan slices module '{name}' as {spec['kind']!r}; it is {type(m).__name__}"
        )
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONVT)):
        # conv, dw or gconv, transposed (checked by _sizes) or not
        kind = {"convt": "conv", "dwt": "dw", "gconvt": "gconv"}.get(spec["kind"], spec["kind"])
        dw = m.groups == m.in_channels and m.out_channels % m.in_channels == 0
        fits = {"conv": m.groups == 1, "dw": dw, "gconv": m.groups > 1 and not dw}
        if not fits[kind]:
            want = {
                "conv": "convolution with groups=1",
                "dw": "depthwise one",
                "gconv": "grouped one (1 < groups, not depthwise)",
            }[kind]
            if isinstance(m, _CONVT):
                want = want.replace("convolution", "transposed convolution")
            raise ValueError(
                f"the plan slices module '{name}' as {spec['kind']!r}, expected for a "
                f"{want}; it has groups={m.groups} ({m.in_channels} -> {m.out_channels} "
                "channels)"
            )
        if kind == "gconv":
            _check_grouped(name, m, spec)
        if kind == "dw" and spec.get("in") is not None:
            mult = m.out_channels // m.in_channels
            out = spec.get("out")
            derived = (
                list(range(m.in_channels)) if out is None else sorted({o // mult for o in out})
            )
            if spec["in"] != derived:
                raise ValueError(
                    f"the plan keeps input channels {spec['in']} of depthwise module '{name}' "
                    f"but output channels {out}, which read input channels {derived}"
                )
        if spec["kind"] == "dwt":  # its weight (C_in, mult, *k) is cut by whole rows
            _check_depthwise_transposed(name, m, spec)
    if isinstance(m, nn.GroupNorm):
        _check_norm_groups(name, m, spec)
    actual_sizes = {k: v for k, v in zip(("in", "out"), sizes, strict=True) if v is not None}
    _check_side_sizes(f"module '{name}'", actual_sizes, spec, ("channels", "channels"), "channel")


def _check_norm_groups(name: str, m: nn.GroupNorm, spec: dict[str, Any]) -> None:
    """A GroupNorm keeps whole groups: the ``C / num_groups`` consecutive channels it
    normalises together are kept or removed together (the others' statistics would change).

    >>> _check_norm_groups("gn", nn.GroupNorm(2, 4), {"kind": "gn", "out": [0, 2]})
    Traceback (most recent call last):
    ...
    ValueError: the plan keeps output channels [0, 2] of GroupNorm 'gn' (2 groups of 2 ...
    """
    out = spec.get("out")
    if out is None or not out or min(out) < 0 or max(out) >= m.num_channels:
        return  # all kept, or out of range: the size checks name it
    per_group = m.num_channels // m.num_groups
    whole = [
        c
        for g in sorted({o // per_group for o in out})
        for c in range(g * per_group, (g + 1) * per_group)
    ]
    if list(out) != whole:
        raise ValueError(
            f"the plan keeps output channels {out} of GroupNorm '{name}' ({m.num_groups} "
            f"groups of {per_group} channels); a GroupNorm must keep whole groups, e.g. {whole}"
        )


def _check_depthwise_transposed(name: str, m: nn.Module, spec: dict[str, Any]) -> None:
    """A depthwise transposed convolution stays one: every kept input keeps the same output
    positions of its ``mult = out_channels / in_channels`` (its weight is
    ``(C_in, mult, *k)``)."""
    out = spec.get("out")
    if not isinstance(m, _CONVT) or out is None or not out or min(out) < 0:
        return
    if max(out) >= m.out_channels:
        return  # out of range: the size checks name it
    mult = m.out_channels // m.in_channels
    kept = sorted({o // mult for o in out})
    positions = sorted({o % mult for o in out})
    alike = [c * mult + j for c in kept for j in positions]
    if out != alike:
        raise ValueError(
            f"the plan keeps output channels {out} of depthwise transposed module '{name}' "
            f"({mult} per input channel); every kept input channel must keep the same "
            f"positions, e.g. {alike}"
        )


def _check_param_slice(name: str, p: Tensor, spec: dict[str, Any]) -> None:
    """Refuse a parameter slice that does not fit parameter ``name`` (``p``)."""
    kind = str(spec["kind"])
    if kind == "heads":
        dim = spec.get("dim")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < p.dim():
            raise ValueError(
                f"the plan slices '{name}' as 'heads' along dim {dim!r}; it has shape "
                f"{tuple(p.shape)} (expected a dimension index)"
            )
        sizes = {"out": int(p.shape[dim])}
        _check_side_sizes(f"'{name}'", sizes, spec, ("heads", "heads"), "index")
        return
    if kind == "scale":
        dim = scale_dim(p.shape)
        if dim is None:
            raise ValueError(
                f"the plan slices parameter '{name}' as 'scale' (a per-channel factor, one "
                f"dimension of size > 1); it has shape {tuple(p.shape)}"
            )
        sizes = {"out": int(p.shape[dim])}
        _check_side_sizes(f"parameter '{name}'", sizes, spec, ("features", "channels"), "index")
        return
    dims = 1 if kind == "vector" else 2
    if kind == "kernel" and p.dim() not in (3, 4, 5):
        raise ValueError(
            f"the plan slices parameter '{name}' as 'kernel' (a convolution's weight, 3-d to "
            f"5-d); it has shape {tuple(p.shape)}"
        )
    if kind != "kernel" and p.dim() != dims:
        raise ValueError(
            f"the plan slices parameter '{name}' as {kind!r} ({dims}-d); it has shape "
            f"{tuple(p.shape)}"
        )
    in_dim = 0 if kind == "matrix_t" else 1
    sizes = {"out": int(p.shape[0 if kind != "matrix_t" else 1])}
    if kind != "vector":
        sizes["in"] = int(p.shape[in_dim])
    _check_side_sizes(f"parameter '{name}'", sizes, spec, ("features", "units"), "index")


def _check_side_sizes(
    what: str,
    sizes: dict[str, int],
    spec: dict[str, Any],
    nouns: tuple[str, str],
    index_noun: str,
) -> None:
    """Refuse a slice ``spec`` whose recorded sizes (``n_in``/``n_out``) differ from the
    ``sizes`` of ``what`` (by side, ``"in"``/``"out"``), or that keeps an index out of
    range; ``nouns``: what an input and an output index is called in the message.

    >>> _check_side_sizes("module 'a'", {"out": 8}, {"n_out": 16}, ("ch", "ch"), "channel")
    Traceback (most recent call last):
    ...
    ValueError: the plan expects module 'a' to have 16 output ch, it has 8: apply a plan once, ...
    """
    hint = "apply a plan once, to a fresh dense instance of the model it was exported from"
    for side, actual in sizes.items():
        expected, keep = spec.get(f"n_{side}"), spec.get(side)
        if expected is not None and int(expected) != actual:
            noun = nouns[0] if side == "in" else nouns[1]
            raise ValueError(
                f"the plan expects {what} to have {expected} {side}put {noun}, it has "
                f"{actual}: {hint}"
            )
        if keep and (max(keep) >= actual or min(keep) < 0):
            raise ValueError(
                f"the plan keeps {side}put {index_noun} {max(keep)} of {what}, which has "
                f"{actual}: {hint}"
            )


def _check_grouped(
    name: str,
    m: _AnyConv,
    spec: dict[str, Any],
) -> None:
    """A grouped convolution (or transposed convolution) stays one: each group keeps the
    same channel positions."""
    for side, total in (("in", m.in_channels), ("out", m.out_channels)):
        keep = spec.get(side)
        if keep is None or not keep or max(keep) >= total or min(keep) < 0:
            continue  # missing or out of range: the size checks name it
        per_group = total // m.groups
        positions = [c for c in keep if c < per_group]
        alike = [g * per_group + j for g in range(m.groups) for j in positions]
        if sorted(keep) != alike:
            raise ValueError(
                f"the plan keeps {side}put channels {keep} of grouped module '{name}' "
                f"(groups={m.groups}, {per_group} per group); a grouped convolution must keep "
                f"the same positions in every group, e.g. {alike}"
            )


def _check_heads(name: str, att: nn.MultiheadAttention, heads: list[int]) -> None:
    if heads and (max(heads) >= att.num_heads or min(heads) < 0):
        raise ValueError(
            f"the plan keeps head {max(heads)} of '{name}', which has {att.num_heads} heads: "
            "apply a plan once, to a fresh dense instance of the model it was exported from"
        )


_SLICE_KINDS = (
    *("linear", "conv", "dw", "gconv", "convt", "dwt", "gconvt", "bn", "in", "gn", "embedding"),
    *_PARAM_KINDS,
)
_PLAN_FIELDS: dict[str, type] = {"opaque": dict, "slices": dict, "cut": dict, "scopes": list}
_PLAN_OPTIONAL: dict[str, type] = {
    "erase": list,
    "transformers": dict,
    "decoders": dict,  # decoder layers (absent: none pruned)
    "attention": dict,
    "rnn": dict,
    "bypass": list,
    "edges": list,
    "sizes": dict,
    "model": dict,  # fingerprint of the model it was exported from (fingerprint.py)
    "bound": dict,  # per rewritten scope: the optional arguments its calls fix
    "inputs": int,  # positional inputs gate_ was given (absent: one)
    "examples": list,  # their shapes and dtypes, which tracing specialises to (absent: none)
    "checksum": str,  # of everything else: a plan edited after export_plan is refused
    # activations a residual branch ends in whose block gate value (not 0 or 1) is kept as a
    # GateScale (absent: none)
    "scaled": list,
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
    _check_keys("the plan", plan, {"format", *_PLAN_FIELDS, *_PLAN_OPTIONAL})
    for key in ("opaque", "slices", "transformers", "decoders", "attention", "rnn", "cut"):
        _check_strings(f"{key!r} module or node names", list(plan.get(key, {})))
    _check_strings("'opaque' reasons", list(plan["opaque"].values()))
    for key in ("scopes", "erase", "bypass", "scaled"):
        _check_strings(f"{key!r}", plan.get(key, []))
    for scope, fixed in plan.get("bound", {}).items():
        if not isinstance(fixed, dict) or not all(
            isinstance(k, str) and is_constant(v) for k, v in fixed.items()
        ):
            raise ValueError(
                f"malformed plan: 'bound' of {scope!r} must map argument names to None, "
                f"numbers or strings, got {fixed!r}"
            )
    if "examples" in plan:
        example_specs(plan["examples"], torch.device("cpu"))  # raises naming a bad entry
    n_inputs = plan.get("inputs", 1)
    if isinstance(n_inputs, bool) or n_inputs < 1:
        raise ValueError(
            f"malformed plan: 'inputs' must be the number of positional inputs (an int >= 1), "
            f"got {n_inputs!r}"
        )
    scopes: list[str] = plan["scopes"]
    for a, b in itertools.permutations(scopes, 2):
        if _within(b, a):
            raise ValueError(
                f"malformed plan: 'scopes' lists {b!r} and {a!r}, which contains it (or is it): "
                "each module is rewritten once, expected outermost scopes only"
            )
    for name, spec in plan["slices"].items():
        if not isinstance(spec, dict) or spec.get("kind") not in _SLICE_KINDS:
            raise ValueError(
                f"malformed plan: slice {name!r} must be a dict with 'kind' one of "
                f"{_SLICE_KINDS}, got {spec!r}"
            )
        keys = {"kind", "in", "out", "n_in", "n_out"}
        _check_keys(
            f"slice {name!r}",
            spec,
            {*keys, "dim"} if spec["kind"] == "heads" else keys,
            ("in", "out"),
        )
        vector = spec["kind"] in ("bn", "in", "gn", "vector", "scale", "embedding", "heads")
        if vector and (spec.get("in") is not None or spec.get("n_in") is not None):
            raise ValueError(
                f"malformed plan: slice {name!r} is a {spec['kind']!r} slice, whose channels "
                f"are its 'out'; expected 'in' and 'n_in' None, got {spec.get('in')!r} and "
                f"{spec.get('n_in')!r}"
            )
        for side in ("in", "out"):
            _check_indices(f"slice {name!r} {side!r}", spec.get(side), optional=True)
            n = spec.get(f"n_{side}")
            if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
                raise ValueError(
                    f"malformed plan: slice {name!r} 'n_{side}' must be an int, got {n!r}"
                )
    sections: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
        ("transformers", ("heads", "units"), ("attn", "ffn")),
        ("decoders", ("heads", "cross_heads", "units"), ("attn", "cross", "ffn")),
        ("attention", ("heads",), ()),
    )
    for section, fields, flags in sections:
        for name, spec in plan.get(section, {}).items():
            if not isinstance(spec, dict):
                raise ValueError(f"malformed plan: {section} entry {name!r} must be a dict")
            _check_keys(f"{section} entry {name!r}", spec, {*fields, *flags})
            for f in fields:
                _check_indices(f"{section} {name!r} {f!r}", spec.get(f), optional=False)
            for f in flags:
                if not isinstance(spec.get(f), bool):
                    raise ValueError(
                        f"malformed plan: {section} {name!r} {f!r} must be a bool, "
                        f"got {spec.get(f)!r}"
                    )
    edge_keys = {"scope": str, "src": str, "dst": str, "users": list, "buffer": str}
    buffers: set[str] = set()
    erase = set(plan.get("erase", []))
    for e in plan.get("edges", []):
        if not isinstance(e, dict) or any(
            not isinstance(e.get(k), t) for k, t in edge_keys.items()
        ):
            raise ValueError(
                f"malformed plan: each edge must be a dict with str 'scope', 'src', 'dst', "
                f"'buffer' and a list 'users', got {e!r}"
            )
        _check_keys(f"edge {e['buffer']!r}", e, set(edge_keys))
        _check_strings(f"edge {e['buffer']!r} 'users'", e["users"])
        if not e["users"] or not e["buffer"].isidentifier() or e["buffer"] in buffers:
            raise ValueError(
                f"malformed plan: edge {e['buffer']!r} needs a non-empty 'users' list and a "
                "'buffer' that is a Python identifier no other edge uses"
            )
        buffers.add(e["buffer"])
        if not any(_within(e["scope"], sc) for sc in scopes):
            raise ValueError(
                f"malformed plan: edge {e['buffer']!r} is in scope {e['scope']!r}, which no "
                f"entry of 'scopes' {scopes} contains (it would be dropped)"
            )
        for end in ("src", "dst"):
            if e[end] in erase:
                raise ValueError(
                    f"malformed plan: edge {e['buffer']!r} reads node {e[end]!r} ({end}), "
                    "which 'erase' removes"
                )
    for node, entries in plan.get("sizes", {}).items():
        ok = isinstance(node, str) and isinstance(entries, list) and bool(entries)
        for entry in entries if ok else ():
            pair: list[Any] = entry if isinstance(entry, list) and len(entry) == 2 else [None, 0]
            key, value = pair
            good_value = isinstance(value, int) and not isinstance(value, bool) and value > 0
            ok = ok and _size_key(key) and good_value
        if not ok:
            raise ValueError(
                f"malformed plan: 'sizes' entry {node!r} must be a non-empty list of [dim, size], "
                "['split_size', size], ['section_<i>', size], ['index_<i>', size] or "
                f"['repeats', size] pairs with sizes > 0, got {entries!r}"
            )
    for node, arg in plan["cut"].items():
        if isinstance(arg, bool) or arg not in (0, 1):
            raise ValueError(
                f"malformed plan: cut {node!r} must be the removed argument of the add, 0 or 1, "
                f"got {arg!r}"
            )
    marks = {"cut": set(plan["cut"]), "erase": erase, "bypass": set(plan.get("bypass", []))}
    for (a, sa), (b, sb) in itertools.combinations(marks.items(), 2):
        if sa & sb:
            raise ValueError(
                f"malformed plan: node {sorted(sa & sb)[0]!r} is in both {a!r} and {b!r}; "
                "expected each node marked once"
            )
    return plan


def _check_keys(
    where: str, entry: dict[str, Any], allowed: set[str], required: tuple[str, ...] = ()
) -> None:
    """Refuse keys a plan entry does not have (a typo would silently be ignored), and entries
    missing a key it needs."""
    unknown = sorted(str(k) for k in entry if k not in allowed)
    if unknown:
        raise ValueError(
            f"malformed plan: {where} has unknown keys {unknown}; expected only {sorted(allowed)}"
        )
    missing = [k for k in required if k not in entry]
    if missing:
        raise ValueError(f"malformed plan: {where} has no {missing[0]!r}")


def _check_strings(where: str, values: list[Any]) -> None:
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"malformed plan: {where} must be strings, got {bad[0]!r}")


def _dry_run_sizes(
    traced: TracedModel | None, plan: dict[str, Any]
) -> dict[str, tuple[fx.Node, fx.Node]]:
    """Give the plan's ``"sizes"`` to a copy of the dense model's graph, so a size entry that
    does not fit is a ``ValueError`` before the model changes. Returns, by node name, each
    node of the dense graph and of the resized copy (none without a graph)."""
    sizes = plan.get("sizes") or {}
    if not sizes:
        return {} if traced is None else {n.name: (n, n) for n in traced.graph.nodes}
    if not plan["scopes"] or traced is None:
        name = next(iter(sizes))
        raise ValueError(
            f"malformed plan: 'sizes' resizes node {name!r}, which no entry of 'scopes' "
            f"{plan['scopes']} contains (it would keep its old size)"
        )
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(traced.graph, env)
    nodes = {old.name: new for old, new in env.items()}
    pairs = {old.name: (old, new) for old, new in env.items()}
    for name, entries in sizes.items():
        if name not in nodes:
            raise ValueError(f"the plan names graph nodes the model does not have: [{name!r}]")
        if not isinstance(entries, list) or not all(
            isinstance(e, list | tuple) and len(e) == 2 for e in entries
        ):
            raise ValueError(
                f"malformed plan: 'sizes' of node {name!r} must be a list of [dimension, size] "
                f"pairs, got {entries!r}"
            )
        for key, value in entries:
            ok_key = _size_key(key)
            if not ok_key or isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"malformed plan: 'sizes' of node {name!r} must pair a dimension (an int, "
                    "'split_size', 'section_<i>', 'index_<i>' or 'repeats') with a size >= 1, "
                    f"got {[key, value]!r}"
                )
        _as_sections(nodes[name], [key for key, _ in entries])
        for key, value in entries:
            _resize(nodes[name], key, value)
    return pairs


def _size_tail(n: fx.Node) -> list[int]:
    """The literal sizes ending the shape a ``view``/``reshape`` ``n`` gives (``view(b, t, 4,
    8)``: ``[4, 8]``; ``view(b, t, -1, 8)``: ``[8]``); empty for another node.

    >>> g = fx.Graph()
    >>> x = g.placeholder("x")
    >>> _size_tail(g.call_method("view", (x, g.call_method("size", (x, 0)), -1, 2, 8)))
    [2, 8]
    """
    is_view = (n.op == "call_method" and n.target in ("view", "reshape")) or (
        n.op == "call_function" and n.target is torch.reshape
    )
    if not is_view:
        return []
    sizes: Any = n.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
        sizes = sizes[0]
    elif len(sizes) == 1 and isinstance(sizes[0], fx.Node) and sizes[0].target is operator.add:
        tail = sizes[0].args[1] if len(sizes[0].args) == 2 else None  # x.size()[:-1] + (h, d)
        sizes = tail if isinstance(tail, list | tuple) else ()
    out: list[int] = []
    for size in reversed(list(sizes)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            break
        out.insert(0, size)
    return out


def _check_head_slices(
    model: nn.Module, plan: dict[str, Any], pairs: dict[str, tuple[fx.Node, fx.Node]]
) -> None:
    """Refuse sliced ``nn.Linear`` features that the (resized) code does not reshape alike:
    a ``view(b, t, heads, head_size)`` of a sliced output (q, k, v) must get as many features
    as the plan keeps, in whole heads of ``head_size`` (a hand-edited plan keeping half a
    head would fail at the first forward, or mix heads), and the ``reshape`` merging heads
    into a sliced input (o) as many as that input keeps."""
    for dense, new in pairs.values():
        if new.op == "call_module" and new.args and isinstance(new.args[0], fx.Node):
            spec = plan["slices"].get(str(new.target))
            m = model.get_submodule(str(new.target)) if spec is not None else None
            dense_tail, tail = _size_tail(cast(fx.Node, dense.args[0])), _size_tail(new.args[0])
            merged = (  # reshape(b, t, heads * head_size) into a Linear sliced on its input
                isinstance(m, nn.Linear)
                and isinstance(spec["in"], list)
                and bool(dense_tail)
                and bool(tail)
                and dense_tail[-1] == m.in_features
            )
            if merged and tail[-1] != len(spec["in"]):
                raise ValueError(
                    f"the plan keeps {len(spec['in'])} input features of '{new.target}', "
                    f"but node '{new.args[0].name}' reshapes them to {tail[-1]} (the "
                    "plan's 'sizes' and 'slices' disagree): export the plan again"
                )
            continue
        src = new.args[0] if new.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        spec = plan["slices"].get(str(src.target))
        m = model.get_submodule(str(src.target)) if spec is not None else None
        dense_tail, tail = _size_tail(dense), _size_tail(new)
        if not isinstance(m, nn.Linear) or not isinstance(spec["out"], list) or not tail:
            continue
        if len(dense_tail) != len(tail):
            continue
        kept, n_out, whole = spec["out"], m.out_features, 1
        for size in dense_tail:
            whole *= size
        width = 1
        for size in tail:
            width *= size
        if whole == n_out:  # view(b, t, heads, head_size): all the features
            bad = width != len(kept)
        elif n_out % whole == 0:  # view(b, t, -1, head_size)
            bad = len(kept) % width != 0
        else:
            continue
        if bad:
            raise ValueError(
                f"the plan keeps {len(kept)} output features of '{src.target}', but node "
                f"'{new.name}' splits them into {tail} (heads of {tail[-1]} features): keep "
                f"whole heads of {tail[-1]}, as many as the plan's 'sizes' give"
            )
        split = len(tail) > 1 or whole != n_out
        head = tail[-1]
        if not split or head != dense_tail[-1] or n_out % head:
            continue
        counts: dict[int, int] = {}
        for i in kept:
            counts[i // head] = counts.get(i // head, 0) + 1
        part = next((h for h, c in counts.items() if c != head), None)
        if part is not None:
            raise ValueError(
                f"the plan keeps {counts[part]} of the {head} features of head {part} of "
                f"'{src.target}' (node '{new.name}' splits it into heads of {head}): keep "
                f"whole heads of {head}"
            )


def _check_rnn(name: str, m: nn.Module, spec: object) -> None:
    """Refuse a recurrent-module plan entry that does not fit ``m`` (before anything changes)."""
    if not isinstance(m, nn.LSTM | nn.GRU | nn.RNN):
        raise ValueError(f"the plan prunes '{name}' as a recurrent module; it is {type(m)}")
    if not isinstance(spec, dict):
        raise ValueError(f"malformed plan: rnn entry {name!r} must be a dict, got {spec!r}")
    _check_keys(f"rnn entry {name!r}", spec, {"units", "in", "mode", "state"}, ("units", "in"))
    if not isinstance(spec.get("state", False), bool):
        raise ValueError(
            f"malformed plan: rnn entry {name!r} 'state' must be true or false, got "
            f"{spec['state']!r}"
        )
    hint = "apply a plan once, to a fresh dense instance of the model it was exported from"
    mode = spec.get("mode", m.mode)  # plans written before 2026-12-07 do not name it
    if mode != m.mode:
        raise ValueError(
            f"the plan prunes '{name}' as a {mode} module, but the model's is {m.mode} "
            f"({type(m).__name__}): apply a plan to the model it was exported from"
        )
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
    counts = [len(keep) for keep in units]
    if min(counts) == 0 or len(set(counts)) > 1:  # one hidden_size for every layer and direction
        raise ValueError(
            f"malformed plan: rnn {name!r} must keep the same number (>= 1) of units in every "
            f"layer and direction, got {counts}"
        )


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(n: fx.Node) -> bool:
    """An add of two arguments as ``gate_`` finds residual blocks: ``a + b``, ``torch.add``,
    ``a.add(b)``, ``a.add_(b)``."""
    if n.op == "call_function":
        return n.target in _ADDS
    return n.op == "call_method" and n.target in ("add", "add_")


def _is_sub(n: fx.Node) -> bool:
    """A subtraction of two arguments (``y - b``, ``torch.sub``, ``y.sub(b)``): a bias
    subtracted from a product, whose channels it keeps like an add."""
    if n.op == "call_function":
        return n.target in (operator.sub, torch.sub) and not n.kwargs
    return n.op == "call_method" and n.target == "sub" and not n.kwargs


_SAME_CHANNELS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
    nn.Hardswish, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip
_SAME_CHANNELS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu,
    torch.nn.functional.silu, torch.tanh, torch.sigmoid, torch.nn.functional.dropout,
    operator.neg}  # fmt: skip
_SAME_CHANNELS_METHODS = {"relu", "relu_", "tanh", "sigmoid", "contiguous", "clone"}
_GLOBAL_POOLS = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_POOLS = (*_GLOBAL_POOLS, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d)  # fmt: skip


def _examples(model: nn.Module, plan: dict[str, Any]) -> tuple[TensorSpec, ...] | None:
    """The example inputs the plan's model was gated with (on ``model``'s device), which
    tracing specialises to; None for a plan without them (exported before 2026-12-08)."""
    if "examples" not in plan:
        return None
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    return example_specs(plan["examples"], device)


def _check_graph(model: nn.Module, plan: dict[str, Any]) -> TracedModel | None:
    """Check the plan's graph nodes and channel groups against the dense model's trace.

    Every node the plan names must exist, lie in a rewritten scope, and a cut node must be an
    add; a slice's kept input channels must be the kept output channels of the module that
    produces them (through element-wise ops and adds), as one channel group's members are.
    Returns the trace (None if the model cannot be traced and the plan only slices).
    """
    replaced = [
        *plan.get("transformers", {}),
        *plan.get("decoders", {}),
        *plan.get("attention", {}),
    ]
    opaque = {**plan["opaque"], **{n: "replaced by the plan" for n in replaced}}
    scopes: list[str] = plan["scopes"]
    try:
        traced = trace_model(
            model, opaque, warn=False, inputs=plan.get("inputs", 1), examples=_examples(model, plan)
        )
    except ValueError:
        if scopes:
            raise
        return None  # only slices (the model is not traced to apply them): nothing to compare
    nodes = {n.name: n for n in traced.graph.nodes}
    edges: list[dict[str, Any]] = plan.get("edges", [])
    named = {
        "cut": list(plan["cut"]),
        "erase": plan.get("erase", []),
        "bypass": plan.get("bypass", []),
        "edges": [n for e in edges for n in (e["src"], e["dst"], *e["users"])],
    }
    for key, names in named.items():
        for name in names:
            if name not in nodes:
                raise ValueError(
                    f"the plan names graph node {name!r} ({key}) that the model does not have: "
                    "apply a plan to a fresh dense instance of the model it was exported from"
                )
            if not any(_within(owner_of(nodes[name]), sc) for sc in scopes):
                raise ValueError(
                    f"the plan names graph node {name!r} ({key}) in module "
                    f"'{owner_of(nodes[name])}', which no entry of 'scopes' {scopes} contains "
                    "(it would be left unchanged)"
                )
    for name, pos in plan["cut"].items():
        n = nodes[name]
        if not _is_add(n) or len(n.args) != 2 or not isinstance(n.args[1 - pos], fx.Node):
            raise ValueError(
                f"the plan cuts argument {pos} of node {name!r}, expected an add of two "
                f"tensors; it is {n.op} {n.target} with arguments {n.args}"
            )
    _check_groups(model, traced.graph, plan)
    for scope in scopes:
        _check_removal(traced.graph, scope, plan)
    return traced


def _check_removal(root: fx.Graph, scope: str, plan: dict[str, Any]) -> None:
    """Replay the plan's cuts, bypasses and erasures in ``scope`` on a copy of the traced graph:
    an erased node still in use (a branch both removed and kept, e.g. the other argument of an
    add cut) or a module call left computing nothing (a removed branch not erased) is
    refused."""
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(root, mapping))
    nodes = {old.name: new for old, new in mapping.items()}
    inside = {nodes[n.name] for n in scope_nodes(root, scope)}
    live_before = live_nodes(graph, {})
    dead_before = {n for n in inside if n not in live_before}  # code computing for nothing
    output = next(n for n in graph.nodes if n.op == "output")
    for e in plan.get("edges", []):  # a kept new shortcut reads its source and destination
        if _within(e["scope"], scope):
            with graph.inserting_before(output):
                graph.call_function(operator.add, (nodes[e["dst"]], nodes[e["src"]]))
    for name, pos in plan["cut"].items():
        n = nodes[name]
        if n in inside:
            n.replace_all_uses_with(cast(fx.Node, n.args[1 - pos]))  # a node: checked above
            graph.erase_node(n)
    for n in list(graph.nodes):
        if n in inside and n.name in plan.get("bypass", []):
            inp = n.args[0]
            if not isinstance(inp, fx.Node):
                raise ValueError(f"the plan bypasses node {n.name!r}, which has no input node")
            n.replace_all_uses_with(inp)
            graph.erase_node(n)
    erase = set(plan.get("erase", []))
    erased: set[fx.Node] = set()

    def drop(n: fx.Node) -> None:
        for u in list(n.users):
            if u.op in ("output", "placeholder") or u not in inside or _mutates(u):
                break
            drop(u)
        if n.users:
            users = ", ".join(u.name for u in n.users)
            raise ValueError(
                f"inconsistent plan: it erases node {n.name!r} in '{scope}', which {users} "
                "still use once the cuts are made (a branch both removed and kept)"
            )
        erased.add(n)
        graph.erase_node(n)

    for n in reversed(list(graph.nodes)):
        if n in inside and n.name in erase and n not in erased:
            drop(n)
    left = [
        n.name
        for n in graph.nodes
        if n in inside
        and not n.users
        and n not in dead_before
        and n.op == "call_module"  # (dead shape arithmetic is harmless; a dead module is not)
        and not _mutates(n)
    ]
    if left:
        raise ValueError(
            f"inconsistent plan: once its cuts are made, module call(s) {left[:5]} in '{scope}' "
            "compute nothing that is used but are not in 'erase' (a removed branch kept)"
        )


class _Channels(NamedTuple):
    """What the channel dimension of a traced value carries (see :func:`_check_groups`)."""

    dim: str  # "last" (a Linear's), "1" (a Conv's/BatchNorm's), "pooled" ("1", rest size 1)
    keep: tuple[int, ...]  # the kept channels, indices into the dense width
    width: int  # the dense width
    source: str  # where they were decided
    spatial: bool = False  # a Conv's output (B, C, *spatial): pooling keeps its channels


def _check_groups(model: nn.Module, graph: fx.Graph, plan: dict[str, Any]) -> None:
    """Refuse a plan whose consumer keeps other input channels than its producer keeps output
    channels (a channel group whose members disagree: another function, or a shape error).

    Channels are followed from the model input and each Linear/Conv/BatchNorm through
    element-wise ops, adds, pooling of convolution outputs and the ``flatten`` of a global
    pool; wherever they are reshaped, concatenated, ... nothing is compared."""
    slices: dict[str, dict[str, Any]] = plan["slices"]
    rnns: dict[str, dict[str, Any]] = plan.get("rnn", {})
    cut: dict[str, int] = plan["cut"]
    label: dict[fx.Node, _Channels] = {}
    model_input = _Channels("input", (), 0, "the model's input")

    def kept(spec: dict[str, Any] | None, side: str, n: int) -> tuple[int, ...]:
        keep = None if spec is None else spec.get(side)
        return tuple(range(n)) if keep is None else tuple(keep)

    def expect(
        n: fx.Node, dim: str, want: tuple[int, ...], width: int, what: str, arg: Any = None
    ) -> None:
        if arg is None:
            arg = n.args[0] if n.args else None
        got = label.get(arg) if isinstance(arg, fx.Node) else None
        if got is model_input and want != tuple(range(width)):
            raise ValueError(
                f"inconsistent plan: {what} keeps input channels {_short(want)} of {width}, "
                "but it reads the model's input, whose width the data fix (never pruned)"
            )
        if got is not None and got.dim == dim and got.keep != want:
            raise ValueError(
                f"inconsistent plan: {what} keeps input channels {_short(want)}, but its input "
                f"(node {arg}) carries channels {_short(got.keep)} of {got.source}: the "
                "members of a channel group must keep the same channels"
            )

    def first(n: fx.Node) -> _Channels | None:
        a = n.args[0] if n.args else None
        return label.get(a) if isinstance(a, fx.Node) else None

    for n in graph.nodes:
        args = [a for a in n.args if isinstance(a, fx.Node)]
        inp = first(n)
        if n.op == "placeholder":
            label[n] = model_input
        elif n.op == "output":
            for a in _flat_nodes(n.args):
                got = label.get(a)
                if (
                    got is not None
                    and got is not model_input
                    and got.keep != tuple(range(got.width))
                ):
                    raise ValueError(
                        f"inconsistent plan: the model's output (node {a}) keeps channels "
                        f"{_short(got.keep)} of {got.width} of {got.source}; the output's "
                        "width is never pruned"
                    )
        elif n.op == "call_module":
            t = str(n.target)
            m = model.get_submodule(t)
            spec = slices.get(t)
            what = f"module '{t}'" + (f" (slice {spec['kind']!r})" if spec else " (not sliced)")
            src = f"module '{t}'"
            if isinstance(m, nn.Linear):
                expect(n, "last", kept(spec, "in", m.in_features), m.in_features, what)
                out = kept(spec, "out", m.out_features)
                label[n] = _Channels("last", out, m.out_features, src)
            elif isinstance(m, nn.Embedding | nn.EmbeddingBag):  # its columns
                out = kept(spec, "out", m.embedding_dim)
                label[n] = _Channels("last", out, m.embedding_dim, src)
            elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                out = kept(spec, "out", m.out_channels)
                if m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
                    mult = m.out_channels // m.in_channels
                    expect(n, "1", tuple(sorted({o // mult for o in out})), m.in_channels, what)
                else:  # groups=1, or grouped
                    expect(n, "1", kept(spec, "in", m.in_channels), m.in_channels, what)
                label[n] = _Channels("1", out, m.out_channels, src, spatial=True)
            elif isinstance(m, _CONVT):
                out = kept(spec, "out", m.out_channels)
                if m.groups == m.in_channels:  # depthwise: output o reads input o // mult
                    mult = m.out_channels // m.in_channels
                    expect(n, "1", tuple(sorted({o // mult for o in out})), m.in_channels, what)
                else:  # groups=1, or grouped
                    expect(n, "1", kept(spec, "in", m.in_channels), m.in_channels, what)
                label[n] = _Channels("1", out, m.out_channels, src, spatial=True)
            elif isinstance(m, (BATCH_NORMS, INSTANCE_NORMS, nn.GroupNorm)):
                width = m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features
                out = kept(spec, "out", width)
                expect(n, "1", out, width, what)
                spatial = inp is not None and inp.dim == "1" and inp.spatial
                label[n] = _Channels("1", out, width, src, spatial)
            elif isinstance(m, nn.LSTM | nn.GRU | nn.RNN):
                spec_in = kept(rnns.get(t), "in", m.input_size)
                expect(n, "last", spec_in, m.input_size, f"module '{t}' (rnn)")
            elif (shuffled := _shuffled(n, m, inp)) is not None:
                label[n] = shuffled
            elif inp is not None and inp is not model_input:
                if isinstance(m, _SAME_CHANNELS_MODULES):
                    label[n] = inp
                elif inp.spatial and isinstance(m, _POOLS):
                    size = getattr(m, "output_size", None)
                    sizes = size if isinstance(size, tuple) else (size,)
                    pooled = isinstance(m, _GLOBAL_POOLS) and all(v == 1 for v in sizes)
                    label[n] = inp._replace(dim="pooled" if pooled else "1")
        elif (lp := _linear_param(model, n)) is not None:
            path, in_dim, x_arg, b_arg = lp
            w = model.get_parameter(path)
            n_in, n_out = int(w.shape[in_dim]), int(w.shape[1 - in_dim])
            spec = slices.get(path)
            layout = "matrix" if in_dim == 1 else "matrix_t"
            if spec is not None and spec["kind"] != layout:
                raise ValueError(
                    f"inconsistent plan: it slices parameter '{path}' as {spec['kind']!r}, but "
                    f"node {n.name} reads it as {layout!r} (a weight (out, in) as F.linear "
                    "reads it is 'matrix', (in, out) as x @ W reads it 'matrix_t')"
                )
            what = f"parameter '{path}'" + (f" (slice {layout!r})" if spec else " (not sliced)")
            expect(n, "last", kept(spec, "in", n_in), n_in, what, x_arg)
            out = kept(spec, "out", n_out)
            label[n] = _Channels("last", out, n_out, f"parameter '{path}'")
            if isinstance(b_arg, fx.Node):
                _check_bias(b_arg, label[n], slices)
        elif (scaled := _scale_operands(n, slices)) is not None:
            x_arg, path, spec = scaled  # h * gamma (h / gamma): gamma sliced with h's channels
            got = label.get(x_arg)
            want = kept(spec, "out", int(spec.get("n_out") or 0))
            if got is not None and got is not model_input and got.keep != want:
                raise ValueError(
                    f"inconsistent plan: it keeps entries {_short(want)} of per-channel factor "
                    f"'{path}', which node {n.name} multiplies channels {_short(got.keep)} of "
                    f"{got.source} by: a factor must keep the channels it multiplies"
                )
            if got is not None:
                label[n] = got
        elif (_is_add(n) or _is_sub(n)) and len(args) == 2:
            for a, c in (args, args[::-1]):  # x @ W + b (- b): b sliced as W's output units
                if a in label and label[a] is not model_input:
                    _check_bias(c, label[a], slices)
            if n.name in cut:
                keep = n.args[1 - cut[n.name]]
                if isinstance(keep, fx.Node) and keep in label:
                    label[n] = label[keep]
                continue
            known = [label[a] for a in args if a in label and label[a] is not model_input]
            if len(known) == 2 and known[0].dim == known[1].dim and known[0].keep != known[1].keep:
                raise ValueError(
                    f"inconsistent plan: node {n.name} adds channels {_short(known[0].keep)} of "
                    f"{known[0].source} to channels {_short(known[1].keep)} of "
                    f"{known[1].source}: the members of a channel group must keep the same "
                    "channels"
                )
            if known:
                label[n] = known[0]
        elif inp is None or inp is model_input:
            continue
        elif (shuffled := _shuffled(n, None, inp)) is not None:
            label[n] = shuffled
        elif (n.op == "call_function" and n.target in _SAME_CHANNELS_FUNCTIONS) or (
            n.op == "call_method" and n.target in _SAME_CHANNELS_METHODS
        ):
            label[n] = inp
        elif _flattens_from_1(n) and inp.dim == "pooled":
            label[n] = inp._replace(dim="last", spatial=False)
    for e in plan.get("edges", []):
        ends = [label.get(n) for n in graph.nodes if n.name in (e["src"], e["dst"])]
        known = [x for x in ends if x is not None and x is not model_input]
        if len(known) == 2 and known[0].dim == known[1].dim and known[0].keep != known[1].keep:
            raise ValueError(
                f"inconsistent plan: edge {e['buffer']!r} adds channels {_short(known[0].keep)} "
                f"of {known[0].source} to channels {_short(known[1].keep)} of "
                f"{known[1].source}: the members of a channel group must keep the same channels"
            )


def _shuffled(n: fx.Node, m: nn.Module | None, inp: _Channels | None) -> _Channels | None:
    """The channels a GLU over the channels or a pixel (un)shuffle (module ``m``, or
    function node ``n``) carries out of ``inp``'s, checked: a GLU pairs channel ``i`` of its
    two halves, so both halves must keep the same positions; a pixel shuffle by ``r`` moves
    each run of ``r * r`` channels into one, so a run is kept whole or not at all (an
    unshuffle spreads channel ``c`` over ``c * r * r ..``). None for other nodes, or channels
    not on dimension 1 (the last for a GLU) where nothing is compared."""
    if inp is None or inp.dim not in ("1", "last"):
        return None
    fn = n.op == "call_function"
    if isinstance(m, nn.GLU) or (fn and n.target is torch.nn.functional.glu):
        dim = m.dim if isinstance(m, nn.GLU) else n.args[1] if len(n.args) > 1 else None
        dim = n.kwargs.get("dim", -1) if dim is None else dim
        if (inp.dim, dim) not in (("1", 1), ("last", -1)) or inp.width % 2:
            return None
        half = inp.width // 2
        lo = tuple(k for k in inp.keep if k < half)
        hi = tuple(k - half for k in inp.keep if k >= half)
        if lo != hi:
            raise ValueError(
                f"inconsistent plan: node {n.name} (GLU) multiplies channel i of the first "
                f"half by channel i of the second, but its input keeps channels "
                f"{_short(inp.keep)} of {inp.width} of {inp.source}: the halves keep "
                f"{_short(lo)} and {_short(hi)}, which must be the same"
            )
        return inp._replace(keep=lo, width=half)
    up = isinstance(m, nn.PixelShuffle) or (fn and n.target is torch.pixel_shuffle)
    down = isinstance(m, nn.PixelUnshuffle) or (fn and n.target is torch.pixel_unshuffle)
    if not (up or down) or inp.dim != "1":
        return None
    r: Any = n.args[1] if len(n.args) > 1 else None
    if isinstance(m, nn.PixelShuffle | nn.PixelUnshuffle):
        r = m.upscale_factor if isinstance(m, nn.PixelShuffle) else m.downscale_factor
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        return None
    rr = r * r
    if down:
        keep = tuple(c * rr + j for c in inp.keep for j in range(rr))
        return inp._replace(keep=keep, width=inp.width * rr)
    runs = tuple(sorted({k // rr for k in inp.keep}))
    if inp.width % rr or inp.keep != tuple(c * rr + j for c in runs for j in range(rr)):
        raise ValueError(
            f"inconsistent plan: node {n.name} (pixel shuffle by {r}) moves each run of {rr} "
            f"channels into one, but its input keeps channels {_short(inp.keep)} of "
            f"{inp.width} of {inp.source}, not whole runs"
        )
    return inp._replace(keep=runs, width=inp.width // rr)


def _linear_param(model: nn.Module, n: fx.Node) -> tuple[str, int, Any, Any] | None:
    """``(weight, dimension of its input features, input, bias)`` of a product node whose
    weight is a 2-d parameter read as it is (``F.linear(x, self.W, b)``, ``x @ self.W.T``, see
    :class:`~gatedprune.gating.channels.ParamLinear`); None for other nodes."""
    parts = linear_operands(n)
    src = weight_source(parts[1]) if parts is not None else None
    if parts is None or src is None or src[0].op != "get_attr":
        return None
    path = str(src[0].target)
    try:
        w = _param_owner(model, path)[2]
    except AttributeError:
        return None
    if w.dim() != 2:
        return None
    return path, (src[2] + int(parts.out_first)) % 2, parts.x, parts.bias


_SCALE_FUNCS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}


def _scale_operands(
    n: fx.Node, slices: dict[str, dict[str, Any]]
) -> tuple[fx.Node, str, dict[str, Any]] | None:
    """``(the other operand, parameter, its slice)`` of a product ``h * gamma`` (``gamma *
    h``, ``torch.mul``, ``h.mul(gamma)``, ``h / gamma``; ``gamma`` possibly shaped to
    broadcast, ``gamma.view(1, -1, 1, 1)``: :func:`~gatedprune.gating.channels.scale_chain`)
    whose parameter ``gamma`` the plan slices as a per-channel factor (``"scale"``); None for
    other nodes."""
    fn = n.op == "call_function" and n.target in _SCALE_FUNCS
    if not (fn or (n.op == "call_method" and n.target in ("mul", "mul_", "div"))):
        return None
    ops: list[Any] = [*n.args[:2]]
    for key in ("input", "other")[len(ops) :]:
        if key in n.kwargs:
            ops.append(n.kwargs[key])
    if len(ops) != 2:
        return None
    div = n.target in (operator.truediv, torch.div, "div")
    for a, c in (ops, ops[::-1])[: 1 if div else 2]:  # gamma / h is not a product by gamma
        src = scale_chain(c)  # gamma, or gamma.view(1, -1, 1, 1), gamma[:, None, None], ...
        if not isinstance(a, fx.Node) or src is None or src[0].op != "get_attr":
            continue
        path = str(src[0].target)  # the parameter, not a view of it
        spec = slices.get(path)
        if spec is not None and spec["kind"] == "scale":
            return a, path, spec
    return None


def _check_bias(b: Any, got: _Channels, slices: dict[str, dict[str, Any]]) -> None:
    """Refuse a bias parameter ``b`` sliced as a ``"vector"`` that keeps other entries than
    the output units it is added to (``got``) keep."""
    attr = bias_attr(b)  # the parameter, as it is or times a number (self.b * lr_mul)
    spec = slices.get(str(attr.target)) if attr is not None else None
    if attr is None or spec is None or spec["kind"] != "vector" or got.dim != "last":
        return
    want = tuple(range(got.width)) if spec.get("out") is None else tuple(spec["out"])
    if want != got.keep:
        raise ValueError(
            f"inconsistent plan: it keeps entries {_short(want)} of bias '{attr.target}', which is "
            f"added to the output units {_short(got.keep)} of {got.source}: a bias must keep "
            "the units its product keeps"
        )


def _flat_nodes(a: Any) -> list[fx.Node]:
    if isinstance(a, fx.Node):
        return [a]
    if isinstance(a, list | tuple):
        return [n for x in a for n in _flat_nodes(x)]
    if isinstance(a, dict):
        return [n for x in a.values() for n in _flat_nodes(x)]
    return []


def _flattens_from_1(n: fx.Node) -> bool:
    """``torch.flatten(x, 1)`` or ``x.flatten(1)`` (all dims after the batch into one)."""
    is_flatten = (n.op == "call_function" and n.target is torch.flatten) or (
        n.op == "call_method" and n.target == "flatten"
    )
    start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
    end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
    return is_flatten and isinstance(start, int) and start == 1 and end in (-1, None)


def _short(keep: tuple[int, ...]) -> str:
    """A kept-channel list for an error message (long ones shortened)."""
    text = str(list(keep))
    return text if len(text) <= 60 else f"{text[:57]}...] ({len(keep)} channels)"


def _within(path: str, scope: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + ".")


def _check_hooks_kept(model: nn.Module, plan: dict[str, Any]) -> None:
    """``ValueError`` naming a module carrying hooks of the user's that the plan slices (its
    hooks would see the sliced tensors) or that lies in a layer the plan prunes inside (an
    encoder layer or attention, rebuilt without them, or a recurrent module)."""
    rebuilt = [*plan.get("transformers", {}), *plan.get("decoders", {}), *plan.get("attention", {})]
    rebuilt += list(plan.get("rnn", {}))
    for name, m in model.named_modules():
        desc = describe_hooks(m)
        if desc is None:
            continue
        spec = plan["slices"].get(name)
        if spec is not None and spec["kind"] not in _PARAM_KINDS:
            raise ValueError(
                f"the plan slices module '{name}' ({type(m).__name__}), which {desc}: the hook "
                "would see sliced tensors (gate_ keeps the channels a hook sees whole; remove "
                "the hook before applying the plan, or register it before gate_)"
            )
        layer = next((r for r in rebuilt if name == r or name.startswith(r + ".")), None)
        if layer is not None:
            raise ValueError(
                f"the plan prunes inside layer '{layer}' (heads, FFN or hidden units), and "
                f"its module '{name}' ({type(m).__name__}) {desc}: the hook would see pruned "
                "tensors, or not run in the rebuilt layer (gate_ does not gate a layer with "
                "such hooks; remove the hook before applying the plan, or register it before "
                "gate_)"
            )


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
    return _apply_plan(model, plan, check_graph=True)


def _apply_plan(model: nn.Module, plan: dict[str, Any], *, check_graph: bool) -> nn.Module:
    """:func:`apply_plan`; without ``check_graph`` the plan's graph nodes and channel groups
    are not checked against the model's trace (``prune`` applies the plan it just made)."""
    _check_plan(plan)
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_plan expects a torch.nn.Module, got {type(model).__name__}")
    if find_model_gating(model) is not None:
        raise ValueError(
            f"apply_plan needs a dense, ungated {type(model).__name__}; this one is gated "
            "(prune it with gatedprune.prune, or apply the plan to a fresh instance)"
        )
    source: dict[str, Any] | None = plan.get("model") if check_graph else None
    if check_graph and "checksum" in plan and json_checksum(plan) != plan["checksum"]:
        raise ValueError(
            "the plan was changed after export_plan wrote it (its checksum does not match its "
            "content): export it again from the gated model (a plan written by hand has no "
            "'checksum')"
        )
    hint = "apply a plan to a fresh dense instance of the model it was exported from"
    if source is not None:
        why = fingerprint_difference(source, model_fingerprint(model, dtypes=False), "plan")
        if why is not None:
            raise ValueError(f"the plan was exported from another model ({why}): {hint}")

    def submodule(name: str, what: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(
                f"the plan {what} module '{name}', which the model does not have"
            ) from e

    # check everything before changing anything: a plan that does not fit leaves the model as is
    claimed: dict[int, str] = {}  # id(module) -> the entry that changes it

    def claim(
        m: nn.Module, name: str, entry: str, *, inside: bool = False, sliced: bool = False
    ) -> None:
        for sub_name, sub in m.named_modules(prefix=name) if inside else [(name, m)]:
            # its stored tensors would be cut (slice_module cuts weight_norm's g and v)
            refuse_computed(sub_name, sub, weight_norm=sliced)
            if id(sub) in claimed:
                raise ValueError(
                    f"the plan changes module {entry}, which {claimed[id(sub)]} already "
                    "changes: expected one entry per module (a duplicated or aliased entry)"
                )
            claimed[id(sub)] = entry

    layers: list[tuple[str, nn.TransformerEncoderLayer, dict[str, Any]]] = []
    for name, spec in plan.get("transformers", {}).items():
        layer = submodule(name, "prunes")
        claim(layer, name, f"'{name}' (transformers, with its submodules)", inside=True)
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
    decoders: list[tuple[str, nn.TransformerDecoderLayer, dict[str, Any]]] = []
    for name, spec in plan.get("decoders", {}).items():
        dec = submodule(name, "prunes")
        claim(dec, name, f"'{name}' (decoders, with its submodules)", inside=True)
        if not isinstance(dec, nn.TransformerDecoderLayer):
            raise ValueError(f"the plan prunes '{name}' as a decoder layer; it is {type(dec)}")
        _check_heads(name, dec.self_attn, list(spec["heads"]))
        _check_heads(f"{name}.multihead_attn", dec.multihead_attn, list(spec["cross_heads"]))
        units, width = list(spec["units"]), dec.linear1.out_features
        if units and max(units) >= width:
            raise ValueError(
                f"the plan keeps FFN unit {max(units)} of '{name}', which has {width}: apply a "
                "plan once, to a fresh dense instance of the model it was exported from"
            )
        decoders.append((name, dec, spec))
    attentions: list[tuple[str, nn.MultiheadAttention, list[int]]] = []
    for name, spec in plan.get("attention", {}).items():
        att = submodule(name, "prunes")
        claim(att, name, f"'{name}' (attention, with its submodules)", inside=True)
        if not isinstance(att, nn.MultiheadAttention):
            raise ValueError(f"the plan prunes '{name}' as attention; it is {type(att)}")
        _check_heads(name, att, list(spec["heads"]))
        attentions.append((name, att, list(spec["heads"])))
    params: list[tuple[str, dict[str, Any]]] = []
    for name, spec in plan["slices"].items():
        if spec["kind"] in _PARAM_KINDS:  # a parameter of a linear map written with it
            owner_path, _, attr = name.rpartition(".")
            with contextlib.suppress(AttributeError):  # a missing one: the error below
                owner = model.get_submodule(owner_path) if owner_path else model
                refuse_computed(owner_path or "<root>", owner, [attr])
            try:
                p = _param_owner(model, name, buffers=spec["kind"] == "heads")[2]
            except AttributeError as e:
                raise ValueError(
                    f"the plan slices parameter '{name}', which the model does not have"
                ) from e
            if id(p) in claimed:
                raise ValueError(
                    f"the plan changes parameter '{name}', which {claimed[id(p)]} already "
                    "changes: expected one entry per parameter (a duplicated or aliased entry)"
                )
            claimed[id(p)] = f"'{name}' (slices)"
            _check_param_slice(name, p, spec)
            params.append((name, spec))
            continue
        m = submodule(name, "slices")
        claim(m, name, f"'{name}' (slices)", sliced=True)
        _check_slice(name, m, spec)
    for name, spec in plan.get("rnn", {}).items():
        m = submodule(name, "prunes")
        claim(m, name, f"'{name}' (rnn)")
        _check_rnn(name, m, spec)
    for name, spec in params:  # a module an entry changes changes its parameters too
        owner = _param_owner(model, name, buffers=spec["kind"] == "heads")[0]
        if id(owner) in claimed:
            raise ValueError(
                f"the plan changes parameter '{name}', whose module {claimed[id(owner)]} "
                "already changes: expected one entry per module or parameter"
            )
    for scope in plan["scopes"]:
        if scope:
            submodule(scope, "rewrites")
    tracer = GateTracer(set(plan["opaque"]))
    for name in plan.get("scaled", []):
        act = submodule(name, "scales the output of")
        claim(act, name, f"'{name}' (scaled)")
        traced_through = bool(name) and not tracer.is_leaf_module(act, name)
        if not name or not (isinstance(act, ACTIVATION_TAILS) or traced_through):
            raise ValueError(
                f"the plan scales the output of module '{name}' ({type(act).__name__}); "
                "expected an activation a residual branch ends in "
                f"({', '.join(t.__name__ for t in ACTIVATION_TAILS)}), or a module of the "
                "model's own code (traced through) it ends in"
            )
    _check_hooks_kept(model, plan)
    switched = prepare_encoders(model)
    as_gated: TracedModel | None = None
    try:
        if source is not None and "graph" in source:  # traced as gate_ traced it
            try:
                as_gated = trace_model(
                    model,
                    dict(plan["opaque"]),
                    warn=False,
                    inputs=plan.get("inputs", 1),
                    examples=_examples(model, plan),
                )
            except ValueError:  # untraceable: only its structure can be compared
                as_gated = None
            if as_gated is not None and graph_fingerprint(as_gated.graph) != source["graph"]:
                raise ValueError(
                    "the plan was exported from a model whose forward code differs from this "
                    "model's (the same modules and tensors, another traced graph: an "
                    f"activation, a head count or another constant in forward): {hint}"
                )
        checked = _check_graph(model, plan) if check_graph else None
        if check_graph:
            _check_head_slices(model, plan, _dry_run_sizes(checked, plan))
        elif plan["scopes"] and not layers and not attentions:
            # traced before the slicing below, as gate_ traced it: the example inputs run
            # through sliced layers would fail, and the branches they decide stay unknown
            checked = as_gated or trace_model(
                model,
                dict(plan["opaque"]),
                warn=False,
                inputs=plan.get("inputs", 1),
                examples=_examples(model, plan),
            )
    except BaseException:
        for m, cls in switched:  # leave the model as it was
            m.__class__ = cls
        raise
    for name, layer, spec in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build_pruned_layer(layer, spec))
    for name, dec, spec in decoders:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build_pruned_decoder_layer(dec, spec))
    for name, att, heads in attentions:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build_pruned_attention(att, heads))
    sliced = [
        (model.get_submodule(name), spec)
        for name, spec in plan["slices"].items()
        if spec["kind"] not in _PARAM_KINDS
    ]
    apply_rnn_plan(model, plan.get("rnn", {}))
    for m, spec in sliced:
        slice_module(m, spec["kind"], spec["in"], spec["out"])
    for name, spec in params:
        slice_param(model, name, spec["kind"], spec["in"], spec["out"], spec.get("dim"))
    scopes: list[str] = list(plan["scopes"])
    if not scopes:
        if plan.get("sizes"):
            name = next(iter(plan["sizes"]))
            raise ValueError(
                f"malformed plan: 'sizes' resizes node {name!r}, which no entry of 'scopes' "
                "[] contains (it would keep its old size)"
            )
        return _scale_outputs(model, plan.get("scaled", []))
    opaque: dict[str, str] = dict(plan["opaque"])
    # slicing leaves the graph as it was; rebuilt encoder layers and attention do not
    same = checked is not None and not layers and not attentions
    n_inputs: int = plan.get("inputs", 1)  # positional inputs gate_ was given
    traced = (
        checked
        if same and checked is not None
        else trace_model(
            model, opaque, warn=False, inputs=n_inputs, examples=_examples(model, plan)
        )
    )
    cut = {str(k): int(v) for k, v in plan["cut"].items()}
    erase = set(plan.get("erase", []))
    bypass = set(plan.get("bypass", []))
    known = {n.name for n in traced.graph.nodes}
    edge_nodes = [n for e in plan.get("edges", []) for n in (e["src"], e["dst"], *e["users"])]
    sizes: dict[str, list[list[Any]]] = plan.get("sizes", {})
    missing = [n for n in [*cut, *erase, *bypass, *edge_nodes, *sizes] if n not in known]
    if missing:
        raise ValueError(f"the plan names graph nodes the model does not have: {missing[:5]}")
    node_owner = node_owners(traced.graph)  # (the root graph is not changed below)
    owners = {n.name: owner for n, owner in node_owner.items()}
    for name in sizes:
        if not any(_within(owners[name], sc) for sc in scopes):
            raise ValueError(
                f"malformed plan: 'sizes' resizes node {name!r} of module '{owners[name]}', "
                f"which no entry of 'scopes' {scopes} contains (it would keep its old size)"
            )
    aliases = _Aliases(traced, cut, plan.get("edges", []))
    written = aliases.written_cuts(bypass)
    left_operands = {
        a.name
        for n in traced.graph.nodes
        if n.op in ("call_function", "call_method")
        and (n.target in _AUGMENTABLE or n.target in _AUGMENTABLE_METHODS)
        and n.args
        and isinstance(a := n.args[0], fx.Node)
    }
    result = model
    # a scaled module traced through stays a call of its module in rewritten code (as a
    # hooked one does), so that its GateScale runs: a no-op hook while rewriting
    kept = [
        model.get_submodule(name).register_forward_hook(_keep_call)
        for name in plan.get("scaled", [])
        if not isinstance(model.get_submodule(name), ACTIVATION_TAILS)
    ]
    try:
        result = _rewrite_scopes(
            model,
            traced,
            scopes,
            opaque,
            cut,
            erase,
            bypass,
            plan,
            written,
            left_operands,
            aliases,
            sizes,
            node_owner,
            owners,
            n_inputs,
        )
    finally:
        for handle in kept:
            handle.remove()
        for m in result.modules():  # (copied onto a module rewritten around its own code)
            for key in [k for k, h in m._forward_hooks.items() if h is _keep_call]:
                del m._forward_hooks[key]
    return _scale_outputs(result, plan.get("scaled", []))


def _keep_call(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
    """A forward hook doing nothing: its module stays a call of the module when the code
    around it is rewritten (see ``_apply_plan``)."""


def _rewrite_scopes(
    model: nn.Module,
    traced: TracedModel,
    scopes: list[str],
    opaque: dict[str, str],
    cut: dict[str, int],
    erase: set[str],
    bypass: set[str],
    plan: dict[str, Any],
    written: set[str],
    left_operands: set[str],
    aliases: _Aliases,
    sizes: dict[str, list[list[Any]]],
    node_owner: Mapping[fx.Node, str],
    owners: dict[str, str],
    n_inputs: int,
) -> nn.Module:
    """For ``_apply_plan``: rewrite the forward of each module of ``scopes`` (outermost), and
    return the model (a new module if the root was rewritten)."""
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
            written,
            left_operands,
            aliases,
            {k: v for k, v in sizes.items() if k in in_scope},
            plan.get("bound", {}).get(scope),
            plan.get("bound", {}),
            node_owner,
            n_inputs,
        )
        if scope == "":
            result = new
        else:
            parent_name, _, child = scope.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    return result


def scaled_path(name: str, names: list[str]) -> str:
    """Where module ``name`` of the model is once each module of ``names`` is wrapped in a
    :class:`GateScale` (inside a wrapped one: under its ``module``).

    >>> scaled_path("b.inner.act", ["b.inner.act", "b.inner"])
    'b.inner.module.act'
    """
    wrapped = set(names)
    parts = name.split(".")
    out: list[str] = []
    for i, part in enumerate(parts):
        out.append(part)
        if i < len(parts) - 1 and ".".join(parts[: i + 1]) in wrapped:
            out.append("module")
    return ".".join(out)


def _scale_outputs(model: nn.Module, names: list[str]) -> nn.Module:
    """``model`` with each module of ``names`` (an activation a residual branch ends in, or a
    module of the model's own it ends in) replaced by a :class:`GateScale` of it (its scale 1
    until ``prune`` sets the gate value, or ``load_state_dict`` the pruned model's); inner ones
    first, so that an outer one wraps them (see :func:`scaled_path`)."""
    for name in sorted(names, key=lambda v: -v.count(".")):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = model.get_submodule(name)
        setattr(parent, child, GateScale(module).train(module.training))
    return model
