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
