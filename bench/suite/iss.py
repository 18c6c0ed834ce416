"""ISS group lasso for LSTMs (Wen et al. 2018, "Learning intrinsic sparse structures within
long short-term memory"): the suite's ``iss`` baseline.

A hidden unit ``k`` of layer ``l`` of a stacked ``nn.LSTM`` is one *intrinsic sparse
structure* (ISS): its rows ``k, H + k, 2H + k, 3H + k`` (the i, f, g, o gate blocks) of
``W_ih``, ``W_hh``, ``b_ih`` and ``b_hh``, its column ``k`` of ``W_hh``, and its column ``k``
in the consumer of the layer's output (the next layer's ``W_ih``, or the linear head). Removing
the whole group removes the unit exactly. The method:

1. train the plain LSTM (the width with the dense FLOPs) for the first ``prune_at`` of the
   epochs with ``ISS_LAMBDA`` times the sum of the groups' L2 norms added to the loss (a plain
   group-lasso penalty, not a proximal step);
2. remove units in order of increasing group norm (all layers ranked together, as the paper's
   single threshold does; at least one unit per layer) and stop at the prefix whose achieved
   FLOPs are closest to the target (the same equal-cost rule as the other methods);
3. rebuild a smaller plain LSTM (:func:`gatedprune.rnn_slicing.slice_rnn_layers`: one
   ``nn.LSTM`` per layer, since layers may now differ in width) and fine-tune it for the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from gatedprune.rnn_slicing import RNNStack, slice_rnn_layers

from .workloads import PlainLSTM, plain_cost

__all__ = [
    "ISS_LAMBDA",
    "SlicedLSTM",
    "iss_group_norms",
    "iss_penalty",
    "removal_order",
    "slice_plain_lstm",
    "widths_for_flops",
]

ISS_LAMBDA = 1e-5
"""Group-lasso strength (per unit norm, added to the mean cross-entropy). Chosen on the suite's
LSTM workload (seed 0, 25% FLOPs, 12 + 12 epochs): 1e-3 drives every group to 0 under Adam
(31% after fine-tuning), 1e-4 gives 77.4%, 1e-5 86.3%."""


class SlicedLSTM(nn.Module):
    """A pruned :class:`~bench.suite.workloads.PlainLSTM`: single-layer LSTMs of their own
    widths run in sequence (:class:`~gatedprune.rnn_slicing.RNNStack`) and the linear head on
    the last step's output.

    >>> net = slice_plain_lstm(PlainLSTM(1, 8, 2, 10), [torch.arange(3), torch.arange(2)])
    >>> net(torch.zeros(4, 40, 1)).shape
    torch.Size([4, 10])
    """

    def __init__(self, rnn: RNNStack, head: nn.Linear) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = head

    @property
    def widths(self) -> list[int]:
        """Hidden units per layer."""
        return [int(m.hidden_size) for m in self.rnn.layers if isinstance(m, nn.LSTM)]

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (B, T, H_last)
        y: Tensor = self.head(out[:, -1])  # (B, C)
        return y


def _check(model: nn.Module) -> PlainLSTM:
    if not isinstance(model, PlainLSTM):
        raise TypeError(f"ISS needs a PlainLSTM, got {type(model).__name__}")
    lstm = model.lstm
    if lstm.bidirectional or lstm.proj_size > 0:
        raise ValueError("ISS here handles unidirectional LSTMs without projections")
    return model


def iss_group_norms(model: nn.Module, eps: float = 0.0) -> list[Tensor]:
    """L2 norm of every hidden unit's ISS group, one ``(H,)`` tensor per layer
    (differentiable; ``eps`` inside the square root keeps the gradient finite at 0).

    >>> [n.shape for n in iss_group_norms(PlainLSTM(1, 8, 2, 10))]
    [torch.Size([8]), torch.Size([8])]
    """
    m = _check(model)
    lstm, hidden, layers = m.lstm, m.lstm.hidden_size, m.lstm.num_layers
    norms: list[Tensor] = []
    for layer in range(layers):
        w_ih = getattr(lstm, f"weight_ih_l{layer}")  # (4H, in)
        w_hh = getattr(lstm, f"weight_hh_l{layer}")  # (4H, H)
        sq = w_ih.view(4, hidden, -1).pow(2).sum((0, 2))  # (H,) rows of W_ih
        sq = sq + w_hh.view(4, hidden, hidden).pow(2).sum((0, 2))  # rows of W_hh
        sq = sq + w_hh.pow(2).sum(0)  # (H,) column k of W_hh
        sq = sq - torch.diagonal(w_hh.view(4, hidden, hidden), dim1=1, dim2=2).pow(2).sum(0)
        if lstm.bias:
            for name in (f"bias_ih_l{layer}", f"bias_hh_l{layer}"):
                sq = sq + getattr(lstm, name).view(4, hidden).pow(2).sum(0)  # (H,)
        consumer = (
            getattr(lstm, f"weight_ih_l{layer + 1}") if layer + 1 < layers else m.head.weight
        )  # (out, H)
        sq = sq + consumer.pow(2).sum(0)  # (H,) column k of the consumer
        norms.append(torch.sqrt(sq + eps))
    return norms


def iss_penalty(model: nn.Module, lam: float = ISS_LAMBDA) -> Tensor:
    """``lam`` times the sum of all ISS group norms (the group-lasso term).

    >>> float(iss_penalty(PlainLSTM(1, 8, 2, 10)).detach()) > 0
    True
    """
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return lam * torch.cat(iss_group_norms(model, eps=1e-12)).sum()


def removal_order(norms: Sequence[Tensor]) -> list[tuple[int, int]]:
    """(layer, unit) pairs in order of increasing group norm over all layers.

    >>> removal_order([torch.tensor([3.0, 1.0]), torch.tensor([2.0])])
    [(0, 1), (1, 0), (0, 0)]
    """
    flat = [
        (float(v), layer, unit)
        for layer, n in enumerate(norms)
        for unit, v in enumerate(n.detach())
    ]
    return [(layer, unit) for _, layer, unit in sorted(flat)]


def slice_plain_lstm(model: nn.Module, keep: Sequence[Tensor]) -> SlicedLSTM:
    """The :class:`SlicedLSTM` keeping units ``keep[l]`` of layer ``l`` (exact: equals the
    original model whenever the removed units' outgoing weights are zero).

    >>> net = slice_plain_lstm(PlainLSTM(1, 8, 2, 10), [torch.tensor([0, 5]), torch.tensor([1])])
    >>> net.widths
    [2, 1]
    """
    m = _check(model)
    if len(keep) != m.lstm.num_layers:
        raise ValueError(f"keep must hold one index tensor per layer ({m.lstm.num_layers})")
    for layer, k in enumerate(keep):
        if k.numel() == 0:
            raise ValueError(f"keep[{layer}] is empty: every layer must keep a unit")
    keep = [torch.sort(k.long()).values for k in keep]
    layers = slice_rnn_layers(m.lstm, keep)
    last = keep[-1]
    head = nn.Linear(len(last), m.head.out_features, bias=m.head.bias is not None)
    with torch.no_grad():
        head.weight.copy_(m.head.weight[:, last])  # (C, k)
        if m.head.bias is not None:
            head.bias.copy_(m.head.bias)
    return SlicedLSTM(RNNStack(layers), head)


def widths_for_flops(
    model: nn.Module,
    order: Sequence[tuple[int, int]],
    flops: float,
    example: Tensor,
) -> list[Tensor]:
    """Units to keep per layer: ``order``'s units removed one by one (a layer's last unit is
    never removed), stopping at the prefix whose FLOPs are closest to ``flops``.

    >>> net = PlainLSTM(1, 4, 2, 10)
    >>> order = removal_order(iss_group_norms(net))
    >>> full = plain_cost(net, torch.zeros(1, 40, 1)).flops
    >>> [len(k) for k in widths_for_flops(net, order, full, torch.zeros(1, 40, 1))]
    [4, 4]
    """
    m = _check(model)
    hidden, layers = m.lstm.hidden_size, m.lstm.num_layers
    cache: dict[tuple[int, ...], int] = {}

    def cost_of(widths: tuple[int, ...]) -> int:
        if widths not in cache:
            skeleton = slice_plain_lstm(m, [torch.arange(w) for w in widths])
            cache[widths] = plain_cost(skeleton, example).flops
        return cache[widths]

    removed: set[tuple[int, int]] = set()
    widths = [hidden] * layers
    best = (abs(cost_of(tuple(widths)) - flops), 0)
    steps: list[tuple[int, int]] = []
    for layer, unit in order:
        if widths[layer] == 1:
            continue
        widths[layer] -= 1
        steps.append((layer, unit))
        f = cost_of(tuple(widths))
        best = min(best, (abs(f - flops), len(steps)))
        if f < flops:
            break
    removed = set(steps[: best[1]])
    return [
        torch.tensor([u for u in range(hidden) if (layer, u) not in removed], dtype=torch.long)
        for layer in range(layers)
    ]


def penalty_for(model: nn.Module, lam: float = ISS_LAMBDA) -> Callable[[], Tensor]:
    """The group-lasso penalty of ``model`` as a zero-argument callable (for ``fit_plain``)."""
    return lambda: iss_penalty(model, lam)
