"""A small, deterministic training loop for gated models under a budget: :class:`Trainer` and
its learning-rate schedules. The budget snap it calls is in :mod:`gatedprune.snap`, the
checkpoint files it writes and resumes from are in :mod:`gatedprune.checkpoint`.

:class:`Trainer` optimises three parameter groups with one optimizer (AdamW by default):

* the model's weights (``lr``, ``weight_decay``),
* the gate parameters (``gate_lr``, no weight decay),
* the budget's Lagrange multipliers (``budget_lr``, no weight decay). The
  :class:`~gatedprune.budget.Budget` reverses their gradient, so the same optimizer step does
  gradient *ascent* on them.

The loss of a step is ``loss_fn(model(x), y) + budget.penalty()``. The learning rates of the
weights and gates follow ``lr_schedule(progress)`` (cosine decay to 0 over all steps by default,
``progress = step / total_steps``); the multipliers keep a constant learning rate so the
constraint is enforced until the end.

Hitting the budget: by default the penalty measures the *exact* cost of the current open/closed
decisions (``budget.straight_through`` from the first step, gradients through the expected
cost), so the multipliers steer the cost of the model ``prune`` will build, not the expected
cost, which for hard concrete gates can be far below it. Near a "cliff" (one gate holding a
large share of the cost) the exact decisions then oscillate around the target, so at
``snap_at`` (80% of the steps by default) :func:`snap_to_budget` fixes every gate within
``snap_tolerance`` of the target and freezes the gates; the remaining steps fine-tune the
weights of that architecture.

Determinism: ``fit`` seeds the global torch RNG with ``seed`` (gate sampling, dropout) and
shuffles epoch ``e`` with a ``torch.Generator`` seeded by ``(seed, e)``. Checkpoints (atomic
safetensors files, no pickle) hold everything needed to continue bit-for-bit: model, optimizer
and budget state, the RNG state, counters, history. ``fit(..., resume=True)`` continues from the
latest one.

Distributed: under ``torchrun`` (``torch.distributed`` initialised) a module holding the model
and the budget, whose forward returns the total loss, is wrapped in
``DistributedDataParallel``: the gradients of weights, gates and multipliers are all averaged.
Every rank takes a disjoint, deterministic shard of each global batch of ``batch_size``
samples (weighted so the averaged gradient is the global batch's); only rank 0 prints and
writes checkpoints.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .budget import Budget
from .checkpoint import (
    _STAT_KEYS,
    Record,
    _fingerprint,
    _invalid_parameter_values,
    _latency_model_id,
    checkpoint_files,
    load_checkpoint,
    write_checkpoint,
)
from .checks import _positive_float, _positive_int
from .fingerprint import model_fingerprint
from .gates import SigmoidGate, gate_modules, harden
from .layout import check_flag
from .snap import (
    _check_primary,
    _check_round_to,
    _check_tolerance,
    _width_gates,
    snap_to_budget,
)

__all__ = ["Trainer", "constant_lr", "cosine_lr", "rewound_cosine_lr", "snap_to_budget"]

_SEED_STRIDE = 1_000_003  # epoch e of seed s shuffles with generator seed s * stride + e
MAX_SEED = 2**63
"""Seeds are ints in ``[0, MAX_SEED)`` (the epoch seeds derived from them are taken modulo it)."""


def cosine_lr(progress: float) -> float:
    """Cosine decay from 1 at the start to 0 at the end of training.

    >>> cosine_lr(0.0), cosine_lr(0.5), cosine_lr(1.0)
    (1.0, 0.5, 0.0)
    """
    p = min(max(float(progress), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * p)) if 0.0 < p < 1.0 else 1.0 - p


def rewound_cosine_lr(rewind_at: float) -> Callable[[float], float]:
    """Cosine decay over all of training, restarted from 1 at ``rewind_at`` (learning-rate
    rewinding, Renda et al. 2020): with ``rewind_at`` equal to the Trainer's ``snap_at`` the
    final architecture is fine-tuned with a fresh schedule instead of a nearly spent one.

    >>> schedule = rewound_cosine_lr(0.8)
    >>> round(schedule(0.5), 3), schedule(0.8), round(schedule(0.9), 3), schedule(1.0)
    (0.5, 1.0, 0.5, 0.0)
    """
    at = float(rewind_at)
    if not 0.0 < at < 1.0:
        raise ValueError(f"rewind_at must be in (0, 1), got {rewind_at!r}")

    def schedule(progress: float) -> float:
        p = float(progress)
        return cosine_lr(p) if p < at else cosine_lr((p - at) / (1.0 - at))

    return schedule


def constant_lr(progress: float) -> float:
    """A constant learning rate (factor 1 throughout).

    >>> constant_lr(0.7)
    1.0
    """
    return 1.0


class _Objective(nn.Module):
    """Model + budget whose forward is the training loss (the module DDP wraps)."""

    def __init__(
        self, model: nn.Module, budget: Budget | None, loss_fn: Callable[[Tensor, Tensor], Tensor]
    ) -> None:
        super().__init__()
        self.model = model
        self.budget = budget
        self._loss_fn = (loss_fn,)  # a tuple: a loss nn.Module is not registered here

    def forward(self, x: Tensor, y: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(x)
        task = self._loss_fn[0](out, y)
        if not isinstance(task, Tensor) or task.dim() != 0:
            raise ValueError(
                "loss_fn must return a scalar tensor (mean over the batch), got "
                f"{type(task).__name__} of shape {getattr(task, 'shape', None)}"
            )
        penalty = self.budget.penalty() if self.budget is not None else task.new_zeros(())
        return task * scale + penalty, task.detach(), penalty.detach()


def _mse_same_shape(out: Tensor, y: Tensor) -> Tensor:
    """MSE that refuses to broadcast: ``nn.MSELoss`` on an output ``(B, 1)`` and targets
    ``(B,)`` would average over all ``B x B`` pairs, a silently wrong loss."""
    if not isinstance(out, Tensor) or out.shape != y.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the default MSE loss needs the model output and the targets y in the same shape, "
            f"got output {shape} and y {tuple(y.shape)}: reshape y (e.g. y[:, None] for an "
            "output of shape (B, 1)) or pass loss_fn="
        )
    return nn.functional.mse_loss(out, y)


def _default_loss(y: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    if y.is_floating_point():
        return _mse_same_shape
    return nn.CrossEntropyLoss()


def _check_pair(name: str, pair: object) -> tuple[Tensor, Tensor]:
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        raise TypeError(f"{name} must be a pair (x, y) of tensors, got {type(pair).__name__}")
    x, y = pair
    if type(x) is tuple:
        raise TypeError(
            f"{name}: x is a tuple of {len(x)} inputs, but Trainer calls model(x) with one "
            "tensor; train a multi-input model with your own loop (gatedprune.Budget(model, "
            "(x, t), flops=...) and budget.penalty() in the loss)"
        )
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"{name} must be a pair (x, y) of tensors, got ({type(x).__name__}, {type(y).__name__})"
        )
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(f"{name}: x and y need a leading sample dimension")
    if len(x) != len(y):
        raise ValueError(f"{name}: x has {len(x)} samples but y has {len(y)}; they must match")
    if len(x) == 0:
        raise ValueError(f"{name}: no samples")
    return x, y


def _sync_buffers(model: nn.Module, world: int) -> None:
    """Under DDP, give every rank rank 0's buffers (BatchNorm statistics): DDP broadcasts
    them at the start of each forward, so after a step each rank holds statistics updated on
    its own shard, and the ranks' validation and final models would differ."""
    if world <= 1:
        return
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def _all_finite(finite: bool, device: torch.device) -> bool:
    """Under DDP: whether every rank's loss was finite (one all-reduce of a flag), so a rank
    whose loss diverged does not leave the others waiting in DDP's gradient all-reduce."""
    flag = torch.tensor([0.0 if finite else 1.0], device=device)  # (1,)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag) == 0.0


def _check_finite(name: str, x: Tensor, y: Tensor) -> None:
    """Refuse NaN or inf in floating (or complex) ``x`` / ``y``: one bad value turns every
    weight NaN within a few steps.

    >>> x = torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])
    >>> _check_finite("train", x, torch.tensor([0, 1]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: train: x holds 1 non-finite value(s) (NaN or inf) among its 4 (the first in ...
    """
    for part, t in (("x", x), ("y", y)):
        if not (t.is_floating_point() or t.is_complex()):
            continue
        bad = ~torch.isfinite(t)  # same shape as t
        count = int(bad.sum())
        if count:
            sample = int(bad.reshape(len(t), -1).any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"{name}: {part} holds {count} non-finite value(s) (NaN or inf) among its "
                f"{t.numel()} (the first in sample {sample}); training on them would turn "
                "every weight NaN: drop or repair those samples"
            )


def _non_finite_parameters(model: nn.Module, budget: Budget | None) -> list[str]:
    """Names (with counts) of the floating parameters of ``model`` and ``budget`` that show
    divergence: NaN anywhere, or inf outside the gates (``Gate.force_`` fixes a gate with
    ``log_alpha = +-inf`` before 2026-12-07, ``+-1e4`` since)."""
    gate_params = {id(p) for g in gate_modules(model) for p in g.parameters()}
    named = [(k, p) for k, p in model.named_parameters()]
    if budget is not None:
        named += [(f"budget.{k}", p) for k, p in budget.named_parameters()]
    out: list[str] = []
    for k, p in named:
        # the rule load_checkpoint applies: the Trainer never writes what it cannot resume
        bad = _invalid_parameter_values(p.detach(), id(p) in gate_params)  # same shape as p
        count = int(bad.sum())
        if count:
            out.append(f"{k} ({count} of {p.numel()})")
    return out


def _fraction_or_none(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None or a fraction in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a fraction of training in [0, 1], got {value}")
    return float(value)


def _schedule_factor(schedule: Callable[[float], float], progress: float) -> float:
    """``schedule(progress)`` checked: a finite number >= 0 (a negative factor would turn the
    optimizer step into gradient ascent, NaN would poison every weight)."""
    value = schedule(progress)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"lr_schedule({progress!r}) must return a number (the learning-rate factor), got "
            f"{type(value).__name__}"
        )
    factor = float(value)
    if not (math.isfinite(factor) and factor >= 0.0):
        raise ValueError(
            f"lr_schedule({progress!r}) returned {value!r}; the learning-rate factor must be a "
            "finite number >= 0"
        )
    return factor


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _progress_bar(total: int, initial: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass(eq=False)
class Trainer:
    """Train a (gated) model, optionally under a :class:`~gatedprune.budget.Budget`.

    Data are in-memory tensors ``(x, y)``; ``loss_fn`` must return the *mean* loss of a batch
    (``None``: cross-entropy for integer ``y``, MSE for floating ``y``). ``optimizer`` is a
    factory ``param_groups -> torch.optim.Optimizer`` (``None``: AdamW); each group already
    carries its ``name`` (``"weights"``, ``"gates"``, ``"budget"``), ``lr`` and
    ``weight_decay``. ``lr_schedule(progress)`` scales the weight and gate learning rates (see
    :func:`cosine_lr`). ``edge_gate_lr`` (``None``: ``gate_lr``) is the learning rate of every
    gate its model does not list in ``width_gates()`` (unit/channel gates): shortcut edges,
    read-outs, layer, block, attention-head and sub-layer gates, in a second ``"gates"``
    group. ``checkpoint_every_steps=None``
    checkpoints at the end of every epoch (and at the end, and at a ``max_steps`` stop); the
    newest ``keep_checkpoints`` are kept.

    Phases, as fractions of all steps (``None``: never): after ``harden_at`` sigmoid gates are
    hardened (:func:`gatedprune.harden`); after ``straight_through_at`` the budget penalises the
    exact cost with straight-through gradients (``budget.straight_through``; ``None`` leaves
    the flag alone); at ``snap_at`` the gates are fixed to the budget by
    :func:`snap_to_budget` (``snap_tolerance``, widths rounded to ``snap_round_to``, the
    target ``snap_primary`` brought within the tolerance when several are set) and frozen
    (only with a budget); a run that ends before reaching ``snap_at`` (one or two steps) snaps
    at its end. ``metrics_fn(model)`` (called in eval mode, without gradients, after each
    epoch) adds its values to the epoch record;
    ``on_step(trainer, record)`` is called after every step.

    >>> import torch, gatedprune
    >>> from gatedprune.train import Trainer
    >>> _ = torch.manual_seed(0)
    >>> net = gatedprune.ShortcutMLP(8, [16, 16], 3)
    >>> budget = gatedprune.Budget(net, torch.zeros(1, 8), flops=0.5)
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> trainer = Trainer(net, budget=budget, epochs=2, batch_size=16, progress=False)
    >>> history = trainer.fit(train=(x, y), val=(x, y))
    >>> [h["epoch"] for h in history], 0.5 - 0.02 <= budget.achieved()["flops"] <= 0.5
    ([1, 2], True)
    """

    model: nn.Module = field(repr=False)
    _: KW_ONLY
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = field(default=None, repr=False)
    budget: Budget | None = field(default=None, repr=False)
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-2
    gate_lr: float = 5e-2
    edge_gate_lr: float | None = None
    budget_lr: float = 5e-2
    weight_decay: float = 0.0
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = field(
        default=None, repr=False
    )
    lr_schedule: Callable[[float], float] = field(default=cosine_lr, repr=False)
    seed: int = 0
    checkpoint_dir: str | os.PathLike[str] | None = None
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 2
    progress: bool = True
    harden_at: float | None = None
    straight_through_at: float | None = 0.0
    snap_at: float | None = 0.8
    snap_tolerance: float = 0.01
    snap_round_to: int | None = None
    snap_primary: str | None = None
    metrics_fn: Callable[[nn.Module], Mapping[str, float]] | None = field(default=None, repr=False)
    on_step: Callable[[Trainer, Record], None] | None = field(default=None, repr=False)
    trace_every: int = 10
    eval_batch_size: int | None = None
    history: list[Record] = field(default_factory=list, init=False, repr=False)
    """One record per finished epoch (see :meth:`fit`)."""
    trace: list[Record] = field(default_factory=list, init=False, repr=False)
    """A record every ``trace_every`` steps: losses, expected cost, mean gate value, ..."""
    achieved_before_snap: dict[str, float] | None = field(default=None, init=False, repr=False)
    """The achieved cost fractions the Lagrangian reached just before the snap (this run)."""
    step: int = field(default=0, init=False)
    """Optimizer steps done so far."""

    def __post_init__(self) -> None:
        self._check_settings()
        self._stats: dict[str, float] = {}
        self._sigmoid_gates: list[SigmoidGate] = []  # set by fit
        self._stale: list[Path] = []  # checkpoints of an earlier run in checkpoint_dir
        # (model, its fingerprint when this Trainer first saw it), for checkpoint configs
        self._model_record: tuple[nn.Module, dict[str, Any]] | None = None

    def _check_settings(self) -> None:
        """Validate (and normalise: numpy numbers to Python ones) every setting; run at
        construction and again at the start of :meth:`fit`, so a setting changed in between
        (``trainer.epochs = 0``, ``trainer.lr = float("nan")``) is refused as well."""
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.budget is not None:
            if not isinstance(self.budget, Budget):
                raise TypeError(
                    f"budget must be a gatedprune.Budget or None, got {type(self.budget).__name__}"
                )
            if self.budget.model is not self.model:
                raise ValueError(
                    f"the budget was built for another model ({type(self.budget.model).__name__} "
                    f"at {id(self.budget.model):#x}), not for the model given to the Trainer; "
                    "build it with gatedprune.Budget(model, example_input, ...) on this model"
                )
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
        self.epochs = _positive_int("epochs", self.epochs)
        self.batch_size = _positive_int("batch_size", self.batch_size)
        self.trace_every = _positive_int("trace_every", self.trace_every)
        self.keep_checkpoints = _positive_int("keep_checkpoints", self.keep_checkpoints)
        if self.eval_batch_size is not None:
            self.eval_batch_size = _positive_int("eval_batch_size", self.eval_batch_size)
        if self.checkpoint_every_steps is not None:
            self.checkpoint_every_steps = _positive_int(
                "checkpoint_every_steps", self.checkpoint_every_steps
            )
        self.lr = _positive_float("lr", self.lr)
        self.gate_lr = _positive_float("gate_lr", self.gate_lr)
        if self.edge_gate_lr is not None:
            self.edge_gate_lr = _positive_float("edge_gate_lr", self.edge_gate_lr)
        self.budget_lr = _positive_float("budget_lr", self.budget_lr)
        self.weight_decay = _positive_float("weight_decay", self.weight_decay, allow_zero=True)
        self.progress = check_flag("progress", self.progress)  # nan or "no": no bar
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        self.seed = int(self.seed)
        self.harden_at = _fraction_or_none("harden_at", self.harden_at)
        self.straight_through_at = _fraction_or_none(
            "straight_through_at", self.straight_through_at
        )
        self.snap_at = _fraction_or_none("snap_at", self.snap_at)
        if self.snap_at == 1.0:
            raise ValueError("snap_at must be < 1 (call snap_to_budget after training instead)")
        if self.snap_round_to is not None:
            self.snap_round_to = _positive_int("snap_round_to", self.snap_round_to)
        self.snap_tolerance = _positive_float(
            "snap_tolerance", self.snap_tolerance, allow_zero=True
        )
        for name in ("optimizer", "lr_schedule", "metrics_fn", "on_step"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable or None, got {type(value).__name__}")
        if self.lr_schedule is None:
            raise TypeError(
                "lr_schedule must be a function progress -> learning-rate factor, got None "
                "(gatedprune.train.constant_lr keeps the learning rates constant)"
            )
        if isinstance(self.lr_schedule, type):  # e.g. a torch.optim.lr_scheduler class
            raise TypeError(
                "lr_schedule must be a function progress -> learning-rate factor (progress = "
                "step / total steps, e.g. gatedprune.train.cosine_lr), got the class "
                f"{self.lr_schedule.__name__}"
            )
        if self.checkpoint_dir is not None and not isinstance(
            self.checkpoint_dir, str | os.PathLike
        ):
            raise TypeError(f"checkpoint_dir must be a path or None, got {self.checkpoint_dir!r}")

    # ------------------------------------------------------------------ public API
    def fit(
        self,
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor] | None = None,
        *,
        resume: bool = False,
        max_steps: int | None = None,
    ) -> list[Record]:
        """Train for ``epochs`` epochs and return :attr:`history` (one record per epoch).

        Each record holds ``epoch``, ``step``, ``lr``, ``loss`` (task + penalty), ``task_loss``,
        ``penalty`` (means over the epoch), ``val_loss`` and ``val_accuracy`` (integer targets)
        or ``val_mse`` (floating targets of the output's shape) when ``val`` is given,
        ``gate_mean`` / ``gate_open`` (mean open probability / fraction of open gates), for each
        budget constraint ``k``: ``expected_k``, ``achieved_k``, ``target_k``, ``lambda1_k``,
        ``lambda2_k``, then the ``metrics_fn`` values and ``time`` (wall seconds of the epoch).

        Without ``resume`` a new run starts from the model's current weights (and clears
        :attr:`history`); its first checkpoint replaces any an earlier run left in
        ``checkpoint_dir``. ``resume=True`` continues from the latest checkpoint in
        ``checkpoint_dir`` (a new run when there is none yet); the result is identical to an
        uninterrupted run. A checkpoint written with other settings (epochs, batch size, seed,
        learning rates, weight decay, optimizer class or group settings, phases, snap,
        budget targets and schedule, the budget's latency model, number of samples) is
        refused with a ``ValueError``, as is a corrupted or foreign file, one holding values no
        run writes (NaN weights, a negative variance or step count, more epochs of history
        than steps: :func:`~gatedprune.checkpoint.load_checkpoint`), and so are other
        ``train`` or ``val`` data (compared by SHA-256); the model is then left as it was.
        Functions (``loss_fn``, ``lr_schedule``, ...) are not compared.
        ``max_steps`` stops after that many optimizer steps in total (writing a checkpoint).

        Checked before any training (``ValueError`` / ``TypeError``): every setting (again, in
        case one was changed after construction), floating ``x`` and ``y`` (NaN or inf values
        are refused), class labels for a cross-entropy / NLL loss (the default one for integer
        ``y``): an integer dtype torch accepts, the shape of the model's output without its
        class dimension and every label in ``[0, classes)`` (``ignore_index`` allowed), read
        from one forward pass of two samples in eval mode without gradients, and that
        ``checkpoint_dir`` can be created. A non-finite loss stops training with a
        ``ValueError`` before that step's optimizer update, and a checkpoint is never written
        while a parameter is NaN or inf: the checkpoints already in ``checkpoint_dir`` are kept.

        >>> import torch, gatedprune
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> net = gatedprune.ShortcutMLP(4, [6], 2)
        >>> history = Trainer(net, epochs=1, batch_size=16, progress=False).fit((x, y), val=(x, y))
        >>> len(history), history[-1]["step"], "val_accuracy" in history[-1]
        (1, 2, True)
        """
        self._check_settings()
        x, y = _check_pair("train", train)
        val_pair = None if val is None else _check_pair("val", val)
        if max_steps is not None:
            max_steps = _positive_int("max_steps", max_steps)
        resume = check_flag("resume", resume)  # "no" or 0.0 would silently pick a mode
        if resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir: where should I look?")
        _check_finite("train", x, y)
        if val_pair is not None:
            _check_finite("val", *val_pair)
        loss_fn = self.loss_fn if self.loss_fn is not None else _default_loss(y)
        world, rank = _dist_info()
        n = len(x)
        spe = self._steps_per_epoch(n, world)
        total = self.epochs * spe
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))

        self._check_checkpoint_dir()
        opt = self._make_optimizer()
        base_lrs = [float(g["lr"]) for g in opt.param_groups]
        names = [g.get("name") for g in opt.param_groups]
        config = self._config(n, spe, opt)
        config["train_data"] = _fingerprint(x, y)
        config["val_data"] = None if val_pair is None else _fingerprint(*val_pair)
        if self.budget is not None and self.snap_at is not None and self.snap_round_to:
            _check_round_to(self.model, self.snap_round_to, "snap_round_to")  # not at the snap
        if self.snap_primary is not None:  # checked now, not at the snap
            if self.budget is None:
                raise ValueError("snap_primary names a budget target, but there is no budget")
            try:
                _check_primary(self.snap_primary, self.budget.targets)
            except (TypeError, ValueError) as e:
                raise type(e)(f"snap_{e}") from None
        if self.budget is not None and self.snap_at is not None:  # now, not at the snap
            _check_tolerance(
                self.snap_tolerance,
                self.snap_tolerance,
                self.budget,
                self.snap_primary,
                "snap_tolerance",
            )
        self._check_labels(loss_fn, x, y, val_pair, device)  # before the seed: RNG unaffected
        loaded = False
        failure: Exception | None = None
        self._stale = []
        if rank == 0:  # the only rank that writes checkpoints
            try:
                self._make_checkpoint_dir()
            except ValueError as e:  # under DDP every rank must learn of it, or they hang
                if world == 1:
                    raise
                failure = e
        if resume and failure is None:
            path = self.latest_checkpoint()
            if path is not None:
                try:
                    self._load_checkpoint(path, opt, config, world, rank)
                    loaded = True
                except Exception as e:  # under DDP every rank must learn of it, or they hang
                    if world == 1:
                        raise
                    failure = e
        checkpointing = self.checkpoint_dir is not None  # rank 0's setting, under DDP
        if world > 1:
            checkpointing = self._agree_on_start(
                world, self.step if loaded else 0, failure, checkpointing
            )
        if not loaded:
            torch.manual_seed(self.seed)
            self.history, self.trace, self.step = [], [], 0
            self.achieved_before_snap = None
            self._reset_stats()
            if rank == 0:  # an earlier run's checkpoints, superseded by this run's first one
                self._stale = self._checkpoints()

        self._sigmoid_gates = [g for g in gate_modules(self.model) if isinstance(g, SigmoidGate)]
        objective = _Objective(self.model, self.budget, loss_fn)
        module: nn.Module = objective
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # every trainable parameter takes part in each step (gates at least through the
            # penalty); freeze (requires_grad=False) any that a custom model leaves unused
            module = DistributedDataParallel(objective)

        show = self.progress and rank == 0
        bar = _progress_bar(total, self.step) if show else None
        last_saved = self.step if loaded else -1
        was_training = self.model.training
        self.model.train()
        perm: Tensor | None = None
        perm_epoch = -1
        try:
            while self.step < total:
                if max_steps is not None and self.step >= max_steps:
                    break
                epoch, b = divmod(self.step, spe)
                if perm is None or perm_epoch != epoch:
                    gen = torch.Generator().manual_seed(
                        (self.seed * _SEED_STRIDE + epoch) % MAX_SEED  # fits torch's 64 bits
                    )
                    perm = torch.randperm(n, generator=gen)  # (N,)
                    perm_epoch = epoch
                t0 = time.perf_counter()
                idx = perm[b * self.batch_size : (b + 1) * self.batch_size]  # (B,)
                local = idx[rank::world]  # (B / world,) this rank's disjoint shard
                scale = len(local) * world / len(idx)
                self._apply_phase(opt, base_lrs, names, total)
                xb = x[local].to(device)
                yb = y[local].to(device)
                loss, task, penalty = module(xb, yb, scale)
                task_f, penalty_f = float(task), float(penalty)
                finite = math.isfinite(task_f) and math.isfinite(penalty_f)
                if world > 1:  # every rank stops together, none waits in DDP's all-reduce
                    finite = _all_finite(finite, device)
                if not finite:
                    raise self._diverged(epoch, task_f, penalty_f, world)  # before the update
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.step += 1
                record = self._account(epoch, len(local), task_f, penalty_f)
                self._stats["time"] += time.perf_counter() - t0
                if self.step % self.trace_every == 0 or self.step == total:
                    self._trace_point(record)
                    if bar is not None:
                        bar.set_postfix(self._postfix(), refresh=False)
                if bar is not None:
                    bar.update(1)
                if self.on_step is not None:
                    self.on_step(self, record)
                if self.step % spe == 0:
                    _sync_buffers(self.model, world)  # validate rank 0's BatchNorm statistics
                    line = self._end_epoch(epoch, val_pair, loss_fn, world, opt)
                    if show:
                        if bar is not None:
                            bar.write(line)
                        else:
                            print(line, flush=True)
                if checkpointing and self._checkpoint_due(spe, total):
                    self._save_checkpoint(opt, config, world, rank)
                    last_saved = self.step
            _sync_buffers(self.model, world)  # every rank ends with rank 0's model
            snapped_late = self.step >= total and self._snap_if_missed()
            if checkpointing and (last_saved != self.step or snapped_late):
                self._save_checkpoint(opt, config, world, rank)
        finally:
            if bar is not None:
                bar.close()
            self.model.train(was_training)
        return self.history

    def latest_checkpoint(self) -> Path | None:
        """Path of the newest checkpoint in ``checkpoint_dir`` (None if there is none)."""
        found = self._checkpoints()
        return found[-1] if found else None

    def _checkpoints(self) -> list[Path]:
        """The checkpoint files in ``checkpoint_dir``, oldest step first."""
        if self.checkpoint_dir is None:
            return []
        return checkpoint_files(Path(self.checkpoint_dir))

    def _check_checkpoint_dir(self) -> None:
        """``checkpoint_dir`` must be a folder or creatable as one (checked without creating
        it, on every rank, before any other work)."""
        if self.checkpoint_dir is None:
            return
        from .io import folder_problem

        why = folder_problem(Path(self.checkpoint_dir))  # a file, or under one
        if why is not None:
            raise ValueError(f"checkpoint_dir: {why}; pass a folder (it is created if missing)")

    def _make_checkpoint_dir(self) -> None:
        """Create ``checkpoint_dir`` (rank 0, after every other check, before training): a
        folder that cannot be created or written to is a ``ValueError`` now, not after the
        first epoch."""
        if self.checkpoint_dir is None:
            return
        folder = Path(self.checkpoint_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"checkpoint_dir {str(folder)!r} cannot be created: {e.strerror or e}"
            ) from e
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"checkpoint_dir {str(folder)!r} is not writable")

    def _diverged(self, epoch: int, task: float, penalty: float, world: int) -> ValueError:
        """The error of a non-finite loss (raised before that step's optimizer update); under
        DDP on every rank, those whose own loss was finite say it came from another rank."""
        kept = ""
        if self.checkpoint_dir is not None:
            latest = self.latest_checkpoint()
            kept = (
                f"; the checkpoints in {str(self.checkpoint_dir)!r} are kept (newest: "
                f"{latest.name})"
                if latest is not None
                else f"; no checkpoint was written to {str(self.checkpoint_dir)!r}"
            )
        where = ""
        if world > 1:
            own = math.isfinite(task) and math.isfinite(penalty)
            where = (
                " on another rank (this rank's task loss is "
                f"{task} and its budget penalty {penalty})"
                if own
                else f" on this rank: the task loss is {task} and the budget penalty {penalty}"
            )
        else:
            where = f": the task loss is {task} and the budget penalty {penalty}"
        return ValueError(
            f"training diverged at step {self.step + 1} (epoch {epoch + 1}){where}; "
            "stopped before this step's optimizer "
            f"update{kept}. Lower the learning rates (lr, gate_lr, budget_lr) or check the "
            "model and loss_fn for overflow"
        )

    def _check_labels(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        x: Tensor,
        y: Tensor,
        val: tuple[Tensor, Tensor] | None,
        device: torch.device,
    ) -> None:
        """Class labels for a cross-entropy / NLL loss (the default loss of integer ``y``),
        checked before training instead of failing inside torch (validation labels: instead
        of after the first epoch): dtype, then shape and range against the model's output on
        the first two samples of the same ``x`` (eval mode, no gradients, every module's mode
        restored; a model that fails on them is left to fail in training with its own error).
        Other losses and floating targets (class probabilities) are not checked."""
        if not isinstance(loss_fn, nn.CrossEntropyLoss | nn.NLLLoss):
            return
        pairs = [("train", x, y)] + ([] if val is None else [("val", *val)])
        pairs = [(name, xs, ys) for name, xs, ys in pairs if not ys.is_floating_point()]
        for name, _, labels in pairs:
            if labels.dtype not in (torch.long, torch.uint8):
                raise TypeError(
                    f"{name}: y has dtype {labels.dtype}, but the cross-entropy loss needs class "
                    "indices of dtype torch.long (int64), or floating class probabilities of "
                    "the output's shape: pass y.long() (e.g. for bool or int32 labels)"
                )
        ignore = int(loss_fn.ignore_index)
        for name, inputs, labels in pairs:
            modes = [(m, m.training) for m in self.model.modules()]
            self.model.eval()
            try:
                with torch.no_grad():
                    out = self.model(inputs[:2].to(device))  # (2, C, ...)
            except Exception:  # not a label problem: training reports it with its own error
                return  # (e.g. x in another dtype: a resume with other data is refused first)
            finally:
                for m, training in modes:
                    m.training = training
            if not isinstance(out, Tensor):
                return  # a structured output: the loss_fn picks its logits, not checked
            if out.dim() < 2:
                raise ValueError(
                    f"the cross-entropy loss needs a model output of shape (B, C) or "
                    f"(B, C, ...) with C class scores, got {tuple(out.shape)} for 2 samples"
                )
            classes, extra = int(out.shape[1]), tuple(out.shape[2:])
            if tuple(labels.shape[1:]) != extra:
                raise ValueError(
                    f"{name}: y has shape {tuple(labels.shape)}, but the model's output "
                    f"{tuple(out.shape)} (for 2 samples) needs one class label per output "
                    f"position: y of shape {(len(labels), *extra)} (e.g. y.reshape(-1) for "
                    "labels of shape (B, 1))"
                )
            lab = labels.long()  # (N, ...) uint8 too, compared with a negative ignore_index
            bad = ((lab < 0) | (lab >= classes)) & (lab != ignore)  # (N, ...)
            count = int(bad.sum())
            if count:
                also = "" if 0 <= ignore < classes else f" ({ignore}, the ignore_index, is allowed)"
                raise ValueError(
                    f"{name}: y holds {count} class label(s) outside [0, {classes}) (e.g. "
                    f"{int(lab[bad][0])}), but the model outputs {classes} class scores: "
                    f"relabel them, or give the model more outputs{also}"
                )

    @staticmethod
    def _agree_on_start(
        world: int, start: int, failure: Exception | None, checkpointing: bool
    ) -> bool:
        """Under DDP: every rank must start from the same step (they all read the checkpoint
        rank 0 wrote), or the ranks would run different numbers of steps and hang. Returns
        whether rank 0 writes checkpoints (every rank then joins in gathering their state)."""
        mine = torch.tensor(
            [-1 if failure is not None else start, int(checkpointing)], dtype=torch.long
        )  # (2,)
        gathered = [torch.zeros(2, dtype=torch.long) for _ in range(world)]  # one (2,) per rank
        dist.all_gather(gathered, mine)
        found = [int(t[0]) for t in gathered]
        if failure is not None:
            raise failure
        if -1 in found:
            raise ValueError(
                f"rank {found.index(-1)} could not start: it could not resume from its "
                "checkpoint or create checkpoint_dir (see its error)"
            )
        if len(set(found)) > 1:
            detail = ", ".join(f"rank {r}: step {s}" for r, s in enumerate(found))
            raise ValueError(
                f"the ranks would start from different steps ({detail}): with resume=True every "
                "rank reads the newest checkpoint rank 0 wrote, so checkpoint_dir must be the same "
                "folder on a file system every rank sees"
            )
        return bool(gathered[0][1])

    # ------------------------------------------------------------------ set-up
    def _steps_per_epoch(self, n: int, world: int) -> int:
        if self.batch_size < world:
            raise ValueError(
                f"batch_size {self.batch_size} is smaller than the {world} ranks sharing it; "
                f"use batch_size >= {world}"
            )
        spe = -(-n // self.batch_size)
        if world > 1 and n - (spe - 1) * self.batch_size < world:
            spe -= 1  # a last batch too small to give every rank a sample is dropped
        if spe == 0:
            raise ValueError(f"{n} training samples cannot be shared by {world} ranks")
        return spe

    def _param_groups(self) -> list[dict[str, Any]]:
        gate_ids: set[int] = set()
        gates: list[nn.Parameter] = []
        for g in gate_modules(self.model):
            for p in g.parameters():
                if id(p) not in gate_ids and p.requires_grad:
                    gate_ids.add(id(p))
                    gates.append(p)
        weights = [p for p in self.model.parameters() if id(p) not in gate_ids and p.requires_grad]
        groups: list[dict[str, Any]] = []
        if weights:
            groups.append(
                {
                    "params": weights,
                    "lr": self.lr,
                    "weight_decay": self.weight_decay,
                    "name": "weights",
                }
            )
        if gates:
            split = [(self.gate_lr, gates)]
            if self.edge_gate_lr is not None:  # width gates at gate_lr, all others apart
                width = {id(p) for g in _width_gates(self.model) for p in g.parameters()}
                split = [
                    (self.gate_lr, [p for p in gates if id(p) in width]),
                    (self.edge_gate_lr, [p for p in gates if id(p) not in width]),
                ]
            for lr, params in split:
                if params:
                    groups.append(
                        {"params": params, "lr": lr, "weight_decay": 0.0, "name": "gates"}
                    )
        if self.budget is not None:
            mult = [p for p in self.budget.parameters() if p.requires_grad]
            groups.append(
                {"params": mult, "lr": self.budget_lr, "weight_decay": 0.0, "name": "budget"}
            )
        if not groups:
            raise ValueError(f"{type(self.model).__name__} has no trainable parameters")
        return groups

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = self._param_groups()
        if self.optimizer is None:
            return torch.optim.AdamW(groups)
        opt = self.optimizer(groups)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be a factory returning a torch.optim.Optimizer, got "
                f"{type(opt).__name__}"
            )
        return opt

    def _config(self, n: int, spe: int, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint's run (JSON-able). Functions
        (``loss_fn``, ``lr_schedule``, ...) cannot be compared: keep them the same yourself."""
        config: dict[str, Any] = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "n_train": n,
            "steps_per_epoch": spe,
            "lr": self.lr,
            "gate_lr": self.gate_lr,
            "edge_gate_lr": self.edge_gate_lr,
            "budget_lr": self.budget_lr,
            "weight_decay": self.weight_decay,
            "optimizer": f"{type(opt).__module__}.{type(opt).__qualname__}",
            "harden_at": self.harden_at,
            "straight_through_at": self.straight_through_at,
            "snap_at": self.snap_at,
            "snap_tolerance": self.snap_tolerance,
            "snap_round_to": self.snap_round_to,
            "snap_primary": self.snap_primary,
        }
        if self._model_record is None or self._model_record[0] is not self.model:
            # the model as this Trainer first saw it: a dropout schedule or a lazy layer
            # materialised by an earlier fit is not another model
            self._model_record = (self.model, model_fingerprint(self.model))
        config["model"] = self._model_record[1]
        b = self.budget
        if b is not None:
            config["budget"] = {
                "targets": {k: float(v) for k, v in b.targets.items()},
                "warmup_steps": int(b.warmup_steps),
                "delay_steps": int(b.delay_steps),
                "target_start": float(b.target_start),
                "anti_windup": bool(b.anti_windup),
            }
            if self.straight_through_at is None:  # the flag is the user's, not a phase's
                config["budget"]["straight_through"] = bool(b.straight_through)
            # the latency model's identity: a resumed run must budget against the same one
            config["latency_model"] = _latency_model_id(b)
        return config

    # ------------------------------------------------------------------ per step
    def _apply_phase(
        self, opt: torch.optim.Optimizer, base_lrs: list[float], names: list[Any], total: int
    ) -> None:
        progress = self.step / total
        factor = _schedule_factor(self.lr_schedule, progress)
        frozen = self.budget is not None and self.snap_at is not None and progress >= self.snap_at
        for group, base, name in zip(opt.param_groups, base_lrs, names, strict=True):
            if name in ("gates", "budget") and frozen:
                group["lr"] = 0.0  # snapped gates stay as they are, and so do the multipliers
            elif name == "budget":
                group["lr"] = base
            else:
                group["lr"] = base * factor
        if self.harden_at is not None and progress >= self.harden_at:
            harden(self.model)
        if self.budget is not None and self.straight_through_at is not None:
            # a sigmoid gate is never exactly 0 before it is hardened: the exact cost would
            # stay at the all-open one and wind the multipliers up, so wait for harden_at
            soft = any(not bool(g.hardened) for g in self._sigmoid_gates)
            self.budget.straight_through = progress >= self.straight_through_at and not soft
        if frozen and self.budget is not None and (self.step - 1) / total < (self.snap_at or 0):
            self._snap(self.budget)

    def _snap_if_missed(self) -> bool:
        """At the end of a run too short to reach ``snap_at`` (one or two optimizer steps):
        snap the gates now, so the model meets its budget like a longer run's. Returns whether
        it snapped."""
        if self.budget is None or self.snap_at is None or self.achieved_before_snap is not None:
            return False
        self._snap(self.budget)
        return True

    def _snap(self, budget: Budget) -> None:
        """Record where the Lagrangian alone brought the cost, then snap the gates."""
        self.achieved_before_snap = budget.achieved()
        snap_to_budget(
            budget,
            tolerance=self.snap_tolerance,
            round_to=self.snap_round_to,
            primary=self.snap_primary,
        )

    def _reset_stats(self) -> None:
        self._stats = {"loss": 0.0, "task_loss": 0.0, "penalty": 0.0, "count": 0.0, "time": 0.0}

    def _account(self, epoch: int, count: int, task: float, penalty: float) -> Record:
        s = self._stats
        s["task_loss"] += task * count
        s["penalty"] += penalty * count
        s["loss"] += (task + penalty) * count
        s["count"] += count
        return {
            "step": self.step,
            "epoch": epoch + 1,
            "loss": task + penalty,
            "task_loss": task,
            "penalty": penalty,
        }

    @torch.no_grad()
    def _gate_stats(self) -> Record:
        gates = gate_modules(self.model)
        if not gates:
            return {}
        probs = torch.cat([g.prob_open().detach().reshape(-1).double() for g in gates])  # (G,)
        opened = torch.cat([g.is_open().reshape(-1) for g in gates])  # (G,)
        return {"gate_mean": float(probs.mean()), "gate_open": float(opened.double().mean())}

    def _budget_stats(self) -> Record:
        if self.budget is None:
            return {}
        b = self.budget
        out: Record = {}
        expected, achieved, target = b.expected(), b.achieved(), b.target()
        for k in b.targets:
            out[f"expected_{k}"] = expected[k]
            out[f"achieved_{k}"] = achieved[k]
            out[f"target_{k}"] = target[k]
            out[f"lambda1_{k}"] = float(b.lambda1[k].detach())
            out[f"lambda2_{k}"] = float(b.lambda2[k].detach())
        return out

    def _trace_point(self, record: Record) -> None:
        self.trace.append({**record, **self._gate_stats(), **self._budget_stats()})

    def _postfix(self) -> dict[str, str]:
        last = self.trace[-1] if self.trace else {}
        keys = ["loss"] + [k for k in last if k.startswith(("expected_", "achieved_"))]
        return {k: _fmt(last[k]) for k in keys if k in last}

    def _checkpoint_due(self, spe: int, total: int) -> bool:
        if self.step == total:
            return True
        if self.checkpoint_every_steps is None:
            return self.step % spe == 0
        return self.step % self.checkpoint_every_steps == 0

    # ------------------------------------------------------------------ per epoch
    def _end_epoch(
        self,
        epoch: int,
        val: tuple[Tensor, Tensor] | None,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        world: int,
        opt: torch.optim.Optimizer,
    ) -> str:
        t0 = time.perf_counter()
        s = self._stats
        sums = [s["loss"], s["task_loss"], s["penalty"], s["count"]]
        if world > 1:
            reduced = torch.tensor(sums, dtype=torch.float64)  # (4,)
            dist.all_reduce(reduced)
            sums = reduced.tolist()
        count = sums[3]
        rec: Record = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": float(opt.param_groups[0]["lr"]),
            "loss": sums[0] / count,
            "task_loss": sums[1] / count,
            "penalty": sums[2] / count,
        }
        if val is not None:
            rec.update(self._evaluate(val, loss_fn))
        rec.update(self._gate_stats())
        rec.update(self._budget_stats())
        if self.metrics_fn is not None:
            rec.update(self._user_metrics(rec))
        rec["time"] = s["time"] + time.perf_counter() - t0
        self.history.append(rec)
        self._reset_stats()
        shown = [k for k in rec if k not in ("epoch", "step", "lr") and not k.startswith("lambda")]
        return f"epoch {epoch + 1}/{self.epochs} " + " ".join(f"{k} {_fmt(rec[k])}" for k in shown)

    @torch.no_grad()
    def _evaluate(
        self, val: tuple[Tensor, Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor]
    ) -> Record:
        x, y = val
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        bs = self.eval_batch_size or max(self.batch_size, 1000)
        was_training = self.model.training
        self.model.eval()
        loss_sum, hits, count = 0.0, 0.0, 0  # hits: correct predictions or squared errors
        classify = not y.is_floating_point()
        comparable = True  # outputs and targets line up for accuracy / MSE
        try:
            for i in range(0, len(x), bs):
                xb, yb = x[i : i + bs].to(device), y[i : i + bs].to(device)
                out = self.model(xb)
                loss_sum += float(loss_fn(out, yb)) * len(xb)
                if classify and out.dim() >= 2 and out.argmax(dim=1).shape == yb.shape:
                    hits += float((out.argmax(dim=1) == yb).sum())
                elif not classify and out.shape == yb.shape:
                    hits += float(((out - yb) ** 2).sum())
                else:
                    comparable = False
                count += yb.numel()
        finally:
            self.model.train(was_training)
        rec: Record = {"val_loss": loss_sum / len(x)}
        if comparable:
            rec["val_accuracy" if classify else "val_mse"] = hits / count
        return rec

    def _user_metrics(self, rec: Record) -> Record:
        assert self.metrics_fn is not None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                extra = self.metrics_fn(self.model)
        finally:
            self.model.train(was_training)
        if not isinstance(extra, Mapping):
            raise TypeError(f"metrics_fn must return a mapping, got {type(extra).__name__}")
        out: Record = {}
        for k, v in extra.items():
            if not isinstance(k, str) or k in rec or k == "time":
                raise ValueError(f"metrics_fn returned key {k!r}: keys must be new strings")
            try:
                out[k] = float(v)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(
                    f"metrics_fn returned {type(v).__name__} for {k!r}; values must be numbers "
                    f"(or one-element tensors): {e}"
                ) from e
        return out

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(
        self, opt: torch.optim.Optimizer, config: dict[str, Any], world: int, rank: int
    ) -> None:
        # never replace good checkpoints by a diverged model (every rank checks: the DDP
        # parameters are the same on each, so they all stop here together)
        bad = _non_finite_parameters(self.model, self.budget)
        if bad:
            latest = self.latest_checkpoint()
            kept = "none yet" if latest is None else f"newest {latest.name}"
            raise ValueError(
                f"training diverged by step {self.step}: NaN or inf in {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; no checkpoint was written, those in "
                f"{str(self.checkpoint_dir)!r} are kept ({kept}). Lower the learning rates "
                "(lr, gate_lr, budget_lr) or check the model and loss_fn for overflow"
            )
        # the epoch's running sums are per rank: rank 0 keeps every rank's, so that a resumed
        # run's epoch record equals the uninterrupted one (called on every rank)
        mine = torch.tensor([self._stats[k] for k in _STAT_KEYS], dtype=torch.float64)  # (4,)
        if world > 1:
            gathered = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
        else:
            gathered = [mine]
        if rank != 0 or self.checkpoint_dir is None:
            return
        path = write_checkpoint(
            Path(self.checkpoint_dir),
            self.model,
            self.budget,
            opt,
            step=self.step,
            config=config,
            stats=self._stats,
            rank_stats=gathered,
            history=self.history,
            trace=self.trace,
            achieved_before_snap=self.achieved_before_snap,
        )
        for stale in self._stale:  # an earlier run's: resume=True must not pick them up
            if stale != path:
                stale.unlink(missing_ok=True)
        self._stale = []
        for old in self._checkpoints()[: -self.keep_checkpoints]:
            old.unlink(missing_ok=True)

    def _load_checkpoint(
        self,
        path: Path,
        opt: torch.optim.Optimizer,
        config: dict[str, Any],
        world: int = 1,
        rank: int = 0,
    ) -> None:
        """Continue from ``path`` (:func:`~gatedprune.checkpoint.load_checkpoint`: everything
        is checked before anything changes)."""
        resumed = load_checkpoint(path, self.model, self.budget, opt, config, world, rank)
        self.step = resumed.step
        self.history = resumed.history
        self.trace = resumed.trace
        self._stats = resumed.stats
        self.achieved_before_snap = resumed.achieved_before_snap
