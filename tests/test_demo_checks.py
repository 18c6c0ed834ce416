"""Demo checks that need no training: a latency model left by an earlier run is never read
(the demos never resume), and --round-to must fit the conv demo's channel groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gatedprune as gp
from gatedprune.demo import LATENCY_MODEL_FILE, DemoConfig, run_latency_model


def _stale_conv_model() -> gp.LatencyModel:
    """A valid conv-style latency model an earlier run could have left (samples 7: marked)."""
    torch.manual_seed(0)
    lm = gp.LatencyModel.calibrate(
        gp.ShortcutMLP(8, [16], 3), torch.zeros(1, 8), batch_size=8, samples=8, rounds=1
    )
    d = json.loads(lm.to_json())
    d["samples"], d["median_error"] = 7, 0.777
    return gp.LatencyModel.from_json(json.dumps(d))


def _fresh() -> gp.GatedLatencyModel:
    return gp.GatedLatencyModel((0.1, 0.01, 1e-8), 1, 1, (1, 1, 40), "k", 0.01, 0.02, 32)


@pytest.mark.filterwarnings("ignore:LatencyModel.calibrate")  # a tiny, noisy calibration
@pytest.mark.parametrize("same_kind", [True, False])
def test_a_latency_model_left_by_an_earlier_run_is_not_reused(
    tmp_path: Path, same_kind: bool
) -> None:
    """The file (of the same kind: reused silently before; of the other demo's kind: a
    crash before) is replaced by this run's calibration."""
    stale = _stale_conv_model()
    path = tmp_path / LATENCY_MODEL_FILE
    path.write_text(stale.to_json())
    calls: list[int] = []
    if same_kind:
        fresh_conv = json.loads(stale.to_json())
        fresh_conv["samples"] = 32

        def calibrate_conv() -> gp.LatencyModel:
            calls.append(1)
            return gp.LatencyModel.from_json(json.dumps(fresh_conv))

        got: gp.LatencyModel | gp.GatedLatencyModel = run_latency_model(tmp_path, calibrate_conv)
        assert gp.LatencyModel.from_json(path.read_text()) == got
    else:

        def calibrate_gated() -> gp.GatedLatencyModel:
            calls.append(1)
            return _fresh()

        got = run_latency_model(tmp_path, calibrate_gated)
        assert gp.GatedLatencyModel.from_json(path.read_text()) == got
    assert calls == [1]
    assert got.samples == 32


def test_without_a_folder_the_model_is_calibrated_only() -> None:
    assert run_latency_model(None, _fresh) == _fresh()


@pytest.mark.parametrize(("unit_group", "round_to"), [(4, 6), (32, 16), (2, 3)])
def test_round_to_must_be_a_multiple_of_the_unit_group(
    tmp_path: Path, unit_group: int, round_to: int
) -> None:
    config = DemoConfig(unit_group=unit_group, round_to=round_to, out=tmp_path / "o")
    with pytest.raises(
        ValueError,
        match=rf"--round-to must be a multiple of --unit-group "
        rf"{unit_group} .*got {round_to}",
    ):
        config.validate()
    DemoConfig(unit_group=unit_group, round_to=2 * unit_group, out=tmp_path / "o").validate()
    assert not (tmp_path / "o").exists()
