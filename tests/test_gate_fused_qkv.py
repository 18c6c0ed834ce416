"""gate_ on attention whose q, k and v come from one fused projection split into unequal
sections, as grouped- and multi-query attention write it (GPTBigCode MQA, Falcon, Phi-3:
``q, k, v = self.c_attn(x).split((d, kv * hd, kv * hd), dim=-1)``, also ``torch.split`` and
``torch.tensor_split`` at indices). Gated as with separate q, k, v projections: grouped-query
attention gets one gate per key/value head (closing it with the query heads it serves),
multi-query attention one gate per query head at the input of the output projection (the
key/value rows kept whole). ``prune`` slices the fused weight's q, k and v rows and rewrites
the split's sizes; exact, cheaper, replayable."""

from __future__ import annotations

import json
import math
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_

SPLITS = ["split", "torch_split", "tensor_split"]
REPEATS = ["interleave", "hf", "enable_gqa"]


class FusedQKV(nn.Module):
    """Causal self-attention with ``heads`` query heads and ``kv`` key/value heads of
    ``head_dim`` from one fused projection ``c_attn``, split into ``(heads * hd, kv * hd,
    kv * hd)`` by ``qkv.split(sizes)`` (``"split"``), ``torch.split(qkv, [...])``
    (``"torch_split"``) or ``torch.tensor_split(qkv, (end_q, end_k))`` (``"tensor_split"``);
    k and v repeated for the query heads by ``repeat_interleave``, Hugging Face's
    ``repeat_kv`` (``"hf"``: ``expand`` + ``reshape``) or SDPA's ``enable_gqa``; SDPA or an
    explicit ``softmax(q k^T / sqrt(D)) v`` (``sdpa=False``)."""

    def __init__(
        self,
        d: int = 16,
        heads: int = 4,
        kv: int = 2,
        head_dim: int = 4,
        split: str = "split",
        repeat: str = "interleave",
        sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.h, self.kv, self.hd, self.split, self.rep, self.sdpa = (
            heads,
            kv,
            head_dim,
            split,
            repeat,
            sdpa,
        )
        self.c_attn = nn.Linear(d, (heads + 2 * kv) * head_dim)
        self.o = nn.Linear(heads * head_dim, d)
        self.register_buffer("tril", torch.ones(32, 32, dtype=torch.bool).tril())

    def repeat(self, t: Tensor) -> Tensor:
        """The key/value heads ``(B, KV, T, D)`` as the attention reads them."""
        b, _, s, d = t.shape
        r = self.h // self.kv
        if self.rep == "enable_gqa":  # SDPA repeats them itself
            return t  # (B, KV, T, D)
        if self.rep == "interleave":
            return t.repeat_interleave(r, dim=1)  # (B, H, T, D)
        t = t[:, :, None, :, :].expand(b, self.kv, r, s, d)  # (B, KV, r, T, D)
        return t.reshape(b, self.h, s, d)  # (B, H, T, D)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        qkv = self.c_attn(x)  # (B, T, (H + 2 KV) D)
        sizes = (self.h * self.hd, self.kv * self.hd, self.kv * self.hd)
        if self.split == "split":
            q, k, v = qkv.split(sizes, dim=-1)
        elif self.split == "torch_split":
            q, k, v = torch.split(qkv, list(sizes), dim=2)
        else:
            q, k, v = torch.tensor_split(qkv, (sizes[0], sizes[0] + sizes[1]), dim=-1)
        q = q.view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = self.repeat(k.view(b, t, self.kv, self.hd).transpose(1, 2))  # (B, H or KV, T, D)
        v = self.repeat(v.view(b, t, self.kv, self.hd).transpose(1, 2))  # (B, H or KV, T, D)
        if self.sdpa:
            gqa = self.rep == "enable_gqa"
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)  # (B, H, T, T)
            causal = self.tril.narrow(0, 0, t).narrow(1, 0, t)  # (T, T)
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, H, T, T)
            y = att @ v  # (B, H, T, D)
        return cast(Tensor, self.o(y.transpose(1, 2).reshape(b, t, self.h * self.hd)))


class Net(nn.Module):
    """Two pre-norm blocks of fused-qkv attention and an FFN, each a residual branch."""

    def __init__(self, heads: int = 4, kv: int = 2, split: str = "split", repeat: str = "hf"):
        super().__init__()
        self.embed = nn.Linear(3, 16)
        self.ln = nn.ModuleList(nn.LayerNorm(16) for _ in range(4))
        self.attn = nn.ModuleList(FusedQKV(16, heads, kv, 4, split, repeat) for _ in range(2))
        self.fc1 = nn.ModuleList(nn.Linear(16, 32) for _ in range(2))
        self.fc2 = nn.ModuleList(nn.Linear(32, 16) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, T, 16)
        for i in range(2):
            h = h + self.attn[i](self.ln[2 * i](h))
            h = h + self.fc2[i](F.gelu(self.fc1[i](self.ln[2 * i + 1](h))))
        return cast(Tensor, self.head(h).mean(1))  # (B, 4)


def _cases() -> list[tuple[int, str, str, bool]]:
    """(kv, split, repeat, sdpa): MHA written as GQA (kv == heads), GQA, MQA; explicit
    attention with the repeats that materialise k and v."""
    out = []
    for kv in (4, 2, 1):
        for split in SPLITS:
            for repeat in REPEATS:
                for sdpa in (True, False):
                    if sdpa or repeat != "enable_gqa":
                        out.append((kv, split, repeat, sdpa))
    return out


def _reasons(summary: gp.GatingSummary) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for producers, _, why in summary.ungated_groups:
        for p in producers:
            out.setdefault(p, []).append(why)
    return out


@pytest.mark.parametrize(("kv", "split", "repeat", "sdpa"), _cases())
def test_closed_heads_leave_the_fused_projection(
    kv: int, split: str, repeat: str, sdpa: bool
) -> None:
    # before 2026-12-07 21:38 UTC: "node 'split' ... returns a non-tensor (a split of the
    # channels, such as q, k, v of a fused projection)" for kv < heads, every head kept
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 16, generator=gen)

    def factory(heads: int = 4, kv: int = kv) -> FusedQKV:
        torch.manual_seed(0)
        return FusedQKV(heads=heads, kv=kv, split=split, repeat=repeat, sdpa=sdpa)

    model = factory().eval()
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    with torch.no_grad():
        before = model(x)
    summary = gate_(model, x)
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-5  # gates start open
    assert len(summary.head_groups) == 1, str(summary)
    gi = summary.head_groups[0]
    gating = inserted_gating(model)
    if kv > 1:  # one gate per key/value head, closing it with the query heads it serves
        assert summary.channel_groups[gi] == (["c_attn"], kv), str(summary)
        assert summary.query_heads == {}
        closed = torch.ones(kv, dtype=torch.bool)
        closed[1] = False
        kept_heads, kept_kv = 4 - 4 // kv, kv - 1
    else:  # one gate per query head, at the input of o; the key/value head kept whole
        assert summary.channel_groups[gi] == (["c_attn"], 4), str(summary)
        assert summary.query_heads == {gi: ["o"]}
        assert "(one gate per query head, at the input of o)" in str(summary)
        assert any("key/value head is kept whole" in w for w in _reasons(summary)["c_attn"])
        closed = torch.tensor([True, False, True, False])
        kept_heads, kept_kv = 2, 1
    gating.group_gates[gi].force_(closed)  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, factory, (1, 3))
    with torch.no_grad():  # another sequence length
        xi = torch.randn(2, 9, 16, generator=gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    c_attn, o = pruned.get_submodule("c_attn"), pruned.get_submodule("o")
    assert isinstance(c_attn, nn.Linear)
    assert isinstance(o, nn.Linear)
    assert c_attn.out_features == (kept_heads + 2 * kept_kv) * 4
    assert o.in_features == kept_heads * 4
    # the pruned model costs what a dense one with the kept heads costs
    small = gp.cost(factory(kept_heads, kept_kv), x)
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert isinstance(small, gp.Cost)
    assert (c.flops, c.params) == (small.flops, small.params)
    assert c.flops < dense.flops
    assert c.params < dense.params


def test_pruned_rows_are_the_kept_heads_of_q_k_and_v() -> None:
    # GQA, 4 query heads on 2 key/value heads: closing key/value head 0 removes query heads
    # 0 and 1 and key/value head 0 from each section of the fused weight, nothing else
    torch.manual_seed(2)
    x = torch.randn(2, 5, 16)
    model = FusedQKV(heads=4, kv=2, split="split", repeat="hf").eval()
    weight = model.c_attn.weight.detach().clone()  # (32, 16): q 16 rows, k 8, v 8
    summary = gate_(model, x)
    inserted_gating(model).group_gates[summary.head_groups[0]].force_(  # type: ignore[operator]
        torch.tensor([False, True])
    )
    plan = export_plan(model)
    assert plan["sizes"]["split"] == [["section_0", 8], ["section_1", 4], ["section_2", 4]]
    pruned = gp.prune(model)
    rows = [*range(8, 16), *range(20, 24), *range(28, 32)]
    assert torch.equal(pruned.get_submodule("c_attn").weight, weight[rows])


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kv", [2, 1])
def test_a_network_of_fused_blocks_replays_its_plan(split: str, kv: int) -> None:
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, generator=gen)

    def factory() -> Net:
        torch.manual_seed(3)
        return Net(4, kv, split)

    model = factory()
    summary = gate_(model, x)
    assert len(summary.head_groups) == 2, str(summary)
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in [*gating.group_gates, *gating.block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)
    for gi in summary.head_groups:
        gate = gating.group_gates[gi]
        closed = torch.ones(gate.n, dtype=torch.bool)
        closed[0] = False
        gate.force_(closed)  # type: ignore[operator]
    check_pruned(model, x, gen, factory, (1, 3))


@settings(max_examples=examples(15), deadline=None)
@given(
    kv=st.sampled_from([1, 2, 3]),
    rep=st.sampled_from([1, 2, 3]),
    head_dim=st.integers(2, 3),  # a head of one channel is not split off (as elsewhere)
    split=st.sampled_from(SPLITS),
    repeat=st.sampled_from(REPEATS),
    sdpa=st.booleans(),
    data=st.data(),
)
def test_random_heads_and_closed_sets_prune_exactly(
    kv: int, rep: int, head_dim: int, split: str, repeat: str, sdpa: bool, data: st.DataObject
) -> None:
    heads = kv * rep
    if heads == 1:
        kv, heads = 1, 2  # one head alone is kept whole
    if not sdpa and repeat == "enable_gqa":
        repeat = "interleave"
    seed = data.draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, generator=gen)

    def factory() -> FusedQKV:
        torch.manual_seed(seed)
        return FusedQKV(8, heads, kv, head_dim, split, repeat, sdpa)

    model = factory()
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1, str(summary)
    gi = summary.head_groups[0]
    n = kv if kv > 1 else heads  # key/value groups, or the query heads of MQA
    assert summary.channel_groups[gi] == (["c_attn"], n)
    gating = inserted_gating(model)
    with torch.no_grad():  # open gates at random values (folded), then a random closed set
        gate = gating.group_gates[gi]
        assert isinstance(gate, HardConcreteGate)
        gate.log_alpha.uniform_(-1.0, 4.0, generator=gen)
    keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    gate.force_(torch.tensor(keep))
    pruned = check_pruned(model, x, gen, factory, (1, 3))
    kept = max(1, sum(keep))
    kept_heads = kept * (heads // kv) if kv > 1 else kept
    o = pruned.get_submodule("o")
    assert isinstance(o, nn.Linear)
    assert o.in_features == kept_heads * head_dim


def test_unequal_sections_of_one_layer_are_separate_groups() -> None:
    # a Linear's output split into (4, 12) read by two Linears: each section is a channel
    # group of its own, so closing all of one keeps one channel of it (not a size 0)
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 16), nn.Linear(4, 5), nn.Linear(12, 5)

        def forward(self, x: Tensor) -> Tensor:
            p, q = torch.relu(self.a(x)).split((4, 12), dim=-1)  # (B, 4), (B, 12)
            return cast(Tensor, self.b(p) + self.c(q))

    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, generator=gen)
    model = Two()
    summary = gate_(model, x)
    assert summary.channel_groups == [(["a"], 4), (["a"], 12)]
    gating = inserted_gating(model)
    gating.group_gates[0].force_(torch.zeros(4, dtype=torch.bool))  # type: ignore[operator]
    gating.group_gates[1].force_(torch.arange(12) % 3 == 0)  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, Two)
    assert [pruned.get_submodule(n).in_features for n in ("b", "c")] == [1, 4]


class ComputedSections(nn.Module):
    """Sections computed from the input's width (a node in the traced code)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.o = nn.Linear(8, 16), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        c = x.size(-1)
        q, k, v = self.c_attn(x).split((c, c // 2, c // 2), dim=-1)  # (B, T, 8), (B, T, 4) x 2
        b, t, _ = x.shape
        q = q.view(b, t, 4, 2).transpose(1, 2)  # (B, 4, T, 2)
        k = k.view(b, t, 2, 2).transpose(1, 2).repeat_interleave(2, dim=1)  # (B, 4, T, 2)
        v = v.view(b, t, 2, 2).transpose(1, 2).repeat_interleave(2, dim=1)  # (B, 4, T, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 4, T, 2)
        return cast(Tensor, self.o(y.transpose(1, 2).reshape(b, t, 8)))


def test_sections_computed_by_the_forward_are_kept_with_a_reason() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 3, 8)
    model = ComputedSections().eval()
    summary = gate_(model, x)
    assert summary.head_groups == []
    why = _reasons(summary)["c_attn"]
    assert any("splits the channels into sections" in w and "not written as ints" in w for w in why)
    pruned = gp.prune(model)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


def _gqa_plan() -> dict[str, object]:
    torch.manual_seed(6)
    x = torch.randn(2, 5, 16)
    model = FusedQKV(heads=4, kv=2, split="tensor_split")
    summary = gate_(model, x)
    inserted_gating(model).group_gates[summary.head_groups[0]].force_(  # type: ignore[operator]
        torch.tensor([True, False])
    )
    return cast(dict[str, object], json.loads(json.dumps(export_plan(model))))


def test_plan_section_sizes_are_checked() -> None:
    plan = _gqa_plan()
    sizes = cast(dict[str, list[list[object]]], plan["sizes"])
    assert sizes["tensor_split"] == [["index_0", 8], ["index_1", 12]]
    fresh = apply_plan(FusedQKV(heads=4, kv=2, split="tensor_split"), plan)
    c_attn = fresh.get_submodule("c_attn")
    assert isinstance(c_attn, nn.Linear)
    assert c_attn.out_features == 16
    plan = {k: v for k, v in plan.items() if k != "checksum"}  # edited below: as by hand
    for bad, match in (
        ([["index_x", 8]], "malformed plan"),
        ([["section_", 8]], "malformed plan"),
        ([["index_0", 0]], "malformed plan"),
        ([["index_5", 8]], "index 5"),
        ([["section_0", 8]], "not split"),
    ):
        broken = {**plan, "sizes": {**sizes, "tensor_split": bad}}
        with pytest.raises(ValueError, match=match):
            apply_plan(FusedQKV(heads=4, kv=2, split="tensor_split"), broken)
