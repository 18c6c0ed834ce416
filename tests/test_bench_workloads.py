"""The ShortcutMLP workload of the suite runs end to end on a tiny configuration."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("mnist1d")
pytest.importorskip("torch_pruning")

from bench.suite.runner import QUICK, run_suite
from bench.suite.workloads import MNIST1DShortcutMLP, PlainMLP


def test_mlp_workload_runs_gatedprune_and_a_torch_pruning_baseline(tmp_path: Path) -> None:
    config = replace(
        QUICK,
        workloads=(MNIST1DShortcutMLP.name,),
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


def test_plain_mlp_needs_hidden_layers() -> None:
    with pytest.raises(ValueError, match="at least one hidden layer"):
        PlainMLP(40, [], 10)


def test_lstm_workload_runs_and_records_what_does_not_apply(tmp_path: Path) -> None:
    from bench.suite.workloads import MNIST1DShortcutLSTM

    config = replace(
        QUICK,
        workloads=(MNIST1DShortcutLSTM.name,),
        methods=("gatedprune", "small_dense", "slimming"),
        targets=(0.25,),
        epochs=1,
        num_samples=300,
        jobs=1,
        out=tmp_path,
        plots=False,
    )
    rows = {r["method"]: r for r in run_suite(config, verbose=False)}
    for method in ("gatedprune", "small_dense"):
        assert "error" not in rows[method], rows[method].get("error")
        assert abs(rows[method]["achieved_flops"] - 0.25) <= 0.02
        assert rows[method]["params"] > 0
    assert "needs BatchNorm" in rows["slimming"]["error"]
