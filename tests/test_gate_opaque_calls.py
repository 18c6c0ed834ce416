"""Opaque (kept whole) submodules as Hugging Face transformers writes them: a forward wrapped
by a decorator that fills a keyword (``merge_with_config_defaults``), a norm ``gate_`` keeps
whole for its dtype check (``T5LayerNorm``), and a rotary embedding holding non-persistent
buffers (``LlamaRotaryEmbedding``). Minimal replicas of the library code, tiny widths."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from gating_helpers import check_pruned, inserted_gating, random_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import gate_


def _merge_defaults(func: Callable[..., Any]) -> Callable[..., Any]:
    """transformers/utils/generic.py:1158-1205 ``merge_with_config_defaults``: a keyword left
    None is filled from the module's config (``kwargs[arg_name] = arg_value``, line 1205)."""

    @functools.wraps(func)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cache") is None:
            kwargs["use_cache"] = self.use_cache
        return func(self, *args, **kwargs)

    return wrapper


class _Body(nn.Module):
    """GPT2Model's shape of call: ``self.transformer(input_ids, attention_mask=...,
    use_cache=use_cache)``, its forward decorated, kept whole by a check on values."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.use_cache = False

    @_merge_defaults
    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, use_cache: bool | None = None
    ) -> Tensor:
        if use_cache:
            raise ValueError("no cache in this replica")
        if bool(x.isnan().any()):  # a check on values: fx cannot trace it, kept whole
            raise ValueError("NaN input")
        h = self.fc(x)  # (B, D)
        return h if attention_mask is None else h * attention_mask  # (B, D)


class _DecoratedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.body = _Body(6)
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))  # (B, 6)
        mask = torch.sigmoid(h)  # (B, 6)
        h = self.body(h, attention_mask=mask, use_cache=None)  # (B, 6)
        return self.down(torch.relu(self.up(h)))  # (B, 3)


def test_decorated_opaque_submodule_called_by_keyword_is_gated() -> None:
    """Was a TypeError in gate_ ("got multiple values for argument 'use_cache'"): the keyword
    call was recorded positionally, and the wrapper filled the keyword again."""
    torch.manual_seed(0)
    model, x = _DecoratedNet().eval(), torch.randn(4, 5)
    with torch.no_grad():
        before = model(x)  # (4, 3)
    with pytest.warns(UserWarning, match="'body'"):
        summary = gate_(model, x)
    assert summary.n_gates == 10  # up's units; body's inputs and outputs are kept
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0.0, atol=1e-6)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_decorated_opaque_submodule_prunes_exactly(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, x = _DecoratedNet(), torch.randn(3, 5, generator=gen)
    with pytest.warns(UserWarning, match="kept whole"):
        gate_(model, x)
    random_gates(model, gen)
    check_pruned(model, x, gen, factory=_DecoratedNet, batches=(1, 4))


class _T5LayerNorm(nn.Module):
    """transformers/models/t5/modeling_t5.py:60-72, plus a check of the input's values that
    fx cannot trace, so gate_ keeps it whole (T5's own ``if self.weight.dtype in
    [torch.float16, torch.bfloat16]:``, line 70, kept it whole until gate_ traced branches on
    dtypes); ``cost`` counts it as code (no products: 0 FLOPs)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        if hidden_states.isnan().any():  # a value check: fx cannot trace it (kept whole)
            raise ValueError("NaN input")
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)  # (B, 1)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)  # (B, D)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states  # (B, D)


class _HalfAwareProjection(nn.Module):
    """The same dtype check before a product of its own (``x @ W^T``): kept whole by gate_,
    counted as code by cost (2 per multiply-accumulate)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        if x.isnan().any():  # a value check: fx cannot trace it (kept whole)
            raise ValueError("NaN input")
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            x = x.to(self.weight.dtype)
        return x @ self.weight.t()  # (B, d_out)


class _NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 8)
        self.norm = _T5LayerNorm(8)
        self.proj = _HalfAwareProjection(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.b(torch.relu(self.a(x)))  # (B, 8)
        return self.head(torch.relu(self.proj(self.norm(h))))  # (B, 3)


def test_opaque_code_leaves_are_counted_by_gate_as_by_cost() -> None:
    """Was cost()'s 'does not know how to count these leaf modules' TypeError from gate_,
    though cost(model) counted the same modules as code."""
    torch.manual_seed(0)
    model, x = _NormNet(), torch.randn(2, 4)
    dense = gp.cost(model, x)
    proj_flops = 2 * 2 * 8 * 6  # x @ W^T: 2 per multiply-accumulate
    linears = 2 * 2 * (4 * 16 + 16 * 8 + 6 * 3) + 2 * (16 + 8 + 3)
    params = (4 * 16 + 16) + (16 * 8 + 8) + 8 + 8 * 6 + (6 * 3 + 3)
    assert (dense.flops, dense.params) == (linears + proj_flops, params)
    with pytest.warns(UserWarning, match="T5LayerNorm"):
        summary = gate_(model, x)
    assert summary.n_gates == 16
    with torch.no_grad():
        for gate in inserted_gating(model).group_gates:
            gate.log_alpha.fill_(20.0)  # open: the gated model is the dense one
    hard = gp.cost(model.eval(), x, hard=True).detach()
    assert (hard.flops, hard.params) == (dense.flops, dense.params)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_opaque_code_leaves_prune_exactly(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, x = _NormNet(), torch.randn(3, 4, generator=gen)
    with pytest.warns(UserWarning, match="kept whole"):
        gate_(model, x)
    random_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory=_NormNet, batches=(1, 5))
    kept = pruned.a.out_features
    c = gp.cost(pruned, x)
    proj_flops = 2 * 3 * 8 * 6
    linears = 2 * 3 * (4 * kept + kept * 8 + 6 * 3) + 3 * (kept + 8 + 3)
    assert c.flops == linears + proj_flops


def _dynamic_rope_update(rope_forward: Callable[..., Any]) -> Callable[..., Any]:
    """transformers/modeling_rope_utils.py ``dynamic_rope_update``'s wrapper for the default
    rope type: ``return rope_forward(self, x, position_ids, **kwargs)``."""

    @functools.wraps(rope_forward)
    def wrapper(self: nn.Module, x: Tensor, position_ids: Tensor, layer_type: Any = None) -> Any:
        return rope_forward(self, x, position_ids)

    return wrapper


class _Rotary(nn.Module):
    """transformers/models/llama/modeling_llama.py:73-116 ``LlamaRotaryEmbedding``: its
    frequencies are non-persistent buffers (``self.inv_freq = nn.Buffer(inv_freq,
    persistent=False)``, line 87); ``matmul=True`` computes them as transformers 4.x did,
    ``inv_freq_expanded.float() @ position_ids_expanded.float()``, an outer product."""

    def __init__(self, dim: int, matmul: bool = False) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)
        self.attention_scaling = 1.0
        self.matmul = matmul

    @_dynamic_rope_update
    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq.to(device=x.device, dtype=torch.float)  # (dim / 2,)
        if self.matmul:
            b = position_ids.shape[0]
            inv_expanded = inv[None, :, None].expand(b, -1, 1)  # (B, dim / 2, 1)
            pos = position_ids[:, None, :].float()  # (B, 1, T)
            freqs = (inv_expanded @ pos).transpose(1, 2)  # (B, T, dim / 2)
        else:
            freqs = position_ids[..., None].float() * inv  # (B, T, dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim)
        cos = emb.cos() * self.attention_scaling  # (B, T, dim)
        sin = emb.sin() * self.attention_scaling  # (B, T, dim)
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    """transformers/models/llama/modeling_llama.py:119-123."""
    x1 = x[..., : x.shape[-1] // 2]  # (B, H, T, D / 2)
    x2 = x[..., x.shape[-1] // 2 :]  # (B, H, T, D / 2)
    return torch.cat((-x2, x1), dim=-1)  # (B, H, T, D)


class _RopeAttention(nn.Module):
    """A Llama-style attention block (rotary q and k, eager scores) and an MLP."""

    def __init__(self, d: int = 8, heads: int = 2, ffn: int = 12, matmul: bool = False) -> None:
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.rotary_emb = _Rotary(self.hd, matmul)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        position_ids = torch.arange(t, device=x.device).unsqueeze(0)  # (1, T)
        cos, sin = self.rotary_emb(x, position_ids=position_ids)  # each (1, T, hd)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, T, hd)
        q = self.q(x).view(b, t, self.heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(b, t, self.heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        v = self.v(x).view(b, t, self.heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        q = q * cos + _rotate_half(q) * sin  # (B, H, T, hd)
        k = k * cos + _rotate_half(k) * sin  # (B, H, T, hd)
        w = torch.softmax(q @ k.transpose(-2, -1) / self.hd**0.5, dim=-1)  # (B, H, T, T)
        a = (w @ v).transpose(1, 2).reshape(b, t, -1)  # (B, T, D)
        h = x + self.o(a)  # (B, T, D)
        return h + self.down(torch.relu(self.up(h)))  # (B, T, D)


@pytest.mark.parametrize("matmul", [False, True])
def test_cost_counts_a_rotary_embedding_with_non_persistent_buffers(matmul: bool) -> None:
    """Was cost()'s TypeError ('register them with register_cost'): a leaf holding buffers.
    Its non-persistent buffers are constants of its code, counted as code: the element-wise
    ``position_ids[..., None] * inv_freq`` is free, the 4.x outer product ``inv_freq @
    positions`` 2 per product (contracted size 1)."""
    b, t, d, heads, ffn = 2, 5, 8, 2, 12
    model, x = _RopeAttention(d, heads, ffn, matmul), torch.randn(b, t, d)
    c = gp.cost(model, x)
    projections = 4 * 2 * b * t * d * d
    scores = 2 * 2 * b * heads * t * t * (d // heads)  # q k^T and w v
    mlp = 2 * b * t * d * ffn * 2 + b * t * (ffn + d)
    rope = 2 * 1 * t * (d // heads) // 2 if matmul else 0  # position_ids is (1, T)
    assert c.flops == projections + scores + mlp + rope
    assert c.params == 4 * d * d + d * ffn + ffn + ffn * d + d


class _RunningScale(nn.Module):
    """A leaf of your own with a persistent buffer (state no rule says how to count)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.register_buffer("running_scale", torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.isnan().any()):  # kept whole by gate_
            raise ValueError("NaN input")
        return x * self.running_scale  # (B, D)


def test_a_leaf_with_a_persistent_buffer_is_still_refused() -> None:
    model, x = nn.Sequential(nn.Linear(3, 4), _RunningScale(4), nn.Linear(4, 2)), torch.randn(2, 3)
    with pytest.raises(TypeError, match=r"1 \(_RunningScale\).*register_cost"):
        gp.cost(model, x)
    with (
        pytest.warns(UserWarning, match="_RunningScale"),
        pytest.raises(TypeError, match=r"1 \(_RunningScale\).*register_cost"),
    ):
        gate_(model, x)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), matmul=st.booleans())
def test_rope_attention_is_gated_and_prunes_exactly(seed: int, matmul: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, x = _RopeAttention(matmul=matmul), torch.randn(2, 5, 8, generator=gen)
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    assert summary.channel_groups == [(["q", "k", "v"], 2), (["up"], 12)]  # heads, units
    assert len(summary.blocks) == 2
    random_gates(model, gen)
    pruned = check_pruned(
        model, x, gen, factory=lambda: _RopeAttention(matmul=matmul), batches=(1, 3)
    )
    assert gp.cost(pruned, x).flops <= dense.flops
