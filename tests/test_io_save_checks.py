"""gatedprune.save refuses, before writing, every model gatedprune.load would refuse or rebuild
differently (load's own rules); replaced activations and BatchNorm settings of a pruned
PlainShortcutNet round-trip; save's error messages; OffsetConv1d's argument checks."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gatedprune as gp
from gatedprune import io
from gatedprune import plain as plain_module
from gatedprune.plain import OffsetConv1d, PlainShortcutNet
from gatedprune.plain_recurrent import PlainShortcutLSTM, RecurrentLayerSpec, RecurrentSpec


# ---------------------------------------------------------------------- helpers
def _mlp() -> PlainShortcutNet:
    torch.manual_seed(0)
    net = gp.prune(gp.ShortcutMLP(8, [16, 16], 3).eval())
    assert isinstance(net, PlainShortcutNet)
    return net


def _conv() -> PlainShortcutNet:
    """A pruned spatial net with BatchNorm whose running statistics are not the defaults."""
    torch.manual_seed(1)
    net = gp.prune(gp.ShortcutConv1d(1, [[8], [8]], 3, input_length=16).eval())
    assert isinstance(net, PlainShortcutNet)
    gen = torch.Generator().manual_seed(2)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            assert m.running_mean is not None
            assert m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net


def _rnn() -> PlainShortcutLSTM:
    torch.manual_seed(3)
    spec = RecurrentSpec("rnn", 3, (RecurrentLayerSpec((0,), 4, 0),), (1,), 2, (4,))
    return PlainShortcutLSTM(spec).eval()


def _first_linear(m: nn.Module) -> nn.Linear:
    return next(x for x in m.modules() if isinstance(x, nn.Linear))


def _layer(net: nn.Module, i: int) -> Any:
    """Layer ``i`` of a plain net, untyped (its modules are replaced and edited here)."""
    return net.layers[i]  # type: ignore[index]


def _good_file(path: Path) -> bytes:
    """A loadable model file at ``path``; returns its bytes."""
    io.save(_mlp(), path)
    io.load(path)
    return path.read_bytes()


def _assert_refused_and_intact(
    model: nn.Module, path: Path, error: type[Exception], match: str
) -> None:
    """save refuses ``model`` and leaves the file at ``path`` byte-identical, no temp file."""
    before = path.read_bytes()
    with pytest.raises(error, match=match):
        io.save(model, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left
    io.load(path)  # still the good model


def _write_like_save(model: nn.Module, path: Path, version: int = 1) -> None:
    """What save wrote before it checked anything: the model's config and state_dict."""
    meta = {
        "format": io.MODEL_FORMAT,
        "format_version": version,
        "kind": io._KIND_OF_CLASS[type(model)],
        "config": model.to_config(),  # type: ignore[operator]
        "gatedprune_version": "0",
    }
    io.write_tensors(path, model.state_dict(), meta)


# ---------------------------------------------------------------------- 1. unloadable models
def _half_layer(m: nn.Module) -> None:
    _first_linear(m).half()


def _double_but_one_float_layer(m: nn.Module) -> None:
    m.double()
    _first_linear(m).float()


def _extra_buffer(m: nn.Module) -> None:
    m.register_buffer("calib", torch.zeros(3))


def _bias_none(m: nn.Module) -> None:
    setattr(_first_linear(m), "bias", None)  # noqa: B010 (typed as a Parameter)


def _weight_of_another_shape(m: nn.Module) -> None:
    _first_linear(m).weight = nn.Parameter(torch.zeros(5, 8))


UNLOADABLE: list[tuple[str, Callable[[nn.Module], None], str]] = [
    (
        "one layer cast to float16",
        _half_layer,
        r"mix floating-point dtypes .*torch\.float16: 'layers\.0\.op\.weight', "
        r"'layers\.0\.op\.bias' \(2 tensors\)",
    ),
    (
        "float64 model with one float32 layer",
        _double_but_one_float_layer,
        r"mix floating-point dtypes .*torch\.float32: 'layers\.0\.op\.weight', "
        r"'layers\.0\.op\.bias' \(2 tensors\)",
    ),
    ("an extra registered buffer", _extra_buffer, r"unexpected \['calib'\]"),
    ("a bias set to None", _bias_none, r"module 'layers\.0\.op' is Linear\(.*bias=False\)"),
    (
        "a weight of another shape",
        _weight_of_another_shape,
        r"tensor 'layers\.0\.op\.weight' has shape \(5, 8\), .* needs \(16, 8\)",
    ),
]


@pytest.mark.parametrize(("label", "edit", "match"), UNLOADABLE, ids=[u[0] for u in UNLOADABLE])
def test_save_refuses_what_load_would_refuse_and_keeps_the_old_file(
    tmp_path: Path, label: str, edit: Callable[[nn.Module], None], match: str
) -> None:
    path = tmp_path / "model.safetensors"
    _good_file(path)
    model = _mlp()
    edit(model)
    _assert_refused_and_intact(model, path, ValueError, "^save: .*" + match)
    # the same rules as load's: written without save's checks, load refuses the file
    raw = tmp_path / "raw.safetensors"
    _write_like_save(model, raw)
    with pytest.raises(ValueError, match=str(raw)):
        io.load(raw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_model_of_one_other_dtype_still_round_trips(tmp_path: Path, dtype: torch.dtype) -> None:
    model = _conv().to(dtype)
    path = tmp_path / "m.safetensors"
    io.save(model, path)
    loaded = io.load(path)
    assert all(t.dtype == dtype for t in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.fixture
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Classes registered by a test stay out of the module's registry."""
    monkeypatch.setattr(io, "_CLASS_OF_KIND", dict(io._CLASS_OF_KIND))
    monkeypatch.setattr(io, "_KIND_OF_CLASS", dict(io._KIND_OF_CLASS))


@pytest.mark.usefixtures("own_registry")
def test_save_refuses_a_mixed_model_of_a_registered_user_class(tmp_path: Path) -> None:

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def to_config(self) -> dict[str, Any]:
            return {}

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> Two:
            return cls()

    io.register_model_class("two", Two)
    path = tmp_path / "two.safetensors"
    io.save(Two(), path)
    mixed = Two()
    mixed.b.double()
    _assert_refused_and_intact(mixed, path, ValueError, r"torch\.float64: 'b\.weight', 'b\.bias'")


@pytest.mark.usefixtures("own_registry")
def test_save_refuses_a_config_that_is_not_json(tmp_path: Path) -> None:

    class Odd(nn.Linear):
        def to_config(self) -> dict[str, Any]:
            return {"n": object()}

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> Odd:
            return cls(2, 2)

    io.register_model_class("odd", Odd)
    with pytest.raises(TypeError, match=r"^save: Odd\.to_config\(\) must return JSON"):
        io.save(Odd(2, 2), tmp_path / "odd.safetensors")
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------- 2. replaced modules
def test_replaced_activations_and_batchnorm_settings_round_trip(tmp_path: Path) -> None:
    model = _conv()
    _layer(model, 0).act = nn.Tanh()
    _layer(model, 1).act = nn.Identity()
    _layer(model, 0).norm.momentum = None
    _layer(model, 1).norm.eps = 0.1
    path = tmp_path / "m.safetensors"
    io.save(model, path)
    loaded = io.load(path)
    assert isinstance(loaded, PlainShortcutNet)
    assert [type(_layer(loaded, i).act) for i in range(2)] == [nn.Tanh, nn.Identity]
    norms = [_layer(loaded, i).norm for i in range(2)]
    assert [(n.eps, n.momentum) for n in norms] == [(1e-5, None), (0.1, 0.1)]
    x = torch.randn(32, 1, 16)  # 32 >= CHANNELS_LAST_MIN_BATCH: the channels-last path too
    with torch.no_grad():
        assert torch.equal(loaded(x[:4]), model(x[:4]))
        assert torch.equal(loaded(x), model(x))
        assert float((loaded(x) - _conv()(x)).abs().max()) > 1e-3  # the changes matter
    _, meta = io.read_tensors(path)
    assert meta["format_version"] == 2  # older readers refuse it instead of ignoring them
    assert meta["config"]["overrides"] == {
        "activation": ["tanh", "identity"],
        "norm_eps": [1e-5, 0.1],
        "norm_momentum": [None, 0.1],
    }


def test_an_unchanged_model_is_written_as_before(tmp_path: Path) -> None:
    model = _conv()
    path = tmp_path / "m.safetensors"
    io.save(model, path)
    _, meta = io.read_tensors(path)
    assert meta["format_version"] == 1
    assert meta["config"] == model.spec.to_json()  # no "overrides": old versions read it


def test_files_of_older_versions_still_load(tmp_path: Path) -> None:
    model = _conv()
    path = tmp_path / "old.safetensors"
    _write_like_save(model, path, version=1)  # what gatedprune wrote before overrides
    loaded = io.load(path)
    x = torch.randn(3, 1, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_the_overrides_key_is_the_one_io_versions_by() -> None:
    assert plain_module._OVERRIDES == io.OVERRIDES_KEY


@pytest.mark.parametrize(
    ("label", "edit", "match"),
    [
        (
            "another activation class",
            lambda m: setattr(m.layers[0], "act", nn.LeakyReLU()),
            r"module 'layers\.0\.act' is LeakyReLU\(negative_slope=0\.01\), but load would "
            r"rebuild ReLU\(\)",
        ),
        (
            "a known activation with other settings",
            lambda m: setattr(m.layers[1], "act", nn.GELU(approximate="tanh")),
            r"module 'layers\.1\.act' is GELU\(approximate='tanh'\)",
        ),
        (
            "a dilated convolution",
            lambda m: setattr(m.layers[0].op, "dilation", (2,)),
            r"module 'layers\.0\.op' is Conv1d\(1, 8, .*dilation=\(2,\)\), but load would "
            r"rebuild Conv1d\(1, 8, kernel_size=\(5,\), stride=\(1,\), padding=\(2,\)\)",
        ),
        (
            "a BatchNorm without running statistics",
            lambda m: setattr(m.layers[0], "norm", nn.BatchNorm1d(8, track_running_stats=False)),
            r"module 'layers\.0\.norm' is BatchNorm1d\(.*track_running_stats=False\)",
        ),
        (
            "an added submodule",
            lambda m: setattr(m, "extra", nn.ReLU()),
            r"the submodules of this PlainShortcutNet differ .*\(added \['extra'\], missing \[\]\)",
        ),
    ],
)
def test_save_refuses_modules_the_config_cannot_describe(
    tmp_path: Path, label: str, edit: Callable[[Any], None], match: str
) -> None:
    path = tmp_path / "model.safetensors"
    _good_file(path)
    model = _conv()
    edit(model)
    _assert_refused_and_intact(model, path, ValueError, "^save: " + match)


def test_a_sync_batchnorm_model_saves_as_its_batchnorm_model(tmp_path: Path) -> None:
    model = _conv()
    convert: Any = nn.SyncBatchNorm.convert_sync_batchnorm
    sync = convert(copy.deepcopy(model)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    path = tmp_path / "m.safetensors"
    io.save(sync, path)
    loaded = io.load(path)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in loaded.modules())
    x = torch.randn(3, 1, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_replaced_recurrent_layer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rnn.safetensors"
    io.save(_rnn(), path)
    model = _rnn()
    relu = nn.RNN(3, 4, nonlinearity="relu", batch_first=True)
    relu.load_state_dict(model.layers[0].state_dict())
    model.layers[0] = relu  # same tensors, another function; its repr does not show it
    _assert_refused_and_intact(
        model,
        path,
        ValueError,
        r"^save: module 'layers\.0' is RNN\(.*nonlinearity='relu', mode='RNN_RELU'\), but load "
        r"would rebuild RNN\(.*nonlinearity='tanh'",
    )
    flipped = _rnn()
    _layer(flipped, 0).batch_first = False
    _assert_refused_and_intact(
        flipped,
        path,
        ValueError,
        r"module 'layers\.0' is RNN\(3, 4, nonlinearity='tanh', .*but load would rebuild "
        r"RNN\(3, 4, batch_first=True, ",
    )


def test_fold_batchnorm_keeps_a_replaced_activation() -> None:
    model = _conv()
    _layer(model, 0).act = nn.Tanh()
    folded = model.fold_batchnorm()
    assert type(_layer(folded, 0).act) is nn.Tanh
    x = torch.randn(3, 1, 16)
    with torch.no_grad():
        assert float((folded(x) - model(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"activation": ["tanh"]}, r"'activation' must be a list of 2 entries"),
        ({"activation": ["tanh", "swish"]}, "unknown activation 'swish'"),
        ({"norm_eps": [1e-5, -1.0]}, "'norm_eps' must hold finite numbers >= 0"),
        ({"norm_eps": [1e-5, True]}, "'norm_eps' must hold finite numbers >= 0"),
        ({"norm_momentum": [0.1, "fast"]}, "'norm_momentum' must hold finite numbers or null"),
        ({"dropout": [0.5, 0.5]}, r"unknown overrides \['dropout'\]"),
        ([1, 2], "overrides must be a JSON object"),
    ],
)
def test_load_refuses_bad_overrides(tmp_path: Path, overrides: object, match: str) -> None:
    model = _conv()
    path = tmp_path / "m.safetensors"
    meta = {
        "format": io.MODEL_FORMAT,
        "format_version": 2,
        "kind": "plain_shortcut_net",
        "config": {**model.to_config(), "overrides": overrides},
        "gatedprune_version": "0",
    }
    io.write_tensors(path, model.state_dict(), meta)
    with pytest.raises(ValueError, match="invalid config.*" + match):
        io.load(path)


def test_load_refuses_norm_overrides_without_batchnorm(tmp_path: Path) -> None:
    model = _mlp()
    path = tmp_path / "m.safetensors"
    _write_like_save(model, path, version=2)
    _, meta = io.read_tensors(path)
    meta["config"]["overrides"] = {"norm_eps": [0.1, 0.1]}
    io.write_tensors(path, model.state_dict(), meta)
    with pytest.raises(ValueError, match="'norm_eps' given, but the network has no BatchNorm"):
        io.load(path)


@pytest.mark.parametrize("version", [0, 3, True, 1.0, "1"])
def test_load_refuses_other_model_file_versions(tmp_path: Path, version: object) -> None:
    path = tmp_path / "m.safetensors"
    _good_file(path)
    tensors, meta = io.read_tensors(path)
    meta["format_version"] = version
    io.write_tensors(path, tensors, meta)
    with pytest.raises(ValueError, match=r"unsupported model file version .*versions 1 to 2"):
        io.load(path)


# ---------------------------------------------------------------------- 3. messages
def test_save_errors_name_save_not_an_internal_function(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^save: path must be a str or os\.PathLike, got int"):
        io.save(_mlp(), 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^save: .* names a folder"):
        io.save(_mlp(), str(tmp_path) + "/")


def test_saving_below_a_file_says_it_is_not_a_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "plainfile"
    blocker.write_bytes(b"keep me")
    for target in (blocker / "m.safetensors", blocker / "sub" / "m.safetensors"):
        with pytest.raises(NotADirectoryError, match=f"{blocker} is not a directory") as e:
            io.save(_mlp(), target)
        assert "does not exist" not in str(e.value)
    assert blocker.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["plainfile"]
    with pytest.raises(FileNotFoundError, match="does not exist"):  # unchanged for a gap
        io.save(_mlp(), tmp_path / "missing" / "m.safetensors")


# ---------------------------------------------------------------------- 4. OffsetConv1d
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"length": 0}, ValueError, "length must be >= 1, got 0"),
        ({"length": -1}, ValueError, "length must be >= 1, got -1"),
        ({"length": 8.0}, TypeError, "length must be an int, got 8.0"),
        ({"length": True}, TypeError, "length must be an int, got the bool True"),
        ({"kernel_size": 4}, ValueError, "kernel_size must be odd .*got 4"),
        ({"kernel_size": 0}, ValueError, "kernel_size must be >= 1, got 0"),
        ({"in_channels": -1}, ValueError, "in_channels must be >= 0, got -1"),
        ({"out_channels": "4"}, TypeError, "out_channels must be an int, got '4'"),
    ],
)
def test_offset_conv_validates_its_arguments(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 4, "kernel_size": 3, "length": 8}
    args.update(kwargs)
    with pytest.raises(error, match="OffsetConv1d " + match):
        OffsetConv1d(
            args["in_channels"], args["out_channels"], args["kernel_size"], length=args["length"]
        )


def test_offset_conv_accepts_numpy_sizes() -> None:
    m = OffsetConv1d(np.int64(2), np.int64(3), np.int64(5), length=np.int64(8))  # type: ignore[arg-type]
    assert m(torch.zeros(1, 2, 8)).shape == (1, 3, 8)
    assert type(m.in_channels) is int
    assert m.offset.shape == (3, 8)


def test_plain_net_refuses_a_non_spec() -> None:
    with pytest.raises(TypeError, match=r"expects a gatedprune\.layout\.NetSpec, got NoneType"):
        PlainShortcutNet(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got dict .*from_config"):
        PlainShortcutNet(_mlp().to_config())  # type: ignore[arg-type]


def test_a_switched_off_channels_last_path_is_saved(tmp_path: Path) -> None:
    # before: load always rebuilt the network with the channels-last path on
    net = gp.prune(gp.ShortcutConv1d(1, [[4], [4]], 3).eval())
    f = tmp_path / "net.safetensors"
    for flag in (False, True):
        net.channels_last = flag
        gp.save(net, f)
        loaded = gp.load(f)
        assert isinstance(loaded, gp.PlainShortcutNet)
        assert loaded.channels_last is flag
        assert ("overrides" in net.to_config()) is (not flag)
