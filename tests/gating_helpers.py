"""Shared set-up for tests of models gated by ``gate_``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, gate_


def gate_all_open(model: nn.Module, x: Tensor) -> InsertedGating:
    """``gate_(model, x)`` with every channel-group gate open with probability 1, in eval mode."""
    gate_(model, x)
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.fill_(20.0)  # open with probability 1
    model.eval()
    return gating
