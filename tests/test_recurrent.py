"""Recurrent networks: exact hidden-unit slicing of nn.LSTM/GRU/RNN, ShortcutLSTM pruned ==
gated in eval mode with exact costs, packed sequences, initial states, budgets, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import gatedprune as gp
from gatedprune import io
from gatedprune.costs import GRU_ELEMENTWISE, LSTM_ELEMENTWISE, RNN_ELEMENTWISE
from gatedprune.gates import HardConcreteGate, Sigmoid, SigmoidGate
from gatedprune.plain_recurrent import PlainShortcutLSTM
from gatedprune.recurrent import ShortcutLSTM
from gatedprune.rnn_slicing import (
    RNNStack,
    gates_per_unit,
    make_rnn,
    output_features,
    scaled_forward,
    slice_rnn,
    slice_rnn_layers,
    split_layers,
)

LN11 = math.log(11.0)
CELL_CLASSES: dict[str, type[nn.LSTM | nn.GRU | nn.RNN]] = {
    "lstm": nn.LSTM,
    "gru": nn.GRU,
    "rnn": nn.RNN,
}


# ---------------------------------------------------------------------- helpers
def _states(m: nn.LSTM | nn.GRU | nn.RNN, batch: int, gen: torch.Generator) -> object:
    d = 2 if m.bidirectional else 1
    shape = (m.num_layers * d, batch, m.hidden_size)
    h = torch.randn(shape, generator=gen)
    return (h, torch.randn(shape, generator=gen)) if isinstance(m, nn.LSTM) else h


def _select_state(state: object, keep: torch.Tensor) -> object:
    if isinstance(state, tuple):
        return tuple(s.index_select(2, keep) for s in state)
    assert isinstance(state, torch.Tensor)
    return state.index_select(2, keep)


def _max_state_diff(a: object, b: object) -> float:
    if isinstance(a, tuple):
        assert isinstance(b, tuple)
        return max(_max_state_diff(x, y) for x, y in zip(a, b, strict=True))
    assert isinstance(a, torch.Tensor)
    assert isinstance(b, torch.Tensor)
    return float((a - b).detach().abs().max())


def _seq(batch: int, length: int, feats: int, batch_first: bool, gen: torch.Generator):  # type: ignore[no-untyped-def]
    shape = (batch, length, feats) if batch_first else (length, batch, feats)
    return torch.randn(shape, generator=gen)


def _set_gates(net: nn.Module, states: st.DataObject) -> bool:
    """Random gate states: closed, open or in between. Returns whether any gate is closed."""
    any_closed = False
    for g in gp.gate_modules(net):
        assert isinstance(g, HardConcreteGate)
        kinds = states.draw(st.lists(st.sampled_from("cob"), min_size=g.n, max_size=g.n))
        vals = []
        for k in kinds:
            if k == "c":
                vals.append(-LN11 - 1.0)
                any_closed = True
            elif k == "o":
                vals.append(LN11 + 1.0)
            else:
                vals.append(states.draw(st.floats(-LN11 + 0.2, LN11 - 0.2)))
        with torch.no_grad():
            g.log_alpha.copy_(torch.tensor(vals))
    return any_closed


def _open_all(net: nn.Module) -> None:
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))


def _close(gate: gp.Gate | nn.Module | None, idx: list[int] | None = None) -> None:
    assert isinstance(gate, gp.Gate)
    mask = torch.ones(gate.n, dtype=torch.bool)
    mask[idx if idx is not None else slice(None)] = False
    gate.force_(mask)


def _check_equivalent(net: ShortcutLSTM, xs: list[torch.Tensor]) -> gp.Cost:
    """pruned == gated in eval mode on every input of ``xs`` (different lengths) and
    cost(pruned) == expected_cost(hard=True) exactly; returns the pruned cost on ``xs[0]``."""
    net.eval()
    small = gp.prune(net)
    assert isinstance(small, PlainShortcutLSTM)
    assert not gp.gate_modules(small)
    small.eval()
    first: gp.Cost | None = None
    for x in xs:
        with torch.no_grad():
            diff = (small(x) - net(x)).abs().max().item()
        assert diff <= 1e-5, diff
        pruned_cost = gp.cost(small, x)
        assert isinstance(pruned_cost, gp.Cost)
        hard = gp.cost(net, x, hard=True)
        assert isinstance(hard, gp.ExpectedCost)
        assert float(hard.flops) == pruned_cost.flops  # exact, not just rounded
        assert float(hard.params) == pruned_cost.params
        first = first or pruned_cost
    assert first is not None
    return first


def _dense_cost(net: ShortcutLSTM, x: torch.Tensor) -> gp.Cost:
    state = {k: v.clone() for k, v in net.state_dict().items()}
    _open_all(net)
    c = gp.cost(gp.prune(net), x)
    net.load_state_dict(state)
    assert isinstance(c, gp.Cost)
    return c


# ---------------------------------------------------------------------- slicing nn.LSTM/GRU/RNN
@settings(max_examples=examples(25))
@given(
    cell=st.sampled_from(["lstm", "gru", "rnn", "rnn_relu"]),
    hidden=st.integers(1, 6),
    n_in=st.integers(1, 5),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    with_state=st.booleans(),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_slice_rnn_computes_exactly_the_kept_units(
    cell: str,
    hidden: int,
    n_in: int,
    bidirectional: bool,
    batch_first: bool,
    with_state: bool,
    data: st.DataObject,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    kw = {"nonlinearity": "relu"} if cell == "rnn_relu" else {}
    cls = CELL_CLASSES[cell.split("_")[0]]
    m = cls(n_in, hidden, batch_first=batch_first, bidirectional=bidirectional, **kw).eval()
    keep_h = data.draw(st.lists(st.integers(0, hidden - 1), min_size=1, unique=True))
    keep_i = data.draw(st.lists(st.integers(0, n_in - 1), unique=True))
    keep_h_t = torch.tensor(keep_h)
    keep_i_t = torch.tensor(keep_i, dtype=torch.long)
    # Gate values: 0 outside the kept sets, random (possibly fractional) inside.
    u = torch.zeros(hidden)
    u[keep_h_t] = torch.rand(len(keep_h), generator=gen) + 0.1
    s = torch.zeros(n_in)
    s[keep_i_t] = torch.rand(len(keep_i), generator=gen) + 0.1
    small = slice_rnn(m, keep_h_t, keep_input=keep_i_t, input_scale=s, hidden_scale=u)
    assert type(small) is type(m)
    assert (small.input_size, small.hidden_size) == (len(keep_i), len(keep_h))
    assert small.batch_first == batch_first
    assert small.bidirectional == bidirectional
    x = _seq(3, 6, n_in, batch_first, gen)
    hx = _states(m, 3, gen) if with_state else None
    with torch.no_grad():
        ref, ref_state = scaled_forward(m, x, hx, input_scale=s, hidden_scale=u)  # type: ignore[arg-type]
        got, got_state = small(
            x[..., keep_i_t], None if hx is None else _select_state(hx, keep_h_t)
        )
    feats = output_features(keep_h_t, hidden, bidirectional)
    assert isinstance(ref, torch.Tensor)
    assert float((got - ref[..., feats]).abs().max()) <= 1e-5
    assert _max_state_diff(got_state, _select_state(ref_state, keep_h_t)) <= 1e-5
    # the sliced module is smaller by exactly the removed rows and columns
    g = gates_per_unit(m)
    d = 2 if bidirectional else 1
    k, n = len(keep_h), len(keep_i)
    assert sum(p.numel() for p in small.parameters()) == d * g * k * (n + k + 2)


def test_scaled_forward_without_scales_is_the_module() -> None:
    gen = torch.Generator().manual_seed(0)
    for cls in (nn.LSTM, nn.GRU, nn.RNN):
        m = cls(3, 4, num_layers=2, bidirectional=True, batch_first=True).eval()
        x = torch.randn(2, 5, 3, generator=gen)
        hx = _states(m, 2, gen)
        ref, ref_state = m(x, hx)
        got, got_state = scaled_forward(m, x, hx)  # type: ignore[arg-type]
        assert isinstance(got, torch.Tensor)
        assert torch.allclose(got, ref, atol=1e-6)
        assert _max_state_diff(got_state, ref_state) <= 1e-6
        packed = pack_padded_sequence(
            x, torch.tensor([3, 5]), batch_first=True, enforce_sorted=False
        )
        ref_p, ref_ps = m(packed, hx)
        got_p, got_ps = scaled_forward(m, packed, hx)  # type: ignore[arg-type]
        assert isinstance(got_p, PackedSequence)
        assert isinstance(ref_p, PackedSequence)
        assert torch.allclose(got_p.data, ref_p.data, atol=1e-6)
        assert _max_state_diff(got_ps, ref_ps) <= 1e-6


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_multilayer_split_and_per_layer_slicing(
    cls: type[nn.LSTM | nn.GRU], bidirectional: bool
) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    m = cls(3, 5, num_layers=3, dropout=0.3, bidirectional=bidirectional)
    m.eval()  # split layers are exact in eval mode (inter-layer dropout inactive)
    x = torch.randn(7, 2, 3, generator=gen)  # (T, B, F), batch_first=False
    stack = RNNStack(split_layers(m)).eval()
    with torch.no_grad():
        assert torch.allclose(stack(x)[0], m(x)[0], atol=1e-6)  # type: ignore[arg-type]
    keeps = [torch.tensor([0, 3]), torch.tensor([4, 1, 2]), torch.tensor([2])]
    scales = []
    for k in keeps:
        u = torch.zeros(5)
        u[k] = torch.rand(len(k), generator=gen) + 0.2
        scales.append(u)
    s_in = torch.tensor([1.0, 0.0, 0.5])
    parts = slice_rnn_layers(
        m, keeps, keep_input=torch.tensor([0, 2]), input_scale=s_in, hidden_scale=scales
    )
    assert [p.hidden_size for p in parts] == [2, 3, 1]
    with torch.no_grad():
        ref, _ = scaled_forward(m, x, input_scale=s_in, hidden_scale=scales)
        got, states = RNNStack(parts).eval()(x[..., [0, 2]])
    assert isinstance(ref, torch.Tensor)
    assert isinstance(got, torch.Tensor)
    feats = output_features(keeps[-1], 5, bidirectional)
    assert float((got - ref[..., feats]).abs().max()) <= 1e-5
    assert len(states) == 3


def test_input_free_layer_runs_and_is_costed() -> None:
    m = make_rnn(nn.GRU, 0, 3, batch_first=True, bidirectional=True)
    y, _ = m(torch.zeros(2, 4, 0))
    assert y.shape == (2, 4, 6)
    assert y[:, 1:].abs().sum() > 0  # not a constant: the state evolves from the biases
    c = gp.cost(m, torch.zeros(2, 4, 0))
    assert isinstance(c, gp.Cost)
    assert c.params == sum(p.numel() for p in m.parameters()) == 2 * 3 * 3 * (3 + 2)
    per_step = 2 * 3 * 3 * 3 + 2 * 3 * 3 + GRU_ELEMENTWISE * 3  # recurrent MACs, biases, elem
    assert c.flops == 2 * 4 * 2 * per_step  # directions * T * B * per step


def test_cost_of_plain_recurrent_modules_follows_the_documented_rates() -> None:
    def step(g: int, e: int, n: int, h: int) -> int:
        return 2 * g * h * (n + h) + 2 * g * h + e * h

    lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)
    c = gp.cost(lstm, torch.zeros(2, 5, 3))
    assert isinstance(c, gp.Cost)
    assert c.flops == 10 * (step(4, LSTM_ELEMENTWISE, 3, 4) + step(4, LSTM_ELEMENTWISE, 4, 4))
    assert c.params == sum(p.numel() for p in lstm.parameters())
    gru = nn.GRU(3, 4, bidirectional=True)  # sequence-first
    c = gp.cost(gru, torch.zeros(5, 2, 3))
    assert isinstance(c, gp.Cost)
    assert c.flops == 10 * 2 * step(3, GRU_ELEMENTWISE, 3, 4)
    rnn = nn.RNN(3, 4, bias=False)
    c = gp.cost(rnn, torch.zeros(5, 1, 3))
    assert isinstance(c, gp.Cost)
    assert c.flops == 5 * (2 * 4 * (3 + 4) + RNN_ELEMENTWISE * 4)
    # packed input: only the real steps count
    packed = pack_padded_sequence(torch.zeros(2, 5, 3), torch.tensor([5, 2]), batch_first=True)
    c = gp.cost(lstm, packed)
    assert isinstance(c, gp.Cost)
    assert c.flops == 7 * (step(4, LSTM_ELEMENTWISE, 3, 4) + step(4, LSTM_ELEMENTWISE, 4, 4))

    class UserModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.head(self.rnn(x)[0][:, -1])
            return out

    c = gp.cost(UserModel(), torch.zeros(1, 6, 3))
    assert isinstance(c, gp.Cost)
    assert c.flops == 6 * step(4, LSTM_ELEMENTWISE, 3, 4) + 2 * 4 * 2 + 2


def test_slicing_bad_arguments() -> None:
    m = nn.LSTM(3, 4)
    with pytest.raises(ValueError, match="proj_size"):
        slice_rnn(nn.LSTM(3, 4, proj_size=2), [0])
    with pytest.raises(ValueError, match="proj_size"):
        split_layers(nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(ValueError, match="num_layers=2"):
        slice_rnn(nn.GRU(3, 4, num_layers=2), [0])
    with pytest.raises(TypeError, match=r"nn\.LSTM, nn\.GRU or nn\.RNN"):
        slice_rnn(nn.Linear(3, 4), [0])
    with pytest.raises(ValueError, match="keeps no unit"):
        slice_rnn(m, [])
    with pytest.raises(ValueError, match="outside"):
        slice_rnn(m, [0, 4])
    with pytest.raises(ValueError, match="repeated"):
        slice_rnn(m, [1, 1])
    with pytest.raises(ValueError, match="bool mask"):
        slice_rnn(m, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"input_scale must have shape \(3,\)"):
        slice_rnn(m, [0], input_scale=torch.ones(4))
    with pytest.raises(ValueError, match="one per layer"):
        slice_rnn_layers(nn.LSTM(3, 4, num_layers=2), [[0]])
    with pytest.raises(ValueError, match=r"h0 must have shape"):
        scaled_forward(m, torch.zeros(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))
    with pytest.raises(TypeError, match="pair"):
        scaled_forward(m, torch.zeros(5, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="input_size = 3"):
        scaled_forward(m, torch.zeros(5, 2, 4))
    with pytest.raises(ValueError, match="at least one layer"):
        RNNStack([])
    with pytest.raises(ValueError, match="layer 1 reads 5 features"):
        RNNStack([nn.LSTM(3, 4), nn.LSTM(5, 2)])
    with pytest.raises(ValueError, match="input_size must be an int >= 0"):
        make_rnn(nn.LSTM, -1, 3)
    # a bool mask works like indices
    a = slice_rnn(m, torch.tensor([True, False, True, False]))
    b = slice_rnn(m, [0, 2])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# ---------------------------------------------------------------------- ShortcutLSTM
@settings(max_examples=examples(30))
@given(
    cell=st.sampled_from(["lstm", "gru", "rnn"]),
    hidden=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    shortcuts=st.booleans(),
    layer_gates=st.booleans(),
    states=st.data(),
    seed=st.integers(0, 2**16),
)
def test_shortcut_lstm_pruned_equals_gated(
    cell: str,
    hidden: list[int],
    bidirectional: bool,
    batch_first: bool,
    shortcuts: bool,
    layer_gates: bool,
    states: st.DataObject,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = ShortcutLSTM(
        3,
        hidden,
        len(hidden),
        2,
        cell=cell,
        batch_first=batch_first,
        bidirectional=bidirectional,
        shortcuts=shortcuts,
        layer_gates=layer_gates,
    )
    any_closed = _set_gates(net, states)
    xs = [_seq(b, t, 3, batch_first, gen) for b, t in ((4, 6), (1, 1), (2, 13))]
    pruned = _check_equivalent(net, xs)
    dense = _dense_cost(net, xs[0])
    if any_closed:
        assert pruned.flops < dense.flops
        assert pruned.params < dense.params
    else:
        assert pruned == dense


def _all_open_net(cell: str = "lstm", **kw: object) -> ShortcutLSTM:
    torch.manual_seed(0)
    net = ShortcutLSTM(2, [4, 5, 3], 3, 2, cell=cell, **kw)  # type: ignore[arg-type]
    _open_all(net)
    return net


def test_all_units_of_a_layer_closed_removes_the_layer() -> None:
    net = _all_open_net()
    _close(net.unit_gates[1])
    x = torch.randn(3, 8, 2)
    c = _check_equivalent(net, [x])
    small = gp.prune(net)
    assert [ls.hidden for ls in small.spec.layers] == [4, 3]
    assert [ls.origin for ls in small.spec.layers] == [0, 2]
    assert c.params < _dense_cost(net, x).params


def test_closed_layer_gate_removes_the_layer() -> None:
    net = _all_open_net("gru")
    _close(net.layer_gate, [0])
    _check_equivalent(net, [torch.randn(3, 8, 2)])
    assert [ls.origin for ls in gp.prune(net).spec.layers] == [1, 2]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_all_edges_into_a_layer_closed_keeps_it_on_an_empty_input(cell: str) -> None:
    net = _all_open_net(cell, bidirectional=True)
    assert net.edge_gates is not None
    _close(net.edge_gates[1])  # layer 2 reads nothing, but its state still evolves
    xs = [torch.randn(3, 8, 2), torch.randn(2, 3, 2)]
    _check_equivalent(net, xs)
    small = gp.prune(net)
    assert len(small.spec.layers) == 3
    assert small.spec.layers[1].sources == ()
    assert small.layers[1].input_size == 0
    # its output still varies with time, so it could not have been folded into a constant
    with torch.no_grad():
        out = small.layers[1](torch.zeros(1, 8, 0))[0]
    assert float((out[:, 1:] - out[:, :1]).abs().max()) > 1e-4


def test_layer_without_consumer_disappears() -> None:
    net = _all_open_net()
    assert net.edge_gates is not None
    assert net.head_gate is not None
    _close(net.edge_gates[1], [1])  # layer 2 does not read layer 1
    _close(net.edge_gates[2], [1])  # layer 3 does not read layer 1
    _close(net.head_gate, [1])  # the read-out does not read layer 1
    _check_equivalent(net, [torch.randn(3, 8, 2)])
    assert [ls.origin for ls in gp.prune(net).spec.layers] == [1, 2]


def test_closed_readout_prunes_to_the_constant_function() -> None:
    net = _all_open_net()
    _close(net.head_gate)
    x = torch.randn(4, 6, 2)
    c = _check_equivalent(net, [x])
    small = gp.prune(net).eval()
    assert len(small.spec.layers) == 0
    assert c.params == 2  # only the output bias is left
    out = small(x)
    assert torch.equal(out, out[:1, :1].expand_as(out))


def test_all_open_prunes_to_the_same_architecture() -> None:
    net = _all_open_net(bidirectional=True)
    x = torch.randn(3, 5, 2)
    c = _check_equivalent(net, [x])
    plain_params = sum(p.numel() for p in gp.prune(net).parameters())
    assert c.params == plain_params == sum(p.numel() for p in net.weight_parameters())


def test_sigmoid_gates_harden_then_prune_exactly() -> None:
    torch.manual_seed(0)
    net = ShortcutLSTM(2, 6, 2, 3, gate=Sigmoid(init_theta=0.0))
    with torch.no_grad():
        for g in gp.gate_modules(net):
            assert isinstance(g, SigmoidGate)
            g.theta.copy_(torch.randn(g.n))
    gp.harden(net)
    _check_equivalent(net, [torch.randn(3, 7, 2)])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequences(bidirectional: bool) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = ShortcutLSTM(2, [5, 4], 2, 3, bidirectional=bidirectional).eval()
    with torch.no_grad():
        for g in gp.gate_modules(net):
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.copy_(torch.randn(g.n, generator=gen) * 3)
    lengths = torch.tensor([3, 7, 5])
    x = torch.randn(3, 7, 2, generator=gen)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    small = gp.prune(net).eval()
    with torch.no_grad():
        out = net(packed)
        out_small = small(packed)
    assert isinstance(out, PackedSequence)
    assert isinstance(out_small, PackedSequence)
    assert float((out.data - out_small.data).abs().max()) <= 1e-5
    padded, _ = pad_packed_sequence(out, batch_first=True)
    for b, n in enumerate(lengths.tolist()):  # each sequence as if run alone
        with torch.no_grad():
            alone = net(x[b : b + 1, :n])
        assert isinstance(alone, torch.Tensor)
        assert float((padded[b, :n] - alone[0]).abs().max()) <= 1e-5


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_initial_states_map_to_the_pruned_network(cell: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = ShortcutLSTM(2, [5, 4, 3], 3, 2, cell=cell, bidirectional=True, batch_first=False)
    net.eval()
    _open_all(net)
    _close(net.unit_gates[0], [1, 3])
    _close(net.unit_gates[1])  # layer 2 removed
    with torch.no_grad():
        cast_gate = net.unit_gates[2]
        assert isinstance(cast_gate, HardConcreteGate)
        cast_gate.log_alpha[0] = 0.3  # a fractional open unit gate
    x = torch.randn(6, 2, 2, generator=gen)  # (T, B, F)
    hx: list[object] = []
    for h in (5, 4, 3):
        s = torch.randn(2, 2, h, generator=gen)
        hx.append((s, torch.randn(2, 2, h, generator=gen)) if cell == "lstm" else s)
    small = gp.prune(net).eval()
    with torch.no_grad():
        ref = net(x, hx)  # type: ignore[arg-type]
        got = small(x, small.select_state(hx))  # type: ignore[arg-type]
    assert isinstance(ref, torch.Tensor)
    assert isinstance(got, torch.Tensor)
    assert float((got - ref).abs().max()) <= 1e-5
    with torch.no_grad():
        assert float((net(x) - ref).abs().max()) > 1e-4  # the states matter


def test_save_and_load_pruned(tmp_path: Path) -> None:
    net = _all_open_net("gru", bidirectional=True)
    assert net.edge_gates is not None
    _close(net.edge_gates[2], [0, 1])
    _close(net.unit_gates[0], [0])
    small = gp.prune(net).eval()
    f = tmp_path / "lstm.safetensors"
    io.save(small, f)
    loaded = io.load(f)
    assert isinstance(loaded, PlainShortcutLSTM)
    assert loaded.spec == small.spec
    x = torch.randn(2, 5, 2)
    assert torch.equal(loaded(x), small(x))


class _Classifier(nn.Module):
    """A model that holds a ShortcutLSTM and reads its last time step."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = ShortcutLSTM(1, [8, 8], 2, 4)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rnn(x)
        assert isinstance(y, torch.Tensor)
        return y[:, -1] * self.scale  # (B, 4)


@pytest.mark.parametrize("holder", [False, True])
def test_budget_and_prune(holder: bool) -> None:
    torch.manual_seed(0)
    model: nn.Module = _Classifier() if holder else ShortcutLSTM(1, [8, 8], 2, 4)
    x = torch.randn(16, 10, 1)
    y = torch.randint(0, 4, (16,))
    budget = gp.Budget(model, x[:1], params=0.25)
    opt = torch.optim.Adam([*model.parameters(), *budget.parameters()], lr=0.05)
    start = budget.expected()["params"]
    for _ in range(15):
        out = model(x)
        logits = out if holder else out[:, -1]  # type: ignore[index]
        loss = nn.functional.cross_entropy(logits, y) + budget.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert budget.expected()["params"] < start  # the penalty pushes the gates closed
    gates = gp.gate_modules(model)
    assert all(p.grad is not None for g in gates for p in g.parameters())
    model.eval()
    small = gp.prune(model).eval()
    assert not gp.gate_modules(small)
    with torch.no_grad():
        assert float((small(x) - model(x)).abs().max()) <= 1e-5
    achieved = gp.cost(small, x[:1])
    assert isinstance(achieved, gp.Cost)
    assert budget.achieved()["params"] == achieved.params / budget.dense["params"]


def test_expected_cost_is_differentiable_and_bounded() -> None:
    net = ShortcutLSTM(2, [6, 6], 2, 3, bidirectional=True)
    x = torch.zeros(1, 10, 2)
    exp = gp.cost(net, x)
    assert isinstance(exp, gp.ExpectedCost)
    (exp.flops + exp.params).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.gate_parameters())
    dense = _dense_cost(net, x)
    assert 0 < float(exp.flops.detach()) < dense.flops
    assert 0 < float(exp.params.detach()) < dense.params


def test_training_forward_samples_gates_and_uses_fast_kernels() -> None:
    torch.manual_seed(0)
    net = ShortcutLSTM(1, 8, 2, 2).train()
    x = torch.randn(4, 5, 1)
    a, b = net(x), net(x)
    assert isinstance(a, torch.Tensor)
    assert isinstance(b, torch.Tensor)
    assert not torch.equal(a, b)  # hard concrete gates are sampled in training
    (a.sum() + b.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())
    for m in net.cells:  # parameters are stored in ordinary recurrent modules
        assert isinstance(m, nn.LSTM)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.zeros(7, 2), ValueError, "add a batch dimension"),
        (torch.zeros(2, 7, 2, 1), ValueError, "4-dim"),
        (torch.zeros(2, 7, 3), ValueError, "expected 2 input features"),
        (torch.zeros(2, 0, 2), ValueError, "empty input"),
        (torch.zeros(0, 7, 2), ValueError, "empty input"),
        (torch.zeros(2, 7, 2, dtype=torch.long), TypeError, "floating-point"),
        ([[0.0, 1.0]], TypeError, "PackedSequence"),
    ],
)
def test_bad_input_is_a_clear_error(x: object, error: type[Exception], match: str) -> None:
    net = ShortcutLSTM(2, 4, 2, 3)
    small = gp.prune(net)
    for model in (net, small):
        with pytest.raises(error, match=match):
            model(x)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_input_of_another_dtype_is_a_clear_error(cell: str) -> None:
    net = ShortcutLSTM(2, [4, 3], 2, 3, cell=cell).eval()
    small = gp.prune(net).eval()
    assert isinstance(small, PlainShortcutLSTM)
    x = torch.zeros(5, 7, 2, dtype=torch.float64)  # (B, T, 2)
    match = r"input dtype \(torch\.float64\) does not match weight dtype \(torch\.float32\)"
    packed = pack_padded_sequence(x, torch.tensor([7, 3, 2, 2, 1]), batch_first=True)
    h = torch.zeros(1, 5, 4, dtype=torch.float64)  # (D, B, H)
    for state in ((h, h.float()), (h.float(), h)) if cell == "lstm" else (h,):
        hx = [state, None]
        for model, model_hx in ((net, hx), (small, small.select_state(hx))):
            # the same messages from the gated and the pruned model, padded or packed
            for inp in (x, packed):
                with pytest.raises(ValueError, match=match):
                    model(inp)
            for inp in (x.float(), pack_padded_sequence(x.float(), [7, 3, 2, 2, 1], True)):
                with pytest.raises(ValueError, match=r"hx\[0\] dtype \(torch\.float64\) does no"):
                    model(inp, model_hx)  # type: ignore[arg-type]
    hx64 = [(h, h) if cell == "lstm" else h, None]
    for model, model_hx in ((net, hx64), (small, small.select_state(hx64))):
        model.double()  # converted model: runs, padded or packed, with a float64 state
        out = model(x, model_hx)  # type: ignore[arg-type]
        assert isinstance(out, torch.Tensor)
        assert out.dtype == torch.float64
        out_packed = model(packed)
        assert isinstance(out_packed, PackedSequence)
        assert out_packed.data.dtype == torch.float64


def test_bad_states_are_clear_errors() -> None:
    net = ShortcutLSTM(2, [4, 3], 2, 3, bidirectional=True)
    small = gp.prune(net)
    x = torch.zeros(5, 7, 2)
    good = [(torch.zeros(2, 5, 4), torch.zeros(2, 5, 4)), None]
    net(x, good)  # type: ignore[arg-type]
    for model in (net, small):
        with pytest.raises(ValueError, match="one initial state"):
            model(x, good[:1])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"\(2, 5, 4\)"):
            model(x, [(torch.zeros(1, 5, 4), torch.zeros(2, 5, 4)), None])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"\(2, 5, 4\)"):
            model(x, [(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), None])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="pair"):
            model(x, [torch.zeros(2, 5, 4), None])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="original network"):
        small.select_state(good[:1])  # type: ignore[arg-type]
    gru = ShortcutLSTM(2, 4, 1, 3, cell="gru")
    with pytest.raises(ValueError, match=r"\(1, 5, 4\)"):
        gru(x, [torch.zeros(1, 5, 5)])


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="num_layers is 3"):
        ShortcutLSTM(2, [4, 4], 3, 1)
    with pytest.raises(ValueError, match="hidden_size"):
        ShortcutLSTM(2, [4, 0], 2, 1)
    with pytest.raises(TypeError, match="hidden_size"):
        ShortcutLSTM(2, "4", 2, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cell"):
        ShortcutLSTM(2, 4, 2, 1, cell="transformer")
    with pytest.raises(ValueError, match="input_size"):
        ShortcutLSTM(0, 4, 2, 1)
    with pytest.raises(ValueError, match="num_layers"):
        ShortcutLSTM(2, 4, 0, 1)
    with pytest.raises(ValueError, match="gate kind"):
        ShortcutLSTM(2, 4, 1, 1, gate="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, T, F\)"):
        ShortcutLSTM(2, 4, 1, 1).expected_cost((5, 2))
    with pytest.raises(ValueError, match=r"needs 2 input features .* got \(5, 7, 3\)"):
        ShortcutLSTM(2, 4, 1, 1).expected_cost((5, 7, 3))  # was costed as if F were 2
    with pytest.raises(ValueError, match="non-empty"):
        ShortcutLSTM(2, 4, 1, 1).expected_cost((5, 0, 2))


def test_width_gates_are_the_hidden_unit_gates() -> None:
    net = ShortcutLSTM(3, [8, 6], 2, 4)
    assert [id(g) for g in net.width_gates()] == [id(g) for g in net.unit_gates]
    assert [g.n for g in net.width_gates()] == [8, 6]
