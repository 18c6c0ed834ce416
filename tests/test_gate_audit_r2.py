"""Findings of an audit of the 2026-12-07 gate_ and plan changes: tensors passed to an op by
keyword, parameter-free layers of your own inside a gated model, and what the plan
fingerprint sees (dtype constants in forward, learned values a module prints)."""

from __future__ import annotations

import enum
import json
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, inserted_gating, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import apply_plan, export_plan, gate_


class Keywords(nn.Module):
    """Ops reading a gated tensor by keyword."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b, self.head = nn.Conv1d(2, 8, 3), nn.Conv1d(8, 6, 3), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)  # (B, 8, L)
        if self.form == "relu":
            h = torch.relu(input=h)
        elif self.form == "transpose":
            h = torch.transpose(input=h, dim0=1, dim1=2).transpose(1, 2)
        else:
            h = torch.flatten(input=h.unsqueeze(-1), start_dim=2)  # (B, 8, L)
        return self.head(F.relu(self.b(h)).mean(-1))  # (B, 2)


@settings(max_examples=examples(9), deadline=None)
@given(form=st.sampled_from(["relu", "transpose", "flatten"]), seed=st.integers(0, 2**31 - 1))
def test_a_tensor_passed_by_keyword_is_not_pruned_under_its_reader(form: str, seed: int) -> None:
    # before: its labels were dropped without a pin, the producer was pruned and its reader
    # not sliced: the pruned model failed with a channel mismatch
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, x = Keywords(form), torch.randn(2, 2, 12, generator=gen)
    summary = gate_(model, x)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert "by keyword 'input'" in reasons["a"], str(summary)
    randomise_gates(model, gen)
    check_pruned(model, x, gen)


class KeywordAttention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4, kv: int = 4) -> None:
        super().__init__()
        self.h, self.kv, self.hd = heads, kv, d // heads
        self.q, self.o, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 2)
        self.k, self.v = nn.Linear(d, kv * self.hd), nn.Linear(d, kv * self.hd)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(b, t, self.kv, self.hd).transpose(1, 2)  # (B, KV, T, D)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)  # (B, KV, T, D)
        y = F.scaled_dot_product_attention(
            query=q, key=k, value=v, enable_gqa=self.kv < self.h
        )  # (B, H, T, D)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, d)
        return self.head(x).mean(1)  # (B, 2)


@settings(max_examples=examples(8), deadline=None)
@given(kv=st.sampled_from([2, 4]), seed=st.integers(0, 2**31 - 1))
def test_attention_called_with_keywords_prunes_its_heads(kv: int, seed: int) -> None:
    # before: q, k and v were three separate head groups, and the pruned model failed (or,
    # with enable_gqa, silently differed by up to 0.05)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 16, generator=gen)

    def factory() -> KeywordAttention:
        torch.manual_seed(seed)
        return KeywordAttention(kv=kv)

    model = factory()
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1, str(summary)
    assert summary.channel_groups[summary.head_groups[0]] == (["q", "k", "v"], kv)
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory)


class Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class Gram(nn.Module):
    """A parameter-free layer computing a product."""

    def forward(self, x: Tensor) -> Tensor:
        return x @ x.transpose(-1, -2) @ x  # (B, T, C)


class WithCode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.act, self.gram = nn.Linear(3, 8), Swish(), Gram()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gram(self.inp(x))  # (B, T, 8)
        h = h + self.fc2(self.act(self.fc1(h)))  # (B, T, 8)
        h = h + self.fc2(self.act(self.fc1(h)))  # the same layers again
        return self.head(self.act(h)).mean(1)  # (B, 2)


@settings(max_examples=examples(8), deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_parameter_free_layers_of_your_own_are_code_in_gate_too(seed: int) -> None:
    # before: cost() counted them as code, gate_ raised "cost() does not know how to count"
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 3, generator=gen)
    model = WithCode()
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    gate_(model, x)
    all_open = gp.cost(model, x, hard=True)
    assert float(all_open.flops) == dense.flops
    randomise_gates(model, gen)
    check_pruned(model, x, gen)


class Casts(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x)).to(self.dtype).to(x.dtype)  # (B, 8), rounded
        return self.b(h)  # (B, 2)


def test_a_dtype_constant_in_forward_is_part_of_the_fingerprint() -> None:
    # before: every dtype hashed as "dtype": a bfloat16 model took a float64 model's plan
    x = torch.randn(4, 3)
    model = Casts(torch.float64)
    gate_(model, x)
    for gate in inserted_gating(model).group_gates:
        gate.force_(torch.arange(gate.n) % 2 == 0)  # type: ignore[operator]
    plan = json.loads(json.dumps(export_plan(model.eval())))
    with pytest.raises(ValueError, match="forward code differs"):
        apply_plan(Casts(torch.bfloat16), plan)
    apply_plan(Casts(torch.float64), plan)


class Temperature(nn.Module):
    """A layer that prints a learned value."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.0))
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def extra_repr(self) -> str:
        return f"t={self.t.item():.4f}"

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x)) * self.t)  # (B, 2)


def test_a_printed_learned_value_does_not_refuse_a_fresh_instance() -> None:
    x = torch.randn(4, 3)
    model = Temperature()
    with torch.no_grad():
        model.t.fill_(0.7)  # trained before gate_
    gate_(model, x)
    for gate in inserted_gating(model).group_gates:
        gate.force_(torch.arange(gate.n) % 2 == 0)  # type: ignore[operator]
    plan = json.loads(json.dumps(export_plan(model.eval())))
    fresh = apply_plan(Temperature(), plan)
    fresh.load_state_dict(gp.prune(model).state_dict())
    fresh.eval()
    with torch.no_grad():
        assert (fresh(x) - model(x)).abs().max().item() <= 1e-5


class TwoOptional(nn.Module):
    """Attention with two optional arguments whose code paths are alike (``s + mask``,
    ``s + bias``) and a third set inside when left out (``scale``)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        bias: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            f(x).view(b, t, self.h, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v)
        )  # (B, H, T, D) each
        if scale is None:
            scale = 0.5
        s = q @ k.transpose(-1, -2) * scale  # (B, H, T, T)
        if mask is not None:
            s = s + mask
        if bias is not None:
            s = s + bias
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return cast(Tensor, self.o(y))


class Caller(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.attn, self.head = TwoOptional(), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        mask = (x[:, None, None, :, 0] > 1.0).float() * -1e4  # (B, 1, 1, T)
        if self.how == "positional":
            h = self.attn(x, mask)
        elif self.how == "keyword":
            h = self.attn(x, mask=mask)
        elif self.how == "bias":
            h = self.attn(x, bias=mask, scale=0.25)
        else:  # two ways: rewritten code could serve one only
            h = self.attn(x, mask) + self.attn(x, bias=mask)
        return cast(Tensor, self.head(h.mean(1)))  # (B, 2)


@pytest.mark.parametrize("how", ["positional", "keyword", "bias"])
def test_rewritten_attention_gets_the_arguments_its_caller_passes(how: str) -> None:
    # before: the rewrite guessed which optional arguments were left at None (the first
    # choice whose graph matched): 'mask' assumed None and 'bias' made the input, or 'scale'
    # left an input defaulting to None: the pruned model failed on every input
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model, x = Caller(how), torch.randn(2, 5, 8, generator=gen)
    summary = gate_(model, x)
    assert len(summary.head_groups) == 1, str(summary)
    inserted_gating(model).group_gates[summary.head_groups[0]].force_(  # type: ignore[operator]
        torch.tensor([False, True])
    )
    pruned = check_pruned(model, x, gen)
    assert isinstance(pruned.get_submodule("attn"), torch.fx.GraphModule)  # rewritten
    masked = torch.randn(3, 6, 8, generator=gen)
    masked[:, :2, 0] = 2.0  # two keys masked out
    with torch.no_grad():
        assert (pruned(masked) - model(masked)).abs().max().item() <= 1e-5
    torch.manual_seed(0)
    fresh = apply_plan(Caller(how), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert (fresh(masked) - model(masked)).abs().max().item() <= 1e-5


def test_a_module_called_two_ways_is_not_rewritten() -> None:
    model, x = Caller("both"), torch.randn(2, 5, 8)
    summary = gate_(model, x)
    assert not summary.head_groups
    assert "called with different optional arguments" in str(summary)
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


def test_a_malformed_bound_entry_is_refused() -> None:
    model, x = Caller("positional"), torch.randn(2, 5, 8)
    gate_(model, x)
    plan = json.loads(json.dumps(export_plan(model.eval())))
    hand = {k: v for k, v in plan.items() if k not in ("checksum", "model")}
    hand["bound"] = {"attn": {"mask": [1]}}  # (a str is a constant since 2026-12-08)
    with pytest.raises(ValueError, match="'bound' of 'attn' must map argument names"):
        apply_plan(Caller("positional"), hand)


class HalfKeyword(nn.Module):
    """A binary op with one gated operand by position and the other by keyword."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.f, self.head = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))  # (B, 8)
        g = torch.relu(self.f(h))  # (B, 8)
        if self.form == "add":
            h = torch.add(h, other=g)
        elif self.form == "mul":
            h = torch.mul(h, other=g)
        else:
            h = h.add(other=g)
        return self.head(h)  # (B, 2)


@settings(max_examples=examples(6), deadline=None)
@given(form=st.sampled_from(["add", "mul", "method"]), seed=st.integers(0, 2**31 - 1))
def test_one_operand_by_keyword_keeps_both_whole(form: str, seed: int) -> None:
    # before: the positional operand was gated and sliced, the keyword one not: the pruned
    # model failed with a size mismatch
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, x = HalfKeyword(form), torch.randn(4, 3, generator=gen)
    summary = gate_(model, x)
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert "by keyword 'other'" in reasons["a"], str(summary)
    assert "by keyword 'other'" in reasons["f"], str(summary)
    if summary.n_gates:
        randomise_gates(model, gen)
    check_pruned(model, x, gen)


class Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x: Tensor, residual: bool = True) -> Tensor:
        h = self.b(torch.relu(self.a(x)))  # (B, 4)
        if residual:
            h = x + h
        return h


class Mode(enum.IntEnum):
    PLAIN = 0
    RESIDUAL = 1


class PassesFlag(nn.Module):
    def __init__(self, flag: object = True) -> None:
        super().__init__()
        self.flag = flag
        self.block, self.head = Flagged(), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.head(self.block(x, self.flag)))  # (B, 2)


def test_a_flag_passed_as_a_constant_is_fixed_in_the_rewritten_code() -> None:
    # before 2026-12-08: a flag passed explicitly was an input of the rewritten code, and
    # Python control flow on it could not be traced ("tracing it alone fails", the add
    # ungated); now fixed at True, as the caller passes it, and the residual block is gated
    gen = torch.Generator().manual_seed(0)
    model, x = PassesFlag(), torch.randn(3, 4, generator=gen)
    summary = gate_(model, x)
    assert [site for _, site, _ in summary.blocks] == ["block.b"], str(summary)
    assert inserted_gating(model).bindings["block"] == {"residual": True}
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory=PassesFlag)


def test_a_module_that_cannot_be_traced_alone_says_so() -> None:
    # a flag passed as an enum member (not exactly a bool, int, float or str: fx could not
    # check it) is an input of the rewritten code, and Python control flow on it cannot be
    # traced: the reason names the trace failure (was "a different graph")
    summary = gate_(PassesFlag(Mode.RESIDUAL), torch.randn(3, 4))
    why = dict(summary.ungated_adds)["add (in block)"]
    assert "tracing it alone fails" in why, why
