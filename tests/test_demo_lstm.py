"""``gatedprune demo --model lstm``: the LSTM demo end to end on a tiny configuration, the saved
plain model, and the CLI's per-model default budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gatedprune as gp
from gatedprune import cli
from gatedprune.demo import DemoConfig
from gatedprune.demo_lstm import build_lstm_demo_model, run_lstm_demo, seq_accuracy

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_lstm_demo_end_to_end(tmp_path: Path) -> None:
    config = DemoConfig(
        budget=0.25, epochs=2, finetune_epochs=1, num_samples=600, out=tmp_path, progress=False
    )
    r = run_lstm_demo(config)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["achieved_params_fraction"] == r["achieved_params_fraction"]
    # the snap lands within its tolerance of the parameter target, and pruning really shrinks
    assert abs(r["achieved_params_fraction"] - 0.25) <= 0.01 + 1e-9
    dense, _, pruned, tuned = r["rows"]
    assert pruned["params"] < dense["params"]
    assert pruned["flops"] < dense["flops"]
    assert tuned["params"] == pruned["params"]  # fine-tuning keeps the architecture
    assert r["max_abs_diff_float32"] <= 1e-5
    assert r["max_abs_diff_float64"] <= 1e-10
    assert r["accuracy_gated"] == pytest.approx(r["accuracy_pruned"], abs=1e-3)
    for name in ("connectivity.png", "widths.png", "training.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    # the saved fine-tuned model is plain nn.LSTM layers and reloads to the same function
    loaded = gp.load(tmp_path / "pruned.safetensors").eval()
    assert any(isinstance(m, nn.LSTM) for m in loaded.modules())
    assert not list(gp.gate_modules(loaded))
    x = torch.randn(5, 40, 1)  # (B, T, 1)
    assert isinstance(loaded(x), torch.Tensor)
    assert seq_accuracy(loaded, x, torch.zeros(5, dtype=torch.long)) >= 0.0
    assert r["kept"]["units_kept"] < r["kept"]["units_total"]


def test_demo_model_reads_the_last_step() -> None:
    net = build_lstm_demo_model().eval()
    x = torch.randn(3, 40, 1)  # (B, T, 1)
    y = net(x)[:, -1].argmax(-1)  # (B,)
    assert seq_accuracy(net, x, y) == 1.0


def test_cli_lstm_defaults_to_a_quarter_of_the_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    import gatedprune.demo_lstm as demo_lstm

    seen: list[DemoConfig] = []

    def fake(config: DemoConfig) -> dict[str, Any]:
        seen.append(config)
        return {}

    monkeypatch.setattr(demo_lstm, "run_lstm_demo", fake)
    assert cli.main(["demo", "--model", "lstm", "--epochs", "3", "--quiet"]) == 0
    assert cli.main(["demo", "--model", "lstm", "--budget", "0.5", "--quiet"]) == 0
    assert seen == [
        DemoConfig(budget=0.25, epochs=3, out=Path("gatedprune-demo-lstm"), progress=False),
        DemoConfig(budget=0.5, epochs=60, out=Path("gatedprune-demo-lstm"), progress=False),
    ]


@pytest.mark.parametrize("bad", ["0", "1.5", "x"])
def test_cli_rejects_a_bad_budget(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--model", "lstm", "--budget", bad])
    assert exc.value.code == 2
    assert "--budget" in capsys.readouterr().err
