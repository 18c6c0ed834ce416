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
from gatedprune.data import Splits  # noqa: E402

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


def test_a_finished_suite_can_be_timed_again_from_its_kept_models(tmp_path: Path) -> None:
    from bench.suite.latency import main as retime
    from bench.suite.merge import read_runs

    config = replace(_tiny(tmp_path), methods=("small_dense", "random"), plots=False)
    run_suite(replace(config, defer_latency=True), verbose=False)
    before = read_runs(tmp_path)
    assert all("latency_b1_ms" not in r for r in before)  # deferred: trained, not timed
    assert len(list((tmp_path / "models").glob("*.pt"))) == 2
    retime([str(tmp_path), "--num-samples", "300"])
    after = read_runs(tmp_path)
    assert [r["method"] for r in after] == ["small_dense", "random"]
    assert [r["accuracy"] for r in after] == [r["accuracy"] for r in before]
    assert len({r["dense_latency_b256_ms"] for r in after}) == 1  # one dense reference
    assert all(float(r["speedup_b1"]) > 0 and float(r["speedup_b256"]) > 0 for r in after)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "suite_runs.csv").write_bytes((tmp_path / "suite_runs.csv").read_bytes())
    with pytest.raises(ValueError, match="keeps no final models"):
        retime([str(copy), "--num-samples", "300"])


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


# ---------------------------------------------------------------------- verdicts
def _summary_row(method: str, acc: float, seeds: int = 1, error: str = "") -> dict[str, object]:
    return {
        "workload": "w",
        "target": 0.25,
        "method": method,
        "seeds": seeds,
        "failed": 0 if seeds else 3,
        "error": error,
        "accuracy_mean": acc,
        "speedup_b1_mean": 1.0,
        "speedup_b256_mean": 2.0,
    }


def test_verdict_names_baselines_that_did_not_run() -> None:
    from bench.suite.report import verdicts

    nan = float("nan")
    summary = [
        _summary_row("gatedprune", 0.9),
        _summary_row("small_dense", 0.8),
        _summary_row("magnitude", nan, seeds=0, error="AssertionError (raised at tp/x.py:3)"),
        _summary_row("slimming", nan, seeds=0, error="ValueError: no BN (not applicable here)"),
    ]
    (line,) = verdicts(summary)
    assert "every baseline that ran" in line
    assert "every baseline " not in line.replace("every baseline that ran", "")
    assert "magnitude failed: AssertionError (raised at tp/x.py:3)" in line
    assert "slimming not applicable: ValueError: no BN (not applicable here)" in line
    # with every baseline run, the plain wording and no failure list
    (ok,) = verdicts(summary[:2])
    assert "At or above every baseline on mean accuracy" in ok
    assert "Did not run" not in ok


def test_verdict_when_no_baseline_ran() -> None:
    from bench.suite.report import verdicts

    summary = [
        _summary_row("gatedprune", 0.9),
        _summary_row("random", float("nan"), seeds=0, error="AssertionError"),
    ]
    (line,) = verdicts(summary)
    assert "No baseline ran" in line
    assert "At or above" not in line
    assert "random failed: AssertionError" in line


def test_aggregate_keeps_the_first_error() -> None:
    rows = [
        {"workload": "w", "method": "m", "target": 0.1, "seed": s, "error": f"E{s}: boom"}
        for s in range(2)
    ]
    (agg,) = aggregate(rows)
    assert (agg["seeds"], agg["failed"], agg["error"]) == (0, 2, "E0: boom")


# ---------------------------------------------------------------------- schedules
def test_schedule_clips_the_weight_gradient_and_leaves_gates_alone() -> None:
    from bench.suite.workloads import Schedule

    w, g = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Schedule(optimizer=torch.optim.SGD, lr=1.0, weight_decay=0.0, clip_grad_norm=0.5)
    sgd = opt.make_optimizer([{"params": [w], "name": "weights"}, {"params": [g], "name": "gates"}])
    w.grad, g.grad = torch.full((3,), 10.0), torch.full((3,), 10.0)
    sgd.step()
    assert math.isclose(float((1 - w.detach()).norm()), 0.5, rel_tol=1e-5)  # clipped step
    assert torch.allclose(g, torch.full((3,), -9.0))  # the gates' step is not clipped
    with pytest.raises(ValueError, match="clip_grad_norm"):
        Schedule(clip_grad_norm=0.0)


def test_every_method_of_a_workload_gets_its_schedule_epochs() -> None:
    from bench.suite.runner import FULL, SHARED_EPOCHS
    from bench.suite.workloads import LSTM_SCHEDULE, MNIST1DShortcutLSTM

    assert MNIST1DShortcutLSTM().schedule is LSTM_SCHEDULE
    assert LSTM_SCHEDULE.epochs is not None
    assert LSTM_SCHEDULE.clip_grad_norm is not None
    assert FULL.workload_epochs("mnist1d_shortcut_lstm") == LSTM_SCHEDULE.epochs
    assert FULL.workload_epochs("mnist1d_shortcut_conv") == SHARED_EPOCHS
    assert replace(FULL, epochs=3).workload_epochs("mnist1d_shortcut_lstm") == 3
    assert _parse(["--epochs", "4"]).epochs == 4
    assert _parse([]).epochs is None


# ---------------------------------------------------------------------- shared pre-training
def test_cached_pretraining_gives_the_same_runs_as_training_again() -> None:
    from bench.suite.baselines import clear_pretrained, run_magnitude, run_random
    from bench.suite.workloads import MNIST1DShortcutMLP

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 40, generator=gen), torch.randint(0, 10, (200,), generator=gen)
    wl = MNIST1DShortcutMLP()
    data = Splits(x, y, x[:50], y[:50])
    dense = plain_cost(wl.dense_reference(x[:1]), x[:1]).flops
    spec = RunSpec(wl, data, target=0.5, epochs=2, seed=0, dense_flops=dense)
    clear_pretrained()
    fresh = run_magnitude(replace(spec, target=0.25))
    clear_pretrained()
    first = run_magnitude(spec)  # trains and caches
    cached = run_magnitude(replace(spec, target=0.25))  # branches off the cache
    shared = run_random(replace(spec, target=0.25))  # random shares magnitude's pre-training
    clear_pretrained()
    assert first.shared_seconds == 0.0
    assert cached.shared_seconds > 0.0
    assert shared.shared_seconds == cached.shared_seconds
    fresh_state, cached_state = fresh.model.state_dict(), cached.model.state_dict()
    assert list(fresh_state) == list(cached_state)
    for k in fresh_state:
        assert torch.equal(fresh_state[k], cached_state[k]), k
    assert fresh.notes == cached.notes


# ---------------------------------------------------------------------- ISS
def test_iss_group_norm_is_the_norm_of_the_units_weights() -> None:
    from bench.suite.iss import iss_group_norms
    from bench.suite.workloads import PlainLSTM

    torch.manual_seed(0)
    net = PlainLSTM(1, 5, 2, 3)
    lstm, h, k = net.lstm, 5, 2
    rows = [k + g * h for g in range(4)]
    parts = [lstm.weight_ih_l0[rows], lstm.weight_hh_l0[rows], lstm.bias_ih_l0[rows]]
    parts += [lstm.bias_hh_l0[rows], lstm.weight_ih_l1[:, k]]
    col = lstm.weight_hh_l0[:, k].clone()
    col[rows] = 0.0  # the rows already hold these four entries
    want = torch.sqrt(sum(p.detach().pow(2).sum() for p in [*parts, col.detach()]))
    got = iss_group_norms(net)[0][k].detach()
    assert math.isclose(float(got), float(want), rel_tol=1e-5)
    # the head column is part of the last layer's groups
    head_k = iss_group_norms(net)[1][k].detach()
    assert float(head_k) > float(net.head.weight[:, k].detach().norm())


def test_iss_slicing_is_exact_when_removed_units_are_silent() -> None:
    from bench.suite.iss import slice_plain_lstm
    from bench.suite.workloads import PlainLSTM

    torch.manual_seed(1)
    net = PlainLSTM(1, 6, 2, 4).eval()
    keep = [torch.tensor([0, 2, 3]), torch.tensor([1, 4])]
    drop0, drop1 = [1, 4, 5], [0, 2, 3, 5]
    with torch.no_grad():  # silence the dropped units: zero their outgoing weights
        for g in range(4):
            net.lstm.weight_hh_l0[g * 6 : (g + 1) * 6, drop0] = 0.0
            net.lstm.weight_hh_l1[g * 6 : (g + 1) * 6, drop1] = 0.0
        net.lstm.weight_ih_l1[:, drop0] = 0.0
        net.head.weight[:, drop1] = 0.0
    small = slice_plain_lstm(net, keep).eval()
    x = torch.randn(7, 40, 1)  # (B, T, 1)
    with torch.no_grad():
        assert float((net(x) - small(x)).abs().max()) <= 1e-5
    assert small.widths == [3, 2]
    ex = x[:1]
    assert plain_cost(small, ex).flops < plain_cost(net, ex).flops
    assert plain_cost(small, ex).params < plain_cost(net, ex).params


def test_iss_removes_units_to_the_target_flops() -> None:
    from bench.suite.iss import iss_group_norms, removal_order, slice_plain_lstm, widths_for_flops
    from bench.suite.workloads import PlainLSTM

    torch.manual_seed(2)
    net = PlainLSTM(1, 16, 2, 10)
    ex = torch.zeros(1, 40, 1)  # (1, T, 1)
    full = plain_cost(net, ex).flops
    order = removal_order(iss_group_norms(net))
    for frac in (0.5, 0.1):
        keep = widths_for_flops(net, order, frac * full, ex)
        got = plain_cost(slice_plain_lstm(net, keep), ex).flops / full
        assert abs(got - frac) <= 0.03, (frac, got, [len(k) for k in keep])
        assert all(len(k) > 1 for k in keep)
        # no layer reached its last unit, so the removed units are a prefix of the order
        kept = {(layer, int(u)) for layer, k in enumerate(keep) for u in k}
        dropped = {(layer, u) for layer in range(2) for u in range(16)} - kept
        assert dropped == set(order[: len(dropped)])
