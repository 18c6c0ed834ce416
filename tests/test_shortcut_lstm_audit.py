"""Regression and property tests from an audit of ShortcutLSTM: deeper random stacks (up to 4
layers) with initial states, packed sequences (sorted and unsorted) and float64 models,
connectivity() against the pruned structure, train/eval modes kept by prune, state_dict and
deepcopy round trips, expected_cost input shapes, numpy integer sizes and autocast inputs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.plain_recurrent import PlainShortcutLSTM
from gatedprune.recurrent import ShortcutLSTM
from gatedprune.rnn_slicing import State

LN11 = math.log(11.0)


def _draw_gates(net: ShortcutLSTM, data: st.DataObject) -> None:
    """Every gate closed, open or in between (fractional eval value)."""
    for g in gp.gate_modules(net):
        assert isinstance(g, HardConcreteGate)
        kinds = data.draw(st.lists(st.sampled_from("cob"), min_size=g.n, max_size=g.n))
        vals = [
            -LN11 - 1.0
            if k == "c"
            else LN11 + 1.0
            if k == "o"
            else data.draw(st.floats(-LN11 + 0.2, LN11 - 0.2))
            for k in kinds
        ]
        with torch.no_grad():
            g.log_alpha.copy_(torch.tensor(vals))


def _states(
    cell: str, d: int, batch: int, hidden: list[int], dtype: torch.dtype, gen: torch.Generator
) -> list[State | None]:
    out: list[State | None] = []
    for h in hidden:
        s = torch.randn(d, batch, h, generator=gen, dtype=dtype)  # (D, B, H)
        out.append(
            (s, torch.randn(d, batch, h, generator=gen, dtype=dtype)) if cell == "lstm" else s
        )
    return out


def _pick(states: list[State | None], b: int) -> list[State | None]:
    """The initial states of sequence ``b`` alone (batch of one)."""
    out: list[State | None] = []
    for s in states:
        if isinstance(s, tuple):
            out.append((s[0][:, b : b + 1], s[1][:, b : b + 1]))  # (D, 1, H) each
        else:
            assert s is not None
            out.append(s[:, b : b + 1])  # (D, 1, H)
    return out


def _max_diff(a: object, b: object) -> float:
    if isinstance(a, PackedSequence):
        assert isinstance(b, PackedSequence)
        return _max_diff(a.data, b.data)
    assert isinstance(a, torch.Tensor)
    assert isinstance(b, torch.Tensor)
    return float((a - b).abs().max())


# ---------------------------------------------------------------------- property test
@settings(max_examples=examples(40), deadline=None)
@given(
    cell=st.sampled_from(["lstm", "gru", "rnn"]),
    hidden=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    shortcuts=st.booleans(),
    layer_gates=st.booleans(),
    double=st.booleans(),
    enforce_sorted=st.booleans(),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_deep_stacks_with_states_and_packed_inputs_prune_exactly(
    cell: str,
    hidden: list[int],
    bidirectional: bool,
    batch_first: bool,
    shortcuts: bool,
    layer_gates: bool,
    double: bool,
    enforce_sorted: bool,
    data: st.DataObject,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    net = ShortcutLSTM(
        3,
        hidden,
        len(hidden),
        2,
        cell=cell,  # type: ignore[arg-type]
        batch_first=batch_first,
        bidirectional=bidirectional,
        shortcuts=shortcuts,
        layer_gates=layer_gates,
    ).to(dtype)
    _draw_gates(net, data)
    net.eval()
    small = gp.prune(net)
    assert isinstance(small, PlainShortcutLSTM)
    assert not small.training
    assert all(p.dtype == dtype for p in small.parameters())
    d = 2 if bidirectional else 1

    # connectivity() describes exactly what prune keeps
    conn = net.connectivity()
    assert conn["layers_kept"] == len(small.spec.layers)
    assert conn["units_kept"] == sum(ls.hidden for ls in small.spec.layers)
    kept_edges = sum(len(ls.sources) for ls in small.spec.layers) + len(small.spec.head_sources)
    assert conn["edges_kept"] == kept_edges

    for batch, length in ((3, 5), (1, 1), (2, 8)):
        shape = (batch, length, 3) if batch_first else (length, batch, 3)
        # a non-contiguous input: the transposed copy of the other layout
        x = torch.randn(shape[::-1], generator=gen, dtype=dtype).permute(2, 1, 0)  # shape
        hx = _states(cell, d, batch, hidden, dtype, gen)
        with torch.no_grad():
            want = net(x, hx)
            got = small(x, small.select_state(hx))
        assert _max_diff(got, want) <= 1e-5
        hard = gp.cost(net, x, hard=True)
        plain = gp.cost(small, x)
        assert isinstance(hard, gp.ExpectedCost)
        assert isinstance(plain, gp.Cost)
        assert float(hard.flops) == plain.flops
        assert float(hard.params) == plain.params

        if batch == 1:
            continue
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)
        lengths[0] = length
        if enforce_sorted:
            lengths = lengths.sort(descending=True).values
        packed = pack_padded_sequence(
            x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted
        )
        with torch.no_grad():
            out = net(packed, hx)
            out_small = small(packed, small.select_state(hx))
        assert isinstance(out, PackedSequence)
        assert _max_diff(out, out_small) <= 1e-5
        padded, _ = pad_packed_sequence(out, batch_first=True)  # (B, T, 2)
        xb = x if batch_first else x.transpose(0, 1)  # (B, T, 3)
        for b, n in enumerate(lengths.tolist()):  # each sequence as if run alone
            one = xb[b : b + 1, :n] if batch_first else xb[b : b + 1, :n].transpose(0, 1)
            with torch.no_grad():
                alone = net(one, _pick(hx, b))
            assert isinstance(alone, torch.Tensor)
            alone = alone[0] if batch_first else alone[:, 0]  # (n, 2)
            assert float((padded[b, :n] - alone).abs().max()) <= 1e-5


# ---------------------------------------------------------------------- modes
def test_prune_keeps_the_train_eval_modes() -> None:
    """prune leaves the model unchanged and returns a model in its train/eval mode (README,
    gatedprune.prune); pruned_module used to reset every submodule to the model's mode and
    always returned an eval-mode model."""
    torch.manual_seed(0)
    net = ShortcutLSTM(2, [4, 3], 2, 3).train()
    net.unit_gates[0].eval()  # e.g. a frozen gate
    before = [(name, m.training) for name, m in net.named_modules()]
    small = gp.prune(net)
    assert [(name, m.training) for name, m in net.named_modules()] == before
    assert small.training
    net.eval()
    assert not gp.prune(net).training


# ---------------------------------------------------------------------- round trips
def test_state_dict_and_deepcopy_round_trips() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = ShortcutLSTM(2, [4, 3, 2], 3, 3, cell="gru", bidirectional=True).eval()
    with torch.no_grad():
        for g in gp.gate_modules(net):
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.copy_(torch.randn(g.n, generator=gen) * 4)
    twin = ShortcutLSTM(2, [4, 3, 2], 3, 3, cell="gru", bidirectional=True).eval()
    twin.load_state_dict(net.state_dict())
    clone = copy.deepcopy(net)
    x = torch.randn(2, 6, 2, generator=gen)
    small = gp.prune(net).eval()
    for other in (twin, clone):
        with torch.no_grad():
            assert torch.equal(other(x), net(x))
        other_small = gp.prune(other).eval()
        assert other_small.spec == small.spec
        with torch.no_grad():
            assert torch.equal(other_small(x), small(x))
        assert gp.cost(other, x) == gp.cost(net, x)


# ---------------------------------------------------------------------- bad cost shapes
@pytest.mark.parametrize("shape", [(5.5, 7, 2), (5, 7.9, 2), ("5", 7, 2), (5, 7, 2.0)])
def test_expected_cost_refuses_non_integer_dimensions(shape: tuple[object, ...]) -> None:
    """A float dimension used to be truncated (5.5 costed as 5) and a string parsed."""
    net = ShortcutLSTM(2, 4, 1, 1)
    with pytest.raises(TypeError, match="input_shape must be a sequence of ints"):
        net.expected_cost(shape)  # type: ignore[arg-type]


def test_expected_cost_refuses_a_non_sequence_shape() -> None:
    with pytest.raises(TypeError, match="input_shape must be a sequence of ints, got None"):
        ShortcutLSTM(2, 4, 1, 1).expected_cost(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- numpy sizes
def test_numpy_integer_sizes_are_accepted() -> None:
    """Sizes are ints; numpy integers (as gates accept) used to be a TypeError."""
    net = ShortcutLSTM(np.int64(2), np.int64(4), np.int64(2), np.int64(3))  # type: ignore[arg-type]
    assert [ls.hidden for ls in net.spec.layers] == [4, 4]
    assert all(type(ls.hidden) is int for ls in net.spec.layers)
    net2 = ShortcutLSTM(2, [np.int32(4), 3], 2, 3)  # type: ignore[list-item]
    assert [type(ls.hidden) for ls in net2.spec.layers] == [int, int]
    out = net2(torch.randn(1, 3, 2))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 3, 3)
    with pytest.raises(TypeError, match=r"hidden_size must be an int >= 1, got .*4\.0"):
        ShortcutLSTM(2, [np.float64(4.0), 3], 2, 3)  # type: ignore[list-item]


# ---------------------------------------------------------------------- autocast
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gated_forward_accepts_a_low_precision_input_under_autocast(cell: str) -> None:
    """Under autocast the kernels cast (as nn.LSTM does); a bfloat16 input from an earlier
    autocast layer used to be refused as a dtype mismatch."""
    torch.manual_seed(0)
    net = ShortcutLSTM(2, [4, 3], 2, 3, cell=cell, bidirectional=True).eval()  # type: ignore[arg-type]
    x = torch.randn(5, 7, 2)  # (B, T, F)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = net(x)
        got = net(x.bfloat16())
    assert isinstance(got, torch.Tensor)
    assert isinstance(want, torch.Tensor)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)  # the kernels cast a float32 input to bfloat16 too
    with pytest.raises(ValueError, match=r"input dtype \(torch\.bfloat16\) does not match"):
        net(x.bfloat16())  # outside autocast the mismatch is still refused
    plain = gp.prune(net)  # the pruned model behaves the same
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = plain(x.bfloat16())  # refused before: a dtype mismatch
        ref = plain(x)
    # the bfloat16 input itself is rounded: equal up to bfloat16 precision (8 mantissa bits)
    torch.testing.assert_close(low.float(), ref.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match=r"input dtype \(torch\.bfloat16\) does not match"):
        plain(x.bfloat16())


def test_a_string_hx_is_refused_as_a_whole() -> None:
    net = ShortcutLSTM(2, [4, 3], 2, 3).eval()
    x = torch.randn(5, 7, 2)  # (B, T, F)
    for model in (net, gp.prune(net)):
        with pytest.raises(ValueError, match=r"hx must be None or a list .* got str"):
            model(x, "ab")  # len 2 == number of layers: was read as one state per layer
