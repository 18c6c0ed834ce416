"""Run the suite: every (workload, target, seed, method) trained, then all latencies measured.

Training and latency are separate phases: latency is measured only after all training has
finished, for all final models of a workload in interleaved rounds in one process
(:mod:`bench.suite.latency`), so load changes on a shared machine hit every method alike.
Every final model is also kept in ``<out>/models/`` (transient, not committed) so the latency
phase can run later, in the parent process of ``--jobs`` (``--defer-latency`` parts), or again
on a quiet machine (``python -m bench.suite.retime OUT``).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gatedprune.data import Splits
from gatedprune.profiling import num_threads

from .baselines import METHODS, RunSpec, clear_pretrained
from .latency import measure_rows, model_key, save_model
from .workloads import WORKLOADS, plain_cost

__all__ = ["FULL", "QUICK", "SuiteConfig", "main", "run_suite"]

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "suite"


SHARED_EPOCHS = 15
"""Epochs of every method on a workload whose schedule declares none."""


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite runs. ``epochs=None``: each workload's schedule
    (:attr:`~bench.suite.workloads.Workload.schedule`, else ``SHARED_EPOCHS``); a number
    forces that many epochs on every workload (smoke checks, tests).

    >>> QUICK.targets, FULL.workload_epochs("mnist1d_shortcut_conv")
    ((0.25, 0.1), 15)
    """

    workloads: tuple[str, ...] = (
        "mnist1d_shortcut_conv",
        "mnist1d_shortcut_mlp",
        "mnist1d_chain_mlp",
        "mnist1d_resnet",
        "mnist1d_shortcut_lstm",
    )
    methods: tuple[str, ...] = tuple(METHODS)
    targets: tuple[float, ...] = (0.5, 0.25, 0.1, 0.05)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int | None = None
    num_samples: int = 5000
    prune_at: float = 0.5
    l0_lambda: float = 1.0
    threads: int = 1
    jobs: int = 2
    latency_rounds: int = 5
    latency_repeats_b1: int = 20
    latency_repeats_b256: int = 3
    batch_sizes: tuple[int, ...] = (1, 256)
    out: Path = field(default=DEFAULT_OUT)
    plots: bool = True
    defer_latency: bool = False
    """Keep the final models but leave timing to a later phase (the ``--jobs`` parent)."""

    def workload_epochs(self, workload: str) -> int:
        """Total epochs (pruning and fine-tuning counted) of every method on ``workload``."""
        if self.epochs is not None:
            return self.epochs
        return WORKLOADS[workload]().schedule.resolve_epochs(SHARED_EPOCHS)

    def validate(self) -> None:
        for w in self.workloads:
            if w not in WORKLOADS:
                raise ValueError(f"unknown workload {w!r}; expected one of {sorted(WORKLOADS)}")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; expected one of {list(METHODS)}")
        if not self.targets or any(not 0.0 < t <= 1.0 for t in self.targets):
            raise ValueError(f"targets must be fractions in (0, 1], got {self.targets}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be ints >= 0, got {self.seeds}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {self.epochs}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if not 0.0 < self.prune_at <= 1.0:
            raise ValueError(f"prune_at must be in (0, 1], got {self.prune_at}")


FULL = SuiteConfig()
"""Full mode: 5 workloads x 4 budgets x 3 seeds x 8 methods, each workload's schedule
(15 epochs; the LSTM its own), 2 processes."""

QUICK = replace(
    FULL,
    workloads=("mnist1d_shortcut_conv",),
    targets=(0.25, 0.1),
    seeds=(0,),
    num_samples=3000,
    latency_rounds=3,
    latency_repeats_b1=10,
    latency_repeats_b256=2,
    out=DEFAULT_OUT.parent / "suite_quick",
)
"""Quick mode: the conv workload, 2 budgets x 1 seed x 7 methods, 15 epochs on 2400 samples
(a smoke check; gatedprune's search needs a few hundred steps, 8 epochs of 24 are too few)."""


@dataclass
class _Run:
    row: dict[str, Any]
    model: nn.Module | None


def _train_all(config: SuiteConfig, wl_name: str, data: Splits, log: Any) -> list[_Run]:
    wl = WORKLOADS[wl_name]()
    example = data.x_train[:1]  # (1, C, L)
    reference = wl.dense_reference(example)
    ref_cost = plain_cost(reference, example)
    runs: list[_Run] = []
    total = len(config.targets) * len(config.seeds) * len(config.methods)
    epochs = config.workload_epochs(wl_name)
    for target in config.targets:
        for seed in config.seeds:
            for method in config.methods:
                spec = RunSpec(
                    workload=wl,
                    data=data,
                    target=target,
                    epochs=epochs,
                    seed=seed,
                    dense_flops=ref_cost.flops,
                    prune_at=config.prune_at,
                    l0_lambda=config.l0_lambda,
                )
                row: dict[str, Any] = {
                    "workload": wl_name,
                    "method": method,
                    "target": target,
                    "seed": seed,
                    "epochs": epochs,
                }
                t0 = time.perf_counter()
                model: nn.Module | None = None
                try:
                    result = METHODS[method](spec)
                    model = result.model.eval()
                    row["wall_s"] = time.perf_counter() - t0
                    # a shared pre-training this row used counts in its training time
                    row["train_s"] = row["wall_s"] + result.shared_seconds
                    c = plain_cost(model, example)
                    achieved = c.flops / ref_cost.flops
                    row.update(
                        achieved_flops=achieved,
                        achieved_params=c.params / ref_cost.params,
                        budget_error=abs(achieved - target),
                        accuracy=_accuracy(model, data),
                        flops=c.flops,
                        params=c.params,
                    )
                    row["notes"] = " ".join(f"{k}={v}" for k, v in result.notes.items())
                    try:  # kept for the latency phase; a failure must not lose the row
                        save_model(model, config.out, row)
                    except Exception as e:
                        row["notes"] += f" model_not_kept={type(e).__name__}"
                        log(f"could not keep the final model ({_describe_error(e)})")
                except Exception as e:  # one failing baseline must not lose a long run
                    traceback.print_exc()
                    row["train_s"] = row["wall_s"] = time.perf_counter() - t0
                    row["error"] = _describe_error(e)
                runs.append(_Run(row, model))
                log(
                    f"[{len(runs)}/{total}] {wl_name} {method} target {target:g} seed {seed}: "
                    + (
                        f"acc {row['accuracy']:.3f} flops {row['achieved_flops']:.3f} "
                        if "accuracy" in row
                        else f"FAILED ({row['error']}) "
                    )
                    + f"{row['wall_s']:.1f} s"
                    + (
                        f" ({row['train_s']:.1f} s with the shared pre-training)"
                        if row["train_s"] > row["wall_s"]
                        else ""
                    )
                )
    return runs


def _describe_error(e: BaseException) -> str:
    """``Type: message``; with an empty message (a bare ``assert`` in a library), where it was
    raised, so the report can say something.

    >>> try:
    ...     assert False
    ... except AssertionError as e:
    ...     _describe_error(e).startswith("AssertionError (raised at ")
    True
    """
    text = str(e).strip()
    if text:
        return f"{type(e).__name__}: {text}"
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return type(e).__name__
    last = frames[-1]
    where = "/".join(Path(last.filename).parts[-2:])
    return f"{type(e).__name__} (raised at {where}:{last.lineno} in {last.name})"


@torch.no_grad()
def _accuracy(model: nn.Module, data: Splits) -> float:
    out = model.eval()(data.x_test)  # (N, classes)
    return float((out.argmax(1) == data.y_test).float().mean())


def run_suite(
    config: SuiteConfig, *, verbose: bool = True, command: str = "python -m bench"
) -> list[dict[str, Any]]:
    """Run every configured workload/target/seed/method, measure latencies and write the
    results (CSV, markdown, plots) into ``config.out``; returns the per-run rows.

    >>> rows = run_suite(replace(QUICK, epochs=1, targets=(0.5,)))  # doctest: +SKIP
    """
    from .report import write_report

    config.validate()
    log = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with num_threads(config.threads):
        for wl_name in config.workloads:
            data = WORKLOADS[wl_name]().data(config.num_samples)
            log(f"{wl_name}: {len(data.x_train)} train / {len(data.x_test)} test samples")
            runs = _train_all(config, wl_name, data, log)
            clear_pretrained()
            if not config.defer_latency:
                measure_rows(
                    [r.row for r in runs],
                    {model_key(r.row): r.model for r in runs if r.model is not None},
                    config,
                    log=log,
                )
            rows += [r.row for r in runs]
    write_report(rows, config, seconds=time.perf_counter() - t_start, command=command)
    log(f"suite finished in {time.perf_counter() - t_start:.0f} s; results in {config.out}")
    return rows


def _parse(argv: Sequence[str] | None, prog: str = "python -m bench") -> SuiteConfig:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark suite: gatedprune vs small dense, Network Slimming, Torch-Pruning "
        "(magnitude, GroupNorm), fixed-λ L0 and random pruning at equal achieved FLOPs.",
    )
    ap.add_argument("--quick", action="store_true", help="smoke check (< 5 min on 2 cores)")
    ap.add_argument("--out", type=Path, default=None, help=f"output folder ({DEFAULT_OUT})")
    ap.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=None)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    ap.add_argument("--targets", type=float, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of every method on every workload (default: each workload's schedule)",
    )
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="parallel processes (2): each workload's methods are split between processes, "
        "their results merged (bench.suite.parallel)",
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--defer-latency",
        action="store_true",
        help="keep the final models in OUT/models but do not time them (the --jobs parent "
        "times every part's models together; or run python -m bench.suite.retime OUT)",
    )
    a = ap.parse_args(argv)
    config = QUICK if a.quick else FULL
    overrides: dict[str, Any] = {
        "out": a.out,
        "workloads": None if a.workloads is None else tuple(a.workloads),
        "methods": None if a.methods is None else tuple(a.methods),
        "targets": None if a.targets is None else tuple(a.targets),
        "seeds": None if a.seeds is None else tuple(a.seeds),
        "epochs": a.epochs,
        "num_samples": a.num_samples,
        "threads": a.threads,
        "jobs": a.jobs,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if a.no_plots:
        config = replace(config, plots=False)
    if a.defer_latency:
        config = replace(config, defer_latency=True)
    return config


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m bench") -> None:
    """Command-line entry point (``python -m bench``; ``gatedprune bench`` calls it with its
    own ``prog``, recorded as the command in the results).

    >>> main(["--quick", "--targets", "0.5", "--epochs", "1"])  # doctest: +SKIP
    """
    args = sys.argv[1:] if argv is None else list(argv)
    config = _parse(args, prog)
    command = " ".join([prog, *args])
    if config.jobs > 1:
        from .parallel import run_parallel

        run_parallel(config, quick="--quick" in args, command=command)
    else:
        run_suite(config, command=command)
