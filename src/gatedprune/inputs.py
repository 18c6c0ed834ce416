"""Example inputs as positional arguments: one tensor, or a tuple of them for a model whose
``forward`` takes several (a diffusion UNet's ``forward(x, t)``, an encoder-decoder's
``forward(src, tgt)``, a classifier's ``forward(x, mask)``).

A tuple always means positional arguments (``model(*inputs)``); a tuple of one tensor is the
same as that tensor. Anything else (a list, a dict, a named tuple such as a PackedSequence)
is one argument.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["as_inputs", "as_shapes", "describe_inputs", "tensor_inputs"]


def as_inputs(example_input: object) -> tuple[Any, ...]:
    """``example_input`` as the positional arguments of one call: a tuple as it is, anything
    else (a named tuple such as a PackedSequence too) as its only entry. An empty tuple is a
    ``TypeError`` (no input to run the model on).

    >>> import torch
    >>> len(as_inputs(torch.zeros(2))), len(as_inputs((torch.zeros(2), torch.ones(2))))
    (1, 2)
    """
    if type(example_input) is tuple:  # not a named tuple (PackedSequence): that is one input
        if not example_input:
            raise TypeError(
                "example_input is an empty tuple; expected a tensor or a tuple of the model's "
                "positional inputs"
            )
        return example_input
    return (example_input,)


def tensor_inputs(model: nn.Module, example_input: object, who: str) -> tuple[Tensor, ...]:
    """``example_input`` as a tuple of tensors, the positional inputs of ``model.forward``
    (``who`` names the caller in errors): a ``TypeError`` names an entry that is not a tensor,
    and a tuple too short for the required parameters or too long for the positional ones.

    >>> import torch
    >>> [tuple(x.shape) for x in tensor_inputs(nn.Linear(2, 3), torch.zeros(4, 2), "gate_")]
    [(4, 2)]
    """
    if isinstance(example_input, dict):
        raise TypeError(
            f"{who} takes the model's inputs as a tensor or a tuple of tensors (positional "
            "arguments), got a dict: keyword inputs are not supported; pass them positionally "
            "in the order of forward's parameters"
        )
    inputs = as_inputs(example_input)
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            where = "example_input" if len(inputs) == 1 else f"example_input[{i}]"
            if len(inputs) == 1 and type(example_input) is not tuple:
                raise TypeError(
                    f"{who}: example_input must be a torch.Tensor or a tuple of tensors (the "
                    f"model's positional inputs), got {type(x).__name__}"
                )
            raise TypeError(
                f"{who}: {where} must be a torch.Tensor (every input is traced as a tensor; "
                f"leave optional non-tensor arguments at their defaults), got "
                f"{type(x).__name__}"
            )
    _check_arity(model, len(inputs), who)
    return inputs


def _check_arity(model: nn.Module, n: int, who: str) -> None:
    """``TypeError`` if ``model.forward`` cannot take ``n`` positional inputs."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: let tracing decide
        return
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    takes_more = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    required = [p.name for p in positional if p.default is inspect.Parameter.empty]
    keyword_only = [
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    name = type(model).__name__
    if keyword_only:
        raise TypeError(
            f"{who}: {name}.forward requires keyword-only arguments ({', '.join(keyword_only)}), "
            "which example inputs (positional) cannot give: give them defaults or make them "
            "positional"
        )
    if n < len(required):
        raise TypeError(
            f"{who}: {name}.forward requires {len(required)} inputs ({', '.join(required)}), "
            f"but example_input gives {n}: pass a tuple of {len(required)} tensors"
        )
    if n > len(positional) and not takes_more:
        names = ", ".join(p.name for p in positional)
        raise TypeError(
            f"{who}: {name}.forward takes at most {len(positional)} positional inputs "
            f"({names}), but example_input gives {n}"
        )


def as_shapes(shapes: Sequence[int] | Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """One input's shape (a sequence of ints) or several inputs' shapes (a sequence of
    sequences of ints) as a tuple of shapes; ``TypeError`` for anything else.

    >>> as_shapes((2, 3)), as_shapes([(2, 3), (2,)])
    (((2, 3),), ((2, 3), (2,)))
    """
    items: list[Any] = list(shapes)
    try:
        if items and all(isinstance(d, Sequence) for d in items):
            return tuple(tuple(operator.index(d) for d in s) for s in items)
        return (tuple(operator.index(d) for d in items),)
    except TypeError:
        raise TypeError(
            f"expected an input shape (a sequence of ints) or one shape per input, got {shapes!r}"
        ) from None


def describe_inputs(inputs: tuple[Any, ...]) -> str:
    """The shapes (and dtypes) of ``inputs``, for error messages.

    >>> import torch
    >>> describe_inputs((torch.zeros(2, 3),))
    'of shape (2, 3) (dtype torch.float32)'
    """
    parts = [
        f"of shape {tuple(x.shape)} (dtype {x.dtype})"
        if isinstance(x, Tensor)
        else f"({type(x).__name__})"
        for x in inputs
    ]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"
