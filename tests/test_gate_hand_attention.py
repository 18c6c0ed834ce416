"""gate_ on hand-written attention (q, k, v Linears or one fused projection, heads by a view,
``softmax(q k^T) v`` or ``F.scaled_dot_product_attention``): heads are gated and pruned whole,
the pruned code's head counts rewritten; exact, cheaper, replayable; and the forms it cannot
prune are left ungated with a reason."""

from __future__ import annotations

import json
import math
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import examples, inserted_gating, train_under_budget
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_

FUSED = ["no", "split", "split_c", "sections", "chunk", "timm"]


class Attention(nn.Module):
    """Causal self-attention written by hand, in the forms models use: separate q, k, v
    Linears (``fused="no"``) or one projection split (``"split"`` by the attribute ``d``,
    ``"split_c"`` by the input's width ``c`` read from ``x.size()``, or into equal
    ``"sections"``), chunked (``"chunk"``) or
    reshaped into ``(3, heads, head size)`` and unbound (``"timm"``, as timm's ViT);
    explicit ``softmax(q k^T / sqrt(D)) v`` with a mask buffer and dropout, or SDPA."""

    def __init__(self, d: int, heads: int, fused: str, sdpa: bool) -> None:
        super().__init__()
        self.heads, self.d, self.fused, self.sdpa = heads, d, fused, sdpa
        if fused == "no":
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        else:
            self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)
        self.register_buffer("mask", torch.ones(32, 32, dtype=torch.bool).tril())

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.size()
        if self.fused == "timm":  # timm's ViT: one reshape into (3, heads, head size)
            qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads)  # (B, T, 3, H, D)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each
        else:
            if self.fused == "no":
                q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, C) each
            elif self.fused == "split":
                q, k, v = self.qkv(x).split(self.d, dim=2)
            elif self.fused == "split_c":  # nanoGPT-like, with the width read from x
                q, k, v = self.qkv(x).split(c, dim=2)
            elif self.fused == "sections":
                q, k, v = self.qkv(x).split([self.d, self.d, self.d], dim=-1)
            else:
                q, k, v = self.qkv(x).chunk(3, dim=-1)
            q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, H, T, D)
            k = k.reshape(b, t, self.heads, -1).permute(0, 2, 1, 3)  # (B, H, T, D)
            v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, H, T, D)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T)
            mask = self.mask.narrow(0, 0, t).narrow(1, 0, t)
            att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att.float(), dim=-1).type_as(q)
            y = torch.matmul(self.drop(att), v)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, fused: str, sdpa: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, fused, sdpa)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, d: int, heads: int, fused: str, sdpa: bool, n: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.blocks = nn.Sequential(*(Block(d, heads, fused, sdpa) for _ in range(n)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))  # (B, 4)


def _head_groups(model: nn.Module, heads: int) -> list[int]:
    """Indices of the gated groups with one gate per head (the attention projections)."""
    summary = inserted_gating(model).summary
    return [
        i
        for i, (producers, size) in enumerate(summary.channel_groups)
        if size == heads and any("attn" in p for p in producers)
    ]


def _check(model: nn.Module, factory: object, x: Tensor, gen: torch.Generator) -> nn.Module:
    model.eval()
    hard = gp.cost(model, x, hard=True)
    pruned = gp.prune(model)
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert (c.flops, c.params) == (float(hard.flops), float(hard.params))
    with torch.no_grad():
        for t in (x.shape[1], x.shape[1] + 3):  # another sequence length too
            xi = torch.randn(x.shape[0], t, x.shape[2], generator=gen)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    plan = json.loads(json.dumps(export_plan(model)))
    assert callable(factory)
    fresh = apply_plan(factory(), plan)
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        xi = torch.randn(*x.shape, generator=gen)
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5
    return pruned


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("sdpa", [False, True])
def test_closed_heads_are_removed(fused: str, sdpa: bool) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=gen)
    model = GPT(16, 4, fused, sdpa).eval()
    dense = gp.cost(model, x)
    assert isinstance(dense, Cost)
    summary = gate_(model, x)
    gating = inserted_gating(model)
    groups = _head_groups(model, 4)
    assert len(groups) == 2  # one head group per attention, 4 gates each
    assert summary.head_groups == groups
    assert str(summary).count("(one gate per head)") == 2
    for gate in gating.group_gates:
        gate.force_(torch.ones(gate.n, dtype=torch.bool))  # type: ignore[operator]
    gating.group_gates[groups[0]].force_(torch.tensor([True, False, True, False]))  # type: ignore[operator]
    gating.group_gates[groups[1]].force_(torch.zeros(4, dtype=torch.bool))  # type: ignore[operator]
    pruned = _check(model, lambda: GPT(16, 4, fused, sdpa), x, gen)
    a0, a1 = pruned.get_submodule("blocks.0.attn"), pruned.get_submodule("blocks.1.attn")
    proj0, proj1 = a0.get_submodule("proj"), a1.get_submodule("proj")
    assert isinstance(proj0, nn.Linear)
    assert isinstance(proj1, nn.Linear)
    assert proj0.in_features == 8  # 2 heads of 4 kept
    assert proj1.in_features == 4  # all closed: one head kept (zero), as a channel group
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert c.params < dense.params
    assert c.flops < dense.flops


@settings(max_examples=examples(20), deadline=None)
@given(
    heads=st.integers(2, 4),
    head_dim=st.integers(2, 3),
    fused=st.sampled_from(FUSED),
    sdpa=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_attention_and_gate_states_prune_exactly(
    heads: int, head_dim: int, fused: str, sdpa: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    d = heads * head_dim
    x = torch.randn(2, 5, 3, generator=gen)
    model = GPT(d, heads, fused, sdpa)
    gate_(model, x)
    gating = inserted_gating(model)
    assert len(_head_groups(model, heads)) == 2  # both attentions' heads gated
    with torch.no_grad():
        for gate in [*gating.group_gates, *gating.block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)
    _check(model, lambda: GPT(d, heads, fused, sdpa), x, gen)


def test_budget_training_prunes_heads() -> None:
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, 3, generator=gen)
    model = GPT(16, 4, "split", False)
    dense = gp.cost(model, x)
    assert isinstance(dense, Cost)
    gate_(model, x, blocks=False)  # heads and units only
    budget = gp.Budget(model, x, flops=0.4, warmup_steps=10)
    train_under_budget(
        model,
        budget,
        60,
        lambda: (torch.randn(8, 6, 3, generator=gen), torch.randint(0, 4, (8,), generator=gen)),
    )
    pruned = _check(model, lambda: GPT(16, 4, "split", False), x[:2], gen)
    kept = [pruned.get_submodule(f"blocks.{i}.attn.proj").in_features for i in range(2)]
    assert min(kept) < 16  # heads were pruned (4 channels each)
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert c.flops < 0.8 * dense.flops


class PerHeadBias(nn.Module):
    """Attention with a learned bias per head added to the scores (ALiBi-like)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(1, heads, 1, 1))
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        att = (q @ k.transpose(-2, -1) + self.bias).softmax(-1)  # (B, H, T, T)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, d)
        return self.head(self.out(y)).mean(1)


def test_a_learned_bias_per_head_is_sliced_with_the_heads() -> None:
    """ALiBi-like ``(1, H, 1, 1)`` bias: gated per head and sliced (before 2026-12-08 the
    heads were kept whole, "adds parameter 'bias' per channel"); see test_gate_head_bias.py."""
    torch.manual_seed(0)
    model, x = PerHeadBias(), torch.randn(2, 5, 8)
    summary = gate_(model, x)
    assert [size for producers, size in summary.channel_groups if "q" in producers] == [2]
    inserted_gating(model).group_gates[0].force_(torch.tensor([False, True]))  # type: ignore[operator]
    model.eval()
    pruned = gp.prune(model)
    fresh = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert (pruned(fresh) - model(fresh)).abs().max().item() <= 1e-5
    assert pruned.get_parameter("bias").shape == (1, 1, 1, 1)


class ReturnsWeights(nn.Module):
    """Attention whose weights the model returns (a head pruned would change them)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape
        q, k, v = (
            f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        att = (q @ k.transpose(-2, -1)).softmax(-1)  # (B, H, T, T)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d)), att


class FourWaySplit(nn.Module):
    """A view that splits the channels four ways: ``(B, T, 2, 2, 2, C / 8)``."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.v, self.out = nn.Linear(d, 2 * d), nn.Linear(d // 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        v = self.v(x).view(b, t, 2, 2, 2, d // 4)  # (B, T, 2, 2, 2, 2 C / 8)
        return self.out(v.sum(dim=(2, 3, 4)))


class SingleHead(nn.Module):
    """One head: nothing to prune by head (the channels are contracted by ``q k^T``)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (f(x).view(b, t, 1, c).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, T, C)
        return self.o(y.transpose(1, 2).reshape(b, t, c)).mean(1)


class MultiQuery(nn.Module):
    """Multi-query attention (PaLM, Falcon, Gemma-2B): one key/value head for every query head
    (SDPA's ``enable_gqa``); a closed query head's output would be the mean of v, not zero, so
    its gate sits at the input of ``o`` (left whole before 2026-12-07 17:00 UTC; see
    test_gate_mqa.py)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * self.hd), nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv(x).view(b, t, 2, 1, self.hd).transpose(1, 3).unbind(2)  # (B, 1, T, D)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(b, t, c)).mean(1)


class MultiQueryConvQuery(MultiQuery):
    """Multi-query attention whose queries come from a 1x1 convolution: its query heads would
    be gated after the attention, which needs queries no gate multiplies (Linear outputs)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__(d, heads)
        self.qc = nn.Conv1d(d, d, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q = self.qc(x.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        q = q.reshape(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv(x).view(b, t, 2, 1, self.hd).transpose(1, 3).unbind(2)  # (B, 1, T, D)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(b, t, c)).mean(1)


@pytest.mark.parametrize(
    ("factory", "name", "reason"),
    [
        (MultiQueryConvQuery, "qc", "one key/value head for every query head (multi-query"),
        (ReturnsWeights, "q", "reaches the model output (through node 'softmax'"),
        (FourWaySplit, "v", "splits the labelled dimension other than into (heads, head size)"),
        (SingleHead, "q", "(attention) reads heads that are not all labelled alike"),
    ],
)
def test_attention_forms_left_ungated_with_a_reason(
    factory: type[nn.Module], name: str, reason: str
) -> None:
    model = factory()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        before = model(x)
    summary = gate_(model, x)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert reason in reasons[name]
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        after, gated = pruned(x), model(x)
    for a, g, b0 in zip(
        after if isinstance(after, tuple) else (after,),
        gated if isinstance(gated, tuple) else (gated,),
        before if isinstance(before, tuple) else (before,),
        strict=True,
    ):
        assert (a - g).abs().max().item() <= 1e-5
        assert (g - b0).abs().max().item() <= 1e-5  # gates start open


def _plan_with_closed_head() -> tuple[dict[str, object], GPT]:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    model = GPT(8, 2, "split", True, n=1)
    gate_(model, x)
    gating = inserted_gating(model)
    gating.group_gates[_head_groups(model, 2)[0]].force_(torch.tensor([False, True]))  # type: ignore[operator]
    model.eval()
    return json.loads(json.dumps(export_plan(model))), GPT(8, 2, "split", True, n=1)


def test_plan_sizes_are_checked() -> None:
    plan, fresh = _plan_with_closed_head()
    plan = {k: v for k, v in plan.items() if k != "checksum"}  # edited below: as by hand
    sizes = plan["sizes"]
    assert isinstance(sizes, dict)
    assert sizes  # the split size, the head counts of three views, the merge
    for bad in ([], [[2]], [["dim", 1]], [[2, 0]], [[1.5, 1]], [[True, 1]]):
        broken = {**plan, "sizes": {**sizes, next(iter(sizes)): bad}}
        with pytest.raises(ValueError, match=r"malformed plan: 'sizes' entry"):
            apply_plan(GPT(8, 2, "split", True, n=1), broken)
    with pytest.raises(ValueError, match=r"names graph nodes the model does not have"):
        apply_plan(GPT(8, 2, "split", True, n=1), {**plan, "sizes": {"no_such_node": [[2, 1]]}})
    with pytest.raises(ValueError, match=r"'sizes' resizes node .* which no entry of 'scopes'"):
        apply_plan(GPT(8, 2, "split", True, n=1), {**plan, "scopes": []})
    apply_plan(fresh, plan)  # the plan itself applies


class WidthFromInput(nn.Module):
    """A view whose width is read from the input (equal to the Linear's before pruning)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.h = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))  # (B, 6)
        return self.h(h.view(x.size(0), x.size(1)))


def test_a_width_read_from_another_tensor_is_rewritten() -> None:
    # before: prune succeeded and the pruned model failed ("shape '[3, 6]' is invalid for
    # input of size 15"): the view kept the input's width 6
    model = WidthFromInput()
    x = torch.randn(3, 6)
    gate_(model, x)
    inserted_gating(model).group_gates[0].force_(  # type: ignore[operator]
        torch.tensor([True, False, True, True, True, True])
    )
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        for b in (3, 5):
            xi = torch.randn(b, 6)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    assert export_plan(model)["sizes"] == {"view": [[-1, 5]]}  # dims counted from the end


class BertAttention(nn.Module):
    """HF-BERT's self-attention: shapes built as ``x.size()[:-1] + (heads, head_size)``."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_size = heads, d // heads
        self.all_head_size = heads * self.head_size
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.dense = nn.Linear(d, d)

    def transpose_for_scores(self, x: Tensor) -> Tensor:
        new_x_shape = x.size()[:-1] + (self.heads, self.head_size)  # noqa: RUF005 (as HF)
        return x.view(new_x_shape).permute(0, 2, 1, 3)  # (B, H, T, D)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q = self.transpose_for_scores(self.query(x))
        k = self.transpose_for_scores(self.key(x))
        v = self.transpose_for_scores(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size) + mask  # (B, H, T, T)
        ctx = (F.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3).contiguous()  # (B, T, H, D)
        return self.dense(ctx.view(ctx.size()[:-2] + (self.all_head_size,)))  # noqa: RUF005


class Bert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.ln = nn.Linear(3, 8), nn.LayerNorm(8)
        self.attn, self.out = BertAttention(), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        mask = (x[:, :, 0] * 0.0)[:, None, None, :]  # (B, 1, 1, T) additive, all zero
        h = self.ln(self.embed(x))
        return self.out(self.ln(h + self.attn(h, mask))).mean(1)


def test_bert_style_shapes_are_rewritten() -> None:
    # before: prune raised IndexError (the split) or the pruned model a shape error (the merge
    # kept all_head_size)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3)
    model = Bert()
    gate_(model, x)
    groups = _head_groups(model, 2)
    assert len(groups) == 1
    inserted_gating(model).group_gates[groups[0]].force_(torch.tensor([False, True]))  # type: ignore[operator]
    pruned = _check(model, Bert, x, gen)
    dense = pruned.get_submodule("attn.dense")
    assert isinstance(dense, nn.Linear)
    assert dense.in_features == 4


class TwiceCalled(nn.Module):
    """One attention module applied twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.e, self.ln1, self.ln2 = nn.Linear(3, 8), nn.LayerNorm(8), nn.LayerNorm(8)
        self.attn, self.o = Attention(8, 2, "split", True), nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.e(x)
        h = h + self.attn(self.ln1(h))
        h = h + self.attn(self.ln2(h))
        return self.o(h).mean(1)


def test_attention_called_twice_keeps_its_heads() -> None:
    # before: its heads were gated and prune raised "cannot rewrite module 'attn'"
    model = TwiceCalled()
    x = torch.randn(2, 5, 3)
    summary = gate_(model, x)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert (
        "gives a pruned dimension a size, and cannot rewrite module 'attn'" in reasons["attn.qkv"]
    )
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


class GroupedQuery(nn.Module):
    """Grouped-query attention (LLaMA-2/3, Mistral): k and v with 2 heads serving 2 query
    heads each, repeated by ``repeat_interleave`` or as Hugging Face's ``repeat_kv`` does."""

    def __init__(self, form: str, d: int = 16, heads: int = 4, kv: int = 2) -> None:
        super().__init__()
        self.h, self.kv, self.hd, self.form = heads, kv, d // heads, form
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.k, self.v = nn.Linear(d, kv * self.hd), nn.Linear(d, kv * self.hd)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 2)

    def repeat(self, t: Tensor) -> Tensor:
        b, kv, s, d = t.shape  # (B, KV, T, D)
        rep = self.h // self.kv
        if self.form == "enable_gqa":  # SDPA repeats them itself
            return t
        if self.form == "interleave":
            return t.repeat_interleave(rep, dim=1)  # (B, H, T, D)
        if self.form == "literal":  # the head counts as the module's ints
            t = t[:, :, None, :, :].expand(b, self.kv, rep, s, d)  # (B, KV, rep, T, D)
            return t.reshape(b, self.h, s, d)  # (B, H, T, D)
        t = t[:, :, None, :, :].expand(b, kv, rep, s, d)  # (B, KV, rep, T, D)
        return t.reshape(b, kv * rep, s, d)  # (B, H, T, D)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.ln(x)
        q = self.q(h).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = self.repeat(self.k(h).view(b, t, self.kv, self.hd).transpose(1, 2))
        v = self.repeat(self.v(h).view(b, t, self.kv, self.hd).transpose(1, 2))
        gqa = self.form == "enable_gqa"
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, T, D)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, -1))
        return self.head(x).mean(1)


@pytest.mark.parametrize("form", ["interleave", "hf", "literal", "enable_gqa"])
def test_grouped_query_attention_prunes_key_value_groups(form: str) -> None:
    # before: left ungated ("repeat_interleave ... is an op gate_ does not prune through");
    # now one gate per key/value head, closing it with its query heads; an expand to the
    # literal number of key/value heads is rewritten (the pruned model failed before);
    # SDPA's own enable_gqa=True was left ungated before 2026-12-07 15:00 UTC
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen)
    model = GroupedQuery(form)
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1
    gi = summary.head_groups[0]
    assert summary.channel_groups[gi] == (["q", "k", "v"], 2)  # 2 key/value groups
    inserted_gating(model).group_gates[gi].force_(torch.tensor([False, True]))  # type: ignore[operator]
    pruned = _check(model, lambda: GroupedQuery(form), x, gen)
    widths = [pruned.get_submodule(n) for n in ("q", "k", "o")]
    assert [w.out_features for w in widths[:2]] == [8, 4]  # type: ignore[union-attr]
    assert widths[2].in_features == 8  # type: ignore[union-attr]


class QKNorm(nn.Module):
    """QK-norm (OLMo-2, Qwen3, ViT-22B): q and k normalised over the head size, by modules or
    by ``F.layer_norm`` / ``F.rms_norm`` with parameters of the attention's own."""

    def __init__(self, rms: bool, d: int = 16, heads: int = 4, functional: bool = False) -> None:
        super().__init__()
        self.h, self.hd, self.functional = heads, d // heads, functional
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, 2)
        norm = nn.RMSNorm if rms else nn.LayerNorm
        self.q_norm, self.k_norm = norm(self.hd), norm(self.hd)

    def _norm(self, m: nn.Module, t: Tensor) -> Tensor:
        if not self.functional:
            return cast(Tensor, m(t))
        if isinstance(m, nn.RMSNorm):
            return F.rms_norm(t, (self.hd,), m.weight, 1e-6)  # (B, T, H, D)
        assert isinstance(m, nn.LayerNorm)
        return F.layer_norm(t, [self.hd], m.weight, bias=m.bias)  # (B, T, H, D)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.hd).unbind(2)  # (B, T, H, D) each
        q = self._norm(self.q_norm, q).transpose(1, 2)  # (B, H, T, D)
        k = self._norm(self.k_norm, k).transpose(1, 2)  # (B, H, T, D)
        att = (q @ k.transpose(-2, -1) * self.hd**-0.5).softmax(-1)  # (B, H, T, T)
        y = att @ v.transpose(1, 2)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(b, t, c)).mean(1)


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("rms", [False, True])
def test_qk_norm_heads_are_pruned(rms: bool, functional: bool) -> None:
    # a closed head's q and k are not zero after the norm (its bias), its v is: still exact
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen)
    model = QKNorm(rms, functional=functional)
    with torch.no_grad():
        for m in (model.q_norm, model.k_norm):
            m.weight.normal_(1.0, 0.3, generator=gen)
            if isinstance(m, nn.LayerNorm):
                m.bias.normal_(0.0, 0.3, generator=gen)
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1, str(summary)
    inserted_gating(model).group_gates[summary.head_groups[0]].force_(  # type: ignore[operator]
        torch.tensor([True, False, False, True])
    )
    pruned = _check(model, lambda: QKNorm(rms, functional=functional), x, gen)
    o = pruned.get_submodule("o")
    assert isinstance(o, nn.Linear)
    assert o.in_features == 8


class NormOverHeads(nn.Module):
    """A functional LayerNorm over the heads and the head size together (the whole width of
    q): removing a head would change every other head's normalisation."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.hd).unbind(2)  # (B, T, H, D) each
        q = F.layer_norm(q, (self.h, self.hd)).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).reshape(b, t, c)).mean(1)  # (B, 2)


def test_a_norm_over_the_heads_keeps_them() -> None:
    x = torch.randn(2, 5, 16)
    summary = gate_(NormOverHeads(), x)
    assert not summary.head_groups, str(summary)
    assert "layer_norm" in str(summary)


class MaskedSelfAttention(nn.Module):
    """HF-BERT's calling convention: optional ``attention_mask`` / ``head_mask`` checked
    with ``is not None`` inside."""

    def __init__(self, c: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.h, self.d = heads, c // heads
        self.query, self.key, self.value = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)

    def split(self, x: Tensor) -> Tensor:
        return x.view(x.size()[:-1] + (self.h, self.d)).permute(0, 2, 1, 3)  # noqa: RUF005

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, head_mask: Tensor | None = None
    ) -> Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        s = q @ k.transpose(-1, -2) / math.sqrt(self.d)  # (B, H, T, T)
        if attention_mask is not None:
            s = s + attention_mask
        p = F.softmax(s, dim=-1)
        if head_mask is not None:
            p = p * head_mask
        c = (p @ v).permute(0, 2, 1, 3).contiguous()  # (B, T, H, D)
        return c.view(c.size()[:-2] + (self.h * self.d,))  # noqa: RUF005


class MaskedNet(nn.Module):
    def __init__(self, with_none: bool) -> None:
        super().__init__()
        self.e, self.attn, self.o = nn.Linear(3, 8), MaskedSelfAttention(), nn.Linear(8, 4)
        self.with_none = with_none

    def forward(self, x: Tensor) -> Tensor:
        ext = (x[:, None, None, :, 0] < -1.5).float() * -10000.0  # (B, 1, 1, T) additive
        h = self.e(x)
        a = self.attn(h, ext, None) if self.with_none else self.attn(h, ext)
        return self.o(a).mean(1)


@pytest.mark.parametrize("with_none", [False, True])
def test_attention_called_with_some_optional_arguments(with_none: bool) -> None:
    # before: left ungated ("cannot rewrite module 'attn' ...: tracing it alone gives a
    # different graph"): tracing tried every optional argument given or none
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=gen)
    model = MaskedNet(with_none)
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1
    inserted_gating(model).group_gates[summary.head_groups[0]].force_(  # type: ignore[operator]
        torch.tensor([True, False])
    )
    pruned = _check(model, lambda: MaskedNet(with_none), x, gen)
    assert pruned.get_submodule("attn.value").out_features == 4  # type: ignore[union-attr]


class MaskOnly(nn.Module):
    """Attention with one optional argument, ``mask=None`` tested by ``is not None``, which
    its caller always passes (a padding mask from the input)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            f(x).view(b, t, self.h, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v)
        )  # (B, H, T, D) each
        s = q @ k.transpose(-1, -2)  # (B, H, T, T)
        if mask is not None:
            s = s + mask
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return cast(Tensor, self.o(y))


class MaskOnlyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.head = MaskOnly(), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        mask = (x[:, None, None, :, 0] > 1.0).float() * -1e4  # (B, 1, 1, T)
        return cast(Tensor, self.head(self.attn(x, mask).mean(1)))


def test_an_optional_argument_the_caller_always_passes() -> None:
    # before 2026-12-07 15:30 UTC: the heads were left ungated ("tracing it alone gives a
    # different graph"): the module was traced alone with its only optional argument at None
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=gen)
    model = MaskOnlyNet()
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1, str(summary)
    inserted_gating(model).group_gates[summary.head_groups[0]].force_(  # type: ignore[operator]
        torch.tensor([False, True])
    )
    pruned = _check(model, MaskOnlyNet, x, gen)
    assert pruned.get_submodule("attn.v").out_features == 4  # type: ignore[union-attr]
    masked = torch.randn(3, 6, 8, generator=gen)
    masked[:, :2, 0] = 2.0  # the mask is used: two keys masked out
    with torch.no_grad():
        assert (pruned(masked) - model(masked)).abs().max().item() <= 1e-5


class MadeWhileTracing(nn.Module):
    """Attention whose forward makes a tensor from constants (fx stores it on the traced
    module as a tensor constant): the rewritten module must carry it."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, 2, 4).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v) * torch.full((4,), 2.0)  # (B, 2, T, 4)
        return x + self.o(y.transpose(1, 2).reshape(b, t, 8))  # (B, T, 8)


def test_a_tensor_made_while_tracing_survives_the_rewrite() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=gen)
    model = nn.Sequential(MadeWhileTracing(), MadeWhileTracing()).eval()
    summary = gate_(model, x)
    assert len(summary.head_groups) == 2
    gating = inserted_gating(model)
    for gate in gating.group_gates:
        gate.force_(torch.ones(gate.n, dtype=torch.bool))  # type: ignore[operator]
    for i in summary.head_groups:
        gating.group_gates[i].force_(torch.tensor([True, False]))  # type: ignore[operator]

    _check(model, lambda: nn.Sequential(MadeWhileTracing(), MadeWhileTracing()), x, gen)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]  # (..., D / 2) each
    return torch.cat((-x2, x1), dim=-1)  # (..., D)


class QwenStyle(nn.Module):
    """Qwen3 / OLMo-2 layout: QK-norm (RMSNorm over the head size), then RoPE
    (``q * cos + rotate_half(q) * sin``), grouped-query attention by repeat_interleave,
    SDPA or explicit softmax(q k^T) v."""

    def __init__(self, sdpa: bool, d: int = 16, heads: int = 4, kv: int = 2) -> None:
        super().__init__()
        self.h, self.kv, self.hd, self.sdpa = heads, kv, d // heads, sdpa
        self.q = nn.Linear(d, heads * self.hd)
        self.k, self.v = nn.Linear(d, kv * self.hd), nn.Linear(d, kv * self.hd)
        self.q_norm, self.k_norm = nn.RMSNorm(self.hd), nn.RMSNorm(self.hd)
        self.o = nn.Linear(heads * self.hd, d)
        angle = torch.arange(32)[:, None] * torch.arange(self.hd)[None, :] * 0.1  # (32, D)
        self.register_buffer("cos", angle.cos())
        self.register_buffer("sin", angle.sin())

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q(x).view(b, t, self.h, self.hd)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k(x).view(b, t, self.kv, self.hd)).transpose(1, 2)  # (B, KV, T, D)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)  # (B, KV, T, D)
        cos, sin = self.cos.narrow(0, 0, t), self.sin.narrow(0, 0, t)  # (T, D)
        q = q * cos + _rotate_half(q) * sin  # (B, H, T, D)
        k = k * cos + _rotate_half(k) * sin  # (B, KV, T, D)
        r = self.h // self.kv
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)  # (B, H, T, D)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        else:
            y = torch.matmul(torch.matmul(q, k.transpose(-2, -1)).softmax(-1), v)  # (B, H, T, D)
        return x + self.o(y.transpose(1, 2).reshape(b, t, self.h * self.hd))  # (B, T, d)


@settings(max_examples=examples(12), deadline=None)
@given(sdpa=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_qk_norm_then_rope_heads_are_pruned(sdpa: bool, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 16, generator=gen)
    model = QwenStyle(sdpa)
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1, str(summary)  # one gate per key/value head
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in [*gating.group_gates, *gating.block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)
    _check(model, lambda: QwenStyle(sdpa), x, gen)  # exact, same cost, plan replays


@settings(max_examples=examples(10), deadline=None)
@given(
    kv=st.sampled_from([2, 3]),
    rep=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sdpa_enable_gqa_random_gate_states(kv: int, rep: int, seed: int) -> None:
    # SDPA repeating k and v itself (enable_gqa=True): one gate per key/value head
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    heads = kv * rep
    d = 4 * heads
    x = torch.randn(2, 5, d, generator=gen)

    def factory() -> GroupedQuery:
        torch.manual_seed(seed)
        return GroupedQuery("enable_gqa", d=d, heads=heads, kv=kv)

    model = factory()
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1, str(summary)
    assert summary.channel_groups[summary.head_groups[0]] == (["q", "k", "v"], kv)
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in [*gating.group_gates, *gating.block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)
    _check(model, factory, x, gen)
