"""FLOPs of the matrix products a ``forward`` calls as functions rather than as modules.

Hand-written attention (nanoGPT, Hugging Face BERT, timm's ViT) computes its scores and
weighted values with ``q @ k.transpose(-2, -1)``, ``torch.matmul`` or
``F.scaled_dot_product_attention``; no module call shows them, yet at long sequences they are
a large share of the model's FLOPs. :func:`gatedprune.cost` counts these products wherever a
``forward`` calls them outside a module it counts whole (a leaf, an attention or Transformer
layer, a gated module), with the conventions of the modules (2 FLOPs per multiply-accumulate,
1 per output element for an added bias):

* ``a @ b``, ``torch.matmul`` (``torch.linalg.matmul``), ``mm``, ``bmm``, ``mv``, ``dot``,
  ``inner``, ``tensordot`` (and their ``Tensor`` methods): ``2 * numel(out) * K`` for the
  contracted size ``K``; ``addmm``, ``baddbmm``, ``addbmm``, ``addmv`` (in place too) add 1 per
  output element (the ``alpha`` / ``beta`` scalings are not counted); ``linalg.multi_dot`` as
  products from left to right.
* ``F.linear(x, w, b)`` like ``nn.Linear``; ``F.conv1d/2d/3d`` like ``nn.Conv1d/2d/3d``
  (``2 * numel(out) * in_channels / groups * prod(kernel)``, bias 1 per output element);
  ``F.conv_transpose1d/2d/3d`` like ``nn.ConvTranspose*``; ``F.bilinear`` like
  ``nn.Bilinear``.
* ``F.batch_norm`` like the ``nn.BatchNorm*`` layers, 2 per element, and ``F.group_norm``
  like ``nn.GroupNorm``, 5 per element (with or without weight and bias, in either mode): the
  normalisation a fused norm + activation layer runs in its own ``forward`` (timm's
  ``BatchNormAct2d``, ``GroupNormAct``), counted as the plain norm would be (before
  2026-12-08 03:24 UTC they were free).
* ``torch.einsum`` with two or more operands: contracted left to right, each step
  ``2 *`` the product of the sizes of every index of its two operands; one operand (a
  transpose, trace or sum) is free.
* ``F.scaled_dot_product_attention(q, k, v)`` like the attention core of
  ``nn.MultiheadAttention``: scores ``q k^T`` and ``weights v`` 2 per MAC, softmax 1 per score
  (scale, mask and dropout not counted).

``F.multi_head_attention_forward`` called directly is not counted (``nn.MultiheadAttention``
is). Other element-wise functional calls (``F.relu``, ``x + y``, ``torch.cat``, ``F.softmax``) stay
free, as documented in :mod:`gatedprune.costs`: they are linear in the tensor size, the
products above grow with a width or a sequence length too. Products that a ``flops_of``
method, a cost handler or a module's own forward pre-hook (the weight ``spectral_norm``
computes) runs are not the model's and are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["FunctionalCounter", "einsum_subscripts", "functional_flops"]

FLOPS_PER_MAC = 2
# per element, for the functional forms here and the layers in gatedprune.costs alike
BATCHNORM_FLOPS = 2  # nn.BatchNorm*, F.batch_norm
LAYERNORM_FLOPS = 5  # nn.LayerNorm, nn.GroupNorm, F.group_norm

Rule = Callable[[tuple[Any, ...], dict[str, Any], Tensor], int]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def _contracted(a: Any) -> int:
    """The contracted size of ``a`` as the left operand of a product (its last dimension)."""
    return int(a.shape[-1]) if isinstance(a, Tensor) and a.dim() > 0 else 1


def _product(left: int, name: str) -> Rule:
    """``2 * numel(out) * K`` for a product whose left operand is argument ``left`` (or
    keyword ``name``; ``K`` its last dimension)."""

    def rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
        return FLOPS_PER_MAC * out.numel() * _contracted(_arg(args, kwargs, left, name))

    return rule


def _product_plus(name: str) -> Rule:
    """``addmm``-like: the product of arguments 1 (keyword ``name``) and 2, plus the added
    input (1 per output element)."""
    prod = _product(1, name)
    return lambda args, kwargs, out: prod(args, kwargs, out) + out.numel()


def _rmatmul(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    other = args[1] if len(args) > 1 else None  # self.__rmatmul__(other) is other @ self
    return FLOPS_PER_MAC * out.numel() * _contracted(other)


def _linear(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    weight = _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    f = FLOPS_PER_MAC * out.numel() * _contracted(weight)
    return f + (out.numel() if bias is not None else 0)


def _conv(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    weight = _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    taps = math.prod(weight.shape[1:]) if isinstance(weight, Tensor) else 1  # C_in / g * k
    return FLOPS_PER_MAC * out.numel() * taps + (out.numel() if bias is not None else 0)


def _contraction(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    """``tensordot``/``dot``/``inner``-like: ``numel(a) * numel(b) = free_a * K * K * free_b``
    and ``numel(out) = free_a * free_b``, so the MACs are ``numel(out) * K``."""
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or out.numel() == 0:
        return 0
    k = math.isqrt(a.numel() * b.numel() // out.numel())
    return FLOPS_PER_MAC * out.numel() * k


def _conv_transpose(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    """As ``nn.ConvTranspose``: every input element times the ``out_channels / groups *
    prod(kernel)`` weights it spreads over (the weight's shape after its first dimension)."""
    x, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)):
        return 0
    f = FLOPS_PER_MAC * x.numel() * math.prod(weight.shape[1:])
    return f + (out.numel() if bias is not None else 0)


def _bilinear(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    """As ``nn.Bilinear``: 1 per product ``x1_i * x2_j``, 2 per MAC of them with each output's
    weights, 1 per output element for the bias."""
    x1, weight = _arg(args, kwargs, 0, "input1"), _arg(args, kwargs, 2, "weight")
    bias = _arg(args, kwargs, 3, "bias")
    if not (isinstance(x1, Tensor) and isinstance(weight, Tensor)) or weight.dim() != 3:
        return 0
    n = x1.numel() // max(int(weight.shape[1]), 1)  # samples
    pairs = n * int(weight.shape[1]) * int(weight.shape[2])
    f = pairs + FLOPS_PER_MAC * pairs * int(weight.shape[0])
    return f + (out.numel() if bias is not None else 0)


def _per_element(flops: int) -> Rule:
    """``flops`` per element of the output (a norm: the input's shape)."""
    return lambda args, kwargs, out: flops * out.numel()


def _multi_dot(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    """``linalg.multi_dot`` counted in the order torch computes it, the cheapest one (the
    classic matrix-chain recurrence over the sizes ``p_0 x p_1, p_1 x p_2, ...``)."""
    mats = _arg(args, kwargs, 0, "tensors")
    if not isinstance(mats, list | tuple) or not all(isinstance(m, Tensor) for m in mats):
        return 0
    if len(mats) < 2 or any(m.dim() not in (1, 2) for m in mats):
        return 0
    sizes = [1 if mats[0].dim() == 1 else int(mats[0].shape[0])]
    sizes += [int(m.shape[-1]) if m.dim() == 2 else int(m.shape[0]) for m in mats[:-1]]
    sizes.append(1 if mats[-1].dim() == 1 else int(mats[-1].shape[1]))
    n = len(mats)
    best = [[0] * n for _ in range(n)]  # best[i][j]: MACs of the product of mats[i..j]
    for span in range(1, n):
        for i in range(n - span):
            j = i + span
            best[i][j] = min(
                best[i][k] + best[k + 1][j] + sizes[i] * sizes[k + 1] * sizes[j + 1]
                for k in range(i, j)
            )
    return FLOPS_PER_MAC * best[0][n - 1]


def _chain_matmul(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    """``torch.chain_matmul(*matrices)`` (deprecated): as ``multi_dot`` of its arguments."""
    return _multi_dot((list(args),), {}, out)


def _addbmm(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    """``input + sum_b batch1[b] @ batch2[b]``: every batch's product, plus the input."""
    b1 = _arg(args, kwargs, 1, "batch1")
    if not isinstance(b1, Tensor) or b1.dim() != 3:
        return 0
    return FLOPS_PER_MAC * int(b1.shape[0]) * out.numel() * int(b1.shape[2]) + out.numel()


def _sdpa(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    if not all(isinstance(t, Tensor) and t.dim() >= 2 for t in (q, k, v)):
        return 0
    len_q, e = int(q.shape[-2]), int(q.shape[-1])
    len_kv, e_v = int(k.shape[-2]), int(v.shape[-1])
    batch = out.numel() // max(len_q * e_v, 1)  # every batch and head dimension
    scores = batch * len_q * len_kv
    return scores * (FLOPS_PER_MAC * e + 1 + FLOPS_PER_MAC * e_v)


def _subscripts(term: str, dims: int) -> list[str] | None:
    """Index names of one einsum operand; ``...`` becomes one name per broadcast dimension,
    counted from its right end (``.1`` is the last), so operands broadcast alike. None if the
    term does not fit ``dims`` dimensions."""
    if "..." not in term:
        return list(term) if len(term) == dims and "." not in term else None
    before, _, after = term.partition("...")
    n = dims - len(before) - len(after)
    if n < 0 or "." in before + after:
        return None
    return [*before, *(f".{n - i}" for i in range(n)), *after]


def einsum_subscripts(
    equation: str, dims: Sequence[int], out_dims: int
) -> tuple[list[list[str]], list[str]] | None:
    """Index names of each operand of ``torch.einsum(equation, ...)`` (operands of ``dims``
    dimensions, an output of ``out_dims``) and of its output (implicit: the broadcast
    dimensions, then the indices that appear once, sorted); None if they do not fit.

    >>> einsum_subscripts("bhqd,bhkd->bhqk", [4, 4], 4)
    ([['b', 'h', 'q', 'd'], ['b', 'h', 'k', 'd']], ['b', 'h', 'q', 'k'])
    >>> einsum_subscripts("...ij,jk", [3, 2], 3)
    ([['.1', 'i', 'j'], ['j', 'k']], ['.1', 'i', 'k'])
    """
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(dims):
        return None
    subs = [_subscripts(t, d) for t, d in zip(terms, dims, strict=True)]
    if any(s is None for s in subs):
        return None
    ops = [s for s in subs if s is not None]
    if arrow:
        out = _subscripts(rhs, out_dims)
    else:
        flat = [n for names in ops for n in names]
        ell = sorted({n for n in flat if n.startswith(".")}, key=lambda n: -int(n[1:]))
        out = ell + sorted(n for n in set(flat) if not n.startswith(".") and flat.count(n) == 1)
    if out is None or len(out) != out_dims:
        return None
    return ops, out


def _einsum(args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> int:
    if not args or not isinstance(args[0], str):
        return 0
    ops: Sequence[Any] = args[1:]
    if len(ops) == 1 and isinstance(ops[0], list | tuple):
        ops = ops[0]
    if len(ops) < 2 or not all(isinstance(t, Tensor) for t in ops):
        return 0
    parsed = einsum_subscripts(args[0], [o.dim() for o in ops], out.dim())
    if parsed is None:
        return 0
    subs, wanted = parsed
    sizes: dict[str, int] = {}
    for names, op in zip(subs, ops, strict=True):
        for name, size in zip(names, op.shape, strict=True):
            sizes[name] = max(sizes.get(name, 1), int(size))
    flops = 0
    current = set(subs[0])
    for j in range(1, len(subs)):
        union = current | set(subs[j])
        flops += FLOPS_PER_MAC * math.prod(sizes[n] for n in union)
        later = {n for names in subs[j + 1 :] for n in names}
        current = {n for n in union if n in wanted or n in later}
    return flops


_RULES: dict[Any, Rule] = {
    torch.matmul: _product(0, "input"),
    Tensor.matmul: _product(0, "input"),
    Tensor.__matmul__: _product(0, "input"),
    Tensor.__rmatmul__: _rmatmul,
    torch.mm: _product(0, "input"),
    Tensor.mm: _product(0, "input"),
    torch.bmm: _product(0, "input"),
    Tensor.bmm: _product(0, "input"),
    torch.mv: _product(0, "input"),
    Tensor.mv: _product(0, "input"),
    torch.addmm: _product_plus("mat1"),
    Tensor.addmm: _product_plus("mat1"),
    torch.baddbmm: _product_plus("batch1"),
    Tensor.baddbmm: _product_plus("batch1"),
    torch.addmv: _product_plus("mat"),
    Tensor.addmv: _product_plus("mat"),
    Tensor.addmm_: _product_plus("mat1"),
    Tensor.baddbmm_: _product_plus("batch1"),
    Tensor.addmv_: _product_plus("mat"),
    torch.addbmm: _addbmm,
    Tensor.addbmm: _addbmm,
    Tensor.addbmm_: _addbmm,
    torch.linalg.matmul: _product(0, "input"),
    torch.linalg.multi_dot: _multi_dot,
    torch.chain_matmul: _chain_matmul,
    torch.tensordot: _contraction,
    torch.dot: _contraction,
    Tensor.dot: _contraction,
    torch.inner: _contraction,
    Tensor.inner: _contraction,
    F.conv_transpose1d: _conv_transpose,
    F.conv_transpose2d: _conv_transpose,
    F.conv_transpose3d: _conv_transpose,
    F.bilinear: _bilinear,
    F.linear: _linear,
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.conv3d: _conv,
    torch.einsum: _einsum,
    F.scaled_dot_product_attention: _sdpa,
    F.batch_norm: _per_element(BATCHNORM_FLOPS),  # as nn.BatchNorm1d/2d/3d
    F.group_norm: _per_element(LAYERNORM_FLOPS),  # as nn.GroupNorm
}


def functional_flops(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None, out: Any
) -> int:
    """FLOPs of one functional call ``out = func(*args, **kwargs)`` (see the module
    docstring); 0 for functions that are not counted.

    >>> a, b = torch.ones(2, 3, 4), torch.ones(2, 4, 5)
    >>> functional_flops(torch.matmul, (a, b), None, a @ b)  # 2 * (2 * 3 * 5) * 4
    240
    >>> functional_flops(torch.relu, (a,), None, a.relu())
    0
    """
    rule = _RULES.get(func)
    if rule is None or not isinstance(out, Tensor):
        return 0
    return int(rule(tuple(args), dict(kwargs or {}), out))


class FunctionalCounter(TorchFunctionMode):
    """Adds up :func:`functional_flops` of the calls made while it is active and
    :attr:`depth` is 0; a caller raises the depth while a module it counts whole runs
    (:meth:`enter` / :meth:`leave` as forward pre-hook and hook).

    >>> with FunctionalCounter() as counter:
    ...     _ = torch.ones(2, 3) @ torch.ones(3, 4)
    >>> counter.flops
    48
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.depth = 0
        self._outer: list[bool] = []  # per module call under way: called at depth 0?

    def enter(self, *_: Any) -> None:
        """Forward pre-hook: the calls of a module counted whole are not counted here."""
        self._outer.append(self.depth == 0)
        self.depth += 1

    def outer(self) -> bool:
        """Whether the module call under way (the latest :meth:`enter`) was made outside every
        other module counted whole (a module shared with one, such as an encoder layer's
        ``norm1`` also called on its own, is counted by that one when called inside it)."""
        return bool(self._outer) and self._outer[-1]

    def leave(self, *_: Any) -> None:
        """Forward hook undoing :meth:`enter` (also when the forward raised)."""
        self.depth -= 1
        self._outer.pop()

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.depth == 0:
            self.flops += functional_flops(func, args, kwargs, out)
        return out
