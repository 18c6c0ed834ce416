"""Linear maps written with the model's own parameters (``F.linear(h, self.W, self.b)``,
``h @ self.W + self.b``, ``h @ self.W.T``, ...) are pruned like ``nn.Linear``: as a consumer
the weight's input features are sliced with the channels it reads, as a producer its output
units (and its bias) are a gated group. Forms that cannot be sliced are left whole with a
reason, never pruned wrongly."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import (
    ParamMapNet,
    budget_optimizer,
    check_pruned,
    examples,
    inserted_gating,
    randomise_gates,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_

Form = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _plus(y: Tensor, b: Tensor | None) -> Tensor:
    return y if b is None else y + b  # (..., out)


# form -> (weight stored as (out, in), the map of input h, weight W, bias b)
FORMS: dict[str, tuple[bool, Form]] = {
    "F.linear": (True, lambda h, w, b: F.linear(h, w, b)),
    "F.linear(bias=b)": (True, lambda h, w, b: F.linear(h, w, bias=b)),
    "F.linear(input=h, weight=W)": (True, lambda h, w, b: F.linear(input=h, weight=w, bias=b)),
    "F.linear(h, W.T)": (False, lambda h, w, b: F.linear(h, w.T, b)),
    "h @ W": (False, lambda h, w, b: _plus(h @ w, b)),
    "b + h @ W": (False, lambda h, w, b: h @ w if b is None else b + h @ w),
    "torch.add(h @ W, b)": (False, lambda h, w, b: h @ w if b is None else torch.add(h @ w, b)),
    "h @ W.T": (True, lambda h, w, b: _plus(h @ w.T, b)),
    "h @ W.t()": (True, lambda h, w, b: _plus(h @ w.t(), b)),
    "h @ W.transpose(0, 1)": (True, lambda h, w, b: _plus(h @ w.transpose(0, 1), b)),
    "h @ W.mT": (True, lambda h, w, b: _plus(h @ w.mT, b)),
    "h @ torch.t(W)": (True, lambda h, w, b: _plus(h @ torch.t(w), b)),
    "torch.matmul": (False, lambda h, w, b: _plus(torch.matmul(h, w), b)),
    "h.matmul(W)": (False, lambda h, w, b: _plus(h.matmul(w), b)),
    "torch.mm": (False, lambda h, w, b: _plus(torch.mm(h, w), b)),
    "h.mm(W)": (False, lambda h, w, b: _plus(h.mm(w), b)),
    # a subtracted bias, (x W - b) g = x (W g) - b g, and addmm's (added 2026-12-07 19:15 UTC;
    # before, "adds an ungated tensor" kept the output units whole, "not prune through" both)
    "h @ W - b": (False, lambda h, w, b: h @ w if b is None else h @ w - b),
    "b - h @ W": (False, lambda h, w, b: h @ w if b is None else b - h @ w),
    "torch.sub(h @ W, b)": (False, lambda h, w, b: h @ w if b is None else torch.sub(h @ w, b)),
    "torch.addmm(b, h, W)": (False, lambda h, w, b: h @ w if b is None else torch.addmm(b, h, w)),
    "torch.addmm(b, h, W.t())": (
        True,
        lambda h, w, b: h @ w.t() if b is None else torch.addmm(b, h, w.t()),
    ),
    "b.addmm(h, W, beta=0.5, alpha=2)": (
        False,
        lambda h, w, b: h @ w if b is None else b.addmm(h, w, beta=0.5, alpha=2),
    ),
    "torch.addmm(input=b, mat1=h, mat2=W)": (
        False,
        lambda h, w, b: h @ w if b is None else torch.addmm(input=b, mat1=h, mat2=w),
    ),
}
ADDMM = [f for f in FORMS if "addmm" in f]
MM_ONLY_2D = ("torch.mm", "h.mm(W)", *ADDMM)


def _weight(form: str, n_in: int, n_out: int) -> nn.Parameter:
    shape = (n_out, n_in) if FORMS[form][0] else (n_in, n_out)
    return nn.Parameter(torch.randn(*shape) / n_in**0.5)


class Consumer(nn.Module):
    """An nn.Linear's 16 features read by a linear map written with a parameter."""

    def __init__(self, form: str, bias: bool) -> None:
        super().__init__()
        self.form = form
        self.l1 = nn.Linear(6, 16)
        self.W = _weight(form, 16, 5)
        self.b = nn.Parameter(torch.randn(5)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return FORMS[self.form][1](torch.relu(self.l1(x)), self.W, self.b)  # (..., 5)


class Producer(nn.Module):
    """A linear map written with a parameter making 16 units, read by an nn.Linear."""

    def __init__(self, form: str, bias: bool) -> None:
        super().__init__()
        self.form = form
        self.W = _weight(form, 6, 16)
        self.b = nn.Parameter(torch.randn(16)) if bias else None
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(FORMS[self.form][1](x, self.W, self.b)))  # (..., 5)


def _input(rank: int, gen: torch.Generator, batch: int = 4) -> Tensor:
    shape = (batch, 6) if rank == 2 else (batch, 3, 6)  # (B, F) or (B, L, F)
    return torch.randn(*shape, generator=gen)


def _close_some(model: nn.Module, gen: torch.Generator) -> None:
    """Random gate states, with every third gate of every group surely closed."""
    randomise_gates(model, gen)
    with torch.no_grad():
        for g in inserted_gating(model).group_gates:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha[::3] = -10.0


def _check_other_lengths(pruned: nn.Module, model: nn.Module, x: Tensor) -> None:
    """pruned == gated on (B, L, F) inputs of other sequence lengths too."""
    if x.dim() == 3:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for length in (1, 7):
                xi = torch.randn(2, length, x.shape[-1], generator=gen)
                assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


CASES = [
    (form, rank)
    for form in FORMS
    for rank in (2, 3)
    if not (rank == 3 and form in MM_ONLY_2D)  # mm multiplies 2-d matrices only
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("form", "rank"), CASES)
def test_a_parameter_consumer_is_sliced_with_its_input(form: str, rank: int, bias: bool) -> None:
    # before: "l1: node 'linear' (call_function linear) is an op gate_ does not prune through"
    # (or "contracts or keeps labelled channels" for @): l1's features were left whole
    gen = torch.Generator().manual_seed(0)
    x = _input(rank, gen)

    def factory() -> Consumer:
        torch.manual_seed(0)
        return Consumer(form, bias)

    model = factory()
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    assert summary.channel_groups == [(["l1"], 16)], str(summary)
    assert summary.ungated_params == [], str(summary)
    all_open = gp.cost(model, x, hard=True)
    assert isinstance(dense, gp.Cost)
    assert (float(all_open.flops), float(all_open.params)) == (dense.flops, dense.params)
    _close_some(model, gen)
    pruned = check_pruned(model, x, gen, factory, batches=(1, 3, 6))
    assert type(pruned) is Consumer  # sliced in place: the class and forward are the user's
    kept = pruned.get_submodule("l1").out_features
    assert kept < 16
    w = pruned.get_parameter("W")
    assert isinstance(w, nn.Parameter)
    assert tuple(w.shape) == ((5, kept) if FORMS[form][0] else (kept, 5))
    _check_other_lengths(pruned, model, x)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("form", "rank"), CASES)
def test_a_parameter_producer_is_a_gated_group(form: str, rank: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = _input(rank, gen)

    def factory() -> Producer:
        torch.manual_seed(1)
        return Producer(form, bias)

    model = factory()
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    assert summary.channel_groups == [(["W"], 16)], str(summary)
    assert isinstance(dense, gp.Cost)
    all_open = gp.cost(model, x, hard=True)
    assert (float(all_open.flops), float(all_open.params)) == (dense.flops, dense.params)
    _close_some(model, gen)
    pruned = check_pruned(model, x, gen, factory, batches=(1, 3, 6))
    assert type(pruned) is Producer
    kept = pruned.get_submodule("head").in_features
    assert kept < 16
    assert tuple(pruned.get_parameter("W").shape) == ((kept, 6) if FORMS[form][0] else (6, kept))
    if bias:
        assert tuple(pruned.get_parameter("b").shape) == (kept,)
    _check_other_lengths(pruned, model, x)
    # the gated model reads W as its stored parameter times the gates (a parametrization),
    # the stored parameter is the original object, unchanged by forwards
    stored = model.get_parameter("parametrizations.W.original")
    assert isinstance(stored, nn.Parameter)
    assert not isinstance(model.W, nn.Parameter)
    assert model.W.shape == factory().W.shape


class Chain(nn.Module):
    """``x -> relu(x @ W1 (+ b1)) -> (+ h1) relu(h1 @ W2 (+ b2)) -> [head]``, no layer but the
    optional nn.Linear head: each parameter map a producer and (W2) a consumer."""

    def __init__(
        self, forms: tuple[str, str], widths: tuple[int, int, int], bias: tuple[bool, bool]
    ) -> None:
        super().__init__()
        n_in, hidden, out = widths
        self.forms = forms
        self.residual = out == hidden
        self.W1, self.W2 = _weight(forms[0], n_in, hidden), _weight(forms[1], hidden, out)
        self.b1 = nn.Parameter(torch.randn(hidden)) if bias[0] else None
        self.b2 = nn.Parameter(torch.randn(out)) if bias[1] else None
        self.head = nn.Linear(out, 3)

    def forward(self, x: Tensor) -> Tensor:
        h1 = torch.relu(FORMS[self.forms[0]][1](x, self.W1, self.b1))  # (..., hidden)
        h2 = torch.relu(FORMS[self.forms[1]][1](h1, self.W2, self.b2))  # (..., out)
        if self.residual:
            h2 = h2 + h1
        return self.head(h2)  # (..., 3)


@settings(max_examples=examples(40), deadline=None)
@given(
    forms=st.tuples(st.sampled_from(list(FORMS)), st.sampled_from(list(FORMS))),
    widths=st.tuples(st.integers(2, 7), st.integers(2, 9), st.integers(2, 9)),
    bias=st.tuples(st.booleans(), st.booleans()),
    rank=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_chains_of_parameter_maps_prune_exactly(
    forms: tuple[str, str],
    widths: tuple[int, int, int],
    bias: tuple[bool, bool],
    rank: int,
    seed: int,
) -> None:
    if rank == 3 and any(f in MM_ONLY_2D for f in forms):
        rank = 2
    gen = torch.Generator().manual_seed(seed)
    shape = (3, widths[0]) if rank == 2 else (3, 2, widths[0])
    x = torch.randn(*shape, generator=gen)

    def factory() -> Chain:
        torch.manual_seed(seed)
        return Chain(forms, widths, bias)

    model = factory()
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    summary = gate_(model, x)
    groups = sorted(sorted(p) for p, _ in summary.channel_groups)
    if widths[1] == widths[2]:  # the residual add joins both maps' units
        assert groups == [["W1", "W2"]], str(summary)
    else:
        assert groups == [["W1"], ["W2"]], str(summary)
    all_open = gp.cost(model, x, hard=True)
    assert (float(all_open.flops), float(all_open.params)) == (dense.flops, dense.params)
    randomise_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory, batches=(1, 5))
    _check_other_lengths(pruned, model, x)


def test_the_brief_models_prune() -> None:
    """The two models of the feature request: a consumer after an nn.Linear, and a model
    with no layer at all (its root has no children: ``cost`` counts its forward as code)."""

    class C(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = nn.Linear(6, 16)
            self.W = nn.Parameter(torch.randn(5, 16))
            self.b = nn.Parameter(torch.randn(5))

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(torch.relu(self.l1(x)), self.W, self.b)

    class D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W1 = nn.Parameter(torch.randn(6, 16))
            self.W = nn.Parameter(torch.randn(16, 5))

        def forward(self, x: Tensor) -> Tensor:
            return torch.relu(x @ self.W1) @ self.W

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, generator=gen)
    dense_c = (2 * 4 * 16 * 6 + 4 * 16 + 2 * 4 * 5 * 16 + 4 * 5, 6 * 16 + 16 + 5 * 16 + 5)
    dense_d = (2 * 4 * 16 * 6 + 2 * 4 * 5 * 16, 6 * 16 + 16 * 5)
    for cls, producers, counts in ((C, ["l1"], dense_c), (D, ["W1"], dense_d)):

        def factory(cls: type[nn.Module] = cls) -> nn.Module:
            torch.manual_seed(2)
            return cls()

        model = factory()
        dense = gp.cost(model, x)  # before: D was "a leaf module cost() does not know"
        assert isinstance(dense, gp.Cost)
        assert (dense.flops, dense.params) == counts
        summary = gate_(model, x)
        assert summary.channel_groups == [(producers, 16)], str(summary)
        _close_some(model, gen)
        pruned = check_pruned(model, x, gen, factory)
        c = gp.cost(pruned, x)
        assert isinstance(c, gp.Cost)
        assert c.flops < dense.flops
        assert c.params < dense.params


def test_training_under_a_budget_moves_the_parameter_gates() -> None:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    x = torch.randn(16, 6, generator=gen)
    model = ParamMapNet()
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    summary = gate_(model, x)
    assert sorted(p for p, _ in summary.channel_groups) == [["W1"], ["W2"]], str(summary)
    params = {name: p for name, p in model.named_parameters()}
    w1_stored = model.get_parameter("parametrizations.W1.original")  # the original object
    b1_stored = model.get_parameter("parametrizations.b1.original")
    budget = gp.Budget(model, x, flops=0.4)
    gating = inserted_gating(model)
    opt = budget_optimizer(model, budget)
    start = budget.expected()["flops"]
    w1_before = w1_stored.detach().clone()
    model.train()
    # the task loss reaches the gates of W1's units through W1 * g (no module computes them)
    task = F.cross_entropy(model(x), torch.randint(0, 4, (16,), generator=gen))
    task.backward()
    w1_gate = gating.group_gates[[p for p, _ in summary.channel_groups].index(["W1"])]
    assert isinstance(w1_gate, HardConcreteGate)
    assert w1_gate.log_alpha.grad is not None
    assert w1_gate.log_alpha.grad.abs().sum() > 0
    for _ in range(30):
        xb = torch.randn(16, 6, generator=gen)
        yb = torch.randint(0, 4, (16,), generator=gen)
        loss = F.cross_entropy(model(xb), yb) + budget.penalty()
        opt.zero_grad()
        loss.backward()
        assert w1_stored.grad is not None
        assert b1_stored.grad is not None
        assert all(g.grad is not None for g in gating.group_gates.parameters())
        opt.step()
    assert budget.expected()["flops"] < start  # the budget pushes the gates
    assert not torch.equal(w1_stored.detach(), w1_before)  # the optimizer's tensors are trained
    assert {name: p for name, p in model.named_parameters()} == params  # the same objects
    pruned = check_pruned(model, x, gen, ParamMapNet)
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert c.flops < dense.flops


def test_a_failed_forward_leaves_the_parameters_alone() -> None:
    torch.manual_seed(4)
    model = ParamMapNet()
    w1 = model.W1
    summary = gate_(model, torch.randn(2, 6))
    assert (["W1"], 24) in summary.channel_groups  # W1 reads as W1 * g
    assert model.get_parameter("parametrizations.W1.original") is w1  # the object is kept
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 7))  # the product fails
    assert model.get_parameter("parametrizations.W1.original") is w1
    assert set(dict(model.named_parameters())) >= {
        "parametrizations.W1.original",
        "parametrizations.b1.original",
        "parametrizations.W2.original",
    }
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_filter_fn_is_asked_with_the_module_holding_the_parameter() -> None:
    torch.manual_seed(5)
    model = ParamMapNet()
    asked: list[tuple[str, str]] = []

    def keep(m: nn.Module, name: str) -> bool:
        asked.append((type(m).__name__, name))
        return name != "W1"

    summary = gate_(model, torch.randn(2, 6), filter_fn=keep)
    assert ("ParamMapNet", "W1") in asked
    assert summary.channel_groups == [(["W2"], 16)], str(summary)
    assert (["W1"], 24, "filter_fn rejected W1") in summary.ungated_groups


def test_a_plan_refuses_parameter_slices_that_do_not_fit() -> None:
    torch.manual_seed(6)
    x = torch.randn(2, 6)
    model = ParamMapNet()
    gate_(model, x)
    _close_some(model, torch.Generator().manual_seed(6))
    plan = json.loads(json.dumps(export_plan(model)))
    assert plan["slices"]["W1"]["kind"] == "matrix_t"  # (in, out), as x @ W1 reads it
    assert plan["slices"]["b1"]["kind"] == "vector"
    assert plan["slices"]["W2"]["kind"] == "matrix"  # (out, in), as F.linear reads it
    hand = {k: v for k, v in plan.items() if k not in ("checksum", "model")}  # by hand
    fresh = apply_plan(ParamMapNet(), plan)
    twice = {**hand, "slices": {k: hand["slices"][k] for k in ("W1", "b1")}}
    with pytest.raises(ValueError, match="expects parameter 'W1' to have 24 output units"):
        apply_plan(fresh, twice)  # applied twice
    swapped = json.loads(json.dumps(hand))
    swapped["slices"]["W2"] = {"kind": "matrix_t", "in": None, "out": None}
    with pytest.raises(ValueError, match="reads it as 'matrix'"):
        apply_plan(ParamMapNet(), swapped)
    other = json.loads(json.dumps(hand))
    other["slices"]["b1"]["out"] = [0]
    with pytest.raises(ValueError, match="bias 'b1'"):
        apply_plan(ParamMapNet(), other)
    missing = json.loads(json.dumps(hand))
    missing["slices"]["W9"] = missing["slices"].pop("W2")
    with pytest.raises(ValueError, match="slices parameter 'W9', which the model does not"):
        apply_plan(ParamMapNet(), missing)
    vector_in = json.loads(json.dumps(hand))
    vector_in["slices"]["b1"]["in"] = [0]
    with pytest.raises(ValueError, match="'vector' slice, whose channels are its 'out'"):
        apply_plan(ParamMapNet(), vector_in)


class Whole(nn.Module):
    """An nn.Linear's features read, and a head fed, by a product gate_ leaves whole."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.l1, self.head = nn.Linear(6, 16), nn.Linear(5, 2)
        self.W = nn.Parameter(torch.randn(16, 5) / 4)
        self.b = nn.Parameter(torch.randn(5))
        self.P3 = nn.Parameter(torch.randn(2, 16, 5) / 4)
        self.v = nn.Parameter(torch.randn(16) / 4)
        self.register_buffer("buf", torch.randn(16, 5) / 4)
        self.wide = nn.Parameter(torch.randn(1, 5))
        self.fc = nn.Linear(16, 5)
        self.emb = nn.Embedding(5, 16)
        self.norm = nn.utils.parametrizations.weight_norm(nn.Linear(16, 5))
        self.conv = nn.Conv1d(6, 8, 1)
        self.Wl = nn.Parameter(torch.randn(4, 5) / 2)
        if kind == "tied":
            self.alias = self.W

    def forward(self, x: Tensor) -> Tensor:
        k, h = self.kind, torch.relu(self.l1(x))  # (B, 16)
        if k == "read twice":
            y = h @ self.W + self.W.sum()
        elif k == "transposed twice":
            wt = self.W.T
            y = F.linear(h, wt.T.T) + h @ wt.T
        elif k == "3-d":
            y = (h.unsqueeze(-2).unsqueeze(-3) @ self.P3).sum((-2, -3))  # (B, 1, 1, 16) @ P3
        elif k == "1-d":
            y = (h @ self.v).unsqueeze(-1).repeat(1, 5)
        elif k == "computed":
            y = h @ (self.W + 2)  # (W * 2 is a scaled parameter map since 2026-12-08)
        elif k == "computed F.linear":
            y = F.linear(h, self.W.T + 2)
        elif k == "parametrized":
            y = F.linear(h, self.norm.weight, self.norm.bias)
        elif k == "left":
            y = (self.W.T @ h.transpose(0, 1)).transpose(0, 1)
        elif k == "buffer":
            y = h @ self.buf
        elif k == "tied":
            y = h @ self.W
        elif k == "module":
            y = F.linear(h, self.fc.weight) + self.fc(h)
        elif k == "embedding":
            y = h @ self.emb.weight.T
        elif k == "einsum":
            y = torch.einsum("bh,hd->bd", h, self.W)
        elif k == "bias shape":
            y = h @ self.W + self.wide
        elif k == "bias read twice":
            y = F.linear(h, self.W.T, self.b) + self.b
        elif k == "product read twice":
            z = h @ self.W
            y = z + self.b + z
        else:  # "other dimension": F.linear over the length of a (B, 8, 5) conv output
            c = torch.relu(self.conv(x.unsqueeze(-1).repeat(1, 1, 5)))  # (B, 8, 5)
            y = F.linear(c, self.Wl).sum(1).repeat(1, 2)[:, :5]  # (B, 5)
        return self.head(torch.relu(y))  # (B, 2)


# kind -> (summary line, reason in it, l1's features still gated: the weight's input
# features are sliced, only its output units are left whole)
WHOLE = {
    "read twice": ("weight W", "read in more than one place", False),
    "transposed twice": ("weight W", "read in more than one place", False),
    "3-d": ("weight P3", "3-d, not a matrix", False),
    "1-d": ("weight v", "1-d, not a matrix", False),
    "computed": ("weight W", "computed from it when the model runs (node 'add')", False),
    "computed F.linear": ("weight W", "computed from it when the model runs (node 'add')", False),
    "parametrized": ("weight norm.parametrizations.weight", "computed by that module", False),
    "left": ("weight W", "the left operand (W @ x: x @ W is sliced)", False),
    "buffer": ("weight buf", "a buffer or constant, not a parameter", False),
    "tied": ("weight W", "parameter 'W' is also 'alias' (a shared tensor)", False),
    "module": ("weight fc.weight", "parameter 'fc.weight' is also used by module 'fc'", False),
    "embedding": ("weight emb.weight", "belongs to Embedding 'emb'", False),
    # before 2026-12-07 the summary did not mention W (and l1's reason named no weight)
    "einsum": ("weight W", "torch.einsum is not a parameter-map form gate_ reads", False),
    "bias shape": ("W: node 'add'", "its bias 'wide' has shape (1, 5), not (5,)", True),
    "bias read twice": ("weight W", "output units are not gated: its bias 'b' is read in", True),
    "product read twice": ("W: node 'add'", "the product is also read without it", True),
    "other dimension": ("weight Wl", "its input's gated channels are on another dimension", True),
}


@pytest.mark.parametrize("kind", list(WHOLE))
def test_forms_left_whole_say_why_and_prune_exactly(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 6, generator=gen)

    def factory() -> Whole:
        torch.manual_seed(7)
        return Whole(kind)

    model = factory()
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    where, why, l1_gated = WHOLE[kind]
    text = str(summary)
    assert any(where in line and why in line for line in text.splitlines()), text
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert ("l1" in gated) == l1_gated, text
    reasons = {p: r for producers, _, r in summary.ungated_groups for p in producers}
    if kind == "other dimension":  # the conv's channels are read along another dimension
        assert why in reasons["conv"], text
    elif kind == "module":  # fc is called and its weight read: left whole as a shared tensor
        assert "its weight is read directly by node 'fc_weight'" in reasons["l1"], text
    elif not l1_gated:  # l1's features are read by the product left whole
        assert why in reasons["l1"], text
    assert not any(p in gated for p in ("W", "P3", "v", "buf", "Wl", "fc.weight")), text
    assert isinstance(dense, gp.Cost)
    all_open = gp.cost(model, x, hard=True)
    assert (float(all_open.flops), float(all_open.params)) == (dense.flops, dense.params)
    if summary.channel_groups:
        _close_some(model, gen)
    pruned = check_pruned(model, x, gen, factory)
    if l1_gated:
        assert pruned.get_submodule("l1").out_features < 16


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.W = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.lstm(x)[0][:, -1], self.W)  # (B, 4)


def test_a_recurrent_output_read_with_a_parameter_keeps_its_units() -> None:
    # its gate folds into Linear/Conv consumers only: a parameter consumer would read the
    # pruned units unscaled
    summary = gate_(Recurrent(), torch.randn(2, 5, 3))
    assert summary.rnns == [], str(summary)
    (name, why), *_ = summary.ungated_layers
    assert name == "lstm"
    assert "output gate cannot be folded into its consumers" in why
    assert "reads them with parameter 'W'" in why


class Owned(nn.Module):
    """Parameters held by an nn.Linear that is never called, and by an nn.ParameterList."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(16, 5) / 4)])
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(F.linear(x, self.proj.weight, self.proj.bias))  # (B, 16)
        return self.head(torch.relu(h @ self.ws[0]))  # (B, 2)


def test_parameters_of_an_uncalled_linear_and_a_parameter_list_are_sliced() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 6, generator=gen)

    def factory() -> Owned:
        torch.manual_seed(8)
        return Owned()

    model = factory()
    summary = gate_(model, x)
    assert sorted(p for p, _ in summary.channel_groups) == [["proj.weight"], ["ws.0"]], str(summary)
    _close_some(model, gen)
    pruned = check_pruned(model, x, gen, factory)
    proj = pruned.get_submodule("proj")
    assert isinstance(proj, nn.Linear)
    assert (proj.out_features, proj.in_features) == tuple(proj.weight.shape)
    assert proj.out_features < 16


class Block(nn.Module):
    """``x + fc(relu(x @ W + b))``: a parameter map into an nn.Linear closing the branch."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(width, hidden) / width**0.5)
        self.b = nn.Parameter(torch.randn(hidden) / 4)
        self.fc = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc(torch.relu(x @ self.W + self.b))  # (..., width)


class Stack(nn.Module):
    def __init__(self, depth: int, width: int, hidden: int) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width, hidden) for _ in range(depth))
        self.out = nn.Parameter(torch.randn(3, width) / width**0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)  # (..., width)
        for block in self.blocks:
            h = block(h)
        return F.linear(torch.relu(h), self.out)  # (..., 3)


@settings(max_examples=examples(12), deadline=None)
@given(
    depth=st.integers(1, 3),
    width=st.integers(2, 6),
    hidden=st.integers(2, 8),
    rank=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_parameters_of_submodules_in_residual_blocks(
    depth: int, width: int, hidden: int, rank: int, seed: int
) -> None:
    """Parameters held by blocks of an nn.ModuleList, the trunk read by each block's ``x @ W``
    and by the read-out ``F.linear(h, self.out)``; closed blocks rewrite the loop's module."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*((3, 4) if rank == 2 else (3, 2, 4)), generator=gen)

    def factory() -> Stack:
        torch.manual_seed(seed)
        return Stack(depth, width, hidden)

    model = factory()
    summary = gate_(model, x)
    groups = sorted(sorted(p) for p, _ in summary.channel_groups)
    trunk = sorted(["stem", *(f"blocks.{i}.fc" for i in range(depth))])
    assert groups == sorted([trunk, *([f"blocks.{i}.W"] for i in range(depth))]), str(summary)
    assert len(summary.blocks) == depth, str(summary)
    randomise_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory, batches=(1, 4))
    _check_other_lengths(pruned, model, x)


class Attention(nn.Module):
    """Hand-written attention whose projections are parameters: ``x @ self.wq`` and so on."""

    def __init__(self, d: int = 8, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(d, d) / d**0.5) for _ in range(3))
        self.wo = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.bo = nn.Parameter(torch.randn(d) / 4)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            (x @ w).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for w in (self.wq, self.wk, self.wv)
        )  # (B, H, T, D)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, d)
        return self.head(torch.relu(y @ self.wo.T + self.bo)).mean(1)  # (B, 2)


def test_hand_written_attention_with_parameter_projections_prunes_heads() -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 8, generator=gen)

    def factory() -> Attention:
        torch.manual_seed(9)
        return Attention()

    model = factory()
    summary = gate_(model, x)
    heads = [summary.channel_groups[i] for i in summary.head_groups]
    assert heads == [(["wq", "wk", "wv"], 4)], str(summary)
    assert (["wo"], 8) in summary.channel_groups, str(summary)
    _close_some(model, gen)
    pruned = check_pruned(model, x, gen, factory)
    assert pruned.get_parameter("wq").shape[1] < 8  # closed heads' columns are gone
    _check_other_lengths(pruned, model, x)


def test_a_plan_refuses_a_parameter_and_its_module_both_sliced() -> None:
    torch.manual_seed(10)
    x = torch.randn(2, 6)
    model = Owned()
    gate_(model, x)
    _close_some(model, torch.Generator().manual_seed(10))
    plan = json.loads(json.dumps(export_plan(model)))
    assert plan["slices"]["proj.weight"]["kind"] == "matrix"
    assert plan["slices"]["proj.bias"]["kind"] == "vector"
    hand = {k: v for k, v in plan.items() if k not in ("checksum", "model")}
    hand["slices"]["proj"] = {"kind": "linear", "in": None, "out": [0]}
    fresh = Owned()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="whose module 'proj' \\(slices\\) already changes"):
        apply_plan(fresh, hand)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # unchanged


class _CheckpointedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(8, 16) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16) * 0.3)
        self.W2 = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.act = nn.ReLU()  # a child: cost() counts the block's own products as code

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(x @ self.W1 + self.b1) @ self.W2  # (B, 8)


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mode = "none"
        self.inp = nn.Linear(4, 8)
        self.block = _CheckpointedBlock()
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)  # (B, 8)
        if self.mode == "none":
            h = self.block(h)
        else:
            reentrant = self.mode == "reentrant"
            h = checkpoint(self.block, h, use_reentrant=reentrant)  # type: ignore[assignment]
        return self.head(h)  # (B, 2)


@pytest.mark.parametrize("train", [False, True])
def test_gradient_checkpointing_recomputes_with_the_gates(train: bool) -> None:
    """The recomputation in backward runs outside the root forward: with the weights swapped
    in only during the root forward it read the ungated W (gradients off by up to 0.78, first
    audit of this feature); the parametrization gates every read."""
    x = torch.randn(5, 4)
    grads = {}
    modes = ("none", "non-reentrant", "reentrant")
    for mode in modes:
        torch.manual_seed(0)
        model = _Checkpointed()
        gate_(model, x)
        gating = inserted_gating(model)
        with torch.no_grad():
            for g in gating.group_gates:
                assert isinstance(g, HardConcreteGate)
                g.log_alpha.copy_(torch.linspace(-2.0, 2.0, g.n))  # values strictly inside
        model.train(train)
        model.mode = mode
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same gate samples in training
        model(xx).square().sum().backward()
        w1 = model.get_parameter("block.parametrizations.W1.original")
        assert xx.grad is not None
        assert w1.grad is not None
        gate_grads = [g.log_alpha.grad for g in gating.group_gates]  # type: ignore[union-attr]
        grads[mode] = [xx.grad, w1.grad, *gate_grads]
    for mode in modes[1:]:
        for got, want in zip(grads[mode], grads["none"], strict=True):
            assert got is not None
            assert want is not None
            assert torch.allclose(got, want, atol=1e-6), mode


def test_threads_and_nested_calls_see_the_gated_weights() -> None:
    """A single slot of swapped weights was shared: two threads corrupted the parameters for
    good, a nested root call left the outer forward ungated (first audit of this feature)."""
    torch.manual_seed(2)
    model = ParamMapNet().eval()
    gate_(model, torch.randn(2, 6))
    gen = torch.Generator().manual_seed(2)
    _close_some(model, gen)
    stored = model.get_parameter("parametrizations.W1.original").detach().clone()
    xs = [torch.randn(3, 6, generator=gen) for _ in range(40)]
    with torch.no_grad():
        want = [model(x) for x in xs]
    results: list[list[Tensor]] = [[], []]

    def run(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                results[i].append(torch.stack([model(x) for x in xs]))

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for got in results[0] + results[1]:
        assert torch.equal(got, torch.stack(want))
    assert torch.equal(model.get_parameter("parametrizations.W1.original"), stored)
    inner: list[Tensor] = []
    calls = [0]

    def nested(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        calls[0] += 1
        if calls[0] == 1:
            inner.append(model(xs[1]))  # a root call inside the forward

    handle = model.head.register_forward_hook(nested)
    with torch.no_grad():
        outer = model(xs[0])
    handle.remove()
    assert torch.equal(outer, want[0])
    assert torch.equal(inner[0], want[1])


def test_gates_changed_after_a_forward_are_read_in_eval_mode() -> None:
    torch.manual_seed(3)
    model = ParamMapNet().eval()
    gate_(model, torch.randn(2, 6))
    model(torch.randn(2, 6))
    gating = inserted_gating(model)
    w1_gate = gating.group_gates[0]
    w1_gate.force_(torch.arange(w1_gate.n) < 3)
    stored = model.get_parameter("parametrizations.W1.original")
    w1 = model.W1  # read outside a forward, after the gates changed
    assert torch.equal(w1[:, :3], stored[:, :3].detach())
    assert not w1[:, 3:].any()


class SubBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 8))
        self.b = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(x @ self.W - self.b))  # (B, 2)


def test_a_plan_refuses_a_subtracted_bias_sliced_unlike_its_product() -> None:
    # before: the plan check followed biases of adds only: a hand-written plan keeping other
    # entries of b than of W's units applied, a model computing another function
    x = torch.randn(3, 4)
    torch.manual_seed(7)
    model = SubBias()
    gate_(model, x)
    gating = inserted_gating(model)
    gating.group_gates[0].force_(torch.arange(8) % 2 == 0)  # type: ignore[operator]
    plan = export_plan(model)
    assert plan["slices"]["b"] == {
        "kind": "vector",
        "in": None,
        "out": [0, 2, 4, 6],
        "n_in": None,
        "n_out": 8,
    }
    hand = {k: v for k, v in plan.items() if k not in ("checksum", "model")}
    hand["slices"] = {**hand["slices"], "b": {**hand["slices"]["b"], "out": [1, 3, 5, 7]}}
    with pytest.raises(ValueError, match="bias 'b'"):
        apply_plan(SubBias(), hand)


class AddmmResidual(nn.Module):
    """``torch.addmm(h, x, W)``: a gated tensor as addmm's added input."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(4, 8)
        self.W = nn.Parameter(torch.randn(6, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.l2(x))  # (B, 8)
        return self.head(torch.relu(torch.addmm(h, torch.relu(self.l1(x)), self.W)))


def test_a_gated_tensor_added_by_addmm_keeps_its_channels() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, generator=gen)

    def factory() -> AddmmResidual:
        torch.manual_seed(8)
        return AddmmResidual()

    model = factory()
    summary = gate_(model, x)
    assert summary.channel_groups == [(["l1"], 6)], str(summary)  # W's input features
    reasons = {p: r for producers, _, r in summary.ungated_groups for p in producers}
    assert "its bias is not a parameter read as it is" in reasons["l2"], str(summary)
    _close_some(model, gen)
    pruned = check_pruned(model, x, gen, factory)
    assert pruned.get_submodule("l1").out_features < 6
