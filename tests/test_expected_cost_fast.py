"""The fast expected cost of shortcut networks equals the reference (summary + scalar tape)."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import gatedprune as gp
from gatedprune.autodiff import CompiledFormula, Tape, scalar_function
from gatedprune.gates import HardConcreteGate, SigmoidGate, _hc_prob_open, _same_hard_concrete
from gatedprune.shortcut import (
    _compiled_cost,
    _cost_formula,
    _ExpectedCost,
    _ExpectedCostHC,
    _ShortcutNet,
)

LN11 = math.log(11.0)


def _draw_gates(net: _ShortcutNet, data: st.DataObject) -> None:
    """Closed, open, saturated (probability rounds to 1) or in-between gates; sigmoid gates
    hardened or not (hardened: probabilities exactly 0 or 1 with nonzero gradients)."""
    for g in gp.gate_modules(net):
        if isinstance(g, SigmoidGate):
            n = g.n_groups
            theta = data.draw(st.lists(st.floats(-4.0, 4.0), min_size=n, max_size=n))
            with torch.no_grad():
                g.theta.copy_(torch.tensor(theta, dtype=g.theta.dtype))
            if data.draw(st.booleans()):
                g.harden()
            continue
        assert isinstance(g, HardConcreteGate)
        vals = data.draw(
            st.lists(
                st.one_of(
                    st.sampled_from([-LN11 - 1.0, LN11 + 1.0, 40.0]),
                    st.floats(-6.0, 6.0),
                ),
                min_size=g.n_groups,
                max_size=g.n_groups,
            )
        )
        with torch.no_grad():
            g.log_alpha.copy_(torch.tensor(vals, dtype=g.log_alpha.dtype))


def _reference(net: _ShortcutNet, shape: tuple[int, ...]) -> torch.Tensor:
    z, _ = net._summary(False)
    out: torch.Tensor = scalar_function(lambda v: _cost_formula(net.spec, shape, v), z)
    return out  # (2,)


def _check_against_reference(net: _ShortcutNet, shape: tuple[int, ...], w: float) -> None:
    params = list(net.gate_parameters())
    ref = _reference(net, shape)
    ref_grads = torch.autograd.grad(ref[0] + w * ref[1], params)
    flops, n_params = net.expected_cost(shape)
    grads = torch.autograd.grad(flops + w * n_params, params)
    torch.testing.assert_close(torch.stack([flops, n_params]), ref, rtol=1e-10, atol=0.0)
    scale = max(float(g.abs().max()) for g in ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13 * scale)


@settings(max_examples=examples(25), deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    shortcuts=st.booleans(),
    norm=st.booleans(),
    gate=st.sampled_from(["hard_concrete", "sigmoid"]),
    group=st.sampled_from([1, 1, 3]),
    batch=st.integers(1, 5),
    w=st.floats(-2.0, 2.0),
    data=st.data(),
)
def test_mlp_fast_expected_cost_equals_the_reference(
    widths: list[int],
    shortcuts: bool,
    norm: bool,
    gate: Literal["hard_concrete", "sigmoid"],
    group: int,
    batch: int,
    w: float,
    data: st.DataObject,
) -> None:
    net = gp.ShortcutMLP(
        3,
        [x * group for x in widths],
        2,
        shortcuts=shortcuts,
        norm=norm,
        gate=gate,
        unit_group=group,
    ).double()
    _draw_gates(net, data)
    _check_against_reference(net, (batch, 3), w)


@settings(max_examples=examples(25), deadline=None)
@given(
    stages=st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=2), min_size=1, max_size=3),
    shortcuts=st.booleans(),
    gate=st.sampled_from(["hard_concrete", "sigmoid"]),
    group=st.sampled_from([1, 1, 2]),
    head_pool=st.integers(1, 3),
    length=st.integers(4, 13),
    w=st.floats(-2.0, 2.0),
    data=st.data(),
)
def test_conv_fast_expected_cost_equals_the_reference(
    stages: list[list[int]],
    shortcuts: bool,
    gate: Literal["hard_concrete", "sigmoid"],
    group: int,
    head_pool: int,
    length: int,
    w: float,
    data: st.DataObject,
) -> None:
    net = gp.ShortcutConv1d(
        2,
        [[x * group for x in stage] for stage in stages],
        3,
        kernel_size=3,
        head_pool=head_pool,
        shortcuts=shortcuts,
        gate=gate,
        unit_group=group,
    ).double()
    _draw_gates(net, data)
    _check_against_reference(net, (2, 2, length), w)


@settings(max_examples=examples(30), deadline=None)
@given(
    conv=st.booleans(),
    shortcuts=st.booleans(),
    float64=st.booleans(),
    w=st.lists(st.floats(-2.0, 2.0), min_size=2, max_size=2),
    data=st.data(),
)
def test_hard_concrete_node_gives_the_generic_node_bits(
    conv: bool, shortcuts: bool, float64: bool, w: list[float], data: st.DataObject
) -> None:
    # expected_cost computes hard concrete probabilities inside one node; training must not
    # change by it: values and every gate tensor's gradient are the bits of the generic node
    # fed with sigmoid probabilities recorded by autograd
    net: _ShortcutNet
    if conv:
        net = gp.ShortcutConv1d(2, [[3, 2], [4]], 3, kernel_size=3, shortcuts=shortcuts)
        shape: tuple[int, ...] = (2, 2, 8)
    else:
        net = gp.ShortcutMLP(3, [4, 2, 5], 2, shortcuts=shortcuts)
        shape = (3, 3)
    if float64:
        net = net.double()
    _draw_gates(net, data)
    gates = net._gate_list()
    beta = _same_hard_concrete(gates)
    assert beta is not None
    log_alphas = [g.log_alpha for g in gates]
    formula = _compiled_cost(net.spec, shape)
    weights = torch.tensor(w, dtype=torch.float64)
    p = _hc_prob_open(torch.cat(log_alphas), beta)
    ref = _ExpectedCost.apply(p, net, formula)
    ref_grads = torch.autograd.grad((ref * weights).sum(), log_alphas)
    out = _ExpectedCostHC.apply(net, formula, beta, *log_alphas)
    grads = torch.autograd.grad((out * weights).sum(), log_alphas)
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == r.dtype
        assert torch.equal(g, r)


def test_float32_gates_get_the_reference_gradient() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutMLP(5, [4, 4, 4], 3)
    for g in gp.gate_modules(net):
        with torch.no_grad():
            g.log_alpha.normal_(0.0, 3.0)
    _check_against_reference(net, (1, 5), 0.5)
    assert all(p.grad is None for p in net.gate_parameters())  # autograd.grad only


def test_hard_cost_follows_gate_flips() -> None:
    """The hard cost is cached by the exact decisions: flipping gates must change it."""
    net = gp.ShortcutConv1d(1, [[4, 4], [6]], 3, input_length=16)
    x = torch.zeros(1, 1, 16)
    seen = set()
    for g in [g for g in gp.gate_modules(net) if g.n >= 2][:4]:
        g.force_(torch.arange(g.n) % 2 == 0)  # close every other gate
        hard = gp.cost(net, x, hard=True)
        pruned = gp.cost(gp.prune(net), x)
        assert isinstance(hard, gp.ExpectedCost)
        assert isinstance(pruned, gp.Cost)
        assert (float(hard.flops), float(hard.params)) == (pruned.flops, pruned.params)
        seen.add(pruned.flops)
    assert len(seen) == 4


def _formula(v: Any) -> list[Any]:
    a, b, c = v
    t = a * b - 3 * c
    u = (1 - t) * (t + 2.5) - c * c
    return [u * a + b, 7.0, c - 0.25 * u, b]


def test_compiled_formula_is_bit_identical_to_the_tape() -> None:
    compiled = CompiledFormula(_formula, 3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        z = (torch.randn(3, generator=gen, dtype=torch.float64) * 3).tolist()
        tape = Tape()
        leaves = [tape.leaf(x) for x in z]
        outs = _formula(leaves)
        want_values = [float(o) for o in outs]
        want_jac = [
            tape.gradients(o, leaves) if not isinstance(o, float) else [0.0] * 3 for o in outs
        ]
        values, jac = compiled(z)
        assert values == want_values
        assert jac == want_jac


def test_compiled_formula_refuses_branches_and_bad_sizes() -> None:
    def branching(v: Any) -> list[Any]:
        return [v[0] if v[0] else v[1]]

    with pytest.raises(TypeError, match="truth value"):
        CompiledFormula(branching, 2)
    with pytest.raises(ValueError, match="n_inputs"):
        CompiledFormula(_formula, -1)
    with pytest.raises(ValueError, match="expected 3 inputs"):
        CompiledFormula(_formula, 3)([1.0, 2.0])
