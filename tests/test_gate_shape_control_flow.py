"""gate_ traces Python control flow on shapes, dtypes and devices as the example input runs it.

Minimal replicas of Hugging Face transformers 5.25 code (the library is not imported): before
2026-12-08 each pattern made fx fail, so the module was kept whole (no head gated).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate_param_modules import Conv1D
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import GatingSummary, apply_plan, export_plan, gate_
from gatedprune.gating.graph import trace_model

D = 16


class HFAttention(nn.Module):
    """Llama/BERT-style attention: the head shape built from ``hidden_states.shape[:-1]``."""

    def __init__(self, d: int = D, heads: int = 4) -> None:
        super().__init__()
        self.head_dim = d // heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, hidden_states: Tensor, mask: Tensor) -> Tensor:
        # transformers/models/llama/modeling_llama.py:242
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, d)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, d)
        # transformers/integrations/sdpa_attention.py:149
        # is_causal = query.shape[2] > 1 and attention_mask is None and ...
        q_length = q.shape[2]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask) if q_length > 1 else v
        b, t = tuple(hidden_states.shape[:2])
        _, _, width = hidden_states.shape
        out = o.transpose(1, 2).reshape(b, t, -1)  # (B, T, H * d)
        return self.o_proj(out) if width == D else out


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = HFAttention()
        self.up = nn.Linear(D, 32)
        self.down = nn.Linear(32, D)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(x, mask)  # (B, T, D)
        return x + self.down(F.gelu(self.up(x)))  # (B, T, D)


class HFModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        # transformers/models/vit/modeling_vit.py:369
        expected_dtype = self.head.weight.dtype
        if x.dtype != expected_dtype:
            x = x.to(expected_dtype)
        # transformers/models/t5/modeling_t5.py:473
        if x.dtype == torch.float16:
            x = x.clamp(-1000.0, 1000.0)
        if x.device.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
            raise ValueError("unknown device")
        # transformers/masking_utils.py:868 if batch_size != position_ids.shape[0]:
        batch_size, t = x.shape[0], x.shape[1]
        position_ids = torch.arange(t).expand(x.shape[0], -1)  # (B, T)
        if batch_size != position_ids.shape[0]:
            raise ValueError("batch sizes differ")
        i = torch.arange(t)  # (T,)
        mask = (i[None, :] <= i[:, None])[None, None]  # (1, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)  # (B, T, D)
        return self.head(x)  # (B, T, 3)


def _heads(summary: GatingSummary) -> list[list[str]]:
    return [summary.channel_groups[i][0] for i in summary.head_groups]


@settings(max_examples=examples(4), deadline=None)
@given(batch=st.integers(1, 3), t=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_hf_shape_and_dtype_branches_are_traced_and_heads_pruned_exactly(
    batch: int, t: int, seed: int
) -> None:
    # before 2026-12-08: the model's own forward failed ("symbolically traced variables
    # cannot be used as inputs to control flow"), and the attention was kept whole
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = HFModel()
    x = torch.randn(batch, t, D, generator=gen)  # (B, T, D)
    summary = gate_(model, x)
    assert summary.opaque == {}, str(summary)
    assert _heads(summary) == [[f"blocks.{i}.attn.{p}_proj" for p in "qkv"] for i in (0, 1)], str(
        summary
    )
    randomise_gates(model, gen)
    check_pruned(model, x, gen, HFModel, batches=(batch, batch + 2))


def test_the_plan_keeps_the_example_shapes_and_dtypes() -> None:
    gen = torch.Generator().manual_seed(0)
    model = HFModel()
    x = torch.randn(2, 4, D, generator=gen)  # (B, T, D)
    gate_(model, x)
    randomise_gates(model, gen)
    plan = json.loads(json.dumps(export_plan(model)))
    assert plan["examples"] == [{"shape": [2, 4, D], "dtype": "torch.float32"}]
    with pytest.raises(ValueError, match="malformed plan: each entry of 'examples'"):
        apply_plan(HFModel(), {**plan, "examples": [{"shape": [2, 4, D], "dtype": "float"}]})


class BatchOne(nn.Module):
    """A branch taken because the batch has one sample."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, 8)
        self.down = nn.Linear(8, D)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)  # (B, 8)
        if x.shape[0] == 1:
            h = h * 2.0
        return self.down(F.relu(h))  # (B, D)


class BatchOneNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = BatchOne()
        self.head = nn.Linear(D, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.inner(x))


def test_a_branch_on_the_batch_size_is_refused_with_its_line() -> None:
    # the example's batch of one would be baked in: the module is kept whole, not gated
    model = BatchOneNet()
    x = torch.randn(1, D)
    with pytest.warns(UserWarning, match="depends on the batch size"):
        summary = gate_(model, x)
    why = summary.opaque["inner"]
    assert "test_gate_shape_control_flow.py" in why, why
    assert "if x.shape[0] == 1:" in why, why
    assert summary.n_gates == 0
    with torch.no_grad():  # the model computes as before, at every batch size
        for b in (1, 3):
            xb = torch.randn(b, D)
            assert torch.equal(gp.prune(model)(xb), model(xb))


def test_a_branch_on_the_batch_size_in_the_top_forward_is_an_error() -> None:
    model = BatchOne()
    with pytest.raises(ValueError, match=r"depends on the batch size .*if x.shape\[0\] == 1:"):
        gate_(model, torch.randn(1, D))


def test_the_same_branch_at_a_larger_batch_is_traced() -> None:
    # at batch 2 the branch is not taken at 2 nor at 3: gated (the example's graph)
    model = BatchOneNet()
    summary = gate_(model, torch.randn(2, D))
    assert summary.opaque == {}, str(summary)
    assert summary.n_gates > 0, str(summary)


class ValueBranch(nn.Module):
    def __init__(self, item: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.item = item

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)  # (B, D)
        if self.item:
            if h.max().item() > 100.0:  # a tensor value read as a number
                return h
        elif h.sum() > 0:  # a tensor value
            return h
        return -h


@pytest.mark.parametrize("item", [False, True])
def test_control_flow_on_tensor_values_stays_an_error(item: bool) -> None:
    model = nn.Sequential(ValueBranch(item), nn.Linear(D, 2))
    with pytest.warns(UserWarning, match="control flow"):
        summary = gate_(model, torch.randn(2, D))
    assert "0" in summary.opaque, str(summary)


class QLenAttention(nn.Module):
    """Attention whose forward branches on the query length (decoding one token skips the
    causal mask), a module ``prune`` rewrites once a head is cut."""

    def __init__(self, d: int = D, heads: int = 4) -> None:
        super().__init__()
        self.head_dim = d // heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        hidden_shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(hidden_shape).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(hidden_shape).transpose(1, 2)  # (B, H, T, d)
        v = self.v_proj(x).view(hidden_shape).transpose(1, 2)  # (B, H, T, d)
        # transformers/integrations/sdpa_attention.py:149
        # is_causal = query.shape[2] > 1 and attention_mask is None and ...
        q_length = q.shape[2]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=q_length > 1)  # (B, H, T, d)
        if q_length == 1:  # one token: no mask, as (transformers' generate) decoding does
            o = o * 2.0
        out = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, T, H * d)
        return self.o_proj(out)  # (B, T, D)


def test_a_pruned_rewrite_rechecks_the_branches_its_trace_took() -> None:
    # before 2026-12-08 03:20 UTC: the pruned attention was the example's branch (q_length > 1)
    # at every length: at length 1 it silently computed o instead of o * 2.0
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(QLenAttention(), nn.Linear(D, 3))
    x = torch.randn(2, 4, D, generator=gen)  # (B, T, D)
    summary = gate_(model, x)
    assert summary.head_groups, str(summary)
    gating = model.gatedprune
    with torch.no_grad():  # close the first head for sure: the attention is rewritten
        for gate in gating.group_gates:
            gate.log_alpha.fill_(4.0)
            gate.log_alpha[0] = -4.0
    model.eval()
    pruned = gp.prune(model)
    assert isinstance(pruned[0], torch.fx.GraphModule), type(pruned[0])
    with torch.no_grad():
        for t in (3, 6):  # the example's branches: the same function
            xt = torch.randn(2, t, D, generator=gen)  # (B, T, D)
            assert (pruned(xt) - model(xt)).abs().max() <= 1e-5
        one = torch.randn(2, 1, D, generator=gen)  # (B, 1, D): the other branches
        with pytest.raises(ValueError, match=r"if q_length == 1:.*was False; this input's is True"):
            pruned(one)
        with pytest.raises(
            ValueError, match=r"has 2 values at .*hidden_shape = .*this input has 1"
        ):
            pruned(torch.randn(2, D, generator=gen))  # (B, D): another rank
    scripted = torch.jit.script(pruned)  # the guards compile
    with torch.no_grad():
        xt = torch.randn(2, 5, D, generator=gen)  # (B, T, D)
        assert (scripted(xt) - model(xt)).abs().max() <= 1e-5
        with pytest.raises(torch.jit.Error, match="if q_length == 1:"):
            scripted(one)
    again = nn.Sequential(QLenAttention(), nn.Linear(D, 3))
    apply_plan(again, json.loads(json.dumps(export_plan(model))))
    with pytest.raises(ValueError, match=r"if q_length == 1:"):
        again(one)
    dense, hard = gp.cost(pruned, x), gp.cost(model, x, hard=True)  # the guards cost nothing
    assert (dense.flops, dense.params) == (int(hard.flops), int(hard.params))


class Counting(nn.Module):
    """A forward that writes into its own buffers (a step counter, a running statistic)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.register_buffer("count", torch.tensor([7.0]))
        self.register_buffer("last", torch.full((D,), 3.0))
        self.register_buffer("scale", torch.full((D,), 1.5))

    def forward(self, x: Tensor) -> Tensor:
        self.count.add_(1.0)
        self.last.copy_(x[0])
        self.scale[:2].mul_(0.5)  # a view of a buffer
        return self.lin(x) * self.scale  # (B, D)


class Opaque(nn.Module):
    """Kept whole (it counts its own cost) and writing into a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.full((D,), 5.0))

    def forward(self, x: Tensor) -> Tensor:
        self.seen.copy_(x[0])
        return x if x.sum() > 0 else -x  # (B, D)

    def flops_of(self, inputs: tuple[Tensor, ...], output: Tensor) -> int:
        return 0


def test_gate_never_writes_into_the_model_state() -> None:
    # before 2026-12-08 03:20 UTC: the example runs wrote into the buffers (zeros into `last`),
    # and gate_'s runs of the model counted (7 -> 9)
    torch.manual_seed(0)
    model = nn.Sequential(Counting(), Opaque(), nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, D)  # (B, D)
    trace_model(model, examples=(x,))  # the example runs alone
    # (fx itself runs `self.count.add_(1.0)` and the `mul_`, whose arguments are no traced
    # values; gate_ undoes that below)
    for k in ("0.last", "1.seen"):
        assert torch.equal(model.state_dict()[k], state[k]), (k, model.state_dict()[k])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    summary = gate_(model, x)  # and its runs of the model
    assert summary.n_gates > 0, str(summary)
    after = {k: v for k, v in model.state_dict().items() if k in state}
    for k, v in state.items():
        assert torch.equal(after[k], v), (k, after[k], v)


class GPT2Attention5(nn.Module):
    """transformers 5.25's GPT2Attention (eager, no cache): the head shape unpacked from the
    split's traced shape, with the fused projection a ``Conv1D`` whose ``nf`` stays the dense
    width once sliced (so the example input run through the sliced layer fails)."""

    def __init__(self, d: int = D, heads: int = 4) -> None:
        super().__init__()
        self.head_dim, self.split_size = d // heads, d
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)

    def forward(self, hidden_states: Tensor) -> Tensor:
        # transformers/models/gpt2/modeling_gpt2.py:187-193
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        shape_kv = (*k.shape[:-1], -1, self.head_dim)
        k = k.view(shape_kv).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(shape_kv).transpose(1, 2)  # (B, H, T, hd)
        shape_q = (*q.shape[:-1], -1, self.head_dim)
        q = q.view(shape_q).transpose(1, 2)  # (B, H, T, hd)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        # transformers/models/gpt2/modeling_gpt2.py:216
        o = o.transpose(1, 2).reshape(*o.shape[:-3], o.shape[-2], -1).contiguous()
        return self.c_proj(o)  # (B, T, d)


class GPT2Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleList([GPT2Attention5(), GPT2Attention5()])
        self.head = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        for attn in self.h:
            x = x + attn(x)  # (B, T, D)
        return self.head(x)  # (B, T, 3)


@settings(max_examples=examples(3), deadline=None)
@given(seed=st.integers(0, 2**16))
def test_gpt2_attention_prunes_when_its_sliced_layers_fail_on_the_example(seed: int) -> None:
    # before 2026-12-08 03:20 UTC: prune traced the model again after slicing its layers; the
    # example run through the sliced Conv1D failed, the head shape's unpacking was unknown,
    # the attention kept whole: "the plan names graph nodes the model does not have"
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = GPT2Like()
    x = torch.randn(2, 5, D, generator=gen)  # (B, T, D)
    summary = gate_(model, x)
    assert summary.opaque == {}, str(summary)
    assert len(summary.head_groups) == 2, str(summary)
    randomise_gates(model, gen)
    with torch.no_grad():  # a head closed in each attention for sure
        for i in summary.head_groups:
            model.gatedprune.group_gates[i].log_alpha[0] = -4.0
    check_pruned(model, x, gen, GPT2Like, batches=(2, 3))
