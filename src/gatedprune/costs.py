"""Counting FLOPs and parameters of plain and gated modules.

Conventions (the same for plain modules and for the expected cost of gated ones):

* FLOPs are counted for one forward pass on ``example_input`` as given (pass a batch of one
  for per-sample figures). Linear, convolution, matmul and recurrent layers count
  **2 FLOPs per multiply-accumulate**; a bias (or offset) add counts 1 per output element.
* Element-wise layers: activations 1 per element, BatchNorm (eval, affine) 2 per element,
  LayerNorm/GroupNorm 5 per element; dropout, flatten, identity, reshapes and an empty
  ``nn.Sequential`` (an identity) 0.
* More activations, 1 per output element: ``nn.PReLU`` (its weights count as parameters),
  SELU, CELU, RReLU (eval: a fixed slope), Threshold, Hardshrink, Softshrink, Tanhshrink,
  Softsign, LogSigmoid, Softmin, Softmax2d, and ``nn.GLU`` (``a * sigmoid(b)``, charged like
  SiLU's ``x * sigmoid(x)``; its output is half its input).
* More norms: InstanceNorm1d/2d/3d 5 per element like LayerNorm/GroupNorm (statistics of each
  sample and channel), or 2 like BatchNorm when ``track_running_stats=True`` (eval uses the
  stored statistics); ``nn.RMSNorm`` 4 per element (square, accumulate, scale by ``1/rms``,
  scale by the weight; charged with or without ``elementwise_affine``, as LayerNorm's 5 are);
  ``nn.LocalResponseNorm`` ``size + 5`` per element (square, the ``size``-channel window sum
  counted like pooling, then scale, add ``k``, power and multiply).
* Data movement is free (0): padding layers (Zero/Constant/Reflection/Replication/CircularPad
  1d/2d/3d), ``nn.PixelShuffle``, ``nn.PixelUnshuffle``, ``nn.ChannelShuffle``, ``nn.Unfold``
  and every dropout (Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout: identities in eval).
  torch's ``QuantStub`` and ``DeQuantStub`` are identities in a float model (torchvision's
  quantizable models with ``quantize=False``): 0 (before 2026-12-08 ``cost`` refused them).
  ``nn.Fold`` adds overlapping blocks: 1 per input element.
* Transposed convolutions (ConvTranspose1d/2d/3d), 2 per MAC: every input element (one channel
  at one position) is multiplied by the ``out_channels / groups * prod(kernel_size)`` weights it
  spreads over the output, so ``2 * N * in_channels * prod(input size) * out_channels / groups
  * prod(kernel_size)``, bias 1 per output element. Stride, dilation and ``output_padding`` change
  where products land, not how many there are; products that ``padding`` crops off are counted
  (the usual matmul + col2im computes them, as a convolution counts its taps on zero padding).
  This is the MAC count of the convolution being transposed (same kernel, stride, padding,
  dilation and groups, channels swapped) when ``output_padding < stride``.
* Upsampling (``nn.Upsample``, ``nn.UpsamplingNearest2d``, ``nn.UpsamplingBilinear2d``):
  ``nearest`` and ``nearest-exact`` 0 (a copy, like a lookup); an interpolating mode is a
  weighted sum of neighbours, 2 per MAC: ``linear`` 2 neighbours, ``bilinear`` 4, ``trilinear``
  8, ``bicubic`` 16, i.e. 4, 8, 16 or 32 per output element (computing the weights is not
  counted, whatever ``align_corners``); ``area`` is adaptive average pooling and counts like it.
* ``nn.Bilinear`` on ``in1`` and ``in2`` features: 1 per product ``x1_i * x2_j`` of each input
  pair, then 2 per MAC of those ``in1 * in2`` products with each output's weights (a Linear on
  them), bias 1 per output element.
* Pooling counts 1 per input element inside each window (``kernel`` per output element;
  adaptive pooling sums its real window sizes), 1-d, 2-d or 3-d, batched or unbatched, with or
  without ``return_indices``. FractionalMaxPool2d/3d counts ``kernel`` per output element like
  max pooling; LPPool1d/2d/3d counts its window sums like pooling plus 1 per input element
  (``x ** p``) and 1 per output element (the root).
* ``nn.Embedding`` is a table lookup: 0 FLOPs (its ``num_embeddings * embedding_dim``
  parameters count as usual). ``nn.EmbeddingBag`` reduces the looked-up rows of each bag
  like pooling: 1 per element of every row read (``embedding_dim`` per index other than
  ``padding_idx``), whatever the mode; ``per_sample_weights`` multiplications are not counted.
* Matrix products a ``forward`` calls as functions outside the modules counted whole
  (``q @ k.transpose(-2, -1)``, ``torch.matmul``, ``F.linear``, ``F.conv2d``, ``einsum``,
  ``F.scaled_dot_product_attention``) are counted by :mod:`gatedprune.functional_costs`;
  element-wise functional calls (``torch.cat``, ``x + y``, ``F.relu``) are not. New
  shortcuts that ``gate_(..., shortcuts="dense")`` adds and pruning keeps are modules
  (``gatedprune.gating.ScaledAdd``, ``x + scale * s``): 2 per element, no parameters (the
  scale is a buffer); the expected cost of the gated model charges them the same way, times
  their open probability. A leaf module of an unknown kind raises a
  ``TypeError`` rather than being counted as free. A module whose type has a handler in the
  table is counted as a whole even if it has submodules (``nn.MultiheadAttention``,
  ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``, and ``nn.TransformerDecoder``
  and ``nn.Transformer`` when all their layers are such units).
* Attention (:func:`attention_flops`): the q/k/v and output projections (2 per MAC, biases
  1 per output element), scores ``q k^T`` and ``weights v`` (2 per MAC), softmax 1 per score;
  the ``1/sqrt(d)`` scaling and masks are not counted. ``add_bias_kv`` and ``add_zero_attn``
  each add one key/value position to the scores, softmax and ``weights v`` (not to the
  projections); ``bias_k``/``bias_v`` count as parameters. A Transformer encoder layer adds its
  feed-forward Linears, 1 per hidden element for the activation and 5 per element per
  LayerNorm; its residual adds and dropouts are free. A decoder layer counts the same with
  self-attention over ``tgt``, cross-attention (queries from ``tgt``, keys and values from
  ``memory``, whose length may differ) and three LayerNorms; it must be called with ``tgt`` and
  ``memory`` (by position or by name). ``nn.TransformerDecoder`` / ``nn.Transformer`` are the
  sum of their layers (encoder output shaped like ``src``) and optional final norms (a
  decoder ``gate_`` switched to its plain loop over the layers is counted layer by layer: the
  same sum). Sequences
  are counted at their padded length: key padding masks do not reduce the count, and
  ``nn.TransformerEncoder``'s nested-tensor fast path is switched off for the counting forward
  pass (same result).
* Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``; :func:`recurrent_step_flops`), per
  time step (every step of every sequence: ``B * T``, or the packed length), per layer and per
  direction, for ``G`` gate blocks (LSTM 4, GRU 3, RNN 1) of ``H`` units reading ``n`` features:
  the input and recurrent matmuls ``2 * G * H * (n + H)`` (``H`` replaced by ``proj_size`` in
  the recurrent one, plus ``2 * proj_size * H`` for the projection), both biases ``2 * G * H``,
  and element-wise work per unit: LSTM 13 (4 adds of the input and recurrent parts,
  3 sigmoids, 2 tanh, 3 multiplications, 1 add), GRU 11 (3 adds, 2 sigmoids, 1 tanh,
  ``r * (.)``, ``1 - z``, 2 multiplications, 1 add), RNN 2 (1 add, 1 activation).
  ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` count one such step per sample and call.
* Parameters: every parameter of the module (buffers such as BatchNorm statistics excluded).
* ``module`` must be an ``nn.Module``; a floating ``example_input`` must have the dtype of the
  model's floating parameters (``ValueError`` otherwise; integer inputs such as token ids are
  fine).

Gated modules (:class:`~gatedprune.base.GatedModule`) report their own expected cost, computed
from the gates' open probabilities; ``cost`` of a model that *contains* gated modules adds
their expected cost to the exact cost of the plain rest.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub
from torch.nn.utils.rnn import PackedSequence

from .base import BATCH_NORMS, PADDING_LAYERS, GatedModule, check_gates_not_nan, find_model_gating
from .functional_costs import BATCHNORM_FLOPS as BATCHNORM_FLOPS  # one definition, re-exported
from .functional_costs import FLOPS_PER_MAC as FLOPS_PER_MAC
from .functional_costs import LAYERNORM_FLOPS as LAYERNORM_FLOPS
from .functional_costs import FunctionalCounter
from .inputs import as_inputs, describe_inputs, tensor_inputs
from .layout import check_flag

__all__ = [
    "Cost",
    "CostProgram",
    "ExpectedCost",
    "attention_flops",
    "cost",
    "recurrent_step_flops",
]

ACT_FLOPS = 1
RMSNORM_FLOPS = 4
# FLOPs per element of nn.LocalResponseNorm besides its window sum: square, scale, add k,
# power, multiply
LRN_ELEMENTWISE = 5
# Neighbours an output element of nn.Upsample weights, by interpolating mode (2 FLOPs each).
UPSAMPLE_TAPS: dict[str, int] = {"linear": 2, "bilinear": 4, "trilinear": 8, "bicubic": 16}
# Element-wise FLOPs per hidden unit, time step and direction of recurrent cells (see above).
LSTM_ELEMENTWISE = 13
GRU_ELEMENTWISE = 11
RNN_ELEMENTWISE = 2


@dataclass(frozen=True)
class Cost:
    """Exact cost of a plain module: FLOPs of one forward pass and parameter count.

    >>> cost(nn.Linear(10, 4), torch.zeros(1, 10))
    Cost(flops=84, params=44)
    """

    flops: int
    params: int


@dataclass(frozen=True)
class ExpectedCost:
    """Expected cost of a gated model (0-dim float64 tensors, differentiable w.r.t. gates).

    >>> import gatedprune
    >>> net, x = gatedprune.ShortcutMLP(4, [6], 2), torch.zeros(1, 4)
    >>> c = cost(net, x)
    >>> c.flops.dtype, c.flops.requires_grad
    (torch.float64, True)
    >>> cost(net, x, hard=True).detach()  # every gate open: the exact cost
    Cost(flops=102, params=52)
    """

    flops: Tensor
    params: Tensor

    def detach(self) -> Cost:
        """The expected cost rounded to a plain :class:`Cost` (exact at hard 0/1 gates)."""
        return Cost(
            flops=round(float(self.flops.detach())), params=round(float(self.params.detach()))
        )


def _numel(t: Any) -> int:
    if isinstance(t, Tensor):
        return t.numel()
    if isinstance(t, tuple | list) and t:
        return _numel(t[0])
    raise TypeError(f"cannot count the output of type {type(t).__name__}")


def _adaptive_window_sum(n_in: int, n_out: int) -> int:
    """Sum of window sizes of adaptive pooling from ``n_in`` to ``n_out`` positions."""
    total = 0
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        total += end - start
    return total


def _linear(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    if not isinstance(m, nn.Linear):
        raise TypeError(f"expected nn.Linear, got {type(m).__name__}")
    flops = FLOPS_PER_MAC * out.numel() * m.in_features
    return flops + (out.numel() if m.bias is not None else 0)


def _conv(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    if not isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        raise TypeError(f"expected nn.Conv1d/2d/3d, got {type(m).__name__}")
    flops = FLOPS_PER_MAC * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return flops + (out.numel() if m.bias is not None else 0)


def _conv_transpose(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    if not isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        raise TypeError(f"expected nn.ConvTranspose1d/2d/3d, got {type(m).__name__}")
    # every input element (channel and position) meets out_channels / groups * k weights
    k = math.prod(m.kernel_size)
    flops = FLOPS_PER_MAC * inp[0].numel() * (m.out_channels // m.groups) * k
    return flops + (out.numel() if m.bias is not None else 0)


def _bilinear(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    if not isinstance(m, nn.Bilinear):
        raise TypeError(f"expected nn.Bilinear, got {type(m).__name__}")
    products = m.in1_features * m.in2_features
    pairs = out.numel() // m.out_features
    flops = pairs * products + FLOPS_PER_MAC * out.numel() * products
    return flops + (out.numel() if m.bias is not None else 0)


def _per_element(rate: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], int]:
    def count(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
        return rate * _numel(out)

    return count


_POOLS_1D: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.MaxPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
    nn.LPPool1d,
)
_POOLS_2D: tuple[type[nn.Module], ...] = (
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
    nn.FractionalMaxPool2d,
)
_LPPOOL_3D: tuple[type[nn.Module], ...] = (nn.LPPool3d,) if hasattr(nn, "LPPool3d") else ()
_POOLS_3D: tuple[type[nn.Module], ...] = (
    nn.AvgPool3d,
    nn.MaxPool3d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool3d,
    nn.FractionalMaxPool3d,
    *_LPPOOL_3D,
)


def _pool_dims(m: nn.Module) -> int:
    """Number of pooled (trailing) dimensions of a pooling module."""
    if isinstance(m, _POOLS_1D):
        return 1
    if isinstance(m, _POOLS_2D):
        return 2
    if isinstance(m, _POOLS_3D):
        return 3
    raise TypeError(f"expected a 1d, 2d or 3d pooling module, got {type(m).__name__}")


def _pooled(out: Any) -> Tensor:
    """The pooled tensor of a pooling output (``(values, indices)`` with ``return_indices``)."""
    t = out[0] if isinstance(out, tuple | list) else out
    if not isinstance(t, Tensor):
        raise TypeError(f"expected a pooling output tensor, got {type(t).__name__}")
    return t


def _pool(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    dims = _pool_dims(m)
    ks = getattr(m, "kernel_size", 1)
    k = 1
    for s in ks if isinstance(ks, tuple) else (ks,) * dims:
        k *= int(s)
    return k * _pooled(out).numel()


def _lp_pool(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    # window sums as pooling, x ** p once per input element, the root once per output element
    return _pool(m, inp, out) + inp[0].numel() + _pooled(out).numel()


def _adaptive_pool(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    return _adaptive_windows(inp[0], _pooled(out), _pool_dims(m))


def _adaptive_windows(x: Tensor, y: Tensor, dims: int) -> int:
    """Window sizes of adaptive pooling of ``x`` to ``y`` over the last ``dims`` dimensions,
    summed over every pooled map."""
    per_map = 1  # window sizes summed over one pooled map (batched or unbatched input)
    for a, b in zip(x.shape[-dims:], y.shape[-dims:], strict=True):
        per_map *= _adaptive_window_sum(int(a), int(b))
    maps = 1
    for s in x.shape[:-dims]:
        maps *= int(s)
    return per_map * maps


def _embedding_bag(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    if not isinstance(m, nn.EmbeddingBag):
        raise TypeError(f"expected nn.EmbeddingBag, got {type(m).__name__}")
    idx = inp[0]
    read = idx.numel() if m.padding_idx is None else int((idx != m.padding_idx).sum())
    return read * m.embedding_dim


def _upsample(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    if not isinstance(m, nn.Upsample):
        raise TypeError(f"expected nn.Upsample, got {type(m).__name__}")
    if m.mode in ("nearest", "nearest-exact"):
        return 0  # a copy
    if m.mode == "area":  # adaptive average pooling over the spatial dimensions
        return _adaptive_windows(inp[0], out, out.dim() - 2)
    taps = UPSAMPLE_TAPS.get(m.mode)
    if taps is None:
        raise ValueError(
            f"cost() cannot count nn.Upsample mode {m.mode!r}; expected one of "
            f"'nearest', 'nearest-exact', 'area', {', '.join(map(repr, UPSAMPLE_TAPS))}"
        )
    return FLOPS_PER_MAC * taps * out.numel()


_INSTANCE_NORMS: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def _instance_norm(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    if not isinstance(m, nn.InstanceNorm1d | nn.InstanceNorm2d | nn.InstanceNorm3d):
        raise TypeError(f"expected nn.InstanceNorm1d/2d/3d, got {type(m).__name__}")
    # eval mode: stored statistics (like BatchNorm) if tracked, else the input's own
    rate = BATCHNORM_FLOPS if m.track_running_stats else LAYERNORM_FLOPS
    return rate * out.numel()


def _local_response_norm(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    if not isinstance(m, nn.LocalResponseNorm):
        raise TypeError(f"expected nn.LocalResponseNorm, got {type(m).__name__}")
    return (m.size + LRN_ELEMENTWISE) * out.numel()


def _fold(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    return inp[0].numel()  # every block element is added into its output position


def _zero(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    return 0


_FORWARD_PARAMETERS: dict[type[nn.Module], tuple[str, ...]] = {}


def _forward_parameters(cls: type[nn.Module]) -> tuple[str, ...]:
    """Names of the parameters of ``cls.forward`` after ``self`` that may be passed
    positionally, in order (up to the first ``*args`` or keyword-only one); cached per class."""
    names = _FORWARD_PARAMETERS.get(cls)
    if names is None:
        try:
            params = list(inspect.signature(cls.forward).parameters.values())[1:]
        except (TypeError, ValueError):  # no introspectable signature
            params = []
        found: list[str] = []
        for p in params:
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                break
            found.append(p.name)
        names = _FORWARD_PARAMETERS[cls] = tuple(found)
    return names


def call_inputs(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The inputs of a call ``m(*args, **kwargs)`` as a positional tuple: ``args`` followed by
    the next parameters of ``m.forward`` the call passed by keyword, up to the first one it
    did not pass (what a cost handler reads: torchaudio's ``attn(query=x, key=x, value=x)``
    gives ``(x, x, x)``).

    >>> att = nn.MultiheadAttention(4, 2)
    >>> x = torch.zeros(3, 1, 4)
    >>> len(call_inputs(att, (), {"query": x, "key": x, "value": x, "need_weights": False}))
    3
    """
    if not kwargs:
        return args
    names = _forward_parameters(type(m))
    out = list(args)
    for name in names[len(args) :]:
        if name not in kwargs:
            break
        out.append(kwargs[name])
    return tuple(out)


def check_positional(
    name: str, m: nn.Module, inp: tuple[Any, ...], handler: Callable[..., int]
) -> None:
    """A ``TypeError`` if ``m``'s cost needs its input but the call did not pass it (hooks
    see it through :func:`call_inputs`, by position or by its parameter's name)."""
    if not inp and handler is not _zero:
        raise TypeError(
            f"counting the cost of {name or type(m).__name__} ({type(m).__name__}) needs its "
            "input, but the call passed none by position nor by the name of forward's first "
            "parameter"
        )


def _is_empty_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` without modules and with its own forward: the identity."""
    return isinstance(m, nn.Sequential) and len(m) == 0 and type(m).forward is nn.Sequential.forward


_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,  # after ReLU6, its subclass
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
    nn.PReLU,
    nn.SELU,
    nn.CELU,
    nn.RReLU,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Tanhshrink,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Softmin,
    nn.Softmax2d,
    nn.GLU,  # per output element (half the input)
)

_RMSNORM: tuple[type[nn.Module], ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()

# Free data movement: pads, shuffles, im2col and dropouts (identities in eval).
_MOVES: tuple[type[nn.Module], ...] = (
    *PADDING_LAYERS,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    nn.Unfold,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

Handler = Callable[[nn.Module, tuple[Tensor, ...], Any], int]

# Ordered (type, handler) pairs: the first isinstance match counts the module.
# torch's weight parametrizations (weight_norm, spectral_norm, orthogonal): a layer with one
# counts as its kind; where its owner is counted by parts, they are leaves of 0 FLOPs
_PARAMETRIZATIONS: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        getattr(torch.nn.utils.parametrizations, n, None)
        for n in ("_WeightNorm", "_SpectralNorm", "_Orthogonal")
    )
    if isinstance(t, type) and issubclass(t, nn.Module)
)
_HANDLERS: list[tuple[tuple[type[nn.Module], ...], Handler]] = [
    ((nn.Linear,), _linear),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv),
    (
        BATCH_NORMS,
        _per_element(BATCHNORM_FLOPS),
    ),
    ((nn.LayerNorm, nn.GroupNorm), _per_element(LAYERNORM_FLOPS)),
    (_ACTIVATIONS, _per_element(ACT_FLOPS)),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d), _pool),
    (
        (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d),
        _adaptive_pool,
    ),
    ((nn.Dropout, nn.Flatten, nn.Identity, nn.Unflatten, QuantStub, DeQuantStub), _zero),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _conv_transpose),
    ((nn.Upsample,), _upsample),  # UpsamplingNearest2d / UpsamplingBilinear2d too
    (_INSTANCE_NORMS, _instance_norm),
    (_RMSNORM, _per_element(RMSNORM_FLOPS)),
    ((nn.LocalResponseNorm,), _local_response_norm),
    ((nn.AvgPool3d, nn.MaxPool3d, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d), _pool),
    ((nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d), _adaptive_pool),
    ((nn.LPPool1d, nn.LPPool2d, *_LPPOOL_3D), _lp_pool),
    ((nn.Bilinear,), _bilinear),
    ((nn.Fold,), _fold),
    (_MOVES, _zero),
    ((nn.Embedding,), _zero),  # a table lookup
    (_PARAMETRIZATIONS, _zero),  # computes a weight, not model FLOPs (a counted layer's too)
    ((nn.EmbeddingBag,), _embedding_bag),
    ((nn.LSTM, nn.GRU, nn.RNN), lambda m, i, o: _recurrent(m, i, o)),
    ((nn.LSTMCell, nn.GRUCell, nn.RNNCell), lambda m, i, o: _cell(m, i, o)),
    ((nn.MultiheadAttention,), lambda m, i, o: _mha(m, i, o)),
    ((nn.TransformerEncoderLayer,), lambda m, i, o: _encoder_layer(m, i, o)),
    ((nn.TransformerDecoderLayer,), lambda m, i, o: _decoder_layer(m, i, o)),
    # units only when every layer is a unit (see unit_handler)
    ((nn.TransformerDecoder,), lambda m, i, o: _decoder_stack(m, i, o)),
    ((nn.Transformer,), lambda m, i, o: _transformer(m, i, o)),
]


def attention_flops(
    batch: int,
    len_q: int,
    len_kv: int,
    dims: tuple[int, int, int, int],
    heads: int,
    head_dim: int,
    in_bias: bool,
    out_bias: bool,
) -> int:
    """FLOPs of multi-head attention; ``dims = (e_q, e_k, e_v, e_out)``, ``heads`` of
    ``head_dim`` (see the module docstring).

    >>> attention_flops(1, 2, 2, (4, 4, 4, 4), 2, 2, True, True)
    360
    """
    in_bias = check_flag("in_bias", in_bias)
    out_bias = check_flag("out_bias", out_bias)
    e_q, e_k, e_v, e_out = dims
    inner = heads * head_dim
    f = FLOPS_PER_MAC * inner * (batch * len_q * e_q + batch * len_kv * (e_k + e_v))
    if in_bias:
        f += batch * (len_q + 2 * len_kv) * inner
    f += 2 * FLOPS_PER_MAC * batch * len_q * len_kv * inner + batch * heads * len_q * len_kv
    f += FLOPS_PER_MAC * batch * len_q * inner * e_out
    if out_bias:
        f += batch * len_q * e_out
    return f


def seq_dims(x: Tensor, batch_first: bool) -> tuple[int, int]:
    """(batch, length) of a sequence input (``(N, L, E)``, ``(L, N, E)`` or unbatched)."""
    if x.is_nested:
        raise TypeError("cost() cannot count a layer called on a nested tensor; pass it padded")
    if x.dim() == 2:
        return 1, int(x.shape[0])
    if batch_first:
        return int(x.shape[0]), int(x.shape[1])
    return int(x.shape[1]), int(x.shape[0])


def _mha(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    if not isinstance(m, nn.MultiheadAttention):
        raise TypeError(f"expected nn.MultiheadAttention, got {type(m).__name__}")
    if len(inp) < 3:
        raise TypeError("cost() needs nn.MultiheadAttention called with positional q, k, v")
    batch, len_q = seq_dims(inp[0], m.batch_first)
    _, len_kv = seq_dims(inp[1], m.batch_first)
    dims = (m.embed_dim, m.kdim, m.vdim, m.embed_dim)
    in_bias = m.in_proj_bias is not None
    out_bias = m.out_proj.bias is not None
    heads, head_dim = int(m.num_heads), int(m.head_dim)
    f = attention_flops(batch, len_q, len_kv, dims, heads, head_dim, in_bias, out_bias)
    # bias_k/bias_v and the zero position are appended after the projections: each extra
    # key/value position adds only to the scores, the softmax and weights @ v
    extra = int(m.bias_k is not None) + int(m.add_zero_attn)
    per_key = 2 * FLOPS_PER_MAC * batch * len_q * heads * head_dim + batch * heads * len_q
    return f + extra * per_key


def _ffn_flops(linear1: nn.Linear, linear2: nn.Linear, tokens: int, e: int) -> int:
    """Feed-forward of a Transformer layer on ``tokens`` vectors of width ``e``: both Linears
    (2 per MAC, biases 1 per output element) and the activation (1 per hidden element)."""
    hidden = int(linear1.out_features)
    f = FLOPS_PER_MAC * tokens * e * hidden + (tokens * hidden if linear1.bias is not None else 0)
    f += ACT_FLOPS * tokens * hidden
    return f + FLOPS_PER_MAC * tokens * hidden * e + (tokens * e if linear2.bias is not None else 0)


def _encoder_layer(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    if not isinstance(m, nn.TransformerEncoderLayer):
        raise TypeError(f"expected nn.TransformerEncoderLayer, got {type(m).__name__}")
    x = inp[0]  # (N, L, E), (L, N, E) or (L, E)
    att = m.self_attn
    batch, length = seq_dims(x, att.batch_first)
    e = int(att.embed_dim)
    tokens = batch * length
    f = _mha(att, (x, x, x), out)
    f += _ffn_flops(m.linear1, m.linear2, tokens, e)
    return f + 2 * LAYERNORM_FLOPS * tokens * e


def _decoder_layer(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    if not isinstance(m, nn.TransformerDecoderLayer):
        raise TypeError(f"expected nn.TransformerDecoderLayer, got {type(m).__name__}")
    if len(inp) < 2:
        raise TypeError(
            "cost() needs nn.TransformerDecoderLayer called with positional tgt, memory"
        )
    x, mem = inp[0], inp[1]  # tgt (N, T, E) / (T, N, E) / (T, E); memory with S positions
    batch, length = seq_dims(x, m.self_attn.batch_first)
    e = int(m.self_attn.embed_dim)
    tokens = batch * length
    f = _mha(m.self_attn, (x, x, x), out)
    f += _mha(m.multihead_attn, (x, mem, mem), out)  # T queries over S memory positions
    f += _ffn_flops(m.linear1, m.linear2, tokens, e)
    return f + 3 * LAYERNORM_FLOPS * tokens * e


def _is_gated(m: nn.Module) -> bool:
    """``m`` or a submodule carries gates (counted by its gating, never as a plain unit)."""
    return any(isinstance(s, GatedModule) or "_gp_ref" in s.__dict__ for s in m.modules())


def _countable_norm(norm: nn.Module | None) -> bool:
    if norm is None:
        return True
    return not any(True for _ in norm.children()) and _handler_for(norm) is not None


def _countable_stack(m: nn.Module) -> bool:
    """An encoder/decoder stack (or ``nn.Transformer``) whose parts all have unit handlers."""
    if isinstance(m, nn.Transformer):
        return _countable_stack(m.encoder) and _countable_stack(m.decoder)
    if not isinstance(m, nn.TransformerEncoder | nn.TransformerDecoder):
        return False
    layers = getattr(m, "layers", None)
    if not isinstance(layers, nn.ModuleList) or _is_gated(m):
        return False
    return all(unit_handler(layer) is not None for layer in layers) and _countable_norm(m.norm)


def _stack_flops(m: nn.Module, inp: tuple[Tensor, ...]) -> int:
    """Layers of an encoder (``inp = (src,)``) or decoder (``(tgt, memory)``) stack, then its
    norm; every layer keeps the shape of ``inp[0]``."""
    if not isinstance(m, nn.TransformerEncoder | nn.TransformerDecoder):
        raise TypeError(f"expected a Transformer encoder or decoder, got {type(m).__name__}")
    if not _countable_stack(m):
        raise TypeError(f"cost() cannot count {type(m).__name__} as a unit: unknown layers")
    x = inp[0]
    f = 0
    for layer in m.layers:
        handler = unit_handler(layer)
        if handler is None:  # excluded by _countable_stack; narrows the type
            raise TypeError(f"cost() cannot count layer {type(layer).__name__}")
        f += handler(layer, inp, x)
    if m.norm is not None:
        norm_handler = _handler_for(m.norm)
        if norm_handler is None:
            raise TypeError(f"cost() cannot count norm {type(m.norm).__name__}")
        f += norm_handler(m.norm, (x,), x)
    return f


def _decoder_stack(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    if not isinstance(m, nn.TransformerDecoder):
        raise TypeError(f"expected nn.TransformerDecoder, got {type(m).__name__}")
    if len(inp) < 2:
        raise TypeError("cost() needs nn.TransformerDecoder called with positional tgt, memory")
    return _stack_flops(m, (inp[0], inp[1]))


def _transformer(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    if not isinstance(m, nn.Transformer):
        raise TypeError(f"expected nn.Transformer, got {type(m).__name__}")
    if len(inp) < 2:
        raise TypeError("cost() needs nn.Transformer called with positional src, tgt")
    src, tgt = inp[0], inp[1]  # memory (the encoder output) has the shape of src
    return _stack_flops(m.encoder, (src,)) + _stack_flops(m.decoder, (tgt, src))


def recurrent_step_flops(
    gates: int, elementwise: int, input_size: int, hidden: int, *, bias: bool, proj_size: int = 0
) -> int:
    """FLOPs of one time step of one direction of one recurrent layer (see the module docstring).

    >>> recurrent_step_flops(4, LSTM_ELEMENTWISE, 3, 2, bias=True)  # an LSTM cell, H=2, n=3
    122
    """
    bias = check_flag("bias", bias)
    rec = proj_size if proj_size > 0 else hidden
    f = FLOPS_PER_MAC * gates * hidden * (input_size + rec) + elementwise * hidden
    if bias:
        f += 2 * gates * hidden
    if proj_size > 0:
        f += FLOPS_PER_MAC * proj_size * hidden
    return f


def _recurrent_blocks(m: nn.Module) -> tuple[int, int]:
    """(gate blocks, element-wise FLOPs per unit and step) of a recurrent layer or cell:
    LSTM 4 and 13, GRU 3 and 11, RNN 1 and 2.

    >>> _recurrent_blocks(nn.GRUCell(2, 3))
    (3, 11)
    """
    if isinstance(m, nn.LSTM | nn.LSTMCell):
        return 4, LSTM_ELEMENTWISE
    if isinstance(m, nn.GRU | nn.GRUCell):
        return 3, GRU_ELEMENTWISE
    return 1, RNN_ELEMENTWISE


def _recurrent(m: nn.Module, inp: tuple[Any, ...], out: Any) -> int:
    if not isinstance(m, nn.LSTM | nn.GRU | nn.RNN):
        raise TypeError(f"expected nn.LSTM, nn.GRU or nn.RNN, got {type(m).__name__}")
    x = inp[0]
    if isinstance(x, PackedSequence):
        steps = int(x.data.shape[0])
    else:
        batch, length = seq_dims(x, m.batch_first)
        steps = batch * length
    gates, elem = _recurrent_blocks(m)
    proj = int(getattr(m, "proj_size", 0))
    dirs = 2 if m.bidirectional else 1
    total = 0
    for layer in range(m.num_layers):
        n_in = m.input_size if layer == 0 else dirs * (proj if proj > 0 else m.hidden_size)
        f = recurrent_step_flops(
            gates, elem, n_in, m.hidden_size, bias=bool(m.bias), proj_size=proj
        )
        total += dirs * f
    return steps * total


def _cell(m: nn.Module, inp: tuple[Any, ...], out: Any) -> int:
    """One step of ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` for each sample of a
    ``(B, n)`` input (an unbatched ``(n,)`` input is one sample), counted as one time step of
    the matching recurrent layer."""
    if not isinstance(m, nn.LSTMCell | nn.GRUCell | nn.RNNCell):
        raise TypeError(f"expected an nn.LSTMCell, GRUCell or RNNCell, got {type(m).__name__}")
    x = inp[0] if inp else None
    if not isinstance(x, Tensor) or x.dim() not in (1, 2):
        raise TypeError(f"cost() needs {type(m).__name__} called with a (B, n) or (n,) input")
    batch = int(x.shape[0]) if x.dim() == 2 else 1
    gates, elem = _recurrent_blocks(m)
    step = recurrent_step_flops(gates, elem, m.input_size, m.hidden_size, bias=bool(m.bias))
    return batch * step


_STACKS: tuple[type[nn.Module], ...] = (nn.TransformerDecoder, nn.Transformer)
# built-in kinds counted whole with their submodules; the table's other kinds are leaves
_UNITS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    *_STACKS,
)
_N_BUILTIN = len(_HANDLERS)


def _no_nested_encoders(module: nn.Module) -> list[nn.TransformerEncoder]:
    """Switch off the nested-tensor fast path of every ``nn.TransformerEncoder`` in ``module``
    (layers then see the padded input, same function); returns the ones to switch back on."""
    switched = []
    for m in module.modules():
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            m.use_nested_tensor = False
            switched.append(m)
    return switched


def flops_count(value: object, source: str, module: nn.Module) -> int:
    """``value``, a FLOP count that ``source`` returned for ``module``, as an int: it must be a
    whole number >= 0 (an int, a numpy integer, an integral finite float or a one-element
    tensor holding one); anything else is a ``TypeError`` / ``ValueError`` naming both.

    >>> flops_count(12.0, "Leaf.flops_of", nn.Identity())
    12
    """
    what = f"{source} returned {value!r} for a {type(module).__name__} module"
    need = "FLOPs must be a whole number >= 0 (an int)"
    v = value
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise TypeError(f"{what}: {need}, not a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Real):
        raise TypeError(f"{what}: {need}, not {type(value).__name__}")
    if isinstance(v, numbers.Integral):
        n = int(v)
    else:
        f = float(v)
        if not math.isfinite(f) or not f.is_integer():
            raise ValueError(f"{what}: {need}")
        n = int(f)
    if n < 0:
        raise ValueError(f"{what}: {need}")
    return n


def _module_classes(types: object) -> tuple[type[nn.Module], ...]:
    """``types`` (a module class or a non-empty tuple / list of them) as a tuple."""
    items = tuple(types) if isinstance(types, tuple | list) else (types,)
    if not items:
        raise ValueError("register_cost needs at least one module class, got an empty tuple")
    for t in items:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(
                f"register_cost expects a subclass of torch.nn.Module or a tuple of them, got {t!r}"
            )
    return items


def _checked_handler(handler: object, classes: tuple[type[nn.Module], ...]) -> Handler:
    """``handler`` with its result checked by :func:`flops_count` at every call."""
    if not callable(handler):
        raise TypeError(
            "register_cost expects a callable handler(module, inputs, output) -> int, "
            f"got {handler!r}"
        )
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # e.g. some builtins have none: checked when called
        signature = None
    if signature is not None:
        try:
            signature.bind(None, None, None)
        except TypeError as e:
            raise TypeError(
                f"register_cost: the handler {handler!r} must accept three positional "
                f"arguments (module, inputs, output); its signature is {signature}"
            ) from e
    fn = handler
    names = "/".join(c.__name__ for c in classes)
    source = f"the cost handler {getattr(fn, '__qualname__', fn)} registered for {names}"

    @functools.wraps(fn)
    def checked(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
        return flops_count(fn(m, inp, out), source, m)

    return checked


def register_cost(types: type[nn.Module] | tuple[type[nn.Module], ...], handler: Handler) -> None:
    """Teach :func:`cost` to count a leaf module type (``handler(module, inputs, output)``
    returns FLOPs). Handlers registered later take precedence.

    ``types`` is a subclass of ``nn.Module`` or a non-empty tuple of them, ``handler`` a
    callable taking ``(module, inputs, output)``; both are checked here (``TypeError`` /
    ``ValueError``), so a bad registration never reaches :func:`cost`. Every count the handler
    returns must be a whole number >= 0 (an int, or an integral float); anything else is an
    error naming the module class and the value when it is counted.

    >>> register_cost((nn.Identity,), lambda m, i, o: 0)
    """
    classes = _module_classes(types)
    _HANDLERS.insert(0, (classes, _checked_handler(handler, classes)))


def unit_handler(m: nn.Module) -> Handler | None:
    """The table handler of ``m``'s type (counts ``m`` as a whole, submodules included).

    ``nn.TransformerDecoder`` / ``nn.Transformer`` are units only when all their layers are
    (otherwise their submodules are counted one by one). A built-in handler of a leaf kind
    (``nn.Linear``, a convolution, ...) does not count a subclass with submodules whole (a
    LoRA Linear: its own product, its submodules and whatever else its forward calls are
    counted one by one; parametrizations such as ``weight_norm`` do not count as
    submodules); a handler given to :func:`register_cost` does."""
    n_registered = len(_HANDLERS) - _N_BUILTIN
    if getattr(type(m), "_gp_traced_stack", False):  # gate_'s TracedTransformerDecoder
        return None  # its forward calls its layers (each a unit) and its norm: traced
    for k, (types, handler) in enumerate(_HANDLERS):
        if isinstance(m, types):
            if isinstance(m, _STACKS) and not _countable_stack(m):
                return None
            builtin_leaf_kind = k >= n_registered and not isinstance(m, _UNITS)
            # a parametrized layer (weight_norm, spectral_norm) still counts as its kind
            if builtin_leaf_kind and any(c != "parametrizations" for c, _ in m.named_children()):
                return None
            return handler
    return None


def counts_itself(m: nn.Module) -> bool:
    """Whether ``m`` is a leaf module (no children) with a ``flops_of(inputs, output)`` method:
    :func:`cost` then counts it by that method, whatever its forward does.

    >>> from gatedprune.gating.surgery import ScaledAdd
    >>> counts_itself(ScaledAdd()), counts_itself(nn.Linear(2, 2))
    (True, False)
    """
    if _rewritten_code(m):
        return False  # counted as code, like the module it was rewritten from
    return callable(getattr(m, "flops_of", None)) and not any(True for _ in m.children())


def _rewritten_code(m: nn.Module) -> bool:
    """Whether ``m`` is a module ``prune`` rewrote (fx code generated from a forward of yours,
    ``gatedprune.gating.surgery.PrunedGraphModule``) holding no buffers: your code, as the
    module it was rewritten from was (its class lives in ``torch.fx``, its matrix products are
    counted as code)."""
    return getattr(type(m), "gatedprune_rewritten", False) is True and not any(
        True for _ in m.buffers()
    )


def _handler_for(m: nn.Module) -> Handler | None:
    own = getattr(m, "flops_of", None)
    if callable(own):  # a module that counts itself takes precedence
        source = f"{type(m).__name__}.flops_of"
        return lambda mod, i, o: flops_count(own(i, o), source, mod)
    for types, handler in _HANDLERS:
        if isinstance(m, types):
            return handler
    if _is_empty_sequential(m):  # a leaf only when empty; never a unit, or it would hide layers
        return _zero
    return None


def is_code(m: nn.Module) -> bool:
    """Whether leaf ``m`` is counted as code, like the ``forward`` that calls it: a module of
    your own or a library's (not torch's) with no cost handler that holds no persistent
    buffers, with parameters (Hugging Face GPT-2's ``Conv1D``, ``x @ self.weight.t() +
    self.bias``) or without (torchvision's ``StochasticDepth`` and ``Permute``, a
    ``Chomp1d``, a swish): the matrix products it calls are counted (``addmm``, ``@``,
    ``F.linear``), element-wise ops are free, and its parameters count, as for a model without
    children. Torch's own layers without a handler, and leaves holding persistent buffers (a
    fixed scale, running statistics: state no rule says how to count), still raise.
    Non-persistent buffers (``persistent=False``: Hugging Face's rotary embeddings'
    ``inv_freq``) are constants of the code, which is counted as usual: transformers 5's
    ``position_ids[..., None] * inv_freq`` is element-wise (0), 4.x's ``inv_freq @
    positions``, a product with a contracted size of 1, ``2 * B * T * dim / 2``; ``cos`` /
    ``sin`` are free. Before 2026-12-08 02:45 UTC such a leaf raised too.

    >>> class Swish(nn.Module):
    ...     def forward(self, x): return x * torch.sigmoid(x)
    >>> class MyLinear(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.weight = nn.Parameter(torch.zeros(2, 3))
    ...     def forward(self, x): return x @ self.weight.t()
    >>> is_code(Swish()), is_code(MyLinear()), is_code(nn.CosineSimilarity())
    (True, True, False)

    A module ``prune`` rewrote (``PrunedGraphModule``) is code too, as the module it was
    rewritten from was: so a pruned model can be gated again (before 2026-12-07 it was not).
    """
    if _rewritten_code(m):
        return True
    if type(m).__module__.split(".")[0] == "torch" or _handler_for(m) is not None:
        return False
    return not _holds_state(m)


def _holds_state(m: nn.Module) -> bool:
    """Whether ``m`` (or a module in it) holds a persistent buffer: state saved with the model
    (running statistics, a fixed scale) that no rule says how to count. Non-persistent buffers
    (``register_buffer(..., persistent=False)``: a rotary embedding's ``inv_freq``, a causal
    mask) are constants the code computes with, counted as the code is.

    >>> class Rope(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.register_buffer("inv_freq", torch.ones(2), persistent=False)
    >>> _holds_state(Rope()), _holds_state(nn.BatchNorm1d(2))
    (False, True)
    """
    return any(
        b is not None and name not in sub._non_persistent_buffers_set
        for sub in m.modules()
        for name, b in sub._buffers.items()
    )


def _own_root(name: str, m: nn.Module) -> bool:
    """Whether ``m`` is the model being costed (``name`` ``""``), a module of your own without
    children or handler (``x @ self.W`` with no layer inside): its forward is counted as code,
    as a root with children is (its matrix products, its parameters), not as a leaf no hook
    sees into."""
    own = type(m).__module__.split(".")[0] != "torch"
    return name == "" and own and _handler_for(m) is None


def watch_counted(
    module: nn.Module,
    counter: FunctionalCounter,
    hook_for: Callable[[str, nn.Module], Callable[[nn.Module, tuple[Any, ...], Any], None]],
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook the modules :func:`cost` counts whole in ``module`` (gated modules, leaves, units
    such as attention; not what they hold): ``hook_for(name, m)`` becomes ``m``'s forward
    hook, and ``counter``'s depth is raised while ``m`` runs (from before its own pre-hooks,
    which may compute a weight, to after that hook, whose handler may compute), so the
    products ``counter`` adds up are those called outside them. Returns the handles."""
    handles = []
    inside: list[str] = []
    hooked: set[int] = set()
    # every name: a module shared by a unit and the rest is hooked under its outside name.
    # The parts of a unit are hooked too: called inside it they are not counted (the
    # counter's depth), called on their own they are (`self.t.encoder(src)` of an
    # nn.Transformer `t` that is never called itself); a gated module's parts are not
    for name, m in module.named_modules(remove_duplicate=False):
        if any(name.startswith(p) for p in inside):
            continue  # counted by the gated module that holds it
        leaf = not any(True for _ in m.children())
        gated = isinstance(m, GatedModule)
        whole = gated or (not leaf and unit_handler(m) is not None)
        if not (leaf or whole) or (leaf and not whole and (is_code(m) or _own_root(name, m))):
            continue
        if gated:
            inside.append(f"{name}." if name else "")
        if id(m) in hooked:
            continue
        hooked.add(id(m))
        inner = hook_for(name, m)

        def hook(
            mod: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            out: Any,
            inner: Callable[..., None] = inner,
        ) -> None:
            if counter.outer():  # inside a module counted whole: counted by that one
                inner(mod, call_inputs(mod, args, kwargs), out)

        # first of all hooks: the module's own output (before a hook of the user's replaces
        # it), its depth raised during its own pre-hooks and lowered even if forward raises
        handles.append(m.register_forward_hook(counter.leave, prepend=True, always_call=True))
        handles.append(m.register_forward_hook(hook, prepend=True, with_kwargs=True))
        handles.append(m.register_forward_pre_hook(counter.enter, prepend=True))
    return handles


def _check_input(module: Any, inputs: tuple[Any, ...]) -> None:
    """Reject a non-module, and a floating input whose dtype differs from the model's."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"cost() expects an nn.Module, got {type(module).__name__}")
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for i, example in enumerate(inputs):
        x = example.data if isinstance(example, PackedSequence) else example
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype == dtype:
            continue
        where = "example_input" if len(inputs) == 1 else f"example_input[{i}]"
        raise ValueError(
            f"{where} has dtype {x.dtype} but the model's parameters are {dtype}; "
            f"pass an input of dtype {dtype} (or convert the model)"
        )


@dataclass
class CostProgram:
    """The cost of a model as a fixed part plus its gated modules and their input shapes.

    Built once from one forward pass (:meth:`trace`); evaluating it afterwards needs no forward
    pass, so budgets can recompute the expected cost at every training step cheaply.
    """

    fixed_flops: int = 0
    fixed_params: int = 0
    # each gated module and its input's shape (a model gated with several inputs: theirs)
    gated: list[tuple[GatedModule, tuple[Any, ...]]] = field(default_factory=list)

    @staticmethod
    def trace(module: nn.Module, example_input: Any) -> CostProgram:
        """Run ``module`` once on ``example_input`` (no grad, eval mode; a tuple is the
        model's positional inputs, ``module(*example_input)``) and record its costs."""
        inputs = as_inputs(example_input)
        _check_input(module, inputs)
        program = CostProgram()
        gating = find_model_gating(module)
        if gating is not None:  # gates inserted by gate_: the gating speaks for the whole model
            xs = tensor_inputs(module, example_input, "cost")
            shapes = [tuple(x.shape) for x in xs]
            program.gated.append((gating, shapes[0] if len(shapes) == 1 else tuple(shapes)))
            return program
        errors: list[str] = []
        seen_gated: set[int] = set()
        gated_roots: list[nn.Module] = []

        def make_hook(name: str, m: nn.Module) -> Callable[..., None]:
            if isinstance(m, GatedModule):
                gated_roots.append(m)

                def gated_hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
                    if id(mod) in seen_gated:
                        raise ValueError(
                            f"gated module {name or type(mod).__name__} runs more than once per "
                            "forward pass; the cost model supports one call per module"
                        )
                    seen_gated.add(id(mod))
                    if not inp or not isinstance(inp[0], Tensor):
                        raise TypeError(
                            f"gated module {name or type(mod).__name__} must take a tensor input"
                        )
                    program.gated.append((mod, tuple(inp[0].shape)))  # type: ignore[arg-type]

                return gated_hook
            handler = _handler_for(m)

            def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
                if handler is None:
                    errors.append(f"{name or type(mod).__name__} ({type(mod).__name__})")
                    return
                check_positional(name, mod, inp, handler)
                program.fixed_flops += handler(mod, inp, out)

            return hook

        # matrix products the forwards call as functions, outside the modules counted whole
        counter = FunctionalCounter()
        handles = watch_counted(module, counter, make_hook)
        modes = [(m, m.training) for m in module.modules()]  # submodules may differ
        module.eval()
        nested = _no_nested_encoders(module)
        try:
            with torch.no_grad(), counter:
                module(*inputs)
        except RuntimeError as e:  # torch's shape and dtype errors, deep in some layer
            what = describe_inputs(inputs)
            raise ValueError(
                f"cost(): {type(module).__name__} fails on example_input {what}: {e}; pass an "
                "input the model accepts"
            ) from e
        finally:
            for h in handles:
                h.remove()
            for enc in nested:
                enc.use_nested_tensor = True
            for m, mode in modes:
                m.training = mode
        if errors:
            raise TypeError(
                "cost() does not know how to count these leaf modules: "
                + ", ".join(errors)
                + "; register them with gatedprune.costs.register_cost or give them a "
                "flops_of(inputs, output) method"
            )
        uncalled = [
            f"{name or '<root>'} ({type(m).__name__})"
            for name, m in module.named_modules()
            if any(m is r for r in gated_roots) and id(m) not in seen_gated
        ]
        if uncalled:  # prune prunes it by its gates: a cost without it would not be prune's
            raise ValueError(
                f"gated module {uncalled[0]} is not called by the forward pass on "
                "example_input, so its cost (what prune keeps of it) cannot be counted: call "
                "it in forward, or prune it (gatedprune.prune) or remove it before costing"
            )
        program.fixed_flops += counter.flops
        gated_param_ids = {id(p) for r in gated_roots for p in r.parameters()}
        program.fixed_params = sum(
            p.numel() for p in module.parameters() if id(p) not in gated_param_ids
        )
        return program

    def evaluate(self, *, hard: bool = False) -> ExpectedCost:
        """Expected (``hard=False``) or exact-at-hard-gates cost as float64 tensors
        (``hard`` must be a bool)."""
        hard = check_flag("hard", hard)
        costs = [mod.expected_cost(shape, hard=hard) for mod, shape in self.gated]
        if costs and self.fixed_flops == 0 and self.fixed_params == 0:
            # nothing fixed to add (0 + x == x): no extra ops on the budget's hot path
            flops, params = costs[0][0].double(), costs[0][1].double()
            costs = costs[1:]
        else:
            flops = torch.tensor(float(self.fixed_flops), dtype=torch.float64)
            params = torch.tensor(float(self.fixed_params), dtype=torch.float64)
        for f, p in costs:
            flops = flops + f
            params = params + p
        return ExpectedCost(flops=flops, params=params)


def cost(module: nn.Module, example_input: Any, *, hard: bool = False) -> Cost | ExpectedCost:
    """FLOPs and parameters of ``module`` for one forward pass on ``example_input`` (a tuple:
    the model's positional inputs, ``module(*example_input)``; anything else, a named tuple
    such as a PackedSequence too, is its one input).

    A plain module gives an exact :class:`Cost` (ints). A model with gates gives an
    :class:`ExpectedCost` (differentiable float64 tensors): the expectation over the gates'
    open probabilities, or with ``hard=True`` the cost at the exact open/closed decisions,
    which equals ``cost(prune(model), example_input)``. ``hard`` must be a bool
    (``TypeError`` otherwise, e.g. for ``"no"``).

    >>> c = cost(nn.Linear(10, 4), torch.zeros(1, 10))
    >>> (c.flops, c.params)
    (84, 44)
    """
    hard = check_flag("hard", hard)
    program = CostProgram.trace(module, example_input)
    if not program.gated:
        return Cost(flops=program.fixed_flops, params=program.fixed_params)
    if hard:  # a NaN gate has no decision: refused as by prune
        check_gates_not_nan(module)
    return program.evaluate(hard=hard)
