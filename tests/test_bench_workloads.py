"""The suite's MLP and LSTM workloads run end to end on tiny configurations."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("mnist1d")
pytest.importorskip("torch_pruning")

from bench.suite.runner import QUICK, run_suite
from bench.suite.workloads import MNIST1DChainMLP, MNIST1DShortcutMLP, PlainMLP


@pytest.mark.parametrize("workload", [MNIST1DShortcutMLP.name, MNIST1DChainMLP.name])
def test_mlp_workload_runs_gatedprune_and_a_torch_pruning_baseline(
    tmp_path: Path, workload: str
) -> None:
    config = replace(
        QUICK,
        workloads=(workload,),
        methods=("gatedprune", "magnitude"),
        targets=(0.25,),
        epochs=1,
        num_samples=300,
        jobs=1,
        out=tmp_path,
        plots=False,
    )
    rows = run_suite(config, verbose=False)
    assert [r["method"] for r in rows] == ["gatedprune", "magnitude"]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert abs(r["achieved_flops"] - 0.25) <= 0.02
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["speedup_b256"] > 0
    assert (tmp_path / "suite_summary.md").exists()


def test_chain_mlp_workload_has_no_shortcut_edges() -> None:
    import torch

    import gatedprune as gp

    x = torch.zeros(1, 40)  # (1, F)
    chain = MNIST1DChainMLP().gated_model(x)
    dense = MNIST1DShortcutMLP().gated_model(x)
    assert isinstance(chain, gp.ShortcutMLP)
    assert not chain.shortcuts
    # every layer reads only its predecessor: the same widths cost fewer FLOPs than with shortcuts
    chain_flops = gp.cost(MNIST1DChainMLP().dense_reference(x), x).flops
    dense_flops = gp.cost(MNIST1DShortcutMLP().dense_reference(x), x).flops
    assert chain_flops < dense_flops
    assert isinstance(dense, gp.ShortcutMLP)
    assert dense.shortcuts


def test_plain_mlp_needs_hidden_layers() -> None:
    with pytest.raises(ValueError, match="at least one hidden layer"):
        PlainMLP(40, [], 10)


def test_lstm_workload_runs_and_records_what_does_not_apply(tmp_path: Path) -> None:
    from bench.suite.workloads import MNIST1DShortcutLSTM

    config = replace(
        QUICK,
        workloads=(MNIST1DShortcutLSTM.name,),
        methods=("gatedprune", "small_dense", "slimming", "magnitude", "iss"),
        targets=(0.25,),
        epochs=1,
        num_samples=300,
        jobs=1,
        out=tmp_path,
        plots=False,
    )
    rows = {r["method"]: r for r in run_suite(config, verbose=False)}
    for method in ("gatedprune", "small_dense", "iss"):
        assert "error" not in rows[method], rows[method].get("error")
        assert abs(rows[method]["achieved_flops"] - 0.25) <= 0.02
        assert rows[method]["params"] > 0
        assert rows[method]["epochs"] == 1
    assert "needs BatchNorm" in rows["slimming"]["error"]
    assert rows["iss"]["notes"].startswith("lambda=")
    # Torch-Pruning cannot prune nn.LSTM: the error says where it was raised
    assert rows["magnitude"]["error"].startswith("AssertionError (raised at ")
    md = (tmp_path / "suite_summary.md").read_text()
    assert "magnitude failed: AssertionError (raised at" in md
    assert "slimming not applicable" in md
    assert "every baseline" not in md.replace("every baseline that ran", "")


def test_iss_does_not_apply_to_networks_without_lstm_units() -> None:
    import torch

    from bench.suite.baselines import RunSpec, run_iss
    from bench.suite.workloads import MNIST1DShortcutConv
    from gatedprune.data import Splits

    x, y = torch.zeros(4, 1, 40), torch.zeros(4, dtype=torch.long)  # (N, 1, L), (N,)
    spec = RunSpec(MNIST1DShortcutConv(), Splits(x, y, x, y), 0.25, 2, 0, 1000)
    with pytest.raises(ValueError, match="not applicable to this workload"):
        run_iss(spec)


def test_torch_pruning_fails_on_the_lstm_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import bench.suite.baselines as baselines
    from bench.suite.workloads import MNIST1DShortcutLSTM, plain_cost
    from gatedprune.data import Splits

    def no_training(*args: object, **kwargs: object) -> None:
        raise RuntimeError("trained before finding out that pruning fails")

    monkeypatch.setattr(baselines, "fit_plain", no_training)
    wl = MNIST1DShortcutLSTM()
    x, y = torch.zeros(4, 40, 1), torch.zeros(4, dtype=torch.long)  # (N, T, 1), (N,)
    dense = plain_cost(wl.dense_reference(x[:1]), x[:1]).flops
    spec = baselines.RunSpec(wl, Splits(x, y, x, y), 0.25, 2, 0, dense)
    with pytest.raises(AssertionError):
        baselines.run_magnitude(spec)


@pytest.mark.parametrize(
    ("workload", "factor"),
    [("conv", "EDGE_LR_FACTOR"), ("mlp", None)],
)
def test_fixed_lambda_ablation_uses_gatedprunes_edge_gate_rate(
    monkeypatch: pytest.MonkeyPatch, workload: str, factor: str | None
) -> None:
    """l0_fixed differs from gatedprune only in its penalty: on the conv workload it gets the
    same edge-gate learning-rate factor as train_demo_model, elsewhere one gate rate."""
    import torch

    from bench.suite import baselines
    from bench.suite.workloads import MNIST1DShortcutConv, Workload
    from gatedprune import demo
    from gatedprune.data import Splits

    seen: dict[str, object] = {}

    class _StopError(Exception):
        pass

    def capture(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise _StopError

    monkeypatch.setattr(demo, "budget_trainer", capture)
    if workload == "conv":
        wl: Workload = MNIST1DShortcutConv()
        x = torch.randn(4, 1, 40)  # (N, 1, L)
    else:
        wl = MNIST1DShortcutMLP()
        x = torch.randn(4, 40)  # (N, L)
    y = torch.zeros(4, dtype=torch.long)
    spec = baselines.RunSpec(wl, Splits(x, y, x, y), 0.25, 2, 0, 1000)
    with pytest.raises(_StopError):
        baselines.run_l0_fixed(spec)
    expected = demo.EDGE_LR_FACTOR if factor else None
    assert seen["edge_lr_factor"] == expected
