"""The benchmark suite (bench/suite) runs on a tiny configuration and writes well-formed
results. Structure only: the numbers come from ``python -m bench``."""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("mnist1d")
pytest.importorskip("torch_pruning")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.suite import QUICK, SuiteConfig, run_suite  # noqa: E402
from bench.suite.baselines import RunSpec, scale_for_flops  # noqa: E402
from bench.suite.report import aggregate  # noqa: E402
from bench.suite.runner import _parse  # noqa: E402
from bench.suite.workloads import MNIST1DShortcutConv, plain_cost  # noqa: E402

METHODS = ("gatedprune", "small_dense", "magnitude")


def _tiny(out: Path) -> SuiteConfig:
    return replace(
        QUICK,
        methods=METHODS,
        targets=(0.25,),
        seeds=(0,),
        epochs=2,
        num_samples=300,
        latency_rounds=1,
        latency_repeats_b1=2,
        latency_repeats_b256=1,
        out=out,
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_suite_writes_well_formed_results(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    rows = run_suite(_tiny(tmp_path), verbose=False, command="python -m bench (test)")
    assert len(rows) == len(METHODS)
    for name in ("suite_runs", "suite_summary"):
        assert (tmp_path / f"{name}.csv").is_file()
        assert (tmp_path / f"{name}.md").is_file()

    runs = _read_csv(tmp_path / "suite_runs.csv")
    assert [r["method"] for r in runs] == list(METHODS)
    for r in runs:
        assert not r.get("error"), r
        assert float(r["target"]) == 0.25
        for k in ("achieved_flops", "achieved_params"):
            assert 0.0 < float(r[k]) <= 1.0, (k, r)
        assert math.isclose(
            float(r["budget_error"]), abs(float(r["achieved_flops"]) - 0.25), abs_tol=1e-9
        )
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        for k in ("latency_b1_ms", "latency_b256_ms", "speedup_b1", "speedup_b256", "train_s"):
            assert float(r[k]) > 0.0, (k, r)
    # every method lands near the target (Torch-Pruning's ratio search, width solving, snap)
    assert max(float(r["budget_error"]) for r in runs) <= 0.02

    numeric = _read_csv(tmp_path / "suite_summary_numeric.csv")
    assert [r["method"] for r in numeric] == list(METHODS)
    assert all(int(r["seeds"]) == 1 and int(r["failed"]) == 0 for r in numeric)

    md = (tmp_path / "suite_summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(METHODS)  # header, separator, one row per method
    assert len({line.count("|") for line in table}) == 1  # every row has every column
    assert "target 0.25: gatedprune" in md  # the verdict line

    png = tmp_path / "pareto_mnist1d_shortcut_conv.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregate_mean_and_std_over_seeds() -> None:
    rows = [
        {"workload": "w", "method": "m", "target": 0.1, "seed": s, "accuracy": a}
        for s, a in [(0, 0.5), (1, 0.7), (2, 0.9)]
    ]
    rows.append({"workload": "w", "method": "m", "target": 0.1, "seed": 3, "error": "boom"})
    (agg,) = aggregate(rows)
    assert agg["seeds"] == 3
    assert agg["failed"] == 1
    assert math.isclose(agg["accuracy_mean"], 0.7)
    assert math.isclose(agg["accuracy_std"], 0.2)


def test_small_dense_width_is_solved_for_the_flops_target() -> None:
    wl = MNIST1DShortcutConv()
    x = torch.zeros(1, 1, 40)  # (1, C, L)
    dense = plain_cost(wl.dense_reference(x), x).flops
    for frac in (0.5, 0.1):
        s = scale_for_flops(wl, frac * dense, x)
        got = plain_cost(wl.plain_model(s), x).flops / dense
        assert abs(got - frac) <= 0.01 * frac + 0.002


def test_cli_and_config_validation() -> None:
    quick = _parse(["--quick", "--targets", "0.5", "--methods", "gatedprune", "random"])
    assert quick.targets == (0.5,)
    assert quick.methods == ("gatedprune", "random")
    assert quick.epochs == QUICK.epochs
    with pytest.raises(SystemExit):
        _parse(["--methods", "no_such_method"])
    with pytest.raises(ValueError, match="targets"):
        replace(QUICK, targets=(1.5,)).validate()
    with pytest.raises(ValueError, match="workload"):
        replace(QUICK, workloads=("nope",)).validate()


def test_split_epochs_counts_pruning_and_finetuning() -> None:
    from gatedprune.data import Splits

    data = Splits(torch.zeros(2, 1, 40), torch.zeros(2), torch.zeros(2, 1, 40), torch.zeros(2))
    spec = RunSpec(MNIST1DShortcutConv(), data, target=0.1, epochs=7, seed=0, dense_flops=1)
    before, after = spec.split_epochs()
    assert before + after == 7
    assert before >= 1
    one = replace(spec, epochs=1).split_epochs()
    assert one == (1, 0)
