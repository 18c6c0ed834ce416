"""Linear maps written with parameters inside childless modules of your own (Hugging Face
GPT-2's ``Conv1D``: ``torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)``, a
hand-written ``MyLinear``: ``x @ self.weight.t() + self.bias``) are counted by ``cost`` as
code and gated like the model's own parameter maps."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, inserted_gating, randomise_gates
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import gate_


class Conv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D`` (transformers.pytorch_utils): a Linear whose weight is
    stored ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) / 4)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005 (as HF)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)  # (N, nf)
        return x.view(size_out)  # (..., nf)


class MyLinear(nn.Module):
    """A Linear written by hand, weight ``(out, in)``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) / 4)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.t() + self.bias  # (..., out)


def _layer(kind: str, n_in: int, n_out: int) -> nn.Module:
    return Conv1D(n_out, n_in) if kind == "Conv1D" else MyLinear(n_in, n_out)


class Layers(nn.Module):
    """Two or three such layers with a ReLU between (the last one the read-out)."""

    def __init__(self, kind: str, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_layer(kind, a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else torch.relu(x))  # (..., width)
        return x


def _close_some(model: nn.Module, gen: torch.Generator) -> None:
    """Random gate states, every third channel gate surely closed."""
    randomise_gates(model, gen)
    with torch.no_grad():
        for g in inserted_gating(model).group_gates:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha[::3] = -10.0


def _fewer(pruned: nn.Module, dense: gp.Cost | gp.ExpectedCost, x: Tensor) -> None:
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert c.flops < dense.flops
    assert c.params < dense.params


def test_cost_counts_a_childless_module_with_parameters_as_code() -> None:
    # before: "cost() does not know how to count these leaf modules: 0 (Conv1D)", a TypeError
    x = torch.randn(4, 3, 6)  # 12 rows
    c = gp.cost(nn.Sequential(Conv1D(5, 6)), x)
    assert isinstance(c, gp.Cost)
    assert (c.flops, c.params) == (2 * 12 * 6 * 5 + 12 * 5, 6 * 5 + 5)  # addmm adds 1 per out
    c = gp.cost(nn.Sequential(MyLinear(6, 5), nn.ReLU()), x)
    assert isinstance(c, gp.Cost)
    assert (c.flops, c.params) == (2 * 12 * 6 * 5 + 12 * 5, 6 * 5 + 5)  # the added bias free


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("widths", [(6, 16, 3), (6, 16, 12, 3)])
@pytest.mark.parametrize("kind", ["Conv1D", "MyLinear"])
def test_layers_written_with_parameters_prune(
    kind: str, widths: tuple[int, ...], rank: int
) -> None:
    # before: gate_ raised the TypeError above
    gen = torch.Generator().manual_seed(len(widths) + rank)
    x = torch.randn(*((4,) if rank == 2 else (4, 5)), widths[0], generator=gen)

    def factory() -> Layers:
        torch.manual_seed(1)
        return Layers(kind, widths)

    model = factory()
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    summary = gate_(model, x)
    hidden = [([f"layers.{i}.weight"], w) for i, w in enumerate(widths[1:-1])]
    assert summary.channel_groups == hidden, str(summary)
    assert summary.ungated_params == [], str(summary)
    all_open = gp.cost(model, x, hard=True)
    assert (float(all_open.flops), float(all_open.params)) == (dense.flops, dense.params)
    _close_some(model, gen)
    pruned = check_pruned(model, x, gen, factory, batches=(1, 3))
    _fewer(pruned, dense, x)
    kept = [pruned.get_parameter(f"layers.{i}.bias").shape[0] for i in range(len(widths) - 1)]
    assert all(k < w for k, w in zip(kept[:-1], widths[1:-1], strict=True))
    if kind == "MyLinear":  # sliced in place: the user's class and forward
        assert all(type(m) is MyLinear for m in pruned.get_submodule("layers"))
    with torch.no_grad():  # other lengths
        xi = torch.randn(2, *([] if rank == 2 else [7]), widths[0], generator=gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


class RegisteredConv1D(Conv1D):
    """A Conv1D whose cost a handler gives (the workaround before childless modules with
    parameters were counted as code)."""


class RegisteredLinear(MyLinear):
    """The same for a MyLinear."""


def _linear_cost(m: nn.Module, i: tuple[Tensor, ...], o: Tensor) -> int:
    return 2 * i[0].numel() * o.shape[-1] + o.numel()


gp.register_cost((RegisteredConv1D, RegisteredLinear), _linear_cost)


@pytest.mark.parametrize("cls", [RegisteredConv1D, RegisteredLinear])
def test_a_module_counted_by_a_cost_handler_is_kept_whole(cls: type[nn.Module]) -> None:
    # before (RegisteredLinear): its x @ W was gated inside while the handler counted it
    # whole too: a gated hard cost of 2444 FLOPs with every gate open for a dense 1292
    x = torch.randn(4, 6)
    torch.manual_seed(2)
    first, last = (cls(16, 6), cls(3, 16)) if cls is RegisteredConv1D else (cls(6, 16), cls(16, 3))
    model = nn.Sequential(first, nn.ReLU(), last)
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    assert dense.flops == 2 * 4 * 16 * 6 + 4 * 16 + 4 * 16 + 2 * 4 * 3 * 16 + 4 * 3  # ReLU: 4 * 16
    summary = gate_(model, x)
    hard = gp.cost(model, x, hard=True)
    assert (float(hard.flops), float(hard.params)) == (dense.flops, dense.params)
    assert summary.channel_groups == [], str(summary)
    assert "which a cost handler (register_cost) counts whole" in str(summary)


class SplitHeads(nn.Module):
    """A childless module without parameters that splits heads with a count it holds."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), self.heads, -1).transpose(1, 2)  # (B, H, T, D)


class HeadsBlock(nn.Module):
    def __init__(self, d: int = 8, heads: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.sq, self.sk, self.sv = (SplitHeads(heads) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(d, 16), nn.Linear(16, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.sq(self.q(x)), self.sk(self.k(x)), self.sv(self.v(x))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, T, H, D)
        x = x + self.o(a.reshape(x.size(0), x.size(1), -1))
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))  # (B, T, 2)


def test_a_rewritten_forward_keeps_the_resized_code_of_a_module_it_inlines() -> None:
    # before: the closed FFN block rewrote HeadsBlock, whose code called SplitHeads again
    # (view(B, T, 4, -1) of two kept heads): pruned != gated by 0.054, and a cost mismatch
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 8, generator=gen)

    def factory() -> HeadsBlock:
        torch.manual_seed(5)
        return HeadsBlock()

    model = factory()
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1, str(summary)
    assert len(summary.blocks) == 2, str(summary)
    gating = inserted_gating(model)
    heads = gating.group_gates[summary.head_groups[0]]
    heads.force_(torch.arange(4) < 2)  # type: ignore[operator]
    gating.block_gates[1].force_(torch.zeros(1, dtype=torch.bool))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, factory, batches=(1, 3))
    assert pruned.get_submodule("q").out_features == 4
