"""Linear maps written with parameters inside childless modules of your own (Hugging Face
GPT-2's ``Conv1D``: ``torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)``, a
hand-written ``MyLinear``: ``x @ self.weight.t() + self.bias``) are counted by ``cost`` as
code and gated like the model's own parameter maps; residual branches that end in such a map
(``y = x + relu(x @ W1) @ W2``, GPT-2's MLP and attention sub-layers) get a block gate, so
depth pruning removes them."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, inserted_gating, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from test_expected_cost_exact import _soft_and_exact as soft_and_exact
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import gate_


class Conv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D`` (transformers.pytorch_utils): a Linear whose weight is
    stored ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) / 4)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005 (as HF)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)  # (N, nf)
        return x.view(size_out)  # (..., nf)


class MyLinear(nn.Module):
    """A Linear written by hand, weight ``(out, in)``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) / 4)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.t() + self.bias  # (..., out)


def _layer(kind: str, n_in: int, n_out: int) -> nn.Module:
    return Conv1D(n_out, n_in) if kind == "Conv1D" else MyLinear(n_in, n_out)


class Layers(nn.Module):
    """Two or three such layers with a ReLU between (the last one the read-out)."""

    def __init__(self, kind: str, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_layer(kind, a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else torch.relu(x))  # (..., width)
        return x


def _close_some(model: nn.Module, gen: torch.Generator) -> None:
    """Random gate states, every third channel gate surely closed."""
    randomise_gates(model, gen)
    with torch.no_grad():
        for g in inserted_gating(model).group_gates:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha[::3] = -10.0


def _fewer(pruned: nn.Module, dense: gp.Cost | gp.ExpectedCost, x: Tensor) -> None:
    c = gp.cost(pruned, x)
    assert isinstance(c, gp.Cost)
    assert c.flops < dense.flops
    assert c.params < dense.params


def test_cost_counts_a_childless_module_with_parameters_as_code() -> None:
    # before: "cost() does not know how to count these leaf modules: 0 (Conv1D)", a TypeError
    x = torch.randn(4, 3, 6)  # 12 rows
    c = gp.cost(nn.Sequential(Conv1D(5, 6)), x)
    assert isinstance(c, gp.Cost)
    assert (c.flops, c.params) == (2 * 12 * 6 * 5 + 12 * 5, 6 * 5 + 5)  # addmm adds 1 per out
    c = gp.cost(nn.Sequential(MyLinear(6, 5), nn.ReLU()), x)
    assert isinstance(c, gp.Cost)
    assert (c.flops, c.params) == (2 * 12 * 6 * 5 + 12 * 5, 6 * 5 + 5)  # the added bias free


class _NormWithStatistics(nn.Module):
    """A norm of one's own: a parameter and running statistics (buffers)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: Tensor) -> Tensor:
        return x / self.running_var.sqrt() * self.weight  # (B, n)


def test_a_childless_module_with_parameters_and_buffers_still_asks_for_a_rule() -> None:
    """Its element-wise work would count 0 FLOPs as code: state no rule describes stays a
    TypeError asking for register_cost, as for a module holding buffers only."""
    model = nn.Sequential(nn.Linear(3, 4), _NormWithStatistics(4))
    with pytest.raises(TypeError, match=r"does not know how to count .*_NormWithStatistics"):
        gp.cost(model, torch.zeros(2, 3))


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("widths", [(6, 16, 3), (6, 16, 12, 3)])
@pytest.mark.parametrize("kind", ["Conv1D", "MyLinear"])
def test_layers_written_with_parameters_prune(
    kind: str, widths: tuple[int, ...], rank: int
) -> None:
    # before: gate_ raised the TypeError above
    gen = torch.Generator().manual_seed(len(widths) + rank)
    x = torch.randn(*((4,) if rank == 2 else (4, 5)), widths[0], generator=gen)

    def factory() -> Layers:
        torch.manual_seed(1)
        return Layers(kind, widths)

    model = factory()
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    summary = gate_(model, x)
    hidden = [([f"layers.{i}.weight"], w) for i, w in enumerate(widths[1:-1])]
    assert summary.channel_groups == hidden, str(summary)
    assert summary.ungated_params == [], str(summary)
    all_open = gp.cost(model, x, hard=True)
    assert (float(all_open.flops), float(all_open.params)) == (dense.flops, dense.params)
    _close_some(model, gen)
    pruned = check_pruned(model, x, gen, factory, batches=(1, 3))
    _fewer(pruned, dense, x)
    kept = [pruned.get_parameter(f"layers.{i}.bias").shape[0] for i in range(len(widths) - 1)]
    assert all(k < w for k, w in zip(kept[:-1], widths[1:-1], strict=True))
    if kind == "MyLinear":  # sliced in place: the user's class and forward
        assert all(type(m) is MyLinear for m in pruned.get_submodule("layers"))
    with torch.no_grad():  # other lengths
        xi = torch.randn(2, *([] if rank == 2 else [7]), widths[0], generator=gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


class RegisteredConv1D(Conv1D):
    """A Conv1D whose cost a handler gives (the workaround before childless modules with
    parameters were counted as code)."""


class RegisteredLinear(MyLinear):
    """The same for a MyLinear."""


def _linear_cost(m: nn.Module, i: tuple[Tensor, ...], o: Tensor) -> int:
    return 2 * i[0].numel() * o.shape[-1] + o.numel()


gp.register_cost((RegisteredConv1D, RegisteredLinear), _linear_cost)


@pytest.mark.parametrize("cls", [RegisteredConv1D, RegisteredLinear])
def test_a_module_counted_by_a_cost_handler_is_kept_whole(cls: type[nn.Module]) -> None:
    # before (RegisteredLinear): its x @ W was gated inside while the handler counted it
    # whole too: a gated hard cost of 2444 FLOPs with every gate open for a dense 1292
    x = torch.randn(4, 6)
    torch.manual_seed(2)
    first, last = (cls(16, 6), cls(3, 16)) if cls is RegisteredConv1D else (cls(6, 16), cls(16, 3))
    model = nn.Sequential(first, nn.ReLU(), last)
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    assert dense.flops == 2 * 4 * 16 * 6 + 4 * 16 + 4 * 16 + 2 * 4 * 3 * 16 + 4 * 3  # ReLU: 4 * 16
    summary = gate_(model, x)
    hard = gp.cost(model, x, hard=True)
    assert (float(hard.flops), float(hard.params)) == (dense.flops, dense.params)
    assert summary.channel_groups == [], str(summary)
    assert "which a cost handler (register_cost) counts whole" in str(summary)


class MLP(nn.Module):
    """GPT-2's MLP: ``c_proj(act(c_fc(x)))``, then dropout."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(hidden, d), Conv1D(d, hidden)
        self.act, self.dropout = nn.GELU(), nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, d)


class Attention(nn.Module):
    """GPT-2's attention: one ``c_attn`` Conv1D split into q, k, v, the heads split and merged
    by views built from sizes, a causal mask (narrowed: fx traces it), ``c_proj``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.split_size = heads, d // heads, d
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        mask = torch.tril(torch.ones(16, 16, dtype=torch.bool)).view(1, 1, 16, 16)
        self.register_buffer("bias", mask, persistent=False)

    def _split_heads(self, t: Tensor) -> Tensor:
        new_shape = t.size()[:-1] + (self.num_heads, self.head_dim)  # noqa: RUF005 (as HF)
        return t.view(new_shape).permute(0, 2, 1, 3)  # (B, H, T, D)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.c_attn(x).split(self.split_size, dim=2)  # (B, T, d) each
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        w = torch.matmul(q, k.transpose(-1, -2)) / (v.size(-1) ** 0.5)  # (B, H, T, T)
        t = q.size(-2)
        w = torch.softmax(w.masked_fill(~self.bias.narrow(2, 0, t).narrow(3, 0, t), -1e9), -1)
        o = torch.matmul(w, v).permute(0, 2, 1, 3).contiguous()  # (B, T, H, D)
        merged = o.size()[:-2] + (self.num_heads * self.head_dim,)  # noqa: RUF005 (as HF)
        return self.c_proj(o.view(merged))  # (B, T, d)


class GPT2Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, attention: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads) if attention else None
        self.mlp = MLP(d, hidden)

    def forward(self, x: Tensor) -> Tensor:
        if self.attn is not None:
            x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))  # (B, T, d)


class GPT2(nn.Module):
    def __init__(self, depth: int, attention: bool) -> None:
        super().__init__()
        self.wte = nn.Linear(5, 8)
        self.h = nn.ModuleList(GPT2Block(8, 2, 32, attention) for _ in range(depth))
        self.ln_f, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.wte(x)  # (B, T, 8)
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, 3)


@pytest.mark.parametrize("blocks", ["open", "random", "closed"])
def test_gpt2_mlp_blocks_lose_units_and_depth(blocks: str) -> None:
    # before: the TypeError above; with Conv1D registered, no block gate ("the branch ends in
    # addmm_1 (in h.0.mlp.c_proj), not a module the gate can fold into")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 5, generator=gen)

    def factory() -> GPT2:
        torch.manual_seed(3)
        return GPT2(2, attention=False)

    model = factory()
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    assert [g for g, _ in summary.channel_groups] == [[f"h.{i}.mlp.c_fc.weight"] for i in (0, 1)]
    sites = [(owner, site) for owner, site, _ in summary.blocks]
    assert sites == [(f"h.{i}", f"h.{i}.mlp.c_proj.weight") for i in (0, 1)], str(summary)
    _close_some(model, gen)
    gates = inserted_gating(model).block_gates
    with torch.no_grad():
        for k, g in enumerate(gates):
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.fill_({"open": 10.0, "random": 0.5 - k, "closed": -10.0}[blocks])
    pruned = check_pruned(model, x, gen, factory, batches=(1, 3))
    _fewer(pruned, dense, x)
    names = {n for n, _ in pruned.named_parameters()}
    assert any(".mlp." in n for n in names) == (blocks != "closed"), names


def test_gpt2_heads_units_and_sub_layers_prune() -> None:
    """Heads through c_attn (its view sizes set to the kept width), FFN units, and one
    attention and one MLP sub-layer removed: the closed block rewrites the GPT2Block, whose
    code inlines c_attn's call and must keep its resized view (calling c_attn's own code
    would give the unpruned width: "shape '[2, 6, 24]' is invalid for input of size 144")."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 5, generator=gen)

    def factory() -> GPT2:
        torch.manual_seed(4)
        return GPT2(2, attention=True)

    model = factory()
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    heads = [summary.channel_groups[i][0] for i in summary.head_groups]
    assert heads == [[f"h.{i}.attn.c_attn.weight"] for i in (0, 1)], str(summary)
    sites = [site for _, site, _ in summary.blocks]
    want = [f"h.{i}.{s}.c_proj.weight" for i in (0, 1) for s in ("attn", "mlp")]
    assert sites == want, str(summary)
    gating = inserted_gating(model)
    randomise_gates(model, gen)
    for i in summary.head_groups:
        gating.group_gates[i].force_(torch.tensor([False, True]))  # type: ignore[operator]
    gating.block_gates[1].force_(torch.zeros(1, dtype=torch.bool))  # type: ignore[operator]
    gating.block_gates[2].force_(torch.zeros(1, dtype=torch.bool))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, factory, batches=(1, 3))
    _fewer(pruned, dense, x)
    assert pruned.get_parameter("h.0.attn.c_attn.weight").shape == (8, 12)  # one head of two
    names = {n for n, _ in pruned.named_parameters()}
    assert not any(n.startswith(("h.0.mlp.", "h.1.attn.")) for n in names), names


class SplitHeads(nn.Module):
    """A childless module without parameters that splits heads with a count it holds."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), self.heads, -1).transpose(1, 2)  # (B, H, T, D)


class HeadsBlock(nn.Module):
    def __init__(self, d: int = 8, heads: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.sq, self.sk, self.sv = (SplitHeads(heads) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(d, 16), nn.Linear(16, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.sq(self.q(x)), self.sk(self.k(x)), self.sv(self.v(x))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, T, H, D)
        x = x + self.o(a.reshape(x.size(0), x.size(1), -1))
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))  # (B, T, 2)


def test_a_rewritten_forward_keeps_the_resized_code_of_a_module_it_inlines() -> None:
    # before: the closed FFN block rewrote HeadsBlock, whose code called SplitHeads again
    # (view(B, T, 4, -1) of two kept heads): pruned != gated by 0.054, and a cost mismatch
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 8, generator=gen)

    def factory() -> HeadsBlock:
        torch.manual_seed(5)
        return HeadsBlock()

    model = factory()
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1, str(summary)
    assert len(summary.blocks) == 2, str(summary)
    gating = inserted_gating(model)
    heads = gating.group_gates[summary.head_groups[0]]
    heads.force_(torch.arange(4) < 2)  # type: ignore[operator]
    gating.block_gates[1].force_(torch.zeros(1, dtype=torch.bool))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, factory, batches=(1, 3))
    assert pruned.get_submodule("q").out_features == 4


Tail = Callable[[Tensor, Tensor, Tensor | None], Tensor]

# how a residual branch's last map is written: (weight stored (out, in), the map)
TAILS: dict[str, tuple[bool, Tail]] = {
    "h @ W": (False, lambda h, w, b: h @ w if b is None else h @ w + b),
    "b + h @ W.T": (True, lambda h, w, b: h @ w.T if b is None else b + h @ w.T),
    "h @ W - b": (False, lambda h, w, b: h @ w if b is None else h @ w - b),
    "F.linear": (True, lambda h, w, b: F.linear(h, w, b)),
    "torch.addmm": (False, lambda h, w, b: h @ w if b is None else torch.addmm(b, h, w)),
    "torch.matmul": (
        False,
        lambda h, w, b: torch.matmul(h, w) if b is None else torch.matmul(h, w) + b,
    ),
}


class ParamBlock(nn.Module):
    """``x + tail(relu(x @ W1 + b1), W2, b2)``, possibly with dropout or a scale after it."""

    def __init__(self, tail: str, width: int, hidden: int, bias: bool, after: str) -> None:
        super().__init__()
        self.tail, self.after = tail, after
        self.W1 = nn.Parameter(torch.randn(width, hidden) / width**0.5)
        self.b1 = nn.Parameter(torch.randn(hidden) / 4)
        shape = (width, hidden) if TAILS[tail][0] else (hidden, width)
        self.W2 = nn.Parameter(torch.randn(*shape) / hidden**0.5)
        self.b2 = nn.Parameter(torch.randn(width) / 4) if bias else None
        self.drop = nn.Dropout(0.2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(x @ self.W1 + self.b1)  # (B, hidden)
        y = TAILS[self.tail][1](h, self.W2, self.b2)  # (B, width)
        if self.after == "dropout":
            y = self.drop(y)
        elif self.after == "scale":
            y = 0.5 * y
        return x + y


class ParamStack(nn.Module):
    def __init__(self, tails: list[str], width: int, hidden: int, bias: bool, after: str):
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.ModuleList(ParamBlock(t, width, hidden, bias, after) for t in tails)
        self.out = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)  # (B, width)
        for block in self.blocks:
            h = block(h)
        return self.out(torch.relu(h))  # (B, 3)


@settings(max_examples=examples(15), deadline=None)
@given(
    tails=st.lists(st.sampled_from(list(TAILS)), min_size=1, max_size=3),
    width=st.integers(2, 6),
    hidden=st.integers(2, 8),
    bias=st.booleans(),
    after=st.sampled_from(["none", "dropout", "scale"]),
    closed=st.integers(0, 7),
    seed=st.integers(0, 2**31 - 1),
)
def test_residual_branches_ending_in_a_parameter_map_get_block_gates(
    tails: list[str], width: int, hidden: int, bias: bool, after: str, closed: int, seed: int
) -> None:
    # before: no block gate (a branch needed a module with parameters), no depth pruning
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, generator=gen)

    def factory() -> ParamStack:
        torch.manual_seed(seed)
        return ParamStack(tails, width, hidden, bias, after)

    model = factory()
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    sites = [(owner, site) for owner, site, _ in summary.blocks]
    assert sites == [(f"blocks.{i}", f"blocks.{i}.W2") for i in range(len(tails))], str(summary)
    randomise_gates(model, gen)
    gates = inserted_gating(model).block_gates
    for i, g in enumerate(gates):  # closed: a bit mask of the blocks surely closed
        if closed >> i & 1:
            g.force_(torch.zeros(1, dtype=torch.bool))  # type: ignore[operator]
    pruned = check_pruned(model, x, gen, factory, batches=(1, 4))
    names = {n for n, _ in pruned.named_parameters()}
    for i in range(len(tails)):
        if closed >> i & 1:  # the branch and its parameters are gone
            assert not any(n.startswith(f"blocks.{i}.") for n in names), names
    if closed & ((1 << len(tails)) - 1):
        _fewer(pruned, dense, x)


class Unsliceable(nn.Module):
    """Branches ending in parameter maps the block gate cannot scale."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.l = nn.Linear(4, 6)
        self.W1, self.W2 = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(8, 6))
        self.register_buffer("buf", torch.randn(6))
        self.tied = self.W2 if kind == "tied" else None
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.l(x)
        h = torch.relu(x @ self.W1)  # (B, 8)
        if self.kind == "buffer bias":
            y = h @ self.W2 + self.buf  # a bias the gate cannot scale
        elif self.kind == "unbounded factor":
            z = h @ self.W2
            y = z * torch.exp(z)  # 0 * inf is NaN: the gate must not sit on z
        else:
            y = h @ self.W2
        return self.out(x + y)


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("tied", "the branch ends in matmul_1"),
        ("buffer bias", "the branch ends in add"),
        ("unbounded factor", "depends on W2 and is not bounded"),
    ],
)
def test_branches_a_block_gate_cannot_scale_stay_whole(kind: str, why: str) -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, generator=gen)

    def factory() -> Unsliceable:
        torch.manual_seed(6)
        return Unsliceable(kind)

    model = factory()
    summary = gate_(model, x)
    assert summary.blocks == [], str(summary)
    assert any(why in reason for _, reason in summary.ungated_adds), str(summary)
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory)


@settings(max_examples=examples(8), deadline=None)
@given(
    tails=st.lists(st.sampled_from(["h @ W", "F.linear"]), min_size=1, max_size=2),
    width=st.integers(1, 2),
    hidden=st.integers(1, 2),
    seed=st.integers(0, 10_000),
    shift=st.sampled_from([1.0, 0.0, -1.0, -2.0]),
)
def test_the_expected_cost_of_parameter_blocks_is_the_exact_expectation(
    tails: list[str], width: int, hidden: int, seed: int, shift: float
) -> None:
    """Over every gate state of a tiny stack (block gates included), the expected cost equals
    the mean of ``cost(prune(model))``."""
    torch.manual_seed(seed)
    model = ParamStack(tails, width, hidden, True, "none")
    x = torch.randn(1, 4)
    gate_(model, x)
    soft, exact = soft_and_exact(model, x, seed, shift)
    assert float(((soft - exact).abs() / exact).max()) <= 1e-6
