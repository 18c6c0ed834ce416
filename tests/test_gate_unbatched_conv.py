"""Convolutions run on unbatched inputs ``(C, *spatial)``: their channels are dimension 0, so
gate_ leaves them whole with a reason (it read dimension 1, a spatial one, as the channels:
the pruned model failed)."""

from __future__ import annotations

import pytest
import torch
from gating_helpers import check_pruned, randomise_gates
from torch import Tensor, nn

from gatedprune.gating import gate_


class _Unbatched(nn.Module):
    def __init__(self, conv: type[nn.Module]) -> None:
        super().__init__()
        self.pre = nn.Linear(7, 7)
        self.c1 = conv(2, 8, 3, padding=1)
        self.mid = nn.Identity()
        self.c2 = conv(8, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(self.mid(self.c1(torch.relu(self.pre(x)))))  # (4, *spatial)


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv1d, (2, 7)),
        (nn.Conv2d, (2, 7, 7)),
        (nn.Conv3d, (2, 5, 7, 7)),
        (nn.ConvTranspose2d, (2, 7, 7)),
    ],
)
def test_unbatched_convolutions_are_left_whole(
    conv: type[nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = _Unbatched(conv).eval()
    summary = gate_(model, x)
    assert summary.n_gates == 0
    reasons = {tuple(names): why for names, _, why in summary.ungated_groups}
    assert reasons[("c1",)] == f"c1 ({conv.__name__}) runs on an unbatched input"
    assert reasons[("pre",)] == f"c1 ({conv.__name__}) runs on an unbatched input"
    gen = torch.Generator().manual_seed(0)
    randomise_gates(model, gen)
    check_pruned(model, x, gen, factory=lambda: _Unbatched(conv))  # fresh x of the same shape


class _Batched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(torch.relu(self.c1(x)))  # (B, 4, H, W)


def test_the_same_convolutions_on_a_batch_are_gated() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 2, 7, 7)
    model = _Batched().eval()
    summary = gate_(model, x)
    assert summary.channel_groups == [(["c1"], 8)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        randomise_gates(model, gen)
        check_pruned(model, x, gen, factory=_Batched, batches=(1, 3))


@pytest.mark.parametrize("length", [7, 8])  # 8: as many positions as channels
def test_a_model_gated_on_batches_refuses_an_unbatched_call(length: int) -> None:
    """Gated on (B, C, H, W), a conv's gate scaled dimension 1 of an unbatched (C, H, W)
    call: a bare RuntimeError, or (H equal to the channel count) rows scaled as channels
    silently, 0.58 away from the pruned model (second audit)."""
    torch.manual_seed(0)
    model = _Batched().eval()
    gate_(model, torch.randn(2, 2, 7, 7))
    with pytest.raises(ValueError, match=r"'c1' \(Conv2d\) was called on an unbatched input"):
        model(torch.randn(2, length, 7))
