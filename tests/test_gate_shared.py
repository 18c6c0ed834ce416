"""``gate_`` on models whose pruning would change something the analysis does not see: tensors
shared between modules (tied weights, a weight also read directly) and sizes the code reads
and computes with. Before: ``prune`` folded gates into a tied tensor in place (changing the
other holder), sliced one holder of a tied pair (untying it: more parameters than the dense
model), counted tied parameters twice in the gated cost, and kept pruning channels whose width
the forward divides by (the pruned code then divides by the pruned width)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import gate_


def _force_random(model: nn.Module, seed: int) -> None:
    """Every gate of a gate_ model (groups and blocks) open or closed at random."""
    gen = torch.Generator().manual_seed(seed)
    g = inserted_gating(model)
    for gate in [*g._group_list(), *g._block_list()]:
        gate.force_(torch.rand(gate.n, generator=gen) < 0.5)


def _check_exact(model: nn.Module, x: Tensor) -> nn.Module:
    """pruned == gated in eval mode on fresh inputs; the hard cost is the pruned model's."""
    model.eval()
    pruned = gp.prune(model).eval()
    fresh = torch.randn_like(x) if x.is_floating_point() else torch.randint_like(x, 0, 20)
    with torch.no_grad():
        assert float((pruned(fresh) - model(fresh)).abs().max()) <= 1e-5
    hard, plain = gp.cost(model, x, hard=True), gp.cost(pruned, x)
    assert isinstance(plain, gp.Cost)
    assert float(hard.params) == plain.params
    assert float(hard.flops) == plain.flops
    return pruned


class _TiedPair(nn.Module):
    """b and c share one weight (a Linear's weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.c.weight = self.b.weight
        self.d, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.b(F.relu(self.a(x))))  # (B, 8)
        y: Tensor = self.out(F.relu(self.d(F.relu(self.c(h)))))  # (B, 2)
        return y


class _TiedLM(nn.Module):
    """An embedding and the read-out share one matrix (language-model weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t: Tensor) -> Tensor:
        h = self.rnn(self.emb(t))[0]  # (B, T, 8)
        y: Tensor = self.head(h + self.b(F.relu(self.a(h))))  # (B, T, 20)
        return y


class _ReadsWeight(nn.Module):
    """The forward reads ``b.weight`` directly besides calling ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))  # (B, 8)
        y: Tensor = self.fc(F.relu(self.b(h))) + self.b.weight.sum()  # (B, 2)
        return y


@pytest.mark.parametrize(
    ("factory", "x", "shared"),
    [
        (_TiedPair, torch.randn(4, 6), ("b", "c")),
        (_TiedLM, torch.randint(0, 20, (2, 7)), ("head",)),
        (_ReadsWeight, torch.randn(4, 5), ("b",)),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_tensors_stay_whole_and_pruning_is_exact(
    factory: type[nn.Module], x: Tensor, shared: tuple[str, ...], seed: int
) -> None:
    torch.manual_seed(seed)
    model = factory()
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    reasons = " ".join(why for *_, why in summary.ungated_groups + summary.ungated_layers)
    for name in shared:  # named in the summary as the reason
        assert f"{name}: its weight is" in reasons
    assert "shared tensor" in reasons
    _force_random(model, seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruned = _check_exact(model, x)
    for n, p in model.named_parameters():  # prune works on a copy
        assert torch.equal(p, before[n]), n
    assert isinstance(dense, gp.Cost)
    plain = gp.cost(pruned, x)
    assert isinstance(plain, gp.Cost)
    assert plain.params <= dense.params  # never untied into more parameters
    with torch.no_grad():  # all open: the gated cost counts a tied tensor once
        g = inserted_gating(model)
        for gate in [*g._group_list(), *g._block_list()]:
            gate.force_(torch.ones(gate.n, dtype=torch.bool))
    assert float(gp.cost(model, x, hard=True).params) == dense.params


def test_tied_pair_keeps_the_tie_and_prunes_the_rest() -> None:
    torch.manual_seed(0)
    model = _TiedPair()
    x = torch.randn(4, 6)
    summary = gate_(model, x)
    assert [p for p, _ in summary.channel_groups] == [["d"]]  # only d's units are gated
    inserted_gating(model)._group_list()[0].force_(torch.arange(8) < 3)
    pruned = _check_exact(model, x)
    assert isinstance(pruned, _TiedPair)
    assert pruned.b.weight is pruned.c.weight
    assert pruned.d.out_features == 3


class _WidthScaled(nn.Module):
    """Scales a gated map by a value computed from its channel count."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a, self.b = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)
        self.flat = nn.Linear(8 * 9, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))  # (B, 8, L)
        if self.mode == "flatten":  # the width times the length: a merged dimension
            b, c, length = h.shape
            flat: Tensor = self.flat(h.reshape(b, c * length))  # (B, 2)
            return flat
        if self.mode == "sqrt":
            h = h * (1.0 / math.sqrt(h.shape[1]))
        elif self.mode == "size":
            h = h / h.size(1)
        elif self.mode == "numel":
            h = h / h.numel()
        elif self.mode == "length":  # reads another dimension: the channels stay gated
            h = h / h.size(-1)
        else:  # a reshape computed from the shape: consistent after pruning
            b, c, length = h.shape
            h = h.reshape(b, c, length)
        y: Tensor = self.fc(F.relu(self.b(h)).mean(-1))  # (B, 2)
        return y


@pytest.mark.parametrize("mode", ["sqrt", "size", "numel", "length", "reshape", "flatten"])
def test_width_read_in_arithmetic_is_pinned(mode: str) -> None:
    torch.manual_seed(0)
    model = _WidthScaled(mode)
    x = torch.randn(4, 3, 9)
    summary = gate_(model, x)
    gated = [p for producers, _ in summary.channel_groups for p in producers]
    if mode in ("length", "reshape", "flatten"):
        assert "a" in gated
    else:
        assert "a" not in gated
        why = next(w for producers, _, w in summary.ungated_groups if "a" in producers)
        assert "computes with the labelled width" in why
    for gate in inserted_gating(model)._group_list():  # half of every gated group closed
        gate.force_(torch.arange(gate.n) >= gate.n // 2)
    _check_exact(model, x)


class _Attention(nn.Module):
    """Hand-written single-head attention scaled by its width (``q.size(-1) ** -0.5``)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        q, k = self.q(x), self.k(x)  # (B, T, 8)
        att = torch.softmax(q @ k.transpose(1, 2) * q.size(-1) ** -0.5, dim=-1)  # (B, T, T)
        y: Tensor = self.o(att @ self.v(x))  # (B, T, 8)
        return y


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_hand_written_attention_prunes_exactly(seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(_Attention(), nn.Linear(8, 3))
    x = torch.randn(2, 5, 8)
    gate_(model, x)
    _force_random(model, seed)
    _check_exact(model, x)
