"""Models converted for DDP with ``nn.SyncBatchNorm.convert_sync_batchnorm``: cost counts the
SyncBatchNorm layers like BatchNorm, gate_ prunes through them (converted before or after
gating), prune slices them exactly, and fold_batchnorm folds them."""

from __future__ import annotations

import pytest
import torch
from gating_helpers import examples, inserted_gating, random_gates, randomise_batchnorms
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import ResNet

import gatedprune as gp
from gatedprune.gating import export_plan, gate_

BN_FLOPS = 2  # per element, as documented for BatchNorm in eval mode


def test_cost_counts_sync_batchnorm_like_batchnorm() -> None:
    x = torch.randn(3, 4, 10)  # (B, C, L)
    plain = nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)).eval()
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(plain).eval()
    assert isinstance(sync[1], nn.SyncBatchNorm)
    c_sync, c_plain = gp.cost(sync, x), gp.cost(plain, x)
    assert isinstance(c_sync, gp.Cost)
    assert isinstance(c_plain, gp.Cost)
    conv_flops = 2 * 3 * 6 * 8 * 4 * 3 + 3 * 6 * 8  # MACs x 2 + bias, output length 8
    assert c_sync.flops == conv_flops + BN_FLOPS * 3 * 6 * 8
    assert c_sync == c_plain


@settings(max_examples=examples(8))
@given(seed=st.integers(0, 10_000))
def test_gated_sync_batchnorm_resnet_prunes_exactly(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(ResNet(1, widths=(8, 12)))
    randomise_batchnorms(model, gen)
    x = torch.randn(2, 1, 16)  # (B, 1, L)
    summary = gate_(model, x)
    assert summary.n_gates > 0
    random_gates(model, gen)
    for block_gate in inserted_gating(model).block_gates:
        block_gate.force_(torch.rand(1, generator=gen) > 0.5)
    model.eval()
    assert float(gp.cost(model, x).flops) > 0  # the expected cost
    pruned = gp.prune(model).eval()
    fresh = torch.randn(4, 1, 16, generator=gen)  # (B, 1, L)
    with torch.no_grad():
        assert float((pruned(fresh) - model(fresh)).abs().max()) <= 1e-5
    hard = gp.cost(model, x, hard=True)
    plain = gp.cost(pruned, x)
    assert isinstance(plain, gp.Cost)
    assert float(hard.flops) == plain.flops
    assert float(hard.params) == plain.params
    folded = gp.fold_batchnorm(pruned).eval()
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in folded.modules())
    with torch.no_grad():
        assert float((folded(fresh) - pruned(fresh)).abs().max()) <= 1e-5


def test_converting_after_gate_is_refused_at_the_next_forward() -> None:
    """convert_sync_batchnorm replaces the BatchNorm modules gate_ hooked: the model would
    run without those gates (it did, silently, before this check)."""
    torch.manual_seed(0)
    model: nn.Module = ResNet(1, widths=(8, 12))
    x = torch.randn(2, 1, 16)  # (B, 1, L)
    gate_(model, x)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with pytest.raises(
        TypeError,
        match=r"module 'stem\.1' was replaced after gate_ \(now a "
        r"SyncBatchNorm without its gate hook\)",
    ):
        model(x)
    # and so do prune and export_plan (before 2026-12-08 01:18 UTC they accepted the model)
    model.eval()
    for act in (gp.prune, export_plan):
        with pytest.raises(TypeError, match=r"module 'stem\.1' was replaced after gate_"):
            act(model)


def test_pruning_a_sync_batchnorm_model_removes_channels() -> None:
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(ResNet(1, widths=(8, 12)))
    x = torch.randn(2, 1, 16)  # (B, 1, L)
    gate_(model, x)
    with torch.no_grad():
        for gate in inserted_gating(model).group_gates:
            gate.force_(torch.arange(gate.n) < gate.n // 2)  # half of every group
    model.eval()
    pruned = gp.prune(model)
    before, after = gp.cost(ResNet(1, widths=(8, 12)).eval(), x), gp.cost(pruned, x)
    assert isinstance(before, gp.Cost)
    assert isinstance(after, gp.Cost)
    assert after.flops < before.flops
    assert after.params < before.params
    widths = sorted({m.num_features for m in pruned.modules() if isinstance(m, nn.SyncBatchNorm)})
    assert widths == [4, 6]


def test_fold_batchnorm_refuses_a_sync_batchnorm_without_statistics() -> None:
    """As for BatchNorm: a ValueError (its output depends on the batch)."""
    net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.SyncBatchNorm(4, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics"):
        gp.fold_batchnorm(net.eval())
