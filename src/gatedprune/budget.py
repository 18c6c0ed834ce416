"""Exact FLOPs/parameter budgets through a Lagrangian (CoFi, DESIGN.md section 4).

    L = L_task + sum_c  lambda1_c * (s_c - t_c) + lambda2_c * (s_c - t_c)^2

``s_c`` is the expected cost fraction of constraint ``c`` (FLOPs, parameters, or the latency
predicted by a :class:`~gatedprune.latency.LatencyModel`), ``t_c`` the
target, warmed up linearly from ``target_start`` over ``warmup_steps`` steps, after
``delay_steps`` steps without any budget pressure (the network first learns what its
connections are worth; gates pruned from step 0 are pruned by cost, not by use). The multipliers
are ordinary parameters whose gradient is reversed, so one optimizer step does gradient
*descent* on the model and gate parameters and *ascent* on the multipliers (and DDP averages
their gradients like any other parameter's). A step is a penalty call in training mode, or
with ``penalty(advance=False)`` (gradient accumulation) a :meth:`Budget.step_` call.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .autodiff import refuse_create_graph
from .base import GatedModule, check_gates_not_nan
from .costs import CostProgram
from .gating.core import InsertedGating
from .gating.latency import GatedLatencyModel
from .inputs import as_inputs
from .latency import LatencyModel
from .layout import check_flag
from .shortcut import _ShortcutNet

__all__ = ["Budget"]


class _Lagrangian(torch.autograd.Function):
    """``sum_c lambda1_c * gap_c + lambda2_c * gap_c ** 2`` (float32) as one autograd node, the
    multipliers' gradient reversed (ascent). The gaps are given as floats (``s_c - t_c``, or its
    straight-through value); their gradient goes to the soft fractions ``s_c``. The arithmetic
    is the float64 arithmetic of the same expression written with tensor ops, in the same
    order, so values and gradients are the same bits; one node instead of ~20 scalar ops and
    their backward nodes in every training step."""

    @staticmethod
    def forward(ctx: Any, gaps: list[float], *tensors: Tensor) -> Tensor:
        n = len(gaps)
        l1 = [float(t) for t in tensors[n : 2 * n]]
        l2 = [float(t) for t in tensors[2 * n :]]
        total = 0.0
        for gap, a, b in zip(gaps, l1, l2, strict=True):
            total = (total + a * gap) + (b * gap) * gap
        ctx.gaps, ctx.l1, ctx.l2 = gaps, l1, l2
        ctx.like = [(t.dtype, t.device) for t in tensors]  # each gradient as its input
        return torch.tensor(total, dtype=torch.float64, device=tensors[0].device).float()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        refuse_create_graph()
        g = float(grad)
        d_soft, d_l1, d_l2 = [], [], []
        for gap, a, b in zip(ctx.gaps, ctx.l1, ctx.l2, strict=True):
            g_gap = g * gap
            # autograd's order for l1 * gap + (l2 * gap) * gap: the last product first
            d_soft.append((g * (b * gap) + g_gap * b) + g * a)
            d_l1.append(-g_gap)
            d_l2.append(-(g_gap * gap))
        values = (*d_soft, *d_l1, *d_l2)
        like = zip(values, ctx.like, strict=True)
        out = [torch.tensor(v, dtype=dt, device=dv) for v, (dt, dv) in like]
        return (None, *out)


def _check_fraction(name: str, value: object, *, required: bool = False) -> float | None:
    """``value`` as a float in (0, 1]; None passes (no target) unless ``required``."""
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy floats too
        raise TypeError(f"{name} must be a float in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


class Budget(nn.Module):
    """A FLOPs, parameter and/or latency budget for a gated model, as fractions of its
    all-open cost.

    Add ``budget.penalty()`` to the task loss at every training step and give
    ``budget.parameters()`` (the multipliers) to the optimizer without weight decay. A latency
    budget (``latency=``, with ``latency_model=``: a :class:`~gatedprune.LatencyModel` for a
    ShortcutMLP/Conv1d, a :class:`~gatedprune.GatedLatencyModel` for a model gated with
    ``gate_``) is a fraction of the all-open network's latency as that model predicts it.
    ``budget.floor`` holds the fractions with every gate closed (the ungated parts' share); a
    target below it cannot be met, and the constructor warns (``UserWarning``).

    >>> import torch, gatedprune
    >>> net = gatedprune.ShortcutMLP(40, [32, 32], 10)
    >>> budget = gatedprune.Budget(net, torch.zeros(1, 40), flops=0.25)
    >>> loss = budget.penalty()
    >>> 0.0 < budget.expected()["flops"] <= 1.0
    True
    """

    step: Tensor

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        *,
        flops: float | None = None,
        params: float | None = None,
        warmup_steps: int = 0,
        target_start: float = 1.0,
        delay_steps: int = 0,
        anti_windup: bool = True,
        latency: float | None = None,
        latency_model: LatencyModel | GatedLatencyModel | None = None,
    ) -> None:
        super().__init__()
        targets = {
            "flops": _check_fraction("flops", flops),
            "params": _check_fraction("params", params),
            "latency": _check_fraction("latency", latency),
        }
        if all(v is None for v in targets.values()):
            raise ValueError(
                "Budget needs a target: flops=..., params=... and/or latency=... in (0, 1]"
            )
        if (latency is None) != (latency_model is None):
            raise ValueError(
                "a latency budget needs both latency=... and latency_model="
                "gatedprune.LatencyModel.calibrate(model, example_input) (for a model gated "
                "with gate_: gatedprune.GatedLatencyModel.calibrate(model, example_input))"
            )
        if latency_model is not None and not isinstance(
            latency_model, LatencyModel | GatedLatencyModel
        ):
            raise TypeError(
                "latency_model must be a gatedprune.LatencyModel or GatedLatencyModel, got "
                f"{type(latency_model).__name__}"
            )
        start = _check_fraction("target_start", target_start, required=True)
        anti_windup = check_flag("anti_windup", anti_windup)
        for name, value in (("warmup_steps", warmup_steps), ("delay_steps", delay_steps)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int >= 0, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Budget expects a torch.nn.Module, got {type(model).__name__}")
        if not any(isinstance(m, GatedModule) for m in model.modules()):
            raise ValueError(
                f"{type(model).__name__} has no gates: a budget needs a gated model "
                "(ShortcutMLP, ShortcutConv1d, ... or a model gated with gatedprune.gate_)"
            )
        self._model = (model,)  # a tuple, so the model is not registered as a submodule
        self.program = CostProgram.trace(model, example_input)
        inputs = as_inputs(example_input)  # a tuple: positional inputs (checked by trace)
        single = inputs[0] if len(inputs) == 1 else example_input  # one input, its shape
        self._latency: tuple[LatencyModel, _ShortcutNet] | None = None
        self._gated_latency: tuple[GatedLatencyModel, InsertedGating] | None = None
        if isinstance(latency_model, GatedLatencyModel):
            gating = latency_model.check_model(model)
            shape = tuple(getattr(single, "shape", ()))
            if shape != latency_model.input_shape:
                raise ValueError(
                    "the latency model was calibrated with an example_input of shape "
                    f"{latency_model.input_shape}, but this one's is {shape}"
                )
            self._gated_latency = (latency_model, gating)
        elif latency_model is not None:
            nets = [m for m, _ in self.program.gated]
            fixed = self.program.fixed_flops or self.program.fixed_params
            if len(nets) != 1 or not isinstance(nets[0], _ShortcutNet) or fixed:
                raise ValueError(
                    "latency budgets support a ShortcutMLP or ShortcutConv1d on its own; "
                    f"{type(model).__name__} is not one"
                )
            latency_model.check_network(nets[0])
            shape = tuple(getattr(single, "shape", ())[1:])
            if shape != latency_model.sample_shape[1:]:
                raise ValueError(
                    f"the latency model was calibrated for samples of shape "
                    f"{latency_model.sample_shape[1:]}, but example_input's are {shape}"
                )
            self._latency = (latency_model, nets[0])
        dense = self._forced_cost(True)
        self.targets: dict[str, float] = {k: v for k, v in targets.items() if v is not None}
        self.dense: dict[str, float] = {k: dense[k] for k in self.targets}
        for k, v in self.dense.items():
            if v <= 0:
                raise ValueError(f"the model's all-open {k} count is {v}; nothing to budget")
        closed = self._forced_cost(False)
        # the smallest reachable fractions (costs only grow as gates open); a target below
        # them cannot be met by any decisions: the snap then ends at the floor, above it
        self.floor: dict[str, float] = {k: closed[k] / self.dense[k] for k in self.targets}
        for k, t in self.targets.items():
            if t < self.floor[k]:
                warnings.warn(
                    f"{k}={t!r} is below the smallest reachable fraction {self.floor[k]:.6g} "
                    f"of {type(model).__name__} (every gate closed; ungated parts keep their "
                    "cost): no decisions can meet it, the snap ends at that fraction",
                    UserWarning,
                    stacklevel=2,
                )
        self.warmup_steps = int(warmup_steps)
        self.delay_steps = int(delay_steps)
        self.target_start: float = 1.0 if start is None else start  # None refused above
        self.lambda1 = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros((), dtype=torch.float64)) for k in self.targets}
        )
        self.lambda2 = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros((), dtype=torch.float64)) for k in self.targets}
        )
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.straight_through = False
        self.anti_windup = bool(anti_windup)

    @property
    def model(self) -> nn.Module:
        """The gated model this budget constrains (not registered as a submodule: the
        budget's ``parameters()`` are only its own multipliers).

        >>> import torch, gatedprune
        >>> net = gatedprune.ShortcutMLP(4, [6], 2)
        >>> gatedprune.Budget(net, torch.zeros(1, 4), flops=0.5).model is net
        True
        """
        return self._model[0]

    @property
    def latency_model(self) -> LatencyModel | GatedLatencyModel | None:
        """The latency model of a latency budget (None without one)."""
        if self._gated_latency is not None:
            return self._gated_latency[0]
        return None if self._latency is None else self._latency[0]

    def _forced_cost(self, is_open: bool) -> dict[str, float]:
        """Exact cost with every gate open (or every gate closed); the gates are restored."""
        saved = []
        for mod, _ in self.program.gated:
            for g in mod.gates():
                saved.append((g, {k: v.clone() for k, v in g.state_dict().items()}))
                g.force_(torch.full((g.n,), is_open, dtype=torch.bool))
        try:
            c = self.program.evaluate(hard=True)
            values = {"flops": float(c.flops), "params": float(c.params)}
            if self._latency is not None or self._gated_latency is not None:
                values["latency"] = float(self._latency_ms(hard=True))
        finally:
            for g, state in saved:
                g.load_state_dict(state)
        return values

    @property
    def active(self) -> bool:
        """False during the first ``delay_steps`` steps (``budget.step``; no budget pressure
        yet)."""
        return int(self.step) >= self.delay_steps

    def target(self) -> dict[str, float]:
        """Current (warmed-up) target fractions."""
        since = int(self.step) - self.delay_steps  # steps since the delay ended
        if self.warmup_steps == 0:
            frac = 1.0 if since >= 0 else 0.0
        else:
            frac = min(1.0, max(0, since) / self.warmup_steps)
        return {
            k: self.target_start + (t - self.target_start) * frac for k, t in self.targets.items()
        }

    def fractions(self, *, hard: bool = False) -> dict[str, Tensor]:
        """Expected (or, with ``hard``, exact) cost fractions as differentiable tensors."""
        values: dict[str, Tensor] = {}
        held = (
            self._gated_latency[1].same_decisions()
            if hard and self._gated_latency is not None
            else contextlib.nullcontext()
        )  # the exact cost and the exact module calls share one decision key
        with held:
            if "flops" in self.targets or "params" in self.targets:
                c = self.program.evaluate(hard=hard)
                values = {"flops": c.flops, "params": c.params}
            if "latency" in self.targets:
                values["latency"] = self._latency_ms(hard=hard, flops=values.get("flops"))
        return {k: values[k] / self.dense[k] for k in self.targets}

    def _latency_ms(self, *, hard: bool, flops: Tensor | None = None) -> Tensor:
        """The latency model's prediction (ms) for the pruned model (``flops``: the program's
        FLOPs at the same ``hard``, if already computed)."""
        if self._gated_latency is not None:
            # a gate_ model's cost program is its gating at the example input's shape, which
            # is the calibrated one (checked above): the program's FLOPs are the feature's
            glm, gating = self._gated_latency
            return glm.expected_checked(gating, hard=hard, flops=flops)
        if self._latency is None:
            raise RuntimeError("this budget has no latency target")
        lm, net = self._latency
        return lm.expected(net, hard=hard)

    def penalty(self, *, advance: bool = True) -> Tensor:
        """Lagrangian term to add to the loss. When the model trains, the call then advances
        the schedule (``budget.step``, which the delay and the warm-up count) by one, unless
        ``advance=False``: with gradient accumulation call ``penalty(advance=False)`` for each
        micro-batch and :meth:`step_` once per optimizer step, so every micro-batch of a step
        sees the same target and the steps count optimizer steps; a penalty computed only to
        log it is ``advance=False`` too.

        During the first ``delay_steps`` steps it is an exact zero (the network trains
        without budget pressure and the multipliers stay at 0).

        >>> import torch, gatedprune
        >>> net = gatedprune.ShortcutMLP(4, [6], 2)
        >>> budget = gatedprune.Budget(net, torch.zeros(1, 4), flops=0.5)
        >>> p = budget.penalty()  # loss = task_loss + p
        >>> p.shape, p.requires_grad, int(budget.step)
        (torch.Size([]), True, 1)
        >>> _ = budget.penalty(advance=False)  # e.g. a micro-batch: the step stays
        >>> budget.step_()  # after the optimizer step
        >>> int(budget.step)
        2
        """
        advance = check_flag("advance", advance)
        if not self.active:
            if advance and self.model.training:
                self.step += 1
            # zero, but connected to the multipliers so DDP sees every parameter used
            lam = [*self.lambda1.values(), *self.lambda2.values()]
            return (0.0 * torch.stack(lam).sum()).float()
        soft = self.fractions()
        values = {k: float(v.detach()) for k, v in soft.items()}
        if self.straight_through:  # the exact value, the soft gradient
            with torch.no_grad():
                hard = self.fractions(hard=True)
            values = {k: v + (float(hard[k]) - v) for k, v in values.items()}
        targets = self.target()
        training = self.model.training
        if advance and training:
            self.step += 1
        gaps = []
        for k, v in values.items():
            gap = v - targets[k]
            if self.anti_windup and training:
                self._unwind(k, gap)
            gaps.append(gap)
        keys = list(values)
        total: Tensor = _Lagrangian.apply(  # type: ignore[no-untyped-call]
            gaps,
            *(soft[k] for k in keys),
            *(self.lambda1[k] for k in keys),
            *(self.lambda2[k] for k in keys),
        )
        return total

    @torch.no_grad()
    def step_(self) -> None:
        """Advance the schedule by one step (``budget.step``): what :meth:`penalty` does after
        computing the penalty when the model trains, for a loop that calls
        ``penalty(advance=False)`` (gradient accumulation: once per optimizer step, after it).
        Each rank of a DDP run calls it alike, so their steps stay equal.

        >>> import torch, gatedprune
        >>> net = gatedprune.ShortcutMLP(4, [6], 2)
        >>> budget = gatedprune.Budget(net, torch.zeros(1, 4), flops=0.5, delay_steps=1)
        >>> budget.active, budget.step_(), budget.active
        (False, None, True)
        """
        self.step += 1

    @torch.no_grad()
    def _unwind(self, k: str, gap: float) -> None:
        """Anti-windup: a multiplier never pushes the cost away from the target.

        ``lambda1`` integrates the gap; while the gates lag a falling target it grows, and once
        the cost crosses the target the accumulated value would keep pushing it past (the gates
        then close whole stages that never reopen). So ``lambda1`` is reset to 0 whenever its
        sign disagrees with the current gap (``lambda1 * gap >= 0`` always holds): the classic
        clamping anti-windup of integral controllers. The quadratic term ``lambda2 * gap**2``
        always pulls towards the target and is left alone.
        """
        lam = self.lambda1[k]
        if float(lam) * gap < 0.0:
            lam.zero_()

    def expected(self) -> dict[str, float]:
        """Current expected cost fractions (floats); a ``ValueError`` naming the gate
        parameter if one holds NaN (diverged training), instead of NaN fractions.

        >>> import torch, gatedprune
        >>> net = gatedprune.ShortcutMLP(4, [6], 2)
        >>> budget = gatedprune.Budget(net, torch.zeros(1, 4), flops=0.5, params=0.5)
        >>> sorted(budget.expected()), 0.0 < budget.expected()["flops"] < 1.0
        (['flops', 'params'], True)
        """
        with torch.no_grad():
            out = {k: float(v) for k, v in self.fractions().items()}
        if any(math.isnan(v) for v in out.values()):
            check_gates_not_nan(self.model)
        return out

    def achieved(self) -> dict[str, float]:
        """Cost fractions at the exact open/closed decisions, i.e. of ``prune(model)`` (a NaN
        gate parameter is a ``ValueError``, as in ``prune``).

        >>> import torch, gatedprune
        >>> net = gatedprune.ShortcutMLP(4, [6], 2)
        >>> budget = gatedprune.Budget(net, torch.zeros(1, 4), flops=0.5)
        >>> budget.achieved()  # before training every gate is open
        {'flops': 1.0}
        """
        check_gates_not_nan(self.model)
        with torch.no_grad():
            return {k: float(v) for k, v in self.fractions(hard=True).items()}

    def extra_repr(self) -> str:
        return (
            f"targets={self.targets}, warmup_steps={self.warmup_steps}, "
            f"delay_steps={self.delay_steps}"
        )
