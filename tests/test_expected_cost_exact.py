"""The differentiable expected cost against the exact expectation over every gate state.

Gates open independently with their open probabilities; the exact expected FLOPs and
parameters are the probability-weighted sum of ``cost(model, x, hard=True)`` over all 2^n
open/closed states (tiny models, n <= 10). Chains, recurrent stacks and ``gate_``'d residual
stacks must match it exactly (up to the float32 rounding of the probabilities); dense shortcut
DAGs are computed under an independence approximation (a node's liveness and its consumers'
are correlated) and must stay within 2%. Before the counts stopped charging "some unit is
open" twice, the expected cost was up to 47% low on these models, which made a Lagrangian
budget aim below its target."""

from __future__ import annotations

import itertools

import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import Gate, HardConcreteGate
from gatedprune.gating import gate_
from gatedprune.recurrent import ShortcutLSTM

MAX_GATES = 10
EXACT = 1e-6  # relative: the open probabilities are float32, the enumeration float64


def _randomise(model: nn.Module, seed: int, shift: float) -> list[Gate]:
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in gates:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.copy_(torch.randn(g.log_alpha.shape, generator=gen) * 1.5 + shift)
    return gates


def _soft_and_exact(model: nn.Module, x: Tensor, seed: int, shift: float) -> tuple[Tensor, Tensor]:
    """(soft [flops, params], exact expectation [flops, params]), float64."""
    gates = _randomise(model, seed, shift)
    soft_cost = gp.cost(model, x)
    soft = torch.stack([soft_cost.flops.detach(), soft_cost.params.detach()]).double()  # (2,)
    with torch.no_grad():
        probs = torch.cat([g.prob_open().double() for g in gates])  # (n,)
    sizes = [g.n for g in gates]
    assert probs.numel() <= MAX_GATES, "keep the enumerated models tiny"
    exact = torch.zeros(2, dtype=torch.float64)
    for bits in itertools.product((False, True), repeat=probs.numel()):
        state = torch.tensor(bits)  # (n,)
        weight = torch.where(state, probs, 1 - probs).prod()
        for g, part in zip(gates, torch.split(state, sizes), strict=True):
            g.force_(part)
        hard = gp.cost(model, x, hard=True)
        exact += weight * torch.tensor([float(hard.flops), float(hard.params)])
    return soft, exact


def _rel(soft: Tensor, exact: Tensor) -> float:
    return float(((soft - exact).abs() / exact).max())


shifts = st.sampled_from([1.0, 0.0, -1.0, -2.0])


@settings(max_examples=examples(12))
@given(
    widths=st.lists(st.integers(1, 2), min_size=1, max_size=3),
    seed=st.integers(0, 10_000),
    shift=shifts,
)
def test_chain_mlp_expected_cost_is_the_exact_expectation(
    widths: list[int], seed: int, shift: float
) -> None:
    torch.manual_seed(seed)
    net = gp.ShortcutMLP(2, widths, 1, shortcuts=False)
    soft, exact = _soft_and_exact(net, torch.randn(1, 2), seed, shift)
    assert _rel(soft, exact) <= EXACT


@settings(max_examples=examples(12))
@given(
    widths=st.lists(st.integers(1, 2), min_size=1, max_size=2).filter(lambda w: sum(w) <= 3),
    seed=st.integers(0, 10_000),
    shift=shifts,
)
def test_shortcut_mlp_expected_cost_is_within_two_percent(
    widths: list[int], seed: int, shift: float
) -> None:
    torch.manual_seed(seed)
    net = gp.ShortcutMLP(2, widths, 1)
    soft, exact = _soft_and_exact(net, torch.randn(1, 2), seed, shift)
    assert _rel(soft, exact) <= 0.02


@settings(max_examples=examples(8))
@given(first=st.integers(1, 2), seed=st.integers(0, 10_000), shift=shifts)
def test_shortcut_conv_expected_cost_is_within_two_percent(
    first: int, seed: int, shift: float
) -> None:
    torch.manual_seed(seed)
    net = gp.ShortcutConv1d(1, [[first], [1]], 1, kernel_size=3, head_pool=1)
    soft, exact = _soft_and_exact(net, torch.randn(1, 1, 8), seed, shift)
    assert _rel(soft, exact) <= 0.02


@settings(max_examples=examples(8))
@given(
    size=st.sampled_from([(1, 1), (2, 1), (1, 2)]),  # (hidden, layers): at most 10 gates
    cell=st.sampled_from(["lstm", "gru"]),
    seed=st.integers(0, 10_000),
    shift=shifts,
)
def test_shortcut_lstm_expected_cost_is_the_exact_expectation(
    size: tuple[int, int], cell: str, seed: int, shift: float
) -> None:
    hidden, layers = size
    torch.manual_seed(seed)
    net = ShortcutLSTM(1, hidden, layers, 1, cell=cell)
    soft, exact = _soft_and_exact(net, torch.randn(1, 3, 1), seed, shift)
    assert _rel(soft, exact) <= EXACT


class _Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.a = nn.Linear(width, hidden)
        self.b = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.b(torch.relu(self.a(x)))  # (B, W)


class _Residual(nn.Module):
    def __init__(self, width: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(2, width)
        self.blocks = nn.Sequential(*[_Block(width, hidden) for _ in range(blocks)])
        self.out = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.blocks(torch.relu(self.inp(x))))  # (B, 1)


@settings(max_examples=examples(10))
@given(
    width=st.integers(1, 2),
    hidden=st.integers(1, 2),
    blocks=st.integers(1, 2),
    shortcuts=st.sampled_from([None, "dense"]),
    seed=st.integers(0, 10_000),
    shift=shifts,
)
def test_gated_residual_stack_expected_cost_is_the_exact_expectation(
    width: int, hidden: int, blocks: int, shortcuts: str | None, seed: int, shift: float
) -> None:
    """Includes the rule that a channel group never closes entirely (its first channel
    stays when every gate is closed)."""
    torch.manual_seed(seed)
    model = _Residual(width, hidden, blocks)
    x = torch.randn(1, 2)
    gate_(model, x, shortcuts=shortcuts)
    soft, exact = _soft_and_exact(model, x, seed, shift)
    assert _rel(soft, exact) <= EXACT


class _NormNet(nn.Module):
    """conv -> GroupNorm(2, 4) -> relu -> conv -> InstanceNorm (affine) -> relu -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn = nn.Conv1d(1, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.c2, self.inorm = nn.Conv1d(4, 6, 3), nn.InstanceNorm1d(6, affine=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inorm(self.c2(torch.relu(self.gn(self.c1(x))))))  # (B, 6, L - 2)
        return self.fc(h.mean(2))  # (B, 2)


@settings(max_examples=examples(6))
@given(seed=st.integers(0, 10_000), shift=shifts)
def test_groupnorm_instancenorm_expected_cost_is_the_exact_expectation(
    seed: int, shift: float
) -> None:
    # GroupNorm runs (one gate per group of 2 channels) and InstanceNorm channels: 2 + 6 gates
    torch.manual_seed(seed)
    net = _NormNet()
    x = torch.randn(1, 1, 6)
    gate_(net, x)
    soft, exact = _soft_and_exact(net, x, seed, shift)
    assert _rel(soft, exact) <= EXACT
