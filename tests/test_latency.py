"""LatencyModel and latency budgets: exact features at hard gates, fitting, JSON, Budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gating_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import gatedprune as gp
from gatedprune.latency import nonnegative_least_squares
from gatedprune.profiling import compare_latency, measure_latency
from gatedprune.shortcut import LATENCY_FEATURES


def _model_for(
    net: gp.ShortcutMLP | gp.ShortcutConv1d, x: torch.Tensor, coef: list[float]
) -> gp.LatencyModel:
    return gp.LatencyModel(
        coef=tuple(coef),
        batch_size=1,
        threads=1,
        sample_shape=(1, *x.shape[1:]),
        spec=net.spec,
        median_error=0.0,
        max_error=0.0,
        samples=0,
    )


def _random_gates(
    net: gp.ShortcutMLP | gp.ShortcutConv1d, seed: int, p_unit: float, p_edge: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    widths = {id(g) for g in net.width_gates()}
    for g in gp.gate_modules(net):
        p = p_unit if id(g) in widths else p_edge
        g.force_(torch.rand(g.n, generator=gen) < p)


@settings(max_examples=examples(25), deadline=None)
@given(
    seed=st.integers(0, 10_000),
    p_unit=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    p_edge=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    conv=st.booleans(),
)
def test_hard_features_are_the_pruned_networks_features(
    seed: int, p_unit: float, p_edge: float, conv: bool
) -> None:
    """Every feature of the gated net at its exact decisions equals the pruned net's, one
    feature at a time (unit coefficient vectors)."""
    torch.manual_seed(seed)
    net: gp.ShortcutMLP | gp.ShortcutConv1d
    if conv:
        net = gp.ShortcutConv1d(2, [[6, 5], [7], [4]], 3, input_length=16)
        x = torch.zeros(1, 2, 16)
    else:
        net = gp.ShortcutMLP(5, [6, 4, 7], 3)
        x = torch.zeros(1, 5)
    _random_gates(net, seed, p_unit, p_edge)
    pruned = gp.prune(net.eval())
    assert isinstance(pruned, gp.PlainShortcutNet)
    for k, name in enumerate(LATENCY_FEATURES):
        coef = [0.0] * len(LATENCY_FEATURES)
        coef[k] = 1.0
        lm = _model_for(net, x, coef)
        hard = float(lm.expected(net, hard=True))
        assert hard == pytest.approx(lm.features(pruned)[name], rel=1e-12, abs=1e-12), name
        assert hard == pytest.approx(lm.predict(pruned), rel=1e-12, abs=1e-12)


def test_expected_latency_is_differentiable_and_exact_at_decided_gates() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[8, 8], [8]], 3, input_length=16)
    x = torch.zeros(1, 1, 16)
    lm = _model_for(net, x, [0.1, 0.02, 0.01, 1e-4, 1e-3, 1e-3, 1e-3])
    soft = lm.expected(net)
    soft.backward()
    grads = [p.grad for p in net.gate_parameters()]
    assert all(g is not None and bool((g > 0).any()) for g in grads)  # more open, slower
    _random_gates(net, 3, 0.5, 0.5)
    with torch.no_grad():  # far beyond the forced states: open probabilities exactly 0 or 1
        for p in net.gate_parameters():
            p.mul_(100.0)
    assert float(lm.expected(net).detach()) == pytest.approx(
        float(lm.expected(net, hard=True)), rel=1e-9
    )


def test_calibrated_model_predicts_and_round_trips_through_json() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[16, 16], [16]], 4, input_length=24)
    x = torch.zeros(1, 1, 24)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lm = gp.LatencyModel.calibrate(net, x, batch_size=32, samples=8)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    assert len(lm.coef) == len(LATENCY_FEATURES)
    assert all(c >= 0 for c in lm.coef)
    assert np.isfinite(lm.median_error)
    assert lm.median_error <= lm.max_error
    dense = gp.prune(net.eval())
    assert isinstance(dense, gp.PlainShortcutNet)
    assert lm.predict(dense) > 0
    again = gp.LatencyModel.from_json(lm.to_json())
    assert again == lm


def test_bad_latency_models_are_refused() -> None:
    net = gp.ShortcutMLP(4, [6], 2)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="coef must have 7 entries"):
        _model_for(net, x, [1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        _model_for(net, x, [-1.0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="not a LatencyModel JSON"):
        gp.LatencyModel.from_json("{}")
    good = json.loads(_model_for(net, x, [1.0] * 7).to_json())
    good["coef"].pop("macs")
    with pytest.raises(ValueError, match="coef must name exactly"):
        gp.LatencyModel.from_json(json.dumps(good))
    with pytest.raises(TypeError, match="needs a ShortcutMLP or ShortcutConv1d"):
        gp.LatencyModel.calibrate(torch.nn.Linear(4, 2), x)
    with pytest.raises(ValueError, match="samples must be an int >= 4"):
        gp.LatencyModel.calibrate(net, x, samples=2)
    with pytest.raises(TypeError, match="expected a PlainShortcutNet"):
        _model_for(net, x, [1.0] * 7).predict(torch.nn.Linear(4, 2))  # type: ignore[arg-type]


def test_latency_budget_arguments_are_checked() -> None:
    net = gp.ShortcutMLP(4, [6], 2)
    x = torch.zeros(1, 4)
    lm = _model_for(net, x, [1.0] * 7)
    with pytest.raises(ValueError, match=r"needs both latency=\.\.\. and latency_model="):
        gp.Budget(net, x, latency=0.5)
    with pytest.raises(ValueError, match=r"needs both latency=\.\.\. and latency_model="):
        gp.Budget(net, x, flops=0.5, latency_model=lm)
    with pytest.raises(TypeError, match=r"latency_model must be a gatedprune\.LatencyModel"):
        gp.Budget(net, x, latency=0.5, latency_model="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"latency must be a fraction in \(0, 1\]"):
        gp.Budget(net, x, latency=1.5, latency_model=lm)
    other = gp.ShortcutMLP(4, [7], 2)
    with pytest.raises(ValueError, match="calibrated for another network structure"):
        gp.Budget(other, x, latency=0.5, latency_model=lm)
    wrapped = torch.nn.Sequential(torch.nn.Linear(4, 4), net)
    with pytest.raises(ValueError, match="support a ShortcutMLP or ShortcutConv1d on its own"):
        gp.Budget(wrapped, x, latency=0.5, latency_model=lm)


@pytest.mark.parametrize("target", [0.5, 0.35])
def test_training_under_a_latency_budget_lands_at_the_predicted_target(target: float) -> None:
    """End to end: the Lagrangian and the snap steer the *predicted* latency; the pruned
    network's predicted latency is the achieved fraction, within 0.02 below the target."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1200, 16, generator=g)  # (N, F)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)  # (N,)
    torch.manual_seed(0)
    net = gp.ShortcutMLP(16, [48, 48, 48], 4)
    example = x[:1]
    lm = _model_for(net, example, [0.005, 0.01, 0.005, 1e-5, 1e-4, 1e-4, 0.0])
    budget = gp.Budget(net, example, latency=target, latency_model=lm, warmup_steps=120)
    gp.Trainer(net, budget=budget, epochs=10, batch_size=50, progress=False).fit((x, y))
    net.eval()
    pruned = gp.prune(net)
    assert isinstance(pruned, gp.PlainShortcutNet)
    for gate in gp.gate_modules(net):
        gate.force_(torch.ones(gate.n, dtype=torch.bool))
    dense = gp.prune(net)
    assert isinstance(dense, gp.PlainShortcutNet)
    achieved = lm.predict(pruned) / lm.predict(dense)
    assert target - 0.02 <= achieved <= target + 1e-9


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(3, 12), cols=st.integers(1, 5))
def test_nonnegative_least_squares_satisfies_the_optimality_conditions(
    seed: int, rows: int, cols: int
) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rows, cols))
    b = rng.normal(size=rows)
    x = nonnegative_least_squares(a, b)
    grad = a.T @ (a @ x - b)  # KKT: x >= 0, grad >= 0, x * grad == 0
    assert (x >= 0).all()
    assert (grad >= -1e-8).all()
    assert np.abs(x * grad).max() <= 1e-8


def test_predict_refuses_a_pruned_network_of_another_architecture() -> None:
    torch.manual_seed(0)
    mlp = gp.ShortcutMLP(8, [16, 16], 3)
    lm = _model_for(mlp, torch.zeros(1, 8), [1.0] * 7)
    _random_gates(mlp, 0, 0.5, 0.5)
    assert lm.predict(gp.prune(mlp.eval())) > 0  # its own pruned copies are fine
    wider = gp.prune(gp.ShortcutMLP(8, [64, 64, 64], 3).eval())
    conv = gp.prune(gp.ShortcutConv1d(1, [[8]], 3, input_length=16).eval())
    assert isinstance(wider, gp.PlainShortcutNet)
    assert isinstance(conv, gp.PlainShortcutNet)
    with pytest.raises(ValueError, match="differs in layers"):
        lm.predict(wider)  # a silent extrapolation before
    with pytest.raises(ValueError, match="differs in spatial, in_width"):
        lm.predict(conv)  # an IndexError before


def test_predict_refuses_a_pruned_network_for_another_input_length() -> None:
    torch.manual_seed(0)
    short = gp.ShortcutConv1d(1, [[8, 8]], 3, input_length=16)
    lm = _model_for(short, torch.zeros(1, 1, 16), [1.0] * 7)
    long_ = gp.ShortcutConv1d(1, [[8, 8]], 3, input_length=64)
    # the first layer loses its input edge: a constant map, kept as an offset of the length
    long_.layers[0].edge_gate.force_(torch.zeros(1, dtype=torch.bool))
    plain = gp.prune(long_.eval())
    assert isinstance(plain, gp.PlainShortcutNet)
    assert plain.spec.input_length == 64
    with pytest.raises(ValueError, match=r"input_length \(64, calibrated at 16\)"):
        lm.predict(plain)


def test_latency_budget_refuses_another_input_shape_than_calibrated() -> None:
    net = gp.ShortcutConv1d(1, [[8, 8], [16]], 3)
    lm = _model_for(net, torch.zeros(1, 1, 16), [1.0] * 7)
    with pytest.raises(ValueError, match=r"calibrated for samples of shape \(1, 16\)"):
        gp.Budget(net, torch.zeros(1, 1, 64), latency=0.5, latency_model=lm)
    assert gp.Budget(net, torch.zeros(1, 1, 16), latency=0.5, latency_model=lm).dense


def test_latency_model_fields_are_checked() -> None:
    net = gp.ShortcutConv1d(1, [[4]], 2, input_length=16)
    x = torch.zeros(1, 1, 16)
    good = json.loads(_model_for(net, x, [1.0] * 7).to_json())
    for key, value, match in [
        ("batch_size", 0, "batch_size must be an int >= 1, got 0"),
        ("threads", -1, "threads must be an int >= 1, got -1"),
        ("sample_shape", [1, 1], r"sample_shape must be \(1, 1, 'L'\)"),
        ("sample_shape", [1, 1, 32], "disagrees with the network's input_length 16"),
        ("batch_size", 2.7, "batch_size must be an int, got 2.7"),  # not truncated to 2
        ("threads", "1", "threads must be an int, got '1'"),
        ("samples", True, "samples must be an int, got True"),
        ("sample_shape", [1, 1, 16.5], "sample_shape must be an int, got 16.5"),
        ("median_error", "0.1", "median_error must be a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            gp.LatencyModel.from_json(json.dumps({**good, key: value}))


@pytest.mark.filterwarnings("ignore:LatencyModel.calibrate")  # 4 tiny samples: noisy
def test_calibrate_a_float64_network_and_bad_threads() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutMLP(4, [6], 2).double()
    x = torch.zeros(1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="threads must be an int >= 1, got 0"):
        gp.LatencyModel.calibrate(net, x, threads=0)  # before: a RuntimeError after sampling
    with pytest.raises(ValueError, match="rounds must be an int >= 1, got 0"):
        gp.LatencyModel.calibrate(net, x, rounds=0)
    lm = gp.LatencyModel.calibrate(net, x, batch_size=4, samples=4, rounds=1)  # dtype error before
    assert lm.predict(gp.prune(net.eval())) > 0


def test_measure_latency_restores_every_modules_mode_and_checks_arguments() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
    model[1].eval()  # a frozen BatchNorm in a training model
    measure_latency(model, torch.zeros(2, 4), warmup=0, repeats=1)
    assert [m.training for m in model.modules()] == [True, True, False]
    for kwargs, error, match in [
        ({"min_time": float("inf")}, ValueError, "min_time must be finite"),  # looped forever
        ({"threads": 0}, ValueError, "threads must be an int >= 1, got 0"),
        ({"repeats": 2.5}, TypeError, "repeats must be an int >= 1, got 2.5"),
    ]:
        with pytest.raises(error, match=match):
            measure_latency(model, torch.zeros(2, 4), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        measure_latency("net", torch.zeros(2, 4))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="models must be a mapping"):
        compare_latency([model], torch.zeros(2, 4))  # type: ignore[arg-type]


def _fake_timer(noise: float, seed: int = 0):  # type: ignore[no-untyped-def]
    """A stand-in for ``compare_latency``: latency = 0.05 ms + 1e-6 ms per FLOP of the
    model, times a random factor in [1 - noise, 1 + noise] (a busy machine)."""
    gen = torch.Generator().manual_seed(seed)

    def fake(models: dict[str, torch.nn.Module], x: torch.Tensor, **_: object) -> dict[str, float]:
        out = {}
        for name, m in models.items():
            flops = float(gp.cost(m, x[:1]).flops)
            factor = 1.0 + noise * (2.0 * float(torch.rand((), generator=gen)) - 1.0)
            out[name] = 1e-3 * (0.05 + 1e-6 * flops) * factor  # seconds
        return out

    return fake


def test_calibrate_warns_when_the_timings_are_too_noisy_to_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A calibration that overlapped other work used to be taken silently (13-20% held-out
    error against 1-2% on a quiet machine); above CALIBRATION_WARN_ERROR it warns."""
    import warnings

    import gatedprune.latency as lat

    net = gp.ShortcutMLP(8, [16, 16], 3)
    x = torch.zeros(1, 8)
    monkeypatch.setattr(lat, "compare_latency", _fake_timer(0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a quiet machine: no warning
        quiet = gp.LatencyModel.calibrate(net, x, batch_size=4, samples=16)
    assert quiet.median_error < 0.01  # FLOPs are nearly, not exactly, in the features' span
    monkeypatch.setattr(lat, "compare_latency", _fake_timer(0.8))
    with pytest.warns(UserWarning, match=r"LatencyModel.calibrate: held-out median .* above 10%"):
        noisy = gp.LatencyModel.calibrate(net, x, batch_size=4, samples=16)
    assert noisy.median_error > lat.CALIBRATION_WARN_ERROR


def test_steady_allocator_sets_glibc_thresholds_and_refuses_bad_values() -> None:
    """The benchmarks and the demo steady glibc's malloc before timing (default adaptive
    thresholds moved latency ratios of one model by up to 0.4 between processes)."""
    import ctypes
    import sys

    from gatedprune.profiling import allocator_setting

    glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    got = gp.steady_allocator(16 << 20, 256 << 20)
    if not glibc:
        assert got is None
        return
    assert got == (16 << 20, 256 << 20)
    assert allocator_setting() == "glibc malloc steadied (mmap threshold 16 MiB, trim 256 MiB)"
    assert gp.steady_allocator() == (32 << 20, 512 << 20)  # the defaults, set again
    with pytest.raises(ValueError, match=r"mmap_threshold must be in \(0, 32 MiB\], got 0"):
        gp.steady_allocator(0)
    with pytest.raises(ValueError, match=r"mmap_threshold must be in .* got 67108864"):
        gp.steady_allocator(64 << 20)
    with pytest.raises(ValueError, match=r"trim_threshold must be in \[0, 2147483647\] bytes"):
        gp.steady_allocator(trim_threshold=-1)
    # before: 2**40 was passed to mallopt's C int as 0 (trim at every free) and reported as set
    for big in (2**31, 2**40):
        with pytest.raises(ValueError, match=rf"C int\), got {big}"):
            gp.steady_allocator(trim_threshold=big)
    with pytest.raises(TypeError, match="mmap_threshold must be an int number of bytes"):
        gp.steady_allocator(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="trim_threshold must be an int number of bytes"):
        gp.steady_allocator(trim_threshold=True)
    assert gp.steady_allocator() == (32 << 20, 512 << 20)  # refused calls changed nothing
