"""Tracing robustness of gate_ (fixed 2026-12-08), each form a replica of third-party code
(quoted, tiny widths; the libraries themselves are not imported):

- a forward that caches a value it computed in module state (timm LeViT / EfficientFormer's
  eval-mode ``attention_bias_cache[str(x.device)]``): no trace leaves module state changed;
- functions registered with ``torch.fx.wrap`` (timm's ``resolve_self_attn_mask`` and
  ``maybe_add_mask``) are traced through where they can be;
- a module-level ``nn.Module`` instance called as a function (Hugging Face's
  ``apply_rotary_pos_emb`` under ``@use_kernel_forward_from_hub``) is traced inline;
- a ``forward`` behind a ``functools.wraps`` decorator (transformers' ``@can_return_tuple``,
  ``@deprecate_kwarg``) is traced, at the root and when a layer is rewritten alone.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.fx._symbolic_trace as fx_trace
from gating_helpers import check_pruned, examples, inserted_gating, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gatedprune.gating import gate_

D, HEADS, HD, N = 16, 2, 8, 4  # width, heads, head dim, tokens


def _holds_proxy(v: Any) -> bool:
    """``v`` is an fx Proxy or a dict/list/tuple holding one (nested)."""
    if isinstance(v, torch.fx.Proxy):
        return True
    if isinstance(v, dict):
        return any(_holds_proxy(a) for a in (*v.keys(), *v.values()))
    if isinstance(v, list | tuple | set):
        return any(_holds_proxy(a) for a in v)
    return False


def _head_layers(summary: Any) -> list[str]:
    """The layers of the channel groups gated per attention head."""
    return [
        names[0] for k, (names, _) in enumerate(summary.channel_groups) if k in summary.head_groups
    ]


def _proxies_in_state(model: nn.Module) -> list[str]:
    """The ``module.attribute`` names of ``model`` whose value holds an fx Proxy."""
    return [
        f"{p}.{k}" for p, m in model.named_modules() for k, v in vars(m).items() if _holds_proxy(v)
    ]


class Mlp(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, hidden), nn.Linear(hidden, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # (B, N, D)


# --- 1. an eval-mode cache of a computed value (timm/models/levit.py:299-306) ---------------


class CachedBiasAttention(nn.Module):
    """timm LeViT's Attention (linear path), reduced: per-head q, k, v and a relative
    position bias table read through ``get_attention_biases``, cached in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, HEADS * HD) for _ in range(3))
        self.proj = nn.Linear(HEADS * HD, D)
        self.attention_biases = nn.Parameter(torch.randn(HEADS, N))  # (H, N)
        pos = torch.arange(N)
        self.register_buffer(
            "attention_bias_idxs", (pos[:, None] - pos[None, :]).abs(), persistent=False
        )
        self.attention_bias_cache: dict[str, Tensor] = {}  # levit.py:257

    def get_attention_biases(self, device: torch.device) -> Tensor:
        if torch.jit.is_tracing() or self.training:  # levit.py:299-306
            return self.attention_biases[:, self.attention_bias_idxs]  # (H, N, N)
        device_key = str(device)
        if device_key not in self.attention_bias_cache:
            self.attention_bias_cache[device_key] = self.attention_biases[
                :, self.attention_bias_idxs
            ]
        return self.attention_bias_cache[device_key]  # (H, N, N)

    def forward(self, x: Tensor) -> Tensor:
        b, n = x.size(0), x.size(1)
        q = self.q(x).view(b, n, HEADS, HD).permute(0, 2, 1, 3)  # (B, H, N, hd)
        k = self.k(x).view(b, n, HEADS, HD).permute(0, 2, 3, 1)  # (B, H, hd, N)
        v = self.v(x).view(b, n, HEADS, HD).permute(0, 2, 1, 3)  # (B, H, N, hd)
        attn = q @ k * HD**-0.5 + self.get_attention_biases(x.device)  # (B, H, N, N)
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, HEADS * HD)  # (B, N, H*hd)
        return self.proj(y)  # (B, N, D)


class LevitLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp, self.head = CachedBiasAttention(), Mlp(), nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)  # (B, N, D)
        x = x + self.mlp(x)  # (B, N, D)
        return self.head(x.mean(1))  # (B, 3)


def test_cached_bias_leaves_no_proxy_and_prunes() -> None:
    torch.manual_seed(0)
    net = LevitLike().eval()
    x = torch.randn(2, N, D)
    summary = gate_(net, x)
    assert _proxies_in_state(net) == []  # before: attention_bias_cache['Proxy(getattr_1)']
    assert len(summary.blocks) == 2
    # the heads too, since their bias table indexed by a tensor (p[:, idx]) is sliced with them
    assert summary.channel_groups == [(["attn.q", "attn.k", "attn.v"], 2), (["mlp.fc1"], 32)]
    gen = torch.Generator().manual_seed(1)
    randomise_gates(net, gen)
    with torch.no_grad():  # the attention block closed: the root is rewritten
        for gate in inserted_gating(net).block_gates[:1]:
            gate.log_alpha.fill_(-9.0)
    check_pruned(net, x, gen, factory=lambda: LevitLike().eval(), batches=(2, 3))
    assert _proxies_in_state(net) == []


def test_cached_bias_graph_reads_the_table() -> None:
    """Every trace computes ``attention_biases[:, idxs]`` from the parameter (which pruning
    slices), none reads a value an earlier trace left in the cache."""
    from gatedprune.gating.graph import trace_model

    net = LevitLike().eval()
    net(torch.randn(2, N, D))  # a real entry in the cache ('cpu'), as after any eval run
    for _ in range(3):
        graph = trace_model(net).graph
        reads = [
            n
            for n in graph.nodes
            if n.op == "call_function"
            and n.args
            and isinstance(n.args[0], torch.fx.Node)
            and n.args[0].target == "attn.attention_biases"
        ]
        assert len(reads) == 1
        assert set(net.attn.attention_bias_cache) == {"cpu"}


class StateWriter(nn.Module):
    """Plain attributes, lists and sets written by forward (a counter, a history)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.history: list[Any] = []
        self.seen: set[Any] = set()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.lin(x)  # (B, N, D)
        self.history.append(y)
        self.seen.add(y)
        self.last = y
        self.calls += 1
        return y


def test_state_written_by_forward_is_restored_after_every_trace() -> None:
    writer = StateWriter()
    net = nn.Sequential(nn.Linear(D, D), writer, nn.ReLU(), nn.Linear(D, 2))
    gate_(net, torch.randn(2, N, D))
    assert _proxies_in_state(net) == []
    assert not any(isinstance(v, torch.fx.Proxy) for v in (*writer.history, *writer.seen))
    assert not isinstance(getattr(writer, "last", None), torch.fx.Proxy)


# --- 2. functions registered with torch.fx.wrap (timm/layers/attention.py:17-40) ---------


@torch.fx.wrap
def maybe_add_mask(scores: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    return scores if attn_mask is None else scores + attn_mask  # attention.py:19


@torch.fx.wrap
def resolve_self_attn_mask(
    seq_len: int, attn: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor | None:
    if is_causal:  # attention.py:30-39
        attn_bias = attn.new_full((seq_len, seq_len), float("-inf")).triu_(1)  # (N, N)
    elif attn_mask is None:
        attn_bias = None
    elif attn_mask.dtype == torch.bool:
        attn_bias = torch.zeros_like(attn_mask, dtype=attn.dtype)
        attn_bias.masked_fill_(~attn_mask, float("-inf"))
    else:
        attn_bias = attn_mask
    return attn_bias


@torch.fx.wrap
def data_dependent_scale(x: Tensor) -> Tensor:
    """Python control flow on a value: cannot be traced through, stays an fx leaf."""
    return x * 2 if bool(x.sum() > 0) else x


class TimmAttention(nn.Module):
    """timm's Attention on its manual path (``fused_attn=False``), attention.py:117-139."""

    def __init__(self, is_causal: bool = False, leaf_scale: bool = False) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * HEADS * HD), nn.Linear(HEADS * HD, D)
        self.is_causal, self.leaf_scale = is_causal, leaf_scale

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, N, _ = x.shape  # attention.py:117 `B, N, C = x.shape`
        qkv = self.qkv(x).reshape(B, N, 3, HEADS, HD).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        q = q * HD**-0.5
        attn = q @ k.transpose(-2, -1)  # (B, H, N, N)
        attn_bias = resolve_self_attn_mask(N, attn, attn_mask, self.is_causal)
        attn = maybe_add_mask(attn, attn_bias)
        attn = attn.softmax(dim=-1)
        x = attn @ v  # (B, H, N, hd)
        x = x.transpose(1, 2).reshape(B, N, HEADS * HD)  # (B, N, H*hd)
        if self.leaf_scale:
            x = data_dependent_scale(x)
        return self.proj(x)  # (B, N, D)


class Block(nn.Module):
    def __init__(self, is_causal: bool = False) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(D), TimmAttention(is_causal)
        self.norm2, self.mlp = nn.LayerNorm(D), Mlp()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # (B, N, D)
        return x + self.mlp(self.norm2(x))  # (B, N, D)


class TinyVit(nn.Module):
    def __init__(self, depth: int, is_causal: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(6, D)
        self.blocks = nn.Sequential(*(Block(is_causal) for _ in range(depth)))
        self.head = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))  # (B, 3)


def _registry() -> dict[tuple[int, str], Any]:
    return dict(fx_trace._wrapped_fns_to_patch)


@settings(max_examples=examples(6), deadline=None)
@given(depth=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_fx_wrapped_functions_traced_through(depth: int, seed: int) -> None:
    torch.manual_seed(seed)
    net = TinyVit(depth).eval()
    x = torch.randn(2, N, 6)
    before = _registry()
    summary = gate_(net, x)
    assert _registry() == before  # fx's registry restored, the globals too
    assert globals()["maybe_add_mask"] is maybe_add_mask
    assert globals()["resolve_self_attn_mask"] is resolve_self_attn_mask
    # before: "node 'resolve_self_attn_mask' ... returns a non-tensor", every head whole
    assert _head_layers(summary) == [f"blocks.{i}.attn.qkv" for i in range(depth)]
    gen = torch.Generator().manual_seed(seed)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: TinyVit(depth).eval(), batches=(2, 3))


def test_fx_wrapped_causal_mask_traced_through() -> None:
    """The causal branch's ops are in the graph (the mask built from ``attn.new_full``),
    the wrapped functions themselves are not; pruned == gated."""
    from gatedprune.gating.graph import trace_model

    graph = trace_model(TinyVit(1, is_causal=True)).graph
    targets = {n.target for n in graph.nodes if n.op in ("call_function", "call_method")}
    assert "new_full" in targets
    assert "triu_" in targets
    assert resolve_self_attn_mask not in targets
    assert maybe_add_mask not in targets
    net, x = TinyVit(2, is_causal=True).eval(), torch.randn(2, N, 6)
    gate_(net, x)
    gen = torch.Generator().manual_seed(7)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: TinyVit(2, is_causal=True).eval())


def test_fx_wrapped_function_that_cannot_be_traced_stays_a_leaf() -> None:
    net = nn.Sequential(nn.Linear(D, D), TimmAttention(), nn.Linear(D, 2))
    net[1].leaf_scale = True
    summary = gate_(net, torch.randn(2, N, D))
    assert summary.opaque == {}
    assert _head_layers(summary) == []  # the leaf's non-traced code reads every head
    gen = torch.Generator().manual_seed(6)
    randomise_gates(net, gen)
    check_pruned(net, torch.randn(2, N, D), gen)
    graph = torch.fx.symbolic_trace(net[1]).graph  # fx's own wrap as before gate_
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert resolve_self_attn_mask in targets
    assert data_dependent_scale in targets


def test_fx_wrapped_leaf_recorded_as_fx_records_it() -> None:
    from gatedprune.gating.graph import trace_model

    attn = TimmAttention()
    attn.leaf_scale = True
    targets = [n.target for n in trace_model(attn).graph.nodes if n.op == "call_function"]
    assert data_dependent_scale in targets  # the leaf, as fx records it
    assert resolve_self_attn_mask not in targets  # traced through
    assert maybe_add_mask not in targets


# --- 3. a module-level nn.Module instance called as a function (modeling_llama.py:126/249) --


class Rotate(nn.Module):
    """``@use_kernel_forward_from_hub("rotary_pos_emb")`` turns a function into a module."""

    def forward(self, q: Tensor) -> Tensor:
        return torch.cat((-q[..., HD // 2 :], q[..., : HD // 2]), -1)  # (B, H, N, hd)


rotate = Rotate()  # module-level, not a submodule of any model


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(HD))

    def forward(self, q: Tensor) -> Tensor:
        return q * self.scale  # (B, H, N, hd)


scaled = Scaled()  # module-level, with a parameter


class RotaryAttention(nn.Module):
    def __init__(self, outside: nn.Module) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, HEADS * HD) for _ in range(4))
        self.o = nn.Linear(HEADS * HD, D)
        self.outside = [outside]  # not registered: a global of the attention's code

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.size(0), x.size(1)
        q = self.outside[0](self.q(x).view(b, t, HEADS, HD).transpose(1, 2))  # (B, H, T, hd)
        k = self.k(x).view(b, t, HEADS, HD).transpose(1, 2)  # (B, H, T, hd)
        v = self.v(x).view(b, t, HEADS, HD).transpose(1, 2)  # (B, H, T, hd)
        y = torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(b, t, HEADS * HD))  # (B, T, D)


class RotaryNet(nn.Module):
    def __init__(self, outside: nn.Module) -> None:
        super().__init__()
        self.attn = RotaryAttention(outside)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(x)  # (B, T, D)


def test_module_level_instance_traced_inline() -> None:
    torch.manual_seed(0)
    net = RotaryNet(rotate).eval()
    x = torch.randn(2, N, D)
    summary = gate_(net, x)
    assert summary.opaque == {}  # before: "NameError: module is not installed as a submodule"
    assert _head_layers(summary) == ["attn.q"]
    assert len(summary.blocks) == 1
    gen = torch.Generator().manual_seed(3)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: RotaryNet(rotate).eval(), batches=(2, 3))


def test_module_level_instance_with_parameters_named() -> None:
    net = RotaryNet(scaled).eval()
    with pytest.warns(UserWarning, match="not a submodule"):
        summary = gate_(net, torch.randn(2, N, D))
    assert list(summary.opaque) == ["attn"]
    why = summary.opaque["attn"]
    assert "module Scaled called by 'attn' is not a submodule of the model" in why


# --- 4. decorated forwards (transformers/utils/generic.py can_return_tuple, deprecation.py) --


def deprecate_kwarg(func: Any) -> Any:
    """transformers/utils/deprecation.py's wrapper, reduced: ``(*args, **kwargs)``."""

    @functools.wraps(func)
    def wrapped_func(*args: Any, **kwargs: Any) -> Any:
        if "old_mask" in kwargs:
            kwargs["mask"] = kwargs.pop("old_mask")
        return func(*args, **kwargs)

    return wrapped_func


def can_return_tuple(func: Any) -> Any:
    """transformers/utils/generic.py's wrapper, reduced: reads ``self``'s config, pops a
    keyword, post-processes the output."""

    @functools.wraps(func)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return_dict = getattr(self, "return_dict", True)
        return_dict_passed = kwargs.pop("return_dict", return_dict)
        output = func(self, *args, **kwargs)
        if not return_dict_passed:
            output = output[0]
        return output

    return wrapper


class DecoratedLayer(nn.Module):
    """A residual layer whose forward takes ``**kwargs`` behind ``@deprecate_kwarg``."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = Mlp()

    @deprecate_kwarg
    def forward(self, x: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        h = self.mlp(x)  # (B, N, D)
        if mask is not None:
            h = h * mask
        return x + h  # (B, N, D)


class DecoratedModel(nn.Module):
    """A model whose forward is behind ``@can_return_tuple`` and takes keyword-only and
    ``**kwargs`` arguments (as every transformers model class)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(6, D)
        self.layers = nn.ModuleList(DecoratedLayer() for _ in range(layers))
        self.head = nn.Linear(D, 3)
        self.return_dict = False

    @can_return_tuple
    def forward(
        self, x: Tensor, mask: Tensor | None = None, *, scale: float = 1.0, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        h = self.embed(x) * scale  # (B, N, D)
        for layer in self.layers:
            h = layer(h, mask=mask)
        return self.head(h.mean(1)), h  # (B, 3), (B, N, D)


@pytest.mark.parametrize("layers", [1, 2])
def test_decorated_forwards_traced(layers: int) -> None:
    torch.manual_seed(layers)
    net = DecoratedModel(layers).eval()
    x = torch.randn(2, N, 6)
    # before: "co_varnames is too small" / "'_GateProxy' object does not support item assignment"
    summary = gate_(net, x)
    assert len(summary.blocks) == layers  # before: "tracing it alone fails", no block gated
    gen = torch.Generator().manual_seed(4)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: DecoratedModel(layers).eval(), batches=(2, 3))


def test_decorated_layer_rewritten_alone() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DecoratedLayer()

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x)  # (B, N, D)

    torch.manual_seed(5)
    net = Outer().eval()
    x = torch.randn(2, N, D)
    summary = gate_(net, x)
    assert [b[0] for b in summary.blocks] == ["inner"]
    gen = torch.Generator().manual_seed(5)
    randomise_gates(net, gen)
    with torch.no_grad():
        inserted_gating(net).block_gates[0].log_alpha.fill_(-9.0)  # the block removed
    check_pruned(net, x, gen, factory=lambda: Outer().eval())


def test_untraceable_root_message_has_no_stale_advice() -> None:
    class Looping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x: Tensor) -> Tensor:
            for _ in range(x.size(1)):  # a traced size as a Python int: no hint matches
                x = self.lin(x)  # (B, N, D)
            return x

    with pytest.raises(ValueError, match=r"cannot trace Looping\.forward itself") as info:
        gate_(Looping(), torch.randn(2, N, D))
    assert "move data-dependent control flow into a submodule" not in str(info.value)


def merge_with_config_defaults(func: Any) -> Any:
    """transformers/utils/generic.py:1151, reduced: ``use_cache`` taken from the config when
    the caller passes None, found among the positional arguments by the code object of the
    function it wraps."""

    @functools.wraps(func)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        arg_index = None
        if "use_cache" in func.__code__.co_varnames:
            arg_index = func.__code__.co_varnames.index("use_cache") - 1  # -1 for self
        if arg_index is not None and len(args) > arg_index and args[arg_index] is not None:
            value = args[arg_index]
        elif kwargs.get("use_cache") is not None:
            value = kwargs["use_cache"]
        else:
            value = self.use_cache_default
        if arg_index is not None and len(args) > arg_index:
            args = (*args[:arg_index], value, *args[arg_index + 1 :])
        else:
            kwargs["use_cache"] = value
        return func(self, *args, **kwargs)

    return wrapper


class ConfigDefaultsModel(nn.Module):
    """``@merge_with_config_defaults`` over ``@can_return_tuple`` (HF BertModel's stack)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = DecoratedLayer(), nn.Linear(D, 3)
        self.use_cache_default, self.return_dict = False, False

    @merge_with_config_defaults
    @can_return_tuple
    def forward(
        self, x: Tensor, mask: Tensor | None = None, use_cache: bool | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        h = self.layer(x, mask=mask)  # (B, N, D)
        return self.head(h.mean(1)), h  # (B, 3), (B, N, D)


def test_decorator_filling_defaults_from_config() -> None:
    torch.manual_seed(8)
    net, x = ConfigDefaultsModel().eval(), torch.randn(2, N, D)
    summary = gate_(net, x)  # before: "co_varnames is too small"
    assert [b[0] for b in summary.blocks] == ["layer"]
    gen = torch.Generator().manual_seed(8)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: ConfigDefaultsModel().eval(), batches=(2, 3))


# --- 5. a removed branch whose module returns a value no caller reads --------------------


class BertSelfAttention(nn.Module):
    """modeling_bert.py's BertSelfAttention, reduced: returns ``(context, attn_weights)``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, HEADS * HD) for _ in range(3))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        b, t = h.size(0), h.size(1)
        q = self.q(h).view(b, t, HEADS, HD).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(h).view(b, t, HEADS, HD).transpose(1, 2)  # (B, H, T, hd)
        v = self.v(h).view(b, t, HEADS, HD).transpose(1, 2)  # (B, H, T, hd)
        w = torch.softmax(q @ k.transpose(-1, -2), -1)  # (B, H, T, T)
        return (w @ v).transpose(1, 2).reshape(b, t, HEADS * HD), w  # (B, T, H*hd)


class BertSelfOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.norm = nn.Linear(HEADS * HD, D), nn.LayerNorm(D)

    def forward(self, h: Tensor, inp: Tensor) -> Tensor:
        return self.norm(self.dense(h) + inp)  # (B, T, D)


class BertAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self, self.output = BertSelfAttention(), BertSelfOutput()

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        attention_output, attn_weights = self.self(h)  # modeling_bert.py:316-324
        return self.output(attention_output, h), attn_weights


class DecoratedBertAttention(BertAttention):
    @deprecate_kwarg  # modeling_bert.py:305
    def forward(self, h: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return super().forward(h)


class BertLike(nn.Module):
    def __init__(self, decorated: bool) -> None:
        super().__init__()
        self.attention = DecoratedBertAttention() if decorated else BertAttention()
        self.head = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        a, _ = self.attention(x)  # (B, T, D); the weights dropped
        return self.head(a.mean(1))  # (B, 3)


@pytest.mark.parametrize("decorated", [False, True])
def test_removed_branch_returning_unread_weights(decorated: bool) -> None:
    torch.manual_seed(9)
    net, x = BertLike(decorated).eval(), torch.randn(2, N, D)
    summary = gate_(net, x)
    assert [b[0] for b in summary.blocks] == ["attention.output"]
    with torch.no_grad():  # before: "node softmax in 'attention' is still used by output"
        inserted_gating(net).block_gates[0].log_alpha.fill_(-9.0)
    pruned = check_pruned(
        net, x, torch.Generator().manual_seed(9), factory=lambda: BertLike(decorated).eval()
    )
    assert pruned.attention(x)[1] is None  # the weights no caller reads are not computed


# --- 6. forms met on the real HF models once decorated forwards trace --------------------


class EmbeddingsFirst(nn.Module):
    """HF BertModel.forward's check (modeling_bert.py: "You must specify exactly one of
    input_ids or inputs_embeds"), which the trace with every optional argument a traced
    value cannot pass; the trace at None (gate_'s example) can."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = DecoratedLayer(), nn.Linear(D, 3)

    def forward(
        self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        h = input_ids if input_ids is not None else inputs_embeds
        return self.head(self.layer(h).mean(1))  # (B, 3)


def test_root_traceable_only_at_its_none_defaults() -> None:
    torch.manual_seed(10)
    net, x = EmbeddingsFirst().eval(), torch.randn(2, N, D)
    summary = gate_(net, x)  # before: "torch.fx cannot trace EmbeddingsFirst.forward itself"
    assert [b[0] for b in summary.blocks] == ["layer"]
    gen = torch.Generator().manual_seed(10)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: EmbeddingsFirst().eval(), batches=(2, 3))


class PassesKwargs(nn.Module):
    """HF BertEncoder calling its decorated layers with keywords the layer takes in
    ``**kwargs`` (``position_ids=...``): the layer is traced alone with them (before
    2026-12-08 its block stayed ungated: "it is called with arguments its decorated forward
    takes in kwargs (position_ids), which rewritten code does not take")."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = DecoratedLayer(), nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x, position_ids=None).mean(1))  # (B, 3)


def test_decorated_layer_called_with_packed_keywords_gated() -> None:
    torch.manual_seed(11)
    net, x = PassesKwargs().eval(), torch.randn(2, N, D)
    summary = gate_(net, x)
    assert [b[0] for b in summary.blocks] == ["layer"]
    gen = torch.Generator().manual_seed(11)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: PassesKwargs().eval())


class ConfigDefaultsLeaf(ConfigDefaultsModel):
    """A decorated module fx cannot trace (kept whole) that HF's callers pass by keyword:
    ``self.model(input_ids=input_ids, use_cache=use_cache)`` (modeling_llama.py)."""

    @merge_with_config_defaults
    @can_return_tuple
    def forward(
        self, x: Tensor, mask: Tensor | None = None, use_cache: bool | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        h = self.layer(x, mask=mask)  # (B, N, D)
        if bool(h.sum() > 0):  # Python control flow on a value: kept whole
            h = h * 1.0
        return self.head(h.mean(1)), h  # (B, 3), (B, N, D)


class CallsLeafByKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model, self.out = ConfigDefaultsLeaf(), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.model(x=x, mask=None, use_cache=None)[0])  # (B, 2)


def test_decorated_leaf_called_by_keyword_keeps_its_keywords() -> None:
    torch.manual_seed(12)
    net, x = CallsLeafByKeyword().eval(), torch.randn(2, N, D)
    with pytest.warns(UserWarning, match="'model'"):  # before: "forward() got multiple
        summary = gate_(net, x)  # values for argument 'use_cache'" (called positionally)
    assert list(summary.opaque) == ["model"]
    gen = torch.Generator().manual_seed(12)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: CallsLeafByKeyword().eval())


class LogitsToKeep(nn.Module):
    """HF LlamaForCausalLM.forward's last lines (modeling_llama.py): an int argument told
    from a traced value by ``isinstance``, then used as an index."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.lm_head = DecoratedLayer(), nn.Linear(D, 5)

    def forward(self, x: Tensor, logits_to_keep: int | Tensor = 0) -> Tensor:
        h = self.layer(x)  # (B, T, D)
        slice_indices = (
            slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        )
        return self.lm_head(h[:, slice_indices, :])  # (B, T, 5)


def test_int_argument_told_from_traced_value_is_fixed() -> None:
    from gatedprune.gating.graph import trace_model

    torch.manual_seed(13)
    net, x = LogitsToKeep().eval(), torch.randn(2, N, D)
    graph = trace_model(net).graph  # before: h[:, logits_to_keep, :], one token's logits
    with torch.no_grad():
        assert torch.equal(torch.fx.GraphModule(net, graph)(x), net(x))
    gate_(net, x)
    gen = torch.Generator().manual_seed(13)
    randomise_gates(net, gen)
    check_pruned(net, x, gen, factory=lambda: LogitsToKeep().eval(), batches=(2, 3))


class OptionalMaskRoot(nn.Module):
    """A root whose optional ``mask`` is traced at None: fx's own ``_assert_is_none`` (itself
    registered with ``torch.fx.wrap``) stays fx's node, the same in every trace."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = torch.relu(self.a(x))  # (B, N, D)
        if mask is not None:
            h = h * mask
        return self.fc(h + torch.relu(self.b(h)))  # (B, N, 2)


def test_fx_own_wrapped_assert_left_to_fx() -> None:
    from gatedprune.gating.graph import trace_model

    net, x = OptionalMaskRoot().eval(), torch.randn(2, N, D)
    targets = [n.target for n in trace_model(net).graph.nodes if n.op == "call_function"]
    assert fx_trace._assert_is_none in targets
    summary = gate_(net, x)
    assert [b[0] for b in summary.blocks] == [""]
    gen = torch.Generator().manual_seed(14)
    randomise_gates(net, gen)
    with torch.no_grad():
        inserted_gating(net).block_gates[0].log_alpha.fill_(-9.0)
    check_pruned(net, x, gen, factory=lambda: OptionalMaskRoot().eval())


# torchvision/ops/stochastic_depth.py: `torch.fx.wrap("stochastic_depth")` at module level of
# a module whose name starts with "torch" but is not torch's own
_SD_SOURCE = """
import torch

def stochastic_depth(input, p, mode, training=True):
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    return input * noise.div_(survival_rate)

torch.fx.wrap("stochastic_depth")
"""


def _torchvision_like_ops() -> Any:
    import types

    module = types.ModuleType("torchvision_like.ops.stochastic_depth")
    exec(compile(_SD_SOURCE, "<torchvision_like>", "exec"), module.__dict__)
    return module


def test_fx_wrapped_function_of_a_torch_named_library_traced_through() -> None:
    """A function a library whose module name starts with "torch" (torchvision) registers with
    ``torch.fx.wrap`` is traced through like any other: before 2026-12-08 it was taken for one
    of torch's own and left an opaque leaf, so torchvision's StochasticDepth kept every
    EfficientNet / ConvNeXt / Swin block and the residual stream's channels ungated."""
    ops = _torchvision_like_ops()

    class SDBlockNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.branch = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 1))
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = self.stem(x)  # (B, 8, H, W)
            # torchvision MBConv / CNBlock: result = self.stochastic_depth(result) + input
            h = h + ops.stochastic_depth(self.branch(h), 0.1, "row", self.training)
            return self.head(h)  # (B, 4, H, W)

    try:
        net, x = SDBlockNet().eval(), torch.randn(2, 3, 8, 8)
        summary = gate_(net, x)
        assert len(summary.blocks) == 1
        assert sorted(len(layers) for layers, _ in summary.channel_groups) == [1, 2]
        gen = torch.Generator().manual_seed(3)
        randomise_gates(net, gen)
        check_pruned(net, x, gen, factory=lambda: SDBlockNet().eval())
    finally:  # the registration is process-wide: drop it
        for key in [k for k in fx_trace._wrapped_fns_to_patch if k[1] == "stochastic_depth"]:
            del fx_trace._wrapped_fns_to_patch[key]
