"""cost() of plain modules against hand-computed counts: pooling, attention, embeddings, errors."""

from __future__ import annotations

import pytest
import torch
from gating_helpers import gate_all_open
from torch import Tensor, nn

import gatedprune
from gatedprune.costs import Cost, cost
from gatedprune.gating import gate_


def _plain(m: nn.Module, x: object) -> Cost:
    c = cost(m, x)
    assert isinstance(c, Cost)
    return c


# (module, batched input shape, FLOPs per (batch) sample): 1 per input element in each window
POOLS: list[tuple[nn.Module, tuple[int, ...], int]] = [
    (nn.MaxPool1d(3), (4, 12), 4 * 4 * 3),  # out (4, 4), window 3
    (nn.AvgPool1d(3), (4, 12), 4 * 4 * 3),
    (nn.AvgPool1d(3, stride=1), (4, 12), 4 * 10 * 3),
    (nn.MaxPool2d(2), (4, 6, 6), 4 * 9 * 4),  # out (4, 3, 3), window 2x2
    (nn.MaxPool2d((2, 3)), (4, 6, 6), 4 * 6 * 6),  # out (4, 3, 2), window 2x3
    (nn.AvgPool2d(2), (4, 6, 6), 4 * 9 * 4),
    (nn.AdaptiveAvgPool1d(5), (4, 12), 4 * 16),  # windows 3+3+4+3+3 = 16
    (nn.AdaptiveMaxPool1d(5), (4, 12), 4 * 16),
    (nn.AdaptiveAvgPool2d((4, 3)), (4, 6, 6), 4 * 8 * 6),  # H 2+2+2+2, W 2+2+2
    (nn.AdaptiveMaxPool2d((4, 3)), (4, 6, 6), 4 * 8 * 6),
    (nn.AdaptiveAvgPool2d(1), (4, 6, 6), 4 * 36),
]


def _pool_id(case: tuple[nn.Module, tuple[int, ...], int]) -> str:
    return f"{type(case[0]).__name__}-{'x'.join(map(str, case[1]))}"


@pytest.mark.parametrize(("m", "shape", "per_sample"), POOLS, ids=[_pool_id(c) for c in POOLS])
def test_pooling_counts_batched_and_unbatched(
    m: nn.Module, shape: tuple[int, ...], per_sample: int
) -> None:
    assert _plain(m, torch.randn(*shape)) == Cost(per_sample, 0)  # unbatched
    assert _plain(m, torch.randn(1, *shape)) == Cost(per_sample, 0)
    assert _plain(m, torch.randn(3, *shape)) == Cost(3 * per_sample, 0)


@pytest.mark.parametrize(
    ("m", "shape", "flops"),
    [
        (nn.MaxPool1d(2, return_indices=True), (1, 3, 8), 3 * 4 * 2),
        (nn.MaxPool2d(2, return_indices=True), (1, 3, 8, 8), 3 * 16 * 4),
        (nn.AdaptiveMaxPool1d(3, return_indices=True), (1, 4, 12), 4 * 12),
        (nn.AdaptiveMaxPool2d((2, 3), return_indices=True), (3, 6, 6), 3 * 6 * 6),  # unbatched
    ],
    ids=["MaxPool1d", "MaxPool2d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d-unbatched"],
)
def test_pooling_with_indices_counts_as_plain_pool(
    m: nn.Module, shape: tuple[int, ...], flops: int
) -> None:
    assert _plain(m, torch.randn(*shape)) == Cost(flops, 0)


class SelfAttention(nn.Module):
    def __init__(self, m: nn.MultiheadAttention) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: Tensor) -> Tensor:
        return self.m(x, x, x)[0]


@pytest.mark.parametrize(
    ("bias_kv", "zero_attn"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_attention_counts_bias_kv_and_zero_attn_positions(bias_kv: bool, zero_attn: bool) -> None:
    e, h, b, n = 8, 2, 3, 5
    m = nn.MultiheadAttention(e, h, batch_first=True, add_bias_kv=bias_kv, add_zero_attn=zero_attn)
    keys = n + int(bias_kv) + int(zero_attn)
    t = b * n
    flops = (
        2 * 3 * t * e * e  # q, k, v projections
        + 3 * t * e  # their biases
        + 2 * 2 * b * n * keys * e  # q k^T and weights @ v over the keys
        + b * h * n * keys  # softmax
        + 2 * t * e * e  # output projection
        + t * e  # its bias
    )
    params = 3 * e * e + 3 * e + e * e + e + (2 * e if bias_kv else 0)
    assert sum(p.numel() for p in m.parameters()) == params
    assert _plain(SelfAttention(m), torch.randn(b, n, e)) == Cost(flops, params)


def test_ungated_attention_with_bias_kv_keeps_its_cost_after_gate_() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.att = nn.MultiheadAttention(
                8, 2, batch_first=True, add_bias_kv=True, add_zero_attn=True
            )
            self.out = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            y = torch.relu(self.inp(x))
            return self.out(self.att(y, y, y)[0].mean(1))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 5, 3)
    # inp 2*10*8*3 + 80; attention 7140 over 5 keys + 2 extra keys * (2*2*2*5*8 + 2*2*5);
    # out 2*2*2*8 + 4
    expected = Cost(560 + 7140 + 2 * 340 + 68, 32 + 304 + 18)
    assert _plain(model, x) == expected
    gate_(model, x)
    c = cost(model, x, hard=True)
    assert not isinstance(c, Cost)
    assert c.detach() == expected


class TextNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.fc(h[:, -1])


def test_embedding_is_a_free_lookup_with_its_table_as_parameters() -> None:
    tokens = torch.randint(0, 20, (2, 5))
    assert _plain(nn.Embedding(20, 6), tokens) == Cost(0, 20 * 6)
    torch.manual_seed(0)
    model = TextNet().eval()
    lstm_step = 2 * 4 * 8 * (6 + 8) + 13 * 8 + 2 * 4 * 8
    expected = Cost(2 * 5 * lstm_step + 2 * 2 * 3 * 8 + 2 * 3, 120 + 4 * 8 * (6 + 8) + 64 + 27)
    assert _plain(model, tokens) == expected
    gate_(model, tokens)  # failed: no cost handler for nn.Embedding
    c = cost(model, tokens, hard=True)
    assert not isinstance(c, Cost)
    assert c.detach() == expected  # gates start open


def test_embedding_bag_counts_every_row_read() -> None:
    for mode in ("sum", "mean", "max"):
        m = nn.EmbeddingBag(10, 5, mode=mode)
        assert _plain(m, torch.randint(0, 10, (3, 4))) == Cost(3 * 4 * 5, 50)
    padded = nn.EmbeddingBag(10, 5, mode="mean", padding_idx=0)
    idx = torch.tensor([[0, 1, 2, 3], [4, 0, 5, 6], [7, 8, 9, 1]])
    assert _plain(padded, idx) == Cost((12 - 2) * 5, 50)

    class Bags(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(10, 5, mode="sum")

        def forward(self, x: Tensor) -> Tensor:
            return self.bag(x, torch.tensor([0, 3]))

    assert _plain(Bags(), torch.tensor([1, 2, 3, 4, 5, 6, 7])) == Cost(7 * 5, 50)


def test_cost_of_a_non_module_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module, got str"):
        cost("x", torch.zeros(1, 3))  # type: ignore[arg-type]


def test_empty_sequential_is_an_identity() -> None:
    assert _plain(nn.Sequential(), torch.zeros(2, 3)) == Cost(0, 0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(), nn.ReLU())
    assert _plain(net, torch.zeros(2, 3)) == Cost(2 * 2 * 4 * 3 + 8 + 8, 16)


def test_floating_input_of_another_dtype_is_a_value_error() -> None:
    x64 = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"torch\.float64.*torch\.float32"):
        cost(nn.Linear(3, 2), x64)
    net = gatedprune.ShortcutMLP(3, [4], 2)  # a gated module
    with pytest.raises(ValueError, match=r"torch\.float64.*torch\.float32"):
        cost(net, x64)
    with pytest.raises(ValueError, match=r"torch\.float64.*torch\.float32"):
        gatedprune.Budget(net, x64, flops=0.5)
    inserted = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    gate_(inserted, torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"torch\.float64.*torch\.float32"):
        cost(inserted, x64)
    # legal: matching dtypes, integer inputs, models without floating parameters
    assert _plain(nn.Linear(3, 2).double(), x64) == Cost(2 * 2 * 3 + 2, 8)
    assert _plain(nn.ReLU(), x64) == Cost(3, 0)
    assert _plain(nn.Embedding(5, 2), torch.tensor([[1, 2]])) == Cost(0, 10)


@pytest.mark.parametrize(
    "act", [nn.Hardtanh(), nn.Hardtanh(-2.0, 0.5), nn.ReLU6()], ids=["hardtanh", "range", "relu6"]
)
def test_hardtanh_and_relu6_cost_one_flop_per_element_like_relu(act: nn.Module) -> None:
    x = torch.randn(2, 3, 5)  # (B, T, 5)
    assert _plain(act, x) == _plain(nn.ReLU(), x) == Cost(30, 0)
    net = nn.Sequential(nn.Linear(5, 4), act, nn.Linear(4, 2))
    dense = _plain(net, x)
    assert dense == Cost(2 * 6 * 4 * 5 + 24 + 24 + 2 * 6 * 2 * 4 + 12, 24 + 10)
    gate_all_open(net, x)  # a gated model counts it the same way
    expected = cost(net, x)
    assert not isinstance(expected, Cost)
    assert expected.detach() == dense


def test_root_gated_module_with_a_packed_input_is_named_in_the_error() -> None:
    net = gatedprune.ShortcutLSTM(2, 4, 2, 3)
    packed = nn.utils.rnn.pack_padded_sequence(
        torch.randn(2, 5, 2), torch.tensor([5, 3]), batch_first=True
    )  # data (8, 2)
    with pytest.raises(TypeError, match=r"^gated module ShortcutLSTM must take a tensor input"):
        cost(net, packed)


def _attn(b: int, lq: int, lkv: int, e: int, h: int) -> int:
    """Hand count of biased ``nn.MultiheadAttention(e, h)``: ``b`` batches, ``lq`` queries over
    ``lkv`` keys."""
    return (
        2 * e * e * (b * lq + 2 * b * lkv)  # q, k, v projections
        + b * (lq + 2 * lkv) * e  # their biases
        + 2 * 2 * b * lq * lkv * e  # q k^T and weights @ v
        + b * h * lq * lkv  # softmax
        + 2 * b * lq * e * e  # output projection
        + b * lq * e  # its bias
    )


def _ffn(tokens: int, e: int, hidden: int) -> int:
    """linear1 and its bias, the activation, linear2 (its bias added by the caller)."""
    return 2 * tokens * e * hidden + tokens * hidden + tokens * hidden + 2 * tokens * hidden * e


def _dec_layer(b: int, t: int, s: int, e: int, h: int, hidden: int) -> int:
    tokens = b * t
    return (
        _attn(b, t, t, e, h)  # self-attention over tgt
        + _attn(b, t, s, e, h)  # cross-attention: tgt queries over s memory positions
        + _ffn(tokens, e, hidden)
        + tokens * e  # linear2 bias
        + 3 * 5 * tokens * e  # three LayerNorms
    )


def _enc_layer(b: int, s: int, e: int, h: int, hidden: int) -> int:
    tokens = b * s
    return _attn(b, s, s, e, h) + _ffn(tokens, e, hidden) + tokens * e + 2 * 5 * tokens * e


class WithMemory(nn.Module):
    """Calls ``dec(x, memory)`` with a fixed memory of another length than ``x``."""

    def __init__(self, dec: nn.Module, memory: Tensor) -> None:
        super().__init__()
        self.dec = dec
        self.register_buffer("memory", memory)

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(x, self.memory)  # type: ignore[no-any-return]


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_decoder_layer_counts_self_and_cross_attention_ffn_and_three_norms(
    norm_first: bool, batch_first: bool
) -> None:
    e, h, hidden, b, t, s = 8, 2, 12, 2, 5, 7
    layer = nn.TransformerDecoderLayer(
        e, h, hidden, 0.0, batch_first=batch_first, norm_first=norm_first
    )

    def seq(n: int) -> Tensor:
        return torch.randn(b, n, e) if batch_first else torch.randn(n, b, e)

    params = sum(p.numel() for p in layer.parameters())
    assert params == 2 * (4 * e * e + 4 * e) + 2 * e * hidden + hidden + e + 3 * 2 * e
    flops = _dec_layer(b, t, s, e, h, hidden)
    for mode in ("eval", "train"):  # train: slow path; eval + no_grad: MHA fast path
        model = WithMemory(layer, seq(s)).train(mode == "train")
        assert _plain(model, seq(t)) == Cost(flops, params)
    # unbatched (T, E) tgt with (S, E) memory
    unbatched = WithMemory(layer, torch.randn(s, e))
    assert _plain(unbatched, torch.randn(t, e)) == Cost(_dec_layer(1, t, s, e, h, hidden), params)
    # the stack: two layers and a final LayerNorm
    stack = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(e))
    expected = Cost(2 * flops + 5 * b * t * e, 2 * params + 2 * e)
    assert _plain(WithMemory(stack, seq(s)), seq(t)) == expected


def test_decoder_layer_memory_by_keyword_costs_as_positional() -> None:
    # before 2026-12-07 23:50 UTC a TypeError ("positional tgt, memory")
    class Call(nn.Module):
        def __init__(self, keyword: bool) -> None:
            super().__init__()
            self.keyword = keyword
            self.dec = nn.TransformerDecoderLayer(8, 2, 12, 0.0, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            if self.keyword:
                return self.dec(tgt=x, memory=x)  # type: ignore[no-any-return]
            return self.dec(x, x)  # type: ignore[no-any-return]

    x = torch.randn(2, 5, 8)
    kw, pos = cost(Call(True), x), cost(Call(False), x)
    assert (kw.flops, kw.params) == (pos.flops, pos.params)
    assert kw.flops > 0


class Seq2Seq(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.t = nn.Transformer(
            8,
            2,
            num_encoder_layers=2,
            num_decoder_layers=1,
            dim_feedforward=12,
            dropout=0.0,
            batch_first=batch_first,
        )
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, S + T, E) or (S + T, B, E); the first 7 positions are the source
        src, tgt = (x[:, :7], x[:, 7:]) if self.batch_first else (x[:7], x[7:])
        return self.t(src, tgt)  # type: ignore[no-any-return]


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_counts_encoder_and_decoder_stacks(batch_first: bool) -> None:
    e, h, hidden, b, s, t = 8, 2, 12, 2, 7, 4
    model = Seq2Seq(batch_first)
    x = torch.randn(b, s + t, e) if batch_first else torch.randn(s + t, b, e)
    flops = (
        2 * _enc_layer(b, s, e, h, hidden)
        + 5 * b * s * e  # encoder norm
        + _dec_layer(b, t, s, e, h, hidden)
        + 5 * b * t * e  # decoder norm
    )
    params = sum(p.numel() for p in model.parameters())
    assert _plain(model, x) == Cost(flops, params)
    assert _plain(model.train(), x) == Cost(flops, params)


def test_decoder_stack_with_unknown_layers_counts_its_submodules() -> None:
    class Mixer(nn.Module):  # not a TransformerDecoderLayer: counted leaf by leaf
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)

        def forward(self, x: Tensor, memory: Tensor, **kwargs: object) -> Tensor:
            return self.fc(x + memory.mean(1, keepdim=True))  # type: ignore[no-any-return]

    stack = nn.TransformerDecoder(Mixer(), 2)  # type: ignore[arg-type]
    x = torch.randn(2, 5, 8)
    params = sum(p.numel() for p in stack.parameters())
    assert _plain(WithMemory(stack, torch.randn(2, 3, 8)), x) == Cost(
        2 * (2 * 10 * 64 + 80), params
    )


class PaddedEncoder(nn.Module):
    """``nn.TransformerEncoder`` with the default ``enable_nested_tensor=True``."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 12, 0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        kpm = torch.zeros(2, 5, dtype=torch.bool)
        kpm[0, -2:] = True
        self.register_buffer("kpm", kpm if masked else None)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.embed(x), src_key_padding_mask=self.kpm)[:, 0])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_encoder_with_padding_mask_counts_the_padded_length() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    masked, unmasked = PaddedEncoder(True).eval(), PaddedEncoder(False).eval()
    assert masked.enc.use_nested_tensor  # eval + mask + no grad: the nested fast path
    # embed 2*10*8*3 + 80; two layers on 2 x 5 tokens; head 2*2*2*8 + 4
    expected = Cost(560 + 2 * _enc_layer(2, 5, 8, 2, 12) + 68, 32 + 2 * 532 + 18)
    assert _plain(masked, x) == expected
    assert _plain(unmasked, x) == expected
    assert masked.enc.use_nested_tensor  # switched back on after counting
    with torch.no_grad():  # and the model still runs its nested fast path
        masked(x)


def test_an_uncalled_gated_module_is_refused_not_left_out() -> None:
    """Its parameters were in neither part of the cost (the gated part counts what the forward
    ran), while prune prunes it by its gates: cost(hard=True) said 52 parameters, cost of the
    pruned model 104."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = gatedprune.ShortcutMLP(4, [6], 2), gatedprune.ShortcutMLP(4, [6], 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)  # (B, 2)

    model, x = TwoHeads().eval(), torch.randn(2, 4)
    for call in (
        lambda: gatedprune.cost(model, x, hard=True),
        lambda: gatedprune.cost(model, x),
        lambda: gatedprune.Budget(model, x, flops=0.5),
    ):
        with pytest.raises(ValueError, match=r"gated module b \(ShortcutMLP\) is not called"):
            call()
    model.b = gatedprune.prune(model.b)  # pruned first: a plain module, counted as such
    hard = gatedprune.cost(model, x, hard=True)
    assert float(hard.params) == gatedprune.cost(gatedprune.prune(model), x).params


class _TransformerParts(nn.Module):
    """Calls the encoder and decoder of an ``nn.Transformer`` on their own (never ``self.t``
    itself), as seq2seq code that caches the memory does."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Transformer(
            8,
            2,
            num_encoder_layers=2,
            num_decoder_layers=1,
            dim_feedforward=12,
            dropout=0.0,
            batch_first=True,
        )
        self.head = nn.Linear(8, 3)

    def forward(self, src: Tensor) -> Tensor:
        memory = self.t.encoder(src)  # (B, S, 8)
        return self.head(self.t.decoder(src[:, :3], memory))  # (B, 3, 3)


def test_parts_of_a_transformer_called_on_their_own_are_counted() -> None:
    # before 2026-12-08 00:35 UTC the parts of a module counted whole (nn.Transformer) were
    # not hooked, so calling them without it counted nothing for them (8590 against 25110
    # FLOPs for the encoder alone), and cost(prune(gated)) differed from the gated hard cost
    model = _TransformerParts().eval()
    x = torch.randn(2, 5, 8)
    enc, dec, head = model.t.encoder, model.t.decoder, model.head
    with torch.no_grad():
        memory = enc(x)
    parts = [cost(enc, x), cost(_Decode(dec, memory), x[:, :3]), cost(head, torch.zeros(2, 3, 8))]
    got = cost(model, x)
    assert got.flops == sum(c.flops for c in parts)
    assert got.params == sum(p.numel() for p in model.parameters())


class _Decode(nn.Module):
    def __init__(self, dec: nn.Module, memory: Tensor) -> None:
        super().__init__()
        self.dec, self.memory = dec, memory

    def forward(self, tgt: Tensor) -> Tensor:
        return self.dec(tgt, self.memory)  # type: ignore[no-any-return]


def test_gated_encoder_of_a_transformer_costs_as_its_pruned_model() -> None:
    model = _TransformerParts().eval()
    x = torch.randn(2, 5, 8)
    gate_(model, x)
    hard = cost(model, x, hard=True)
    pruned = cost(gatedprune.prune(model), x)
    assert (pruned.flops, pruned.params) == (float(hard.flops), float(hard.params))
