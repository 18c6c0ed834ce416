"""What a fuzzer of random models found in gate_ / prune (one test per root cause):

* a closed block followed by an in-place op (torchvision's ``out = relu(f(x) + x)`` with
  ``ReLU(inplace=True)``, or an in-place ReLU after the block in an ``nn.Sequential``): the
  pruned ``out = x`` let the op write into the block's input, which an outer residual or a
  new shortcut still reads (pruned != gated by 0.6-1.3);
* two traced-through leaf modules called back to back, ``b(a(h))``, in a rewritten forward:
  ``prune`` crashed (the re-folded call of ``b`` read ``a``'s removed ops);
* one module instance used in two containers (a reused ``nn.ReLU()``): ``prune`` refused to
  rewrite the container ("tracing it alone gives a different graph");
* a Linear called twice, once on channels that are not pruned: its input columns were sliced
  for both calls and the pruned model crashed.
"""

from __future__ import annotations

import pytest
import torch
from gating_helpers import inserted_gating
from torch import Tensor, nn

import gatedprune
from gatedprune.gating import gate_


class Block(nn.Module):
    def __init__(self, d: int, post: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.relu: nn.Module = nn.ReLU(inplace=True) if post else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.fc(x) + x)


class Outer(nn.Module):
    """An outer residual reads ``h`` after the inner block's in-place ReLU."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.stem, self.inner = nn.Linear(3, d), Block(d)
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        return self.head(h + self.fc(self.inner(h)))


class Chain(nn.Module):
    """A new shortcut b1 -> b3 reads b1's output after b2's in-place ReLU."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(3, d)
        self.b1, self.b2, self.b3 = Block(d, post=False), Block(d), Block(d, post=False)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.b3(self.b2(self.b1(self.stem(x)))))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(x)


def _sequential() -> nn.Module:
    """A standalone ReLU(inplace=True) after a block of an nn.Sequential."""
    d = 4
    return nn.Sequential(
        nn.Linear(3, d),
        Residual(nn.Linear(d, d)),
        Residual(nn.Linear(d, d)),
        nn.ReLU(inplace=True),
        Residual(nn.Linear(d, d)),
        nn.Linear(d, 2),
    )


def _exact(model: nn.Module, x: Tensor) -> None:
    model.eval()
    pruned = gatedprune.prune(model).eval()
    with torch.no_grad():
        xi = torch.randn(5, *x.shape[1:])
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    hard = gatedprune.cost(model, x, hard=True)
    c = gatedprune.cost(pruned, x)
    assert (float(hard.flops), float(hard.params)) == (c.flops, c.params)


@pytest.mark.parametrize(
    ("factory", "shortcuts", "closed"),
    [(Outer, None, "inner"), (Chain, "dense", "b2"), (_sequential, "dense", "2")],
)
def test_an_in_place_op_after_a_closed_block_does_not_write_into_its_input(
    factory: type[nn.Module], shortcuts: str | None, closed: str
) -> None:
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(3, 3)
    summary = gate_(model, x, channels=False, shortcuts=shortcuts)
    gating = inserted_gating(model)
    for (owner, _, _), gate in zip(summary.blocks, gating.block_gates, strict=True):
        gate.force_(torch.tensor([owner != closed]))
    if gating.edge_gate is not None:  # every new shortcut open
        gating.edge_gate.force_(torch.ones(gating.edge_gate.n, dtype=torch.bool))
    _exact(model, x)


class Scale(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x


gatedprune.register_cost(Scale, lambda m, i, o: o.numel())


class BackToBack(nn.Module):
    def __init__(self, d: int = 4, shared: bool = False) -> None:
        super().__init__()
        self.a = Scale()
        self.b = self.a if shared else Scale()
        self.fc1, self.fc2, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.fc1(x)
        x = x + self.b(self.a(self.fc2(x)))
        return self.head(x)


@pytest.mark.parametrize("shared", [False, True])
def test_back_to_back_leaf_modules_in_a_rewritten_forward(shared: bool) -> None:
    torch.manual_seed(0)
    model = BackToBack(shared=shared)
    x = torch.randn(3, 4)
    gate_(model, x)
    inserted_gating(model).block_gates[0].force_(torch.tensor([False]))
    _exact(model, x)
    pruned = gatedprune.prune(model)
    called: list[str] = []
    for m in pruned.modules():  # the user's modules are called again (a shared one twice)
        if isinstance(m, Scale):
            m.register_forward_hook(lambda mod, i, o: called.append("x"))
    with torch.no_grad():
        pruned(x)
    assert len(called) == 2


def test_a_module_used_in_two_containers_does_not_block_pruning() -> None:
    torch.manual_seed(0)
    relu = nn.ReLU()  # one instance, two places
    model = nn.Sequential(
        nn.Linear(9, 6), relu, nn.Sequential(relu, Residual(nn.Linear(6, 6)), nn.ReLU())
    )
    x = torch.randn(3, 9)
    summary = gate_(model, x)
    assert len(summary.blocks) == 1
    inserted_gating(model).block_gates[0].force_(torch.tensor([False]))
    _exact(model, x)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm = nn.Linear(3, 8), nn.LayerNorm(8)
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.inp(x))  # channels a LayerNorm normalises: not pruned
        return self.head(self.fc(torch.relu(self.fc(h))))  # fc on them, then on its own


def test_a_linear_called_on_pruned_and_unpruned_channels_keeps_its_inputs() -> None:
    torch.manual_seed(0)
    model = CalledTwice()
    x = torch.randn(3, 3)
    summary = gate_(model, x)
    assert not summary.channel_groups
    reasons = [why for _, _, why in summary.ungated_groups]
    mixed = "fc is called more than once, also on channels that are not pruned"
    assert any(mixed in r for r in reasons)
    _exact(model, x)
