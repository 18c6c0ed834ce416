"""``gate_``: insert gates into an existing model; the :class:`InsertedGating` that speaks for it.

Gates are applied by forward hooks on the user's own modules (a site module's output is
multiplied by its channel gates and, for the last module of a residual branch, by the block
gate), so the model keeps its class, its ``forward`` and its ``state_dict`` keys; the gate
parameters live in one :class:`InsertedGating` submodule named ``gatedprune``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from ..base import GatedModule, GateHook, ModelGating, find_model_gating, weight_norm_layer
from ..costs import is_code
from ..fingerprint import graph_fingerprint, json_checksum, model_fingerprint
from ..gates import (
    Gate,
    GateKind,
    HardConcrete,
    Sigmoid,
    SigmoidGate,
    gate_prob_open,
    gate_values,
    replayable_gate_values,
    resolve_gate,
)
from ..hooks import (
    computed_weight_memo,
    describe_hooks,
    global_hooks,
    hook_keys,
    hook_name,
    user_hooks,
)
from ..inputs import as_shapes, tensor_inputs
from ..layout import check_flag
from .blocks import Block, find_blocks, node_label, outermost
from .channels import (
    ChannelAnalysis,
    ChannelGroup,
    HeadBias,
    ParamLinear,
    ParamScale,
    analyse_channels,
)
from .graph import (
    TracedModel,
    costs_scale_with_batch,
    example_entries,
    node_owners,
    record_bindings,
    record_run,
    trace_model,
)
from .rnn import (
    RNNConsumer,
    RNNInfo,
    _used,
    fold_rnns,
    item_index,
    pad_to_width,
    rnn_plan,
    setup_rnns,
    width_values,
)
from .rnn import switch as switch_rnn
from .shortcuts import Edge, find_dense_edges
from .structure import (
    CostTerms,
    GraphInfo,
    ParamSite,
    SiteInfo,
    SizeInfo,
    SliceInfo,
    _inside,
    build_cost_terms,
)
from .surgery import (
    _PARAM_KINDS,
    PLAN_FORMAT,
    GateScale,
    ScaledAdd,
    _apply_plan,
    _call_outputs,
    fold_input_scale,
    fold_param_scale,
    fold_scale,
    hooked_call_problem,
    is_leaf_call,
    local_trace,
    refuse_computed,
    scaled_path,
)
from .transformer import (
    GatedMultiheadAttention,
    GatedTransformerDecoderLayer,
    GatedTransformerEncoderLayer,
    _Ref,
    fold_decoder_layer,
    fold_heads,
    fold_layer,
    gateable_attention,
    gateable_decoder_layer,
    gateable_layer,
    prepare_encoders,
)

__all__ = ["GatingSummary", "InsertedGating", "export_plan", "gate_"]

ATTR = "gatedprune"

FilterFn = Callable[[nn.Module, str], bool]
# modules whose cost is not linear in dim 0 of the model input (sequence-first layouts)
_SEQUENCE_UNITS = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerDecoder,
    nn.Transformer,
    nn.RNNBase,
)


@dataclass
class GatingSummary:
    """What ``gate_`` gated, and what it left ungated and why (``str()`` is a readable report).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> print(gate_(net, torch.zeros(2, 4)))  # doctest: +ELLIPSIS
    gatedprune.gate_: 1 channel groups, 0 residual blocks, ..., 8 gates
      channels      8  0
      ungated       2  2: reaches the model output
    """

    channel_groups: list[tuple[list[str], int]] = field(default_factory=list)
    blocks: list[tuple[str, str, int]] = field(default_factory=list)  # owner, site, FLOPs
    ungated_groups: list[tuple[list[str], int, str]] = field(default_factory=list)
    ungated_adds: list[tuple[str, str]] = field(default_factory=list)
    opaque: dict[str, str] = field(default_factory=dict)
    transformers: list[tuple[str, int, int]] = field(default_factory=list)  # name, heads, units
    # decoder layers: name, self-attention heads, cross-attention heads, FFN units
    decoders: list[tuple[str, int, int, int]] = field(default_factory=list)
    attentions: list[tuple[str, int]] = field(default_factory=list)  # name, heads
    ungated_layers: list[tuple[str, str]] = field(default_factory=list)
    shortcuts: list[tuple[str, str]] = field(default_factory=list)  # (from block, to block)
    rnns: list[tuple[str, int, int, int]] = field(default_factory=list)  # name, layers, dirs, H
    unconnected: list[tuple[str, str]] = field(default_factory=list)
    head_groups: list[int] = field(default_factory=list)  # channel groups of attention heads
    # weights of linear maps written with parameters (x @ self.W) left whole, and why
    ungated_params: list[tuple[str, str]] = field(default_factory=list)
    # channel groups of the query heads of multi-query attention -> the Linear layers gating
    # them on their input (after the attention)
    query_heads: dict[int, list[str]] = field(default_factory=dict)
    # channel groups normalised by GroupNorms (a gate per run it normalises together) -> them
    norm_groups: dict[int, list[str]] = field(default_factory=dict)

    @property
    def n_gates(self) -> int:
        """Number of scalar gates inserted."""
        n_tf = sum(h + u + 2 for _, h, u in self.transformers)
        decoders: list[tuple[str, int, int, int]] = getattr(self, "decoders", [])
        n_tf += sum(h + c + u + 3 for _, h, c, u in decoders)
        n_tf += sum(h for _, h in self.attentions)
        n_ch = sum(n for _, n in self.channel_groups)
        n_rnn = sum(n_l * d * h for _, n_l, d, h in self.rnns)
        return n_ch + len(self.blocks) + n_tf + len(self.shortcuts) + n_rnn

    def __str__(self) -> str:
        lines = [
            f"gatedprune.gate_: {len(self.channel_groups)} channel groups, "
            f"{len(self.blocks)} residual blocks, "
            f"{len(self.transformers) + len(getattr(self, 'decoders', []))} transformer layers, "
            f"{len(self.shortcuts)} new shortcuts, {self.n_gates} gates"
        ]
        query_heads: dict[int, list[str]] = getattr(self, "query_heads", {})
        for i, (producers, n) in enumerate(self.channel_groups):
            if i in query_heads:  # multi-query attention: gated after it
                lines.append(
                    f"  heads     {n:5d}  {', '.join(producers)} (one gate per query head, "
                    f"at the input of {', '.join(query_heads[i])})"
                )
            elif i in self.head_groups:  # hand-written attention: a gate per head
                lines.append(f"  heads     {n:5d}  {', '.join(producers)} (one gate per head)")
            elif i in getattr(self, "norm_groups", {}):  # a gate per run a GroupNorm normalises
                lines.append(
                    f"  channels  {n:5d}  {', '.join(producers)} (one gate per group of "
                    f"{', '.join(self.norm_groups[i])})"
                )
            else:
                lines.append(f"  channels  {n:5d}  {', '.join(producers)}")
        for owner, site, flops in self.blocks:
            lines.append(f"  block     {owner or '<root>'}  (gate after {site}, {flops} FLOPs)")
        for name, h, u in self.transformers:
            lines.append(
                f"  layer     {name}: {h} heads, {u} FFN units, attention and FFN sub-layer gates"
            )
        for name, h, c, u in getattr(self, "decoders", []):
            lines.append(
                f"  layer     {name}: {h} self-attention heads, {c} cross-attention heads, "
                f"{u} FFN units, self-attention, cross-attention and FFN sub-layer gates"
            )
        for a, b in self.shortcuts:
            lines.append(f"  shortcut  {a} -> {b} (starts closed)")
        for name, h in self.attentions:
            lines.append(f"  heads     {h:5d}  {name}")
        for name, n_l, d, h in self.rnns:
            lines.append(
                f"  recurrent {name}: {n_l} layers x {d} directions x {h} units "
                "(one gate vector per layer and direction)"
            )
        for producers, n, why in self.ungated_groups:
            lines.append(f"  ungated   {n:5d}  {', '.join(producers)}: {why}")
        for add, why in self.ungated_adds:
            lines.append(f"  ungated   add {add}: {why}")
        for name, why in self.ungated_layers:
            lines.append(f"  ungated   layer {name}: {why}")
        for name, why in self.ungated_params:
            lines.append(f"  ungated   weight {name}: {why}")
        for name, why in self.unconnected:
            lines.append(f"  no shortcuts for {name}: {why}")
        for name, why in self.opaque.items():
            lines.append(f"  opaque    {name}: {why}")
        return "\n".join(lines)


def _ungated_line(g: ChannelGroup, why: str) -> tuple[list[str], int, str]:
    """The summary line of ungated group ``g``: its producers, their channels and ``why``.
    The number is the producers' output width (784 for VAE's ``dec_fc`` even where a view
    split it into 16 x 7 x 7 and the group has 7 entries); producers of unlike widths are
    named with theirs and the number is the group's entries.

    >>> g = ChannelGroup(0, ["dec_fc"], 7, widths={"dec_fc": 784})
    >>> _ungated_line(g, "a reason")
    (['dec_fc'], 784, 'a reason')
    """
    widths = {g.widths.get(p, g.size) for p in g.producers}
    if len(widths) == 1:
        return list(g.producers), widths.pop(), why
    each = ", ".join(f"{p} {g.widths.get(p, g.size)}" for p in g.producers)
    entries = "1 entry" if g.size == 1 else f"{g.size} entries"
    return list(g.producers), g.size, f"{why} ({entries}; channels: {each})"


class _SiteHook(GateHook):
    """Forward hook multiplying a site module's output by its gates."""

    def __init__(self, gating: InsertedGating, name: str) -> None:
        self.gating = gating
        self.name = name

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, tuple):  # attention: (output, weights); gate the output
            first = output[0]
            return (first * self.gating.site_scale(self.name, first), *output[1:])
        kernel = getattr(module, "kernel_size", None)
        # (C, *spatial): an unbatched call's channels are dim 0, not the gated dim 1
        if (
            isinstance(kernel, tuple)
            and isinstance(output, Tensor)
            and output.dim() != len(kernel) + 2
        ):
            raise ValueError(
                f"gated module '{self.name}' ({type(module).__name__}) was called on an "
                f"unbatched input (its output has shape {tuple(output.shape)}); gate_ "
                f"gated it for batched inputs (B, C, ...): add the batch dimension"
            )
        return output * self.gating.site_scale(self.name, output)


class _InputSiteHook(GateHook):
    """Forward pre-hook multiplying a Linear's input by its gates (the query heads of
    multi-query attention, gated where the Linear after the attention reads them)."""

    def __init__(self, gating: InsertedGating, name: str) -> None:
        self.gating = gating
        self.name = name

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        x = inputs[0]
        return (x * self.gating.input_scale(self.name, x), *inputs[1:])


def _in_backward() -> bool:
    """Whether this runs inside a backward pass (a gradient-checkpointed recomputation);
    False under torch.compile, which cannot trace the question."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class _BackwardToken:
    """Lives as long as the autograd graph of one forward's output, and records whether a
    backward pass through it has finished."""

    def __init__(self) -> None:
        self.done = False


class _MarkDone:
    """Pre-hook on the autograd node of a root output: marks the forward's token done at the
    end of the backward pass that reaches it."""

    def __init__(self, token: _BackwardToken) -> None:
        self.token = token

    def __call__(self, grad_outputs: tuple[Tensor | None, ...]) -> None:
        token = self.token

        def done() -> None:
            token.done = True

        torch.autograd.Variable._execution_engine.queue_callback(done)


def _output_tensors(output: object) -> Iterator[Tensor]:
    """The tensors in a forward's output: a tensor, or tensors in tuples, lists and mappings
    (a Hugging Face ``ModelOutput`` is one)."""
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, tuple | list):
        for o in output:
            yield from _output_tensors(o)
    elif isinstance(output, Mapping):
        for o in output.values():
            yield from _output_tensors(o)


@dataclass
class _ForwardState:
    """What the gated sites of one forward pass share: the gate samples (channel and block
    gates, shortcut gates), the block outputs the shortcuts read, and the token that tells
    whether the forward's backward has reached its samples (None: drawn without a graph)."""

    values: tuple[list[Tensor], list[Tensor]] | None = None
    edge_values: Tensor | None = None
    edge_outputs: dict[str, Tensor] = field(default_factory=dict)
    edge_versions: dict[str, int] = field(default_factory=dict)
    token: _BackwardToken | None = None
    # started in backward: the recomputation of a checkpointed root forward, which draws the
    # original samples again (checkpoint restores the random state)
    recomputed: bool = False


class _EdgeOutHook(GateHook):
    """Forward hook keeping a block's output for the shortcuts leaving it (a copy when a later
    in-place op overwrites it, e.g. the next block's ``x += f(x)``)."""

    def __init__(self, gating: InsertedGating, name: str, clone: bool = False) -> None:
        self.gating = gating
        self.name = name
        self.clone = clone

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        kept = output.clone() if getattr(self, "clone", False) else output
        state = self.gating.forward_state()
        state.edge_outputs[self.name] = kept
        state.edge_versions[self.name] = kept._version


class _EdgeInHook(GateHook):
    """Forward pre-hook adding the gated shortcuts arriving at a block to its input."""

    def __init__(self, gating: InsertedGating, name: str) -> None:
        self.gating = gating
        self.name = name

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.gating.edge_input(self.name, inputs[0]),)


class _TrackHook(GateHook):
    """Forward hook on the root model: ties a token to the output's autograd graph
    (:meth:`InsertedGating.track_backward`)."""

    def __init__(self, gating: InsertedGating) -> None:
        self.gating = gating

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: object) -> None:
        self.gating.track_backward(output)


class _ResetHook(GateHook):
    """Forward pre-hook on the root model: one gate sample per forward pass, after checking
    that every module gate_ hooked is still in place (a module replaced after gate_, e.g. by
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, would run without its gates)."""

    def __init__(self, gating: InsertedGating) -> None:
        self.gating = gating

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.gating.check_hooks(module)
        self.gating.reset(torch.is_grad_enabled())


class ParamGate(nn.Module):
    """The parametrization (``torch.nn.utils.parametrize``) ``gate_`` puts on the weight and
    bias of a linear map written with the model's own parameters (``x @ self.W + self.b``):
    the stored tensor times the gates of the map's output units along ``dim``, ``x @ (W g) +
    b g = (x @ W + b) g``. Every read of ``self.W`` is gated, so a recomputation (gradient
    checkpointing), another thread or a nested call sees what the forward sees; ``prune``
    removes it and folds the gate values into the stored tensor.

    >>> class Net(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.w1 = nn.Parameter(torch.ones(3, 8))
    ...         self.w2 = nn.Parameter(torch.randn(8, 2))
    ...     def forward(self, x: Tensor) -> Tensor:
    ...         return torch.relu(x @ self.w1) @ self.w2
    >>> net = Net().eval()
    >>> _ = gate_(net, torch.zeros(2, 3))
    >>> net.gatedprune.group_gates[0].force_(torch.arange(8) < 4)
    >>> net.w1[0].tolist()  # the gated weight; the stored one is unchanged
    [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    >>> net.w1 = torch.full((3, 8), 2.0)  # assignment stores the new (ungated) tensor
    >>> net.parametrizations.w1.original[0].tolist()
    [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    >>> net.w1[0].tolist()
    [2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    """

    def __init__(self, gating: InsertedGating, key: str, dim: int, shape: Sequence[int]) -> None:
        super().__init__()
        self.__dict__["_gp_gating"] = gating  # not a submodule: the model holds it
        self.key = key
        self.dim = dim
        self.shape = tuple(int(n) for n in shape)  # of the stored tensor

    def forward(self, stored: Tensor) -> Tensor:
        gating: InsertedGating = self.__dict__["_gp_gating"]
        vec = gating.param_scale(self.key, stored.dtype)  # (n_out,)
        shape = [1] * stored.dim()
        shape[self.dim] = -1
        return stored * vec.view(shape)  # (in, out) / (out, in) or (out,)

    def right_inverse(self, value: Tensor) -> Tensor:
        """What assigning ``module.W = value`` stores: ``value`` itself, the ungated tensor
        (torch's ``parametrize`` then sets ``parametrizations.W.original`` to it, sharing its
        storage, as ``Tensor.set_``). ``TypeError`` for a non-tensor, ``ValueError`` for
        another shape (``set_`` would resize the stored tensor silently)."""
        if not isinstance(value, Tensor):
            raise TypeError(
                f"a parameter gated by gate_ ({self.key}) takes a tensor of shape "
                f"{list(self.shape)}, got {type(value).__name__}"
            )
        if tuple(value.shape) != self.shape:
            raise ValueError(
                f"a parameter gated by gate_ ({self.key}) takes a tensor of shape "
                f"{list(self.shape)}, got shape {list(value.shape)}"
            )
        return value


def _param_gates(m: nn.Module) -> dict[str, ParamGate] | None:
    """The :class:`ParamGate` of each parametrized tensor of ``m``, or ``None`` if ``m`` has
    another parametrization (alone or stacked on one of ours)."""
    gates: dict[str, ParamGate] = {}
    for attr, plist in cast(nn.ModuleDict, m.parametrizations).items():
        mods = list(cast(nn.ModuleList, plist))
        if len(mods) != 1 or not isinstance(mods[0], ParamGate):
            return None
        gates[attr] = mods[0]
    return gates


def _model_class(m: nn.Module) -> Any:
    """The model's class under the one torch's ``parametrize`` made for ``m`` (a subclass of
    that one too, when a ``GraphModule``'s deep copy derives a class of its own from it)."""
    for cls in type(m).__mro__:
        if cls.__dict__.get("__setattr__") is _param_gated_setattr:
            return cls.__bases__[0]
    return type(m).__bases__[0]  # pragma: no cover - only installed by _adopt_param_gated


def _param_gated_setattr(self: nn.Module, name: str, value: object) -> None:
    """``module.W = nn.Parameter(...)`` on a parametrized ``W`` stores the values like a plain
    tensor does (torch's ``Module.__setattr__`` would raise ``KeyError: attribute 'W' already
    exists``); the stored ``nn.Parameter`` object stays, so optimizers keep training it."""
    if isinstance(value, nn.Parameter) and parametrize.is_parametrized(self, name):
        plist = cast(parametrize.ParametrizationList, self.parametrizations[name])  # type: ignore[index]
        if isinstance(plist[0], ParamGate):
            plist.right_inverse(value)
            return
    base: Any = _model_class(self)
    base.__setattr__(self, name, value)


def _new_module(cls: type[nn.Module]) -> nn.Module:
    """An empty instance of ``cls``, filled by :func:`_restore_param_gated` (unpickling)."""
    return cls.__new__(cls)


def _param_gated_reduce_ex(self: nn.Module, protocol: Any) -> tuple[Any, ...]:
    """Pickle a module whose parametrizations are all :class:`ParamGate` as its plain class
    with the stored tensors in place; :func:`_restore_param_gated` registers the gates
    again on load. Torch refuses any other parametrized module, so this does too."""
    gates = _param_gates(self)
    base: Any = _model_class(self)
    state = base.__getstate__(self)
    if gates is None or not isinstance(state, dict):
        raise RuntimeError(
            f"torch pickles a parametrized module ({type(self).__name__}) only through "
            "state_dict(); gate_'s own parametrizations pickle, but this module has another "
            "(added after gate_?): save model.state_dict() and load it into a twin gated the "
            "same way"
        )
    state = dict(state)
    params = cast(nn.ModuleDict, self.parametrizations)
    state["_modules"] = {k: v for k, v in self._modules.items() if k != "parametrizations"}
    state["_parameters"] = dict(self._parameters)
    state["_buffers"] = dict(self._buffers)
    for attr in gates:
        original = cast(Tensor, params[attr].original)
        if isinstance(original, nn.Parameter):
            state["_parameters"][attr] = original
        else:
            state["_buffers"][attr] = original
    return (_new_module, (base,), (state, gates), None, None, _restore_param_gated)


def _restore_param_gated(m: nn.Module, state: tuple[dict[str, Any], dict[str, ParamGate]]) -> None:
    """Unpickle what :func:`_param_gated_reduce_ex` wrote: the module's state, then its
    :class:`ParamGate` parametrizations registered again."""
    fields, gates = state
    setstate: Any = m.__setstate__  # nn.Module's, unless the class has its own
    setstate(fields)
    for attr, pgate in gates.items():
        parametrize.register_parametrization(m, attr, pgate, unsafe=True)
    _adopt_param_gated(m)


def _adopt_param_gated(m: nn.Module) -> None:
    """Give the class torch's ``parametrize`` made for ``m`` (one per instance) the
    ``__setattr__`` of :func:`_param_gated_setattr` and the pickling of
    :func:`_param_gated_reduce_ex`."""
    cls = type(m)
    if not parametrize.is_parametrized(m):  # pragma: no cover - called after registering
        raise RuntimeError(f"{cls.__name__} was expected to be parametrized")
    cls.__setattr__ = _param_gated_setattr  # type: ignore[method-assign]
    cls.__reduce_ex__ = _param_gated_reduce_ex  # type: ignore[method-assign,assignment]
    if isinstance(m, fx.GraphModule):  # a module prune rewrote, gated again
        cls.__deepcopy__ = _param_gated_deepcopy  # type: ignore[attr-defined]


def _param_gated_deepcopy(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """Deep copy of a gated ``GraphModule`` (a module ``prune`` rewrote, gated again) through
    :func:`_param_gated_reduce_ex`: ``GraphModule``'s own deep copy reads the parametrized
    tensors from a plain module, which has none."""
    _, args, state, _, _, _ = _param_gated_reduce_ex(self, 4)
    copied = cast(fx.GraphModule, _new_module(*args))  # a class of its own (GraphModule.__new__)
    memo[id(self)] = copied
    fields, gates = copy.deepcopy(state, memo)
    setstate: Any = copied.__setstate__  # nn.Module's
    setstate(fields)
    copied.graph = copied.graph  # owned by the copy; its class gets the generated forward
    for attr, pgate in gates.items():
        parametrize.register_parametrization(copied, attr, pgate, unsafe=True)
    _adopt_param_gated(copied)
    return copied


_GATE_HOOKS = (
    _SiteHook,
    _InputSiteHook,
    _EdgeOutHook,
    _EdgeInHook,
    _ResetHook,
    _TrackHook,
)


@dataclass
class _TrainOnly:
    """Modules with parameters the model calls only in training mode, which the eval-mode
    trace ``gate_`` works on lacks (torchvision GoogLeNet's ``if self.training: aux1 =
    self.aux1(x)``): ``modules`` (the outermost, with the reason the summary gives),
    ``reads`` (nodes of the eval trace whose values they read, with the reason to keep their
    channels whole), ``scopes`` (modules whose code calls them: code rewritten from the
    eval trace would drop the calls) and ``unknown`` (why nothing is gated: the model runs
    such modules but cannot be traced in training mode, so what they read is unknown)."""

    modules: dict[str, str] = field(default_factory=dict)
    reads: dict[fx.Node, str] = field(default_factory=dict)
    scopes: dict[str, str] = field(default_factory=dict)
    unknown: str | None = None


def _train_only(model: nn.Module, traced: TracedModel, inputs: tuple[Tensor, ...]) -> _TrainOnly:
    """Find the modules ``model`` calls only in training mode (see :class:`_TrainOnly`), from a
    training-mode trace compared with the eval-mode one ``traced``; traced only if some
    module with parameters is missing from ``traced``.

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body, self.aux = nn.Conv1d(2, 4, 1), nn.Conv1d(4, 1, 1)
    ...     def forward(self, x):
    ...         h = self.body(x)  # (B, 4, L)
    ...         return (h, self.aux(h)) if self.training else h
    >>> net = Net().eval()
    >>> found = _train_only(net, trace_model(net), (torch.ones(1, 2, 3),))
    >>> found.modules, [n.name for n in found.reads], list(found.scopes)
    ({'aux': 'runs only in training mode'}, ['body'], [''])
    """
    out = _TrainOnly()
    leaves = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
    called = {c.path for c in traced.calls} | leaves

    def inside_leaf(path: str) -> bool:  # a leaf's (opaque module's) own submodules
        parts = path.split(".")
        return any(".".join(parts[:i]) in leaves for i in range(1, len(parts)))

    missing = {
        path
        for path, m in model.named_modules()
        if path
        and path not in called
        and not inside_leaf(path)
        and next(m.parameters(), None) is not None
    }
    if not missing:
        return out
    try:
        train = trace_model(model, traced.opaque, warn=False, inputs=len(inputs), training=True)
    except ValueError as e:  # the training-mode code cannot be traced: do the modules run?
        ran = _run_in_training(model, inputs, missing)
        if ran is not None and not ran:
            return out
        heads = _outermost(ran or missing)
        said = ", ".join(heads[:3]) + (", ..." if len(heads) > 3 else "")
        out.unknown = (
            f"the model {'runs' if ran else 'may run'} {said} only in training mode and torch.fx "
            f"cannot trace it in training mode ({e}): what they read is unknown, so nothing "
            "is gated"
        )
        for path in heads if ran else []:
            out.modules[path] = "runs only in training mode (code fx cannot trace calls it)"
        return out
    only = {c.path for c in train.calls if c.path in missing}
    outer = _outermost(only)
    for path in outer:
        out.modules[path] = "runs only in training mode"
        parts = path.split(".")
        for i in range(len(parts)):  # the modules whose code calls it (their forwards)
            out.scopes.setdefault(
                ".".join(parts[:i]),
                f"its code calls '{path}' only in training mode, which code rewritten from "
                "the eval-mode trace would drop",
            )
    # train-trace values the eval trace has too: what the same call of a module returned
    # (for modules called as often in both modes) and the inputs
    evals: dict[str, list[Any]] = {}
    for c in traced.calls:
        evals.setdefault(c.path, []).append(c)
    trains: dict[str, list[Any]] = {}
    for c in train.calls:
        trains.setdefault(c.path, []).append(c)
    to_eval: dict[fx.Node, fx.Node] = {}
    for path, cs in trains.items():
        if len(evals.get(path, [])) != len(cs):
            continue
        for tc, ec in zip(cs, evals[path], strict=True):
            t_out, e_out = tc.outputs(), ec.outputs()
            if len(t_out) == len(e_out):
                to_eval.update(zip(t_out, e_out, strict=True))
    t_in = [n for n in train.graph.nodes if n.op == "placeholder"]
    e_in = [n for n in traced.graph.nodes if n.op == "placeholder"]
    to_eval.update(zip(t_in, e_in, strict=False))
    for c in train.calls:
        if c.path not in only:
            continue
        head = next(p for p in outer if c.path == p or c.path.startswith(p + "."))
        why = f"read by {head}, which runs only in training mode"
        stack, seen = list(c.inputs()), set()
        while stack:  # back to the values the eval trace has
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in to_eval:
                out.reads.setdefault(to_eval[n], why)
            elif n.op != "get_attr":
                stack.extend(n.all_input_nodes)
    return out


def _outermost(paths: set[str]) -> list[str]:
    """The module paths of ``paths`` not inside another, sorted.

    >>> _outermost({"aux.conv", "aux", "head.fc"})
    ['aux', 'head.fc']
    """
    return sorted(p for p in paths if not any(p.startswith(q + ".") for q in paths))


def _run_in_training(
    model: nn.Module, inputs: tuple[Tensor, ...], paths: set[str]
) -> set[str] | None:
    """Which of modules ``paths`` one training-mode, no-grad forward of a copy of ``model``
    (its running statistics stay) calls; None if the copy or the forward fails."""
    try:
        twin = copy.deepcopy(model).train()
    except Exception:  # a model that cannot be copied: unknown
        return None
    ran: set[str] = set()
    handles = [
        twin.get_submodule(p).register_forward_pre_hook(lambda *_, p=p: ran.add(p))
        for p in sorted(paths)
    ]
    try:
        with torch.no_grad():
            twin(*inputs)
    except Exception:  # the training forward needs more (targets, say): unknown
        return None
    finally:
        for h in handles:
            h.remove()
    return ran


def _pin_groups(ca: ChannelAnalysis, atoms: np.ndarray | None, why: str) -> None:
    """Leave ungated, with reason ``why``, every channel group holding one of ``atoms`` that
    no earlier reason left ungated."""
    if atoms is None or not len(atoms):
        return
    for gi in np.unique(ca.atom_group[atoms]).tolist():
        if ca.groups[gi].pinned is None:
            ca.groups[gi].pinned = why


def _pin_unrewritable_sizes(
    ca: ChannelAnalysis, hooked: _HookedCalls, node_owner: Mapping[fx.Node, str]
) -> None:
    """Leave ungated the channels whose sizes pruning would rewrite in the code of a module
    that cannot be rewritten (called twice, say: tracing it alone gives other code:
    ``hooked.rewritable``), or in the code of a call of a module carrying hooks of the
    user's that could not stay a call of the module."""
    owners = {n.name: owner for n, owner in node_owner.items()}
    why: dict[str, str] = {}
    for name in ca.sizes:
        err = hooked.rewritable(owners[name])
        if err is not None:
            why[name] = err
            continue
        conflict = hooked.conflict([owners[name]], {name})
        if conflict is not None:
            why[name] = f"it is in the code of {conflict}"
    for name, entries in ca.sizes.items():
        if name in why:
            for _, atoms, _ in entries:
                _pin_groups(
                    ca, atoms, f"node '{name}' gives a pruned dimension a size, and {why[name]}"
                )


class _HookedCalls:
    """The calls of modules carrying hooks of the user's in ``gate_``'s trace, and what
    pruning must not do to them: remove a call, or change code that cannot stay a call of
    the module (see :func:`~gatedprune.gating.surgery.hooked_call_problem`); where pruning
    changes the code inside one, the module is rewritten on its own and must be traceable
    alone (``rewritable(path)``: None, or why not) and called once."""

    def __init__(
        self,
        model: nn.Module,
        traced: TracedModel,
        rewritable: Callable[[str], str | None],
    ) -> None:
        self.model = model
        self.rewritable = rewritable
        self.calls = [c for c in traced.calls if c.path in traced.hooked]
        self.count: dict[str, int] = {}
        for c in traced.calls:
            self.count[c.path] = self.count.get(c.path, 0) + 1
        self.names = [{n.name for n in c.nodes} for c in self.calls]
        self.outs = [{n.name for n in _call_outputs(c)} for c in self.calls]
        self.problems = [hooked_call_problem(c) for c in self.calls]

    def who(self, path: str) -> str:
        m = self.model.get_submodule(path)
        return f"{path} ({type(m).__name__}) {describe_hooks(m)}"

    def touching(self, names: set[str]) -> str | None:
        """Who carries hooks and has a call among nodes ``names`` (None: no one)."""
        for call, own in zip(self.calls, self.names, strict=True):
            if own & names:
                return f"{self.who(call.path)}, whose code the shortcut would change"
        return None

    def nodes(self) -> set[str]:
        """The names of every node of a hooked call."""
        return set().union(*self.names) if self.names else set()

    def conflict(
        self,
        scopes: Sequence[str],
        changed: set[str],
        erased: frozenset[str] | set[str] = frozenset(),
    ) -> str | None:
        """Why rewriting ``scopes`` to change the nodes ``changed`` (removing ``erased``)
        would lose or change a hooked call (None: it would not)."""
        for call, names, outs, problem in zip(
            self.calls, self.names, self.outs, self.problems, strict=True
        ):
            if outs & erased:
                return f"{self.who(call.path)}, whose call would go with the branch"
            touched = bool(names & changed)
            inlined = any(_inside(call.path, s) and call.path != s for s in scopes)
            if not (touched or inlined):
                continue
            if touched and is_leaf_call(call):
                return f"{self.who(call.path)}, whose call the rewrite would remove"
            if problem is not None:
                return (
                    f"{self.who(call.path)}, and {problem}: its call could not stay a call "
                    "of the module in rewritten code"
                )
            if touched and self.count.get(call.path, 0) > 1:
                return (
                    f"{self.who(call.path)}, called more than once, whose code the rewrite "
                    "would change"
                )
            why = self.rewritable(call.path) if touched else None
            if why is not None:
                return f"{self.who(call.path)}, whose code the rewrite would change: {why}"
        return None


def _hooked_inside(m: nn.Module, name: str) -> str | None:
    """``"<path> (<class>) carries a forward hook f"`` for the first module at or inside
    ``m`` (called ``name``) that carries hooks of the user's (a layer ``gate_`` prunes
    inside is rebuilt by ``prune``), or None."""
    for path, sub in m.named_modules():
        desc = describe_hooks(sub)
        if desc is not None:
            full = f"{name}.{path}" if path else name
            return f"{full} ({type(sub).__name__}) {desc}"
    return None


def _module_spaces(ca: ChannelAnalysis, path: str) -> list[np.ndarray | None]:
    """The channel atoms of module ``path``'s outputs and inputs (recurrent ones too)."""
    spaces = [ca.module_atoms.get(path), ca.module_in_atoms.get(path)]
    return [*spaces, ca.rnn_in_atoms.get(path), *ca.rnn_outputs.get(path, [])]


def _pin_hooked(hooked: _HookedCalls, traced: TracedModel, ca: ChannelAnalysis) -> None:
    """Leave ungated the channels a hook of the user's sees: the inputs and outputs of every
    call of a module carrying one (a forward hook sees both, a pre-hook the inputs, which
    may also change the weight), with the hook named as the reason."""
    for call in hooked.calls:
        why = hooked.who(call.path)
        for n in [*call.inputs(), *call.outputs()]:
            for lab in (ca.labels.get(n), ca.nonzero.get(n)):
                if lab is not None:
                    _pin_groups(ca, lab.atoms, why)
    for path in sorted(traced.hooked):
        for atoms in _module_spaces(ca, path):
            _pin_groups(ca, atoms, hooked.who(path))


def _hook_views(
    traced: TracedModel, ca: ChannelAnalysis, group_map: np.ndarray
) -> dict[str, list[int]]:
    """Per called module, the gated groups (indices of the gate vectors) its calls read or
    return: what a hook registered on it after ``gate_`` would see pruned."""
    views: dict[str, set[int]] = {}
    for call in traced.calls:
        for n in [*call.inputs(), *call.outputs()]:
            for lab in (ca.labels.get(n), ca.nonzero.get(n)):
                if lab is not None and len(lab.atoms):
                    gated = group_map[ca.atom_group[lab.atoms]]
                    views.setdefault(call.path, set()).update(gated[gated >= 0].tolist())
    return {p: sorted(v) for p, v in views.items() if v}


def _channel_scale(site: SiteInfo, groups: list[Tensor], t: Tensor) -> Tensor:
    """The gate values of ``site``'s channel segments along its dimension of ``t`` (1 for
    ungated channels), shaped to broadcast against ``t``."""
    if not site.segments:
        return t.new_ones(())
    vec = t.new_ones(site.n_channels)  # (C,)
    for g, pos, gidx in site.segments:
        vec = vec.index_copy(0, pos, groups[g][gidx].to(t.dtype))
    shape = [1] * t.dim()
    shape[site.dim] = site.n_channels
    return vec.view(shape)


def _kept_mask(opens: list[np.ndarray], groups: np.ndarray, gidx: np.ndarray) -> np.ndarray:
    """Per channel (gated group ``groups``, index ``gidx``; group -1: ungated): kept?"""
    mask = np.ones(len(groups), dtype=bool)
    for g in np.unique(groups).tolist():  # the groups present, not every group of the model
        if 0 <= g < len(opens):
            sel = groups == g
            mask[sel] = opens[g][gidx[sel]]
    return mask


class InsertedGating(ModelGating):
    """Gates inserted into a user model by :func:`gate_` (attached as ``model.gatedprune``).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> summary = gate_(net, torch.zeros(2, 4))
    >>> isinstance(net.gatedprune, InsertedGating), net.gatedprune.summary is summary
    (True, True)
    """

    def __init__(
        self,
        *,
        kind: HardConcrete | Sigmoid,
        group_sizes: list[int],
        clamp: list[bool],
        transformers: list[tuple[str, int, int, int, int]],
        attentions: list[tuple[str, int]],
        n_blocks: int,
        sites: dict[str, SiteInfo],
        slices: dict[str, SliceInfo],
        blocks: list[tuple[str, str, int]],  # (add node, branch node, branch position)
        info: GraphInfo,
        terms: CostTerms,
        input_shape: tuple[int, ...],
        batch_scalable: bool,
        opaque: dict[str, str],
        summary: GatingSummary,
        edges: list[Edge],
        edge_kind: HardConcrete | Sigmoid,
        rnns: list[RNNInfo] | None = None,
        rnn_consumers: list[RNNConsumer] | None = None,
        size_rewrites: list[SizeInfo] | None = None,
        param_sites: dict[str, ParamSite] | None = None,
        input_sites: dict[str, SiteInfo] | None = None,
        input_shapes: tuple[tuple[int, ...], ...] | None = None,
        input_examples: list[dict[str, Any]] | None = None,
        decoders: list[tuple[str, int, int, int, int, int, int]] | None = None,
    ) -> None:
        super().__init__()
        # decoder layers: name, then the groups of self-attention heads, cross-attention
        # heads, FFN units, and the self-attention, cross-attention and FFN sub-layer gates
        self.decoders = decoders if decoders is not None else []
        self.size_rewrites = size_rewrites if size_rewrites is not None else []
        self.param_sites = param_sites if param_sites is not None else {}
        self.input_sites = input_sites if input_sites is not None else {}
        self.rnns = rnns if rnns is not None else []
        self.rnn_consumers = rnn_consumers if rnn_consumers is not None else []
        self.edges = edges
        self.edge_gate: Gate | None = _closed_gate(edge_kind, len(edges)) if edges else None
        self.hooked: tuple[str, ...] = ()  # modules gate_ hooked (set by gate_)
        # the layers with weight_norm over their output channels at gate_, whose g and v
        # prune slices and scales (set by gate_; one added since is refused)
        self.weight_norms: tuple[str, ...] = ()
        # block sites that are activations (x + g * act(z)): prune keeps a fractional gate
        # value as a GateScale there instead of folding it (set by gate_)
        self.act_sites: tuple[str, ...] = ()
        # the user's hooks at gate_ (module -> hook keys; None: unknown, every hook is new to
        # prune) and the gated groups each module's calls see (both set by gate_)
        self.user_hook_keys: dict[str, list[int]] | None = None
        self.hook_views: dict[str, list[int]] = {}
        # the dense model's fingerprint, recorded in exported plans (set by gate_)
        self.source: dict[str, Any] | None = None
        # per module: the optional arguments its calls fix (graph.record_bindings; by gate_)
        self.bindings: dict[str, dict[str, Any]] = {}
        self.group_gates = nn.ModuleList([kind.make(n, init_open=True) for n in group_sizes])
        self.block_gates = nn.ModuleList([kind.make(1, init_open=True) for _ in range(n_blocks)])
        self.clamp = clamp
        self.transformers = transformers
        self.attentions = attentions
        self.sites = sites
        self.slices = slices
        self.block_nodes = blocks
        self.info = info
        self.terms = terms
        self.input_shape = input_shape  # the first input's
        # every positional input's, in order (gate_'s example_input)
        self.input_shapes = input_shapes if input_shapes is not None else (input_shape,)
        # their shapes and dtypes (graph.example_entries), which the model is traced with
        self.input_examples = input_examples
        self.batch_scalable = batch_scalable
        self.opaque = opaque
        self.summary = summary
        # what the sites of one forward share, for forwards with and without gradients
        self._states: dict[bool, _ForwardState] = {}
        # grad mode at the start of the root forward (None: outside one, read the current)
        self._forward_grad: bool | None = None
        # tokens of forwards with a graph (see track_backward)
        self._pending: list[weakref.ref[_BackwardToken]] = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_states"] = {}  # per-forward samples are not part of the state
        state["_pending"] = []
        return state

    # ------------------------------------------------------------------ forward
    def _group_list(self) -> list[Gate]:
        return [g for g in self.group_gates if isinstance(g, Gate)]

    def width_gates(self) -> list[Gate]:
        """Channel/unit groups, transformer FFN units and recurrent hidden units (not attention
        heads, not sub-layer, block or shortcut gates)."""
        not_widths = {gh for _, gh in self.attentions}
        for _, gh, _, ga, gf in self.transformers:
            not_widths |= {gh, ga, gf}
        for _, gh, gc, _, ga, gx, gf in self._decoder_list():
            not_widths |= {gh, gc, ga, gx, gf}
        return [g for i, g in enumerate(self._group_list()) if i not in not_widths]

    def _block_list(self) -> list[Gate]:
        return [g for g in self.block_gates if isinstance(g, Gate)]

    def check_hooks(self, model: nn.Module) -> None:
        """``TypeError`` naming a module of ``model`` that carries none of this gating's hooks
        although :func:`gate_` hooked it: it was replaced after gating, so the model would run
        (and be costed and pruned) as if its gates did not exist. Runs before every forward:
        the modules found last time are compared by identity (a few dict lookups each), and
        only a difference is looked into."""
        cached: tuple[nn.Module, ...] | None = self.__dict__.get("_hooked_modules")
        if cached is not None and len(cached) == len(self.hooked):
            for name, expected in zip(self.hooked, cached, strict=True):
                m: nn.Module | None = model
                for part in name.split("."):
                    m = m._modules.get(part) if m is not None else None
                if m is not expected:
                    break
            else:
                return
        found: list[nn.Module] = []
        for name in self.hooked:
            try:
                sub: nn.Module | None = model.get_submodule(name)
            except AttributeError:
                sub = None
            hooks = (
                []
                if sub is None
                else [*sub._forward_hooks.values(), *sub._forward_pre_hooks.values()]
            )
            if sub is None or not any(getattr(h, "gating", None) is self for h in hooks):
                now = (
                    "missing"
                    if sub is None
                    else f"now a {type(sub).__name__} without its gate hook"
                )
                raise TypeError(
                    f"module '{name}' was replaced after gate_ ({now}), so its gates would be "
                    "ignored; replace modules (e.g. nn.SyncBatchNorm.convert_sync_batchnorm) "
                    "before calling gate_"
                )
            found.append(sub)
        self.__dict__["_hooked_modules"] = tuple(found)

    def forward(self, x: Any) -> Any:
        """The identity: the gates act through hooks. A gated ``nn.Sequential`` calls its
        children in order, this one (attached last as ``model.gatedprune``) included.

        >>> import torch
        >>> from gatedprune.gating import gate_
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> _ = gate_(net, torch.zeros(2, 4))
        >>> net(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
        """
        return x

    def reset(self, grad_enabled: bool | None = None) -> None:
        """Forget this forward pass's gate samples. ``grad_enabled``: the grad mode the root
        forward starts in, in which the next samples are drawn wherever they are first read
        (inside a reentrant checkpointed segment, whose first forward runs without grad,
        samples drawn there without a graph would leave the gates without gradients)."""
        self._forward_grad = grad_enabled
        recomputed = _in_backward()
        self._all_states()[recomputed or self._sample_grad()] = _ForwardState(recomputed=recomputed)

    def _all_states(self) -> dict[bool, _ForwardState]:
        states: dict[bool, _ForwardState] | None = self.__dict__.get("_states")
        if states is None:  # a model pickled before 2026-12-07
            states = self.__dict__["_states"] = {}
            self.__dict__["_pending"] = []
        return states

    def forward_state(self) -> _ForwardState:
        """What the gated sites of the current forward share (gate samples, block outputs
        for the shortcuts): one for forwards with gradients, one for forwards without, so a
        forward under ``torch.no_grad()`` (a validation batch) between a training forward
        and its backward leaves what a gradient-checkpointed segment recomputes with alone.
        A recomputation (in backward) reads the training forward's, and is a
        ``RuntimeError`` if a forward before it with a graph still awaits its backward: it
        could be that one's segment, which drew other samples."""
        in_backward = _in_backward()
        grad = True if in_backward else self._sample_grad()
        states = self._all_states()
        state = states.get(grad)
        if state is None:
            state = states[grad] = _ForwardState()
        if in_backward and state.token is not None and not state.recomputed:
            self._check_recomputation(state.token)
        return state

    def track_backward(self, output: object) -> None:
        """Tie a token to the autograd graph of this forward's ``output`` (the root's), so a
        recomputation in backward can tell whether an earlier forward still awaits its
        backward (see :meth:`forward_state`)."""
        if torch.compiler.is_compiling():  # cannot trace grad_fn: no check under compile
            return
        state = self._all_states().get(True)
        if state is None or state.recomputed or not self._sample_grad() or _in_backward():
            return
        nodes = [t.grad_fn for t in _output_tensors(output) if t.grad_fn is not None]
        if not nodes:
            return
        token = state.token = _BackwardToken()
        for node in nodes:
            node.register_prehook(_MarkDone(token))
        pending = self.__dict__.setdefault("_pending", [])
        pending[:] = [r for r in pending if (t := r()) is not None and not t.done]
        pending.append(weakref.ref(token))

    def _check_recomputation(self, current: _BackwardToken) -> None:
        waiting = [
            t
            for ref in self._pending
            if (t := ref()) is not None and t is not current and not t.done
        ]
        if waiting:
            raise RuntimeError(
                "a gradient-checkpointed part of the gated model is recomputed in backward "
                f"while {len(waiting) + 1} forwards with gradients await their backward: the "
                "gates are sampled once per forward and a recomputation reads the latest "
                "forward's samples, which would be wrong for an earlier one. Run each "
                "training forward's backward before the next forward with gradients (or "
                "drop the earlier outputs), or do not checkpoint"
            )

    def _new_samples(self, state: _ForwardState, gates: list[Gate]) -> list[Tensor]:
        """This forward's samples of ``gates``, drawn with a graph if the root forward
        started with gradients (a graph several backward passes may traverse: reentrant
        checkpointing)."""
        with torch.set_grad_enabled(self._sample_grad() or state.recomputed):
            return replayable_gate_values(gates)

    def edge_input(self, name: str, x: Tensor) -> Tensor:
        """Input of block ``name`` plus the gated shortcuts arriving at it."""
        if self.edge_gate is None:
            return x
        state = self.forward_state()
        if state.edge_values is None:
            (state.edge_values,) = self._new_samples(state, [self.edge_gate])
        values = state.edge_values
        for k, e in enumerate(self.edges):
            if e.dst == name and e.src in state.edge_outputs:
                s = state.edge_outputs[e.src]
                if s._version != state.edge_versions.get(e.src, s._version):
                    raise RuntimeError(
                        f"the output of block '{e.src}' was modified in place before the "
                        f"shortcut {e.src} -> {e.dst} read it (an in-place op gate_'s example "
                        "run did not show): make the blocks return new tensors"
                    )
                if s.requires_grad and not torch.is_grad_enabled() and self._sample_grad():
                    raise RuntimeError(
                        f"the shortcut {e.src} -> {e.dst} is read where gradients are off "
                        "while its source carries them: inside torch.no_grad() in the model's "
                        "forward, or in the first pass of torch.utils.checkpoint(..., "
                        f"use_reentrant=True) around '{e.dst}', whose backward would run "
                        f"through the graph of '{e.src}' a second time. Use "
                        "use_reentrant=False, or gate_ without shortcuts"
                    )
                x = x + values[k].to(x.dtype) * s
        return x

    def _values(self) -> tuple[list[Tensor], list[Tensor]]:
        state = self.forward_state()
        if state.values is None:
            groups = self._new_samples(state, self._group_list())
            blocks = self._new_samples(state, self._block_list())
            state.values = (groups, blocks)
        return state.values

    def _sample_grad(self) -> bool:
        """Whether this forward's gate samples record a graph: the grad mode the root forward
        started in, not the one of the site that reads them first."""
        mode = getattr(self, "_forward_grad", None)  # absent in models pickled before
        return torch.is_grad_enabled() if mode is None else mode

    def transformer_values(self, index: int) -> dict[str, Tensor]:
        """Gate values of transformer layer ``index``: heads, units, attn, ffn."""
        groups, _ = self._values()
        _, gh, gu, ga, gf = self.transformers[index]
        return {"heads": groups[gh], "units": groups[gu], "attn": groups[ga], "ffn": groups[gf]}

    def _decoder_list(self) -> list[tuple[str, int, int, int, int, int, int]]:
        return list(getattr(self, "decoders", []))  # (absent in models pickled before)

    def decoder_values(self, index: int) -> dict[str, Tensor]:
        """Gate values of decoder layer ``index``: heads, cross_heads, units, attn, cross,
        ffn."""
        groups, _ = self._values()
        return self.decoder_values_of(groups, index)

    def decoder_values_of(self, groups: list[Tensor], index: int) -> dict[str, Tensor]:
        """Decoder layer ``index``'s entries of ``groups`` (one tensor per gate group)."""
        _, gh, gc, gu, ga, gx, gf = self._decoder_list()[index]
        keys = ("heads", "cross_heads", "units", "attn", "cross", "ffn")
        return {k: groups[g] for k, g in zip(keys, (gh, gc, gu, ga, gx, gf), strict=True)}

    def rnn_scales(self, index: int) -> list[Tensor]:
        """Gate values of recurrent module ``index``: one ``(D * H,)`` vector per layer."""
        groups, _ = self._values()
        r = self.rnns[index]
        d = r.directions
        return [
            torch.cat([groups[g] for g in r.groups[i * d : (i + 1) * d]]) for i in range(r.layers)
        ]

    def attention_values(self, index: int) -> dict[str, Tensor]:
        """Head gate values of attention module ``index``."""
        groups, _ = self._values()
        return {"heads": groups[self.attentions[index][1]]}

    def param_scale(self, key: str, dtype: torch.dtype) -> Tensor:
        """The gate values ``(n_out,)`` of the output units of the linear map written with
        the model's own parameters whose weight is ``key`` (1 for its ungated units): what
        :class:`ParamGate` multiplies its weight and bias by.

        >>> class Net(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.w1 = nn.Parameter(torch.randn(3, 8))
        ...         self.w2 = nn.Parameter(torch.randn(8, 2))
        ...     def forward(self, x: Tensor) -> Tensor:
        ...         return torch.relu(x @ self.w1) @ self.w2
        >>> net = Net().eval()
        >>> _ = gate_(net, torch.zeros(2, 3))
        >>> net.gatedprune.group_gates[0].force_(torch.arange(8) < 4)
        >>> net.gatedprune.param_scale("w1", torch.float32).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
        """
        site = self.param_sites[key]
        idx = sorted({g for g, _, _ in site.segments})
        block_idx: list[int] = getattr(site, "blocks", [])
        if self.training:  # this forward's samples, also for a recomputation in backward
            groups, blocks = self._values()
            values = {g: groups[g] for g in idx}
            block_values = [blocks[b] for b in block_idx]
        else:  # deterministic: read afresh, so gates changed since the last forward count
            gates = self._group_list()
            values = dict(zip(idx, gate_values([gates[g] for g in idx]), strict=True))
            block_gates = self._block_list()
            block_values = gate_values([block_gates[b] for b in block_idx])
        found = [*values.values(), *block_values]
        device = found[0].device if found else None
        vec = torch.ones(site.n_out, dtype=dtype, device=device)
        for g, pos, gidx in site.segments:
            vec = vec.index_copy(0, pos, values[g][gidx].to(dtype))  # (n_out,)
        for v in block_values:  # a residual block whose branch ends in this map
            vec = vec * v.to(dtype)[0]  # (n_out,)
        return vec

    def site_scale(self, name: str, output: Tensor) -> Tensor:
        """Multiplier for the output of site module ``name`` (broadcastable to ``output``)."""
        site = self.sites[name]
        groups, blocks = self._values()
        scale = _channel_scale(site, groups, output)
        for b in site.blocks:
            scale = scale * blocks[b].to(output.dtype)[0]
        return scale

    def input_scale(self, name: str, x: Tensor) -> Tensor:
        """Multiplier for the input ``x`` of Linear ``name`` (its input features that carry
        query heads of multi-query attention; broadcastable to ``x``)."""
        groups, _ = self._values()
        return _channel_scale(self.input_sites[name], groups, x)

    # ------------------------------------------------------------------ decisions
    def hard_open(self) -> list[Tensor]:
        """Exact open decisions per channel group (float 0/1); a group never closes entirely
        (a conv cannot have zero outputs): if all its gates are closed, its first entry is
        kept, with its gate value 0 folded into the weights. So does each sliced module: a
        conv whose channels are only a part of a group (one input of a ``cat``) keeps its
        first channel when all of them close. The states of a recurrent module are padded to
        their common kept width (closed units kept with gate value 0; see
        :mod:`gatedprune.gating.rnn`)."""
        out = []
        for g, clamp in zip(self.group_gates, self.clamp, strict=True):
            assert isinstance(g, Gate)
            o = g.is_open().to(torch.float64)  # (n,)
            if clamp and o.sum() == 0:
                o = o.clone()
                o[0] = 1.0
            out.append(o)
        for s in self.slices.values():
            for grp, gidx in ((s.out_group, s.out_gidx), (s.in_group, s.in_gidx)):
                if grp is None or gidx is None or not len(grp) or bool((grp < 0).any()):
                    continue  # ungated channels always stay
                if not all(self.clamp[int(k)] for k in np.unique(grp)):
                    continue
                if any(
                    bool((out[k][torch.as_tensor(gidx[grp == k], dtype=torch.long)] > 0).any())
                    for k in np.unique(grp).tolist()
                ):  # some channel of the slice is open
                    continue
                k, i = int(grp[0]), int(gidx[0])
                out[k] = out[k].clone()
                out[k][i] = 1.0  # kept with its gate value 0 folded into the weights
        return pad_to_width(out, self.rnns)

    def closed_blocks(self) -> list[int]:
        """Indices of residual blocks whose gate is exactly closed."""
        return [i for i, g in enumerate(self.block_gates) if not bool(g.is_open()[0])]  # type: ignore[operator]

    def _cut(self) -> dict[str, str]:
        return {self.block_nodes[i][0]: self.block_nodes[i][1] for i in self.closed_blocks()}

    # ------------------------------------------------------------------ cost
    def expected_cost(
        self, input_shape: Sequence[int] | Sequence[Sequence[int]], *, hard: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(flops, params)`` of the whole gated model (0-dim float64 tensors) for an input
        of ``input_shape`` (the gated shape, or another batch size of it; a model gated with
        several inputs takes one shape per input, all with the new batch size): expected
        under the gates' open probabilities, or with ``hard=True`` exactly
        ``cost(prune(model))``.

        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = gate_(net, torch.zeros(2, 4))
        >>> [float(c) for c in net.gatedprune.expected_cost((5, 4), hard=True)]
        [570.0, 58.0]
        """
        gated = self.input_shapes
        shapes = as_shapes(input_shape)
        if len(shapes) != len(gated):
            raise ValueError(
                f"this model was gated with {len(gated)} inputs of shapes {list(gated)}; "
                f"expected {len(gated)} shapes (one per input), got {list(shapes)}"
            )
        shape = shapes[0]
        t = self.terms
        ratio = 1.0
        if shapes != gated:
            same_rest = all(
                len(s) == len(g) and len(s) > 0 and s[1:] == g[1:] and s[0] == shape[0]
                for s, g in zip(shapes, gated, strict=True)
            )
            if not (same_rest and self.batch_scalable):
                was = (
                    f"an input of shape {gated[0]}"
                    if len(gated) == 1
                    else f"inputs of shapes {list(gated)}"
                )
                now = f"shape {shape}" if len(gated) == 1 else f"shapes {list(shapes)}"
                raise ValueError(
                    f"this model was gated with {was}; its cost for {now} is only derived for "
                    "other batch sizes (dim 0, the same for every input) of models whose every "
                    "call costs in proportion to the batch (no attention, Transformer, "
                    "recurrent or opaque modules, nothing computed across the batch): gate it "
                    "with that shape"
                )
            ratio = shape[0] / self.input_shape[0]
        if hard:
            flops_h, params_h, _ = self._hard_totals()
            flops = torch.tensor(flops_h, dtype=torch.float64)
            if ratio != 1.0:
                flops = flops / self.input_shape[0] * shape[0]
            return flops, torch.tensor(params_h, dtype=torch.float64)
        kept = t.kept(width_values(self._expected_open(), self.rnns))
        if len(self.block_gates):
            bp = torch.cat(gate_prob_open(self._block_list())).to(torch.float64)
            f_alive = torch.prod(1.0 - t.f_member * (1.0 - bp), dim=1)
            p_alive = torch.prod(1.0 - t.p_member * (1.0 - bp), dim=1)
        else:
            f_alive = torch.ones(len(t.f_nodes), dtype=torch.float64)
            p_alive = torch.ones(len(t.p_paths), dtype=torch.float64)
        flops = (t.f_coef * kept[t.f_a] * kept[t.f_b] * f_alive).sum()
        flops = flops + self._edge_flops(kept, False)
        if ratio != 1.0:
            flops = flops / self.input_shape[0] * shape[0]
        params = (t.p_coef * kept[t.p_a] * kept[t.p_b] * p_alive).sum()
        return flops, params

    @contextlib.contextmanager
    def same_decisions(self) -> Iterator[None]:
        """Within the block the gates' exact decisions are taken as unchanged, so the cache
        key of :meth:`_hard_totals` (every gate's ``is_open``) is built once, not once per
        question: a FLOPs + latency budget asks for the exact cost and the exact module calls
        at every step. Change no gate inside the block."""
        outer = self.__dict__.get("_held_key", False)
        if outer is False:
            self.__dict__["_held_key"] = None  # holding; the key is built on first use
        try:
            yield
        finally:
            if outer is False:
                self.__dict__["_held_key"] = False

    def _decision_key(self) -> bytes:
        """Every gate's exact decisions as bytes (built once per :meth:`same_decisions`)."""
        held = self.__dict__.get("_held_key", False)
        if isinstance(held, bytes):
            return held
        with torch.no_grad():
            gates = self.gates()
            decisions = torch.cat([g.is_open().reshape(-1) for g in gates]) if gates else None
        key = b"" if decisions is None else decisions.cpu().numpy().tobytes()
        if held is None:
            self.__dict__["_held_key"] = key
        return key

    def _hard_totals(self) -> tuple[float, float, float]:
        """FLOPs and parameters (for ``input_shape``) and module calls of ``prune(model)`` at
        the exact decisions, cached by the decisions: a budget with straight-through gradients
        asks at every step, and they change only when a gate flips."""
        key = self._decision_key()
        cache: dict[bytes, tuple[float, float, float]] = self.__dict__.setdefault(
            "_hard_totals_cache", {}
        )
        hit = cache.get(key)
        if hit is None:
            t = self.terms
            kept = t.kept(self.hard_open())
            scopes, erase_list, bypass = self._scopes()
            erase = set(erase_list) | set(bypass)
            f_alive = torch.tensor(
                [0.0 if n in erase else 1.0 for n in t.f_nodes], dtype=torch.float64
            )
            p_alive = torch.tensor(
                [
                    1.0
                    if not any(s == "" or p == s or p.startswith(s + ".") for s in scopes)
                    or any(r not in erase for r in refs)
                    else 0.0
                    for p, refs in zip(t.p_paths, t.p_refs, strict=True)
                ],
                dtype=torch.float64,
            )
            flops = (t.f_coef * kept[t.f_a] * kept[t.f_b] * f_alive).sum()
            flops = flops + self._edge_flops(kept, True)
            params = (t.p_coef * kept[t.p_a] * kept[t.p_b] * p_alive).sum()
            calls = sum(1 for n in dict.fromkeys(t.f_nodes) if n not in erase)
            hit = (float(flops), float(params), float(calls + len(self.kept_edges())))
            if len(cache) >= 256:  # bounded: gates flip back and forth in training
                cache.clear()
            cache[key] = hit
        return hit

    def expected_ops(self, *, hard: bool = False) -> Tensor:
        """Module calls of ``prune(model)``'s forward (a float64 scalar): every call of the
        traced graph counts once, times the probability that no closed residual block removes
        it, plus one per kept new shortcut (its add). With ``hard``, exactly the calls of
        ``prune(model)`` (a ReLU of a non-negative input that a closed block leaves is
        dropped too, which the expectation does not model).
        A latency feature (:class:`~gatedprune.GatedLatencyModel`): eager PyTorch spends
        about as long dispatching a small operator as a big one computes.

        >>> import torch
        >>> from gatedprune.gating import ResNet1d, gate_
        >>> net = ResNet1d(widths=(4,), blocks=(2,))
        >>> _ = gate_(net, torch.zeros(1, 1, 8))
        >>> float(net.gatedprune.expected_ops(hard=True))
        17.0
        >>> net.gatedprune.block_gates[0].force_(torch.zeros(1, dtype=torch.bool))
        >>> float(net.gatedprune.expected_ops(hard=True))  # its 5 calls and the ReLU after
        11.0
        """
        if hard:  # the calls prune keeps: not erased with a closed block, not bypassed
            return torch.tensor(self._hard_totals()[2], dtype=torch.float64)
        member = self._op_member()  # (O, B)
        blocks = self._block_list()
        bp: Tensor | None = None
        if blocks:
            bp = torch.cat(gate_prob_open(blocks)).to(torch.float64)  # (B,)
            ops = torch.prod(1.0 - member * (1.0 - bp), dim=1).sum()
        else:
            ops = torch.tensor(float(member.shape[0]), dtype=torch.float64)
        if self.edge_gate is not None and len(self.edges):
            alive = gate_prob_open([self.edge_gate])[0].to(torch.float64)  # (E,)
            if bp is not None:
                alive = alive * torch.prod(1.0 - self.terms.e_member * (1.0 - bp), dim=1)
            ops = ops + alive.sum()
        return ops

    def _op_member(self) -> Tensor:
        """Block membership ``(O, B)`` of every module call of the traced graph, built once."""
        cached: Tensor | None = self.__dict__.get("_op_member_cache")
        if cached is None:
            first: dict[str, int] = {}
            for i, name in enumerate(self.terms.f_nodes):
                first.setdefault(name, i)
            rows = torch.tensor(list(first.values()), dtype=torch.long)  # (O,)
            cached = self.terms.f_member[rows]  # (O, B)
            self.__dict__["_op_member_cache"] = cached
        return cached

    def _expected_open(self) -> list[Tensor]:
        """P(kept) per channel of every group, the expectation of :meth:`hard_open`'s group
        decisions: a group that never closes entirely keeps its first channel when all its
        gates are closed, so that channel's probability gains P(all closed) (a disjoint
        event). The keep-one rule for convolutions fed by part of a group is not modelled."""
        probs = gate_prob_open(self._group_list())
        if not probs:
            return []
        sizes = [int(p.numel()) for p in probs]
        flat = torch.cat(probs).to(torch.float64)  # (C,) every group's channels
        seg, first, clamped = self._open_index(sizes, flat.device)
        if not len(clamped):
            return list(torch.split(flat, sizes))
        # P(all closed) per group, as a segment sum of logs (p kept below 1)
        log_closed = torch.log1p(-flat.clamp(max=1.0 - 1e-12))  # (C,)
        all_closed = torch.exp(flat.new_zeros(len(sizes)).index_add(0, seg, log_closed))  # (G,)
        flat = flat.index_add(0, first, all_closed[clamped])  # (C,)
        return list(torch.split(flat, sizes))

    def _open_index(self, sizes: list[int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(group of every channel, first channel of every clamped group, the clamped
        groups) for :meth:`_expected_open`, built once per device."""
        cached: tuple[object, tuple[Tensor, Tensor, Tensor]] | None = self.__dict__.get(
            "_open_index_cache"
        )
        if cached is not None and cached[0] == (tuple(sizes), device):
            return cached[1]
        groups = torch.arange(len(sizes), device=device)
        seg = torch.repeat_interleave(groups, torch.tensor(sizes, device=device))  # (C,)
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        keep = [g for g, (c, n) in enumerate(zip(self.clamp, sizes, strict=True)) if c and n]
        first = torch.tensor([starts[g] for g in keep], dtype=torch.long, device=device)
        index = (seg, first, torch.tensor(keep, dtype=torch.long, device=device))
        self.__dict__["_open_index_cache"] = ((tuple(sizes), device), index)
        return index

    def _edge_flops(self, kept_channels: Tensor, hard: bool) -> Tensor:
        """FLOPs of the new shortcuts: 2 per element of each kept one (its ``ScaledAdd``);
        ``kept_channels`` are the factors of :meth:`CostTerms.kept`."""
        t = self.terms
        if self.edge_gate is None or not len(t.e_coef):
            return torch.zeros((), dtype=torch.float64)
        if hard:
            kept = {id(e) for e in self.kept_edges()}
            alive = torch.tensor(
                [1.0 if id(e) in kept else 0.0 for e in self.edges], dtype=torch.float64
            )
        else:
            alive = gate_prob_open([self.edge_gate])[0].to(torch.float64)  # (E,)
            if len(self.block_gates):
                bp = torch.cat(gate_prob_open(self._block_list())).to(torch.float64)  # (B,)
                alive = alive * torch.prod(1.0 - t.e_member * (1.0 - bp), dim=1)
        return (t.e_coef * kept_channels[t.e_a] * alive).sum()

    # ------------------------------------------------------------------ pruning
    def _size_plan(self, opens: list[np.ndarray] | None = None) -> dict[str, list[list[Any]]]:
        """The sizes the pruned code must give pruned dimensions (attention heads): graph node
        -> ``[key, size]`` pairs, for the nodes whose sizes change."""
        if not self.size_rewrites:
            return {}
        if opens is None:
            opens = [o.bool().numpy() for o in self.hard_open()]
        sizes: dict[str, list[list[Any]]] = {}
        changed: set[str] = set()
        for si in self.size_rewrites:
            kept = _kept_mask(opens, si.group, si.gidx)
            if not kept.all():
                changed.add(si.node)
            sizes.setdefault(si.node, []).append([si.key, int(kept.sum()) * si.factor])
        # a node with one size changed gets all of its own (a chunk pruned apart becomes a
        # split into every section); nodes without a change none
        return {node: entries for node, entries in sizes.items() if node in changed}

    def plan(self) -> dict[str, Any]:
        """The pruning decisions as a JSON-serialisable plan (see :func:`apply_plan`)."""
        opens = [o.bool().numpy() for o in self.hard_open()]

        def keep(groups: np.ndarray | None, gidx: np.ndarray | None) -> list[int] | None:
            if groups is None or gidx is None:
                return None
            mask = _kept_mask(opens, groups, gidx)
            return None if mask.all() else np.flatnonzero(mask).tolist()

        slices = {}
        for name, s in self.slices.items():
            k_in, k_out = keep(s.in_group, s.in_gidx), keep(s.out_group, s.out_gidx)
            if k_in is not None or k_out is not None:
                slices[name] = {
                    "kind": s.kind,
                    "in": k_in,
                    "out": k_out,
                    "n_in": None if s.in_group is None else len(s.in_group),
                    "n_out": None if s.out_group is None else len(s.out_group),
                }
                if s.dim is not None:  # a per-head score term: the dimension of its heads
                    slices[name]["dim"] = s.dim
        scopes, erase, bypass = self._scopes()
        gone = set(erase)  # a closed block inside a closed block: its add is erased, not cut
        cut = {
            self.block_nodes[i][0]: self.block_nodes[i][2]
            for i in self.closed_blocks()
            if self.block_nodes[i][0] not in gone
        }
        edges = [
            {
                "scope": next(s for s in scopes if s == "" or (e.scope + ".").startswith(s + ".")),
                "src": e.src_node,
                "dst": e.dst_node,
                "users": list(e.users),
                "buffer": e.buffer,
            }
            for e in self.kept_edges()
        ]
        transformers = {}
        for name, gh, gu, ga, gf in self.transformers:
            spec = {
                "heads": np.flatnonzero(opens[gh]).tolist(),
                "units": np.flatnonzero(opens[gu]).tolist(),
                "attn": bool(opens[ga][0]),
                "ffn": bool(opens[gf][0]),
            }
            if not (opens[gh].all() and opens[gu].all() and spec["attn"] and spec["ffn"]):
                transformers[name] = spec
        decoders = {}
        for name, gh, gc, gu, ga, gx, gf in self._decoder_list():
            dspec = {
                "heads": np.flatnonzero(opens[gh]).tolist(),
                "cross_heads": np.flatnonzero(opens[gc]).tolist(),
                "units": np.flatnonzero(opens[gu]).tolist(),
                "attn": bool(opens[ga][0]),
                "cross": bool(opens[gx][0]),
                "ffn": bool(opens[gf][0]),
            }
            if not all(opens[g].all() for g in (gh, gc, gu, ga, gx, gf)):
                decoders[name] = dspec
        attention = {
            name: {"heads": np.flatnonzero(opens[gh]).tolist()}
            for name, gh in self.attentions
            if not opens[gh].all()
        }
        return {
            "format": PLAN_FORMAT,
            "opaque": dict(self.opaque),
            "transformers": transformers,
            **({"decoders": decoders} if decoders else {}),
            "attention": attention,
            "rnn": rnn_plan(opens, self.rnns, self.rnn_consumers),
            "slices": slices,
            "cut": cut,
            "scopes": scopes,
            "erase": erase,
            "bypass": bypass,
            "edges": edges,
            "sizes": self._size_plan(opens),
            "bound": {s: self.bindings.get(s, {}) for s in scopes if s},
            # the positional inputs gate_ was given (the root is traced with them), if several
            **({"inputs": len(self.input_shapes)} if len(self.input_shapes) > 1 else {}),
            # the example inputs' shapes and dtypes, which the model is traced with (absent
            # in gatings made before 2026-12-08)
            **({"examples": ex} if (ex := getattr(self, "input_examples", None)) else {}),
            **({"scaled": scaled} if (scaled := list(self._act_scales(erase))) else {}),
        }

    def _act_scales(self, erase: list[str] | None = None) -> dict[str, Tensor]:
        """The activation sites (``x + g * act(z)``) whose calls the pruned model keeps with a
        block gate value other than 1: site name -> that value (0-dim, the product of its
        blocks' eval values, as :meth:`site_scale` multiplies them). ``erase``: the graph
        nodes pruning erases (from :meth:`_scopes`)."""
        gone = set(self._scopes()[1] if erase is None else erase)
        closed = set(self.closed_blocks())
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for name in getattr(self, "act_sites", ()):  # (absent in models pickled before)
                blocks = self.sites[name].blocks
                if any(i in closed or self.block_nodes[i][0] in gone for i in blocks):
                    continue  # the branch goes, and the activation with it
                values = [self.block_gates[i].eval_value()[0] for i in blocks]  # type: ignore[operator]
                value = values[0].new_ones(())
                for v in values:
                    value = value * v
                if bool(value != 1):
                    out[name] = value
        return out

    def open_edges(self) -> list[Edge]:
        """The new shortcuts whose gate is open."""
        if self.edge_gate is None:
            return []
        opened = self.edge_gate.is_open()
        return [e for e, o in zip(self.edges, opened.tolist(), strict=True) if o]

    def kept_edges(self) -> list[Edge]:
        """The open shortcuts that the pruned model computes: some node of the destination
        that reads the input is still live once the closed blocks are removed (an open
        shortcut into a removed block's input still flows on through its identity path)."""
        opened = self.open_edges()
        if not opened:
            return []
        live = self.info.live(self._cut(), [(e.src_node, e.dst_node, e.users) for e in opened])
        return [e for e in opened if any(u in live for u in e.users)]

    def _scopes(self) -> tuple[list[str], list[str], list[str]]:
        kept = self.kept_edges()
        edges = [(e.src_node, e.dst_node, list(e.users)) for e in kept]
        scopes, erase, bypass = self.info.scopes(self._cut(), edges)
        resized = [self.info.owners[n] for n in self._size_plan()]  # code with new sizes
        return outermost([*scopes, *(e.scope for e in kept), *resized]), erase, bypass

    def _check_new_hooks(self, model: nn.Module) -> None:
        """``ValueError`` for a hook of the user's that ``gate_`` did not see (registered
        since) on a module whose inputs or outputs the gates change: a gate site, a layer
        pruned inside, the end of a new shortcut, or a module whose calls see channels that
        ``prune`` removes. The gated model gives such a hook other tensors than the pruned
        one would. Also for a hook registered for every module."""
        everywhere = global_hooks()
        if everywhere:
            kind, hook = everywhere[0]
            raise ValueError(
                f"a {kind} {hook_name(hook)} is registered for every module: it sees what the "
                "gates change in the gated model and what prune removes in the pruned one; "
                "remove it (its handle's .remove()) while gating and pruning"
            )
        known = getattr(self, "user_hook_keys", None)
        views: dict[str, list[int]] = getattr(self, "hook_views", {})
        opens = self.hard_open()
        closed = {g for g, o in enumerate(opens) if not bool(o.all())}
        rebuilt = [name for name, *_ in self.transformers] + [name for name, _ in self.attentions]
        rebuilt += [d[0] for d in self._decoder_list()]
        rebuilt += [r.name for r in self.rnns]
        owners = {
            path.rpartition(".")[0]
            for site in getattr(self, "param_sites", {}).values()
            for path in (site.weight, site.bias)
            if path is not None
        }
        ends = {e.src for e in self.edges} | {e.dst for e in self.edges}
        for name, m in model.named_modules():
            keys = hook_keys(m)
            if not keys or isinstance(m, InsertedGating):
                continue
            if known is not None and set(keys) <= set(known.get(name, [])):
                continue  # gate_ saw them: it kept what they see whole
            why = None
            if name in self.sites:
                why = "gate_ multiplies its output by gates"
            elif name in getattr(self, "input_sites", {}):
                why = "gate_ multiplies its input by gates"
            elif name in owners:
                why = "gate_ scales its parameters by gates"
            elif name in ends:
                why = "a new shortcut starts or ends there"
            elif any(_inside(name, r) for r in rebuilt):
                why = "gate_ gates the heads or units of the layer it belongs to"
            elif closed & set(views.get(name, [])):
                why = "its calls read or return channels prune removes"
            if why is not None:
                raise ValueError(
                    f"module '{name}' ({type(m).__name__}) {describe_hooks(m)}, added after "
                    f"gate_, and {why}: the hook would see other tensors in the pruned model "
                    "than in the gated one; remove it before prune (its handle's .remove()) "
                    "and register it on the pruned model, or register it before gate_, which "
                    "then keeps what it sees whole"
                )

    def prune_model(self, model: nn.Module) -> nn.Module:
        """The pruned copy of ``model`` (see :meth:`ModelGating.prune_model`): gate values
        folded into the modules they scale, closed channels, heads, units and blocks removed
        by :func:`apply_plan` of :meth:`plan`, kept new shortcuts written into the code."""
        self.check_hooks(model)  # a module replaced after gate_: its gates would be ignored
        plan = self.plan()
        self._refuse_computed(model, plan)
        self._check_new_hooks(model)
        with torch.no_grad():
            groups = [g.eval_value() for g in self.group_gates]  # type: ignore[operator]
            blocks = [g.eval_value() for g in self.block_gates]  # type: ignore[operator]
        # the pruned model calls the user's hooks themselves, not copies (a hook object
        # collecting features keeps collecting them where the user reads them)
        memo: dict[int, Any] = {id(h): h for m in model.modules() for _, h in user_hooks(m)}
        # a weight the old nn.utils.weight_norm / spectral_norm hook computed with autograd on
        # (any training step) is not a leaf, which torch's deep copy refuses: a detached copy
        memo.update(computed_weight_memo(model))
        # the copy drops its gating: it shares this one, uncopied, and lets go of it at once
        memo[id(self)] = self
        pruned = copy.deepcopy(model, memo)
        _drop_module(pruned, self)
        strip_gating(pruned)
        acts = set(getattr(self, "act_sites", ()))
        for name, site in self.sites.items():
            if name in acts:  # an activation: its gate value stays a GateScale (plan "scaled")
                continue
            scale = torch.ones(site.n_channels, dtype=torch.float64) if site.segments else None
            if scale is not None:
                for g, pos, gidx in site.segments:
                    scale[pos] = groups[g][gidx].to(torch.float64)
            b = torch.ones((), dtype=torch.float64)
            for i in site.blocks:
                b = b * blocks[i][0].to(torch.float64)
            fold_scale(pruned.get_submodule(name), b if scale is None else scale * b)
        for site in getattr(self, "param_sites", {}).values():  # linear maps of parameters
            scale = torch.ones(site.n_out, dtype=torch.float64)  # (n_out,)
            for g, pos, gidx in site.segments:
                scale[pos] = groups[g][gidx].to(torch.float64)
            for i in getattr(site, "blocks", []):  # a block whose branch ends in the map
                scale = scale * blocks[i][0].to(torch.float64)
            fold_param_scale(pruned, site.weight, site.out_dim, scale)
            if site.bias is not None:
                fold_param_scale(pruned, site.bias, 0, scale)
        for name, site in getattr(self, "input_sites", {}).items():
            scale = torch.ones(site.n_channels, dtype=torch.float64)
            for g, pos, gidx in site.segments:
                scale[pos] = groups[g][gidx].to(torch.float64)
            fold_input_scale(pruned.get_submodule(name), scale)
        for name, gh, gu, ga, gf in self.transformers:
            layer = pruned.get_submodule(name)
            assert isinstance(layer, nn.TransformerEncoderLayer)
            values = {
                "heads": groups[gh],
                "units": groups[gu],
                "attn": groups[ga],
                "ffn": groups[gf],
            }
            fold_layer(layer, values)
        for i, (name, *_) in enumerate(self._decoder_list()):
            dec = pruned.get_submodule(name)
            assert isinstance(dec, nn.TransformerDecoderLayer)
            fold_decoder_layer(dec, self.decoder_values_of(groups, i))
        for name, gh in self.attentions:
            att = pruned.get_submodule(name)
            assert isinstance(att, nn.MultiheadAttention)
            fold_heads(att, groups[gh])
        fold_rnns(pruned, self.rnns, self.rnn_consumers, groups)
        result = _apply_plan(pruned, plan, check_graph=False)  # its own plan: consistent
        act_scales = self._act_scales(plan["erase"])
        for name in plan.get("scaled", []):
            scaled = result.get_submodule(scaled_path(name, plan["scaled"]))
            assert isinstance(scaled, GateScale)
            scaled.scale = act_scales[name].detach().clone()  # the gated model's value
        if self.edge_gate is not None:
            with torch.no_grad():
                ev = self.edge_gate.eval_value()
                values = {e.buffer: ev[k] for k, e in enumerate(self.edges)}
                for e in plan["edges"]:
                    owner = result if e["scope"] == "" else result.get_submodule(e["scope"])
                    shortcut = owner.get_submodule(e["buffer"])
                    assert isinstance(shortcut, ScaledAdd)
                    shortcut.scale.fill_(float(values[e["buffer"]]))
        return result

    def _refuse_computed(self, model: nn.Module, plan: dict[str, Any]) -> None:
        """``ValueError`` naming a module that pruning ``model`` folds gates into or slices
        although it computes the tensors concerned when it runs: a parametrization added
        after ``gate_`` (``weight_norm``, a LoRA-style one, or one on a parameter ``gate_``
        parametrized itself), which the folds and slices would miss."""
        whole = [
            *self.sites,
            *getattr(self, "input_sites", {}),
            *(n for n, spec in plan["slices"].items() if spec["kind"] not in _PARAM_KINDS),
            *plan.get("rnn", {}),
            *(r.name for r in self.rnns),
            *(c.name for c in self.rnn_consumers if c.segments),
        ]
        inside = [*(t[0] for t in self.transformers), *(name for name, _ in self.attentions)]
        inside += [d[0] for d in self._decoder_list()]
        normed = set(getattr(self, "weight_norms", ()))  # (absent in models pickled before)
        for name in [*whole, *inside]:
            m = model.get_submodule(name)
            for sub_name, sub in m.named_modules(prefix=name) if name in inside else [(name, m)]:
                wn = sub_name in normed and name not in inside  # slice_module / folds: g, v
                refuse_computed(sub_name, sub, own=(ParamGate,), weight_norm=wn)
        params = [
            *(n for n, spec in plan["slices"].items() if spec["kind"] in _PARAM_KINDS),
            *(
                p
                for site in getattr(self, "param_sites", {}).values()
                for p in (site.weight, site.bias)
                if p is not None
            ),
        ]
        for path in params:
            owner_path, _, attr = path.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            refuse_computed(owner_path or "<root>", owner, [attr], own=(ParamGate,))


def _remove_param_gates(m: nn.Module) -> None:
    """Remove the :class:`ParamGate` parametrizations of module ``m`` (in place), leaving the
    stored tensors. A deep copy of a parametrized module shares its class, whose properties
    ``remove_parametrizations`` deletes: ``m`` first gets a class of its own."""
    if not parametrize.is_parametrized(m):
        return
    params = cast(nn.ModuleDict, m.parametrizations)
    ours = [
        attr
        for attr in params
        if any(isinstance(p, ParamGate) for p in cast(nn.ModuleList, params[attr]))
    ]
    if not ours:
        return
    cls = type(m)
    own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    m.__class__ = type(cls.__name__, cls.__bases__, own)
    for attr in ours:
        parametrize.remove_parametrizations(m, attr, leave_parametrized=False)


def _drop_module(model: nn.Module, target: nn.Module) -> None:
    """Remove every reference to submodule ``target`` from ``model`` and its other submodules
    (in place; ``target`` itself is left as it is)."""
    for m in list(model.modules()):
        if m is target:
            continue
        for name in [k for k, child in m._modules.items() if child is target]:
            del m._modules[name]


def strip_gating(model: nn.Module) -> None:
    """Remove the gating submodule and its hooks from ``model`` (in place)."""
    for m in model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks):
            for k in [k for k, h in d.items() if isinstance(h, _GATE_HOOKS)]:
                del d[k]
                m._forward_hooks_with_kwargs.pop(k, None)
                m._forward_hooks_always_called.pop(k, None)
                m._forward_pre_hooks_with_kwargs.pop(k, None)
    for m in list(model.modules()):
        _remove_param_gates(m)
    for m in model.modules():
        ref = m.__dict__.pop("_gp_ref", None)
        if isinstance(ref, _Ref):
            m.__class__ = ref.base
    for name, m in list(model.named_modules()):
        if isinstance(m, InsertedGating):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            delattr(parent, child)


def export_plan(model: nn.Module) -> dict[str, Any]:
    """The pruning decisions of a gated model as JSON-serialisable data.

    ``apply_plan(fresh_dense_model, plan)`` rebuilds the pruned architecture, and then
    ``load_state_dict(prune(model).state_dict())`` restores the weights, without pickle.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> _ = gate_(net, torch.zeros(2, 4))
    >>> export_plan(net)["slices"]
    {}
    """
    gating = find_model_gating(model)
    if not isinstance(gating, InsertedGating):
        raise ValueError(f"{type(model).__name__} was not gated with gatedprune.gate_")
    gating.check_hooks(model)  # a module replaced after gate_: the plan would not describe it
    plan = gating.plan()
    for name, entry in plan["rnn"].items():  # apply_plan checks the kind of recurrent module
        entry["mode"] = str(cast(nn.RNNBase, model.get_submodule(name)).mode)
    if gating.source is not None:  # apply_plan refuses another model
        plan["model"] = gating.source
    plan["checksum"] = json_checksum(plan)  # and a plan edited since
    return plan


def _segments(
    atoms: np.ndarray, group_map: np.ndarray, atom_group: np.ndarray, atom_gidx: np.ndarray
) -> list[tuple[int, Tensor, Tensor]]:
    gg = group_map[atom_group[atoms]]
    segs = []
    for g in sorted(set(gg.tolist()) - {-1}):
        pos = np.flatnonzero(gg == g)
        segs.append(
            (
                int(g),
                torch.tensor(pos, dtype=torch.long),
                torch.tensor(atom_gidx[atoms][pos], dtype=torch.long),
            )
        )
    return segs


def _closed(kind: HardConcrete | Sigmoid) -> HardConcrete | Sigmoid:
    """The gate kind with a closed start (hard concrete: exactly 0 in eval)."""
    if isinstance(kind, HardConcrete):
        return dataclasses.replace(kind, init_log_alpha=-3.0)
    return dataclasses.replace(kind, init_theta=-3.0)


def _closed_gate(kind: HardConcrete | Sigmoid, n: int) -> Gate:
    """``n`` new-shortcut gates of a :func:`_closed` kind, exactly 0 until training opens them
    (sigmoid gates: rescaled relative to their start, ``SigmoidGate(start="closed")``)."""
    if isinstance(kind, Sigmoid):
        return SigmoidGate(
            n, init_theta=kind.init_theta, temperature=kind.temperature, start="closed"
        )
    return kind.make(n)


def _arg_name(node: Any, pos: int) -> str:
    return str(node.args[pos].name)


def _gated_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the outermost submodules of ``model`` ('' for ``model`` itself) that
    are gatedprune gated modules or gates.

    >>> from gatedprune.gates import HardConcreteGate
    >>> [n for n, _ in _gated_parts(nn.Sequential(nn.Linear(2, 2), HardConcreteGate(2)))]
    ['1']
    """
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        inside = any(p == "" or name.startswith(p + ".") for p, _ in found)
        if not inside and isinstance(m, GatedModule | Gate):
            found.append((name, m))
    return found


def _shared_modules(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """The called modules that hold a parameter or buffer another module also holds, or that
    the forward also reads directly (tied weights, ``F.linear(h, self.fc.weight)``), each with
    the reason. Pruning slices and scales a module's tensors in place, which would change the
    other reader too, so gate_ leaves what touches them ungated.

    >>> a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    >>> b.weight = a.weight
    >>> net = nn.Sequential(a, nn.ReLU(), b)
    >>> _shared_modules(net, fx.symbolic_trace(net))["0"]
    'its weight is also 2.weight (a shared tensor)'
    """
    holders: dict[int, list[str]] = {}
    for mname, m in model.named_modules():  # one module under two names holds nothing twice
        for tname, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None:
                holders.setdefault(id(t), []).append(f"{mname}.{tname}" if mname else tname)
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            attr: object = None
            with contextlib.suppress(AttributeError):
                attr = gm.get_parameter(str(n.target))
            if attr is None:
                with contextlib.suppress(AttributeError):
                    attr = gm.get_buffer(str(n.target))
            if isinstance(attr, Tensor):
                holders.setdefault(id(attr), []).append(f"read directly by node '{n.name}'")
    shared: dict[str, str] = {}
    for n in gm.graph.nodes:
        name = str(n.target)
        if n.op != "call_module" or name in shared:
            continue
        m = gm.get_submodule(name)
        for tname, t in [*m.named_parameters(), *m.named_buffers()]:
            mine = f"{name}.{tname}" if name else tname
            inside = name + "."  # a tensor tied within the module is sliced as one
            others = [h for h in holders.get(id(t), []) if h != mine and not h.startswith(inside)]
            if others:
                where = others[0] if others[0].startswith("read") else f"also {others[0]}"
                shared[name] = f"its {tname} is {where} (a shared tensor)"
                break
    return shared


# torch modules whose parameters a linear map written with them may slice in place
_PARAM_OWNERS = (nn.Linear, nn.ParameterList, nn.ParameterDict)


def _param_conflicts(
    model: nn.Module,
    gm: fx.GraphModule,
    linears: list[ParamLinear],
    scales: Sequence[ParamScale] = (),
) -> dict[str, str]:
    """Why the weight or bias of each linear map in ``linears`` (or the parameter of each
    per-channel factor in ``scales``) cannot be sliced in place, by its weight's (the
    parameter's) name (absent: it can): the tensor is also held under another name (tied),
    held by a module the model calls, or held by a torch layer other than ``nn.Linear`` (whose
    settings would no longer fit).

    >>> net = nn.Sequential(nn.Linear(2, 3))
    >>> _param_conflicts(net, fx.symbolic_trace(net), [ParamLinear("lin", "0.weight", 1, 2, 3)])
    {'0.weight': "parameter '0.weight' is also used by module '0'"}
    """
    items: list[tuple[str, tuple[str | None, ...]]] = [
        *((pl.weight, (pl.weight, pl.bias)) for pl in linears),
        *((ps.path, (ps.path,)) for ps in scales),
    ]
    if not items:
        return {}
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    called: dict[int, str] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            for p in model.get_submodule(str(n.target)).parameters():
                called.setdefault(id(p), str(n.target))
    found: dict[str, str] = {}
    for key, paths in items:
        for path in paths:
            if path is None or key in found:
                continue
            p = model.get_parameter(path)
            others = [name for name in names.get(id(p), []) if name != path]
            owner_path = path.rpartition(".")[0]
            owner = model.get_submodule(owner_path) if owner_path else model
            # a bare nn.Module holds parameters only (fx makes one for `self.attn.weight` read
            # in code prune rewrote); a module prune rewrote is your code (costs.is_code)
            bare = type(owner) is nn.Module or is_code(owner)
            torch_layer = type(owner).__module__.split(".")[0] == "torch" and not bare
            if others:
                found[key] = f"parameter '{path}' is also '{others[0]}' (a shared tensor)"
            elif id(p) in called:
                found[key] = f"parameter '{path}' is also used by module '{called[id(p)]}'"
            elif torch_layer and not isinstance(owner, _PARAM_OWNERS):
                found[key] = (
                    f"parameter '{path}' belongs to {type(owner).__name__} '{owner_path}' (only "
                    "parameters of your own modules, nn.Linear, nn.ParameterList and "
                    "nn.ParameterDict are sliced)"
                )
    return found


def _head_bias_conflicts(
    model: nn.Module, gm: fx.GraphModule, biases: Sequence[HeadBias]
) -> dict[str, str]:
    """Why the parameter or buffer of each per-head score term in ``biases`` cannot be
    sliced along its heads in place, by its name (absent: it can): it is also held under
    another name, read elsewhere in the forward, held by a module the model calls (but an
    ``nn.Embedding`` called once for it: T5's bias), or by a torch layer.

    >>> class Net(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.register_buffer("s", torch.ones(2))
    ...     def forward(self, x: Tensor) -> Tensor:
    ...         return x + self.s
    >>> net, b = Net(), HeadBias("add", "s", 0, 2, np.arange(2), False)
    >>> _head_bias_conflicts(net, fx.symbolic_trace(net), [b])
    {}
    >>> net.register_buffer("t", net.s)  # the same tensor under another name
    >>> _head_bias_conflicts(net, fx.symbolic_trace(net), [b])
    {'s': "'s' is also 't' (a shared tensor)"}
    """
    names: dict[int, list[str]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        names.setdefault(id(t), []).append(name)
    calls: dict[str, int] = {}
    reads: dict[str, int] = {}
    held: dict[int, str] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
            sub = model.get_submodule(str(n.target))
            for t in [*sub.parameters(), *sub.buffers()]:
                held.setdefault(id(t), str(n.target))
        elif n.op == "get_attr":
            reads[str(n.target)] = reads.get(str(n.target), 0) + 1
    found: dict[str, str] = {}
    for hb in biases:
        owner_path, _, attr = hb.path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        held_t = getattr(owner, attr, None)
        if not isinstance(held_t, Tensor):
            found[hb.path] = f"'{hb.path}' is not a tensor of the model"
            continue
        t = held_t
        others = [name for name in names.get(id(t), []) if name != hb.path]
        embedding = type(owner) is nn.Embedding and attr == "weight"
        if others:
            found[hb.path] = f"'{hb.path}' is also '{others[0]}' (a shared tensor)"
        elif embedding and calls.get(owner_path, 0) != 1:
            found[hb.path] = f"embedding '{owner_path}' is called {calls.get(owner_path, 0)} times"
        elif not embedding and reads.get(hb.path, 0) != 1:
            found[hb.path] = f"'{hb.path}' is read {reads.get(hb.path, 0)} times by the forward"
        elif not embedding and id(t) in held:
            found[hb.path] = f"'{hb.path}' is also used by module '{held[id(t)]}'"
        elif (
            not embedding
            and type(owner).__module__.split(".")[0] == "torch"
            and type(owner) is not nn.Module
            and not is_code(owner)
        ):
            found[hb.path] = (
                f"'{hb.path}' belongs to {type(owner).__name__} '{owner_path}' (only tensors "
                "of your own modules are sliced)"
            )
    return found


def _attention_output_use(node: fx.Node) -> str | None:
    """Why the model's use of an attention module's ``(output, weights)`` keeps its heads
    (None: only ``output`` is read): pruned heads would change the weights it returns."""
    for u in node.users:
        i = item_index(u, 2)
        if i is None:
            return "its (output, weights) tuple is used whole (supported: output[0])"
        if i == 1 and _used(u):
            return "the model reads its attention weights (one per head: heads cannot go)"
    return None


def _wraps(traced: TracedModel) -> dict[fx.Node, str]:
    """The values returned by the calls of modules traced through (not leaves) that are
    called once and could stay a call of their module in rewritten code (see
    :func:`hooked_call_problem`): result node -> the innermost such module's name. A residual
    branch ending in an activation that cannot carry its gate (ultralytics' shared
    ``Conv.default_act``, ``F.silu``) is gated on that module's output, ``x + g * m(h)``."""
    counts: dict[str, int] = {}
    for c in traced.calls:
        counts[c.path] = counts.get(c.path, 0) + 1
    out: dict[fx.Node, str] = {}
    # outer calls first, so that an inner one returning the same value replaces them
    for c in sorted(traced.calls, key=lambda c: (-len(c.nodes), c.path.count("."))):
        if not c.path or counts[c.path] != 1 or c.path in traced.opaque or is_leaf_call(c):
            continue
        if isinstance(c.result, fx.Node) and hooked_call_problem(c) is None:
            out[c.result] = c.path
    return out


def gate_(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    channels: bool = True,
    blocks: bool = True,
    shortcuts: str | None = None,
    gate: GateKind = "hard_concrete",
    filter_fn: FilterFn | None = None,
) -> GatingSummary:
    """Insert gates into ``model`` in place and return a summary of what was gated.

    The model's fx graph (see :mod:`gatedprune.gating.graph`) gives channel groups (channels
    coupled through residual adds and concatenations are one group) for Linear/Conv/BatchNorm
    layers, and residual blocks ``y = s + F(x)`` (one block gate each: a closed block is
    removed). Gates start open (exactly 1; new shortcuts exactly 0, for ``gate="sigmoid"`` too:
    see ``SigmoidGate(start=...)``), so the function is unchanged until training changes them.
    ``example_input`` is the model's input: one tensor, or a tuple of tensors for a
    ``forward`` with several positional inputs (``gate_(unet, (x, t))``; each is traced as an
    input and never pruned; optional parameters after them keep their defaults). Then
    ``gatedprune.Budget``, ``gatedprune.cost`` and ``gatedprune.prune`` work on the model
    (``cost`` and ``Budget`` with inputs of the same form).
    ``filter_fn(module, name)`` returning False leaves a channel group (asked for each producer
    Linear/Conv) or a residual block (asked for the module whose forward holds the add) ungated.

    gate_ leaves the model's buffers as it found them (a forward's in-place updates, a step
    counter, during its runs of the model are undone; since 2026-12-08).

    >>> import torch, gatedprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> summary = gate_(net, torch.zeros(2, 4))
    >>> summary.n_gates
    8
    >>> small = gatedprune.prune(net.eval())
    """
    kept = (
        [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, nn.Module) else []
    )
    try:
        return _gate(
            model,
            example_input,
            channels=channels,
            blocks=blocks,
            shortcuts=shortcuts,
            gate=gate,
            filter_fn=filter_fn,
        )
    finally:
        with torch.no_grad():
            for b, before in kept:  # a forward's in-place updates (a step counter) undone
                if b.shape == before.shape and b.dtype == before.dtype:
                    b.copy_(before)


def _gate(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    channels: bool = True,
    blocks: bool = True,
    shortcuts: str | None = None,
    gate: GateKind = "hard_concrete",
    filter_fn: FilterFn | None = None,
) -> GatingSummary:
    """:func:`gate_` without restoring the model's buffers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"gate_ expects a torch.nn.Module, got {type(model).__name__}")
    inputs = tensor_inputs(model, example_input, "gate_")
    channels, blocks = check_flag("channels", channels), check_flag("blocks", blocks)
    if shortcuts not in (None, "dense"):
        raise ValueError(f"shortcuts must be None or 'dense', got {shortcuts!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, name) -> bool, got {filter_fn!r}")
    gate_kind = resolve_gate(gate)
    for name, m in model.named_modules():
        if isinstance(m, ModelGating):
            where = "" if name == ATTR else f" (its part '{name.rpartition('.')[0]}' is)"
            raise ValueError(
                f"{type(model).__name__} is already gated{where}; gate a model only once, "
                "at the top"
            )
    for name, m in model.named_modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        if any(isinstance(h, _GATE_HOOKS) for h in hooks):
            part = "the model" if name == "" else f"its part '{name}'"
            raise ValueError(
                f"{type(model).__name__} is part of a model gated by gate_ ({part} carries its "
                "gates); gate a model only once, at the top"
            )
    held = _gated_parts(model)
    if held:
        where = ", ".join(
            f"{'the model' if n == '' else 'model.' + n} ({type(m).__name__})" for n, m in held
        )
        raise ValueError(
            f"{where} already {'holds' if len(held) == 1 else 'hold'} gatedprune gates; gate_ "
            "expects a model without gates: build it from plain modules (e.g. nn.LSTM instead "
            "of gatedprune.ShortcutLSTM), or replace the gated part by gatedprune.prune(part)"
        )
    if hasattr(model, ATTR):
        raise ValueError(f"{type(model).__name__} already has an attribute '{ATTR}'")
    everywhere = global_hooks()
    if everywhere:
        kind, hook = everywhere[0]
        raise ValueError(
            f"a {kind} {hook_name(hook)} is registered for every module (torch.nn.modules."
            "module.register_module_forward_hook and its siblings): it would run on every "
            "module gate_ gates and see what the gates and prune change, which gate_ cannot "
            "keep whole for every module; remove it (its handle's .remove()) while gating "
            "and pruning"
        )
    structure = model_fingerprint(model, dtypes=False)  # before prepare_encoders changes classes
    prepare_encoders(model)
    traced = trace_model(model, inputs=len(inputs), examples=inputs)
    gm = traced.graph_module
    record = record_run(traced, inputs, model)
    bindings = record_bindings(model, inputs, traced)  # how rewritten modules are called
    # modules called only in training mode (auxiliary heads): what they read stays whole, the
    # code calling them is not rewritten (from the eval trace, without the calls)
    train_only = _train_only(model, traced, inputs)
    rewritable: dict[str, str | None] = {}  # module -> why prune could not rewrite it alone
    rewritable.update(train_only.scopes)
    owners = node_owners(gm.graph)  # (gate_ does not change the traced graph)

    def can_rewrite(scope: str) -> str | None:
        if train_only.unknown is not None:
            return train_only.unknown
        if scope not in rewritable:
            try:
                local_trace(
                    model,
                    gm.graph,
                    scope,
                    traced.opaque,
                    bindings.get(scope, {}),
                    owners,
                    len(inputs),
                )
                rewritable[scope] = None
            except RuntimeError as e:
                rewritable[scope] = str(e)
        return rewritable[scope]

    hooked = _HookedCalls(model, traced, can_rewrite)  # modules carrying hooks of the user's

    def fixed_code(node: fx.Node) -> bool:  # as _pin_unrewritable_sizes would find it
        owner = owners.get(node)
        if owner is None:
            return False
        return can_rewrite(owner) is not None or hooked.conflict([owner], {node.name}) is not None

    ca = analyse_channels(gm, record, fixed_code, root=model)
    for n, read_by in train_only.reads.items():
        for lab in (ca.labels.get(n), ca.nonzero.get(n)):
            if lab is not None:
                _pin_groups(ca, lab.atoms, read_by)
    if train_only.unknown is not None:
        _pin_groups(ca, np.arange(len(ca.atom_group)), train_only.unknown)
    _pin_hooked(hooked, traced, ca)
    shared = _shared_modules(model, gm)
    for name, reason in shared.items():  # pruning slices and scales their tensors in place
        for atoms in _module_spaces(ca, name):
            _pin_groups(ca, atoms, f"{name}: {reason}")
    param_whole = dict(ca.param_whole)
    conflicts = _param_conflicts(model, gm, ca.param_linears)
    for pl in ca.param_linears:  # a parameter sliced in place must be read only there
        why = conflicts.get(pl.weight)
        if why is None:
            continue
        param_whole.setdefault(pl.weight, f"{why}, at node '{pl.node}'")
        for atoms in (pl.in_atoms, pl.out_atoms):
            _pin_groups(ca, atoms, f"{why} (node '{pl.node}' is left whole)")
    scale_conflicts = _param_conflicts(model, gm, [], ca.param_scales)
    for ps in ca.param_scales:  # a per-channel factor sliced in place: read only there
        why = scale_conflicts.get(ps.path)
        if why is None:
            continue
        param_whole.setdefault(ps.path, f"{why}, at node '{ps.node}'")
        _pin_groups(ca, ps.atoms, f"{why} (node '{ps.node}' multiplies them by it)")
    bias_conflicts = _head_bias_conflicts(model, gm, ca.head_biases)
    for hb in ca.head_biases:  # a per-head score term sliced in place: read only there
        why = bias_conflicts.get(hb.path)
        if why is not None:
            _pin_groups(ca, hb.atoms, f"{why} (node '{hb.node}' reads it per head)")
    _pin_unrewritable_sizes(ca, hooked, owners)
    summary = GatingSummary(opaque=dict(traced.opaque))
    summary.ungated_layers.extend(train_only.modules.items())
    summary.ungated_params.extend(param_whole.items())
    param_producers = {pl.weight for pl in ca.param_linears if pl.out_atoms is not None}

    def allowed(name: str) -> bool:
        if filter_fn is None:
            return True
        if name in param_producers:  # a parameter: asked with the module holding it
            owner = name.rpartition(".")[0]
            return bool(filter_fn(model.get_submodule(owner) if owner else model, name))
        return bool(filter_fn(model if name == "" else model.get_submodule(name), name))

    # channel groups
    group_map = np.full(len(ca.groups), -1, dtype=np.int64)
    sizes: list[int] = []
    rnn_spaces = {
        f"{name}:{layer}:{d}"
        for name, states in ca.rnn_outputs.items()
        for layer in range(len(states))
        for d in ("forward", "reverse")
    }
    for g in ca.groups:
        if not g.producers:
            continue
        if any(p in rnn_spaces for p in g.producers):  # recurrent outputs: see setup_rnns
            others = [p for p in g.producers if p not in rnn_spaces]
            if others:
                joined = "joined to the output of a recurrent module"
                n_others = {g.widths.get(p, g.size) for p in others}
                width = n_others.pop() if len(n_others) == 1 else g.size
                summary.ungated_groups.append((others, width, joined))
            continue
        why = g.pinned
        if why is None and not channels:
            why = "channels=False"
        if why is None and g.size < 2:
            why = "a single channel"
        if why is None:
            rejected = [p for p in g.producers if not allowed(p)]
            if rejected:
                why = f"filter_fn rejected {rejected[0]}"
        if why is None:
            group_map[g.index] = len(sizes)
            sizes.append(g.size)
            if g.index in ca.head_groups:
                summary.head_groups.append(len(summary.channel_groups))
            if g.norms:
                summary.norm_groups[len(summary.channel_groups)] = list(g.norms)
            summary.channel_groups.append((list(g.producers), g.size))
        else:
            summary.ungated_groups.append(_ungated_line(g, why))
    # residual blocks
    # residual branches may end in a linear map written with parameters whose output units
    # gate_ can scale (the product, or the add of its bias): its weight is the block's site
    by_name = {n.name: n for n in gm.graph.nodes}
    param_ends = {
        by_name[pl.bias_node or pl.node]: pl.weight
        for pl in ca.param_linears
        if pl.out_atoms is not None and pl.weight not in conflicts
    }
    # or in a norm's own F.batch_norm / F.group_norm (timm's BatchNormAct2d): its weight, bias
    param_ends.update({by_name[node]: f"{bn}.weight" for node, bn in ca.fused_norms.items()})
    found, skipped = (
        find_blocks(gm, record, traced.opaque, param_ends, _wraps(traced))
        if (blocks or shortcuts)
        else ([], [])
    )
    edges: list[Edge] = []
    if shortcuts == "dense":
        edges, unconnected = find_dense_edges(model, gm, record, ca, found, inputs)
        edges = [e for e in edges if allowed(e.src) and allowed(e.dst)]
        without_hooks: list[Edge] = []
        for e in edges:  # a shortcut's hooks on its ends would run before or after the user's
            why_not = next(
                (
                    f"{hooked.who(m)}, which the shortcut's own hooks there would run before "
                    "or after"
                    for m in (e.src, e.dst)
                    if m in traced.hooked
                ),
                None,
            )
            if why_not is None:
                why_not = hooked.touching({e.src_node, e.dst_node, *e.users})
            if why_not is None:
                why_not = hooked.conflict([e.scope], set())
            if why_not is not None:
                unconnected.append((f"{e.src} -> {e.dst}", why_not))
            else:
                without_hooks.append(e)
        edges = []
        for e in without_hooks:  # prune rewrites the code of the module holding both blocks
            why_not = can_rewrite(e.scope)
            if why_not is not None:
                unconnected.append((f"{e.src} -> {e.dst}", why_not))
            else:
                edges.append(e)
        summary.shortcuts.extend((e.src, e.dst) for e in edges)
        summary.unconnected.extend(unconnected)
    if not blocks:
        found, skipped = [], []
    summary.ungated_adds.extend(skipped)
    kept_blocks: list[Block] = []
    info = GraphInfo.of(gm, frozenset(hooked.nodes()))  # a hooked ReLU is never bypassed
    for b in found:
        if not allowed(b.owner):
            summary.ungated_adds.append((node_label(b.add), f"filter_fn rejected '{b.owner}'"))
            continue
        # the code closing it rewrites: the add's module, or a parent that drops the call of
        # a module computing only the branch (HF BERT's attention around its self-output)
        scopes, erase, bypass = info.scopes({b.add.name: _arg_name(b.add, b.branch_pos)})
        scopes = scopes or [b.owner]
        why = next((w for w in map(can_rewrite, scopes) if w is not None), None)
        if why is None and b.site in shared:  # the block gate is folded into it
            why = f"{b.site}: {shared[b.site]}"
        if why is None:  # a hooked module's call must stay (and stay a call of the module)
            why = hooked.conflict(scopes, {b.add.name, *erase, *bypass}, set(erase))
        if why is not None:
            summary.ungated_adds.append((node_label(b.add), why))
            continue
        b.index = len(kept_blocks)
        kept_blocks.append(b)
        summary.blocks.append((b.owner, b.site, b.flops))
    clamp = [True] * len(sizes)
    # recurrent modules: one unit-gate vector per (layer, direction)
    rnns, rnn_consumers, ungated_rnns = setup_rnns(
        gm, ca, allowed, channels, group_map, sizes, clamp
    )
    summary.rnns.extend((r.name, r.layers, r.directions, r.hidden) for r in rnns)
    summary.ungated_layers.extend(ungated_rnns)
    # transformer encoder layers: heads, FFN units, attention / FFN sub-layers
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    transformers: list[tuple[str, int, int, int, int]] = []
    decoders: list[tuple[str, int, int, int, int, int, int]] = []
    attentions: list[tuple[str, int]] = []

    def unit_refusal(m: nn.Module, name: str, own: str | None, *checks: str | None) -> str | None:
        """Why attention or layer ``m`` (``own``: its kind's own reason) is left whole: that,
        sharing or hooks, more than one call, the first of ``checks`` given, or ``filter_fn``."""
        why = own or shared.get(name) or _hooked_inside(m, name)
        if why is None and calls[name] != 1:
            why = "called more than once"
        if why is None:
            why = next((c for c in checks if c is not None), None)
        if why is None and not allowed(name):
            why = "filter_fn rejected it"
        return why

    for name in calls:
        m = gm.get_submodule(name)
        if isinstance(m, nn.MultiheadAttention):
            node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
            why = unit_refusal(
                m,
                name,
                gateable_attention(m),
                "query, key and value must all be given" if len(node.args) < 3 else None,
                _attention_output_use(node),
            )
            if why is not None:
                summary.ungated_layers.append((name, why))
                continue
            attentions.append((name, len(sizes)))
            sizes.append(m.num_heads)
            clamp.append(False)  # all heads closed: the output is out_proj.bias
            summary.attentions.append((name, m.num_heads))
            continue
        if isinstance(m, nn.TransformerDecoderLayer):
            node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
            why = unit_refusal(
                m,
                name,
                gateable_decoder_layer(m),
                "tgt and memory must both be given" if len(node.args) < 2 else None,
            )
            if why is not None:
                summary.ungated_layers.append((name, why))
                continue
            n_heads, n_cross = m.self_attn.num_heads, m.multihead_attn.num_heads
            n_units = m.linear1.out_features
            base = len(sizes)
            sizes.extend([n_heads, n_cross, n_units, 1, 1, 1])
            clamp.extend([False] * 6)  # a layer can drop all heads or units
            decoders.append((name, base, base + 1, base + 2, base + 3, base + 4, base + 5))
            summary.decoders.append((name, n_heads, n_cross, n_units))
            continue
        if not isinstance(m, nn.TransformerEncoderLayer):
            continue
        why = unit_refusal(m, name, gateable_layer(m))
        if why is not None:
            summary.ungated_layers.append((name, why))
            continue
        n_heads, n_units = m.self_attn.num_heads, m.linear1.out_features
        base = len(sizes)
        sizes.extend([n_heads, n_units, 1, 1])
        clamp.extend([False, False, False, False])  # a layer can drop all heads or units
        transformers.append((name, base, base + 1, base + 2, base + 3))
        summary.transformers.append((name, n_heads, n_units))
    if shortcuts == "dense" and summary.transformers:  # say why they get no new shortcuts
        encoders = sorted({name.rpartition(".layers.")[0] for name, *_ in summary.transformers})
        for enc in encoders:
            summary.unconnected.append(
                (
                    enc or "<root>",
                    "nn.TransformerEncoderLayer layers are gated as layers (heads, FFN units, "
                    "attention and FFN sub-layers), not as residual blocks, so no new "
                    "shortcuts join them",
                )
            )
    if shortcuts == "dense" and summary.decoders:
        stacks = sorted({name.rpartition(".layers.")[0] for name, *_ in summary.decoders})
        for stack in stacks:
            summary.unconnected.append(
                (
                    stack or "<root>",
                    "nn.TransformerDecoderLayer layers are gated as layers (heads, FFN units, "
                    "self-attention, cross-attention and FFN sub-layers), not as residual "
                    "blocks, so no new shortcuts join them",
                )
            )
    handled = {name for name, *_ in transformers} | {name for name, _ in attentions}
    handled |= {name for name, *_ in decoders}
    handled |= {r.name for r in rnns} | {name for name, _ in summary.ungated_layers}
    for name in calls:  # other leaves with layers inside (nn.TransformerDecoderLayer, ...)
        m = gm.get_submodule(name)
        if name in handled or name in traced.opaque or isinstance(m, nn.RNNBase):
            continue
        inner = [c for c in m.modules() if c is not m]
        if any(isinstance(c, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) for c in inner):
            why = (
                f"{type(m).__name__} is kept whole: gate_ gates inside "
                "nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention "
                "and recurrent modules"
            )
            if isinstance(m, nn.Transformer):
                why += (
                    " (nn.Transformer.forward cannot be traced by torch.fx: call its .encoder "
                    "and .decoder from your forward to gate their layers)"
                )
            summary.ungated_layers.append((name, why))
    # gate sites
    sites: dict[str, SiteInfo] = {}
    param_sites: dict[str, ParamSite] = {}
    block_params = {b.site for b in kept_blocks if b.param}
    fused = set(ca.fused_norms.values())
    for name in dict.fromkeys([*ca.sources, *fused]):
        atoms = ca.module_atoms.get(name)
        segs = _segments(atoms, group_map, ca.atom_group, ca.atom_gidx) if atoms is not None else []
        weight = f"{name}.weight"
        if name in fused and (segs or weight in block_params):
            # its own F.batch_norm / F.group_norm: its weight and bias scaled (before its act)
            norm = model.get_submodule(name)
            assert isinstance(norm, nn.modules.batchnorm._BatchNorm | nn.GroupNorm)
            bias = f"{name}.bias" if norm.bias is not None else None
            width = norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features
            param_sites[weight] = ParamSite(weight, bias, 0, width, segs)
        elif segs and atoms is not None and name not in fused:
            dim = -1 if ca.kinds[name] in ("linear", "embedding") else 1
            sites[name] = SiteInfo(dim, len(atoms), segs)
    for pl in ca.param_linears:
        if pl.out_atoms is not None:
            segs = _segments(pl.out_atoms, group_map, ca.atom_group, ca.atom_gidx)
            if segs or pl.weight in block_params:
                param_sites[pl.weight] = ParamSite(
                    pl.weight, pl.bias, 1 - pl.in_dim, pl.n_out, segs
                )
    for b in kept_blocks:
        if b.param:  # the weight (and bias) of a linear map written with parameters
            param_sites[b.site].blocks.append(b.index)
            continue
        if b.site not in sites:
            sites[b.site] = SiteInfo(1, 0, [])
        sites[b.site].blocks.append(b.index)
    in_sites: dict[str, SiteInfo] = {}  # query heads of multi-query attention, gated after it
    for name in ca.input_sites:
        segs = _segments(ca.module_in_atoms[name], group_map, ca.atom_group, ca.atom_gidx)
        if segs:
            in_sites[name] = SiteInfo(-1, len(ca.module_in_atoms[name]), segs)
            for gi, _, _ in segs:  # a channel group's index (they come first)
                summary.query_heads.setdefault(gi, []).append(name)
    # slicing of every Linear/Conv/BatchNorm touching a gated group
    slices: dict[str, SliceInfo] = {}

    def split(atoms: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        if atoms is None:
            return None, None
        gg = group_map[ca.atom_group[atoms]]
        return (gg, ca.atom_gidx[atoms]) if (gg >= 0).any() else (None, None)

    for name, kind in ca.kinds.items():
        out_atoms = ca.module_atoms.get(name)
        in_atoms = (
            ca.module_in_atoms.get(name)
            if kind in ("linear", "conv", "gconv", "convt", "gconvt")
            else None
        )
        ig, ii = split(in_atoms)
        og, oi = split(out_atoms)
        if ig is not None or og is not None:
            slices[name] = SliceInfo(kind, ig, ii, og, oi)
    for pl in ca.param_linears:  # the parameters of linear maps written with them
        ig, ii = split(pl.in_atoms)
        og, oi = split(pl.out_atoms)
        if ig is not None or og is not None:
            kind = "kernel" if pl.conv else "matrix" if pl.in_dim == 1 else "matrix_t"
            slices[pl.weight] = SliceInfo(kind, ig, ii, og, oi)
        if pl.bias is not None and og is not None:
            slices[pl.bias] = SliceInfo("vector", None, None, og, oi)
    for ps in ca.param_scales:  # per-channel factors (layer scale): sliced with the channels
        og, oi = split(ps.atoms)
        if og is not None:
            slices[ps.path] = SliceInfo("scale", None, None, og, oi)
    for hb in ca.head_biases:  # per-head score terms (relative position bias, ALiBi slopes)
        og, oi = split(hb.atoms)
        if og is not None:
            slices[hb.path] = SliceInfo("heads", None, None, og, oi, dim=hb.dim)
    size_rewrites: list[SizeInfo] = []
    for node_name, entries in ca.sizes.items():
        for key, atoms, factor in entries:
            if atoms is None:
                continue
            gg = group_map[ca.atom_group[atoms]]
            # every section of a split (one ungated too): a chunk pruned apart becomes a
            # split given all of its sections
            if (gg >= 0).any() or str(key).startswith("section_"):
                size_rewrites.append(SizeInfo(node_name, key, gg, ca.atom_gidx[atoms], factor))
    # parameters never referenced by the graph (counted as they are)
    covered: set[int] = set()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            covered.update(id(p) for p in gm.get_submodule(str(n.target)).parameters())
        elif n.op == "get_attr":
            with contextlib.suppress(AttributeError):
                covered.add(id(gm.get_parameter(str(n.target))))
    orphans = []
    seen: set[int] = set()
    for pname, p in model.named_parameters():
        if id(p) in covered or id(p) in seen:
            continue
        seen.add(id(p))
        orphans.append((pname.rpartition(".")[0], p.numel()))
    tf_index = {name: (gh, gu, ga, gf) for name, gh, gu, ga, gf in transformers}
    dec_index = {name: tuple(groups) for name, *groups in decoders}
    terms = build_cost_terms(
        gm,
        record,
        ca,
        kept_blocks,
        group_map,
        sizes,
        orphans,
        tf_index,
        dict(attentions),
        edges,
        rnns={r.name: r.groups[0] for r in rnns},
        decoders=dec_index,
    )
    gating = InsertedGating(
        kind=gate_kind,
        group_sizes=sizes,
        clamp=clamp,
        transformers=transformers,
        attentions=attentions,
        n_blocks=len(kept_blocks),
        sites=sites,
        slices=slices,
        blocks=[(b.add.name, _arg_name(b.add, b.branch_pos), b.branch_pos) for b in kept_blocks],
        info=info,
        terms=terms,
        input_shape=tuple(inputs[0].shape),
        input_shapes=tuple(tuple(x.shape) for x in inputs),
        input_examples=example_entries(inputs),
        batch_scalable=not traced.opaque
        and costs_scale_with_batch(traced, inputs, model, record)
        and not any(
            isinstance(gm.get_submodule(str(n.target)), _SEQUENCE_UNITS)
            for n in gm.graph.nodes
            if n.op == "call_module"
        ),
        opaque=dict(traced.opaque),
        summary=summary,
        edges=edges,
        edge_kind=_closed(gate_kind),
        rnns=rnns,
        rnn_consumers=rnn_consumers,
        size_rewrites=size_rewrites,
        param_sites=param_sites,
        input_sites=in_sites,
        decoders=decoders,
    )
    gating.source = {**structure, "graph": graph_fingerprint(traced.graph)}
    # the user's hooks gate_ saw (module -> hook keys; prune checks the ones added since) and
    # the gated groups each module's calls see
    gating.user_hook_keys = {
        name: keys for name, m in model.named_modules() if (keys := hook_keys(m))
    }
    gating.hook_views = _hook_views(traced, ca, group_map)
    gating.weight_norms = tuple(n for n, m in model.named_modules() if weight_norm_layer(m))
    gating.act_sites = tuple(dict.fromkeys(b.site for b in kept_blocks if b.scaled))
    gating.bindings = {k: v for k, v in bindings.items() if isinstance(v, dict)}
    gating.train(model.training)
    model.add_module(ATTR, gating)
    gating.hooked = tuple(
        dict.fromkeys([*sites, *in_sites, *(e.src for e in edges), *(e.dst for e in edges)])
    )
    for name in sites:
        model.get_submodule(name).register_forward_hook(_SiteHook(gating, name))
    for name in in_sites:
        model.get_submodule(name).register_forward_pre_hook(_InputSiteHook(gating, name))
    model.register_forward_pre_hook(_ResetHook(gating))
    model.register_forward_hook(_TrackHook(gating))
    for key, site in param_sites.items():  # linear maps written with parameters
        for path, dim in ((site.weight, site.out_dim), (site.bias, 0)):
            if path is not None:
                owner_path, _, attr = path.rpartition(".")
                owner = model.get_submodule(owner_path) if owner_path else model
                stored = cast(Tensor, getattr(owner, attr))
                pgate = ParamGate(gating, key, dim, stored.shape)
                # unsafe: no check call drawing samples
                parametrize.register_parametrization(owner, attr, pgate, unsafe=True)
                _adopt_param_gated(owner)
    for src in dict.fromkeys(e.src for e in edges):
        clone = any(e.clone_src for e in edges if e.src == src)
        model.get_submodule(src).register_forward_hook(_EdgeOutHook(gating, src, clone))
    for dst in dict.fromkeys(e.dst for e in edges):
        model.get_submodule(dst).register_forward_pre_hook(_EdgeInHook(gating, dst))
    for i, (name, *_) in enumerate(transformers):
        layer = model.get_submodule(name)
        assert isinstance(layer, nn.TransformerEncoderLayer)
        layer.__class__ = GatedTransformerEncoderLayer
        layer.__dict__["_gp_ref"] = _Ref(gating, i, nn.TransformerEncoderLayer)
        layer.self_attn.__class__ = GatedMultiheadAttention
        layer.self_attn.__dict__["_gp_ref"] = _Ref(gating, i, nn.MultiheadAttention)
    for i, (name, *_) in enumerate(decoders):
        dec = model.get_submodule(name)
        assert isinstance(dec, nn.TransformerDecoderLayer)
        dec.__class__ = GatedTransformerDecoderLayer
        dec.__dict__["_gp_ref"] = _Ref(gating, i, nn.TransformerDecoderLayer, "decoder")
        for attr, key in (("self_attn", "heads"), ("multihead_attn", "cross_heads")):
            att = getattr(dec, attr)
            att.__class__ = GatedMultiheadAttention
            att.__dict__["_gp_ref"] = _Ref(gating, i, nn.MultiheadAttention, "decoder", key)
    for i, r in enumerate(rnns):
        switch_rnn(model.get_submodule(r.name), gating, i)
    for i, (name, _) in enumerate(attentions):
        att = model.get_submodule(name)
        att.__class__ = GatedMultiheadAttention
        att.__dict__["_gp_ref"] = _Ref(gating, i, nn.MultiheadAttention, "mha")
    return summary
