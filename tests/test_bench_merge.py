"""Merging suite runs from separate processes (bench.suite.merge): well-formed merged report."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from bench.suite.merge import main, read_runs


def _write_runs(folder: Path, rows: list[dict[str, object]]) -> None:
    folder.mkdir(parents=True)
    with (folder / "suite_runs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _row(method: str, seed: int, accuracy: float) -> dict[str, object]:
    return {
        "workload": "mnist1d_shortcut_conv",
        "method": method,
        "target": 0.25,
        "seed": seed,
        "epochs": 15,
        "train_s": 10.0,
        "achieved_flops": 0.25,
        "achieved_params": 0.2,
        "budget_error": 0.0,
        "accuracy": accuracy,
        "speedup_b1": 2.0,
        "speedup_b256": 3.0,
    }


def test_later_folders_replace_rows_and_the_summary_averages_seeds(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _write_runs(a, [_row("gatedprune", 0, 0.5), _row("gatedprune", 1, 0.5), _row("random", 0, 0.7)])
    _write_runs(b, [_row("gatedprune", 0, 0.9), _row("gatedprune", 1, 0.8)])
    main([str(out), str(a), str(b)])
    rows = read_runs(out)
    acc = {(r["method"], r["seed"]): r["accuracy"] for r in rows}
    assert acc == {("gatedprune", 0): 0.9, ("gatedprune", 1): 0.8, ("random", 0): 0.7}
    with (out / "suite_summary_numeric.csv").open() as f:
        summary = {r["method"]: r for r in csv.DictReader(f)}
    assert float(summary["gatedprune"]["accuracy_mean"]) == pytest.approx(0.85)
    assert summary["gatedprune"]["seeds"] == "2"
    assert "gatedprune" in (out / "suite_summary.md").read_text()


def test_a_folder_without_runs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"holds no suite_runs\.csv"):
        main([str(tmp_path / "out"), str(tmp_path)])


def test_runs_with_different_epochs_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _write_runs(a, [_row("random", 0, 0.7)])
    _write_runs(b, [{**_row("random", 1, 0.7), "epochs": 8}])
    with pytest.raises(ValueError, match=r"different epochs \[8, 15\]"):
        main([str(tmp_path / "out"), str(a), str(b)])


def test_parallel_parts_are_merged_into_one_report(tmp_path: Path) -> None:
    pytest.importorskip("mnist1d")
    from dataclasses import replace

    from bench.suite.parallel import run_parallel
    from bench.suite.runner import QUICK

    config = replace(
        QUICK,
        methods=("small_dense", "random"),
        targets=(0.5,),
        epochs=1,
        num_samples=300,
        jobs=2,
        out=tmp_path / "suite",
        plots=False,
    )
    rows = run_parallel(config, quick=True)
    assert sorted(r["method"] for r in rows) == ["random", "small_dense"]
    assert len(list((tmp_path / "suite" / "parts").iterdir())) == 2  # one process per method
    merged = read_runs(tmp_path / "suite")
    assert {r["method"] for r in merged} == {"random", "small_dense"}
    assert all(0.4 < float(r["achieved_flops"]) < 0.6 for r in merged)
    assert all(float(r["speedup_b1"]) > 0 for r in merged)
    # the parts only trained; the parent timed every final model against one dense reference
    for part in (tmp_path / "suite" / "parts").iterdir():
        assert all("latency_b1_ms" not in r for r in read_runs(part))
        assert len(list((part / "models").glob("*.pt"))) == 1
    for b in (1, 256):
        assert len({r[f"dense_latency_b{b}_ms"] for r in merged}) == 1
        for r in merged:
            ratio = float(r[f"dense_latency_b{b}_ms"]) / float(r[f"latency_b{b}_ms"])
            assert ratio == pytest.approx(float(r[f"speedup_b{b}"]), rel=1e-6)


def test_parts_are_ordered_by_the_previous_run_times(tmp_path: Path) -> None:
    from bench.suite.parallel import expected_seconds, method_units

    folder = tmp_path / "previous"
    _write_runs(
        folder,
        [
            {**_row("random", 0, 0.7), "wall_s": 2.0},
            {**_row("random", 1, 0.7), "wall_s": ""},  # an older row: its train_s counts
            {**_row("gatedprune", 0, 0.9), "wall_s": 30.0},
        ],
    )
    got = expected_seconds(folder)
    assert got == {
        ("mnist1d_shortcut_conv", "random"): 12.0,
        ("mnist1d_shortcut_conv", "gatedprune"): 30.0,
    }
    assert expected_seconds(tmp_path / "none") == {}
    assert method_units(["random", "small_dense", "magnitude"]) == [
        ["random", "magnitude"],
        ["small_dense"],
    ]
