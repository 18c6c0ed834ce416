"""gate_ on multi-query attention (one key/value head read by every query head: PaLM, Falcon,
Gemma-2B): one gate per query head, applied where a Linear reads the attention's output (a
closed query head's output is the mean of v, not zero), so a closed head loses its rows of the
query projection and its columns of the output projection; the key/value head stays whole.
Exact, cheaper (the attention products of a closed head go too), replayable; the forms it
cannot prune are left whole with a reason."""

from __future__ import annotations

import json
import math
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import (
    check_pruned,
    examples,
    inserted_gating,
    randomise_gates,
    train_under_budget,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate_hand_attention import GroupedQuery, MultiQuery, QwenStyle
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_

# how k and v reach every query head: SDPA's enable_gqa, SDPA broadcasting the one head,
# expand / repeat_interleave / Hugging Face's repeat_kv before SDPA, explicit softmax(q k^T) v
# broadcasting it, and torch.einsum with no heads index on k and v
FORMS = ["enable_gqa", "broadcast", "expand", "interleave", "hf", "matmul", "einsum"]
MASKS = ["none", "causal", "mask"]


class MQA(nn.Module):
    """Multi-query attention: ``heads`` query heads of ``head_dim``, one key/value head."""

    def __init__(
        self,
        d: int = 16,
        heads: int = 4,
        head_dim: int = 4,
        form: str = "enable_gqa",
        bias: bool = True,
        mask: str = "none",
    ) -> None:
        super().__init__()
        self.h, self.hd, self.form, self.mask = heads, head_dim, form, mask
        self.q = nn.Linear(d, heads * head_dim, bias=bias)
        self.kv = nn.Linear(d, 2 * head_dim, bias=bias)
        self.o = nn.Linear(heads * head_dim, d, bias=bias)
        self.register_buffer("tril", torch.ones(32, 32, dtype=torch.bool).tril())

    def repeat(self, t: Tensor) -> Tensor:
        """The key/value head ``(B, 1, L, D)`` as SDPA reads it."""
        b, _, s, d = t.shape
        if self.form == "expand":
            return t.expand(b, self.h, s, d)  # (B, H, L, D)
        if self.form == "interleave":
            return t.repeat_interleave(self.h, dim=1)  # (B, H, L, D)
        if self.form == "hf":  # repeat_kv with one key/value head
            t = t[:, :, None, :, :].expand(b, 1, self.h, s, d)  # (B, 1, H, L, D)
            return t.reshape(b, self.h, s, d)  # (B, H, L, D)
        return t  # (B, 1, L, D)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, L, D)
        k, v = self.kv(x).split(self.hd, dim=-1)  # (B, L, D) each
        pad = (x[:, None, None, :, 0] > 1.0).float() * -1e4  # (B, 1, 1, L) additive
        causal = self.tril.narrow(0, 0, t).narrow(1, 0, t)  # (L, L)
        if self.form == "einsum":
            s = torch.einsum("bhqd,bkd->bhqk", q, k) / math.sqrt(self.hd)  # (B, H, L, L)
        else:
            k = k.view(b, t, 1, self.hd).transpose(1, 2)  # (B, 1, L, D)
            v = v.view(b, t, 1, self.hd).transpose(1, 2)  # (B, 1, L, D)
        if self.form in ("matmul", "einsum"):
            if self.form == "matmul":
                s = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)  # (B, H, L, L)
            if self.mask == "causal":
                s = s.masked_fill(~causal, float("-inf"))
            elif self.mask == "mask":
                s = s + pad
            w = s.softmax(-1)  # (B, H, L, L)
            y = torch.einsum("bhqk,bkd->bhqd", w, v) if self.form == "einsum" else w @ v
        else:
            y = F.scaled_dot_product_attention(  # (B, H, L, D)
                q,
                self.repeat(k),
                self.repeat(v),
                attn_mask=pad if self.mask == "mask" else None,
                is_causal=self.mask == "causal",
                enable_gqa=self.form == "enable_gqa",
            )
        return cast(Tensor, self.o(y.transpose(1, 2).reshape(b, t, self.h * self.hd)))


class Block(nn.Module):
    """A pre-norm transformer block: multi-query attention and an FFN, each a residual
    branch."""

    def __init__(self, d: int, heads: int, head_dim: int, form: str, bias: bool, mask: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = MQA(d, heads, head_dim, form, bias, mask)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d, bias=bias), nn.Linear(2 * d, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Net(nn.Module):
    def __init__(
        self,
        d: int = 16,
        heads: int = 4,
        head_dim: int = 4,
        form: str = "enable_gqa",
        bias: bool = True,
        mask: str = "causal",
        n: int = 2,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.blocks = nn.Sequential(
            *(Block(d, heads, head_dim, form, bias, mask) for _ in range(n))
        )
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.head(self.norm(self.blocks(self.embed(x))).mean(1)))  # (B, 4)


def _query_groups(model: nn.Module) -> list[int]:
    """The gated groups of query heads of multi-query attention."""
    return sorted(inserted_gating(model).summary.query_heads)


def _check_lengths(model: nn.Module, pruned: nn.Module, x: Tensor, gen: torch.Generator) -> None:
    """pruned == gated (eval) at other sequence lengths and batch sizes."""
    with torch.no_grad():
        for b, t in ((1, 2), (3, x.shape[1] + 4), (2, 1)):
            xi = torch.randn(b, t, x.shape[2], generator=gen)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("form", FORMS)
def test_closed_query_heads_are_removed(form: str, bias: bool, mask: str) -> None:
    # before: left whole ("reads one key/value head for every query head (multi-query
    # attention; its heads are not pruned)"), or "contracts or keeps labelled channels" for
    # explicit matmul / einsum, "reads heads that are not all labelled alike" for expand
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 16, generator=gen)
    model = MQA(form=form, bias=bias, mask=mask).eval()
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    with torch.no_grad():
        before = model(x)
    summary = gate_(model, x)
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-5  # gates start open
    assert summary.channel_groups == [(["q"], 4)], str(summary)  # one gate per query head
    assert summary.query_heads == {0: ["o"]}
    assert summary.head_groups == [0]
    assert "heads         4  q (one gate per query head, at the input of o)" in str(summary)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert "multi-query attention: the key/value head is kept whole" in reasons["kv"]
    gating = inserted_gating(model)
    gating.group_gates[0].force_(torch.tensor([True, False, True, False]))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, lambda: MQA(form=form, bias=bias, mask=mask), (1, 3))
    _check_lengths(model, pruned, x, gen)
    q, kv, o = (cast(nn.Linear, pruned.get_submodule(n)) for n in ("q", "kv", "o"))
    assert (q.out_features, kv.out_features, o.in_features) == (8, 8, 8)
    assert (q.bias is not None) == bias
    assert q.bias is None or q.bias.shape == (8,)
    # the pruned model costs what a dense one with 2 query heads costs: q, o and the
    # attention products of the closed heads are gone
    small = gp.cost(MQA(heads=2, form=form, bias=bias, mask=mask), x)
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert isinstance(small, gp.Cost)
    assert (c.flops, c.params) == (small.flops, small.params)
    assert c.flops < dense.flops
    assert c.params < dense.params


@pytest.mark.parametrize("form", FORMS)
def test_open_gate_values_fold_into_the_output_projection(form: str) -> None:
    # gate values in (0, 1) scale each head's output: folded into o's columns, q untouched
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=gen)
    model = MQA(form=form, mask="causal")
    gate_(model, x)
    gate = inserted_gating(model).group_gates[0]
    assert isinstance(gate, HardConcreteGate)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
    model.eval()
    values = gate.eval_value()
    assert bool(((values > 0.05) & (values < 0.95)).all()), values
    q_before = model.q.weight.detach().clone()
    o_before = model.o.weight.detach().clone()
    pruned = check_pruned(model, x, gen, lambda: MQA(form=form, mask="causal"))
    q, o = cast(nn.Linear, pruned.get_submodule("q")), cast(nn.Linear, pruned.get_submodule("o"))
    assert torch.equal(q.weight, q_before)  # the queries are not gated
    scale = values.repeat_interleave(4)  # (16,) one value per head, over its 4 features
    assert torch.allclose(o.weight, o_before * scale[None, :])


@pytest.mark.parametrize("form", ["enable_gqa", "interleave", "matmul"])
@pytest.mark.parametrize("bias", [True, False])
def test_transformer_blocks_with_multi_query_attention(form: str, bias: bool) -> None:
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 3, generator=gen)

    def factory() -> Net:
        return Net(form=form, bias=bias)

    model = factory()
    summary = gate_(model, x)
    groups = _query_groups(model)
    assert len(groups) == 2, str(summary)  # each block's query heads
    assert [summary.query_heads[g] for g in groups] == [
        ["blocks.0.attn.o"],
        ["blocks.1.attn.o"],
    ]
    sites = {site for _, site, _ in summary.blocks}
    assert {"blocks.0.attn.o", "blocks.1.attn.o"} <= sites  # the attention sub-layers
    gating = inserted_gating(model)
    for gate in gating.group_gates:
        gate.force_(torch.ones(gate.n, dtype=torch.bool))  # type: ignore[operator]
    gating.group_gates[groups[0]].force_(torch.tensor([False, True, True, False]))  # type: ignore[operator]
    gating.group_gates[groups[1]].force_(torch.zeros(4, dtype=torch.bool))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, factory, (1, 3))
    _check_lengths(model, pruned, x, gen)
    o0 = cast(nn.Linear, pruned.get_submodule("blocks.0.attn.o"))
    o1 = cast(nn.Linear, pruned.get_submodule("blocks.1.attn.o"))
    assert (o0.in_features, o1.in_features) == (8, 4)  # all closed: one head kept, at 0


@pytest.mark.parametrize("form", ["enable_gqa", "hf", "einsum"])
def test_a_closed_attention_sub_layer_goes_whole(form: str) -> None:
    # the block gate of the attention branch sits after its o, with the query-head gates
    # before it: closing it removes the attention, its repeated key/value head included
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, generator=gen)
    model = Net(form=form)
    summary = gate_(model, x)
    gating = inserted_gating(model)
    block = next(i for i, (_, site, _) in enumerate(summary.blocks) if site == "blocks.1.attn.o")
    gating.group_gates[_query_groups(model)[0]].force_(torch.tensor([True, False, False, True]))  # type: ignore[operator]
    gating.block_gates[block].force_(torch.zeros(1, dtype=torch.bool))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, lambda: Net(form=form), (1, 3))
    _check_lengths(model, pruned, x, gen)
    assert not any(n.startswith("blocks.1.attn.") for n, _ in pruned.named_modules())
    o0 = cast(nn.Linear, pruned.get_submodule("blocks.0.attn.o"))
    assert o0.in_features == 8


@pytest.mark.parametrize("form", ["interleave", "hf", "expand"])
def test_plan_rewrites_the_repeated_head_count(form: str) -> None:
    # the key/value head repeated for 4 query heads is repeated for the 3 kept ones
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 16, generator=gen)
    model = MQA(form=form)
    gate_(model, x)
    inserted_gating(model).group_gates[0].force_(torch.tensor([True, True, False, True]))  # type: ignore[operator]
    model.eval()
    plan = json.loads(json.dumps(export_plan(model)))
    sizes = plan["sizes"]
    if form == "interleave":
        assert sizes["repeat_interleave"] == [["repeats", 3]]
        assert sizes["repeat_interleave_1"] == [["repeats", 3]]
    elif form == "expand":
        assert sizes["expand"] == [[-3, 3]]
    else:
        assert sizes["expand"] == [[-3, 3]]  # (B, 1, H, L, D)
        assert sizes["reshape"] == [[-3, 3]]  # (B, H, L, D)
    fresh = apply_plan(MQA(form=form), plan)
    pruned = gp.prune(model)
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    _check_lengths(model, fresh, x, gen)
    broken = {k: v for k, v in plan.items() if k != "checksum"}
    node = next(iter(sizes))
    with pytest.raises(ValueError, match="malformed plan: 'sizes' entry"):
        apply_plan(MQA(form=form), {**broken, "sizes": {**sizes, node: [["repeat", 3]]}})


@pytest.mark.parametrize("form", ["interleave", "hf", "literal", "enable_gqa"])
def test_grouped_query_attention_with_one_key_value_head(form: str) -> None:
    # the GQA forms with a single key/value head are multi-query attention
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 16, generator=gen)

    def factory() -> GroupedQuery:
        torch.manual_seed(5)
        return GroupedQuery(form, kv=1)

    model = factory()
    summary = gate_(model, x)
    assert len(summary.query_heads) == 1, str(summary)
    randomise_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory, (1, 3))
    _check_lengths(model, pruned, x, gen)


@pytest.mark.parametrize("sdpa", [True, False])
def test_qk_norm_and_rope_with_one_key_value_head(sdpa: bool) -> None:
    # QK-norm and RoPE act on single heads: fine before the attention
    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 16, generator=gen)

    def factory() -> QwenStyle:
        torch.manual_seed(6)
        return QwenStyle(sdpa, kv=1)

    model = factory()
    with torch.no_grad():
        model.q_norm.weight.normal_(1.0, 0.3, generator=gen)
    summary = gate_(model, x)
    assert len(summary.query_heads) == 1, str(summary)
    gi = next(iter(summary.query_heads))
    inserted_gating(model).group_gates[gi].force_(torch.tensor([False, True, True, False]))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, factory, (1, 3))
    assert cast(nn.Linear, pruned.get_submodule("q")).out_features == 8


def test_the_old_multi_query_example_is_gated() -> None:
    # test_gate_hand_attention's MultiQuery (k, v unbound from one fused view) was left whole
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 8, generator=gen)
    model = MultiQuery()
    summary = gate_(model, x)
    assert summary.query_heads == {0: ["o"]}, str(summary)
    assert summary.channel_groups[0] == (["q"], 2)
    inserted_gating(model).group_gates[0].force_(torch.tensor([False, True]))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, MultiQuery, (1, 3))
    assert cast(nn.Linear, pruned.get_submodule("o")).in_features == 4


class QueryByConv(MQA):
    """The queries from a 1x1 convolution: not a Linear the gate can leave ungated."""

    def __init__(self) -> None:
        super().__init__()
        self.qc = nn.Conv1d(16, 16, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.qc(x.transpose(1, 2)).transpose(1, 2)  # (B, L, 16)
        q = q.reshape(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, L, D)
        k, v = self.kv(x).view(b, t, 2, 1, self.hd).transpose(1, 3).unbind(2)  # (B, 1, L, D)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
        return cast(Tensor, self.o(y.transpose(1, 2).reshape(b, t, 16)))


class QueriesReadElsewhere(MQA):
    """The query projection's output also added to the result (not gated anywhere)."""

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        qs = self.q(x)  # (B, L, 16)
        q = qs.view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, L, D)
        k, v = self.kv(x).view(b, t, 2, 1, self.hd).transpose(1, 3).unbind(2)  # (B, 1, L, D)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # (B, H, L, D)
        return cast(Tensor, self.o(y.transpose(1, 2).reshape(b, t, 16))) + qs


class MaskPerHead(MQA):
    """A mask that differs per query head (it would have to be sliced)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, L, D)
        k, v = self.kv(x).view(b, t, 2, 1, self.hd).transpose(1, 3).unbind(2)  # (B, 1, L, D)
        mask = self.bias.expand(b, self.h, t, t)  # (B, H, L, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, D)
        return cast(Tensor, self.o(y.transpose(1, 2).reshape(b, t, 16)))


class NoOutputLinear(MQA):
    """The heads merged and returned: no Linear to gate them at."""

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, L, D)
        k, v = self.kv(x).view(b, t, 2, 1, self.hd).transpose(1, 3).unbind(2)  # (B, 1, L, D)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
        return y.transpose(1, 2).reshape(b, t, 16)


class SharedRepeat(MQA):
    """One repeat of the key/value head read by two attentions with their own queries: its
    head count cannot follow both."""

    def __init__(self) -> None:
        super().__init__()
        self.q2, self.o2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, L, D)
        q2 = self.q2(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, L, D)
        k, v = self.kv(x).view(b, t, 2, 1, self.hd).transpose(1, 3).unbind(2)  # (B, 1, L, D)
        k, v = k.expand(b, self.h, t, self.hd), v.expand(b, self.h, t, self.hd)  # (B, H, L, D)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, L, H, D)
        y2 = F.scaled_dot_product_attention(q2, k, v).transpose(1, 2)  # (B, L, H, D)
        return cast(Tensor, self.o(y.reshape(b, t, 16)) + self.o2(y2.reshape(b, t, 16)))


@pytest.mark.parametrize(
    ("factory", "name", "reason"),
    [
        (SharedRepeat, "q2", "repeats for the heads of another attention too"),
        (QueryByConv, "qc", "(multi-query attention) and queries not computed by Linear layers"),
        (QueriesReadElsewhere, "q", "carries query heads of multi-query attention, gated only"),
        (MaskPerHead, "q", "(attention) reads a mask per head"),
        (NoOutputLinear, "q", "where a Linear reads the attention's output, and node 'output'"),
    ],
)
def test_forms_left_whole_with_a_reason(factory: type[nn.Module], name: str, reason: str) -> None:
    torch.manual_seed(8)
    gen = torch.Generator().manual_seed(8)
    model = factory()
    x = torch.randn(2, 5, 16, generator=gen)
    with torch.no_grad():
        before = model(x)
    summary = gate_(model, x, blocks=False)
    assert summary.n_gates == 0, str(summary)  # the heads are left whole
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert reason in reasons[name], reasons
    pruned = check_pruned(model, x, gen)
    with torch.no_grad():
        assert (pruned(x) - before).abs().max().item() <= 1e-5


class TwoReaders(MQA):
    """Scaled queries unflattened into heads, the output read by two Linears after dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.o2, self.drop = nn.Linear(16, 16), nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = (self.q(x) * 0.5).unflatten(-1, (self.h, self.hd)).transpose(1, 2)  # (B, H, L, D)
        k, v = self.kv(x).view(b, t, 2, 1, self.hd).transpose(1, 3).unbind(2)  # (B, 1, L, D)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # (B, H, L, D)
        y = self.drop(y.transpose(1, 2).flatten(2))  # (B, L, 16)
        return cast(Tensor, self.o(y) * self.o2(y))


class KeysPerHead(MQA):
    """Keys per head (pruned with the queries), one value head shared by all."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, L, D)
        k = self.k(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, L, D)
        v = self.kv(x)[..., None, : self.hd].transpose(1, 2)  # (B, 1, L, D)
        w = (q @ k.transpose(-2, -1)).softmax(-1)  # (B, H, L, L)
        return cast(Tensor, self.o((w @ v).transpose(1, 2).reshape(b, t, 16)))


class EagerCast(MQA):
    """Hugging Face's eager attention: softmax in float32 cast back with ``.to(q.dtype)``, the
    weights moved to ``q.device``; reading the dtype and device of the query heads is harmless
    (before 2026-12-07 the heads were left whole: "node 'getattr_1' ... reads them")."""

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, L, D)
        k, v = self.kv(x).split(self.hd, dim=-1)  # (B, L, D) each
        k = k.view(b, t, 1, self.hd).transpose(1, 2)  # (B, 1, L, D)
        v = v.view(b, t, 1, self.hd).transpose(1, 2)  # (B, 1, L, D)
        s = (q @ k.transpose(2, 3)) / math.sqrt(self.hd)  # (B, H, L, L)
        w = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, L, L)
        w = w.to(q.device)  # (B, H, L, L)
        return cast(Tensor, self.o((w @ v).transpose(1, 2).reshape(b, t, 16)))


@pytest.mark.parametrize(
    ("factory", "producers", "readers"),
    [
        (TwoReaders, ["q"], ["o", "o2"]),
        (KeysPerHead, ["q", "k"], ["o"]),
        (EagerCast, ["q"], ["o"]),
    ],
)
def test_other_gated_forms(
    factory: type[nn.Module], producers: list[str], readers: list[str]
) -> None:
    torch.manual_seed(10)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 5, 16, generator=gen)
    model = factory()
    summary = gate_(model, x)
    assert summary.query_heads == {0: readers}, str(summary)
    assert summary.channel_groups[0] == (producers, 4)
    inserted_gating(model).group_gates[0].force_(torch.tensor([False, True, False, True]))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, factory, (1, 3))
    _check_lengths(model, pruned, x, gen)
    for name in [*producers, *readers]:
        m = cast(nn.Linear, pruned.get_submodule(name))
        assert (m.in_features if name in readers else m.out_features) == 8


def test_budget_training_prunes_query_heads() -> None:
    torch.manual_seed(9)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(8, 6, 3, generator=gen)
    model = Net(form="interleave", mask="causal")
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    gate_(model, x, blocks=False)  # query heads and FFN units only
    budget = gp.Budget(model, x, flops=0.4, warmup_steps=5)
    gating = inserted_gating(model)
    heads = [gating.group_gates[g] for g in _query_groups(model)]
    assert len(heads) == 2
    starts = [cast(HardConcreteGate, g).log_alpha.detach().clone() for g in heads]
    train_under_budget(
        model,
        budget,
        40,
        lambda: (torch.randn(8, 6, 3, generator=gen), torch.randint(0, 4, (8,), generator=gen)),
    )
    for gate, start in zip(heads, starts, strict=True):  # trained, the budget among others
        assert isinstance(gate, HardConcreteGate)
        assert not torch.equal(gate.log_alpha.detach(), start)
    pruned = check_pruned(model, x[:2], gen, lambda: Net(form="interleave", mask="causal"))
    _check_lengths(model, pruned, x, gen)
    kept = [cast(nn.Linear, pruned.get_submodule(f"blocks.{i}.attn.o")).in_features for i in (0, 1)]
    assert min(kept) < 16  # query heads were pruned (4 features each)
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert c.flops < 0.8 * dense.flops


@settings(max_examples=examples(20), deadline=None)
@given(
    heads=st.integers(2, 5),
    head_dim=st.integers(2, 4),
    form=st.sampled_from(FORMS),
    bias=st.booleans(),
    mask=st.sampled_from(MASKS),
    blocks=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_multi_query_attention_and_gate_states_prune_exactly(
    heads: int, head_dim: int, form: str, bias: bool, mask: str, blocks: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    d = 8

    def factory() -> nn.Module:
        torch.manual_seed(seed)
        if blocks:
            return Net(d, heads, head_dim, form, bias, mask, n=2)
        return MQA(d, heads, head_dim, form, bias, mask)

    x = torch.randn(2, 5, 3 if blocks else d, generator=gen)
    model = factory()
    summary = gate_(model, x)
    groups = _query_groups(model)
    assert len(groups) == (2 if blocks else 1), str(summary)
    assert all(summary.channel_groups[g][1] == heads for g in groups)
    randomise_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory, (1, 3))
    _check_lengths(model, pruned, x, gen)
    opens = inserted_gating(model).hard_open()
    for g in groups:
        (name,) = summary.query_heads[g]
        try:
            o = pruned.get_submodule(name)
        except AttributeError:  # its attention sub-layer was removed
            assert blocks
            continue
        assert isinstance(o, nn.Linear)
        assert o.in_features == int(opens[g].sum().item()) * head_dim
