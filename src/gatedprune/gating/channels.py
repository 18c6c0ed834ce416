"""Channel groups: which output channels of which modules must be pruned together.

Every Linear/Conv output is a new *space* of channels; each channel is an *atom*. Walking the fx
graph, each tensor gets labels: one dimension (the channel dimension) and, for each index along
it, the atom it carries. Element-wise ops and per-channel modules keep labels, ``flatten``
repeats them, ``cat`` concatenates them, and ``x + y`` unifies the atoms of both operands
(union-find): coupled channels become one atom. A grouped convolution (or transposed
convolution) unifies the atoms at one position of each of its groups, on its input and its
output (it must stay a grouped convolution: every group keeps the same positions). A *group*
is a set of spaces connected through unified atoms; it gets one gate entry per distinct atom.

A group is gated only if removing any of its channels is exact. It is left ungated ("pinned")
when its channels reach an op that is not zero-preserving or that mixes channels in a way we do
not slice: LayerNorm or ``GroupNorm(1, C)`` over them (normalisation statistics would change),
sigmoid or softmax, a non-affine BatchNorm/InstanceNorm/GroupNorm, an add of an ungated tensor,
an unknown op, or the model output. A GroupNorm's run of ``C / num_groups`` channels (normalised
together) is one atom: it is removed whole, with one gate value.
One exception: an *excitation* ``s = sigmoid(z)`` (or hardsigmoid) read only, through reshapes,
by a product ``y * s`` with ``y`` labelled on the same channels (squeeze-and-excitation): the
channels of ``z`` and ``y`` are unified, and the product is zero where ``y`` is; so is a
*factor*, a number added to labelled channels (``1.0 + t``) and tanh, sigmoid, erf, scales and
positive integer powers of it (gelu_new's ``0.5 * x * (1.0 + tanh(...))``). Another:
multi-query attention (one key/value head read by every query head), whose closed query head
outputs the mean of v, not zero: its query heads are gated after it, on the input of the Linear
reading its output (a forward pre-hook, folded into that Linear's weight columns), and its
queries, left ungated, carry such nonzero labels.

Gates sit on every *source* of the group: the output of each Linear/Conv producing its channels,
or of the BatchNorm/InstanceNorm/GroupNorm/depthwise conv that follows (the conv's own output is
then not gated, the gate folds into the norm's affine parameters). A linear map written with a
parameter of the model (``F.linear(h, self.W, self.b)``, ``h @ self.W + self.b``, see
:class:`ParamLinear`) is read like an ``nn.Linear``: its input features are consumed, its output
units are a new space whose gate scales the weight's output units and the bias; so is a
convolution written with parameters (``F.conv1d(h, self.weight, self.bias, ...)``, what an
``nn.Conv1d`` subclass's own ``forward`` calling ``super().forward`` traces to), on its channel
dimension 1. Every
element-wise op between sources and consumers maps 0 to 0, so a closed channel is exactly zero
wherever it is consumed.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..base import (
    BATCH_NORMS,
    INSTANCE_NORMS,
    PADDING_LAYERS,
    TRANSPOSED_CONVS,
    computed_weight,
    weight_norm_layer,
)
from ..functional_costs import einsum_subscripts
from ..hooks import describe_hooks, only_weight_hooks
from .graph import RunRecord, ancestors
from .rnn import consumer_ok, item_index, state_item

__all__ = [
    "EXCITE_FUNCS",
    "EXCITE_METHODS",
    "EXCITE_MODULES",
    "RESHAPE_FUNCS",
    "RESHAPE_METHODS",
    "ChannelAnalysis",
    "ChannelGroup",
    "HeadBias",
    "Labels",
    "LinearOperands",
    "ParamLinear",
    "ParamScale",
    "analyse_channels",
    "bias_attr",
    "linear_operands",
    "scale_chain",
    "transposed_source",
    "weight_source",
    "zero_literal",
]


@dataclass
class Labels:
    """Channel labels of one tensor: dimension ``dim`` carries ``atoms[i]`` at index ``i``."""

    dim: int
    atoms: np.ndarray  # (shape[dim],) int64


@dataclass
class ChannelGroup:
    """Channels pruned together; ``size`` gate entries (one per distinct atom)."""

    index: int
    producers: list[str]
    size: int
    pinned: str | None = None
    unfoldable: str | None = None  # a path that does not commute with a per-channel scale
    norms: list[str] = field(default_factory=list)  # GroupNorms normalising runs of them
    # each producer's channels (its output width): ``size`` when each channel is an entry, more
    # when a view split them and entries stand for several (784 = 16 x 7 x 7, 7 entries)
    widths: dict[str, int] = field(default_factory=dict)


@dataclass
class ParamLinear:
    """A linear map written with a 2-d parameter of the model, read only there: ``F.linear(x,
    W[, b])``, ``x @ W`` (``matmul``, ``mm``; ``W`` possibly through ``.T`` / ``.t()`` /
    ``.transpose(0, 1)`` / ``.mT``), with a 1-d parameter bias of the output size (F.linear's,
    or added right after: ``x @ W + b``). Its input features (the contracted last dimension
    of ``x``) are sliced like an ``nn.Linear``'s; its output units are a space of their own,
    gated by scaling ``W``'s output units and ``b``. Also a convolution ``F.conv1d/2d/3d(x, W,
    b, stride, padding, dilation, groups=1)`` with ``W`` ``(out, in, *kernel)`` a parameter:
    its channels are dimension 1 of ``x`` and of its output, ``W`` is sliced like an
    ``nn.Conv*d``'s weight (``taps``: the kernel's positions)."""

    node: str  # the product's graph node
    weight: str  # the weight parameter's qualified name
    in_dim: int  # the weight's dimension holding the input features (the other: the outputs)
    n_in: int
    n_out: int
    bias: str | None = None  # the bias parameter's qualified name
    bias_flops: bool = False  # F.linear's bias: 1 FLOP per output element, as cost counts it
    in_atoms: np.ndarray | None = None  # atoms of the input features (None: unlabelled)
    out_atoms: np.ndarray | None = None  # the output units' space (None: not a producer)
    bias_node: str | None = None  # the add (or subtraction) of a bias added after the product
    taps: int = 1  # a convolution's kernel positions per input channel (1: a linear map)
    conv: bool = False  # a convolution's weight (out, in, *kernel), channels on dimension 1


@dataclass
class ParamScale:
    """A parameter of the model multiplying gated channels, one entry per channel (layer
    scale: ``self.gamma * h``, ``h * self.s``, ``torch.mul(h, self.gamma)``, ``h.mul(self.g)``,
    or dividing them, ``h / self.s``; also shaped to broadcast by a :func:`scale_chain`,
    ``x.mul_(self.gamma.view(1, -1, 1, 1))``, ``self.gamma[:, None, None] * x``), read only
    there: zero-preserving and commuting with a per-channel gate, so the product carries the
    channels' labels and the parameter is sliced with the kept channels along ``dim`` (its
    only dimension of size > 1)."""

    node: str  # the product's graph node
    path: str  # the parameter's qualified name
    dim: int  # the parameter's dimension holding the channels
    n: int  # the number of channels
    atoms: np.ndarray  # the channels' atoms


@dataclass
class HeadBias:
    """A parameter or buffer of the model giving attention scores one value per head, added
    to them or multiplying them (Swin's relative position bias table ``((2Wh-1)(2Ww-1), H)``
    looked up by an index buffer and permuted to ``(H, N, N)``, ALiBi's slopes ``(H,)`` or
    ``(1, H, 1, 1)`` times a distance matrix, T5's ``nn.Embedding(buckets, H)`` weight,
    Swin-V2's ``logit_scale`` ``(H, 1, 1)``), read only there, through ops that keep each head's
    entries apart: sliced along ``dim`` to the kept heads."""

    node: str  # the add (or product) with the scores
    path: str  # the parameter's or buffer's qualified name (an embedding's: its ".weight")
    dim: int  # its dimension holding the heads
    n: int  # the number of heads
    atoms: np.ndarray  # the heads' atoms
    param: bool  # a parameter (else a buffer)


def _size_arg(n: fx.Node, e: int) -> tuple[bool, Any]:
    """``(True, size)``: the size ``view``/``reshape`` node ``n`` gives output dimension ``e``
    (negative: from the end) as the code writes it (an int, or the graph node computing it),
    also in a shape built as ``x.size()[:-1] + (h, d)`` (HF-BERT); ``(False, None)`` for
    reshapes without sizes (``flatten``, ``squeeze``) or a shape given whole by a node.

    >>> g = fx.Graph()
    >>> x = g.placeholder("x")
    >>> [_size_arg(g.call_method("view", (x, -1, 4)), e) for e in (-2, -1)]
    [(True, -1), (True, 4)]
    """
    sizes: Any = None
    unflat = _unflatten_args(n)
    if unflat is not None:  # unflatten(dim, sizes): the sizes of the block dim becomes
        dim, sizes = unflat
        if not isinstance(dim, int) or dim >= 0 or not isinstance(sizes, list | tuple):
            return False, None
        idx = len(sizes) - 1 + e - dim  # the block ends at output dimension dim (from the end)
        return (True, sizes[idx]) if 0 <= idx < len(sizes) else (False, None)
    if n.op == "call_method" and n.target in ("view", "reshape", "expand"):
        sizes = n.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], list | tuple | fx.Node):
            sizes = sizes[0]
    elif n.op == "call_function" and n.target is torch.reshape:
        sizes = n.args[1] if len(n.args) > 1 else n.kwargs.get("shape")
    tail = _shape_tail(sizes)
    if tail is not None:  # only the literal tail of head + (h, d) can be addressed
        return (True, tail[e]) if -len(tail) <= e < 0 else (False, None)
    if not isinstance(sizes, list | tuple) or not -len(sizes) <= e < 0:
        return False, None
    return True, sizes[e]


_WHOLE_SHAPE = (
    "gives its shape as one value whose size of the pruned dimension cannot be rewritten "
    "(write the sizes out, view(b, t, h, d), or build it as x.size()[:-1] + (h, d))"
)


def _has_sizes(n: fx.Node) -> bool:
    """Whether reshape node ``n`` takes sizes (``view``/``reshape``), unlike ``flatten`` (or
    ``unflatten``, whose other dimensions keep their size)."""
    return (n.op == "call_method" and n.target in ("view", "reshape")) or (
        n.op == "call_function" and n.target is torch.reshape
    )


def _unflatten_args(n: fx.Node) -> tuple[Any, Any] | None:
    """``(dim, sizes)`` of an ``x.unflatten(dim, sizes)`` / ``torch.unflatten`` node, else
    None."""
    if not (
        (n.op == "call_method" and n.target == "unflatten")
        or (n.op == "call_function" and n.target is torch.unflatten)
    ):
        return None
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    sizes = n.args[2] if len(n.args) > 2 else n.kwargs.get("sizes")
    return dim, sizes


def _shape_tail(sizes: Any) -> tuple[Any, ...] | None:
    """The literal tuple ``(h, d)`` of a shape node ``head + (h, d)``, else None."""
    if (
        isinstance(sizes, fx.Node)
        and sizes.op == "call_function"
        and sizes.target is operator.add
        and len(sizes.args) == 2
        and isinstance(sizes.args[1], tuple)
    ):
        return sizes.args[1]
    return None


@dataclass
class ChannelAnalysis:
    """Result of the label propagation over the whole graph."""

    labels: dict[fx.Node, Labels | None]
    module_in: dict[fx.Node, Labels | None]  # labels of the contracted input dim (Linear/Conv)
    atom_group: np.ndarray  # atom -> group index
    atom_gidx: np.ndarray  # atom -> gate index within its group
    groups: list[ChannelGroup]
    sources: dict[str, list[fx.Node]]  # module name -> its calls that output a gated source
    kinds: dict[str, str] = field(default_factory=dict)  # name -> module_kind (linear, ...)
    module_atoms: dict[str, np.ndarray] = field(default_factory=dict)  # output channel atoms
    module_in_atoms: dict[str, np.ndarray] = field(default_factory=dict)  # input (linear/conv)
    rnn_in_atoms: dict[str, np.ndarray] = field(default_factory=dict)  # recurrent module input
    rnn_outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # per (layer, dir)
    nonzero: dict[fx.Node, Labels] = field(default_factory=dict)  # excitations and reshapes
    # node -> sizes its code gives pruned dimensions: (output dim or "split_size", atoms whose
    # kept count times the factor is the new size)
    sizes: dict[str, list[tuple[int | str, np.ndarray | None, int]]] = field(default_factory=dict)
    head_groups: set[int] = field(default_factory=set)  # groups of attention heads
    param_linears: list[ParamLinear] = field(default_factory=list)
    param_whole: dict[str, str] = field(default_factory=dict)  # parameter -> why left whole
    param_scales: list[ParamScale] = field(default_factory=list)  # layer scales, sliced
    head_biases: list[HeadBias] = field(default_factory=list)  # per-head score terms, sliced
    # Linear -> the input features it gates (query heads of multi-query attention)
    input_sites: dict[str, np.ndarray] = field(default_factory=dict)
    # BatchNorms (GroupNorms) whose own forward calls F.batch_norm (F.group_norm) on their
    # parameters (timm's BatchNormAct2d, GroupNormAct; see ``_Propagator.functional_norm``):
    # gated by scaling their weight and bias (the norm's output, before the activation that
    # follows in that forward)
    fused_norms: dict[str, str] = field(default_factory=dict)  # node name -> the norm


_ZERO_ACTS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.ELU,
    nn.Hardswish,
    nn.Mish,
    nn.Hardtanh,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
)
# pooling modules and the number of trailing (spatial) dimensions each pools over
_POOL_MODULES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.AvgPool1d: 1,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveMaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.AvgPool2d: 2,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveMaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool3d: 3,
}
_POOLS: tuple[type[nn.Module], ...] = tuple(_POOL_MODULES)
_BN = BATCH_NORMS
_IN = INSTANCE_NORMS
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CONVT = TRANSPOSED_CONVS
_ANY_CONV = (*_CONV, *_CONVT)
# a convolution or transposed convolution, 1-d, 2-d or 3-d
_AnyConv = (
    nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
)

_PASS_FUNCS: set[Callable[..., Any]] = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.elu,
    F.hardswish,
    F.mish,
    F.hardtanh,
    torch.tanh,
    F.tanh,
    torch.erf,
    torch.special.erf,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    operator.neg,
    torch.neg,
}
_PASS_METHODS = {
    "relu",
    "relu_",
    "tanh",
    "tanh_",
    "erf",
    "neg",
    "contiguous",
    "clone",
    "float",
    "detach",
}
# powers: ``x ** p`` maps 0 to 0 when ``p`` is a literal number > 0 (0 ** 0 = 1, 0 ** -1 = inf)
_POW_FUNCS: set[Callable[..., Any]] = {torch.pow, operator.pow}
_POW_METHODS = {"pow"}
# element-wise functions that are finite wherever their input is: of a nonzero label (a
# value that is an element-wise function of the same channels, not zero at closed ones), still
# one, so a product with the channels keeps their zeros (gelu_new's ``1.0 + tanh(...)``)
_BOUNDED_FUNCS: set[Callable[..., Any]] = {
    torch.tanh,
    F.tanh,
    torch.sigmoid,
    F.sigmoid,
    F.hardsigmoid,
    torch.erf,
    torch.special.erf,
}
_BOUNDED_METHODS = {"tanh", "sigmoid", "erf"}
# a number added to (subtracted from) labelled channels: nonzero labels (``1.0 + t``)
_OFFSET_FUNCS: set[Callable[..., Any]] = {operator.add, operator.sub, torch.add, torch.sub}
_OFFSET_METHODS = {"add", "sub"}
# pooling functions and the number of trailing dimensions each pools over
_POOL_FUNCS: dict[Callable[..., Any], int] = {
    F.avg_pool1d: 1,
    F.max_pool1d: 1,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_max_pool1d: 1,
    F.avg_pool2d: 2,
    F.max_pool2d: 2,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_max_pool2d: 2,
    F.avg_pool3d: 3,
    F.max_pool3d: 3,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool3d: 3,
}
# what fx records for a max pool function called with return_indices=True: (values, indices)
_POOL_INDEX_FUNCS: dict[Callable[..., Any], int] = {
    F.max_pool1d_with_indices: 1,
    F.max_pool2d_with_indices: 2,
    F.max_pool3d_with_indices: 3,
    F.adaptive_max_pool1d_with_indices: 1,
    F.adaptive_max_pool2d_with_indices: 2,
    F.adaptive_max_pool3d_with_indices: 3,
}
_RESHAPE_FUNCS: set[Callable[..., Any]] = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.unflatten,
}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten"}
# squeeze-and-excitation: sigmoid(z) of labelled channels is not zero at closed ones (0.5),
# but multiplying a labelled tensor of the same channels by it keeps that tensor's zeros
_EXCITE_FUNCS: set[Callable[..., Any]] = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_EXCITE_METHODS = {"sigmoid"}
_EXCITE_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
EXCITE_FUNCS, EXCITE_METHODS, EXCITE_MODULES = _EXCITE_FUNCS, _EXCITE_METHODS, _EXCITE_MODULES
RESHAPE_FUNCS, RESHAPE_METHODS = _RESHAPE_FUNCS, _RESHAPE_METHODS
_ADD_FUNCS: set[Callable[..., Any]] = {operator.add, operator.iadd, operator.sub, torch.add}
# a bias added to (or subtracted from) the output units of a linear map (see param_bias)
_MUL_FUNCS: set[Callable[..., Any]] = {operator.mul, operator.imul, torch.mul}
_DIV_FUNCS: set[Callable[..., Any]] = {operator.truediv, torch.div}
# normalisations over trailing dimensions (normalized_shape); of heads: over the head size
_NORM_FUNCS: set[Callable[..., Any]] = {F.layer_norm, F.rms_norm, torch.layer_norm, torch.rms_norm}
# convolutions written with parameters (F.conv1d is torch.conv1d): their spatial dimensions
_CONV_FUNCS: dict[Callable[..., Any], int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_MM: tuple[Callable[..., Any], ...] = (torch.bmm, torch.mm)  # matmul of 3-d / 2-d operands
# keyword arguments a rule reads (others holding labelled tensors are pinned)
_KEYWORDS_READ: dict[Any, tuple[str, ...]] = {
    F.scaled_dot_product_attention: ("query", "key", "value", "attn_mask"),
    F.linear: ("input", "weight", "bias"),  # every form either handled or pinned whole
    torch.addmm: ("input", "mat1", "mat2", "beta", "alpha"),  # the same
}
_META_FUNCS: set[Callable[..., Any]] = {builtins.getattr, builtins.len}
_META_METHODS = {"size", "dim", "numel"}
# copies and reshapes a convolution's input may be read through (input_param)
_COPY_METHODS = {"view", "reshape", "repeat", "expand", "tile", "contiguous", "clone", "flatten"}
_SHUFFLE_KEYS = (torch.pixel_shuffle, torch.pixel_unshuffle)  # F.pixel_shuffle is torch's
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCS: set[Callable[..., Any]] = {torch.mean, torch.sum, torch.amax, torch.amin}
_CAT_FUNCS: set[Callable[..., Any]] = {torch.cat, torch.concat}

ADD_TARGETS = _ADD_FUNCS
ADD_METHODS = {"add", "add_"}
HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
)
HOMOGENEOUS_FUNCS: set[Callable[..., Any]] = {
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
}
# pass-through ops commuting with a per-channel scale g >= 0 (a gate folded into consumers)
_SCALE_FUNCS: set[Callable[..., Any]] = {*HOMOGENEOUS_FUNCS, operator.neg, torch.neg}
_SCALE_METHODS = {"relu", "relu_", "neg", "contiguous", "clone", "float", "detach"}


# element-wise ops of one tensor a per-head score term may go through (see head_source)
_HEAD_UNARY_METHODS = {
    "contiguous",
    "clone",
    "float",
    "detach",
    "exp",
    "sigmoid",
    "neg",
    "abs",
    "clamp",
    "clamp_max",
    "clamp_min",
    "to",
    "type_as",
    "log",
    "softplus",
}
_HEAD_UNARY_FUNCS: set[Callable[..., Any]] = {
    torch.exp,
    torch.sigmoid,
    torch.neg,
    operator.neg,
    torch.abs,
    torch.clamp,
    torch.log,
    F.softplus,
}

# attributes of a tensor that pruning its channels leaves unchanged (t.dtype, t.device, ...)
_META_ATTRS = {"dtype", "device", "ndim", "is_cuda", "layout"}


def _finite_number(v: object) -> bool:
    """Whether ``v`` is a finite Python int or float (not a bool, not a tensor).

    >>> _finite_number(3.0), _finite_number(True), _finite_number(float("inf"))
    (True, False, False)
    """
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _meta_read(u: fx.Node) -> bool:
    """Whether ``u`` reads only an attribute that pruning channels leaves unchanged: the
    ``dtype``, ``device``, ``ndim`` or ``dim()`` of a tensor (``softmax(w, dtype=torch.float32)
    .to(q.dtype)``), not its values nor its sizes.

    >>> g = fx.Graph()
    >>> q = g.placeholder("q")
    >>> _meta_read(g.call_function(getattr, (q, "dtype"))), _meta_read(g.call_method("size", (q,)))
    (True, False)
    """
    if u.op == "call_function" and u.target is builtins.getattr and not u.kwargs:
        return len(u.args) == 2 and u.args[1] in _META_ATTRS
    return u.op == "call_method" and u.target == "dim" and len(u.args) == 1 and not u.kwargs


def _type_cast(n: fx.Node) -> bool:
    """Whether ``n`` is ``t.type(dtype)`` (a cast, as ``t.to(dtype)``; ``t.type()`` without
    one returns the type's name, a string).

    >>> g = fx.Graph()
    >>> w = g.placeholder("w")
    >>> _type_cast(g.call_method("type", (w, torch.float64)))
    True
    >>> _type_cast(g.call_method("type", (w,)))
    False
    """
    if n.op != "call_method" or n.target != "type":
        return False
    return len(n.args) > 1 or n.kwargs.get("dtype") is not None


def _kwargs_text(n: fx.Node) -> str:
    """The keyword arguments of ``n`` as code reads them (``alpha=2.0``).

    >>> g = fx.Graph()
    >>> _kwargs_text(g.call_function(torch.sub, (g.placeholder("y"), 1), {"alpha": 2.0}))
    'alpha=2.0'
    """
    return ", ".join(f"{k}={v!r}" for k, v in n.kwargs.items())


def _size_read(u: fx.Node) -> bool:
    """Whether ``u`` reads the sizes of a tensor: ``t.shape``, ``t.size()`` or ``t.size(d)``.

    >>> g = fx.Graph()
    >>> k = g.placeholder("k")
    >>> _size_read(g.call_function(getattr, (k, "shape"))), _size_read(g.call_method("dim", (k,)))
    (True, False)
    """
    if u.op == "call_function" and u.target is builtins.getattr:
        return u.args[1:] == ("shape",)
    return u.op == "call_method" and u.target == "size"


def _hardtanh_zero(lo: object, hi: object) -> bool:
    """Whether ``hardtanh(0, lo, hi) = clamp(0, lo, hi)`` is 0 (bounds must be plain numbers)."""
    num = (int, float)
    if isinstance(lo, bool) or isinstance(hi, bool):
        return False
    return isinstance(lo, num) and isinstance(hi, num) and lo <= 0.0 <= hi


def _pool_rank(op: object) -> int:
    """Number of trailing (spatial) dimensions a pooling function or module pools over.

    >>> _pool_rank(nn.MaxPool3d(2)), _pool_rank(F.adaptive_avg_pool1d)
    (3, 1)
    """
    if isinstance(op, nn.Module):
        for cls, rank in _POOL_MODULES.items():
            if isinstance(op, cls):
                return rank
    else:
        for table in (_POOL_FUNCS, _POOL_INDEX_FUNCS):
            for f, rank in table.items():
                if op is f:
                    return rank
    raise TypeError(f"expected a pooling module or function, got {op!r}")


def _returns_indices(op: object) -> bool:
    """Whether a pooling module or function returns ``(values, indices)``."""
    if isinstance(op, nn.Module):
        return bool(getattr(op, "return_indices", False))
    return any(op is f for f in _POOL_INDEX_FUNCS)


def module_kind(m: nn.Module) -> str | None:
    """How a module's channels are sliced: linear, conv, dw (depthwise conv), gconv (grouped
    conv, ``1 < groups < in_channels``), convt, dwt, gconvt (the same for transposed convs),
    bn, in (affine InstanceNorm), gn (affine GroupNorm), embedding (``nn.Embedding`` and
    ``nn.EmbeddingBag``: the columns of its weight are its output channels), or None.

    >>> module_kind(nn.Conv1d(8, 8, 3, groups=2)), module_kind(nn.Conv1d(8, 16, 3, groups=8))
    ('gconv', 'dw')
    >>> convt = nn.ConvTranspose2d
    >>> module_kind(convt(8, 4, 2, groups=2)), module_kind(convt(8, 16, 2, groups=8))
    ('gconvt', 'dwt')
    >>> module_kind(nn.GroupNorm(2, 8)), module_kind(nn.InstanceNorm1d(8, affine=True))
    ('gn', 'in')
    >>> module_kind(nn.Embedding(10, 4)), module_kind(nn.EmbeddingBag(10, 4))
    ('embedding', 'embedding')
    """
    if computed_weight(m) and not weight_norm_layer(m):  # weight_norm's g and v: sliced
        return None
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, _EMBEDDINGS):
        return "embedding"
    if isinstance(m, _ANY_CONV):
        t = "t" if isinstance(m, _CONVT) else ""
        if m.groups == 1:
            return "conv" + t
        if m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
            return "dw" + t
        return "gconv" + t
    if isinstance(m, _BN):
        return "bn" if m.affine else None
    if isinstance(m, _IN):
        return "in" if m.affine else None
    if isinstance(m, nn.GroupNorm):
        return "gn" if m.affine else None
    return None


def _computed_why(name: str, m: nn.Module, *, output: bool = False) -> str:
    """Why layer ``m`` (called ``name``), whose weight may be computed when it runs, is not
    pruned (``output``: said of its own output channels): a parametrization, or the user's
    forward pre-hook, named.

    >>> lin = nn.Linear(2, 2)
    >>> _ = lin.register_forward_pre_hook(lambda mod, args: None)
    >>> _computed_why("fc", lin).split(" (")[:2]
    ['fc', 'Linear) carries a forward pre-hook <lambda>']
    """
    desc = describe_hooks(m)
    if desc is not None and not parametrize.is_parametrized(m) and not only_weight_hooks(m):
        return f"{name} ({type(m).__name__}) {desc}"
    what = "is a layer gate_ does not prune: it computes" if output else "computes"
    return (
        f"{name} ({type(m).__name__}) {what} its weight when it runs (a parametrization such "
        "as weight_norm, or a forward pre-hook)"
    )


def _flat_nodes(a: Any) -> Iterator[fx.Node]:
    if isinstance(a, fx.Node):
        yield a
    elif isinstance(a, list | tuple):
        for x in a:
            yield from _flat_nodes(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _flat_nodes(x)


def _int(v: object) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise TypeError(f"expected an int dimension, got {v!r}")


def zero_literal(v: object) -> bool:
    """Whether ``v`` is the number 0 written in the code (an int or float, not a bool or a
    tensor): adding or subtracting it (``id_out = 0; ... dense + one + id_out``, a sum
    started at ``skip = 0``) leaves every value as it is, or negates it.

    >>> zero_literal(0), zero_literal(0.0), zero_literal(1), zero_literal(False)
    (True, True, False, False)
    """
    return isinstance(v, int | float) and not isinstance(v, bool) and v == 0


def _literal_int(v: object) -> bool:
    """Whether ``v`` is an int written in the code (a traced constant), not a bool or a node.

    >>> _literal_int(8), _literal_int(True), _literal_int(8.0)
    (True, False, False)
    """
    return isinstance(v, int) and not isinstance(v, bool)


def _whole_slice(it: object, width: int) -> bool:
    """Whether index ``it`` of a dimension of ``width`` is a slice written to keep all of it:
    ``[:n]`` / ``[0:n]`` / ``[0:n:1]`` with a literal ``n >= width`` (GhostNet's
    ``torch.cat([x1, x2], 1)[:, : self.oup]`` with ``oup`` the concatenated width). Python
    clamps slices, so after pruning it still keeps every channel.

    >>> _whole_slice(slice(None, 12), 12), _whole_slice(slice(0, 16, 1), 12)
    (True, True)
    >>> _whole_slice(slice(None, 11), 12), _whole_slice(slice(1, None), 12)
    (False, False)
    """
    if not isinstance(it, slice):
        return False
    start_ok = it.start is None or (_literal_int(it.start) and it.start == 0)
    step_ok = it.step is None or (_literal_int(it.step) and it.step == 1)
    stop_ok = it.stop is None or (_literal_int(it.stop) and cast(int, it.stop) >= width)
    return start_ok and step_ok and stop_ok


def _repeat_sizes(n: fx.Node) -> tuple[Any, ...] | None:
    """The repeat counts of ``t.repeat(*sizes)`` / ``t.tile(dims)`` node ``n`` (ints or graph
    nodes) as written (``tile`` pads them on the left with 1s to the input's dimensions);
    None if they are not given positionally.

    >>> g = fx.symbolic_trace(lambda x: x.repeat(1, 1, 4) + x.tile((2,)))
    >>> [_repeat_sizes(n) for n in g.graph.nodes if n.target in ("repeat", "tile")]
    [(1, 1, 4), (2,)]
    """
    if n.kwargs or len(n.args) < 2:
        return None
    sizes = n.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
        sizes = tuple(sizes[0])
    return tuple(sizes)


def _rewritable(size: Any) -> bool:
    """Whether the code's size ``size`` can be rewritten to a kept count: an int other than
    -1, or a graph node computing it."""
    if isinstance(size, bool):
        return False
    return isinstance(size, fx.Node) or (isinstance(size, int) and size != -1)


def _prod(xs: Any) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


_MATMUL_FUNCS: set[Callable[..., Any]] = {operator.matmul, torch.matmul, torch.mm}
_MATMUL_METHODS = {"matmul", "mm"}


class LinearOperands(NamedTuple):
    """The operands of a product node read as a linear map ``x W (+ b)`` (see
    :func:`linear_operands`)."""

    x: Any  # the input (its last dimension is contracted)
    weight: Any
    bias: Any  # the bias the op itself adds (F.linear's, addmm's input), else None
    out_first: bool  # the weight is stored (out, in), as F.linear reads it; else (in, out)
    fused: bool  # the op adds the bias itself (F.linear, addmm): 1 FLOP per output element,
    # and no other rule reads the node


def _scalar(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _addmm_operands(n: fx.Node, method: bool) -> LinearOperands | None:
    """``torch.addmm(b, x, W, beta=.., alpha=..)`` / ``b.addmm(x, W)``: ``beta b + alpha x W``,
    linear in ``W``'s columns and ``b`` together whatever the two numbers are."""
    names = ("input", "mat1", "mat2")
    scales = {k: v for k, v in n.kwargs.items() if k in ("beta", "alpha")}
    rest = {k: v for k, v in n.kwargs.items() if k not in scales}
    if method and rest:
        return None
    if len(n.args) > len(names) or set(rest) - set(names[len(n.args) :]):
        return None
    if not all(_scalar(v) for v in scales.values()):
        return None
    b, x, w = (n.args[i] if len(n.args) > i else rest.get(k) for i, k in enumerate(names))
    if x is None or w is None:
        return None
    return LinearOperands(x, w, b, False, True)


def linear_operands(n: fx.Node) -> LinearOperands | None:
    """The operands of a product node read as a linear map: ``F.linear(x, w, b)`` (arguments
    by position or keyword; the weight ``(out, in)``), ``x @ w``, ``torch.matmul``,
    ``torch.mm`` and their methods (no bias), ``torch.addmm(b, x, w)`` and ``b.addmm(x, w)``
    (the bias added by the op, ``beta``/``alpha`` numbers allowed); None for other nodes.

    >>> g = fx.Graph()
    >>> x, w, b = g.placeholder("x"), g.get_attr("w"), g.get_attr("b")
    >>> linear_operands(g.call_function(F.linear, (x,), {"weight": w})).weight is w
    True
    >>> ops = linear_operands(g.call_function(torch.addmm, (b, x, w)))
    >>> ops.bias is b, ops.out_first, ops.fused
    (True, False, True)
    """
    if n.op == "call_function" and n.target is F.linear:
        names = ("input", "weight", "bias")
        if len(n.args) > len(names) or set(n.kwargs) - set(names):
            return None
        x, w, b = (n.args[i] if len(n.args) > i else n.kwargs.get(k) for i, k in enumerate(names))
        return LinearOperands(x, w, b, True, True)
    if n.op == "call_function" and n.target is torch.addmm:
        return _addmm_operands(n, method=False)
    if n.op == "call_method" and n.target == "addmm":
        return _addmm_operands(n, method=True)
    if (n.op == "call_function" and n.target in _MATMUL_FUNCS) or (
        n.op == "call_method" and n.target in _MATMUL_METHODS
    ):
        if len(n.args) != 2 or n.kwargs:
            return None
        return LinearOperands(n.args[0], n.args[1], None, False, False)
    return None


def _is_transpose(n: fx.Node) -> bool:
    """Whether ``n`` transposes a matrix: ``w.T``, ``w.mT``, ``w.t()``, ``torch.t(w)``,
    ``w.transpose(0, 1)`` (any two dimensions of a 2-d tensor), ``w.permute(1, 0)``."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    fn, meth = n.op == "call_function", n.op == "call_method"
    if fn and n.target is builtins.getattr:
        return n.args[1:] in (("T",), ("mT",))
    if (meth and n.target == "t") or (fn and n.target is torch.t):
        return len(n.args) == 1 and not n.kwargs
    if (meth and n.target == "transpose") or (fn and n.target is torch.transpose):
        d0 = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim0")
        d1 = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim1")
        pair = (d0, d1)
        ints = all(isinstance(d, int) and not isinstance(d, bool) and -2 <= d <= 1 for d in pair)
        return ints and cast(int, d0) % 2 != cast(int, d1) % 2
    if (meth and n.target == "permute") or (fn and n.target is torch.permute):
        dims: Any = n.args[1:] if meth else n.args[1:2]
        if len(dims) == 1 and isinstance(dims[0], list | tuple):
            dims = tuple(dims[0])
        return tuple(dims) == (1, 0) and not n.kwargs
    return False


def transposed_source(a: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """The node that operand ``a`` reads through matrix transposes, and those transposes (from
    ``a`` down); None if ``a`` is not a node.

    >>> g = fx.Graph()
    >>> w = g.get_attr("w")
    >>> src, chain = transposed_source(g.call_method("t", (g.call_function(getattr, (w, "T")),)))
    >>> src is w, len(chain)
    (True, 2)
    """
    chain: list[fx.Node] = []
    while isinstance(a, fx.Node) and _is_transpose(a):
        chain.append(a)
        a = a.args[0]
    return (a, chain) if isinstance(a, fx.Node) else None


def _number_factor(n: fx.Node) -> Any:
    """The tensor node ``n`` multiplies or divides by a finite, nonzero Python number (``w *
    0.25``, ``self.scale * w``, ``torch.mul(w, s)``, ``w.mul(s)``, ``w / s``, ``w.div(s)``;
    a number attribute of the module is a literal in the traced code): equalized learning
    rate (StyleGAN, ProGAN) writes its weights so. A scalar commutes with slicing and with
    a per-unit gate (``(W g) s = (W s) g``). Its tensor operand; else None."""
    fn, meth = n.op == "call_function", n.op == "call_method"
    mul = (fn and n.target in _MUL_FUNCS and n.target is not operator.imul) or (
        meth and n.target == "mul"
    )
    div = (fn and n.target in _DIV_FUNCS) or (meth and n.target == "div")
    if not (mul or div) or len(n.args) != 2 or n.kwargs:
        return None
    a, b = n.args
    for t, c in ((a, b), (b, a)) if mul else ((a, b),):  # s / w is not a scaled w
        if isinstance(t, fx.Node) and _finite_number(c) and c != 0:
            return t
    return None


def weight_source(a: Any) -> tuple[fx.Node, list[fx.Node], int] | None:
    """The node a weight operand ``a`` reads through matrix transposes and products with
    Python numbers (``self.weight * self.scale``, ``(self.W / 4).T``), those nodes (from ``a``
    down) and how many of them transpose; None if ``a`` is not a node.

    >>> g = fx.Graph()
    >>> w = g.get_attr("w")
    >>> src, chain, flips = weight_source(g.call_method("t", (g.call_function(
    ...     operator.mul, (w, 0.5)),)))
    >>> src is w, len(chain), flips
    (True, 2, 1)
    """
    chain: list[fx.Node] = []
    flips = 0
    while isinstance(a, fx.Node):
        if _is_transpose(a):
            flips += 1
            src = a.args[0]
        else:
            src = _number_factor(a)
            if src is None:
                break
        chain.append(a)
        a = src
    return (a, chain, flips) if isinstance(a, fx.Node) else None


def _broadcast_index(item: Any) -> bool:
    """Whether getitem index ``item`` only adds dimensions of size 1 (``[:, None, None]``,
    ``[None, :, None, None]``, ``[..., None]``): ``None``, full slices and ``...``."""
    items = item if isinstance(item, tuple) else (item,)
    full = slice(None, None, None)
    return any(i is None for i in items) and all(
        i is None or i is Ellipsis or (isinstance(i, slice) and i == full) for i in items
    )


def _full_slice(item: Any) -> bool:
    """Whether getitem index entry ``item`` is ``:`` (keeps its dimension whole).

    >>> _full_slice(slice(None)), _full_slice(slice(0, 2)), _full_slice(None)
    (True, False, False)
    """
    return isinstance(item, slice) and (item.start, item.stop, item.step) == (None, None, None)


def _scale_step(v: fx.Node) -> Any:
    """The tensor node ``v`` reshapes or casts without changing its entries' order (a
    ``view``/``reshape``/``unsqueeze``, an index adding size-1 dimensions, ``.to(...)``,
    ``.type_as(t)``): its first argument; else None."""
    meth = v.op == "call_method"
    fn = v.op == "call_function"
    src = v.args[0] if v.args else None
    if not isinstance(src, fx.Node):
        return None
    if meth and v.target in ("view", "reshape", "unsqueeze", "to", "type_as"):
        return src
    if fn and v.target in (torch.reshape, torch.unsqueeze):
        return src
    if fn and v.target is operator.getitem and len(v.args) == 2 and not v.kwargs:
        return src if _broadcast_index(v.args[1]) else None
    return None


def scale_chain(a: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """The node operand ``a`` of a product reads through a chain of ``view``, ``reshape``,
    ``unsqueeze``, ``None``-indexing, ``.to(...)`` and ``.type_as(t)`` (a layer scale shaped to
    broadcast: ``self.gamma.view(1, -1, 1, 1)``, ``self.gamma[:, None, None]``), and that
    chain (from ``a`` down); None if ``a`` is not a node.

    >>> g = fx.Graph()
    >>> w = g.get_attr("gamma")
    >>> src, chain = scale_chain(g.call_method("unsqueeze", (g.call_method("view", (w, -1)), -1)))
    >>> src is w, [v.target for v in chain]
    (True, ['unsqueeze', 'view'])
    """
    chain: list[fx.Node] = []
    while isinstance(a, fx.Node):
        src = _scale_step(a)
        if src is None:
            break
        chain.append(a)
        a = src
    return (a, chain) if isinstance(a, fx.Node) else None


def bias_attr(b: Any) -> fx.Node | None:
    """The ``get_attr`` node a bias operand reads as it is or times Python numbers (``self.bias
    * self.lr_mul``: equalized learning rate); None for other operands."""
    src = weight_source(b)
    if src is None or src[2] or src[0].op != "get_attr":
        return None
    return src[0]


def _param_reads(a: Any) -> list[fx.Node] | None:
    """The ``get_attr`` and module-call nodes value ``a`` is computed from, if it reads no
    input of the model (a weight computed from parameters: ``self.W * 2``, a parametrization
    such as ``weight_norm``, called as a module); else None."""
    if not isinstance(a, fx.Node):
        return None
    found: list[fx.Node] = []
    for v in ancestors(a):
        if v.op == "placeholder":
            return None
        if v.op in ("get_attr", "call_module"):
            found.append(v)
    return found


class _Propagator:
    def __init__(
        self,
        gm: fx.GraphModule,
        record: RunRecord,
        after: frozenset[str] | None = None,
        fixed_code: Callable[[fx.Node], bool] | None = None,
        root: nn.Module | None = None,
    ) -> None:
        self.gm = gm
        self.root = root if root is not None else gm  # the traced model, its modules as they are
        self.rec = record
        # nodes in code prune cannot rewrite (a module called twice): a chunk there keeps its
        # pieces pruned by position (its code unchanged), not sections pruned apart
        self.fixed_code = fixed_code
        # multi-query attention (one key/value head read by every query head): a closed query
        # head's output is the mean of v, not zero, so its gate multiplies the attention's
        # output where a Linear reads it (a forward pre-hook; folded into its weight columns).
        # The first pass finds them (``mqa_queries``: the query heads' labels); the second
        # runs with ``after``, the Linear layers computing those queries: their outputs are
        # not gated, so nonzero labels, which only the attention may read (None: first pass)
        self.after = after
        self.after_atoms: set[int] = set()  # output channels of the Linear layers in ``after``
        self.mqa_queries: list[np.ndarray] = []
        self.input_sites: dict[str, np.ndarray] = {}  # Linear -> input channels it gates
        # tensors equal along one dimension (the key/value head of multi-query attention
        # repeated for the query heads): node -> (that dimension counted from the end, the
        # (node, key) of each size the code gives it, rewritten to the kept query heads)
        self.copies: dict[fx.Node, tuple[int, tuple[tuple[fx.Node, int | str], ...]]] = {}
        self.parent: list[int] = []
        self.space_of: list[int] = []
        self.space_names: list[str] = []
        self.module_space: dict[str, np.ndarray] = {}
        self.module_in_atoms: dict[str, np.ndarray] = {}
        self.labels: dict[fx.Node, Labels | None] = {}
        self.module_in: dict[fx.Node, Labels | None] = {}
        self.pins: list[tuple[np.ndarray, str]] = []
        # channels reaching the output through element-wise ops: the reason of their group if
        # it is pinned (see output_pins)
        self.late_outputs: list[tuple[np.ndarray, str]] = []
        self.soft_pins: list[tuple[np.ndarray, str]] = []  # only matter for recurrent outputs
        self.kinds: dict[str, str] = {}
        # recurrent calls and their (h_n, c_n) / h_n nodes: (module name, "call"|"state"|"h")
        self.rnn_nodes: dict[fx.Node, tuple[str, str]] = {}
        self.rnn_out: dict[str, Labels] = {}  # labels of a recurrent module's output
        self.rnn_in_atoms: dict[str, np.ndarray] = {}
        self.rnn_outputs: dict[str, list[np.ndarray]] = {}
        self.pairs: dict[fx.Node, Labels | None] = {}  # max/min over a dim: labels of both
        # excitations (sigmoid of labelled channels) and their reshapes: labels that are NOT
        # zero at closed channels; only a product with a labelled tensor may read them
        self.unlabelled_in: set[str] = set()  # Linear/Conv called on unlabelled channels
        self.nonzero: dict[fx.Node, Labels] = {}
        self.nonzero_uses: set[tuple[fx.Node, fx.Node]] = set()
        # attention heads: a reshape splitting labelled channels into (heads, head size)
        # labels the heads dimension with one atom per head (these atoms); the code's sizes
        # of pruned dimensions are rewritten: node -> [(output dim or "split_size", atoms
        # whose kept count is the new size, or None, times this factor)]
        self.head_atoms: set[int] = set()
        # id(atoms) -> (atoms, the view, the channels' width, its sizes) of a split of channels
        self.split_views: dict[int, tuple[np.ndarray, fx.Node, int, tuple[int, ...]]] = {}
        # channel shuffles: ``c // g`` size nodes (``c`` read from the shuffled channels,
        # ``g`` a literal int) that a shuffle split (see ``shuffle_split``) reads, and those
        # views
        self.shuffle_sizes: set[fx.Node] = set()
        self.shuffle_views: set[fx.Node] = set()
        # GroupNorm inputs (their runs of channels are one atom each) and the norm's name
        self.norm_groups: list[tuple[np.ndarray, str]] = []
        self.sizes: dict[fx.Node, list[tuple[int | str, np.ndarray | None, int]]] = {}
        self.pieces: dict[fx.Node, list[Labels]] = {}  # split/chunk of labelled channels
        self.nonzero_pieces: set[fx.Node] = set()  # those splitting nonzero labels
        # linear maps written with the model's own parameters (F.linear(h, self.W), h @ self.W)
        self.param_linears: dict[fx.Node, ParamLinear] = {}
        self.param_whole: dict[str, str] = {}  # parameter -> why its product is left whole
        self.param_scales: list[ParamScale] = []  # per-channel parameter factors (layer scale)
        # the nodes shaping them to broadcast (gamma.view(1, -1, 1, 1)) -> the channels' atoms
        self.scale_chains: dict[fx.Node, np.ndarray] = {}
        self.head_biases: list[HeadBias] = []  # per-head terms of attention scores
        self.fused_norms: dict[fx.Node, str] = {}  # F.batch_norm/group_norm node -> the norm

    # -- union-find
    def new_space(self, name: str, n: int) -> np.ndarray:
        start = len(self.parent)
        sid = len(self.space_names)
        self.space_names.append(name)
        self.parent.extend(range(start, start + n))
        self.space_of.extend([sid] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def pin(self, lab: Labels | None, reason: str) -> None:
        if lab is not None:
            self.pins.append((lab.atoms, reason))

    def pin_inputs(self, n: fx.Node, reason: str) -> None:
        for a in _flat_nodes((n.args, n.kwargs)):
            self.pin(self.labels.get(a), reason)

    def pin_keyword_inputs(self, n: fx.Node) -> None:
        """Labelled tensors an op reads only by keyword (``F.scaled_dot_product_attention(
        query=q, ...)``, ``torch.relu(input=h)``): the rules read positional arguments, so
        their channels are kept whole (pruning them would leave this op's reading unsliced)."""
        positional = set(_flat_nodes(n.args))
        read = _KEYWORDS_READ.get(n.target, ()) if n.op == "call_function" else ()
        for key, value in n.kwargs.items():
            if key in read:
                continue
            for a in _flat_nodes(value):
                lab = self.labels.get(a) or self.nonzero.get(a)
                if a not in positional and lab is not None:  # and every other input with it:
                    # the rule may have passed a positional operand's channels on (add(a,
                    # other=b) gated a alone: b's reader would be unsliced)
                    why = f"{self.describe(n)} reads labelled channels by keyword {key!r}"
                    for b in _flat_nodes((n.args, n.kwargs)):
                        self.pin(self.labels.get(b) or self.nonzero.get(b), why)
                    self.pin(self.labels.get(n), why)

    def soft_pin(self, lab: Labels | None, reason: str) -> None:
        """The op is exact for closed channels but not for a gate folded into consumers."""
        if lab is not None:
            self.soft_pins.append((lab.atoms, reason))

    # -- helpers
    def shape(self, a: Any) -> tuple[int, ...] | None:
        return self.rec.shapes.get(a) if isinstance(a, fx.Node) else None

    def lab(self, a: Any) -> Labels | None:
        return self.labels.get(a) if isinstance(a, fx.Node) else None

    def describe(self, n: fx.Node) -> str:
        t = n.target
        name = getattr(t, "__name__", str(t))
        return f"node '{n.name}' ({n.op} {name})"

    def run(self) -> None:
        for n in self.gm.graph.nodes:
            try:
                self.labels[n] = self.visit(n)
            except (ValueError, IndexError, TypeError) as e:  # an op form we do not parse
                self.pin_inputs(n, f"{self.describe(n)} not understood ({e})")
                self.labels[n] = None
            self.pin_keyword_inputs(n)
            with contextlib.suppress(ValueError, IndexError, TypeError):
                self.track_copies(n)  # a form not parsed is not tracked: not a repeated head
        for n in self.gm.graph.nodes:  # after the labels of every reader are known
            if n.op in ("call_function", "call_method") and self.shape(n) is None:
                self.size_read(n)
        for s, pieces in self.pieces.items():  # only getitem of one piece carries its labels
            for u in s.users:
                if u.op != "call_function" or u.target is not operator.getitem:
                    why = f"{self.describe(u)} reads the pieces of {self.describe(s)} together"
                    for piece in pieces:
                        self.pin(piece, why)
        for v, lab in self.nonzero.items():  # any other reader needs zeros at closed channels
            for u in v.users:
                if (v, u) in self.nonzero_uses or self.other_size(u, lab) or _meta_read(u):
                    continue
                if self.is_after(lab):
                    why = (
                        f"{self.describe(v)} carries query heads of multi-query attention, "
                        "gated only where a Linear reads the attention's output, and "
                        f"{self.describe(u)} reads them"
                    )
                elif _size_read(u):
                    why = (
                        f"{self.describe(u)} reads the sizes of {self.describe(v)}, which is "
                        "not zero at closed channels (a norm of heads, a sigmoid or attention "
                        "scores); if it is Hugging Face's repeat_kv, which reads them from "
                        "hidden_states.shape, write the repeat with its sizes written out "
                        "(self.num_key_value_heads) or use repeat_interleave"
                    )
                else:
                    added = any(_scalar(a) for a in v.args) and v.target in (
                        *_OFFSET_FUNCS,
                        *_OFFSET_METHODS,
                    )
                    what = (
                        "adds a constant to the channels (not zero at closed ones)"
                        if added
                        else "is not zero at closed channels"
                    )
                    why = (
                        f"{self.describe(v)} {what} and {self.describe(u)} reads it (only a "
                        "product with the channels it excites may)"
                    )
                self.pin(lab, why)
        self.late_outputs = self.output_pins()

    def output_pins(self) -> list[tuple[np.ndarray, str]]:
        """Channels reaching the model output through element-wise ops (a Sigmoid, Tanh or
        ``exp`` after the last layer, a view of them), with the reason "reaches the model
        output": it replaces the reason of a group kept whole (the ops' own, such as not zero
        at closed channels or an op gate_ does not prune through), and keeps no other group
        whole. Channels read by the output directly are pinned where it is visited."""
        out: list[tuple[np.ndarray, str]] = []
        for o in self.gm.graph.nodes:
            if o.op != "output":
                continue
            for first in _flat_nodes(o.args):
                if self.lab(first) is not None:
                    continue  # read directly: pinned by visit
                why = f"reaches the model output (through {self.describe(first)})"
                stack, seen = [first], set()
                while stack:
                    v = stack.pop()
                    if v in seen:
                        continue
                    seen.add(v)
                    lab = self.lab(v) if v is not first else None
                    lab = lab if lab is not None else self.nonzero.get(v)
                    if lab is not None and self.is_after(lab):
                        continue  # query heads of multi-query attention: their own reason
                    if lab is not None:
                        out.append((lab.atoms, why))
                        continue
                    src = self.elementwise_input(v)
                    if src is not None:
                        stack.append(src)
        return out

    def elementwise_input(self, v: fx.Node) -> fx.Node | None:
        """The one tensor ``v`` reads when ``v`` computes each value from the value at the same
        place (``exp``, ``sigmoid``, ``x * 2.0``, a parameter-free activation module), or a
        view of it (``view``, ``squeeze``, ``flatten``): None otherwise."""
        if v.op not in ("call_function", "call_method", "call_module"):
            return None
        if v.op == "call_module" and any(
            True for _ in self.gm.get_submodule(str(v.target)).parameters()
        ):
            return None
        ins = [a for a in _flat_nodes((v.args, v.kwargs)) if self.shape(a) is not None]
        if len(ins) != 1 or ins[0] is not (v.args[0] if v.args else None):
            return None
        src, s_in, s_out = ins[0], self.shape(ins[0]), self.shape(v)
        view = (v.op == "call_method" and v.target in _RESHAPE_METHODS) or (
            v.op == "call_function" and v.target in _RESHAPE_FUNCS
        )
        if s_out is None or s_in is None or (s_in != s_out and not view):
            return None
        return src

    def other_size(self, u: fx.Node, lab: Labels) -> bool:
        """Whether ``u`` only reads the size of a dimension other than ``lab``'s
        (``s.size(0)``): a shape, not the values, and not the pruned width."""
        shape = self.shape(u.args[0]) if u.args else None
        if shape is None:
            return False

        def other(dim: object) -> bool:
            return (
                isinstance(dim, int) and not isinstance(dim, bool) and (dim % len(shape) != lab.dim)
            )

        if u.op == "call_method" and u.target == "size" and len(u.args) == 2 and not u.kwargs:
            return other(u.args[1])
        if u.op == "call_function" and u.target is builtins.getattr and u.args[1:] == ("shape",):
            return bool(u.users) and all(  # s.shape[0]
                w.op == "call_function" and w.target is operator.getitem and other(w.args[1])
                for w in u.users
            )
        return False

    def excitation(self, n: fx.Node) -> bool:
        """Record a sigmoid / hardsigmoid of labelled channels (same shape) as a nonzero label
        (see ``nonzero``); False if ``n`` is not one."""
        if n.op == "call_module":
            is_exc = isinstance(self.gm.get_submodule(str(n.target)), _EXCITE_MODULES)
        elif n.op == "call_function":
            is_exc = n.target in _EXCITE_FUNCS
        else:
            is_exc = n.op == "call_method" and n.target in _EXCITE_METHODS
        plain = not n.kwargs or n.kwargs == {"inplace": False}  # F.hardsigmoid's default
        x = n.args[0] if len(n.args) == 1 and plain else None
        lab = self.lab(x)
        if not is_exc or lab is None or self.shape(x) != self.shape(n):
            return False
        self.nonzero[n] = lab
        return True

    def nonzero_factor(self, n: fx.Node) -> bool:
        """Record a factor that is an element-wise function of labelled channels, finite but
        not zero at closed ones, as a nonzero label (see ``nonzero``): a number added to or
        subtracted from labelled channels (``1.0 + t``, ``t - 1``), and, of such a factor,
        tanh, sigmoid, hardsigmoid or erf, a number added, subtracted, or a positive integer
        power (``s ** 2``); a scale or a division by a number is read by
        :meth:`attention_nonzero`. A product with the same channels keeps their zeros
        (gelu_new's ``0.5 * x * (1.0 + tanh(...))``, see :meth:`excited_product`). False if
        ``n`` is not one.

        >>> import torch.nn as nn
        >>> from gatedprune.gating import gate_
        >>> class Ffn(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         h = self.fc1(x)  # (B, 8)
        ...         return self.fc2(h * (1.0 + torch.tanh(h)))  # (B, 2)
        >>> len(gate_(Ffn(), torch.randn(3, 4)).channel_groups)
        1
        """
        t, fn, meth = n.target, n.op == "call_function", n.op == "call_method"
        plain = not n.kwargs or n.kwargs == {"inplace": False}
        if n.op == "call_module":
            bounded = isinstance(self.gm.get_submodule(str(t)), (nn.Tanh, *_EXCITE_MODULES))
        else:
            bounded = (fn and t in _BOUNDED_FUNCS) or (meth and t in _BOUNDED_METHODS)
        if bounded:  # of a factor: still one (of labelled channels: excitation or pass)
            x = n.args[0] if len(n.args) == 1 and plain else None
            if not isinstance(x, fx.Node) or x not in self.nonzero:
                return False
            if self.shape(x) != self.shape(n):
                return False
            self.nonzero[n] = self.nonzero[x]
            self.nonzero_uses.add((x, n))
            return True
        offset = (fn and t in _OFFSET_FUNCS) or (meth and t in _OFFSET_METHODS)
        power = (fn and t in _POW_FUNCS) or (meth and t in _POW_METHODS)
        if not (offset or power) or len(n.args) != 2 or n.kwargs:
            return False
        a, b = n.args
        x, num = (a, b) if isinstance(a, fx.Node) else (b, a)
        if not isinstance(x, fx.Node) or not isinstance(num, int | float):
            return False
        if not _finite_number(num) or self.shape(x) != self.shape(n):
            return False
        if offset and zero_literal(num):  # x + 0: the identity, labels kept (see ``binary``)
            return False
        nz = self.nonzero.get(x)
        # of a factor, base first: a positive integer power stays finite
        if power and (nz is None or x is not a or not (num > 0 and float(num).is_integer())):
            return False
        lab = nz if nz is not None else self.lab(x)
        if lab is None:
            return False
        self.nonzero[n] = lab
        if nz is not None:
            self.nonzero_uses.add((x, n))
        return True

    def power(self, n: fx.Node) -> Labels | None:
        """``torch.pow(x, p)``, ``x.pow(p)`` or ``x ** p`` of labelled ``x``: the labels pass
        when ``p`` is a literal number > 0 (``0 ** p = 0``); otherwise the channels are kept
        whole, with why (``0 ** 0 = 1``, ``0 ** p = inf`` for ``p < 0``, a tensor exponent:
        either). A labelled exponent (``2 ** x``) is kept whole too (``2 ** 0 = 1``)."""
        base = n.args[0] if n.args else None
        exp: Any = n.args[1] if len(n.args) > 1 else n.kwargs.get("exponent")
        lab, exp_lab = self.lab(base), self.lab(exp)
        if exp_lab is not None:
            why = f"{self.describe(n)} raises to the power of labelled channels (0 maps to 1)"
            self.pin_inputs(n, why)
            return None
        if lab is None:
            return None
        if _finite_number(exp) and exp > 0:
            if self.shape(base) != self.shape(n):
                self.pin(lab, f"{self.describe(n)} changes the shape")
                return None
            if exp != 1:
                self.soft_pin(lab, f"{self.describe(n)} is not positively homogeneous")
            return lab
        if _finite_number(exp):
            zero = "1" if exp == 0 else "inf"
            why = f"{self.describe(n)} raises to the power {exp!r}, which maps 0 to {zero} (not 0)"
        elif isinstance(exp, fx.Node):
            why = (
                f"{self.describe(n)} raises to the power of tensor node '{exp.name}', which maps "
                "0 to 1 or inf where it is <= 0 (only a literal number > 0 maps 0 to 0)"
            )
        else:
            why = (
                f"{self.describe(n)} raises to the power {exp!r}, which maps 0 to a value "
                "gate_ does not know is 0 (only a literal number > 0 does)"
            )
        self.pin_inputs(n, why)
        return None

    def nonzero_shape(self, n: fx.Node) -> bool:
        """A reshape or index of a nonzero-labelled tensor: its labels carried through by the
        usual handler, still nonzero; False if ``n`` is not one."""
        x = n.args[0] if n.args else None
        if not isinstance(x, fx.Node) or x not in self.nonzero:
            return False
        is_fn = n.op == "call_function"
        if self.shape(n) is None:  # a split (multi-query attention's fused q, k, v): pieces
            saved = self.labels.get(x)  # carry nonzero labels, see ``getitem`` of ``pieces``
            self.labels[x] = self.nonzero[x]
            try:
                split = self.split_channels(n)
            finally:
                self.labels[x] = saved
            if split:
                self.nonzero_pieces.add(n)
                self.nonzero_uses.add((x, n))
            return split
        if n.op == "call_method" and n.target == "expand_as":  # (expand: repeat_heads)
            ins, outs = self.shape(x), self.shape(n)
            lab = self.nonzero[x]
            same_rank = ins is not None and outs is not None and len(ins) == len(outs)
            if same_rank and ins[lab.dim] == outs[lab.dim]:  # type: ignore[index]
                self.nonzero[n] = lab  # size-1 dims broadcast, the channels kept
                self.nonzero_uses.add((x, n))
            return True
        if is_fn and n.target is operator.getitem:
            handler = self.getitem
        elif (is_fn and n.target in _RESHAPE_FUNCS) or (
            n.op == "call_method" and n.target in _RESHAPE_METHODS
        ):
            handler = self.reshape
        elif (is_fn and n.target is torch.transpose) or (
            n.op == "call_method" and n.target == "transpose"
        ):
            handler = functools.partial(self.permute, how="transpose")
        elif is_fn and n.target in (torch.view_as_complex, torch.view_as_real):
            handler = self.complex_view
        elif (is_fn and n.target is torch.permute) or (
            n.op == "call_method" and n.target in ("permute", "t")
        ):
            handler = functools.partial(self.permute, how="t" if n.target == "t" else "permute")
        else:
            return False
        saved = self.labels.get(x)
        self.labels[x] = self.nonzero[x]
        try:
            out = handler(n, x)
        finally:
            self.labels[x] = saved
        if out is not None:
            self.nonzero[n] = out
            self.nonzero_uses.add((x, n))
        return True

    def size_read(self, n: fx.Node) -> None:
        """Pin a labelled tensor whose size along the labelled dimension the code reads and
        computes with: the pruned model runs the same code on the pruned width, so the value
        would change (``h / h.size(1)``, ``q * q.shape[-1] ** -0.5``). Allowed: the size feeds
        ``view``/``reshape``/``flatten`` of a tensor holding the same channels, alone or
        multiplied by other sizes (``h.view(b, c * l)``): the pruned code reshapes alike."""
        t = n.target
        x = n.args[0] if n.args else None
        lab, shape = self.lab(x), self.shape(x)
        if lab is None or shape is None:
            return
        rank = len(shape)
        dims: list[int] | None = None  # the dimensions a tuple-valued read holds
        if n.op == "call_method" and t == "size":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            if dim is None:
                dims = list(range(rank))
            elif isinstance(dim, int) and dim % rank != lab.dim:
                return
        elif n.op == "call_method" and t == "numel":
            pass
        elif n.op == "call_function" and t is builtins.len:
            if lab.dim != 0:
                return
        elif n.op == "call_function" and t is builtins.getattr and n.args[1:2] == ("shape",):
            dims = list(range(rank))
        else:
            return  # dim(), dtype, device, ...: not a size
        why = self.size_use(n, dims, lab)
        if why is not None:
            self.pin(
                lab,
                f"{self.describe(why)} computes with the labelled width that "
                f"{self.describe(n)} reads (the pruned code would compute with the pruned width)",
            )

    def size_use(self, v: fx.Node, dims: list[int] | None, lab: Labels) -> fx.Node | None:
        """The first user of the size value ``v`` that is not a reshape of ``lab``'s channels
        (``dims``: the dimensions a tuple value holds; None: one int), or None."""
        for u in v.users:
            if dims is not None and u.op == "call_function" and u.target is operator.getitem:
                idx = u.args[1]
                if isinstance(idx, int):
                    if idx < len(dims) and dims[idx] == lab.dim:
                        bad = self.size_use(u, None, lab)
                        if bad is not None:
                            return bad
                    continue
                if isinstance(idx, slice):
                    sub = dims[idx]
                    if lab.dim in sub:
                        bad = self.size_use(u, sub, lab)
                        if bad is not None:
                            return bad
                    continue
                return u
            if dims is None and u.op == "call_function" and u.target is operator.mul:
                bad = self.size_use(u, None, lab)  # a product of sizes: a merged dimension
                if bad is not None:
                    return bad
                continue
            if dims is None and u in self.shuffle_sizes and u.args[0] is v:
                # c // g read only by channel shuffles' splits (see shuffle_split)
                if all(w in self.shuffle_views for w in u.users):
                    continue
                return u
            is_reshape = (u.op == "call_method" and u.target in {*_RESHAPE_METHODS, "expand"}) or (
                u.op == "call_function" and u.target in _RESHAPE_FUNCS
            )
            src = self.lab(u.args[0]) if is_reshape and u.args else None
            if src is None and is_reshape and u.args and isinstance(u.args[0], fx.Node):
                src = self.nonzero.get(u.args[0])  # an excitation: sigmoid(fc(y)).view(b, c)
            atoms = src.atoms if src is not None else self.scale_chains.get(u)  # gamma.view(...)
            out = self.lab(u) if src is not None else None  # a shuffle's merge: its output
            if atoms is None or not (
                np.array_equal(np.unique(atoms), np.unique(lab.atoms))
                or self.same_units(atoms, lab.atoms)
                or (out is not None and self.same_units(out.atoms, lab.atoms))
            ):
                return u  # not a reshape of the same channels
        return None

    def same_units(self, a: np.ndarray, b: np.ndarray) -> bool:
        """Whether channels ``a`` and ``b`` are pruned alike, one to one: the same multiset of
        union-find roots (an excitation's channels unified with the ones it multiplies,
        SENet's ``fc(y).view(b, c, 1, 1)`` with ``c`` read from ``x``), so they keep equally
        many channels."""
        return len(a) == len(b) and sorted(self.find(int(i)) for i in a) == sorted(
            self.find(int(i)) for i in b
        )

    def param_input_atoms(self, n: fx.Node, lab: Labels | None, path: str) -> np.ndarray | None:
        """The atoms of the input channels that node ``n``, a linear map or convolution with
        parameter ``path``, consumes (None if unlabelled); the gate of a recurrent module's
        output does not fold into such a map, so they are soft-pinned for it."""
        if lab is None:
            return None
        self.soft_pin(
            lab,
            f"{self.describe(n)} reads them with parameter '{path}' (a recurrent module's "
            "output gate folds into Linear/Conv consumers only)",
        )
        return lab.atoms

    def query_sources(self) -> frozenset[str]:
        """The Linear layers computing the queries of the multi-query attentions found: for
        each, the modules whose output channels are pruned with its query heads, if all of
        them are Linear layers."""
        roots = np.array([self.find(a) for a in range(len(self.parent))], dtype=np.int64)
        space_of = np.array(self.space_of, dtype=np.int64)
        names: set[str] = set()
        for atoms in self.mqa_queries:
            spaces = np.unique(space_of[np.isin(roots, roots[atoms])]).tolist()
            found = {self.space_names[sid] for sid in spaces}
            if all(self.kinds.get(name) == "linear" for name in found):
                names |= found
        return frozenset(names)

    def is_after(self, lab: Labels) -> bool:
        """Whether ``lab`` carries query heads of multi-query attention (see ``after``)."""
        return bool(len(lab.atoms)) and bool(np.isin(lab.atoms, list(self.after_atoms)).all())

    def after_label(self, a: Any) -> Labels | None:
        """The nonzero labels of ``a`` if they carry query heads of multi-query attention."""
        lab = self.nonzero.get(a) if isinstance(a, fx.Node) else None
        return lab if lab is not None and self.is_after(lab) else None

    def track_copies(self, n: fx.Node) -> None:
        """Record ``n`` in ``copies`` if it repeats a dimension of size 1 (``t.expand(b, h, s,
        d)`` or ``t.repeat_interleave(h, dim=1)`` of ``t`` of shape ``(b, 1, s, d)``), or
        carries such a dimension through a transpose, permute, copy or reshape (Hugging Face's
        ``repeat_kv``: ``t[:, :, None].expand(b, 1, h, s, d).reshape(b, h, s, d)``)."""
        x = n.args[0] if n.args else None
        ins, outs = self.shape(x), self.shape(n)
        if not isinstance(x, fx.Node) or ins is None or outs is None:
            return
        t, meth = n.target, n.op == "call_method"
        fn = n.op == "call_function"
        prev = self.copies.get(x)
        if meth and t == "expand" and len(ins) == len(outs):
            grown = [e for e in range(len(outs)) if ins[e] == 1 < outs[e]]
            found, arg = _size_arg(n, grown[0] - len(outs)) if len(grown) == 1 else (False, None)
            if prev is None and found and _rewritable(arg):
                self.copies[n] = (grown[0] - len(outs), ((n, grown[0] - len(outs)),))
            return
        if meth and t == "repeat_interleave":
            reps: Any = n.args[1] if len(n.args) > 1 else n.kwargs.get("repeats")
            dim: Any = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
            if (
                prev is None
                and isinstance(dim, int)
                and _rewritable(reps)
                and not n.kwargs.get("output_size")
                and len(ins) == len(outs)
                and ins[dim] == 1 < outs[dim]
            ):
                self.copies[n] = (dim % len(ins) - len(ins), ((n, "repeats"),))
            return
        if prev is None:
            return
        c, rewrites = prev
        if (meth and t in ("contiguous", "clone", "float", "detach", "to", "type_as")) or (
            fn and t in (F.dropout, torch.clone)
        ):
            if ins == outs:
                self.copies[n] = prev
        elif (fn and t in (torch.transpose, torch.permute)) or (
            meth and t in ("transpose", "permute")
        ):
            nd = len(ins)
            if t in (torch.transpose, "transpose"):
                a = _int(n.args[1] if len(n.args) > 1 else n.kwargs["dim0"]) % nd
                b = _int(n.args[2] if len(n.args) > 2 else n.kwargs["dim1"]) % nd
                perm = list(range(nd))
                perm[a], perm[b] = perm[b], perm[a]
            else:
                dims: Any = n.args[1:] if meth else n.args[1]
                if meth and len(dims) == 1 and isinstance(dims[0], list | tuple):
                    dims = dims[0]
                perm = [_int(v) % nd for v in dims]
            self.copies[n] = (perm.index(c + nd) - nd, rewrites)
        elif (fn and t in _RESHAPE_FUNCS) or (meth and t in _RESHAPE_METHODS):
            # the repeated dimension kept whole: output dimension e of the same size after as
            # many elements (merged or split only with dimensions of size 1)
            size, before = ins[c], _prod(ins[: c + len(ins)])
            at = [e for e in range(len(outs)) if outs[e] == size and _prod(outs[:e]) == before]
            if len(at) != 1:
                return
            e = at[0] - len(outs)
            found, arg = _size_arg(n, e)
            if found and _rewritable(arg):
                self.copies[n] = (e, (*rewrites, (n, e)))
            elif (not found and not _has_sizes(n)) or (found and arg == -1):
                self.copies[n] = (e, rewrites)  # the size is inferred

    def visit(self, n: fx.Node) -> Labels | None:
        if n.op in ("placeholder", "get_attr"):
            return None
        if (n.op == "call_function" and n.target is operator.getitem) or (
            n.op == "call_method" and n.target == "squeeze"
        ):
            src = n.args[0] if n.args else None
            if isinstance(src, fx.Node) and src in self.rnn_nodes:
                return self.recurrent_item(n, src)
        if n.op == "output":
            self.pin_inputs(n, "reaches the model output")
            return None
        if (
            self.excitation(n)
            or self.nonzero_shape(n)
            or self.attention_nonzero(n)
            or self.nonzero_cat(n)
            or self.nonzero_factor(n)
        ):
            return None  # nonzero labels: kept in self.nonzero, not seen by other readers
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in self.pieces:
            item = n.args[1]
            pieces = self.pieces[cast(fx.Node, n.args[0])]
            if isinstance(item, int) and -len(pieces) <= item < len(pieces):
                if n.args[0] in self.nonzero_pieces:  # a piece of nonzero labels
                    self.nonzero[n] = pieces[item]
                    return None
                return pieces[item]
            why = f"{self.describe(n)} reads a split of the channels as a whole"
            for piece in pieces:
                self.pin(piece, why)
            return None
        if n.op == "call_function" and n.target in _CONV_FUNCS:
            return self.param_conv(n, _CONV_FUNCS[n.target])
        if n.op == "call_function" and n.target in (F.batch_norm, F.group_norm):
            return self.functional_norm(n)
        parts = linear_operands(n)
        if parts is not None:
            handled, lab = self.param_linear(n, parts)
            if handled:
                return lab
        if (n.op == "call_function" and n.target in (operator.matmul, torch.matmul, *_MM)) or (
            n.op == "call_method" and n.target in ("matmul", "bmm", "mm")
        ):
            return self.matmul(n)
        if n.op == "call_function" and n.target is torch.einsum:
            return self.einsum(n)
        if n.op == "call_method" and n.target in ("repeat_interleave", "expand", "repeat", "tile"):
            return self.repeat_heads(n)
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
            return self.sdpa(n)
        if n.op == "call_module":
            return self.visit_module(n)
        out_shape = self.shape(n)
        target = n.target
        is_fn = n.op == "call_function"
        pair = n.args[0] if n.args else None
        if isinstance(pair, fx.Node) and pair in self.pairs:  # (values, indices) of a max/min
            item = n.args[1] if len(n.args) > 1 else None
            reads = is_fn and target in (operator.getitem, builtins.getattr)
            if reads and item in (0, 1, "values", "indices"):
                return self.pairs[pair]
        if is_fn and target in _POOL_INDEX_FUNCS:  # F.max_pool3d(h, 2, return_indices=True)
            return self.pool(n, self.lab(pair), target)
        if out_shape is None and self.max_over(n):
            return None
        if out_shape is None:
            if (is_fn and target in _META_FUNCS) or (not is_fn and target in _META_METHODS):
                return None
            if self.split_channels(n):
                return None
            self.pin_inputs(n, f"{self.describe(n)} returns a non-tensor")
            return None
        x = n.args[0] if n.args else None
        if is_fn and target is F.hardtanh:  # hardtanh(x, min_val=-1.0, max_val=1.0)
            lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min_val", -1.0)
            hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max_val", 1.0)
            if not _hardtanh_zero(lo, hi):
                why = f"{self.describe(n)} maps 0 to clamp(0, {lo}, {hi}) (not 0)"
                self.pin_inputs(n, why)
                return None
        if is_fn and target in (torch.view_as_complex, torch.view_as_real):
            return self.complex_view(n, x)
        if not is_fn and (target in ("type_as", "to") or _type_cast(n)):
            return self.cast(n, x)
        if (is_fn and target in _POW_FUNCS) or (not is_fn and target in _POW_METHODS):
            return self.power(n)
        if (is_fn and target is torch.square) or (not is_fn and target == "square"):
            lab = self.lab(x)  # x ** 2: 0 maps to 0, not positively homogeneous
            if lab is not None and self.shape(x) == out_shape and len(n.args) == 1:
                self.soft_pin(lab, f"{self.describe(n)} is not positively homogeneous")
                return lab
        if (is_fn and target in _PASS_FUNCS) or (not is_fn and target in _PASS_METHODS):
            lab = self.lab(x)
            if lab is not None and self.shape(x) != out_shape:
                self.pin(lab, f"{self.describe(n)} changes the shape")
                return None
            if (is_fn and target not in _SCALE_FUNCS) or (
                not is_fn and target not in _SCALE_METHODS
            ):
                self.soft_pin(lab, f"{self.describe(n)} is not positively homogeneous")
            return lab
        if is_fn and target in _POOL_FUNCS:
            return self.pool(n, self.lab(x), target)
        if is_fn and target is F.pad:
            pad = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
            mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
            value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value")
            if not isinstance(pad, list | tuple) or (mode == "constant" and value not in (None, 0)):
                self.pin_inputs(n, f"{self.describe(n)} pads with a non-zero value")
                return None
            return self.trailing(n, x, len(pad) // 2, "pads")
        if is_fn and target is F.interpolate:
            ins = self.shape(x)
            return self.trailing(n, x, len(ins) - 2 if ins is not None else 0, "resizes")
        if (is_fn and target in _RESHAPE_FUNCS) or (not is_fn and target in _RESHAPE_METHODS):
            return self.reshape(n, x)
        if not is_fn and target in ("reshape_as", "view_as"):
            return self.reshape_as(n, x)
        if (is_fn and target in (*_ADD_FUNCS, torch.sub)) or (
            not is_fn and target in ("add", "add_", "sub")
        ):
            biased = self.param_bias(n)
            return biased if biased is not None else self.binary(n, "add")
        if (is_fn and target in _MUL_FUNCS) or (not is_fn and target in ("mul", "mul_")):
            return self.binary(n, "mul")
        if (is_fn and target in _DIV_FUNCS) or (not is_fn and target == "div"):
            return self.binary(n, "div")
        if (is_fn and target in (torch.transpose,)) or (not is_fn and target == "transpose"):
            return self.permute(n, x, "transpose")
        if (is_fn and target in (torch.permute,)) or (not is_fn and target in ("permute", "t")):
            return self.permute(n, x, str(target) if not is_fn else "permute")
        if (is_fn and target in _REDUCE_FUNCS) or (not is_fn and target in _REDUCE_METHODS):
            return self.reduce(n, x)
        if is_fn and target is operator.getitem:
            return self.getitem(n, x)
        if is_fn and target in _CAT_FUNCS:
            return self.cat(n)
        if is_fn and target is torch.stack:
            return self.stack(n)
        if (is_fn and target is torch.roll) or (not is_fn and target == "roll"):
            return self.roll(n, x)
        if is_fn and target is F.glu and len(n.args) <= 2 and set(n.kwargs) <= {"dim"}:
            return self.glu(n, x, n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", -1))
        if is_fn and target in _SHUFFLE_KEYS and len(n.args) == 2 and not n.kwargs:
            return self.pixel_shuffle(n, x, n.args[1], target is torch.pixel_shuffle)
        if (is_fn and target in (torch.masked_fill, torch.where)) or (
            not is_fn and target in ("masked_fill", "masked_fill_", "where")
        ):
            return self.zero_fill(n)
        self.pin_inputs(n, f"{self.describe(n)} is an op gate_ does not prune through")
        return None

    def zero_fill(self, n: fx.Node) -> Labels | None:
        """``h.masked_fill(mask, 0.0)``, ``torch.where(mask, h, 0.0)`` or ``h.where(mask,
        0.0)`` (a padding mask of a sequence model): filling exactly 0 keeps a closed channel
        zero and commutes with a per-channel scale, so ``h``'s labels pass through when the
        mask does not vary along them (size 1 or absent there). A nonzero fill, a mask per
        channel or a labelled mask keep the channels whole, with the reason."""
        what = self.describe(n)
        if n.target is torch.where or n.target == "where":
            # where(mask, h, 0.0) or where(mask, 0.0, h); the method h.where(mask, 0.0) is
            # where(mask, h, 0.0)
            if len(n.args) != 3 or n.kwargs:
                self.pin_inputs(n, f"{what} is an op gate_ does not prune through")
                return None
            if n.target == "where":
                a, mask, b = n.args
            else:
                mask, a, b = n.args
            x, fill = (a, b) if self.lab(a) is not None else (b, a)
        else:  # masked_fill(h, mask, value), h.masked_fill(mask, value=...)
            args = [*n.args]
            for key in ("input", "mask", "value")[len(args) :]:
                if key not in n.kwargs:
                    self.pin_inputs(n, f"{what} is an op gate_ does not prune through")
                    return None
                args.append(n.kwargs[key])
            if len(args) != 3:
                self.pin_inputs(n, f"{what} is an op gate_ does not prune through")
                return None
            x, mask, fill = args
        lab = self.lab(x)
        if lab is None:  # labels only in the mask (or nowhere)
            self.pin_inputs(n, f"{what} reads labelled channels as a mask")
            return None
        if not zero_literal(fill):
            self.pin_inputs(
                n,
                f"{what} fills {fill!r}, not the literal 0 (a closed channel would not stay zero)",
            )
            return None
        if self.lab(mask) is not None:
            self.pin_inputs(n, f"{what} reads labelled channels as a mask")
            return None
        ins, out, s_m = self.shape(x), self.shape(n), self.shape(mask)
        if ins is None or out != ins or not isinstance(mask, fx.Node) or s_m is None:
            self.pin_inputs(n, f"{what} broadcasts the filled tensor to another shape")
            return None
        pos = lab.dim - (len(out) - len(s_m))
        if 0 <= pos < len(s_m) and s_m[pos] != 1:
            self.pin_inputs(
                n, f"{what} reads a mask per channel (size {s_m[pos]} along the channels)"
            )
            return None
        return lab

    def contracts_why(self, name: str, lab: Labels, in_dim: int) -> str:
        """Why module ``name`` contracting dimension ``in_dim`` keeps channels labelled on
        another dimension whole: the view that split the channel dimension named when one
        did (VAE's ``dec_fc(z).view(-1, 16, 7, 7)`` read by a convolution)."""
        split = self.split_views.get(id(lab.atoms))
        if split is None or split[0] is not lab.atoms:
            return f"{name} contracts a dimension other than the labelled one"
        _, v, width, dims = split
        return (
            f"{self.describe(v)} splits the channel dimension ({width}) into {dims} and "
            f"{name} contracts dimension {in_dim} of the result, so a channel is not one "
            "slice of its input"
        )

    def visit_module(self, n: fx.Node) -> Labels | None:
        name = str(n.target)
        m = self.gm.get_submodule(name)
        x = n.args[0] if n.args else None
        lab = self.lab(x)
        out_shape = self.shape(n)
        in_shape = self.shape(x)
        if (
            isinstance(m, _CONV + _CONVT)
            and in_shape is not None
            and len(in_shape) == len(m.kernel_size) + 1
        ):  # (C, *spatial): its channels are dim 0, not the batched layout's dim 1
            why = f"{name} ({type(m).__name__}) runs on an unbatched input"
            self.pin_inputs(n, why)
            if out_shape is None:
                return None
            own = Labels(0, self.new_space(name, out_shape[0]))  # named as left ungated
            self.pin(own, why)
            return own
        kind = module_kind(m)
        if kind is not None:
            self.kinds[name] = kind
        if isinstance(m, nn.LSTM | nn.GRU | nn.RNN) and consumer_ok(m, in_shape):
            self.recurrent(n, m, name, lab)
            return None  # the call returns a tuple: getitem 0 (the output) carries labels
        if kind == "embedding" and out_shape:
            return self.embedding(n, name, cast(nn.Embedding | nn.EmbeddingBag, m), out_shape)
        if kind in ("linear", "conv", "gconv", "convt", "gconvt") and out_shape is not None:
            in_shape = self.shape(x)
            cdim = len(out_shape) - 1 if kind == "linear" else 1
            in_dim = (len(in_shape) - 1 if in_shape else -1) if kind == "linear" else 1
            if lab is None and kind == "linear":
                lab = self.gated_input(n, name, x, in_dim)
            if lab is not None and lab.dim != in_dim:
                self.pin(lab, self.contracts_why(name, lab, in_dim))
                lab = None
            mixed = f"{name} is called more than once, also on channels that are not pruned"
            if lab is not None:
                if name in self.unlabelled_in:  # one weight for both calls: slice both or none
                    self.pin(lab, mixed)
                prev = self.module_in_atoms.get(name)
                if prev is not None:
                    self.union(prev, lab.atoms)
                else:
                    self.module_in_atoms[name] = lab.atoms
            else:
                self.unlabelled_in.add(name)
                prev = self.module_in_atoms.get(name)
                if prev is not None:
                    self.pins.append((prev, mixed))
            self.module_in[n] = lab
            if name not in self.module_space:
                self.module_space[name] = self.new_space(name, out_shape[cdim])
            if kind in ("gconv", "gconvt"):
                assert isinstance(m, _ANY_CONV)
                self.grouped(m, name, lab)
            out = Labels(cdim, self.module_space[name])
            if self.after is not None and name in self.after:  # queries of multi-query
                self.nonzero[n] = out  # attention: not gated here
                self.after_atoms.update(out.atoms.tolist())
                return None
            return out
        if kind in ("dw", "dwt"):  # output channel o reads input channel o // mult only
            assert isinstance(m, _ANY_CONV)
            self.soft_pin(lab, f"{name} (depthwise) does not take a folded input gate")
            if lab is None or lab.dim != 1:
                self.pin(lab, f"{name} (depthwise) input not labelled on channels")
                return None
            mult = m.out_channels // m.in_channels
            out = Labels(1, np.repeat(lab.atoms, mult))
            prev = self.module_space.get(name)
            if prev is not None:
                self.union(prev, out.atoms)
            else:
                self.module_space[name] = out.atoms
            self.module_in[n] = lab
            return out
        if kind in ("bn", "in", "gn"):
            what = {"bn": "BatchNorm", "in": "InstanceNorm", "gn": "GroupNorm"}[kind]
            self.soft_pin(lab, f"{name} ({what}) does not take a folded input gate")
            if lab is None:
                return None
            if lab.dim != 1:
                self.pin(lab, f"{name} normalises a dimension other than the labelled one")
                return None
            if kind == "gn":
                lab = self.group_norm(name, cast(nn.GroupNorm, m), lab)
            prev = self.module_space.get(name)
            if prev is not None:
                self.union(prev, lab.atoms)
            else:
                self.module_space[name] = lab.atoms
            return lab
        if isinstance(m, nn.Hardtanh) and not _hardtanh_zero(m.min_val, m.max_val):
            why = f"{name} (Hardtanh({m.min_val}, {m.max_val})) maps 0 to a non-zero value"
            self.pin_inputs(n, why)
            return None
        if isinstance(m, _ZERO_ACTS):
            if not isinstance(m, HOMOGENEOUS_MODULES):
                self.soft_pin(lab, f"{name} ({type(m).__name__}) is not positively homogeneous")
            return lab
        if isinstance(m, _POOLS):
            return self.pool(n, lab, m)
        if isinstance(m, PADDING_LAYERS):
            if isinstance(m, nn.ConstantPad1d | nn.ConstantPad2d | nn.ConstantPad3d) and m.value:
                self.pin_inputs(n, f"{name} pads with {m.value}, not 0")
                return None
            padding = cast(tuple[int, ...], m.padding)  # 2 per padded dimension
            return self.trailing(n, x, len(padding) // 2, "pads")
        if isinstance(m, nn.Upsample):
            ins = self.shape(x)
            return self.trailing(n, x, len(ins) - 2 if ins is not None else 0, "resizes")
        if isinstance(m, nn.Flatten):
            return self.reshape(n, x)
        if isinstance(m, nn.GLU):
            return self.glu(n, x, m.dim)
        if isinstance(m, nn.PixelShuffle):
            return self.pixel_shuffle(n, x, m.upscale_factor, True)
        if isinstance(m, nn.PixelUnshuffle):
            return self.pixel_shuffle(n, x, m.downscale_factor, False)
        if lab is not None or any(self.lab(a) is not None for a in _flat_nodes(n.args)):
            why = f"{name} ({type(m).__name__}) is not pruned through"
            if type(m) is nn.LayerNorm:
                why = "LayerNorm normalises over these channels"
            if isinstance(m, _BN):
                why = f"{name} ({type(m).__name__} without affine parameters)"
            if isinstance(m, (*_IN, nn.GroupNorm)):  # a gate after it: no weight to fold
                why = (  # into; before it: normalised away (its gradient all but zero)
                    f"{name} ({type(m).__name__} without affine parameters: a gate after it "
                    "has no weight to fold into, one before it would be normalised away; "
                    "affine=True is gated)"
                )
            if computed_weight(m):
                why = _computed_why(name, m)
            self.pin_inputs(n, why)
        layer = isinstance(m, (nn.Linear, *_ANY_CONV, *_EMBEDDINGS))
        if layer and computed_weight(m) and out_shape is not None and len(out_shape) >= 2:
            # its own output channels: named in the summary as left ungated (not sliced)
            cdim = len(out_shape) - 1 if isinstance(m, (nn.Linear, *_EMBEDDINGS)) else 1
            out = Labels(cdim, self.new_space(name, out_shape[cdim]))
            self.pin(out, _computed_why(name, m, output=True))
            return out
        return None

    def functional_norm(self, n: fx.Node) -> Labels | None:
        """``F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, ...)`` with the
        parameters and buffers of one affine ``_BatchNorm`` ``m``, its running statistics
        possibly None (timm's ``BatchNormAct2d``: a ``BatchNorm2d`` subclass whose forward
        calls it, then its ``drop`` and ``act`` children; fx traces through it), or
        ``F.group_norm(x, m.num_groups, m.weight, m.bias, eps)`` of an affine ``nn.GroupNorm``
        ``m`` (timm's ``GroupNormAct``): per channel like a call of ``m`` (its channels pass,
        it carries the gate of the channels it normalises, prune slices it as the norm). Any
        other such call keeps its input's channels whole, with the reason."""
        group = n.target is F.group_norm
        names = (
            ("input", "num_groups", "weight", "bias")
            if group
            else ("input", "running_mean", "running_var", "weight", "bias")
        )
        args = [n.args[i] if len(n.args) > i else n.kwargs.get(k) for i, k in enumerate(names)]
        x, weight = args[0], args[-2]
        reads = args[-2:] if group else args[1:]
        owner = (
            str(weight.target).rpartition(".")[0]
            if isinstance(weight, fx.Node) and weight.op == "get_attr"
            else None
        )
        m = self.root.get_submodule(owner) if owner else None
        kind = "GroupNorm" if group else "BatchNorm"
        why: str | None = None
        whole = self.rec.whole.get(n)
        if owner is None or not isinstance(m, nn.GroupNorm if group else _BN):
            why = f"its weight is not the weight of a {kind} module of the model"
        elif not m.affine:
            why = f"{owner} ({type(m).__name__} without affine parameters)"
        elif any(
            not (
                (r is None and k.startswith("running"))
                or (isinstance(r, fx.Node) and r.op == "get_attr" and r.target == f"{owner}.{k}")
            )
            for r, k in zip(reads, names[-len(reads) :], strict=True)
        ):
            what = "weight and bias" if group else "running_mean, running_var, weight and bias"
            why = f"it does not read {owner}'s own {what} as they are"
        elif group and args[1] != getattr(m, "num_groups", None):
            why = f"its num_groups {args[1]!r} is not {owner}'s"
        elif whole is not None and whole != owner:
            why = f"inside module '{whole}', which a cost handler (register_cost) counts whole"
        elif any(not self.read_once(a, [], n) for a in reads if isinstance(a, fx.Node)):
            why = f"{owner}'s parameters or buffers are read in more than one place"
        if why is not None or owner is None:
            self.pin_inputs(n, f"{self.describe(n)}: {why}")
            return None
        lab = self.lab(x)
        self.kinds[owner] = "gn" if group else "bn"
        self.fused_norms[n] = owner
        self.soft_pin(lab, f"{owner} ({kind}) does not take a folded input gate")
        if lab is None:
            return None
        if lab.dim != 1:
            self.pin(lab, f"{owner} normalises a dimension other than the labelled one")
            return None
        if group:
            lab = self.group_norm(owner, cast(nn.GroupNorm, m), lab)
        prev = self.module_space.get(owner)
        if prev is not None:
            self.union(prev, lab.atoms)
        else:
            self.module_space[owner] = lab.atoms
        return lab

    def embedding(
        self, n: fx.Node, name: str, m: nn.Embedding | nn.EmbeddingBag, out_shape: tuple[int, ...]
    ) -> Labels:
        """The output of ``nn.Embedding`` / ``nn.EmbeddingBag`` ``name``: a space of its own
        (like a Linear's output units), the columns of its weight, last dimension. A lookup
        (and a bag's sum, mean or max over its rows) maps a zero column to zero and commutes
        with a gate ``>= 0``, folded into the columns. ``max_norm`` renormalises the rows it
        looks up: its columns are kept whole (a folded gate would change the norms)."""
        self.pin_inputs(n, f"{name} ({type(m).__name__}) reads them as indices or weights")
        if name not in self.module_space:
            self.module_space[name] = self.new_space(name, out_shape[-1])
        out = Labels(len(out_shape) - 1, self.module_space[name])
        if m.max_norm is not None:
            self.pin(
                out,
                f"{name} ({type(m).__name__} with max_norm={m.max_norm}) renormalises the "
                "rows it looks up when it runs: a gate folded into its columns would change "
                "their norms",
            )
        return out

    def group_norm(self, name: str, m: nn.GroupNorm, lab: Labels) -> Labels:
        """GroupNorm ``name`` normalises each of its ``num_groups`` runs of ``C / num_groups``
        consecutive channels together: a run is pruned whole (one atom, one gate value), or
        the statistics of its other channels would change. ``GroupNorm(1, C)`` normalises all
        ``C`` together: nothing can go, the channels are kept whole, with that reason."""
        runs = lab.atoms.reshape(m.num_groups, -1)  # (groups, channels per group)
        for j in range(1, runs.shape[1]):
            self.union(runs[:, 0], runs[:, j])
        self.norm_groups.append(
            (lab.atoms, f"{name} (GroupNorm({m.num_groups}, {m.num_channels}))")
        )
        if m.num_groups == 1:
            self.pin(
                lab,
                f"{name} (GroupNorm(1, {m.num_channels})) normalises all its "
                "channels together: none can be removed without changing the others",
            )
        return lab

    def gated_input(self, n: fx.Node, name: str, x: Any, in_dim: int) -> Labels | None:
        """The query heads of multi-query attention (see ``after``) as Linear ``name`` (node
        ``n``) reads them on its input features: gated here, by a forward pre-hook on its
        input (``input_sites``), so zero at closed heads from here on; None if ``x`` carries
        none there."""
        lab = self.after_label(x)
        if lab is None or lab.dim != in_dim:
            return None
        self.nonzero_uses.add((cast(fx.Node, x), n))
        self.input_sites.setdefault(name, lab.atoms)
        return lab

    def grouped(
        self,
        m: _AnyConv,
        name: str,
        lab: Labels | None,
    ) -> None:
        """A grouped convolution (or transposed convolution) stays one with the same
        ``groups``: every group must keep the same input and the same output positions
        (channel ``j`` of each group). So the atoms at one position of every group are
        unified, on the input and on the output; a closed position removes one channel from
        each group."""
        g = m.groups
        for atoms in (None if lab is None else lab.atoms, self.module_space[name]):
            if atoms is not None:
                per_group = atoms.reshape(g, -1)  # (groups, channels per group)
                for k in range(1, g):
                    self.union(per_group[0], per_group[k])
        # a gate folded into its input would scale a column of each group's weight slice
        self.soft_pin(lab, f"{name} (grouped) does not take a folded input gate")

    def recurrent(self, n: fx.Node, m: nn.Module, name: str, lab: Labels | None) -> None:
        """A recurrent module: its input features are consumed (sliced), each direction of its
        last layer's output is a new space (the module's own gates are set up by ``gate_``)."""
        in_shape = self.shape(n.args[0])
        assert in_shape is not None
        assert isinstance(m, nn.LSTM | nn.GRU | nn.RNN)
        if lab is not None and lab.dim != len(in_shape) - 1:
            self.pin(lab, f"{name} reads a dimension other than the labelled one")
            lab = None
        # an initial state hx (positional or keyword, h0 or (h0, c0)) keeps its full width
        stack: list[Any] = [*n.args[1:], *n.kwargs.values()]
        while stack:
            a = stack.pop()
            if isinstance(a, fx.Node):
                self.pin(self.labels.get(a), f"{name} reads it as its initial state hx")
            elif isinstance(a, list | tuple):
                stack.extend(a)
        if lab is not None:
            prev = self.rnn_in_atoms.get(name)
            if prev is not None:
                self.union(prev, lab.atoms)
            else:
                self.rnn_in_atoms[name] = lab.atoms
        if name not in self.rnn_outputs:  # one space per (layer, direction) hidden state
            dirs = ("forward", "reverse") if m.bidirectional else ("forward",)
            self.rnn_outputs[name] = [
                self.new_space(f"{name}:{layer}:{d}", m.hidden_size)
                for layer in range(m.num_layers)
                for d in dirs
            ]
        d = 2 if m.bidirectional else 1
        last = self.rnn_outputs[name][-d:]
        self.rnn_out[name] = Labels(len(in_shape) - 1, np.concatenate(last))
        self.rnn_nodes[n] = (name, "call")
        return None

    def recurrent_item(self, n: fx.Node, src: fx.Node) -> Labels | None:
        """``(out, state)[i]``, ``(h_n, c_n)[i]`` and ``h_n[i]`` (one layer and direction)."""
        name, what = self.rnn_nodes[src]
        spaces = self.rnn_outputs[name]
        if what == "h":  # h_n[i], h_n[i, :, :], h_n.squeeze(0) of one row
            i = state_item(n, len(spaces))
        else:
            i = item_index(n, 2) if n.op == "call_function" else None  # -1 -> last, ...
        if i is None:
            return None  # gate_ leaves the module ungated (see rnn.setup_rnns)
        if what == "call":
            if i == 0:
                return self.rnn_out[name]
            lstm = isinstance(self.gm.get_submodule(name), nn.LSTM)
            self.rnn_nodes[n] = (name, "state" if lstm else "h")
        elif what == "state" and i == 0:
            self.rnn_nodes[n] = (name, "h")
        elif what == "h":
            out = self.shape(n)
            assert out is not None
            return Labels(len(out) - 1, spaces[i % len(spaces)])
        return None

    def pool(self, n: fx.Node, lab: Labels | None, op: object) -> Labels | None:
        """A pool over the last 1, 2 or 3 dims keeps the labels of an earlier dimension: the
        channels of a batched ``(B, C, *S)`` or an unbatched ``(C, *S)`` input. A labelled
        dimension among the pooled ones is pinned (a 1-d pool of ``(B, C)``, a 3-d pool of
        ``(B, C, H, W)``, which it reads as an unbatched ``(C, D, H, W)``, pool the channels).
        With ``return_indices`` the call returns ``(values, indices)``: see
        :meth:`pool_indices`."""
        if lab is None:
            return None
        ins = self.shape(n.args[0] if n.args else None)
        if ins is None or lab.dim >= len(ins) - _pool_rank(op):
            self.pin(lab, f"{self.describe(n)} pools over the labelled dimension")
            return None
        if _returns_indices(op):
            return self.pool_indices(n, lab)
        return lab

    def pool_indices(self, n: fx.Node, lab: Labels) -> Labels | None:
        """A max pool returning ``(values, indices)``: the values (item 0) carry the channels.
        The indices are positions within each channel's map, not zero at a closed channel
        (the first position of each window), so the channels are kept whole if the code reads
        them, or reads the pair other than by item. The call's own labels scale its cost."""
        for u in n.users:
            item = u.args[1] if len(u.args) == 2 else None
            is_item = u.op == "call_function" and u.target is operator.getitem
            if not is_item or not isinstance(item, int) or isinstance(item, bool):
                why = f"{self.describe(u)} reads the (values, indices) of {self.describe(n)}"
            elif item in (1, -1) and u.users:
                why = (
                    f"{self.describe(n)} returns indices (return_indices=True), which are not "
                    f"zero at closed channels, and {self.describe(u)} is read"
                )
            else:
                continue
            self.pin(lab, why)
            return None
        self.pieces[n] = [lab, lab]  # the indices item: no reader (checked above)
        return lab

    def trailing(self, n: fx.Node, x: Any, k: int, verb: str) -> Labels | None:
        """Padding or interpolation of the last ``k`` dimensions: linear and per channel, so
        labels on an earlier dimension are kept (zero channels stay zero)."""
        lab = self.lab(x)
        if lab is None:
            return None
        ins, out = self.shape(x), self.shape(n)
        if ins is None or out is None or len(out) != len(ins) or k <= 0 or lab.dim >= len(ins) - k:
            self.pin(lab, f"{self.describe(n)} {verb} the labelled dimension")
            return None
        return lab

    def complex_view(self, n: fx.Node, x: Any) -> Labels | None:
        """``torch.view_as_complex(t)`` (the last dimension, of 2, read as the real and
        imaginary parts: dropped) or ``torch.view_as_real(t)`` (a last dimension of 2 added):
        the other dimensions are kept, so are labels on one of them (Meta's rotary embeddings
        of q ``(B, T, H, D / 2, 2)``, heads labelled); a closed channel, zero, stays zero."""
        lab = self.lab(x)
        ins = self.shape(x)
        if lab is None or ins is None:
            return None
        if n.target is torch.view_as_complex and lab.dim == len(ins) - 1:
            self.pin(lab, f"{self.describe(n)} pairs the labelled channels into complex numbers")
            return None
        return lab

    def cast(self, n: fx.Node, x: Any) -> Labels | None:
        """``t.type_as(other)`` / ``t.to(...)`` keeping ``t``'s shape: a change of dtype or
        device, the channels carried (another tensor argument gives only its dtype and
        device), as ``t.float()``."""
        self.dtype_reads(n, [a for a in _flat_nodes((n.args[1:], n.kwargs))])
        lab = self.lab(x)
        if lab is None:
            return None
        if self.shape(x) != self.shape(n):
            self.pin(lab, f"{self.describe(n)} changes the shape")
            return None
        return lab

    def dtype_reads(self, n: fx.Node, others: list[fx.Node]) -> None:
        """``others``, tensors cast ``n`` (``t.type_as(other)``, ``t.to(other)``) reads only for
        their dtype and device: a reading of nonzero labels that needs no zeros."""
        for a in others:
            if a in self.nonzero:
                self.nonzero_uses.add((a, n))

    def reshape(self, n: fx.Node, x: Any) -> Labels | None:
        lab = self.lab(x)
        if lab is None:
            return None
        ins, outs = self.shape(x), self.shape(n)
        assert ins is not None
        assert outs is not None
        shuffled = self.shuffle_split(n, lab, ins, outs)  # before (G, 1) reads as a merge
        if shuffled is not None:
            return shuffled
        d = lab.dim
        pre_prods = [_prod(ins[:j]) for j in range(len(ins) + 1)]
        for e in range(len(outs)):
            p = _prod(outs[:e])
            for j in range(d + 1):
                if pre_prods[j] != p:
                    continue
                for k in range(d + 1, len(ins) + 1):
                    if pre_prods[k] == p * outs[e]:
                        outer = _prod(ins[j:d])
                        inner = _prod(ins[d + 1 : k])
                        atoms = np.tile(np.repeat(lab.atoms, inner), outer)
                        found, arg = _size_arg(n, e - len(outs))
                        out = Labels(e, atoms)
                        if found and not (arg == -1 or self.derived_size(arg, out)):
                            # a literal, or another tensor's size (the unpruned input's
                            # width, as attention code merges its heads): the pruned code
                            # gets the pruned size
                            if isinstance(arg, fx.Node | int) and not isinstance(arg, bool):
                                self.sizes[n] = [(e - len(outs), atoms, 1)]
                            else:
                                self.pin(lab, f"{self.describe(n)} gives the size as {arg!r}")
                                return None
                        elif not found and _has_sizes(n):
                            self.pin(lab, f"{self.describe(n)} {_WHOLE_SHAPE}")
                            return None
                        return out
        heads = self.head_split(n, lab, ins, outs)
        if heads is not None:
            return heads
        self.pin(
            lab,
            f"{self.describe(n)} splits the labelled dimension other than into (heads, head "
            "size) or (pieces, heads, head size)",
        )
        return None

    def reshape_as(self, n: fx.Node, x: Any) -> Labels | None:
        """``a.reshape_as(b)`` / ``a.view_as(b)``, ``a.reshape(b.shape)``: ``a``'s labels map
        as for ``reshape`` and the pruned code takes ``b``'s pruned shape, right when ``b``
        carries channels on the same dimension, unified with them (pruned alike: LeViT's
        ``self.bn(x.flatten(0, 1)).reshape_as(x)``). Labels on one side only, or on other
        dimensions, are kept whole with the reason."""
        other = n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
        lab, other_lab = self.lab(x), self.lab(other)
        if lab is None and other_lab is None:
            return None
        why = f"{self.describe(n)} takes the shape of a tensor whose gated channels differ"
        out = self.reshape(n, x) if lab is not None else None
        if lab is not None and out is None:
            self.pin(other_lab, why)  # (the reshape rule pinned lab, with its reason)
            return None
        if out is None or other_lab is None or other_lab.dim != out.dim:
            self.pin(lab, why)
            self.pin(other_lab, why)
            return None
        self.union(out.atoms, other_lab.atoms)
        return out

    def derived_size(self, a: Any, lab: Labels) -> bool:
        """Whether size value ``a`` is computed only from sizes of tensors carrying ``lab``'s
        channels (``h.view(b, c * l)`` with ``c = h.size(1)``), or channels pruned alike one
        to one (:meth:`same_units`: a channel shuffle's merge ``view(b, c, h, w)`` with ``c``
        read before the shuffle): the pruned code computes the pruned size itself."""
        stack, found = [a], False
        while stack:
            v = stack.pop()
            if not isinstance(v, fx.Node):
                if isinstance(v, int) and not isinstance(v, bool):
                    continue  # a factor such as the 4 of c // 4: only with a size read
                return False
            t = v.target
            if (v.op == "call_method" and t == "size") or (
                v.op == "call_function" and t is builtins.getattr and v.args[1:] == ("shape",)
            ):
                src = self.lab(v.args[0])
                if src is None or not (
                    np.array_equal(np.unique(src.atoms), np.unique(lab.atoms))
                    or self.same_units(src.atoms, lab.atoms)
                ):
                    return False
                found = True
            elif v.op == "call_function" and t in (operator.getitem, operator.mul):
                stack.extend(v.args)
            else:
                return False
        return found

    def shuffle_split(
        self, n: fx.Node, lab: Labels, ins: tuple[int, ...], outs: tuple[int, ...]
    ) -> Labels | None:
        """``(..., C, ...) -> (..., G, C // G, ...)`` written ``x.view(b, g, c // g, h, w)``
        with ``g`` a literal int and ``c`` read from the labelled channels (``x.size(1)``,
        ``x.shape[1]``): a channel shuffle (ShuffleNet's ``channel_shuffle``, transposed and
        merged back after). Channel ``j`` of every group is pruned with channel ``j`` of the
        first (each group keeps the same positions), the ``C // G`` dimension carries the
        labels, and the pruned code computes ``c' // g`` itself, so the transpose and merge
        interleave the kept channels exactly as the original does. None if ``n`` is not one
        (the ``c // g`` is then a read of the width that :meth:`size_read` keeps whole).

        >>> import torch.nn as nn
        >>> from gatedprune.gating import gate_
        >>> class Shuffle(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         y = self.a(x)  # (B, 8, H, W)
        ...         b, c, h, w = y.size()
        ...         y = y.view(b, 2, c // 2, h, w).transpose(1, 2)  # (B, 4, 2, H, W)
        ...         return self.b(y.reshape(b, -1, h, w))  # (B, 2, H, W)
        >>> gate_(Shuffle(), torch.randn(1, 3, 4, 4)).channel_groups
        [(['a'], 4)]
        """
        d = lab.dim
        pre = _prod(ins[:d])
        for e in range(len(outs) - 1):
            g, per = outs[e], outs[e + 1]
            if _prod(outs[:e]) != pre or g * per != ins[d] or g <= 1:
                continue
            found, groups = _size_arg(n, e - len(outs))
            found_size, size = _size_arg(n, e + 1 - len(outs))
            if not (found and found_size and _literal_int(groups) and groups == g):
                continue
            computed = (
                isinstance(size, fx.Node)
                and size.op == "call_function"
                and size.target is operator.floordiv
                and len(size.args) == 2
                and not size.kwargs
                and _literal_int(size.args[1])
                and size.args[1] == g
                and self.derived_size(size.args[0], lab)
            )
            # view(b, g, -1, h, w) / view(b, g, 4, h, w): a head split too (attention's
            # view(B, T, H, -1)); a shuffle only if the groups are swapped with it next
            written = (size == -1 or (_literal_int(size) and size == per)) and self.swapped(n, e)
            if not (computed or written):
                continue
            blocks = lab.atoms.reshape(g, per)  # (G, C // G)
            for b in blocks[1:]:
                self.union(blocks[0], b)
            if computed:
                self.shuffle_sizes.add(size)
            elif size != -1:  # a literal: the pruned code gets the kept count
                self.sizes[n] = [(e + 1 - len(outs), blocks[0].copy(), 1)]
            self.shuffle_views.add(n)
            return Labels(e + 1, blocks[0].copy())
        return None

    def swapped(self, n: fx.Node, e: int) -> bool:
        """Whether every reader of ``n`` transposes its dimensions ``e`` and ``e + 1`` (a
        channel shuffle's ``torch.transpose(x, 1, 2)``), through ``contiguous`` or not."""
        rank = len(self.shape(n) or ())
        users = list(n.users)
        while len(users) == 1 and users[0].op == "call_method" and users[0].target == "contiguous":
            users = list(users[0].users)
        if not users or not rank:
            return False
        for u in users:
            if not (
                (u.op == "call_method" and u.target == "transpose")
                or (u.op == "call_function" and u.target is torch.transpose)
            ):
                return False
            d0 = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim0")
            d1 = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim1")
            if not (_literal_int(d0) and _literal_int(d1)):
                return False
            if {cast(int, d0) % rank, cast(int, d1) % rank} != {e, e + 1}:
                return False
        return True

    def head_split(
        self, n: fx.Node, lab: Labels, ins: tuple[int, ...], outs: tuple[int, ...]
    ) -> Labels | None:
        """``(..., C, ...) -> (..., H, D, ...)``: the labelled channels split into ``H`` heads
        of ``D``. The ``D`` channels of a head become one atom (a head is pruned whole), the
        heads dimension carries the labels, and the pruned code's size ``H`` is rewritten to
        the kept heads. Also ``(..., P, H, D, ...)``, a fused projection's ``P`` pieces (timm's
        ``qkv.reshape(B, N, 3, heads, head_size)``): head ``h`` of every piece is one atom."""
        d = lab.dim
        pre = _prod(ins[:d])
        for k in (2, 3):  # (H, D), then (P, H, D)
            for e in range(len(outs) - k + 1):
                dims = outs[e : e + k]
                if _prod(outs[:e]) != pre or _prod(dims) != ins[d] or dims[-1] <= 1:
                    continue
                at = e + k - 2  # the heads dimension
                if not _size_arg(n, at - len(outs))[0]:
                    unflat = _unflatten_args(n)
                    if unflat is not None and isinstance(unflat[0], int) and unflat[0] >= 0:
                        why = "unflattens a dimension counted from the front (write it as -1, say)"
                        self.pin(lab, f"{self.describe(n)} {why}")
                        return None
                    self.pin(lab, f"{self.describe(n)} {_WHOLE_SHAPE}")
                    return None
                blocks = lab.atoms.reshape(-1, dims[-2], dims[-1])  # (P, H, D)
                first = blocks[0, :, 0]
                for i in range(blocks.shape[0]):
                    for j in range(blocks.shape[2]):
                        if i or j:
                            self.union(first, blocks[i, :, j])
                atoms = first.copy()
                self.split_views[id(atoms)] = (atoms, n, ins[d], tuple(dims))
                self.head_atoms.update(atoms.tolist())
                self.sizes[n] = [(at - len(outs), atoms, 1)]
                return Labels(at, atoms)
        return None

    def is_heads(self, lab: Labels | None) -> bool:
        return lab is not None and bool(np.isin(lab.atoms, list(self.head_atoms)).any())

    def split_channels(self, n: fx.Node) -> bool:
        """``t.split(size, dim)`` / ``t.chunk(n, dim)`` / ``torch.split`` / ``tensor_split`` /
        ``unbind`` of a labelled tensor. Along a dimension other than the labelled one (the
        halves of each head's ``head_dim`` that rotary embeddings rotate, ``q, k, v =
        qkv.unbind(0)``), every piece carries the input's channels (see
        :meth:`split_elsewhere`). Along the labelled dimension, ``chunk(n)``, ``split(c)`` and
        ``split`` into literal sections are sections pruned apart (:meth:`split_sections`; a
        chunk becomes a split into the kept sections): an op that combines pieces channel by
        channel (SwiGLU's ``a * silu(b)``, attention's ``q @ k^T``) prunes their channels
        together itself. Into equal pieces whose size the forward computes (``split(c)``, ``c``
        a size read from a tensor) or ``tensor_split(n)``: piece ``i``'s channel ``j`` and
        piece 0's are pruned together (the pieces stay equal), and a computed split size is
        rewritten to the kept piece width; at literal indices, see :meth:`split_sections`.
        A split of the labelled dimension gate_ cannot follow keeps the
        channels whole, with the reason. False if ``n`` is not a split of labelled channels."""
        meth, fn = n.op == "call_method", n.op == "call_function"
        unbind = (meth and n.target == "unbind") or (fn and n.target is torch.unbind)
        tsplit = (meth and n.target == "tensor_split") or (fn and n.target is torch.tensor_split)
        is_split = (meth and n.target in ("split", "chunk")) or (
            fn and n.target in (torch.split, torch.chunk)
        )
        x = n.args[0] if n.args else None
        lab, ins = self.lab(x), self.shape(x)
        if not (unbind or tsplit or is_split) or lab is None or ins is None:
            return False
        at = 1 if unbind else 2  # the position of ``dim`` (after the size for the others)
        dim: Any = n.args[at] if len(n.args) > at else n.kwargs.get("dim", 0)
        if not _literal_int(dim):
            self.pin(
                lab,
                f"{self.describe(n)} splits along dimension {dim!r}, not an int written in the "
                "code: the channels are kept whole",
            )
            return True
        dim %= len(ins)
        if dim != lab.dim:
            return self.split_elsewhere(n, lab, dim, unbind)
        if unbind:
            self.pin(
                lab,
                f"{self.describe(n)} unbinds the labelled dimension (one tensor per channel): "
                "the channels are kept whole",
            )
            return True
        if tsplit:
            return self.tensor_split(n, lab, ins)
        chunk = n.target in ("chunk", torch.chunk)
        key = "chunks" if chunk else "split_size"
        arg: Any = n.args[1] if len(n.args) > 1 else n.kwargs.get(key)
        if fn and not chunk and arg is None:
            arg = n.kwargs.get("split_size_or_sections")
        if not chunk and isinstance(arg, list | tuple):  # split((d, kv * hd, kv * hd))
            return self.split_sections(n, lab, ins, arg, "section")
        width = ins[lab.dim]
        unequal = (
            f"{self.describe(n)} splits the labelled dimension ({width} channels) by {arg!r} "
            "into pieces that are not all of one size: the channels are kept whole"
        )
        if not chunk and isinstance(arg, fx.Node):  # split(c), c = x.size(-1) computed
            computed = self.split_size_of(n, dim)
            if computed is None:
                self.pin(
                    lab,
                    f"{self.describe(n)} splits the labelled dimension by a size computed by "
                    "the forward whose pieces are not read: the channels are kept whole",
                )
                return True
            if self.derived_size(arg, lab):  # from the split tensor's width: stays right
                if width % computed:
                    self.pin(lab, unequal)
                    return True
                self.equal_pieces(n, lab, computed)
                return True
            arg = computed  # another tensor's size: the pruned code gets the kept width
        if not _literal_int(arg):
            self.pin(
                lab,
                f"{self.describe(n)} splits the labelled dimension by {arg!r}, not an int "
                "written in the code: the channels are kept whole",
            )
            return True
        size = -(-width // arg) if chunk else arg
        if size <= 0 or width % size != 0:
            self.pin(lab, unequal)
            return True
        if isinstance(n.args[1] if len(n.args) > 1 else None, fx.Node) or any(
            isinstance(v, fx.Node) for v in n.kwargs.values()
        ):  # split(c), c another tensor's size: the pruned code gets one kept width
            blocks = self.equal_pieces(n, lab, size)
            self.sizes[n] = [("split_size", blocks[0].copy(), 1)]
            return True
        if chunk and self.fixed_code is not None and self.fixed_code(n):
            self.equal_pieces(n, lab, size)  # chunk(n) stays right with equal kept pieces
            return True
        # chunk(n) / split(c), literal: each piece a section of its own (the pruned code
        # splits into the kept sections); an op combining pieces channel by channel (GLU's
        # a * silu(b)) prunes their channels together itself
        return self.split_sections(n, lab, ins, [size] * (width // size), "section")

    def equal_pieces(self, n: fx.Node, lab: Labels, size: int) -> np.ndarray:
        """Split node ``n`` cuts labelled channels ``lab`` into equal pieces of ``size``:
        position ``i`` of every piece is pruned with position ``i`` of the others (each piece
        keeps the same count). Records the pieces; returns the atoms, (pieces, size)."""
        blocks = lab.atoms.reshape(-1, size)  # (pieces, size)
        for b in blocks[1:]:
            self.union(blocks[0], b)
        self.pieces[n] = [Labels(lab.dim, b.copy()) for b in blocks]
        return blocks

    def split_elsewhere(self, n: fx.Node, lab: Labels, dim: int, unbind: bool) -> bool:
        """A split, chunk, tensor_split or unbind of a labelled tensor along dimension ``dim``,
        not the labelled one (rotary embeddings' ``x1, x2 = x.chunk(2, dim=-1)`` of q of shape
        ``(B, H, T, head_dim)``, heads labelled): every piece carries the same channels at the
        same index (``unbind`` removes ``dim``: one fewer before it). The pieces' sizes are
        along a dimension ``prune`` leaves alone, so the pruned code splits alike unchanged.
        The trace ran, so every ``getitem`` of ``n`` is a valid piece; any other reader of the
        pieces keeps the channels whole (see ``run``). A split of a key/value head repeated
        for the query heads along the repeated dimension, whose size ``prune`` rewrites to the
        kept query heads, keeps them whole."""
        x = n.args[0]
        copied = self.copies.get(x) if isinstance(x, fx.Node) else None
        if copied is not None and copied[0] % len(self.shape(x) or ()) == dim:
            self.pin(
                lab,
                f"{self.describe(n)} splits a dimension whose size prune rewrites (a key/value "
                "head repeated for the query heads): the channels are kept whole",
            )
            return True
        piece = Labels(lab.dim - (1 if unbind and dim < lab.dim else 0), lab.atoms)
        count = 1
        for u in n.users:
            item = u.args[1] if u.op == "call_function" and u.target is operator.getitem else None
            if _literal_int(item):
                count = max(count, cast(int, item) + 1, -cast(int, item))
        self.pieces[n] = [piece] * count
        return True

    def tensor_split(self, n: fx.Node, lab: Labels, ins: tuple[int, ...]) -> bool:
        """``t.tensor_split(indices, dim)`` / ``torch.tensor_split`` of labelled channels at
        literal indices (``(d, d + kv * hd)``: q, k, v of a fused projection): as
        :meth:`split_sections`, each index rewritten to the kept channels before it; with a
        number of sections dividing the width, as ``chunk`` (equal pieces pruned together).
        False if ``n`` splits another dimension."""
        arg: Any = n.args[1] if len(n.args) > 1 else None
        for kw in ("indices_or_sections", "indices", "sections", "tensor_indices_or_sections"):
            arg = n.kwargs.get(kw, arg)
        dim: Any = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        if not isinstance(dim, int) or dim % len(ins) != lab.dim:
            return False
        width = ins[lab.dim]
        if _literal_int(arg) and arg > 0 and width % arg == 0:
            self.equal_pieces(n, lab, width // arg)  # as chunk(arg)
            return True
        if not isinstance(arg, list | tuple) or not all(_literal_int(a) for a in arg):
            self.pin(
                lab,
                f"{self.describe(n)} splits the channels at {arg!r}, not at literal indices "
                "nor into a number of equal sections: the channels are kept whole",
            )
            return True
        bounds = [0, *arg, width]
        if not arg or any(a > b for a, b in itertools.pairwise(bounds)):
            self.pin(
                lab,
                f"{self.describe(n)} splits the channels at indices {tuple(arg)} that do not "
                f"increase within the width {width}: the channels are kept whole",
            )
            return True
        sizes = [b - a for a, b in itertools.pairwise(bounds)]
        return self.split_sections(n, lab, ins, sizes, "index")

    def split_sections(
        self, n: fx.Node, lab: Labels, ins: tuple[int, ...], sections: Sequence[Any], key: str
    ) -> bool:
        """A split of labelled channels into literal sections, not all equal (grouped- or
        multi-query attention's fused ``qkv.split((d, kv * hd, kv * hd), dim=-1)``): each
        ``getitem`` carries its own section's labels (nothing is pruned together here; the
        attention after it ties q's heads to k's and v's), and the pruned code's section
        ``i`` (``key`` ``"section"``: the ``"section_i"`` size) or index ``i`` (``"index"``,
        ``tensor_split``: the ``"index_i"`` size, the kept channels before it) is rewritten.
        Sections that are not literal ints or do not add up to the width keep the channels
        whole, with the reason."""
        width = ins[lab.dim]
        if not all(_literal_int(a) for a in sections):
            self.pin(
                lab,
                f"{self.describe(n)} splits the channels into sections {tuple(sections)!r} "
                "computed by the forward, not written as ints: they are kept whole",
            )
            return True
        if sum(sections) != width or any(a < 0 for a in sections):
            return False  # torch raises for these; the trace would have failed
        ends = np.cumsum([0, *sections])  # (pieces + 1,)
        self.pieces[n] = [
            Labels(lab.dim, lab.atoms[a:b].copy()) for a, b in itertools.pairwise(ends)
        ]
        for piece in self.pieces[n][1:]:
            self.own_space(piece.atoms)
        if key == "section":
            self.sizes[n] = [
                (f"section_{i}", lab.atoms[a:b].copy(), 1)
                for i, (a, b) in enumerate(itertools.pairwise(ends))
            ]
        else:  # tensor_split's indices: index i is the width of the sections before it
            self.sizes[n] = [
                (f"index_{i}", lab.atoms[:b].copy(), 1) for i, b in enumerate(ends[1:-1])
            ]
        return True

    def own_space(self, atoms: np.ndarray) -> None:
        """Move ``atoms``, output channels of a Linear or (ungrouped) convolution (a section
        of its output split unevenly), into a space of their own, so they form a channel group
        apart from the layer's other channels unless they are pruned together with them (a
        multi-query attention's key/value head kept whole, its query heads gated). Atoms of
        other spaces stay."""
        space_of = np.asarray(self.space_of, dtype=np.int64)
        for sid in np.unique(space_of[atoms]).tolist():
            name = self.space_names[sid]
            if self.kinds.get(name) not in ("linear", "conv", "convt"):
                continue
            if np.isin(np.flatnonzero(space_of == sid), atoms).all():
                continue  # a space of these atoms alone already (split again: a second call)
            new = len(self.space_names)
            self.space_names.append(name)
            for a in atoms[space_of[atoms] == sid].tolist():
                self.space_of[a] = new

    def split_size_of(self, n: fx.Node, dim: int) -> int | None:
        """The size of the first piece of split node ``n`` along ``dim``, read from the shape
        of its ``getitem(n, 0)`` (the size was computed by the forward); None if unread."""
        for u in n.users:
            if u.op == "call_function" and u.target is operator.getitem and u.args[1:] == (0,):
                shape = self.shape(u)
                if shape is not None:
                    return int(shape[dim])
        return None

    def permute(self, n: fx.Node, x: Any, how: str) -> Labels | None:
        lab = self.lab(x)
        ins = self.shape(x)
        if lab is None or ins is None:
            return None
        nd = len(ins)
        if how == "t":
            perm = list(range(nd))[::-1]
        elif how == "transpose":
            a = _int(n.args[1] if len(n.args) > 1 else n.kwargs["dim0"]) % nd
            b = _int(n.args[2] if len(n.args) > 2 else n.kwargs["dim1"]) % nd
            perm = list(range(nd))
            perm[a], perm[b] = perm[b], perm[a]
        else:
            dims: Any = n.args[1:] if n.op == "call_method" else n.args[1]
            if n.op == "call_method" and len(dims) == 1 and isinstance(dims[0], list | tuple):
                dims = dims[0]
            perm = [_int(v) % nd for v in dims]
        return Labels(perm.index(lab.dim), lab.atoms)

    def glu(self, n: fx.Node, x: Any, dim: object) -> Labels | None:
        """``F.glu(x, dim)`` / ``nn.GLU(dim)``: ``a * sigmoid(b)`` with ``a, b`` the halves of
        ``x`` along ``dim``, as ``a, b = x.chunk(2, dim); a * torch.sigmoid(b)``. Along the
        labelled dimension, channel ``i`` of ``a`` and of ``b`` are pruned together (the
        halves stay equal, so the pruned code's ``glu`` splits the kept channels alike) and
        the output carries ``a``'s labels. Along another dimension each output element is
        ``a * sigmoid(b)`` of one channel's two entries, zero where that channel is closed:
        the labels pass on the same dimension (that one is halved). Either way a gate
        folded into a consumer would not commute with the sigmoid (soft pin)."""
        lab, ins = self.lab(x), self.shape(x)
        if lab is None or ins is None:
            return None
        if not _literal_int(dim):
            why = f"{self.describe(n)} halves dimension {dim!r}, not an int written in the code"
            self.pin(lab, why)
            return None
        d = cast(int, dim) % len(ins)
        self.soft_pin(lab, f"{self.describe(n)} multiplies gated channels together (GLU)")
        if d != lab.dim:
            return Labels(lab.dim, lab.atoms)
        if self.is_heads(lab):
            self.pin(lab, f"{self.describe(n)} halves a dimension of attention heads")
            return None
        halves = lab.atoms.reshape(2, -1)  # (2, channels of a half)
        self.union(halves[0], halves[1])
        return Labels(lab.dim, halves[0].copy())

    def pixel_shuffle(self, n: fx.Node, x: Any, r: object, up: bool) -> Labels | None:
        """``F.pixel_shuffle(x, r)`` / ``nn.PixelShuffle(r)`` (``up``) and the unshuffles, on
        ``(*, C, H, W)``: output channel ``c`` of a shuffle is the run of input channels
        ``c * r**2 .. c * r**2 + r**2 - 1`` moved into space, so each run is one atom (pruned
        whole, one gate value, like a GroupNorm's run) and the output channel carries it; an
        unshuffle's output channels ``c * r**2 ..`` carry input channel ``c``. The pruned
        code keeps the op with the kept channels. Labels on a dimension before the channels
        pass; on ``H`` or ``W`` (moved between positions) the channels are kept whole."""
        lab, ins = self.lab(x), self.shape(x)
        if lab is None or ins is None:
            return None
        cdim = len(ins) - 3
        if not _literal_int(r) or cast(int, r) < 1:
            why = f"{self.describe(n)} shuffles by {r!r}, not a positive int written in the code"
            self.pin(lab, why)
            return None
        if lab.dim > cdim:
            why = (
                f"{self.describe(n)} moves entries of the gated dimension {lab.dim} (not its "
                f"channels, dimension {cdim}) between positions"
            )
            self.pin(lab, why)
            return None
        if lab.dim < cdim:
            return Labels(lab.dim, lab.atoms)
        rr = cast(int, r) ** 2
        if not up:
            return Labels(cdim, np.repeat(lab.atoms, rr))
        runs = lab.atoms.reshape(-1, rr)  # (output channels, r * r)
        for j in range(1, rr):
            self.union(runs[:, 0], runs[:, j])
        return Labels(cdim, runs[:, 0].copy())

    def roll(self, n: fx.Node, x: Any) -> Labels | None:
        """``torch.roll(x, shifts, dims)`` (``x.roll(...)``): along dimensions other than the
        labelled one it moves each channel's values within that channel (Swin's shifted
        windows), so the labels pass; rolling the labelled dimension, or with ``dims``
        unset (the flattened tensor), mixes the channels: kept whole, with why."""
        lab = self.lab(x)
        ins = self.shape(x)
        if lab is None or ins is None:
            return None
        dims: Any = n.args[2] if len(n.args) > 2 else n.kwargs.get("dims")
        listed = list(dims) if isinstance(dims, list | tuple) else [dims]
        if dims is None or (isinstance(dims, list | tuple) and not dims):
            self.pin(lab, f"{self.describe(n)} rolls the flattened tensor (no dims)")
            return None
        if not all(_literal_int(d) for d in listed):
            self.pin(lab, f"{self.describe(n)} rolls dimensions {dims!r}, not written as ints")
            return None
        if lab.dim in [_int(d) % len(ins) for d in listed]:
            self.pin(lab, f"{self.describe(n)} rolls the channels' dimension {lab.dim}")
            return None
        return lab

    def max_over(self, n: fx.Node) -> bool:
        """``torch.max(x, dim)`` / ``x.min(dim=...)`` (a ``(values, indices)`` pair): over a
        dimension other than the labelled one it keeps the channels, and for a gate g >= 0,
        ``max(g x) = g max(x)``, so the gate folds into the consumer as after a mean."""
        fns = (torch.max, torch.min)
        if not (
            (n.op == "call_function" and n.target in fns)
            or (n.op == "call_method" and n.target in ("max", "min"))
        ):
            return False
        has_dim = (len(n.args) > 1 and isinstance(n.args[1], int)) or "dim" in n.kwargs
        if not has_dim:
            return False
        self.pairs[n] = self.reduce(n, n.args[0])
        return True

    def reduce(self, n: fx.Node, x: Any) -> Labels | None:
        lab = self.lab(x)
        ins = self.shape(x)
        if lab is None or ins is None:
            return None
        dim: Any = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keep = bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
        if dim is None:
            self.pin(lab, f"{self.describe(n)} reduces over all dimensions")
            return None
        dims = {_int(v) % len(ins) for v in (dim if isinstance(dim, list | tuple) else [dim])}
        if lab.dim in dims:
            why = f"{self.describe(n)} reduces over the labelled dimension"
            if n.target in (torch.mean, "mean"):  # RMSNorm's x.pow(2).mean(-1, keepdim=True)
                why += (
                    ": it normalises over these channels (a mean over them, as RMSNorm's "
                    "x.pow(2).mean(-1) or LayerNorm computes, changes if any is removed)"
                )
            self.pin(lab, why)
            return None
        new = lab.dim if keep else lab.dim - sum(1 for v in dims if v < lab.dim)
        return Labels(new, lab.atoms)

    def getitem(self, n: fx.Node, x: Any) -> Labels | None:
        lab = self.lab(x)
        ins = self.shape(x)
        if lab is None or ins is None:
            return None
        idx = n.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(it is Ellipsis for it in items):
            pos = items.index(Ellipsis)
            n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
            items = [*items[:pos], *([slice(None)] * (len(ins) - n_real)), *items[pos + 1 :]]
        out_dim = 0
        in_dim = 0
        for it in items:
            if it is None:
                out_dim += 1
                continue
            if in_dim == lab.dim:
                if it != slice(None) and not _whole_slice(it, ins[lab.dim]):
                    return self.channel_slice(n, lab, it, out_dim, ins)
                return Labels(out_dim, lab.atoms)
            if isinstance(it, int):
                in_dim += 1
            elif isinstance(it, slice):
                in_dim += 1
                out_dim += 1
            else:
                break
        else:
            return Labels(out_dim + (lab.dim - in_dim), lab.atoms)
        self.pin(lab, f"{self.describe(n)} indexes the labelled dimension")
        return None

    def channel_slice(
        self, n: fx.Node, lab: Labels, it: Any, out_dim: int, ins: tuple[int, ...]
    ) -> Labels | None:
        """``x[:, a:b]``: item ``it`` of the index slices labelled channels
        ``lab`` with literal bounds ``0 <= a <= b`` (``None`` for either end), step 1 (ReXNet's
        partial residual, ``torch.cat([x[:, 0:c] + shortcut, x[:, c:]], dim=1)``, the second
        empty when ``c`` is the width): a section
        of the channels, as a split's, carrying channels ``a:b`` (pruned apart from the rest),
        its literal bounds rewritten to the kept channels before them (sizes ``"start_i"`` /
        ``"stop_i"``). Any other index of the labelled dimension keeps the channels whole."""
        width = ins[lab.dim]
        bounds = (it.start, it.stop) if isinstance(it, slice) and it.step in (None, 1) else None
        ok = bounds is not None and all(
            b is None or (_literal_int(b) and 0 <= b <= width) for b in bounds
        )
        if not ok or not isinstance(n.args[1], tuple) or n.args[1].count(it) != 1:
            self.pin(lab, f"{self.describe(n)} indexes the labelled dimension")
            return None
        assert bounds is not None
        pos = n.args[1].index(it)  # in the index as written (an Ellipsis counts one)
        a = 0 if bounds[0] is None else int(bounds[0])
        b = width if bounds[1] is None else int(bounds[1])
        if a > b:
            self.pin(lab, f"{self.describe(n)} indexes the labelled dimension (no channels)")
            return None
        piece = lab.atoms[a:b].copy()
        self.own_space(piece)
        self.sizes[n] = [
            (f"{end}_{pos}", lab.atoms[:v].copy(), 1)
            for end, v, given in (("start", a, bounds[0]), ("stop", b, bounds[1]))
            if given is not None
        ]
        return Labels(out_dim, piece)

    def cat(self, n: fx.Node) -> Labels | None:
        tensors = n.args[0] if n.args else n.kwargs["tensors"]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        out = self.shape(n)
        assert out is not None
        if not isinstance(tensors, list | tuple):  # torch.cat(x.chunk(2, -1)): see ``run``
            self.pin_inputs(n, f"{self.describe(n)} joins tensors it does not list one by one")
            return None
        d = _int(dim) % len(out)
        labs = [self.lab(t) for t in tensors]
        if all(lab is None for lab in labs):
            return None
        if all(lab is None or lab.dim == d for lab in labs):
            parts = []
            for t, lab in zip(tensors, labs, strict=True):
                if lab is not None:
                    parts.append(lab.atoms)
                else:
                    s = self.shape(t)
                    assert s is not None
                    fresh = self.new_space(f"{n.name}:unlabelled", s[d])
                    self.pins.append((fresh, f"{self.describe(n)} joins an ungated tensor"))
                    parts.append(fresh)
            return Labels(d, np.concatenate(parts))
        first = labs[0]
        if first is not None and all(
            lab is not None and lab.dim == first.dim and len(lab.atoms) == len(first.atoms)
            for lab in labs
        ):
            for lab in labs[1:]:
                assert lab is not None
                self.union(first.atoms, lab.atoms)
            return first
        self.pin_inputs(n, f"{self.describe(n)} concatenates unlike tensors")
        return None

    def stack(self, n: fx.Node) -> Labels | None:
        """``torch.stack(tensors, dim)`` of tensors carrying the same channels at the same
        dimension (the pieces of an ``unbind`` or split along another one: interleaved RoPE's
        ``torch.stack((-x2, x1), -1)``): their channels pruned together, the labels moved past
        the new dimension when it comes before them. Any other stack of labelled tensors
        keeps them whole."""
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim: Any = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        out = self.shape(n)
        if not isinstance(tensors, list | tuple) or out is None or not _literal_int(dim):
            self.pin_inputs(n, f"{self.describe(n)} stacks tensors it does not list one by one")
            return None
        labs = [self.lab(t) for t in tensors]
        if all(lab is None for lab in labs):
            return None
        first = labs[0]
        if first is None or not all(
            lab is not None and lab.dim == first.dim and len(lab.atoms) == len(first.atoms)
            for lab in labs
        ):
            self.pin_inputs(n, f"{self.describe(n)} stacks unlike tensors")
            return None
        for lab in labs[1:]:
            assert lab is not None
            self.union(first.atoms, lab.atoms)
        d = _int(dim) % len(out)
        return Labels(first.dim + (1 if d <= first.dim else 0), first.atoms)

    def binary(self, n: fx.Node, kind: str) -> Labels | None:
        out = self.shape(n)
        assert out is not None
        ops = [*n.args[:2]]
        for key in ("input", "other")[len(ops) :]:  # torch.mul(h, other=g), h.mul(other=g)
            if key in n.kwargs:
                ops.append(n.kwargs[key])
        excited = self.excited_product(n, out) if kind == "mul" else None
        if excited is not None:
            return excited
        labelled: list[tuple[Labels, int]] = []
        for a in ops:
            lab = self.lab(a)
            s = self.shape(a)
            if lab is not None and s is not None:
                labelled.append((lab, lab.dim + len(out) - len(s)))
        if not labelled:
            return None
        dims = {d for _, d in labelled}
        first = labelled[0][0]
        if len(dims) != 1 or any(len(lab.atoms) != out[d] for lab, d in labelled):
            self.pin_inputs(n, f"{self.describe(n)} combines unlike channel dimensions")
            return None
        d = dims.pop()
        if kind == "div" and self.lab(ops[0]) is None:
            self.pin_inputs(n, f"{self.describe(n)} divides by labelled channels")
            return None
        scales: list[tuple[ParamScale, list[tuple[fx.Node, int]], list[fx.Node]]] = []
        for i, a in enumerate(ops):
            if self.lab(a) is not None:
                continue
            s = self.shape(a)
            pos = d - (len(out) - len(s)) if s is not None else -1
            per_channel = s is not None and 0 <= pos < len(s) and s[pos] != 1
            if kind == "add" and zero_literal(a):  # x + 0, 0 - x: a zero stays zero
                continue
            if kind == "add":  # adding anything ungated breaks zero-preservation
                self.pin_inputs(n, self.added_why(n, a, per_channel))
                return None
            if per_channel:
                assert s is not None
                found = self.param_scale(n, a, i, s, pos, first, kind)
                if isinstance(found, str):
                    self.pin_inputs(n, found)
                    return None
                scales.append(found)
        for scale, resized, chain in scales:
            self.param_scales.append(scale)
            self.scale_chains.update(dict.fromkeys(chain, scale.atoms))
            for v, at in resized:  # gamma.view(1, C, 1, 1): the pruned code gets the kept C
                self.sizes[v] = [(at, scale.atoms, 1)]
        if kind == "mul" and len(labelled) > 1:
            self.soft_pin(first, f"{self.describe(n)} multiplies gated channels together")
        for lab, _ in labelled[1:]:
            self.union(first.atoms, lab.atoms)
        return Labels(d, first.atoms)

    def factor_param(self, a: Any) -> tuple[str, bool] | None:
        """``(path, is a parameter)`` of an operand read straight from the model
        (``self.gamma``: a parameter; else a buffer or constant), or ``(path, True)`` of the
        first parameter an operand computed from parameters reads (``self.gamma.view(...)``);
        None for an operand computed from the input."""
        if not isinstance(a, fx.Node):
            return None
        if a.op == "get_attr":
            return str(a.target), self.parameter(str(a.target)) is not None
        reads = _param_reads(a)
        for r in reads or []:
            if r.op == "get_attr" and self.parameter(str(r.target)) is not None:
                return str(r.target), True
        return None

    def added_why(self, n: fx.Node, a: Any, per_channel: bool) -> str:
        """Why an add (subtraction) of unlabelled ``a`` to labelled channels keeps them
        whole: a closed channel would not be zero; the parameter named if ``a`` is one."""
        found = self.factor_param(a)
        if found is None or not found[1]:
            return f"{self.describe(n)} adds an ungated tensor or constant"
        verb = "subtracts" if n.target in (operator.sub, torch.sub, "sub") else "adds"
        each = " per channel" if per_channel else ""
        return (
            f"{self.describe(n)} {verb} parameter '{found[0]}'{each}: a closed channel would "
            "not be zero"
        )

    def param_scale(
        self,
        n: fx.Node,
        a: Any,
        index: int,
        shape: tuple[int, ...],
        pos: int,
        lab: Labels,
        kind: str,
    ) -> tuple[ParamScale, list[tuple[fx.Node, int]], list[fx.Node]] | str:
        """Product (``kind`` ``"mul"``, or ``"div"``) ``n`` of labelled channels ``lab`` by
        its operand ``index``, ``a`` (of ``shape``, size > 1 at the channels' position
        ``pos``): a :class:`ParamScale` when ``a`` is a per-channel parameter, or such a
        parameter shaped to broadcast by a :func:`scale_chain` (``self.gamma.view(1, -1, 1,
        1)``, ``self.gamma[:, None, None]``), each read only by the next, with the
        ``view``/``reshape`` nodes of the chain giving the channels a literal size (and
        that output dimension, from the end: rewritten to the kept width); else the reason
        the channels are kept whole."""
        traced = scale_chain(a)
        root, chain = traced if traced is not None else (a, [])
        if isinstance(root, fx.Node) and root.op == "get_attr":
            found: tuple[str, bool] | None = (
                str(root.target),
                self.parameter(str(root.target)) is not None,
            )
        else:
            found = self.factor_param(a)
        if found is None:
            return f"{self.describe(n)} multiplies by ungated channels"
        path, is_param = found
        assert isinstance(a, fx.Node)
        verb = "divides by" if kind == "div" else "multiplies by"
        head = f"{self.describe(n)} {verb} {'parameter' if is_param else 'buffer or constant'}"
        head += f" '{path}' per channel"
        if not is_param:
            return f"{head}, which gate_ does not slice (only a parameter is)"
        if not isinstance(root, fx.Node) or root.op != "get_attr":
            return (
                f"{head}, computed from it when the model runs (node '{a.name}'), not read as "
                "it is (write the product with the parameter itself, or shaped to broadcast "
                "by view, reshape, unsqueeze, None-indexing, .to or .type_as only)"
            )
        whole = self.rec.whole.get(n)
        if whole is not None:
            return f"{head}, inside module '{whole}', which a cost handler counts whole"
        others = [i for i, v in enumerate(shape) if i != pos and v != 1]
        if others:
            return (
                f"{head} of shape {tuple(shape)}, not one entry per channel (sliced: size 1 "
                "on every dimension but the channels')"
            )
        p = self.parameter(path)
        assert p is not None
        big = [i for i, v in enumerate(p.shape) if v != 1]
        if len(big) != 1 or int(p.shape[big[0]]) != shape[pos]:
            return (
                f"{head}, of shape {tuple(p.shape)}, not one entry per channel (sliced: size 1 "
                "on every dimension but the channels')"
            )
        for v, reader in zip([*chain, root], [n, *chain], strict=True):
            once = sum(1 for u in _flat_nodes((reader.args, reader.kwargs)) if u is v) == 1
            if list(v.users) != [reader] or not once:
                users = ", ".join(f"'{u.name}'" for u in v.users if u is not reader)
                via = f", through node '{v.name}'" if v is not root else ""
                return (
                    f"{head}{via}, also read by node(s) {users or repr(reader.name)} (a shared "
                    "tensor)"
                )
        sizes: list[tuple[fx.Node, int]] = []
        for v in chain:
            if not (_has_sizes(v) or (v.op == "call_function" and v.target is torch.reshape)):
                continue  # unsqueeze, an index, a cast
            out = self.shape(v)
            wide = [i for i, s in enumerate(out or ()) if s != 1]
            if out is None or len(wide) != 1:
                return f"{head}, reshaped by node '{v.name}' to {out} (not one entry per channel)"
            key = wide[0] - len(out)
            has, arg = _size_arg(v, key)
            if not has:
                return f"{head}, reshaped by node '{v.name}', which {_WHOLE_SHAPE}"
            if arg == -1 or self.derived_size(arg, lab):
                continue
            if not isinstance(arg, fx.Node | int) or isinstance(arg, bool):
                return f"{head}, reshaped by node '{v.name}', which gives the size as {arg!r}"
            sizes.append((v, key))  # a literal (or another tensor's size): the kept width
        return ParamScale(n.name, path, big[0], int(shape[pos]), lab.atoms), sizes, chain

    def attention_nonzero(self, n: fx.Node) -> bool:
        """Attention scores of labelled heads (see :meth:`head_split`): a softmax over another
        dimension, a mask added or filled in, a scale, dropout or a dtype cast give values
        that are not zero at closed heads (uniform weights): nonzero labels, which only a
        product with values zero at those heads (``weights @ v``) may read. False if ``n``
        is not such an op."""
        t, fn, meth = n.target, n.op == "call_function", n.op == "call_method"
        binary = (fn and t in _ADD_FUNCS | _MUL_FUNCS | _DIV_FUNCS) or (
            meth and t in ("add", "mul", "div")
        )
        args = [a for a in n.args[:2] if isinstance(a, fx.Node)] if binary else n.args[:1]
        where = fn and t is torch.where and len(n.args) == 3 and not n.kwargs
        if where:  # torch.where(mask, scores, fill) or torch.where(mask, fill, scores)
            args = [a for a in n.args[1:] if isinstance(a, fx.Node)]
        x = next((a for a in args if a in self.nonzero or self.lab(a) is not None), None)
        if not isinstance(x, fx.Node):
            return False
        nz = self.nonzero.get(x)
        lab = nz if nz is not None else self.lab(x)
        if lab is None or (nz is None and not self.is_heads(lab)):
            return False
        ins, out = self.shape(x), self.shape(n)
        if ins is None or out is None or len(out) != len(ins) or out[lab.dim] != ins[lab.dim]:
            return False
        others = [a for a in _flat_nodes((n.args, n.kwargs)) if a is not x]
        if meth and (t in ("type_as", "to") or _type_cast(n)):
            self.dtype_reads(n, others)
            others = []  # another tensor gives only its dtype and device
        paired = self.nonzero_pair(n, x, lab, others) if nz is not None else None
        if paired is not None:  # RoPE after QK-norm: q * cos + rotate_half(q) * sin
            self.union(lab.atoms, self.nonzero[paired].atoms)
            self.nonzero[n] = Labels(lab.dim, lab.atoms)
            self.nonzero_uses.update({(x, n), (paired, n)})
            return True
        per_head: list[fx.Node] = []
        for a in others:  # plain tensors, broadcast along the heads
            s_a = self.shape(a)
            if self.lab(a) is not None or a in self.nonzero:
                return False
            pos = lab.dim - (len(out) - len(s_a)) if s_a is not None else -1
            if s_a is not None and 0 <= pos < len(s_a) and s_a[pos] != 1:
                if not binary:  # (a product of scores with values: not a term of them)
                    return False
                per_head.append(a)
        if per_head:  # a relative position bias, ALiBi slopes, a learned temperature
            return self.head_term(n, x, lab, per_head, binary and (t in _DIV_FUNCS or t == "div"))
        if n.op == "call_module":
            m = self.gm.get_submodule(str(t))
            shape = m.normalized_shape if isinstance(m, nn.LayerNorm | nn.RMSNorm) else None
            if isinstance(shape, tuple) and len(shape) < len(ins) - lab.dim:
                ok = True  # QK-norm: over the head size, not the heads
            elif type(m) is nn.Softmax:  # Swin's self.softmax = nn.Softmax(dim=-1): as F.softmax
                ok = isinstance(m.dim, int) and m.dim % len(ins) != lab.dim
            else:
                ok = nz is not None and isinstance(m, nn.Dropout)
        elif fn and t in _NORM_FUNCS:  # functional QK-norm: F.layer_norm(q, (D,), w, b)
            normed = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
            ok = (
                n.args[0] is x
                and isinstance(normed, list | tuple)
                and len(normed) < len(ins) - lab.dim
            )
        elif fn and t is F.normalize:  # Swin-V2's cosine attention: over the head size
            over: Any = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 1)
            ok = n.args[0] is x and isinstance(over, int) and over % len(ins) != lab.dim
        elif (fn and t in (F.softmax, torch.softmax)) or (meth and t == "softmax"):
            dim: Any = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            ok = isinstance(dim, int) and dim % len(ins) != lab.dim
        elif (meth and t in ("masked_fill", "where")) or where:
            ok = True  # a mask filled into zero-labelled scores: nonzero from here on
        elif (fn and t in _ADD_FUNCS) or (meth and t == "add"):
            ok = True  # a zero-labelled score plus a mask: nonzero from here on
        elif (
            (fn and t is F.dropout)
            or (meth and t in ("float", "type_as", "to", "contiguous"))
            or _type_cast(n)  # GPT-2's attn_weights.type(value.dtype)
        ):
            ok = nz is not None  # of zero labels: the usual pass-through rules
        elif (fn and t in (operator.neg, torch.neg)) or (meth and t == "neg"):
            ok = nz is not None  # RoPE's rotate_half
        elif binary:  # a scale; of zero labels: the usual rule
            divides = t in _DIV_FUNCS or t == "div"
            ok = nz is not None and (not divides or n.args[0] is x)  # scores / scale only
        else:
            ok = False
        if not ok:
            return False
        self.nonzero[n] = Labels(lab.dim, lab.atoms)
        if nz is not None:
            self.nonzero_uses.add((x, n))
        return True

    def head_term(
        self, n: fx.Node, x: fx.Node, lab: Labels, terms: list[fx.Node], divides: bool
    ) -> bool:
        """Attention scores ``x`` of heads ``lab`` plus (times, divided by) ``terms``, one of
        which holds a value per head: a :class:`HeadBias` when it is computed from one
        parameter or buffer holding the heads (see :meth:`head_source`), sliced with them
        (the sum is nonzero-labelled, as a mask added); else the heads are kept whole, with
        the reason. Always True (``n`` handled)."""
        t, fn, meth = n.target, n.op == "call_function", n.op == "call_method"
        adds = (fn and t in (operator.add, operator.iadd, torch.add)) or (meth and t == "add")
        mults = (fn and t in _MUL_FUNCS) or (meth and t == "mul")
        ops = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        what = f"{self.describe(n)} (attention) reads a term per head"
        if not (adds or mults or (divides and n.args[0] is x)) or n.kwargs or len(ops) != 2:
            self.pin_heads(n, lab, f"{what} other than added to the scores or multiplying them")
            return True
        if len(terms) != 1:
            self.pin_heads(n, lab, f"{what} in more than one operand")
            return True
        a = terms[0]
        s_a, out = self.shape(a), self.shape(n)
        assert s_a is not None
        assert out is not None
        found = self.head_source(a, lab.dim - (len(out) - len(s_a)), len(lab.atoms))
        if isinstance(found, str):
            self.pin_inputs(
                n,
                f"{what}, {found}: it is kept whole (only a parameter or buffer "
                "holding the heads, read there only, is sliced)",
            )
            return True
        path, dim, param, resized = found
        self.head_biases.append(HeadBias(n.name, path, dim, len(lab.atoms), lab.atoms, param))
        for v, key in resized:  # slopes.view(1, H, 1, 1): the pruned code gets the kept H
            self.sizes[v] = [(key, lab.atoms, 1)]
        self.nonzero[n] = Labels(lab.dim, lab.atoms)
        if x in self.nonzero:
            self.nonzero_uses.add((x, n))
        return True

    def pin_heads(self, n: fx.Node, lab: Labels, why: str) -> None:
        """Keep heads ``lab`` of scores read by ``n`` whole (and ``n``'s inputs), with ``why``."""
        self.pin(lab, why)
        self.pin_inputs(n, why)

    def head_source(
        self, a: fx.Node, pos: int, heads: int
    ) -> tuple[str, int, bool, list[tuple[fx.Node, int]]] | str:
        """``(path, dim, is a parameter, resized)``: the parameter or buffer ``path`` whose
        dimension ``dim`` gives dimension ``pos`` (the heads, ``heads`` of them) of tensor
        ``a``, through a chain of nodes each read only by the next: element-wise ops of one
        tensor (``exp``, ``clamp`` by numbers, ``contiguous``, casts), products and sums with
        tensors broadcast along the heads (ALiBi's slopes times distances), ``unsqueeze``,
        ``permute``/``transpose``, ``view``/``reshape`` keeping that dimension (``resized``:
        those giving it as a literal, with that output dimension from the end), an index by a
        tensor along another dimension (Swin's ``table[index.view(-1)]``) or an
        ``nn.Embedding`` (T5's buckets: its ``weight``, dimension 1). Else the reason."""
        resized: list[tuple[fx.Node, int]] = []
        v, p = a, pos
        reader: fx.Node | None = None
        for _ in range(64):
            if reader is not None and list(v.users) != [reader]:
                users = ", ".join(f"'{u.name}'" for u in v.users if u is not reader)
                return f"node '{v.name}' on the way to it is also read by {users}"
            sv = self.shape(v)
            if self.lab(v) is not None or v in self.nonzero or sv is None or sv[p] != heads:
                return f"node '{v.name}' does not hold one value per head on dimension {p}"
            step = self.head_step(v, p, sv, resized)
            if isinstance(step, str):
                return step
            if isinstance(step, tuple) and isinstance(step[0], str):
                path, dim = step
                return path, dim, self.parameter(path) is not None, resized
            assert isinstance(step, tuple)
            assert isinstance(step[0], fx.Node)
            reader, (v, p) = v, step
        return f"node '{a.name}' is computed by too long a chain"

    def head_step(
        self, v: fx.Node, p: int, sv: tuple[int, ...], resized: list[tuple[fx.Node, int]]
    ) -> tuple[fx.Node, int] | tuple[str, int] | str:
        """One step of :meth:`head_source`: ``(input node, its heads dimension)``, or
        ``(path, dim)`` at the parameter or buffer, or the reason it stops."""
        t, fn, meth = v.target, v.op == "call_function", v.op == "call_method"
        src = v.args[0] if v.args else None
        rest = [u for u in _flat_nodes((v.args[1:], v.kwargs))]
        if v.op == "get_attr":
            path = str(t)
            if self.parameter(path) is None and not self.is_buffer(path):
                return f"'{path}' is a constant, not a parameter or buffer"
            return path, p
        if v.op == "call_module":
            m = self.gm.get_submodule(str(t))
            if type(m) is nn.Embedding and p == len(sv) - 1 and m.max_norm is None:
                return f"{t}.weight", 1
            return f"module '{t}' ({type(m).__name__}) computes it"
        if not isinstance(src, fx.Node):
            return f"node '{v.name}' computes it"
        si = self.shape(src)
        if si is None:
            return f"node '{v.name}' computes it"
        unary = (meth and t in _HEAD_UNARY_METHODS) or (fn and t in _HEAD_UNARY_FUNCS)
        if unary and si == sv and (not rest or (meth and t in ("to", "type_as"))):
            if meth and t in ("to", "type_as"):
                self.dtype_reads(v, rest)
            return src, p
        if (fn and t in _ADD_FUNCS | _MUL_FUNCS | _DIV_FUNCS | {torch.sub}) or (
            meth and t in ("add", "sub", "mul", "div")
        ):
            ops = [o for o in v.args[:2] if isinstance(o, fx.Node)]
            holding = []
            for o in ops:
                so = self.shape(o)
                if so is None or self.lab(o) is not None or o in self.nonzero:
                    return f"node '{v.name}' computes it with node '{o.name}'"
                q = p - (len(sv) - len(so))
                if 0 <= q < len(so) and so[q] != 1:
                    holding.append((o, q))
            if len(holding) != 1 or v.kwargs:
                return f"node '{v.name}' combines values of several heads"
            return holding[0]
        if (meth and t == "unsqueeze") or (fn and t is torch.unsqueeze):
            d = v.args[1] if len(v.args) > 1 else v.kwargs.get("dim")
            if not isinstance(d, int):
                return f"node '{v.name}' unsqueezes a dimension it computes"
            d %= len(sv)
            return src, p - 1 if d < p else p
        if (meth and t in ("permute", "transpose")) or (
            fn and t in (torch.permute, torch.transpose)
        ):
            how = "transpose" if t in ("transpose", torch.transpose) else "permute"
            dims: list[Any] = [d for d in v.args[1:]]
            if how == "permute" and len(dims) == 1 and isinstance(dims[0], list | tuple):
                dims = list(dims[0])
            if not all(isinstance(d, int) for d in dims) or v.kwargs:
                return f"node '{v.name}' permutes by dimensions it computes"
            order = list(range(len(sv)))
            if how == "transpose" and len(dims) == 2:
                i, j = (int(d) % len(sv) for d in dims)
                order[i], order[j] = order[j], order[i]
            elif how == "permute" and len(dims) == len(sv):
                order = [int(d) % len(sv) for d in dims]
            else:
                return f"node '{v.name}' permutes by dimensions it computes"
            return src, order[p]
        if (meth and t in ("view", "reshape")) or (fn and t is torch.reshape):
            before = _prod(sv[:p])
            at = next((i for i in range(len(si)) if _prod(si[:i]) == before), None)
            if at is None or si[at] != sv[p]:
                return f"node '{v.name}' reshapes the heads with other dimensions"
            has, arg = _size_arg(v, p - len(sv))
            if not has:
                return f"node '{v.name}' {_WHOLE_SHAPE}"
            if arg != -1:
                if not isinstance(arg, int) or isinstance(arg, bool):
                    return f"node '{v.name}' gives the heads' size as {arg!r}"
                resized.append((v, p - len(sv)))
            return src, at
        if fn and t is operator.getitem and len(v.args) == 2:
            idx = v.args[1]
            # LeViT's attention_biases[:, attention_bias_idxs]: full slices before the tensor
            lead = 0
            if isinstance(idx, tuple) and idx and all(_full_slice(i) for i in idx[:-1]):
                lead, idx = len(idx) - 1, idx[-1]
            si_idx = self.shape(idx) if isinstance(idx, fx.Node) else None
            if si_idx is None or self.lab(idx) is not None or lead <= p < lead + len(si_idx):
                return f"node '{v.name}' indexes it other than by a tensor along another dimension"
            return src, p if p < lead else p - len(si_idx) + 1
        return f"node '{v.name}' computes it"

    def nonzero_cat(self, n: fx.Node) -> bool:
        """``torch.cat`` of nonzero-labelled tensors along another dimension than their labels
        (RoPE's ``rotate_half``: ``cat((-x2, x1), dim=-1)`` of two halves of normalised
        heads), or ``torch.stack`` of them (interleaved RoPE's ``stack((-x2, x1), -1)``):
        nonzero-labelled, the pieces' channels pruned together. False if ``n`` is not one (or
        reads any tensor that is not nonzero-labelled alike)."""
        stack = n.op == "call_function" and n.target is torch.stack
        if not ((n.op == "call_function" and n.target is torch.cat) or stack) or not n.args:
            return False
        parts = n.args[0]
        dim: Any = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if not isinstance(parts, list | tuple) or not parts or not isinstance(dim, int):
            return False
        if not all(isinstance(a, fx.Node) and a in self.nonzero for a in parts):
            return False
        nodes = [cast(fx.Node, a) for a in parts]
        labs = [self.nonzero[a] for a in nodes]
        out = self.shape(n)
        first = labs[0]
        if out is None or (not stack and dim % len(out) == first.dim):
            return False
        if any(lab.dim != first.dim or len(lab.atoms) != len(first.atoms) for lab in labs):
            return False
        for lab in labs[1:]:
            self.union(first.atoms, lab.atoms)
        moved = 1 if stack and dim % len(out) <= first.dim else 0  # the new dimension before
        self.nonzero[n] = Labels(first.dim + moved, first.atoms)
        self.nonzero_uses.update((a, n) for a in nodes)
        return True

    def nonzero_pair(
        self, n: fx.Node, x: fx.Node, lab: Labels, others: list[fx.Node]
    ) -> fx.Node | None:
        """The other operand of ``n = x + y`` (or ``x - y``) when both are nonzero-labelled
        on the same dimension with as many labels and the same shape (two rotations of
        normalised heads added, as RoPE does after QK-norm): the sum is nonzero-labelled,
        the two operands' channels pruned together. None otherwise."""
        t, fn, meth = n.target, n.op == "call_function", n.op == "call_method"
        if not ((fn and t in _ADD_FUNCS) or (meth and t == "add")) or len(others) != 1:
            return None
        y = others[0]
        other = self.nonzero.get(y)
        if other is None or self.shape(y) != self.shape(x) or other.dim != lab.dim:
            return None
        if len(other.atoms) != len(lab.atoms) or n.kwargs:
            return None
        return y

    def matmul(self, n: fx.Node) -> Labels | None:
        """``a @ b`` with labels on a batch dimension (the heads of ``q @ k^T`` and of
        ``weights @ v``): the operands' heads are pruned together and the product carries them;
        zero at closed heads if one labelled operand is (the other may be a nonzero label)."""
        out = self.shape(n)
        ops = [a for a in n.args[:2]]
        if out is None or len(ops) != 2 or n.kwargs or len(out) < 3:
            self.pin_inputs(n, f"{self.describe(n)} is an op gate_ does not prune through")
            return None
        kept = self.matrix_kept(n, ops, out)
        if kept is not None:
            return kept
        shared = self.mqa_product(n, ops, out)
        if shared is not None:
            return shared[0]
        found: list[tuple[Labels, bool, fx.Node]] = []
        dims = set()
        for a in ops:
            s_a = self.shape(a)
            if not isinstance(a, fx.Node) or s_a is None:
                continue
            nz = self.nonzero.get(a)
            lab = nz if nz is not None else self.lab(a)
            if lab is None:
                continue
            d = lab.dim + len(out) - len(s_a)
            if lab.dim >= len(s_a) - 2 or len(s_a) < 3:  # a matrix dimension: contracted
                self.pin_inputs(n, f"{self.describe(n)} contracts or keeps labelled channels")
                return None
            found.append((lab, nz is not None, a))
            dims.add(d)
        if not found:
            return None
        d = dims.pop()
        if dims or any(len(lab.atoms) != out[d] for lab, _, _ in found):
            self.pin_inputs(n, f"{self.describe(n)} combines unlike channel dimensions")
            return None
        for a in ops:  # an unlabelled operand must broadcast along the labels (size 1)
            s_a = self.shape(a)
            if isinstance(a, fx.Node) and s_a is not None and all(a is not f for _, _, f in found):
                pos = d - (len(out) - len(s_a))
                if 0 <= pos < len(s_a) and s_a[pos] != 1:
                    self.pin_inputs(n, f"{self.describe(n)} multiplies by ungated channels")
                    return None
        return self._product_of(n, found, d)

    def parameter(self, path: str) -> nn.Parameter | None:
        """The parameter ``path`` of the traced model (None: a buffer, a constant, missing)."""
        try:
            return self.gm.get_parameter(path)
        except AttributeError:
            return None

    def is_buffer(self, path: str) -> bool:
        """Whether ``path`` is a buffer of the traced model (not a parameter or constant: fx
        keeps a tensor the forward computes from constants as ``_tensor_constant<i>``)."""
        if path.rpartition(".")[2].startswith("_tensor_constant"):
            return False
        try:
            self.gm.get_buffer(path)
        except AttributeError:
            return False
        return True

    def whole(self, path: str, why: str, n: fx.Node) -> str:
        """Record why parameter ``path``'s product ``n`` is left whole (the first reason
        stays); returns the reason for the channels it reads."""
        self.param_whole.setdefault(path, f"{why}, at {self.describe(n)}")
        return f"{self.describe(n)} reads them with weight '{path}', left whole: {why}"

    def param_linear(self, n: fx.Node, ops: LinearOperands) -> tuple[bool, Labels | None]:
        """A linear map with a parameter weight (see :class:`ParamLinear`): ``(True, labels of
        its output units)`` when it is one, recorded; ``(True, None)`` when ``F.linear`` or
        ``addmm`` is left whole (its inputs pinned, with the reason); ``(False, None)`` when
        another rule decides (a product of two activations, or a parameter product left
        whole: the reason recorded, the existing rules for ``@`` then apply)."""
        x, w, b, is_linear = ops.x, ops.weight, ops.bias, ops.fused
        src = weight_source(w)
        attr = src[0] if src is not None and src[0].op == "get_attr" else None
        if src is None or attr is None:
            return self.not_param_linear(n, x, w, is_linear)
        path, chain = str(attr.target), src[1]
        param = self.parameter(path)
        lab, x_shape, out = self.lab(x), self.shape(x), self.shape(n)
        why: str | None = None
        in_dim, n_in, n_out = (src[2] + int(ops.out_first)) % 2, 0, 0
        whole = self.rec.whole.get(n)
        if whole is not None and is_linear and self.rec.conv_layers.get(n) == whole:
            whole = None  # an nn.Linear subclass's own forward: its handler follows the widths
        if param is None:
            why = "a buffer or constant, not a parameter"
        elif whole is not None:  # its handler's count would not follow the kept widths
            why = f"inside module '{whole}', which a cost handler (register_cost) counts whole"
        elif param.dim() != 2:
            why = f"{param.dim()}-d, not a matrix (only a 2-d weight is sliced)"
        elif not self.read_once(attr, chain, n):
            why = "read in more than one place"
        elif not isinstance(x, fx.Node) or not x_shape or not out:
            why = "its product's input or output is not a tensor of known shape"
        else:
            n_in, n_out = int(param.shape[in_dim]), int(param.shape[1 - in_dim])
            if x_shape[-1] != n_in or out[-1] != n_out:
                why = f"its product's shapes {x_shape} -> {out} are not those of a linear map"
            elif lab is not None and lab.dim != len(x_shape) - 1:
                why = "its input's gated channels are on another dimension than the one it sums"
        if why is not None:
            pin_why = self.whole(path, why, n)
            if is_linear:  # no other rule reads F.linear
                self.pin_inputs(n, pin_why)
                return True, None
            if lab is not None and x_shape is not None and lab.dim == len(x_shape) - 1:
                self.pin(lab, pin_why)  # (contracted: the rules for @ would pin it too)
            return False, None
        in_atoms = self.param_input_atoms(n, lab, path)
        pl = ParamLinear(n.name, path, in_dim, n_in, n_out, in_atoms=in_atoms)
        pl.bias_flops = is_linear and b is not None
        self.param_linears[n] = pl
        bias_why = self.bias_problem(b, n, n_out) if b is not None else None
        if bias_why is not None:
            pin_why = self.whole(path, f"its output units are not gated: {bias_why}", n)
            self.pin(self.lab(b), pin_why)  # its bias a gated tensor (addmm(h, x, W)): whole
            return True, None
        if b is not None:
            pl.bias = str(cast(fx.Node, bias_attr(b)).target)
        pl.out_atoms = self.new_space(path, n_out)
        return True, Labels(len(cast(tuple[int, ...], out)) - 1, pl.out_atoms)

    def param_conv(self, n: fx.Node, d: int) -> Labels | None:
        """A ``d``-d convolution ``F.conv{d}d(x, W, b, stride, padding, dilation, groups)``:
        with ``W`` a parameter read only here and ``groups=1``, a :class:`ParamLinear` on
        channel dimension 1 (returns the labels of its output channels); otherwise its input
        channels are kept whole and the weight is reported whole with the reason (None)."""
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        if len(n.args) > len(names) or set(n.kwargs) - set(names):
            self.pin_inputs(n, f"{self.describe(n)} has arguments gate_ does not parse")
            return None
        x, w, b, _, _, _, groups = (
            n.args[i] if len(n.args) > i else n.kwargs.get(k) for i, k in enumerate(names)
        )
        scaled = weight_source(w)
        w_attr = scaled[0] if scaled is not None and scaled[2] == 0 else None
        if w_attr is None or w_attr.op != "get_attr":
            reads = _param_reads(w) or []
            sources = [
                r
                for r in reads
                if r.op == "call_module" or self.parameter(str(r.target)) is not None
            ]
            if sources and isinstance(w, fx.Node):
                how = "by that module" if sources[0].op == "call_module" else "from it"
                computed = f"computed {how} when the model runs (node '{w.name}'), not as it is"
                self.pin_inputs(n, self.whole(str(sources[0].target), computed, n))
            elif isinstance(w, fx.Node) and (own := self.weight_params(w)):
                computed = (  # StyleGAN2's modulated convolution: weight * style per sample
                    "computed per sample from the model's input when the model runs (node "
                    f"'{w.name}'), not a parameter read as it is (or times a number)"
                )
                for path in own[1:]:
                    self.whole(path, computed, n)
                self.pin_inputs(n, self.whole(own[0], computed, n))
            else:
                self.pin_inputs(n, f"{self.describe(n)}'s weight is not a parameter of the model")
            self.input_param(n, x)
            return None
        path, w_chain = str(w_attr.target), cast(tuple[Any, list[fx.Node], int], scaled)[1]
        param = self.parameter(path)
        lab, x_shape, out = self.lab(x), self.shape(x), self.shape(n)
        whole = self.rec.whole.get(n)
        if whole is not None and self.rec.conv_layers.get(n) == whole:
            whole = None  # an nn.Conv*d subclass's own forward: its handler follows the widths
        why: str | None = None
        if param is None:
            why = "a buffer or constant, not a parameter"
        elif whole is not None:  # its handler's count would not follow the kept widths
            why = f"inside module '{whole}', which a cost handler (register_cost) counts whole"
        elif param.dim() != d + 2:
            why = f"{param.dim()}-d, not the (out, in, *kernel) weight of a {d}-d convolution"
        elif not self.read_once(w_attr, w_chain, n):
            why = "read in more than one place"
        elif groups not in (None, 1):
            why = (
                f"a grouped convolution (groups={groups}): only the weight of a groups=1 "
                "convolution is sliced"
            )
        elif not isinstance(x, fx.Node) or not x_shape or not out:
            why = "its input or output is not a tensor of known shape"
        elif len(x_shape) != d + 2:
            why = f"its input has shape {x_shape}, not (batch, channels, ...) ({d + 2}-d)"
        elif x_shape[1] != param.shape[1] or out[1] != param.shape[0]:
            why = f"its shapes {x_shape} -> {out} do not match its weight's channels"
        elif lab is not None and lab.dim != 1:
            why = "its input's gated channels are on another dimension than its channels"
        if why is not None or param is None:
            self.pin_inputs(n, self.whole(path, why or "not a parameter", n))
            self.input_param(n, x)
            return None
        n_out, n_in = int(param.shape[0]), int(param.shape[1])
        taps = int(np.prod(param.shape[2:]))  # kernel positions per input channel
        in_atoms = self.param_input_atoms(n, lab, path)
        pl = ParamLinear(n.name, path, 1, n_in, n_out, in_atoms=in_atoms, taps=taps, conv=True)
        pl.bias_flops = b is not None  # 1 FLOP per output element, as cost counts it
        self.param_linears[n] = pl
        bias_why = self.bias_problem(b, n, n_out) if b is not None else None
        if bias_why is not None:
            self.pin(
                self.lab(b), self.whole(path, f"its output units are not gated: {bias_why}", n)
            )
            return None
        if isinstance(b, fx.Node):  # (bias_problem: a parameter read as it is, or scaled)
            pl.bias = str(cast(fx.Node, bias_attr(b)).target)
        pl.out_atoms = self.new_space(path, n_out)
        return Labels(1, pl.out_atoms)

    def weight_params(self, w: fx.Node) -> list[str]:
        """The parameters a computed convolution weight ``w`` is made of element-wise, not
        through a module or a linear map of the model (those report their own): StyleGAN2's
        ``self.scale * self.weight * style`` gives ``weight``, not the style's Linear's."""
        seen: set[fx.Node] = set()
        stack = [w]
        while stack:  # not into modules, linear maps, nor sizes read (b, c, h, w = x.shape)
            v = stack.pop()
            if v in seen or v.op == "call_module" or v in self.param_linears or _size_read(v):
                continue
            seen.add(v)
            stack.extend(v.all_input_nodes)
        return [
            str(v.target)
            for v in self.gm.graph.nodes
            if v in seen and v.op == "get_attr" and self.parameter(str(v.target)) is not None
        ]

    def input_param(self, n: fx.Node, x: Any) -> None:
        """A parameter read as the input of convolution ``n`` left whole (StyleGAN's learned
        constant ``self.const.repeat(b, 1, 1, 1)``, through copies and reshapes only): named
        in the summary as left whole with it."""
        while isinstance(x, fx.Node) and x.op in ("call_method", "call_function") and x.args:
            fn = x.op == "call_function"
            if not (
                (not fn and x.target in _COPY_METHODS)
                or (fn and x.target in (torch.reshape, torch.flatten, torch.permute))
            ):
                break
            x = x.args[0]
        param = self.parameter(str(x.target)) if isinstance(x, fx.Node) else None
        if isinstance(x, fx.Node) and x.op == "get_attr" and param is not None:
            why = f"read as the input channels of {self.describe(n)}, whose weight is left whole"
            self.param_whole.setdefault(str(x.target), why)

    def not_param_linear(
        self, n: fx.Node, x: Any, w: Any, is_linear: bool
    ) -> tuple[bool, Labels | None]:
        """A product whose weight is not a parameter read as it is: one computed from
        parameters when the model runs (``self.W * 2``, a parametrization) or a parameter on
        the left (``self.W @ x``) is left whole with the reason; see :meth:`param_linear`."""
        reads = _param_reads(w)
        sources = [
            r
            for r in reads or []
            if r.op == "call_module" or self.parameter(str(r.target)) is not None
        ]
        if sources and isinstance(w, fx.Node):
            path = str(sources[0].target)
            how = "by that module" if sources[0].op == "call_module" else "from it"
            why = f"computed {how} when the model runs (node '{w.name}'), not read as it is"
            pin_why = self.whole(path, why, n)
            if is_linear:
                self.pin_inputs(n, pin_why)
                return True, None
            lab, x_shape = self.lab(x), self.shape(x)
            if lab is not None and x_shape is not None and lab.dim == len(x_shape) - 1:
                self.pin(lab, pin_why)
            return False, None
        left = transposed_source(x)
        if not is_linear and reads is None and left is not None and left[0].op == "get_attr":
            path = str(left[0].target)
            if self.parameter(path) is not None:
                why = f"the left operand ({path} @ x: x @ {path} is sliced)"
                pin_why = self.whole(path, why, n)
                lab, w_shape = self.lab(w), self.shape(w)
                if lab is not None and w_shape is not None and lab.dim == len(w_shape) - 2:
                    self.pin(lab, pin_why)  # the dimension it sums over
        return False, None

    def read_once(self, attr: fx.Node, chain: list[fx.Node], n: fx.Node) -> bool:
        """Whether the parameter ``attr`` reads is used only by product ``n``, once, through
        the transposes ``chain`` (from ``n``'s operand down)."""
        path = [*chain[::-1]]  # from attr up
        below = attr
        for v in path:
            if list(below.users) != [v]:
                return False
            below = v
        if list(below.users) != [n]:
            return False
        return sum(1 for a in _flat_nodes((n.args, n.kwargs)) if a is below) == 1

    def bias_problem(self, b: Any, n: fx.Node, n_out: int) -> str | None:
        """Why ``b``, added to the output units of product ``n``, cannot be sliced with them
        (None: a 1-d parameter of ``n_out`` entries read only by ``n``, once)."""
        attr = bias_attr(b)
        if attr is None:
            return "its bias is not a parameter read as it is (or times a number)"
        param = self.parameter(str(attr.target))
        if param is None:
            return f"its bias '{attr.target}' is a buffer or constant, not a parameter"
        if tuple(param.shape) != (n_out,):
            return f"its bias '{attr.target}' has shape {tuple(param.shape)}, not ({n_out},)"
        chain = cast(tuple[fx.Node, list[fx.Node], int], weight_source(b))[1]
        if not self.read_once(attr, chain, n):
            return f"its bias '{attr.target}' is read in more than one place"
        return None

    def param_bias(self, n: fx.Node) -> Labels | None:
        """``y + b`` (``b + y``, ``torch.add(y, b)``) or ``y - b`` (``b - y``,
        ``torch.sub``) with ``y`` the output units of a :class:`ParamLinear` read only here
        and ``b`` a 1-d parameter of their size read only here: its bias, sliced and gated
        with them (``(x W - b) g = x (W g) - b g``); the result carries ``y``'s labels. None
        if ``n`` is not one (an add of a parameter that cannot be sliced pins them, with
        why)."""
        add = (n.op == "call_function" and n.target in _OFFSET_FUNCS) or (
            n.op == "call_method" and n.target in _OFFSET_METHODS
        )
        if not add or len(n.args) != 2:
            return None
        for y, c in (n.args, n.args[::-1]):
            pl = self.param_linears.get(y) if isinstance(y, fx.Node) else None
            lab = self.lab(y)
            if pl is None or lab is None or pl.out_atoms is None or pl.bias_flops or pl.bias:
                continue
            if not isinstance(c, fx.Node) or c.op != "get_attr":
                return None
            why = self.bias_problem(c, n, pl.n_out)
            if why is None and n.kwargs:  # torch.sub(y, b, alpha=2)
                why = (
                    f"it is scaled by {_kwargs_text(n)}, a form gate_ does not slice (fold "
                    "the scale into the bias parameter)"
                )
            if why is None and len(cast(fx.Node, y).users) != 1:
                why = "the product is also read without it"
            if why is not None:
                self.pin(
                    lab,
                    f"{self.describe(n)} adds a bias to the output units of parameter "
                    f"'{pl.weight}' that is not sliced with them: {why}",
                )
                return None
            pl.bias = str(c.target)
            pl.bias_node = n.name
            return lab
        return None

    def matrix_kept(self, n: fx.Node, ops: list[Any], out: tuple[int, ...]) -> Labels | None:
        """``a @ b`` (``bmm``, ``mm``) with one operand labelled on a matrix dimension the
        product keeps: the rows of ``a`` or the columns of ``b`` (attention pooling
        ``weights^T @ h`` over time keeps ``h``'s features). Linear in that operand, so a zero
        row or column stays zero: the product carries its labels. None if ``n`` is not one."""
        shapes = [self.shape(a) if isinstance(a, fx.Node) else None for a in ops]
        labs = [self.lab(a) if isinstance(a, fx.Node) else None for a in ops]
        if any(s_a is None or len(s_a) < 2 for s_a in shapes) or len(out) < 2:
            return None
        if any(isinstance(a, fx.Node) and a in self.nonzero for a in ops):
            return None
        s_a, s_b = cast(tuple[int, ...], shapes[0]), cast(tuple[int, ...], shapes[1])
        if labs[0] is not None and labs[1] is None and labs[0].dim == len(s_a) - 2:
            return Labels(len(out) - 2, labs[0].atoms)  # rows of a
        if labs[1] is not None and labs[0] is None and labs[1].dim == len(s_b) - 1:
            return Labels(len(out) - 1, labs[1].atoms)  # columns of b
        return None

    def _product_of(
        self, n: fx.Node, found: list[tuple[Labels, bool, fx.Node]], d: int
    ) -> Labels | None:
        """The labels of product ``n`` (``a @ b``, an einsum) on output dimension ``d``, whose
        labelled operands ``found`` (labels, nonzero?, node) carry them there: the operands'
        channels are pruned together; zero at closed ones if one zero-labelled operand is,
        nonzero labels (None returned) if every labelled operand is nonzero there."""
        if all(nz for _, nz, _ in found):  # q @ k^T after QK-norm: nonzero scores
            for f_lab, _, _ in found[1:]:
                self.union(found[0][0].atoms, f_lab.atoms)
            for _, _, f_node in found:
                self.nonzero_uses.add((f_node, n))
            self.nonzero[n] = Labels(d, found[0][0].atoms)
            return None
        first = next(f_lab for f_lab, f_nz, _ in found if not f_nz)
        for f_lab, f_nz, f_node in found:
            self.union(first.atoms, f_lab.atoms)
            if f_nz:
                self.nonzero_uses.add((f_node, n))
        if sum(1 for _, f_nz, _ in found if not f_nz) > 1:
            self.soft_pin(first, f"{self.describe(n)} multiplies gated channels together")
        return Labels(d, first.atoms)

    def einsum(self, n: fx.Node) -> Labels | None:
        """``torch.einsum(equation, a, b)`` (attention's ``"bhqd,bhkd->bhqk"`` and
        ``"bhqk,bhkd->bhqd"``) with labels on an index the output keeps: as for ``a @ b``, the
        operands' channels are pruned together and the output carries them; an index summed
        over, repeated within an operand, or read unlabelled (not broadcast) by the other
        operand leaves them ungated. Other einsums (one or three operands) pass no labels."""
        out = self.shape(n)
        eq = n.args[0] if n.args else None
        ops: list[Any] = list(n.args[1:])
        if len(ops) == 1 and isinstance(ops[0], list | tuple):
            ops = list(ops[0])
        labelled = [
            isinstance(a, fx.Node) and (self.lab(a) is not None or a in self.nonzero) for a in ops
        ]
        shapes = [self.shape(a) if isinstance(a, fx.Node) else None for a in ops]
        parsed = None
        dims = [len(sh) for sh in shapes if sh is not None]
        if isinstance(eq, str) and out is not None and len(dims) == len(ops) == 2 and not n.kwargs:
            parsed = einsum_subscripts(eq, dims, len(out))
        weight_why = self.einsum_weights(n, ops, parsed)
        if not any(labelled):
            return None
        if parsed is None or out is None:
            self.pin_inputs(n, f"{self.describe(n)} is an op gate_ does not prune through")
            return None
        subs, out_subs = parsed
        shared = self.mqa_einsum(n, ops, subs, out_subs, out)
        if shared is not None:
            return shared[0]
        found: list[tuple[Labels, bool, fx.Node]] = []
        letters = set()
        for a, sub, is_lab in zip(ops, subs, labelled, strict=True):
            if not is_lab:
                continue
            nz = self.nonzero.get(a)
            lab = nz if nz is not None else self.lab(a)
            assert lab is not None
            letter = sub[lab.dim]
            if letter not in out_subs or sub.count(letter) != 1:
                why = f"{self.describe(n)} contracts or keeps labelled channels"
                self.pin_inputs(n, weight_why or why)
                return None
            found.append((lab, nz is not None, a))
            letters.add(letter)
        letter = letters.pop()
        d = out_subs.index(letter)
        if letters or any(len(lab.atoms) != out[d] for lab, _, _ in found):
            self.pin_inputs(n, f"{self.describe(n)} combines unlike channel dimensions")
            return None
        for sub, sh, is_lab in zip(subs, shapes, labelled, strict=True):
            if not is_lab and sh is not None and letter in sub and sh[sub.index(letter)] != 1:
                self.pin_inputs(n, f"{self.describe(n)} multiplies by ungated channels")
                return None
        return self._product_of(n, found, d)

    def einsum_weights(
        self, n: fx.Node, ops: list[Any], parsed: tuple[list[list[str]], list[str]] | None
    ) -> str | None:
        """Record as left whole (with the reason, for the summary) each 2-d parameter that
        ``torch.einsum`` ``n`` reads and sums over (``einsum("bd,dh->bh", x, self.W)``): a
        linear map, but not in a form gate_ slices (``x @ self.W`` or ``F.linear`` is).
        Returns the reason for the channels the first such parameter reads (None: none)."""
        first: str | None = None
        for i, a in enumerate(ops):
            src = transposed_source(a)
            if src is None or src[0].op != "get_attr":
                continue
            path = str(src[0].target)
            param = self.parameter(path)
            if param is None or param.dim() != 2:
                continue
            if parsed is not None and all(c in parsed[1] for c in parsed[0][i]):
                continue  # sums over none of its indices: not a linear map of it
            why = self.whole(
                path,
                "torch.einsum is not a parameter-map form gate_ reads "
                f"(written as x @ {path}, x @ {path}.T or F.linear its units are gated)",
                n,
            )
            first = first or why
        return first

    def repeat_heads(self, n: fx.Node) -> Labels | None:
        """Grouped-query attention's k and v repeated for the query heads:
        ``t.repeat_interleave(r, dim)`` of the labelled dimension repeats each label ``r``
        times (a key/value head and its queries are pruned together), and ``t.expand(...)``
        along other dimensions keeps them (``t[:, :, None].expand(b, kv, r, s, d)``, then a
        reshape merges the labels, as in Hugging Face's ``repeat_kv``), as does
        ``repeat_interleave`` of another dimension of size 1 (multi-query attention's one
        key/value head, see :meth:`track_copies`)."""
        x = n.args[0] if n.args else None
        lab, ins, out = self.lab(x), self.shape(x), self.shape(n)
        nz = lab is None and isinstance(x, fx.Node) and x in self.nonzero
        if nz:  # k after QK-norm: the repeat of nonzero labels is nonzero
            lab = self.nonzero[cast(fx.Node, x)]
        if lab is None or ins is None or out is None:
            return None
        result: Labels | None = None
        if n.target in ("repeat", "tile"):  # g.repeat(1, 1, L): copies along other dims
            counts = _repeat_sizes(n)
            if counts is not None and n.target == "tile" and len(counts) < len(ins):
                counts = (1,) * (len(ins) - len(counts)) + counts  # tile pads its dims with 1s
            shift = len(counts) - len(ins) if counts is not None else -1
            if counts is not None and shift >= 0 and len(out) == len(ins) + shift:
                factor = counts[lab.dim + shift]
                if _literal_int(factor) and factor == 1:
                    result = Labels(lab.dim + shift, lab.atoms)
        elif n.target == "expand":
            if len(out) == len(ins) and out[lab.dim] == ins[lab.dim]:
                found, arg = _size_arg(n, lab.dim - len(out))
                if found and not (arg == -1 or self.derived_size(arg, lab)):
                    # a literal (self.num_key_value_heads): the pruned code gets the kept width
                    self.sizes[n] = [(lab.dim - len(out), lab.atoms, 1)]
                result = Labels(lab.dim, lab.atoms)
        else:
            reps: Any = n.args[1] if len(n.args) > 1 else n.kwargs.get("repeats")
            dim: Any = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
            if (
                isinstance(reps, int)
                and not isinstance(reps, bool)
                and isinstance(dim, int)
                and dim % len(ins) == lab.dim
                and not n.kwargs.get("output_size")
            ):
                result = Labels(lab.dim, np.repeat(lab.atoms, reps))
            elif (
                isinstance(dim, int)
                and dim % len(ins) != lab.dim
                and len(out) == len(ins)
                and ins[dim] == 1
            ):
                result = Labels(lab.dim, lab.atoms)  # copies along a dimension of size 1
        if result is not None and nz:
            self.nonzero[n] = result
            self.nonzero_uses.add((cast(fx.Node, x), n))
            return None
        if result is not None:
            return result
        self.pin_inputs(n, f"{self.describe(n)} repeats the labelled channels")
        return None

    def sdpa(self, n: fx.Node) -> Labels | None:
        """``F.scaled_dot_product_attention(q, k, v, ...)`` with ``q``, ``k``, ``v`` labelled on
        their heads dimension: the heads of all three are pruned together; the output carries
        them (a closed head's ``v`` is zero, so is its output). ``q`` and ``k`` may be nonzero
        at closed heads (QK-norm), ``v`` may not."""
        out = self.shape(n)
        names = ("query", "key", "value")
        qkv = [n.args[i] if len(n.args) > i else n.kwargs.get(k) for i, k in enumerate(names)]
        qkv = [a for a in qkv if a is not None]
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        labs = [self.lab(a) for a in qkv]
        nonzero = [
            i < 2 and labs[i] is None and isinstance(a, fx.Node) and a in self.nonzero
            for i, a in enumerate(qkv)
        ]
        labs = [
            self.nonzero[cast(fx.Node, a)] if nz else lab
            for a, nz, lab in zip(qkv, nonzero, labs, strict=True)
        ]
        why = f"{self.describe(n)} (attention) reads heads that are not all labelled alike"
        if out is None or len(qkv) != 3:
            return None
        shapes = [self.shape(a) for a in qkv]
        if all(s is not None and len(s) >= 3 for s in shapes) and out[len(out) - 3] > 1:
            shared = [self.shared_heads(a, -3) for a in qkv[1:]]
            if shared[0] is not None and shared[1] is not None:  # multi-query attention
                self.mqa_sdpa(n, qkv, labs[0], nonzero[0], (*shared[0], *shared[1]), mask)
                return None
        if all(lab is None for lab in labs):
            return None
        if all(s is not None and len(s) >= 3 for s in shapes) and any(
            cast(tuple[int, ...], s)[-3] == 1 < out[len(out) - 3] for s in shapes[1:]
        ):  # k or v alone with one head: a closed query head's output would not be zero
            self.pin_inputs(
                n,
                f"{self.describe(n)} (attention) reads one key/value head for every query head"
                " (multi-query attention; its heads are not pruned)",
            )
            return None
        pairs = [(lab, self.shape(a)) for lab, a in zip(labs, qkv, strict=True)]
        found = [(lab, s) for lab, s in pairs if lab is not None and s is not None]
        if len(found) != 3:
            self.pin_inputs(n, why)
            return None
        first = found[0][0]
        d = first.dim + len(out) - len(found[0][1])
        if n.kwargs.get("enable_gqa") is True:  # k and v heads each serve r query heads
            kv = {len(lab.atoms) for lab, _ in found[1:]}
            r = out[d] // len(found[1][0].atoms) if len(kv) == 1 and found[1][0].atoms.size else 0
            if r > 0 and r * len(found[1][0].atoms) == out[d]:
                found = [
                    found[0],
                    *((Labels(lab.dim, np.repeat(lab.atoms, r)), s) for lab, s in found[1:]),
                ]
        if {lab.dim - len(s) for lab, s in found} != {-3} or any(
            len(lab.atoms) != out[d] for lab, _ in found
        ):
            self.pin_inputs(n, why)
            return None
        s_m = self.shape(mask)
        if isinstance(mask, fx.Node) and (
            self.lab(mask) is not None
            or mask in self.nonzero
            or (s_m is not None and len(s_m) >= 3 and s_m[len(s_m) - 3] != 1)
        ):
            self.pin_inputs(n, f"{self.describe(n)} (attention) reads a mask per head")
            return None
        for lab, _ in found[1:]:
            self.union(first.atoms, lab.atoms)
        for a, nz in zip(qkv, nonzero, strict=True):
            if nz:
                self.nonzero_uses.add((cast(fx.Node, a), n))
        self.soft_pin(first, f"{self.describe(n)} multiplies gated channels together")
        return Labels(d, first.atoms)

    def shared_heads(self, a: Any, dim: int) -> tuple[tuple[fx.Node, int | str], ...] | None:
        """If ``a`` is the same for every head along its dimension ``dim`` (counted from the
        end): it has none or size 1 there (broadcast), or repeats one (``copies``); then the
        sizes its code gives that dimension, which become the kept query heads (``()``: none).
        None if ``a`` differs between heads."""
        s = self.shape(a) if isinstance(a, fx.Node) else None
        if s is None:
            return None
        if len(s) < -dim or s[dim] == 1:
            return ()
        copies = self.copies.get(cast(fx.Node, a))
        return copies[1] if copies is not None and copies[0] == dim else None

    def mqa_sdpa(
        self,
        n: fx.Node,
        qkv: list[Any],
        q_lab: Labels | None,
        q_nonzero: bool,
        rewrites: tuple[tuple[fx.Node, int | str], ...],
        mask: Any,
    ) -> None:
        """``F.scaled_dot_product_attention(q, k, v)`` of multi-query attention: ``k`` and ``v``
        the same for every query head (one head, broadcast or with ``enable_gqa``, or repeated
        by ``expand`` / ``repeat_interleave``). A query head is removed alone, so ``q``'s heads
        are gated; ``k`` and ``v`` are kept whole. The output carries the query heads, nonzero
        at closed ones (the mean of ``v``): see :meth:`mqa_output`."""
        kv_why = (
            f"{self.describe(n)} (attention) reads it for every query head (multi-query "
            "attention: the key/value head is kept whole, each query head gets a gate)"
        )
        for a in qkv[1:]:
            self.pin(self.lab(a) or self.nonzero.get(a), kv_why)
        q, out = qkv[0], self.shape(n)
        s_q = self.shape(q)
        if q_lab is None or out is None or s_q is None:
            return
        s_m = self.shape(mask)
        if isinstance(mask, fx.Node) and (
            self.lab(mask) is not None
            or mask in self.nonzero
            or (s_m is not None and len(s_m) >= 3 and s_m[len(s_m) - 3] != 1)
        ):
            why = f"{self.describe(n)} (attention) reads a mask per head"
            self.pin_inputs(n, why)
            self.pin(q_lab, why)
            return
        d = len(out) - 3
        if q_lab.dim - len(s_q) != -3 or len(q_lab.atoms) != out[d]:
            self.pin(
                q_lab,
                f"{self.describe(n)} (attention) reads one key/value head for every query head "
                "(multi-query attention) and queries not labelled by head",
            )
            return
        if q_nonzero:
            self.nonzero_uses.add((cast(fx.Node, q), n))
        if self.commit_sizes(n, rewrites, q_lab):
            self.mqa_output(n, Labels(d, q_lab.atoms))

    def commit_sizes(
        self, n: fx.Node, rewrites: tuple[tuple[fx.Node, int | str], ...], lab: Labels
    ) -> bool:
        """Record that the pruned code gives the sizes ``rewrites`` (of a key/value head
        repeated for the query heads of attention ``n``) the kept heads of ``lab``; False if
        one of them is already another attention's (then the heads of both are pinned)."""
        for node, key in rewrites:
            for k, atoms, _ in self.sizes.get(node, []):
                if k == key and (atoms is None or not np.array_equal(atoms, lab.atoms)):
                    why = (
                        f"{self.describe(n)} (attention) reads a key/value head that "
                        f"{self.describe(node)} repeats for the heads of another attention too"
                    )
                    self.pin(lab, why)
                    if atoms is not None:
                        self.pins.append((atoms, why))
                    return False
        for node, key in rewrites:
            entries = self.sizes.setdefault(node, [])
            if not any(k == key for k, _, _ in entries):
                entries.append((key, lab.atoms, 1))
        return True

    def mqa_output(self, n: fx.Node, lab: Labels) -> None:
        """``n`` is the output of multi-query attention with query heads ``lab``: nonzero at
        closed heads (the mean of ``v``), so these heads are gated where a Linear reads it
        (see ``after``). The first pass records the queries; the second requires them to come
        ungated from the Linear layers in ``after``."""
        self.nonzero[n] = lab
        if self.after is None:
            self.mqa_queries.append(lab.atoms.copy())
        elif not self.is_after(lab):
            self.pin(
                lab,
                f"{self.describe(n)} (attention) reads one key/value head for every query head "
                "(multi-query attention) and queries not computed by Linear layers alone "
                "(a query head is gated after the attention, so its queries must not be)",
            )

    def mqa_product(
        self, n: fx.Node, ops: list[Any], out: tuple[int, ...]
    ) -> tuple[Labels | None] | None:
        """``a @ b`` with one operand labelled by heads on a batch dimension, the other the same
        for every head (size 1 there, or repeated: the key or value head of multi-query
        attention, ``q @ k^T`` or ``weights @ v``): the shared operand is kept whole, the
        product carries the heads, and, if it is nonzero at closed heads (``weights``), it
        is the attention's output (:meth:`mqa_output`). ``(labels,)``; None if ``n`` is not
        such a product."""
        heads: list[tuple[int, Labels, bool]] = []
        for i, a in enumerate(ops):
            s_a = self.shape(a) if isinstance(a, fx.Node) else None
            nz = self.nonzero.get(a) if isinstance(a, fx.Node) else None
            lab = nz if nz is not None else self.lab(a)
            on_batch = (
                s_a is not None and lab is not None and len(s_a) >= 3 and lab.dim < len(s_a) - 2
            )
            if on_batch and self.is_heads(lab):
                heads.append((i, cast(Labels, lab), nz is not None))
        if len(heads) != 1:
            return None
        i, q_lab, q_nz = heads[0]
        a, other = ops[i], ops[1 - i]
        d = q_lab.dim + len(out) - len(cast(tuple[int, ...], self.shape(a)))
        if len(q_lab.atoms) != out[d] or out[d] < 2:
            return None
        rewrites = self.shared_heads(other, d - len(out))
        if rewrites is None:
            return None
        return self.shared_product(n, a, q_lab, q_nz, other, d, rewrites)

    def mqa_einsum(
        self,
        n: fx.Node,
        ops: list[Any],
        subs: list[list[str]],
        out_subs: list[str],
        out: tuple[int, ...],
    ) -> tuple[Labels | None] | None:
        """:meth:`mqa_product` for ``torch.einsum`` of two operands (``"bhqd,bkd->bhqk"``): the
        operand without the heads index, or with size 1 there, or repeated, is shared."""
        heads: list[tuple[int, Labels, bool, str]] = []
        for i, (a, sub) in enumerate(zip(ops, subs, strict=True)):
            nz = self.nonzero.get(a) if isinstance(a, fx.Node) else None
            lab = nz if nz is not None else self.lab(a)
            kept = lab is not None and sub[lab.dim] in out_subs and sub.count(sub[lab.dim]) == 1
            if kept and self.is_heads(lab):
                heads.append((i, cast(Labels, lab), nz is not None, sub[cast(Labels, lab).dim]))
        if len(heads) != 1:
            return None
        i, q_lab, q_nz, letter = heads[0]
        other, o_sub = ops[1 - i], subs[1 - i]
        d = out_subs.index(letter)
        s_o = self.shape(other) if isinstance(other, fx.Node) else None
        if len(q_lab.atoms) != out[d] or out[d] < 2 or s_o is None or o_sub.count(letter) > 1:
            return None
        pos = o_sub.index(letter) - len(s_o) if letter in o_sub else -len(s_o) - 1
        rewrites = self.shared_heads(other, pos)
        if rewrites is None:
            return None
        return self.shared_product(n, ops[i], q_lab, q_nz, other, d, rewrites)

    def shared_product(
        self,
        n: fx.Node,
        a: Any,
        lab: Labels,
        nz: bool,
        other: Any,
        d: int,
        rewrites: tuple[tuple[fx.Node, int | str], ...],
    ) -> tuple[Labels | None]:
        """Product ``n`` of ``a``, labelled by heads ``lab`` (nonzero if ``nz``), and
        ``other``, the same for every head: ``other`` kept whole, the product carries the heads
        on its dimension ``d`` (see :meth:`mqa_product`)."""
        self.pin(
            self.lab(other) or self.nonzero.get(other),
            f"{self.describe(n)} reads it for every query head (multi-query attention: the "
            "key/value head is kept whole, each query head gets a gate)",
        )
        if not self.commit_sizes(n, rewrites, lab):
            return (None,)
        result = self._product_of(n, [(lab, nz, a)], d)
        if nz:
            self.mqa_output(n, Labels(d, lab.atoms))
        return (result,)

    def excited_product(self, n: fx.Node, out: tuple[int, ...]) -> Labels | None:
        """``y * s`` with ``s`` a nonzero (excitation) label of the channels ``y`` carries: the
        two sets of channels are one (pruned together) and the product is zero where ``y``
        is; None if ``n`` is not such a product (other readers of ``s`` are pinned)."""
        if len(n.args) != 2 or n.kwargs:
            return None
        a, b = n.args
        if isinstance(b, fx.Node) and b in self.nonzero:
            y, s = a, b
        elif isinstance(a, fx.Node) and a in self.nonzero:
            y, s = b, a
        else:
            return None
        lab_y, lab_s = self.lab(y), self.nonzero[s]
        shape_y, shape_s = self.shape(y), self.shape(s)
        if lab_y is None or shape_y is None or shape_s is None:
            return None
        d_y = lab_y.dim + len(out) - len(shape_y)
        d_s = lab_s.dim + len(out) - len(shape_s)
        if d_y != d_s or len(lab_y.atoms) != len(lab_s.atoms) or len(lab_y.atoms) != out[d_y]:
            return None
        self.union(lab_y.atoms, lab_s.atoms)
        self.soft_pin(lab_y, f"{self.describe(n)} multiplies gated channels together")
        self.nonzero_uses.add((s, n))
        return Labels(d_y, lab_y.atoms)


def analyse_channels(
    gm: fx.GraphModule,
    record: RunRecord,
    fixed_code: Callable[[fx.Node], bool] | None = None,
    root: nn.Module | None = None,
) -> ChannelAnalysis:
    """Propagate channel labels through ``gm`` and form the channel groups (twice if it holds
    multi-query attention: the second time with its queries ungated, see ``_Propagator``).
    ``fixed_code(node)``: ``prune`` cannot change that node's code (see ``_Propagator``).
    ``root``: the traced model (its modules fx traced through, which ``gm`` does not hold as
    they are; default ``gm``)."""
    p = _Propagator(gm, record, fixed_code=fixed_code, root=root)
    p.run()
    if p.mqa_queries:
        p = _Propagator(gm, record, after=p.query_sources(), fixed_code=fixed_code, root=root)
        p.run()
    n_atoms = len(p.parent)
    roots = np.array([p.find(a) for a in range(n_atoms)], dtype=np.int64)
    space_of = np.array(p.space_of, dtype=np.int64)
    # spaces sharing an atom root belong to one group
    n_spaces = len(p.space_names)
    sp_parent = list(range(n_spaces))

    def sfind(s: int) -> int:
        while sp_parent[s] != s:
            sp_parent[s] = sp_parent[sp_parent[s]]
            s = sp_parent[s]
        return s

    root_space: dict[int, int] = {}
    for a in range(n_atoms):
        r = int(roots[a])
        s = int(space_of[a])
        if r in root_space:
            x, y = sfind(root_space[r]), sfind(s)
            if x != y:
                sp_parent[y] = x
        else:
            root_space[r] = s
    group_of_space: dict[int, int] = {}
    groups: list[ChannelGroup] = []
    atom_group = np.zeros(n_atoms, dtype=np.int64)
    atom_gidx = np.zeros(n_atoms, dtype=np.int64)
    root_index: list[dict[int, int]] = []
    for a in range(n_atoms):
        gs = sfind(int(space_of[a]))
        if gs not in group_of_space:
            group_of_space[gs] = len(groups)
            groups.append(ChannelGroup(len(groups), [], 0))
            root_index.append({})
        g = group_of_space[gs]
        ri = root_index[g]
        r = int(roots[a])
        if r not in ri:
            ri[r] = len(ri)
        atom_group[a] = g
        atom_gidx[a] = ri[r]
    for grp, ri in zip(groups, root_index, strict=True):
        grp.size = len(ri)
    space_sizes = np.bincount(space_of, minlength=n_spaces)
    for sid, name in enumerate(p.space_names):
        grp = groups[group_of_space[sfind(sid)]]
        if ":unlabelled" not in name and name not in grp.producers:
            grp.producers.append(name)
        if ":unlabelled" not in name:
            grp.widths[name] = max(grp.widths.get(name, 0), int(space_sizes[sid]))
    for atoms, reason in p.pins:
        for gi in sorted(set(atom_group[atoms].tolist())):
            if groups[gi].pinned is None:
                groups[gi].pinned = reason
    output_reasons: set[int] = set()
    for atoms, reason in p.late_outputs:  # the output's reason, first, where it holds
        for gi in sorted(set(atom_group[atoms].tolist())):
            if groups[gi].pinned is not None and gi not in output_reasons:
                groups[gi].pinned = reason
                output_reasons.add(gi)
    for atoms, what in p.norm_groups:  # coupled runs of GroupNorms that leave one unit
        for gi in sorted(set(atom_group[atoms].tolist())):
            groups[gi].norms.append(what)
            if groups[gi].pinned is None and groups[gi].size < 2 and len(atoms) > 1:
                groups[gi].pinned = (
                    f"{what} normalises runs of these channels together that, with the "
                    "channels coupled to them, leave no smaller unit than all of them"
                )
    for atoms, reason in p.soft_pins:
        for gi in sorted(set(atom_group[atoms].tolist())):
            if groups[gi].unfoldable is None:
                groups[gi].unfoldable = reason
    sources: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or p.labels.get(n) is None:
            continue
        kind = p.kinds.get(str(n.target))
        if kind is None:
            continue
        users = list(n.users)
        if kind in ("linear", "conv", "gconv", "convt", "gconvt") and len(users) == 1:
            u = users[0]
            if u.op == "call_module" and p.kinds.get(str(u.target)) in ("bn", "in", "gn"):
                continue  # the BatchNorm (InstanceNorm, GroupNorm) that follows carries the gate
            if u in p.fused_norms and u.args and u.args[0] is n:
                continue  # so does a norm's own F.batch_norm (F.group_norm)
        sources.setdefault(str(n.target), []).append(n)
    for n, owner in p.fused_norms.items():
        if p.labels.get(n) is not None:
            sources.setdefault(owner, []).append(n)
    return ChannelAnalysis(
        labels=p.labels,
        module_in=p.module_in,
        atom_group=atom_group,
        atom_gidx=atom_gidx,
        groups=groups,
        sources=sources,
        kinds=p.kinds,
        module_atoms=p.module_space,
        module_in_atoms=p.module_in_atoms,
        rnn_in_atoms=p.rnn_in_atoms,
        rnn_outputs=p.rnn_outputs,
        nonzero=p.nonzero,
        sizes={n.name: entries for n, entries in p.sizes.items()},
        head_groups={int(atom_group[a]) for a in p.head_atoms},
        param_linears=list(p.param_linears.values()),
        param_whole=p.param_whole,
        param_scales=p.param_scales,
        head_biases=p.head_biases,
        input_sites=p.input_sites,
        fused_norms={n.name: owner for n, owner in p.fused_norms.items()},
    )
