"""Re-estimating normalisation statistics for the deterministic (eval-mode) gates."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .gates import gate_modules
from .inputs import as_inputs

__all__ = ["recalibrate_batchnorm"]

_BN = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm and the lazy ones


def _check_batch(index: int, x: object) -> None:
    """Refuse a floating tensor batch holding NaN or inf (other inputs go to the model as
    they are).

    >>> _check_batch(1, torch.tensor([[0.0, float("inf")]]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: recalibrate_batchnorm: batch 1 holds 1 non-finite value(s) (NaN or inf) ...
    """
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.is_complex()):
        return
    bad = ~torch.isfinite(x)  # same shape as x
    count = int(bad.sum())
    if count:
        where = ""
        if x.dim() > 0:
            sample = int(bad.reshape(len(x), -1).any(dim=1).nonzero()[0, 0])
            where = f" (the first in sample {sample})"
        raise ValueError(
            f"recalibrate_batchnorm: batch {index} holds {count} non-finite value(s) (NaN or "
            f"inf) among its {x.numel()}{where}; the old statistics are kept"
        )


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]]) -> int:
    """Recompute BatchNorm running statistics with the gates at their eval values.

    In training, gates are sampled for every batch and BatchNorm's running statistics average
    over those samples; in eval mode the gates take their deterministic values, so the
    statistics no longer match them. This resets every BatchNorm's statistics and re-estimates
    them (a cumulative average) on ``batches`` with the gates in eval mode (a batch that is a
    tuple is the model's positional inputs, ``model(*batch)``). Returns the number
    of BatchNorm layers updated; every module's train/eval mode is restored, and so are the
    old statistics if no batch was given, the model raised, or the result is not finite.
    A floating batch holding NaN or inf (which would turn every statistic NaN) is a
    ``ValueError`` naming the batch, and so are statistics that end non-finite (an overflow
    inside the model).

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
            inputs = as_inputs(x)  # a tuple: the model's positional inputs
            for part in inputs:
                _check_batch(seen, part)
            model(*inputs)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_batchnorm needs at least one batch, got none")
        for name, m in model.named_modules():
            if not (isinstance(m, _BN) and m.track_running_stats):
                continue
            for stat in ("running_mean", "running_var"):
                value = getattr(m, stat)  # (C,)
                if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
                    raise ValueError(
                        f"recalibrate_batchnorm: the new {stat} of {name or 'the model'!r} is "
                        f"not finite (NaN or inf) after {seen} batch(es): the model overflows "
                        "on them; the old statistics are kept"
                    )
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
