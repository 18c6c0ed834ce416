"""load/read_tensors refuse a folder with a ValueError, and a model config whose stages cannot
work is refused at load (it used to fail only at the first forward)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import gatedprune as gp
from gatedprune.io import read_tensors, write_tensors
from gatedprune.layout import LayerSpec, NetSpec


# ---------------------------------------------------------------------- a folder
def test_loading_a_folder_is_a_value_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^load: '.*' is a folder; expected a file written by "):
        gp.load(tmp_path)
    with pytest.raises(ValueError, match=r"^read_tensors: '.*' is a folder; expected a file"):
        read_tensors(tmp_path)


def test_a_folder_named_like_a_checkpoint_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "step-000000004.safetensors").mkdir()
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    net = gp.ShortcutMLP(4, [6], 2)
    trainer = gp.Trainer(net, epochs=1, batch_size=8, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="is a folder; expected a file written by write_tensors"):
        trainer.fit((x, y), resume=True)


# ---------------------------------------------------------------------- impossible stages
def _saved(tmp_path: Path, net: torch.nn.Module) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    path = tmp_path / "m.safetensors"
    gp.save(gp.prune(net.eval()), path)
    tensors, meta = read_tensors(path)
    return path, tensors, meta


@pytest.mark.parametrize(
    ("stage", "match"),
    [
        (1, r"layer 1 has stage 1 \(layers\[0\]\.stage\), but a non-spatial network has only "),
        (10**9, r"layer 1 has stage 1000000000 \(layers\[0\]\.stage\), but a non-spatial"),
    ],
)
def test_a_non_spatial_layer_with_a_stage_is_refused_at_load(
    tmp_path: Path, stage: int, match: str
) -> None:
    path, tensors, meta = _saved(tmp_path, gp.ShortcutMLP(3, [4], 2))
    meta["config"]["layers"][0]["stage"] = stage
    write_tensors(path, tensors, meta)  # valid checksums: another writer, or a re-digested edit
    with pytest.raises(ValueError, match=match):
        gp.load(path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"stage": 10**9},
            r"layer 2 has stage 1000000000 \(layers\[1\]\.stage\), expected at most 62",
        ),
        ({"stage": 63}, r"expected at most 62 \(an input needs 2\*\*stage positions\)"),
    ],
)
def test_a_spatial_stage_no_input_can_reach_is_refused_at_load(
    tmp_path: Path, change: dict[str, int], match: str
) -> None:
    path, tensors, meta = _saved(tmp_path, gp.ShortcutConv1d(2, [[4], [4]], 3))
    meta["config"]["layers"][1].update(change)
    write_tensors(path, tensors, meta)
    with pytest.raises(ValueError, match=match):
        gp.load(path)


def test_a_stage_longer_than_the_input_is_refused() -> None:
    layers = (LayerSpec((0,), 4), LayerSpec((1,), 4, stage=3))
    spec = NetSpec(True, 2, layers, (2,), 3, kernel_size=3, input_length=4)
    with pytest.raises(ValueError, match=r"stage 3, which needs inputs of length >= 2\*\*3 = 8"):
        spec.validate()
    NetSpec(True, 2, layers, (2,), 3, kernel_size=3, input_length=8).validate()  # fits


def test_valid_stages_still_load(tmp_path: Path) -> None:
    net = gp.ShortcutConv1d(2, [[4], [4], [4]], 3, input_length=8)
    path, _, meta = _saved(tmp_path, net)
    assert [layer["stage"] for layer in meta["config"]["layers"]] == [0, 1, 2]
    x = torch.randn(2, 2, 8)
    assert torch.equal(gp.load(path)(x), gp.prune(net.eval())(x))
