"""A tiny reverse-mode autodiff over Python floats, for small scalar formulas on a hot path.

Expected-cost formulas (liveness products, sums over edges) are a few hundred scalar operations.
As torch ops each would cost microseconds of dispatch and autograd bookkeeping in every training
step; as Python floats on a tape they cost well under a millisecond in total.
:func:`scalar_function` turns such a formula into a differentiable torch function of a vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["Tape", "Var", "scalar_function"]

Number = Union[float, "Var"]


class Tape:
    """Records every :class:`Var` created from its leaves, in creation (topological) order."""

    def __init__(self) -> None:
        self.nodes: list[Var] = []

    def leaf(self, value: float) -> Var:
        return Var(self, float(value), ())

    def gradients(self, output: Var, leaves: Sequence[Var]) -> list[float]:
        """d output / d leaf for every leaf (one reverse sweep)."""
        for node in self.nodes:
            node.grad = 0.0
        output.grad = 1.0
        for node in reversed(self.nodes):
            g = node.grad
            if g != 0.0:
                for parent, local in node.parents:
                    parent.grad += local * g
        return [leaf.grad for leaf in leaves]


class Var:
    """A float on a :class:`Tape`; supports ``+``, ``-`` and ``*`` with floats and Vars.

    >>> tape = Tape()
    >>> x, y = tape.leaf(2.0), tape.leaf(3.0)
    >>> z = x * y + (1 - x)
    >>> z.value, tape.gradients(z, [x, y])
    (5.0, [2.0, 2.0])
    """

    __slots__ = ("grad", "parents", "tape", "value")

    def __init__(self, tape: Tape, value: float, parents: tuple[tuple[Var, float], ...]) -> None:
        self.tape = tape
        self.value = value
        self.parents = parents
        self.grad = 0.0
        tape.nodes.append(self)

    def __add__(self, other: Number) -> Var:
        if isinstance(other, Var):
            return Var(self.tape, self.value + other.value, ((self, 1.0), (other, 1.0)))
        return Var(self.tape, self.value + other, ((self, 1.0),))

    __radd__ = __add__

    def __sub__(self, other: Number) -> Var:
        if isinstance(other, Var):
            return Var(self.tape, self.value - other.value, ((self, 1.0), (other, -1.0)))
        return Var(self.tape, self.value - other, ((self, 1.0),))

    def __rsub__(self, other: float) -> Var:
        return Var(self.tape, other - self.value, ((self, -1.0),))

    def __mul__(self, other: Number) -> Var:
        if isinstance(other, Var):
            return Var(
                self.tape, self.value * other.value, ((self, other.value), (other, self.value))
            )
        return Var(self.tape, self.value * other, ((self, float(other)),))

    __rmul__ = __mul__

    def __float__(self) -> float:
        return self.value


Formula = Callable[[Sequence[Any]], Sequence[Any]]


class _ScalarFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, formula: Formula) -> Tensor:
        tape = Tape()
        leaves = [tape.leaf(v) for v in z.detach().double().tolist()]
        outputs = formula(leaves)
        values, grads = [], []
        for out in outputs:
            if isinstance(out, Var):
                values.append(out.value)
                grads.append(tape.gradients(out, leaves))
            else:  # the formula does not depend on z here
                values.append(float(out))
                grads.append([0.0] * len(leaves))
        ctx.save_for_backward(torch.tensor(grads, dtype=z.dtype, device=z.device))
        return torch.tensor(values, dtype=z.dtype, device=z.device)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        (jac,) = ctx.saved_tensors  # (n_out, n_in)
        return grad_out @ jac, None


def scalar_function(formula: Formula, z: Tensor) -> Tensor:
    """``formula`` (a function of a sequence of numbers returning a sequence of numbers,
    written with ``+ - *`` only) applied to the vector ``z``, differentiable w.r.t. ``z``.

    >>> z = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    >>> out = scalar_function(lambda v: [v[0] * v[1], 1 - v[0]], z)
    >>> out.sum().backward()
    >>> z.grad.tolist()
    [2.0, 2.0]
    """
    out: Tensor = _ScalarFunction.apply(z, formula)  # type: ignore[no-untyped-call]
    return out
