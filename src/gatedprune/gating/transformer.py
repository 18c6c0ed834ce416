"""Transformer encoder and decoder layers: gates on attention heads, FFN units and whole
sub-layers.

``nn.TransformerEncoderLayer`` is an fx leaf (its fast path cannot be traced), so ``gate_``
switches each gated layer (and its ``self_attn``) to a subclass whose ``forward`` is the
documented slow path written out, with gates::

    attn(x) = g_attn * out_proj(concat_h  u_h * softmax(q_h k_h^T / sqrt(d) + mask) v_h)
    ffn(x)  = g_ffn  * linear2(s * act(linear1(x)))           (s: one gate per hidden unit)

(``norm_first`` or post-norm residual wiring as in PyTorch). Parameters and ``state_dict`` keys
are unchanged. Pruning folds head gates into ``out_proj``'s columns, unit gates into
``linear2``'s columns and the sub-layer gates into their output Linear, then rebuilds the layer
as :class:`PrunedTransformerEncoderLayer` (same parameter names, fewer heads and units, a
closed sub-layer removed with its LayerNorm when ``norm_first``). ``num_heads`` and
``head_dim`` are updated consistently (the head dimension is kept, the number of heads shrinks).
A layer with nothing removed goes back to ``nn.TransformerEncoderLayer``.

``nn.TransformerEncoder`` (also an fx leaf) is switched to :class:`TracedTransformerEncoder`,
whose ``forward`` is the plain loop over its layers, so its layers are visible to the analysis.

``nn.TransformerDecoderLayer`` is done the same way (:class:`GatedTransformerDecoderLayer`):
head gates on ``self_attn`` and, apart, on ``multihead_attn`` (cross-attention, keys and values
from ``memory``), unit gates in the FFN, and three sub-layer gates (self-attention,
cross-attention, FFN), pruned to :class:`PrunedTransformerDecoderLayer`; ``nn.TransformerDecoder``
is switched to :class:`TracedTransformerDecoder`. ``nn.Transformer.forward`` cannot be traced
by fx (it checks shapes in Python): a model gets decoder gates by calling ``t.encoder`` and
``t.decoder`` itself.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..costs import (
    ACT_FLOPS,
    FLOPS_PER_MAC,
    LAYERNORM_FLOPS,
    attention_flops,
    register_cost,
    seq_dims,
)

__all__ = [
    "GatedMultiheadAttention",
    "GatedTransformerDecoderLayer",
    "GatedTransformerEncoderLayer",
    "PrunedMultiheadAttention",
    "PrunedTransformerDecoderLayer",
    "PrunedTransformerEncoderLayer",
    "TracedTransformerDecoder",
    "TracedTransformerEncoder",
    "attention",
]


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return zeros.masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _shape(t: Tensor) -> str:
    """``str(tuple(t.shape))``, written so that TorchScript compiles it.

    >>> _shape(torch.zeros(2, 3)), _shape(torch.zeros(4))
    ('(2, 3)', '(4,)')
    """
    dims = [str(int(d)) for d in t.shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _additive_mask(
    mask: Tensor | None, n: int, heads: int, len_q: int, len_kv: int, dtype: torch.dtype
) -> Tensor | None:
    if mask is None:
        return None
    dims = mask.shape
    fits = (mask.dim() == 2 and dims[0] == len_q and dims[1] == len_kv) or (
        mask.dim() == 3 and dims[0] == n * heads and dims[1] == len_q and dims[2] == len_kv
    )
    if not fits:
        raise ValueError(
            f"attn_mask has shape {_shape(mask)}; expected ({len_q}, {len_kv}) or "
            f"(batch * num_heads, L, S) = ({n * heads}, {len_q}, {len_kv})"
        )
    mask = _additive(mask, dtype)
    if mask.dim() == 2:
        return mask.view(1, 1, len_q, len_kv)  # (1, 1, L, S)
    return mask.view(n, heads, len_q, len_kv)  # (N, H, L, S)


def select_head_masks(
    mask: Tensor | None, kept: list[int], source_heads: int, batch: int
) -> Tensor | None:
    """The rows of a per-head ``(batch * source_heads, L, S)`` attention mask that belong to
    the ``kept`` heads, ``(batch * len(kept), L, S)``. Other masks (2-D, None, or 3-D with
    ``batch * len(kept)`` rows already) pass through unchanged.

    >>> m = torch.arange(8.0).view(4, 1, 2)  # batch 2 x 2 heads
    >>> select_head_masks(m, [1], 2, 2).flatten().tolist()
    [2.0, 3.0, 6.0, 7.0]
    """
    if mask is None or mask.dim() != 3 or mask.shape[0] != batch * source_heads:
        return mask
    if kept == list(range(source_heads)):
        return mask
    idx = torch.tensor(kept, dtype=torch.long, device=mask.device)
    per_head = mask.view(batch, source_heads, mask.shape[1], mask.shape[2])  # (N, H0, L, S)
    return per_head.index_select(1, idx).flatten(0, 1)  # (N * H, L, S)


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    params: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    heads: int,
    head_dim: int,
    batch_first: bool,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout: float = 0.0,
    head_gates: Tensor | None = None,
    need_weights: bool = False,
    average_attn_weights: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention written out (the math of ``F.multi_head_attention_forward``).

    ``params = (in_proj_weight (3*heads*head_dim, E), in_proj_bias, out_proj weight, bias)``;
    ``head_gates`` ``(heads,)`` multiply each head's output before the output projection.

    >>> q = torch.randn(2, 3, 4)
    >>> w, b = torch.randn(12, 4), torch.zeros(12)
    >>> out, _ = attention(q, q, q, (w, b, torch.randn(4, 4), None), 2, 2, batch_first=True)
    >>> tuple(out.shape)
    (2, 3, 4)
    """
    w_in, b_in, w_out, b_out = params
    unbatched = query.dim() == 2
    if unbatched:
        # (1, L, E), (1, S, E), (1, S, E)
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
    elif not batch_first:
        # (L, N, E) -> (N, L, E); key, value (S, N, E) -> (N, S, E)
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    n, len_q, _ = query.shape  # (N, L, E)
    len_kv = key.shape[1]
    inner = heads * head_dim
    w_q, w_k, w_v = w_in[:inner], w_in[inner : 2 * inner], w_in[2 * inner :]
    b_q: Tensor | None = None
    b_k: Tensor | None = None
    b_v: Tensor | None = None
    if b_in is not None:
        b_q, b_k, b_v = b_in[:inner], b_in[inner : 2 * inner], b_in[2 * inner :]
    q = F.linear(query, w_q, b_q).view(n, len_q, heads, head_dim).transpose(1, 2)  # (N,H,L,d)
    k = F.linear(key, w_k, b_k).view(n, len_kv, heads, head_dim).transpose(1, 2)  # (N,H,S,d)
    v = F.linear(value, w_v, b_v).view(n, len_kv, heads, head_dim).transpose(1, 2)  # (N,H,S,d)
    scores = (q / math.sqrt(head_dim)) @ k.transpose(-2, -1)  # (N, H, L, S)
    mask = _additive_mask(attn_mask, n, heads, len_q, len_kv, scores.dtype)
    if mask is None and is_causal:
        causal = torch.ones(len_q, len_kv, dtype=torch.bool, device=q.device).triu(1)  # (L, S)
        mask = _additive_mask(causal, n, heads, len_q, len_kv, scores.dtype)
    if mask is not None:
        scores = scores + mask
    if key_padding_mask is not None:
        kpm = key_padding_mask.shape
        if key_padding_mask.dim() != 2 or kpm[0] != n or kpm[1] != len_kv:
            raise ValueError(
                f"key_padding_mask has shape {_shape(key_padding_mask)}; expected "
                f"(batch, S) = ({n}, {len_kv})"
            )
        # (N, H, L, S)
        scores = scores + _additive(key_padding_mask, scores.dtype).view(n, 1, 1, len_kv)
    weights = torch.softmax(scores, dim=-1)  # (N, H, L, S)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    out = weights @ v  # (N, H, L, d)
    if head_gates is not None:
        out = out * head_gates.to(out.dtype).view(1, heads, 1, 1)  # (N, H, L, d)
    out = F.linear(out.transpose(1, 2).reshape(n, len_q, inner), w_out, b_out)  # (N, L, E)
    if unbatched:
        out = out.squeeze(0)  # (L, E)
    elif not batch_first:
        out = out.transpose(0, 1)  # (L, N, E)
    if not need_weights:
        return out, None
    w = weights.mean(dim=1) if average_attn_weights else weights  # (N, L, S) or (N, H, L, S)
    return out, (w.squeeze(0) if unbatched else w)


class _Ref:
    """Plain (non-module) link from a switched layer to the gating holding its gates."""

    def __init__(
        self,
        gating: Any,
        index: int,
        base: type[nn.Module],
        kind: str = "layer",
        heads: str = "heads",
    ) -> None:
        self.gating = gating
        self.index = index
        self.base = base
        # "layer" (encoder layer), "decoder" (decoder layer) or "mha" (attention called by
        # user code)
        self.kind = kind
        self.heads = heads  # an attention's key among the values: "heads" or "cross_heads"

    def values(self) -> dict[str, Tensor]:
        if self.kind == "mha":
            return dict(self.gating.attention_values(self.index))
        if self.kind == "decoder":
            return dict(self.gating.decoder_values(self.index))
        return dict(self.gating.transformer_values(self.index))

    def head_values(self) -> Tensor:
        """The head gates of the attention holding this reference."""
        return self.values()[getattr(self, "heads", "heads")]  # (absent: pickled before)


def _mha_forward(
    m: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
    head_gates: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    return attention(
        query,
        key,
        value,
        (m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias),
        m.num_heads,
        m.head_dim,
        batch_first=m.batch_first,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        is_causal=is_causal,
        dropout=m.dropout if m.training else 0.0,
        head_gates=head_gates,
        need_weights=need_weights,
        average_attn_weights=average_attn_weights,
    )


class GatedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with head gates (set by ``gate_``; same parameters)."""

    _gp_ref: _Ref

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        gates = self._gp_ref.head_values()
        return _mha_forward(
            self,
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
            gates,
        )


def _no_empty_init_warning() -> contextlib.AbstractContextManager[None]:
    """Silence PyTorch's warning that initialising a zero-element weight does nothing (a
    pruned attention without heads, an FFN without units: their weights are copied anyway)."""
    return _filtered("Initializing zero-element tensors is a no-op")


@contextlib.contextmanager
def _filtered(message: str) -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message)
        yield


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` (``num_heads * head_dim``
    may be smaller than ``embed_dim``); parameter names as in ``nn.MultiheadAttention``.
    ``kept_heads`` are the indices of its heads among the ``source_heads`` of the module it was
    pruned from (default: all of them): a per-head ``(N * source_heads, L, S)`` ``attn_mask``,
    written for the unpruned module, is reduced to the kept heads' rows.

    >>> m = PrunedMultiheadAttention(8, 1, 4, batch_first=True)
    >>> tuple(m(torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8))[0].shape)
    (2, 3, 8)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        out_bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        kept_heads: list[int] | None = None,
        source_heads: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kept_heads = tuple(range(num_heads) if kept_heads is None else kept_heads)
        self.source_heads = num_heads if source_heads is None else source_heads
        if len(self.kept_heads) != num_heads or any(
            not 0 <= h < self.source_heads for h in self.kept_heads
        ):
            raise ValueError(
                f"kept_heads {list(self.kept_heads)} must be {num_heads} indices in "
                f"[0, {self.source_heads})"
            )
        self.batch_first = batch_first
        self.dropout = dropout
        inner = num_heads * head_dim
        w = torch.empty(3 * inner, embed_dim, device=device, dtype=dtype)  # (3 H d, E)
        self.in_proj_weight = nn.Parameter(w)
        b = torch.zeros(3 * inner, device=device, dtype=dtype)  # (3 H d,)
        self.in_proj_bias = nn.Parameter(b) if bias else None
        with _no_empty_init_warning():  # all heads pruned: zero-size weights
            self.out_proj = nn.Linear(inner, embed_dim, bias=out_bias, device=device, dtype=dtype)
            nn.init.xavier_uniform_(self.in_proj_weight)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batch = 1 if query.dim() == 2 else query.shape[0 if self.batch_first else 1]
        if attn_mask is not None and attn_mask.dim() == 3:  # per-head rows: the kept heads'
            kept: list[int] = [h for h in self.kept_heads]  # (TorchScript: tuple to list)
            attn_mask = select_head_masks(attn_mask, kept, self.source_heads, batch)
        return attention(
            query,
            key,
            value,
            (self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias),
            self.num_heads,
            self.head_dim,
            batch_first=self.batch_first,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            dropout=self.dropout if self.training else 0.0,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
        )


def _activation(layer: nn.TransformerEncoderLayer) -> Callable[[Tensor], Tensor]:
    return layer.activation


class GatedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` with head, FFN-unit and sub-layer gates (slow path)."""

    _gp_ref: _Ref

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        g = self._gp_ref.values()
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal, g)
            x = x + self._ff(self.norm2(x), g)
        else:
            x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal, g))
            x = self.norm2(x + self._ff(x, g))
        return x

    def _sa(
        self,
        x: Tensor,
        mask: Tensor | None,
        kpm: Tensor | None,
        is_causal: bool,
        g: dict[str, Tensor],
    ) -> Tensor:
        return _gated_attention(
            self.self_attn, self.dropout1, x, x, mask, kpm, is_causal, g["attn"]
        )

    def _ff(self, x: Tensor, g: dict[str, Tensor]) -> Tensor:
        return _gated_ffn(self, self.dropout2, x, g)


def _gated_attention(
    att: nn.MultiheadAttention,
    out_dropout: nn.Module,
    x: Tensor,
    kv: Tensor,
    mask: Tensor | None,
    kpm: Tensor | None,
    is_causal: bool,
    gate: Tensor,
) -> Tensor:
    """An attention sub-layer of an encoder or decoder layer (queries from ``x``, keys and
    values from ``kv``: ``x`` itself, or a decoder's memory) times its sub-layer gate
    ``gate`` (``out_dropout``: the sub-layer's dropout)."""
    y = att(
        x, kv, kv, attn_mask=mask, key_padding_mask=kpm, need_weights=False, is_causal=is_causal
    )[0]  # (..., E)
    out: Tensor = out_dropout(y) * gate.to(y.dtype)[0]  # (..., E)
    return out


def _gated_ffn(
    layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer,
    out_dropout: nn.Module,
    x: Tensor,
    g: dict[str, Tensor],
) -> Tensor:
    """The feed-forward sub-layer of an encoder or decoder layer with its unit gates
    ``g["units"]`` and sub-layer gate ``g["ffn"]`` (``out_dropout``: the sub-layer's)."""
    h = layer.activation(layer.linear1(x)) * g["units"].to(x.dtype)  # (..., F)
    y = layer.linear2(layer.dropout(h))  # (..., E)
    out: Tensor = out_dropout(y) * g["ffn"].to(y.dtype)[0]  # (..., E)
    return out


class PrunedTransformerEncoderLayer(nn.Module):
    """A pruned ``nn.TransformerEncoderLayer``: fewer heads and FFN units; ``self_attn`` /
    ``linear1``+``linear2`` (and ``activation``) are None when that sub-layer was removed.
    Parameter names as in PyTorch's layer.
    """

    def __init__(
        self,
        self_attn: PrunedMultiheadAttention | None,
        ffn: tuple[nn.Linear, nn.Linear] | None,
        norm1: nn.LayerNorm | None,
        norm2: nn.LayerNorm | None,
        activation: Callable[[Tensor], Tensor],
        *,
        norm_first: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.linear1 = ffn[0] if ffn is not None else None
        self.linear2 = ffn[1] if ffn is not None else None
        self.norm1 = norm1
        self.norm2 = norm2
        # the activation goes with the FFN (an nn.PReLU holds a parameter)
        self.activation = activation if ffn is not None else None
        self.norm_first = norm_first
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = src
        if self.norm_first:
            if self.self_attn is not None:
                assert self.norm1 is not None
                x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            if self.linear1 is not None:
                assert self.norm2 is not None
                x = x + self._ff(self.norm2(x))
            return x
        assert self.norm1 is not None
        assert self.norm2 is not None
        if self.self_attn is not None:
            x = x + self._sa(x, src_mask, src_key_padding_mask, is_causal)
        x = self.norm1(x)
        if self.linear1 is not None:
            x = x + self._ff(x)
        out: Tensor = self.norm2(x)
        return out

    def _sa(self, x: Tensor, mask: Tensor | None, kpm: Tensor | None, is_causal: bool) -> Tensor:
        assert self.self_attn is not None
        y = self.self_attn(
            x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False, is_causal=is_causal
        )[0]
        return self.dropout1(y)  # type: ignore[no-any-return]

    def _ff(self, x: Tensor) -> Tensor:
        assert self.linear1 is not None
        assert self.linear2 is not None
        # h (..., F); activation is set with linear1 (TorchScript cannot compare a function
        # attribute with None)
        h = self.activation(self.linear1(x))  # type: ignore[misc]
        return self.dropout2(self.linear2(self.dropout(h)))  # type: ignore[no-any-return]


class TracedTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` whose ``forward`` is the plain loop over its layers (no fast
    path or nested tensors; the same function), so fx can trace into it."""

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(
                x,
                src_mask=mask,
                src_key_padding_mask=src_key_padding_mask,
                is_causal=is_causal is not None and is_causal,  # None: False
            )
        if self.norm is not None:
            x = self.norm(x)
        return x


class GatedTransformerDecoderLayer(nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer`` with head gates on ``self_attn`` and on
    ``multihead_attn`` (cross-attention), FFN-unit gates and three sub-layer gates
    (self-attention, cross-attention, FFN) (slow path)."""

    _gp_ref: _Ref

    def __setstate__(self, state: dict[str, Any]) -> None:
        # PyTorch's sets state["activation"] = F.relu when the activation is not in the
        # instance dict, as a module activation (nn.PReLU) is not: a deep copy (prune's) or a
        # pickle would then compute relu. Keep a registered activation module.
        if "activation" not in state and "activation" in state.get("_modules", {}):
            nn.Module.__setstate__(self, state)  # type: ignore[no-untyped-call]
        else:
            super().__setstate__(state)  # type: ignore[no-untyped-call]

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        g = self._gp_ref.values()
        x = tgt  # (N, T, E), (T, N, E) or (T, E)
        if self.norm_first:
            x = x + self._sa(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal, g)
            x = x + self._ca(
                self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal, g
            )
            x = x + _gated_ffn(self, self.dropout3, self.norm3(x), g)
        else:
            x = self.norm1(x + self._sa(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal, g))
            x = self.norm2(
                x + self._ca(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal, g)
            )
            x = self.norm3(x + _gated_ffn(self, self.dropout3, x, g))
        return x

    def _sa(
        self,
        x: Tensor,
        mask: Tensor | None,
        kpm: Tensor | None,
        is_causal: bool,
        g: dict[str, Tensor],
    ) -> Tensor:
        return _gated_attention(
            self.self_attn, self.dropout1, x, x, mask, kpm, is_causal, g["attn"]
        )

    def _ca(
        self,
        x: Tensor,
        mem: Tensor,
        mask: Tensor | None,
        kpm: Tensor | None,
        is_causal: bool,
        g: dict[str, Tensor],
    ) -> Tensor:
        att = self.multihead_attn
        return _gated_attention(att, self.dropout2, x, mem, mask, kpm, is_causal, g["cross"])


class PrunedTransformerDecoderLayer(nn.Module):
    """A pruned ``nn.TransformerDecoderLayer``: fewer self- and cross-attention heads and FFN
    units; ``self_attn``, ``multihead_attn`` or ``linear1``+``linear2`` (and ``activation``)
    are None when that sub-layer was removed (with its LayerNorm when ``norm_first``).
    Parameter names as in PyTorch's layer.

    >>> att = PrunedMultiheadAttention(8, 1, 4, batch_first=True)
    >>> layer = PrunedTransformerDecoderLayer(
    ...     att, None, None, (nn.LayerNorm(8), nn.LayerNorm(8), nn.LayerNorm(8)), F.relu,
    ...     norm_first=False)
    >>> tuple(layer(torch.randn(2, 3, 8), torch.randn(2, 5, 8)).shape)
    (2, 3, 8)
    """

    def __init__(
        self,
        self_attn: PrunedMultiheadAttention | None,
        multihead_attn: PrunedMultiheadAttention | None,
        ffn: tuple[nn.Linear, nn.Linear] | None,
        norms: tuple[nn.LayerNorm | None, nn.LayerNorm | None, nn.LayerNorm | None],
        activation: Callable[[Tensor], Tensor],
        *,
        norm_first: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not norm_first and any(n is None for n in norms):
            raise ValueError(
                "a post-norm (norm_first=False) decoder layer needs all three LayerNorms, "
                f"got {[n is not None for n in norms]} (True: given)"
            )
        self.self_attn = self_attn
        self.multihead_attn = multihead_attn
        self.linear1 = ffn[0] if ffn is not None else None
        self.linear2 = ffn[1] if ffn is not None else None
        self.norm1, self.norm2, self.norm3 = norms
        # the activation goes with the FFN (an nn.PReLU holds a parameter)
        self.activation = activation if ffn is not None else None
        self.norm_first = norm_first
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        x = tgt  # (N, T, E), (T, N, E) or (T, E)
        if self.norm_first:
            if self.self_attn is not None:
                assert self.norm1 is not None
                x = x + self._sa(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            if self.multihead_attn is not None:
                assert self.norm2 is not None
                x = x + self._ca(
                    self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal
                )
            if self.linear1 is not None:
                assert self.norm3 is not None
                x = x + self._ff(self.norm3(x))
            return x
        assert self.norm1 is not None
        assert self.norm2 is not None
        assert self.norm3 is not None
        if self.self_attn is not None:
            x = x + self._sa(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = self.norm1(x)
        if self.multihead_attn is not None:
            x = x + self._ca(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x = self.norm2(x)
        if self.linear1 is not None:
            x = x + self._ff(x)
        out: Tensor = self.norm3(x)
        return out

    def _sa(self, x: Tensor, mask: Tensor | None, kpm: Tensor | None, is_causal: bool) -> Tensor:
        assert self.self_attn is not None
        y = self.self_attn(
            x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False, is_causal=is_causal
        )[0]
        return self.dropout1(y)  # type: ignore[no-any-return]

    def _ca(
        self, x: Tensor, mem: Tensor, mask: Tensor | None, kpm: Tensor | None, is_causal: bool
    ) -> Tensor:
        assert self.multihead_attn is not None
        y = self.multihead_attn(
            x,
            mem,
            mem,
            attn_mask=mask,
            key_padding_mask=kpm,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout2(y)  # type: ignore[no-any-return]

    def _ff(self, x: Tensor) -> Tensor:
        assert self.linear1 is not None
        assert self.linear2 is not None
        # h (..., F); activation is set with linear1 (TorchScript cannot compare a function
        # attribute with None)
        h = self.activation(self.linear1(x))  # type: ignore[misc]
        return self.dropout3(self.linear2(self.dropout(h)))  # type: ignore[no-any-return]


class TracedTransformerDecoder(nn.TransformerDecoder):
    """``nn.TransformerDecoder`` whose ``forward`` is the plain loop over its layers (the same
    function: a ``tgt_mask`` is used as given, so detecting whether it is causal changes
    nothing), so fx can trace into it and ``cost`` counts its layers one by one."""

    _gp_traced_stack = True  # costs.unit_handler: not a unit (its layers are)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        x = tgt
        for layer in self.layers:
            x = layer(
                x,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=tgt_is_causal is not None and tgt_is_causal,  # None: False
                memory_is_causal=memory_is_causal,
            )
        if self.norm is not None:
            x = self.norm(x)
        return x


def prepare_encoders(model: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
    """Switch every ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` in ``model`` to
    :class:`TracedTransformerEncoder` / :class:`TracedTransformerDecoder`; returns the
    switched modules with their classes before (to switch them back).

    >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2), 1, enable_nested_tensor=False)
    >>> [type(m).__name__ for m, _ in prepare_encoders(enc)], type(enc).__name__
    (['TracedTransformerEncoder'], 'TracedTransformerEncoder')
    """
    switched: list[tuple[nn.Module, type[nn.Module]]] = []
    for m in model.modules():
        if type(m) is nn.TransformerEncoder:
            switched.append((m, nn.TransformerEncoder))
            m.__class__ = TracedTransformerEncoder
        elif type(m) is nn.TransformerDecoder:
            switched.append((m, nn.TransformerDecoder))
            m.__class__ = TracedTransformerDecoder
    return switched


def gateable_attention(m: nn.Module) -> str | None:
    """None if ``gate_`` can gate the heads of attention module ``m``, else why not."""
    if type(m) is not nn.MultiheadAttention:
        return "not a plain nn.MultiheadAttention"
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return "attention with kdim/vdim, bias_k/bias_v or add_zero_attn"
    return None


def attention_cost(
    att: nn.MultiheadAttention, q_shape: tuple[int, ...], kv_shape: tuple[int, ...]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(per-head, constant) (FLOPs, params) of attention on inputs of these shapes."""
    e = att.embed_dim
    batch, len_q = seq_dims(torch.empty(q_shape, device="meta"), att.batch_first)
    _, len_kv = seq_dims(torch.empty(kv_shape, device="meta"), att.batch_first)
    in_bias = att.in_proj_bias is not None
    out_bias = att.out_proj.bias is not None
    d = att.head_dim

    def af(h: int) -> int:
        return attention_flops(batch, len_q, len_kv, (e, e, e, e), h, d, in_bias, out_bias)

    head_params = d * (3 * e + (3 if in_bias else 0)) + d * e
    return (af(1) - af(0), head_params), (af(0), e if out_bias else 0)


def gateable_layer(m: nn.Module) -> str | None:
    """None if ``m`` is an encoder layer ``gate_`` can gate, else why not."""
    if type(m) is not nn.TransformerEncoderLayer:
        return "not a plain nn.TransformerEncoderLayer"
    att = m.self_attn
    if type(att) is not nn.MultiheadAttention:
        return "self_attn is not a plain nn.MultiheadAttention"
    if not att._qkv_same_embed_dim or att.bias_k is not None or att.add_zero_attn:
        return "attention with kdim/vdim, bias_k/bias_v or add_zero_attn"
    return None


def gateable_decoder_layer(m: nn.Module) -> str | None:
    """None if ``m`` is a decoder layer ``gate_`` can gate, else why not.

    >>> gateable_decoder_layer(nn.TransformerDecoderLayer(8, 2)) is None
    True
    """
    if type(m) is not nn.TransformerDecoderLayer:
        return "not a plain nn.TransformerDecoderLayer"
    for attr in ("self_attn", "multihead_attn"):
        why = gateable_attention(getattr(m, attr))
        if why is not None:
            return f"{attr}: {why}"
    registered = m._modules.get("activation")
    if registered is not None and m.activation is not registered:
        tensors = [*registered.parameters(), *registered.buffers()]
        if tensors:
            return (
                f"its activation module ({type(registered).__name__}, holding tensors) is not "
                f"what it calls ({_name_of(m.activation)}): a copy of an "
                "nn.TransformerDecoderLayer, as nn.TransformerDecoder makes of its layer, "
                "replaces a module activation with F.relu (PyTorch's __setstate__), leaving "
                "the module's tensors unused; pass the activation as a function"
            )
    return None


def _name_of(fn: object) -> str:
    return str(getattr(fn, "__qualname__", type(fn).__name__))


@dataclass
class LayerCost:
    """Cost of an encoder layer as ``per_head * heads + attn0`` etc. (FLOPs, params)."""

    head: tuple[int, int]
    attn0: tuple[int, int]
    unit: tuple[int, int]
    ffn0: tuple[int, int]
    norm1: tuple[int, int]
    norm2: tuple[int, int]


def _norm_cost(norm: nn.LayerNorm | None, tokens: int, e: int) -> tuple[int, int]:
    if norm is None:
        return 0, 0
    return LAYERNORM_FLOPS * tokens * e, sum(p.numel() for p in norm.parameters())


def layer_cost(
    layer: nn.TransformerEncoderLayer | PrunedTransformerEncoderLayer,
    x_shape: tuple[int, ...],
    *,
    att: nn.MultiheadAttention | PrunedMultiheadAttention | None = None,
    ffn: tuple[nn.Linear, nn.Linear] | None = None,
) -> LayerCost:
    """Cost decomposition of an encoder layer on an input of ``x_shape``."""
    att = att if att is not None else layer.self_attn
    assert att is not None
    lin = ffn if ffn is not None else (layer.linear1, layer.linear2)
    e = att.embed_dim
    batch, length = seq_dims(torch.empty(x_shape, device="meta"), att.batch_first)
    tokens = batch * length
    in_bias = att.in_proj_bias is not None
    out_bias = att.out_proj.bias is not None
    d = att.head_dim
    dims = (e, e, e, e)

    def af(h: int) -> int:
        return attention_flops(batch, length, length, dims, h, d, in_bias, out_bias)

    head_params = d * (3 * e + (3 if in_bias else 0)) + d * e
    l1, l2 = lin
    assert l1 is not None
    assert l2 is not None
    unit, ffn0 = _ffn_cost(l1, l2, layer.activation, tokens, e)
    return LayerCost(
        head=(af(1) - af(0), head_params),
        attn0=(af(0), e if out_bias else 0),
        unit=unit,
        ffn0=ffn0,
        norm1=_norm_cost(layer.norm1, tokens, e),
        norm2=_norm_cost(layer.norm2, tokens, e),
    )


def _ffn_cost(
    l1: nn.Linear, l2: nn.Linear, act: Any, tokens: int, e: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(per-unit, constant) (FLOPs, params) of a layer's feed-forward sub-layer on ``tokens``
    vectors of width ``e``; ``act`` (its activation) counts as a parameter holder."""
    b1 = l1.bias is not None
    b2 = l2.bias is not None
    act_params = sum(p.numel() for p in act.parameters()) if isinstance(act, nn.Module) else 0
    unit_flops = FLOPS_PER_MAC * tokens * e * 2 + (tokens if b1 else 0) + ACT_FLOPS * tokens
    return (unit_flops, 2 * e + (1 if b1 else 0)), (
        tokens * e if b2 else 0,
        (e if b2 else 0) + act_params,
    )


@dataclass
class DecoderLayerCost:
    """Cost of a decoder layer as ``head * heads + attn0``, ``cross_head * cross_heads +
    cross0``, ``unit * units + ffn0`` and its three norms, each (FLOPs, params)."""

    head: tuple[int, int]
    attn0: tuple[int, int]
    cross_head: tuple[int, int]
    cross0: tuple[int, int]
    unit: tuple[int, int]
    ffn0: tuple[int, int]
    norms: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def decoder_layer_cost(
    layer: nn.TransformerDecoderLayer, x_shape: tuple[int, ...], mem_shape: tuple[int, ...]
) -> DecoderLayerCost:
    """Cost decomposition of a decoder layer on ``tgt`` of ``x_shape`` and ``memory`` of
    ``mem_shape``.

    >>> layer = nn.TransformerDecoderLayer(8, 2, 16, batch_first=True)
    >>> c = decoder_layer_cost(layer, (2, 3, 8), (2, 5, 8))
    >>> c.unit[1], c.cross_head[1]  # params per FFN unit, per cross-attention head
    (17, 140)
    """
    sa, ca = layer.self_attn, layer.multihead_attn
    head, attn0 = attention_cost(sa, x_shape, x_shape)
    cross_head, cross0 = attention_cost(ca, x_shape, mem_shape)
    e = sa.embed_dim
    batch, length = seq_dims(torch.empty(x_shape, device="meta"), sa.batch_first)
    tokens = batch * length
    unit, ffn0 = _ffn_cost(layer.linear1, layer.linear2, layer.activation, tokens, e)
    return DecoderLayerCost(
        head=head,
        attn0=attn0,
        cross_head=cross_head,
        cross0=cross0,
        unit=unit,
        ffn0=ffn0,
        norms=(
            _norm_cost(layer.norm1, tokens, e),
            _norm_cost(layer.norm2, tokens, e),
            _norm_cost(layer.norm3, tokens, e),
        ),
    )


def _pruned_mha_flops(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    assert isinstance(m, PrunedMultiheadAttention)
    batch, len_q = seq_dims(inp[0], m.batch_first)
    _, len_kv = seq_dims(inp[1], m.batch_first)
    e = m.embed_dim
    in_bias = m.in_proj_bias is not None
    out_bias = m.out_proj.bias is not None
    return attention_flops(
        batch, len_q, len_kv, (e, e, e, e), m.num_heads, m.head_dim, in_bias, out_bias
    )


def _pruned_ffn_flops(linear1: nn.Linear | None, linear2: nn.Linear | None, x: Tensor) -> int:
    """FLOPs of a pruned layer's feed-forward sub-layer on ``x`` (0 when removed)."""
    if linear1 is None or linear2 is None:
        return 0
    e = x.shape[-1]
    tokens = x.numel() // e
    hidden = linear1.out_features
    total = FLOPS_PER_MAC * tokens * e * hidden * 2 + ACT_FLOPS * tokens * hidden
    total += tokens * hidden if linear1.bias is not None else 0
    return total + (tokens * e if linear2.bias is not None else 0)


def _pruned_layer_flops(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    if not isinstance(m, PrunedTransformerEncoderLayer):
        raise TypeError(f"expected a PrunedTransformerEncoderLayer, got {type(m).__name__}")
    x = inp[0]
    total = 0
    if m.self_attn is not None:
        total += _pruned_mha_flops(m.self_attn, (x, x, x), out)
    total += _pruned_ffn_flops(m.linear1, m.linear2, x)
    for norm in (m.norm1, m.norm2):
        if norm is not None:
            total += LAYERNORM_FLOPS * x.numel()
    return total


def _pruned_decoder_flops(m: nn.Module, inp: tuple[Tensor, ...], out: Any) -> int:
    if not isinstance(m, PrunedTransformerDecoderLayer):
        raise TypeError(f"expected a PrunedTransformerDecoderLayer, got {type(m).__name__}")
    if len(inp) < 2:
        raise TypeError(
            "cost() needs PrunedTransformerDecoderLayer called with positional tgt, memory"
        )
    x, mem = inp[0], inp[1]  # tgt (N, T, E) / (T, N, E) / (T, E); memory with S positions
    total = 0
    if m.self_attn is not None:
        total += _pruned_mha_flops(m.self_attn, (x, x, x), out)
    if m.multihead_attn is not None:
        total += _pruned_mha_flops(m.multihead_attn, (x, mem, mem), out)
    total += _pruned_ffn_flops(m.linear1, m.linear2, x)
    for norm in (m.norm1, m.norm2, m.norm3):
        if norm is not None:
            total += LAYERNORM_FLOPS * x.numel()
    return total


register_cost((PrunedMultiheadAttention,), _pruned_mha_flops)
register_cost((PrunedTransformerEncoderLayer,), _pruned_layer_flops)
register_cost((PrunedTransformerDecoderLayer,), _pruned_decoder_flops)


def _rows(keep_heads: list[int], head_dim: int, inner: int) -> Tensor:
    per = torch.tensor(
        [h * head_dim + i for h in keep_heads for i in range(head_dim)], dtype=torch.long
    )
    # (3 * len(keep_heads) * head_dim,): q, k, v rows
    return torch.cat([per, per + inner, per + 2 * inner])


def build_pruned_attention(
    att: nn.MultiheadAttention, heads: list[int]
) -> PrunedMultiheadAttention:
    """``att`` with only the heads ``heads`` (weights copied; ``head_dim`` unchanged)."""
    e = att.embed_dim
    d = att.head_dim
    new = PrunedMultiheadAttention(
        e,
        len(heads),
        d,
        bias=att.in_proj_bias is not None,
        out_bias=att.out_proj.bias is not None,
        batch_first=att.batch_first,
        dropout=att.dropout,
        kept_heads=heads,
        source_heads=att.num_heads,
        device=att.in_proj_weight.device,
        dtype=att.in_proj_weight.dtype,
    )
    rows = _rows(heads, d, e).to(att.in_proj_weight.device)
    cols = rows[: len(heads) * d]
    with torch.no_grad():
        new.in_proj_weight.copy_(att.in_proj_weight[rows])
        if att.in_proj_bias is not None and new.in_proj_bias is not None:
            new.in_proj_bias.copy_(att.in_proj_bias[rows])
        new.out_proj.weight.copy_(att.out_proj.weight[:, cols])
        if att.out_proj.bias is not None and new.out_proj.bias is not None:
            new.out_proj.bias.copy_(att.out_proj.bias)
    new.train(att.training)
    return new


def fold_heads(att: nn.MultiheadAttention, heads: Tensor) -> None:
    """Fold head gate values ``(H,)`` into the columns of ``att.out_proj``, in place."""
    with torch.no_grad():
        w = att.out_proj.weight
        # (E, E) *= (1, H * d)
        w.mul_(heads.to(w.dtype).repeat_interleave(att.head_dim).view(1, -1))


def build_pruned_layer(
    layer: nn.TransformerEncoderLayer, spec: dict[str, Any]
) -> nn.TransformerEncoderLayer | PrunedTransformerEncoderLayer:
    """Rebuild ``layer`` with the kept heads/units of ``spec`` (plan entry), weights copied."""
    att = layer.self_attn
    e = att.embed_dim
    heads: list[int] = list(spec["heads"])
    units: list[int] = list(spec["units"])
    new_att = build_pruned_attention(att, heads) if spec["attn"] else None
    ffn = _pruned_ffn(layer.linear1, layer.linear2, e, units) if spec["ffn"] else None
    nf = bool(layer.norm_first)
    norm1 = layer.norm1 if (spec["attn"] or not nf) else None
    norm2 = layer.norm2 if (spec["ffn"] or not nf) else None
    new = PrunedTransformerEncoderLayer(
        new_att,
        ffn,
        norm1,
        norm2,
        _activation(layer),
        norm_first=nf,
        dropout=float(layer.dropout.p),
    )
    new.train(layer.training)
    return new


def _pruned_ffn(
    l1: nn.Linear, l2: nn.Linear, e: int, units: list[int]
) -> tuple[nn.Linear, nn.Linear]:
    """``linear1`` / ``linear2`` of a feed-forward sub-layer with only the hidden ``units``."""
    dev, dt = l1.weight.device, l1.weight.dtype
    keep = torch.tensor(units, dtype=torch.long, device=dev)
    with _no_empty_init_warning():  # all units pruned: zero-size weights
        n1 = nn.Linear(e, len(units), bias=l1.bias is not None, device=dev, dtype=dt)
        n2 = nn.Linear(len(units), l2.out_features, bias=l2.bias is not None, device=dev, dtype=dt)
    with torch.no_grad():
        n1.weight.copy_(l1.weight[keep])
        if l1.bias is not None and n1.bias is not None:
            n1.bias.copy_(l1.bias[keep])
        n2.weight.copy_(l2.weight[:, keep])
        if l2.bias is not None and n2.bias is not None:
            n2.bias.copy_(l2.bias)
    return n1, n2


def build_pruned_decoder_layer(
    layer: nn.TransformerDecoderLayer, spec: dict[str, Any]
) -> PrunedTransformerDecoderLayer:
    """Rebuild ``layer`` with the kept self-attention ``heads``, cross-attention
    ``cross_heads`` and FFN ``units`` of ``spec`` (plan entry; ``attn`` / ``cross`` / ``ffn``
    False: that sub-layer removed), weights copied.

    >>> layer = nn.TransformerDecoderLayer(8, 2, 16)
    >>> spec = {"heads": [1], "cross_heads": [], "units": [0, 3], "attn": True,
    ...         "cross": False, "ffn": True}
    >>> new = build_pruned_decoder_layer(layer, spec)
    >>> new.self_attn.num_heads, new.multihead_attn, new.linear1.out_features
    (1, None, 2)
    """
    e = layer.self_attn.embed_dim
    sa = build_pruned_attention(layer.self_attn, list(spec["heads"])) if spec["attn"] else None
    ca = None
    if spec["cross"]:
        ca = build_pruned_attention(layer.multihead_attn, list(spec["cross_heads"]))
    ffn = _pruned_ffn(layer.linear1, layer.linear2, e, list(spec["units"])) if spec["ffn"] else None
    nf = bool(layer.norm_first)
    new = PrunedTransformerDecoderLayer(
        sa,
        ca,
        ffn,
        (
            layer.norm1 if (spec["attn"] or not nf) else None,
            layer.norm2 if (spec["cross"] or not nf) else None,
            layer.norm3 if (spec["ffn"] or not nf) else None,
        ),
        layer.activation,
        norm_first=nf,
        dropout=float(layer.dropout.p),
    )
    new.train(layer.training)
    return new


def _fold_out(out: nn.Linear, per_input: Tensor, sub: Tensor) -> None:
    """Scale the columns of output Linear ``out`` by ``per_input`` ``(in,)`` and all of it
    (bias too) by the sub-layer gate ``sub`` ``(1,)``, in place."""
    with torch.no_grad():
        s = sub.to(out.weight.dtype)[0]
        out.weight.mul_(per_input.to(out.weight.dtype).view(1, -1) * s)  # (E, in) *= (1, in)
        if out.bias is not None:
            out.bias.mul_(s)


def fold_decoder_layer(layer: nn.TransformerDecoderLayer, values: dict[str, Tensor]) -> None:
    """Fold gate values (heads, cross_heads, units, attn, cross, ffn) into the decoder layer's
    output Linears, in place."""
    sa, ca = layer.self_attn, layer.multihead_attn
    _fold_out(sa.out_proj, values["heads"].repeat_interleave(sa.head_dim), values["attn"])
    _fold_out(ca.out_proj, values["cross_heads"].repeat_interleave(ca.head_dim), values["cross"])
    _fold_out(layer.linear2, values["units"], values["ffn"])


def fold_layer(layer: nn.TransformerEncoderLayer, values: dict[str, Tensor]) -> None:
    """Fold gate values (heads, units, attn, ffn) into the layer's output Linears, in place."""
    att = layer.self_attn
    d = att.head_dim
    with torch.no_grad():
        heads = values["heads"].to(att.out_proj.weight.dtype).repeat_interleave(d)  # (E,)
        a = values["attn"].to(att.out_proj.weight.dtype)[0]
        att.out_proj.weight.mul_(heads.view(1, -1) * a)  # (E, E) *= (1, E)
        if att.out_proj.bias is not None:
            att.out_proj.bias.mul_(a)
        units = values["units"].to(layer.linear2.weight.dtype)  # (F,)
        f = values["ffn"].to(layer.linear2.weight.dtype)[0]
        layer.linear2.weight.mul_(units.view(1, -1) * f)  # (E, F) *= (1, F)
        if layer.linear2.bias is not None:
            layer.linear2.bias.mul_(f)
