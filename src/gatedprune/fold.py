"""Folding BatchNorm into the convolution before it, for deployment of plain models.

:func:`fold_batchnorm` traces an ordinary model with ``torch.fx`` and folds every
``Conv -> BatchNorm`` pair: ``a * (W x + b - mean) + beta`` with ``a = gamma / sqrt(var + eps)``
becomes ``(a W) x + a (b - mean) + beta``, the same function in eval mode (up to float rounding)
with one element-wise pass less per pair. It works on dense and pruned models alike (a pruned
model's new shortcuts, :class:`~gatedprune.gating.ScaledAdd`, stay modules).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from .base import BATCH_NORMS, GatedModule, batchnorm_affine, find_model_gating
from .gating.surgery import ScaledAdd
from .hooks import computed_weight_memo
from .plain import PlainShortcutNet
from .rnn_slicing import StateSlicing

__all__ = ["fold_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = BATCH_NORMS


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, ScaledAdd | StateSlicing):
            return True  # ours, outside torch.nn: fx would trace into them
        return bool(super().is_leaf_module(m, module_qualified_name))


def _unparametrized(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
    """A plain copy of a convolution with parametrizations (``weight_norm``, ...), their values
    baked in. (Removing them in place would edit the class the original model shares.)"""
    cls = next(c for c in _CONVS if isinstance(conv, c))
    weight = conv.weight.detach()  # (C_out, C_in / groups, *kernel)
    plain = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        plain.weight.copy_(weight)
        if conv.bias is not None and plain.bias is not None:
            plain.bias.copy_(conv.bias)
    return plain.train(conv.training)


def _fold_into(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, bn: nn.Module) -> None:
    with torch.no_grad():
        a, c = batchnorm_affine(bn, "fold_batchnorm")  # (C_out,) each, float64
        w = conv.weight.to(torch.float64)  # (C_out, C_in / groups, *kernel)
        b = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(a)
        new_w = w * a.reshape(-1, *([1] * (w.dim() - 1)))  # (C_out, C_in / groups, *kernel)
        new_b = a * b + c  # (C_out,)
        dtype = conv.weight.dtype
        conv.weight = nn.Parameter(new_w.to(dtype), requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(new_b.to(dtype), requires_grad=conv.weight.requires_grad)


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` (``torch.fx`` traceable, plain: no gates) with every BatchNorm that
    directly follows a convolution folded into it; returned in eval mode, equal to
    ``model.eval()`` up to float rounding. ``model`` itself is not changed.

    A pair is folded when the convolution's output is read only by the BatchNorm and each
    module is called once; other BatchNorms stay as they are. Raises ``TypeError`` for a model
    that ``torch.fx`` cannot trace (for a :class:`~gatedprune.PlainShortcutNet`, what
    ``prune`` returns for ``ShortcutMLP`` / ``ShortcutConv1d``, the error points to its own
    :meth:`~gatedprune.PlainShortcutNet.fold_batchnorm`) or that still has gates,
    ``ValueError`` for a pair whose BatchNorm has no running statistics (its output depends on
    the batch; nothing to fold).

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU())
    >>> folded = fold_batchnorm(net)
    >>> [type(m).__name__ for m in folded.children()]
    ['Conv1d', 'ReLU']
    >>> x = torch.randn(3, 2, 8)
    >>> bool((folded(x) - net.eval()(x)).abs().max() <= 1e-5)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects a torch.nn.Module, got {type(model).__name__}")
    if find_model_gating(model) is not None or any(
        isinstance(m, GatedModule) for m in model.modules()
    ):
        raise TypeError(
            f"{type(model).__name__} still has gates: prune it first (gatedprune.prune), "
            "then fold the plain pruned model"
        )
    work = copy.deepcopy(model, computed_weight_memo(model)).eval()
    try:
        graph = _Tracer().trace(work)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
        if isinstance(model, PlainShortcutNet):  # what prune() returns for ShortcutMLP/Conv1d
            raise TypeError(
                "fold_batchnorm cannot trace a PlainShortcutNet (what gatedprune.prune returns "
                "for ShortcutMLP / ShortcutConv1d); use its own method instead: "
                "folded = model.fold_batchnorm()"
            ) from e
        nested = next(
            (n for n, m in model.named_modules() if isinstance(m, PlainShortcutNet)), None
        )
        if nested is not None:
            raise TypeError(
                f"fold_batchnorm needs a torch.fx traceable model; tracing "
                f"{type(model).__name__} failed: its submodule {nested!r} is a "
                "PlainShortcutNet, which fx cannot trace; fold it with its own method, "
                f"model.get_submodule({nested!r}).fold_batchnorm(), instead ({e})"
            ) from e
        raise TypeError(
            f"fold_batchnorm needs a torch.fx traceable model; tracing {type(model).__name__} "
            f"failed: {e}"
        ) from e
    gm = fx.GraphModule(work, graph, class_name=f"Folded{type(model).__name__}")
    calls: dict[str, int] = {}
    attrs: set[str] = set()  # modules whose parameters the forward reads directly
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
        elif n.op == "get_attr":
            attrs.add(str(n.target).rpartition(".")[0])
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not isinstance(gm.get_submodule(str(n.target)), _NORMS):
            continue
        src = n.args[0] if len(n.args) == 1 and not n.kwargs else None
        if not (isinstance(src, fx.Node) and src.op == "call_module"):
            continue
        conv = gm.get_submodule(str(src.target))
        if not isinstance(conv, _CONVS) or len(src.users) != 1:
            continue
        if calls[str(n.target)] != 1 or calls[str(src.target)] != 1:
            continue
        if any(a == str(src.target) or a.startswith(f"{src.target}.") for a in attrs):
            continue  # e.g. ``F.conv1d(x, self.conv.weight)`` elsewhere: folding would change it
        bn = gm.get_submodule(str(n.target))
        assert isinstance(bn, _NORMS)
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"cannot fold BatchNorm '{n.target}' into '{src.target}': it has no running "
                "statistics (track_running_stats=False), so it normalises with batch statistics"
            )
        if parametrize.is_parametrized(conv):
            parent, _, attr = str(src.target).rpartition(".")
            conv = _unparametrized(conv)
            setattr(gm.get_submodule(parent), attr, conv)
        _fold_into(conv, bn)
        n.replace_all_uses_with(src)
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()
