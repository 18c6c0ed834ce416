"""Shared set-up for tests of models gated by ``gate_``."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, ScaledAdd, gate_
from gatedprune.gating.latency import structure_key


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


def inserted_gating(model: nn.Module) -> InsertedGating:
    """The gating ``gate_`` attached to ``model``."""
    g = model.gatedprune
    assert isinstance(g, InsertedGating)
    return g


def fixed_latency_model(model: nn.Module, coef: tuple[float, float, float]) -> gp.GatedLatencyModel:
    """A GatedLatencyModel for ``model`` (gated with ``gate_``) with the given coefficients
    (constant ms, ms per module call, ms per FLOP) instead of calibrated ones."""
    g = inserted_gating(model)
    return gp.GatedLatencyModel(
        coef=coef,
        batch_size=1,
        threads=1,
        input_shape=tuple(g.input_shape),
        structure=structure_key(g),
        median_error=0.0,
        max_error=0.0,
        samples=4,
    )


def module_calls(model: nn.Module, x: Tensor) -> int:
    """Module calls of one forward (nn.Identity placeholders of removed blocks aside)."""
    count = [0]

    def hook(*_: object) -> None:
        count[0] += 1

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves if not isinstance(m, nn.Identity)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return count[0]


def random_gates(model: nn.Module, gen: torch.Generator, low: float = -4.0) -> None:
    """Every channel-group gate of a ``gate_`` model at a random log alpha in ``[low, 4)``."""
    with torch.no_grad():
        for gate in inserted_gating(model).group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.copy_(torch.empty(gate.n).uniform_(low, 4.0, generator=gen))


def shortcut_flops(model: nn.Module, x: Tensor) -> int:
    """FLOPs of the ScaledAdd modules (kept new shortcuts, 2 per element) of a pruned model."""
    total = [0]

    def hook(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        total[0] += 2 * out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ScaledAdd)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


def randomise_batchnorms(model: nn.Module, gen: torch.Generator) -> None:
    """Random running statistics and affine parameters for every affine BatchNorm (any
    ``_BatchNorm``: 1d/2d/3d and SyncBatchNorm), so folding them is not a no-op."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                assert m.running_mean is not None
                assert m.running_var is not None
                m.running_mean.normal_(0.0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.normal_(1.0, 0.3, generator=gen)
                m.bias.normal_(0.0, 0.3, generator=gen)


def examples(n: int) -> int:
    """A hypothesis test's ``max_examples``: ``n`` times ``GATEDPRUNE_HYPOTHESIS_SCALE``
    (default 1; e.g. 20 for a long search for rare failures, not for CI)."""
    scale = int(os.environ.get("GATEDPRUNE_HYPOTHESIS_SCALE", "1"))
    if scale < 1:
        raise ValueError(f"GATEDPRUNE_HYPOTHESIS_SCALE must be an int >= 1, got {scale}")
    return n * scale
