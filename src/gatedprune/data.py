"""Offline data sets for demos, tests and benchmarks (nothing is downloaded).

Not imported by ``import gatedprune``: import ``gatedprune.data`` explicitly. MNIST-1D needs
the ``mnist1d`` package (extra ``demo``); the adding problem needs only torch.
"""

from __future__ import annotations

import numbers
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import check_flag

__all__ = ["Splits", "adding_problem", "mnist1d"]

MNIST1D_MAX_SEED = 2**32
"""MNIST-1D seeds are ints in ``[0, 2**32)`` (NumPy's legacy seeding)."""
ADDING_MAX_SEED = 2**63
"""Adding-problem seeds are ints in ``[0, 2**63)``."""


def _check_count(name: str, value: object, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints too
        raise TypeError(f"{name} must be an int {what}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an int {what}, got {value!r}")
    return int(value)


def _check_seed(seed: object, bound: int) -> int:
    shown = f"[0, 2**{bound.bit_length() - 1})"
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # numpy ints too
        raise TypeError(f"seed must be an int in {shown}, got {seed!r}")
    if not 0 <= int(seed) < bound:
        raise ValueError(f"seed must be an int in {shown}, got {seed!r}")
    return int(seed)


@dataclass(frozen=True)
class Splits:
    """Train and test tensors of a supervised task."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def mnist1d(*, num_samples: int = 5000, seed: int = 42, as_sequence: bool = False) -> Splits:
    """MNIST-1D (Greydanus 2020), generated offline: 80% train, 20% test, length 40.

    ``x`` is ``(N, 1, 40)`` for convolutions, or ``(N, 40, 1)`` with ``as_sequence=True``
    (one value per time step, for recurrent models); ``y`` holds class indices 0-9.
    The defaults reproduce the published 4000/1000 split. ``num_samples`` is a multiple of 10
    (equally many per class); ``seed`` an int in ``[0, 2**32)``: the same seed gives the same
    data, and the global ``random`` / NumPy generators are left as they were.

    >>> d = mnist1d(num_samples=100)  # doctest: +SKIP
    >>> d.x_train.shape  # doctest: +SKIP
    torch.Size([80, 1, 40])
    """
    num_samples = _check_count("num_samples", num_samples, 10, ">= 10")
    as_sequence = check_flag("as_sequence", as_sequence)
    if num_samples % 10:
        raise ValueError(
            f"num_samples must be a multiple of 10 (MNIST-1D makes num_samples // 10 per "
            f"class), got {num_samples}: {num_samples // 10 * 10} would be generated"
        )
    seed = _check_seed(seed, MNIST1D_MAX_SEED)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MNIST-1D needs the mnist1d package: pip install 'gatedprune[demo]'"
        ) from e
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    import numpy as np  # a dependency of mnist1d

    # make_dataset seeds the global `random` and NumPy generators: keep the caller's streams
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)  # generated locally; get_dataset() would download
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x_train = torch.as_tensor(data["x"], dtype=torch.float32)  # (N, 40)
    x_test = torch.as_tensor(data["x_test"], dtype=torch.float32)  # (M, 40)
    if as_sequence:
        x_train, x_test = x_train[:, :, None], x_test[:, :, None]  # (N, 40, 1)
    else:
        x_train, x_test = x_train[:, None, :], x_test[:, None, :]  # (N, 1, 40)
    return Splits(
        x_train=x_train,
        y_train=torch.as_tensor(data["y"], dtype=torch.long),
        x_test=x_test,
        y_test=torch.as_tensor(data["y_test"], dtype=torch.long),
    )


def adding_problem(n: int, length: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The adding problem (Hochreiter & Schmidhuber 1997).

    Each sequence holds ``length`` (value, marker) pairs, values ~ U[-0.5, 0.5]; exactly two
    markers are 1, one in each half. The target is the sum of the two marked values.
    Predicting 0 gives an MSE of about 0.167. ``seed`` (an int in ``[0, 2**63)``) fixes the
    data; the global torch generator is not used.

    >>> x, y = adding_problem(4, 50)
    >>> x.shape, y.shape
    (torch.Size([4, 50, 2]), torch.Size([4, 1]))
    """
    n = _check_count("n", n, 1, ">= 1")
    length = _check_count("length", length, 2, ">= 2")
    g = torch.Generator().manual_seed(_check_seed(seed, ADDING_MAX_SEED))
    values = torch.rand(n, length, generator=g) - 0.5  # (N, T)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=g)  # (N,)
    second = torch.randint(half, length, (n,), generator=g)  # (N,)
    markers = torch.zeros(n, length)  # (N, T)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=-1)  # (N, T, 2)
    y = (values[rows, first] + values[rows, second])[:, None]  # (N, 1)
    return x, y
