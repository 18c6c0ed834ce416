"""Regression tests from a second audit of recurrent support (2026-12-07): recurrent outputs
whose units are pruned in ties, recurrent modules with computed weights, the tutorials'
initial state built from the pruned module's own ``hidden_size``, empty sequences, and the
pruned ShortcutLSTM's initial-state errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from gating_helpers import check_pruned, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import apply_plan, export_plan, gate_


class _Tied(nn.Module):
    """An LSTM (after a gated Linear) whose last output is cut into pieces that are pruned
    together (unit j of one piece with unit j of the other)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.inp = nn.Linear(3, 5)
        self.a = nn.LSTM(5, 6, batch_first=True)
        self.h1, self.h2 = nn.Linear(3, 2), nn.Linear(3, 2)
        self.head = nn.Linear(2, 2)
        self.conv = nn.Conv1d(6, 4, 1, groups=2)

    def forward(self, x: Tensor) -> Tensor:
        o, _ = self.a(torch.relu(self.inp(x)))  # (B, T, 6)
        last = o[:, -1]  # (B, 6)
        if self.how == "split":
            a, b = last.split([3, 3], -1)  # (B, 3) each
            return self.h1(a) + self.h2(b)
        if self.how == "chunk":
            a, b = last.chunk(2, -1)
            return self.h1(a) + self.h2(b)
        if self.how == "chunk_add":
            a, b = last.chunk(2, -1)
            return self.h1(a + b)
        if self.how == "heads":
            h = last.view(last.shape[0], 2, 3).amax(1)  # (B, 3) max over the two heads
            return self.h1(h)
        return self.head(self.conv(o.transpose(1, 2)).mean(2)[:, :2])  # grouped conv


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("chunk_add", "pruned in 3 ties"),
        ("heads", "reduces over the labelled dimension"),
        ("grouped", "does not take a folded input gate"),
    ],
)
def test_recurrent_output_pruned_in_ties_is_left_ungated(how: str, reason: str) -> None:
    """The LSTM got one gate per unit while its consumers indexed the gate by tie: the
    pruned model failed (split sizes) or differed (by up to 0.15)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 3)
    model = _Tied(how).eval()
    summary = gate_(model, x)
    assert summary.rnns == []
    assert reason in dict(summary.ungated_layers)["a"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        randomise_gates(model, gen)
        check_pruned(model, x, gen, factory=lambda: _Tied(how), batches=(1, 5))


@pytest.mark.parametrize("how", ["split", "chunk"])
def test_recurrent_output_split_into_read_apart_sections_is_gated(how: str) -> None:
    """Pieces read by layers of their own are sections pruned apart (since 2026-12-08; before,
    the pieces were pruned in ties and the LSTM left ungated): the units are gated, the
    pruned split gets the kept sections."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 3)
    model = _Tied(how).eval()
    summary = gate_(model, x)
    assert [r[0] for r in summary.rnns] == ["a"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        randomise_gates(model, gen)
        check_pruned(model, x, gen, factory=lambda: _Tied(how), batches=(1, 5))


class _BiAdded(nn.Module):
    """Both directions of a bidirectional GRU added unit by unit."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True, bidirectional=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        o, _ = self.rnn(x)  # (B, T, 8)
        fwd, bwd = o.chunk(2, -1)  # (B, T, 4) each
        return self.head(torch.relu(fwd + bwd).mean(1))


def test_directions_added_unit_by_unit_are_left_ungated() -> None:
    """(Held before the audit fixes: checked alongside them.)"""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    model = _BiAdded().eval()
    summary = gate_(model, x)
    assert "joined to other channels" in dict(summary.ungated_layers)["rnn"]
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        randomise_gates(model, gen)
        check_pruned(model, x, gen, factory=_BiAdded, batches=(1, 3))


def _weight_normed(module: nn.Module, name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # nn.utils.weight_norm is deprecated
        return nn.utils.weight_norm(module, name=name)


class _WeightNormed(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        lstm = nn.LSTM(6, 5, batch_first=True)
        self.a = _weight_normed(lstm, "weight_hh_l0" if where == "hh" else "weight_ih_l0")
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        o, _ = self.a(torch.relu(self.inp(x)))
        return self.head(o[:, -1])


@pytest.mark.parametrize("where", ["hh", "ih"])
def test_recurrent_module_with_computed_weights_is_left_whole(where: str) -> None:
    """The old weight_norm recomputes the weight from g and v before every call: gating it
    made a pruned model that failed (assigning a sliced weight) or lost the folded gates."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3)
    model = _WeightNormed(where).eval()
    summary = gate_(model, x)
    assert summary.rnns == []
    assert "computes its weights when it runs" in dict(summary.ungated_layers)["a"]
    reasons = " ".join(r for *_, r in summary.ungated_groups)
    assert "computes its weight when it runs" in reasons  # inp's consumer is the LSTM
    before = {k: v.clone() for k, v in model.state_dict().items() if "gatedprune" not in k}
    pruned = gp.prune(model).eval()
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5
    after = pruned.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


class _Tutorial(nn.Module):
    """The tutorials' initial state, built in forward from the recurrent module's own
    attributes."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.cell = cell
        if cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(3, 6, num_layers=2, batch_first=True)
        else:
            self.rnn = nn.GRU(3, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(6 * (2 if cell == "gru" else 1), 2)

    def forward(self, x: Tensor) -> Tensor:
        rows = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        h0 = x.new_zeros(rows, x.size(0), self.rnn.hidden_size)  # (L * D, B, H)
        if self.cell == "lstm":
            c0 = torch.zeros(rows, x.size(0), self.rnn.hidden_size)  # (L * D, B, H)
            out, _ = self.rnn(x, (h0, c0))
        else:
            out, _ = self.rnn(x, h0)
        return self.fc(out[:, -1, :])  # type: ignore[no-any-return]


@settings(max_examples=12, deadline=None)
@given(cell=st.sampled_from(["lstm", "gru"]), seed=st.integers(0, 2**16))
def test_initial_state_built_from_the_pruned_hidden_size(cell: str, seed: int) -> None:
    """After prune, ``self.rnn.hidden_size`` reads the kept width: the state the model's own
    code builds from it was refused on every call (pruned and plan-replayed model alike)."""
    torch.manual_seed(seed)
    x = torch.randn(2, 4, 3)
    model = _Tutorial(cell).eval()
    summary = gate_(model, x)
    assert [r[0] for r in summary.rnns] == ["rnn"]
    gen = torch.Generator().manual_seed(seed)
    randomise_gates(model, gen)
    gates = model.gatedprune.group_gates  # type: ignore[union-attr]
    with torch.no_grad():
        for g in gates:
            g.log_alpha[:2] = -9.0  # two units of every layer and direction closed
    pruned = check_pruned(model, x, gen, factory=lambda: _Tutorial(cell), batches=(1, 3))
    assert pruned.rnn.hidden_size < 6
    fresh = apply_plan(_Tutorial(cell), json.loads(json.dumps(export_plan(model)))).eval()
    fresh.load_state_dict(pruned.state_dict())
    xi = torch.randn(5, 7, 3)
    with torch.no_grad():
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5


def _pruned_tutorial_lstm(x: Tensor) -> tuple[_Tutorial, nn.Module]:
    """The gated tutorial LSTM with units 0 and 1 closed in every layer (4 of 6 kept), and
    its pruned copy."""
    model = _Tutorial("lstm").eval()
    gate_(model, x)
    gates = model.gatedprune.group_gates  # type: ignore[union-attr]
    with torch.no_grad():
        for g in gates:
            g.log_alpha.fill_(5.0)
            g.log_alpha[:2] = -9.0
    return model, gp.prune(model).eval()


def test_a_state_of_another_width_is_still_refused() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3)
    _, pruned = _pruned_tutorial_lstm(x)
    assert pruned.rnn.hidden_size == 4
    for width in (4, 6):  # kept and full width: both taken
        h = torch.zeros(2, 2, width)
        pruned.rnn(x, (h, h))
    h = torch.zeros(2, 2, 5)
    with pytest.raises(ValueError, match=r"batch, 6\).*batch, 4\).*got \(2, 2, 5\)"):
        pruned.rnn(x, (h, h))


def test_gated_recurrent_module_refuses_an_empty_sequence() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.LSTM(3, 6, batch_first=True)
            self.h = nn.Linear(6, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.h(self.a(x)[0][:, -1])  # type: ignore[no-any-return]

    model = Net()
    gate_(model, torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=r"at least one step.*\(2, 0, 3\)"):
        model.a(torch.randn(2, 0, 3))


def test_pruned_shortcut_lstm_state_errors_point_to_select_state() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutLSTM(3, [4, 5], 2, 2).eval()
    net.unit_gates[0].force_(torch.tensor([True, False, True, True]))
    x = torch.randn(2, 6, 3)
    hx = [(torch.randn(1, 2, h), torch.randn(1, 2, h)) for h in (4, 5)]
    small = gp.prune(net).eval()
    hint = r"\(this is a pruned network.*select_state"
    with pytest.raises(ValueError, match=r"got \(1, 2, 4\) " + hint):
        small(x, hx)
    with torch.no_grad():
        assert (small(x, small.select_state(hx)) - net(x, hx)).abs().max().item() <= 1e-5
    net.layer_gate.force_(torch.tensor([False, True]))
    small = gp.prune(net).eval()
    with pytest.raises(ValueError, match=r"length 2 " + hint):
        small(x, hx)


class _RecurrentIntoTransposed(nn.Module):
    def __init__(self, directions: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 8, batch_first=True, bidirectional=directions == 2)
        self.up = nn.ConvTranspose1d(8 * directions, 4, 2, stride=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)  # (B, T, D * 8)
        return self.head(self.up(h.transpose(1, 2)).mean(2))  # (B, 2)


@pytest.mark.parametrize("directions", [1, 2])
def test_recurrent_output_read_by_a_transposed_convolution(directions: int) -> None:
    """The recurrent output's gates are folded into the consumer's input weights; a
    transposed convolution's are its first dimension (prune failed with an AssertionError)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    model = _RecurrentIntoTransposed(directions).eval()
    summary = gate_(model, x)
    assert [r[0] for r in summary.rnns] == ["rnn"]
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        randomise_gates(model, gen)
        check_pruned(
            model, x, gen, factory=lambda: _RecurrentIntoTransposed(directions), batches=(1, 3)
        )


def test_a_kept_width_state_must_give_every_unit_the_same_value() -> None:
    """Which unit before pruning each entry of a kept-width state belongs to is unknown: a
    state with one value for all units (zeros, ones) is taken, another is refused (it was
    taken as is: a learned h0 sliced to ``hidden_size`` differed by 0.043, second audit)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3)
    model, pruned = _pruned_tutorial_lstm(x)
    gated_rnn = model.rnn
    with torch.no_grad():
        ones_full = torch.ones(2, 2, 6)
        want = pruned.rnn(x, (ones_full, ones_full))[0]
        ones_kept = torch.ones(2, 2, 4)
        assert torch.equal(pruned.rnn(x, (ones_kept, ones_kept))[0], want)
        gated_out = gated_rnn(x, (ones_full, ones_full))[0]  # (B, T, 6), units 0, 1 zero
        assert (gated_out[..., 2:] - want).abs().max().item() <= 1e-5
        ramp = torch.arange(4.0).expand(2, 2, 4)  # (L, B, 4) a value per unit
        with pytest.raises(ValueError, match=r"different values per unit.*width 6"):
            pruned.rnn(x, (ramp, ramp))
