"""Hugging Face GPT-2 written as ``transformers`` writes its block and attention: the block
calls ``self.attn(hidden_states, layer_past=layer_past, attention_mask=attention_mask,
head_mask=head_mask, use_cache=use_cache, output_attentions=output_attentions)`` with the
flags passed down from the model's own ``forward`` defaults (``use_cache: bool = False``), and
the attention branches on them (``if use_cache is True:``, ``if output_attentions:``) and
returns a tuple. Added 2026-12-08: an argument every call passes as the same constant (bool,
int, float, str, None) is fixed at that value in the module's rewritten code, so the
attention is rewritten (its heads gated and pruned); a module called with different
constants keeps a reason naming the argument."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch
from gating_helpers import budget_steps, examples, inserted_gating, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate_hf_gpt2 import GPT2MLP, HEADS, HIDDEN, N_POS, VOCAB, D
from test_gate_hf_gpt2 import GPT2Attention as _BaseAttention
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_


class GPT2Attention(_BaseAttention):
    """transformers' GPT2Attention.forward (eager): keyword flags, a tuple out."""

    def _attn_hf(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None = None,
        head_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        attn_weights = torch.matmul(query, key.transpose(-1, -2))  # (B, H, T, T)
        attn_weights = attn_weights / torch.full(
            [], value.size(-1) ** 0.5, dtype=attn_weights.dtype, device=attn_weights.device
        )
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]
        mask_value = torch.finfo(attn_weights.dtype).min
        mask_value = torch.full(
            [], mask_value, dtype=attn_weights.dtype, device=attn_weights.device
        )
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask  # (B, H, T, T)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)  # (B, H, T, T)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        if head_mask is not None:
            attn_weights = attn_weights * head_mask
        attn_output = torch.matmul(attn_weights, value)  # (B, H, T, hd)
        return attn_output, attn_weights

    def forward(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        layer_past: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        head_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
    ) -> tuple[Tensor | tuple[Tensor, Tensor] | None, ...]:
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query = self._split_heads(query, self.num_heads, self.head_dim)  # (B, H, T, hd)
        key = self._split_heads(key, self.num_heads, self.head_dim)
        value = self._split_heads(value, self.num_heads, self.head_dim)
        if layer_past is not None:
            past_key, past_value = layer_past
            key = torch.cat((past_key, key), dim=-2)  # (B, H, P + T, hd)
            value = torch.cat((past_value, value), dim=-2)
        present: tuple[Tensor, Tensor] | None
        if use_cache is True:  # noqa: SIM108 (as HF writes it)
            present = (key, value)
        else:
            present = None
        attn_output, attn_weights = self._attn_hf(query, key, value, attention_mask, head_mask)
        attn_output = self._merge_heads(attn_output, self.num_heads, self.head_dim)  # (B, T, d)
        attn_output = self.resid_dropout(self.c_proj(attn_output))  # (B, T, d)
        outputs: tuple[Tensor | tuple[Tensor, Tensor] | None, ...] = (attn_output, present)
        if output_attentions:
            outputs += (attn_weights,)
        return outputs  # a, present, (attentions)


class GPT2Block(nn.Module):
    """transformers' GPT2Block.forward: the flags passed on as keywords, a tuple out."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn, self.mlp = GPT2Attention(D, HEADS, N_POS), GPT2MLP(D, HIDDEN)

    def forward(
        self,
        hidden_states: Tensor,
        layer_past: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        head_mask: Tensor | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
    ) -> tuple[Tensor | tuple[Tensor, Tensor] | None, ...]:
        residual = hidden_states
        hidden_states = self.ln_1(hidden_states)  # (B, T, d)
        attn_outputs = self.attn(
            hidden_states,
            layer_past=layer_past,
            attention_mask=attention_mask,
            head_mask=head_mask,
            use_cache=use_cache,
            output_attentions=output_attentions,
        )
        attn_output = attn_outputs[0]  # output_attn: a, present, (attentions)
        outputs = attn_outputs[1:]
        hidden_states = attn_output + residual  # (B, T, d)
        residual = hidden_states
        hidden_states = self.ln_2(hidden_states)
        feed_forward_hidden_states = self.mlp(hidden_states)
        hidden_states = residual + feed_forward_hidden_states  # (B, T, d)
        if use_cache:  # noqa: SIM108 (as HF writes it)
            outputs = (hidden_states, *outputs)
        else:
            outputs = (hidden_states, *outputs[1:])
        return outputs  # hidden_states, present, (attentions)


class TinyGPT2(nn.Module):
    """GPT2LMHeadModel's layout with GPT2Model's loop: the flags are the forward's defaults."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(N_POS, D)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList(GPT2Block() for _ in range(2))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(
        self, input_ids: Tensor, use_cache: bool = False, output_attentions: bool = False
    ) -> Tensor:
        t = input_ids.size(-1)
        position_ids = torch.arange(0, t, dtype=torch.long, device=input_ids.device)  # (T,)
        hidden_states = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, d)
        head_mask = [None] * len(self.h)
        past_key_values = tuple([None] * len(self.h))
        for i, (block, layer_past) in enumerate(zip(self.h, past_key_values, strict=True)):
            outputs = block(
                hidden_states,
                layer_past=layer_past,
                attention_mask=None,
                head_mask=head_mask[i],
                use_cache=use_cache,
                output_attentions=output_attentions,
            )
            hidden_states = outputs[0]  # (B, T, d)
        return self.lm_head(self.ln_f(hidden_states))  # (B, T, vocab)


def _factory() -> TinyGPT2:
    torch.manual_seed(0)
    return TinyGPT2()


def _ids(b: int, t: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=gen)  # (B, T)


def test_the_heads_are_gated_with_the_flags_fixed() -> None:
    # before: "submodule 'h.0.attn' (GPT2Attention) cannot be traced by torch.fx
    # (TraceError: symbolically traced variables cannot be used as inputs to control flow":
    # the model's use_cache/output_attentions traced as values, attention and block whole
    model = _factory()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing kept whole
        summary = gate_(model, _ids(2, 7, torch.Generator().manual_seed(0)))
    assert summary.opaque == {}, str(summary)
    heads = [summary.channel_groups[i] for i in summary.head_groups]
    assert heads == [([f"h.{i}.attn.c_attn.weight"], HEADS) for i in (0, 1)], str(summary)
    bound = inserted_gating(model).bindings
    for i in (0, 1):
        for scope in (f"h.{i}", f"h.{i}.attn"):
            assert bound[scope]["use_cache"] is False
            assert bound[scope]["output_attentions"] is False


def _check(model: TinyGPT2, gen: torch.Generator) -> nn.Module:
    """Prune in eval mode: the cost equals the gated hard cost, pruned == gated (1e-5) on
    fresh inputs of several lengths, the flags still taken by keyword, the plan replays."""
    model.eval()
    x = _ids(2, 7, gen)
    hard = gp.cost(model, x, hard=True)
    pruned = gp.prune(model)
    got = gp.cost(pruned, x)
    assert isinstance(got, gp.Cost)
    assert (got.flops, got.params) == (float(hard.flops), float(hard.params))
    with torch.no_grad():
        for b, t in [(1, 1), (3, 5), (2, 7), (2, N_POS)]:
            xi = _ids(b, t, gen)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
            kw = pruned(xi, use_cache=False, output_attentions=False)  # as HF's callers do
            assert (kw - model(xi)).abs().max().item() <= 1e-5
    fresh = apply_plan(_factory(), json.loads(json.dumps(export_plan(model))))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        xi = _ids(2, 9, gen)
        assert (fresh(xi) - model(xi)).abs().max().item() <= 1e-5
    return pruned


@settings(max_examples=examples(8), deadline=None)
@given(
    closed=st.lists(
        st.lists(st.booleans(), min_size=HEADS, max_size=HEADS), min_size=2, max_size=2
    ),
    seed=st.integers(0, 2**16),
)
def test_heads_closed_at_random_prune_exactly(closed: list[list[bool]], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = _factory()
    x = _ids(3, 7, gen)
    dense = gp.cost(model, x)
    assert isinstance(dense, gp.Cost)
    summary = gate_(model, x)
    budget = gp.Budget(model, x, flops=0.6)
    budget_steps(model, budget, 2, lambda: _ids(3, 7, gen))
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in [*gating.group_gates, *gating.block_gates]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.uniform_(-3.0, 3.0, generator=gen)
        for gate in gating.block_gates:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.fill_(10.0)  # the sub-layers stay: their heads are under test
    for i, shut in zip(summary.head_groups, closed, strict=True):
        gating.group_gates[i].force_(~torch.tensor(shut))  # type: ignore[operator]
    pruned = _check(model, gen)
    for i, shut in enumerate(closed):
        kept = HEADS - sum(shut)
        if kept:
            weight = pruned.get_parameter(f"h.{i}.attn.c_attn.weight")
            assert weight.shape == (D, 3 * kept * (D // HEADS))
            assert pruned.get_parameter(f"h.{i}.attn.c_proj.weight").shape[0] == kept * (D // HEADS)
    small = gp.cost(pruned, x)
    assert isinstance(small, gp.Cost)
    if any(any(s) for s in closed):
        assert small.flops < dense.flops
        assert small.params < dense.params


def test_the_rewritten_attention_keeps_the_flags_and_checks_them() -> None:
    """The rewritten attention takes its flags by keyword as the block passes them, fixed at
    False: called with another value it raises (fx's check) rather than ignore it."""
    gen = torch.Generator().manual_seed(3)
    model = _factory()
    summary = gate_(model, _ids(2, 7, gen))
    gating = inserted_gating(model)
    for i in summary.head_groups:
        gating.group_gates[i].force_(torch.tensor([True, False, True, True]))  # type: ignore[operator]
    pruned = _check(model, gen)
    attn = pruned.get_submodule("h.0.attn")
    assert isinstance(attn, torch.fx.GraphModule)  # rewritten: three heads
    assert pruned.get_parameter("h.0.attn.c_attn.weight").shape == (D, 3 * 3 * (D // HEADS))
    params = inspect.signature(attn.forward).parameters
    assert {"use_cache", "output_attentions", "layer_past"} <= set(params)
    h = torch.randn(2, 5, D, generator=gen)  # (B, T, d)
    out = attn(h, layer_past=None, use_cache=False, output_attentions=False)
    assert isinstance(out, tuple)
    assert len(out) == 2
    assert out[1] is None  # present: no cache
    with pytest.raises(AssertionError, match="use_cache has been specialized"):
        attn(h, use_cache=True)


class FlagAttention(nn.Module):
    """Self-attention on nn.Linear layers, HF's ``output_attentions`` flag and tuple out."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(
        self, x: Tensor, use_cache: bool = False, output_attentions: bool = False
    ) -> tuple[Tensor, ...]:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, HEADS, D // HEADS).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(b, t, HEADS, D // HEADS).transpose(1, 2)
        v = self.v(x).view(b, t, HEADS, D // HEADS).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2)).softmax(-1)  # (B, H, T, T)
        y = (weights @ v).transpose(1, 2).reshape(b, t, D)  # (B, T, D)
        outputs: tuple[Tensor, ...] = (self.o(y),)
        if output_attentions:
            outputs += (weights,)
        return outputs


class TwoWays(nn.Module):
    """One attention called with ``output_attentions`` False, then True."""

    def __init__(self, second: bool = True) -> None:
        super().__init__()
        self.second = second
        self.wte = nn.Embedding(VOCAB, D)
        self.attn = FlagAttention()
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.wte(input_ids)  # (B, T, d)
        a = self.attn(x, use_cache=False, output_attentions=False)[0]
        b = self.attn(a, use_cache=False, output_attentions=self.second)[0]
        return self.head(b)  # (B, T, vocab)


@pytest.mark.parametrize("second", [False, True])
def test_a_module_called_with_different_flags_keeps_a_reason(second: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    model = TwoWays(second)
    summary = gate_(model, _ids(2, 6, gen))
    bound = inserted_gating(model).bindings
    text = str(summary)
    if second:  # rewritten code serves one way: the reason names the argument
        assert "attn" not in bound, text  # a reason, not arguments
        assert (
            "cannot rewrite module 'attn' (FlagAttention): it is called with different "
            "optional arguments ('output_attentions' (False in one call, True in another))"
        ) in text
    else:  # one way: the flags are fixed (two calls of one code are another matter)
        assert bound["attn"] == {"use_cache": False, "output_attentions": False}, text
        assert "different optional arguments" not in text, text
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        xi = _ids(3, 5, gen)
        assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5


class RootFlags(nn.Module):
    """A residual block in the model's own forward, with a flag it branches on and a scale it
    multiplies by, both at their defaults in ``gate_``'s example call."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor, return_hidden: bool = False, scale: float = 1.0) -> Tensor:
        h = x + self.b(torch.relu(self.a(x))) * scale  # (B, 6)
        if return_hidden:
            return h
        return self.head(h)  # (B, 3)


@settings(max_examples=examples(6), deadline=None)
@given(seed=st.integers(0, 2**16))
def test_a_flag_of_the_model_s_own_forward_is_fixed(seed: int) -> None:
    # before: "torch.fx cannot trace RootFlags.forward itself (TraceError: symbolically
    # traced variables cannot be used as inputs to control flow ...)"
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, x = RootFlags(), torch.randn(4, 6, generator=gen)
    summary = gate_(model, x)
    assert [site for _, site, _ in summary.blocks] == ["b"], str(summary)
    randomise_gates(model, gen)
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        for xi in (torch.randn(5, 6, generator=gen), x):
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
            kw = pruned(xi, return_hidden=False)
            assert (kw - model(xi)).abs().max().item() <= 1e-5
            # the scale, which no control flow reads, stays an input of the code
            kw = pruned(xi, scale=0.5)
            assert (kw - model(xi, scale=0.5)).abs().max().item() <= 1e-5
    if isinstance(pruned, torch.fx.GraphModule):  # rewritten: the flag checked when it runs
        with pytest.raises(AssertionError, match="return_hidden has been specialized"):
            pruned(x, return_hidden=True)


class ByLength(nn.Module):
    """A residual block given the sequence length as an int (a size when traced)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: Tensor, length: int = 1) -> Tensor:
        h = self.b(torch.relu(self.a(x)))  # (B, T, D)
        return x + h * length**-0.5  # (B, T, D)


class PassesLength(nn.Module):
    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.literal = literal
        self.wte, self.blk, self.head = nn.Embedding(VOCAB, D), ByLength(), nn.Linear(D, 3)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.wte(input_ids)  # (B, T, D)
        t = 4 if self.literal else input_ids.size(1)  # a size read from the input: traced
        return self.head(self.blk(x, length=t))  # (B, T, 3)


@pytest.mark.parametrize("literal", [False, True])
def test_an_int_the_trace_computes_stays_an_input(literal: bool) -> None:
    """A number passed as a literal is fixed; one the whole model's trace computes (a size:
    an int when the model runs) stays an input, so other lengths still work."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    model = PassesLength(literal)
    summary = gate_(model, _ids(2, 4, gen))
    assert [site for _, site, _ in summary.blocks] == ["blk.b"], str(summary)
    bound = inserted_gating(model).bindings["blk"]
    assert bound == ({"length": 4} if literal else {}), bound
    randomise_gates(model, gen)
    model.eval()
    pruned = gp.prune(model)
    with torch.no_grad():
        for t in (1, 4, 9):
            xi = _ids(3, t, gen)
            assert (pruned(xi) - model(xi)).abs().max().item() <= 1e-5
