"""The Trainer's checkpoint files: their format (file names, tensors, JSON metadata), writing
one, and reading one back with every part of its content checked against the run that
resumes from it (settings, model, data fingerprints, state tensor shapes, optimizer state,
counters) and every value no run can have written refused (NaN weights, a negative variance,
more epochs of history than steps) before anything changes. :class:`~gatedprune.train.Trainer`
decides when to write and which one to resume from.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from .budget import Budget
from .fingerprint import fingerprint_difference
from .gates import gate_modules

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "Record",
    "Resumed",
    "checkpoint_files",
    "load_checkpoint",
    "write_checkpoint",
]

Record = dict[str, Any]
"""One row of :attr:`~gatedprune.train.Trainer.history` or
:attr:`~gatedprune.train.Trainer.trace`: str -> int | float | None."""

CHECKPOINT_FORMAT = "gatedprune.trainer"
CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r"^step-(\d{9,})\.safetensors$")
_CORE_CONFIG = ("epochs", "batch_size", "seed", "n_train", "steps_per_epoch")
"""Settings every checkpoint records; the others are compared when the checkpoint has them."""
_STAT_KEYS = ("loss", "task_loss", "penalty", "count")  # an epoch's running sums, per rank


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoint files in ``folder``, oldest step first (none if it is not a folder)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def write_checkpoint(
    folder: Path,
    model: nn.Module,
    budget: Budget | None,
    opt: torch.optim.Optimizer,
    *,
    step: int,
    config: dict[str, Any],
    stats: Mapping[str, float],
    rank_stats: list[Tensor],
    history: list[Record],
    trace: list[Record],
    achieved_before_snap: dict[str, float] | None,
) -> Path:
    """Write the checkpoint of ``step`` into ``folder`` (created if missing): one atomic
    safetensors file holding the state tensors of ``model``, ``budget`` and ``opt`` and the
    torch RNG state, the rest as JSON metadata (``config``, the epoch's running sums
    ``stats`` and every rank's ``rank_stats``, ``history``, ``trace``, the cost before the
    snap); then sweep the temporary files killed writers left. Returns its path."""
    from .io import sweep_stale_temps, write_tensors

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}

    def put(key: str, t: Tensor) -> None:
        tensors[key] = t.detach().to("cpu", copy=True).contiguous()

    for k, v in model.state_dict().items():
        put(f"model/{k}", v)
    if budget is not None:
        for k, v in budget.state_dict().items():
            put(f"budget/{k}", v)
    sd = opt.state_dict()
    optim_extra: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, Tensor):
                put(f"optim/{pid}/{k}", v)
            else:
                optim_extra.setdefault(str(pid), {})[k] = v
    put("rng/torch", torch.get_rng_state())
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "config": config,
        "optim_param_groups": sd["param_groups"],
        "optim_state_extra": optim_extra,
        "optim_state_ids": sorted(int(p) for p in sd["state"]),
        "stats": dict(stats),
        "rank_stats": [t.tolist() for t in rank_stats],
        "history": history,
        "trace": trace,
        "achieved_before_snap": achieved_before_snap,
    }
    path = folder / f"step-{step:09d}.safetensors"
    write_tensors(path, tensors, meta)
    sweep_stale_temps(folder, r"step-\d{9,}\.safetensors")  # a killed writer's, any step
    return path


@dataclass(frozen=True)
class Resumed:
    """The counters a checkpoint gives back to the Trainer (:func:`load_checkpoint`)."""

    step: int
    history: list[Record]
    trace: list[Record]
    stats: dict[str, float]
    """This rank's running sums of the epoch (see :func:`_checked_stats`)."""
    achieved_before_snap: dict[str, float] | None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    budget: Budget | None,
    opt: torch.optim.Optimizer,
    config: dict[str, Any],
    world: int = 1,
    rank: int = 0,
) -> Resumed:
    """Continue from ``path``: check it against the run's ``config`` (settings, model
    fingerprint), ``model``, ``budget`` and ``opt``, and its values (none a run could not have
    written: NaN weights, a negative variance or step count, more epochs of history than
    steps, ...; ``ValueError`` naming the tensor or field, the value and what was expected),
    then load their state and the torch RNG state, and return the Trainer's counters.
    Everything is checked before anything changes; should loading still fail, the model and
    the budget are restored to their state before."""
    from .io import read_tensors

    tensors, meta = read_tensors(path)
    keys = ("step", "config", "optim_param_groups", "optim_state_extra", "optim_state_ids")
    missing = [k for k in (*keys, "stats", "history", "trace") if k not in meta]
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} is not a gatedprune Trainer checkpoint (format {meta.get('format')!r}, "
            f"version {meta.get('version')!r}; expected {CHECKPOINT_FORMAT!r} "
            f"version {CHECKPOINT_VERSION})"
        )
    if missing or not isinstance(meta["config"], dict):
        raise ValueError(f"{path} is an incomplete Trainer checkpoint (missing {missing})")
    saved = meta["config"]
    # settings an older checkpoint did not record are not compared
    diff = {
        k: (saved.get(k), v)
        for k, v in config.items()
        if k != "model" and (k in saved or k in _CORE_CONFIG) and saved.get(k) != v
    }
    if diff:
        details = ", ".join(
            f"{k}: checkpoint {_short(a)!r} vs now {_short(b)!r}" for k, (a, b) in diff.items()
        )
        raise ValueError(
            f"cannot resume from {path}: the configuration changed ({details}); resume with "
            "the same settings, or start a new run (resume=False or another checkpoint_dir)"
        )
    if "model" in saved and "model" in config:  # older checkpoints did not record it
        why = fingerprint_difference(saved["model"], config["model"])
        if why is not None:
            raise ValueError(
                f"cannot resume from {path}: it was written for another model ({why}); "
                "resume with the model the run started with, or start a new run "
                "(resume=False or another checkpoint_dir)"
            )

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    # everything is checked first: the model, budget and optimizer change only after
    budget_state = part("budget/")
    if (budget is None) != (not budget_state):
        raise ValueError(
            f"cannot resume from {path}: the checkpoint was written "
            f"{'with' if budget_state else 'without'} a budget"
        )
    model_state = part("model/")
    _check_state_tensors(path, "model", model_state, model.state_dict())
    _check_model_values(path, model, model_state)
    if budget is not None:
        _check_state_tensors(path, "budget", budget_state, budget.state_dict())
        _check_budget_values(path, budget, budget_state)
    rng = tensors.get("rng/torch")
    if rng is None:
        raise ValueError(f"cannot resume from {path}: no RNG state")
    rng_now = torch.get_rng_state()
    if rng.dtype != rng_now.dtype or rng.shape != rng_now.shape:
        raise ValueError(
            f"cannot resume from {path}: bad RNG state: a {rng.dtype} tensor of shape "
            f"{tuple(rng.shape)}, expected {rng_now.dtype} of shape {tuple(rng_now.shape)}"
        )
    groups, state = _checked_optimizer_state(path, opt, meta, part("optim/"))
    step = meta["step"]
    total = int(config["epochs"]) * int(config["steps_per_epoch"])
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total:
        raise ValueError(
            f"cannot resume from {path}: 'step' is {_brief(step)}, expected an int in "
            f"[0, {total}] (epochs x steps per epoch)"
        )
    spe = int(config["steps_per_epoch"])
    history = _checked_records(path, "history", meta["history"])
    trace = _checked_records(path, "trace", meta["trace"])
    _check_counters(path, step, spe, history, trace)
    done = (step % spe) * int(config["batch_size"])  # samples of the epoch so far, all ranks
    stats = _checked_stats(path, meta["stats"], meta.get("rank_stats"), world, rank, done)
    before_snap = _checked_achieved(path, meta.get("achieved_before_snap"), budget)

    # load_state_dict copies what fits before it reports what does not: keep a copy
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    budget_before = (
        {k: v.clone() for k, v in budget.state_dict().items()} if budget is not None else {}
    )
    try:
        try:
            model.load_state_dict(model_state)
        except RuntimeError as e:
            raise ValueError(f"cannot resume from {path}: model state does not fit: {e}") from e
        if budget is not None:
            try:
                budget.load_state_dict(budget_state)
            except RuntimeError as e:
                raise ValueError(f"cannot resume from {path}: budget does not fit: {e}") from e
        try:
            opt.load_state_dict({"state": state, "param_groups": groups})
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"cannot resume from {path}: optimizer state does not fit: {e}") from e
        try:
            torch.set_rng_state(rng)
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"cannot resume from {path}: bad RNG state: {e}") from e
    except BaseException:
        model.load_state_dict(model_before)
        if budget is not None:
            budget.load_state_dict(budget_before)
        raise
    return Resumed(step, history, trace, stats, before_snap)


def _checked_optimizer_state(
    path: Path,
    opt: torch.optim.Optimizer,
    meta: dict[str, Any],
    tensors: dict[str, Tensor],
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """The checkpoint's optimizer ``(param_groups, state)`` for ``opt.load_state_dict``,
    checked against ``opt``: the same groups over the same parameter ids with the same
    settings (``lr`` aside), state only for those ids and, for torch's own optimizers,
    each state tensor of the shape its parameter needs (torch does not check: a wrong one
    fails at the first step). ``ValueError`` naming the bad entry."""
    current = opt.state_dict()["param_groups"]
    groups = meta["optim_param_groups"]
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise ValueError(
            f"cannot resume from {path}: malformed optimizer state ('optim_param_groups' "
            "must be a list of objects, each with a 'params' list)"
        )
    if len(groups) != len(current) or any(
        g["params"] != c["params"] for g, c in zip(groups, current, strict=True)
    ):
        raise ValueError(f"cannot resume from {path}: the optimizer's parameter groups differ")
    for i, (g, c) in enumerate(zip(groups, current, strict=True)):
        for k, v in c.items():  # JSON turned tuples (e.g. Adam's betas) into lists
            if isinstance(v, tuple) and isinstance(g.get(k), list):
                g[k] = tuple(g[k])
        # lr is scheduled each step; every other setting must be the one trained with
        changed = [
            f"{k}: checkpoint {g[k]!r} vs now {v!r}"
            for k, v in c.items()
            if k not in ("params", "lr", "initial_lr") and k in g and g[k] != v
        ]
        if changed:
            raise ValueError(
                f"cannot resume from {path}: optimizer parameter group {i} "
                f"({c.get('name', '?')}) changed ({', '.join(changed)})"
            )
        for k in ("lr", "initial_lr"):  # the Trainer writes base * schedule factor >= 0
            if k in g and not (_is_number(g[k]) and math.isfinite(g[k]) and g[k] >= 0):
                raise ValueError(
                    f"cannot resume from {path}: optimizer parameter group {i} "
                    f"({c.get('name', '?')}) has {k!r} {_brief(g[k])}, expected a finite "
                    "number >= 0"
                )
    params = {
        pid: p
        for c, live in zip(current, opt.param_groups, strict=True)
        for pid, p in zip(c["params"], live["params"], strict=True)
    }
    ids, extras = meta["optim_state_ids"], meta["optim_state_extra"]
    if not isinstance(ids, list) or not isinstance(extras, dict):
        raise ValueError(
            f"cannot resume from {path}: malformed optimizer state ('optim_state_ids' must "
            "be a list, 'optim_state_extra' an object)"
        )
    state: dict[int, dict[str, Any]] = {}
    for pid in ids:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid not in params:
            raise ValueError(
                f"cannot resume from {path}: malformed optimizer state (state id {pid!r} "
                f"names no parameter; expected ids in [0, {len(params)}))"
            )
        state[pid] = {}
    try:
        for k, v in tensors.items():
            pid_s, name = k.split("/", 1)
            state[int(pid_s)][name] = v
        for pid_s, extra in extras.items():
            if not isinstance(extra, dict):
                raise ValueError(f"the extra state of {pid_s} is not an object")
            state[int(pid_s)].update(extra)
    except (KeyError, ValueError) as e:
        raise ValueError(f"cannot resume from {path}: malformed optimizer state ({e})") from e
    if type(opt).__module__.startswith("torch.optim."):  # torch's own: shapes are known
        for pid, entries in state.items():
            for name, v in entries.items():
                want = _state_shape(name, params[pid].shape)
                if isinstance(v, Tensor) and want is not None and v.shape != want:
                    raise ValueError(
                        f"cannot resume from {path}: optimizer state {name!r} of parameter "
                        f"{pid} has shape {tuple(v.shape)}, expected {tuple(want)} (the "
                        f"parameter's shape is {tuple(params[pid].shape)})"
                    )
                why = _state_value_problem(name, v)
                if why is not None:
                    raise ValueError(
                        f"cannot resume from {path}: optimizer state {name!r} of parameter "
                        f"{pid} {why}"
                    )
    return groups, state


def _fingerprint(*tensors: Tensor) -> str:
    """SHA-256 (hex) of the tensors' dtypes, shapes and bytes: resuming with other data is
    refused. Hashing runs at about 1 GB/s, once per ``fit`` call.

    >>> _fingerprint(torch.zeros(2)) == _fingerprint(torch.zeros(2))
    True
    >>> _fingerprint(torch.zeros(2)) == _fingerprint(torch.zeros(2, dtype=torch.float64))
    False
    """
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().to("cpu").contiguous().reshape(-1)  # (N,)
        h.update(f"{flat.dtype}{tuple(t.shape)};".encode())
        h.update(flat.view(torch.uint8).numpy().data)  # (N * itemsize,) raw bytes, no copy
    return h.hexdigest()


def _latency_model_id(budget: Budget) -> str | None:
    """SHA-256 (hex) of the budget's latency model as JSON with sorted keys (its kind,
    coefficients, batch size, threads, structure and calibration errors), None without one.

    >>> import gatedprune
    >>> net = gatedprune.ShortcutMLP(4, [8], 2)
    >>> _latency_model_id(gatedprune.Budget(net, torch.zeros(1, 4), flops=0.5)) is None
    True
    """
    lm = budget.latency_model
    if lm is None:
        return None
    canonical = json.dumps(
        {"kind": type(lm).__name__, "model": json.loads(lm.to_json())}, sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


_PARAMETER_SHAPED_STATE = frozenset(
    {
        "acc_delta",
        "ax",
        "exp_avg",
        "exp_avg_sq",
        "exp_inf",
        "grad_avg",
        "max_exp_avg_sq",
        "momentum_buffer",
        "prev",
        "square_avg",
        "step_size",
        "sum",
        "variance",
    }
)
"""State tensors torch's optimizers keep in their parameter's shape."""
_SCALAR_STATE = frozenset({"step", "eta", "mu", "mu_product"})
"""State tensors torch's optimizers keep as scalars (shape ``()``)."""
_NON_NEGATIVE_STATE = frozenset(
    {
        "acc_delta",
        "col_var",
        "exp_avg_sq",
        "exp_inf",
        "max_exp_avg_sq",
        "row_var",
        "square_avg",
        "sum",
        "variance",
    }
)
"""State tensors torch's optimizers keep >= 0: running averages of squared gradients (Adam,
AdamW, NAdam, RAdam, RMSprop, Adadelta, Adafactor), Adagrad's sum of them (which starts at
``initial_accumulator_value >= 0``), Adamax's running maximum of their magnitudes."""
_STEP_DTYPES = (torch.float32, torch.float64)
"""The dtypes of torch's ``step`` tensors: float32 (float64 under a float64 default dtype)."""


def _state_shape(name: str, shape: torch.Size) -> torch.Size | None:
    """The shape torch's optimizers give the state tensor ``name`` of a parameter of
    ``shape`` (None: not one they keep per parameter, left unchecked).

    >>> _state_shape("exp_avg", torch.Size([3, 2])), _state_shape("row_var", torch.Size([3, 2]))
    (torch.Size([3, 2]), torch.Size([3, 1]))
    """
    if name in _PARAMETER_SHAPED_STATE:
        return shape
    if name in _SCALAR_STATE:
        return torch.Size([])
    if name in ("row_var", "col_var") and len(shape) >= 2:  # Adafactor's factored moments
        dims = list(shape)
        dims[-1 if name == "row_var" else -2] = 1
        return torch.Size(dims)
    return None


def _check_state_tensors(
    path: Path, what: str, got: Mapping[str, Tensor], expected: Mapping[str, Any]
) -> None:
    """The checkpoint's ``what`` tensors must be those of ``expected`` (a ``state_dict()``):
    the same names, shapes and dtypes (a float16 copy is not silently cast). ``ValueError``
    naming the first tensor that does not fit."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(
            f"cannot resume from {path}: {what} state does not fit (missing {missing[:5]}, "
            f"unexpected {extra[:5]})"
        )
    for name, want in expected.items():
        have = got[name]
        if isinstance(want, Tensor) and (have.shape != want.shape or have.dtype != want.dtype):
            raise ValueError(
                f"cannot resume from {path}: {what} state does not fit: tensor {name!r} is "
                f"{have.dtype} of shape {tuple(have.shape)} in the checkpoint, the {what} holds "
                f"{want.dtype} of shape {tuple(want.shape)}"
            )


def _first_bad(t: Tensor, bad: Tensor) -> str:
    """The first value of ``t`` where the mask ``bad`` (same shape) is set, where it is and how
    many there are, for a message.

    >>> _first_bad(torch.tensor([[1.0, -2.0], [3.0, -4.0]]), torch.tensor([[0, 1], [0, 1]]) > 0)
    '-2.0 at index (0, 1) (2 of 4 values)'
    """
    first = tuple(int(i) for i in bad.nonzero()[0])  # row-major order
    where = f" at index {first}" if first else ""
    return f"{t[first].item()}{where} ({int(bad.sum())} of {t.numel()} values)"


def _invalid_parameter_values(t: Tensor, in_gate: bool) -> Tensor:
    """Mask (same shape as ``t``) of the values a trained parameter cannot hold: NaN anywhere,
    +-inf outside the gates (``Gate.force_`` fixed hard concrete gates at ``log_alpha = +-inf``
    before 2026-12-07). The Trainer writes no checkpoint with one and resumes from none.

    >>> t = torch.tensor([1.0, float("inf"), float("nan")])
    >>> _invalid_parameter_values(t, False).tolist(), _invalid_parameter_values(t, True).tolist()
    ([False, True, True], [False, False, True])
    """
    if not (t.is_floating_point() or t.is_complex()):
        return torch.zeros_like(t, dtype=torch.bool)
    return torch.isnan(t) if in_gate else ~torch.isfinite(t)  # same shape as t


def _check_model_values(path: Path, model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """The checkpoint's model ``state`` holds no value training could not have left:
    parameters by :func:`_invalid_parameter_values`, BatchNorm running statistics (NaN, or a
    negative variance or batch count). Other buffers are not checked (an attention mask may
    hold -inf). ``ValueError`` naming the first bad tensor and value."""
    gate_params = {id(p) for g in gate_modules(model) for p in g.parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):
        t = state.get(name)  # a module's own state_dict may leave a parameter out
        if t is None:
            continue
        bad = _invalid_parameter_values(t, id(p) in gate_params)  # same shape as t
        if bool(bad.any()):
            expected = (
                "no NaN (+-inf is allowed in gate parameters: Gate.force_ wrote it before "
                "2026-12-07)"
                if id(p) in gate_params
                else "finite values"
            )
            raise ValueError(
                f"cannot resume from {path}: model parameter {name!r} holds "
                f"{_first_bad(t, bad)}; expected {expected}"
            )
    for mname, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, nn.modules.batchnorm._NormBase) or not m.track_running_stats:
            continue
        prefix = f"{mname}." if mname else ""
        for stat, expected in (
            ("running_mean", "no NaN"),
            ("running_var", "values >= 0 (a variance), no NaN"),
            ("num_batches_tracked", "a count >= 0"),
        ):
            t = state.get(prefix + stat)
            if t is None or t.is_complex():
                continue
            bad = torch.isnan(t) if t.is_floating_point() else torch.zeros_like(t, dtype=torch.bool)
            if stat != "running_mean":
                bad = bad | (t < 0)  # same shape as t
            if bool(bad.any()):
                raise ValueError(
                    f"cannot resume from {path}: model buffer {prefix + stat!r} "
                    f"({type(m).__name__}) holds {_first_bad(t, bad)}; expected {expected}"
                )


def _check_budget_values(path: Path, budget: Budget, state: Mapping[str, Tensor]) -> None:
    """The checkpoint's budget ``state``: finite Lagrange multipliers (a NaN or inf one makes
    every penalty NaN or inf) and a step count >= 0."""
    for name, _ in budget.named_parameters():
        t = state.get(name)
        if t is None or not (t.is_floating_point() or t.is_complex()):
            continue
        bad = ~torch.isfinite(t)  # same shape as t
        if bool(bad.any()):
            raise ValueError(
                f"cannot resume from {path}: budget multiplier {name!r} holds "
                f"{_first_bad(t, bad)}; expected a finite number"
            )
    step = state.get("step")
    if step is not None and step.numel() == 1 and float(step) < 0:
        raise ValueError(
            f"cannot resume from {path}: budget 'step' is {step.item()}, expected a count >= 0"
        )


def _state_value_problem(name: str, value: object) -> str | None:
    """What is wrong with the value of the state entry ``name`` of one of torch's own
    optimizers (None: nothing): NaN in a tensor; a negative value in one kept >= 0
    (:data:`_NON_NEGATIVE_STATE`); a ``step`` that is not a whole count >= 0, or a tensor of
    another dtype than torch's floating scalar (see :data:`_STEP_DTYPES`).

    >>> _state_value_problem("exp_avg_sq", torch.tensor([0.5, -1.0]))
    'holds -1.0 at index (1,) (1 of 2 values); expected values >= 0 (it accumulates squares)'
    >>> _state_value_problem("step", torch.tensor(3.0)) is None
    True
    """
    if name == "step":
        if isinstance(value, Tensor):
            if value.dtype not in _STEP_DTYPES:
                return (
                    f"is a {value.dtype} tensor, expected torch.float32 (torch.float64 under a "
                    "float64 default dtype): torch's optimizers count steps in a floating scalar"
                )
            if value.numel() != 1:
                return None  # the shape check reports it
            value = value.item()
        if not _is_number(value):
            return f"is {_brief(value)}, expected a whole count of steps >= 0"
        count = float(value)
        if not (math.isfinite(count) and count >= 0 and count.is_integer()):
            return f"is {_brief(value)}, expected a whole count of steps >= 0"
        return None
    if not isinstance(value, Tensor) or not (value.is_floating_point() or value.is_complex()):
        return None
    bad = torch.isnan(value)  # same shape as value
    if bool(bad.any()):
        return f"holds {_first_bad(value, bad)}; expected no NaN"
    if name in _NON_NEGATIVE_STATE:
        real = torch.view_as_real(value) if value.is_complex() else value  # (..., 2) if complex
        bad = real < 0  # same shape as real
        if bool(bad.any()):
            return f"holds {_first_bad(real, bad)}; expected values >= 0 (it accumulates squares)"
    return None


def _brief(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters for a message.

    >>> _brief(list(range(30)), 20)
    '[0, 1, 2, 3, 4, 5, 6...'
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _checked_records(path: Path, field: str, value: object) -> list[Record]:
    """A checkpoint's ``history`` or ``trace``: a list of records (objects whose values are
    numbers or null), or ``ValueError`` naming the first bad entry."""
    if not isinstance(value, list):
        raise ValueError(
            f"cannot resume from {path}: {field!r} is {_brief(value)}, expected a list of records"
        )
    for i, rec in enumerate(value):
        if not isinstance(rec, dict):
            raise ValueError(
                f"cannot resume from {path}: {field}[{i}] is {_brief(rec)}, expected a record "
                "(an object of numbers)"
            )
        for k, v in rec.items():
            if v is not None and not _is_number(v):
                raise ValueError(
                    f"cannot resume from {path}: {field}[{i}][{k!r}] is {_brief(v)}, expected a "
                    "number or null"
                )
    return [dict(rec) for rec in value]


def _check_counters(
    path: Path, step: int, spe: int, history: list[Record], trace: list[Record]
) -> None:
    """``history`` and ``trace`` against the checkpoint's ``step`` (``spe`` steps per epoch):
    one history record per finished epoch (``step // spe``), record ``i`` of epoch ``i + 1``
    ending at step ``(i + 1) * spe``; trace points at steps rising within ``[1, step]``, each
    of the epoch holding its step."""
    epochs = step // spe
    if len(history) != epochs:
        raise ValueError(
            f"cannot resume from {path}: 'history' holds {len(history)} records at step {step}, "
            f"expected {epochs} (one per finished epoch of {spe} steps)"
        )
    for i, rec in enumerate(history):
        for key, want in (("epoch", i + 1), ("step", (i + 1) * spe)):
            if rec.get(key) != want or isinstance(rec.get(key), bool):
                raise ValueError(
                    f"cannot resume from {path}: history[{i}][{key!r}] is "
                    f"{_brief(rec.get(key))}, expected {want} (epoch {i + 1} of {spe} steps)"
                )
    last = 0
    for i, rec in enumerate(trace):
        at = rec.get("step")
        if not isinstance(at, int) or isinstance(at, bool) or not last < at <= step:
            raise ValueError(
                f"cannot resume from {path}: trace[{i}]['step'] is {_brief(at)}, expected an int "
                f"in [{last + 1}, {step}] (after the trace point before, at most the "
                "checkpoint's step)"
            )
        epoch = (at - 1) // spe + 1
        if rec.get("epoch") != epoch or isinstance(rec.get("epoch"), bool):
            raise ValueError(
                f"cannot resume from {path}: trace[{i}]['epoch'] is {_brief(rec.get('epoch'))}, "
                f"expected {epoch} (the epoch of step {at}, {spe} steps per epoch)"
            )
        last = at


def _sums_problem(values: Mapping[str, float]) -> str | None:
    """What is wrong with one rank's running epoch sums (None: nothing): NaN (a non-finite
    loss stops training before it is added), a count that is not a whole number >= 0, a
    time that is not a finite number >= 0.

    >>> _sums_problem({"loss": 3.5, "count": -2.0})
    "'count' is -2.0, expected a whole number of samples >= 0"
    """
    for k, v in values.items():
        if math.isnan(v):
            return f"{k!r} is NaN, expected a number"
        if k == "count" and not (math.isfinite(v) and v >= 0 and v.is_integer()):
            return f"'count' is {v!r}, expected a whole number of samples >= 0"
        if k == "time" and not (math.isfinite(v) and v >= 0):
            return f"'time' is {v!r}, expected a finite number of seconds >= 0"
    return None


def _checked_stats(
    path: Path, stats: object, per_rank: object, world: int, rank: int, done: int
) -> dict[str, float]:
    """This rank's running epoch sums from a checkpoint's ``stats`` (every key of
    ``_STAT_KEYS`` and ``time``, numbers) and ``rank_stats`` (None, or a list of
    ``len(_STAT_KEYS)`` numbers per rank of the run that wrote it), whose counts add up to
    ``done``, the samples of the epoch's steps so far (with ``rank_stats``; without, rank 0's
    alone is at most that)."""
    keys = (*_STAT_KEYS, "time")
    if not isinstance(stats, dict) or not all(_is_number(stats.get(k)) for k in keys):
        raise ValueError(
            f"cannot resume from {path}: 'stats' is {_brief(stats)}, expected an object with the "
            f"numbers {list(keys)}"
        )
    out = {k: float(stats[k]) for k in keys}
    why = _sums_problem(out)
    if why is not None:
        raise ValueError(f"cannot resume from {path}: 'stats': {why}")
    if per_rank is None:
        if out["count"] > done:
            raise ValueError(
                f"cannot resume from {path}: 'stats': 'count' is {out['count']!r}, expected at "
                f"most {done} (the samples of the epoch's steps so far)"
            )
        return out
    if not isinstance(per_rank, list) or not all(
        isinstance(r, list) and len(r) == len(_STAT_KEYS) and all(map(_is_number, r))
        for r in per_rank
    ):
        raise ValueError(
            f"cannot resume from {path}: 'rank_stats' is {_brief(per_rank)}, expected a list of "
            f"{len(_STAT_KEYS)} numbers per rank"
        )
    for r, sums in enumerate(per_rank):
        why = _sums_problem(dict(zip(_STAT_KEYS, map(float, sums), strict=True)))
        if why is not None:
            raise ValueError(f"cannot resume from {path}: 'rank_stats' of rank {r}: {why}")
    counted = math.fsum(float(r[_STAT_KEYS.index("count")]) for r in per_rank)
    if counted != done:
        raise ValueError(
            f"cannot resume from {path}: the ranks' counts in 'rank_stats' add up to {counted:g} "
            f"samples, expected {done} (the samples of the epoch's steps so far)"
        )
    if len(per_rank) == world:
        out.update(zip(_STAT_KEYS, map(float, per_rank[rank]), strict=True))
    else:  # another world size: rank 0 carries the sums
        sums = [math.fsum(float(r[i]) for r in per_rank) for i in range(len(_STAT_KEYS))]
        out.update(zip(_STAT_KEYS, sums if rank == 0 else [0.0] * 4, strict=True))
    return out


def _checked_achieved(path: Path, value: object, budget: Budget | None) -> dict[str, float] | None:
    """A checkpoint's ``achieved_before_snap``: null, or (with a budget) an object holding a
    finite number >= 0 (a cost fraction) for each of the budget's targets."""
    if value is None:
        return None
    targets = sorted(budget.targets) if budget is not None else []
    if (
        budget is None
        or not isinstance(value, dict)
        or sorted(value) != targets
        or not all(_is_number(v) and math.isfinite(v) and v >= 0 for v in value.values())
    ):
        expected = (
            "null (no budget)"
            if budget is None
            else f"null or numbers for {targets} (cost fractions: finite, >= 0)"
        )
        raise ValueError(
            f"cannot resume from {path}: 'achieved_before_snap' is {_brief(value)}, expected "
            f"{expected}"
        )
    return {k: float(v) for k, v in value.items()}


def _short(value: Any) -> Any:
    """A data fingerprint shortened for an error message (other values as they are)."""
    return f"sha256 {value[:12]}..." if isinstance(value, str) and len(value) == 64 else value
