"""Matrix products called as functions are counted by cost(), with the conventions of their
modules, once (not again inside a module counted whole), and by gate_'s expected cost the
same way, so hand-written attention's FLOPs are in the budget and in cost(prune(model))."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import examples, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate_hand_attention import GPT, Attention, _head_groups
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost, attention_flops
from gatedprune.functional_costs import FunctionalCounter, functional_flops


class Fn(nn.Module):
    """A module whose forward is one functional call on its inputs and own tensors."""

    def __init__(self, fn: object, *tensors: Tensor) -> None:
        super().__init__()
        self.fn = fn
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t)
        self.n = len(tensors)
        self.inner = nn.Identity()  # a child: the module is not a leaf, its forward is read

    def forward(self, x: Tensor) -> Tensor:
        assert callable(self.fn)
        return self.inner(self.fn(x, *(getattr(self, f"t{i}") for i in range(self.n))))


def _flops(module: nn.Module, x: Tensor) -> int:
    c = gp.cost(module, x)
    assert isinstance(c, Cost)
    return c.flops


dims = st.integers(1, 5)


@settings(max_examples=examples(40), deadline=None)
@given(b=dims, t=dims, n=dims, m=dims, bias=st.booleans())
def test_linear_and_matmul_count_like_nn_linear(b: int, t: int, n: int, m: int, bias: bool) -> None:
    lin = nn.Linear(n, m, bias=bias)
    x = torch.randn(b, t, n)
    want = _flops(lin, x)
    w = lin.weight.detach()
    fn = Fn(F.linear, w, lin.bias.detach()) if bias else Fn(F.linear, w)
    assert _flops(fn, x) == want
    if not bias:
        assert _flops(Fn(lambda x, wt: x @ wt, w.t().contiguous()), x) == want
        assert _flops(Fn(torch.matmul, w.t().contiguous()), x) == want
        assert _flops(Fn(lambda x, wt: wt.__rmatmul__(x), w.t().contiguous()), x) == want
        flat = x.reshape(-1, n)
        assert _flops(Fn(torch.mm, w.t().contiguous()), flat) == _flops(lin, flat)
        wb = w.t().expand(b, n, m).contiguous()
        assert _flops(Fn(torch.bmm, wb), x) == want
        assert _flops(Fn(lambda x, wb: torch.einsum("btn,bnm->btm", x, wb), wb), x) == want
    else:
        flat = x.reshape(-1, n)
        addmm = Fn(lambda x, wt, c: torch.addmm(c, x, wt), w.t().contiguous(), lin.bias.detach())
        assert _flops(addmm, flat) == _flops(lin, flat)


@settings(max_examples=examples(30), deadline=None)
@given(
    b=st.integers(1, 3),
    c_in=st.integers(1, 4),
    groups=st.integers(1, 2),
    k=st.integers(1, 3),
    length=st.integers(3, 7),
    bias=st.booleans(),
    two_d=st.booleans(),
)
def test_functional_conv_counts_like_the_module(
    b: int, c_in: int, groups: int, k: int, length: int, bias: bool, two_d: bool
) -> None:
    conv_cls = nn.Conv2d if two_d else nn.Conv1d
    conv = conv_cls(c_in * groups, 2 * groups, k, groups=groups, bias=bias, padding=1)
    x = torch.randn(b, c_in * groups, *((length, length) if two_d else (length,)))
    fn = F.conv2d if two_d else F.conv1d
    w = conv.weight.detach()
    args = (w, conv.bias.detach()) if bias else (w,)
    wrapped = Fn(lambda x, *a: fn(x, *a, padding=1, groups=groups), *args)  # type: ignore[operator]
    assert _flops(wrapped, x) == _flops(conv, x)


@settings(max_examples=examples(30), deadline=None)
@given(b=dims, heads=st.integers(1, 3), head_dim=dims, len_q=dims, len_kv=dims)
def test_sdpa_counts_like_the_attention_core_of_multihead_attention(
    b: int, heads: int, head_dim: int, len_q: int, len_kv: int
) -> None:
    q = torch.randn(b, heads, len_q, head_dim)
    k, v = torch.randn(b, heads, len_kv, head_dim), torch.randn(b, heads, len_kv, head_dim)
    e = heads * head_dim
    full = attention_flops(b, len_q, len_kv, (e, e, e, e), heads, head_dim, False, False)
    projections = 2 * e * (b * len_q * e + 2 * b * len_kv * e) + 2 * b * len_q * e * e
    got = functional_flops(F.scaled_dot_product_attention, (q, k, v), None, q)
    assert got == full - projections
    # q @ k^T and weights @ v written out: the same products, the softmax not counted
    with FunctionalCounter() as counter:
        w = (q @ k.transpose(-2, -1)).softmax(-1)
        _ = torch.matmul(w, v)
    assert counter.flops == got - b * heads * len_q * len_kv


def test_einsum_forms() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    out = torch.einsum("bij,bjk->bik", a, b)
    assert functional_flops(torch.einsum, ("bij,bjk->bik", a, b), None, out) == 2 * 2 * 3 * 4 * 5
    implicit = torch.einsum("bij,bjk", a, b)  # b appears twice: summed too, same products
    assert functional_flops(torch.einsum, ("bij,bjk", a, b), None, implicit) == 2 * 2 * 3 * 4 * 5
    listed = torch.einsum("...ij,...jk->...ik", [a, b])
    assert functional_flops(torch.einsum, ("...ij,...jk->...ik", [a, b]), None, listed) == 240
    c = torch.randn(5, 6)  # three operands, left to right: (2,3,4,5), then (2,3,5,6)
    out3 = torch.einsum("bij,bjk,kl->bil", a, b, c)
    got = functional_flops(torch.einsum, ("bij,bjk,kl->bil", a, b, c), None, out3)
    assert got == 2 * (2 * 3 * 4 * 5) + 2 * (2 * 3 * 5 * 6)
    assert functional_flops(torch.einsum, ("ij->ji", c), None, c.t()) == 0  # a transpose


class SelfCounting(nn.Module):
    """A leaf that counts itself: the product in its forward is not counted again."""

    def forward(self, x: Tensor) -> Tensor:
        return x @ x.transpose(-2, -1)  # (B, T, T)

    def flops_of(self, inputs: tuple[Tensor, ...], output: Tensor) -> int:
        return 7


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.leaf = SelfCounting()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.mha(x, x, x, need_weights=False)[0]  # (B, T, 4): counted as a unit
        return self.lin(y) + self.leaf(y).sum(-1, keepdim=True)  # (B, T, 4)


def test_products_inside_modules_counted_whole_are_not_counted_again() -> None:
    net, x = Wrapper(), torch.randn(2, 5, 4)
    each = [attention_flops(2, 5, 5, (4, 4, 4, 4), 2, 2, True, True), _flops(net.lin, x), 7]
    assert _flops(net, x) == sum(each)


def test_hand_written_attention_counts_its_products() -> None:
    b, t, c, heads = 2, 6, 8, 2
    attn = Attention(c, heads, "no", sdpa=False)
    x = torch.randn(b, t, c)
    linears = 4 * (2 * b * t * c * c + b * t * c)  # q, k, v and the output projection
    products = 2 * (2 * b * t * t * c)  # q @ k^T and weights @ v, over every head
    assert _flops(attn, x) == linears + products
    sdpa = Attention(c, heads, "no", sdpa=True)
    assert _flops(sdpa, x) == linears + products + b * heads * t * t  # + SDPA's softmax


@pytest.mark.parametrize("sdpa", [False, True])
def test_gated_attention_costs_its_products_per_kept_head(sdpa: bool) -> None:
    torch.manual_seed(0)
    short, long = torch.randn(2, 12, 3), torch.randn(2, 24, 3)
    model = GPT(16, 4, "no", sdpa).eval()
    dense = copy.deepcopy(model)
    gp.gate_(model, short)
    gating = inserted_gating(model)
    for gate in gating.group_gates:
        gate.force_(torch.ones(gate.n, dtype=torch.bool))  # type: ignore[operator]
    assert float(gp.cost(model, short, hard=True).flops) == _flops(dense, short)
    heads = _head_groups(model, 4)
    assert len(heads) == 2
    for g in heads:  # close heads 1 and 2 of both layers
        gating.group_gates[g].force_(torch.tensor([True, False, False, True]))  # type: ignore[operator]
    pruned = gp.prune(model)
    for x in (short, torch.randn(5, 12, 3)):  # the gated shape, another batch size
        assert float(gp.cost(model, x, hard=True).flops) == _flops(pruned, x)
    # FLOPs saved = a * T + b * T^2: the T^2 part is the products of the closed heads
    # (q @ k^T and weights @ v: 2 * 2 * D per query-key pair, D = 4; SDPA's softmax 1 more)
    saved = [_flops(dense, x) - _flops(pruned, x) for x in (short, long)]
    quadratic = (saved[1] - 2 * saved[0]) / (24**2 - 2 * 12**2)
    per_pair = 2 * 2 * 4 + (1 if sdpa else 0)
    assert quadratic == 2 * 2 * 2 * per_pair  # layers x batch x closed heads x per pair


class OverBatch(nn.Module):
    """A product over the batch (a Gram matrix of the samples): its FLOPs grow with B^2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x))  # (B, 6)
        gram = h @ h.t()  # (B, B)
        return self.out(h) + gram.mean(1, keepdim=True)  # (B, 2)


def test_a_product_over_the_batch_is_not_scaled_to_other_batch_sizes() -> None:
    torch.manual_seed(0)
    model, x = OverBatch().eval(), torch.randn(3, 4)
    dense = _flops(copy.deepcopy(model), x)
    gp.gate_(model, x)
    assert float(gp.cost(model, x, hard=True).flops) == dense
    with pytest.raises(ValueError, match="only derived for other batch sizes"):
        gp.cost(model, torch.randn(5, 4))


class CountsWithAProduct(nn.Module):
    """A leaf whose flops_of computes with a matmul: that product is not the model's."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 2.0  # (B, F)

    def flops_of(self, inputs: tuple[Tensor, ...], output: Tensor) -> int:
        ones = torch.ones(1, output.numel())
        return int((ones @ ones.t()).item())  # numel, computed with a product


def test_products_of_cost_handlers_and_weight_pre_hooks_are_not_counted() -> None:
    x = torch.randn(3, 4)
    assert _flops(CountsWithAProduct(), x) == 12
    net = nn.Sequential(nn.Linear(4, 8), CountsWithAProduct())
    assert _flops(net, x) == _flops(nn.Linear(4, 8), x) + 24
    sn = nn.utils.spectral_norm(nn.Linear(4, 8))  # its weight: a pre-hook with torch.mv
    assert _flops(nn.Sequential(sn, nn.ReLU()), x) == _flops(nn.Linear(4, 8), x) + 24


class LoRALinear(nn.Linear):
    """A Linear subclass with submodules: counted by its parts, not as a plain Linear."""

    def __init__(self, n: int, m: int, rank: int = 2) -> None:
        super().__init__(n, m)
        self.down, self.up = nn.Linear(n, rank, bias=False), nn.Linear(rank, m, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.up(self.down(x))  # (B, m)


def test_a_linear_subclass_with_submodules_is_counted_by_its_parts() -> None:
    x = torch.randn(3, 4)
    plain = 2 * 3 * 4 * 8 + 3 * 8
    assert _flops(LoRALinear(4, 8), x) == plain + 2 * 3 * 4 * 2 + 2 * 3 * 2 * 8
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    dense = _flops(copy.deepcopy(model), x)
    gp.gate_(model, x)
    assert float(gp.cost(model, x, hard=True).flops) == dense
    assert _flops(gp.prune(model), x) == dense


@pytest.mark.parametrize(
    ("fn", "module"),
    [
        (lambda x, w: torch.linalg.matmul(x, w.t()), nn.Linear(4, 6, bias=False)),
        (lambda x, w: torch.tensordot(x, w.t(), 1), nn.Linear(4, 6, bias=False)),
        (lambda x, w: torch.linalg.multi_dot([x, w.t()]), nn.Linear(4, 6, bias=False)),
        (lambda x, w: torch.inner(x, w), nn.Linear(4, 6, bias=False)),
    ],
)
def test_product_aliases_count_like_a_linear(fn: object, module: nn.Linear) -> None:
    x = torch.randn(3, 4)
    assert _flops(Fn(fn, module.weight.detach()), x) == _flops(module, x)


def test_more_functional_products() -> None:
    a, b, c = torch.randn(5, 3, 4), torch.randn(5, 4, 6), torch.randn(3, 6)
    assert functional_flops(torch.addbmm, (c, a, b), None, torch.addbmm(c, a, b)) == (
        2 * 5 * 3 * 4 * 6 + 3 * 6
    )
    y = torch.zeros(3, 6)
    m1, m2 = torch.randn(3, 4), torch.randn(4, 6)
    assert functional_flops(Tensor.addmm_, (y, m1, m2), None, y) == 2 * 3 * 4 * 6 + 3 * 6
    v = torch.randn(7)
    assert functional_flops(torch.dot, (v, v), None, torch.dot(v, v)) == 14
    deconv = nn.ConvTranspose1d(3, 5, 3, stride=2)
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        out = F.conv_transpose1d(x, deconv.weight, deconv.bias, stride=2)
    want = _flops(deconv, x)
    assert functional_flops(F.conv_transpose1d, (x, deconv.weight, deconv.bias), None, out) == want
    bil = nn.Bilinear(3, 4, 5)
    x1, x2 = torch.randn(2, 3), torch.randn(2, 4)
    with torch.no_grad():
        out = F.bilinear(x1, x2, bil.weight, bil.bias)
    args = (x1, x2, bil.weight, bil.bias)
    assert functional_flops(F.bilinear, args, None, out) == _flops(Fn(lambda x: bil(x, x2)), x1)


class HalfBatch(nn.Module):
    """A product over half the batch: its FLOPs are not proportional to the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.register_buffer("w", torch.randn(6, 6))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, 6)
        return h + (h[: x.shape[0] // 2] @ self.w).sum()  # (B, 6)


class MeanOverBatch(nn.Module):
    """A Linear on the mean over the batch: a module whose FLOPs do not grow with it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.mix = nn.Linear(4, 6), nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, 6)
        return h + self.mix(h.mean(0, keepdim=True))  # (B, 6)


@pytest.mark.parametrize("factory", [HalfBatch, MeanOverBatch])
@pytest.mark.parametrize("batch", [1, 2])
def test_costs_not_proportional_to_the_batch_are_not_scaled(factory: type, batch: int) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(batch, 4)
    dense = _flops(copy.deepcopy(model), x)
    gp.gate_(model, x)
    assert float(gp.cost(model, x, hard=True).flops) == dense
    for other in (batch + 1, 2 * batch + 3):
        with pytest.raises(ValueError, match="only derived for other batch sizes"):
            gp.cost(model, torch.randn(other, 4))


class GroupedQKNorm(nn.Module):
    """Attention with QK-norm (Qwen3, OLMo-2): q and k normalised over the head size, so they
    are not zero at closed heads (v is); grouped-query (k, v repeated with repeat_interleave)
    or not, scores by explicit matmul or SDPA."""

    def __init__(self, gqa: bool, sdpa: bool, hf_repeat: bool = False) -> None:
        super().__init__()
        self.kv, self.sdpa, self.hf_repeat = (2 if gqa else 4), sdpa, hf_repeat
        self.q = nn.Linear(4, 8)
        self.k, self.v = nn.Linear(4, 2 * self.kv), nn.Linear(4, 2 * self.kv)
        self.qn, self.kn = nn.LayerNorm(2), nn.LayerNorm(2)
        self.proj = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.qn(self.q(x).view(b, t, 4, 2).transpose(1, 2))  # (B, 4, T, 2)
        k = self.kn(self.k(x).view(b, t, self.kv, 2).transpose(1, 2))  # (B, KV, T, 2)
        v = self.v(x).view(b, t, self.kv, 2).transpose(1, 2)  # (B, KV, T, 2)
        rep = 4 // self.kv
        if self.hf_repeat:  # Hugging Face's repeat_kv, its sizes written out
            k = k[:, :, None].expand(b, self.kv, rep, t, 2).reshape(b, 4, t, 2)  # (B, 4, T, 2)
            v = v[:, :, None].expand(b, self.kv, rep, t, 2).reshape(b, 4, t, 2)  # (B, 4, T, 2)
        else:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, 4, T, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)  # (B, 4, T, 2)
        else:
            att = torch.matmul(q, k.transpose(-2, -1)).softmax(-1)  # (B, 4, T, T)
            y = torch.matmul(att, v)  # (B, 4, T, 2)
        return x + self.proj(y.transpose(1, 2).reshape(b, t, 8))  # (B, T, 4)


@pytest.mark.parametrize("hf_repeat", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("sdpa", [False, True])
def test_qk_norm_heads_are_pruned_with_gqa_and_sdpa(gqa: bool, sdpa: bool, hf_repeat: bool) -> None:
    torch.manual_seed(0)
    model, x = GroupedQKNorm(gqa, sdpa, hf_repeat).eval(), torch.randn(2, 5, 4)
    dense = _flops(copy.deepcopy(model), x)
    summary = gp.gate_(model, x)
    assert len(summary.head_groups) == 1, str(summary)
    gating = inserted_gating(model)
    heads = gating.group_gates[summary.head_groups[0]]
    assert heads.n == (2 if gqa else 4)  # one gate per key/value head
    for gate in gating.group_gates:
        gate.force_(torch.ones(gate.n, dtype=torch.bool))  # type: ignore[operator]
    heads.force_(torch.arange(heads.n) == 1)  # type: ignore[operator]
    pruned = gp.prune(model)
    for xi in (x, torch.randn(3, 7, 4)):
        with torch.no_grad():
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    assert float(gp.cost(model, x, hard=True).flops) == _flops(pruned, x) < dense
    assert pruned.get_submodule("proj").in_features == (4 if gqa else 2)


def _hf_repeat_kv(hidden_states: Tensor, n_rep: int) -> Tensor:
    """Hugging Face's ``repeat_kv``: its sizes read from ``hidden_states.shape``."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(  # (B, KV, R, T, D)
        batch, num_key_value_heads, n_rep, slen, head_dim
    )
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)  # (B, H, T, D)


class ShapeRepeatQKNorm(GroupedQKNorm):
    """GQA + QK-norm with Hugging Face's own ``repeat_kv`` (sizes from ``.shape``)."""

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.qn(self.q(x).view(b, t, 4, 2).transpose(1, 2))  # (B, 4, T, 2)
        k = self.kn(self.k(x).view(b, t, self.kv, 2).transpose(1, 2))  # (B, KV, T, 2)
        v = self.v(x).view(b, t, self.kv, 2).transpose(1, 2)  # (B, KV, T, 2)
        k, v = _hf_repeat_kv(k, 4 // self.kv), _hf_repeat_kv(v, 4 // self.kv)  # (B, 4, T, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 4, T, 2)
        return x + self.proj(y.transpose(1, 2).reshape(b, t, 8))  # (B, T, 4)


def test_qk_norm_with_repeat_kv_reading_shape_names_the_cause() -> None:
    # the heads stay whole (documented); before 2026-12-07 the reason was the
    # squeeze-and-excitation one ("only a product with the channels it excites may")
    torch.manual_seed(0)
    model, x = ShapeRepeatQKNorm(gqa=True, sdpa=True).eval(), torch.randn(2, 5, 4)
    with torch.no_grad():
        before = model(x)
    summary = gp.gate_(model, x)
    assert summary.head_groups == [], str(summary)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    why = reasons["q"]
    assert "reads the sizes of node" in why, why
    for part in (
        "repeat_kv",
        "hidden_states.shape",
        "self.num_key_value_heads",
        "repeat_interleave",
    ):
        assert part in why, why
    assert "excites" not in why, why
    pruned = gp.prune(model)
    with torch.no_grad():
        assert (pruned(x) - before).abs().max().item() <= 1e-5


class LoRABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = LoRALinear(3, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.a(x)))  # (B, 2)


def test_a_pruned_module_left_without_submodules_counts_its_products() -> None:
    """Closing the LoRA branch (a residual block) leaves the rewritten LoRALinear with no
    submodules: its own F.linear must still be counted."""
    torch.manual_seed(0)
    model, x = LoRABlock().eval(), torch.randn(4, 3)
    gp.gate_(model, x)
    gating = inserted_gating(model)
    assert gating.block_gates, "the LoRA branch is a residual block"
    for gate in gating.group_gates:
        gate.force_(torch.ones(gate.n, dtype=torch.bool))  # type: ignore[operator]
    for gate in gating.block_gates:
        gate.force_(torch.zeros(gate.n, dtype=torch.bool))  # type: ignore[operator]
    pruned = gp.prune(model)
    assert not any(True for _ in pruned.get_submodule("a").children())
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5
    want = (2 * 4 * 3 * 8 + 4 * 8) + (2 * 4 * 8 * 2 + 4 * 2)  # the base Linear and the head
    assert _flops(pruned, x) == want
    assert float(gp.cost(model, x, hard=True).flops) == want


@pytest.mark.parametrize("norm", ["weight", "spectral"])
def test_a_parametrized_layer_counted_by_its_parts(norm: str) -> None:
    parametrize = (
        nn.utils.parametrizations.weight_norm
        if norm == "weight"
        else nn.utils.parametrizations.spectral_norm
    )
    x = torch.randn(3, 4)
    lora = parametrize(LoRALinear(4, 8))
    assert _flops(lora, x) == _flops(LoRALinear(4, 8), x)  # the weight's computation is free
    torch.manual_seed(0)
    model = nn.Sequential(parametrize(LoRALinear(4, 8)), nn.ReLU(), nn.Linear(8, 2)).eval()
    dense = _flops(copy.deepcopy(model), x)
    gp.gate_(model, x)
    assert float(gp.cost(model, x, hard=True).flops) == dense
    pruned = gp.prune(model)
    assert _flops(pruned, x) == dense
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


@settings(max_examples=examples(15), deadline=None)
@given(gqa=st.booleans(), sdpa=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_qk_norm_random_gate_states_prune_exactly(gqa: bool, sdpa: bool, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, x = GroupedQKNorm(gqa, sdpa), torch.randn(2, 5, 4, generator=gen)
    gp.gate_(model, x)
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in [*gating.group_gates, *gating.block_gates]:
            gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)  # type: ignore[operator]
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        xi = torch.randn(3, 6, 4, generator=gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    assert float(gp.cost(model, x, hard=True).flops) == _flops(pruned, x)


class Adapter(nn.Module):
    """A class with submodules counted whole by a registered handler (its own count)."""

    def __init__(self) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(8, 2), nn.Linear(2, 8)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(torch.relu(self.down(x)))  # (B, 8)


def test_a_registered_class_with_submodules_is_counted_and_kept_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gatedprune.costs as costs

    monkeypatch.setattr(costs, "_HANDLERS", list(costs._HANDLERS))
    gp.register_cost(Adapter, lambda m, i, o: 1000)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Adapter(), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    dense = _flops(copy.deepcopy(model), x)
    head = _flops(nn.Linear(8, 2), torch.randn(3, 8))
    assert dense == _flops(nn.Linear(4, 8), x) + 1000 + 3 * 8 + head  # the adapter: 1000
    summary = gp.gate_(model, x)
    gated = {p for producers, _ in summary.channel_groups for p in producers}
    assert not any(p.startswith("1.") for p in gated)  # its submodules are not gated
    gating = inserted_gating(model)
    for gate in gating.group_gates:
        gate.force_(torch.ones(gate.n, dtype=torch.bool))  # type: ignore[operator]
    assert float(gp.cost(model, x, hard=True).flops) == dense
    assert _flops(gp.prune(model), x) == dense
