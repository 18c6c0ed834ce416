"""Saving without pickle: model round trips, refusal of damaged/foreign files, atomic writes."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import gatedprune as gp
from gatedprune import io
from gatedprune.gates import HardConcreteGate
from gatedprune.plain import OffsetConv1d

LN11 = math.log(11.0)


# ---------------------------------------------------------------------- helpers
def _randomise_norms(net: nn.Module, gen: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
            m.num_batches_tracked.fill_(int(torch.randint(1, 100, (), generator=gen)))


def _random_gates(net: nn.Module, data: st.DataObject) -> None:
    """Each gate closed, open or in between (a fractional eval value folded into weights)."""
    for g in gp.gate_modules(net):
        assert isinstance(g, HardConcreteGate)
        vals = data.draw(
            st.lists(
                st.one_of(
                    st.just(-LN11 - 1.0), st.just(LN11 + 1.0), st.floats(-LN11 + 0.2, LN11 - 0.2)
                ),
                min_size=g.n,
                max_size=g.n,
            )
        )
        with torch.no_grad():
            g.log_alpha.copy_(torch.tensor(vals))


def _round_trip(small: nn.Module, x: torch.Tensor, path: Path) -> nn.Module:
    """Save, load, and check the loaded model is the same model in every observable way."""
    small.eval()
    io.save(small, path)
    loaded = io.load(path)
    assert type(loaded) is type(small)
    assert not loaded.training
    ref_state, new_state = small.state_dict(), loaded.state_dict()
    assert list(new_state) == list(ref_state)
    for k, v in ref_state.items():
        assert new_state[k].dtype == v.dtype, k
        assert torch.equal(new_state[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert gp.cost(loaded, x[:1]) == gp.cost(small, x[:1])
    return loaded


def _dense_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _write_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "net.safetensors"
    io.save(gp.prune(gp.ShortcutMLP(6, [8, 8], 3).eval()), path)
    return path


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


# ---------------------------------------------------------------------- model round trips
@settings(max_examples=examples(10))
@given(data=st.data(), seed=st.integers(0, 2**16), norm=st.booleans())
def test_pruned_mlp_round_trip(
    tmp_path_factory: Any, data: st.DataObject, seed: int, norm: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = gp.ShortcutMLP(7, [9, 6, 5], 4, norm=norm)
    _randomise_norms(net, gen)
    _random_gates(net, data)
    small = gp.prune(net.eval())
    x = torch.randn(5, 7, generator=gen)  # (B, F)
    _round_trip(small, x, tmp_path_factory.mktemp("mlp") / "m.safetensors")


@settings(max_examples=examples(8))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_pruned_conv_round_trip(tmp_path_factory: Any, data: st.DataObject, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = gp.ShortcutConv1d(2, [[4, 3], [5]], 3, kernel_size=3, head_pool=2, input_length=16)
    _randomise_norms(net, gen)
    _random_gates(net, data)
    small = gp.prune(net.eval())
    x = torch.randn(4, 2, 16, generator=gen)  # (B, C, L)
    _round_trip(small, x, tmp_path_factory.mktemp("conv") / "c.safetensors")


def test_round_trip_with_removed_layers_and_units(tmp_path: Path) -> None:
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    net = gp.ShortcutConv1d(1, [[6, 6], [8]], 4, kernel_size=3, input_length=20)
    _randomise_norms(net, gen)
    for g in gp.gate_modules(net):
        g.force_(torch.rand(g.n, generator=gen) < 0.6)
    net.layers[1].unit_gate.force_(torch.zeros(6, dtype=torch.bool))  # layer 2 removed
    small = gp.prune(net.eval())
    assert len(small.spec.layers) < 3
    assert _dense_params(small) < _dense_params(net)
    _round_trip(small, torch.randn(3, 1, 20), tmp_path / "r.safetensors")


def test_round_trip_of_an_offset_conv(tmp_path: Path) -> None:
    """A conv layer with every incoming edge closed is a constant folded as an offset map."""
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    net = gp.ShortcutConv1d(1, [[4, 4, 4]], 3, kernel_size=3, input_length=12)
    _randomise_norms(net, gen)
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    net.layers[1].edge_gate.force_(torch.zeros(2, dtype=torch.bool))
    small = gp.prune(net.eval())
    offsets = [m for m in small.modules() if isinstance(m, OffsetConv1d)]
    assert offsets
    assert offsets[0].offset.abs().sum() > 0
    loaded = _round_trip(small, torch.randn(4, 1, 12), tmp_path / "o.safetensors")
    loaded_offsets = [m for m in loaded.modules() if isinstance(m, OffsetConv1d)]
    assert len(loaded_offsets) == len(offsets)
    assert torch.equal(loaded_offsets[0].offset, offsets[0].offset)


def test_round_trip_of_a_closed_read_out(tmp_path: Path) -> None:
    """Every head edge closed: the head holds a (out, 0) weight; zero-size tensors survive."""
    torch.manual_seed(3)
    net = gp.ShortcutMLP(5, [4], 3)
    assert net.head_gate is not None
    net.head_gate.force_(torch.zeros(net.head_gate.n, dtype=torch.bool))
    small = gp.prune(net.eval())
    assert small.head.weight.numel() == 0
    _round_trip(small, torch.randn(2, 5), tmp_path / "h.safetensors")


def test_float64_model_keeps_its_dtype(tmp_path: Path) -> None:
    torch.manual_seed(4)
    small = gp.prune(gp.ShortcutMLP(5, [4, 4], 2, norm=True).eval()).double()
    loaded = _round_trip(small, torch.randn(3, 5, dtype=torch.float64), tmp_path / "d.safetensors")
    assert loaded.head.weight.dtype == torch.float64


def test_registered_user_class_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "_CLASS_OF_KIND", dict(io._CLASS_OF_KIND))
    monkeypatch.setattr(io, "_KIND_OF_CLASS", dict(io._KIND_OF_CLASS))

    class Tiny(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.lin = nn.Linear(n, 2)
            self.register_buffer("shift", torch.zeros(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lin(x) + self.shift  # (B, 2)
            return out

        def to_config(self) -> dict[str, Any]:
            return {"n": self.lin.in_features}

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> Tiny:
            return cls(int(config["n"]))

    io.register_model_class("tiny", Tiny)
    io.register_model_class("tiny", Tiny)  # idempotent
    m = Tiny(3)
    m.shift.copy_(torch.randn(2))
    _round_trip(m, torch.randn(4, 3), tmp_path / "t.safetensors")


# ---------------------------------------------------------------------- tensor files
def test_tensor_file_handles_views_shared_and_noncontiguous(tmp_path: Path) -> None:
    base = torch.randn(4, 6, requires_grad=True)
    tensors = {
        "base": base,
        "t": base.t(),  # shares storage, non-contiguous
        "every_other": base[:, ::2],
        "scalar": torch.tensor(2.5),
        "ints": torch.arange(5),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(3, 0),
        "half": torch.randn(3).to(torch.bfloat16),
    }
    meta = {"step": 3, "nested": {"a": [1, 2.5, None]}, "tuple": (1, 2), "loss": float("nan")}
    path = tmp_path / "t.safetensors"
    io.write_tensors(path, tensors, meta)
    got, got_meta = io.read_tensors(path)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v.detach()), k
    assert got_meta["step"] == 3
    assert got_meta["nested"] == {"a": [1, 2.5, None]}
    assert got_meta["tuple"] == [1, 2]
    assert math.isnan(got_meta["loss"])
    got["base"].add_(1.0)  # loaded tensors are writable and owned
    assert torch.equal(io.read_tensors(path)[0]["base"], base.detach())


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        io.read_tensors(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        io.load(str(path))


@pytest.mark.parametrize("keep", [0, 4, 8, 40, -1, -40])
def test_truncated_file_is_refused(tmp_path: Path, keep: int) -> None:
    path = _write_model(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=re.escape(path.name)):
        io.load(path)


def test_appended_bytes_are_refused(tmp_path: Path) -> None:
    path = _write_model(tmp_path)
    path.write_bytes(path.read_bytes() + b"\x00" * 8)
    with pytest.raises(ValueError, match=r"net\.safetensors"):
        io.read_tensors(path)


@pytest.mark.parametrize("where", [0, 1, 17, -1])
def test_flipped_data_byte_is_detected(tmp_path: Path, where: int) -> None:
    path = _write_model(tmp_path)
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    pos = header_end + where if where >= 0 else len(data) + where
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="tensor checksum mismatch"):
        io.load(path)


@settings(max_examples=examples(60))
@given(pos=st.floats(0.0, 1.0, exclude_max=True), xor=st.integers(1, 255))
def test_any_flipped_byte_is_refused_or_harmless(
    tmp_path_factory: Any, pos: float, xor: int
) -> None:
    """A damaged file never loads as something different from what was written."""
    path = _write_model(tmp_path_factory.mktemp("flip"))
    ref_tensors, ref_meta = io.read_tensors(path)
    data = bytearray(path.read_bytes())
    data[int(pos * len(data))] ^= xor
    path.write_bytes(bytes(data))
    try:
        tensors, meta = io.read_tensors(path)
    except ValueError:
        return
    assert meta == ref_meta  # e.g. a header padding space turned into a tab
    assert set(tensors) == set(ref_tensors)
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)


def test_edited_metadata_is_detected(tmp_path: Path) -> None:
    path = _write_model(tmp_path)
    header, body = _split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["gatedprune"])
    meta["config"]["activation"] = "tanh"  # a well-formed, plausible edit
    header["__metadata__"]["gatedprune"] = json.dumps(meta)
    path.write_bytes(_join(header, body))
    with pytest.raises(ValueError, match="metadata checksum mismatch"):
        io.load(path)


def test_edited_tensor_header_is_detected(tmp_path: Path) -> None:
    """Swapping two same-size tensors' entries keeps a valid safetensors file."""
    path = tmp_path / "s.safetensors"
    io.write_tensors(path, {"a": torch.zeros(2, 3), "b": torch.ones(3, 2)}, {})
    header, body = _split(path.read_bytes())
    header["a"], header["b"] = header["b"], header["a"]
    path.write_bytes(_join(header, body))
    with pytest.raises(ValueError, match="tensor checksum mismatch"):
        io.read_tensors(path)


def test_unknown_version_is_refused(tmp_path: Path) -> None:
    path = _write_model(tmp_path)
    header, body = _split(path.read_bytes())
    header["__metadata__"]["gatedprune.version"] = "99"
    path.write_bytes(_join(header, body))
    with pytest.raises(ValueError, match="version '99'"):
        io.read_tensors(path)


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, foreign, metadata={"format": "pt"})
    text = tmp_path / "notes.txt"
    text.write_text("just some text, long enough to look like a header length\n" * 4)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    pickled = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2, 2)}, pickled)
    pickled_module = tmp_path / "module.pt"
    torch.save(gp.prune(gp.ShortcutMLP(3, [2], 2)), pickled_module)
    for path in (foreign, text, empty, pickled, pickled_module):
        with pytest.raises(ValueError, match=re.escape(path.name)):
            io.read_tensors(path)
        with pytest.raises(ValueError, match=re.escape(path.name)):
            io.load(path)
    with pytest.raises(ValueError, match="not written by gatedprune"):
        io.read_tensors(foreign)


# ---------------------------------------------------------------------- atomic writes
def _check_untouched(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind
    io.load(path)


def test_failed_replace_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_model(tmp_path)
    before = path.read_bytes()

    def fail(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        io.save(gp.prune(gp.ShortcutMLP(6, [3], 3)), path)
    monkeypatch.undo()
    _check_untouched(path, before)


def test_failure_mid_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_model(tmp_path)
    before = path.read_bytes()
    seen: list[list[str]] = []

    def fail(fd: int) -> None:
        seen.append(sorted(os.listdir(tmp_path)))  # the partial temp file exists here
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(KeyboardInterrupt):
        io.write_tensors(path, {"w": torch.randn(100)}, {})
    monkeypatch.undo()
    assert len(seen) == 1
    assert len(seen[0]) == 2
    _check_untouched(path, before)


def test_failed_serialisation_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write_model(tmp_path)
    before = path.read_bytes()

    class Broken:
        @staticmethod
        def save(*args: object, **kwargs: object) -> bytes:
            raise RuntimeError("serializer crashed")

    monkeypatch.setattr(io, "_safetensors", lambda: Broken)
    with pytest.raises(RuntimeError, match="serializer crashed"):
        io.write_tensors(path, {"w": torch.randn(3)}, {})
    monkeypatch.undo()
    _check_untouched(path, before)


def test_overwrite_replaces_and_uses_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    io.write_tensors(path, {"w": torch.zeros(2)}, {"v": 1})
    io.write_tensors(path, {"w": torch.ones(3)}, {"v": 2})
    tensors, meta = io.read_tensors(path)
    assert meta == {"v": 2}
    assert torch.equal(tensors["w"], torch.ones(3))
    assert os.listdir(tmp_path) == [path.name]
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert path.stat().st_mode == reference.stat().st_mode


# ---------------------------------------------------------------------- bad arguments
def test_write_tensors_rejects_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    good = torch.zeros(2)
    with pytest.raises(TypeError, match="names must be str"):
        io.write_tensors(path, {1: good}, {})
    with pytest.raises(TypeError, match=r"'w' must be a torch\.Tensor"):
        io.write_tensors(path, {"w": [1.0, 2.0]}, {})
    with pytest.raises(TypeError, match="tensors must be a mapping"):
        io.write_tensors(path, [good], {})
    with pytest.raises(TypeError, match="meta must be a mapping"):
        io.write_tensors(path, {"w": good}, [1])
    with pytest.raises(TypeError, match="JSON"):
        io.write_tensors(path, {"w": good}, {"x": object()})
    with pytest.raises(TypeError, match="path must be"):
        io.write_tensors(3, {"w": good}, {})
    with pytest.raises(ValueError, match="reserved"):
        io.write_tensors(path, {"__metadata__": good}, {})
    with pytest.raises(ValueError, match="dense"):
        io.write_tensors(path, {"s": torch.eye(2).to_sparse()}, {})
    assert not os.listdir(tmp_path)


def test_save_rejects_gated_and_unsupported_models(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    gated = gp.ShortcutMLP(4, [3], 2)
    with pytest.raises(TypeError, match=r"gatedprune\.prune"):
        io.save(gated, path)
    with pytest.raises(TypeError, match=r"gatedprune\.prune"):
        io.save(nn.Sequential(nn.Linear(3, 4), gated), path)
    with pytest.raises(TypeError, match=r"Linear.*plain_shortcut_net"):
        io.save(nn.Linear(3, 2), path)
    with pytest.raises(TypeError, match="Module"):
        io.save({"w": torch.zeros(2)}, path)
    assert not os.listdir(tmp_path)


def test_register_model_class_rejects_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "_CLASS_OF_KIND", dict(io._CLASS_OF_KIND))
    monkeypatch.setattr(io, "_KIND_OF_CLASS", dict(io._KIND_OF_CLASS))

    class NoConfig(nn.Module):
        pass

    class WithConfig(nn.Linear):
        def to_config(self) -> dict[str, Any]:
            return {}

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> WithConfig:
            return cls(1, 1)

    with pytest.raises(ValueError, match="kind"):
        io.register_model_class("", WithConfig)
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        io.register_model_class("x", WithConfig(1, 1))
    with pytest.raises(TypeError, match="to_config"):
        io.register_model_class("x", NoConfig)
    with pytest.raises(TypeError, match="GatedModule"):
        io.register_model_class("x", gp.ShortcutMLP)
    with pytest.raises(ValueError, match="already registered"):
        io.register_model_class("plain_shortcut_net", WithConfig)
    with pytest.raises(ValueError, match="already registered"):
        io.register_model_class("another_name", gp.PlainShortcutNet)


def _model_file(path: Path, **changes: Any) -> Path:
    """A tensor file shaped like a saved model, with some parts replaced."""
    torch.manual_seed(5)
    small = gp.prune(gp.ShortcutMLP(4, [3], 2))
    tensors = dict(small.state_dict())
    tensors.update(changes.pop("tensors", {}))
    for k in changes.pop("drop", []):
        del tensors[k]
    meta = {
        "format": "gatedprune.model",
        "format_version": 1,
        "kind": "plain_shortcut_net",
        "config": small.to_config(),
        "gatedprune_version": "0",
    }
    meta.update(changes)
    io.write_tensors(path, tensors, meta)
    return path


def test_load_rejects_files_that_do_not_describe_a_model(tmp_path: Path) -> None:
    assert isinstance(io.load(_model_file(tmp_path / "ok.safetensors")), gp.PlainShortcutNet)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"format": "gatedprune.trainer"}, "not a saved model"),
        ({"format_version": 7}, "model file version 7"),
        ({"kind": "mystery_net"}, "unknown model kind 'mystery_net'"),
        ({"config": [1, 2]}, "config is not a JSON object"),
        ({"config": {"spatial": False}}, "invalid config"),
        ({"drop": ["head.bias"]}, r"missing \['head.bias'\]"),
        ({"tensors": {"extra.weight": torch.zeros(1)}}, r"unexpected \['extra.weight'\]"),
        ({"tensors": {"head.bias": torch.zeros(5)}}, "'head.bias' has shape"),
    ]
    for i, (changes, message) in enumerate(cases):
        path = _model_file(tmp_path / f"bad{i}.safetensors", **changes)
        with pytest.raises(ValueError, match=message):
            io.load(path)
    plain = tmp_path / "plain.safetensors"
    io.write_tensors(plain, {"w": torch.zeros(1)}, {"step": 1})
    with pytest.raises(ValueError, match="not a saved model"):
        io.load(plain)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"head_pool": -1}, "head_pool must be >= 1"),
        ({"kernel_size": -1}, "kernel_size must be a positive odd int"),
        ({"input_length": 0}, "input_length must be None or >= 1"),
        ({"in_width": 10**12}, "has shape"),  # refused before anything of that size is built
    ],
)
def test_edited_config_with_valid_checksums_is_refused(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    # a writer that edits the config and recomputes the checksums (a buggy exporter)
    small = gp.prune(gp.ShortcutConv1d(1, [[4], [4]], 3, input_length=8).eval())
    path = tmp_path / "m.safetensors"
    gp.save(small, path)
    _, meta = io.read_tensors(path)
    meta["config"] = {**meta["config"], **change}
    io.write_tensors(path, small.state_dict(), meta)
    with pytest.raises(ValueError, match=message):
        gp.load(path)


def test_writing_into_a_missing_folder_or_onto_a_folder_names_the_target(tmp_path: Path) -> None:
    small = gp.prune(gp.ShortcutMLP(4, [3], 2))
    with pytest.raises(FileNotFoundError, match=r"the folder .*missing does not exist"):
        gp.save(small, tmp_path / "missing" / "m.safetensors")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="it is a folder; expected a file path"):
        gp.save(small, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary file left


def test_save_refusal_of_a_gate_pruned_model_names_the_plan_route(tmp_path: Path) -> None:
    """The refusal names export_plan/apply_plan and write_tensors, and that route works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(4, 8)  # (B, 8)
    gp.gate_(model, x)
    gating = model.gatedprune
    gating.group_gates[0].force_(torch.arange(16) % 2 == 0)
    small = gp.prune(model.eval())
    with pytest.raises(TypeError, match="register_model_class") as err:
        io.save(small, tmp_path / "p.safetensors")
    for route in ("export_plan", "apply_plan", "write_tensors", "load_state_dict"):
        assert route in str(err.value)
    assert not os.listdir(tmp_path)
    plan = json.loads(json.dumps(gp.export_plan(model)))
    path = tmp_path / "w.safetensors"
    io.write_tensors(path, small.state_dict(), {"plan": plan})
    tensors, meta = io.read_tensors(path)
    fresh = gp.apply_plan(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), meta["plan"]
    )
    fresh.load_state_dict(tensors)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), small(x))  # (B, 3)
