"""Layer scale (a per-channel parameter multiplying gated channels: ``self.gamma * h``,
``h * self.s``, ``torch.mul(h, self.gamma)``, ``h.mul(self.gamma)``, ``h / self.s``) carries
the channels, its parameter sliced with the kept ones; an added per-channel parameter keeps
them whole, named. ``nn.Embedding`` / ``nn.EmbeddingBag`` outputs are a gated source (the
columns of the weight), with a summary line when left whole. Before 2026-12-07 22:10 UTC a
layer scale kept its channels whole ("multiplies by ungated channels") and an embedding's
dimensions were never gated nor named in the summary."""

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


class LayerScaleMLP(nn.Module):
    """``fc2(s * relu(fc1(x)))`` in one of the product forms."""

    def __init__(self, form: str = "s * h", hidden: int = 16) -> None:
        super().__init__()
        self.form = form
        self.fc1 = nn.Linear(8, hidden)
        self.s = nn.Parameter(torch.rand(hidden) + 0.5)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x))  # (B, H)
        if self.form == "s * h":
            h = self.s * h
        elif self.form == "h * s":
            h = h * self.s
        elif self.form == "torch.mul":
            h = torch.mul(h, self.s)
        elif self.form == "h.mul":
            h = h.mul(self.s)
        else:
            h = h / self.s
        return self.fc2(h)  # (B, 3)


class ConvNeXtLike(nn.Module):
    """A ConvNeXt block on a BatchNorm stream: depthwise conv, channels-last Linear MLP,
    layer scale ``gamma (C,)`` after it, residual add."""

    def __init__(self, c: int = 8, layer_norm: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm: nn.Module = nn.LayerNorm(c) if layer_norm else nn.Identity()
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.head = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.stem(x))  # (B, C, H, W)
        h = self.dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        h = self.pw2(F.gelu(self.pw1(self.norm(h))))  # (B, H, W, C)
        h = self.gamma * h
        x = x + h.permute(0, 3, 1, 2)  # (B, C, H, W)
        return self.head(x.mean((2, 3)))  # (B, 3)


class BNLayerScale(nn.Module):
    """Layer scale ``gamma (C, 1, 1)`` on a BatchNorm residual stream (CaiT/MBConv-style)."""

    def __init__(self, shape: tuple[int, ...] = (16, 1, 1)) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pw1 = nn.Conv2d(16, 32, 1)
        self.pw2 = nn.Conv2d(32, 16, 1)
        self.gamma = nn.Parameter(torch.rand(shape) + 0.5)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.inp(x))  # (B, 16, H, W)
        x = x + self.gamma * self.pw2(F.gelu(self.pw1(x)))  # (B, 16, H, W)
        return self.head(x).mean((2, 3))  # (B, 4)


class AddedParam(nn.Module):
    """``fc2(relu(fc1(x)) + beta)``: an added parameter is not zero-preserving."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.beta = nn.Parameter(torch.randn(16))
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)) + self.beta)  # (B, 3)


class SharedScale(nn.Module):
    """One scale parameter multiplying two tensors: kept whole, named."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(8, 16)
        self.s = nn.Parameter(torch.rand(16) + 0.5)
        self.out = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.s * F.relu(self.fc1(x)), self.s * F.relu(self.fc2(x))  # (B, 16) each
        return self.out(torch.cat([a, b], 1))  # (B, 3)


class EmbedLinear(nn.Module):
    def __init__(self, vocab: int = 30, dim: int = 12, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.fc = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(F.relu(self.fc(self.emb(ids).mean(1))))  # (B, 3)


class EmbedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.rnn = nn.GRU(12, 16, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, ids: Tensor) -> Tensor:
        y, _ = self.rnn(self.emb(ids))  # (B, T, 16)
        return self.out(y[:, -1])  # (B, 3)


class EmbedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.conv = nn.Conv1d(12, 10, 3, padding=1)
        self.out = nn.Linear(10, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.conv(self.emb(ids).transpose(1, 2))  # (B, 10, T)
        return self.out(F.relu(h).mean(2))  # (B, 3)


class EmbedBag(nn.Module):
    def __init__(self, mode: str = "sum") -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 12, mode=mode)
        self.fc = nn.Linear(12, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(self.bag(ids))  # (B, 3)


class EmbedNorm(nn.Module):
    def __init__(self, max_norm: float | None = None, layer_norm: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12, max_norm=max_norm)
        self.norm: nn.Module = nn.LayerNorm(12) if layer_norm else nn.Identity()
        self.fc = nn.Linear(12, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(self.norm(self.emb(ids)).mean(1))  # (B, 3)


def _ids(b: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 30, (b, 6), generator=gen)


def _vec(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 8, generator=gen)


def _img(b: int, gen: torch.Generator) -> Tensor:
    return torch.randn(b, 3, 5, 5, generator=gen)


def _fractional_gates(model: nn.Module, gen: torch.Generator, blocks_open: bool) -> None:
    """Every gate at a random log alpha: some closed, some open at a fraction (not 1); block
    gates open at a fraction if ``blocks_open`` (the branch, and its layer scale, kept)."""
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in [*gating.group_gates, *gating.block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-3.0, 1.0, generator=gen)
        for gate in gating.block_gates if blocks_open else []:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.fill_(0.5)


def _check(
    factory: Callable[[], nn.Module],
    sample: Sample,
    seed: int = 0,
    steps: int = 3,
    blocks_open: bool = False,
) -> tuple[nn.Module, nn.Module, gp.Cost]:
    """gate_, a few steps under a FLOPs budget, random fractional gates, prune: the pruned
    model equals the gated one on fresh inputs (eval), costs the hard expected cost, and the
    exported plan replays on a fresh instance. Returns (gated, pruned, dense cost)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = factory()
    randomise_batchnorms(model, gen)
    x = sample(3, gen)
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    gate_(model, x)
    budget = gp.Budget(model, x, flops=0.6)
    budget_steps(model, budget, steps, lambda: sample(3, gen))
    _fractional_gates(model, gen, blocks_open)
    model.eval()
    hard = gp.cost(model, x, hard=True)
    pruned = gp.prune(model)
    got = gp.cost(pruned, x)
    assert isinstance(got, gp.Cost)
    assert (got.flops, got.params) == (float(hard.flops), float(hard.params))
    with torch.no_grad():
        for b in (1, 4):
            xi = sample(b, gen)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
    fresh = apply_plan(factory(), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        xi = sample(2, gen)
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5
    return model, pruned, dense


def _ungated(summary: gp.GatingSummary) -> dict[str, str]:
    return {p: why for producers, _, why in summary.ungated_groups for p in producers}


def _gated(summary: gp.GatingSummary) -> set[str]:
    return {p for producers, _ in summary.channel_groups for p in producers}


@pytest.mark.parametrize("form", ["s * h", "h * s", "torch.mul", "h.mul", "h / s"])
def test_a_layer_scale_on_hidden_units_is_gated_and_sliced(form: str) -> None:
    summary = gate_(LayerScaleMLP(form), torch.randn(2, 8))
    assert _gated(summary) == {"fc1"}
    _, pruned, dense = _check(lambda: LayerScaleMLP(form), _vec)
    assert isinstance(pruned, LayerScaleMLP)
    assert pruned.s.shape == (pruned.fc1.out_features,) == (pruned.fc2.in_features,)
    assert pruned.fc1.out_features < 16
    small = gp.cost(pruned, torch.randn(3, 8))
    assert isinstance(small, gp.Cost)
    assert small.params < dense.params
    assert small.flops < dense.flops


def test_a_convnext_like_block_gates_its_stream_and_slices_gamma() -> None:
    summary = gate_(ConvNeXtLike(), torch.randn(2, 3, 5, 5))
    assert {"stem", "pw2"} <= _gated(summary)  # the stream, through gamma
    assert "pw1" in _gated(summary)
    _, pruned, dense = _check(ConvNeXtLike, _img, blocks_open=True)
    assert isinstance(pruned, ConvNeXtLike)
    assert pruned.gamma.shape == (pruned.pw2.out_features,) == (pruned.bn.num_features,)
    assert pruned.bn.num_features < 8
    small = gp.cost(pruned, torch.randn(3, 3, 5, 5))
    assert isinstance(small, gp.Cost)
    assert (small.flops, small.params) < (dense.flops, dense.params)


def test_a_convnext_block_with_layer_norm_keeps_the_stream_and_gates_the_mlp() -> None:
    summary = gate_(ConvNeXtLike(layer_norm=True), torch.randn(2, 3, 5, 5))
    assert "pw1" in _gated(summary)
    assert "LayerNorm" in _ungated(summary)["pw2"]
    _, pruned, _ = _check(lambda: ConvNeXtLike(layer_norm=True), _img, blocks_open=True)
    assert isinstance(pruned, ConvNeXtLike)
    assert pruned.gamma.shape == (8,)


@pytest.mark.parametrize("shape", [(16, 1, 1), (1, 16, 1, 1)])
def test_a_layer_scale_on_a_batchnorm_stream_is_gated(shape: tuple[int, ...]) -> None:
    summary = gate_(BNLayerScale(shape), torch.randn(2, 3, 5, 5))
    assert {"inp", "pw2"} <= _gated(summary)
    assert not any("multiplies" in why for why in _ungated(summary).values())
    _, pruned, dense = _check(lambda: BNLayerScale(shape), _img, blocks_open=True)
    assert isinstance(pruned, BNLayerScale)
    assert pruned.gamma.shape[-3] == pruned.bn.num_features < 16
    for seed in (1, 2):  # the block closed or open, the channels random
        _check(lambda: BNLayerScale(shape), _img, seed=seed)
    small = gp.cost(pruned, torch.randn(3, 3, 5, 5))
    assert isinstance(small, gp.Cost)
    assert (small.flops, small.params) < (dense.flops, dense.params)


def test_an_added_parameter_keeps_the_channels_whole_with_its_name() -> None:
    summary = gate_(AddedParam(), torch.randn(2, 8))
    why = _ungated(summary)["fc1"]
    assert "adds parameter 'beta' per channel: a closed channel would not be zero" in why
    assert "multiplies by ungated channels" not in why


def test_a_shared_scale_is_kept_whole_with_a_reason_naming_it() -> None:
    summary = gate_(SharedScale(), torch.randn(2, 8))
    why = _ungated(summary)
    assert "parameter 's' per channel" in why["fc1"]
    assert "multiplies by ungated channels" not in why["fc1"]
    model = SharedScale()
    gate_(model, torch.randn(2, 8))
    model.eval()
    pruned = gp.prune(model)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


def test_a_plan_keeping_other_entries_of_a_scale_is_refused() -> None:
    model = LayerScaleMLP()
    gate_(model, torch.randn(2, 8))
    for g in gp.gate_modules(model):
        g.force_(torch.arange(g.n) % 2 == 0)
    plan = export_plan(model)
    assert plan["slices"]["s"]["kind"] == "scale"
    plan.pop("checksum", None)
    plan["slices"]["s"]["out"] = list(range(1, 16, 2))
    with pytest.raises(ValueError, match="per-channel factor 's'"):
        apply_plan(LayerScaleMLP(), plan)


@pytest.mark.parametrize(
    ("factory", "sample"),
    [(EmbedLinear, _ids), (EmbedGRU, _ids), (EmbedConv, _ids), (EmbedBag, _ids)],
)
def test_an_embedding_is_a_gated_source(factory: Callable[[], nn.Module], sample: Sample) -> None:
    model = factory()
    summary = gate_(model, _ids(2, torch.Generator().manual_seed(0)))
    name = "bag" if factory is EmbedBag else "emb"
    assert name in _gated(summary)
    _, pruned, dense = _check(factory, sample)
    m = pruned.get_submodule(name)
    assert isinstance(m, nn.Embedding | nn.EmbeddingBag)
    assert m.weight.shape == (30, m.embedding_dim)
    assert m.embedding_dim < 12
    small = gp.cost(pruned, _ids(3, torch.Generator().manual_seed(1)))
    assert isinstance(small, gp.Cost)
    assert small.params < dense.params


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_an_embedding_bag_of_any_mode_is_exact(mode: str) -> None:
    _, pruned, _ = _check(lambda: EmbedBag(mode), _ids)
    assert isinstance(pruned, EmbedBag)
    assert pruned.bag.embedding_dim < 12


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"layer_norm": True}, "LayerNorm normalises over these channels"),
        ({"max_norm": 1.0, "layer_norm": False}, "max_norm=1.0) renormalises the rows"),
    ],
)
def test_an_embedding_left_whole_has_a_summary_line(kwargs: dict[str, object], reason: str) -> None:
    model = EmbedNorm(**kwargs)  # type: ignore[arg-type]
    summary = gate_(model, _ids(2, torch.Generator().manual_seed(0)))
    assert reason in _ungated(summary)["emb"]
    assert "emb:" in str(summary)
    model.eval()
    pruned = gp.prune(model)
    assert isinstance(pruned, EmbedNorm)
    assert pruned.emb.embedding_dim == 12


@settings(max_examples=12, deadline=None)
@given(
    hidden=st.integers(2, 12),
    dim=st.integers(2, 10),
    data=st.data(),
)
def test_random_widths_and_closed_sets_prune_exactly(
    hidden: int, dim: int, data: st.DataObject
) -> None:
    def factory() -> nn.Module:
        torch.manual_seed(1)
        return _EmbedScale(dim, hidden)

    model = factory()
    ids = torch.randint(0, 30, (3, 5))
    summary = gate_(model, ids)
    assert sorted(summary.channel_groups) == [(["emb"], dim), (["fc1"], hidden)]
    with torch.no_grad():
        for g in inserted_gating(model).group_gates:
            assert isinstance(g, HardConcreteGate)
            closed = data.draw(st.lists(st.booleans(), min_size=g.n, max_size=g.n))
            # closed, or open at a fractional value (log alpha in [0, 1])
            opened = data.draw(st.lists(st.floats(0.0, 1.0), min_size=g.n, max_size=g.n))
            la = [-10.0 if c else v for c, v in zip(closed, opened, strict=True)]
            g.log_alpha.copy_(torch.tensor(la))
    model.eval()
    hard = gp.cost(model, ids, hard=True)
    pruned = gp.prune(model)
    got = gp.cost(pruned, ids)
    assert isinstance(got, gp.Cost)
    assert (got.flops, got.params) == (float(hard.flops), float(hard.params))
    fresh = apply_plan(factory(), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    probe = torch.randint(0, 30, (4, 7))
    with torch.no_grad():
        want = model(probe)
        assert (pruned(probe) - want).abs().max().item() <= 1e-5
        assert (fresh(probe) - want).abs().max().item() <= 1e-5


class _EmbedScale(nn.Module):
    """Embedding -> Linear -> layer scale -> Linear (both widths random)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.s = nn.Parameter(torch.rand(hidden) + 0.5)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.s * F.relu(self.fc1(self.emb(ids)))  # (B, T, H)
        return self.fc2(h.mean(1))  # (B, 3)


class KeywordFactor(nn.Module):
    """``torch.mul(h, other=t)`` with ``t`` a per-channel parameter or buffer."""

    def __init__(self, buffer: bool) -> None:
        super().__init__()
        self.buffer = buffer
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)
        self.s = nn.Parameter(torch.rand(16) + 0.5)
        self.register_buffer("b", torch.rand(16) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        factor = self.b if self.buffer else self.s
        return self.fc2(torch.mul(F.relu(self.fc1(x)), other=factor))  # (B, 3)


def test_a_factor_given_by_keyword_is_sliced_or_kept_whole() -> None:
    """Before 2026-12-07 22:10 UTC ``other=`` was not read: the channels were gated, the
    factor not sliced, and the pruned model failed with a size mismatch."""
    whole = KeywordFactor(buffer=True)
    summary = gate_(whole, torch.randn(2, 8))
    assert "multiplies by buffer or constant 'b' per channel" in _ungated(summary)["fc1"]
    _, pruned, _ = _check(lambda: KeywordFactor(buffer=False), _vec)
    assert isinstance(pruned, KeywordFactor)
    assert pruned.s.shape == (pruned.fc1.out_features,)
    assert pruned.fc1.out_features < 16
