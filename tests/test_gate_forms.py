"""``gate_`` on code forms a user audit found mishandled (2026-12-07): a recurrent module run on
a PackedSequence, a residual written ``x.add(f(x))`` in a replayed plan, an optional ``forward``
argument tested with ``if mask is not None``, a max over time as read-out, gating a part of an
already gated model, a plan applied to another kind of recurrent module, composite torch.nn
layers kept whole, and flags given as strings."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import gatedprune as gp
from gatedprune.gating import apply_plan, export_plan, gate_


def _force_random(model: nn.Module, seed: int) -> None:
    """Every gate of a gate_ model open or closed at random (at least one open per gate)."""
    gen = torch.Generator().manual_seed(seed)
    g = inserted_gating(model)
    for gate in [*g._group_list(), *g._block_list()]:
        mask = torch.rand(gate.n, generator=gen) < 0.5
        mask[0] = True
        gate.force_(mask)


def _max_diff(a: nn.Module, b: nn.Module, *args: Tensor | PackedSequence) -> float:
    with torch.no_grad():
        return float((a(*args) - b(*args)).abs().max())


class _PackedReader(nn.Module):
    """A recurrent module whose forward also accepts a PackedSequence."""

    def __init__(self, cell: type[nn.LSTM | nn.GRU | nn.RNN]) -> None:
        super().__init__()
        self.rnn = cell(3, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor | PackedSequence) -> Tensor:
        out, _ = self.rnn(x)
        if isinstance(out, PackedSequence):  # not taken while fx traces a tensor
            out, _ = pad_packed_sequence(out, batch_first=True)
        y: Tensor = self.head(out)  # (B, T, 2)
        return y


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_input_applies_the_output_gates(
    cell: type[nn.LSTM | nn.GRU | nn.RNN], seed: int
) -> None:
    # before: a packed output passed ungated, so closed units reached the head (diff ~0.15)
    torch.manual_seed(seed)
    model = _PackedReader(cell).eval()
    gate_(model, torch.randn(2, 5, 3))
    g = inserted_gating(model)
    for gate in g._group_list():
        gate.force_(torch.arange(gate.n) % 2 == 0)  # units 1, 3, 5 closed
    pruned = gp.prune(model).eval()
    x = torch.randn(3, 6, 3)
    packed = pack_padded_sequence(
        x, torch.tensor([6, 2, 4]), batch_first=True, enforce_sorted=False
    )
    assert _max_diff(model, pruned, x) <= 1e-5
    assert _max_diff(model, pruned, packed) <= 1e-5
    with torch.no_grad():
        raw, _ = pad_packed_sequence(model.rnn(packed)[0], batch_first=True)  # (B, T, 6)
    assert float(raw[..., 1::2].abs().max()) == 0.0  # closed units output exactly 0
    assert float(raw[..., 0::2].abs().max()) > 0.0


class _MethodAdd(nn.Module):
    """Residual blocks written ``x.add(f(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.f1, self.f2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))  # (B, 8)
        h = h.add(F.relu(self.f1(h)))
        h = h.add(F.relu(self.f2(h)))
        y: Tensor = self.head(h)  # (B, 3)
        return y


@pytest.mark.parametrize("shortcuts", [None, "dense"])
def test_plan_with_method_adds_replays(shortcuts: str | None) -> None:
    # before: apply_plan refused its own plan ("expected an add of two tensors")
    torch.manual_seed(0)
    model = _MethodAdd()
    x = torch.randn(5, 4)
    summary = gate_(model, x, shortcuts=shortcuts)
    assert len(summary.blocks) == 2
    g = inserted_gating(model)
    g._block_list()[0].force_(torch.zeros(1, dtype=torch.bool))  # f1's block removed
    model.eval()
    pruned = gp.prune(model).eval()
    fresh = _MethodAdd()
    replayed = apply_plan(fresh, json.loads(json.dumps(export_plan(model))))
    replayed.load_state_dict(pruned.state_dict())
    assert _max_diff(model, pruned, x) <= 1e-5
    assert _max_diff(replayed.eval(), pruned, x) == 0.0


class _OptionalMask(nn.Module):
    """An optional argument tested with Python control flow, and a residual in the root
    ``forward`` (prune rewrites it when the block closes)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = F.relu(self.a(x))  # (B, 8, L)
        if mask is not None:
            h = h * mask  # (B, 1, L) broadcast over the channels
        h = h + F.relu(self.b(h))
        y: Tensor = self.fc(h.mean(-1))  # (B, 2)
        return y


@pytest.mark.parametrize("close_block", [False, True])
def test_optional_argument_in_control_flow(close_block: bool) -> None:
    # before: fx traced `mask` as a tensor, took the branch, and gate_ failed running the graph
    # with mask=None (a bare "unsupported operand type(s) for *" TypeError)
    torch.manual_seed(0)
    model = _OptionalMask()
    x = torch.randn(4, 3, 9)
    summary = gate_(model, x)
    assert summary.channel_groups
    assert summary.blocks
    _force_random(model, 3)
    if close_block:
        inserted_gating(model)._block_list()[0].force_(torch.zeros(1, dtype=torch.bool))
    model.eval()
    pruned = gp.prune(model).eval()
    assert _max_diff(model, pruned, x) <= 1e-5
    plain = gp.cost(pruned, x)
    assert isinstance(plain, gp.Cost)
    assert float(gp.cost(model, x, hard=True).flops) == plain.flops
    mask = (torch.rand(4, 1, 9) > 0.5).float()  # (B, 1, L)
    if close_block:  # the rewritten forward is the traced mask=None path: it says so
        with pytest.raises(AssertionError, match="mask has been specialized"):
            pruned(x, mask)
    else:  # the user's own forward, sliced modules: the mask still works
        assert _max_diff(model, pruned, x, mask) <= 1e-5


class _MaxReadout(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rnn(x)[0]  # (B, T, 8)
        h = F.relu(self.conv(out.transpose(1, 2)))  # (B, 6, T)
        if self.form == "torch.max":
            pooled = torch.max(h, 2)[0]  # (B, 6)
        elif self.form == "values":
            pooled = h.max(dim=-1).values
        else:
            pooled = h.min(2)[0]
        y: Tensor = self.head(pooled)  # (B, 2)
        return y


@settings(max_examples=12, deadline=None)
@given(form=st.sampled_from(["torch.max", "values", "min"]), seed=st.integers(0, 2**16))
def test_max_over_time_is_pruned_through(form: str, seed: int) -> None:
    # before: the pair (values, indices) was "a non-tensor": the conv and the GRU stayed whole
    torch.manual_seed(seed)
    model = _MaxReadout(form)
    x = torch.randn(3, 7, 3)
    summary = gate_(model, x)
    assert ["conv"] in [p for p, _ in summary.channel_groups]
    assert [r[0] for r in summary.rnns] == ["rnn"]
    _force_random(model, seed)
    model.eval()
    pruned = gp.prune(model).eval()
    assert _max_diff(model, pruned, torch.randn(2, 5, 3)) <= 1e-5


def test_gating_a_part_of_a_gated_model_is_refused() -> None:
    body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
    model = nn.Sequential(body, nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(4, 6)
    gate_(model, x)
    with pytest.raises(ValueError, match="part of a model gated by gate_"):
        gate_(body, x)  # before: accepted; the model then ran with two gatings
    body2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
    gate_(body2, x)
    outer = nn.Sequential(body2, nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"already gated \(its part '0' is\)"):
        gate_(outer, x)


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.LSTM | nn.GRU]) -> None:
        super().__init__()
        self.rnn = cell(3, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.head(self.rnn(x)[0][:, -1])  # (B, 2)
        return y


def test_plan_for_another_recurrent_kind_is_refused() -> None:
    torch.manual_seed(0)
    model = _Recurrent(nn.LSTM)
    gate_(model, torch.randn(2, 5, 3))
    for gate in inserted_gating(model)._group_list():
        gate.force_(torch.arange(gate.n) % 3 != 0)
    plan = json.loads(json.dumps(export_plan(model)))
    assert plan["rnn"]["rnn"]["mode"] == "LSTM"
    with pytest.raises(ValueError, match=r"exported from another model \(module 'rnn': plan LSTM"):
        apply_plan(_Recurrent(nn.GRU), plan)  # before: accepted, load_state_dict failed later
    hand = {k: v for k, v in plan.items() if k not in ("model", "checksum")}  # as by hand
    with pytest.raises(ValueError, match="prunes 'rnn' as a LSTM module, but the model's is GRU"):
        apply_plan(_Recurrent(nn.GRU), hand)
    replayed = apply_plan(_Recurrent(nn.LSTM), plan)
    replayed.load_state_dict(gp.prune(model).state_dict())
    del hand["rnn"]["rnn"]["mode"]  # a plan written before the key existed still applies
    apply_plan(_Recurrent(nn.LSTM), hand)


def test_composite_layers_kept_whole_are_named() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 16)
            # (decoder layers are gated since 2026-12-08; nn.Transformer called whole is not)
            self.dec = nn.Transformer(16, 2, 1, 1, 32, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.inp(x)  # (B, T, 16)
            y: Tensor = self.out(self.dec(h, h))  # (B, T, 3)
            return y

    summary = gate_(Net(), torch.randn(2, 5, 4))
    reasons = dict(summary.ungated_layers)
    assert "Transformer is kept whole" in reasons["dec"]
    assert "nn.Transformer.forward cannot be traced by torch.fx" in reasons["dec"]
    assert "inp" not in reasons  # plain layers are not listed
    assert "out" not in reasons


@pytest.mark.parametrize("flag", ["channels", "blocks"])
def test_flags_must_be_bools(flag: str) -> None:
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    options: dict[str, Any] = {flag: "no"}
    with pytest.raises(TypeError, match=f"{flag} must be a bool, got 'no'"):
        gate_(net, torch.zeros(1, 2), **options)
    assert gp.gate_modules(net) == []  # nothing was gated


class _StateReadout(nn.Module):
    def __init__(self, cell: type[nn.LSTM | nn.GRU], form: str) -> None:
        super().__init__()
        self.form = form
        self.lstm = cell is nn.LSTM  # (fx traces the state as a proxy, not a tuple)
        layers = 1 if form == "squeeze" else 2
        self.rnn = cell(3, 6, num_layers=layers, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        _, state = self.rnn(x)
        h_n = state[0] if self.lstm else state  # (L, B, 6)
        if self.form == "slices":
            last = h_n[-1, :, :]  # (B, 6)
        elif self.form == "ellipsis":
            last = h_n[0, ...]
        else:
            last = h_n.squeeze(0)
        y: Tensor = self.head(last)  # (B, 2)
        return y


@settings(max_examples=12, deadline=None)
@given(
    lstm=st.booleans(),
    form=st.sampled_from(["slices", "ellipsis", "squeeze"]),
    seed=st.integers(0, 2**16),
)
def test_final_state_reads_are_pruned_through(lstm: bool, form: str, seed: int) -> None:
    # before: h_n[-1, :, :] and h_n.squeeze(0) left the module ungated
    torch.manual_seed(seed)
    model = _StateReadout(nn.LSTM if lstm else nn.GRU, form)
    summary = gate_(model, torch.randn(3, 5, 3))
    assert [r[0] for r in summary.rnns] == ["rnn"]
    _force_random(model, seed)
    model.eval()
    pruned = gp.prune(model).eval()
    assert _max_diff(model, pruned, torch.randn(2, 7, 3)) <= 1e-5


class _Encoder(nn.Module):
    def __init__(self, nhead: int, ff: int) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, nhead, ff, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.enc(self.inp(x))  # (B, T, 8)
        a, _ = self.att(h, h, h, need_weights=False)  # (B, T, 8)
        y: Tensor = self.out((h + a).mean(1))  # (B, 3)
        return y


@pytest.mark.parametrize(("nhead", "ff"), [(1, 1), (2, 4)])
def test_closing_every_head_and_unit_removes_them(nhead: int, ff: int) -> None:
    # before: head and unit groups kept one closed head / unit (computed, multiplied by 0): with
    # nhead=1 and dim_feedforward=1 closing them changed nothing
    torch.manual_seed(0)
    model = _Encoder(nhead, ff)
    x = torch.randn(2, 5, 4)
    dense = gp.cost(model, x)
    gate_(model, x)
    g = inserted_gating(model)
    heads_units = {gh for _, gh in g.attentions}
    heads_units |= {i for _, gh, gu, _, _ in g.transformers for i in (gh, gu)}
    for i in heads_units:
        gate = g._group_list()[i]
        gate.force_(torch.zeros(gate.n, dtype=torch.bool))
    model.eval()
    pruned = gp.prune(model).eval()
    layer = pruned.enc.layers[0]
    assert layer.self_attn.num_heads == 0
    assert layer.linear1.out_features == 0
    assert pruned.att.num_heads == 0
    assert _max_diff(model, pruned, torch.randn(3, 6, 4)) <= 1e-5
    plain = gp.cost(pruned, x)
    assert isinstance(dense, gp.Cost)
    assert isinstance(plain, gp.Cost)
    assert plain.flops < dense.flops
    assert plain.params < dense.params
    assert float(gp.cost(model, x, hard=True).flops) == plain.flops
    replayed = apply_plan(_Encoder(nhead, ff), json.loads(json.dumps(export_plan(model))))
    replayed.load_state_dict(pruned.state_dict())
    assert _max_diff(replayed.eval(), pruned, x) == 0.0
