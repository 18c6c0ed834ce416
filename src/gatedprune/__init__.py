"""gatedprune: networks that prune themselves through learned gates.

>>> import torch, gatedprune
>>> net = gatedprune.ShortcutMLP(40, [32, 32], 10)
>>> small = gatedprune.prune(net.eval())
>>> x = torch.randn(4, 40)
>>> bool((small.eval()(x) - net(x)).abs().max() <= 1e-5)
True
"""

from .base import GatedModule, ModelGating
from .budget import Budget
from .calibrate import recalibrate_batchnorm
from .costs import Cost, ExpectedCost, cost, register_cost
from .export import export_onnx, onnx_session
from .fold import fold_batchnorm
from .gates import (
    Gate,
    HardConcrete,
    HardConcreteGate,
    Sigmoid,
    SigmoidGate,
    gate_modules,
    harden,
)
from .gating import (
    GatedLatencyModel,
    GatingSummary,
    InsertedGating,
    ResNet1d,
    apply_plan,
    export_plan,
    gate_,
)
from .io import load, register_model_class, save
from .latency import LatencyModel
from .plain import OffsetConv1d, PlainShortcutNet
from .plain_recurrent import PlainShortcutLSTM
from .profiling import measure_latency, steady_allocator
from .prune import prune
from .recurrent import ShortcutLSTM
from .shortcut import ShortcutConv1d, ShortcutMLP
from .snap import snap_to_budget
from .train import Trainer

__all__ = [
    "Budget",
    "Cost",
    "ExpectedCost",
    "Gate",
    "GatedLatencyModel",
    "GatedModule",
    "GatingSummary",
    "HardConcrete",
    "HardConcreteGate",
    "InsertedGating",
    "LatencyModel",
    "ModelGating",
    "OffsetConv1d",
    "PlainShortcutLSTM",
    "PlainShortcutNet",
    "ResNet1d",
    "ShortcutConv1d",
    "ShortcutLSTM",
    "ShortcutMLP",
    "Sigmoid",
    "SigmoidGate",
    "Trainer",
    "apply_plan",
    "cost",
    "export_onnx",
    "export_plan",
    "fold_batchnorm",
    "gate_",
    "gate_modules",
    "harden",
    "load",
    "measure_latency",
    "onnx_session",
    "prune",
    "recalibrate_batchnorm",
    "register_cost",
    "register_model_class",
    "save",
    "snap_to_budget",
    "steady_allocator",
]

__version__ = "0.1.0"
