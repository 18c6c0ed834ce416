"""Latency models, the allocator and ONNX export refuse nonsense (audit of 2026-12-07): a
tampered latency-model JSON (negative samples, NaN or negative errors, an empty input shape or
structure key), a non-integer calibration seed, ``dynamic_dims`` that is not a sequence, an
infinite tolerance (which silently turned the ONNX Runtime check off) and a dynamic length for
a pruned ShortcutConv1d, whose ONNX graph was wrong at any other length."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import gatedprune as gp


@pytest.fixture(scope="module")
def latency_json() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny calibration on a busy machine may warn
        lm = gp.LatencyModel.calibrate(
            gp.ShortcutMLP(8, [8], 3), torch.zeros(1, 8), batch_size=4, samples=4, rounds=1
        )
    return lm.to_json()


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("samples", -3, "samples must be an int >= 0, got -3"),
        ("median_error", -5.0, "median_error must be a finite number >= 0"),
        ("max_error", -1.0, "max_error must be a finite number >= 0"),
    ],
)
def test_tampered_latency_model_json_is_refused(
    latency_json: str, key: str, value: Any, match: str
) -> None:
    d = json.loads(latency_json)
    d[key] = value
    with pytest.raises(ValueError, match=match):
        gp.LatencyModel.from_json(json.dumps(d))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("input_shape", [], "input_shape must be a non-empty shape"),
        ("input_shape", [-1, 0, 40], "input_shape must be a non-empty shape"),
        ("structure", "", "structure must be a non-empty key string"),
        ("median_error", -0.5, "median_error must be a finite number >= 0"),
    ],
)
def test_tampered_gated_latency_model_json_is_refused(key: str, value: Any, match: str) -> None:
    good = gp.GatedLatencyModel((0.1, 0.01, 1e-7), 1, 1, (1, 1, 40), "ab12", 0.05, 0.1, 8)
    d = json.loads(good.to_json())
    d[key] = value
    with pytest.raises(ValueError, match=match):
        gp.GatedLatencyModel.from_json(json.dumps(d))


@pytest.mark.parametrize(("seed", "error"), [(2.5, TypeError), ("a", TypeError), (-1, ValueError)])
def test_calibration_seed_is_checked(seed: object, error: type[Exception]) -> None:
    net = gp.ShortcutMLP(8, [8], 3)
    with pytest.raises(error, match="seed must be an int >= 0"):
        gp.LatencyModel.calibrate(
            net,
            torch.zeros(1, 8),
            batch_size=4,
            samples=4,
            rounds=1,
            seed=seed,  # type: ignore[arg-type]
        )


def test_onnx_export_arguments(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    small = gp.prune(gp.ShortcutMLP(8, [8], 3).eval())
    x = torch.zeros(2, 8)
    with pytest.raises(TypeError, match="dynamic_dims must be a sequence"):
        gp.export_onnx(small, x, tmp_path / "a.onnx", dynamic_dims=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="atol must be a finite number >= 0"):
        gp.export_onnx(small, x, tmp_path / "a.onnx", atol=float("inf"))
    conv = gp.prune(gp.ShortcutConv1d(1, [[4], [4]], 3).eval())
    with pytest.raises(ValueError, match="length of a pruned ShortcutConv1d cannot be dynamic"):
        gp.export_onnx(conv, torch.zeros(4, 1, 16), tmp_path / "c.onnx", dynamic_dims=(0, 2))
    assert not list(tmp_path.iterdir())  # nothing written


def test_calibrating_a_conv_net_without_input_length_says_so_up_front() -> None:
    # before: a ValueError from one of calibrate's random pruned copies, about a layer that
    # computes a constant
    net = gp.ShortcutConv1d(1, [[8, 8], [16]], 3)
    with pytest.raises(ValueError, match=r"constructed with input_length=16"):
        gp.LatencyModel.calibrate(net, torch.randn(1, 1, 16), batch_size=8, samples=4, rounds=1)
