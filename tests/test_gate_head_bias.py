"""Per-head terms of attention scores are sliced with the heads (added 2026-12-08): Swin's
relative position bias (a table looked up by an index buffer, with and without the shifted
windows' mask), ALiBi's slopes (a parameter or buffer, ``(H,)`` or ``(1, H, 1, 1)``, times
distances), T5's ``nn.Embedding(buckets, H)`` bias and Swin-V2's learned ``logit_scale``. Heads
closed at random: pruned == gated on fresh inputs, fewer parameters and FLOPs, the plan
replays. A bias the same for every head (``(T, T)``, ``(1, 1, T, T)``) needs no slicing; one
computed otherwise keeps the heads whole, with a reason naming it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_

D, H, T = 16, 4, 6


def _relative_index(ws: int) -> Tensor:
    """Swin's ``relative_position_index`` ``(ws*ws, ws*ws)`` into a ``(2ws-1)^2`` table."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    flat = coords.flatten(1)  # (2, N)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()  # (N, N, 2)
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)  # (N, N)


class WindowAttention(nn.Module):
    """Swin's (timm's) window attention with its relative position bias; ``mask`` the
    shifted windows' ``(nW, N, N)``."""

    def __init__(self, dim: int, heads: int, ws: int) -> None:
        super().__init__()
        self.heads, self.ws = heads, ws
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_index(ws))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B_, H, N, hd) each
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B_, H, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.ws * self.ws, self.ws * self.ws, -1
        )  # (N, N, H)
        bias = bias.permute(2, 0, 1).contiguous()  # (H, N, N)
        attn = attn + bias.unsqueeze(0)  # (B_, H, N, N)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b_ // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)  # (B_, H, N, N)
        attn = self.softmax(attn)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))  # (B_, N, C)


def _partition(x: Tensor, ws: int) -> Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)  # (B, H/ws, ws, W/ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws, c)  # (B*nW, N, C)


def _reverse(windows: Tensor, ws: int, h: int, w: int) -> Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c)  # (B, H/ws, W/ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)  # (B, H, W, C)


def _shift_mask(res: int, ws: int, shift: int) -> Tensor:
    """Swin's ``attn_mask`` ``(nW, N, N)``: -100 between tokens of different regions."""
    img = torch.zeros(1, res, res, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = _partition(img, ws).squeeze(-1)  # (nW, N)
    m = win.unsqueeze(1) - win.unsqueeze(2)  # (nW, N, N)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


class SwinBlock(nn.Module):
    """Swin's block: LayerNorm, roll by ``-shift``, window attention (with the mask when
    shifted), reverse, roll back, residual; LayerNorm, MLP, residual."""

    def __init__(self, dim: int, res: int, ws: int, shift: int) -> None:
        super().__init__()
        self.res, self.ws, self.shift = res, ws, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, H, ws)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.register_buffer("attn_mask", _shift_mask(res, ws, shift) if shift else None)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        h = self.norm1(x).view(b, self.res, self.res, c)  # (B, H, W, C)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = self.attn(_partition(h, self.ws), mask=self.attn_mask)  # (B*nW, N, C)
        h = _reverse(h, self.ws, self.res, self.res)  # (B, H, W, C)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.view(b, self.res * self.res, c)  # (B, L, C)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))  # (B, L, C)


class Swin(nn.Module):
    """Patch embedding, a plain and a shifted Swin block, LayerNorm, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, D, 2, 2)
        self.blocks = nn.Sequential(SwinBlock(D, 4, 2, 0), SwinBlock(D, 4, 2, 1))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, L, C)
        return self.head(self.norm(self.blocks(x)).mean(1))  # (B, 5)


class Scores(nn.Module):
    """Self-attention ``softmax(q k^T / sqrt(d) (+ or *) term) v`` with separate q, k, v, o
    Linears; ``form`` the per-head term: ``"alibi"`` slopes ``(H,)`` viewed ``(1, H, 1, 1)``
    times distances, ``"alibi4"`` slopes ``(1, H, 1, 1)``, ``"t5"`` an ``nn.Embedding(buckets,
    H)`` looked up and permuted, ``"logit"`` Swin-V2's cosine attention with ``logit_scale``
    ``(H, 1, 1)``, ``"table"`` a bias ``(H, T, T)``; ``"shared"`` a bias ``(T, T)`` and
    ``"shared4"`` one ``(1, 1, T, T)``, alike for every head."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.head = nn.Linear(D, 3)
        dist = -(torch.arange(T)[None, :] - torch.arange(T)[:, None]).abs().float()  # (T, T)
        self.register_buffer("dist", dist)
        self.register_buffer("buckets", (torch.arange(T)[None, :] - torch.arange(T)[:, None]) % 8)
        if form == "alibi":
            self.slopes = nn.Parameter(torch.rand(H))
        elif form == "alibi4":
            self.slopes = nn.Parameter(torch.rand(1, H, 1, 1))
        elif form == "t5":
            self.rel = nn.Embedding(8, H)
        elif form == "logit":
            self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(H, 1, 1) + 1))
        elif form == "table":
            self.bias = nn.Parameter(torch.randn(H, T, T))
        elif form == "shared":
            self.bias = nn.Parameter(torch.randn(T, T))
        else:
            self.bias = nn.Parameter(torch.randn(1, 1, T, T))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, H, d // H).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.form == "logit":  # Swin-V2: cosine similarity times a learned temperature
            att = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()  # (H, 1, 1)
            att = att * scale  # (B, H, T, T)
        else:
            att = q @ k.transpose(-2, -1) / math.sqrt(d // H)  # (B, H, T, T)
        if self.form == "alibi":
            att = att + self.slopes.view(1, H, 1, 1) * self.dist  # (B, H, T, T)
        elif self.form == "alibi4":
            att = att + self.slopes * self.dist
        elif self.form == "t5":
            att = att + self.rel(self.buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)
        elif self.form != "logit":
            att = att + self.bias
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.head(self.o(y)).mean(1)  # (B, 3)


class PlainSwin(Swin):
    """Two unshifted Swin blocks (``mask=None`` passed by keyword)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(SwinBlock(D, 4, 2, 0), SwinBlock(D, 4, 2, 0))


FORMS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tensor], str]] = {
    "swin": (PlainSwin, lambda g: torch.randn(2, 3, 8, 8, generator=g), "blocks.0.attn.qkv"),
    **{
        form: (lambda form=form: Scores(form), lambda g: torch.randn(2, T, D, generator=g), "q")  # type: ignore[misc]
        for form in ("alibi", "alibi4", "t5", "logit", "table", "shared", "shared4")
    },
}
SLICED = {
    "swin": "blocks.0.attn.relative_position_bias_table",
    "alibi": "slopes",
    "alibi4": "slopes",
    "logit": "logit_scale",
    "table": "bias",
}


def _close_heads(model: nn.Module, gen: torch.Generator) -> None:
    """Group gates at random log alphas, the first head of each group closed at least."""
    with torch.no_grad():
        for gate in inserted_gating(model).group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-3.0, 2.0, generator=gen)
            closed = int(torch.randint(gate.log_alpha.numel(), (), generator=gen))
            gate.log_alpha.view(-1)[closed] = -6.0


@settings(max_examples=6, deadline=None)
@given(form=st.sampled_from(sorted(FORMS)), seed=st.integers(0, 2**16))
def test_per_head_terms_are_sliced_with_the_heads(form: str, seed: int) -> None:
    factory, sample, qkv = FORMS[form]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = factory()
    x = sample(gen)
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    heads = [size for producers, size in summary.channel_groups if qkv in producers]
    assert heads == [H]  # one gate per head
    _close_heads(model, gen)
    model.eval()
    plan = json.loads(json.dumps(export_plan(model)))
    pruned = gp.prune(model)
    fresh = sample(gen)
    with torch.no_grad():
        assert (pruned(fresh) - model(fresh)).abs().max().item() <= 1e-5
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert isinstance(dense, Cost)
    assert c.params < dense.params
    assert c.flops < dense.flops
    if form in SLICED:  # the per-head term keeps the open heads only
        spec = plan["slices"][SLICED[form]]
        assert spec["kind"] == "heads"
        assert pruned.get_parameter(SLICED[form]).shape[spec["dim"]] == len(spec["out"]) < H
    torch.manual_seed(seed)
    replayed = apply_plan(factory(), plan)
    replayed.load_state_dict(pruned.state_dict())
    replayed.eval()
    with torch.no_grad():
        assert (replayed(fresh) - pruned(fresh)).abs().max().item() <= 1e-5


class Computed(Scores):
    """A per-head bias the forward computes (``torch.linspace``): no parameter or buffer to
    slice, so the heads stay whole."""

    def __init__(self) -> None:
        super().__init__("shared")

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, H, d // H).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = q @ k.transpose(-2, -1) + self.dist.unsqueeze(0) * x.mean()  # (B, H, T, T)
        att = att + torch.linspace(0.0, 1.0, H).view(1, H, 1, 1)  # (1, H, 1, 1) computed
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.head(self.o(y)).mean(1)


def test_a_per_head_term_not_from_a_parameter_keeps_the_heads_whole() -> None:
    model = Computed()
    x = torch.randn(2, T, D)
    summary = gate_(model, x)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert "q" in reasons  # kept whole (the reason names the add reading the scores)
    assert "add_1" in reasons["q"]


def test_a_plan_slicing_a_head_term_along_a_wrong_dimension_is_refused() -> None:
    model = Scores("table")
    x = torch.randn(2, T, D)
    gate_(model, x)
    _close_heads(model, torch.Generator().manual_seed(0))
    model.eval()
    plan = {k: v for k, v in export_plan(model).items() if k != "checksum"}
    bad = {**plan["slices"]["bias"], "dim": 7}
    with pytest.raises(ValueError, match=r"slices 'bias' as 'heads' along dim 7"):
        apply_plan(Scores("table"), {**plan, "slices": {**plan["slices"], "bias": bad}})


def test_a_shifted_swin_block_calls_its_attention_with_a_mask_keyword() -> None:
    """The shifted block passes its ``attn_mask`` buffer: traced from the root it is a
    constant, traced alone an input; both blocks' heads are gated (before 2026-12-08 00:26
    UTC the shifted block's attention was not rewritten and kept its heads, "different
    graph"), and pruning stays exact. Before 2026-12-08 the unshifted block's ``mask=None``
    keyword made the pruned model raise ``TypeError``."""
    torch.manual_seed(0)
    model = Swin()
    x = torch.randn(2, 3, 8, 8)
    summary = gate_(model, x)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert {"blocks.0.attn.qkv", "blocks.1.attn.qkv"} <= gated
    _close_heads(model, torch.Generator().manual_seed(1))
    model.eval()
    pruned = gp.prune(model)
    fresh = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert (pruned(fresh) - model(fresh)).abs().max().item() <= 1e-5
