"""gate_ / prune on less common CNN and ResNet code: in-place ops whose result the code drops
(``y.relu_()``, writes through views) in removed branches, blocks overwriting their input in
place under dense shortcuts, code branching on ``self.training`` (dropout, drop path) in a
train-mode model, and random residual CNN stacks (grouped / depthwise-multiplier / dilated
convs, reflect and circular padding, pre-activation, SE attention, ReLU- or scale-ended
branches, a block called twice, dense shortcuts) with random gate states."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import examples, inserted_gating, randomise_batchnorms, shortcut_flops
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_


def _set_gates(model: nn.Module, gen: torch.Generator, closed_blocks: list[int]) -> None:
    """Random channel gates (about half closed), the blocks in ``closed_blocks`` closed and the
    others open, every new shortcut open."""
    g = inserted_gating(model)
    with torch.no_grad():
        for gate in g.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.copy_(torch.empty(gate.n).uniform_(-6.0, 6.0, generator=gen))
        for i, gate in enumerate(g.block_gates):
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.fill_(-8.0 if i in closed_blocks else 5.0)
        if g.edge_gate is not None:
            assert isinstance(g.edge_gate, HardConcreteGate)
            g.edge_gate.log_alpha.fill_(5.0)


def _check(
    factory: Callable[[], nn.Module],
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    closed_blocks: tuple[int, ...] = (),
    shortcuts: str | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Gate, set gates, prune: exact on fresh inputs, hard cost = pruned cost, strictly
    smaller when anything closed, plan replay exact. Returns (gated, pruned)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = factory()
    randomise_batchnorms(model, gen)
    model.eval()
    x = torch.randn(*shape, generator=gen)  # (B, C, *S)
    dense = gatedprune.cost(model, x)
    assert isinstance(dense, Cost)
    with torch.no_grad():
        before = model(x)  # (B, K)
    gate_(model, x, shortcuts=shortcuts)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)  # gates start open: same function
    _set_gates(model, gen, list(closed_blocks))
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    xi = torch.randn(*shape, generator=gen)  # (B, C, *S)
    with torch.no_grad():
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    c = gatedprune.cost(pruned, xi)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    g = inserted_gating(model)
    closed_any = bool(g.closed_blocks()) or any(not bool(q.is_open().all()) for q in g.group_gates)
    if closed_any:
        assert c.flops < dense.flops
        assert c.params < dense.params
    fresh = apply_plan(factory(), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5
    return model, pruned


# ------------------------------------------- 1. in-place ops whose result the code drops


class _InplaceBranch(nn.Module):
    """``y = c1(x); y.relu_()``: the in-place op's return value is never used (fx records it
    as a node without users); closing the block must remove it with its branch."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))  # (B, 8, H, W)
        y = self.bn1(self.c1(x))  # (B, 8, H, W)
        if self.op == "method":
            y.relu_()
        elif self.op == "function":
            torch.relu_(y)
        elif self.op == "module":
            self.relu(y)
        elif self.op == "view":
            y[:, :, :3].relu_()  # writes into y through a view
        elif self.op == "narrow":
            z = y.narrow(1, 2, 3)  # (B, 3, H, W), a view of y
            z += 1.0
        else:
            y.mul_(0.5)
        y = self.c2(y)  # (B, 8, H, W)
        x = x + y  # (B, 8, H, W)
        return self.fc(x.mean(dim=(2, 3)))  # (B, 3)


@pytest.mark.parametrize("op", ["method", "function", "module", "scale", "view", "narrow"])
@pytest.mark.parametrize("closed", [(), (0,)])
def test_closed_block_with_an_unused_in_place_result_prunes(
    op: str, closed: tuple[int, ...]
) -> None:
    model, pruned = _check(lambda: _InplaceBranch(op), (2, 3, 6, 6), closed_blocks=closed)
    assert len(inserted_gating(model).block_gates) == 1
    assert hasattr(pruned, "c1") != bool(closed)  # the removed branch's modules are gone


# ------------------------------------ 2. a block overwriting its input in place (dense)


class _ReluFirstBlock(nn.Module):
    """Pre-activation style block whose first op is an in-place ReLU of its input: it
    overwrites the previous block's output, which a new shortcut may still read."""

    def __init__(self, c: int, keep_result: bool) -> None:
        super().__init__()
        self.keep_result = keep_result
        self.relu = nn.ReLU(inplace=True)
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.keep_result:
            x = self.relu(x)  # (B, C, H, W), written into the caller's tensor
        else:
            self.relu(x)  # the same, result dropped
        return x + self.c2(F.relu(self.bn(self.c1(x))))  # (B, C, H, W)


class _ReluFirstNet(nn.Module):
    def __init__(self, keep_result: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.blocks = nn.Sequential(*[_ReluFirstBlock(6, keep_result) for _ in range(4)])
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))  # (B, 3)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("keep_result", [True, False])
def test_dense_shortcut_from_an_output_the_next_block_overwrites_prunes_exactly(
    seed: int, keep_result: bool
) -> None:
    model, _ = _check(
        lambda: _ReluFirstNet(keep_result), (2, 3, 5, 5), seed=seed, shortcuts="dense"
    )
    assert len(inserted_gating(model).block_gates) == 4
    summary = gate_(_ReluFirstNet(), torch.randn(2, 3, 5, 5), shortcuts="dense")
    assert summary.shortcuts == []  # each source is overwritten before the shortcut reads it
    why = "blocks.1.relu overwrites its output in place before blocks.2 reads it"
    assert ("blocks.0", why) in summary.unconnected


# --------------------------- 3. code reading self.training (dropout, drop path), train mode


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth as timm writes it: a Python branch on the module's mode."""
    if p == 0.0 or not training:
        return x
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)  # (B, 1, ...)
    return x * mask / (1.0 - p)


class _StochasticBlock(nn.Module):
    def __init__(self, c: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.c1(x))  # (B, C, H, W)
        if self.kind == "dropout":
            h = F.dropout(h, 0.5, self.training)
        y = self.c2(h)  # (B, C, H, W)
        if self.kind == "drop_path":
            y = _drop_path(y, 0.3, self.training)
        return x + y


class _StochasticNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.blocks = nn.Sequential(*[_StochasticBlock(6, kind) for _ in range(3)])
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))  # (B, 3)


@pytest.mark.parametrize("kind", ["dropout", "drop_path"])
def test_train_mode_model_gates_blocks_and_prunes_to_the_eval_function(kind: str) -> None:
    """A freshly built model is in train mode: gate_, prune and apply_plan must still trace
    its eval-mode code (fx bakes ``self.training`` into rewritten modules)."""
    torch.manual_seed(0)
    model = _StochasticNet(kind)  # train mode, as constructed
    x = torch.randn(2, 3, 5, 5)  # (B, C, H, W)
    summary = gate_(model, x, shortcuts="dense")
    assert model.training  # gate_ leaves every module in its mode
    assert all(m.training for m in model.blocks.modules())
    assert len(summary.blocks) == 3
    g = inserted_gating(model)
    with torch.no_grad():
        g.block_gates[1].log_alpha.fill_(-8.0)  # closed: blocks.1's code is rewritten
        assert isinstance(g.edge_gate, HardConcreteGate)
        g.edge_gate.log_alpha.fill_(5.0)
    pruned = gatedprune.prune(model)  # called in train mode
    fresh = apply_plan(_StochasticNet(kind), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    for m in (model, pruned, fresh):
        m.eval()
    with torch.no_grad():
        ref = model(x)  # (B, 3)
        for _ in range(3):
            assert (pruned(x) - ref).abs().max().item() <= 1e-5
            assert (fresh(x) - ref).abs().max().item() <= 1e-5


# --------------------- 4. a producer whose share of a concatenated group closes entirely


class _CatThenResidual(nn.Module):
    """DenseNet-style growth then a residual block: ``stem`` (4 channels) and ``grow`` (2) are
    concatenated into one group of 6 that the residual add couples with ``r2``'s outputs."""

    def __init__(self, conv_grow: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.grow: nn.Module = nn.Conv2d(4, 2, 1) if conv_grow else nn.Linear(4, 2)
        self.r1 = nn.Conv2d(6, 3, 3, padding=1)
        self.r2 = nn.Conv2d(3, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))  # (B, 4, H, W)
        if isinstance(self.grow, nn.Conv2d):
            g = self.grow(h)  # (B, 2, H, W)
        else:
            g = self.grow(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, 2, H, W)
        h = torch.cat([h, F.relu(g)], dim=1)  # (B, 6, H, W)
        h = h + self.r2(F.relu(self.r1(h)))  # (B, 6, H, W)
        return self.head(h.mean(dim=(2, 3)))  # (B, 3)


@pytest.mark.parametrize("conv_grow", [True, False])
def test_producer_whose_channels_all_close_keeps_one(conv_grow: bool) -> None:
    """The group keeps channels, but every channel of ``grow`` is closed: a conv with no
    output channels cannot run, so one is kept, with its gate value 0 folded in."""
    torch.manual_seed(0)
    model = _CatThenResidual(conv_grow).eval()
    x = torch.randn(2, 2, 5, 5)  # (B, C, H, W)
    dense = gatedprune.cost(model, x)
    assert isinstance(dense, Cost)
    gate_(model, x)
    g = inserted_gating(model)
    assert [q.n for q in g.group_gates] == [6, 3]
    with torch.no_grad():
        for q in g.group_gates:
            assert isinstance(q, HardConcreteGate)
            q.log_alpha.fill_(5.0)
        g.group_gates[0].log_alpha[4:] = -8.0  # both of grow's channels
        g.group_gates[0].log_alpha[0] = -8.0  # and one of stem's
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    assert isinstance(pruned.grow, nn.Conv2d | nn.Linear)
    assert pruned.grow.weight.shape[0] == 1  # one zero channel kept
    xi = torch.randn(2, 2, 5, 5)  # (B, C, H, W)
    with torch.no_grad():
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    c = gatedprune.cost(pruned, xi)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    assert c.flops < dense.flops
    assert c.params < dense.params
    fresh = apply_plan(_CatThenResidual(conv_grow), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5


# ------------------------------------------------ 5. random residual CNN stacks (hypothesis)


class _RandomBlock(nn.Module):
    """A residual CNN block drawn from the less common variants: post-/pre-activation or
    neither, a plain (reflect padding), dilated (circular padding), grouped (not depthwise) or
    depthwise-with-multiplier first conv, a branch ending in a ReLU or a scalar multiply, SE
    channel attention, an in-place ReLU whose result is dropped, a projection shortcut."""

    def __init__(self, c_in: int, c_out: int, mid: int, stride: int, spec: tuple[str, ...]) -> None:
        super().__init__()
        style, conv, tail, se = spec
        self.style, self.tail, self.se = style, tail, se == "se"
        if conv == "dw":
            self.c1 = nn.Conv2d(c_in, 2 * c_in, 3, stride, 1, groups=c_in, bias=False)
            m = 2 * c_in
        elif conv == "dilated":
            self.c1 = nn.Conv2d(c_in, mid, 3, stride, 2, 2, bias=False, padding_mode="circular")
            m = mid
        elif conv == "grouped":
            self.c1 = nn.Conv2d(c_in, 2 * mid, 3, stride, 1, groups=2 if c_in % 2 == 0 else 1)
            m = 2 * mid
        else:
            self.c1 = nn.Conv2d(c_in, mid, 3, stride, 1, bias=False, padding_mode="reflect")
            m = mid
        self.n1 = nn.BatchNorm2d(c_in if style == "pre" else m)
        self.n2 = nn.BatchNorm2d(m if style == "pre" else c_out)
        self.c2 = nn.Conv2d(m, c_out, 1, bias=style == "pre")
        self.proj = (
            nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride > 1 or c_in != c_out else None
        )
        self.f1 = nn.Conv2d(c_out, 2, 1)
        self.f2 = nn.Conv2d(2, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x if self.proj is None else self.proj(x)  # (B, C_out, H', W')
        if self.style == "pre":
            y = self.c2(F.relu(self.n2(self.c1(F.relu(self.n1(x))))))  # (B, C_out, H', W')
        else:
            y = self.n1(self.c1(x))  # (B, M, H', W')
            y.relu_()  # result dropped: y itself is updated
            y = self.n2(self.c2(y))  # (B, C_out, H', W')
        if self.tail == "relu":
            y = F.relu(y)
        elif self.tail == "scale":
            y = 0.5 * y
        if self.se:  # squeeze-and-excitation: (B, C_out, 1, 1) weights
            y = y * torch.sigmoid(self.f2(F.relu(self.f1(F.adaptive_avg_pool2d(y, 1)))))
        out = s + y
        return F.relu(out) if self.style == "post" else out


class _RandomCNN(nn.Module):
    def __init__(self, cfg: list[tuple[int, int, int, tuple[str, ...]]], share: bool) -> None:
        super().__init__()
        c = cfg[0][0]
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        blocks = []
        for w, mid, stride, spec in cfg:
            blocks.append(_RandomBlock(c, w, mid, stride, spec))
            c = w
        self.blocks = nn.ModuleList(blocks)
        self.share = share and self.blocks[-1].proj is None
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))  # (B, C, H, W)
        for b in self.blocks:
            x = b(x)
        if self.share:  # the last block called twice: weight sharing
            x = self.blocks[-1](x)
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), (1, 1))  # (B, C, 1, 1)
        return self.fc(torch.flatten(x, 1))  # (B, 3)


def _random_gates_prune_exactly(
    model: nn.Module, x: Tensor, fresh: nn.Module, gen: torch.Generator
) -> tuple[nn.Module, Cost, Tensor]:
    """Every gate of the ``gate_`` model at a random log alpha in [-6, 6), then: pruned ==
    gated on a fresh input shaped like ``x``, cost(pruned) == the hard cost, and the plan
    replayed on ``fresh`` (a dense instance) with the pruned weights computes the same.
    Returns (pruned, its cost, the fresh input)."""
    g = inserted_gating(model)
    with torch.no_grad():
        edge = [g.edge_gate] if g.edge_gate is not None else []
        for gate in [*g.group_gates, *g.block_gates, *edge]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.copy_(torch.empty(gate.n).uniform_(-6.0, 6.0, generator=gen))
    hard = gatedprune.cost(model, x, hard=True)
    pruned = gatedprune.prune(model)
    xi = torch.randn(x.shape, generator=gen)  # like x: (B, C, H, W)
    with torch.no_grad():
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    c = gatedprune.cost(pruned, xi)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    replayed = apply_plan(fresh, json.loads(json.dumps(export_plan(model))))
    replayed.load_state_dict(pruned.state_dict())
    replayed.eval()
    with torch.no_grad():
        assert (replayed(xi) - model(xi)).abs().max().item() <= 1e-5
    return pruned, c, xi


_SPEC = st.tuples(
    st.sampled_from(["post", "pre", "none"]),
    st.sampled_from(["plain", "dw", "dilated", "grouped"]),
    st.sampled_from(["none", "relu", "scale"]),
    st.sampled_from(["", "se"]),
)
_BLOCK = st.tuples(st.integers(2, 5), st.integers(2, 4), st.sampled_from([1, 1, 2]), _SPEC)


@settings(max_examples=examples(50), deadline=None)
@given(
    cfg=st.lists(_BLOCK, min_size=1, max_size=4),
    dense=st.booleans(),
    share=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_residual_cnn_stacks_prune_exactly(
    cfg: list[tuple[int, int, int, tuple[str, ...]]], dense: bool, share: bool, seed: int
) -> None:
    size = 8
    specs = []
    for w, mid, stride, spec in cfg:  # padding modes need more pixels than the padding
        specs.append((w, mid, stride, spec if size > 2 else ("none", "dw", *spec[2:])))
        size = (size - 1) // stride + 1
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _RandomCNN(specs, share)
    randomise_batchnorms(model, gen)
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)  # (B, C, H, W)
    dense_cost = gatedprune.cost(model, x)
    assert isinstance(dense_cost, Cost)
    with torch.no_grad():
        before = model(x)  # (B, 3)
    gate_(model, x, shortcuts="dense" if dense else None)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    pruned, c, xi = _random_gates_prune_exactly(model, x, _RandomCNN(specs, share), gen)
    g = inserted_gating(model)
    if g.closed_blocks() or any(not bool(q.is_open().all()) for q in g.group_gates):
        assert c.flops - shortcut_flops(pruned, xi) < dense_cost.flops  # 2 per element
        assert c.params < dense_cost.params


# ------------------------------------------------- 6. random CNN op chains (hypothesis)

_OPS = [
    "conv", "dw", "dw_bn", "bn", "relu", "relu_", "gelu", "tanh", "leaky", "maxpool", "avgpool",
    "cat", "cat_self", "res", "sub_res", "scale", "neg", "se", "bn_relu_conv", "grouped", "pad",
    "channels_last_linear",
]  # fmt: skip


class _OpChain(nn.Module):
    """A plain chain of CNN ops, each possibly changing the width (``widths[i]``)."""

    def __init__(self, ops: list[str], widths: list[int]) -> None:
        super().__init__()
        self.ops = ops
        c = 4
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.layers = nn.ModuleList()
        for op, w in zip(ops, widths, strict=True):
            m = nn.ModuleDict()
            if op == "conv":
                m["a"], c = nn.Conv2d(c, w, 3, padding=1), w
            elif op == "dw":
                m["a"], c = nn.Conv2d(c, 2 * c, 3, padding=1, groups=c), 2 * c
            elif op == "dw_bn":
                m["a"], m["b"] = (
                    nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                    nn.BatchNorm2d(c),
                )
            elif op == "bn":
                m["a"] = nn.BatchNorm2d(c)
            elif op == "cat":
                m["a"], c = nn.Conv2d(c, w, 1), c + w
            elif op == "cat_self":
                c = 2 * c
            elif op == "res":
                m["a"], m["b"] = nn.Conv2d(c, w, 3, padding=1), nn.Conv2d(w, c, 1)
            elif op == "sub_res":
                m["a"] = nn.Conv2d(c, c, 1)
            elif op == "se":
                m["a"], m["b"] = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)
            elif op == "bn_relu_conv":
                m["a"], m["b"], c = nn.BatchNorm2d(c), nn.Conv2d(c, w, 1), w
            elif op == "grouped":  # groups=2, not depthwise: pruned by position within groups
                m["p"] = nn.Conv2d(c, 2 * w, 1)
                m["a"], c = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2), 2 * w
            elif op == "channels_last_linear":
                m["a"], c = nn.Linear(c, w), w
            self.layers.append(m)
        self.head = nn.Linear(4 * c, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))  # (B, C, H, W) throughout
        for op, m in zip(self.ops, self.layers, strict=True):
            if op in ("conv", "dw", "bn"):
                h = m["a"](h)
            elif op == "dw_bn":
                h = m["b"](m["a"](h))
            elif op == "relu":
                h = F.relu(h)
            elif op == "relu_":
                h.relu_()
            elif op == "gelu":
                h = F.gelu(h)
            elif op == "tanh":
                h = torch.tanh(h)
            elif op == "leaky":
                h = F.leaky_relu(h, 0.1)
            elif op == "maxpool":
                h = F.max_pool2d(h, 3, 1, 1)
            elif op == "avgpool":
                h = F.avg_pool2d(h, 3, 1, 1)
            elif op == "cat":
                h = torch.cat([h, F.relu(m["a"](h))], dim=1)
            elif op == "cat_self":
                h = torch.cat([h, h], dim=1)
            elif op == "res":
                h = h + m["b"](F.relu(m["a"](h)))
            elif op == "sub_res":
                h = m["a"](h) - h
            elif op == "scale":
                h = h * 0.5
            elif op == "neg":
                h = -h
            elif op == "se":
                w = torch.sigmoid(m["b"](F.relu(m["a"](h.mean(dim=(2, 3), keepdim=True)))))
                h = h * w  # w: (B, C, 1, 1)
            elif op == "bn_relu_conv":
                h = m["b"](F.relu(m["a"](h)))
            elif op == "grouped":
                h = m["a"](m["p"](h))
            elif op == "pad":
                h = F.pad(h, (1, 1, 1, 1))[:, :, 1:-1, 1:-1]
            else:  # channels_last_linear
                h = m["a"](h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = F.adaptive_avg_pool2d(h, 2)  # (B, C, 2, 2)
        return self.head(torch.flatten(h, 1))  # (B, 3)


@settings(max_examples=examples(60), deadline=None)
@given(
    ops=st.lists(st.sampled_from(_OPS), min_size=1, max_size=6),
    data=st.data(),
    seed=st.integers(0, 10_000),
)
def test_random_cnn_op_chains_prune_exactly(ops: list[str], data: st.DataObject, seed: int) -> None:
    widths = data.draw(st.lists(st.integers(2, 5), min_size=len(ops), max_size=len(ops)))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _OpChain(ops, widths)
    randomise_batchnorms(model, gen)
    model.eval()
    x = torch.randn(2, 2, 6, 6, generator=gen)  # (B, C, H, W)
    with torch.no_grad():
        before = model(x)  # (B, 3)
    gate_(model, x)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert inserted_gating(model).edge_gate is None  # no dense shortcuts asked for
    _random_gates_prune_exactly(model, x, _OpChain(ops, widths), gen)
