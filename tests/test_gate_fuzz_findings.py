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
  for both calls and the pruned model crashed;
* (a fourth round, on grouped convolutions) code computing for nothing next to a closed block:
  the hard cost counted what the rewrite dropped, and its plan was refused on replay; a conv
  with a ``weight_norm`` parametrization was sliced like a plain one (prune crashed).
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


# ---------------------------------------------------------------- second fuzzing round


class Outer2(nn.Module):
    """Two closed blocks, then an in-place ReLU: it wrote into ``h``, two blocks back."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.stem, self.b1, self.b2 = nn.Linear(3, d), Residual(nn.Linear(d, d)), Block(d)
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        return self.head(h + self.fc(self.b2(self.b1(h))))


def test_an_in_place_op_after_two_closed_blocks() -> None:
    torch.manual_seed(0)
    model = Outer2()
    x = torch.randn(3, 3)
    gate_(model, x, channels=False)
    _force(model, {"b1", "b2"}, set())  # the outer residual stays
    _exact(model, x)


class InnerPost(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc, self.relu = nn.Linear(d, d), nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        y += x
        return self.relu(y)


class Nested(nn.Module):
    def __init__(self, inner: nn.Module, d: int = 4) -> None:
        super().__init__()
        self.inner, self.g = inner, nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.g(self.inner(x))


def _nested_stack(inner: nn.Module) -> nn.Module:
    d = 4
    return nn.Sequential(
        nn.Linear(4, d),
        Residual(nn.Linear(d, d)),
        Residual(nn.Linear(d, d)),
        Nested(inner),
        Residual(nn.Linear(d, d)),
        Residual(nn.Linear(d, d)),
        nn.Linear(d, 2),
    )


def _force(model: nn.Module, closed: set[str], open_edges: set[tuple[str, str]]) -> None:
    gating = inserted_gating(model)
    owners = [owner for owner, _, _ in gating.summary.blocks]
    for owner, gate in zip(owners, gating.block_gates, strict=True):
        gate.force_(torch.tensor([owner not in closed]))
    if gating.edge_gate is not None:
        keep = [(e.src, e.dst) in open_edges for e in gating.edges]
        gating.edge_gate.force_(torch.tensor(keep))


def test_nested_closed_blocks_with_a_shortcut_from_the_inner_one() -> None:
    """The inner block's in-place ReLU ran on the trunk tensor once both closed, and a
    shortcut still read the inner block's output."""
    torch.manual_seed(0)
    model = _nested_stack(InnerPost(4))
    x = torch.randn(3, 4)
    gate_(model, x, channels=False, shortcuts="dense")
    edges = {(e.src, e.dst) for e in inserted_gating(model).edges}
    from_inner = {e for e in edges if e[0] == "3.inner"}
    assert from_inner
    _force(model, {"3", "3.inner"}, from_inner)
    _exact(model, x)


def test_shortcuts_into_a_block_and_a_block_nested_in_it() -> None:
    """Both shortcuts were chained onto the inner block's input and the outer residual got
    neither (pruned != gated by 0.9); the outer block's shortcut now comes first."""
    torch.manual_seed(0)
    model = _nested_stack(Residual(nn.Linear(4, 4)))
    x = torch.randn(3, 4)
    gate_(model, x, channels=False, shortcuts="dense")
    edges = {(e.src, e.dst) for e in inserted_gating(model).edges}
    both = {("1", "3"), ("1", "3.inner")}
    assert both <= edges
    _force(model, set(), both)
    _exact(model, x)


def test_a_module_shared_by_two_closed_blocks() -> None:
    torch.manual_seed(0)
    relu, d = nn.ReLU(), 4
    model = nn.Sequential(
        nn.Linear(3, d),
        Residual(nn.Sequential(nn.Linear(d, d), relu, nn.Linear(d, d))),
        Residual(nn.Sequential(nn.Linear(d, d), relu, nn.Linear(d, d))),
        nn.Linear(d, 2),
    )
    x = torch.randn(3, 3)
    gate_(model, x, channels=False)
    for g in inserted_gating(model).block_gates:
        g.force_(torch.zeros(1, dtype=torch.bool))
    _exact(model, x)


class SE(nn.Module):
    def __init__(self, act: nn.Module | None, form: str) -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(4, 4, 1), nn.Linear(4, 2), nn.Linear(2, 4)
        self.act, self.form = act, form

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)  # (B, 4, H, W)
        z = self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))  # (B, 4)
        s = nn.functional.hardsigmoid(z) if self.act is None else self.act(z)
        if self.form == "view":
            return x + y * s.view(s.size(0), -1, 1, 1)
        return x + y * s[:, :, None, None].expand_as(y)


@pytest.mark.parametrize(
    ("act", "form"),
    [(nn.Sigmoid(), "view"), (nn.Hardsigmoid(), "expand_as"), (None, "view")],
)
def test_excitation_modules_and_spellings(act: nn.Module | None, form: str) -> None:
    """nn.Sigmoid / nn.Hardsigmoid modules were costed at full width (hard cost != pruned
    cost); F.hardsigmoid (traced with inplace=False), s.view(s.size(0), ...) and expand_as
    kept the channels ungated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SE(act, form), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 5, 5)
    summary = gate_(model, x)
    assert any({"0", "1.conv", "1.fc2"} <= set(p) for p, _ in summary.channel_groups)
    for g in gatedprune.gate_modules(model):
        g.force_(torch.arange(g.n) % 2 == 0)
    _exact(model, x)


# ---------------------------------------------------------------- third fuzzing round


class TV(nn.Module):
    """torchvision style: out = fc(x); out += x; relu in place."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc, self.relu = nn.Linear(d, d), nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x)
        out += x
        return self.relu(out)


class Around(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return x + self.inner(x)


def test_an_in_place_op_behind_closed_blocks_with_a_reader_in_the_middle() -> None:
    """The outer residual reads the first closed block's output, the middle of the alias
    chain the second block's in-place ReLU would write into."""
    torch.manual_seed(0)
    d = 4
    model = nn.Sequential(
        nn.Linear(3, d), Residual(nn.Linear(d, d)), Around(TV(d)), nn.Linear(d, 2)
    )
    x = torch.randn(3, 3)
    gate_(model, x, channels=False)
    _force(model, {"1", "2.inner"}, set())
    _exact(model, x)


class Augmented(nn.Module):
    """``h = block(x); h += x``: fx records ``h + x``, so the write is invisible to it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.block, self.head = Residual(nn.Linear(d, d)), nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(x)
        h += x
        return self.head(h)


def test_an_augmented_assignment_on_a_closed_blocks_output_leaves_its_input() -> None:
    """The closed block returned its input, and ``h += x`` then doubled the caller's tensor
    in place (the pruned output was right, the caller's input changed)."""
    torch.manual_seed(0)
    model = Augmented(4)
    x = torch.randn(3, 4)
    gate_(model, x, channels=False)
    inserted_gating(model).block_gates[0].force_(torch.zeros(1, dtype=torch.bool))
    _exact(model, x)
    pruned = gatedprune.prune(model).eval()
    xi = torch.randn(5, 4)
    before = xi.clone()
    with torch.no_grad():
        pruned(xi)
    assert torch.equal(xi, before)


class TVRet(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x)
        out += x
        out.relu_()
        return out


class OuterFirst(nn.Module):
    def __init__(self, inner: nn.Module, d: int = 4) -> None:
        super().__init__()
        self.inner, self.g = inner, nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.g(self.inner(x)) + x


def test_a_shortcut_from_inside_a_closed_block_past_an_in_place_op() -> None:
    """The shortcut keeps the closed outer block's inner code alive, whose in-place ReLU the
    copy decision took for dead: it wrote into the trunk."""
    torch.manual_seed(0)
    d = 4
    model = nn.Sequential(
        nn.Linear(3, d),
        OuterFirst(nn.Sequential(TVRet(d), Residual(nn.Linear(d, d)))),
        Residual(nn.Linear(d, d)),
        Residual(nn.Linear(d, d)),
        nn.Linear(d, 2),
    )
    x = torch.randn(3, 3)
    gate_(model, x, channels=False, shortcuts="dense")
    assert ("1.inner.1", "2") in {(e.src, e.dst) for e in inserted_gating(model).edges}
    _force(model, {"1", "1.inner.0"}, {("1.inner.1", "2")})
    _exact(model, x)


class ResR(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + x


class AugParent(nn.Module):
    def __init__(self, inner: nn.Module, d: int = 4) -> None:
        super().__init__()
        self.inner, self.g = inner, nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x)
        h += x
        return x + self.g(h)


@pytest.mark.parametrize("first", [ResR, Residual])
def test_an_augmented_assignment_after_a_chain_of_closed_blocks(first: type[nn.Module]) -> None:
    """Two closed blocks in a row return their input; ``h += x`` after them reached ``x``."""
    torch.manual_seed(0)
    d = 4
    block0 = first(d) if first is ResR else first(nn.Linear(d, d))
    inner = nn.Sequential(block0, ResR(d))
    model = nn.Sequential(nn.Linear(3, d), AugParent(inner), nn.Linear(d, 2))
    x = torch.randn(3, 3)
    gate_(model, x, channels=False)
    _force(model, {"1.inner.0", "1.inner.1"}, set())
    _exact(model, x)


# ------------------------------------------------ a fourth round (grouped convolutions)


class DeadCall(nn.Module):
    """``unused = dead(h)`` is computed and never read; ``h`` feeds a residual branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(4, 4, 1)
        self.dead = nn.Conv1d(4, 6, 3, padding=1, groups=2, bias=False)
        self.b = nn.Conv1d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        unused = self.dead(h)  # noqa: F841 (the model computes it for nothing)
        return x + self.b(h)


class DeadChain(nn.Module):
    """An unused chain reading the trunk and a closed branch's inner tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.m0, self.m1 = nn.Conv1d(6, 4, 3, padding=1, bias=False), nn.BatchNorm1d(4)
        self.m2, self.m3 = nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.m4, self.m5 = nn.Conv1d(4, 2, 3, padding=1), nn.Conv1d(2, 4, 3, padding=1)
        self.m7, self.fc = nn.Conv1d(4, 2, 3, padding=1), nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        t1 = self.m0(x)
        t4 = self.m2(t1)
        t6 = self.m3(t4) + self.m1(t1)  # a residual block: branch m2, m3
        unused = self.m5(self.m4(t6 + t6)) + t4  # noqa: F841
        return self.fc(torch.relu(self.m7(t6)).mean(-1))


@pytest.mark.parametrize("factory", [DeadCall, DeadChain])
def test_code_computing_for_nothing_next_to_a_closed_block(factory: type[nn.Module]) -> None:
    # before: the hard cost counted `dead`, which the rewritten forward no longer computes
    # (hard 4320 FLOPs, pruned 0), and the exported plan of DeadChain was refused on replay
    # ("module call(s) ['m5'] ... compute nothing that is used but are not in 'erase'")
    import json

    from gatedprune.gating import apply_plan, export_plan

    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(3, model.m0.in_channels if hasattr(model, "m0") else 4, 10)
    gate_(model, x)
    for gate in inserted_gating(model).block_gates:
        gate.force_(torch.zeros(1, dtype=torch.bool))  # type: ignore[operator]
    model.eval()
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    c = gatedprune.cost(pruned, x)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5
    fresh = apply_plan(factory(), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert (fresh.eval()(x) - model(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("groups", [1, 2])
def test_a_conv_with_a_computed_weight_is_not_sliced(groups: int, norm: str) -> None:
    # before: weight_norm's conv was sliced like a plain one: the parameter counts disagreed
    # with every gate open, and prune raised KeyError "attribute 'weight' already exists".
    # spectral_norm's is kept whole; weight_norm's g and v are sliced since 2026-12-07 22:00
    from torch.nn.utils import parametrizations

    wrap = getattr(parametrizations, norm)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv1d(2, 8, 1)
            self.g = wrap(nn.Conv1d(8, 8, 3, padding=1, groups=groups))
            self.c, self.h = nn.Conv1d(8, 4, 1), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.g(torch.relu(self.a(x))))
            return self.h(torch.relu(self.c(h)).mean(-1))

    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(2, 2, 8)
    summary = gate_(model, x)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    if norm == "spectral_norm":
        assert "computes its weight when it runs" in reasons["a"]
    else:
        assert "a" not in reasons
        assert "g" not in reasons
    gating = inserted_gating(model)
    for gate in gating.group_gates:
        gate.force_(torch.arange(gate.n) % 2 == 0)  # type: ignore[operator]
    model.eval()
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    c = gatedprune.cost(pruned, x)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


# ------------------------------------------ an audit of hand-written attention (HF-BERT-like)


class _SelfPart(nn.Module):  # BertSelfAttention's place: computes the branch
    def __init__(self, c: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.lin(x))


class _OutputPart(nn.Module):  # BertSelfOutput's place: LayerNorm(dense(h) + input)
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dense, self.ln = nn.Linear(c, c), nn.LayerNorm(c)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.ln(self.dense(h) + x)


class SiblingBranch(nn.Module):
    """A residual add in one submodule whose branch starts in a sibling submodule."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.e, self.head = nn.Linear(3, c), nn.Linear(c, 2)
        self.sub, self.output = _SelfPart(c), _OutputPart(c)

    def forward(self, x: Tensor) -> Tensor:
        h = self.e(x)
        return self.head(self.output(self.sub(h), h))


def test_a_closed_block_whose_branch_starts_in_a_sibling_module() -> None:
    # before: prune rewrote the dead sibling itself and raised "node relu in 'sub' is still
    # used by output; cannot erase it" (HF-BERT: every removed attention or FFN block)
    torch.manual_seed(0)
    model = SiblingBranch()
    x = torch.randn(2, 5, 3)
    gate_(model, x)
    inserted_gating(model).block_gates[0].force_(torch.tensor([False]))  # type: ignore[operator]
    model.eval()
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    c = gatedprune.cost(pruned, x)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    assert "sub" not in dict(pruned.named_modules())
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


class ScaledByBufferSlice(nn.Module):
    """A buffer sliced while tracing becomes an fx constant (``_tensor_constant0``)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.e, self.fc, self.o = nn.Linear(3, c), nn.Linear(c, c), nn.Linear(c, 2)
        self.register_buffer("scale", torch.tensor([1.0, 0.5, 2.0, 1.5, 3.0]))

    def forward(self, x: Tensor) -> Tensor:
        h = self.e(x)
        return self.o(h + self.fc(h) * self.scale[1:])


def test_tensor_constants_keep_their_names_across_traces() -> None:
    # before: each trace left `_tensor_constant<k>` on the model and the next one took k + 1,
    # so prune of a plan naming the constant failed ("the plan names graph nodes the model
    # does not have: ['_tensor_constant0']")
    import json

    from gatedprune.gating import apply_plan, export_plan

    torch.manual_seed(0)
    model = ScaledByBufferSlice()
    x = torch.randn(2, 3)
    gate_(model, x)
    assert not [k for k in vars(model) if k.startswith("_tensor_constant")]
    inserted_gating(model).block_gates[0].force_(torch.tensor([False]))  # type: ignore[operator]
    model.eval()
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5
    fresh = apply_plan(ScaledByBufferSlice(), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert (fresh.eval()(x) - model(x)).abs().max().item() <= 1e-5


class _ScaledLayer(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.sub, self.output = _SelfPart(c), _OutputPart(c)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.output(self.sub(x) * scale, x)


class BufferArgument(nn.Module):
    """The layer gets a value fx computes from a buffer while tracing (as HF BERT's head mask
    from a buffer): tracing the layer alone gives other code."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.e, self.layer, self.head = nn.Linear(3, c), _ScaledLayer(c), nn.Linear(c, 2)
        self.register_buffer("scales", torch.rand(2, c) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.e(x), self.scales[0][None, :]))


@pytest.mark.parametrize("closed", [False, True])
def test_a_block_inside_a_module_given_a_buffer_slice_prunes_exactly(closed: bool) -> None:
    # before: the block was gated (its own module traced alone fine), and closing it made
    # prune rewrite the parent, which raised "cannot rewrite module 'layer'"; then (until
    # 2026-12-08 00:26 UTC) the block was left ungated, "cannot rewrite module 'layer'": the
    # buffer slice it is given is a constant of the whole model's trace, an input of the
    # layer's own; now the layer is rewritten with that argument as the caller's constant
    import json

    from gatedprune.gating import apply_plan, export_plan

    torch.manual_seed(0)
    model = BufferArgument()
    x = torch.randn(2, 5, 3)
    summary = gate_(model, x)
    assert [owner for owner, *_ in summary.blocks] == ["layer.output"]
    inserted_gating(model).block_gates[0].force_(torch.tensor([not closed]))  # type: ignore[operator]
    model.eval()
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        for xi in (x, torch.randn(3, 4, 3)):
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    fresh = apply_plan(BufferArgument(), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert (fresh.eval()(x) - model(x)).abs().max().item() <= 1e-5
    if closed:
        assert gatedprune.cost(pruned, x).flops < gatedprune.cost(BufferArgument(), x).flops
