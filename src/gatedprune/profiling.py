"""Measuring CPU latency the same way everywhere: warm up, repeat, report the median."""

from __future__ import annotations

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


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily fix torch's intra-op thread count (``None`` leaves it)."""
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
    passed. The model's train/eval mode is restored.

    >>> lat = measure_latency(nn.Linear(4, 4), torch.zeros(1, 4), repeats=3)
    >>> lat.median > 0
    True
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    was_training = model.training
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
        model.train(was_training)
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
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    samples: dict[str, list[float]] = {name: [] for name in models}
    for i in range(rounds):
        for name, model in models.items():
            lat = measure_latency(
                model, x, warmup=warmup if i == 0 else 1, repeats=repeats, threads=threads
            )
            samples[name].append(lat.median)
    return {name: statistics.median(v) for name, v in samples.items()}
