"""Attention heads whose decorated ``forward`` takes the caller's keywords in ``**kwargs``:
transformers' LlamaAttention (modeling_llama.py), quoted at tiny widths: ``@deprecate_kwarg``
around ``forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)``,
called as ``self.self_attn(hidden_states=h, attention_mask=m, position_ids=p,
use_cache=False, position_embeddings=pe)``, the body passing ``**kwargs`` on to an eager
attention function that takes ``**kwargs`` too. Before 2026-12-08 such a module was not
rewritten ("it is called with arguments its decorated forward takes in kwargs
(position_ids, use_cache), which rewritten code does not take") and its heads stayed
ungated (every HF LLaMA, Mistral, Qwen2, BERT attention).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import pytest
import torch
from gating_helpers import check_pruned, inserted_gating, randomise_gates
from torch import Tensor, nn

from gatedprune.gating import gate_

D, HEADS, HEAD_DIM, T = 16, 4, 4, 5


def deprecate_kwarg(func: Any) -> Any:
    """transformers/utils/deprecation.py's wrapper, reduced: ``(*args, **kwargs)``."""

    @functools.wraps(func)
    def wrapped_func(*args: Any, **kwargs: Any) -> Any:
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return func(*args, **kwargs)

    return wrapped_func


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]  # (B, H, T, hd / 2) each
    return torch.cat((-x2, x1), dim=-1)  # (B, H, T, hd)


def eager_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """modeling_llama.py's, and a score bias read from ``kwargs`` when given (a keyword the
    rewritten code then computes with)."""
    w = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, T)
    if attention_mask is not None:
        w = w + attention_mask  # (B, H, T, T)
    if "score_bias" in kwargs:
        w = w + kwargs["score_bias"]  # (B, H, T, T)
    w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()  # (B, T, H, hd)
    return out, w


def sdpa_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers/integrations/sdpa_attention.py's, reduced: causal where no mask is given."""
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=attention_mask is None
    )  # (B, H, T, hd)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, hd)


class LlamaLikeAttention(nn.Module):
    def __init__(self, sdpa: bool = False) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.head_dim, self.scaling = HEAD_DIM, HEAD_DIM**-0.5
        self.q_proj = nn.Linear(D, HEADS * HEAD_DIM)
        self.k_proj = nn.Linear(D, HEADS * HEAD_DIM)
        self.v_proj = nn.Linear(D, HEADS * HEAD_DIM)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, D)

    @deprecate_kwarg
    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, hd)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, hd)
        cos, sin = position_embeddings
        q = q * cos + rotate_half(q) * sin  # (B, H, T, hd)
        k = k * cos + rotate_half(k) * sin  # (B, H, T, hd)
        attention_interface = sdpa_attention_forward if self.sdpa else eager_attention_forward
        out, w = attention_interface(
            self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        out = out.reshape(*input_shape, -1).contiguous()  # (B, T, H * hd)
        return self.o_proj(out), w


class LlamaLikeLayer(nn.Module):
    def __init__(self, bias: bool, sdpa: bool = False) -> None:
        super().__init__()
        self.self_attn, self.bias = LlamaLikeAttention(sdpa), bias
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(
        self, h: Tensor, mask: Tensor, position_ids: Tensor, pe: tuple[Tensor, Tensor]
    ) -> Tensor:
        extra = {"score_bias": mask * 0.5} if self.bias else {}
        a, _ = self.self_attn(
            hidden_states=h,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
            position_embeddings=pe,
            **extra,
        )
        h = h + a  # (B, T, D)
        return h + self.mlp(h)  # (B, T, D)


class LlamaLike(nn.Module):
    def __init__(self, bias: bool = False, sdpa: bool = False) -> None:
        super().__init__()
        self.embed, self.sdpa = nn.Linear(6, D), sdpa
        self.layers = nn.ModuleList(LlamaLikeLayer(bias, sdpa) for _ in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, T, D)
        t = x.shape[1]
        position_ids = torch.arange(t).unsqueeze(0)  # (1, T)
        freq = position_ids.unsqueeze(-1).float() / (1.0 + torch.arange(HEAD_DIM))  # (1, T, hd)
        pe = (freq.cos().unsqueeze(1), freq.sin().unsqueeze(1))  # (1, 1, T, hd) each
        mask = torch.full((t, t), -1e4).triu(1)  # (T, T): causal
        if self.sdpa:
            mask = sdpa_mask(x)
        for layer in self.layers:
            h = layer(h, mask, position_ids, pe)  # (B, T, D)
        return self.head(h.mean(1))  # (B, 3)


def sdpa_mask(x: Tensor) -> Tensor | None:
    """HF masking_utils' sdpa mask, reduced: skipped (None: sdpa's is_causal) when the model
    runs, built when traced (a padding mask of all-valid tokens, (T, T) zeros)."""
    if isinstance(x, torch.fx.Proxy):
        return torch.zeros((x.shape[1], x.shape[1]))  # (T, T)
    return None


def head_groups(summary: Any) -> list[list[str]]:
    return [list(summary.channel_groups[i][0]) for i in sorted(summary.head_groups)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_llama_like_heads_gated_and_pruned_exactly(bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    net, x = LlamaLike(bias).eval(), torch.randn(2, T, 6)
    with torch.no_grad():
        want = net(x)
    summary = gate_(net, x)
    # before: ungated, "it is called with arguments its decorated forward takes in kwargs
    # (position_ids, use_cache), which rewritten code does not take"
    assert head_groups(summary) == [
        [f"layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(2)
    ], summary
    with torch.no_grad():
        assert (net(x) - want).abs().max().item() <= 1e-5  # gates open: the same function
    gen = torch.Generator().manual_seed(seed)
    randomise_gates(net, gen)
    pruned = check_pruned(net, x, gen, factory=lambda: LlamaLike(bias).eval(), batches=(2, 3))
    for i in range(2):
        attn = dict(pruned.named_modules()).get(f"layers.{i}.self_attn")
        if not isinstance(attn, torch.fx.GraphModule):
            continue  # every head kept (not rewritten), or the block removed
        params = inspect.signature(attn.forward).parameters
        assert {"position_ids", "use_cache"} <= set(params)  # the keywords its callers pass
        assert ("score_bias" in params) == bias


def test_llama_like_packed_keywords_checked_when_run() -> None:
    torch.manual_seed(3)
    net, x = LlamaLike().eval(), torch.randn(2, T, 6)
    summary = gate_(net, x)
    gating = inserted_gating(net)
    randomise_gates(net, torch.Generator().manual_seed(3))
    with torch.no_grad():  # blocks open; layer 0: its first head closed, the others open
        for g in gating.block_gates:
            g.log_alpha.fill_(9.0)
        gating.group_gates[summary.head_groups[0]].log_alpha.copy_(torch.tensor([-9.0, 9, 9, 9]))
    pruned = check_pruned(net, x, torch.Generator().manual_seed(3))
    attn = pruned.get_submodule("layers.0.self_attn")
    assert isinstance(attn, torch.fx.GraphModule)
    assert attn.q_proj.out_features == (HEADS - 1) * HEAD_DIM
    h = torch.randn(2, T, D)
    pe = (torch.ones(1, 1, T, HEAD_DIM), torch.zeros(1, 1, T, HEAD_DIM))
    kw: dict[str, Any] = {"position_embeddings": pe, "attention_mask": None}
    with pytest.raises(TypeError):  # a keyword no call packed: not silently ignored
        attn(h, position_ids=None, use_cache=False, other=1, **kw)
    with pytest.raises(Exception, match="use_cache"):  # traced at False: checked when run
        attn(h, position_ids=None, use_cache=True, **kw)


class TwoWays(nn.Module):
    """The same decorated attention called with different keywords in ``**kwargs``."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn, self.head = LlamaLikeAttention(), nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        pe = (torch.ones(1, 1, x.shape[1], HEAD_DIM), torch.zeros(1, 1, x.shape[1], HEAD_DIM))
        a, _ = self.self_attn(x, pe, None, use_cache=False)
        b, _ = self.self_attn(a, pe, None)
        return self.head(b.mean(1))  # (B, 3)


def test_calls_packing_different_keywords_kept_whole() -> None:
    torch.manual_seed(4)
    net, x = TwoWays().eval(), torch.randn(2, T, D)
    summary = gate_(net, x)
    assert head_groups(summary) == []
    why = " ".join(w for *_, w in summary.ungated_groups)
    assert "**kwargs" in why
    assert "rewritten code serves one way of calling it" in why
    gen = torch.Generator().manual_seed(4)
    randomise_gates(net, gen)
    check_pruned(net, x, gen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_mask_passed_none_fixed_at_none(seed: int) -> None:
    """HF Mistral under sdpa: the attention's required ``attention_mask`` is None when the
    model runs (the mask builder skips it, sdpa is causal) but a tensor in the model's trace;
    traced alone as a tensor, the rewritten code ran ``is_causal=False`` on None: silently
    not causal (a max difference of 1.17 on the real MistralModel). It is fixed at None."""
    torch.manual_seed(seed)
    net, x = LlamaLike(sdpa=True).eval(), torch.randn(2, T, 6)
    gate_(net, x)
    gen = torch.Generator().manual_seed(seed)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: LlamaLike(sdpa=True).eval(), batches=(2, 3))
