"""Gates: learned multipliers in [0, 1] that decide which structures of a network survive.

Every gate module holds a vector of ``n`` gates and offers one interface:

* ``gate()`` (``forward``): the values that multiply the signal. Stochastic in training where
  the kind is (hard concrete), deterministic in eval mode.
* ``prob_open()``: the differentiable probability that each gate is non-zero; budgets use it.
* ``eval_value()``: the deterministic eval-mode values (what ``prune`` folds into weights).
* ``is_open()``: the exact open/closed decision, ``eval_value() > 0``.

A gate vector may share one gate among ``group`` consecutive entries (``make(n, group=16)``):
it holds ``n // group`` parameters and every method returns the ``n`` values with each group's
value repeated, so whatever it gates is kept or removed in whole groups (kept widths are
multiples of ``group``, e.g. the 16-channel blocks of oneDNN's AVX-512 convolutions).

Gate kinds are described by small frozen dataclasses (:class:`HardConcrete`, :class:`Sigmoid`)
whose ``make(n)`` builds the module; :func:`resolve_gate` turns ``"hard_concrete"`` /
``"sigmoid"`` or such a spec into a spec, with a clear error for anything else.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import get_device_states, set_device_states

__all__ = [
    "Gate",
    "GateKind",
    "HardConcrete",
    "HardConcreteGate",
    "Sigmoid",
    "SigmoidGate",
    "gate_is_open",
    "gate_modules",
    "gate_prob_open",
    "gate_values",
    "harden",
    "replayable_gate_values",
    "resolve_gate",
]

# Louizos, Welling & Kingma (2018), constants of the hard concrete distribution.
BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
EPS = 1e-6
# log alpha of a gate force_ fixes: the samples are exactly 0 or 1 from |log alpha| >=
# beta ln 11 - ln(EPS / (1 - EPS)) ~ 15.4 on; finite, so an optimizer's weight decay or a
# parameter scale (Adafactor) only shrinks it (by the factor 1 - lr * wd per SGD step: 130k
# steps at lr 0.1, wd 5e-4 before it nears 15.4) where +-inf turned into NaN (wd * inf - inf)
FORCED_LOG_ALPHA = 1e4


class Gate(nn.Module):
    """Base class of a vector of ``n`` gates. Subclasses implement the four gate methods.
    ``group`` consecutive entries share one gate (1: every entry is its own gate).

    >>> g = HardConcreteGate(4, group=2)
    >>> isinstance(g, Gate), g.n, g.n_groups, g.prob_open().shape
    (True, 4, 2, torch.Size([4]))
    """

    n: int
    group: int = 1

    @property
    def n_groups(self) -> int:
        """Number of independent gates, ``n // group``."""
        return self.n // self.group

    def _expand(self, v: Tensor) -> Tensor:
        """Per-group values ``(n // group,)`` -> per-entry values ``(n,)``."""
        return v if self.group == 1 else v.repeat_interleave(self.group)  # (n,)

    def _group_mask(self, open_mask: Tensor) -> Tensor:
        """A per-entry mask ``(n,)`` -> its per-group mask, refusing masks that split a group.
        Bool tensors or sequences; numeric ones only if every entry is 0 or 1 (a 0.5 or NaN
        would otherwise read as open)."""
        try:
            raw = torch.as_tensor(open_mask)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"open_mask must be a bool tensor or sequence of {self.n} entries, "
                f"got {open_mask!r}"
            ) from None
        if raw.dtype != torch.bool and not bool(((raw == 0) | (raw == 1)).all()):
            raise ValueError(
                f"open_mask must hold bools (or 0/1), got values {torch.unique(raw).tolist()!r}"
            )
        mask = raw.to(torch.bool).reshape(-1)  # (n,)
        if mask.numel() != self.n:
            raise ValueError(f"open_mask has {mask.numel()} entries, expected n={self.n}")
        if self.group == 1:
            return mask
        per_group = mask.reshape(self.n_groups, self.group)  # (n // group, group)
        if bool((per_group != per_group[:, :1]).any()):
            raise ValueError(
                f"open_mask splits a group: entries share gates in groups of {self.group}, "
                "so each group must be all open or all closed"
            )
        return per_group[:, 0]  # (n // group,)

    def forward(self) -> Tensor:
        """Gate values ``(n,)``: sampled in training where the kind is stochastic."""
        raise NotImplementedError

    def prob_open(self) -> Tensor:
        """Differentiable probability ``(n,)`` that each gate is non-zero."""
        raise NotImplementedError

    def eval_value(self) -> Tensor:
        """Deterministic eval-mode values ``(n,)``; exactly 0 where the gate is closed."""
        raise NotImplementedError

    def is_open(self) -> Tensor:
        """Exact decision ``(n,)`` (bool): ``eval_value() > 0``."""
        with torch.no_grad():
            return self.eval_value() > 0

    def force_(self, open_mask: Tensor) -> None:
        """Set every gate to a confident state: exactly 1 where ``open_mask``, else exactly 0."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"n={self.n}" if self.group == 1 else f"n={self.n}, group={self.group}"


def _check_n(n: object) -> int:
    """``n`` as an int >= 1 (numpy integers accepted; bools, floats and strings refused)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int (the number of gates), got {n!r}")
    if n < 1:
        raise ValueError(f"a gate vector needs n >= 1 gates, got n={n}")
    return int(n)


def _check_real(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a finite float (``> 0`` when ``positive``); bools and strings refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def _check_group(n: int, group: object) -> int:
    """``group`` as an int >= 1 dividing ``n`` (numpy integers accepted, as for ``n``)."""
    if isinstance(group, bool) or not isinstance(group, numbers.Integral):
        raise TypeError(f"group must be a positive int, got {group!r}")
    if group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    g = int(group)
    if n % g:
        raise ValueError(f"n={n} gates cannot share gates in groups of {g}: {n} % {g} != 0")
    return g


def _hc_sample(log_alpha: Tensor, beta: float) -> Tensor:
    u = torch.empty_like(log_alpha).uniform_(EPS, 1.0 - EPS)  # (n,)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)  # (n,)


def _hc_prob_open(log_alpha: Tensor, beta: float) -> Tensor:
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))  # (n,)


def _hc_eval(log_alpha: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)  # (n,)


class HardConcreteGate(Gate):
    """Hard concrete (L0) gates, Louizos et al. 2018.

    Training: ``z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta) * (zeta - gamma) + gamma,
    0, 1)`` with one ``u ~ U(eps, 1 - eps)`` per gate and forward call. Eval:
    ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``, exactly 0 for
    ``log_alpha <= -ln 11`` and exactly 1 for ``log_alpha >= ln 11``.

    >>> g = HardConcreteGate(4, init_log_alpha=3.0).eval()
    >>> g().tolist()
    [1.0, 1.0, 1.0, 1.0]
    >>> HardConcreteGate(4, group=2).log_alpha.shape  # one gate per pair of entries
    torch.Size([2])
    """

    def __init__(
        self,
        n: int,
        *,
        init_log_alpha: float = 0.0,
        init_std: float = 0.01,
        beta: float = BETA,
        group: int = 1,
    ) -> None:
        super().__init__()
        n = _check_n(n)
        init_log_alpha = _check_real("init_log_alpha", init_log_alpha)
        if _check_real("init_std", init_std) < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r}")
        self.n = n
        self.group = _check_group(n, group)
        self.beta = _check_real("beta", beta, positive=True)
        self.log_alpha = nn.Parameter(  # (n // group,)
            torch.empty(n // self.group).normal_(init_log_alpha, init_std)
        )

    def forward(self) -> Tensor:
        if not self.training:
            return self.eval_value()
        return self._expand(_hc_sample(self.log_alpha, self.beta))  # (n,)

    def prob_open(self) -> Tensor:
        return self._expand(_hc_prob_open(self.log_alpha, self.beta))  # (n,)

    def eval_value(self) -> Tensor:
        return self._expand(_hc_eval(self.log_alpha))  # (n,)

    def force_(self, open_mask: Tensor) -> None:
        """Fix the gates open or closed: ``log_alpha = +-FORCED_LOG_ALPHA`` (``1e4``), so the
        training samples are exactly 1 or 0 too (near the eval threshold they stay random: at
        +-2 ln 11 a closed gate opened in 3.9% of training forwards), with zero gradient and
        open probability; finite, so weight decay on the gates leaves them fixed (it made
        +-inf NaN)."""
        mask = self._group_mask(open_mask)  # (n // group,)
        with torch.no_grad():
            self.log_alpha.copy_(torch.where(mask, FORCED_LOG_ALPHA, -FORCED_LOG_ALPHA))


class SigmoidGate(Gate):
    """Deterministic LSTM-style gates ``sigmoid(theta / temperature)``.

    A sigmoid never reaches 0, so these gates need :meth:`harden` before pruning: afterwards
    the value is exactly ``1`` where it was above 1/2 (``theta > 0``; with ``start``, where the
    rescaled value is) and ``0`` elsewhere, with the sigmoid's gradient passed straight
    through, so training (and the budget) can continue.

    ``start="open"`` rescales the sigmoid relative to its initial value ``s0``:
    ``min(1, s / s0)``, exactly 1 until ``theta`` drops below ``init_theta``; ``start="closed"``
    uses ``max(0, (s - s0) / (1 - s0))``, exactly 0 until ``theta`` rises above it. Gates
    inserted into an existing model use them, so inserting them leaves its function unchanged.

    >>> g = SigmoidGate(2, init_theta=1.0)
    >>> g.harden()
    >>> g.eval()().tolist()
    [1.0, 1.0]
    >>> SigmoidGate(2, start="open")().tolist(), SigmoidGate(2, start="closed")().tolist()
    ([1.0, 1.0], [0.0, 0.0])
    """

    hardened: Tensor

    def __init__(
        self,
        n: int,
        *,
        init_theta: float = 3.0,
        temperature: float = 1.0,
        group: int = 1,
        start: Literal["open", "closed"] | None = None,
    ) -> None:
        super().__init__()
        n = _check_n(n)
        init_theta = _check_real("init_theta", init_theta)
        temperature = _check_real("temperature", temperature, positive=True)
        if start not in (None, "open", "closed"):
            raise ValueError(f"start must be None, 'open' or 'closed', got {start!r}")
        self.n = n
        self.group = _check_group(n, group)
        self.temperature = temperature
        self.theta = nn.Parameter(torch.full((n // self.group,), float(init_theta)))  # (n/group,)
        self.start = start
        self.theta0 = float(self.theta.detach()[0])  # init_theta as stored (float32)
        self.register_buffer("hardened", torch.zeros((), dtype=torch.bool))

    def _soft(self) -> Tensor:
        soft = torch.sigmoid(self.theta / self.temperature)  # (n // group,)
        start = getattr(self, "start", None)
        if start is None:
            return soft
        # same op on the same shape: bitwise equal to `soft` where theta == theta0
        ref = torch.sigmoid(torch.full_like(self.theta.detach(), self.theta0) / self.temperature)
        if start == "open":
            return torch.clamp(soft / ref, max=1.0)  # (n // group,)
        return torch.clamp((soft - ref) / (1.0 - ref), min=0.0)  # (n // group,)

    def _value(self) -> Tensor:
        soft = self._soft()
        if not bool(self.hardened):
            return self._expand(soft)  # (n,)
        if getattr(self, "start", None) is None:
            hard = (self.theta > 0).to(soft.dtype)  # (n // group,): where the sigmoid is > 1/2
        else:  # where the rescaled value is > 1/2 (theta > 0 would close an open start with
            hard = (soft > 0.5).to(soft.dtype)  # init_theta <= 0, open a closed one at > 0)
        # straight-through: exactly `hard` forward
        return self._expand(hard + (soft - soft.detach()))  # (n,)

    def forward(self) -> Tensor:
        return self._value()

    def prob_open(self) -> Tensor:
        return self._value()

    def eval_value(self) -> Tensor:
        return self._value()

    def harden(self) -> None:
        """Switch to exact 0/1 values (threshold at a value of 1/2, straight-through gradient)."""
        self.hardened.fill_(True)

    def force_(self, open_mask: Tensor) -> None:
        mask = self._group_mask(open_mask)  # (n // group,)
        with torch.no_grad():
            self.theta.copy_(torch.where(mask, 10.0, -10.0))
            self.hardened.fill_(True)


@dataclass(frozen=True)
class HardConcrete:
    """Hard concrete gate kind. ``init_log_alpha`` None uses ``log((1-p)/p)`` with
    ``p = init_drop`` (or a confidently open 3.0 when a model asks for open gates).

    >>> HardConcrete(init_drop=0.5).make(3).n
    3
    """

    init_drop: float = 0.5
    init_log_alpha: float | None = None
    beta: float = BETA

    def __post_init__(self) -> None:
        if not 0.0 < _check_real("init_drop", self.init_drop) < 1.0:
            raise ValueError(f"init_drop must be in (0, 1), got {self.init_drop!r}")
        if self.init_log_alpha is not None:
            _check_real("init_log_alpha", self.init_log_alpha)
        _check_real("beta", self.beta, positive=True)

    def make(self, n: int, *, init_open: bool = False, group: int = 1) -> Gate:
        if self.init_log_alpha is not None:
            init = self.init_log_alpha
        elif init_open:
            init = 3.0
        else:
            init = math.log((1.0 - self.init_drop) / self.init_drop)
        return HardConcreteGate(n, init_log_alpha=init, beta=self.beta, group=group)


@dataclass(frozen=True)
class Sigmoid:
    """Sigmoid gate kind (``sigmoid(theta / temperature)``, harden before pruning).
    ``init_open`` gates are rescaled to start at exactly 1 (``SigmoidGate(start="open")``).

    >>> Sigmoid(temperature=0.5).make(2).temperature
    0.5
    >>> Sigmoid().make(2, init_open=True)().tolist()
    [1.0, 1.0]
    """

    init_theta: float = 3.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_real("init_theta", self.init_theta)
        _check_real("temperature", self.temperature, positive=True)

    def make(self, n: int, *, init_open: bool = False, group: int = 1) -> Gate:
        return SigmoidGate(
            n,
            init_theta=self.init_theta,
            temperature=self.temperature,
            group=group,
            start="open" if init_open else None,
        )


GateKind = Literal["hard_concrete", "sigmoid"] | HardConcrete | Sigmoid


def resolve_gate(kind: object) -> HardConcrete | Sigmoid:
    """Turn a gate kind (``"hard_concrete"``, ``"sigmoid"`` or a spec) into a spec.

    >>> resolve_gate("sigmoid")
    Sigmoid(init_theta=3.0, temperature=1.0)
    """
    if isinstance(kind, HardConcrete | Sigmoid):
        return kind
    # only strings compare: an array or tensor would compare element-wise (ambiguous truth)
    if isinstance(kind, str) and kind == "hard_concrete":
        return HardConcrete()
    if isinstance(kind, str) and kind == "sigmoid":
        return Sigmoid()
    raise ValueError(
        f"unknown gate kind {kind!r}: expected 'hard_concrete', 'sigmoid', "
        "or a gatedprune.HardConcrete / gatedprune.Sigmoid instance"
    )


def gate_modules(model: nn.Module) -> list[Gate]:
    """All gate modules inside ``model``.

    >>> gate_modules(nn.Linear(2, 2))
    []
    """
    return [m for m in model.modules() if isinstance(m, Gate)]


def harden(model: nn.Module) -> int:
    """Harden every sigmoid gate in ``model`` (see :class:`SigmoidGate`); returns how many.

    >>> harden(nn.Linear(2, 2))
    0
    """
    gates = [g for g in gate_modules(model) if isinstance(g, SigmoidGate)]
    for g in gates:
        g.harden()
    return len(gates)


def _same_hard_concrete(gates: Sequence[Gate]) -> float | None:
    """The common beta if all gates are ungrouped hard concrete with one beta and training
    mode (grouped gates expand their values one by one)."""
    if len(gates) < 2 or any(type(g) is not HardConcreteGate or g.group != 1 for g in gates):
        return None
    hc = [cast(HardConcreteGate, g) for g in gates]
    if len({(g.beta, g.training) for g in hc}) != 1:
        return None
    return hc[0].beta


def gate_values(gates: Sequence[Gate]) -> list[Tensor]:
    """``[g() for g in gates]``, computed in one pass when the gates share a kind (one sampling
    kernel instead of one per gate module: fewer, larger ops in every training step).

    >>> gs = [HardConcreteGate(2), HardConcreteGate(3)]
    >>> [v.shape[0] for v in gate_values(gs)]
    [2, 3]
    """
    beta = _same_hard_concrete(gates)
    if beta is None:
        return [g() for g in gates]
    log_alpha = torch.cat([cast(HardConcreteGate, g).log_alpha for g in gates])  # (sum n,)
    values = _hc_sample(log_alpha, beta) if gates[0].training else _hc_eval(log_alpha)
    return list(torch.split(values, [g.n for g in gates]))  # one (g.n,) per gate


class _ReplayedValues(torch.autograd.Function):
    """``gate_values(gates)`` as one autograd node that keeps no intermediate tensors: its
    backward recomputes the values from the random state the forward drew them with (the same
    samples) and differentiates that. So the node can be traversed by more than one backward
    pass, as reentrant gradient checkpointing does (the recomputed segment's own backward,
    then the outer one, each reaching the shared gate samples), where the ordinary graph of a
    sample frees its saved tensors after the first pass."""

    @staticmethod
    def forward(ctx: Any, gates: Sequence[Gate], *params: Tensor) -> tuple[Tensor, ...]:
        ctx.gates = gates
        ctx.params = params
        ctx.cpu_state = torch.get_rng_state()
        ctx.devices, ctx.device_states = get_device_states(*params)
        return tuple(gate_values(gates))  # one (g.n,) per gate

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        with torch.random.fork_rng(devices=ctx.devices):
            torch.set_rng_state(ctx.cpu_state)
            set_device_states(ctx.devices, ctx.device_states)
            with torch.enable_grad():
                values = gate_values(ctx.gates)  # the forward's samples again
        pairs = [(v, g) for v, g in zip(values, grads, strict=True) if v.requires_grad]
        if not pairs:
            return (None, *(None for _ in ctx.params))
        param_grads = torch.autograd.grad(
            [v for v, _ in pairs],
            ctx.params,
            [g for _, g in pairs],
            allow_unused=True,
            create_graph=torch.is_grad_enabled(),  # a double backward differentiates this too
        )
        return (None, *param_grads)


def replayable_gate_values(gates: Sequence[Gate]) -> list[Tensor]:
    """:func:`gate_values` whose autograd graph survives being traversed by several backward
    passes: what ``gate_`` caches once per forward and reads at every gated site, so a site
    inside a reentrant gradient-checkpointed segment (``checkpoint(..., use_reentrant=True)``,
    whose backward runs a backward of its own) and a site outside it can share one sample.
    The same values as :func:`gate_values`; the gradient costs one more evaluation of the
    gates in backward.

    >>> gs = [HardConcreteGate(2), HardConcreteGate(3)]
    >>> values = replayable_gate_values(gs)
    >>> (values[0].sum() + values[1].sum()).backward()
    >>> (values[0].sum() * 2).backward()  # a second pass through the same samples
    >>> gs[0].log_alpha.grad.shape
    torch.Size([2])
    """
    params = [p for g in gates for p in g.parameters() if p.requires_grad]
    # torch.compile cannot trace the random-state handling (fullgraph=True refused it)
    if not torch.is_grad_enabled() or not params or torch.compiler.is_compiling():
        return gate_values(gates)
    return list(_ReplayedValues.apply(gates, *params))  # type: ignore[no-untyped-call]


def gate_is_open(gates: Sequence[Gate]) -> list[Tensor]:
    """``[g.is_open() for g in gates]``, in one pass when the gates share a kind.

    >>> [m.tolist() for m in gate_is_open([HardConcreteGate(1, init_log_alpha=5.0)])]
    [[True]]
    """
    beta = _same_hard_concrete(gates)
    if beta is None:
        return [g.is_open() for g in gates]
    with torch.no_grad():
        log_alpha = torch.cat([cast(HardConcreteGate, g).log_alpha for g in gates])  # (sum n,)
        # one (g.n,) bool per gate
        return list(torch.split(_hc_eval(log_alpha) > 0, [g.n for g in gates]))


def gate_prob_open(gates: Sequence[Gate]) -> list[Tensor]:
    """``[g.prob_open() for g in gates]``, in one pass when the gates share a kind.

    >>> [p.shape[0] for p in gate_prob_open([HardConcreteGate(2), HardConcreteGate(1)])]
    [2, 1]
    """
    beta = _same_hard_concrete(gates)
    if beta is None:
        return [g.prob_open() for g in gates]
    log_alpha = torch.cat([cast(HardConcreteGate, g).log_alpha for g in gates])  # (sum n,)
    # one (g.n,) per gate
    return list(torch.split(_hc_prob_open(log_alpha, beta), [g.n for g in gates]))
