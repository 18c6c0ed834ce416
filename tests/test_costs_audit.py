"""Findings of an audit of ``cost()`` against torch's ``FlopCounterMode``: the counting
machinery (hooks, modes, sharing), not the layer formulas, which agreed everywhere."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import gatedprune as gp
from gatedprune.functional_costs import functional_flops

E, H, FF, B, T = 8, 2, 16, 2, 5


def _flops(model: nn.Module, x: Tensor) -> float:
    c = gp.cost(model, x)
    assert isinstance(c, gp.Cost)
    return c.flops


def test_submodule_modes_are_restored() -> None:
    # before: cost() and Budget restored the root's mode only, so model.train(flag) reset a
    # frozen BatchNorm to training, or an MC-dropout layer of an eval model to eval
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    net.train()
    net[1].eval()  # frozen statistics
    gp.cost(net, torch.randn(3, 4))
    assert [m.training for m in net] == [True, False, True, True]
    net.eval()
    net[2].train()  # Monte Carlo dropout at inference
    gp.cost(net, torch.randn(3, 4))
    assert [m.training for m in net] == [False, False, True, False]
    gated = gp.ShortcutMLP(4, [6, 6], 2)
    gated.train()
    gated.layers[0].eval()
    gp.Budget(gated, torch.randn(1, 4), flops=0.5)
    assert gated.training
    assert not gated.layers[0].training
    assert gated.layers[1].training


def test_a_hook_replacing_the_output_does_not_change_the_count() -> None:
    # before: cost's hook ran after the user's and counted the replaced output (27, not 162)
    lin = nn.Linear(4, 6)
    lin.register_forward_hook(lambda mod, inp, out: out[..., :1])
    assert _flops(nn.Sequential(lin), torch.randn(3, 4)) == 2 * 3 * 6 * 4 + 3 * 6


class _Fallback(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fast, self.w = nn.Linear(4, 4), nn.Parameter(torch.randn(4, 4))

    def forward(self, x: Tensor) -> Tensor:
        try:
            y = self.fast(x[:, :3])  # raises inside the Linear (3 features, not 4)
        except RuntimeError:
            y = x @ self.w  # (B, 4)
        return y @ self.w  # (B, 4)


def test_a_failed_call_caught_by_the_model_leaves_counting_on() -> None:
    # before: the failed Linear never lowered the counter's depth: every later product was 0
    assert _flops(_Fallback(), torch.randn(3, 4)) == 2 * (2 * 3 * 4 * 4)


def _encoder() -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True)


class _SharedLinear(nn.Module):
    """A Linear that is also an encoder layer's ``linear1``, registered outside first."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(E, FF)
        self.enc = _encoder()
        self.enc.linear1 = self.proj

    def forward(self, x: Tensor) -> Tensor:
        return self.enc(x) + self.proj(x)[..., :E]  # (B, T, E)


class _SharedNorm(nn.Module):
    """An encoder layer's ``norm1`` also called on its own, registered inside first."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = _encoder()
        self.ln = self.enc.norm1

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(self.enc(x))  # (B, T, E)


def test_a_module_shared_with_an_encoder_layer_is_counted_per_call() -> None:
    # before: the shared Linear was counted again inside the layer (+2720), the shared
    # norm's own call not at all (-400)
    x = torch.randn(B, T, E)
    layer = _flops(_encoder(), x)
    linear = 2 * B * T * E * FF + B * T * FF
    norm = _flops(nn.LayerNorm(E), x)
    assert _flops(_SharedLinear(), x) == layer + linear
    assert _flops(_SharedNorm(), x) == layer + norm


class _Chain(nn.Module):
    def __init__(self, sizes: list[int], chain: bool) -> None:
        super().__init__()
        self.chain = chain
        self.mats = nn.ParameterList(
            nn.Parameter(torch.randn(a, b)) for a, b in itertools.pairwise(sizes[:-1])
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.chain:
            return torch.chain_matmul(*self.mats, x)  # (p_0, p_n)
        return torch.linalg.multi_dot([*self.mats, x])  # (p_0, p_n)


@pytest.mark.filterwarnings("ignore:torch.chain_matmul is deprecated")
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=3, max_size=7), chain=st.booleans())
def test_matrix_chains_count_as_torch_computes_them(sizes: list[int], chain: bool) -> None:
    # before: chain_matmul counted 0, and multi_dot was counted left to right, while torch
    # computes the cheapest order (FlopCounterMode sees the products it runs)
    model = _Chain(sizes, chain)
    x = torch.randn(sizes[-2], sizes[-1])
    with FlopCounterMode(display=False) as oracle, torch.no_grad():
        model(x)
    assert _flops(model, x) == oracle.get_total_flops()


def test_multi_dot_of_vectors_at_the_ends() -> None:
    mats = [torch.randn(5), torch.randn(5, 3), torch.randn(3, 7), torch.randn(7)]
    with FlopCounterMode(display=False) as oracle:
        out = torch.linalg.multi_dot(mats)
    got = functional_flops(torch.linalg.multi_dot, (mats,), None, out)
    assert got == oracle.get_total_flops() == 2 * (5 * 3 + 3 * 7 + 3)  # v A, then B w, dot


def test_an_input_the_model_rejects_is_a_value_error_naming_its_shape() -> None:
    with pytest.raises(ValueError, match=r"fails on example_input of shape \(2, 5\)"):
        gp.cost(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 5))
