"""Writing and pickling the parameters ``gate_`` parametrizes with ``ParamGate`` (linear maps
written with the model's own parameters): ``model.W = tensor`` (or an ``nn.Parameter``) stores
the new ungated tensor in ``parametrizations.W.original``, and ``torch.save`` of the whole
gated model round-trips (torch refuses parametrized modules)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import ParamMapNet, check_pruned, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrize

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import gate_


class Conv1D(nn.Module):
    """GPT-2's Conv1D: ``addmm(bias, x, weight)``, weight stored (in, out)."""

    def __init__(self, n_out: int, n_in: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) / 10)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)  # (B*L, out)
        return y.view(x.size(0), x.size(1), -1)  # (B, L, out)


class MLP(nn.Module):
    """Parameter maps in submodules: a GPT-2 MLP of two Conv1D."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(20, 6)
        self.c_proj = Conv1D(5, 20)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # (B, L, 5)


def _close_some(model: nn.Module, seed: int) -> None:
    """Random gate states with every third gate of every group closed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in inserted_gating(model).group_gates:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.copy_(torch.randn(g.log_alpha.shape, generator=gen) * 3)
            g.log_alpha[::3] = -10.0


def _gate_values(model: nn.Module, path: str) -> Tensor:
    """The eval-mode gate value of each output unit of the map holding ``path``."""
    gating = inserted_gating(model)
    pgate = model.get_submodule(f"parametrizations.{path}")[0]
    return gating.param_scale(pgate.key, torch.float32)  # (n_out,)


@pytest.mark.parametrize("as_parameter", [False, True])
def test_assigning_a_gated_parameter_stores_it_and_prune_folds_it(as_parameter: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 6)  # (B, 6)
    model = ParamMapNet()
    gate_(model, x)
    _close_some(model, 1)
    model.eval()
    w1_stored = model.get_parameter("parametrizations.W1.original")
    b1_stored = model.get_parameter("parametrizations.b1.original")
    new_w1 = torch.randn(6, 24)  # "pretrained" weights loaded after gate_
    new_b1 = torch.randn(24)
    if as_parameter:
        model.W1 = nn.Parameter(new_w1.clone())
        model.b1 = nn.Parameter(new_b1.clone())
    else:
        model.W1 = new_w1.clone()
        model.b1 = new_b1.clone()
    # the stored tensors hold the new values, and stay the objects optimizers know
    assert model.get_parameter("parametrizations.W1.original") is w1_stored
    assert model.get_parameter("parametrizations.b1.original") is b1_stored
    assert torch.equal(w1_stored.detach(), new_w1)
    assert torch.equal(b1_stored.detach(), new_b1)
    assert w1_stored.requires_grad
    assert b1_stored.requires_grad
    # the gated forward uses them: (x W1 + b1) g
    g1 = _gate_values(model, "W1")  # (24,)
    g2 = _gate_values(model, "W2")  # (16,)
    with torch.no_grad():
        h = torch.relu((x @ new_w1 + new_b1) * g1)  # (B, 24)
        want = model.head(torch.relu(F.linear(h, model.parametrizations.W2.original) * g2))
        assert torch.allclose(model(x), want, atol=1e-6)  # (B, 4)
    check_pruned(model, x, torch.Generator().manual_seed(2), ParamMapNet)


def test_an_init_function_applied_after_gate_reaches_the_stored_tensors() -> None:
    torch.manual_seed(3)
    x = torch.randn(4, 3, 6)  # (B, L, 6)
    model = MLP()
    gate_(model, x)
    _close_some(model, 4)
    model.eval()

    def init(m: nn.Module) -> None:
        if isinstance(m, Conv1D):  # the same code for gated and plain Conv1D
            n_in, n_out = m.weight.shape
            m.weight = nn.Parameter(torch.full((n_in, n_out), 0.5))
            m.bias = nn.Parameter(torch.zeros(n_out))

    model.apply(init)
    assert parametrize.is_parametrized(model.c_fc)  # c_fc's units are gated
    assert not parametrize.is_parametrized(model.c_proj)  # the output's are not
    for w, b in (
        (model.c_fc.parametrizations.weight.original, model.c_fc.parametrizations.bias.original),
        (model.c_proj.weight, model.c_proj.bias),
    ):
        assert bool((w == 0.5).all())
        assert bool((b == 0).all())
    check_pruned(model, x, torch.Generator().manual_seed(5), MLP)


def test_assignment_refuses_another_shape_and_non_tensors() -> None:
    torch.manual_seed(6)
    model = ParamMapNet()
    gate_(model, torch.randn(2, 6))
    stored = model.parametrizations.W1.original.detach().clone()
    with pytest.raises(ValueError, match=r"W1.*shape \[6, 24\].*\[24, 6\]"):
        model.W1 = torch.zeros(24, 6)  # torch's set_ would resize the stored tensor
    with pytest.raises(ValueError, match=r"shape \[24\].*\[23\]"):
        model.b1 = nn.Parameter(torch.zeros(23))
    with pytest.raises(TypeError, match=r"W1.*list"):
        model.W1 = [[0.0] * 24] * 6  # type: ignore[assignment]
    assert torch.equal(model.parametrizations.W1.original.detach(), stored)
    assert model.parametrizations.b1.original.shape == (24,)


def _round_trip(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, nn.Module)
    return loaded


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), which=st.sampled_from(["ParamMapNet", "MLP"]))
def test_torch_save_of_a_model_with_parameter_gates_round_trips(seed: int, which: str) -> None:
    torch.manual_seed(seed)
    factory = ParamMapNet if which == "ParamMapNet" else MLP
    x = torch.randn(4, 6) if which == "ParamMapNet" else torch.randn(4, 3, 6)  # (B, [L,] 6)
    model = factory()
    gate_(model, x)
    _close_some(model, seed)
    model.eval()
    loaded = _round_trip(model)
    twice = _round_trip(copy.deepcopy(loaded))  # a loaded model and its copies pickle too
    gating = inserted_gating(loaded)
    for name, m in loaded.named_modules():  # the gates read the loaded model's gating
        if parametrize.is_parametrized(m):
            for plist in m.parametrizations.values():
                assert plist[0].__dict__["_gp_gating"] is gating, name
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(twice(x), model(x))
    assert list(loaded.state_dict()) == list(model.state_dict())  # in the same order
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in model.named_parameters()]
    # gradients reach the stored tensors and the gates through the parametrizations
    loaded.train()
    loaded(x).square().sum().backward()
    assert all(p.grad is not None for p in gating.group_gates.parameters())
    for name, p in loaded.named_parameters():
        if ".original" in name:
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0, name
    loaded.zero_grad()
    # prune after load is the pruned original, and writes still reach the stored tensors
    gen = torch.Generator().manual_seed(seed)
    pruned = check_pruned(loaded, x, gen, factory)
    with torch.no_grad():
        assert (pruned(x) - gp.prune(model)(x)).abs().max().item() <= 1e-5
    again = _round_trip(model)
    path = "W1" if which == "ParamMapNet" else "c_fc.weight"
    owner_path, _, attr = path.rpartition(".")
    owner = again.get_submodule(owner_path)
    new = torch.randn_like(owner.parametrizations[attr].original)
    setattr(owner, attr, nn.Parameter(new))
    assert torch.equal(owner.parametrizations[attr].original.detach(), new)


def test_pickling_refuses_a_parametrization_added_after_gate_() -> None:
    class Double(nn.Module):
        def forward(self, w: Tensor) -> Tensor:
            return 2 * w  # (in, out)

    model = ParamMapNet()
    gate_(model, torch.randn(2, 6))
    parametrize.register_parametrization(model, "W1", Double())
    with pytest.raises(RuntimeError, match=r"only through state_dict\(\).*added after gate_"):
        torch.save(model, io.BytesIO())
