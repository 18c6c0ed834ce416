"""Audit of gate_ / prune / cost on Transformer and recurrent modules: configurations that used
to crash or give a different function, and random configurations checked for exactness."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import examples, inserted_gating, random_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import gate_
from gatedprune.gating.transformer import PrunedMultiheadAttention, attention


def _force(model: nn.Module, index: int, keep: list[bool]) -> None:
    gate = inserted_gating(model).group_gates[index]
    assert isinstance(gate, HardConcreteGate)
    gate.force_(torch.tensor(keep))


def _check_exact(model: nn.Module, inputs: list[Tensor]) -> nn.Module:
    """prune == gated (eval) on every input; cost(pruned) == the hard expected cost."""
    model.eval()
    hard = gatedprune.cost(model, inputs[0], hard=True)
    pruned = gatedprune.prune(model)
    with torch.no_grad():
        for x in inputs:
            assert (pruned(x) - model(x)).abs().max().item() <= 1e-5
    c = gatedprune.cost(pruned, inputs[0])
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    return pruned


# ---------------------------------------------------------------- per-head attention masks


class _HeadMaskEncoder(nn.Module):
    """Encoder layers fed a per-head float mask ``(B * heads, T, T)`` (a buffer)."""

    def __init__(self, norm_first: bool, batch_first: bool) -> None:
        super().__init__()
        self.time = 1 if batch_first else 0
        self.embed = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(
            8, 4, 12, 0.0, batch_first=batch_first, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        mask = torch.zeros(2 * 4, 5, 5)  # (B * heads, T, T)
        mask[1::2, :, 0] = float("-inf")  # odd heads never attend to position 0
        mask[::4, :, 1:3] = -2.0
        self.register_buffer("mask", mask)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.embed(x), mask=self.mask)  # (B, T, 8) or (T, B, 8)
        return self.head(h.mean(self.time))


class _HeadMaskAttention(nn.Module):
    """A standalone nn.MultiheadAttention fed a fixed per-head mask and one built from
    ``num_heads`` at run time (both written for the unpruned module)."""

    def __init__(self, from_attribute: bool) -> None:
        super().__init__()
        self.from_attribute = from_attribute
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)
        mask = torch.zeros(2 * 4, 5, 5)
        mask[2::4, :, -1] = float("-inf")
        self.register_buffer("mask", mask)
        self.register_buffer("causal", torch.ones(5, 5, dtype=torch.bool).triu(1))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, T, 8)
        if self.from_attribute:  # the same causal mask for every head: (B * heads, T, T)
            mask = self.causal.repeat(x.shape[0] * self.attn.num_heads, 1, 1)
        else:
            mask = self.mask
        return self.head(self.attn(h, h, h, attn_mask=mask, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_per_head_mask_follows_the_kept_heads_of_encoder_layers(
    norm_first: bool, batch_first: bool
) -> None:
    """A (B * heads, T, S) mask used to crash the pruned layers (a view to the new head count)."""
    torch.manual_seed(0)
    model = _HeadMaskEncoder(norm_first, batch_first).eval()
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    gate_(model, x)
    tf = inserted_gating(model).transformers
    _force(model, tf[0][1], [True, False, False, True])  # layer 0 keeps heads 0 and 3
    _force(model, tf[1][1], [False, True, True, True])  # layer 1 keeps heads 1, 2, 3
    pruned = _check_exact(model, [x, torch.randn_like(x)])
    att = pruned.get_submodule("encoder.layers.0.self_attn")
    assert isinstance(att, PrunedMultiheadAttention)
    assert (att.num_heads, att.kept_heads, att.source_heads) == (2, (0, 3), 4)


@pytest.mark.parametrize("from_attribute", [False, True])
def test_per_head_mask_follows_the_kept_heads_of_attention(from_attribute: bool) -> None:
    torch.manual_seed(1)
    model = _HeadMaskAttention(from_attribute).eval()
    x = torch.randn(2, 5, 3)
    gate_(model, x)
    _force(model, inserted_gating(model).attentions[0][1], [False, True, True, False])
    pruned = _check_exact(model, [x, torch.randn(2, 5, 3)])
    assert pruned.get_submodule("attn").num_heads == 2


def test_attention_masks_of_the_wrong_shape_are_value_errors() -> None:
    """A mask or padding mask of the wrong shape is a ValueError naming its shape (it used to
    be a raw view error about the head count), in the gated and the pruned attention."""
    torch.manual_seed(2)
    att = PrunedMultiheadAttention(8, 2, 4, batch_first=True, kept_heads=[1, 3], source_heads=4)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(4, 4\)"):
        att(x, x, x, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"attn_mask has shape \(6, 5, 5\)"):
        att(x, x, x, attn_mask=torch.zeros(6, 5, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 4\)"):
        att(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    params = (torch.randn(24, 8), None, torch.randn(8, 8), None)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(5, 5, 5\)"):
        attention(x, x, x, params, 2, 4, batch_first=True, attn_mask=torch.zeros(5, 5, 5))
    # the head count before pruning (4) and after (2) are both accepted
    for rows in (8, 4):
        out, _ = att(x, x, x, attn_mask=torch.zeros(rows, 5, 5))
        assert out.shape == (2, 5, 8)
    with pytest.raises(ValueError, match=r"kept_heads \[0, 4\]"):
        PrunedMultiheadAttention(8, 2, 4, kept_heads=[0, 4], source_heads=4)


class _Float64Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 12, 0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)
        self.gru = nn.GRU(8, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.embed(x))  # (B, T, 8)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.gru(h)[0][:, -1])


def test_pruned_attention_and_ffn_keep_the_weights_dtype() -> None:
    """Rebuilt attention and FFN Linears were created in the default dtype (and device): a
    float64 model pruned to float32 attention weights and failed on its float64 input."""
    torch.manual_seed(9)
    model = _Float64Net().double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    gate_(model, x)
    gating = inserted_gating(model)
    _force(model, gating.transformers[0][1], [False, True])  # heads
    _force(model, gating.transformers[0][2], [i % 3 != 0 for i in range(12)])  # FFN units
    _force(model, gating.attentions[0][1], [True, False, False, True])
    pruned = _check_exact(model, [x])
    assert {p.dtype for p in pruned.parameters()} == {torch.float64}


class _PReLUEncoder(nn.Module):
    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(
            8, 2, 12, 0.0, nn.PReLU(), batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_activation_parameters_are_counted(norm_first: bool) -> None:
    """The parameter of an nn.PReLU activation was missing from the gated cost (one less
    than the dense and the pruned model's); it now goes with the FFN sub-layer."""
    torch.manual_seed(10)
    model = _PReLUEncoder(norm_first).eval()
    x = torch.randn(2, 5, 3)
    dense = gatedprune.cost(model, x)
    gate_(model, x)
    assert gatedprune.cost(model, x, hard=True).detach() == dense
    tf = inserted_gating(model).transformers
    _force(model, tf[0][2], [i % 2 == 0 for i in range(12)])  # layer 0: half the units
    _force(model, tf[1][4], [False])  # layer 1: FFN sub-layer closed
    _check_exact(model, [x])


# ---------------------------------------------------------------- recurrent initial states


class _Seq2Seq(nn.Module):
    """An encoder whose last final state ``h_n[-1]`` is the decoder's initial state."""

    def __init__(self, cell: type[nn.GRU] | type[nn.LSTM] | type[nn.RNN], bi: bool) -> None:
        super().__init__()
        self.lstm = cell is nn.LSTM
        self.enc = cell(3, 5, num_layers=2, batch_first=True, bidirectional=bi)
        self.dec = cell(3, 5, batch_first=True)
        self.head = nn.Linear(5 + 5 * (2 if bi else 1), 2)

    def forward(self, x: Tensor) -> Tensor:
        out, state = self.enc(x)  # state: (L D, B, 5) or a (h, c) pair
        h = state[0] if self.lstm else state
        h0 = h[-1].unsqueeze(0)  # (1, B, 5)
        hx = (h0, torch.zeros_like(h0)) if self.lstm else h0
        return self.head(torch.cat([self.dec(x, hx)[0][:, -1], out[:, 0]], dim=1))


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
@pytest.mark.parametrize("bi", [False, True])
def test_final_state_fed_as_an_initial_state_is_left_ungated(
    cell: type[nn.GRU] | type[nn.LSTM] | type[nn.RNN], bi: bool
) -> None:
    """The encoder's h_n[-1] was pruned to the kept units while the (ungated) decoder still
    needs a full-width initial state: the pruned model crashed."""
    torch.manual_seed(3)
    model = _Seq2Seq(cell, bi).eval()
    x = torch.randn(2, 5, 3)
    summary = gate_(model, x)
    reasons = dict(summary.ungated_layers)
    assert "initial state hx of 'dec'" in reasons["enc"]
    random_gates(model, torch.Generator().manual_seed(3), low=-6.0)
    _check_exact(model, [x, torch.randn(3, 7, 3)])


class _NoneState(nn.Module):
    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.keyword = keyword
        self.lstm = nn.LSTM(3, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.lstm(x, hx=None)[0] if self.keyword else self.lstm(x, None)[0]  # (B, T, 6)
        return self.head(out[:, -1])


@pytest.mark.parametrize("keyword", [False, True])
def test_explicit_none_initial_state_is_gated(keyword: bool) -> None:
    """``rnn(x, None)`` is ``rnn(x)``: it used to be left ungated as 'called with hx'."""
    torch.manual_seed(4)
    model = _NoneState(keyword).eval()
    x = torch.randn(2, 5, 3)
    summary = gate_(model, x)
    assert [n for n, *_ in summary.rnns] == ["lstm"]
    random_gates(model, torch.Generator().manual_seed(4), low=-6.0)
    pruned = _check_exact(model, [x, torch.randn(1, 3, 3)])
    assert pruned.get_submodule("lstm").hidden_size < 6


# ---------------------------------------------------------------- random encoder stacks

_ACTIVATIONS: dict[str, str | Callable[[Tensor], Tensor]] = {
    "relu": "relu",
    "gelu": "gelu",
    "silu": F.silu,
    "GELU()": nn.GELU(),
    "PReLU()": nn.PReLU(),  # holds a parameter
}


class _Encoder(nn.Module):
    """Linear embedding, nn.TransformerEncoder (optional final norm), mean or first-token head;
    masks: none, causal (2-D, ``is_causal``), per-head (3-D, bool), padding, or both."""

    def __init__(
        self,
        heads: int,
        ff: int,
        layers: int,
        norm_first: bool,
        batch_first: bool,
        activation: str,
        bias: bool,
        final_norm: bool,
        dropout: float,
        masks: str,
    ) -> None:
        super().__init__()
        d, t = 8, 5
        self.batch_first, self.masks, self.heads = batch_first, masks, heads
        self.embed = nn.Linear(3, d)
        layer = nn.TransformerEncoderLayer(
            d,
            heads,
            ff,
            dropout,
            _ACTIVATIONS[activation],
            batch_first=batch_first,
            norm_first=norm_first,
            bias=bias,
        )
        norm = nn.LayerNorm(d, bias=bias) if final_norm else None
        self.encoder = nn.TransformerEncoder(layer, layers, norm=norm, enable_nested_tensor=False)
        self.register_buffer("causal", torch.ones(t, t, dtype=torch.bool).triu(1))
        blocked = torch.rand(heads, t, t) > 0.6
        blocked[..., 0] = False  # every query sees position 0
        self.register_buffer("blocked", blocked)  # per-head bool mask (True = blocked)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t = (0, 1) if self.batch_first else (1, 0)
        mask: Tensor | None = None
        pad: Tensor | None = None
        if self.masks in ("causal", "causal+pad"):
            mask = self.causal
        if self.masks == "per_head":
            mask = self.blocked.repeat(x.shape[b], 1, 1)  # (B * heads, T, T)
        if self.masks in ("pad", "causal+pad"):
            xt = x if self.batch_first else x.transpose(0, 1)  # (B, T, 3)
            pad = (xt[..., 0] > 0.8) & (torch.arange(x.shape[t]) > 0)  # (B, T) True = ignore
        h = self.encoder(
            self.embed(x), mask=mask, src_key_padding_mask=pad, is_causal=self.masks == "causal"
        )
        return self.head(h.mean(t))


@settings(max_examples=examples(40), deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    ff=st.integers(2, 10),
    layers=st.integers(1, 2),
    norm_first=st.booleans(),
    batch_first=st.booleans(),
    activation=st.sampled_from(sorted(_ACTIVATIONS)),
    bias=st.booleans(),
    final_norm=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]),
    masks=st.sampled_from(["none", "causal", "per_head", "pad", "causal+pad"]),
    closed=st.sampled_from(["random", "heads", "units", "attn", "ffn", "layer"]),
    seed=st.integers(0, 2**16),
)
def test_random_encoders_prune_exact(
    heads: int,
    ff: int,
    layers: int,
    norm_first: bool,
    batch_first: bool,
    activation: str,
    bias: bool,
    final_norm: bool,
    dropout: float,
    masks: str,
    closed: str,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _Encoder(
        heads, ff, layers, norm_first, batch_first, activation, bias, final_norm, dropout, masks
    ).eval()
    shape = (2, 5, 3) if batch_first else (5, 2, 3)
    x = torch.randn(*shape, generator=gen)
    dense = gatedprune.cost(model, x)
    assert isinstance(dense, Cost)
    with torch.enable_grad():  # PyTorch's documented slow path, not its inference fast path
        before = model(x)
    summary = gate_(model, x)
    assert [(h, u) for _, h, u in summary.transformers] == [(heads, ff)] * layers
    with torch.no_grad():  # gates start open: the same function and the dense cost
        assert (model(x) - before).abs().max().item() <= 1e-5
    assert gatedprune.cost(model, x, hard=True).detach() == dense
    random_gates(model, gen)
    _, gh, gu, ga, gf = inserted_gating(model).transformers[seed % layers]
    if closed in ("heads", "units"):  # a whole vector closed: one entry kept at value 0
        g = gh if closed == "heads" else gu
        _force(model, g, [False] * (heads if closed == "heads" else ff))
    if closed in ("attn", "layer"):
        _force(model, ga, [False])
    if closed in ("ffn", "layer"):
        _force(model, gf, [False])
    pruned = _check_exact(model, [x, torch.randn(*shape, generator=gen)])
    c = gatedprune.cost(pruned, x)
    assert isinstance(c, Cost)
    if closed != "random" and not (closed == "heads" and heads == 1):
        assert c.flops < dense.flops
        assert c.params < dense.params


# ---------------------------------------------------------------- random recurrent consumers


class _Recurrent(nn.Module):
    """A recurrent module read through one of several supported consumers."""

    def __init__(
        self,
        cell: str,
        layers: int,
        bi: bool,
        batch_first: bool,
        bias: bool,
        read: str,
        dropout: float,
    ) -> None:
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}[cell]
        extra = {"nonlinearity": "relu"} if cell == "rnn_relu" else {}
        self.batch_first, self.read, self.bi, self.lstm = batch_first, read, bi, cls is nn.LSTM
        self.rnn = cls(
            3,
            5,
            num_layers=layers,
            bias=bias,
            batch_first=batch_first,
            bidirectional=bi,
            dropout=dropout if layers > 1 else 0.0,
            **extra,
        )
        width = 5 * (2 if bi else 1)
        self.rnn2 = nn.GRU(width, 4, batch_first=batch_first)
        self.conv = nn.Conv1d(width, 4, 2)
        inputs = {"flatten": 4 * width, "two_steps": 2 * width, "state": 10, "conv": 4}
        self.head = nn.Linear(inputs.get(read, width if read != "stacked" else 4), 2)

    def forward(self, x: Tensor) -> Tensor:
        t = 1 if self.batch_first else 0
        out, state = self.rnn(x)  # out: (B, T, D H) or (T, B, D H)
        seq = out if self.batch_first else out.transpose(0, 1)  # (B, T, D H)
        if self.read == "flatten":
            return self.head(seq.flatten(1))  # (B, T * D H), T = 4
        if self.read == "two_steps":
            return self.head(torch.cat([seq[:, -1], seq[:, 0]], dim=1))
        if self.read == "state":
            h = state[0] if self.lstm else state  # (L D, B, 5)
            return self.head(torch.cat([F.relu(h[-1]), h[0]], dim=1))
        if self.read == "conv":
            return self.head(F.relu(self.conv(seq.transpose(1, 2))).amax(-1))
        if self.read == "stacked":
            return self.head(self.rnn2(F.dropout(out, 0.2, self.training))[0].mean(t))
        return self.head(out.sum(t))


@settings(max_examples=examples(40), deadline=None)
@given(
    cell=st.sampled_from(["lstm", "gru", "rnn_tanh", "rnn_relu"]),
    layers=st.integers(1, 3),
    bi=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    read=st.sampled_from(["flatten", "two_steps", "state", "conv", "stacked", "sum"]),
    dropout=st.sampled_from([0.0, 0.4]),
    all_closed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_recurrent_consumers_prune_exact(
    cell: str,
    layers: int,
    bi: bool,
    batch_first: bool,
    bias: bool,
    read: str,
    dropout: float,
    all_closed: bool,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _Recurrent(cell, layers, bi, batch_first, bias, read, dropout).eval()
    shape = (2, 4, 3) if batch_first else (4, 2, 3)
    x = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        before = model(x)
    summary = gate_(model, x)
    assert "rnn" in [n for n, *_ in summary.rnns], str(summary)
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-5
    model.train()  # a training step runs (inter-layer dropout, sampled gates)
    model(x).square().mean().backward()
    random_gates(model, gen, low=-6.0)
    if all_closed:  # every unit of every state of `rnn` closed: one unit kept at value 0
        for g in inserted_gating(model).rnns[0].groups:
            _force(model, g, [False] * 5)
    other = (2, 4, 3) if batch_first else (4, 2, 3)  # flatten fixes T = 4
    pruned = _check_exact(model, [x, torch.randn(*other, generator=gen)])
    if all_closed:
        assert pruned.get_submodule("rnn").hidden_size == 1


# ---------------------------------------------------------------- known, outside this scope


class _ReadsWeights(nn.Module):
    """The model reads the attention weights (averaged over heads, or per head)."""

    def __init__(self, average: bool) -> None:
        super().__init__()
        self.average = average
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)
        self.head = nn.Linear(8 + 5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, T, 8)
        out, w = self.attn(h, h, h, average_attn_weights=self.average)
        w = w if self.average else w[:, 0]  # (B, T, S): head 0 when per head
        return self.head(torch.cat([out[:, 0], w[:, 0]], dim=1))


@pytest.mark.parametrize("average", [True, False])
def test_attention_whose_weights_are_read_prunes_exact(average: bool) -> None:
    torch.manual_seed(5)
    model = _ReadsWeights(average).eval()
    x = torch.randn(2, 5, 3)
    summary = gate_(model, x)
    assert not summary.attentions  # its heads stay: the model reads per-head weights
    assert ("attn", "the model reads its attention weights (one per head: heads cannot go)") in (
        summary.ungated_layers
    )
    _check_exact(model, [x])


class _LinearState(nn.Module):
    """A Linear computes the GRU's initial state from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.init = nn.Linear(3, 5)
        self.gru = nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.relu(self.init(x.mean(1))).unsqueeze(0)  # (1, B, 5)
        return self.head(self.gru(x, h0)[0][:, -1])


def test_linear_computing_an_initial_state_is_not_pruned() -> None:
    torch.manual_seed(6)
    model = _LinearState().eval()
    x = torch.randn(2, 5, 3)
    summary = gate_(model, x)
    assert (["init"], 5, "gru reads it as its initial state hx") in summary.ungated_groups
    random_gates(model, torch.Generator().manual_seed(6), low=-6.0)
    _check_exact(model, [x])


class _LiteralView(nn.Module):
    """The model reshapes the recurrent output with its width written as a literal."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.gru(x)[0]  # (B, T, 4)
        return self.head(out.reshape(-1, 4).view(out.shape[0], -1, 4).mean(1))


def test_literal_width_in_a_reshape_is_pruned_and_rewritten() -> None:
    # before 2026-12-07 a literal width kept the units whole; now the pruned code's literal
    # becomes the kept width (the plan's "sizes")
    torch.manual_seed(7)
    model = _LiteralView().eval()
    x = torch.randn(2, 5, 3)
    summary = gate_(model, x)
    assert not any(n == "gru" for n, _ in summary.ungated_layers)
    gating = inserted_gating(model)
    gating.group_gates[0].force_(torch.tensor([True, False, True, True]))  # type: ignore[operator]
    pruned = _check_exact(model, [x, torch.randn(3, 7, 3)])
    head = pruned.get_submodule("head")
    assert isinstance(head, nn.Linear)
    assert head.in_features == 3


class _LinearViews(nn.Module):
    """Two Linear widths read through reshapes: one names the width 6 as a literal, the other
    keeps it as -1; only the first must stay whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(3, 5)
        self.head = nn.Linear(11, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.a(x)).reshape(-1, 6)  # (B, 6): literal width
        b = torch.relu(self.b(x)).view(x.shape[0], -1)  # (B, 5): computed
        return self.head(torch.cat([a, b], dim=1))


def test_literal_width_of_a_linear_output_is_rewritten() -> None:
    # before 2026-12-07 the literal 6 kept group "a" whole; now both groups are gated
    torch.manual_seed(9)
    model = _LinearViews().eval()
    x = torch.randn(4, 3)  # (B, F)
    summary = gate_(model, x)
    assert sorted(p for p, _ in summary.channel_groups) == [["a"], ["b"]]
    random_gates(model, torch.Generator().manual_seed(9), low=-6.0)
    pruned = _check_exact(model, [x, torch.randn(7, 3)])
    a = pruned.get_submodule("a")
    assert isinstance(a, nn.Linear)
    assert a.out_features < 6


class _FloatHeadBias(nn.Module):
    """batch_first encoder layers with a per-head float bias; layer 1 is left whole."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 12, 0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.register_buffer("bias", torch.randn(2, 5, 5))  # (heads, T, T)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        mask = self.bias.repeat(x.shape[0], 1, 1)  # (B * heads, T, T)
        return self.head(self.encoder(self.embed(x), mask=mask).mean(1))


@pytest.mark.xfail(
    strict=True,
    reason="PyTorch's inference fast path of nn.TransformerEncoderLayer returns NaN for a 3-D "
    "float mask; gated layers always take the slow path, but prune (gating/core.py plan) gives "
    "a layer with nothing removed back to nn.TransformerEncoderLayer, which takes the fast path",
)
def test_layer_left_whole_with_a_float_head_bias_prunes_exact() -> None:
    torch.manual_seed(8)
    model = _FloatHeadBias().eval()
    x = torch.randn(2, 5, 3)
    gate_(model, x)
    _force(model, inserted_gating(model).transformers[0][1], [True, False])  # layer 0 loses a head
    _check_exact(model, [x])
