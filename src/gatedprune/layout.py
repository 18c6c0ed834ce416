"""The wiring of a shortcut network, shared by the gated networks and their pruned plain form.

Nodes are numbered ``0..L``: node 0 is the input, node ``l`` the output of layer ``l``. Layer
``l`` reads the channel-wise concatenation of its source nodes (each average-pooled to the
layer's resolution stage when it comes from an earlier stage); the head reads its source nodes
(each adaptively pooled to ``head_pool`` positions and flattened when spatial).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "Activation", "LayerSpec", "NetSpec"]

Activation = Literal["relu", "gelu", "silu", "tanh", "identity"]

MAX_STAGE = 62
"""The largest resolution stage: stage ``s`` halves the length ``s`` times, so an input needs
``2**s`` positions, and a tensor holds fewer than ``2**63`` elements."""

# Activation name -> (functional form, module class). An explicit table: the accepted names
# are the keys, anything else is refused with a clear error.
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], type[nn.Module]]] = {
    "relu": (F.relu, nn.ReLU),
    "gelu": (F.gelu, nn.GELU),
    "silu": (F.silu, nn.SiLU),
    "tanh": (F.tanh, nn.Tanh),
    "identity": (lambda t: t, nn.Identity),
}


def check_activation(name: object) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}")
    return name


@dataclass(frozen=True)
class LayerSpec:
    """One layer: its source nodes, output width and resolution stage."""

    sources: tuple[int, ...]
    width: int
    stage: int = 0
    has_offset: bool = False  # pruned conv layers only: a fixed additive (C, L) map


@dataclass(frozen=True)
class NetSpec:
    """Structure of a shortcut network (gated or plain)."""

    spatial: bool
    in_width: int
    layers: tuple[LayerSpec, ...]
    head_sources: tuple[int, ...]
    out_features: int
    kernel_size: int = 1
    head_pool: int = 1
    norm: bool = False
    activation: str = "relu"
    input_length: int | None = None

    def node_width(self, node: int) -> int:
        return self.in_width if node == 0 else self.layers[node - 1].width

    def node_stage(self, node: int) -> int:
        return 0 if node == 0 else self.layers[node - 1].stage

    def stage_length(self, length: int, stage: int) -> int:
        return int(length // (2**stage))

    def pool_pairs(self) -> list[tuple[int, int]]:
        """(source node, target stage) pairs that need average pooling, in first-use order."""
        pairs: list[tuple[int, int]] = []
        for layer in self.layers:
            for j in layer.sources:
                if self.node_stage(j) < layer.stage and (j, layer.stage) not in pairs:
                    pairs.append((j, layer.stage))
        return pairs

    def to_json(self) -> dict[str, Any]:
        return {
            "spatial": self.spatial,
            "in_width": self.in_width,
            "layers": [
                {
                    "sources": list(x.sources),
                    "width": x.width,
                    "stage": x.stage,
                    "has_offset": x.has_offset,
                }
                for x in self.layers
            ],
            "head_sources": list(self.head_sources),
            "out_features": self.out_features,
            "kernel_size": self.kernel_size,
            "head_pool": self.head_pool,
            "norm": self.norm,
            "activation": self.activation,
            "input_length": self.input_length,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> NetSpec:
        try:
            layers = tuple(
                LayerSpec(
                    sources=tuple(int(s) for s in x["sources"]),
                    width=int(x["width"]),
                    stage=int(x["stage"]),
                    has_offset=bool(x["has_offset"]),
                )
                for x in d["layers"]
            )
            spec = NetSpec(
                spatial=bool(d["spatial"]),
                in_width=int(d["in_width"]),
                layers=layers,
                head_sources=tuple(int(s) for s in d["head_sources"]),
                out_features=int(d["out_features"]),
                kernel_size=int(d["kernel_size"]),
                head_pool=int(d["head_pool"]),
                norm=bool(d["norm"]),
                activation=check_activation(d["activation"]),
                input_length=None if d["input_length"] is None else int(d["input_length"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed network structure: {e!r}") from e
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise ``ValueError`` if the wiring is inconsistent."""
        if self.in_width < 1 or self.out_features < 1:
            raise ValueError(
                f"in_width and out_features must be >= 1, got {self.in_width}, {self.out_features}"
            )
        for i, layer in enumerate(self.layers, start=1):
            if layer.width < 0:
                raise ValueError(f"layer {i} has negative width {layer.width}")
            for j in layer.sources:
                if not 0 <= j < i:
                    raise ValueError(f"layer {i} reads node {j}, expected a node in [0, {i})")
                if self.node_stage(j) > layer.stage:
                    raise ValueError(f"layer {i} reads node {j} of a later stage")
        for j in self.head_sources:
            if not 0 <= j <= len(self.layers):
                raise ValueError(f"head reads node {j}, expected a node in [0, {len(self.layers)}]")
        for i, layer in enumerate(self.layers, start=1):
            if layer.stage < 0:
                raise ValueError(f"layer {i} has negative stage {layer.stage}")
            if not self.spatial and layer.stage != 0:
                raise ValueError(
                    f"layer {i} has stage {layer.stage} (layers[{i - 1}].stage), but a "
                    "non-spatial network has only stage 0 (stages halve a length)"
                )
            if layer.stage > MAX_STAGE:
                raise ValueError(
                    f"layer {i} has stage {layer.stage} (layers[{i - 1}].stage), expected at "
                    f"most {MAX_STAGE} (an input needs 2**stage positions)"
                )
        if self.spatial:
            if self.kernel_size < 1 or self.kernel_size % 2 != 1:
                raise ValueError(f"kernel_size must be a positive odd int, got {self.kernel_size}")
            if self.head_pool < 1:
                raise ValueError(f"head_pool must be >= 1, got {self.head_pool}")
            if self.input_length is not None and self.input_length < 1:
                raise ValueError(f"input_length must be None or >= 1, got {self.input_length}")
            last = max((layer.stage for layer in self.layers), default=0)
            if self.input_length is not None and self.input_length < 2**last:
                raise ValueError(
                    f"a layer has stage {last}, which needs inputs of length >= 2**{last} = "
                    f"{2**last}, but input_length is {self.input_length}"
                )


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (numpy integers accepted, bools refused).

    >>> check_int("kernel_size", 3)
    3
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got the bool {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_flag(name: str, value: object) -> bool:
    """``value`` as a bool; a ``TypeError`` unless it is one (``numpy.bool_`` too): a string
    such as ``"no"`` or a number must not be read by its truthiness.

    >>> check_flag("shortcuts", False), check_flag("hard", np.bool_(True))
    (False, True)
    """
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_sizes(name: str, values: Sequence[int]) -> tuple[int, ...]:
    """Validate a non-empty sequence of positive layer sizes (numpy integers accepted).

    >>> check_sizes("widths", [8, 4])
    (8, 4)
    """
    if isinstance(values, int | str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    if not values:
        raise ValueError(f"{name} must hold at least one size, got {values!r}")
    out = []
    for v in values:
        try:
            out.append(check_int(name, v))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must hold positive ints, got {v!r} in {values!r}") from None
    return tuple(out)
