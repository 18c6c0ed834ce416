"""Hugging Face GPT-2 written as ``transformers`` writes it (eager attention): the causal mask
sliced from a registered bool buffer by traced sizes (``self.bias[:, :, k - q : k, :k]``), the
fill value read from ``torch.finfo(attn_weights.dtype).min`` and made a tensor with
``torch.full([], v, dtype=..., device=...)``, filled in with ``torch.where``. fx could not
trace that attention (kept whole, heads ungated) before 2026-12-08 00:27 UTC; its heads are
now gated and pruned exactly, with the dtype read when the model runs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from gating_helpers import budget_steps, examples, inserted_gating
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate_param_modules import Conv1D
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_
from gatedprune.gating.graph import GateTracer, _traced_calls, trace_model

VOCAB, N_POS, D, HEADS, HIDDEN = 11, 12, 16, 4, 32


def gelu_new(x: Tensor) -> Tensor:
    """GPT-2's tanh GELU (transformers.activations.NewGELUActivation)."""
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


class NewGELUActivation(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return gelu_new(x)  # (B, T, hidden)


class GPT2Attention(nn.Module):
    """transformers' GPT2Attention, eager path, without cache and masks from the caller."""

    def __init__(self, d: int, heads: int, n_pos: int, swapped: bool = False) -> None:
        super().__init__()
        self.swapped = swapped  # torch.where(~mask, fill, scores): the other operand order
        causal = torch.tril(torch.ones((n_pos, n_pos), dtype=torch.bool))
        self.register_buffer("bias", causal.view(1, 1, n_pos, n_pos), persistent=False)
        self.num_heads, self.head_dim, self.split_size = heads, d // heads, d
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)

    def _split_heads(self, tensor: Tensor, num_heads: int, attn_head_size: int) -> Tensor:
        new_shape = tensor.size()[:-1] + (num_heads, attn_head_size)  # noqa: RUF005 (as HF)
        return tensor.view(new_shape).permute(0, 2, 1, 3)  # (B, H, T, hd)

    def _merge_heads(self, tensor: Tensor, num_heads: int, attn_head_size: int) -> Tensor:
        tensor = tensor.permute(0, 2, 1, 3).contiguous()  # (B, T, H, hd)
        new_shape = tensor.size()[:-2] + (num_heads * attn_head_size,)  # noqa: RUF005 (as HF)
        return tensor.view(new_shape)  # (B, T, H * hd)

    def _attn(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
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
        if self.swapped:
            attn_weights = torch.where(~causal_mask, mask_value, attn_weights)
        else:
            attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)  # (B, H, T, T)
        attn_weights = attn_weights.type(value.dtype)  # HF's downcast, a no-op in one dtype
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value)  # (B, H, T, hd)

    def forward(self, hidden_states: Tensor) -> Tensor:
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query = self._split_heads(query, self.num_heads, self.head_dim)  # (B, H, T, hd)
        key = self._split_heads(key, self.num_heads, self.head_dim)
        value = self._split_heads(value, self.num_heads, self.head_dim)
        attn_output = self._attn(query, key, value)
        attn_output = self._merge_heads(attn_output, self.num_heads, self.head_dim)
        return self.resid_dropout(self.c_proj(attn_output))  # (B, T, d)


class GPT2MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(hidden, d), Conv1D(d, hidden)
        self.act, self.dropout = NewGELUActivation(), nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, d)


class GPT2Block(nn.Module):
    def __init__(self, swapped: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn, self.mlp = GPT2Attention(D, HEADS, N_POS, swapped), GPT2MLP(D, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, d)
        return x + self.mlp(self.ln_2(x))


class TinyGPT2(nn.Module):
    """GPT2LMHeadModel's layout, two blocks: wte + wpe, h, ln_f, lm_head."""

    def __init__(self, swapped: bool = False) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(N_POS, D)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList(GPT2Block(swapped) for _ in range(2))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.size(-1)
        position_ids = torch.arange(0, t, dtype=torch.long, device=input_ids.device)  # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, d)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def _factory(swapped: bool = False) -> TinyGPT2:
    torch.manual_seed(0)
    return TinyGPT2(swapped)


def _ids(b: int, t: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=gen)  # (B, T)


@pytest.mark.parametrize("swapped", [False, True])
def test_the_summary_gates_the_heads_and_units(swapped: bool) -> None:
    # before: "submodule 'h.0.attn' (GPT2Attention) cannot be traced by torch.fx (TypeError:
    # slice indices must be integers ...)": kept whole, no head groups
    model = _factory(swapped)
    finfo, iinfo, getitem = torch.finfo, torch.iinfo, torch.Tensor.__getitem__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no attention kept whole
        summary = gate_(model, _ids(2, 7, torch.Generator().manual_seed(0)))
    assert summary.opaque == {}, str(summary)
    heads = [
        (summary.channel_groups[i][0], summary.channel_groups[i][1]) for i in summary.head_groups
    ]
    assert heads == [([f"h.{i}.attn.c_attn.weight"], HEADS) for i in (0, 1)], str(summary)
    units = [g for g, w in summary.channel_groups if w == HIDDEN]
    assert units == [[f"h.{i}.mlp.c_fc.weight"] for i in (0, 1)], str(summary)
    sites = [site for _, site, _ in summary.blocks]
    assert sites == [f"h.{i}.{s}.c_proj.weight" for i in (0, 1) for s in ("attn", "mlp")]
    assert "(one gate per head)" in str(summary)
    # the calls recorded while tracing are torch's own again afterwards
    assert (torch.finfo, torch.iinfo, torch.Tensor.__getitem__) == (finfo, iinfo, getitem)


def _check(model: TinyGPT2, gen: torch.Generator, swapped: bool = False) -> nn.Module:
    """Prune in eval mode: the cost equals the gated hard cost, pruned == gated (1e-5) on fresh
    inputs of several lengths up to the buffer's N, and the plan replays on a fresh model."""
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
    fresh = apply_plan(_factory(swapped), json.loads(json.dumps(export_plan(model))))
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
    swapped=st.booleans(),
)
def test_heads_closed_at_random_prune_exactly(
    closed: list[list[bool]], seed: int, swapped: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = _factory(swapped)
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
    pruned = _check(model, gen, swapped)
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


def test_the_dtype_is_read_when_the_pruned_model_runs() -> None:
    """The fill value is torch.finfo of the scores' dtype as the model runs (a graph node, not
    the example's float32 baked in): pruned and gated agree in float64 too, where float32's
    min would not be the dtype's."""
    gen = torch.Generator().manual_seed(5)
    model = _factory()
    summary = gate_(model, _ids(2, 6, gen))
    gating = inserted_gating(model)
    for i in summary.head_groups:
        gating.group_gates[i].force_(torch.tensor([True, False, True, False]))  # type: ignore[operator]
    model.eval()
    pruned = gp.prune(model)
    assert pruned.get_parameter("h.0.attn.c_attn.weight").shape == (D, 3 * 2 * (D // HEADS))
    code = str(getattr(pruned.get_submodule("h.0.attn"), "code", ""))
    assert "torch.finfo(" in code, code  # read from the scores' dtype as it runs
    assert "= self.bias\n" in code, code  # the registered buffer, sliced by the run's sizes
    model.double()
    pruned.double()
    with torch.no_grad():
        for t in (1, 4, N_POS):
            xi = _ids(2, t, gen)
            out = pruned(xi)
            assert out.dtype == torch.float64
            assert (out - model(xi)).abs().max().item() <= 1e-12


class FloatLimit(nn.Module):
    """Fills with its input dtype's minimum: ``torch.finfo(x.dtype)`` (as GPT-2's scores)."""

    def forward(self, x: Tensor) -> Tensor:
        low = torch.full([], torch.finfo(x.dtype).min, dtype=x.dtype)  # ()
        return x.clamp(min=low)  # (N,)


class IntLimit(nn.Module):
    """Clamps ids below their dtype's maximum: ``torch.iinfo(ids.dtype)``."""

    def forward(self, ids: Tensor) -> Tensor:
        return ids.clamp(max=torch.iinfo(ids.dtype).max - 1)  # (N,)


def test_finfo_of_a_traced_dtype_is_read_when_the_code_runs() -> None:
    # before 2026-12-08 00:27 UTC: "torch.finfo() requires a floating point input type"
    gm = trace_model(FloatLimit()).graph_module
    low = gm(torch.tensor([-1e300, 2.0], dtype=torch.float64))
    assert low.tolist() == [-1e300, 2.0]  # float64's minimum, not float32's (-3.4e38)
    low16 = gm(torch.tensor([-1e300, 2.0]).half())  # (-inf, 2)
    assert low16.tolist() == [torch.finfo(torch.float16).min, 2.0]


def test_iinfo_of_a_traced_dtype_is_read_when_the_code_runs() -> None:
    # before 2026-12-08 00:27 UTC: silently torch.uint8's (max - 1 = 254 baked into the code)
    gm = trace_model(IntLimit()).graph_module
    assert gm(torch.tensor([10**12, 3])).tolist() == [10**12, 3]  # int64's maximum


class BufferReads(nn.Module):
    """A buffer indexed by traced values: by a tensor of ids, by a size, sliced by a size."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(6, 3))

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.size(0)
        picked = self.table[ids] + self.table[t]  # (N, 3)
        return picked + self.table[:t]  # (N, 3)


def test_a_buffer_indexed_by_traced_values_runs_as_written() -> None:
    """Only slices bounded by traced sizes are recorded by gate_'s tracer; other traced
    indices go to fx as before, under Tensor.__getitem__'s own name (a recording wrapper
    named otherwise made fx write ``table.getitem(ids)``, an AttributeError when run)."""
    model = BufferReads()
    gm = trace_model(model).graph_module
    for n in (1, 2, 4):
        ids = torch.randint(0, 6, (n,))
        assert torch.equal(gm(ids), model(ids))


def test_a_trace_inside_a_trace_records_torch_s_own_functions() -> None:
    """Nested tracing patches once: the inner trace records torch.finfo itself (not the
    outer trace's wrapper, which would be the target written into the code), and torch's own
    functions are back after both."""
    finfo, getitem = torch.finfo, torch.Tensor.__getitem__
    with _traced_calls():
        graph = GateTracer().trace(FloatLimit())
        assert torch.finfo is not finfo  # still the outer trace's recording wrapper
    assert [n.target for n in graph.nodes if n.op == "call_function"][1] is finfo
    assert (torch.finfo, torch.Tensor.__getitem__) == (finfo, getitem)


def test_the_pruned_model_exports_to_onnx_with_a_dynamic_length(tmp_path: Path) -> None:
    """export_onnx checks the exported graph against the model in ONNX Runtime on the example
    and on a longer one (batch and length dynamic): the mask slice and the dtype's minimum
    are computed there too."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    gen = torch.Generator().manual_seed(6)
    model = _factory()
    summary = gate_(model, _ids(2, 6, gen))
    gating = inserted_gating(model)
    for i in summary.head_groups:
        gating.group_gates[i].force_(torch.tensor([False, True, True, False]))  # type: ignore[operator]
    model.eval()
    pruned = gp.prune(model)
    gp.export_onnx(pruned, _ids(2, 6, gen), tmp_path / "gpt2.onnx", dynamic_dims=(0, 1))
