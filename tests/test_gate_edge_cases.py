"""gate_ / prune on user code that used to give wrong results or crash: activations with
f(0) != 0, blocks updating their input in place, unused values in removed branches, pools over
the channel axis, ModuleList stacks with dense shortcuts, sigmoid gates, bad plans and inputs."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gatedprune
import gatedprune.costs as gp_costs
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import ScaledAdd, apply_plan, export_plan, gate_


def _close_half(model: nn.Module) -> None:
    """Open every channel gate confidently, then close the first half of each group."""
    with torch.no_grad():
        for g in model.gatedprune.group_gates:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.fill_(5.0)
            g.log_alpha[: g.n // 2] = -10.0


def _check_prune(model: nn.Module, shape: tuple[int, ...], seed: int = 1) -> nn.Module:
    """prune(model) equals the gated model in eval mode on fresh inputs; same hard cost."""
    model.eval()
    small = gatedprune.prune(model)
    gen = torch.Generator().manual_seed(seed)
    xi = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        assert torch.allclose(small(xi), model(xi), atol=1e-5)
    hard = gatedprune.cost(model, xi, hard=True)
    assert float(hard.flops) == pytest.approx(gatedprune.cost(small, xi).flops)
    return small


# ---------------------------------------------------------------- 1. f(0) != 0 activations


class _HardtanhNet(nn.Module):
    def __init__(self, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.c1(x))  # (B, 8, L)
        h = F.relu(self.c2(h))  # (B, 6, L)
        return self.fc(h.mean(-1))  # (B, 3)


@pytest.fixture
def count_hardtanh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let gatedprune.cost count nn.Hardtanh (1 FLOP per element) for one test."""
    handlers = [((nn.Hardtanh,), lambda m, i, o: int(o.numel())), *gp_costs._HANDLERS]
    monkeypatch.setattr(gp_costs, "_HANDLERS", handlers)


@pytest.mark.parametrize(
    "act",
    [lambda t: F.hardtanh(t, 0.2, 1.0), nn.Hardtanh(0.2, 1.0), nn.Hardtanh(-2.0, -0.5)],
    ids=["functional", "module", "negative_ceiling"],
)
@pytest.mark.usefixtures("count_hardtanh")
def test_hardtanh_not_mapping_zero_to_zero_stops_the_group(
    act: Callable[[Tensor], Tensor],
) -> None:
    torch.manual_seed(0)
    m = _HardtanhNet(act)
    s = gate_(m, torch.randn(2, 2, 9))
    ungated = {p[0]: why for p, _, why in s.ungated_groups}
    assert "not 0" in ungated["c1"] or "non-zero" in ungated["c1"]
    assert [p for p, _ in s.channel_groups] == [["c2"]]
    _close_half(m)
    _check_prune(m, (3, 2, 9))


@pytest.mark.parametrize(
    "act", [lambda t: F.hardtanh(t, -0.5, 2.0), nn.Hardtanh(0.0, 2.0)], ids=["functional", "module"]
)
@pytest.mark.usefixtures("count_hardtanh")
def test_hardtanh_mapping_zero_to_zero_is_gated_and_prunes_exactly(
    act: Callable[[Tensor], Tensor],
) -> None:
    torch.manual_seed(0)
    m = _HardtanhNet(act)
    s = gate_(m, torch.randn(2, 2, 9))
    assert ["c1"] in [p for p, _ in s.channel_groups]
    _close_half(m)
    _check_prune(m, (3, 2, 9))


# ---------------------------------------------------------------- 2. in-place dense blocks


class _InplaceBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.f1 = nn.Linear(d, 12)
        self.f2 = nn.Linear(12, d)

    def forward(self, x: Tensor) -> Tensor:
        x += self.f2(F.relu(self.f1(x)))  # (B, d), updates the caller's tensor
        return x


class _InplaceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.Sequential(*[_InplaceBlock(8) for _ in range(3)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.inp(x)))


def test_dense_shortcut_reads_the_value_an_in_place_block_returned() -> None:
    torch.manual_seed(0)
    m = _InplaceNet()
    s = gate_(m, torch.randn(4, 5), shortcuts="dense")
    assert s.shortcuts == [("blocks.0", "blocks.2")]
    edge_gate = m.gatedprune.edge_gate
    assert isinstance(edge_gate, HardConcreteGate)
    with torch.no_grad():
        edge_gate.log_alpha.fill_(5.0)  # open: eval value 1
    m.eval()
    x = torch.randn(4, 5)
    with torch.no_grad():
        b = m.blocks
        h0 = m.inp(x) + b[0].f2(F.relu(b[0].f1(m.inp(x))))
        h1 = h0 + b[1].f2(F.relu(b[1].f1(h0)))
        z = h1 + 1.0 * h0  # block 2's input + the shortcut from block 0's output
        ref = m.head(z + b[2].f2(F.relu(b[2].f1(z))))
        assert torch.allclose(m(x), ref, atol=1e-5)
    _check_prune(m, (4, 5))


# ---------------------------------------------------------------- 3. unused values in branches


class _ChunkNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.fc1 = nn.Linear(8, 24)
        self.fc2 = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)  # (B, 8)
        a, _ = torch.chunk(F.relu(self.fc1(x)), 2, dim=-1)  # (B, 12), second half unused
        x = x + self.fc2(a)
        return self.head(x)


class _AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, L, 8)
        a, _ = self.attn(h, h, h)  # attention weights unused
        h = h + a
        return self.head(h.mean(1))  # (B, 2)


@pytest.mark.parametrize(
    ("make", "shape"), [(_ChunkNet, (4, 5)), (_AttnNet, (2, 5, 3))], ids=["chunk", "mha"]
)
def test_closed_block_with_an_unused_value_prunes(
    make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    m = make()
    s = gate_(m, torch.randn(*shape))
    assert len(s.blocks) == 1
    with torch.no_grad():
        for g in m.gatedprune.block_gates:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.fill_(-10.0)
    small = _check_prune(m, shape)
    dense = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("gatedprune"))
    assert sum(p.numel() for p in small.parameters()) < dense  # the branch is gone


# ---------------------------------------------------------------- 4. pools over the channels


class _MaxoutNet(nn.Module):
    def __init__(self, pool: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 16)
        self.fc2 = nn.Linear(8, 3)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.pool(F.relu(self.fc1(x))))  # pool: (B, 16) -> (B, 8)


@pytest.mark.parametrize(
    "pool",
    [
        lambda t: F.max_pool1d(t, 2),
        lambda t: F.avg_pool1d(t, 2),
        lambda t: F.adaptive_avg_pool1d(t, 8),
        nn.MaxPool1d(2),
        nn.AdaptiveAvgPool1d(8),
    ],
    ids=["max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "MaxPool1d", "AdaptiveAvgPool1d"],
)
def test_1d_pool_of_a_2d_tensor_pools_channels_and_stops_the_group(
    pool: Callable[[Tensor], Tensor],
) -> None:
    torch.manual_seed(0)
    m = _MaxoutNet(pool)
    s = gate_(m, torch.randn(4, 5))
    ungated = {p[0]: why for p, _, why in s.ungated_groups}
    assert "pools over the labelled dimension" in ungated["fc1"]
    assert s.channel_groups == []
    _check_prune(m, (4, 5))


# ---------------------------------------------------------------- 5. dense shortcuts, ModuleList


class _Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.f1 = nn.Linear(d, h)
        self.f2 = nn.Linear(h, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f2(F.relu(self.f1(x)))  # (B, d)


class _ListNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.ModuleList([_Block(8, 12) for _ in range(4)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)  # (B, 8)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


@pytest.mark.parametrize("close_block", [None, 1])
def test_dense_shortcuts_between_modulelist_blocks_prune(close_block: int | None) -> None:
    torch.manual_seed(0)
    m = _ListNet()
    s = gate_(m, torch.randn(4, 5), shortcuts="dense")
    assert ("blocks.0", "blocks.2") in s.shortcuts
    edge_gate = m.gatedprune.edge_gate
    assert isinstance(edge_gate, HardConcreteGate)
    with torch.no_grad():
        edge_gate.log_alpha.fill_(5.0)  # keep every new shortcut
        if close_block is not None:
            g = m.gatedprune.block_gates[close_block]
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.fill_(-10.0)
    small = _check_prune(m, (4, 5))
    assert len([a for a in small.modules() if isinstance(a, ScaledAdd)]) == len(s.shortcuts)
    plan = json.loads(json.dumps(export_plan(m)))
    rebuilt = apply_plan(_ListNet(), plan)
    rebuilt.load_state_dict(small.state_dict())
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), small(x), atol=1e-6)


# ---------------------------------------------------------------- 6. sigmoid gates


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.Sequential(*[_Block(8, 12) for _ in range(3)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.inp(x)))


@pytest.mark.parametrize("training", [False, True])
def test_sigmoid_gates_leave_the_function_unchanged(training: bool) -> None:
    torch.manual_seed(0)
    m = _Residual().train(training)
    x = torch.randn(4, 5)
    with torch.no_grad():
        before = m(x)
    s = gate_(m, x, gate="sigmoid", shortcuts="dense")
    assert s.shortcuts
    assert s.blocks
    assert s.channel_groups
    with torch.no_grad():
        assert torch.equal(m(x), before)
    edge_gate = m.gatedprune.edge_gate
    assert edge_gate is not None
    assert edge_gate.eval_value().tolist() == [0.0] * len(s.shortcuts)
    # the gates still learn: one step on a loss that wants the shortcut opened
    opt = torch.optim.SGD(m.gatedprune.parameters(), lr=1.0)
    (-edge_gate().sum() + m(x).square().mean()).backward()
    opt.step()
    assert bool((edge_gate.eval_value() > 0).all())
    gatedprune.harden(m)
    _check_prune(m, (4, 5))


# ---------------------------------------------------------------- 7. clear errors


class _Small(nn.Module):
    def __init__(self, h: int = 16) -> None:
        super().__init__()
        self.a = nn.Linear(5, h)
        self.b = nn.Linear(h, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(self.a(x)))


def test_apply_plan_refuses_another_size_or_a_second_application() -> None:
    m = _Small(16)
    gate_(m, torch.randn(4, 5))
    with torch.no_grad():
        g = m.gatedprune.group_gates[0]
        assert isinstance(g, HardConcreteGate)
        g.log_alpha.fill_(5.0)
        g.log_alpha[:3] = -10.0
    plan = json.loads(json.dumps(export_plan(m.eval())))
    # the exported plan names its model: another one differs in module 'a'
    with pytest.raises(ValueError, match=r"exported from another model \(module 'a'"):
        apply_plan(_Small(8), plan)
    # a plan written by hand (no fingerprint, no checksum) is refused by the size check
    hand = {k: v for k, v in plan.items() if k not in ("model", "checksum")}
    with pytest.raises(ValueError, match=r"module 'a' to have 16 output channels, it has 8"):
        apply_plan(_Small(8), hand)
    once = apply_plan(_Small(16), plan)
    assert isinstance(once, _Small)
    assert once.a.out_features == 13
    with pytest.raises(ValueError, match=r"exported from another model \(module 'a'"):
        apply_plan(once, plan)
    with pytest.raises(ValueError, match=r"module 'a' to have 16 output channels, it has 13"):
        apply_plan(once, hand)
    assert once.a.out_features == 13  # left as it was
    assert once.b.in_features == 13


def test_gate_a_forward_with_two_inputs_takes_a_tuple() -> None:
    """Before 2026-12-08 a second required argument was refused ("wrap the model"); now one
    tensor for it is refused naming the parameters, and a tuple gives both inputs (an input
    added to a layer's output keeps that layer's channels whole: inputs are never pruned)."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            return self.a(x) + y

    with pytest.raises(TypeError, match=r"requires 2 inputs \(x, y\), but example_input gives 1"):
        gate_(TwoInputs(), torch.randn(2, 3))
    model = TwoInputs()
    summary = gate_(model, (torch.randn(2, 3), torch.randn(2, 4)))
    assert summary.channel_groups == []
    assert [layers for layers, *_ in summary.ungated_groups] == [["a"]]
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    pruned = gatedprune.prune(model.eval())
    assert torch.equal(pruned(x, y), model(x, y))


class _CountsItself(nn.Module):
    """A user leaf module that declares its own cost (``flops_of``) for a forward fx can trace."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 3.0  # (B, C)

    def flops_of(self, inputs: tuple[Tensor, ...], output: Tensor) -> int:
        return 777


class _WithCountedLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.leaf = _CountsItself()
        self.c = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(self.leaf(torch.relu(self.b(torch.relu(self.a(x))))))  # (B, 2)


def test_leaf_module_counting_itself_is_costed_like_cost_does() -> None:
    torch.manual_seed(0)
    net, x = _WithCountedLeaf(), torch.randn(3, 4)  # (B, 4)
    dense = gatedprune.cost(net, x)
    # functional relu is not counted; the leaf counts 777 whatever the batch
    assert dense.flops == 3 * (2 * 4 * 8 + 8 + 2 * 8 * 8 + 8 + 2 * 8 * 2 + 2) + 777
    summary = gate_(net, x)
    assert any("leaf" in why for _, _, why in summary.ungated_groups)  # not pruned through
    with torch.no_grad():
        for g in net.gatedprune.group_gates:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.fill_(10.0)
            g.log_alpha[:3] = -10.0  # close three channels of layer a
    net.eval()
    hard = gatedprune.cost(net, x, hard=True)
    small = gatedprune.prune(net).eval()
    assert gatedprune.cost(small, x) == hard.detach()
    assert hard.detach().flops < dense.flops
    assert (small(x) - net(x)).abs().max().item() <= 1e-5


def test_a_gated_sequential_still_runs_trains_and_prunes_exactly() -> None:
    """``gate_`` attaches its gates to the model as ``model.gatedprune``; an ``nn.Sequential``
    calls every child in order, so that module must pass its input through (it raised
    NotImplementedError before)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 8, 3, padding=1),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Conv1d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 10, 3),
    )
    x = torch.randn(4, 2, 10)
    gate_(model, x)
    budget = gatedprune.Budget(model, x, flops=0.5)
    loss = model(x).square().mean() + budget.penalty()
    loss.backward()
    _close_half(model)
    pruned = _check_prune(model, (5, 2, 10))
    assert not any(isinstance(m, gatedprune.InsertedGating) for m in pruned.modules())


class _Nested(nn.Module):
    """``x + b(tanh(a(x)) + c(tanh(a(x))))``: a residual block inside a residual block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.c = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))  # (B, W)
        h = h + self.c(h)  # inner block
        return x + self.b(h)  # (B, W) outer block


def test_closing_a_block_inside_a_closed_block_prunes_exactly() -> None:
    """Both gates closed: the inner add is erased with the outer branch, so the plan must not
    also cut it (apply_plan refused the gating's own plan: 'in both cut and erase')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), _Nested(6), nn.Linear(6, 2))
    x = torch.randn(4, 3)
    gate_(model, x, channels=False)
    blocks = model.gatedprune.block_gates
    assert len(blocks) == 2
    for g in blocks:
        g.force_(torch.zeros(1, dtype=torch.bool))
    small = _check_prune(model, (5, 3))
    assert sum(isinstance(m, nn.Linear) for m in small.modules()) == 2
    replayed = apply_plan(
        nn.Sequential(nn.Linear(3, 6), _Nested(6), nn.Linear(6, 2)), export_plan(model)
    )
    replayed.load_state_dict(small.state_dict())
    xi = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(replayed(xi), small(xi))
