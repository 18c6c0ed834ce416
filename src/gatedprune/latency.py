"""A measured latency model of pruned shortcut networks, for latency budgets.

FLOPs do not predict CPU latency well for pruned networks: at the same FLOPs a pruned
``ShortcutConv1d`` that keeps every shortcut edge (each one a concatenated and perhaps pooled
copy, and wide layer inputs feeding thin outputs) runs about half as fast as one that keeps a
chain of multiple-of-16 layers. :class:`LatencyModel` predicts the latency of a pruned network
as a non-negative combination of structural features (``LATENCY_FEATURES``: a constant, layers,
edges, multiply-accumulates, input, output and pooled elements), fitted by least squares to the
measured latencies of randomly pruned copies of *this* network on *this* machine, at one batch
size and thread count. The features are exact at hard gates and have a differentiable
expectation under the gates' open probabilities, so ``Budget(model, x, latency=0.2,
latency_model=lm)`` steers the predicted latency like a FLOPs fraction.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .gates import gate_modules
from .layout import NetSpec
from .plain import PlainShortcutNet
from .profiling import compare_latency
from .shortcut import LATENCY_FEATURES, _cost_terms, _ShortcutNet
from .strict_json import DuplicateKeyError, loads_strict

__all__ = ["CALIBRATION_WARN_ERROR", "LatencyModel", "nonnegative_least_squares"]

CALIBRATION_WARN_ERROR = 0.10
"""A calibration whose held-out median relative error exceeds this warns (``UserWarning``).
On a quiet machine the demo networks calibrate to 1-5%; calibrations that overlapped other
work measured 13-20%."""


def check_seed(seed: object) -> int:
    """A calibration seed: an int >= 0 (numpy integers too; ``TypeError`` / ``ValueError``).

    >>> check_seed(3)
    3
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int >= 0, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)


def check_errors(median_error: object, max_error: object) -> None:
    """A latency model's held-out errors must be finite numbers >= 0 (a tampered file).

    >>> check_errors(0.02, 0.05)
    """
    for name, value in (("median_error", median_error), ("max_error", max_error)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number >= 0, got {value!r}")
        if not 0 <= float(value) < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def warn_if_unreliable(median_error: float, what: str) -> None:
    """Warn when a calibration's held-out median error exceeds ``CALIBRATION_WARN_ERROR``:
    its predictions (and a latency budget built on them) are then unreliable.

    >>> warn_if_unreliable(0.02, "LatencyModel")  # quiet: nothing
    """
    if median_error > CALIBRATION_WARN_ERROR:
        warnings.warn(
            f"{what}.calibrate: held-out median prediction error {100 * median_error:.1f}% "
            f"is above {100 * CALIBRATION_WARN_ERROR:.0f}%, so its predictions are unreliable."
            " Timings are noisy when other work shares the CPU: calibrate again on a quiet "
            "machine, or with more rounds= and samples=",
            UserWarning,
            stacklevel=3,
        )


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray, *, iters: int = 200) -> np.ndarray:
    """``argmin_x ||a x - b||`` subject to ``x >= 0`` (Lawson-Hanson active set).

    >>> a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> nonnegative_least_squares(a, np.array([1.0, -1.0, 0.0])).round(3).tolist()
    [0.5, 0.0]
    """
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)  # (n,)
    for _ in range(iters):
        if passive.all() or w[~passive].max(initial=-np.inf) <= 1e-12:
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-12
            x[~passive] = 0.0
        w = a.T @ (b - a @ x)  # (n,)
    return x


def _spec_features(spec: NetSpec, sample_shape: tuple[int, ...]) -> list[float]:
    """``LATENCY_FEATURES`` of a plain network (every unit and edge of its spec is kept)."""
    z: list[float] = [float(layer.width) for layer in spec.layers]
    z += [1.0 if layer.width > 0 else 0.0 for layer in spec.layers]
    for layer in spec.layers:
        z += [1.0] * len(layer.sources)
    z += [1.0] * len(spec.head_sources)
    terms = _cost_terms(spec, sample_shape, z, features=True)
    return [float(terms[name]) for name in LATENCY_FEATURES]


def _json_int(name: str, value: object) -> int:
    """An int read from JSON as it was written: ``2.7`` or ``"3"`` is refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def _json_number(name: str, value: object) -> float:
    """A number read from JSON (an int or a float; a bool or a string is refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LatencyModel:
    """Predicted latency (ms) of a pruned shortcut network at ``batch_size`` on ``threads``
    threads: ``sum(coef * features)`` over ``LATENCY_FEATURES``. Build it with
    :meth:`calibrate`; ``median_error`` / ``max_error`` are the relative prediction errors
    on held-out pruned networks (those above 10% of the all-open latency).

    >>> import torch, gatedprune
    >>> net = gatedprune.ShortcutMLP(8, [16, 16], 3)
    >>> lm = LatencyModel.calibrate(net, torch.zeros(1, 8), batch_size=64, samples=8)
    >>> 0 < lm.predict(gatedprune.prune(net.eval()))
    True
    """

    coef: tuple[float, ...]
    batch_size: int
    threads: int
    sample_shape: tuple[int, ...]
    spec: NetSpec
    median_error: float
    max_error: float
    samples: int

    def __post_init__(self) -> None:
        if len(self.coef) != len(LATENCY_FEATURES):
            raise ValueError(
                f"coef must have {len(LATENCY_FEATURES)} entries ({', '.join(LATENCY_FEATURES)})"
                f", got {len(self.coef)}"
            )
        if any(not math.isfinite(c) or c < 0 for c in self.coef):
            raise ValueError(f"coef must be finite and >= 0, got {self.coef}")
        for name, low in (("batch_size", 1), ("threads", 1), ("samples", 0)):  # 0: set by hand
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        check_errors(self.median_error, self.max_error)
        spec = self.spec
        want = (1, spec.in_width, "L") if spec.spatial else (1, spec.in_width)
        shape = self.sample_shape
        if len(shape) != len(want) or tuple(shape[:2]) != want[:2]:
            raise ValueError(f"sample_shape must be {want} for this network structure, got {shape}")
        if spec.spatial and spec.input_length is not None and shape[2] != spec.input_length:
            raise ValueError(
                f"sample_shape {shape} disagrees with the network's input_length "
                f"{spec.input_length}"
            )

    # ------------------------------------------------------------------ use
    def check_network(self, net: _ShortcutNet) -> None:
        """Raise ``ValueError`` unless ``net`` has the all-open structure this model was
        calibrated for."""
        if net.spec != self.spec:
            raise ValueError(
                "this LatencyModel was calibrated for another network structure; calibrate one "
                f"for {type(net).__name__} with LatencyModel.calibrate(net, example_input)"
            )

    def check_pruned(self, plain: PlainShortcutNet) -> None:
        """Raise ``ValueError`` unless ``plain`` can be a pruned copy of the calibrated
        network: same input, read-out, kernel and activation (BatchNorm may be folded), and its
        layers, in order, are layers of the calibrated one at their stage and at most their
        width."""
        mine, spec = self.spec, plain.spec
        keys = ("spatial", "in_width", "out_features", "kernel_size", "head_pool", "activation")
        differ = [k for k in keys if getattr(spec, k) != getattr(mine, k)]
        length = self.sample_shape[2] if mine.spatial else None
        if spec.spatial and spec.input_length not in (None, length):
            differ.append(f"input_length ({spec.input_length}, calibrated at {length})")
        candidates = iter(mine.layers)  # greedy subsequence match of the kept layers
        if not all(
            any(c.stage == layer.stage and c.width >= layer.width for c in candidates)
            for layer in spec.layers
        ):
            differ.append("layers")
        if differ:
            raise ValueError(
                "this LatencyModel was calibrated for another network; the pruned network "
                f"differs in {', '.join(differ)}"
            )

    def features(self, plain: PlainShortcutNet) -> dict[str, float]:
        """``LATENCY_FEATURES`` of a pruned (plain) network, per sample."""
        if not isinstance(plain, PlainShortcutNet):
            raise TypeError(
                f"expected a PlainShortcutNet (gatedprune.prune of a shortcut network), got "
                f"{type(plain).__name__}"
            )
        self.check_pruned(plain)
        return dict(
            zip(LATENCY_FEATURES, _spec_features(plain.spec, self.sample_shape), strict=True)
        )

    def predict(self, plain: PlainShortcutNet) -> float:
        """Predicted latency (ms) of a pruned network at this model's batch size (the same
        value as :meth:`expected` with ``hard=True`` for the gated network it came from).

        >>> import torch, gatedprune
        >>> net = gatedprune.ShortcutMLP(8, [16, 16], 3).eval()
        >>> lm = LatencyModel.calibrate(net, torch.zeros(1, 8), batch_size=64, samples=8)
        >>> ms = lm.predict(gatedprune.prune(net))
        >>> ms > 0, math.isclose(ms, float(lm.expected(net, hard=True)))
        (True, True)
        """
        values = self.features(plain).values()
        return float(sum(c * f for c, f in zip(self.coef, values, strict=True)))

    def expected(self, net: _ShortcutNet, *, hard: bool = False) -> Tensor:
        """Predicted latency (ms) of ``prune(net)``: expected under the gates' open
        probabilities (differentiable), or at the exact decisions with ``hard``."""
        self.check_network(net)
        return net.expected_latency(self.sample_shape, self.coef, hard=hard)

    # ------------------------------------------------------------------ fitting
    @staticmethod
    def calibrate(
        net: nn.Module,
        example_input: Tensor,
        *,
        batch_size: int = 256,
        samples: int = 32,
        threads: int | None = 1,
        seed: int = 0,
        rounds: int = 3,
    ) -> LatencyModel:
        """Fit a latency model for ``net`` (a ``ShortcutMLP`` or ``ShortcutConv1d``; its
        gates are not changed) on this machine: ``samples`` randomly pruned copies (unit and
        edge keep rates drawn log-uniformly from 5% to 100%, every edge kept in half of them)
        and the all-open network are
        timed at ``batch_size`` in interleaved rounds; the coefficients minimise the squared
        *relative* error (non-negative least squares), a quarter of the copies is held out
        to measure the prediction error, and the coefficients are refitted on all of them. A
        held-out median error above ``CALIBRATION_WARN_ERROR`` (10%; a busy machine) warns.

        >>> import torch, gatedprune
        >>> net = gatedprune.ShortcutMLP(8, [16, 16], 3)
        >>> lm = LatencyModel.calibrate(net, torch.zeros(1, 8), batch_size=64, samples=8)
        >>> len(lm.coef), lm.samples, lm.batch_size, lm.threads
        (7, 8, 64, 1)
        """
        if not isinstance(net, _ShortcutNet):
            raise TypeError(
                "LatencyModel.calibrate needs a ShortcutMLP or ShortcutConv1d, got "
                f"{type(net).__name__}"
            )
        if not isinstance(example_input, Tensor) or example_input.dim() < 2:
            raise TypeError("example_input must be a batched tensor, e.g. x[:1]")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("samples", samples, 4),
            ("rounds", rounds, 1),
            ("threads", 1 if threads is None else threads, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        net._check_input(example_input)
        if net.spec.spatial and net.spec.input_length is None:
            raise ValueError(
                "LatencyModel.calibrate needs a ShortcutConv1d constructed with "
                f"input_length={example_input.shape[-1]} (the example's length): its randomly "
                "pruned copies may keep a layer that computes a constant, whose map depends on "
                "the length"
            )
        sample_shape = (1, *example_input.shape[1:])
        seed = check_seed(seed)
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        models: dict[str, nn.Module] = {}
        features: list[list[float]] = []
        for i in range(samples + 1):
            copy_ = copy.deepcopy(net).eval()
            gates = gate_modules(copy_)
            if i == 0:  # the all-open network
                for g in gates:
                    g.force_(torch.ones(g.n, dtype=torch.bool))
            else:
                # log-uniform keep rates: small networks (tight budgets) are sampled as
                # densely as large ones; half the copies keep every edge and only thin their
                # layers, each layer by its own rate (what training under a budget tends to do)
                keep_units = math.exp(rng.uniform(math.log(0.05), 0.0))
                keep_edges = 1.0 if i % 2 else math.exp(rng.uniform(math.log(0.05), 0.0))
                width_ids = {id(g) for g in copy_.width_gates()}
                for g in gates:
                    if id(g) in width_ids:
                        rate = min(1.0, keep_units * math.exp(rng.uniform(-0.5, 0.5)))
                    else:
                        rate = keep_edges
                    mask = torch.rand(g.n_groups, generator=gen) < rate  # (groups,)
                    g.force_(mask.repeat_interleave(g.n // g.n_groups))
            with torch.no_grad():
                plain = copy_.pruned_module().eval()
            models[str(i)] = plain
            features.append(_spec_features(plain.spec, sample_shape))
        # (batch_size, *example_input.shape[1:])
        x = torch.randn(batch_size, *example_input.shape[1:], generator=gen).to(example_input)
        with torch.no_grad():
            times = compare_latency(
                models, x, rounds=rounds, repeats=20 if batch_size == 1 else 3, threads=threads
            )
        y = np.array([1e3 * times[str(i)] for i in range(samples + 1)])  # (n,) ms
        a = np.array(features)  # (n, F)
        scale = np.maximum(np.abs(a).max(axis=0), 1e-12)  # (F,)
        order = list(range(1, samples + 1))
        rng.shuffle(order)
        held = order[: max(1, samples // 4)]
        fit = [0, *order[max(1, samples // 4) :]]
        # relative errors are what a budget fraction feels: each row is weighted by 1 / y
        w = 1.0 / y[:, None]  # (n, 1)
        coef = nonnegative_least_squares(a[fit] * w[fit] / scale, np.ones(len(fit))) / scale
        pred = a @ coef  # (n,) ms
        big = [i for i in held if y[i] > 0.1 * y[0]] or held
        errors = np.abs(pred[big] - y[big]) / y[big]
        coef = nonnegative_least_squares(a * w / scale, np.ones(len(y))) / scale  # all samples
        warn_if_unreliable(float(np.median(errors)), "LatencyModel")
        return LatencyModel(
            coef=tuple(float(c) for c in coef),
            batch_size=batch_size,
            threads=int(threads) if threads is not None else torch.get_num_threads(),
            sample_shape=tuple(int(d) for d in sample_shape),
            spec=net.spec,
            median_error=float(np.median(errors)),
            max_error=float(errors.max()),
            samples=samples,
        )

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        """The model as JSON (no pickle); :meth:`from_json` reads it back."""
        return json.dumps(
            {
                "coef": dict(zip(LATENCY_FEATURES, self.coef, strict=True)),
                "batch_size": self.batch_size,
                "threads": self.threads,
                "sample_shape": list(self.sample_shape),
                "spec": self.spec.to_json(),
                "median_error": self.median_error,
                "max_error": self.max_error,
                "samples": self.samples,
            }
        )

    @staticmethod
    def from_json(text: str) -> LatencyModel:
        """Read a model written by :meth:`to_json`; malformed input raises ``ValueError``."""
        try:
            d: dict[str, Any] = loads_strict(text)
            coef = d["coef"]
            if not isinstance(coef, dict) or set(coef) != set(LATENCY_FEATURES):
                raise ValueError(f"coef must name exactly {LATENCY_FEATURES}")
            return LatencyModel(
                coef=tuple(_json_number(f"coef[{n!r}]", coef[n]) for n in LATENCY_FEATURES),
                batch_size=_json_int("batch_size", d["batch_size"]),
                threads=_json_int("threads", d["threads"]),
                sample_shape=tuple(_json_int("sample_shape", v) for v in d["sample_shape"]),
                spec=NetSpec.from_json(d["spec"]),
                median_error=_json_number("median_error", d["median_error"]),
                max_error=_json_number("max_error", d["max_error"]),
                samples=_json_int("samples", d["samples"]),
            )
        except (KeyError, TypeError, json.JSONDecodeError, DuplicateKeyError) as e:
            raise ValueError(f"not a LatencyModel JSON: {e!r}") from e
