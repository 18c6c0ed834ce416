"""prune keeps the training flags: every module of a model pruned in eval mode is in eval mode
(modules prune creates included: an emptied block's nn.Identity, rewritten forwards)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gatedprune as gp
from gatedprune.gating import InsertedGating
from gatedprune.gating.models import ResNet1d


def _gating(model: nn.Module) -> InsertedGating:
    return next(m for m in model.modules() if isinstance(m, InsertedGating))


@pytest.mark.parametrize("shortcuts", [None, "dense"])
@pytest.mark.parametrize("close", ["blocks", "half"])
def test_pruned_modules_keep_eval_mode(shortcuts: str | None, close: str) -> None:
    torch.manual_seed(0)
    model = ResNet1d(widths=(8, 16), blocks=(2, 2))
    x = torch.randn(3, 1, 40)  # (B, C, L)
    gp.gate_(model, x, shortcuts=shortcuts)
    gating = _gating(model)
    gen = torch.Generator().manual_seed(1)
    for gate in gating.block_gates:
        gate.force_(
            torch.zeros(gate.n, dtype=torch.bool)
            if close == "blocks"
            else torch.rand(gate.n, generator=gen) > 0.5
        )
    for gate in gating.group_gates:
        gate.force_(torch.rand(gate.n, generator=gen) > 0.3)
    model.eval()
    pruned = gp.prune(model)
    in_training = [name or "<root>" for name, m in pruned.named_modules() if m.training]
    assert in_training == []
    with torch.no_grad():
        assert float((pruned(x) - model(x)).abs().max()) <= 1e-5
