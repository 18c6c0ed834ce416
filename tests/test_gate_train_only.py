"""Modules a network calls only in training mode (auxiliary classifiers), which the eval-mode
trace gate_ works on lacks. Replicas of torchvision's GoogLeNet and Inception v3 patterns:
the channels such a head reads stay whole and the code calling it is not rewritten, so the
pruned model runs in train mode and computes what the gated model does. Before 2026-12-08
prune cut the channels the head reads and left the head at full width: the pruned model was
exact in eval mode and crashed in train mode. Also torch's QuantStub / DeQuantStub
(identities in a float model), which cost() refused.
"""

from __future__ import annotations

import json

import torch
from gating_helpers import check_pruned, examples, randomise_batchnorms, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub

import gatedprune
from gatedprune.costs import Cost
from gatedprune.gating import apply_plan, export_plan, gate_


class Basic(nn.Module):
    """torchvision's BasicConv2d: conv, batch norm, ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))  # (B, C_out, H, W)


class Mixed(nn.Module):
    """An Inception module: two branches of two convolutions, concatenated."""

    def __init__(self, c_in: int, w: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(Basic(c_in, w), Basic(w, w))
        self.b2 = nn.Sequential(Basic(c_in, w + 1), Basic(w + 1, w + 2))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b2(x)], 1)  # (B, 2w + 2, H, W)


class Aux(nn.Module):
    """torchvision's InceptionAux: pool, 1x1 conv, linear."""

    def __init__(self, c_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = Basic(c_in, 4)
        self.fc = nn.Linear(4 * 2 * 2, n_out)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(x, (2, 2))  # (B, C, 2, 2)
        return self.fc(torch.flatten(self.conv(x), 1))  # (B, n_out)


class GoogLeNetLike(nn.Module):
    """torchvision GoogLeNet's auxiliary heads, read from mid-level feature maps."""

    def __init__(self, w: int, residual: bool = False) -> None:
        super().__init__()
        self.stem = Basic(3, 6)
        self.mixed1 = Mixed(6, w)
        self.mixed2 = Mixed(2 * w + 2, w)
        self.aux1 = Aux(2 * w + 2, 5)
        self.residual = residual
        self.branch = nn.Sequential(Basic(2 * w + 2, w), Basic(w, 2 * w + 2))
        self.fc = nn.Linear(2 * w + 2, 5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None] | Tensor:
        x = self.mixed1(self.stem(x))  # (B, 2w + 2, H, W)
        aux1: Tensor | None = None
        # torchvision/models/googlenet.py:132-134 (two nested ifs there):
        # `if self.aux1 is not None:` / `if self.training:` / `aux1 = self.aux1(x)`
        if self.aux1 is not None and self.training:
            aux1 = self.aux1(x)  # (B, 5)
        x = self.mixed2(x)  # (B, 2w + 2, H, W)
        if self.residual:
            x = x + self.branch(x)  # a residual block in the code calling aux1
        out = self.fc(x.mean((2, 3)))  # (B, 5)
        if self.training:
            return out, aux1
        return out


class InceptionLike(nn.Module):
    """torchvision Inception v3's ``_forward`` / ``eager_outputs``: the aux head reads the
    output of a module traced through, and the output depends on ``self.training``."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.aux_logits = True
        self.Conv2d_1a = Basic(3, 6)
        self.Mixed_6e = Mixed(6, w)
        self.AuxLogits = Aux(2 * w + 2, 5)
        self.Mixed_7a = Mixed(2 * w + 2, w)
        self.fc = nn.Linear(2 * w + 2, 5)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.Mixed_6e(self.Conv2d_1a(x))  # (B, 2w + 2, H, W)
        aux: Tensor | None = None
        if self.training and self.aux_logits:  # torchvision/models/inception.py:137, 159
            aux = self.AuxLogits(x)  # (B, 5)
        x = self.Mixed_7a(x)  # (B, 2w + 2, H, W)
        return self.fc(torch.flatten(x.mean((2, 3)), 1)), aux  # (B, 5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None] | Tensor:
        x, aux = self._forward(x)
        if self.training and self.aux_logits:  # inception.py:159 (eager_outputs)
            return x, aux
        return x


def check_train_mode(model: nn.Module, pruned: nn.Module, x: Tensor) -> None:
    """The pruned model in train mode (batch statistics) equals the gated one with its gates
    at their eval values, auxiliary outputs too."""
    model.train()
    model.gatedprune.eval()  # gates at their eval (deterministic) values
    pruned.train()
    with torch.no_grad():
        got, want = pruned(x), model(x)
    assert isinstance(got, tuple)
    assert isinstance(want, tuple)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert g is not None
        assert w is not None
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= 1e-4
    model.eval()
    pruned.eval()


@settings(max_examples=examples(6), deadline=None)
@given(w=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_googlenet_aux_head_reads_whole_channels(w: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GoogLeNetLike(w)
    randomise_batchnorms(model, gen)
    model.eval()
    x = torch.randn(3, 3, 8, 8, generator=gen)
    summary = gate_(model, x)
    assert ("aux1", "runs only in training mode") in summary.ungated_layers
    kept = {p for ps, _, why in summary.ungated_groups if "read by aux1" in why for p in ps}
    assert kept == {"mixed1.b1.1.conv", "mixed1.b2.1.conv"}
    assert summary.channel_groups  # the rest is gated
    randomise_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory=lambda: GoogLeNetLike(w))
    assert pruned.aux1.conv.conv.in_channels == 2 * w + 2
    check_train_mode(model, pruned, x)


def test_googlenet_aux_head_plan_replays_in_train_mode() -> None:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = GoogLeNetLike(4).eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    gate_(model, x)
    randomise_gates(model, gen)
    pruned = gatedprune.prune(model.eval())
    fresh = apply_plan(GoogLeNetLike(4), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    check_train_mode(model, fresh, x)


def test_inception_aux_logits_reads_whole_channels() -> None:
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = InceptionLike(3)
    randomise_batchnorms(model, gen)
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    summary = gate_(model, x)
    assert ("AuxLogits", "runs only in training mode") in summary.ungated_layers
    kept = {p for ps, _, why in summary.ungated_groups if "read by AuxLogits" in why for p in ps}
    assert kept == {"Mixed_6e.b1.1.conv", "Mixed_6e.b2.1.conv"}
    randomise_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory=lambda: InceptionLike(3))
    check_train_mode(model, pruned, x)


def test_block_in_code_calling_aux_head_stays() -> None:
    """prune rewrites the forward of a module whose residual branch it removes, from the
    eval-mode trace, which lacks the aux call: that forward is left as written."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = GoogLeNetLike(3, residual=True).eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    summary = gate_(model, x)
    assert not summary.blocks
    assert any("calls 'aux1' only in training mode" in why for _, why in summary.ungated_adds)
    randomise_gates(model, gen)
    pruned = check_pruned(model, x, gen, factory=lambda: GoogLeNetLike(3, residual=True))
    check_train_mode(model, pruned, x)


class Untraceable(GoogLeNetLike):
    """Training-mode code fx cannot trace (a branch on a tensor's value) calling the head."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None] | Tensor:
        x = self.mixed1(self.stem(x))  # (B, 2w + 2, H, W)
        aux1: Tensor | None = None
        if self.training and bool(x.sum() > -1e9):
            aux1 = self.aux1(x)  # (B, 5)
        out = self.fc(self.mixed2(x).mean((2, 3)))  # (B, 5)
        return (out, aux1) if self.training else out


def test_untraceable_training_code_gates_nothing() -> None:
    gen = torch.Generator().manual_seed(4)
    model = Untraceable(3).eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    summary = gate_(model, x)
    assert not summary.channel_groups
    assert summary.ungated_groups
    whys = [why for _, _, why in summary.ungated_groups]
    assert sum("runs aux1 only in training mode and torch.fx cannot" in w for w in whys) >= 4
    assert summary.ungated_layers == [
        ("aux1", "runs only in training mode (code fx cannot trace calls it)")
    ]
    pruned = check_pruned(model, x, gen)
    check_train_mode(model, pruned, x)


class Dead(nn.Module):
    """A module with parameters the forward never calls (in either mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.unused = nn.Linear(6, 2)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))  # (B, 2)


def test_module_never_called_changes_nothing() -> None:
    model = Dead().eval()
    summary = gate_(model, torch.randn(2, 3, 4, 4))
    assert summary.channel_groups == [(["conv"], 6)]
    assert not summary.ungated_layers


class QuantFloat(nn.Module):
    """torchvision's quantizable models with quantize=False: QuantStub at the input,
    DeQuantStub at the output (torchvision/models/quantization/mobilenetv2.py:35-43)."""

    def __init__(self, stubs: bool = True) -> None:
        super().__init__()
        self.quant: nn.Module = QuantStub() if stubs else nn.Identity()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.dequant: nn.Module = DeQuantStub() if stubs else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)  # (B, 3, H, W)
        x = self.conv2(torch.relu(self.conv1(x)))  # (B, 4, H, W)
        return self.dequant(x)


def test_quant_stubs_cost_nothing_and_pass_channels() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    with_stubs, plain = QuantFloat().eval(), QuantFloat(stubs=False).eval()
    c = gatedprune.cost(with_stubs, x)
    assert isinstance(c, Cost)
    assert c == gatedprune.cost(plain, x)
    summary = gate_(with_stubs, x)
    assert summary.channel_groups == [(["conv1"], 8)]
    randomise_gates(with_stubs, gen)
    check_pruned(with_stubs, x, gen, factory=QuantFloat)
