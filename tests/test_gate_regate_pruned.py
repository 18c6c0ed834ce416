"""Iterative pruning: gate_, prune, gate_ the pruned model again, prune again. The modules
prune rewrote (``PrunedGraphModule``: a GPT-2 ``Conv1D`` whose code was rewritten, a module
whose forward now reads ``self.c_attn.weight`` inline) are the user's code, like the modules
they were rewritten from: their parameter maps are gated again."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, inserted_gating
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import is_code
from gatedprune.gates import HardConcreteGate
from gatedprune.gating.surgery import PrunedGraphModule


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005 (fx cannot unpack a traced size)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)  # (B*T, nf)
        return x.view(size_out)  # (B, T, nf)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, max_len: int = 32) -> None:
        super().__init__()
        self.n_head, self.d = heads, d
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
        self.register_buffer("bias", mask.view(1, 1, max_len, max_len))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.d, dim=2)  # (B, T, C) each
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, H, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, H, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, H, T, T)
        mask = self.bias.narrow(2, 0, T).narrow(3, 0, T)
        att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)  # (B, H, T, T)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(hidden, d)
        self.c_proj = Conv1D(d, hidden)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d, 4 * d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, d)
        return x + self.mlp(self.ln_2(x))  # (B, T, d)


class FloatGPT2(nn.Module):
    """(B, T, d) -> (B, T, out): one GPT-2 block, a final norm and a head."""

    def __init__(self, d: int = 16, heads: int = 4, out: int = 5) -> None:
        super().__init__()
        self.h = nn.ModuleList([Block(d, heads)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, out)


class ParamMLP(nn.Module):
    """No submodules: every map written with parameters of its own, in several forms."""

    def __init__(self, fin: int = 8, d: int = 12, hid: int = 16, out: int = 4) -> None:
        super().__init__()
        self.W_in, self.b_in = self._p(d, fin), self._p(d)  # F.linear layout (out, in)
        self.W1, self.b1 = self._p(d, hid), self._p(hid)  # x @ W (in, out)
        self.W2, self.b2 = self._p(hid, d), self._p(d)
        self.W3, self.b3 = self._p(hid, d), self._p(hid)  # addmm(b, x, W3.T)
        self.W4 = self._p(d, hid)
        self.W_out, self.b_out = self._p(out, d), self._p(out)

    @staticmethod
    def _p(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.randn(*shape) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(F.linear(x, self.W_in, self.b_in))  # (B, d)
        h = h + torch.relu(h @ self.W1 + self.b1) @ self.W2 - self.b2  # (B, d)
        u = torch.relu(torch.addmm(self.b3, h, self.W3.T))  # (B, hid)
        h = h + u @ self.W4.T  # (B, d)
        return F.linear(h, self.W_out, self.b_out)  # (B, out)


def _close_some(model: nn.Module, gen: torch.Generator) -> None:
    """Force every channel gate of ``model`` to a random mask keeping at least one unit."""
    for gate in inserted_gating(model).group_gates:
        assert isinstance(gate, HardConcreteGate)
        keep = torch.rand(gate.log_alpha.shape, generator=gen) < 0.7  # (n,)
        keep[0] = True
        gate.force_(keep)


def _gated_units(summary: gp.GatingSummary) -> dict[str, int]:
    return {", ".join(p): n for p, n in summary.channel_groups}


def _prune_twice(
    factory: type[nn.Module], x: Tensor, seed: int, close_block: bool = False
) -> tuple[nn.Module, nn.Module, gp.GatingSummary]:
    """gate_, close random units (and, with ``close_block``, the last residual block: prune
    rewrites the forward holding it), prune; gate_ the pruned model again (returned with its
    summary, and a copy of the first pruned model)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = factory()
    gp.gate_(model, x)
    _close_some(model, gen)
    if close_block:
        block = inserted_gating(model).block_gates[-1]
        assert isinstance(block, HardConcreteGate)
        block.force_(torch.zeros(block.log_alpha.shape, dtype=torch.bool))
    model.eval()
    first = gp.prune(model)
    dense = copy.deepcopy(first)
    summary = gp.gate_(first, x)
    return first, dense, summary


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regated_gpt2_block_gates_rewritten_modules_and_prunes_exactly(seed: int) -> None:
    x = torch.randn(2, 6, 16)
    model, dense, summary = _prune_twice(FloatGPT2, x, seed)
    c_fc, c_attn = dense.h[0].mlp.c_fc, dense.h[0].attn.c_attn
    assert isinstance(c_fc, PrunedGraphModule)
    hidden = c_fc.weight.shape[1]
    heads = c_attn.weight.shape[1] // 3 // 4  # head size 4
    units = _gated_units(summary)
    assert units.get("h.0.mlp.c_fc.weight") == hidden, str(summary)  # the rewritten Conv1D
    assert units.get("h.0.attn.c_attn.weight") == heads, str(summary)  # the inlined c_attn
    assert not summary.ungated_params, summary.ungated_params
    assert is_code(c_fc)
    assert type(c_fc).__name__ == "PrunedConv1D"  # a deep copy keeps the name (fx: GraphModule)
    gen = torch.Generator().manual_seed(100 + seed)
    _close_some(model, gen)
    before = gp.cost(dense, x)
    assert isinstance(before, gp.Cost)
    again = check_pruned(model, x, gen, factory=lambda: copy.deepcopy(dense), batches=(2, 3))
    after = gp.cost(again, x)
    assert isinstance(after, gp.Cost)
    assert after.flops < before.flops
    assert after.params < before.params


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regated_param_mlp_gates_its_maps_again_and_prunes_exactly(seed: int) -> None:
    x = torch.randn(3, 8)
    model, dense, summary = _prune_twice(ParamMLP, x, seed, close_block=True)
    assert isinstance(dense, PrunedGraphModule)  # its forward lost the closed block
    units = _gated_units(summary)  # before: 0 gates on the pruned model
    assert units.get("W1") == dense.W1.shape[1], str(summary)
    assert type(dense).__name__ == "PrunedParamMLP"
    assert not summary.ungated_params, summary.ungated_params
    gen = torch.Generator().manual_seed(100 + seed)
    _close_some(model, gen)
    before = gp.cost(dense, x)
    assert isinstance(before, gp.Cost)
    again = check_pruned(model, x, gen, factory=lambda: copy.deepcopy(dense), batches=(3, 5))
    after = gp.cost(again, x)
    assert isinstance(after, gp.Cost)
    assert after.flops < before.flops
    assert after.params < before.params


def test_rewritten_module_counts_as_code_and_its_cost_is_unchanged() -> None:
    x = torch.randn(2, 6, 16)
    _, dense, _ = _prune_twice(FloatGPT2, x, 0)
    c_fc = dense.h[0].mlp.c_fc
    hidden = c_fc.weight.shape[1]
    c = gp.cost(c_fc, torch.randn(2, 6, 16))
    assert isinstance(c, gp.Cost)
    assert c.flops == 2 * 2 * 6 * 16 * hidden + 2 * 6 * hidden  # addmm: products, then the bias
    assert c.params == 16 * hidden + hidden
