"""Trainer(resume=True) refuses a checkpoint of another model (recorded as a fingerprint in the
checkpoint config) and validates a crafted checkpoint completely before anything changes; a
checkpoint written before the fingerprint existed still resumes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import train_worker
from gating_helpers import assert_state_unchanged, state_copy
from torch import Tensor, nn
from zoo import TransformerClassifier

import gatedprune as gp
from gatedprune.io import read_tensors, write_tensors
from gatedprune.train import Trainer


def _data(n: int = 32, features: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, features, generator=g), torch.randint(0, 3, (n,), generator=g)


def _interrupted(folder: Path, make: Callable[[], nn.Module], x: Tensor, y: Tensor) -> None:
    torch.manual_seed(0)
    Trainer(make(), epochs=2, batch_size=8, checkpoint_dir=folder, progress=False).fit(
        (x, y), max_steps=3
    )


def _refused(folder: Path, make: Callable[[], nn.Module], x: Tensor, y: Tensor, match: str) -> None:
    torch.manual_seed(0)
    net = make()
    before = state_copy(net)
    other = Trainer(net, epochs=2, batch_size=8, checkpoint_dir=folder, progress=False)
    with pytest.raises(ValueError, match=match):
        other.fit((x, y), resume=True)
    assert_state_unchanged(net, before)
    assert other.step == 0


# ---------------------------------------------------------------------- another model
def test_a_checkpoint_of_a_model_with_another_activation_is_refused(tmp_path: Path) -> None:
    x, y = _data()
    _interrupted(tmp_path, lambda: gp.ShortcutMLP(6, [8, 8], 3, activation="relu"), x, y)
    _refused(
        tmp_path,
        lambda: gp.ShortcutMLP(6, [8, 8], 3, activation="tanh"),
        x,
        y,
        r"written for another model \(the model itself \(ShortcutMLP\): checkpoint "
        r"'spec.activation=\"relu\"' vs now 'spec.activation=\"tanh\"'\)",
    )


def test_a_checkpoint_of_a_plain_model_with_another_activation_module_is_refused(
    tmp_path: Path,
) -> None:
    x, y = _data()
    _interrupted(tmp_path, lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), x, y)
    _refused(
        tmp_path,
        lambda: nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)),
        x,
        y,
        r"another model \(module '1': checkpoint ReLU\(\) vs now GELU\(approximate='none'\)\)",
    )


class _Scaled(nn.Module):
    """A Linear whose output is scaled by a buffer (of a chosen dtype)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("scale", torch.ones(3, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scale.float()  # (B, 3)


def test_a_checkpoint_of_a_model_with_another_buffer_dtype_is_refused(tmp_path: Path) -> None:
    x, y = _data()
    _interrupted(tmp_path, lambda: _Scaled(torch.float32), x, y)
    _refused(
        tmp_path,
        lambda: _Scaled(torch.float64),
        x,
        y,
        r"buffer 'scale': checkpoint shape \[3\], torch.float32 vs now shape \[3\], "
        r"torch.float64",
    )


def test_a_gated_transformer_with_another_norm_placement_is_refused(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 5, 3, generator=g), torch.randint(0, 4, (16,), generator=g)

    def make(norm_first: bool) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            net = TransformerClassifier(norm_first=norm_first)
            gp.gate_(net, x[:2])
            return net

        return build

    _interrupted(tmp_path, make(False), x, y)
    _refused(
        tmp_path,
        make(True),
        x,
        y,
        r"module 'encoder.layers.0' \(GatedTransformerEncoderLayer\): checkpoint "
        r"'norm_first=False' vs now 'norm_first=True'",
    )


def test_the_same_model_resumes_identically(tmp_path: Path) -> None:
    trainer, (x, y, _, _) = train_worker.setup(str(tmp_path))
    trainer.fit((x, y), max_steps=4)
    _, meta = read_tensors(tmp_path / "step-000000004.safetensors")
    modules = meta["config"]["model"]["modules"]
    assert modules[0][:2] == ["", "ShortcutMLP"]
    assert ["layers.0.op", "Linear", ["in_features=10, out_features=12, bias=True"]] in modules
    assert ["layers.0.op.weight", [12, 10], "torch.float32"] in meta["config"]["model"][
        "parameters"
    ]
    resumed, _ = train_worker.setup(str(tmp_path))
    resumed.fit((x, y), resume=True)
    full, _ = train_worker.setup(None)
    full.fit((x, y))
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_a_checkpoint_written_before_model_fingerprints_still_resumes(tmp_path: Path) -> None:
    trainer, (x, y, _, _) = train_worker.setup(str(tmp_path))
    trainer.fit((x, y), max_steps=4)
    path = tmp_path / "step-000000004.safetensors"
    tensors, meta = read_tensors(path)
    del meta["config"]["model"]  # as the Trainer wrote it before 2026-12-07
    write_tensors(path, tensors, meta)
    resumed, _ = train_worker.setup(str(tmp_path))
    resumed.fit((x, y), resume=True)
    full, _ = train_worker.setup(None)
    full.fit((x, y))
    assert resumed.step == full.step == 18
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    # its later checkpoints record the model
    _, meta = read_tensors(tmp_path / "step-000000018.safetensors")
    assert "model" in meta["config"]


def test_a_malformed_model_record_is_refused(tmp_path: Path) -> None:
    trainer, (x, y, _, _) = train_worker.setup(str(tmp_path))
    trainer.fit((x, y), max_steps=4)
    path = tmp_path / "step-000000004.safetensors"
    tensors, meta = read_tensors(path)
    meta["config"]["model"] = {"modules": 5}
    write_tensors(path, tensors, meta)
    other, _ = train_worker.setup(str(tmp_path))
    before = state_copy(other.model)
    with pytest.raises(ValueError, match="model record has no list of modules"):
        other.fit((x, y), resume=True)
    assert_state_unchanged(other.model, before)


# ---------------------------------------------------------------------- crafted checkpoints
def _edit_meta(key: str, value: Any) -> Callable[[dict[str, Tensor], dict[str, Any]], None]:
    def edit(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        meta[key] = value

    return edit


def _edit_tensor(key: str, make: Callable[[Tensor], Tensor]) -> Callable[..., None]:
    def edit(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        tensors[key] = make(tensors[key])

    return edit


def _permute_group(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    meta["optim_param_groups"][0]["params"].reverse()


def _drop_stat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    del meta["stats"]["count"]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            _edit_tensor("optim/0/exp_avg", lambda t: torch.zeros(3)),
            r"optimizer state 'exp_avg' of parameter 0 has shape \(3,\), expected \(12, 10\)",
        ),
        (
            _edit_tensor("optim/0/exp_avg_sq", lambda t: t.t().contiguous()),
            r"'exp_avg_sq' of parameter 0 has shape \(10, 12\), expected \(12, 10\)",
        ),
        (
            _edit_tensor("optim/1/step", lambda t: torch.zeros(2)),
            r"'step' of parameter 1 has shape \(2,\), expected \(\)",
        ),
        (_edit_meta("optim_state_ids", [0, 99]), "state id 99 names no parameter"),
        (_permute_group, "the optimizer's parameter groups differ"),
        (_edit_meta("optim_param_groups", 5), "'optim_param_groups' must be a list"),
        (_edit_meta("history", 5), r"'history' is 5, expected a list of records"),
        (_edit_meta("history", [{"epoch": "one"}]), r"history\[0\]\['epoch'\] is 'one'"),
        (_edit_meta("trace", [3]), r"trace\[0\] is 3, expected a record"),
        (_edit_meta("achieved_before_snap", [1, 2]), r"'achieved_before_snap' is \[1, 2\]"),
        (_edit_meta("achieved_before_snap", {"params": 0.5}), r"null or numbers for \['flops'\]"),
        (_edit_meta("step", 999), r"'step' is 999, expected an int in \[0, 18\]"),
        (_edit_meta("step", -3), r"'step' is -3"),
        (_edit_meta("step", 2.5), r"'step' is 2.5"),
        (_drop_stat, r"'stats' is .*expected an object with the numbers"),
        (_edit_meta("rank_stats", [[1.0, 2.0]]), r"'rank_stats' is \[\[1.0, 2.0\]\]"),
        (
            _edit_tensor("model/layers.0.op.weight", lambda t: t.half()),
            r"model state does not fit: tensor 'layers.0.op.weight' is torch.float16 of shape "
            r"\(12, 10\) in the checkpoint, the model holds torch.float32",
        ),
        (_edit_tensor("budget/lambda1.flops", lambda t: t.float()), "budget state does not fit"),
        (_edit_tensor("rng/torch", lambda t: t[:-1]), "bad RNG state: a torch.uint8 tensor"),
    ],
)
def test_a_crafted_checkpoint_is_refused_before_anything_changes(
    tmp_path: Path, edit: Callable[[dict[str, Tensor], dict[str, Any]], None], match: str
) -> None:
    """Checkpoints with valid checksums but content that does not fit (another writer, or an
    edit with recomputed digests): a ValueError naming the field, the model, budget and step
    untouched (before, some loaded and failed at the first step, or after the model changed)."""
    trainer, (x, y, _, _) = train_worker.setup(str(tmp_path))
    trainer.fit((x, y), max_steps=4)
    path = tmp_path / "step-000000004.safetensors"
    tensors, meta = read_tensors(path)
    edit(tensors, meta)
    write_tensors(path, tensors, meta)
    other, _ = train_worker.setup(str(tmp_path))
    assert other.budget is not None
    before, budget_before = state_copy(other.model), state_copy(other.budget)
    with pytest.raises(ValueError, match=match):
        other.fit((x, y), resume=True)
    assert_state_unchanged(other.model, before)
    assert_state_unchanged(other.budget, budget_before)
    assert other.step == 0
    assert other.history == []


class _Scheduled(nn.Module):
    """Dropout whose rate a schedule changes, and a lazy layer materialised by the first fit."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.LazyLinear(16)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.drop(torch.relu(self.a(x))))  # (B, 3)


def test_the_same_trainer_continues_after_its_model_changed_settings(tmp_path: Path) -> None:
    # before: a second fit(resume=True) fingerprinted the trained model (Dropout p changed by
    # the schedule, LazyLinear become Linear) and refused it as another model
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))

    def schedule(tr: Trainer, rec: Any) -> None:
        drop = tr.model.get_submodule("drop")
        assert isinstance(drop, nn.Dropout)
        drop.p = max(0.0, 0.5 - 0.05 * tr.step)

    tr = Trainer(
        _Scheduled(),
        epochs=4,
        batch_size=16,
        progress=False,
        checkpoint_dir=tmp_path,
        checkpoint_every_steps=2,
        on_step=schedule,
    )
    tr.fit((x, y), max_steps=10)
    tr.fit((x, y), resume=True)
    assert tr.step == 16
    # a fresh model in a new run is the model the checkpoint was written for
    torch.manual_seed(0)
    again = Trainer(_Scheduled(), epochs=4, batch_size=16, progress=False, checkpoint_dir=tmp_path)
    again.fit((x, y), resume=True)
    assert again.step == 16
