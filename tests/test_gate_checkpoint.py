"""Gated models under gradient checkpointing: the gates are sampled once per forward and read
at every site, inside and outside checkpointed segments. Reentrant checkpointing runs a
backward of its own for each segment, so the graph of the shared samples is traversed more
than once: before ``replayable_gate_values`` that failed for every gate kind ("Trying to
backward through the graph a second time")."""

from __future__ import annotations

import pytest
import torch
from gating_helpers import inserted_gating
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gatedprune.gates import (
    HardConcreteGate,
    SigmoidGate,
    gate_values,
    replayable_gate_values,
)
from gatedprune.gating import gate_


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))  # (B, T, d)


class _Net(nn.Module):
    """Channels, residual blocks, dense shortcuts, a transformer layer and an LSTM, each
    block run through ``checkpoint`` when ``reentrant`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.reentrant: bool | None = None
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([_Block(8) for _ in range(3)])
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def _run(self, f: nn.Module, x: Tensor) -> Tensor:
        if self.reentrant is None:
            return f(x)  # type: ignore[no-any-return]
        return checkpoint(f, x, use_reentrant=self.reentrant)  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)  # (B, T, 8)
        for b in self.blocks:
            h = self._run(b, h)  # (B, T, 8)
        h = self._run(self.enc, h)  # (B, T, 8)
        if self.reentrant is None:
            h, _ = self.lstm(h)  # (B, T, 12)
        else:
            h, _ = checkpoint(self.lstm, h, use_reentrant=self.reentrant)  # (B, T, 12)
        return self.head(h)  # (B, T, 3)


def _gated(gate: str, shortcuts: str | None) -> tuple[_Net, Tensor]:
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(4, 5, 6)
    gate_(model, x, shortcuts=shortcuts, gate=gate)
    return model, x


def _grads(
    gate: str, reentrant: bool | None, train: bool, shortcuts: str | None
) -> tuple[list[str], list[Tensor]]:
    model, x = _gated(gate, shortcuts)
    gating = inserted_gating(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # gate values strictly inside (0, 1): every gate has a gradient
        for g in [*gating.group_gates, *gating.block_gates, gating.edge_gate]:
            if isinstance(g, HardConcreteGate):
                g.log_alpha.uniform_(-1.0, 1.0, generator=gen)
            elif isinstance(g, SigmoidGate):
                g.theta.uniform_(-1.0, 1.0, generator=gen)
    model.train(train)
    model.reentrant = reentrant
    torch.manual_seed(1)  # the same gate samples in every run
    model(x).square().sum().backward()
    names, grads = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            names.append(name)
            grads.append(p.grad.clone())
    return names, grads


@pytest.mark.parametrize("gate", ["hard_concrete", "sigmoid"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    ("reentrant", "shortcuts"), [(True, None), (False, None), (False, "dense")]
)
def test_checkpointed_gradients_equal_the_plain_ones(
    gate: str, train: bool, reentrant: bool, shortcuts: str | None
) -> None:
    """Every parameter's gradient, the gates' included, as without checkpointing. Reentrant
    checkpointing in training failed ("backward through the graph a second time"), and where
    a checkpointed segment read the gates first, the samples were drawn without a graph (its
    first pass runs without grad) and the gates got no gradient at all."""
    names, want = _grads(gate, None, train, shortcuts)
    gating_params = [n for n in names if n.startswith("gatedprune.")]
    assert len(gating_params) >= 8  # channel, block and (with shortcuts) edge gates
    assert ("gatedprune.edge_gate" in " ".join(names)) == (shortcuts is not None)
    got_names, got = _grads(gate, reentrant, train, shortcuts)
    assert got_names == names
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_shortcut_into_a_reentrant_segment_is_a_clear_error() -> None:
    """A dense shortcut read inside a reentrant checkpointed segment: its backward would run
    through the source block's graph twice (a raw "backward through the graph a second time"
    in backward); now a RuntimeError at the forward names the shortcut and the way out."""
    model, x = _gated("hard_concrete", "dense")
    model.train()
    model.reentrant = True
    with pytest.raises(RuntimeError, match=r"shortcut .* -> .*use_reentrant=False"):
        model(x)
    torch.manual_seed(1)
    with torch.no_grad():  # a forward without gradients reads the shortcuts as before
        out = model(x)  # (B, T, 3)
    model.reentrant = None
    torch.manual_seed(1)  # the same gate samples
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_replayable_values_equal_gate_values_and_survive_two_backward_passes() -> None:
    gates = [HardConcreteGate(3), HardConcreteGate(4), SigmoidGate(2)]
    torch.manual_seed(5)
    want = gate_values(gates)
    (sum((v * torch.arange(v.numel())).sum() for v in want)).backward()  # type: ignore[union-attr]
    want_grads = [p.grad.clone() for g in gates for p in g.parameters() if p.grad is not None]
    for g in gates:
        g.zero_grad()
    torch.manual_seed(5)
    got = replayable_gate_values(gates)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    loss = sum((v * torch.arange(v.numel())).sum() for v in got)
    loss.backward(retain_graph=False)  # type: ignore[union-attr]
    got_grads = [p.grad.clone() for g in gates for p in g.parameters() if p.grad is not None]
    assert len(got_grads) == len(want_grads) == 3
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    # a second, separate graph over the same samples: the replayed node runs again and the
    # gradients accumulate (the plain graph raised "backward through the graph a second time")
    (got[0] * 2.0).sum().backward()
    (got[2] * 3.0).sum().backward()
    total = [p.grad.clone() for g in gates for p in g.parameters() if p.grad is not None]
    torch.manual_seed(5)
    plain = gate_values(gates)
    for g in gates:
        g.zero_grad()
    (plain[0] * 2.0).sum().backward(retain_graph=True)
    (plain[2] * 3.0).sum().backward()
    extra = [p.grad for g in gates for p in g.parameters()]
    assert extra[0] is not None
    assert extra[1] is None
    assert extra[2] is not None
    assert torch.allclose(total[0], got_grads[0] + extra[0], rtol=1e-6)
    assert torch.equal(total[1], got_grads[1])
    assert torch.allclose(total[2], got_grads[2] + extra[2], rtol=1e-6)


def test_replayed_gradients_support_double_backward() -> None:
    """A gradient penalty (``create_graph=True``) differentiates the replayed backward too."""
    gate = SigmoidGate(3, init_theta=0.5)
    torch.manual_seed(0)
    (v,) = replayable_gate_values([gate])
    (grad,) = torch.autograd.grad(v.square().sum(), gate.theta, create_graph=True)
    (grad2,) = torch.autograd.grad(grad.sum(), gate.theta)
    theta = gate.theta.detach().clone().requires_grad_(True)
    s = torch.sigmoid(theta)
    (g1,) = torch.autograd.grad(s.square().sum(), theta, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), theta)
    assert torch.allclose(grad, g1)
    assert torch.allclose(grad2, g2)


def _loss(model: _Net, x: Tensor, seed: int) -> Tensor:
    torch.manual_seed(seed)  # the gate samples of this forward
    return model(x).square().sum()  # type: ignore[no-any-return]


def _param_grads(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    assert any(k.startswith("gatedprune.") for k in want)
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_forward_without_gradients_before_the_backward_changes_nothing(
    reentrant: bool,
) -> None:
    """A validation batch under ``torch.no_grad()`` between a training forward and its
    backward: it replaced the samples the recomputation reads (non-reentrant: torch's
    "a different number of tensors was saved" CheckpointError; found by an audit)."""
    x, x_val = torch.randn(4, 5, 6), torch.randn(3, 5, 6)
    model, _ = _gated("hard_concrete", None)
    model.train()
    _loss(model, x, 1).backward()
    want = _param_grads(model)
    model.zero_grad()
    model.reentrant = reentrant
    loss = _loss(model, x, 1)
    with torch.no_grad():
        model.eval()
        model(x_val)  # (B, T, 3)
        model.train()
        model(x_val)  # a training-mode forward without gradients too
    loss.backward()
    _assert_same_grads(_param_grads(model), want)


@pytest.mark.parametrize("reentrant", [True, False])
def test_two_forwards_before_a_checkpointed_backward_are_a_clear_error(reentrant: bool) -> None:
    """Two training forwards summed into one loss: the recomputation of the first read the
    second's gate samples (gradients off by up to 0.12, silently; found by an audit)."""
    x = torch.randn(4, 5, 6)
    model, _ = _gated("hard_concrete", None)
    model.train()
    model.reentrant = reentrant
    total = _loss(model, x, 1) + _loss(model, x, 2)
    with pytest.raises(RuntimeError, match="2 forwards with gradients await their backward"):
        total.backward()


def test_outputs_kept_after_their_backward_are_no_reason_to_refuse() -> None:
    """Keeping last step's loss (``losses.append(loss)``) keeps its graph alive: its backward
    has run, so the next step's recomputation is its own forward's."""
    x = torch.randn(4, 5, 6)
    model, _ = _gated("hard_concrete", None)
    model.train()
    model.reentrant = False
    kept = []
    for seed in (1, 2, 3):
        loss = _loss(model, x, seed)
        loss.backward()
        kept.append(loss)
    model.zero_grad()
    model.reentrant = None
    _loss(model, x, 3).backward()
    want = _param_grads(model)
    model.zero_grad()
    model.reentrant = False
    _loss(model, x, 3).backward()
    _assert_same_grads(_param_grads(model), want)


def test_two_forwards_of_a_checkpointed_root_recompute_their_own_samples() -> None:
    """``checkpoint(model, x)``: the recomputation runs the root forward again, which draws
    the same samples (checkpoint restores the random state), so two forwards before one
    backward are exact and not refused."""
    x = torch.randn(4, 5, 6)
    model, _ = _gated("hard_concrete", None)
    model.train()
    (_loss(model, x, 1) + _loss(model, x, 2)).backward()
    want = _param_grads(model)
    model.zero_grad()
    total = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        total.append(checkpoint(model, x, use_reentrant=False).square().sum())  # type: ignore[union-attr]
    (total[0] + total[1]).backward()
    _assert_same_grads(_param_grads(model), want)


def test_a_gated_model_compiles_as_one_graph_in_training() -> None:
    """torch.compile(fullgraph=True) traces the gate sampling: the replayed samples' random
    state and the backward bookkeeping are skipped under compile (they broke the graph:
    "Unsupported torch.* op", found by an audit)."""

    class _Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 16)
            self.b = nn.Linear(16, 16)
            self.c = nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.a(x))  # (B, 16)
            return self.c(h + torch.relu(self.b(h)))  # (B, 3)

    torch.manual_seed(0)
    model = _Mlp()
    x = torch.randn(5, 6)
    gate_(model, x)
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.manual_seed(1)
    compiled(x).square().sum().backward()
    got = _param_grads(model)
    model.zero_grad()
    torch.manual_seed(1)
    model(x).square().sum().backward()
    _assert_same_grads(got, _param_grads(model))
