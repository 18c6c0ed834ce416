"""gatedprune: networks that prune themselves through learned gates.

>>> import torch, gatedprune
>>> net = gatedprune.ShortcutMLP(40, [32, 32], 10)
>>> small = gatedprune.prune(net.eval())
"""

from .base import GatedModule
from .costs import Cost, ExpectedCost, cost, register_cost
from .gates import (
    Gate,
    HardConcrete,
    HardConcreteGate,
    Sigmoid,
    SigmoidGate,
    gate_modules,
    harden,
)
from .plain import OffsetConv1d, PlainShortcutNet
from .prune import prune
from .shortcut import ShortcutConv1d, ShortcutMLP

__all__ = [
    "Cost",
    "ExpectedCost",
    "Gate",
    "GatedModule",
    "HardConcrete",
    "HardConcreteGate",
    "OffsetConv1d",
    "PlainShortcutNet",
    "ShortcutConv1d",
    "ShortcutMLP",
    "Sigmoid",
    "SigmoidGate",
    "cost",
    "gate_modules",
    "harden",
    "prune",
    "register_cost",
]

__version__ = "0.1.0"
