"""Trainer and recalibrate_batchnorm refuse bad input before any work: non-finite data, bad
class labels, an unusable checkpoint_dir, settings changed after construction, a different
latency model on resume; a diverging run never replaces good checkpoints."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gating_helpers import assert_state_unchanged, state_copy
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.io import read_tensors, write_tensors
from gatedprune.train import Record, Trainer


def _data(n: int = 60, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)  # (N, 8)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()  # (N,) 3 classes
    return x, y


def _net(seed: int = 0) -> gp.ShortcutMLP:
    torch.manual_seed(seed)
    return gp.ShortcutMLP(8, [12, 12], 3)


def _counting(steps: list[int]) -> Callable[[Trainer, Record], None]:
    def on_step(trainer: Trainer, record: Record) -> None:
        steps.append(trainer.step)

    return on_step


# ---------------------------------------------------------------------- non-finite data
@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("train_x", float("nan"), r"train: x holds 1 non-finite value\(s\) .* sample 5"),
        ("train_x", float("inf"), r"train: x holds 1 non-finite value\(s\)"),
        ("train_y", float("nan"), r"train: y holds 1 non-finite value\(s\)"),
        ("val_x", float("-inf"), r"val: x holds 1 non-finite value\(s\) .* sample 5"),
    ],
)
def test_non_finite_data_is_refused_before_any_step(
    tmp_path: Path, where: str, value: float, message: str
) -> None:
    """Also no checkpoint is written: an earlier run's stays (before the fix a ruined model's
    replaced it)."""
    x, y = _data()
    target = torch.randn(len(x), 3) if where == "train_y" else y  # floating y: MSE
    earlier = Trainer(_net(), epochs=2, batch_size=10, progress=False, checkpoint_dir=tmp_path)
    earlier.fit((x, target), max_steps=4)
    old = tmp_path / "step-000000004.safetensors"
    kept = old.read_bytes()
    xv = x.clone()
    {"train_x": x, "train_y": target, "val_x": xv}[where][5, 1] = value
    steps: list[int] = []
    net = _net()
    before = state_copy(net)
    trainer = Trainer(
        net,
        epochs=2,
        batch_size=10,
        progress=False,
        checkpoint_dir=tmp_path,
        on_step=_counting(steps),
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit((x, target), val=(xv, target))
    assert steps == []
    assert_state_unchanged(net, before)
    assert [p.name for p in tmp_path.iterdir()] == [old.name]
    assert old.read_bytes() == kept


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoints(
    tmp_path: Path,
) -> None:
    """A loss that turns NaN at step 7 (e.g. an overflow): the error is raised before that
    step's optimizer update, no checkpoint of the state is written and the older ones stay,
    so resume=True continues from the last good one."""
    x, y = _data()
    calls: list[int] = []

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        calls.append(1)
        loss = nn.functional.cross_entropy(out, target)
        return loss * float("nan") if len(calls) == 7 else loss

    net = _net()
    trainer = Trainer(
        net,
        loss_fn=loss_fn,
        epochs=3,
        batch_size=10,
        progress=False,
        checkpoint_dir=tmp_path,
        checkpoint_every_steps=3,
    )
    with pytest.raises(ValueError, match=r"training diverged at step 7 \(epoch 2\).*nan") as e:
        trainer.fit((x, y))
    assert "step-000000006.safetensors" in str(e.value)  # the newest checkpoint, kept
    assert trainer.step == 6
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000003.safetensors",
        "step-000000006.safetensors",
    ]
    resumed = Trainer(
        _net(),
        epochs=3,
        batch_size=10,
        progress=False,
        checkpoint_dir=tmp_path,
        checkpoint_every_steps=3,
    )
    resumed.fit((x, y), resume=True)
    assert resumed.step == 18


def test_a_diverged_model_is_never_written_over_good_checkpoints(tmp_path: Path) -> None:
    """A finite loss with NaN gradients (sqrt at 0) at a checkpoint step: every weight turns
    NaN in that update; the checkpoint is refused and the earlier ones are kept."""
    x, y = _data()
    calls: list[int] = []

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        calls.append(1)
        loss = nn.functional.cross_entropy(out, target)
        if len(calls) == 6:  # forward 0, backward inf * 0 = NaN
            loss = loss + torch.sqrt(out.sum() * 0.0)
        return loss

    trainer = Trainer(
        _net(),
        loss_fn=loss_fn,
        epochs=3,
        batch_size=10,
        progress=False,
        checkpoint_dir=tmp_path,
        checkpoint_every_steps=3,
    )
    with pytest.raises(ValueError, match=r"diverged by step 6: NaN or inf in .*weight"):
        trainer.fit((x, y))
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000003.safetensors"]


@pytest.mark.parametrize("legacy_inf", [False, True])
def test_snapped_gates_are_checkpointed(tmp_path: Path, legacy_inf: bool) -> None:
    """Gate.force_ fixes hard concrete gates with log_alpha = +-1e4 (+-inf before
    2026-12-07, still accepted): not a divergence."""
    x, y = _data()
    net = _net()
    budget = gp.Budget(net, x[:1], flops=0.5, warmup_steps=4)
    trainer = Trainer(
        net, budget=budget, epochs=3, batch_size=10, progress=False, checkpoint_dir=tmp_path
    )
    if legacy_inf:  # the snap happens at step 15 of 18: a checkpoint after, as written before
        trainer.fit((x, y), max_steps=16)
        path = tmp_path / "step-000000016.safetensors"
        tensors, meta = read_tensors(path)
        for k in tensors:
            if k.endswith("log_alpha"):
                tensors[k] = tensors[k] * math.inf  # +-1e4 -> +-inf
        write_tensors(path, tensors, meta)
        trainer.fit((x, y), resume=True)
    else:
        trainer.fit((x, y))
    assert trainer.latest_checkpoint() == tmp_path / "step-000000018.safetensors"
    log_alpha = torch.cat([p.detach() for g in gp.gate_modules(net) for p in g.parameters()])
    assert bool((log_alpha.abs() == (math.inf if legacy_inf else 1e4)).all())


# ---------------------------------------------------------------------- class labels
@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (lambda y: torch.full_like(y, 7), ValueError, r"outside \[0, 3\) \(e\.g\. 7\)"),
        (lambda y: torch.full_like(y, -3), ValueError, r"60 class label\(s\) outside \[0, 3\)"),
        (lambda y: y[:, None], ValueError, r"shape \(60, 1\).* y of shape \(60,\)"),
        (lambda y: y > 0, TypeError, r"dtype torch\.bool"),
        (lambda y: y.int(), TypeError, r"dtype torch\.int32"),
    ],
)
def test_bad_train_labels_are_refused_before_any_step(
    labels: Callable[[Tensor], Tensor], error: type[Exception], message: str
) -> None:
    x, y = _data()
    steps: list[int] = []
    net = _net()
    before = state_copy(net)
    modes = [m.training for m in net.modules()]
    trainer = Trainer(net, epochs=1, batch_size=10, progress=False, on_step=_counting(steps))
    with pytest.raises(error, match=f"train: y .*{message}"):
        trainer.fit((x, labels(y)))
    assert steps == []
    assert_state_unchanged(net, before)
    assert [m.training for m in net.modules()] == modes


def test_bad_validation_labels_are_refused_before_training() -> None:
    x, y = _data()
    steps: list[int] = []
    trainer = Trainer(_net(), epochs=1, batch_size=10, progress=False, on_step=_counting(steps))
    with pytest.raises(ValueError, match=r"val: y holds 60 class label\(s\) outside \[0, 3\)"):
        trainer.fit((x, y), val=(x, torch.full_like(y, 9)))
    assert steps == []


def test_labels_a_cross_entropy_loss_accepts_are_accepted() -> None:
    """ignore_index (-100 by default, or the loss's own), uint8 labels, per-position labels
    of a (B, C, L) output, and losses that are not cross-entropy are left alone."""
    x, y = _data()
    masked = y.clone()
    masked[::4] = -100
    Trainer(_net(), epochs=1, batch_size=10, progress=False).fit((x, masked))
    own = y.clone()
    own[::3] = 5
    Trainer(_net(), loss_fn=nn.CrossEntropyLoss(ignore_index=5), epochs=1, progress=False).fit(
        (x, own)
    )
    Trainer(_net(), epochs=1, batch_size=10, progress=False).fit((x, y.to(torch.uint8)))
    torch.manual_seed(0)
    conv = gp.ShortcutConv1d(1, [[4]], 3)  # (B, 3) logits
    seq = nn.Sequential(nn.Conv1d(1, 3, 3, padding=1))  # (B, 3, L) per-position logits
    xs = torch.randn(20, 1, 16)
    Trainer(conv, epochs=1, batch_size=10, progress=False).fit((xs, y[:20]))
    Trainer(seq, epochs=1, batch_size=10, progress=False).fit((xs, torch.randint(0, 3, (20, 16))))
    xv = torch.randn(6, 1, 24)  # validation sequences of another length: checked on their own
    Trainer(seq, epochs=1, batch_size=10, progress=False).fit(
        (xs, torch.randint(0, 3, (20, 16))), val=(xv, torch.randint(0, 3, (6, 24)))
    )
    with pytest.raises(ValueError, match=r"y has shape \(20,\).*y of shape \(20, 16\)"):
        Trainer(seq, epochs=1, batch_size=10, progress=False).fit((xs, y[:20]))

    def hinge(out: Tensor, target: Tensor) -> Tensor:  # any labels: not checked
        return out.gather(1, (target % 3)[:, None]).neg().mean()

    Trainer(_net(), loss_fn=hinge, epochs=1, batch_size=10, progress=False).fit((x, y + 10))


def test_the_label_check_changes_no_result() -> None:
    """The check's forward pass (eval mode, no gradients, before the run seeds its RNG)
    leaves a run with BatchNorm and gates bit-identical to one whose loss is not checked
    (the same loss behind a wrapper)."""
    xs = torch.randn(40, 1, 16, generator=torch.Generator().manual_seed(1))
    ys = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2))

    class Wrapped:  # the same loss, not an nn.CrossEntropyLoss: not checked
        def __init__(self) -> None:
            self.loss = nn.CrossEntropyLoss()

        def __call__(self, out: Tensor, target: Tensor) -> Tensor:
            loss: Tensor = self.loss(out, target)
            return loss

    runs = []
    for loss_fn in (nn.CrossEntropyLoss(), Wrapped()):
        torch.manual_seed(0)
        net = gp.ShortcutConv1d(1, [[8], [8]], 3, input_length=16)
        budget = gp.Budget(net, xs[:1], flops=0.5, warmup_steps=4)
        trainer = Trainer(
            net, budget=budget, loss_fn=loss_fn, epochs=3, batch_size=10, progress=False
        )
        trainer.fit((xs, ys), val=(xs[:20], ys[:20]))
        runs.append((state_copy(net), state_copy(budget), _without_time(trainer.history)))
    (net_a, budget_a, hist_a), (net_b, budget_b, hist_b) = runs
    _assert_same_state(net_a, net_b)
    _assert_same_state(budget_a, budget_b)
    assert hist_a == hist_b


def _without_time(records: list[Record]) -> list[Record]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------- checkpoint_dir
def test_checkpoint_dir_under_a_file_is_refused_before_any_step(tmp_path: Path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    x, y = _data()
    for resume in (False, True):
        steps: list[int] = []
        trainer = Trainer(
            _net(),
            epochs=1,
            batch_size=10,
            progress=False,
            checkpoint_dir=blocker / "ckpt",
            on_step=_counting(steps),
        )
        with pytest.raises(ValueError, match=r"checkpoint_dir: cannot create .*not a directory"):
            trainer.fit((x, y), resume=resume)
        assert steps == []
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_checkpoint_dir_that_cannot_be_created_is_refused_before_any_step() -> None:
    x, y = _data()
    steps: list[int] = []
    trainer = Trainer(
        _net(),
        epochs=1,
        batch_size=10,
        progress=False,
        checkpoint_dir="/proc/gatedprune-ckpt",
        on_step=_counting(steps),
    )
    with pytest.raises(ValueError, match=r"checkpoint_dir '/proc/gatedprune-ckpt' cannot be"):
        trainer.fit((x, y))
    assert steps == []


def test_checkpoint_dir_is_created_only_after_the_other_checks(tmp_path: Path) -> None:
    x, y = _data()
    folder = tmp_path / "new" / "ckpt"
    trainer = Trainer(_net(), epochs=1, batch_size=10, progress=False, checkpoint_dir=folder)
    with pytest.raises(ValueError, match="class label"):
        trainer.fit((x, y + 5))
    assert not (tmp_path / "new").exists()
    trainer.fit((x, y))
    assert folder.is_dir()


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("epochs", 0, ValueError, "epochs must be an int > 0, got 0"),
        ("lr", -0.01, ValueError, "lr must be a finite number > 0, got -0.01"),
        ("lr", float("nan"), ValueError, "lr must be a finite number > 0, got nan"),
        ("gate_lr", float("inf"), ValueError, "gate_lr must be a finite number > 0, got inf"),
        ("batch_size", -5, ValueError, "batch_size must be an int > 0, got -5"),
        ("snap_at", 1.5, ValueError, r"snap_at must be a fraction of training in \[0, 1\]"),
        ("seed", -1, ValueError, r"seed must be an int in \[0, 2\*\*63\), got -1"),
        ("progress", "no", TypeError, "progress must be a bool, got 'no'"),
        ("budget", "flops=0.5", TypeError, "budget must be a gatedprune.Budget"),
        ("checkpoint_dir", 5, TypeError, "checkpoint_dir must be a path or None, got 5"),
    ],
)
def test_settings_changed_after_construction_are_checked_by_fit(
    name: str, value: Any, error: type[Exception], message: str
) -> None:
    x, y = _data()
    net = _net()
    budget = gp.Budget(net, x[:1], flops=0.4)
    trainer = Trainer(net, budget=budget, epochs=2, batch_size=10, progress=False)
    before = state_copy(net)
    setattr(trainer, name, value)
    with pytest.raises(error, match=message):
        trainer.fit((x, y))
    assert trainer.step == 0
    assert_state_unchanged(net, before)


def test_resume_must_be_a_bool(tmp_path: Path) -> None:
    x, y = _data()
    trainer = Trainer(_net(), epochs=1, batch_size=10, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(TypeError, match="resume must be a bool, got 'no'"):
        trainer.fit((x, y), resume="no")  # type: ignore[arg-type]


def test_numpy_integers_are_accepted_like_ints(tmp_path: Path) -> None:
    """As by Budget: numpy integers work wherever ints do (and land in the checkpoint's JSON
    as ints); a run with them is the run with the same Python ints. Bools stay refused."""
    x, y = _data()
    runs = []
    kinds: list[Callable[[int], Any]] = [int, np.int64]
    for kind in kinds:
        net = _net()
        budget = gp.Budget(net, x[:1], flops=0.5, warmup_steps=kind(4))
        trainer = Trainer(
            net,
            budget=budget,
            epochs=kind(2),
            batch_size=kind(10),
            seed=kind(3),
            trace_every=kind(2),
            keep_checkpoints=kind(1),
            checkpoint_every_steps=kind(4),
            eval_batch_size=kind(16),
            snap_round_to=kind(4),
            progress=False,
            checkpoint_dir=tmp_path / str(kind(0).__class__.__name__),
        )
        assert type(trainer.epochs) is int
        assert type(trainer.seed) is int
        trainer.fit((x, y), val=(x[:20], y[:20]), max_steps=kind(9))
        trainer.fit((x, y), val=(x[:20], y[:20]), resume=True)
        runs.append((state_copy(net), trainer.trace))
    (a, trace_a), (b, trace_b) = runs
    _assert_same_state(a, b)
    assert trace_a == trace_b
    with pytest.raises(TypeError, match=r"epochs must be an int, got True \(bool\)"):
        Trainer(_net(), epochs=True)
    with pytest.raises(TypeError, match=r"epochs must be an int, got 2\.5 \(float\)"):
        Trainer(_net(), epochs=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"lr must be a number, got '0\.1' \(str\)"):
        Trainer(_net(), lr="0.1")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- latency model
def _latency_model(scale: float) -> gp.LatencyModel:
    torch.manual_seed(0)
    lm = gp.LatencyModel.calibrate(_net(), torch.zeros(1, 8), batch_size=8, samples=8, rounds=1)
    d = json.loads(lm.to_json())
    d["coef"] = {k: v * scale for k, v in d["coef"].items()}
    return gp.LatencyModel.from_json(json.dumps(d))


def _latency_run(lm: gp.LatencyModel, folder: Path, x: Tensor) -> Trainer:
    net = _net()
    budget = gp.Budget(net, x[:1], latency=0.5, latency_model=lm, warmup_steps=6)
    return Trainer(
        net, budget=budget, epochs=3, batch_size=10, progress=False, checkpoint_dir=folder
    )


@pytest.mark.filterwarnings("ignore:LatencyModel.calibrate")  # a tiny, noisy calibration
def test_resume_under_another_latency_model_is_refused(tmp_path: Path) -> None:
    x, y = _data()
    lm = _latency_model(1.0)
    first = _latency_run(lm, tmp_path, x)
    first.fit((x, y), max_steps=8)
    other = _latency_run(_latency_model(10.0), tmp_path, x)
    before = state_copy(other.model)
    with pytest.raises(ValueError, match=r"latency_model: checkpoint 'sha256 [0-9a-f]{12}\.\.\."):
        other.fit((x, y), resume=True)
    assert other.step == 0
    assert_state_unchanged(other.model, before)
    # the same latency model (here read back from its JSON) resumes, to the uninterrupted run
    same = _latency_run(gp.LatencyModel.from_json(lm.to_json()), tmp_path, x)
    same.fit((x, y), resume=True)
    full = _latency_run(lm, tmp_path / "full", x)
    full.fit((x, y))
    assert same.step == full.step == 18
    _assert_same_state(state_copy(same.model), state_copy(full.model))
    assert same.trace == full.trace


# ---------------------------------------------------------------------- recalibrate_batchnorm
def _bn_net() -> gp.ShortcutConv1d:
    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[8], [8]], 3, input_length=16)
    gp.recalibrate_batchnorm(net, [torch.randn(32, 1, 16)])
    return net.eval()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_recalibrate_batchnorm_refuses_a_non_finite_batch(value: float) -> None:
    net = _bn_net()
    before = state_copy(net)
    good = torch.randn(64, 1, 16)
    bad = torch.randn(64, 1, 16)
    bad[3, 0, 5] = value
    with pytest.raises(ValueError, match=r"batch 1 holds 1 non-finite value\(s\).*sample 3"):
        gp.recalibrate_batchnorm(net, [good, bad])
    assert_state_unchanged(net, before)
    assert not net.training
    assert gp.recalibrate_batchnorm(net, [good]) == 2  # a good batch still works


def test_recalibrate_batchnorm_refuses_statistics_that_overflow() -> None:
    net = _bn_net()
    before = state_copy(net)
    with pytest.raises(ValueError, match=r"new running_var of 'layers\.0\.norm' is not finite"):
        gp.recalibrate_batchnorm(net, [torch.full((4, 1, 16), 1e30)])
    assert_state_unchanged(net, before)


def test_read_only_checkpoint_dir_is_refused_before_training(
    tmp_path: Path,
) -> None:
    """A read-only checkpoint_dir is refused before training (skipped for root, whom the
    permission bits do not stop)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        x, y = _data()
        trainer = Trainer(_net(), epochs=1, batch_size=10, progress=False, checkpoint_dir=folder)
        with pytest.raises(ValueError, match="is not writable"):
            trainer.fit((x, y))
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("harden_at", [None, 0.5])
def test_sigmoid_gates_get_the_exact_cost_only_once_hardened(harden_at: float | None) -> None:
    # before: with the default straight_through_at=0.0 the penalty used the exact cost of
    # unhardened sigmoid gates (always the all-open 1.0): lambda wound up and drove the expected
    # FLOPs to ~0.02 for a 0.5 target
    torch.manual_seed(0)
    x = torch.randn(600, 10)
    y = (x @ torch.randn(10, 3)).argmax(1)
    net = gp.ShortcutMLP(10, [32, 32], 3, gate="sigmoid")
    budget = gp.Budget(net, x[:1], flops=0.5, warmup_steps=50)
    states: list[bool] = []
    trainer = gp.Trainer(
        net,
        budget=budget,
        epochs=8,
        batch_size=50,
        progress=False,
        harden_at=harden_at,
        snap_at=None,
        on_step=lambda t, _: states.append(bool(budget.straight_through)),
    )
    history = trainer.fit(train=(x, y))
    before = [h["expected_flops"] for h in history if h["epoch"] <= 4]
    assert min(before) > 0.3  # the Lagrangian tracks the target instead of collapsing
    assert max(abs(h["lambda1_flops"]) for h in history if h["epoch"] <= 4) < 2.0
    if harden_at is None:
        assert not any(states)
    else:  # straight-through from the step the gates are hardened
        assert not any(states[: len(states) // 2 - 1])
        assert all(states[len(states) // 2 + 1 :])
