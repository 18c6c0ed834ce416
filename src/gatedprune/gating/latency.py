"""A measured latency model of models gated with :func:`~gatedprune.gating.gate_`.

FLOPs are not latency, least of all at batch 1 in eager PyTorch, where dispatching an operator
costs about 10-20 us whatever its size: the residual blocks of a ResNet's first stage hold a
quarter of the FLOPs of its last stage's blocks but take about as long to run. So a depth
pruning that meets a FLOPs target by removing the big blocks keeps many cheap, slow operators.
:class:`GatedLatencyModel` predicts the latency of ``prune(model)`` as a non-negative
combination of ``GATED_LATENCY_FEATURES``: a constant, the module calls of the pruned forward
(:meth:`InsertedGating.expected_ops`) and its FLOPs per sample, fitted to the measured
latencies of randomly pruned copies of *this* model on *this* machine at one batch size and
thread count. Both features are exact at hard gates and have a differentiable expectation
under the gates' open probabilities, so ``Budget(model, x, flops=0.25, latency=0.3,
latency_model=lm)`` steers the predicted latency like a FLOPs fraction.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..inputs import as_inputs
from ..latency import (
    _json_int,
    _json_number,
    check_errors,
    check_seed,
    nonnegative_least_squares,
    warn_if_unreliable,
)
from ..profiling import compare_latency
from ..prune import prune
from ..strict_json import DuplicateKeyError, loads_strict
from .core import InsertedGating

__all__ = ["GATED_LATENCY_FEATURES", "GatedLatencyModel", "inserted_gating"]

GATED_LATENCY_FEATURES = ("constant", "ops", "flops")
"""Features of :class:`GatedLatencyModel`: 1, module calls, FLOPs per sample."""


def inserted_gating(model: nn.Module) -> InsertedGating:
    """The gates :func:`~gatedprune.gating.gate_` attached to ``model`` (``TypeError`` if
    it was not gated with it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, InsertedGating)]
    if len(found) != 1:
        raise TypeError(
            f"{type(model).__name__} was not gated with gatedprune.gate_ (it holds "
            f"{len(found)} InsertedGating modules; expected one)"
        )
    return found[0]


def structure_key(gating: InsertedGating) -> str:
    """A digest of what the gated model's cost depends on: the gated input shape, the gate
    sizes, the blocks, the new shortcuts, the module calls of its traced graph and the
    all-open model's FLOPs and parameter terms (a kernel size or class count of its own)."""
    t = gating.terms
    desc = {
        "dense": [float(t.f_coef.sum()), float(t.p_coef.sum()), float(t.e_coef.sum())],
        "input_shape": list(gating.input_shape),
        "groups": [int(g.n) for g in gating.group_gates],  # type: ignore[arg-type]
        "blocks": [list(b) for b in gating.block_nodes],
        "edges": [[e.src_node, e.dst_node] for e in gating.edges],
        "calls": list(dict.fromkeys(gating.terms.f_nodes)),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _features(gating: InsertedGating, *, hard: bool, flops: Tensor | None = None) -> Tensor:
    """``GATED_LATENCY_FEATURES`` as a float64 tensor ``(3,)`` (differentiable unless hard);
    ``flops``: the gating's (expected) FLOPs for its input shape if the caller has them."""
    if flops is None:
        flops, _ = gating.expected_cost(gating.input_shape, hard=hard)
    per_sample = flops / gating.input_shape[0]
    ops = gating.expected_ops(hard=hard)
    return torch.stack([torch.ones_like(ops), ops, per_sample.to(ops.dtype)])  # (3,)


@dataclass(frozen=True)
class GatedLatencyModel:
    """Predicted latency (ms) of ``prune(model)`` for a model gated with ``gate_``, at
    ``batch_size`` on ``threads`` threads: ``sum(coef * features)`` over
    ``GATED_LATENCY_FEATURES``. Build it with :meth:`calibrate`; ``median_error`` /
    ``max_error`` are the relative prediction errors on held-out pruned copies.

    >>> import torch, gatedprune
    >>> from gatedprune.gating import ResNet1d, gate_
    >>> net = ResNet1d(widths=(8, 16), blocks=(2, 2))
    >>> x = torch.zeros(1, 1, 40)
    >>> _ = gate_(net, x)
    >>> lm = GatedLatencyModel.calibrate(net, x, samples=8, rounds=1)
    >>> budget = gatedprune.Budget(net, x, flops=0.5, latency=0.6, latency_model=lm)
    >>> 0 < lm.features(net)["ops"] and sorted(budget.targets)
    ['flops', 'latency']
    """

    coef: tuple[float, ...]
    batch_size: int
    threads: int
    input_shape: tuple[int, ...]
    structure: str
    median_error: float
    max_error: float
    samples: int

    def __post_init__(self) -> None:
        if len(self.coef) != len(GATED_LATENCY_FEATURES):
            raise ValueError(
                f"coef must have {len(GATED_LATENCY_FEATURES)} entries "
                f"({', '.join(GATED_LATENCY_FEATURES)}), got {len(self.coef)}"
            )
        if any(not math.isfinite(c) or c < 0 for c in self.coef):
            raise ValueError(f"coef must be finite and >= 0, got {self.coef}")
        for name in ("batch_size", "threads", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        check_errors(self.median_error, self.max_error)
        shape = self.input_shape
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"input_shape must be a non-empty shape of ints >= 1, got {shape!r}")
        if not isinstance(self.structure, str) or not self.structure:
            raise ValueError(f"structure must be a non-empty key string, got {self.structure!r}")

    # ------------------------------------------------------------------ use
    def check_model(self, model: nn.Module) -> InsertedGating:
        """The model's gating; ``ValueError`` unless it has the gated structure (and gated
        input shape) this latency model was calibrated for."""
        gating = inserted_gating(model)
        one_input = len(gating.input_shapes) == 1
        if (
            not one_input
            or tuple(gating.input_shape) != self.input_shape
            or structure_key(gating) != (self.structure)
        ):
            raise ValueError(
                "this GatedLatencyModel was calibrated for another gated model (or another "
                f"example_input shape than {self.input_shape}); calibrate one for "
                f"{type(model).__name__} with GatedLatencyModel.calibrate(model, example_input)"
            )
        return gating

    def features(self, model: nn.Module, *, hard: bool = False) -> dict[str, float]:
        """``GATED_LATENCY_FEATURES`` of ``prune(model)``: expected, or exact with ``hard``."""
        with torch.no_grad():
            values = _features(self.check_model(model), hard=hard)
        return dict(zip(GATED_LATENCY_FEATURES, values.tolist(), strict=True))

    def expected(self, model: nn.Module, *, hard: bool = False) -> Tensor:
        """Predicted latency (ms) of ``prune(model)``: expected under the gates' open
        probabilities (differentiable), or at the exact decisions with ``hard``."""
        return self.expected_checked(self.check_model(model), hard=hard)

    def expected_checked(
        self, gating: InsertedGating, *, hard: bool = False, flops: Tensor | None = None
    ) -> Tensor:
        """:meth:`expected` for a gating :meth:`check_model` already accepted (a
        :class:`~gatedprune.Budget` checks once, not at every step); ``flops``: the
        gating's ``expected_cost(gating.input_shape, hard=hard)[0]`` if already computed."""
        z = _features(gating, hard=hard, flops=flops)  # (3,)
        coef = torch.tensor(self.coef, dtype=z.dtype, device=z.device)  # (3,)
        return (coef * z).sum()  # (3,) -> () ms

    # ------------------------------------------------------------------ fitting
    @staticmethod
    def calibrate(
        model: nn.Module,
        example_input: Tensor | tuple[Tensor, ...],
        *,
        batch_size: int = 1,
        samples: int = 32,
        threads: int | None = 1,
        seed: int = 0,
        rounds: int = 3,
    ) -> GatedLatencyModel:
        """Fit a latency model for ``model`` (gated with ``gate_`` on ``example_input``; its
        gates are restored afterwards) on this machine: the all-open model and ``samples``
        randomly pruned copies (a third closing only blocks, a third only channels, a third
        both; keep rates uniform in [0, 1] for blocks and shortcuts, log-uniform in [5%, 100%]
        for channels) are timed at ``batch_size`` in interleaved rounds. The coefficients
        minimise the squared *relative* error (non-negative least squares); a quarter of the
        copies is held out to measure the prediction error, then all of them are refitted. A
        held-out median error above ``gatedprune.latency.CALIBRATION_WARN_ERROR`` (10%; a busy
        machine) warns."""
        gating = inserted_gating(model)
        inputs = as_inputs(example_input)
        if len(inputs) > 1 or len(gating.input_shapes) > 1:
            raise TypeError(
                "GatedLatencyModel.calibrate times models gated with one input tensor; "
                f"{type(model).__name__} was gated with {len(gating.input_shapes)} inputs "
                f"and example_input gives {len(inputs)}: budget its FLOPs or parameters "
                "instead (Budget(model, inputs, flops=...))"
            )
        example_input = inputs[0]
        if not isinstance(example_input, Tensor) or example_input.dim() < 1:
            raise TypeError("example_input must be the batched tensor the model was gated with")
        if tuple(example_input.shape) != tuple(gating.input_shape):
            raise ValueError(
                f"example_input has shape {tuple(example_input.shape)}, but the model was "
                f"gated with an input of shape {tuple(gating.input_shape)}"
            )
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
        seed = check_seed(seed)
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        saved = {k: v.clone() for k, v in gating.state_dict().items()}
        width_ids = {id(g) for g in gating.group_gates}
        block_ids = {id(g) for g in gating.block_gates}
        models: dict[str, nn.Module] = {}
        rows: list[list[float]] = []
        try:
            for i in range(samples + 1):
                depth, width = i > 0 and i % 3 != 1, i % 3 != 0  # i = 0: everything open
                keep_blocks = rng.uniform(0.0, 1.0) if depth else 1.0
                keep_units = math.exp(rng.uniform(math.log(0.05), 0.0)) if width else 1.0
                keep_edges = rng.uniform(0.0, 1.0) if i else 1.0
                for g in gating.gates():
                    if id(g) in block_ids:
                        rate = keep_blocks
                    elif id(g) in width_ids:
                        rate = min(1.0, keep_units * math.exp(rng.uniform(-0.5, 0.5)))
                    else:
                        rate = keep_edges
                    mask = torch.rand(g.n_groups, generator=gen) < rate  # (groups,)
                    g.force_(mask.repeat_interleave(g.n // g.n_groups))
                with torch.no_grad():
                    rows.append(_features(gating, hard=True).tolist())
                    models[str(i)] = prune(model).eval()
        finally:
            gating.load_state_dict(saved)
        structure = structure_key(gating)
        # (batch_size, *example_input.shape[1:])
        x = torch.randn(batch_size, *example_input.shape[1:], generator=gen).to(example_input)
        with torch.no_grad():
            times = compare_latency(
                models, x, rounds=rounds, repeats=20 if batch_size == 1 else 3, threads=threads
            )
        y = np.array([1e3 * times[str(i)] for i in range(samples + 1)])  # (n,) ms
        a = np.array(rows)  # (n, F)
        scale = np.maximum(np.abs(a).max(axis=0), 1e-12)  # (F,)
        order = list(range(1, samples + 1))
        rng.shuffle(order)
        held = order[: max(1, samples // 4)]
        fit = [0, *order[max(1, samples // 4) :]]
        w = 1.0 / y[:, None]  # (n, 1): relative errors, what a budget fraction feels
        coef = nonnegative_least_squares(a[fit] * w[fit] / scale, np.ones(len(fit))) / scale
        errors = np.abs(a[held] @ coef - y[held]) / y[held]  # (n_held,)
        coef = nonnegative_least_squares(a * w / scale, np.ones(len(y))) / scale
        warn_if_unreliable(float(np.median(errors)), "GatedLatencyModel")
        return GatedLatencyModel(
            coef=tuple(float(c) for c in coef),
            batch_size=batch_size,
            threads=int(threads) if threads is not None else torch.get_num_threads(),
            input_shape=tuple(int(d) for d in gating.input_shape),
            structure=structure,
            median_error=float(np.median(errors)),
            max_error=float(errors.max()),
            samples=samples,
        )

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        """The model as JSON (no pickle); :meth:`from_json` reads it back."""
        return json.dumps(
            {
                "coef": dict(zip(GATED_LATENCY_FEATURES, self.coef, strict=True)),
                "batch_size": self.batch_size,
                "threads": self.threads,
                "input_shape": list(self.input_shape),
                "structure": self.structure,
                "median_error": self.median_error,
                "max_error": self.max_error,
                "samples": self.samples,
            }
        )

    @staticmethod
    def from_json(text: str) -> GatedLatencyModel:
        """Read a model written by :meth:`to_json`; malformed input raises ``ValueError``.

        >>> lm = GatedLatencyModel((0.1, 0.01, 1e-7), 1, 1, (1, 1, 40), "ab12", 0.05, 0.1, 8)
        >>> GatedLatencyModel.from_json(lm.to_json()) == lm
        True
        """
        try:
            d: dict[str, Any] = loads_strict(text)
            coef = d["coef"]
            if not isinstance(coef, dict) or set(coef) != set(GATED_LATENCY_FEATURES):
                raise ValueError(f"coef must name exactly {GATED_LATENCY_FEATURES}")
            structure = d["structure"]
            if not isinstance(structure, str):
                raise ValueError(f"structure must be a string, got {structure!r}")
            return GatedLatencyModel(
                coef=tuple(_json_number(f"coef[{n!r}]", coef[n]) for n in GATED_LATENCY_FEATURES),
                batch_size=_json_int("batch_size", d["batch_size"]),
                threads=_json_int("threads", d["threads"]),
                input_shape=tuple(_json_int("input_shape", v) for v in d["input_shape"]),
                structure=structure,
                median_error=_json_number("median_error", d["median_error"]),
                max_error=_json_number("max_error", d["max_error"]),
                samples=_json_int("samples", d["samples"]),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError, DuplicateKeyError) as e:
            raise ValueError(f"not a GatedLatencyModel JSON: {e!r}") from e
