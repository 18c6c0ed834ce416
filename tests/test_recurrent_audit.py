"""Regression tests from an audit of the recurrent code: index masks given as Python lists,
dtype checks of scaled_forward, RNNStack states, and PlainShortcutLSTM.select_state."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gatedprune as gp
from gatedprune.plain_recurrent import PlainShortcutLSTM
from gatedprune.recurrent import ShortcutLSTM
from gatedprune.rnn_slicing import (
    RNNStack,
    scaled_forward,
    slice_rnn,
    slice_rnn_,
    slice_rnn_layers,
    split_layers,
)


# ---------------------------------------------------------------------- bool masks as lists
@pytest.mark.parametrize("mask", [[True, False], [False, True], [True, False, True]])
def test_a_bool_mask_given_as_a_list_is_a_mask(mask: list[bool]) -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(3, len(mask), batch_first=True)
    small = slice_rnn(lstm, mask)
    want = slice_rnn(lstm, torch.tensor(mask))
    assert small.hidden_size == sum(mask)
    for (name, p), (_, q) in zip(small.named_parameters(), want.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    x = torch.randn(2, 4, 3)
    keep = torch.tensor(mask)
    ref = scaled_forward(lstm, x, hidden_scale=keep.float())[0]  # dropped units gated off
    out = small(x)[0]
    assert isinstance(ref, torch.Tensor)
    assert out.shape == (2, 4, sum(mask))
    assert float((out - ref[..., keep]).detach().abs().max()) <= 1e-6


def test_a_one_unit_all_false_list_mask_keeps_no_unit() -> None:
    with pytest.raises(ValueError, match="keeps no unit"):
        slice_rnn(nn.GRU(2, 1), [False])


def test_bool_list_masks_in_the_other_slicing_functions() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(3, 2, num_layers=2)
    parts = slice_rnn_layers(gru, [[True, False], [False, True]], keep_input=[True, False, True])
    assert [(p.input_size, p.hidden_size) for p in parts] == [(2, 1), (1, 1)]
    slice_rnn_(gru, [[False, True], [True, False]], keep_input=[False, True, True])
    assert (gru.input_size, gru.hidden_size) == (2, 1)


@pytest.mark.parametrize("bad", [[0.0, 1.0], [0.5]])
def test_float_indices_are_refused(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="integer indices"):
        slice_rnn(nn.LSTM(3, 2), bad)


def test_ragged_indices_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="keep_hidden"):
        slice_rnn(nn.LSTM(3, 2), [[0], [1, 0]])  # type: ignore[list-item]


# ---------------------------------------------------------------------- scaled_forward dtypes
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("packed", [False, True])
def test_scaled_forward_names_a_dtype_mismatch(cls: type[nn.RNNBase], packed: bool) -> None:
    m = cls(2, 3)
    x = torch.randn(4, 2, 2, dtype=torch.float64)
    inp: object = pack_padded_sequence(x, torch.tensor([4, 2])) if packed else x
    with pytest.raises(ValueError, match=r"input dtype \(torch.float64\).*\(torch.float32\)"):
        scaled_forward(m, inp)  # type: ignore[arg-type]
    h = torch.zeros(1, 2, 3, dtype=torch.float64)
    hx = (h, h.float()) if cls is nn.LSTM else h
    xin: object = pack_padded_sequence(x.float(), torch.tensor([4, 2])) if packed else x.float()
    with pytest.raises(ValueError, match=r"h0 dtype \(torch.float64\).*\(torch.float32\)"):
        scaled_forward(m, xin, hx)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        scaled_forward(m, torch.ones(4, 2, 2, dtype=torch.long))


def test_scaled_forward_runs_under_autocast() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(2, 3)
    x = torch.randn(4, 1, 2, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = lstm(x)[0]
        got = scaled_forward(lstm, x)[0]
        net = ShortcutLSTM(2, [3, 3], 2, 1, shortcuts=False)  # layer 2 reads bf16
        y = net(torch.randn(2, 4, 2))
    assert isinstance(got, torch.Tensor)
    assert isinstance(y, torch.Tensor)
    assert got.dtype == want.dtype
    assert float((got.float() - want.float()).detach().abs().max()) <= 1e-2
    assert y.shape == (2, 4, 1)


# ---------------------------------------------------------------------- RNNStack
def test_rnn_stack_refuses_one_tensor_for_all_layers() -> None:
    stack = RNNStack(split_layers(nn.GRU(2, 3, num_layers=2)))
    with pytest.raises(TypeError, match=r"one state .* per layer"):
        stack(torch.randn(4, 1, 2), torch.zeros(2, 1, 3))  # type: ignore[arg-type]
    out, states = stack(torch.randn(4, 1, 2), [torch.zeros(1, 1, 3), None])
    assert isinstance(out, torch.Tensor)
    assert out.shape == (4, 1, 3)
    assert len(states) == 2


# ---------------------------------------------------------------------- select_state
def _pruned_lstm(cell: str = "lstm") -> tuple[ShortcutLSTM, PlainShortcutLSTM]:
    torch.manual_seed(0)
    net = ShortcutLSTM(2, [4, 3], 2, 1, cell=cell).eval()  # type: ignore[arg-type]
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    net.unit_gates[0].force_(torch.tensor([True, False, True, False]))
    small = gp.prune(net)
    assert isinstance(small, PlainShortcutLSTM)
    return net, small.eval()


def test_select_state_of_none_is_the_zero_state() -> None:
    net, small = _pruned_lstm()
    x = torch.randn(2, 5, 2)
    with torch.no_grad():
        got = small(x, small.select_state(None))
        want = net(x, None)
    assert isinstance(got, torch.Tensor)
    assert isinstance(want, torch.Tensor)
    assert float((got - want).abs().max()) <= 1e-5


def test_select_state_checks_every_part_of_a_state() -> None:
    net, small = _pruned_lstm()
    x = torch.randn(2, 3, 2)
    h, c = torch.randn(1, 2, 4), torch.randn(1, 2, 6)  # c0 has 6 units, the layer 4
    with pytest.raises(ValueError, match="c0"):
        net(x, [(h, c), None])
    with pytest.raises(ValueError, match=r"hx\[0\] c0 must have shape \(directions, batch, 4\)"):
        small.select_state([(h, c), None])
    with pytest.raises(TypeError, match=r"hx\[0\] must be a pair \(h0, c0\)"):
        small.select_state([h, None])
    _, gru = _pruned_lstm("gru")
    with pytest.raises(TypeError, match=r"hx\[0\] must be a tensor h0"):
        gru.select_state([(h,), None])
    good = (torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    with torch.no_grad():
        got = small(x, small.select_state([good, None]))
        want = net(x, [good, None])
    assert isinstance(got, torch.Tensor)
    assert isinstance(want, torch.Tensor)
    assert float((got - want).abs().max()) <= 1e-5
