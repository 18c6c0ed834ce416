"""Re-estimating normalisation statistics for the deterministic (eval-mode) gates."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .gates import gate_modules

__all__ = ["recalibrate_batchnorm"]

_BN = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm and the lazy ones


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Recompute BatchNorm running statistics with the gates at their eval values.

    In training, gates are sampled for every batch and BatchNorm's running statistics average
    over those samples; in eval mode the gates take their deterministic values, so the
    statistics no longer match them. This resets every BatchNorm's statistics and re-estimates
    them (a cumulative average) on ``batches`` with the gates in eval mode. Returns the number
    of BatchNorm layers updated; every module's train/eval mode is restored, and so are the
    old statistics if no batch was given or the model raised.

    >>> import torch, gatedprune
    >>> net = gatedprune.ShortcutConv1d(1, [[4]], 2)
    >>> recalibrate_batchnorm(net, [torch.randn(8, 1, 16)])
    1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    norms = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not norms:
        return 0
    modes = [(mod, mod.training) for mod in model.modules()]
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms]
    model.train()
    for g in gate_modules(model):
        g.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the given batches
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_batchnorm needs at least one batch, got none")
    except BaseException:
        for m, _, state in saved:  # leave the old statistics, not a reset or partial estimate
            m.load_state_dict(state)
        raise
    finally:
        for m, momentum, _ in saved:
            m.momentum = momentum
        for mod, training in modes:
            mod.training = training
    return len(norms)
