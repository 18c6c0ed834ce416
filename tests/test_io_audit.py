"""Regression tests from an audit of saving/loading, pruning plans and ONNX export."""

from __future__ import annotations

import copy
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gatedprune as gp
from gatedprune import io


# ---------------------------------------------------------------------- io
def test_deeply_nested_header_is_a_value_error(tmp_path: Path) -> None:
    body = b"[" * 100_000 + b"]" * 100_000  # foreign file: valid length, absurd JSON
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(ValueError, match=r"deep\.safetensors.*not a gatedprune file"):
        io.read_tensors(path)
    with pytest.raises(ValueError, match=r"deep\.safetensors"):
        io.load(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_overwrite_keeps_the_permissions_of_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "private.safetensors"
    io.write_tensors(path, {"w": torch.zeros(2)}, {})
    os.chmod(path, 0o600)
    io.save(gp.prune(gp.ShortcutMLP(4, [8], 2)), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == [path.name]
    assert type(io.load(path)).__name__ == "PlainShortcutNet"


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_saving_through_a_symlink_updates_its_target(tmp_path: Path) -> None:
    target = tmp_path / "v1.safetensors"
    link = tmp_path / "latest.safetensors"
    io.write_tensors(target, {"w": torch.zeros(2)}, {"v": 1})
    link.symlink_to(target.name)
    io.write_tensors(link, {"w": torch.ones(3)}, {"v": 2})
    assert link.is_symlink()  # the link is kept, not replaced by a file
    tensors, meta = io.read_tensors(target)
    assert meta == {"v": 2}
    assert torch.equal(tensors["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["latest.safetensors", "v1.safetensors"]


# ---------------------------------------------------------------------- export
class _PoolHead(torch.nn.Module):
    """(B, T, 5) -> (B, 3): the class dimension is fixed whatever the sequence length."""

    def __init__(self, recurrent: bool) -> None:
        super().__init__()
        self.rnn = torch.nn.GRU(5, 4, batch_first=True) if recurrent else None
        self.lin = torch.nn.Linear(4 if recurrent else 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rnn is not None:
            x = self.rnn(x)[0]  # (B, T, 4)
        return self.lin(x.mean(1))  # (B, 3)


@pytest.mark.parametrize("recurrent", [False, True])
def test_export_keeps_a_fixed_output_dimension_fixed(tmp_path: Path, recurrent: bool) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _PoolHead(recurrent)
    path = gp.export_onnx(model, torch.randn(2, 7, 5), tmp_path / "p.onnx", dynamic_dims=(0, 1))
    (out,) = onnx.load(str(path)).graph.output
    dims = out.type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["dim0", ""]  # batch dynamic, classes not
    assert dims[1].dim_value == 3
    session = gp.onnx_session(path, threads=1)
    got = session.run(None, {"x": torch.randn(4, 11, 5).numpy()})[0]
    assert got.shape == (4, 3)


def test_export_restores_the_mode_of_every_submodule(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)
    )
    net.train()
    net[1].eval()  # frozen BatchNorm statistics while the rest trains
    gp.export_onnx(net, torch.randn(2, 3), tmp_path / "n.onnx")
    assert [m.training for m in net] == [True, False, True, True]
    assert net.training
    net.eval()
    net[2].train()  # Monte-Carlo dropout in an otherwise evaluated model
    gp.export_onnx(net, torch.randn(2, 3), tmp_path / "n.onnx")
    assert [m.training for m in net] == [False, False, True, False]
    assert not net.training


def test_export_and_session_name_bad_paths(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got int"):
        gp.export_onnx(torch.nn.Linear(3, 2), torch.zeros(1, 3), 123)  # type: ignore[arg-type]
    missing = tmp_path / "missing.onnx"
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        gp.onnx_session(missing)
    with pytest.raises(TypeError, match="got int"):
        gp.onnx_session(5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- plans
class _Small(torch.nn.Module):
    def __init__(self, h: int = 16) -> None:
        super().__init__()
        self.a = torch.nn.Linear(5, h)
        self.b = torch.nn.Linear(h, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _plan() -> dict[str, Any]:
    from gatedprune.gates import HardConcreteGate
    from gatedprune.gating import export_plan, gate_

    m = _Small()
    gate_(m, torch.randn(4, 5))
    with torch.no_grad():
        g = m.gatedprune.group_gates[0]
        assert isinstance(g, HardConcreteGate)
        g.log_alpha.fill_(5.0)
        g.log_alpha[:3] = -10.0
    plan: dict[str, Any] = json.loads(json.dumps(export_plan(m.eval())))
    return plan


def _edited(plan: dict[str, Any], edit: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    """``plan`` edited as a plan written by hand: without the exported plan's checksum and
    model fingerprint, which would refuse any edit (tests/test_plan_fingerprint.py)."""
    plan = {k: v for k, v in copy.deepcopy(plan).items() if k not in ("checksum", "model")}
    edit(plan)
    return plan


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.pop("slices"), r"'slices' must be a dict, got NoneType"),
        (lambda p: p.pop("scopes"), r"'scopes' must be a list"),
        (lambda p: p.__setitem__("slices", []), r"'slices' must be a dict, got list"),
        (lambda p: p["slices"]["a"].pop("kind"), r"slice 'a' must be a dict with 'kind'"),
        (lambda p: p["slices"]["a"].__setitem__("out", [5, 5, 6]), r"slice 'a' 'out'.*\[5, 5, 6\]"),
        (lambda p: p["slices"]["a"].__setitem__("out", [5.5, 6]), r"slice 'a' 'out'.*\[5\.5, 6\]"),
        (lambda p: p["slices"]["b"].__setitem__("in", "3:16"), r"slice 'b' 'in'.*'3:16'"),
        (lambda p: p["slices"]["a"].__setitem__("out", [7, 3]), r"strictly increasing"),
    ],
)
def test_malformed_plans_are_refused_with_a_value_error(
    edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    from gatedprune.gating import apply_plan

    model = _Small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        apply_plan(model, _edited(_plan(), edit))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # left as it was


def test_apply_plan_refuses_a_gated_model() -> None:
    from gatedprune.gating import apply_plan, gate_

    plan = _plan()
    gated = _Small()
    gate_(gated, torch.randn(4, 5))
    with pytest.raises(ValueError, match="dense, ungated _Small; this one is gated"):
        apply_plan(gated, plan)
    assert gated.a.out_features == 16  # not sliced under its gates


class _Encoder(torch.nn.Module):
    def __init__(self, units: int = 16) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(2, 8)
        self.layer = torch.nn.TransformerEncoderLayer(8, 2, units, dropout=0.0, batch_first=True)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(self.inp(x)).mean(1))


def test_a_plan_that_does_not_fit_leaves_the_encoder_layers_untouched() -> None:
    from gatedprune.gating import apply_plan

    plan = _edited(
        _plan(),
        lambda p: p.__setitem__(
            "transformers", {"layer": {"heads": [1], "units": [0, 2], "attn": True, "ffn": True}}
        ),
    )
    plan["slices"] = {"inp": {"kind": "linear", "in": None, "out": [0, 1], "n_out": 12}}
    model = _Encoder()
    layer = model.layer
    with pytest.raises(ValueError, match=r"module 'inp' to have 12 output channels, it has 8"):
        apply_plan(model, plan)
    assert model.layer is layer  # the layer was not replaced before the slice check failed
    assert model.layer.linear1.out_features == 16


class _Recurrent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(3, 4)
        self.rnn = torch.nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(self.inp(x))[0][:, -1])


@pytest.mark.parametrize(
    ("units", "message"),
    [
        ([[0, 1]], r"rnn 'rnn' 'units' must be 2 index lists"),
        ([[0, 1], [0.0, 1.0]], r"rnn 'rnn' 'units'\[1\] must be a strictly increasing list"),
        ([[0, 1], [3, 9]], r"keeps unit 9 of 'rnn', which has 8"),
    ],
)
def test_bad_recurrent_plan_entries_name_the_module_and_change_nothing(
    units: list[list[float]], message: str
) -> None:
    from gatedprune.gating import apply_plan

    plan = _edited(_plan(), lambda p: p.__setitem__("rnn", {"rnn": {"units": units, "in": None}}))
    plan["slices"] = {"inp": {"kind": "linear", "in": None, "out": [0, 1], "n_out": 4}}
    model = _Recurrent()
    with pytest.raises(ValueError, match=message):
        apply_plan(model, plan)
    assert model.inp.out_features == 4  # nothing sliced
    assert (model.rnn.input_size, model.rnn.hidden_size) == (4, 8)


def test_a_path_ending_in_a_slash_is_refused_not_written_as_a_file(tmp_path: Path) -> None:
    target = f"{tmp_path / 'out'}/"
    with pytest.raises(ValueError, match="names a folder"):
        io.write_tensors(target, {"w": torch.ones(2)}, {})
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="names a folder"):
        gp.save(gp.prune(gp.ShortcutMLP(4, [3], 2).eval()), target)
    assert not (tmp_path / "out").exists()
