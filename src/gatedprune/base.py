"""The interface every gated (prunable) module implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from .gates import Gate, gate_modules

__all__ = ["GateHook", "GatedModule", "ModelGating"]


class GateHook:
    """Base class of the hooks gatedprune registers on a model's modules (``gate_``'s gates,
    the root's per-forward reset): every other hook on a module is the user's
    (:mod:`gatedprune.hooks`).

    >>> isinstance(lambda mod, args, out: None, GateHook)
    False
    """


BATCH_NORMS: tuple[type[nn.modules.batchnorm._BatchNorm], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,  # a BatchNorm in eval mode (and in training without a process group)
)
"""The BatchNorm kinds cost, gate_, prune and fold_batchnorm treat alike."""

INSTANCE_NORMS: tuple[type[nn.modules.instancenorm._InstanceNorm], ...] = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
"""The InstanceNorm kinds gate_ and prune treat alike (statistics per sample and channel)."""

TRANSPOSED_CONVS = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""The transposed convolutions (weight ``(C_in, C_out / groups, *k)``)."""

PADDING_LAYERS: tuple[type[nn.Module], ...] = (
    nn.ConstantPad1d,  # ZeroPad*d are ConstantPad*d
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
)
"""Padding modules (each pads its last ``len(padding) // 2`` dimensions): free data movement
for ``cost``; ``gate_`` prunes channels through them (a zero channel stays zero with constant
padding 0, and reflect, replicate and circular padding copy the channel's own values)."""


def computed_weight(m: nn.Module) -> bool:
    """Whether ``m``'s weight is computed when it runs (a parametrization such as
    ``parametrizations.weight_norm`` / ``spectral_norm``, or a forward pre-hook that is not
    gatedprune's own, such as the old ``nn.utils.weight_norm``'s): slicing or scaling the
    stored weight would not change what it computes.

    >>> weight_normed = nn.utils.parametrizations.weight_norm(nn.Linear(2, 2))
    >>> computed_weight(nn.Linear(2, 2)), computed_weight(weight_normed)
    (False, True)
    """
    return parametrize.is_parametrized(m) or _user_pre_hook(m)


def _user_pre_hook(m: nn.Module) -> bool:
    """Whether ``m`` has a forward pre-hook that is not gatedprune's own."""
    return any(not isinstance(h, GateHook) for h in m._forward_pre_hooks.values())


_WEIGHT_NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_norm_layer(m: nn.Module) -> bool:
    """Whether ``m`` is an ``nn.Linear`` or a (not transposed) convolution (not a subclass with
    a forward or submodules of its own) whose weight only torch's
    ``parametrizations.weight_norm`` computes, per output channel (``dim=0``, the default),
    with a stored bias and no forward pre-hook of the user's: ``weight = g * v / ||v||``, each
    row's norm over its own inputs, so ``gate_`` gates it and ``prune`` slices and scales
    ``g`` and ``v`` exactly (kept whole before 2026-12-07 22:10 UTC). Any other
    parametrization, or ``weight_norm`` over another dimension, is not.

    >>> wn = nn.utils.parametrizations.weight_norm
    >>> weight_norm_layer(wn(nn.Conv1d(2, 4, 3))), weight_norm_layer(wn(nn.Linear(2, 2), dim=1))
    (True, False)
    >>> weight_norm_layer(nn.Linear(2, 2))  # a stored weight: not computed at all
    False
    """
    base = next((c for c in _WEIGHT_NORM_LAYERS if isinstance(m, c)), None)
    if base is None or not parametrize.is_parametrized(m):
        return False
    # a subclass with a forward or submodules of its own (a LoRA Linear): not just the layer
    if type(m).forward is not base.forward or any(c != "parametrizations" for c in m._modules):
        return False
    plists = cast(nn.ModuleDict, m.parametrizations)
    if set(plists.keys()) != {"weight"}:
        return False
    plist = cast(nn.ModuleList, plists["weight"])
    if len(plist) != 1 or not isinstance(plist[0], _WeightNorm) or plist[0].dim != 0:
        return False
    g, v = getattr(plist, "original0", None), getattr(plist, "original1", None)
    if not isinstance(g, Tensor) or not isinstance(v, Tensor) or v.dim() < 2:
        return False
    if tuple(g.shape) != (v.shape[0], *[1] * (v.dim() - 1)):
        return False
    return not _user_pre_hook(m)


def batchnorm_affine(bn: nn.Module, user: str) -> tuple[Tensor, Tensor]:
    """``(a, c)`` in float64 with ``bn(x) = a * x + c`` per channel in eval mode: ``a = gamma /
    sqrt(var + eps)``, ``c = beta - a * mean``; what folding a BatchNorm into the layer before
    it needs. ``user`` names the caller in the ``ValueError`` for a module that is not a
    BatchNorm with running statistics.

    >>> bn = nn.BatchNorm1d(2).eval()
    >>> [t.tolist() for t in batchnorm_affine(bn, "example")]  # mean 0, var 1, eps 1e-5
    [[0.9999950000374997, 0.9999950000374997], [0.0, 0.0]]
    """
    if not isinstance(bn, BATCH_NORMS) or bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{user} needs BatchNorm layers with running statistics, got {bn!r}")
    a = 1.0 / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)  # (C,)
    if bn.weight is not None:
        a = a * bn.weight.detach().to(torch.float64)
    c = -a * bn.running_mean.to(torch.float64)  # (C,)
    if bn.bias is not None:
        c = c + bn.bias.detach().to(torch.float64)
    return a, c


class GatedModule(nn.Module):
    """A module with gates that knows its expected cost and how to rebuild itself without gates.

    Subclasses implement:

    * ``expected_cost(input_shape, hard=False)``: ``(flops, params)`` as 0-dim float64 tensors for
      one forward pass on an input of ``input_shape``. With ``hard=False`` the cost is the
      expectation over the gates' open probabilities (differentiable, gates independent); with
      ``hard=True`` it uses the exact open/closed decisions and equals ``cost()`` of
      ``pruned_module()`` exactly.
    * ``pruned_module()``: a new plain module without gates that computes, in eval mode, the
      same function as this module in eval mode.

    >>> import torch, gatedprune
    >>> net = gatedprune.ShortcutMLP(4, [6], 2)
    >>> isinstance(net, GatedModule), [g.n for g in net.gates()]  # edge, unit, head gates
    (True, [1, 6, 2])
    """

    def expected_cost(
        self, input_shape: Sequence[int], *, hard: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(flops, params)`` of one forward pass on an input of ``input_shape``, as 0-dim
        float64 tensors: expected under the gates' open probabilities (differentiable), or
        with ``hard=True`` the exact cost of :meth:`pruned_module`.

        >>> import gatedprune
        >>> flops, params = gatedprune.ShortcutMLP(4, [6], 2).expected_cost((1, 4), hard=True)
        >>> float(flops), float(params)
        (102.0, 52.0)
        """
        raise NotImplementedError

    def pruned_module(self) -> nn.Module:
        """A new plain module without gates that computes, in eval mode, this module's
        eval-mode function.

        >>> import torch, gatedprune
        >>> net = gatedprune.ShortcutMLP(4, [6], 2).eval()
        >>> small, x = net.pruned_module().eval(), torch.randn(3, 4)
        >>> torch.allclose(small(x), net(x), atol=1e-6)
        True
        """
        raise NotImplementedError

    def gates(self) -> list[Gate]:
        """The gate modules of this module."""
        return gate_modules(self)

    def width_gates(self) -> list[Gate]:
        """The gates whose open count is a layer's width (units, channels, hidden units), for
        hardware-friendly rounding (:func:`gatedprune.snap_to_budget` ``round_to``); none by
        default. Edge, block, head and sub-layer gates are not widths."""
        return []

    def gate_parameters(self) -> list[nn.Parameter]:
        """Parameters of the gates (optimise them without weight decay, often at a higher lr)."""
        return [p for g in self.gates() for p in g.parameters()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not a gate parameter."""
        gate_ids = {id(p) for p in self.gate_parameters()}
        return [p for p in self.parameters() if id(p) not in gate_ids]


class ModelGating(GatedModule):
    """Gates inserted into an existing model (by ``gatedprune.gate_``), attached to that model
    as a submodule. It speaks for the *whole* model it is attached to:

    * ``expected_cost(input_shape, hard=...)`` covers every layer of the model (gated or not)
      for an input of ``input_shape``; ``cost``/``Budget`` use it instead of tracing.
    * ``prune_model(model)`` returns the pruned copy of ``model``; ``prune`` calls it.

    >>> import torch, gatedprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> _ = gatedprune.gate_(net, torch.zeros(2, 4))
    >>> isinstance(net.gatedprune, ModelGating)
    True
    >>> [float(c) for c in net.gatedprune.expected_cost((2, 4), hard=True)]  # whole model
    [228.0, 58.0]
    """

    def prune_model(self, model: nn.Module) -> nn.Module:
        """The pruned copy of ``model`` (the model this gating is attached to), without gates
        or hooks; ``model`` itself is left unchanged. :func:`gatedprune.prune` calls it.

        >>> import torch, gatedprune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> _ = gatedprune.gate_(net, torch.zeros(2, 4))
        >>> small = net.gatedprune.prune_model(net.eval())
        >>> hasattr(small, "gatedprune"), hasattr(net, "gatedprune")
        (False, True)
        """
        raise NotImplementedError

    def pruned_module(self) -> nn.Module:
        raise TypeError("a ModelGating is pruned through gatedprune.prune(model)")


def find_model_gating(model: nn.Module) -> ModelGating | None:
    """The :class:`ModelGating` attached to ``model`` (at most one), or None."""
    found = [m for m in model.modules() if isinstance(m, ModelGating)]
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__} holds {len(found)} model gatings; expected one")
    return found[0] if found else None


def gate_probs(gate: Gate | None, n: int, *, hard: bool, like: Tensor) -> Tensor:
    """Open probabilities ``(n,)`` in float64 (ones where there is no gate)."""
    if gate is None:
        return like.new_ones(n, dtype=like.dtype)  # (n,)
    p = gate.is_open().to(like.dtype) if hard else gate.prob_open().to(like.dtype)
    return p  # (n,)


def check_gates_not_nan(model: nn.Module) -> None:
    """Refuse gates whose parameters hold NaN (diverged training): their eval values are NaN,
    and pruning would faithfully rebuild a model that outputs NaN. (An infinite parameter is
    a gate fixed open or closed, which is fine.)"""
    for name, m in model.named_modules():
        if not isinstance(m, Gate):
            continue
        for pname, p in m.named_parameters(recurse=False):
            bad = int(torch.isnan(p).sum())
            if bad:
                full = f"{name}.{pname}" if name else pname
                raise ValueError(
                    f"gate parameter {full!r} holds {bad} NaN value(s): training diverged "
                    "(lower the learning rates, or resume from an earlier checkpoint)"
                )
