"""``gatedprune demo``: grow and prune a shortcut CNN on MNIST-1D, end to end.

Generates MNIST-1D offline, trains a :class:`~gatedprune.ShortcutConv1d` under a FLOPs budget,
prunes it, checks that the pruned model computes the same function, fine-tunes it briefly,
measures latency and writes ``results.json``, the saved pruned model and PNG plots.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from .budget import Budget
from .calibrate import recalibrate_batchnorm
from .costs import Cost, cost
from .gates import HardConcrete, gate_modules
from .gating.latency import GatedLatencyModel
from .io import atomic_write, folder_problem
from .latency import LatencyModel
from .layout import check_flag
from .plain import PlainShortcutNet
from .profiling import allocator_setting, compare_latency
from .prune import prune
from .shortcut import ShortcutConv1d

if TYPE_CHECKING:
    from .data import Splits
    from .train import Trainer

__all__ = ["DemoConfig", "run_demo"]

# The all-open network: 6 conv layers in 3 resolution stages, every layer reading every
# earlier one, a head reading every layer; ~5.9 MFLOPs per MNIST-1D sample.
STAGES = ((32, 32), (64, 64), (64, 64))

# Label smoothing of the demos' classification loss. Plain cross-entropy grows the logits of a
# well-fitted MNIST-1D net to 55-75, and float32 rounding of any evaluation of such a net is
# ~1.3e-5 (measured against float64: the gated model's own error, not pruning's), above the
# 1e-5 exactness criterion. Smoothing by 0.01 bounds the logit margins (~log(0.991 * 9 /
# 0.001) = 9): bench.demo measures logits up to 21 and pruned vs gated 4.8e-6 on fresh random
# inputs, at unchanged accuracy. 0.1 bounds them more tightly but cost 12 points of accuracy
# under a 10% budget in ad hoc runs.
LABEL_SMOOTHING = 0.01


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (the CLI flags)."""

    budget: float = 0.1
    epochs: int = 30
    finetune_epochs: int = 5
    seed: int = 0
    out: Path = Path("gatedprune-demo")
    progress: bool = True
    num_samples: int = 5000
    round_to: int | None = None  # snapped widths rounded to multiples (snap_to_budget)
    latency: bool = False  # conv/resnet1d: ``budget`` is a fraction of the predicted latency
    unit_group: int = 1  # conv: channels gated in groups of this many (divides 32)
    latency_ratio: float | None = None  # conv: also a latency budget of ``budget / ratio``

    def refuse_conv_options(self) -> None:
        """The resnet1d and lstm demos: ``unit_group`` and ``latency_ratio`` are conv-only
        (a ``ValueError`` naming them when set)."""
        if self.unit_group != 1 or self.latency_ratio is not None:
            raise ValueError(
                f"unit_group={self.unit_group!r} and latency_ratio={self.latency_ratio!r}: "
                "--unit-group and --latency-ratio apply to the conv demo (--model conv) only"
            )

    def validate(self) -> None:
        """Check every field before any work: a ``TypeError`` for a value of the wrong type,
        a ``ValueError`` for one out of range, each naming the field and the value."""
        from .train import MAX_SEED

        def number(name: str, value: object, kinds: tuple[type, ...], what: str) -> None:
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise TypeError(f"{name} must be {what}, got {value!r}")

        number("--budget", self.budget, (int, float), "a number in (0, 1]")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"--budget must be a fraction in (0, 1], got {self.budget!r}")
        number("--epochs", self.epochs, (int,), "an int >= 1")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs!r}")
        number("--finetune-epochs", self.finetune_epochs, (int,), "an int >= 0")
        if self.finetune_epochs < 0:
            raise ValueError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs!r}")
        number("--seed", self.seed, (int,), "an int in [0, 2**63 - 1)")
        if not 0 <= self.seed < MAX_SEED - 1:  # the fine-tuning seeds its Trainer with seed + 1
            raise ValueError(
                f"--seed must be an int in [0, 2**63 - 1) (the fine-tuning uses seed + 1), "
                f"got {self.seed!r}"
            )
        number("num_samples", self.num_samples, (int,), "an int >= 10, a multiple of 10")
        if self.num_samples < 10 or self.num_samples % 10:
            raise ValueError(
                f"num_samples must be an int >= 10 and a multiple of 10, got {self.num_samples!r}"
            )
        if self.round_to is not None:
            number("--round-to", self.round_to, (int,), "an int >= 1 or None")
            if self.round_to < 1:
                raise ValueError(f"--round-to must be >= 1, got {self.round_to!r}")
        check_flag("latency", self.latency)
        check_flag("progress", self.progress)
        number("--unit-group", self.unit_group, (int,), "an int dividing 32 (1, 2, 4, ..., 32)")
        if self.unit_group < 1 or 32 % self.unit_group:
            raise ValueError(
                f"--unit-group must divide every demo layer's width (32 and 64): one of 1, 2, "
                f"4, 8, 16, 32, got {self.unit_group!r}"
            )
        if self.round_to is not None and self.round_to % self.unit_group:
            raise ValueError(
                f"--round-to must be a multiple of --unit-group {self.unit_group} (channels are "
                f"gated, so kept, in groups of {self.unit_group}), got {self.round_to!r}"
            )
        if self.latency_ratio is not None:
            number("--latency-ratio", self.latency_ratio, (int, float), "a number in (0, 1]")
            if not 0.0 < self.latency_ratio <= 1.0:
                raise ValueError(
                    f"--latency-ratio must be a fraction in (0, 1], got {self.latency_ratio!r}"
                )
            if self.latency:
                raise ValueError(
                    "--latency-ratio adds a latency budget next to the FLOPs budget; --latency "
                    "makes --budget a latency fraction instead: give one of them"
                )
        if not isinstance(self.out, str | os.PathLike):
            raise TypeError(f"out must be a folder path, got {self.out!r}")
        if not str(self.out).strip():
            raise ValueError(f"out must be a folder path, got {self.out!r}")
        why = folder_problem(Path(self.out))
        if why is not None:
            raise ValueError(f"out: {why}")


def classification_loss() -> nn.Module:
    """The demos' training loss: cross-entropy on class indices with ``LABEL_SMOOTHING``.

    >>> loss = classification_loss()
    >>> round(loss(torch.zeros(1, 10), torch.tensor([0])).item(), 4)  # uniform: log(10)
    2.3026
    >>> loss(torch.tensor([[50.0] + [0.0] * 9]), torch.tensor([0])).item() > 0.4  # over-confident
    True
    """
    return nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` in eval mode (mode restored)."""
    was = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(was)


def all_open_copy(model: nn.Module) -> nn.Module:
    """A copy of a gated model with every gate forced open (its architecture at full cost)."""
    dense = copy.deepcopy(model)
    for g in gate_modules(dense):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    return dense


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: Tensor, *, dtype: torch.dtype) -> float:
    """Max |a(x) - b(x)| in eval mode, computed in ``dtype`` on copies."""
    a2 = copy.deepcopy(a).to(dtype).eval()
    b2 = copy.deepcopy(b).to(dtype).eval()
    xx = x.to(dtype)
    return float((a2(xx) - b2(xx)).abs().max())


@torch.no_grad()
def float64_diff(net: nn.Module, inputs: Sequence[Tensor]) -> float:
    """Max |gated - pruned| over ``inputs`` with both the gated model and its pruning in float64
    (pruning a float32 model rounds what it folds, e.g. the constant a layer without open inputs
    feeds its consumers, to float32; in float64 the check shows the function itself is equal).
    """
    n64 = copy.deepcopy(net).double().eval()
    p64 = prune(n64).eval()
    return max(float((n64(x.double()) - p64(x.double())).abs().max()) for x in inputs)


@dataclass
class PruneOutcome:
    """What :func:`prune_check_finetune` returns: the pruned and fine-tuned models, the
    pruned-vs-gated differences, the largest output magnitude, accuracies and prune time.
    ``diffs`` are the largest over fresh random inputs and the test set; ``random_diff`` is the
    float32 difference on the fresh random inputs alone (the exactness criterion's inputs)."""

    pruned: nn.Module
    finetuned: nn.Module
    diffs: tuple[float, float]  # float32, float64
    random_diff: float
    scale: float
    accuracies: tuple[float, float, float]  # gated, pruned, fine-tuned
    prune_seconds: float


def prune_check_finetune(
    net: nn.Module,
    data: Splits,
    config: DemoConfig,
    *,
    accuracy_fn: Callable[[nn.Module, Tensor, Tensor], float] = accuracy,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> PruneOutcome:
    """The demos' shared middle: prune the trained gated ``net``, check pruned == gated in eval
    mode on fresh random inputs and the test set (float32 and float64), then fine-tune a copy
    of the pruned model for ``config.finetune_epochs`` (lr 1e-3) with ``loss_fn``
    (:func:`classification_loss` by default)."""
    from .train import Trainer

    net.eval()
    t0 = time.perf_counter()
    pruned = prune(net).eval()
    prune_seconds = time.perf_counter() - t0
    x_train, x_test, y_test = data.x_train, data.x_test, data.y_test
    probe = torch.randn(256, *x_train.shape[1:])  # fresh random inputs, shaped like the data
    random32 = max_abs_diff(net, pruned, probe, dtype=torch.float32)
    diff32 = max(random32, max_abs_diff(net, pruned, x_test, dtype=torch.float32))
    diff64 = float64_diff(net, [probe, x_test])
    with torch.no_grad():
        scale = max(float(net(x).abs().max()) for x in (probe, x_test))  # largest |output|
    acc_gated = accuracy_fn(net, x_test, y_test)
    acc_pruned = accuracy_fn(pruned, x_test, y_test)
    finetuned = copy.deepcopy(pruned)
    if config.finetune_epochs > 0:
        Trainer(
            finetuned,
            loss_fn=loss_fn if loss_fn is not None else classification_loss(),
            epochs=config.finetune_epochs,
            batch_size=100,
            lr=1e-3,
            weight_decay=1e-4,
            seed=config.seed + 1,
            progress=config.progress,
        ).fit(train=(x_train, data.y_train))
    finetuned.eval()
    acc_finetuned = accuracy_fn(finetuned, x_test, y_test)
    return PruneOutcome(
        pruned,
        finetuned,
        (diff32, diff64),
        random32,
        scale,
        (acc_gated, acc_pruned, acc_finetuned),
        prune_seconds,
    )


def start_demo(config: DemoConfig) -> tuple[Path, Callable[..., None], float]:
    """Validate ``config``, check that the plots can be drawn (matplotlib: before training, not
    after), create its output folder, remove a ``results.json`` left there by an earlier run
    (it is written last, so one that is present always describes the files next to it, never
    a run that stopped early) and seed torch: (folder, print function (silent without
    ``progress``), start time)."""
    from .plots import require_matplotlib

    config.validate()
    require_matplotlib()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)
    torch.manual_seed(config.seed)
    return out, (print if config.progress else lambda *a, **k: None), time.perf_counter()


def measure_demo_latency(models: Mapping[str, nn.Module], x: Tensor) -> dict[str, dict[int, float]]:
    """Median latency in seconds of each model at batch 1 and 256 (the first rows of ``x``,
    repeated when ``x`` has fewer), measured in interleaved rounds with the current thread
    count: ``lat[name][batch]``."""
    threads = torch.get_num_threads()
    lat: dict[str, dict[int, float]] = {}
    for batch in (1, 256):
        for name, t in _time_at(models, x, batch, threads).items():
            lat.setdefault(name, {})[batch] = t
    return lat


def _time_at(
    models: Mapping[str, nn.Module], x: Tensor, batch: int, threads: int
) -> dict[str, float]:
    """The demos' timing: median seconds per model at ``batch`` rows of ``x`` (its rows
    repeated when it has fewer) on ``threads`` threads, in interleaved rounds."""
    rows = x[:batch]
    if len(rows) < batch:  # a small test set: repeat its rows up to the batch size
        # (batch, *x.shape[1:])
        rows = rows.repeat(-(-batch // len(rows)), *([1] * (x.dim() - 1)))[:batch]
    return compare_latency(models, rows, rounds=7, repeats=20 if batch == 1 else 3, threads=threads)


def measured_latency_fraction(
    dense: nn.Module, pruned: nn.Module, x: Tensor, *, batch: int, threads: int
) -> float:
    """Median latency of ``pruned`` over ``dense`` at ``batch`` rows of ``x`` on ``threads``
    threads, timed in interleaved rounds: the measured counterpart of a latency model's
    predicted fraction, on the batch size and threads the model was calibrated for (small
    pruned networks gain less from a second thread than the dense one, so a fraction measured
    on more threads is not comparable with the prediction).

    >>> net = torch.nn.Linear(4, 2)
    >>> 0.0 < measured_latency_fraction(net, net, torch.zeros(3, 4), batch=8, threads=1)
    True
    """
    times = _time_at({"dense": dense, "pruned": pruned}, x, batch, threads)
    return times["pruned"] / times["dense"]


def run_facts(
    lat: Mapping[str, Mapping[int, float]],
    outcome: PruneOutcome,
    *,
    train_s: float,
    t_start: float,
) -> dict[str, Any]:
    """The results.json entries every demo shares: speed-ups of ``"pruned"`` over ``"dense"``,
    latencies in ms, the pruned-vs-gated differences (float32, float64), the accuracies
    (gated, pruned, fine-tuned), wall times and where it ran."""
    diff32, diff64 = outcome.diffs
    acc_gated, acc_pruned, acc_finetuned = outcome.accuracies
    return {
        "max_abs_diff_float32": diff32,
        "max_abs_diff_float32_random": outcome.random_diff,
        "max_abs_diff_float64": diff64,
        "max_abs_logit": outcome.scale,
        "max_rel_diff_float32": diff32 / outcome.scale,
        "accuracy_gated": acc_gated,
        "accuracy_pruned": acc_pruned,
        "accuracy_pruned_finetuned": acc_finetuned,
        "speedup_b1": lat["dense"][1] / lat["pruned"][1],
        "speedup_b256": lat["dense"][256] / lat["pruned"][256],
        "latency_ms": {k: {str(b): 1e3 * t for b, t in v.items()} for k, v in lat.items()},
        "train_seconds": train_s,
        "prune_seconds": outcome.prune_seconds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "allocator": allocator_setting(),
        "machine": platform.machine(),
        "total_seconds": time.perf_counter() - t_start,
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON atomically (:func:`gatedprune.io.atomic_write`: a uniquely named
    temporary file renamed into place; a symbolic link stays a link)."""
    atomic_write(Path(path), json.dumps(data, indent=2).encode())


def result_rows(
    c_dense: Cost,
    c_pruned: Cost,
    lat: dict[str, dict[int, float]],
    accuracies: tuple[float, float, float],
) -> list[dict[str, Any]]:
    """The demo table's rows: all-open, gated, pruned and fine-tuned models (shared by the
    demos). ``lat[name][batch]`` in seconds for ``"dense"`` and ``"pruned"``; accuracies of
    the gated, pruned and fine-tuned models."""
    acc_gated, acc_pruned, acc_finetuned = accuracies
    return [
        {
            "model": "all-open (dense architecture)",
            "params": c_dense.params,
            "flops": c_dense.flops,
            "latency_b1_ms": 1e3 * lat["dense"][1],
            "latency_b256_ms": 1e3 * lat["dense"][256],
            "accuracy": None,
        },
        {
            "model": "gated (trained, eval mode)",
            "params": c_dense.params,
            "flops": c_dense.flops,
            "accuracy": acc_gated,
        },
        {
            "model": "pruned (no fine-tuning)",
            "params": c_pruned.params,
            "flops": c_pruned.flops,
            "accuracy": acc_pruned,
        },
        {
            "model": "pruned + fine-tuned",
            "params": c_pruned.params,
            "flops": c_pruned.flops,
            "latency_b1_ms": 1e3 * lat["pruned"][1],
            "latency_b256_ms": 1e3 * lat["pruned"][256],
            "accuracy": acc_finetuned,
        },
    ]


def _as_plain(model: nn.Module) -> PlainShortcutNet:
    if not isinstance(model, PlainShortcutNet):
        raise TypeError(f"expected a PlainShortcutNet, got {type(model).__name__}")
    return model


def _plain_cost(model: nn.Module, x: Tensor) -> Cost:
    c = cost(model, x)
    if not isinstance(c, Cost):
        raise TypeError(f"expected a plain model without gates, got {type(model).__name__}")
    return c


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "params", "FLOPs", "lat b=1 (ms)", "lat b=256 (ms)", "test acc"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(
            " | ".join(
                [
                    r["model"],
                    f"{r['params']:,}",
                    f"{r['flops']:,}",
                    "-" if r.get("latency_b1_ms") is None else f"{r['latency_b1_ms']:.3f}",
                    "-" if r.get("latency_b256_ms") is None else f"{r['latency_b256_ms']:.2f}",
                    "-" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}%",
                ]
            )
        )
    return "\n".join(lines)


def build_demo_model(input_length: int = 40, unit_group: int = 1) -> ShortcutConv1d:
    """The demo's all-open network (``STAGES`` channels, kernel 5, head pooled to 5);
    ``unit_group`` gates channels in groups of that many (see :class:`ShortcutConv1d`).

    >>> build_demo_model(unit_group=16).layers[0].unit_gate.n_groups
    2
    """
    return ShortcutConv1d(
        1,
        [list(s) for s in STAGES],
        10,
        kernel_size=5,
        head_pool=5,
        input_length=input_length,
        gate=HardConcrete(init_drop=0.05),
        unit_group=unit_group,
    )


def _adamw_fast_multipliers(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW whose Lagrange-multiplier group forgets old gradient scales quickly (beta2 = 0.9),
    so the multipliers react within tens of steps when the cost crosses the target."""
    return torch.optim.AdamW(
        [{**g, "betas": (0.9, 0.9)} if g.get("name") == "budget" else g for g in groups]
    )


def gate_lr_for(warmup_steps: int, distance: float = 16.0, floor: float = 1e-2) -> float:
    """Gate learning rate that lets Adam move a gate's log-alpha by ``distance`` within the
    target warm-up. From the open init (2.9) to exactly closed (-2.4) is ~5.4; Adam moves a
    parameter by at most about its learning rate per step, so at ``distance=5.4`` no gate could
    close before the warm-up ended, the multipliers wound up meanwhile, and then all gates
    crossed together (MNIST-1D at 10%: the cost fell from 0.56 to 0.15 in two epochs and one
    seed in three collapsed to 82%). Three times that distance lets the gates follow the target;
    the Budget's anti-windup keeps them from overshooting it.

    >>> gate_lr_for(96) > gate_lr_for(10000) == 1e-2
    True
    """
    return max(floor, distance / max(1, warmup_steps))


DELAY = 0.1
"""Fraction of the demo recipe's steps trained without budget pressure."""
WARMUP = 0.4
"""Fraction of the steps over which the target then falls from 1.0 to the budget."""
SNAP_AT = 0.6
"""Fraction of the steps after which the architecture is fixed and fine-tuned."""
EDGE_LR_FACTOR = 0.25
"""The conv demo's shortcut-edge and read-out gates learn at this fraction of the unit gates'
rate, so a layer's fan-out shrinks through its channels before its edges close (see the
README: without it all outgoing edges of a full-resolution layer can close in one epoch)."""


LATENCY_MODEL_FILE = "latency_model.json"

_LM = TypeVar("_LM", LatencyModel, GatedLatencyModel)


def run_latency_model(folder: Path | None, calibrate: Callable[[], _LM]) -> _LM:
    """A run's latency model: calibrated afresh (the demos never resume, so a file an earlier
    run left, possibly for another model, configuration or machine, is never read), then
    written atomically to ``folder / LATENCY_MODEL_FILE``, replacing an earlier run's, as the
    record of the model this run's checkpoints train with (``folder`` None: not written).

    >>> import tempfile
    >>> calls = []
    >>> def fit() -> GatedLatencyModel:
    ...     calls.append(1)
    ...     return GatedLatencyModel((0.1, 0.01, 1e-8 * len(calls)), 1, 1, (1, 1, 40), "k", 0, 0, 8)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     a = run_latency_model(Path(d), fit)
    ...     b = run_latency_model(Path(d), fit)
    ...     kept = GatedLatencyModel.from_json((Path(d) / LATENCY_MODEL_FILE).read_text())
    >>> a != b and kept == b and len(calls)
    2
    """
    lm = calibrate()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / LATENCY_MODEL_FILE, lm.to_json().encode())
    return lm


def budget_trainer(
    net: nn.Module,
    data: Splits,
    *,
    flops: float | None = None,
    params: float | None = None,
    epochs: int,
    seed: int,
    checkpoint_dir: Path | None = None,
    progress: bool = False,
    metrics_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    budget: Budget | None = None,
    round_to: int | None = None,
    edge_lr_factor: float | None = None,
    latency: float | None = None,
    latency_model: LatencyModel | GatedLatencyModel | None = None,
) -> Trainer:
    """The demos' training recipe for a gated ``net`` under a FLOPs and/or parameter budget.

    The first ``DELAY`` (10%) of the steps have no budget pressure (the network learns what its
    connections are worth: gates pushed from step 0 close by cost, not by use); the target then
    falls from 1.0 to ``flops`` over the next ``WARMUP`` (40%), with a gate learning rate that
    lets the gates follow it (:func:`gate_lr_for`); at ``SNAP_AT`` (60%) the gates are snapped
    to the budget (Trainer ``snap_at``) and the last 40% fine-tune the final architecture with
    the learning rate rewound (:func:`gatedprune.train.rewound_cosine_lr`), as long as the
    prune-then-fine-tune baselines fine-tune. The budget uses hard (achieved) costs with
    straight-through gradients, so the Lagrangian steers the cost that
    pruning will really achieve. AdamW, lr 1e-2 with cosine decay, batch 100; ``loss_fn``
    defaults to :func:`classification_loss`. A prebuilt ``budget`` (e.g. a fixed-penalty
    ablation) replaces the Lagrangian one. ``round_to`` rounds the snapped widths to
    multiples of it (:func:`gatedprune.snap_to_budget`). ``edge_lr_factor`` scales the
    learning rate of the gates that are not unit/channel gates (Trainer ``edge_gate_lr``;
    ``None``: one gate learning rate). ``latency`` with ``latency_model`` adds a latency
    budget (:class:`gatedprune.LatencyModel`, or :class:`gatedprune.GatedLatencyModel` for a
    model gated with ``gate_``); next to a FLOPs budget it is a ceiling only, and the snap
    brings the FLOPs within its tolerance (``snap_primary="flops"``).

    >>> from gatedprune.data import mnist1d
    >>> data = mnist1d()
    >>> trainer = budget_trainer(build_demo_model(), data, flops=0.1, epochs=30, seed=0)
    >>> trainer.fit(train=(data.x_train, data.y_train))  # doctest: +SKIP
    """
    from .train import Trainer, rewound_cosine_lr

    steps_per_epoch = -(-len(data.x_train) // 100)
    total = epochs * steps_per_epoch
    delay, warmup = int(DELAY * total), int(WARMUP * total)
    example = data.x_train[:1]  # one sample: costs are per sample
    b = (
        budget
        if budget is not None
        else Budget(
            net,
            example,
            flops=flops,
            params=params,
            latency=latency,
            latency_model=latency_model,
            warmup_steps=warmup,
            delay_steps=delay,
        )
    )
    gate_lr = gate_lr_for(warmup)
    return Trainer(
        net,
        budget=b,
        epochs=epochs,
        batch_size=100,
        lr=1e-2,
        gate_lr=gate_lr,
        edge_gate_lr=None if edge_lr_factor is None else gate_lr * edge_lr_factor,
        budget_lr=5e-2,
        weight_decay=1e-4,
        straight_through_at=0.0,
        snap_at=SNAP_AT,
        snap_round_to=round_to,
        # a latency budget next to a FLOPs one is a ceiling: the FLOPs target is the one met
        snap_primary="flops" if "flops" in b.targets and "latency" in b.targets else None,
        lr_schedule=rewound_cosine_lr(SNAP_AT),
        optimizer=_adamw_fast_multipliers,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        metrics_fn=metrics_fn,
        loss_fn=loss_fn if loss_fn is not None else classification_loss(),
    )


def train_demo_model(
    data: Splits,
    *,
    budget: float | None,
    epochs: int,
    seed: int,
    checkpoint_dir: Path | None = None,
    progress: bool = False,
    unit_group: int = 1,
    round_to: int | None = None,
    edge_lr_factor: float | None = EDGE_LR_FACTOR,
    latency: float | None = None,
    latency_model: LatencyModel | None = None,
) -> tuple[ShortcutConv1d, Trainer]:
    """Train the demo network under a FLOPs budget (:func:`budget_trainer`, the recipe shared by
    the demos and benchmarks); BatchNorm statistics are re-estimated for the final eval-mode
    gates. ``unit_group``: see :func:`build_demo_model`; ``round_to``: see
    :func:`budget_trainer`. Edge and read-out gates learn at ``edge_lr_factor`` times the unit
    gates' rate (default ``EDGE_LR_FACTOR``; ``None``: one gate rate, the recipe before
    ``bench.collapse`` measured the difference). ``budget`` is the FLOPs fraction (``None``:
    none); ``latency`` with ``latency_model`` (calibrated on ``build_demo_model()``) adds a
    latency budget."""
    torch.manual_seed(seed)
    x_train, y_train = data.x_train, data.y_train
    net = build_demo_model(x_train.shape[-1], unit_group)
    calib = [x_train[i : i + 500] for i in range(0, min(len(x_train), 2000), 500)]

    def val_metrics(model: nn.Module) -> dict[str, float]:
        recalibrate_batchnorm(model, calib)
        return {"val_accuracy_calibrated": accuracy(model, data.x_test, data.y_test)}

    trainer = budget_trainer(
        net,
        data,
        flops=budget,
        epochs=epochs,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        metrics_fn=val_metrics,
        round_to=round_to,
        edge_lr_factor=edge_lr_factor,
        latency=latency,
        latency_model=latency_model,
    )
    trainer.fit(train=(x_train, y_train), val=(data.x_test, data.y_test))
    recalibrate_batchnorm(net, calib)
    return net, trainer


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo and return the results written to ``config.out / 'results.json'``.

    >>> results = run_demo(DemoConfig(epochs=1, finetune_epochs=0))  # doctest: +SKIP
    """
    from . import io
    from .data import mnist1d
    from .plots import plot_connectivity, plot_training, plot_widths

    out, say, t_start = start_demo(config)

    data = mnist1d(num_samples=config.num_samples)
    x_train, x_test = data.x_train, data.x_test
    say(f"MNIST-1D generated offline: {len(x_train)} train / {len(x_test)} test, length 40")
    example = x_train[:1]  # (1, 1, 40): costs are per sample

    t0 = time.perf_counter()
    lm: LatencyModel | None = None
    group = config.unit_group
    ratio = config.latency_ratio
    # a latency budget: the whole budget (--latency), or budget / ratio next to the FLOPs one
    latency_target = (
        config.budget
        if config.latency
        else None
        if ratio is None
        else min(1.0, config.budget / ratio)
    )
    if latency_target is not None:
        lm = run_latency_model(
            out / "checkpoints",
            lambda: LatencyModel.calibrate(
                build_demo_model(unit_group=group), example, batch_size=256, threads=1
            ),
        )
        say(
            f"latency model calibrated on {lm.samples} pruned copies at batch 256, 1 thread: "
            f"held-out error median {100 * lm.median_error:.1f}%, max {100 * lm.max_error:.1f}%"
        )
    net, trainer = train_demo_model(
        data,
        budget=None if config.latency else config.budget,
        latency=latency_target,
        latency_model=lm,
        epochs=config.epochs,
        seed=config.seed,
        checkpoint_dir=out / "checkpoints",
        progress=config.progress,
        round_to=config.round_to,
        unit_group=group,
    )
    train_seconds = time.perf_counter() - t0
    r = prune_check_finetune(net, data, config)
    pruned, finetuned, (diff32, diff64), scale = r.pruned, r.finetuned, r.diffs, r.scale
    acc_gated, acc_pruned, acc_finetuned = r.accuracies

    dense_plain = prune(all_open_copy(net)).eval()
    c_dense = _plain_cost(dense_plain, example)
    c_pruned = _plain_cost(pruned, example)
    models = {
        "dense": dense_plain,
        "pruned": finetuned,
        "dense_folded": _as_plain(dense_plain).fold_batchnorm().eval(),
        "pruned_folded": _as_plain(finetuned).fold_batchnorm().eval(),
    }
    lat = measure_demo_latency(models, x_test)

    conn = net.connectivity()
    io.save(finetuned, out / "pruned.safetensors")
    plot_connectivity(conn, out / "connectivity.png")
    plot_widths(conn, out / "widths.png")
    plot_training(trainer.trace, out / "training.png", target=config.budget)

    rows = result_rows(c_dense, c_pruned, lat, (acc_gated, acc_pruned, acc_finetuned))
    achieved_flops = c_pruned.flops / c_dense.flops
    kind = "latency" if config.latency else "flops"
    achieved = achieved_flops
    latency_facts: dict[str, Any] = {}
    if lm is not None:
        predicted = lm.predict(_as_plain(finetuned)) / lm.predict(_as_plain(dense_plain))
        achieved = predicted if config.latency else achieved_flops
        measured = measured_latency_fraction(
            dense_plain, finetuned, x_test, batch=lm.batch_size, threads=lm.threads
        )
        latency_facts = {
            "target_latency_fraction": latency_target,
            "predicted_latency_fraction": predicted,
            # on the model's batch size (256) and threads, as the prediction
            "measured_latency_fraction_b256": measured,
            "measured_latency_threads": lm.threads,
            "measured_latency_fraction_b256_all_threads": lat["pruned"][256] / lat["dense"][256],
            "latency_ratio_b256_model_threads": achieved_flops / measured,
            "latency_model": json.loads(lm.to_json()),
        }
    results: dict[str, Any] = {
        "config": {
            "model": "conv",
            "budget": config.budget,
            "budget_kind": kind,
            "epochs": config.epochs,
            "round_to": config.round_to,
            "unit_group": group,
            "latency_ratio": ratio,
            "finetune_epochs": config.finetune_epochs,
            "seed": config.seed,
            "num_samples": config.num_samples,
            "stages": [list(s) for s in STAGES],
        },
        "rows": rows,
        f"target_{kind}_fraction": config.budget,
        "achieved_flops_fraction": achieved_flops,
        "achieved_params_fraction": c_pruned.params / c_dense.params,
        "budget_error": abs(achieved - config.budget),
        **latency_facts,
        "achieved_before_snap": trainer.achieved_before_snap,
        "flops_reduction": c_dense.flops / c_pruned.flops,
        "latency_ratio_b256": lat["dense"][256]
        / lat["pruned"][256]
        * c_pruned.flops
        / c_dense.flops,
        "speedup_b1_bn_folded": lat["dense_folded"][1] / lat["pruned_folded"][1],
        "speedup_b256_bn_folded": lat["dense_folded"][256] / lat["pruned_folded"][256],
        "kept": {k: v for k, v in conn.items() if k not in ("layers", "head")},
        "connectivity": conn,
        **run_facts(lat, r, train_s=train_seconds, t_start=t_start),
    }
    write_json(out / "results.json", results)

    k = results["kept"]
    say("")
    say(_table(rows))
    say("")
    if lm is not None:
        say(
            f"budget {latency_target:.1%} of the predicted latency at batch 256 -> predicted "
            f"{latency_facts['predicted_latency_fraction']:.3f}, measured "
            f"{latency_facts['measured_latency_fraction_b256']:.3f} on {lm.threads} thread(s) "
            f"as in the model (latency ratio "
            f"{latency_facts['latency_ratio_b256_model_threads']:.2f}); "
            f"{latency_facts['measured_latency_fraction_b256_all_threads']:.3f} on "
            f"{torch.get_num_threads()}"
        )
    prefix = "FLOPs: " if config.latency else f"budget {config.budget:.0%} of FLOPs -> "
    say(
        f"{prefix}achieved {results['achieved_flops_fraction']:.3f} "
        f"({results['flops_reduction']:.1f}x fewer FLOPs); measured speed-up "
        f"{results['speedup_b1']:.2f}x at batch 1, {results['speedup_b256']:.2f}x at batch 256"
        f" (latency ratio, speed-up / FLOPs reduction: {results['latency_ratio_b256']:.2f})"
    )
    say(
        f"kept: {k['layers_kept']}/{k['layers_total']} layers, {k['units_kept']}/"
        f"{k['units_total']} channels, {k['edges_kept']}/{k['edges_total']} edges"
    )
    say(
        f"deployed with BatchNorm folded into the convolutions: speed-up "
        f"{results['speedup_b1_bn_folded']:.2f}x at batch 1, "
        f"{results['speedup_b256_bn_folded']:.2f}x at batch 256"
    )
    say(
        f"pruned == gated: max |diff| {diff32:.2e} (float32; logits up to {scale:.0f}, relative "
        f"{diff32 / scale:.1e}; {r.random_diff:.1e} on fresh random inputs), {diff64:.2e} "
        "(float64); "
        f"accuracy {100 * acc_gated:.1f}% gated, {100 * acc_pruned:.1f}% pruned, "
        f"{100 * acc_finetuned:.1f}% after fine-tuning"
    )
    say(f"wrote {out}/results.json, pruned.safetensors, connectivity.png, widths.png, training.png")
    say(f"total {results['total_seconds']:.0f} s")
    return results
