"""Per-head attention biases indexed by a constant tensor along their second dimension, as
timm's LeViT (``timm/models/levit.py``) and EfficientFormer (``timm/models/
efficientformer.py``) write them: ``self.attention_biases[:, self.attention_bias_idxs]``,
a parameter ``(H, offsets)`` and a long buffer ``(N, N)``, giving ``(H, N, N)`` added to the
``(B, H, N, N)`` scores. The parameter is sliced along its heads with the heads (before
2026-12-08 the fused qkv was kept whole, "indexes it other than by a tensor along another
dimension"). Replicas with tiny widths; timm is not imported."""

from __future__ import annotations

import json

import torch
from gating_helpers import examples, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_


def _bias_idxs(res: int) -> tuple[int, Tensor]:
    """timm/models/levit.py:278 ``_compute_attention_bias_idxs`` for a ``res x res`` grid:
    (number of offsets, the offset of each pair of positions ``(N, N)`` long)."""
    pos = torch.stack(torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij"))
    pos = pos.flatten(1)  # (2, N)
    rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()  # (2, N, N)
    return res * res, rel_pos[0] * res + rel_pos[1]  # levit.py:285 (N, N)


class LevitAttention(nn.Module):
    """timm/models/levit.py:219 ``Attention`` (its ``LinearNorm`` as a plain Linear), without
    the eval-mode ``attention_bias_cache`` of its ``get_attention_biases``."""

    def __init__(self, dim: int, key_dim: int, heads: int, res: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = heads, key_dim, 2 * key_dim
        self.scale = key_dim**-0.5
        self.qkv = nn.Linear(dim, heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential(nn.Hardswish(), nn.Linear(heads * self.val_dim, dim))
        n_off, idxs = _bias_idxs(res)
        self.attention_biases = nn.Parameter(torch.randn(heads, n_off))  # (H, offsets)
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)  # (N, N)

    def get_attention_biases(self) -> Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]  # levit.py:301 (H, N, N)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (
            self.qkv(x)
            .view(b, n, self.num_heads, -1)
            .split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        )  # (B, N, H, d) each
        q = q.permute(0, 2, 1, 3)  # (B, H, N, kd)
        k = k.permute(0, 2, 3, 1)  # (B, H, kd, N)
        v = v.permute(0, 2, 1, 3)  # (B, H, N, vd)
        attn = q @ k * self.scale + self.get_attention_biases()  # (B, H, N, N)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.val_dim)
        return self.proj(x)  # (B, N, dim)


class Levit(nn.Module):
    """A token embedding, two residual LeViT attentions and a mean-pooled head."""

    def __init__(self, heads: int = 3, key_dim: int = 2, res: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.blocks = nn.ModuleList([LevitAttention(8, key_dim, heads, res) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, N, 8)
        for blk in self.blocks:
            h = h + blk(h)  # (B, N, 8)
        return self.head(h.mean(1))  # (B, 3)


def test_indexed_bias_heads_gated() -> None:
    torch.manual_seed(0)
    model = Levit()
    summary = gate_(model, torch.randn(2, 9, 5))
    heads = [k for ps, k in summary.channel_groups if ps == ["blocks.0.qkv"]]
    assert heads == [3], str(summary)
    assert "indexes it" not in str(summary)


@settings(max_examples=examples(6), deadline=None)
@given(
    heads=st.integers(2, 4),
    key_dim=st.integers(1, 3),
    res=st.integers(2, 3),
    seed=st.integers(0, 2**16),
)
def test_indexed_bias_pruned_exact_and_replayed(
    heads: int, key_dim: int, res: int, seed: int
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Levit(heads, key_dim, res)
    x = torch.randn(2, res * res, 5, generator=gen)
    dense = gp.cost(model, x)
    gate_(model, x)
    with torch.no_grad():  # random heads, the first head of each block closed
        for gate in inserted_gating(model).group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-3.0, 3.0, generator=gen)
            gate.log_alpha.view(-1)[0] = -6.0
    model.eval()
    hard = gp.cost(model, x, hard=True)
    plan = json.loads(json.dumps(export_plan(model)))
    pruned = gp.prune(model).eval()
    fresh = torch.randn(3, res * res, 5, generator=gen)
    with torch.no_grad():
        assert (pruned(fresh) - model(fresh)).abs().max().item() <= 1e-5
    c = gp.cost(pruned, x)
    assert isinstance(c, Cost)
    assert isinstance(dense, Cost)
    assert (c.flops, c.params) == (hard.flops.item(), hard.params.item())
    assert c.params < dense.params
    for i in range(2):
        spec = plan["slices"][f"blocks.{i}.attention_biases"]
        assert (spec["kind"], spec["dim"]) == ("heads", 0)
        biases = pruned.get_parameter(f"blocks.{i}.attention_biases")
        assert biases.shape[0] == len(spec["out"]) < heads
    torch.manual_seed(seed)
    replayed = apply_plan(Levit(heads, key_dim, res), plan)
    replayed.load_state_dict(pruned.state_dict())
    replayed.eval()
    with torch.no_grad():
        assert (replayed(fresh) - pruned(fresh)).abs().max().item() <= 1e-5
