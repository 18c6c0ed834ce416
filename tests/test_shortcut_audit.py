"""Audit regressions: shortcut networks, their pruned form, gates and the demo CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

import gatedprune as gp
from gatedprune import cli
from gatedprune.gates import HardConcreteGate, SigmoidGate


def _batchnorms(net: nn.Module) -> list[nn.BatchNorm1d]:
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]


@pytest.mark.parametrize("spatial", [False, True])
def test_prune_keeps_the_train_mode_and_frozen_batchnorms(spatial: bool) -> None:
    torch.manual_seed(0)
    net: gp.ShortcutMLP | gp.ShortcutConv1d
    if spatial:
        net = gp.ShortcutConv1d(1, [[4, 4], [6]], 3, kernel_size=3, input_length=16)
        x = torch.randn(5, 1, 16)  # (B, C, L)
    else:
        net = gp.ShortcutMLP(4, [3, 5], 2, norm=True)
        x = torch.randn(5, 4)  # (B, F)
    net.train()
    frozen = _batchnorms(net)[0]
    frozen.eval()  # fine-tuning with a frozen BatchNorm
    small = gp.prune(net)
    # the gated network's modules keep their own modes
    assert net.training
    assert not frozen.training
    assert all(bn.training for bn in _batchnorms(net) if bn is not frozen)
    # the pruned copy is in the same mode, each BatchNorm as its counterpart
    assert small.training
    assert [bn.training for bn in _batchnorms(small)] == [bn.training for bn in _batchnorms(net)]
    net.eval()
    small.eval()
    with torch.no_grad():
        assert float((small(x) - net(x)).abs().max()) <= 1e-5


def test_pruned_net_refuses_bad_inputs_clearly() -> None:
    conv = gp.prune(gp.ShortcutConv1d(1, [[3], [3], [3]], 2).eval())
    with pytest.raises(ValueError, match=r"L >= 4.*got \(2, 1, 3\)"):
        conv(torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match=r"L >= 4.*got \(2, 1, 0\)"):
        conv(torch.zeros(2, 1, 0))
    with pytest.raises(TypeError, match=r"floating-point input, got dtype torch\.int64"):
        conv(torch.zeros(2, 1, 8, dtype=torch.long))
    mlp = gp.prune(gp.ShortcutMLP(4, [3], 2).eval())
    with pytest.raises(TypeError, match=r"torch\.Tensor input, got list"):
        mlp([[0.0] * 4])
    with pytest.raises(TypeError, match=r"floating-point input, got dtype torch\.int64"):
        mlp(torch.zeros(2, 4, dtype=torch.long))
    # the shortest length every stage accepts still runs, on both paths
    with torch.no_grad():
        assert conv(torch.zeros(2, 1, 4)).shape == (2, 2)
        assert conv(torch.zeros(20, 1, 4)).shape == (20, 2)


def test_numpy_integer_unit_group_is_accepted_like_the_sizes() -> None:
    np = pytest.importorskip("numpy")
    net = gp.ShortcutConv1d(1, [[np.int64(8)]], 2, unit_group=np.int64(4))
    assert net.unit_group == 4
    assert type(net.unit_group) is int
    gate = HardConcreteGate(6, group=np.int32(3))
    assert gate.group == 3
    assert type(gate.group) is int
    with pytest.raises(TypeError, match="unit_group must be a positive int"):
        gp.ShortcutMLP(4, [4], 2, unit_group=2.0)  # type: ignore[arg-type]


def test_force_takes_sequences_and_refuses_masks_that_are_not_binary() -> None:
    for g in (HardConcreteGate(4), SigmoidGate(4)):
        g.force_([True, False, True, False])  # type: ignore[arg-type]
        assert g.is_open().tolist() == [True, False, True, False]
        g.force_(torch.tensor([0, 1, 1, 0]))  # 0/1 integers read as closed/open
        assert g.is_open().tolist() == [False, True, True, False]
        for bad in (torch.tensor([0.5, 0.0, 1.0, 1.0]), torch.tensor([float("nan"), 0, 1, 1])):
            with pytest.raises(ValueError, match="open_mask must hold bools"):
                g.force_(bad)
        with pytest.raises(TypeError, match="open_mask must be a bool tensor"):
            g.force_(object())  # type: ignore[arg-type]
        assert g.is_open().tolist() == [False, True, True, False]  # left unchanged


def test_prune_refuses_replaced_normalisation_instead_of_changing_the_function() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 4)  # (B, F)
    added = gp.ShortcutMLP(4, [3, 3], 2, norm=False).eval()
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.running_mean.fill_(-5.0)  # the forward calls it: the function changes
    added.layers[0].norm = bn
    with pytest.raises(TypeError, match="layer 0 was built without normalisation"):
        gp.prune(added)
    removed = gp.ShortcutMLP(4, [3, 3], 2, norm=True).eval()
    removed.layers[1].norm = None
    with pytest.raises(TypeError, match=r"layer 1's norm is None.*BatchNorm1d\(3\)"):
        gp.prune(removed)
    replaced = gp.ShortcutConv1d(1, [[4, 4]], 2, input_length=8).eval()
    replaced.layers[0].norm = nn.Identity()
    with pytest.raises(TypeError, match="layer 0's norm is Identity"):
        gp.prune(replaced)
    no_stats = gp.ShortcutConv1d(1, [[4, 4]], 2, input_length=8).eval()
    no_stats.layers[1].norm = nn.BatchNorm1d(4, track_running_stats=False)
    with pytest.raises(TypeError, match="running statistics"):
        gp.prune(no_stats)
    linear = gp.ShortcutMLP(4, [3], 2).eval()
    linear.layers[0].op = nn.Linear(4, 3, bias=False)
    with pytest.raises(TypeError, match="layer 0's op"):
        gp.prune(linear)
    # replacing the weights (not the modules) stays supported
    ok = gp.ShortcutMLP(4, [3, 3], 2, norm=True).eval()
    with torch.no_grad():
        ok.layers[0].norm.running_mean.fill_(-5.0)
    with torch.no_grad():
        assert float((gp.prune(ok).eval()(x) - ok(x)).abs().max()) <= 1e-5


def test_demo_out_must_be_creatable_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    for text in (str(afile / "sub"), str(afile / "sub" / "deeper")):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a directory"):
            cli._out_dir(text)
    for text in ("", "  "):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a directory path"):
            cli._out_dir(text)
    assert cli._out_dir(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"
    monkeypatch.chdir(tmp_path)
    assert cli._out_dir("relative/out") == Path("relative/out")
    # through the parser: a usage error (exit 2) before anything runs
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["demo", "--out", str(afile / "sub")])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("hard", [False, True])
def test_expected_cost_refuses_input_shapes_the_network_cannot_take(hard: bool) -> None:
    conv = gp.ShortcutConv1d(1, [[4], [4], [4]], 2)
    for shape in ((1, 40), (1, 1, 2), (1, 2, 40), (-1, 1, 40), (1, 1, 40, 3)):
        with pytest.raises(ValueError, match=r"input_shape \(B, 1, L\) with L >= 4"):
            conv.expected_cost(shape, hard=hard)
        with pytest.raises(ValueError, match=r"input_shape \(B, 1, L\)"):
            conv.expected_latency(shape, [1.0] * 7, hard=hard)
    with pytest.raises(TypeError, match="input_shape must be a sequence of ints"):
        conv.expected_cost((1.5, 1, 40), hard=hard)
    mlp = gp.ShortcutMLP(4, [3], 2)
    for shape in ((1,), (1, 5), (1, 4, 3)):
        with pytest.raises(ValueError, match=r"input_shape \(B, 4\)"):
            mlp.expected_cost(shape, hard=hard)
    # shapes of real inputs still work, and agree with cost()
    x = torch.randn(3, 1, 40)  # (B, C, L)
    flops, _ = conv.expected_cost(x.shape, hard=hard)
    assert float(flops.detach()) == pytest.approx(float(gp.cost(conv, x, hard=hard).flops.detach()))


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_gated_networks_pickle_with_every_activation(activation: str) -> None:
    import io

    torch.manual_seed(0)
    for net in (
        gp.ShortcutMLP(4, [3, 3], 2, activation=activation),  # type: ignore[arg-type]
        gp.ShortcutConv1d(1, [[3], [3]], 2, activation=activation),  # type: ignore[arg-type]
    ):
        net.eval()
        buf = io.BytesIO()
        torch.save(net, buf)  # the identity activation was a lambda: not picklable
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        x = torch.randn(3, 4) if isinstance(net, gp.ShortcutMLP) else torch.randn(3, 1, 8)
        with torch.no_grad():
            assert torch.equal(loaded(x), net(x))
            assert float((gp.prune(loaded)(x) - net(x)).abs().max()) <= 1e-5


def test_unknown_gate_kind_as_an_array_is_a_clear_error() -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match="unknown gate kind"):
        gp.ShortcutMLP(4, [3], 2, gate=np.array(["sigmoid", "x"]))  # type: ignore[arg-type]


@pytest.mark.parametrize("spatial", [False, True])
def test_an_input_of_another_dtype_is_a_clear_error_outside_autocast(spatial: bool) -> None:
    torch.manual_seed(0)
    net: gp.ShortcutMLP | gp.ShortcutConv1d
    if spatial:
        net = gp.ShortcutConv1d(1, [[4], [4]], 3, kernel_size=3)
        x = torch.randn(32, 1, 16)  # (B, C, L): batch >= 16 takes the channels-last path too
    else:
        net = gp.ShortcutMLP(4, [3, 5], 2)
        x = torch.randn(32, 4)  # (B, F)
    net.eval()
    plain = gp.prune(net)
    for model in (net, plain):
        with pytest.raises(ValueError, match=r"input dtype \(torch.float64\).*\(torch.float32\)"):
            model(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for itself
            assert model(x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(plain.double()(x.double()), net.double()(x.double()))


def test_fold_batchnorm_keeps_channels_last_switched_off() -> None:
    net = gp.ShortcutConv1d(1, [[4], [4]], 3, kernel_size=3).eval()
    plain = gp.prune(net)
    plain.channels_last = False
    assert plain.fold_batchnorm().channels_last is False
    plain.channels_last = True
    assert plain.fold_batchnorm().channels_last is True


def test_a_demo_option_error_prints_the_demo_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--model", "lstm", "--latency"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gatedprune demo"), err
    assert "--latency applies to --model conv" in err


def test_prune_refuses_gates_with_nan_or_inf_parameters() -> None:
    net = gp.ShortcutMLP(4, [3, 5], 2).eval()
    gp.prune(net)  # finite gates: fine
    with torch.no_grad():
        net.layers[1].unit_gate.log_alpha[2] = float("nan")
    with pytest.raises(ValueError, match=r"'layers\.1\.unit_gate\.log_alpha' holds 1 NaN"):
        gp.prune(net)
    wrapper = nn.Sequential(nn.Identity(), net)  # a model that holds the gated network
    with pytest.raises(ValueError, match=r"'1\.layers\.1\.unit_gate\.log_alpha'"):
        gp.prune(wrapper)


def test_prune_accepts_gates_fixed_by_infinite_parameters() -> None:
    net = gp.ShortcutMLP(4, [3, 5], 2).eval()
    with torch.no_grad():
        net.layers[1].unit_gate.log_alpha[2] = float("-inf")  # closed for good
        net.layers[1].unit_gate.log_alpha[3] = float("inf")  # open for good
    x = torch.randn(6, 4)  # (B, F)
    plain = gp.prune(net)
    torch.testing.assert_close(plain(x), net(x), rtol=0, atol=1e-5)
    assert plain.layers[1].op.out_features == 4


def test_prune_refuses_nan_gates_of_gate_models_too() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    gp.gate_(model, torch.randn(2, 4))
    gates = [(n, m) for n, m in model.named_modules() if isinstance(m, HardConcreteGate)]
    assert gates
    with torch.no_grad():
        next(gates[0][1].parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"'{gates[0][0]}\..*' holds 1 NaN"):
        gp.prune(model)


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_gates_of_another_dtype_than_the_weights_are_refused(
    spatial: bool, dtype: torch.dtype
) -> None:
    # before: float64 gates failed deep in F.linear / conv1d, float16 ones were promoted
    net: gp.ShortcutMLP | gp.ShortcutConv1d = (
        gp.ShortcutConv1d(1, [[4], [4]], 3) if spatial else gp.ShortcutMLP(5, [6], 3)
    )
    x = torch.randn(2, 1, 16) if spatial else torch.randn(2, 5)
    for g in gp.gate_modules(net):
        g.to(dtype)
    match = rf"gate parameter '.*' is {dtype}, but the network's weights are torch.float32"
    with pytest.raises(ValueError, match=match):
        net(x)
    with pytest.raises(ValueError, match=match):
        gp.prune(net.eval())
    with pytest.raises(ValueError, match=match):
        gp.Budget(net, x[:1], flops=0.5)
    net.to(dtype)  # the whole network converted: fine
    assert net(x.to(dtype)).dtype == dtype
