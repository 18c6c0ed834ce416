"""Trainer(resume=True) refuses a checkpoint holding values no run can have written (NaN
weights, a negative variance or step, more epochs of history than steps, ...) with a
ValueError naming the tensor or field, the value and what was expected, before anything
changes; legitimate extremes (snapped gates, at +-inf before 2026-12-07, a -inf mask
buffer) still resume.
Before, these were accepted and failed later as a misleading "training diverged", a raw
error inside torch, or a silently wrong history."""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import train_worker
from gating_helpers import assert_state_unchanged, state_copy
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gatedprune.io import read_tensors, write_tensors
from gatedprune.train import Trainer

Edit = Callable[[dict[str, Tensor], dict[str, Any]], None]
STEP = 8  # train_worker: 6 steps per epoch, a checkpoint every 4: epoch 2, 2 steps in


@functools.cache
def _written() -> Path:
    """The step-8 checkpoint of train_worker's run (written once, copied for each test)."""
    folder = Path(tempfile.mkdtemp(prefix="gp_resume_values_"))
    trainer, (x, y, _, _) = train_worker.setup(str(folder))
    trainer.fit((x, y), max_steps=STEP)
    return folder / f"step-{STEP:09d}.safetensors"


def _crafted(folder: Path, edit: Edit) -> Path:
    path = folder / _written().name
    shutil.copy(_written(), path)
    tensors, meta = read_tensors(path)
    edit(tensors, meta)
    write_tensors(path, tensors, meta)  # checksums recomputed, as a tampering tool would
    return path


def _assert_refused(folder: Path, match: str) -> None:
    other, (x, y, _, _) = train_worker.setup(str(folder))
    assert other.budget is not None
    before, budget_before = state_copy(other.model), state_copy(other.budget)
    with pytest.raises(ValueError, match=match):
        other.fit((x, y), resume=True)
    assert_state_unchanged(other.model, before)
    assert_state_unchanged(other.budget, budget_before)
    assert other.step == 0
    assert other.history == []


def _tensor(key: str, make: Callable[[Tensor], Tensor]) -> Edit:
    def edit(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        tensors[key] = make(tensors[key])

    return edit


def _meta(change: Callable[[dict[str, Any]], None]) -> Edit:
    def edit(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        change(meta)

    return edit


def _put(t: Tensor, index: tuple[int, ...], value: float) -> Tensor:
    out = t.clone()
    out[index] = value
    return out


def _set(*keys: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        target = meta
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return change


def _extra_epoch(meta: dict[str, Any]) -> None:
    meta["history"].append({**meta["history"][0], "epoch": 2, "step": 12})


def _trace_beyond(meta: dict[str, Any]) -> None:
    meta["trace"].append({**meta["trace"][-1], "step": 15, "epoch": 3})


def _trace_repeated(meta: dict[str, Any]) -> None:
    meta["trace"].append(dict(meta["trace"][-1]))


def _legacy_count(meta: dict[str, Any]) -> None:
    del meta["rank_stats"]  # as written before per-rank sums: rank 0's sums alone
    meta["stats"]["count"] = 99.0


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # model parameters: NaN anywhere, +-inf outside the gates
        (
            _tensor("model/layers.0.op.weight", lambda t: _put(t, (2, 3), NAN)),
            r"model parameter 'layers\.0\.op\.weight' holds nan at index \(2, 3\) \(1 of 120 "
            r"values\); expected finite values",
        ),
        (
            _tensor("model/head.bias", lambda t: _put(t, (1,), -INF)),
            r"model parameter 'head\.bias' holds -inf at index \(1,\) \(1 of 3 values\); "
            r"expected finite values",
        ),
        (
            _tensor("model/layers.1.unit_gate.log_alpha", lambda t: _put(t, (4,), NAN)),
            r"model parameter 'layers\.1\.unit_gate\.log_alpha' holds nan at index \(4,\) .*"
            r"expected no NaN \(\+-inf is allowed in gate parameters",
        ),
        # budget multipliers and step count
        (
            _tensor("budget/lambda1.flops", lambda t: torch.full_like(t, NAN)),
            r"budget multiplier 'lambda1\.flops' holds nan .*expected a finite number",
        ),
        (
            _tensor("budget/lambda2.flops", lambda t: torch.full_like(t, INF)),
            r"budget multiplier 'lambda2\.flops' holds inf .*expected a finite number",
        ),
        (
            _tensor("budget/step", lambda t: torch.full_like(t, -3)),
            r"budget 'step' is -3, expected a count >= 0",
        ),
        # optimizer state (AdamW)
        (
            _tensor("optim/0/exp_avg_sq", lambda t: _put(t, (5, 1), -0.25)),
            r"optimizer state 'exp_avg_sq' of parameter 0 holds -0\.25 at index \(5, 1\) "
            r"\(1 of 120 values\); expected values >= 0",
        ),
        (
            _tensor("optim/3/exp_avg", lambda t: _put(t, (7,), NAN)),
            r"optimizer state 'exp_avg' of parameter 3 holds nan at index \(7,\) .*expected no NaN",
        ),
        (
            _tensor("optim/2/exp_avg_sq", lambda t: _put(t, (0, 0), NAN)),
            r"optimizer state 'exp_avg_sq' of parameter 2 holds nan .*expected no NaN",
        ),
        (
            _tensor("optim/1/step", lambda t: torch.tensor(-5.0)),
            r"optimizer state 'step' of parameter 1 is -5\.0, expected a whole count of steps >= 0",
        ),
        (
            _tensor("optim/1/step", lambda t: torch.tensor(2.5)),
            r"'step' of parameter 1 is 2\.5, expected a whole count",
        ),
        (
            _tensor("optim/1/step", lambda t: torch.tensor(NAN)),
            r"'step' of parameter 1 is nan, expected a whole count",
        ),
        (
            _tensor("optim/4/step", lambda t: t.long()),
            r"optimizer state 'step' of parameter 4 is a torch\.int64 tensor, expected "
            r"torch\.float32",
        ),
        (
            _meta(_set("optim_param_groups", 1, "lr", value=NAN)),
            r"optimizer parameter group 1 \(gates\) has 'lr' nan, expected a finite number >= 0",
        ),
        (
            _meta(_set("optim_param_groups", 0, "lr", value=INF)),
            r"group 0 \(weights\) has 'lr' inf, expected a finite number >= 0",
        ),
        (
            _meta(_set("optim_param_groups", 2, "lr", value=-0.1)),
            r"group 2 \(budget\) has 'lr' -0\.1",
        ),
        # counters: history and trace against the step, the epoch's running sums
        (
            _meta(_extra_epoch),
            r"'history' holds 2 records at step 8, expected 1 \(one per finished epoch of 6 steps",
        ),
        (_meta(_set("history", value=[])), r"'history' holds 0 records at step 8, expected 1"),
        (
            _meta(_set("history", 0, "epoch", value=-1)),
            r"history\[0\]\['epoch'\] is -1, expected 1",
        ),
        (_meta(_set("history", 0, "step", value=5)), r"history\[0\]\['step'\] is 5, expected 6"),
        (
            _meta(_trace_beyond),
            r"trace\[2\]\['step'\] is 15, expected an int in \[7, 8\]",
        ),
        (_meta(_trace_repeated), r"trace\[2\]\['step'\] is 6, expected an int in \[7, 8\]"),
        (
            _meta(_set("trace", 0, "epoch", value=2)),
            r"trace\[0\]\['epoch'\] is 2, expected 1 \(the epoch of step 3",
        ),
        (_meta(_set("stats", "loss", value=NAN)), r"'stats': 'loss' is NaN, expected a number"),
        (
            _meta(_set("stats", "count", value=-12.0)),
            r"'stats': 'count' is -12\.0, expected a whole number of samples >= 0",
        ),
        (
            _meta(_set("rank_stats", 0, 1, value=NAN)),
            r"'rank_stats' of rank 0: 'task_loss' is NaN",
        ),
        (
            _meta(_set("rank_stats", 0, 3, value=5.0)),
            r"the ranks' counts in 'rank_stats' add up to 5 samples, expected 24",
        ),
        (
            _meta(_legacy_count),
            r"'stats': 'count' is 99\.0, expected at most 24",
        ),
        (
            _meta(_set("achieved_before_snap", value={"flops": NAN})),
            r"'achieved_before_snap' is \{'flops': nan\}, expected null or numbers for "
            r"\['flops'\] \(cost fractions: finite, >= 0\)",
        ),
        (
            _meta(_set("achieved_before_snap", value={"flops": -0.5})),
            r"'achieved_before_snap' is \{'flops': -0\.5\}",
        ),
    ],
)
def test_a_checkpoint_with_impossible_values_is_refused_before_anything_changes(
    tmp_path: Path, edit: Edit, match: str
) -> None:
    _crafted(tmp_path, edit)
    _assert_refused(tmp_path, match)


@functools.cache
def _float_keys() -> list[str]:
    """The floating model, optimizer and multiplier tensors of the checkpoint."""
    tensors, _ = read_tensors(_written())
    prefixes = ("model/", "optim/", "budget/lambda")
    return sorted(k for k, v in tensors.items() if k.startswith(prefixes) and v.is_floating_point())


@settings(max_examples=30, deadline=None)
@given(data=st.data(), where=st.integers(0, 10_000))
def test_nan_anywhere_in_a_state_tensor_is_refused_naming_it(
    data: st.DataObject, where: int
) -> None:
    """NaN at any position of any floating model, optimizer or multiplier tensor."""
    key = data.draw(st.sampled_from(_float_keys()))
    with tempfile.TemporaryDirectory() as tmp:

        def edit(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
            flat = tensors[key].clone().reshape(-1)  # (N,)
            flat[where % flat.numel()] = NAN
            tensors[key] = flat.reshape(tensors[key].shape)

        _crafted(Path(tmp), edit)
        _, name = key.split("/", 1)
        if key.startswith("optim/"):
            pid, name = name.split("/")
            named = rf"optimizer state '{name}' of parameter {pid} "
        elif key.startswith("budget/"):
            named = rf"budget multiplier '{name}' "
        else:
            named = rf"model parameter '{name}' "
        _assert_refused(Path(tmp), named.replace(".", r"\.") + r"(holds|is) nan")


# ---------------------------------------------------------------------- still accepted
def test_a_legacy_checkpoint_without_rank_sums_still_resumes(tmp_path: Path) -> None:
    _crafted(tmp_path, _meta(lambda meta: meta.pop("rank_stats")))
    resumed, (x, y, _, _) = train_worker.setup(str(tmp_path))
    resumed.fit((x, y), resume=True)
    full, _ = train_worker.setup(None)
    full.fit((x, y))
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


@pytest.mark.parametrize("legacy_inf", [False, True])
def test_snapped_gates_resume_bit_for_bit(tmp_path: Path, legacy_inf: bool) -> None:
    """The snap (step 15 of 18) forces the gates: log_alpha = +-1e4 in the step-16
    checkpoint, and their optimizer state stays finite. A checkpoint written before
    2026-12-07, when force_ wrote +-inf, resumes too (to the same weights and gate values)."""
    first, (x, y, _, _) = train_worker.setup(str(tmp_path))
    first.fit((x, y), max_steps=16)
    path = tmp_path / "step-000000016.safetensors"
    tensors, meta = read_tensors(path)
    gates = [k for k in tensors if k.endswith("log_alpha")]
    assert gates
    assert all(bool((tensors[k].abs() == 1e4).all()) for k in gates)
    assert bool(torch.cat([tensors[k].reshape(-1) for k in gates]).gt(0).any())  # some open
    if legacy_inf:
        for k in gates:
            tensors[k] = tensors[k] * math.inf  # +-1e4 -> +-inf
        write_tensors(path, tensors, meta)
    resumed, _ = train_worker.setup(str(tmp_path))
    resumed.fit((x, y), resume=True)
    full, _ = train_worker.setup(None)
    full.fit((x, y))
    untimed = [
        [{k: v for k, v in r.items() if k != "time"} for r in t.history] for t in (resumed, full)
    ]
    assert untimed[0] == untimed[1]
    for k, v in full.model.state_dict().items():
        got = resumed.model.state_dict()[k]
        if legacy_inf and k.endswith("log_alpha"):
            assert torch.equal(got.sign(), v.sign()), k  # the same gates open
            assert bool(got.isinf().all()), k
        else:
            assert torch.equal(got, v), k


class _MaskedNorm(nn.Module):
    """Linear, BatchNorm, and a softmax over features with a -inf mask buffer (as attention
    masks hold): -inf in a buffer is legitimate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("mask", torch.tensor([0.0, 0.0, 0.0, -math.inf]))
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.fc(x))  # (B, 4)
        return self.out(h * torch.softmax(h + self.mask, dim=1))  # (B, 3)


def _masked_run(folder: Path) -> tuple[Trainer, Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    trainer = Trainer(_MaskedNorm(), epochs=2, batch_size=8, checkpoint_dir=folder, progress=False)
    return trainer, x, y


def test_a_minus_inf_buffer_resumes_and_batchnorm_statistics_are_checked(tmp_path: Path) -> None:
    first, x, y = _masked_run(tmp_path)
    first.fit((x, y), max_steps=3)
    path = tmp_path / "step-000000003.safetensors"
    clean = path.read_bytes()
    resumed, _, _ = _masked_run(tmp_path)
    resumed.fit((x, y), resume=True)  # the -inf mask is no reason to refuse
    full, _, _ = _masked_run(Path(tempfile.mkdtemp()))
    full.fit((x, y))
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k

    cases = [
        ("norm.running_var", (2,), -0.5, r"'norm\.running_var' \(BatchNorm1d\) holds -0\.5"),
        ("norm.running_var", (0,), NAN, r"'norm\.running_var' \(BatchNorm1d\) holds nan"),
        ("norm.running_mean", (3,), NAN, r"'norm\.running_mean' \(BatchNorm1d\) holds nan"),
        ("norm.num_batches_tracked", (), -1, r"'norm\.num_batches_tracked' .*holds -1"),
    ]
    for key, index, value, match in cases:
        for stale in tmp_path.iterdir():
            stale.unlink()
        path.write_bytes(clean)
        tensors, meta = read_tensors(path)
        tensors[f"model/{key}"] = _put(tensors[f"model/{key}"], index, value)
        write_tensors(path, tensors, meta)
        other, _, _ = _masked_run(tmp_path)
        before = state_copy(other.model)
        with pytest.raises(ValueError, match=match + r".*expected (values >= 0|no NaN|a count)"):
            other.fit((x, y), resume=True)
        assert_state_unchanged(other.model, before)
