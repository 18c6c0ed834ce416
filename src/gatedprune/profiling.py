"""Measuring CPU latency the same way everywhere: warm up, repeat, report the median."""

from __future__ import annotations

import math
import numbers
import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Latency", "compare_latency", "measure_latency", "num_threads"]


@dataclass(frozen=True)
class Latency:
    """Median and spread of repeated forward passes, in seconds."""

    median: float
    p10: float
    p90: float
    repeats: int


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily fix torch's intra-op thread count (``None`` leaves it)."""
    if n is not None:
        n = _check_int("threads", n, 1)
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    x: Tensor,
    *,
    warmup: int = 5,
    repeats: int = 30,
    min_time: float = 0.0,
    threads: int | None = None,
) -> Latency:
    """Median wall time of ``model(x)`` in eval mode after ``warmup`` untimed calls.

    Runs at least ``repeats`` timed calls and keeps going until ``min_time`` seconds have
    passed. The train/eval mode of every module is restored.

    >>> lat = measure_latency(nn.Linear(4, 4), torch.zeros(1, 4), repeats=3)
    >>> lat.median > 0
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    repeats = _check_int("repeats", repeats, 1)
    warmup = _check_int("warmup", warmup, 0)
    if isinstance(min_time, bool) or not isinstance(min_time, numbers.Real):
        raise TypeError(f"min_time must be a number of seconds, got {min_time!r}")
    if not 0.0 <= float(min_time) < math.inf:
        raise ValueError(f"min_time must be finite and >= 0 seconds, got {min_time!r}")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with num_threads(threads):
            for _ in range(warmup):
                model(x)
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < repeats or time.perf_counter() - start < min_time:
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    finally:
        for m, training in modes:
            m.training = training
    times.sort()
    n = len(times)
    return Latency(
        median=statistics.median(times),
        p10=times[int(0.1 * (n - 1))],
        p90=times[int(0.9 * (n - 1))],
        repeats=n,
    )


def compare_latency(
    models: Mapping[str, nn.Module],
    x: Tensor,
    *,
    rounds: int = 7,
    repeats: int = 10,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[str, float]:
    """Median latency (seconds) of several models on ``x``, measured in interleaved rounds
    (each round times every model in turn), so that load changes on a shared machine hit all
    models alike and their *ratios* stay meaningful.

    >>> t = compare_latency({"a": nn.Linear(4, 4), "b": nn.Identity()}, torch.zeros(1, 4))
    >>> sorted(t)
    ['a', 'b']
    """
    if not isinstance(models, Mapping):
        raise TypeError(
            f"models must be a mapping of names to modules, got {type(models).__name__}"
        )
    _check_int("rounds", rounds, 1)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for i in range(rounds):
        for name, model in models.items():
            lat = measure_latency(
                model, x, warmup=warmup if i == 0 else 1, repeats=repeats, threads=threads
            )
            samples[name].append(lat.median)
    return {name: statistics.median(v) for name, v in samples.items()}
