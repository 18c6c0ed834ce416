"""gate_'s summary says what it left ungated and why, in terms a user can act on: residual
forms it does not gate, the module holding an ungated add, why a module is kept whole (with
the usual fix), and why an encoder gets no new shortcuts."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import gatedprune
from gatedprune.gating import InsertedGating, gate_
from gatedprune.gating.graph import trace_model


class Residual(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        b = self.fc(x)
        if self.form == "sub":
            y = x - b
        elif self.form == "torch.sub":
            y = torch.sub(x, b)
        elif self.form == "alpha":
            y = torch.add(x, b, alpha=0.5)
        else:
            y = x + 0.5 * b
        centred = y - y.mean(0)  # a subtraction without a branch of parameters: no line
        return self.head(centred)


@pytest.mark.parametrize("form", ["sub", "torch.sub", "alpha"])
def test_subtraction_and_alpha_residuals_are_reported(form: str) -> None:
    summary = gate_(Residual(form), torch.randn(3, 6))
    assert not summary.blocks
    assert len(summary.ungated_adds) == 1
    label, why = summary.ungated_adds[0]
    assert label.endswith("(in <root>)")
    assert "a subtraction or an add with alpha= is not a residual add" in why
    assert "x + c * f(x)" in str(summary)


def test_the_suggested_form_is_gated() -> None:
    summary = gate_(Residual("scaled"), torch.randn(3, 6))
    assert [b[1] for b in summary.blocks] == ["fc"]
    assert not summary.ungated_adds


class SigmoidEnd(nn.Module):
    """A branch ending in sigmoid (0 -> 0.5): a closed gate would not remove it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.sigmoid(self.conv(x))


def test_an_ungated_add_names_the_module_holding_it() -> None:
    net = nn.Sequential(SigmoidEnd(), SigmoidEnd())
    summary = gate_(net, torch.randn(2, 4, 8))
    labels = [label for label, _ in summary.ungated_adds]
    assert labels == ["add (in 0)", "add_1 (in 1)"]
    assert "the branch ends in sigmoid_1 (in 1)" in dict(summary.ungated_adds)["add_1 (in 1)"]


class CausalAttention(nn.Module):
    """nanoGPT's manual causal attention: a mask buffer sliced by the sequence length."""

    def __init__(self, d: int, narrow: bool) -> None:
        super().__init__()
        self.narrow = narrow
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("mask", torch.tril(torch.ones(16, 16)).view(1, 16, 16))

    def forward(self, x: Tensor) -> Tensor:
        t = x.size(1)
        q, k, v = self.qkv(x).split(x.size(2), dim=2)  # (B, T, d) each
        att = q @ k.transpose(1, 2) / 2.0  # (B, T, T)
        m = self.mask.narrow(1, 0, t).narrow(2, 0, t) if self.narrow else self.mask[:, :t, :t]
        att = att.masked_fill(m == 0, float("-inf")).softmax(-1)  # (B, T, T)
        return self.proj(att @ v)  # (B, T, d)


class ListSliced(nn.Module):
    """A Python list sliced by the sequence length: fx cannot trace it (a tensor sliced so,
    ``self.mask[:, :t, :t]``, is traced since 2026-12-08 00:27 UTC)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.scales = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) * sum(self.scales[: x.size(1)])  # (B, T, d)


class Block(nn.Module):
    def __init__(self, narrow: bool | None) -> None:
        super().__init__()
        self.attn = CausalAttention(8, narrow) if narrow is not None else ListSliced(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + self.attn(x))


def test_a_module_kept_whole_says_why_and_how_to_fix_it() -> None:
    with pytest.warns(UserWarning, match=r"a Python list or tuple sliced by a size"):
        summary = gate_(Block(narrow=None), torch.randn(2, 5, 8))
    assert "slice a tensor instead" in summary.opaque["attn"]
    why = dict(summary.ungated_adds)["add (in <root>)"]
    assert "attn (ListSliced kept whole: torch.fx cannot trace it)" in why


@pytest.mark.parametrize("narrow", [True, False])
def test_the_sliced_mask_and_the_narrow_form_trace(narrow: bool) -> None:
    # before 2026-12-08 00:27 UTC, narrow=False: attn kept whole, "write .narrow(dim, 0, T)"
    summary = gate_(Block(narrow=narrow), torch.randn(2, 5, 8))
    assert not summary.opaque
    assert [b[1] for b in summary.blocks] == ["attn.proj"]


def test_dense_shortcuts_on_an_encoder_say_why_there_are_none() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
            self.head = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.encoder(x)[:, 0])

    summary = gate_(Net(), torch.randn(2, 5, 8), shortcuts="dense")
    assert not summary.shortcuts
    assert ("encoder", summary.unconnected[0][1]) == summary.unconnected[0]
    assert "gated as layers" in summary.unconnected[0][1]
    assert "no shortcuts for encoder" in str(summary)


class HandAttention(nn.Module):
    """Hand-written attention: q, k, v from a fused projection, heads by a view."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2)
        self.q = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        _, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, T, d) each
        q = self.q(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, dh)
        k = k.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, dh)
        v = v.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, dh)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, T, dh)
        return self.head(self.out(att.transpose(1, 2).reshape(b, t, d)))


def test_hand_written_attention_heads_are_gated_and_pruned() -> None:
    # before: left ungated ("gate_ prunes heads of nn.MultiheadAttention ... only"; "a split
    # of the channels, such as q, k, v"); now one gate per head, over the chunked projection
    # and the separate q (tests/test_gate_hand_attention.py has the forms)
    model = HandAttention()
    summary = gate_(model, torch.randn(2, 5, 8))
    groups = [(list(p), n) for p, n in summary.channel_groups]
    assert (["qkv", "q"], 2) in groups
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    # (since 2026-12-08 the unread q section of the chunk is a group of its own, before it)
    heads = groups.index((["qkv", "q"], 2))
    gating.group_gates[heads].force_(torch.tensor([True, False]))  # type: ignore[operator]
    model.eval()
    pruned = gatedprune.prune(model)
    out = pruned.get_submodule("out")
    assert isinstance(out, nn.Linear)
    assert out.in_features == 4  # one head of 4 channels
    with torch.no_grad():
        x = torch.randn(3, 7, 8)
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


class UnpackedShape(nn.Module):
    """Today's Hugging Face attention: ``hidden_shape = (*input_shape, -1, head_dim)``."""

    def __init__(self, spelled_out: bool) -> None:
        super().__init__()
        self.spelled_out = spelled_out
        self.q, self.o = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        if self.spelled_out:
            q = self.q(x).view(x.size(0), x.size(1), -1, 4)  # (B, T, 2, 4)
        else:
            q = self.q(x).view(*x.shape[:-1], -1, 4)  # (B, T, 2, 4)
        return x + self.o(q.flatten(-2))  # (B, T, 8)


@pytest.mark.parametrize("spelled_out", [False, True])
def test_an_unpacked_shape_gets_a_hint(spelled_out: bool) -> None:
    # the hint's own suggestion traces; before, only fx's generic "Proxy object cannot be
    # iterated" message. Since 2026-12-08 03:20 UTC gate_ unpacks the shape (its rank is the
    # example input's); a trace without an example still gives the hint
    model = nn.Sequential(UnpackedShape(spelled_out), nn.Linear(8, 2))
    summary = gate_(model, torch.randn(2, 5, 8))
    assert not summary.opaque, str(summary)
    if spelled_out:
        return
    with pytest.warns(UserWarning, match="write the dimensions out"):
        traced = trace_model(nn.Sequential(UnpackedShape(spelled_out), nn.Linear(8, 2)))
    assert "x.view(x.size(0), x.size(1), -1, self.head_dim)" in traced.opaque["0"]
