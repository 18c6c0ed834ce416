"""Counting FLOPs and parameters of plain and gated modules.

Conventions (the same for plain modules and for the expected cost of gated ones):

* FLOPs are counted for one forward pass on ``example_input`` as given (pass a batch of one
  for per-sample figures). Linear, convolution, matmul and recurrent layers count
  **2 FLOPs per multiply-accumulate**; a bias (or offset) add counts 1 per output element.
* Element-wise layers: activations 1 per element, BatchNorm (eval, affine) 2 per element,
  LayerNorm/GroupNorm 5 per element; dropout, flatten, identity and reshapes 0.
* Pooling counts 1 per input element inside each window (``kernel`` per output element;
  adaptive pooling sums its real window sizes).
* Only modules are counted: functional calls in a ``forward`` (``torch.cat``, ``x + y``,
  ``F.relu``) are not. A leaf module of an unknown kind raises a ``TypeError`` rather than
  being counted as free.
* Parameters: every parameter of the module (buffers such as BatchNorm statistics excluded).

Gated modules (:class:`~gatedprune.base.GatedModule`) report their own expected cost, computed
from the gates' open probabilities; ``cost`` of a model that *contains* gated modules adds
their expected cost to the exact cost of the plain rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .base import GatedModule, find_model_gating

__all__ = ["Cost", "CostProgram", "ExpectedCost", "cost"]

FLOPS_PER_MAC = 2
ACT_FLOPS = 1
BATCHNORM_FLOPS = 2
LAYERNORM_FLOPS = 5


@dataclass(frozen=True)
class Cost:
    """Exact cost of a plain module: FLOPs of one forward pass and parameter count."""

    flops: int
    params: int


@dataclass(frozen=True)
class ExpectedCost:
    """Expected cost of a gated model (0-dim float64 tensors, differentiable w.r.t. gates)."""

    flops: Tensor
    params: Tensor

    def detach(self) -> Cost:
        """The expected cost rounded to a plain :class:`Cost` (exact at hard 0/1 gates)."""
        return Cost(flops=round(float(self.flops)), params=round(float(self.params)))


def _numel(t: Any) -> int:
    if isinstance(t, Tensor):
        return t.numel()
    if isinstance(t, tuple | list) and t:
        return _numel(t[0])
    raise TypeError(f"cannot count the output of type {type(t).__name__}")


def _adaptive_window_sum(n_in: int, n_out: int) -> int:
    """Sum of window sizes of adaptive pooling from ``n_in`` to ``n_out`` positions."""
    total = 0
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        total += end - start
    return total


def _linear(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    assert isinstance(m, nn.Linear)
    flops = FLOPS_PER_MAC * out.numel() * m.in_features
    return flops + (out.numel() if m.bias is not None else 0)


def _conv(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    assert isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    k = 1
    for s in m.kernel_size:
        k *= s
    flops = FLOPS_PER_MAC * out.numel() * (m.in_channels // m.groups) * k
    return flops + (out.numel() if m.bias is not None else 0)


def _per_element(rate: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], int]:
    def count(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
        return rate * _numel(out)

    return count


def _pool(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    ks = m.kernel_size  # type: ignore[attr-defined]
    k = 1
    for s in ks if isinstance(ks, tuple) else (ks,) * (out.dim() - 2):
        k *= int(s)
    return k * out.numel()


def _adaptive_pool(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> int:
    x = inp[0]
    spatial_in = x.shape[2:]
    spatial_out = out.shape[2:]
    per_channel = 1
    for a, b in zip(spatial_in, spatial_out, strict=True):
        per_channel *= _adaptive_window_sum(int(a), int(b))
    return per_channel * x.shape[0] * x.shape[1]


def _zero(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    return 0


_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
)

Handler = Callable[[nn.Module, tuple[Tensor, ...], Any], int]

# Ordered (type, handler) pairs: the first isinstance match counts the module.
_HANDLERS: list[tuple[tuple[type[nn.Module], ...], Handler]] = [
    ((nn.Linear,), _linear),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _per_element(BATCHNORM_FLOPS)),
    ((nn.LayerNorm, nn.GroupNorm), _per_element(LAYERNORM_FLOPS)),
    (_ACTIVATIONS, _per_element(ACT_FLOPS)),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d), _pool),
    (
        (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d),
        _adaptive_pool,
    ),
    ((nn.Dropout, nn.Flatten, nn.Identity, nn.Unflatten), _zero),
]


def register_cost(types: tuple[type[nn.Module], ...], handler: Handler) -> None:
    """Teach :func:`cost` to count a leaf module type (``handler(module, inputs, output)``
    returns FLOPs). Handlers registered later take precedence.

    >>> register_cost((nn.Identity,), lambda m, i, o: 0)
    """
    _HANDLERS.insert(0, (types, handler))


def _handler_for(m: nn.Module) -> Handler | None:
    own = getattr(m, "flops_of", None)
    if callable(own):  # a module that counts itself takes precedence
        return lambda mod, i, o: int(own(i, o))
    for types, handler in _HANDLERS:
        if isinstance(m, types):
            return handler
    return None


@dataclass
class CostProgram:
    """The cost of a model as a fixed part plus its gated modules and their input shapes.

    Built once from one forward pass (:meth:`trace`); evaluating it afterwards needs no forward
    pass, so budgets can recompute the expected cost at every training step cheaply.
    """

    fixed_flops: int = 0
    fixed_params: int = 0
    gated: list[tuple[GatedModule, tuple[int, ...]]] = field(default_factory=list)

    @staticmethod
    def trace(module: nn.Module, example_input: Any) -> CostProgram:
        """Run ``module`` once on ``example_input`` (no grad, eval mode) and record its costs."""
        program = CostProgram()
        gating = find_model_gating(module)
        if gating is not None:  # gates inserted by gate_: the gating speaks for the whole model
            if not isinstance(example_input, Tensor):
                raise TypeError("a gated model's example input must be a tensor")
            program.gated.append((gating, tuple(example_input.shape)))
            return program
        handles = []
        errors: list[str] = []
        seen_gated: set[int] = set()

        def make_hook(name: str, m: nn.Module) -> Callable[..., None]:
            if isinstance(m, GatedModule):

                def gated_hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
                    if id(mod) in seen_gated:
                        raise ValueError(
                            f"gated module {name or type(mod).__name__} runs more than once per "
                            "forward pass; the cost model supports one call per module"
                        )
                    seen_gated.add(id(mod))
                    if not inp or not isinstance(inp[0], Tensor):
                        raise TypeError(f"gated module {name} must take a tensor input")
                    program.gated.append((mod, tuple(inp[0].shape)))  # type: ignore[arg-type]

                return gated_hook
            handler = _handler_for(m)

            def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
                if handler is None:
                    errors.append(f"{name or type(mod).__name__} ({type(mod).__name__})")
                    return
                program.fixed_flops += handler(mod, inp, out)

            return hook

        gated_roots: list[nn.Module] = []
        gated_prefixes: list[str] = []
        for name, m in module.named_modules():
            if any(name.startswith(p) for p in gated_prefixes):
                continue  # counted by the gated module that holds it
            if isinstance(m, GatedModule):
                gated_roots.append(m)
                gated_prefixes.append(f"{name}." if name else "")
                handles.append(m.register_forward_hook(make_hook(name, m)))
            elif not any(True for _ in m.children()):
                handles.append(m.register_forward_hook(make_hook(name, m)))
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                module(example_input)
        finally:
            for h in handles:
                h.remove()
            module.train(was_training)
        if errors:
            raise TypeError(
                "cost() does not know how to count these leaf modules: "
                + ", ".join(errors)
                + "; register them with gatedprune.costs.register_cost or give them a "
                "flops_of(inputs, output) method"
            )
        gated_param_ids = {id(p) for r in gated_roots for p in r.parameters()}
        program.fixed_params = sum(
            p.numel() for p in module.parameters() if id(p) not in gated_param_ids
        )
        return program

    def evaluate(self, *, hard: bool = False) -> ExpectedCost:
        """Expected (``hard=False``) or exact-at-hard-gates cost as float64 tensors."""
        flops = torch.tensor(float(self.fixed_flops), dtype=torch.float64)
        params = torch.tensor(float(self.fixed_params), dtype=torch.float64)
        for mod, shape in self.gated:
            f, p = mod.expected_cost(shape, hard=hard)
            flops = flops + f
            params = params + p
        return ExpectedCost(flops=flops, params=params)


def cost(module: nn.Module, example_input: Any, *, hard: bool = False) -> Cost | ExpectedCost:
    """FLOPs and parameters of ``module`` for one forward pass on ``example_input``.

    A plain module gives an exact :class:`Cost` (ints). A model with gates gives an
    :class:`ExpectedCost` (differentiable float64 tensors): the expectation over the gates'
    open probabilities, or with ``hard=True`` the cost at the exact open/closed decisions,
    which equals ``cost(prune(model), example_input)``.

    >>> c = cost(nn.Linear(10, 4), torch.zeros(1, 10))
    >>> (c.flops, c.params)
    (84, 44)
    """
    program = CostProgram.trace(module, example_input)
    if not program.gated:
        return Cost(flops=program.fixed_flops, params=program.fixed_params)
    return program.evaluate(hard=hard)
