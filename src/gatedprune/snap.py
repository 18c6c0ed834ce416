"""The budget snap: :func:`snap_to_budget` fixes every gate of a budget's model open or closed
so the exact cost lands in the allowed window below the targets (greedy rounds ranked by the
learned open probabilities, compound moves, swaps and three-flip moves, and optionally layer
widths rounded to a multiple), deterministically. :class:`~gatedprune.train.Trainer` calls it at
``snap_at``; it can also be called on its own after training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .base import GatedModule
from .budget import Budget
from .checks import _positive_float, _positive_int
from .gates import Gate, gate_modules
from .layout import check_flag

__all__ = ["snap_to_budget"]


@torch.no_grad()
def snap_to_budget(
    budget: Budget,
    *,
    tolerance: float = 0.01,
    at_most: bool = True,
    round_to: int | None = None,
    primary: str | None = None,
) -> dict[str, float]:
    """Fix every gate of ``budget.model`` open or closed so the achieved cost fractions lie
    within ``tolerance`` of the targets, and with ``at_most`` (the default: a budget is a
    ceiling) not above them: in ``[t - tolerance, t]``; returns the achieved fractions. With
    several targets (``flops=`` and ``params=``) every one is a ceiling and the binding one
    (the one closest to its target) is brought within ``tolerance``; the others end where it
    leaves them, usually further below. ``primary`` (e.g. ``"flops"`` next to a latency
    budget) names the target that must be brought within ``tolerance`` instead; the others
    stay ceilings only.

    The Lagrangian brings the cost *near* the target, but a single gate can hold a large share
    of the cost (an edge between two wide layers, the only input edge of a layer), and near
    such a cliff the multipliers make the exact decisions oscillate. This fixes the decisions
    greedily, ranking gates by their open probability: when every constraint is more than
    ``tolerance`` below its target, the most probable closed gates are opened until that is no
    longer so (possibly overshooting); then, while a constraint is above its target (more than
    ``tolerance`` above it without ``at_most``), the least probable open gates are closed,
    skipping any closure that would take every constraint more than ``tolerance`` below its
    target; if the decisions then lie below the window (a closure overshot), the most probable
    closed gates that fit under every ceiling are reopened. Such rounds are repeated from their
    result while they improve. Decisions a snap ends in (every gate confidently open or
    closed, under every ceiling, rounded with ``round_to``, and in the window or with no
    single closed gate or round-up left that raises a cost and fits) are returned unchanged,
    so snapping twice changes nothing.
    Every gate ends in a confident state (``Gate.force_``), so the eval-mode values are exactly
    0 or 1. When no such decisions are found this way (the target may be out of reach of the
    structure's granularity), the decisions closest to the allowed window among those visited
    are kept, with ``at_most`` the closest among those at or below every target (a closure
    that undershoots is visited before it is undone, so one exists whenever closing gates can
    reach the ceiling, and :class:`Budget` refuses targets below the all-closed cost): check
    the returned fractions.

    ``round_to`` (e.g. 16, the float32 block of AVX-512 kernels) then rounds every layer width
    (the open count of each :meth:`GatedModule.width_gates` gate with more than ``round_to``
    entries) to a multiple of ``round_to`` or to the full width, keeping closed layers closed
    and the most probable units: all widths are first rounded down (at least ``round_to``),
    then the round-ups whose reopened units have the highest mean open probability are taken
    while every constraint stays at or below its target, then the most probable other closed
    gates (edges, blocks, narrower layers) that fit; when no single step fits and the cost is
    still below the window, pair moves (one width a step up, another a step down) that fit
    and raise the cost are taken. The cost may still lie more than ``tolerance`` below the
    target (the granularity is coarser); if even the rounded-down widths exceed a target, the
    unrounded decisions are kept.
    The greedy follows the learned ranking; when it ends below the window with no single gate
    left to open, compound moves are tried (open one closed gate that overshoots, close the
    least probable others until the cost fits; the best decisions visited are kept), then,
    if still outside it, swaps (reopen one of the 32 most probable closed gates and close one
    of the 32 least probable open ones; of the swaps landing in the window, the one that
    changes the learned decisions least) and, when no swap lands there, moves of three flips
    (one gate opened and two closed or the reverse; at most 256 evaluated).
    Where none reaches the window the result stays below it. Decisions the greedy brings into
    the window are kept as they are. With ``round_to`` no swaps are tried (the rounding
    changes the decisions anyway; it has its own pair moves).
    Deterministic, so every DDP rank makes the same decisions.

    ``tolerance`` must be finite, >= 0 and below the target it brings the cost within
    (``primary``'s, else every target), or the window would reach down to 0 (a
    ``ValueError`` names the value and that target); a target at or below its
    :attr:`Budget.floor` is exempt (the snap ends at the floor whatever the tolerance).

    >>> import torch, gatedprune
    >>> _ = torch.manual_seed(0)
    >>> net = gatedprune.ShortcutMLP(8, [16, 16], 3)
    >>> budget = gatedprune.Budget(net, torch.zeros(1, 8), flops=0.5)
    >>> 0.5 - 0.01 <= snap_to_budget(budget)["flops"] <= 0.5
    True
    """
    if not isinstance(budget, Budget):
        raise TypeError(f"snap_to_budget expects a gatedprune.Budget, got {type(budget).__name__}")
    tol = _positive_float("tolerance", tolerance, allow_zero=True)
    at_most = check_flag("at_most", at_most)  # None or "no" would silently pick a window
    _check_primary(primary, budget.targets)
    _check_tolerance(tolerance, tol, budget, primary)
    if round_to is not None:
        round_to = _positive_int("round_to", round_to)
        _check_round_to(budget.model, round_to)  # before any gate changes
    gates = gate_modules(budget.model)
    masks = [g.is_open().reshape(-1).clone() for g in gates]  # (n_g,) each
    learned = [g.prob_open().detach().reshape(-1).clone() for g in gates]  # before force_
    forced = True  # whether every gate already is in a confident state (snapped before)
    for g, m in zip(gates, masks, strict=True):
        state = [t.clone() for t in g.state_dict().values()]
        g.force_(m)
        forced = forced and all(
            torch.equal(a, b) for a, b in zip(state, g.state_dict().values(), strict=True)
        )
    window = _Window(budget.targets, tol, at_most, primary)
    current = {k: float(v) for k, v in budget.fractions(hard=True).items()}
    if forced and _settled(budget, gates, window, round_to, current):
        return current  # what a snap ends in: snapping twice changes nothing
    # greedy rounds ranking the gates by their learned probabilities, until one brings no
    # strict improvement (each round ends in the best decisions it visited)
    for _ in range(_MAX_SNAP_ROUNDS):
        start, start_cost = [m.clone() for m in masks], current
        current = _snap_round(budget, gates, masks, learned, window)
        if not window.deviation(current) < window.deviation(start_cost):
            for g, mask, m in zip(gates, masks, start, strict=True):
                mask.copy_(m)
                g.force_(m)
            current = start_cost
            break
    if window.all_below(current):
        current = _compound_reopen(budget, gates, masks, learned, window, current)
    if round_to is None and not window.inside(current):  # round_to has its own pair moves
        current = _swap_search(budget, gates, masks, learned, window, current)
    if round_to is not None:
        by_id = {id(g): p for g, p in zip(gates, learned, strict=True)}
        current = _round_widths(budget, round_to, by_id, window)
        if _is_rounded(budget.model, round_to):
            for g, mask in zip(gates, masks, strict=True):
                mask.copy_(g.is_open().reshape(-1))  # (n,) bool
            fixed = _fixed_width(budget.model, round_to)
            current = _fill(budget, gates, masks, learned, window, fixed)
    return current


_MAX_SNAP_ROUNDS = 16
"""Bound on the greedy rounds of :func:`snap_to_budget` (each one strictly improves)."""


class _Decisions:
    """The forced gates of a snap step with their open ``masks`` (kept in step with the gates,
    updated in place), flipped a gate at a time (a gate shared by a group of entries flips
    the whole group), ``order``: every gate by ascending open probability in ``probs`` (ties
    broken by position: deterministic), and the best decisions visited by ``window``'s
    ranking (``best``: its key, the masks, the cost fractions)."""

    def __init__(
        self,
        budget: Budget,
        gates: list[Gate],
        masks: list[Tensor],
        probs: list[Tensor],
        window: _Window,
    ) -> None:
        self.budget, self.gates, self.masks, self.window = budget, gates, masks, window
        self.order = sorted(
            (float(score), gi, i)
            for gi, (g, p) in enumerate(zip(gates, probs, strict=True))
            for i, score in enumerate(p[:: g.group].tolist())
        )
        self.best: tuple[tuple[bool, float], list[Tensor], dict[str, float]]

    def achieved(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.budget.fractions(hard=True).items()}

    def is_set(self, gi: int, i: int) -> bool:
        return bool(self.masks[gi][i * self.gates[gi].group])

    def set(self, gi: int, i: int, is_open: bool) -> None:
        group = self.gates[gi].group
        self.masks[gi][i * group : (i + 1) * group] = is_open
        self.gates[gi].force_(self.masks[gi])

    def snapshot(self) -> list[Tensor]:
        return [m.clone() for m in self.masks]

    def restore(self, saved: list[Tensor]) -> None:
        for g, mask, m in zip(self.gates, self.masks, saved, strict=True):
            mask.copy_(m)
            g.force_(m)

    def track(
        self, c: dict[str, float]
    ) -> tuple[tuple[bool, float], list[Tensor], dict[str, float]]:
        """Start tracking from the current decisions (cost fractions ``c``); returns them as
        ``best``."""
        self.best = (self.window.deviation(c), self.snapshot(), c)
        return self.best

    def consider(self, c: dict[str, float]) -> None:
        """Keep the current decisions (cost fractions ``c``) if they rank before ``best``."""
        if self.window.deviation(c) < self.best[0]:
            self.best = (self.window.deviation(c), self.snapshot(), c)

    def close_while_above(
        self, c: dict[str, float], keep: tuple[int, int] | None = None
    ) -> dict[str, float]:
        """Close the least probable open gates (all but ``keep``) while a cost is above its
        ceiling, skipping a closure that would undershoot the window; every decision visited
        is considered. ``c``: the current cost fractions; returns those it ends at."""
        for _, gi, i in self.order:
            if not self.window.any_above(c):
                break
            if (gi, i) == keep or not self.is_set(gi, i):
                continue
            self.set(gi, i, False)
            trial = self.achieved()
            self.consider(trial)
            if self.window.undershoots(trial):
                self.set(gi, i, True)  # this closure would undershoot: keep the gate
            else:
                c = trial
        return c


_COMPOUND_TRIES = 8
"""How many closed gates :func:`_compound_reopen` tries to reopen (the most probable first)."""


def _compound_reopen(
    budget: Budget,
    gates: list[Gate],
    masks: list[Tensor],
    probs: list[Tensor],
    window: _Window,
    current: dict[str, float],
) -> dict[str, float]:
    """Below the window with no single opening that fits (the greedy rounds can end so when
    the granularity is coarse: a closed transformer FFN sub-layer whose opening overshoots,
    and whose units alone change nothing), try compound moves: open one closed gate whose
    opening alone overshoots a ceiling, then close the least probable *other* open gates
    while a cost is above its ceiling, skipping closures that would take every cost below
    the window. Candidates are tried by descending open probability (at most
    ``_COMPOUND_TRIES`` of them); every decision visited is ranked as in the greedy rounds
    (:meth:`_Window.deviation`), the best one is kept if it beats the starting decisions,
    and is then filled up to the window (:func:`_fill`). ``masks`` are updated in place;
    returns the cost fractions."""

    d = _Decisions(budget, gates, masks, probs, window)
    start = d.snapshot()
    initial = d.track(current)
    tries = 0
    for _, gi, i in reversed(d.order):
        if tries >= _COMPOUND_TRIES or window.inside(d.best[2]):
            break
        if d.is_set(gi, i):
            continue
        d.set(gi, i, True)
        trial = d.achieved()
        if not window.any_above(trial):  # fits alone (it changes no cost): not a candidate
            d.set(gi, i, False)
            continue
        tries += 1
        d.close_while_above(trial, keep=(gi, i))  # the other gates, least probable first
        d.restore(start)
    if d.best is initial:
        return current
    d.restore(d.best[1])
    return _fill(budget, gates, masks, probs, window, lambda g: False)


_SWAP_CANDIDATES = 32
"""How many closed gates (the most probable first) and open gates (the least probable first)
:func:`_swap_search` pairs, bounding its swaps to 32 x 32 exact cost evaluations."""
_SWAP_SCAN = 4 * _SWAP_CANDIDATES
"""How many closed and open gates :func:`_swap_search` flips alone to find its candidates
(a gate whose flip changes no cost, or whose opening alone stays under the window, is none)."""
_TRIPLE_CANDIDATES = 12
"""How many of the swap candidates (each side) :func:`_swap_search` combines into moves of
three flips (one gate opened and two closed, or two opened and one closed)."""
_TRIPLE_EVALS = 256
"""Bound on the exact cost evaluations of the three-flip moves of :func:`_swap_search`."""

_Slot = tuple[int, int]  # (gate index, group index): what _Decisions.set flips


def _swap_search(
    budget: Budget,
    gates: list[Gate],
    masks: list[Tensor],
    probs: list[Tensor],
    window: _Window,
    current: dict[str, float],
) -> dict[str, float]:
    """Outside the window after the greedy rounds and :func:`_compound_reopen` (below it,
    with no single opening left that fits, or, without ``at_most``, above a ceiling), try
    swaps: reopen one closed gate and close one open gate. The reopened gate is one of the
    ``_SWAP_CANDIDATES`` most probable closed gates whose opening alone reaches the window
    (one that stays below it cannot: costs only grow with openings), the closed one one of
    the ``_SWAP_CANDIDATES`` least probable open gates whose closing lowers a cost. Of the
    swaps that land in the window the one that changes the learned decisions least is taken:
    the lowest sum, over the flipped gates, of the probability of the state each leaves (the
    reopened gate's closed probability plus the closed gate's open probability; ties by
    position). The summed cost changes of the flips alone predict a move's cost (exactly
    when the gates do not interact): swaps predicted in the window are evaluated first, and
    a swap only while it could still beat the best one found. When no swap lands in the
    window, moves of three flips (one of the ``_TRIPLE_CANDIDATES`` first candidates opened
    and two closed, or two opened and one closed) whose cost, predicted from the swaps'
    exact costs, lies in the window are evaluated, the least change first (at most
    ``_TRIPLE_EVALS`` of them), and the first that lands there is taken. Deterministic; when
    no move lands in the window nothing changes. ``masks`` are updated in place; returns the
    cost fractions."""
    d = _Decisions(budget, gates, masks, probs, window)
    prob = {(gi, i): p for p, gi, i in d.order}

    def cost_of(opened: tuple[_Slot, ...], closed: tuple[_Slot, ...]) -> dict[str, float]:
        """The cost fractions with ``opened`` opened and ``closed`` closed (then undone)."""
        for s in opened:
            d.set(*s, True)
        for s in closed:
            d.set(*s, False)
        c = d.achieved()
        for s in closed:
            d.set(*s, True)
        for s in opened:
            d.set(*s, False)
        return c

    def left(opened: tuple[_Slot, ...], closed: tuple[_Slot, ...]) -> float:
        """The summed probability of the states the flipped gates leave."""
        return sum(1.0 - prob[s] for s in opened) + sum(prob[s] for s in closed)

    def candidates(opening: bool) -> dict[_Slot, dict[str, float]]:
        """Closed gates to open (the most probable first) or open gates to close (the least
        probable first), each with the cost fractions its flip alone leads to."""
        found: dict[_Slot, dict[str, float]] = {}
        scanned = 0
        for _, gi, i in reversed(d.order) if opening else d.order:
            if len(found) == _SWAP_CANDIDATES or scanned == _SWAP_SCAN:
                break
            if d.is_set(gi, i) == opening:
                continue
            scanned += 1
            c = cost_of(((gi, i),), ()) if opening else cost_of((), ((gi, i),))
            # an opening that stays under the window, or a closing that saves nothing, is none
            if not window.all_below(c) if opening else any(c[k] < current[k] for k in c):
                found[gi, i] = c
        return found

    opens, closes = candidates(True), candidates(False)

    def predicted(c: Mapping[str, float]) -> int:
        """0: in the window, 1: above it, 2: below it."""
        return 0 if window.inside(c) else 1 if window.any_above(c) else 2

    def summed(*terms: tuple[int, Mapping[str, float]]) -> dict[str, float]:
        """``current`` plus the given multiples of the changes from it."""
        return {k: v + sum(n * (t[k] - v) for n, t in terms) for k, v in current.items()}

    swaps = sorted(
        (predicted(summed((1, up), (1, down))), left((a,), (b,)), a, b)
        for a, up in opens.items()
        for b, down in closes.items()
    )
    best: tuple[tuple[float, tuple[_Slot, ...], tuple[_Slot, ...]], dict[str, float]] | None
    best = None
    exact: dict[tuple[_Slot, _Slot], dict[str, float]] = {}
    for _, change, a, b in swaps:
        key = (change, (a,), (b,))
        if best is not None and key >= best[0]:
            continue  # cannot beat the best swap found
        exact[a, b] = cost_of((a,), (b,))
        if window.inside(exact[a, b]):
            best = (key, exact[a, b])
    if best is None:  # every swap evaluated: three flips, predicted from the swaps
        ups, downs = list(opens)[:_TRIPLE_CANDIDATES], list(closes)[:_TRIPLE_CANDIDATES]
        moves = sorted(
            [
                (left((a,), (b, e)), (a,), (b, e))
                for a in ups
                for j, b in enumerate(downs)
                for e in downs[j + 1 :]
                if window.inside(summed((1, exact[a, b]), (1, exact[a, e]), (-1, opens[a])))
            ]
            + [
                (left((a, e), (b,)), (a, e), (b,))
                for j, a in enumerate(ups)
                for e in ups[j + 1 :]
                for b in downs
                if window.inside(summed((1, exact[a, b]), (1, exact[e, b]), (-1, closes[b])))
            ]
        )
        for change, opened, closed in moves[:_TRIPLE_EVALS]:
            c = cost_of(opened, closed)
            if window.inside(c):
                best = ((change, opened, closed), c)
                break
    if best is None:
        return current
    _, opened, closed = best[0]
    for s in opened:
        d.set(*s, True)
    for s in closed:
        d.set(*s, False)
    return best[1]


def _is_rounded(model: nn.Module, multiple: int) -> bool:
    """Whether every layer width is 0, full, or a multiple of ``multiple`` (see ``round_to``)."""
    return all(_legal_width(g, int(g.is_open().sum()), multiple) for g in _width_gates(model))


def _legal_width(g: Gate, k: int, multiple: int) -> bool:
    return k == 0 or k == g.n or g.n <= multiple or k % multiple == 0


def _fixed_width(model: nn.Module, round_to: int | None) -> Callable[[Gate], bool]:
    """Which gates a fill must not open one by one: with ``round_to``, the rounded widths
    (:meth:`GatedModule.width_gates` wider than ``round_to``); they only grow by round-ups."""
    if round_to is None:
        return lambda g: False
    ids = {id(g) for g in _width_gates(model) if g.n > round_to}
    return lambda g: id(g) in ids


def _fill(
    budget: Budget,
    gates: list[Gate],
    masks: list[Tensor],
    probs: list[Tensor],
    window: _Window,
    fixed: Callable[[Gate], bool],
) -> dict[str, float]:
    """While every constraint lies below its window, open the most probable closed gates
    that keep every constraint under its ceiling (skipping ``fixed`` gates); one pass: an
    opening that does not fit never fits after further openings (costs only grow)."""
    current = {k: float(v) for k, v in budget.fractions(hard=True).items()}
    order = sorted(
        (
            (float(score), gi, i)
            for gi, (g, p) in enumerate(zip(gates, probs, strict=True))
            if not fixed(g)
            for i, score in enumerate(p[:: g.group].tolist())
        ),
        reverse=True,
    )  # descending open probability, ties by position (reversed): deterministic
    for _, gi, i in order:
        if not window.all_below(current) or window.any_above(current):
            break
        group, mask = gates[gi].group, masks[gi]
        if bool(mask[i * group]):
            continue
        mask[i * group : (i + 1) * group] = True
        gates[gi].force_(mask)
        trial = {k: float(v) for k, v in budget.fractions(hard=True).items()}
        if window.any_above(trial):
            mask[i * group : (i + 1) * group] = False
            gates[gi].force_(mask)
        else:
            current = trial
    return current


def _settled(
    budget: Budget,
    gates: list[Gate],
    window: _Window,
    round_to: int | None,
    current: dict[str, float],
) -> bool:
    """Whether forced decisions are what a snap ends in: under every ceiling, rounded (with
    ``round_to``), and in the window or with no single opening left that raises a cost and
    fits (one closed gate, or with ``round_to`` one round-up of a rounded width)."""
    if window.any_above(current):
        return False
    if window.inside(current):
        return round_to is None or _is_rounded(budget.model, round_to)
    if round_to is not None and not _is_rounded(budget.model, round_to):
        return False
    fixed = _fixed_width(budget.model, round_to)

    def fits_with(g: Gate, mask: Tensor) -> bool:
        """Whether opening ``mask`` raises a cost and stays under every ceiling (an opening
        that changes no cost, such as a unit of a closed sub-layer, is no improvement)."""
        before = g.is_open().reshape(-1).clone()  # (n,) bool
        g.force_(mask)
        trial = {k: float(v) for k, v in budget.fractions(hard=True).items()}
        g.force_(before)
        raises = any(trial[k] > current[k] for k in trial)
        return raises and not window.any_above(trial)

    for g in gates:
        mask = g.is_open().reshape(-1)  # (n,) bool
        k = int(mask.sum())
        if fixed(g):
            if 0 < k < g.n:  # a round-up: the next rounded width, closed units by position
                assert round_to is not None
                up = min(g.n, (k // round_to + 1) * round_to)
                grown = mask.clone()
                # index (up - k,): lowest closed positions
                grown[(~mask).nonzero().reshape(-1)[: up - k]] = True
                if fits_with(g, grown):
                    return False
            continue
        for i in range(0, g.n, g.group):
            if not bool(mask[i]):
                grown = mask.clone()
                grown[i : i + g.group] = True
                if fits_with(g, grown):
                    return False
    return True


def _check_primary(primary: object, targets: Mapping[str, float]) -> None:
    """``primary`` must be None or the name of one of ``targets``."""
    if primary is None:
        return
    if not isinstance(primary, str):
        raise TypeError(f"primary must be a target name or None, got {primary!r}")
    if primary not in targets:
        raise ValueError(
            f"primary={primary!r} is not a target of this budget: expected one of "
            f"{sorted(targets)} or None"
        )


def _check_tolerance(
    value: object, tol: float, budget: Budget, primary: str | None, name: str = "tolerance"
) -> None:
    """``tol`` (``value`` checked finite and >= 0) must lie below the target the snap brings
    the cost within: ``primary``'s, else every target (any may be the binding one); a window
    reaching down to 0 would accept any decisions under the ceilings. A target at or below
    its floor (:attr:`Budget.floor`, every gate closed) is exempt: the snap ends at the floor
    whatever the tolerance."""
    binding = budget.targets if primary is None else {primary: budget.targets[primary]}
    reachable = {k: t for k, t in binding.items() if t > budget.floor[k]}
    if not reachable:
        return
    key = min(reachable, key=lambda k: (reachable[k], k))
    if tol >= reachable[key]:
        raise ValueError(
            f"{name} must be >= 0 and below the target the snap brings the cost within "
            f"({key}={reachable[key]:g}), got {value}"
        )


class _Window:
    """The allowed window of :func:`snap_to_budget`: no constraint above its target (or more
    than ``tol`` above it without ``at_most``), and at least one constraint (the binding one,
    or ``primary`` when given) within ``tol`` below it. With several targets the others are
    usually further below."""

    def __init__(
        self, targets: Mapping[str, float], tol: float, at_most: bool, primary: str | None = None
    ) -> None:
        self.targets, self.tol, self.at_most = dict(targets), tol, at_most
        self.above = 0.0 if at_most else tol  # allowed excess over a target
        # the constraints of which one must reach its window
        self.binding = dict(targets) if primary is None else {primary: targets[primary]}

    def all_below(self, c: Mapping[str, float]) -> bool:
        return all(c[k] < t - self.tol for k, t in self.binding.items())

    def undershoots(self, c: Mapping[str, float]) -> bool:
        """Whether a closure that led to ``c`` went too far: below the window with no ceiling
        left exceeded (with ``primary``, a closure that takes it below its window is still
        taken while another constraint is above its ceiling: ceilings come first)."""
        return self.all_below(c) and not self.any_above(c)

    def any_above(self, c: Mapping[str, float]) -> bool:
        return any(c[k] > t + self.above for k, t in self.targets.items())

    def inside(self, c: Mapping[str, float]) -> bool:
        return not self.all_below(c) and not self.any_above(c)

    def deviation(self, c: Mapping[str, float]) -> tuple[bool, float]:
        """Sort key: with ``at_most``, a state above a ceiling ranks behind every state at or
        below all of them; then the distance to the window (0 inside it), then the binding
        constraint's distance to its target."""
        t, b = self.targets, self.binding
        over = self.at_most and any(c[k] > t[k] for k in t)
        excess = max(max(c[k] - t[k] - self.above, 0.0) for k in t)
        short = min(max(t[k] - self.tol - c[k], 0.0) for k in b)
        closest = min(abs(c[k] - t[k]) for k in b)
        return over, max(excess, short) + 1e-9 * closest


def _snap_round(
    budget: Budget, gates: list[Gate], masks: list[Tensor], probs: list[Tensor], window: _Window
) -> dict[str, float]:
    """One greedy round of :func:`snap_to_budget` on forced gates (``masks`` are their open
    masks, updated in place); ``probs`` rank them. Takes the best decisions it visited (the
    starting ones unless strictly better), fills them up to the window (:func:`_fill`) and
    returns their cost fractions."""
    d = _Decisions(budget, gates, masks, probs, window)
    current = d.achieved()
    d.track(current)
    if window.all_below(current):  # open the most probable closed gates (may overshoot)
        for _, gi, i in reversed(d.order):
            if not window.all_below(current):
                break
            if not d.is_set(gi, i):
                d.set(gi, i, True)
                current = d.achieved()
                d.consider(current)
    d.close_while_above(current)  # the least probable open gates while a cost is too high
    d.restore(d.best[1])
    # below the window (a closure overshot): reopen the most probable closed gates that fit
    return _fill(budget, gates, masks, probs, window, lambda g: False)


def _width_gates(model: nn.Module) -> list[Gate]:
    seen: set[int] = set()
    out: list[Gate] = []
    for m in model.modules():
        if isinstance(m, GatedModule):
            for g in m.width_gates():
                if id(g) not in seen:
                    seen.add(id(g))
                    out.append(g)
    return out


def _check_round_to(model: nn.Module, multiple: int, name: str = "round_to") -> None:
    for g in _width_gates(model):
        if multiple % g.group:
            raise ValueError(
                f"{name}={multiple} is not a multiple of a width gate's group size {g.group}"
            )


def _round_widths(
    budget: Budget, multiple: int, learned: dict[int, Tensor], window: _Window
) -> dict[str, float]:
    """The ``round_to`` step of :func:`snap_to_budget` on gates already forced to 0/1;
    ``learned``: each gate's open probabilities before they were forced, by ``id``.

    Widths are rounded down, then grown one step at a time (the most probable reopened units
    first) while every constraint stays under its ceiling. When no single step fits and the
    cost is still below ``window``, a pair move (one width a step up, another a step down)
    that fits and brings the binding constraint (``primary``, if the snap has one) closer to
    its target is taken: the one that reaches the window with the best probability trade, else
    the one that comes closest; then single steps are tried again. Each move raises the
    binding constraint, so this ends."""
    targets = budget.targets

    def achieved() -> dict[str, float]:
        return {k: float(v) for k, v in budget.fractions(hard=True).items()}

    def fits(c: dict[str, float]) -> bool:
        return all(c[k] <= t for k, t in targets.items())

    # per rounded gate: the gate, its entries ranked (open first, then by open probability,
    # then position: a shared gate's entries stay together), the allowed widths, the choice
    plans: list[tuple[Gate, list[int], list[int], Tensor]] = []
    choice: list[int] = []
    saved: list[tuple[Gate, Tensor]] = []
    _check_round_to(budget.model, multiple)
    for g in _width_gates(budget.model):
        is_open = g.is_open().reshape(-1)  # (n,) bool
        k, n = int(is_open.sum()), g.n
        if k == 0 or n <= multiple:
            continue  # a closed layer stays closed; a narrow one has nothing to round to
        prob = learned[id(g)]  # (n,)
        ranked = sorted(range(n), key=lambda i: (not bool(is_open[i]), -float(prob[i]), i))
        widths = sorted({*range(multiple, n + 1, multiple), n})
        plans.append((g, ranked, widths, prob))
        choice.append(max([j for j, w in enumerate(widths) if w <= k], default=0))
        saved.append((g, is_open.clone()))

    def apply(p: int, j: int) -> None:
        g, ranked, widths, _ = plans[p]
        mask = torch.zeros(g.n, dtype=torch.bool)  # (n,)
        mask[ranked[: widths[j]]] = True
        g.force_(mask)

    for p, j in enumerate(choice):
        apply(p, j)
    current = achieved()
    if not fits(current):  # the rounded-down widths are too wide: keep the snap's decisions
        for g, mask in saved:
            g.force_(mask)
        return achieved()

    def gap(c: dict[str, float]) -> float:
        # the binding constraint's distance to its target (with ``primary``: the primary's;
        # the others are ceilings only, which ``fits`` keeps)
        return min(t - c[k] for k, t in window.binding.items())

    def step_score(p: int, j: int) -> float:
        """Mean open probability of the units width step ``j -> j + 1`` of ``p`` reopens."""
        _, ranked, widths, prob = plans[p]
        return float(prob[ranked[widths[j] : widths[j + 1]]].mean())  # (reopened units,) -> ()

    while True:
        best: tuple[float, int] | None = None
        for p, (_, _, widths, _) in enumerate(plans):
            j = choice[p]
            if j + 1 == len(widths):
                continue
            apply(p, j + 1)
            trial = achieved()
            apply(p, j)
            if fits(trial):
                score = step_score(p, j)
                if best is None or score > best[0]:
                    best = (score, p)
        if best is not None:
            p = best[1]
            choice[p] += 1
            apply(p, choice[p])
            current = achieved()
            continue
        if window.inside(current):
            return current
        pair = _best_pair(plans, choice, apply, achieved, fits, gap, step_score, window, current)
        if pair is None:
            return current
        up, down = pair
        choice[up] += 1
        choice[down] -= 1
        apply(up, choice[up])
        apply(down, choice[down])
        current = achieved()


_PAIR_CANDIDATES = 8
"""Widths tried as each side of a pair move in :func:`_round_widths` (the most probable steps
up, the least probable steps down), bounding its cost evaluations to 8 x 8 per move."""


def _best_pair(
    plans: list[tuple[Gate, list[int], list[int], Tensor]],
    choice: list[int],
    apply: Callable[[int, int], None],
    achieved: Callable[[], dict[str, float]],
    fits: Callable[[dict[str, float]], bool],
    gap: Callable[[dict[str, float]], float],
    step_score: Callable[[int, int], float],
    window: _Window,
    current: dict[str, float],
) -> tuple[int, int] | None:
    """The pair move of :func:`_round_widths` (``(up, down)`` plan indices) or None."""
    ups = sorted(
        (p for p in range(len(plans)) if choice[p] + 1 < len(plans[p][2])),
        key=lambda p: -step_score(p, choice[p]),
    )[:_PAIR_CANDIDATES]
    downs = sorted(
        (p for p in range(len(plans)) if choice[p] > 0),
        key=lambda p: step_score(p, choice[p] - 1),
    )[:_PAIR_CANDIDATES]
    best: tuple[tuple[bool, float, float], tuple[int, int]] | None = None
    for up in ups:
        for down in downs:
            if up == down:
                continue
            apply(up, choice[up] + 1)
            apply(down, choice[down] - 1)
            trial = achieved()
            apply(up, choice[up])
            apply(down, choice[down])
            if not fits(trial) or gap(trial) >= gap(current):
                continue
            inside = window.inside(trial)
            trade = step_score(up, choice[up]) - step_score(down, choice[down] - 1)
            key = (not inside, 0.0 if inside else gap(trial), -trade)
            if best is None or key < best[0]:
                best = (key, (up, down))
    return None if best is None else best[1]
