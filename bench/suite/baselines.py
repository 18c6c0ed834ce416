"""The methods compared by the suite: gatedprune and the baselines of DESIGN.md section 6.

Every method gets the same data, the same total number of epochs (pruning, sparse training and
fine-tuning all counted), the same optimizer (the workload's :class:`~bench.suite.workloads.
Schedule`: by default AdamW, lr 1e-2 with cosine decay, weight decay 1e-4, batch 100, the
MNIST-1D recipe gatedprune's demo uses; the LSTM workload uses Adam with gradient clipping)
and returns a plain model whose achieved FLOPs are as close to the target as its granularity
allows. A prune-then-fine-tune baseline's pre-training does not depend on the target: it runs
once per (workload, seed, method) and every budget branches off it (:func:`pretrained`):

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
* ``iss``: ISS group lasso for LSTMs (Wen et al. 2018, :mod:`bench.suite.iss`): group lasso
  over each hidden unit's weights while training the first ``prune_at`` of the epochs, the
  units with the smallest group norms removed to the target FLOPs, a smaller plain LSTM
  rebuilt and fine-tuned for the rest (LSTM workloads only).
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

from .workloads import Workload, apply_schedule, plain_cost

__all__ = [
    "METHODS",
    "SHARED_PRETRAINING",
    "FixedPenalty",
    "MethodResult",
    "RunSpec",
    "clear_pretrained",
    "fit_plain",
    "pretrained",
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
    """A method's final plain model and notes for the result row. ``shared_seconds``: time
    of work done once for several rows (a cached pre-training, :func:`pretrained`) that this
    row used without redoing it; the runner adds it to the row's ``train_s``.

    >>> MethodResult(nn.Linear(2, 2), {"ratio": 0.5}).notes
    {'ratio': 0.5}
    """

    model: nn.Module
    notes: dict[str, Any] = field(default_factory=dict)
    shared_seconds: float = 0.0


# ---------------------------------------------------------------------- shared pre-training
@dataclass
class _Pretrained:
    model: nn.Module
    seconds: float


_PRETRAINED: dict[tuple[Any, ...], _Pretrained] = {}


def clear_pretrained() -> None:
    """Forget the cached pre-trained models (the runner does this after each workload)."""
    _PRETRAINED.clear()


def pretrained(
    spec: RunSpec,
    key: tuple[Any, ...],
    model: nn.Module,
    train: Callable[[nn.Module], None],
) -> tuple[nn.Module, float]:
    """``model`` after ``train(model)``, computed once per (workload, data, seed, ``key``) and
    copied for later calls: a prune-then-fine-tune baseline's dense (or sparse) pre-training
    does not depend on the target, so every budget of one seed branches off the same
    pre-trained network at the prune point (each row still counts all its epochs). Returns
    (a private copy of the trained model, the seconds the training took when it ran); on a
    cache hit ``model`` is not trained (its initial weights are the cached run's: same seed).

    >>> from bench.suite.workloads import MNIST1DShortcutConv
    >>> x, y = torch.zeros(2, 1, 40), torch.zeros(2, dtype=torch.long)
    >>> spec = RunSpec(MNIST1DShortcutConv(), Splits(x, y, x, y), 0.5, 2, 0, 1)
    >>> calls = []
    >>> a, _ = pretrained(spec, ("doc",), nn.Linear(2, 2), calls.append)
    >>> b, _ = pretrained(spec, ("doc",), nn.Linear(2, 2), calls.append)
    >>> len(calls), bool((a.weight == b.weight).all()), a is b
    (1, True, False)
    >>> clear_pretrained()
    """
    import time

    full_key = (spec.workload.name, id(spec.data), len(spec.data.x_train), spec.seed, *key)
    hit = _PRETRAINED.get(full_key)
    if hit is None:
        t0 = time.perf_counter()
        train(model)
        hit = _PRETRAINED[full_key] = _Pretrained(copy.deepcopy(model), time.perf_counter() - t0)
        return model, 0.0
    return copy.deepcopy(hit.model), hit.seconds


Method = Callable[[RunSpec], MethodResult]

SHARED_PRETRAINING: tuple[tuple[str, ...], ...] = (("magnitude", "random"),)
"""Methods whose pre-training is the same (plain training of the same network and seed): in
one process they train it once (:func:`pretrained`)."""


# ---------------------------------------------------------------------- plain training
def fit_plain(
    model: nn.Module,
    spec: RunSpec,
    epochs: int,
    *,
    seed: int,
    after_backward: Callable[[], None] | None = None,
    penalty: Callable[[], Tensor] | None = None,
) -> None:
    """Train a plain model with the workload's :class:`~bench.suite.workloads.Schedule`
    (optimizer, lr with cosine decay over ``epochs``, weight decay, gradient clipping),
    deterministic shuffling; ``penalty()`` is added to the loss, ``after_backward`` runs
    between ``backward`` and the optimizer step (regularisers). The model is left in eval mode.

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
    schedule = spec.workload.schedule
    opt = schedule.make_optimizer(model.parameters())
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
                group["lr"] = schedule.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])  # scalar
            if penalty is not None:
                loss = loss + penalty()
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

    # fail before training when Torch-Pruning cannot prune this network (e.g. nn.LSTM)
    make(copy.deepcopy(model), 0.5).step()
    before, after = spec.split_epochs()

    def pretrain(m: nn.Module) -> None:
        hook: Callable[[], None] | None = None
        if sparse_training:
            reg = make(m, 0.5)  # its regulariser; the pruning itself is done on copies

            def hook() -> None:
                reg.regularize(m)

        fit_plain(m, spec, before, seed=spec.seed, after_backward=hook)

    kind = pruner if sparse_training else "plain"  # magnitude and random share "plain"
    model, pre = pretrained(spec, (kind, round(scale, 6), before), model, pretrain)
    pruned, ratio = _tp_prune_to_target(model, spec, make, seed=spec.seed)
    fit_plain(pruned, spec, after, seed=spec.seed + 1)
    return MethodResult(
        pruned.eval(),
        {"width_scale": round(scale, 4), "pruning_ratio": round(ratio, 4), "epochs_ft": after},
        shared_seconds=pre,
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
    >>> float(FixedPenalty(net, torch.zeros(1, 8), flops=0.5, lam=2.0).penalty().detach()) > 0
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

    def penalty(self, *, advance: bool = True) -> Tensor:
        active = self.active
        if advance and self.model.training:
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
        net,
        spec.data,
        epochs=spec.epochs,
        seed=spec.seed,
        loss_fn=wl.loss_fn(),
        budget=budget,
        edge_lr_factor=wl.edge_lr_factor,
    )
    apply_schedule(trainer, wl.schedule)
    trainer.fit(train=(spec.data.x_train, spec.data.y_train))
    wl.finalize_gated(net, spec.data)
    net.eval()
    before = trainer.achieved_before_snap or {}
    return MethodResult(
        gp.prune(net).eval(),
        {"lambda": spec.l0_lambda, "flops_before_snap": round(before.get("flops", math.nan), 4)},
    )


def run_iss(spec: RunSpec) -> MethodResult:
    """ISS group lasso (Wen et al. 2018) on the plain LSTM, units with the smallest group
    norms removed to the target FLOPs, fine-tuning (:mod:`bench.suite.iss`)."""
    from .iss import (
        ISS_LAMBDA,
        iss_group_norms,
        penalty_for,
        removal_order,
        slice_plain_lstm,
        widths_for_flops,
    )
    from .workloads import PlainLSTM

    wl = spec.workload
    if not isinstance(wl.plain_model(1.0), PlainLSTM):
        raise ValueError(
            f"ISS prunes LSTM hidden units; {type(wl.plain_model(1.0)).__name__} has none "
            "(not applicable to this workload)"
        )
    scale = scale_for_flops(wl, spec.dense_flops, spec.example)  # same dense FLOPs
    torch.manual_seed(spec.seed)
    model = wl.plain_model(scale)
    before, after = spec.split_epochs()

    def pretrain(m: nn.Module) -> None:
        fit_plain(m, spec, before, seed=spec.seed, penalty=penalty_for(m, ISS_LAMBDA))

    model, pre = pretrained(spec, ("iss", round(scale, 6), before, ISS_LAMBDA), model, pretrain)
    with torch.no_grad():
        norms = iss_group_norms(model)
    keep = widths_for_flops(
        model, removal_order(norms), spec.target * spec.dense_flops, spec.example
    )
    pruned = slice_plain_lstm(model, keep)
    fit_plain(pruned, spec, after, seed=spec.seed + 1)
    return MethodResult(
        pruned.eval(),
        {"lambda": ISS_LAMBDA, "widths": "/".join(str(len(k)) for k in keep), "epochs_ft": after},
        shared_seconds=pre,
    )


METHODS: dict[str, Method] = {
    "gatedprune": run_gatedprune,
    "small_dense": run_small_dense,
    "slimming": run_slimming,
    "magnitude": run_magnitude,
    "group_norm": run_group_norm,
    "l0_fixed": run_l0_fixed,
    "random": run_random,
    "iss": run_iss,
}
"""Methods by name (the ``--methods`` choices), in report order."""
