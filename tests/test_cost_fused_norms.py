"""FLOPs of the normalisation a fused norm + activation layer runs as a function in its own
``forward`` (timm's ``BatchNormAct2d`` and ``GroupNormAct``, replicated in
tests/test_gate_norm_act_layers.py): ``F.batch_norm`` 2 per element and ``F.group_norm`` 5,
as their module forms count, in ``cost`` of a plain model and in the expected and hard cost of
a gated one (before 2026-12-08 they counted 0)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from gating_helpers import examples, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate_norm_act_layers import BatchNormAct2d, EffNet, GNNet, GroupNormAct
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import gate_


def _plain_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every fused norm written as the plain norm and activation
    modules (``nn.BatchNorm2d`` / ``nn.GroupNorm`` of the same size, then its ``act``)."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, BatchNormAct2d):
            plain: nn.Module = nn.BatchNorm2d(
                m.num_features, track_running_stats=m.track_running_stats
            )
        elif isinstance(m, GroupNormAct):
            plain = nn.GroupNorm(m.num_groups, m.num_channels)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent), attr, nn.Sequential(plain, m.act))
    return twin


def test_plain_model_counts_fused_norms_as_modules() -> None:
    x = torch.randn(2, 3, 6, 6)
    fused = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), GroupNormAct(4, 2, nn.ReLU))
    twin = _plain_twin(fused)
    assert isinstance(twin[1][0], nn.BatchNorm2d)
    c = gp.cost(fused.eval(), x)
    assert c == gp.cost(twin.eval(), x)
    # conv 2 * 128 * 27 + 128 bias; BN 2, ReLU 1, GroupNorm 5, ReLU 1 per element (128)
    assert c.flops == 2 * 128 * 27 + 128 + (2 + 1 + 5 + 1) * 128


class Functional(nn.Module):
    """F.batch_norm / F.group_norm called in a forward without the module."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(4), persistent=False)  # constants of code
        self.register_buffer("var", torch.ones(4), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.batch_norm(x, self.mean, self.var)  # (B, 4, H, W)
        return F.group_norm(h, 2)  # (B, 4, H, W)


def test_functional_norms_counted_per_element() -> None:
    x = torch.randn(3, 4, 5, 5)
    model = nn.Sequential(nn.Identity(), Functional())
    assert gp.cost(model, x).flops == (2 + 5) * x.numel()


@settings(max_examples=examples(6), deadline=None)
@given(
    gn=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gated_cost_follows_kept_channels(gn: bool, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = GNNet() if gn else EffNet()
    x = torch.randn(2, 3, 6, 6, generator=gen)
    twin_full = _plain_twin(model).eval()
    gate_(model, x)
    # all gates open at gate_: the hard cost is the plain model's, fused norms included
    assert gp.cost(model, x, hard=True).flops.item() == gp.cost(twin_full, x).flops
    randomise_gates(model, gen)
    hard = gp.cost(model, x, hard=True)
    pruned = gp.prune(model).eval()
    c = gp.cost(pruned, x)
    assert (c.flops, c.params) == (hard.flops.item(), hard.params.item())
    assert c == gp.cost(_plain_twin(pruned).eval(), x)  # the pruned norms' own FLOPs
