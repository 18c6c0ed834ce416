"""The methods compared by the suite: gatedprune and the baselines of DESIGN.md section 6.

Every method gets the same data, the same total number of epochs (pruning, sparse training and
fine-tuning all counted), the same optimizer (AdamW, lr 1e-2 with cosine decay, weight decay
1e-4, batch 100: the MNIST-1D recipe gatedprune's demo uses) and returns a plain model whose
achieved FLOPs are as close to the target as its granularity allows:

* ``gatedprune``: the workload's recipe (Lagrangian budget, gates snapped at 80%), pruned.
* ``small_dense``: the plain model with every width scaled so its FLOPs match the target,
  trained from scratch for all epochs.
* ``slimming``: Network Slimming (Liu et al. 2017): L1 on BatchNorm scales (1e-4, the paper's
  value) while training the first ``prune_at`` of the epochs, one global threshold on the
  scales (Torch-Pruning ``BNScalePruner``), fine-tuning for the rest.
* ``magnitude``: L1-norm channel pruning (Li et al. 2017) via Torch-Pruning
  (``BasePruner`` + ``GroupMagnitudeImportance(p=1)``, the same ratio in every layer) after
  ``prune_at`` of the epochs, fine-tuning for the rest.
* ``group_norm``: Torch-Pruning's sparse training (``GroupNormPruner``, its default
  regularisation 1e-4) for ``prune_at`` of the epochs, global pruning, fine-tuning.
* ``l0_fixed``: the same gated model and recipe as gatedprune (``budget_trainer``), but the
  penalty is a constant λ times the expected FLOPs fraction (no Lagrangian ascent, no
  straight-through hard cost); at the snap the gates are fixed to the target by rank of open
  probability.
* ``random``: random channels (Torch-Pruning ``RandomImportance``, uniform ratio) removed
  after ``prune_at`` of the epochs, fine-tuning for the rest.

Torch-Pruning removes channels by a *ratio*; the ratio is searched (a grid, then bisection
between the grid points that bracket the target) so that the achieved FLOPs fraction is as
close to the target as possible. Fine-tuning restarts the cosine schedule at lr 1e-2
(learning-rate rewinding, which retrains pruned networks better than a small constant lr).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.budget import Budget
from gatedprune.data import Splits

from .workloads import Workload, plain_cost

__all__ = [
    "METHODS",
    "FixedPenalty",
    "MethodResult",
    "RunSpec",
    "fit_plain",
    "scale_for_flops",
]


@dataclass(frozen=True)
class RunSpec:
    """What one method run is asked to do (shared by every method): a ``target`` fraction of
    ``dense_flops`` in ``epochs`` epochs in total; prune-then-fine-tune baselines prune after
    ``prune_at`` of them.

    >>> from bench.suite.workloads import MNIST1DShortcutConv
    >>> x, y = torch.zeros(4, 1, 40), torch.zeros(4, dtype=torch.long)
    >>> RunSpec(MNIST1DShortcutConv(), Splits(x, y, x, y), 0.1, 10, 0, 1000).split_epochs()
    (5, 5)
    """

    workload: Workload
    data: Splits
    target: float
    epochs: int
    seed: int
    dense_flops: int
    prune_at: float = 0.5
    l0_lambda: float = 1.0
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 100

    @property
    def example(self) -> Tensor:
        return self.data.x_train[:1]  # (1, C, L): costs are per sample

    def split_epochs(self) -> tuple[int, int]:
        """(epochs before pruning, fine-tuning epochs), at least one before pruning."""
        before = min(self.epochs, max(1, round(self.epochs * self.prune_at)))
        return before, self.epochs - before


@dataclass
class MethodResult:
    """A method's final plain model and notes for the result row.

    >>> MethodResult(nn.Linear(2, 2), {"ratio": 0.5}).notes
    {'ratio': 0.5}
    """

    model: nn.Module
    notes: dict[str, Any] = field(default_factory=dict)


Method = Callable[[RunSpec], MethodResult]


# ---------------------------------------------------------------------- plain training
def fit_plain(
    model: nn.Module,
    spec: RunSpec,
    epochs: int,
    *,
    seed: int,
    after_backward: Callable[[], None] | None = None,
) -> None:
    """Train a plain model: AdamW, cosine decay over ``epochs``, deterministic shuffling;
    ``after_backward`` runs between ``backward`` and the optimizer step (regularisers).
    The model is left in eval mode.

    >>> from bench.suite.workloads import MNIST1DShortcutConv
    >>> x, y = torch.randn(20, 1, 40), torch.randint(0, 10, (20,))  # (N, 1, 40), (N,)
    >>> spec = RunSpec(MNIST1DShortcutConv(), Splits(x, y, x, y), target=0.5, epochs=1, seed=0,
    ...                dense_flops=1)
    >>> model = spec.workload.plain_model(0.25)
    >>> fit_plain(model, spec, 1, seed=0)
    >>> model.training
    False
    """
    if epochs <= 0:
        return
    torch.manual_seed(seed)
    x, y = spec.data.x_train, spec.data.y_train  # (N, C, L), (N,)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = -(-len(x) // spec.batch_size)
    total = epochs * steps_per_epoch
    loss_fn = spec.workload.loss_fn()
    model.train()
    step = 0
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(x), generator=g)  # (N,)
        for i in range(0, len(x), spec.batch_size):
            idx = order[i : i + spec.batch_size]
            for group in opt.param_groups:
                group["lr"] = spec.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])  # scalar
            loss.backward()  # type: ignore[no-untyped-call]
            if after_backward is not None:
                after_backward()
            opt.step()
            step += 1
    model.eval()


def scale_for_flops(workload: Workload, flops: float, example: Tensor) -> float:
    """The width scale whose plain model's FLOPs are closest to ``flops`` (bisection).

    >>> from bench.suite.workloads import MNIST1DShortcutConv
    >>> w = MNIST1DShortcutConv()
    >>> s = scale_for_flops(w, 1e6, torch.zeros(1, 1, 40))
    >>> abs(plain_cost(w.plain_model(s), torch.zeros(1, 1, 40)).flops / 1e6 - 1) < 0.05
    True
    """
    lo, hi = 1e-3, 1.0
    while plain_cost(workload.plain_model(hi), example).flops < flops:
        hi *= 2.0
        if hi > 1e3:
            raise ValueError(f"no width scale reaches {flops} FLOPs")
    best = (math.inf, hi)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        f = plain_cost(workload.plain_model(mid), example).flops
        best = min(best, (abs(f - flops), mid))
        if f < flops:
            lo = mid
        else:
            hi = mid
    return best[1]


# ---------------------------------------------------------------------- Torch-Pruning
def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Torch-Pruning baselines need torch-pruning: pip install 'gatedprune[bench]'"
        ) from e
    return torch_pruning


def _tp_prune_to_target(
    model: nn.Module,
    spec: RunSpec,
    make_pruner: Callable[[nn.Module, float], Any],
    *,
    seed: int,
) -> tuple[nn.Module, float]:
    """Prune a copy of ``model`` with the ratio whose achieved FLOPs fraction is closest to the
    target; returns (pruned copy, ratio). ``make_pruner(model, ratio)`` builds the pruner."""

    def trial(ratio: float) -> tuple[nn.Module, float]:
        m = copy.deepcopy(model)
        torch.manual_seed(seed)  # RandomImportance: the same draw for every ratio
        make_pruner(m, ratio).step()
        return m, plain_cost(m, spec.example).flops / spec.dense_flops

    target = spec.target
    grid = [i / 50 for i in range(50)]
    fracs = [trial(r)[1] for r in grid]
    i_best = min(range(len(grid)), key=lambda i: abs(fracs[i] - target))
    lo, hi = grid[i_best], grid[i_best]
    # refine between neighbours that bracket the target (the fraction falls as the ratio grows)
    if fracs[i_best] > target and i_best + 1 < len(grid) and fracs[i_best + 1] <= target:
        hi = grid[i_best + 1]
    elif fracs[i_best] < target and i_best > 0 and fracs[i_best - 1] >= target:
        lo = grid[i_best - 1]
    best_ratio, best_err = grid[i_best], abs(fracs[i_best] - target)
    for _ in range(8 if hi > lo else 0):
        mid = 0.5 * (lo + hi)
        _, f = trial(mid)
        if abs(f - target) < best_err:
            best_ratio, best_err = mid, abs(f - target)
        if f > target:
            lo = mid
        else:
            hi = mid
    pruned, _ = trial(best_ratio)
    return pruned, best_ratio


def _prune_then_finetune(
    spec: RunSpec,
    *,
    importance: Callable[[], Any],
    pruner: str,
    global_pruning: bool,
    sparse_training: bool,
) -> MethodResult:
    tp = _tp()
    pruner_cls = {
        "base": tp.pruner.BasePruner,
        "bn_scale": tp.pruner.BNScalePruner,
        "group_norm": tp.pruner.GroupNormPruner,
    }[pruner]
    wl = spec.workload
    example = spec.example
    scale = scale_for_flops(wl, spec.dense_flops, example)  # same dense FLOPs as gatedprune's
    torch.manual_seed(spec.seed)
    model = wl.plain_model(scale)

    def make(m: nn.Module, ratio: float) -> Any:
        return pruner_cls(
            m,
            example,
            importance=importance(),
            pruning_ratio=ratio,
            global_pruning=global_pruning,
            ignored_layers=wl.prunable_head(m),
        )

    before, after = spec.split_epochs()
    hook: Callable[[], None] | None = None
    if sparse_training:
        reg = make(model, 0.5)  # its regulariser; the pruning itself is done on copies

        def hook() -> None:
            reg.regularize(model)

    fit_plain(model, spec, before, seed=spec.seed, after_backward=hook)
    pruned, ratio = _tp_prune_to_target(model, spec, make, seed=spec.seed)
    fit_plain(pruned, spec, after, seed=spec.seed + 1)
    return MethodResult(
        pruned.eval(),
        {"width_scale": round(scale, 4), "pruning_ratio": round(ratio, 4), "epochs_ft": after},
    )


def run_magnitude(spec: RunSpec) -> MethodResult:
    """L1 channel pruning + fine-tuning (Torch-Pruning, uniform ratio)."""
    tp = _tp()
    return _prune_then_finetune(
        spec,
        importance=lambda: tp.importance.GroupMagnitudeImportance(p=1),
        pruner="base",
        global_pruning=False,
        sparse_training=False,
    )


def run_random(spec: RunSpec) -> MethodResult:
    """Random structured pruning + fine-tuning (Torch-Pruning, uniform ratio)."""
    tp = _tp()
    return _prune_then_finetune(
        spec,
        importance=lambda: tp.importance.RandomImportance(),
        pruner="base",
        global_pruning=False,
        sparse_training=False,
    )


def run_slimming(spec: RunSpec) -> MethodResult:
    """Network Slimming: L1 on BN scales, global threshold, fine-tuning."""
    plain = spec.workload.plain_model(1.0)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules()):
        raise ValueError(
            f"Network Slimming needs BatchNorm scales; {type(plain).__name__} has none "
            "(not applicable to this workload)"
        )
    tp = _tp()
    return _prune_then_finetune(
        spec,
        importance=lambda: tp.importance.BNScaleImportance(),
        pruner="bn_scale",
        global_pruning=True,
        sparse_training=True,
    )


def run_group_norm(spec: RunSpec) -> MethodResult:
    """Torch-Pruning's GroupNormPruner sparse training, global pruning, fine-tuning."""
    tp = _tp()
    return _prune_then_finetune(
        spec,
        importance=lambda: tp.importance.GroupMagnitudeImportance(p=2),
        pruner="group_norm",
        global_pruning=True,
        sparse_training=True,
    )


def run_small_dense(spec: RunSpec) -> MethodResult:
    """A narrower plain model of the target FLOPs trained from scratch."""
    wl = spec.workload
    scale = scale_for_flops(wl, spec.target * spec.dense_flops, spec.example)
    torch.manual_seed(spec.seed)
    model = wl.plain_model(scale)
    fit_plain(model, spec, spec.epochs, seed=spec.seed)
    return MethodResult(model.eval(), {"width_scale": round(scale, 4)})


def run_gatedprune(spec: RunSpec) -> MethodResult:
    """gatedprune's recipe for the workload, then ``prune``."""
    gated = spec.workload.train_gatedprune(
        spec.data, budget=spec.target, epochs=spec.epochs, seed=spec.seed
    )
    gated.eval()
    pruned = gp.prune(gated).eval()
    with torch.no_grad():
        x = spec.data.x_test[:256]  # (256, C, L)
        diff = float((gated(x) - pruned(x)).abs().max())
    return MethodResult(pruned, {"max_abs_diff": diff})


class FixedPenalty(Budget):
    """A :class:`~gatedprune.Budget` whose penalty is a constant ``lam`` times the expected
    FLOPs fraction (plain L0 regularisation, Louizos et al. 2018): the multipliers get no
    gradient. ``snap_to_budget`` still works (it uses the target), which is how the fixed-λ
    baseline reaches the same FLOPs as the others.

    >>> net = gp.ShortcutMLP(8, [16], 2)
    >>> float(FixedPenalty(net, torch.zeros(1, 8), flops=0.5, lam=2.0).penalty()) > 0
    True
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        *,
        flops: float,
        lam: float,
        delay_steps: int = 0,
    ) -> None:
        super().__init__(model, example_input, flops=flops, delay_steps=delay_steps)
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = float(lam)
        for p in self.parameters():
            p.requires_grad_(False)

    def penalty(self) -> Tensor:
        active = self.active
        if self.model.training:
            self.step += 1
        if not active:
            return torch.zeros(())
        return (self.lam * self.fractions()["flops"]).float()


def run_l0_fixed(spec: RunSpec) -> MethodResult:
    """The gated model trained with gatedprune's recipe (delay, gate learning rate, snap and
    learning-rate rewinding), but with a fixed-λ L0 penalty instead of the Lagrangian."""
    from gatedprune.demo import DELAY, budget_trainer

    wl = spec.workload
    torch.manual_seed(spec.seed)
    net = wl.gated_model(spec.example)
    total = spec.epochs * -(-len(spec.data.x_train) // spec.batch_size)
    budget = FixedPenalty(
        net, spec.example, flops=spec.target, lam=spec.l0_lambda, delay_steps=int(DELAY * total)
    )
    trainer = budget_trainer(
        net, spec.data, epochs=spec.epochs, seed=spec.seed, loss_fn=wl.loss_fn(), budget=budget
    )
    trainer.fit(train=(spec.data.x_train, spec.data.y_train))
    wl.finalize_gated(net, spec.data)
    net.eval()
    before = trainer.achieved_before_snap or {}
    return MethodResult(
        gp.prune(net).eval(),
        {"lambda": spec.l0_lambda, "flops_before_snap": round(before.get("flops", math.nan), 4)},
    )


METHODS: dict[str, Method] = {
    "gatedprune": run_gatedprune,
    "small_dense": run_small_dense,
    "slimming": run_slimming,
    "magnitude": run_magnitude,
    "group_norm": run_group_norm,
    "l0_fixed": run_l0_fixed,
    "random": run_random,
}
"""Methods by name (the ``--methods`` choices), in report order."""
