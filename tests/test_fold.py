"""fold_batchnorm: Conv -> BatchNorm pairs folded exactly; recalibrate_batchnorm."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from zoo import ZOO, DenseBlockNet, randomise_norms

import gatedprune
from gatedprune import fold_batchnorm, recalibrate_batchnorm
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, ScaledAdd, gate_

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, _NORMS) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet1d_basic", "resnet2d_bottleneck", "vgg"])
def test_folded_zoo_models_equal_eval_model(name: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    make, shape = ZOO[name]
    model = make()
    randomise_norms(model, gen)
    model.train()  # folding uses the running statistics: eval semantics, model left untouched
    folded = fold_batchnorm(model)
    assert model.training
    assert not folded.training
    assert _norms(model) > 0
    assert _norms(folded) == 0  # every BatchNorm of these models follows a convolution
    x = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        assert (folded(x) - model.eval()(x)).abs().max().item() <= 1e-5
    c, c0 = gatedprune.cost(folded, x), gatedprune.cost(model, x)
    assert isinstance(c, Cost)
    assert isinstance(c0, Cost)
    assert c.flops < c0.flops  # one element-wise pass less per folded pair


def test_batchnorm_not_after_a_conv_stays() -> None:
    torch.manual_seed(0)
    model = DenseBlockNet()  # BN-ReLU-conv: BatchNorms read concatenations, not convs
    randomise_norms(model, torch.Generator().manual_seed(1))
    before = _norms(model)
    folded = fold_batchnorm(model)
    assert 0 < _norms(folded) <= before
    x = torch.randn(3, 1, 20)
    with torch.no_grad():
        assert (folded(x) - model.eval()(x)).abs().max().item() <= 1e-5


def test_conv_read_twice_is_not_folded() -> None:
    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: Tensor) -> Tensor:
            z = self.conv(x)  # (B, 3, L)
            return self.bn(z) + z

    model = TwoReaders()
    randomise_norms(model, torch.Generator().manual_seed(2))
    folded = fold_batchnorm(model)
    assert _norms(folded) == 1
    x = torch.randn(2, 2, 9)
    with torch.no_grad():
        assert (folded(x) - model.eval()(x)).abs().max().item() <= 1e-5


def test_pruned_resnet_with_shortcuts_folds_exactly() -> None:
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    model = gatedprune.ResNet1d(widths=(6, 8), blocks=(3, 2), num_classes=4).eval()
    randomise_norms(model, gen)
    x = torch.randn(2, 1, 16, generator=gen)
    gate_(model, x, shortcuts="dense")
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    assert gating.edge_gate is not None
    with torch.no_grad():
        for g in [*gating.group_gates, *gating.block_gates, gating.edge_gate]:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.copy_(torch.empty(g.n).uniform_(-4.0, 4.0, generator=gen))
    with pytest.raises(TypeError, match="still has gates"):
        fold_batchnorm(model)
    pruned = gatedprune.prune(model)
    n_shortcuts = sum(isinstance(m, ScaledAdd) for m in pruned.modules())
    assert n_shortcuts > 0
    folded = fold_batchnorm(pruned)
    assert _norms(folded) == 0
    assert sum(isinstance(m, ScaledAdd) for m in folded.modules()) == n_shortcuts
    xi = torch.randn(2, 1, 16, generator=gen)
    with torch.no_grad():
        assert (folded(xi) - pruned(xi)).abs().max().item() <= 1e-5


def test_refuses_what_it_cannot_fold() -> None:
    no_stats = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        fold_batchnorm(no_stats)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(TypeError, match="traceable"):
        fold_batchnorm(Branchy())
    with pytest.raises(TypeError, match=r"torch\.nn\.Module, got str"):
        fold_batchnorm("net")  # type: ignore[arg-type]


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_parametrized_conv_is_folded_and_the_model_left_intact(wrap: str) -> None:
    torch.manual_seed(4)
    conv = getattr(nn.utils.parametrizations, wrap)(nn.Conv1d(2, 4, 3))
    model = nn.Sequential(conv, nn.BatchNorm1d(4)).eval()
    randomise_norms(model, torch.Generator().manual_seed(4))
    x = torch.randn(3, 2, 8)
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(model)  # a KeyError before ("attribute 'weight' already exists")
        assert _norms(folded) == 0
        assert (folded(x) - before).abs().max().item() <= 1e-5
        assert torch.equal(model(x), before)  # the original still works, unchanged
        assert (fold_batchnorm(model)(x) - before).abs().max().item() <= 1e-5


def test_conv_whose_weight_is_read_directly_is_not_folded() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, padding=1)
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: Tensor) -> Tensor:
            tied = nn.functional.conv1d(x, self.conv.weight, padding=1)  # (B, 2, L)
            return self.bn(self.conv(x)) + tied

    model = Tied()
    randomise_norms(model, torch.Generator().manual_seed(5))
    folded = fold_batchnorm(model)
    x = torch.randn(2, 2, 9)
    with torch.no_grad():  # folding would have rescaled the tied read too (silently wrong)
        assert (folded(x) - model.eval()(x)).abs().max().item() <= 1e-5
    assert _norms(folded) == 1


def _bn_net() -> tuple[nn.Sequential, nn.BatchNorm1d]:
    torch.manual_seed(6)
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), bn, nn.ReLU())
    randomise_norms(model, torch.Generator().manual_seed(6))
    return model, bn


def test_recalibrate_keeps_the_old_statistics_when_it_fails() -> None:
    model, bn = _bn_net()
    old = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm(model, iter([]))  # reset to mean 0 / var 1 before
    bad = [torch.randn(8, 1, 16), torch.randn(8, 2, 16)]  # the second batch has 2 channels
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, bad)
    assert all(torch.equal(old[k], v) for k, v in bn.state_dict().items())
    assert bn.momentum == 0.1


def test_recalibrate_restores_every_modules_mode_and_counts_sync_batchnorm() -> None:
    model, bn = _bn_net()
    model.train()
    bn.eval()  # a frozen BatchNorm in a training model
    x = torch.randn(8, 1, 16) + 2.0
    assert recalibrate_batchnorm(model, [x]) == 1
    assert [m.training for m in model.modules()] == [True, True, False, True]
    sync = nn.Sequential(nn.Conv1d(1, 4, 3), nn.SyncBatchNorm(4)).eval()
    assert recalibrate_batchnorm(sync, [x]) == 1  # 0 before: its statistics were left stale
    with torch.no_grad():
        mean = sync[0](x).mean(dim=(0, 2))  # (4,)
    assert torch.allclose(sync[1].running_mean, mean, atol=1e-5)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        recalibrate_batchnorm("net", [x])  # type: ignore[arg-type]
