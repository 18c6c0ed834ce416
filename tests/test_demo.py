"""The demo end to end on a tiny configuration, the CLI's argument errors, import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import gatedprune as gp
from gatedprune.cli import main
from gatedprune.demo import DemoConfig, all_open_copy, build_demo_model, run_demo
from gatedprune.profiling import allocator_setting


@pytest.mark.parametrize("round_to", [None, 8])
def test_demo_runs_end_to_end_and_writes_its_results(tmp_path: Path, round_to: int | None) -> None:
    pytest.importorskip("mnist1d")
    config = DemoConfig(
        epochs=2,
        finetune_epochs=1,
        num_samples=600,
        out=tmp_path,
        progress=False,
        round_to=round_to,
    )
    results = run_demo(config)
    if round_to is not None:  # every kept width is a multiple of round_to or the full width
        layers = results["connectivity"]["layers"]
        assert all(
            x["kept_units"] % round_to == 0 or x["kept_units"] == x["width"] for x in layers
        ), layers
        assert results["config"]["round_to"] == round_to
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["achieved_flops_fraction"] == results["achieved_flops_fraction"]
    for name in ("connectivity.png", "widths.png", "training.png", "pruned.safetensors"):
        assert (tmp_path / name).stat().st_size > 0
    # float32 rounding is relative to the logits' scale; float64 shows the functions are equal
    assert results["max_rel_diff_float32"] <= 1e-6
    assert results["max_abs_diff_float32"] <= 1e-5 * max(1.0, results["max_abs_logit"])
    assert results["max_abs_diff_float32_random"] <= 1e-5  # the criterion's inputs
    assert results["max_abs_diff_float64"] <= 1e-9
    assert results["accuracy_pruned"] == results["accuracy_gated"]
    assert results["allocator"] == allocator_setting()  # how the latencies were measured
    rows = {r["model"]: r for r in results["rows"]}
    dense, pruned = rows["all-open (dense architecture)"], rows["pruned + fine-tuned"]
    assert pruned["flops"] <= dense["flops"]
    assert results["achieved_flops_fraction"] == pruned["flops"] / dense["flops"]
    loaded = gp.load(tmp_path / "pruned.safetensors")
    c = gp.cost(loaded, torch.zeros(1, 1, 40))
    assert isinstance(c, gp.Cost)
    assert (c.flops, c.params) == (pruned["flops"], pruned["params"])


def test_demo_with_a_latency_budget_reports_predicted_and_measured_latency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured fraction set against the prediction is timed on the latency model's batch
    size and threads (batch 256, 1 thread), the all-threads one is reported next to it."""
    pytest.importorskip("mnist1d")
    import gatedprune.demo as demo_module

    timed: list[tuple[tuple[str, ...], int, int | None]] = []
    real = demo_module.compare_latency

    def recording(models: dict[str, torch.nn.Module], x: torch.Tensor, **kw: object) -> object:
        timed.append((tuple(models), len(x), kw.get("threads")))  # type: ignore[arg-type]
        return real(models, x, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(demo_module, "compare_latency", recording)
    # an earlier run's latency model for the same network (marked: 7 samples): this run
    # calibrates its own (the demos never resume) and records that one
    with warnings.catch_warnings():  # a tiny, noisy calibration: only its JSON matters
        warnings.simplefilter("ignore")
        stale = json.loads(
            gp.LatencyModel.calibrate(
                build_demo_model(), torch.zeros(1, 1, 40), batch_size=8, samples=8, rounds=1
            ).to_json()
        )
    stale["samples"], stale["median_error"] = 7, 0.777
    (tmp_path / "checkpoints").mkdir()
    kept = tmp_path / "checkpoints" / "latency_model.json"
    kept.write_text(json.dumps(stale))
    config = DemoConfig(
        budget=0.3,
        epochs=2,
        finetune_epochs=0,
        num_samples=600,
        out=tmp_path,
        progress=False,
        latency=True,
    )
    results = run_demo(config)
    assert results["latency_model"]["batch_size"] == 256
    assert results["latency_model"]["samples"] != 7
    assert json.loads(kept.read_text()) == results["latency_model"]
    assert results["config"]["budget_kind"] == "latency"
    assert results["target_latency_fraction"] == 0.3
    predicted = results["predicted_latency_fraction"]
    assert 0.0 < predicted <= 1.0
    assert results["budget_error"] == abs(predicted - 0.3)
    measured = results["measured_latency_fraction_b256"]
    assert measured > 0.0
    assert results["measured_latency_threads"] == 1
    assert results["measured_latency_fraction_b256_all_threads"] > 0.0
    assert results["latency_ratio_b256_model_threads"] == pytest.approx(
        results["achieved_flops_fraction"] / measured, rel=1e-12
    )
    # one call times exactly the two models, on the model's batch size and threads
    assert (("dense", "pruned"), 256, 1) in timed, timed
    lm = gp.LatencyModel.from_json(json.dumps(results["latency_model"]))
    loaded = gp.load(tmp_path / "pruned.safetensors")
    assert isinstance(loaded, gp.PlainShortcutNet)
    dense = gp.prune(all_open_copy(build_demo_model()))
    assert isinstance(dense, gp.PlainShortcutNet)
    assert lm.predict(loaded) / lm.predict(dense) == pytest.approx(predicted, rel=1e-12)


def test_demo_speed_recipe_gates_channel_groups_and_adds_a_latency_budget(
    tmp_path: Path,
) -> None:
    """``--unit-group 32 --latency-ratio 0.7``: whole 32-channel groups are gated (kept widths
    0, 32 or 64) and a latency budget of budget / 0.7 joins the FLOPs budget, which stays the
    reported one."""
    pytest.importorskip("mnist1d")
    config = DemoConfig(
        budget=0.25,
        epochs=2,
        finetune_epochs=0,
        num_samples=600,
        out=tmp_path,
        progress=False,
        unit_group=32,
        latency_ratio=0.7,
    )
    results = run_demo(config)
    assert results["config"]["budget_kind"] == "flops"
    assert results["config"]["unit_group"] == 32
    assert results["config"]["latency_ratio"] == 0.7
    assert results["target_flops_fraction"] == 0.25
    assert results["target_latency_fraction"] == pytest.approx(0.25 / 0.7)
    assert results["budget_error"] == abs(results["achieved_flops_fraction"] - 0.25)
    assert 0.0 < results["predicted_latency_fraction"] <= 1.0
    assert results["latency_ratio_b256"] == pytest.approx(
        results["speedup_b256"] / results["flops_reduction"]
    )
    widths = [x["kept_units"] for x in results["connectivity"]["layers"]]
    assert all(w % 32 == 0 for w in widths), widths
    lm = gp.LatencyModel.from_json(json.dumps(results["latency_model"]))
    assert lm.spec == build_demo_model(unit_group=32).spec
    assert results["max_abs_diff_float32_random"] <= 1e-5


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"unit_group": 3}, ValueError, "--unit-group must divide .* got 3"),
        ({"unit_group": 64}, ValueError, "--unit-group must divide .* got 64"),
        ({"unit_group": "2"}, TypeError, "--unit-group must be an int dividing 32"),
        ({"latency_ratio": 1.5}, ValueError, r"--latency-ratio must be a fraction in \(0, 1\]"),
        ({"latency_ratio": "0.7"}, TypeError, "--latency-ratio must be a number"),
        ({"latency_ratio": 0.7, "latency": True}, ValueError, "give one of them"),
    ],
)
def test_demo_config_refuses_bad_speed_options(
    config: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        DemoConfig(**config).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--budget", "1.5"], "fraction in (0, 1]"),
        (["demo", "--budget", "abc"], "expected a number"),
        (["demo", "--epochs", "0"], ">= 1"),
        (["demo", "--seed", "-3"], ">= 0"),
        (["demo", "--seed", str(2**63)], "a seed in [0, 2**63)"),
        (["demo", "--out", __file__], "exists and is not a directory"),
        (["demo", "--round-to", "0"], ">= 1"),
        (["demo", "--model", "lstm", "--latency"], "--latency applies to --model conv or resnet1d"),
        (["demo", "--model", "resnet1d", "--unit-group", "32"], "apply to --model conv"),
        (["demo", "--model", "lstm", "--latency-ratio", "0.7"], "apply to --model conv"),
        (["demo", "--latency", "--latency-ratio", "0.7"], "give one of them"),
        (["demo", "--latency-ratio", "0"], "fraction in (0, 1]"),
        (["demo", "--unit-group", "0"], ">= 1"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_rejects_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_import_gatedprune_stays_light() -> None:
    code = (
        "import sys, gatedprune; "
        "bad = [m for m in ('matplotlib', 'mnist1d', 'gatedprune.data', 'gatedprune.demo', "
        "'gatedprune.plots', 'onnx', 'onnxruntime', 'onnxscript') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_demo_recipe_trains_with_smoothed_labels() -> None:
    """The demos' default loss smooths labels by LABEL_SMOOTHING (bounded logits keep float32
    rounding of pruned vs gated below 1e-5); an explicit loss_fn replaces it."""
    from torch import nn

    from gatedprune.data import Splits
    from gatedprune.demo import LABEL_SMOOTHING, budget_trainer, build_demo_model

    x = torch.randn(20, 1, 40)  # (N, 1, L)
    y = torch.randint(0, 10, (20,))
    data = Splits(x, y, x, y)
    logits = torch.randn(20, 10) * 30  # (N, classes), over-confident
    trainer = budget_trainer(build_demo_model(), data, flops=0.5, epochs=1, seed=0)
    assert trainer.loss_fn is not None
    expected = nn.functional.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING)
    assert torch.equal(trainer.loss_fn(logits, y), expected)
    assert not torch.equal(expected, nn.functional.cross_entropy(logits, y))
    plain = nn.CrossEntropyLoss()
    explicit = budget_trainer(build_demo_model(), data, flops=0.5, epochs=1, seed=0, loss_fn=plain)
    assert explicit.loss_fn is plain


def test_conv_demo_trains_edge_gates_slower_than_unit_gates() -> None:
    """train_demo_model (the conv demo, bench.budget_sweep, the suite's conv workload) gives the
    edge and read-out gates EDGE_LR_FACTOR of the unit gates' learning rate; budget_trainer
    without edge_lr_factor keeps one rate (the ResNet and LSTM demos)."""
    from gatedprune import demo
    from gatedprune.data import Splits

    x = torch.randn(20, 1, 40)  # (N, 1, L)
    y = torch.randint(0, 10, (20,))
    data = Splits(x, y, x, y)
    one_rate = demo.budget_trainer(demo.build_demo_model(), data, flops=0.5, epochs=1, seed=0)
    assert one_rate.edge_gate_lr is None
    _, trainer = demo.train_demo_model(data, budget=0.5, epochs=1, seed=0)
    assert 0.0 < demo.EDGE_LR_FACTOR < 1.0
    assert trainer.edge_gate_lr == pytest.approx(trainer.gate_lr * demo.EDGE_LR_FACTOR)
    assert trainer.gate_lr == one_rate.gate_lr
