"""Gate and prune existing user models: ``gate_``, ``export_plan``, ``apply_plan``.

``gate_(model, example_input)`` analyses the model's ``torch.fx`` graph and inserts, as forward
hooks on the user's own modules plus one ``InsertedGating`` submodule holding every gate:

* channel gates: one per group of channels that must be pruned together (Linear/Conv outputs
  coupled through residual adds, concatenations, BatchNorm, InstanceNorm, depthwise convs,
  flatten, pooling; a GroupNorm's runs of ``C / num_groups`` channels one gate each);
* block gates: ``y = s + g * F(x)`` for every residual branch ``F`` (a closed block is removed);
* transformer gates: heads, FFN units and whole attention / FFN sub-layers of
  ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` (self- and cross-attention
  heads and sub-layers apart), heads of ``nn.MultiheadAttention`` called by user code;
* with ``shortcuts="dense"``: new gated edges between residual blocks (closed at start);
* recurrent gates: hidden units of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, one gate vector per
  layer and direction (see :mod:`gatedprune.gating.rnn`).

Everything starts open (new shortcuts closed), so the function is unchanged. Then
``gatedprune.Budget``, ``gatedprune.cost`` and ``gatedprune.prune`` work on the model. Pruning
folds the gate values into the weights, slices the user's modules in place (same classes, same
``state_dict`` keys) and rewrites as ``torch.fx`` code only the innermost module whose forward
loses a branch or gains a shortcut.

Limits (each reported in the summary or as a clear error, never silently wrong):

* Channels that reach a LayerNorm or a ``GroupNorm(1, C)`` over them, a sigmoid/softmax, an add
  of an ungated tensor, an op we do not parse or the model output are not pruned (their
  statistics or values would change). A group never closes entirely (a conv cannot have 0
  outputs): if all its gates close, one channel with gate value 0 is kept.
* Grouped convolutions, transposed ones too, are pruned by position within their groups
  (they keep ``groups``), depthwise ones by whole groups; non-affine BatchNorm, InstanceNorm
  and GroupNorm and modules
  computing their weight when they run (``weight_norm``, ``spectral_norm``
  parametrizations, forward pre-hooks) are not pruned.
* Heads of hand-written attention are pruned (a reshape or ``unflatten(-1, ...)`` into
  ``(heads, head_size)``, then ``@``/``matmul``, a two-operand ``einsum`` or SDPA;
  grouped-query attention by key/value group); the pruned code's sizes of pruned dimensions
  are rewritten. A mask per head, attention weights read elsewhere than by ``@ v``
  and a single head stay whole.
* A submodule whose forward cannot be traced (data-dependent control flow) stays whole and
  ungated, with a warning naming it; an untraceable top-level forward is an error.
* A module carrying hooks of the user's keeps the channels its calls read and return whole,
  its call is never removed and stays a call of the module in pruned code (see
  :mod:`gatedprune.hooks`); fx traces without the hooks.
* A recurrent module keeps one ``hidden_size`` (its widest kept state; the others are padded
  with closed units); ``proj_size``, reading ``c_n``, an initial state, or an output that
  reaches a non-homogeneous op before its consumer leave it ungated (with the reason).
* ``cost`` of a gated model is exact for the ``example_input`` shape (and other batch sizes of
  models whose every call costs in proportion to the batch, checked by two more runs).

>>> import torch
>>> from gatedprune.gating import gate_
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> print(gate_(net, torch.zeros(2, 4)).n_gates)
8
"""

from .core import GatingSummary, InsertedGating, export_plan, gate_
from .latency import GatedLatencyModel
from .models import BasicBlock1d, ResNet1d
from .surgery import GateScale, ScaledAdd, apply_plan

__all__ = [
    "BasicBlock1d",
    "GateScale",
    "GatedLatencyModel",
    "GatingSummary",
    "InsertedGating",
    "ResNet1d",
    "ScaledAdd",
    "apply_plan",
    "export_plan",
    "gate_",
]
