"""Rebuilding gated models as plain PyTorch models without gates."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .base import GatedModule, check_gates_not_nan, find_model_gating
from .hooks import computed_weight_memo

__all__ = ["prune"]


def prune(model: nn.Module) -> nn.Module:
    """Return a new plain model without gates that computes, in eval mode, the same function
    as ``model`` in eval mode: closed edges, units and layers are removed, open gate values
    are folded into the weights. ``model`` itself is left unchanged; the result is in the same
    train/eval mode.

    A model that *contains* gated modules is deep-copied with each of them replaced by its
    pruned form.

    >>> import torch, gatedprune
    >>> net = gatedprune.ShortcutMLP(8, [16, 16], 3).eval()
    >>> small = gatedprune.prune(net)
    >>> x = torch.randn(4, 8)
    >>> bool((small(x) - net(x)).abs().max() < 1e-5)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune expects a torch.nn.Module, got {type(model).__name__}")
    check_gates_not_nan(model)
    gating = find_model_gating(model)
    if gating is not None:
        return gating.prune_model(model)
    if isinstance(model, GatedModule):
        return model.pruned_module()
    roots: list[GatedModule] = []
    prefixes: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in prefixes):
            continue
        if isinstance(m, GatedModule):
            roots.append(m)
            prefixes.append(f"{name}.")
    if not roots:
        raise ValueError(
            f"{type(model).__name__} has no gated modules to prune; build it from gatedprune's "
            "networks (ShortcutMLP, ShortcutConv1d, ...) or gate it first"
        )
    memo: dict[int, Any] = {id(m): m.pruned_module() for m in roots}
    memo.update(computed_weight_memo(model))  # weights with autograd history: detached
    return copy.deepcopy(model, memo)
