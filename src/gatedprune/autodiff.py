"""A tiny reverse-mode autodiff over Python floats, for small scalar formulas on a hot path.

Expected-cost formulas (liveness products, sums over edges) are a few hundred scalar operations.
As torch ops each would cost microseconds of dispatch and autograd bookkeeping in every training
step; as Python floats on a tape they cost well under a millisecond in total.
:func:`scalar_function` turns such a formula into a differentiable torch function of a vector.

A formula whose operations do not depend on the values (no branching on them) can be traced
once and compiled (:class:`CompiledFormula`) into straight-line Python code for its values and
Jacobian: the tape's float operations in the tape's order, so bit-identical results, without
creating an object per operation at every call (some 30x faster than the tape).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["CompiledFormula", "Tape", "Var", "scalar_function"]

Number = Union[float, "Var"]


class Tape:
    """Records every :class:`Var` created from its leaves, in creation (topological) order."""

    def __init__(self) -> None:
        self.nodes: list[Var] = []

    def leaf(self, value: float) -> Var:
        return Var(self, float(value), (), "leaf")

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

    Each Var also records its operation (``op``, and ``const`` for an operation with a float)
    so :class:`CompiledFormula` can turn a traced tape into code. Truth tests raise: a formula
    must not branch on the values it computes.

    >>> tape = Tape()
    >>> x, y = tape.leaf(2.0), tape.leaf(3.0)
    >>> z = x * y + (1 - x)
    >>> z.value, tape.gradients(z, [x, y])
    (5.0, [2.0, 2.0])
    """

    __slots__ = ("const", "grad", "op", "parents", "tape", "value")

    def __init__(
        self,
        tape: Tape,
        value: float,
        parents: tuple[tuple[Var, float], ...],
        op: str,
        const: float = 0.0,
    ) -> None:
        self.tape = tape
        self.value = value
        self.parents = parents
        self.op = op
        self.const = const
        self.grad = 0.0
        tape.nodes.append(self)

    def __add__(self, other: Number) -> Var:
        if isinstance(other, Var):
            return Var(self.tape, self.value + other.value, ((self, 1.0), (other, 1.0)), "add")
        return Var(self.tape, self.value + other, ((self, 1.0),), "add_c", float(other))

    __radd__ = __add__

    def __sub__(self, other: Number) -> Var:
        if isinstance(other, Var):
            return Var(self.tape, self.value - other.value, ((self, 1.0), (other, -1.0)), "sub")
        return Var(self.tape, self.value - other, ((self, 1.0),), "sub_c", float(other))

    def __rsub__(self, other: float) -> Var:
        return Var(self.tape, other - self.value, ((self, -1.0),), "rsub_c", float(other))

    def __mul__(self, other: Number) -> Var:
        if isinstance(other, Var):
            return Var(
                self.tape,
                self.value * other.value,
                ((self, other.value), (other, self.value)),
                "mul",
            )
        return Var(self.tape, self.value * other, ((self, float(other)),), "mul_c", float(other))

    __rmul__ = __mul__

    def __float__(self) -> float:
        return self.value

    def __bool__(self) -> bool:
        raise TypeError("a Var has no truth value: formulas must not branch on their values")


Formula = Callable[[Sequence[Any]], Sequence[Any]]


def refuse_create_graph() -> None:
    """Called first in the backward of gatedprune's autograd nodes, whose gradients are computed
    (from Jacobians and floats), not recorded: a second derivative through them would silently
    miss terms, so ``create_graph=True`` through them is an error."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "gatedprune's expected cost and budget penalty have first derivatives only: "
            "backward with create_graph=True through them is not supported"
        )


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
        refuse_create_graph()
        (jac,) = ctx.saved_tensors  # (n_out, n_in)
        return grad_out @ jac, None  # (n_out,) @ (n_out, n_in) -> (n_in,)


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


def _literal(c: float) -> str:
    if not math.isfinite(c):
        return f"float({str(c)!r})"
    return repr(c)


def _forward_line(node: Var, name: dict[int, str]) -> str:
    a = name[id(node.parents[0][0])] if node.parents else ""
    b = name[id(node.parents[1][0])] if len(node.parents) > 1 else ""
    c = _literal(node.const)
    expr = {
        "add": f"{a} + {b}",
        "add_c": f"{a} + {c}",
        "sub": f"{a} - {b}",
        "sub_c": f"{a} - {c}",
        "rsub_c": f"{c} - {a}",
        "mul": f"{a} * {b}",
        "mul_c": f"{a} * {c}",
    }[node.op]
    return f"{name[id(node)]} = {expr}"


def _reverse_lines(
    tape: Tape, output: Var, name: dict[int, str], sweep: int
) -> tuple[list[str], dict[int, str]]:
    """Code of one reverse sweep from ``output``, accumulating in the tape's order, and the
    adjoint name (``g<sweep>_v<k>``) of every node it reaches."""
    adj: dict[int, str] = {id(output): "1.0"}
    lines: list[str] = []
    for node in reversed(tape.nodes):
        g = adj.get(id(node))
        if g is None:
            continue
        for k, (parent, local) in enumerate(node.parents):
            if node.op == "mul":  # the local derivative is the other factor's value
                term = f"{name[id(node.parents[1 - k][0])]} * {g}"
            elif local == 1.0:
                term = g
            elif local == -1.0:
                term = f"-{g}"
            else:
                term = f"{_literal(local)} * {g}"
            key = id(parent)
            if key not in adj:
                adj[key] = f"g{sweep}_{name[key]}"
                lines.append(f"{adj[key]} = {term}")
            elif term.startswith("-"):  # a + (-b) == a - b exactly
                lines.append(f"{adj[key]} -= {term[1:]}")
            else:
                lines.append(f"{adj[key]} += {term}")
    return lines, adj


class CompiledFormula:
    """``formula`` (as for :func:`scalar_function`) of ``n_inputs`` numbers, traced once on a
    :class:`Tape` and compiled into straight-line float code returning its values and Jacobian.

    The code performs the tape's float operations in the tape's order, so values and Jacobian
    are bit-identical to the tape's. The formula's operations must not depend on the input
    values (a :class:`Var` refuses truth tests, so branching on one fails while tracing).

    >>> f = CompiledFormula(lambda v: [v[0] * v[1], 1 - v[0]], 2)
    >>> f([2.0, 3.0])
    ([6.0, -1.0], [[3.0, 2.0], [-1.0, 0.0]])
    """

    def __init__(self, formula: Formula, n_inputs: int) -> None:
        if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 0:
            raise ValueError(f"n_inputs must be an int >= 0, got {n_inputs!r}")
        self.n_inputs = n_inputs
        tape = Tape()
        leaves = [tape.leaf(0.5) for _ in range(n_inputs)]
        outputs = list(formula(leaves))
        name = {id(v): f"v{k}" for k, v in enumerate(tape.nodes)}
        body = [f"({', '.join(name[id(v)] for v in leaves)}{',' if leaves else ''}) = z"]
        body += [_forward_line(v, name) for v in tape.nodes if v.op != "leaf"]
        values, rows = [], []
        for sweep, out in enumerate(outputs):
            if isinstance(out, Var):
                if out.tape is not tape:
                    raise ValueError("the formula returned a Var of another tape")
                values.append(name[id(out)])
                lines, adj = _reverse_lines(tape, out, name, sweep)
                body += lines
                rows.append([adj.get(id(leaf), "0.0") for leaf in leaves])
            else:  # the formula does not depend on z here
                values.append(_literal(float(out)))
                rows.append(["0.0"] * n_inputs)
        jac = ", ".join(f"[{', '.join(r)}]" for r in rows)
        body.append(f"return [{', '.join(values)}], [{jac}]")
        self.source = "def compiled(z):\n" + "".join(f"    {line}\n" for line in body)
        namespace: dict[str, Any] = {}
        exec(compile(self.source, "<CompiledFormula>", "exec"), namespace)
        self._fn: Callable[[Sequence[float]], tuple[list[float], list[list[float]]]] = namespace[
            "compiled"
        ]

    def __call__(self, z: Sequence[float]) -> tuple[list[float], list[list[float]]]:
        """Values and Jacobian (one row per output) of the formula at ``z``."""
        if len(z) != self.n_inputs:
            raise ValueError(f"expected {self.n_inputs} inputs, got {len(z)}")
        return self._fn(z)
