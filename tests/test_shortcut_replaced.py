"""ShortcutConv1d / ShortcutMLP whose layer ops (or head) were replaced by modules of other
settings: the gated forward, cost and prune use only their weights with the spec's sizes, so
every mismatch must be refused (by the forward, cost, Budget and prune), naming the layer and
the attribute."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gatedprune as gp

X_CONV = torch.randn(2, 1, 16)
X_MLP = torch.randn(2, 8)


def _conv() -> gp.ShortcutConv1d:
    torch.manual_seed(0)
    return gp.ShortcutConv1d(1, [[8, 8], [16]], 4, input_length=16).eval()


def _mlp() -> gp.ShortcutMLP:
    torch.manual_seed(0)
    return gp.ShortcutMLP(8, [8, 8], 3).eval()


def _prune(net: nn.Module, x: Tensor) -> Any:
    return gp.prune(net)


def _cost(net: nn.Module, x: Tensor) -> Any:
    return gp.cost(net, x)


def _budget(net: nn.Module, x: Tensor) -> Any:
    return gp.Budget(net, x[:1], flops=0.5)


def _forward(net: nn.Module, x: Tensor) -> Any:
    return net(x)  # before: another stride or padding was silently computed with the spec's


ENTRY_POINTS: list[Callable[[nn.Module, Tensor], Any]] = [_prune, _cost, _budget, _forward]

# layer 1 of _conv() reads 1 + 8 = 9 channels and has 8, kernel 5, padding 2
CONV_CHANGES: list[tuple[dict[str, Any], str]] = [
    ({"stride": 2}, "stride=(2,), expected (1,)"),
    ({"dilation": 2, "padding": 4}, "dilation=(2,), expected (1,)"),
    ({"padding": 3}, "padding=(3,), expected (2,)"),
    ({"padding_mode": "circular"}, "padding_mode='circular', expected 'zeros'"),
    ({"kernel_size": 3, "padding": 1}, "kernel_size=(3,), expected (5,)"),
    ({"groups": 1, "in_channels": 18}, "in_channels=18, expected 9"),
    ({"out_channels": 4}, "out_channels=4, expected 8"),
]


def _replace_conv(net: gp.ShortcutConv1d, change: dict[str, Any]) -> None:
    kw: dict[str, Any] = {"in_channels": 9, "out_channels": 8, "kernel_size": 5, "padding": 2}
    kw.update(change)
    net.layers[1].op = nn.Conv1d(**kw)


@pytest.mark.parametrize(("change", "message"), CONV_CHANGES)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_replaced_conv_is_refused(
    entry: Callable[[nn.Module, Tensor], Any], change: dict[str, Any], message: str
) -> None:
    # before: stride/dilation/padding/padding_mode were ignored (forward, cost and prune used
    # the spec's: a pruned model that silently computes another function than the module's
    # settings say); other sizes gave a wrong cost or an unclear shape error
    net = _conv()
    _replace_conv(net, change)
    with pytest.raises(ValueError, match=r"layer 1's op has .*" + _escape(message)):
        entry(net, X_CONV)


def test_replaced_conv_kernel_forward_error_names_the_layer() -> None:
    net = _conv()
    _replace_conv(net, {"kernel_size": 3, "padding": 1})
    with pytest.raises(ValueError, match=r"layer 1's op has kernel_size=\(3,\), expected \(5,\)"):
        net(X_CONV)


def test_groups_mismatch_is_refused() -> None:
    net = _conv()
    net.layers[0].op = nn.Conv1d(1, 8, 5, padding=2, groups=1)  # the same: accepted
    gp.prune(net)
    net.layers[2].op = nn.Conv1d(17, 17, 5, padding=2, groups=17)
    with pytest.raises(ValueError, match=r"layer 2's op has .*groups=17, expected 1"):
        gp.prune(net)


def test_replaced_conv_weight_of_other_shape_is_refused() -> None:
    net = _conv()
    op = net.layers[0].op
    op.weight = nn.Parameter(torch.randn(8, 1, 3))
    with pytest.raises(ValueError, match=r"layer 0's op has weight\.shape=\(8, 1, 3\)"):
        gp.prune(net)


def test_equivalent_replacement_still_prunes_exactly() -> None:
    net = _conv()
    old = net.layers[1].op
    new = nn.Conv1d(9, 8, 5, padding=2)
    new.load_state_dict(old.state_dict())
    net.layers[1].op = new
    small = gp.prune(net)
    torch.testing.assert_close(small(X_CONV), net(X_CONV))
    with torch.no_grad():
        assert float(gp.cost(net, X_CONV).flops) > 0


@pytest.mark.parametrize(
    ("shape", "message"),
    [((9, 8), "in_features=9, expected 16"), ((16, 6), "out_features=6, expected 8")],
)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_replaced_linear_is_refused(
    entry: Callable[[nn.Module, Tensor], Any], shape: tuple[int, int], message: str
) -> None:
    # before: an unclear matmul shape error from inside the forward
    net = _mlp()
    net.layers[1].op = nn.Linear(*shape)
    with pytest.raises(ValueError, match=r"layer 1's op has .*" + _escape(message)):
        entry(net, X_MLP)


def test_replaced_linear_weight_shape_is_refused() -> None:
    # before: an unclear matmul shape error from inside the forward (prune and cost run it)
    net = _mlp()
    net.layers[0].op.weight = nn.Parameter(torch.randn(8, 5))
    for entry in (lambda: net(X_MLP), lambda: gp.prune(net), lambda: gp.cost(net, X_MLP)):
        with pytest.raises(ValueError, match=r"layer 0's op has weight\.shape=\(8, 5\)"):
            entry()


def test_replaced_head_is_refused() -> None:
    # before: prune copied a (3, 24) head into the (3, 24) plain one: silently another network
    # if the replacement had other settings; with other sizes an unclear copy error
    net = _mlp()
    net.head = nn.Linear(24, 5)
    with pytest.raises(ValueError, match=r"the head has out_features=5, expected 3"):
        gp.prune(net)
    with pytest.raises(ValueError, match=r"the head has out_features=5, expected 3"):
        gp.cost(net, X_MLP)
    net.head = nn.Linear(24, 3, bias=False)
    with pytest.raises(TypeError, match="the head is Linear"):
        gp.prune(net)


def _escape(text: str) -> str:
    import re

    return re.escape(text)
