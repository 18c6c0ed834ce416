"""gate_ audit gaps (small3): masked fills with 0 pass channels through, honest counts and
reasons on ungated lines (a view splitting the channels, the model output, a shared
activation module), and tracing hints."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from gating_helpers import inserted_gating, random_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import gate_


class PaddedSequence(nn.Module):
    """A sequence model zeroing padded positions: ``h.masked_fill(~mask[..., None], fill)`` or
    ``torch.where(mask[..., None], h, fill)`` between two Linear layers."""

    def __init__(self, form: str, fill: float = 0.0) -> None:
        super().__init__()
        self.form = form
        self.fill = fill
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = torch.relu(self.a(x))  # (B, L, 16)
        if self.form == "masked_fill":
            h = h.masked_fill(~mask[..., None], self.fill)  # (B, L, 16)
        elif self.form == "torch.masked_fill":
            h = torch.masked_fill(h, ~mask[..., None], self.fill)  # (B, L, 16)
        elif self.form == "where":
            h = torch.where(mask[..., None], h, self.fill)  # (B, L, 16)
        elif self.form == "where_method":  # (not passed before 2026-12-08 01:37 UTC)
            h = h.where(mask[..., None], self.fill)  # (B, L, 16)
        else:  # a mask per channel
            h = h.masked_fill(mask[..., None].expand(-1, -1, 16), self.fill)  # (B, L, 16)
        return self.b(h)  # (B, L, 4)


def _inputs(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(3, 5, 8, generator=gen)  # (B, L, 8)
    mask = torch.rand(3, 5, generator=gen) > 0.4  # (B, L)
    return x, mask


@settings(max_examples=6, deadline=None)
@pytest.mark.parametrize("form", ["masked_fill", "torch.masked_fill", "where", "where_method"])
@given(seed=st.integers(0, 99))
def test_zero_fill_passes_channels_through_and_prunes_exactly(form: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = PaddedSequence(form)
    x, mask = _inputs(gen)
    summary = gate_(model, (x, mask))
    assert summary.channel_groups == [(["a"], 16)]
    random_gates(model, gen)
    with torch.no_grad():
        inserted_gating(model).group_gates[0].log_alpha[::2] = -20.0  # half closed
    model.eval()
    pruned = gp.prune(model)
    assert isinstance(pruned.a, nn.Linear)
    assert pruned.a.out_features <= 8
    x2, mask2 = _inputs(gen)
    with torch.no_grad():
        assert (pruned(x2, mask2) - model(x2, mask2)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("form", "fill", "reason"),
    [
        ("masked_fill", 1.0, "fills 1.0, not the literal 0"),
        ("where", -1.0, "fills -1.0, not the literal 0"),
        ("where_method", 2.0, "fills 2.0, not the literal 0"),
        ("per_channel", 0.0, "reads a mask per channel (size 16 along the channels)"),
    ],
)
def test_a_fill_that_would_break_pruning_keeps_the_channels_whole(
    form: str, fill: float, reason: str
) -> None:
    x, mask = _inputs(torch.Generator().manual_seed(0))
    summary = gate_(PaddedSequence(form, fill), (x, mask))
    assert not summary.channel_groups
    (producers, n, why), _ = summary.ungated_groups
    assert (producers, n) == (["a"], 16)
    assert reason in why


class Decoder(nn.Module):
    """VAE's decoder: ``relu(dec_fc(z)).view(-1, 16, 7, 7)`` read by a transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.dec_fc = nn.Linear(8, 16 * 7 * 7)
        self.dec = nn.ConvTranspose2d(16, 4, 4, 2, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = torch.relu(self.dec_fc(z)).view(-1, 16, 7, 7)  # (B, 16, 7, 7)
        return self.dec(h).sum()  # a number: the decoder's channels do not reach the output


class AnchorLogits(nn.Module):
    """RetinaNet's classification head: ``view(N, -1, K, H, W)`` of ``A * K`` channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.cls_logits = nn.Conv2d(8, 3 * 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.cls_logits(torch.relu(self.stem(x)))  # (N, 12, H, W)
        n, _, h, w = out.shape
        out = out.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2)  # (N, H, W, 3, 4)
        return out.reshape(n, -1, 4)  # (N, H * W * 3, 4)


def test_an_ungated_line_counts_the_producers_channels_and_names_the_splitting_view() -> None:
    summary = gate_(Decoder(), torch.randn(2, 8))
    ((_producers, n, why),) = [u for u in summary.ungated_groups if u[0] == ["dec_fc"]]
    assert n == 784  # not the 7 entries of the split's last dimension
    assert "ungated     784  dec_fc: " in str(summary)
    assert why.startswith(
        "node 'view' (call_method view) splits the channel dimension (784) into (16, 7, 7) "
        "and dec contracts dimension 1 of the result"
    )


def test_a_split_reaching_the_output_counts_all_channels() -> None:
    summary = gate_(AnchorLogits(), torch.randn(2, 3, 6, 6))
    assert (["cls_logits"], 12, "reaches the model output") in summary.ungated_groups


class Discriminator(nn.Module):
    """DCGAN's discriminator end: ``sigmoid(conv(h)).view(-1, 1).squeeze(1)``; FCOS's box
    head: ``exp(scale * conv(h))``; a VAE's ``Sigmoid`` module last."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.last = nn.Conv2d(8, 2, 3, padding=1)
        self.act = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        y = self.last(torch.relu(self.body(x)))  # (B, 2, H, W)
        if self.form == "sigmoid_view":
            return torch.sigmoid(y).view(-1, 1).squeeze(1)  # (B * 2 * H * W,)
        if self.form == "exp":
            return (y * 2.0).float().exp()  # (B, 2, H, W)
        return self.act(y)  # (B, 2, H, W)


@pytest.mark.parametrize(
    ("form", "through"),
    [
        ("sigmoid_view", "node 'squeeze' (call_method squeeze)"),
        ("exp", "node 'exp' (call_method exp)"),
        ("module", "node 'act' (call_module act)"),
    ],
)
def test_channels_reaching_the_output_through_element_wise_ops_say_so(
    form: str, through: str
) -> None:
    summary = gate_(Discriminator(form), torch.randn(2, 3, 6, 6))
    assert summary.channel_groups == [(["body"], 8)]
    assert summary.ungated_groups == [
        (["last"], 2, f"reaches the model output (through {through})")
    ]


class SharedActConv(nn.Module):
    """ultralytics' ``Conv``: ``default_act = nn.SiLU()`` is a class attribute, one module
    called by every instance."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, 1, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))  # (B, C2, H, W)


class SharedActBottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = SharedActConv(c, c, 1)
        self.cv2 = SharedActConv(c, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x))  # (B, C, H, W)


class SharedActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = SharedActConv(3, 8, 3)
        self.m = nn.Sequential(SharedActBottleneck(8), SharedActBottleneck(8))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.m(self.stem(x)))  # (B, 2, H, W)


def test_a_branch_ending_in_a_shared_activation_is_gated_on_its_conv() -> None:
    """Before 2026-12-08 these adds were left ungated ("the branch ends in node 'stem_act_2'
    (in m.0.cv2): a call of stem.act (SiLU), one module called 5 times"): the gate now
    multiplies the output of the Conv called once that returns the shared SiLU's value
    (tests/test_gate_wrapped_tail.py)."""
    summary = gate_(SharedActNet(), torch.randn(2, 3, 8, 8))
    assert [site for _, site, _ in summary.blocks] == ["m.0.cv2", "m.1.cv2"]
    assert not summary.ungated_adds


class SizedMask(nn.Module):
    """A mask of sizes read from the input: ``torch.zeros(t, t)`` (not traceable) or
    ``torch.zeros((t, t))`` (traceable)."""

    def __init__(self, tupled: bool, make: Callable[..., Tensor]) -> None:
        super().__init__()
        self.tupled = tupled
        self.make = make
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        t = x.size(1)
        m = self.make((t, t)) if self.tupled else self.make(t, t)  # (T, T)
        h = torch.relu(self.a(x))  # (B, T, 8)
        return self.b((m + 1.0) @ h)  # (B, T, 2)


@pytest.mark.parametrize("make", [torch.zeros, torch.randn])  # two messages of torch's
def test_sizes_as_separate_arguments_get_the_tuple_hint(make: Callable[..., Tensor]) -> None:
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"cannot trace SizedMask\.forward") as err:
        gate_(SizedMask(tupled=False, make=make), x)
    text = str(err.value)
    name = make.__name__
    assert f"pass the sizes as one tuple, torch.{name}((t, t)), which fx traces" in text
    assert "move data-dependent control flow into a submodule" not in text
    summary = gate_(SizedMask(tupled=True, make=make), x)
    assert summary.channel_groups == [(["a"], 8)]  # the advice holds


class Routed(nn.Module):
    """A mixture of experts' routing: Python control flow on traced values, in a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        idx = x.sum(-1).gt(0).long()  # (B,)
        out = torch.zeros_like(x)  # (B, 8)
        for i, ex in enumerate(self.experts):
            sel = idx == i
            if sel.any():
                out[sel] = ex(x[sel])
        return out


class RoutedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.moe = Routed()
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.moe(self.inp(x)))  # (B, 2)


def test_control_flow_in_a_submodule_says_it_is_kept_whole() -> None:
    with pytest.warns(UserWarning, match="submodule 'moe'") as record:
        summary = gate_(RoutedNet(), torch.randn(3, 4))
    why = summary.opaque["moe"]
    assert "already in a submodule of its own: the submodule is kept whole" in why
    assert "move it into a submodule of its own" not in why
    assert any("the submodule is kept whole" in str(w.message) for w in record)
