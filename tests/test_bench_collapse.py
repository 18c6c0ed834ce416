"""bench.collapse runs on a tiny configuration and writes well-formed results."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench import collapse


def test_tiny_collapse_run_writes_one_row_per_factor_and_seed(tmp_path: Path) -> None:
    collapse.main(
        [
            "--epochs", "1", "--seeds", "0", "1", "--factors", "none", "0.25",
            "--num-samples", "200", "--jobs", "1", "--out", str(tmp_path), "--name", "tiny",
        ]
    )  # fmt: skip
    with (tmp_path / "tiny.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["edge_lr_factor"], r["seed"]) for r in rows] == [
        ("none", "0"), ("none", "1"), ("0.25", "0"), ("0.25", "1"),
    ]  # fmt: skip
    for r in rows:
        assert 0.0 <= float(r["accuracy_pruned"]) <= 1.0
        assert 0.0 < float(r["achieved_flops"]) <= 1.0
        kept, total = map(int, r["layers_kept"].split("/"))
        assert 0 <= kept <= total == 6
    md = (tmp_path / "tiny.md").read_text()
    assert "- edge_lr_factor none: collapsed (accuracy < 95%) " in md
    assert "- edge_lr_factor 0.25: collapsed (accuracy < 95%) " in md


def test_bad_factor_and_jobs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        collapse.main(["--factors", "-1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        collapse.main(["--jobs", "0", "--out", str(tmp_path)])
