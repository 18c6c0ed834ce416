"""Forms found by the fourth audit (RepVGG / MobileOne, WaveNet, Swin, Hugging Face BERT):

- a Python ``0`` added to (or subtracted from, or with) gated channels (RepVGG's ``id_out = 0
  ... dense + one + id_out``, WaveNet's ``skip = 0; skip = skip + s``) is the identity: the
  channels stay gated, and a residual branch ending in ``+ 0`` keeps its block gate. Before
  2026-12-07 22:41 UTC the add kept the whole group ("adds an ungated tensor or constant").
- an ``nn.Softmax(dim=-1)`` module on attention scores (Swin's reference code) is read like
  ``F.softmax`` / ``attn.softmax(dim=-1)``: the heads are gated (before: "softmax (Softmax)
  is not pruned through").
- ``torch.roll`` along dimensions other than the channels' (Swin's shifted windows) passes
  the channels and may end a residual branch; rolling the channels, or the flattened tensor
  (no ``dims``), keeps them whole with a reason (before: "is an op gate_ does not prune
  through", and the block was not gated: "the branch ends in roll").
- a top-level forward slicing a buffer by a traced size (``self.position_ids[:, :T]``) is
  traced as ``.narrow(dim, 0, T)`` is (since 2026-12-08 00:27 UTC; before, it was told to
  write ``narrow``, not to move "control flow" into a submodule).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import budget_steps, inserted_gating, randomise_batchnorms
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_

Sample = Callable[[int, torch.Generator], Tensor]


def _gated(summary: gp.GatingSummary) -> set[str]:
    return {p for producers, _ in summary.channel_groups for p in producers}


def _ungated(summary: gp.GatingSummary) -> dict[str, str]:
    return {p: why for producers, _, why in summary.ungated_groups for p in producers}


def _set_gates(model: nn.Module, gen: torch.Generator) -> None:
    """Group gates at random log alphas (closed, open and fractional; one entry of each
    closed, so the pruned model is always smaller); block gates closed or open at a fraction,
    at random."""
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-3.0, 2.0, generator=gen)
            closed = int(torch.randint(gate.log_alpha.numel(), (), generator=gen))
            gate.log_alpha.view(-1)[closed] = -6.0  # one closed at least: fewer FLOPs
        for gate in gating.block_gates:
            assert isinstance(gate, HardConcreteGate)
            closed = bool(torch.rand((), generator=gen) < 0.5)
            gate.log_alpha.fill_(-6.0 if closed else 0.5)


def _train_and_prune(
    factory: Callable[[], nn.Module], sample: Sample, seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """gate_, a few steps under a FLOPs budget, random fractional gates, prune: the pruned
    model costs the hard expected cost and less than the dense one, equals the gated model
    (eval, fresh inputs of two batch sizes) within 1e-5, and so does the exported plan
    replayed on a fresh instance with the pruned weights. Returns (gated, pruned)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = factory()
    randomise_batchnorms(model, gen)
    model.eval()
    x = sample(3, gen)
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    gate_(model, x)
    budget = gp.Budget(model, x, flops=0.5)
    budget_steps(model, budget, 3, lambda: sample(3, gen))
    _set_gates(model, gen)
    model.eval()
    hard = gp.cost(model, x, hard=True)
    pruned = gp.prune(model)
    pruned.eval()
    got = gp.cost(pruned, x)
    assert isinstance(got, gp.Cost)
    assert (got.flops, got.params) == (float(hard.flops), float(hard.params))
    assert got.flops < dense.flops
    assert got.params < dense.params
    fresh = apply_plan(factory(), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        for b in (1, 4):
            xi = sample(b, gen)
            want = model(xi)
            assert (pruned(xi) - want).abs().max().item() <= 1e-5
            assert (fresh(xi) - want).abs().max().item() <= 1e-5
    return model, pruned


# ---------------------------------------------------------------- 1. adding a Python 0


def _conv_bn(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """RepVGG's training block: 3x3 conv-BN + 1x1 conv-BN + identity BN (or ``id_out = 0``
    when the shapes differ), summed, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = _conv_bn(cin, cout, 3, stride)
        self.rbr_1x1 = _conv_bn(cin, cout, 1, stride)

    def forward(self, inputs: Tensor) -> Tensor:
        id_out: Tensor | int = 0
        if self.rbr_identity is not None:
            id_out = self.rbr_identity(inputs)  # (B, C, H, W)
        return F.relu(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)  # (B, C, H, W)


class RepVGG(nn.Module):
    """Two stride-2 blocks (``+ 0``), one with an identity, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = RepVGGBlock(3, 8, 2)
        self.b = RepVGGBlock(8, 16, 2)
        self.c = RepVGGBlock(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.c(self.b(self.a(x))).mean((2, 3)))  # (B, 5)


def _img(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 3, 12, 12, generator=gen)


def test_repvgg_id_out_zero_keeps_the_channels_gated() -> None:
    summary = gate_(RepVGG(), _img(2, torch.Generator().manual_seed(0)))
    assert {"a.rbr_dense.0", "a.rbr_1x1.0", "b.rbr_dense.0", "b.rbr_1x1.0"} <= _gated(summary)
    assert not any("constant" in why for why in _ungated(summary).values())
    _, pruned = _train_and_prune(RepVGG, _img)
    head = pruned.get_submodule("head")
    assert isinstance(head, nn.Linear)
    assert head.in_features < 16


class WaveNet(nn.Module):
    """A WaveNet residual stack: dilated conv -> 2R, ``tanh(a) * sigmoid(b)``, 1x1 residual
    and skip convs; the skips summed from ``skip = 0``."""

    def __init__(self, r: int = 8, s: int = 12) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, r, 1)
        self.dil = nn.ModuleList([nn.Conv1d(r, 2 * r, 2, dilation=d, padding=d) for d in (1, 2)])
        self.res = nn.ModuleList([nn.Conv1d(r, r, 1) for _ in range(2)])
        self.skip = nn.ModuleList([nn.Conv1d(r, s, 1) for _ in range(2)])
        self.out1 = nn.Conv1d(s, s, 1)
        self.out2 = nn.Conv1d(s, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)  # (B, R, L)
        skip: Tensor | int = 0
        for dil, res, sk in zip(self.dil, self.res, self.skip, strict=True):
            a, b = dil(h)[..., : h.shape[-1]].chunk(2, 1)  # (B, R, L) each
            z = torch.tanh(a) * torch.sigmoid(b)  # (B, R, L)
            h = h + res(z)  # (B, R, L)
            skip = skip + sk(z)  # (B, S, L)
        return self.out2(F.relu(self.out1(F.relu(skip)))).mean(-1)  # (B, 4)


def _seq(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 1, 16, generator=gen)


def test_wavenet_skip_sum_from_zero_keeps_the_skips_gated() -> None:
    summary = gate_(WaveNet(), _seq(2, torch.Generator().manual_seed(0)))
    assert {"skip.0", "skip.1", "out1"} <= _gated(summary)
    assert not any("constant" in why for why in _ungated(summary).values())
    _, pruned = _train_and_prune(WaveNet, _seq)
    out1 = pruned.get_submodule("out1")
    assert isinstance(out1, nn.Conv1d)
    assert out1.in_channels < 12


# a branch f ending in an add of 0 (the residual add is x + tail(f))
ZERO_TAILS: dict[str, Callable[[Tensor], Tensor]] = {
    "f + 0": lambda f: f + 0,
    "0 + f": lambda f: 0 + f,
    "f - 0.0": lambda f: f - 0.0,
    "0.0 - f": lambda f: 0.0 - f,
    "torch.add(f, 0)": lambda f: torch.add(f, 0),
    "f.add(0.0)": lambda f: f.add(0.0),
}


class ZeroTail(nn.Module):
    """A BatchNorm stream with two residual blocks whose branch ends in ``tail`` (an add of
    the number 0), a 1x1 conv head."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.tail = ZERO_TAILS[tail]
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pw1 = nn.ModuleList([nn.Conv2d(8, 16, 1) for _ in range(2)])
        self.pw2 = nn.ModuleList([nn.Conv2d(16, 8, 1) for _ in range(2)])
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.stem(x))  # (B, 8, H, W)
        for pw1, pw2 in zip(self.pw1, self.pw2, strict=True):
            x = x + self.tail(pw2(F.relu(pw1(x))))  # (B, 8, H, W)
        return self.head(x).mean((2, 3))  # (B, 3)


@pytest.mark.parametrize("tail", list(ZERO_TAILS))
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_a_branch_ending_in_an_add_of_zero_keeps_its_block_gate(tail: str, seed: int) -> None:
    summary = gate_(ZeroTail(tail), _img(2, torch.Generator().manual_seed(seed)))
    assert [site for _, site, _ in summary.blocks] == ["pw2.0", "pw2.1"]
    assert {"stem", "pw1.0", "pw1.1"} <= _gated(summary)
    _train_and_prune(lambda: ZeroTail(tail), _img, seed)


@pytest.mark.parametrize("const", [1, 0.5, -1e-3])
def test_adding_a_non_zero_number_still_keeps_the_channels_whole(const: float) -> None:
    class AddConst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(F.relu(self.a(x) + const))  # (B, 4, H, W)

    summary = gate_(AddConst(), _img(2, torch.Generator().manual_seed(0)))
    assert "a" not in _gated(summary)
    assert "constant" in _ungated(summary)["a"]


# ------------------------------------------------- 2. nn.Softmax module, 3. torch.roll


class WindowAttention(nn.Module):
    """Swin's window attention as its reference code writes it: fused qkv, ``self.softmax =
    nn.Softmax(dim=-1)`` (or ``softmax``: ``"module"``, ``"method"``, ``"module1"`` over the
    heads), ``self.attn_drop = nn.Dropout`` on the probabilities."""

    def __init__(self, dim: int, heads: int, softmax: str = "module") -> None:
        super().__init__()
        self.heads, self.how = heads, softmax
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.softmax = nn.Softmax(dim=1 if softmax == "module1" else -1)
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, hd) each
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
        attn = attn.softmax(dim=-1) if self.how == "method" else self.softmax(attn)
        attn = self.attn_drop(attn)  # (B, H, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class Tokens(nn.Module):
    """Tokens through one window attention (``softmax`` form) and an MLP, a linear head."""

    def __init__(self, softmax: str) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.attn = WindowAttention(16, 4, softmax)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(self.inp(x)).mean(1))  # (B, 4)


def _tokens(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 6, 5, generator=gen)


@pytest.mark.parametrize("softmax", ["module", "method"])
def test_a_softmax_module_over_the_keys_gates_the_heads_like_the_method(softmax: str) -> None:
    summary = gate_(Tokens(softmax), _tokens(2, torch.Generator().manual_seed(0)))
    assert "attn.qkv" in _gated(summary)
    assert [size for producers, size in summary.channel_groups if "attn.qkv" in producers] == [4]
    _, pruned = _train_and_prune(lambda: Tokens(softmax), _tokens)
    qkv = pruned.get_submodule("attn.qkv")
    assert isinstance(qkv, nn.Linear)
    assert qkv.out_features < 48


def test_a_softmax_module_over_the_heads_keeps_them_whole() -> None:
    summary = gate_(Tokens("module1"), _tokens(2, torch.Generator().manual_seed(0)))
    assert "attn.qkv" not in _gated(summary)
    assert "attn.qkv" in _ungated(summary)


def _window_partition(x: Tensor, ws: int) -> Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)  # (B, H/ws, ws, W/ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws, c)  # (B*nW, ws*ws, C)


def _window_reverse(windows: Tensor, ws: int, h: int, w: int) -> Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c)  # (B, H/ws, W/ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)  # (B, H, W, C)


class SwinBlock(nn.Module):
    """Swin's block: LayerNorm, ``torch.roll`` by ``-shift`` on (H, W), window attention,
    roll back, residual; LayerNorm, MLP, residual."""

    def __init__(self, dim: int, res: int, ws: int, shift: int) -> None:
        super().__init__()
        self.res, self.ws, self.shift = res, ws, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, 2)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        shortcut = x  # (B, L, C)
        h = self.norm1(x).view(b, self.res, self.res, c)  # (B, H, W, C)
        h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))  # (B, H, W, C)
        h = self.attn(_window_partition(h, self.ws))  # (B*nW, ws*ws, C)
        h = _window_reverse(h, self.ws, self.res, self.res)  # (B, H, W, C)
        h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))  # (B, H, W, C)
        x = shortcut + h.view(b, self.res * self.res, c)  # (B, L, C)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))  # (B, L, C)


class Swin(nn.Module):
    """Patch embedding, a shifted Swin block, LayerNorm, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, 2)
        self.block = SwinBlock(8, 4, 2, 1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, L, C)
        return self.head(self.norm(self.block(x)).mean(1))  # (B, 4)


def _patches(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 3, 8, 8, generator=gen)


def test_a_shifted_window_block_gates_its_heads_and_its_attention_branch() -> None:
    summary = gate_(Swin(), _patches(2, torch.Generator().manual_seed(0)))
    assert [
        size for producers, size in summary.channel_groups if "block.attn.qkv" in producers
    ] == [2]
    assert {"block.fc1"} <= _gated(summary)
    assert [site for _, site, _ in summary.blocks] == ["block.attn.proj", "block.fc2"]
    assert not any("roll" in why for _, why in summary.ungated_adds)
    _train_and_prune(Swin, _patches)


# roll forms along the spatial dimensions of (B, C, H, W): (shifts, dims), function or method
ROLLS = st.tuples(
    st.lists(st.integers(-5, 5), min_size=1, max_size=2),
    st.sampled_from([(2,), (3,), (-1,), (2, 3), (-2, -1)]),
    st.booleans(),
)


class RollBlock(nn.Module):
    """A stem conv (the stream) and a residual conv branch rolled along spatial dimensions
    ``dims`` by ``shifts`` (``x.roll`` if ``method``, else ``torch.roll``)."""

    def __init__(self, shifts: list[int], dims: tuple[int, ...], method: bool) -> None:
        super().__init__()
        self.shifts, self.dims, self.method = tuple(shifts[: len(dims)]), dims, method
        self.shifts += (1,) * (len(dims) - len(self.shifts))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, 8, H, W)
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))  # (B, 8, H, W)
        if self.method:
            y = y.roll(self.shifts, self.dims)  # (B, 8, H, W)
        else:
            y = torch.roll(y, shifts=self.shifts, dims=self.dims)  # (B, 8, H, W)
        return self.head((x + y).mean((2, 3)))  # (B, 5)


@settings(max_examples=12, deadline=None)
@given(form=ROLLS, seed=st.integers(0, 2**16))
def test_a_roll_along_spatial_dimensions_passes_channels_and_block_gate(
    form: tuple[list[int], tuple[int, ...], bool], seed: int
) -> None:
    factory = lambda: RollBlock(*form)  # noqa: E731
    summary = gate_(factory(), _patches(2, torch.Generator().manual_seed(seed)))
    assert {"stem", "c1", "c2"} <= _gated(summary)
    assert [site for _, site, _ in summary.blocks] == ["b2"]
    _train_and_prune(factory, _patches, seed)


class RollChannels(nn.Module):
    """``torch.roll`` of gated channels along their own dimension, or with no ``dims``."""

    def __init__(self, dims: int | None) -> None:
        super().__init__()
        self.dims = dims
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))  # (B, 8, H, W)
        h = torch.roll(h, 1) if self.dims is None else torch.roll(h, 1, self.dims)  # (B, 8, H, W)
        return self.b(h)  # (B, 4, H, W)


@pytest.mark.parametrize(
    ("dims", "why"),
    [(1, "rolls the channels' dimension 1"), (-3, "rolls the channels"), (None, "flattened")],
)
def test_a_roll_of_the_channels_or_the_flattened_tensor_keeps_them_whole(
    dims: int | None, why: str
) -> None:
    summary = gate_(RollChannels(dims), _patches(2, torch.Generator().manual_seed(0)))
    assert "a" not in _gated(summary)
    assert why in _ungated(summary)["a"]


# ------------------------------------------ 4. a buffer sliced by a traced size, top level


class PositionIds(nn.Module):
    """Hugging Face's BertEmbeddings on the root: ``self.position_ids[:, :seq_len]`` (or the
    ``narrow`` the message suggests)."""

    def __init__(self, narrow: bool) -> None:
        super().__init__()
        self.narrow = narrow
        self.emb = nn.Embedding(8, 4)
        self.register_buffer("position_ids", torch.arange(8).expand((1, -1)), persistent=False)
        self.fc = nn.Linear(4, 2)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.size(1)
        pos = self.position_ids.narrow(1, 0, t) if self.narrow else self.position_ids[:, :t]
        return self.fc(self.emb(ids) + self.emb(pos))  # (B, T, 2)


class TopLevelBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) if x.sum() > 0 else self.lin(-x)  # (B, 4)


def test_a_top_level_buffer_sliced_by_a_traced_size_traces_as_narrow_does() -> None:
    """Before 2026-12-08 00:27 UTC ``self.position_ids[:, :t]`` was a ValueError ("slice
    indices must be integers", naming narrow); it is now traced as ``narrow`` is, the slice
    taken by the length as the model runs."""
    ids = torch.randint(0, 8, (2, 5))
    for narrow in (False, True):
        torch.manual_seed(0)
        model = PositionIds(narrow)
        gate_(model, ids)
        model.eval()
        pruned = gp.prune(model)
        with torch.no_grad():
            for t in (1, 3, 8):
                xi = torch.randint(0, 8, (3, t))
                assert pruned(xi).shape == (3, t, 2)
                assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


def test_top_level_control_flow_still_names_control_flow() -> None:
    with pytest.raises(ValueError, match="control flow") as info:
        gate_(TopLevelBranch(), torch.randn(2, 4))
    assert "narrow" not in str(info.value)
