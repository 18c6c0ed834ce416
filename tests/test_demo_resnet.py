"""``gatedprune demo --model resnet1d``: the ResNet demo end to end on a tiny configuration, its
reports of what survived, the plan + safetensors reload, and the CLI's model choice."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gatedprune as gp
from gatedprune import cli
from gatedprune.base import find_model_gating
from gatedprune.demo import DemoConfig
from gatedprune.demo_resnet import (
    BLOCKS,
    WIDTHS,
    block_report,
    build_resnet_demo_model,
    channel_report,
    load_pruned_resnet,
    run_resnet_demo,
    save_pruned_resnet,
    shortcut_report,
)
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import InsertedGating, apply_plan, export_plan, gate_
from gatedprune.io import read_tensors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gating(model: nn.Module) -> InsertedGating:
    g = model.gatedprune
    assert isinstance(g, InsertedGating)
    return g


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                assert m.running_mean is not None
                assert m.running_var is not None
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(0.3 * torch.randn(m.num_features, generator=gen))


def _gated_with_random_decisions(seed: int) -> nn.Module:
    """The demo architecture, gated like the demo, every gate set to a random state (some
    blocks, channels and shortcuts closed, others open with fractional values)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net: nn.Module = build_resnet_demo_model()
    _randomise_norms(net, gen)
    gate_(net, torch.zeros(1, 1, 40), channels=True, blocks=True, shortcuts="dense")
    g = _gating(net)
    assert g.edge_gate is not None
    with torch.no_grad():
        for gate in [*g.group_gates, *g.block_gates, g.edge_gate]:
            assert isinstance(gate, HardConcreteGate)
            gate.log_alpha.copy_(torch.empty(gate.n).uniform_(-4.0, 4.0, generator=gen))
    return net.eval()


def test_resnet_demo_end_to_end_writes_results_plan_weights_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("mnist1d")
    pytest.importorskip("matplotlib")
    from gatedprune.data import mnist1d

    config = DemoConfig(epochs=2, finetune_epochs=1, num_samples=600, out=tmp_path, progress=False)
    results = run_resnet_demo(config)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for name in ("blocks_shortcuts.png", "widths.png", "training.png"):
        png = (tmp_path / name).read_bytes()
        assert png.startswith(PNG_MAGIC)
        assert len(png) > 5000  # a drawn figure, not an empty canvas
    # pruned == gated in eval mode, float32 relative to the logits' scale, float64 exactly
    assert results["max_rel_diff_float32"] <= 1e-6
    assert results["max_abs_diff_float32"] <= 1e-5 * max(1.0, results["max_abs_logit"])
    assert results["max_abs_diff_float32_random"] <= 1e-5  # the criterion's inputs
    assert results["max_abs_diff_float64"] <= 1e-9
    assert results["accuracy_pruned"] == results["accuracy_gated"]
    rows = {r["model"]: r for r in results["rows"]}
    dense, pruned = rows["all-open (dense architecture)"], rows["pruned + fine-tuned"]
    dense_cost = gp.cost(build_resnet_demo_model(), torch.zeros(1, 1, 40))
    assert isinstance(dense_cost, gp.Cost)
    assert (dense["flops"], dense["params"]) == (dense_cost.flops, dense_cost.params)
    assert pruned["flops"] < dense["flops"]
    assert pruned["params"] < dense["params"]
    assert results["achieved_flops_fraction"] == pruned["flops"] / dense["flops"]
    # what survived is reported consistently
    blocks = [b["block"] for b in results["blocks"]]
    assert len(blocks) == sum(BLOCKS)
    assert sorted(results["blocks_kept"] + results["blocks_removed"]) == sorted(blocks)
    assert [b["block"] for b in results["blocks"] if b["kept"]] == results["blocks_kept"]
    kept_sc = [[s["from"], s["to"]] for s in results["shortcuts"] if s["kept"]]
    assert kept_sc == results["shortcuts_kept"]
    for g in results["channel_groups"]:
        assert 0 <= g["after"] <= g["before"]
        inside_removed = all(
            any(p.startswith(b + ".") for b in results["blocks_removed"])
            and ".downsample." not in p
            for p in g["producers"]
        )
        assert (g["after"] == 0) == inside_removed
        if not inside_removed:
            assert g["after"] == g["gates_open"]
    assert results["channels_after"] == sum(g["after"] for g in results["channel_groups"])
    # reload: fresh dense ResNet1d + apply_plan(plan.json) + load_state_dict, no pickle
    plan = json.loads((tmp_path / "plan.json").read_text())
    tensors, meta = read_tensors(tmp_path / "pruned.safetensors")
    assert (meta["widths"], meta["blocks"]) == (list(WIDTHS), list(BLOCKS))
    fresh = apply_plan(build_resnet_demo_model(), plan)
    fresh.load_state_dict(tensors)
    fresh.eval()
    c = gp.cost(fresh, torch.zeros(1, 1, 40))
    assert isinstance(c, gp.Cost)
    assert (c.flops, c.params) == (pruned["flops"], pruned["params"])
    shortcut_buffers = [k for k, _ in fresh.named_buffers() if "gp_shortcut_" in k]
    assert len(shortcut_buffers) == len(results["shortcuts_kept"])
    data = mnist1d(num_samples=config.num_samples)
    assert find_model_gating(fresh) is None
    from gatedprune.demo import accuracy

    assert accuracy(fresh, data.x_test, data.y_test) == results["accuracy_pruned_finetuned"]
    loaded = load_pruned_resnet(tmp_path)
    x = torch.randn(64, 1, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), fresh(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_and_weights_reload_reproduces_the_pruned_model(seed: int, tmp_path: Path) -> None:
    net = _gated_with_random_decisions(seed)
    g = _gating(net)
    assert g.closed_blocks(), "the random decisions should close some block"
    assert g.open_edges(), "the random decisions should open some shortcut"
    pruned = gp.prune(net).eval()
    save_pruned_resnet(pruned, export_plan(net), tmp_path)
    loaded = load_pruned_resnet(tmp_path)
    x = torch.randn(32, 1, 40, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        reference = net(x)
        assert (pruned(x) - reference).abs().max().item() <= 1e-5
        assert (loaded(x) - reference).abs().max().item() <= 1e-5
        assert torch.equal(loaded(x), pruned(x))
    c_loaded = gp.cost(loaded, x[:1])
    c_hard = gp.cost(net, x[:1], hard=True)
    assert isinstance(c_loaded, gp.Cost)
    assert (c_loaded.flops, c_loaded.params) == (float(c_hard.flops), float(c_hard.params))


def test_load_refuses_a_foreign_weights_file(tmp_path: Path) -> None:
    from gatedprune.io import write_tensors

    net = _gated_with_random_decisions(0)
    (tmp_path / "plan.json").write_text(json.dumps(export_plan(net)))
    write_tensors(tmp_path / "pruned.safetensors", {"w": torch.zeros(1)}, {"format": "other"})
    with pytest.raises(ValueError, match=r"expected 'gatedprune\.demo_resnet1d'"):
        load_pruned_resnet(tmp_path)


def test_reports_follow_the_gate_decisions() -> None:
    net = _gated_with_random_decisions(3)
    g = _gating(net)
    pruned = gp.prune(net).eval()
    blocks = block_report(net)
    closed = set(g.closed_blocks())
    assert [not b["kept"] for b in blocks] == [i in closed for i in range(len(blocks))]
    assert all((b["gate"] > 0) == b["kept"] for b in blocks)
    shortcuts = shortcut_report(net)
    open_edges = {(e.src, e.dst) for e in g.open_edges()}
    assert {(s["from"], s["to"]) for s in shortcuts if s["kept"]} == open_edges
    assert len(shortcuts) == len(g.edges)
    groups = channel_report(net, pruned)
    opens = g.hard_open()
    modules = dict(pruned.named_modules())
    for group, is_open in zip(groups, opens, strict=True):
        assert group["gates_open"] == int(is_open.sum())
        alive = [p for p in group["producers"] if p in modules]
        if alive:
            width = modules[alive[0]]
            assert isinstance(width, nn.Conv1d)
            assert group["after"] == width.out_channels == group["gates_open"]
        else:
            assert group["after"] == 0


def test_cli_rejects_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--model", "bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err
    assert "resnet1d" in err


@pytest.mark.parametrize(
    ("argv", "module", "function", "out"),
    [
        (["demo"], "gatedprune.demo", "run_demo", Path("gatedprune-demo")),
        (
            ["demo", "--model", "resnet1d"],
            "gatedprune.demo_resnet",
            "run_resnet_demo",
            Path("gatedprune-demo-resnet1d"),
        ),
        (
            ["demo", "--model", "resnet1d", "--out", "elsewhere"],
            "gatedprune.demo_resnet",
            "run_resnet_demo",
            Path("elsewhere"),
        ),
    ],
)
def test_cli_dispatches_on_model(
    argv: list[str], module: str, function: str, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    seen: list[DemoConfig] = []

    def fake(config: DemoConfig) -> dict[str, Any]:
        seen.append(config)
        return {}

    steadied: list[bool] = []
    monkeypatch.setattr(importlib.import_module(module), function, fake)
    monkeypatch.setattr("gatedprune.profiling.steady_allocator", lambda: steadied.append(not seen))
    assert cli.main([*argv, "--epochs", "3", "--quiet"]) == 0
    assert seen == [DemoConfig(epochs=3, out=out, progress=False)]
    assert steadied == [True]  # the allocator is steadied once, before the demo runs


def test_importing_the_demo_and_cli_stays_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gatedprune, gatedprune.cli, gatedprune.demo_resnet; "
        "bad = [m for m in ('matplotlib', 'mnist1d', 'gatedprune.data', "
        "'gatedprune.plots') if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_resnet_demo_with_a_latency_budget_reports_predicted_and_measured_latency(
    tmp_path: Path,
) -> None:
    """``--latency``: the budget is a fraction of the plain ResNet's latency at batch 1 as a
    GatedLatencyModel calibrated first predicts it; the snap meets it."""
    pytest.importorskip("mnist1d")
    pytest.importorskip("matplotlib")
    # a latency model left by an earlier conv demo run in the same folder (a crash before):
    # the demos never resume, so every run calibrates its own
    (tmp_path / "checkpoints").mkdir()
    kept = tmp_path / "checkpoints" / "latency_model.json"
    with warnings.catch_warnings():  # a tiny, noisy calibration: only its JSON matters
        warnings.simplefilter("ignore")
        stale = gp.LatencyModel.calibrate(
            gp.ShortcutMLP(8, [16], 3), torch.zeros(1, 8), batch_size=8, samples=8, rounds=1
        )
    kept.write_text(stale.to_json())
    config = DemoConfig(
        budget=0.4,
        epochs=2,
        finetune_epochs=0,
        num_samples=600,
        out=tmp_path,
        progress=False,
        latency=True,
    )
    results = run_resnet_demo(config)
    assert results["config"]["budget_kind"] == "latency"
    assert "target_flops_fraction" not in results
    assert results["target_latency_fraction"] == 0.4
    predicted = results["predicted_latency_fraction"]
    assert 0.0 < predicted <= 0.4 + 1e-9
    assert results["budget_error"] == abs(predicted - 0.4)
    assert results["measured_latency_fraction_b1"] > 0.0  # on the model's batch and threads
    assert results["measured_latency_threads"] == 1
    assert results["measured_latency_fraction_b1_all_threads"] > 0.0
    lm = gp.GatedLatencyModel.from_json(json.dumps(results["latency_model"]))
    assert lm.batch_size == 1
    assert lm.input_shape == (1, 1, 40)
    assert 0.0 < results["achieved_flops_fraction"] < 1.0
    # this run's latency model is recorded next to its checkpoints (the earlier one replaced)
    assert gp.GatedLatencyModel.from_json(kept.read_text()) == lm
