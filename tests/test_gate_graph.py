"""gate_'s graph analysis: options, limits, clear errors, functional ops, shared modules."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, gate_


def _gating(model: nn.Module) -> InsertedGating:
    g = model.gatedprune
    assert isinstance(g, InsertedGating)
    return g


def _scramble(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = _gating(model)
    with torch.no_grad():
        for gate in [*g.group_gates, *g.block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.copy_(torch.empty(gate.n).uniform_(-4.0, 4.0, generator=gen))


def _exact(model: nn.Module, x: Tensor) -> nn.Module:
    model.eval()
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        for _ in range(2):
            xi = torch.randn_like(x)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    hard = gatedprune.cost(model, x, hard=True)
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    return pruned


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.lin(x)
        return self.lin(-x)


class WithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 16)
        self.odd = DataDependent()
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.odd(self.fc2(F.relu(self.fc1(x)))))


def test_untraceable_submodule_warns_and_rest_is_gated() -> None:
    model = WithOpaque()
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match="'odd'.*DataDependent"):
        summary = gate_(model, x)
    assert "odd" in summary.opaque
    assert summary.channel_groups[0] == (["fc1"], 12)
    _scramble(model, 0)
    pruned = _exact(model, x)
    assert isinstance(pruned, WithOpaque)
    assert pruned.fc1.out_features < 12


class RootUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.mean() > 0:
            return self.fc(x)
        return x


def test_untraceable_root_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"RootUntraceable\.forward"):
        gate_(RootUntraceable(), torch.randn(2, 4))


class Functional(nn.Module):
    """Functional ops between layers: view, transpose, cat with the input, getitem, scaling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8 + 3, 6, 3, padding=1)
        self.lin = nn.Linear(6, 10)
        self.shared = nn.Linear(10, 10)
        self.head = nn.Linear(10 * 5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x)) * 0.5  # (B, 8, L)
        h = torch.cat([h, x], dim=1)  # (B, 11, L)
        h = F.max_pool1d(self.conv2(h), 2)  # (B, 6, L/2)
        t = self.lin(h.transpose(1, 2))  # (B, L/2, 10)
        t = self.shared(torch.tanh(self.shared(t)))  # one module called twice
        t = t[:, :5]  # (B, 5, 10)
        return self.head(t.reshape(t.shape[0], -1))


def test_functional_ops_and_shared_modules_prune_exactly() -> None:
    model = Functional()
    x = torch.randn(3, 3, 12)
    summary = gate_(model, x)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert {"conv", "conv2", "lin", "shared"} <= gated
    _scramble(model, 1)
    pruned = _exact(model, x)
    assert pruned.conv.out_channels < 8


def test_options_and_filter_fn() -> None:
    from zoo import ResNet

    x = torch.randn(2, 1, 16)
    only_blocks = gate_(ResNet(1), x, channels=False)
    assert not only_blocks.channel_groups
    assert len(only_blocks.blocks) == 4
    only_channels = gate_(ResNet(1), x, blocks=False)
    assert only_channels.channel_groups
    assert not only_channels.blocks
    filtered = gate_(ResNet(1), x, filter_fn=lambda m, name: not name.startswith("layers.0"))
    assert all(owner != "layers.0" for owner, _, _ in filtered.blocks)
    reasons = [why for _, _, why in filtered.ungated_groups]
    assert any("filter_fn rejected layers.0" in r for r in reasons)
    model = ResNet(1)
    gate_(model, x, filter_fn=lambda m, name: not isinstance(m, nn.Linear))
    _scramble(model, 2)
    _exact(model, x)


def test_bad_arguments() -> None:
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        gate_("net", x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="example_input"):
        gate_(nn.Linear(4, 2), [1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown gate kind"):
        gate_(nn.Linear(4, 2), x, gate="l1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="filter_fn"):
        gate_(nn.Linear(4, 2), x, filter_fn=3)  # type: ignore[arg-type]
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    gate_(net, x)
    with pytest.raises(ValueError, match="already gated"):
        gate_(net, x)


class Unknown(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2


def test_uncountable_leaf_is_a_type_error() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.odd = nn.CosineSimilarity()  # a torch.nn leaf cost() has no rule for

        def forward(self, x: Tensor) -> Tensor:
            return self.odd(self.fc(x), x)

    with pytest.raises(TypeError, match="odd"):
        gate_(Net(), torch.randn(2, 4))


def test_gated_model_copies_pickles_and_other_batch_sizes() -> None:
    from zoo import ResNet

    model = ResNet(1)
    x = torch.randn(2, 1, 16)
    gate_(model, x)
    assert any(k.startswith("gatedprune.group_gates.") for k in model.state_dict())
    _scramble(model, 3)
    model.eval()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(model)
    x8 = torch.randn(8, 1, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x8), model(x8))
        assert torch.equal(twin(x8), model(x8))
    pruned = gatedprune.prune(model)
    c = gatedprune.cost(pruned, x8)
    hard = gatedprune.cost(model, x8, hard=True)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    with pytest.raises(ValueError, match="gated with an input of shape"):
        gatedprune.cost(model, torch.randn(2, 1, 20))


class OptionalArgBlock(nn.Module):
    """A residual block with optional arguments (left at their defaults by the caller)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)

    def forward(self, x: Tensor, mask: Tensor | None = None, scale: float = 1.0) -> Tensor:
        h = self.fc2(F.relu(self.fc1(x)))
        if mask is not None:
            h = h * mask
        return x + h * scale


class OptionalArgNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([OptionalArgBlock() for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_blocks_with_optional_arguments_are_rewritten() -> None:
    model = OptionalArgNet()
    x = torch.randn(3, 4)
    summary = gate_(model, x)
    assert [owner for owner, _, _ in summary.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    gating = _gating(model)
    gating.block_gates[1].force_(torch.zeros(1, dtype=torch.bool))
    pruned = _exact(model, x)
    names = {n for n, _ in pruned.named_modules()}
    assert "blocks.1.fc1" not in names
    assert "blocks.0.fc1" in names


class FunctionalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.a(x))


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.block = FunctionalBlock()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.inp(x)))


def test_rewritten_module_without_submodules_pickles_and_counts() -> None:
    model = FunctionalNet()
    x = torch.randn(2, 3)
    gate_(model, x)
    _gating(model).block_gates[0].force_(torch.zeros(1, dtype=torch.bool))
    pruned = _exact(model, x)  # the block is left as relu(x): functional code only
    assert not list(pruned.block.children())
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert gatedprune.cost(loaded, x) == gatedprune.cost(pruned, x)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
