"""Measuring CPU latency the same way everywhere: warm up, repeat, report the median."""

from __future__ import annotations

import ctypes
import math
import numbers
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .inputs import as_inputs

__all__ = ["Latency", "compare_latency", "measure_latency", "num_threads", "steady_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> mallopt parameters
_M_MMAP_THRESHOLD = -3
_steady: tuple[int, int] | None = None  # the thresholds set by steady_allocator, if any


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


_INT_MAX = 2**31 - 1


def steady_allocator(
    mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20
) -> tuple[int, int] | None:
    """Make glibc's ``malloc`` keep freed memory for reuse, process-wide: blocks up to
    ``mmap_threshold`` bytes come from the heap instead of fresh ``mmap`` pages, and free heap
    memory is returned to the system only beyond ``trim_threshold`` bytes. Returns the two
    thresholds in force, or ``None`` where the C library is not glibc (nothing changed).

    PyTorch allocates CPU tensors with ``malloc``. By default glibc adapts both thresholds
    as the program runs, so whether a feature map of a few MB lands on pages it must fault
    in again (hundreds of microseconds for a network that computes in one millisecond)
    depends on what ran before: on this machine the same models measured latency ratios
    0.56 / 0.97 / 0.73 in three processes, against 0.61 / 0.64 / 0.63 with this call. It is
    what PyTorch's CPU performance guide gets from preloading jemalloc or tcmalloc, without a
    preloaded library. The benchmarks and ``gatedprune demo`` call it before timing; call it
    at the start of a program that measures or serves latency (it affects the whole process).

    >>> steady_allocator() in (None, (32 << 20, 512 << 20))
    True
    """
    global _steady
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int number of bytes, got {value!r}")
    if not 0 < mmap_threshold <= 32 << 20:  # glibc's largest on 64-bit systems
        raise ValueError(f"mmap_threshold must be in (0, 32 MiB], got {mmap_threshold!r}")
    if not 0 <= trim_threshold <= _INT_MAX:  # mallopt takes a C int
        raise ValueError(
            f"trim_threshold must be in [0, {_INT_MAX}] bytes (mallopt takes a C int), got "
            f"{trim_threshold!r}"
        )
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        glibc = hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")
    except OSError:
        return None
    if not glibc:  # e.g. musl: no such tunables
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    if not ok:
        return None
    _steady = (int(mmap_threshold), int(trim_threshold))
    return _steady


def allocator_setting() -> str:
    """How :func:`steady_allocator` left this process's ``malloc``, for result notes.

    >>> allocator_setting().startswith(("glibc malloc", "default malloc"))
    True
    """
    if _steady is None:
        return "default malloc (steady_allocator not applied)"
    mmap, trim = _steady[0] >> 20, _steady[1] >> 20
    return f"glibc malloc steadied (mmap threshold {mmap} MiB, trim {trim} MiB)"


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
    x: Tensor | tuple[Tensor, ...],
    *,
    warmup: int = 5,
    repeats: int = 30,
    min_time: float = 0.0,
    threads: int | None = None,
) -> Latency:
    """Median wall time of ``model(x)`` in eval mode after ``warmup`` untimed calls (``x`` a
    tuple: ``model(*x)``, a model with several inputs).

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
    inputs = as_inputs(x)  # a tuple: the model's positional inputs
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with num_threads(threads):
            for _ in range(warmup):
                model(*inputs)
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < repeats or time.perf_counter() - start < min_time:
                t0 = time.perf_counter()
                model(*inputs)
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
    x: Tensor | tuple[Tensor, ...],
    *,
    rounds: int = 7,
    repeats: int = 10,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[str, float]:
    """Median latency (seconds) of several models on ``x`` (a tuple: their positional
    inputs), measured in interleaved rounds
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
