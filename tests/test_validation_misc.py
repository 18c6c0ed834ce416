"""Input validation: register_cost and the counts it (or ``flops_of``) returns, ResNet1d /
BasicBlock1d arguments, strict bool flags (``cost(hard=)``, ``export_onnx(check=)``),
export_onnx's folder and example input checks, fold_batchnorm on a PlainShortcutNet."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import gatedprune
from gatedprune import costs
from gatedprune.costs import CostProgram, attention_flops, recurrent_step_flops
from gatedprune.gating import BasicBlock1d, ResNet1d, gate_


@pytest.fixture(autouse=True)
def _restore_cost_table() -> Iterator[None]:
    """Handlers registered by a test do not leak into later ones."""
    saved = list(costs._HANDLERS)
    try:
        yield
    finally:
        costs._HANDLERS[:] = saved


class _Double(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


class _Leaf(nn.Module):
    """A leaf module counting itself with ``flops_of``, returning ``value``."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return x

    def flops_of(self, inputs: tuple[Tensor, ...], output: Tensor) -> Any:
        return self.value


LINEAR_8_8 = 2 * 8 * 8 + 8  # FLOPs of nn.Linear(8, 8) on one sample
X = torch.zeros(1, 8)


# ------------------------------------------------------------------ register_cost


@pytest.mark.parametrize(
    ("types", "error", "match"),
    [
        (None, TypeError, r"subclass of torch\.nn\.Module.*got None"),
        ((None,), TypeError, r"got None"),
        (int, TypeError, r"got <class 'int'>"),
        ((nn.Linear(2, 2),), TypeError, r"got Linear\(in_features=2"),
        ("Linear", TypeError, r"got 'Linear'"),
        ((), ValueError, r"at least one module class"),
    ],
)
def test_register_cost_refuses_bad_classes_and_leaves_the_table_intact(
    types: Any, error: type[Exception], match: str
) -> None:
    before = list(costs._HANDLERS)
    with pytest.raises(error, match=match):
        gatedprune.register_cost(types, lambda m, i, o: 0)
    after = list(costs._HANDLERS)
    assert after == before
    assert gatedprune.cost(nn.Linear(8, 2), X) == gatedprune.Cost(flops=34, params=18)


@pytest.mark.parametrize(
    ("handler", "match"),
    [
        (None, r"callable handler.*got None"),
        (5, r"callable handler.*got 5"),
        (lambda m: 0, r"three positional arguments \(module, inputs, output\)"),
        (lambda m, i, o, extra: 0, r"three positional arguments"),
    ],
)
def test_register_cost_refuses_bad_handlers(handler: Any, match: str) -> None:
    before = list(costs._HANDLERS)
    with pytest.raises(TypeError, match=match):
        gatedprune.register_cost((_Double,), handler)
    after = list(costs._HANDLERS)
    assert after == before


@pytest.mark.parametrize(
    ("bad", "error", "shown"),
    [
        (-5, ValueError, "-5"),
        (float("nan"), ValueError, "nan"),
        (float("inf"), ValueError, "inf"),
        (1.5, ValueError, "1.5"),
        ("abc", TypeError, "'abc'"),
        (True, TypeError, "True"),
        (None, TypeError, "None"),
        (torch.tensor([1, 2]), TypeError, "tensor"),
    ],
)
def test_a_registered_handler_returning_a_bad_count_is_an_error(
    bad: Any, error: type[Exception], shown: str
) -> None:
    gatedprune.register_cost((_Double,), lambda m, i, o: bad)
    with pytest.raises(error, match=r"registered for _Double returned .*_Double module") as info:
        gatedprune.cost(nn.Sequential(nn.Linear(8, 8), _Double()), X)
    assert shown in str(info.value)
    assert "whole number >= 0" in str(info.value)


@pytest.mark.parametrize("good", [12, 12.0, np.int64(12), np.float32(12.0), torch.tensor(12)])
def test_whole_counts_are_summed_as_ints(good: Any) -> None:
    gatedprune.register_cost(_Double, lambda m, i, o: good)  # a single class is fine too
    c = gatedprune.cost(nn.Sequential(nn.Linear(8, 8), _Double()), X)
    assert c == gatedprune.Cost(flops=LINEAR_8_8 + 12, params=72)
    assert type(c.flops) is int


@pytest.mark.parametrize(
    ("bad", "error"),
    [(-100, ValueError), (float("nan"), ValueError), (2.5, ValueError), ("7", TypeError)],
)
def test_flops_of_returning_a_bad_count_is_an_error(bad: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"_Leaf\.flops_of returned .* for a _Leaf module"):
        gatedprune.cost(nn.Sequential(nn.Linear(8, 8), _Leaf(bad)), X)


def test_flops_of_returning_a_whole_count_is_counted() -> None:
    for good in (7, 7.0, np.int32(7)):
        c = gatedprune.cost(nn.Sequential(nn.Linear(8, 8), _Leaf(good)), X)
        assert c == gatedprune.Cost(flops=LINEAR_8_8 + 7, params=72)


class _WithLeaf(nn.Module):
    def __init__(self, value: Any) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.leaf = _Leaf(value)
        self.b = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.b(self.leaf(torch.relu(self.a(x))))  # (B, 2)
        return y


def test_gated_cost_checks_flops_of_too() -> None:
    """gate_ records leaf costs through the same lookup: a bad count is refused there too."""
    with pytest.raises(ValueError, match=r"_Leaf\.flops_of returned -100"):
        gate_(_WithLeaf(-100), torch.randn(2, 4))
    gate_(_WithLeaf(7), torch.randn(2, 4))  # a whole count gates as before


# ------------------------------------------------------------------ strict flags in costs


def test_cost_hard_must_be_a_bool() -> None:
    torch.manual_seed(0)
    net, x = gatedprune.ShortcutMLP(8, [16, 16], 3), torch.randn(1, 8)
    bads: list[Any] = ["no", 0, 1, None, torch.tensor(True)]
    for bad in bads:
        with pytest.raises(TypeError, match="hard must be a bool"):
            gatedprune.cost(net, x, hard=bad)
    with pytest.raises(TypeError, match="hard must be a bool"):
        CostProgram.trace(net, x).evaluate(hard="no")  # type: ignore[arg-type]
    soft, hard = gatedprune.cost(net, x), gatedprune.cost(net, x, hard=True)
    assert isinstance(soft, gatedprune.ExpectedCost)
    assert isinstance(hard, gatedprune.ExpectedCost)
    assert float(soft.flops.detach()) != float(hard.flops)  # the flag matters here
    for flag, ref in ((np.bool_(True), hard), (np.bool_(False), soft)):
        got = gatedprune.cost(net, x, hard=flag)  # type: ignore[arg-type]
        assert isinstance(got, gatedprune.ExpectedCost)
        assert float(got.flops.detach()) == float(ref.flops.detach())
        assert float(got.params.detach()) == float(ref.params.detach())
    # a plain model: the flag is checked as well (it must not depend on the model)
    with pytest.raises(TypeError, match="hard must be a bool"):
        gatedprune.cost(nn.Linear(8, 2), x, hard="no")  # type: ignore[arg-type]


def test_cost_helpers_bias_flags_must_be_bools() -> None:
    with pytest.raises(TypeError, match="in_bias must be a bool"):
        attention_flops(1, 2, 2, (4, 4, 4, 4), 2, 2, "no", True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="out_bias must be a bool"):
        attention_flops(1, 2, 2, (4, 4, 4, 4), 2, 2, True, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bias must be a bool"):
        recurrent_step_flops(4, 13, 3, 2, bias="no")  # type: ignore[arg-type]
    flag: Any = np.bool_(True)
    assert attention_flops(1, 2, 2, (4, 4, 4, 4), 2, 2, flag, True) == 360
    assert recurrent_step_flops(4, 13, 3, 2, bias=flag) == 122


# ------------------------------------------------------------------ ResNet1d / BasicBlock1d


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"widths": (32.9, 64.9, 128.9)}, TypeError, r"widths\[0\] must be an int >= 1, got 32\.9"),
        ({"widths": (32.0, 64, 128)}, TypeError, r"widths\[0\] must be an int"),
        ({"blocks": (2.5, 2, 2)}, TypeError, r"blocks\[0\] must be an int >= 1, got 2\.5"),
        ({"blocks": (2, True, 2)}, TypeError, r"blocks\[1\] must be an int >= 1, got True"),
        ({"widths": (32, 0, 128)}, ValueError, r"widths\[1\] must be an int >= 1, got 0"),
        ({"blocks": (2, 2, -1)}, ValueError, r"blocks\[2\] must be an int >= 1, got -1"),
        ({"widths": "abc", "blocks": (1, 1, 1)}, TypeError, r"widths must be a sequence"),
        ({"widths": 32}, TypeError, r"widths must be a sequence of ints"),
        ({"widths": (8, 16), "blocks": (1,)}, ValueError, r"one entry per stage"),
        ({"widths": (), "blocks": ()}, ValueError, r"one entry per stage"),
        ({"num_classes": 0}, ValueError, r"num_classes must be an int >= 1, got 0"),
        ({"num_classes": 2.0}, TypeError, r"num_classes must be an int >= 1, got 2\.0"),
        ({"in_channels": True}, TypeError, r"in_channels must be an int >= 1, got True"),
        ({"in_channels": "1"}, TypeError, r"in_channels must be an int >= 1, got '1'"),
        ({"in_channels": 0}, ValueError, r"in_channels must be an int >= 1, got 0"),
        ({"kernel_size": -3}, ValueError, r"kernel_size must be a positive odd int, got -3"),
        ({"kernel_size": 4}, ValueError, r"kernel_size must be a positive odd int, got 4"),
        ({"kernel_size": 3.0}, TypeError, r"kernel_size must be a positive odd int, got 3\.0"),
    ],
)
def test_resnet1d_refuses_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ResNet1d(**kwargs)


def test_resnet1d_accepts_numpy_ints_and_builds_the_same_network() -> None:
    torch.manual_seed(0)
    ref = ResNet1d(2, 5, widths=(4, 8), blocks=(1, 2), kernel_size=5)
    torch.manual_seed(0)
    net = ResNet1d(
        np.int64(2),  # type: ignore[arg-type]
        np.int32(5),  # type: ignore[arg-type]
        widths=np.array([4, 8]),  # type: ignore[arg-type]
        blocks=[np.int64(1), 2],  # type: ignore[list-item]
        kernel_size=np.int64(5),  # type: ignore[arg-type]
    )
    assert str(net) == str(ref)
    for (k, a), (k2, b) in zip(net.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2
        assert torch.equal(a, b)
    stem: Any = net.stem[0]
    assert type(stem.in_channels) is int
    x = torch.randn(3, 2, 16)
    assert torch.equal(net.eval()(x), ref.eval()(x))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((8, 16, 1, -3), ValueError, r"kernel_size must be a positive odd int, got -3"),
        ((8, 16, 0), ValueError, r"stride must be an int >= 1, got 0"),
        ((8.0, 16), TypeError, r"c_in must be an int >= 1, got 8\.0"),
        ((8, 0), ValueError, r"c_out must be an int >= 1, got 0"),
    ],
)
def test_basic_block_refuses_bad_arguments(
    args: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        BasicBlock1d(*args)


# ------------------------------------------------------------------ fold_batchnorm


def test_fold_batchnorm_points_a_plain_shortcut_net_to_its_own_method() -> None:
    torch.manual_seed(0)
    small = gatedprune.prune(gatedprune.ShortcutConv1d(1, [[4], [4]], 3, input_length=8).eval())
    assert isinstance(small, gatedprune.PlainShortcutNet)
    with pytest.raises(TypeError, match=r"PlainShortcutNet.*model\.fold_batchnorm\(\)"):
        gatedprune.fold_batchnorm(small)
    wrapped = nn.Sequential(small, nn.ReLU())
    with pytest.raises(TypeError, match=r"get_submodule\('0'\)\.fold_batchnorm\(\)"):
        gatedprune.fold_batchnorm(wrapped)
    folded = small.fold_batchnorm()  # the method the message names does the job
    x = torch.randn(2, 1, 8)
    with torch.no_grad():
        assert float((folded.eval()(x) - small.eval()(x)).abs().max()) <= 1e-5


def test_fold_batchnorm_asks_to_prune_a_gated_shortcut_net_first() -> None:
    with pytest.raises(TypeError, match=r"ShortcutMLP still has gates: prune it first"):
        gatedprune.fold_batchnorm(gatedprune.ShortcutMLP(8, [16], 3))


# ------------------------------------------------------------------ export_onnx


@pytest.fixture
def small() -> nn.Module:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    return gatedprune.prune(gatedprune.ShortcutMLP(8, [16], 3).eval()).eval()


@pytest.mark.parametrize("bad", ["no", 0, 1, None])
def test_export_onnx_check_must_be_a_bool(small: nn.Module, tmp_path: Path, bad: Any) -> None:
    with pytest.raises(TypeError, match="check must be a bool"):
        gatedprune.export_onnx(small, torch.randn(2, 8), tmp_path / "m.onnx", check=bad)
    assert not list(tmp_path.iterdir())


def test_export_onnx_accepts_a_numpy_bool_check(small: nn.Module, tmp_path: Path) -> None:
    path = gatedprune.export_onnx(
        small,
        torch.randn(2, 8),
        tmp_path / "m.onnx",
        check=np.bool_(False),  # type: ignore[arg-type]
    )
    assert path.is_file()


def test_export_onnx_refuses_a_missing_folder_like_save(small: nn.Module, tmp_path: Path) -> None:
    missing = tmp_path / "newdir"
    with pytest.raises(FileNotFoundError, match=rf"the folder {missing} does not exist"):
        gatedprune.export_onnx(small, torch.randn(2, 8), missing / "m.onnx")
    assert not missing.exists()  # not created
    plain_file = tmp_path / "plainfile"
    plain_file.write_text("")
    with pytest.raises(NotADirectoryError, match=rf"{plain_file} is not a directory"):
        gatedprune.export_onnx(small, torch.randn(2, 8), plain_file / "m.onnx")
    with pytest.raises(ValueError, match="names a folder"):
        gatedprune.export_onnx(small, torch.randn(2, 8), f"{tmp_path}/out/")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plainfile"]


def test_export_onnx_names_the_shape_of_a_wrong_example(small: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model fails on example_input of shape \(2, 9\)"):
        gatedprune.export_onnx(small, torch.randn(2, 9), tmp_path / "w.onnx")
    with pytest.raises(ValueError, match=r"of shape \(2, 8, 3\)"):
        gatedprune.export_onnx(small, torch.randn(2, 8, 3), tmp_path / "w.onnx")
    assert not list(tmp_path.iterdir())


def test_flops_count_doc_values() -> None:
    assert costs.flops_count(math.ldexp(1.0, 60), "x", nn.Identity()) == 2**60
    assert costs.flops_count(-0.0, "x", nn.Identity()) == 0
