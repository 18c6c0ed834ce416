"""A matrix product that keeps a labelled dimension of one operand (the rows of ``a`` or the
columns of ``b`` in ``a @ b``, ``bmm``, ``mm``) carries its channels: attention pooling over
time, ``bmm(weights^T, h)``, keeps ``h``'s features, so the layer producing ``h`` (an LSTM, a
Linear) is pruned through it. A product contracting the labelled dimension still keeps it."""

from __future__ import annotations

import pytest
import torch
from gating_helpers import check_pruned, examples, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gatedprune.gating import gate_


class Pooled(nn.Module):
    """A feature layer (LSTM or Linear), attention weights over time from its output, the
    weighted sum as a product, a classifier."""

    def __init__(self, form: str, layer: str) -> None:
        super().__init__()
        self.form, self.layer = form, layer
        self.rnn = nn.LSTM(3, 8, batch_first=True)
        self.lin = nn.Linear(3, 8)
        self.score, self.fc = nn.Linear(8, 1), nn.Linear(8, 2)
        self.mix = nn.Linear(5, 5, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.rnn(x)[0] if self.layer == "lstm" else torch.relu(self.lin(x))  # (B, T, 8)
        w = torch.softmax(self.score(h), dim=1)  # (B, T, 1)
        if self.form == "bmm":
            pooled = torch.bmm(w.transpose(1, 2), h).squeeze(1)  # (B, 8)
        elif self.form == "matmul":
            pooled = (w.transpose(1, 2) @ h).squeeze(1)  # (B, 8)
        elif self.form == "method":
            pooled = w.transpose(1, 2).bmm(h).squeeze(1)  # (B, 8)
        else:  # rows of a: h^T (B, 8, T) @ a (T, T) mixing over time, then a mean
            mixed = torch.matmul(h.transpose(1, 2), self.mix.weight)  # (B, 8, T)
            pooled = mixed.mean(-1)  # (B, 8)
        return self.fc(pooled)  # (B, 2)


@settings(max_examples=examples(16), deadline=None)
@given(
    form=st.sampled_from(["bmm", "matmul", "method", "rows"]),
    layer=st.sampled_from(["lstm", "linear"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pooling_products_keep_the_features_gated(form: str, layer: str, seed: int) -> None:
    # before 2026-12-07: "node 'bmm' is an op gate_ does not prune through" (or "contracts or
    # keeps labelled channels" for @): the features were left whole
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 3, generator=gen)

    def factory() -> Pooled:
        torch.manual_seed(seed)
        return Pooled(form, layer)

    model = factory()
    summary = gate_(model, x)
    if layer == "lstm":
        assert summary.rnns, str(summary)
    else:
        assert any("lin" in producers for producers, _ in summary.channel_groups), str(summary)
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory, batches=(3,))


class Contracts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Linear(3, 8), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))  # (B, T, 8)
        gram = torch.bmm(h, h.transpose(1, 2))  # (B, T, T): sums over the features
        return self.fc(gram).mean(1)  # (B, 2)


@pytest.mark.parametrize("factory", [Contracts])
def test_a_product_over_the_features_keeps_them(factory: type[nn.Module]) -> None:
    summary = gate_(factory(), torch.randn(2, 5, 3))
    reasons = {p: why for producers, _, why in summary.ungated_groups for p in producers}
    assert "contracts or keeps labelled channels" in reasons["a"], str(summary)
