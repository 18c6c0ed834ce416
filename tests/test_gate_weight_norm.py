"""Weight normalisation (TCN / WaveNet / vocoder / GAN code) under gate_ and prune.

Before 2026-12-07 22:10 UTC:

- a layer with torch's ``parametrizations.weight_norm`` was kept whole ("computes its weight
  when it runs"): a TCN built with it got no gates at all. Now its output channels are gated
  and prune slices and scales ``g`` (original0) and ``v`` (original1) exactly, keeping the
  parametrization on the pruned layer;
- ``prune`` of a model holding the old ``nn.utils.weight_norm`` / ``spectral_norm`` hook
  failed with torch's bare ``RuntimeError`` (deepcopy of a non-leaf tensor) after any
  forward with autograd on (a training step).
"""

from __future__ import annotations

import copy
import itertools
import json
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, inserted_gating, train_under_budget
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_

wn = parametrizations.weight_norm


# ----------------------------------------------------------------- the old weight_norm hooks


def _old_weight_norm(m: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # deprecated in favour of parametrizations.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(m)


OLD_HOOKS: dict[str, tuple[Callable[[nn.Module], nn.Module], tuple[str, ...]]] = {
    "weight_norm": (_old_weight_norm, ("weight_g", "weight_v")),
    "spectral_norm": (nn.utils.spectral_norm, ("weight_orig",)),
}


def _old_hooked() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(4, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(16, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(8, 4, 1),
    )


@pytest.mark.parametrize("hook", list(OLD_HOOKS))
def test_old_hook_prunes_after_a_training_step(hook: str) -> None:
    wrap, stored = OLD_HOOKS[hook]
    torch.manual_seed(0)
    model = _old_hooked()
    wrap(model[0])
    x = torch.randn(4, 4, 10)
    gate_(model, x)
    gating = inserted_gating(model)
    gate = gating.group_gates[-1]  # the 8 channels after layer 2
    assert isinstance(gate, HardConcreteGate)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-6.0, 3.0, gate.n))  # closed and fractional
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    model(x).square().mean().backward()  # a training step: model[0].weight is not a leaf
    opt.step()
    assert model[0].weight.grad_fn is not None
    model.eval()
    pruned = gp.prune(model)  # before: RuntimeError from copy.deepcopy
    assert pruned[2].out_channels < 8
    with torch.no_grad():
        xe = torch.randn(3, 4, 10)
        assert (pruned(xe) - model(xe)).abs().max().item() <= 1e-5
    # the user's model still trains: the hook's weight reaches its stored tensors
    model.train()
    model.zero_grad()
    model(x).square().mean().backward()
    for name in stored:
        grad = getattr(model[0], name).grad
        assert grad is not None, name
        assert bool(grad.abs().sum() > 0), name


def test_fold_batchnorm_after_a_training_step() -> None:
    """fold_batchnorm deep-copies the model too: a weight-normed layer left by a training
    forward no longer makes it fail."""
    torch.manual_seed(0)
    model = nn.Sequential(
        _old_weight_norm(nn.Conv1d(3, 8, 3)), nn.ReLU(), nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8)
    )
    x = torch.randn(4, 3, 12)
    model(x).sum().backward()
    folded = gp.fold_batchnorm(model)
    model.eval()
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() <= 1e-5


# ------------------------------------------------------------- parametrizations.weight_norm


class TemporalBlock(nn.Module):
    """Bai et al.'s TCN block: dilated causal convolutions (left padding), weight_norm, a
    residual 1x1 downsample where the width changes."""

    def __init__(self, cin: int, cout: int, k: int, dilation: int) -> None:
        super().__init__()
        self.pad = (k - 1) * dilation
        self.conv1 = wn(nn.Conv1d(cin, cout, k, dilation=dilation))
        self.conv2 = wn(nn.Conv1d(cout, cout, k, dilation=dilation))
        self.dropout = nn.Dropout(0.1)
        self.downsample = nn.Conv1d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(F.relu(self.conv1(F.pad(x, (self.pad, 0)))))  # (B, C, L)
        out = self.dropout(F.relu(self.conv2(F.pad(out, (self.pad, 0)))))  # (B, C, L)
        res = x if self.downsample is None else self.downsample(x)  # (B, C, L)
        return F.relu(out + res)


class TCN(nn.Module):
    def __init__(self, chans: tuple[int, ...] = (4, 16, 16, 24)) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[TemporalBlock(chans[i], chans[i + 1], 3, 2**i) for i in range(len(chans) - 1)]
        )
        self.linear = wn(nn.Linear(chans[-1], 5))

    def forward(self, x: Tensor) -> Tensor:
        y = self.blocks(x)  # (B, C, L)
        return self.linear(y[:, :, -1])  # (B, 5)


class MLP(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (6, 24, 16, 3)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(wn(nn.Linear(a, b)) for a, b in itertools.pairwise(widths))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))  # (B, H)
        return self.layers[-1](x)  # (B, out)


class CNN2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = wn(nn.Conv2d(3, 12, 3, padding=1))
        self.c2 = wn(nn.Conv2d(12, 10, 3, padding=1))
        self.head = nn.Linear(10, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.c2(F.relu(self.c1(x))))  # (B, 10, H, W)
        return self.head(h.mean((2, 3)))  # (B, 4)


class Depthwise(nn.Module):
    """A depthwise (2 outputs per input) and a 1x1 weight-normed convolution, 1d or 3d."""

    def __init__(self, three: bool = False) -> None:
        super().__init__()
        conv = nn.Conv3d if three else nn.Conv1d
        self.a = wn(conv(3, 8, 1))
        self.dw = wn(conv(8, 16, 3, padding=1, groups=8))
        self.b = wn(conv(16, 6, 1))
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.b(F.relu(self.dw(F.relu(self.a(x))))))  # (B, 6, *S)
        return self.head(y.flatten(2).mean(-1))  # (B, 2)


def _fractional_gates(model: nn.Module, gen: torch.Generator) -> None:
    """Every gate closed, open at a fractional value, or open at 1, at random (each group
    keeps at least one channel open)."""
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in [*gating.group_gates, *gating.block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-6.0, 3.0, generator=gen)
            gate.log_alpha[0] = 1.0


def _trained(factory: Callable[[], nn.Module], x: Tensor, n_out: int) -> nn.Module:
    torch.manual_seed(0)
    model = factory()
    gate_(model, x)
    budget = gp.Budget(model, x[:1], flops=0.4)
    gen = torch.Generator().manual_seed(1)

    def batch() -> tuple[Tensor, Tensor]:
        return torch.randn(*x.shape, generator=gen), torch.randint(0, n_out, (x.shape[0],))

    train_under_budget(model, budget, 4, batch)
    return model


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "tcn": (TCN, (4, 4, 20), 5),
    "mlp": (MLP, (8, 6), 3),
    "cnn2d": (CNN2d, (2, 3, 6, 6), 4),
    "depthwise1d": (Depthwise, (2, 3, 9), 2),
    "depthwise3d": (lambda: Depthwise(True), (2, 3, 4, 4, 4), 2),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_normed_layers_are_gated_and_pruned_exactly(name: str) -> None:
    factory, shape, n_out = MODELS[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    dense = gp.cost(factory().eval(), x)
    model = _trained(factory, x, n_out)
    summary = inserted_gating(model).summary
    normed = [n for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")]
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert any(n in gated for n in normed), (gated, normed)  # before: none of them
    _fractional_gates(model, torch.Generator().manual_seed(2))
    pruned = check_pruned(model, x, torch.Generator().manual_seed(3), factory, (1, 5))
    c = gp.cost(pruned, x)
    assert c.params < dense.params
    assert c.flops < dense.flops
    for n in normed:  # the user keeps training the pruned layers with their weight_norm
        m = pruned.get_submodule(n)
        assert parametrize.is_parametrized(m, "weight")
        plist = m.parametrizations.weight
        assert plist.original0.shape[0] == plist.original1.shape[0] == m.weight.shape[0]
    pruned.train()
    pruned(x).square().mean().backward()
    m0 = pruned.get_submodule(normed[0]).parametrizations.weight
    assert m0.original0.grad is not None
    assert m0.original1.grad is not None


def test_summary_names_the_tcn_groups() -> None:
    x = torch.randn(2, 4, 20)
    model = TCN()
    summary = gate_(model, x)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert {"blocks.0.conv1", "blocks.0.conv2", "blocks.2.conv1"} <= gated
    assert "computes its weight" not in str(summary)


def test_input_columns_cut_keep_each_row() -> None:
    """Closed inputs of a weight-normed layer: v loses their columns and g is rescaled, so
    each kept weight row keeps its values; a row whose kept columns of v are all zero (its
    weight there is zero) becomes g = 0, not 0 / 0."""
    torch.manual_seed(0)
    model = MLP((6, 8, 4, 3))
    x = torch.randn(5, 6)
    gate_(model, x)
    v = model.layers[1].parametrizations.weight.original1
    with torch.no_grad():
        v[0, :4] = 0.0  # row 0 of layer 1 reads only inputs 4..7
    gating = inserted_gating(model)
    gating.group_gates[0].force_(torch.arange(8) < 4)  # inputs 4..7 of layer 1 closed
    model.eval()
    pruned = check_pruned(model, x, torch.Generator().manual_seed(0))
    layer = pruned.layers[1]
    assert layer.in_features == 4
    assert torch.isfinite(layer.weight).all()
    assert layer.weight[0].abs().max().item() == 0.0


def test_apply_plan_slices_g_and_v_alike() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 20)
    model = TCN()
    gate_(model, x)
    _fractional_gates(model, torch.Generator().manual_seed(5))
    model.eval()
    plan = json.loads(json.dumps(export_plan(model)))
    pruned = gp.prune(model)
    fresh = apply_plan(TCN(), plan)
    dense = TCN()
    cut = 0
    for n, m in fresh.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            mine = pruned.get_submodule(n).parametrizations.weight
            theirs = m.parametrizations.weight
            assert theirs.original0.shape == mine.original0.shape, n
            assert theirs.original1.shape == mine.original1.shape, n
            cut += theirs.original1.numel() < dense.get_submodule(n).weight.numel()
    assert cut >= 3  # the plan slices weight-normed layers (before: none)
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert (fresh.eval()(x) - model(x)).abs().max().item() <= 1e-5


class Other(nn.Module):
    """weight_norm over the input dimension, and spectral_norm: kept whole, as before."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        if which == "wn_dim1":
            self.b = wn(nn.Linear(8, 8), dim=1)
        else:
            self.b = parametrizations.spectral_norm(nn.Linear(8, 8))
        self.c = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))  # (B, 2)


@pytest.mark.parametrize("which", ["wn_dim1", "spectral_norm"])
def test_other_normalisations_stay_whole(which: str) -> None:
    torch.manual_seed(0)
    model = Other(which)
    x = torch.randn(4, 4)
    summary = gate_(model, x)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert "computes its weight when it runs" in reasons["a"]
    assert "computes its weight when it runs" in reasons["b"]
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


def test_weight_norm_added_after_gate_is_refused() -> None:
    """gate_ counted a plain layer (no g): one weight-normed since is refused, as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 4)
    gate_(model, x)
    wn(model[0])
    inserted_gating(model).group_gates[0].force_(torch.arange(8) >= 2)
    with pytest.raises(ValueError, match=r"module '0' \(.*\): it computes 'weight'"):
        gp.prune(model.eval())


@settings(max_examples=examples(15), deadline=None)
@given(
    widths=st.lists(st.integers(2, 9), min_size=2, max_size=4),
    conv=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_weight_normed_stacks(widths: list[int], conv: bool, seed: int) -> None:
    """Random widths, closed sets and fractional gate values: pruned == gated, its cost the
    hard expected cost, and the plan replays on a fresh instance."""
    gen = torch.Generator().manual_seed(seed)

    def factory() -> nn.Module:
        torch.manual_seed(seed)
        dims = [3, *widths, 2]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layer = nn.Conv1d(a, b, 3, padding=1) if conv else nn.Linear(a, b)
            layers.append(wn(layer) if i % 2 == 0 or seed % 3 else layer)
            layers.append(nn.ReLU())
        return nn.Sequential(*layers[:-1])

    x = torch.randn(3, 3, 7, generator=gen) if conv else torch.randn(3, 3, generator=gen)
    model = factory()
    gate_(model, x)
    gating = inserted_gating(model)
    assert len(gating.group_gates) == len(widths)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-6.0, 3.0, generator=gen)
            gate.log_alpha[int(torch.randint(gate.n, (1,), generator=gen))] = 2.0
    check_pruned(model, x, gen, factory)
    assert copy.deepcopy(model) is not model
