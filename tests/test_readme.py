"""The README's Python examples run as printed, and what their comments claim holds.

Every ```python block of README.md is executed in a fresh namespace inside a temporary working
directory (the examples write ``small.safetensors`` and ``ckpt/``). Only the first example's
training is shortened (30 epochs of MNIST-1D take ~35 s; the test runs 2): that substitution is
checked to apply, so an edited example cannot silently run unshortened or untested. A block
added without a check below still runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gatedprune as gp
from gatedprune.demo import all_open_copy

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _check_quickstart(ns: dict[str, Any], tmp: Path) -> None:
    small, data = ns["small"], ns["data"]
    x = data.x_train[:1]
    assert not gp.gate_modules(small)
    assert gp.cost(small, x).flops < gp.cost(gp.prune(all_open_copy(ns["net"])), x).flops
    loaded = gp.load(tmp / "small.safetensors").eval()
    probe = torch.randn(8, *x.shape[1:])
    with torch.no_grad():
        assert torch.equal(loaded(probe), small.eval()(probe))


def _check_latency_budget(ns: dict[str, Any], tmp: Path) -> None:
    budget = ns["budget"]
    assert set(budget.targets) == {"latency"}
    assert 0.0 < budget.expected()["latency"] <= 1.0 + 1e-9


def _check_gated_latency_budget(ns: dict[str, Any], tmp: Path) -> None:
    budget = ns["budget"]
    assert set(budget.targets) == {"flops", "latency"}
    assert budget.expected()["latency"] == pytest.approx(1.0, abs=0.2)  # every gate still open


def _check_training_loop(ns: dict[str, Any], tmp: Path) -> None:
    # the comment: "within 0.01 of 0.25"
    assert abs(ns["budget"].achieved()["flops"] - 0.25) <= 0.01
    assert (tmp / "ckpt").is_dir()
    small, net, x = ns["small"], ns["net"], ns["x"]
    assert not gp.gate_modules(small)
    with torch.no_grad():
        assert (small(x) - net.eval()(x)).abs().max() <= 1e-5


def _check_replay(ns: dict[str, Any], tmp: Path) -> None:
    small, fresh, model = ns["small"], ns["fresh"], ns["model"]
    probe = torch.randn(16, 1, 40)
    with torch.no_grad():
        out = small.eval()(probe)
        assert torch.equal(fresh.eval()(probe), out)  # the replayed plan: the same model
        assert (out - model.eval()(probe)).abs().max() <= 1e-5  # "same function"
    x = ns["x"][:1]
    assert gp.cost(small, x).flops < gp.cost(gp.prune(all_open_copy(model)), x).flops


def _check_multi_input(ns: dict[str, Any], tmp: Path) -> None:
    small, unet, x, t = ns["small"], ns["unet"], ns["x"], ns["t"]
    with torch.no_grad():  # "small(x, t) == unet(x, t)", on fresh inputs
        x2, t2 = torch.randn(3, 3, 32), torch.rand(3, 1)
        assert (small(x2, t2) - unet(x2, t2)).abs().max() <= 1e-5
    plain, hard = gp.cost(small, (x, t)), gp.cost(unet, (x, t), hard=True)  # "equal"
    assert (plain.flops, plain.params) == (float(hard.flops), float(hard.params))
    assert float(ns["loss"].detach()) > 0


# marker (a line only that block has) -> (source substitutions, check of the namespace)
_CASES: dict[str, tuple[tuple[tuple[str, str], ...], Callable[[dict[str, Any], Path], None]]] = {
    "data = mnist1d()": (
        (("epochs=30,", "epochs=2,"),),  # training shortened: see the module docstring
        _check_quickstart,
    ),
    "lm = gatedprune.LatencyModel.calibrate": ((), _check_latency_budget),
    "lm = gatedprune.GatedLatencyModel.calibrate": ((), _check_gated_latency_budget),
    'checkpoint_dir="ckpt"': ((), _check_training_loop),
    "fresh = apply_plan(": ((), _check_replay),
    "class Denoiser(nn.Module)": ((), _check_multi_input),
}


def test_every_marker_names_one_block() -> None:
    blocks = _blocks()
    assert len(blocks) >= len(_CASES)
    for marker in _CASES:
        assert sum(marker in b for b in blocks) == 1, marker


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _blocks()[index]
    matched = [m for m in _CASES if m in code]
    subs, check = _CASES[matched[0]] if matched else ((), None)
    for old, new in subs:
        if code.count(old) != 1:
            raise AssertionError(f"README example {index}: expected {old!r} exactly once")
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict[str, Any] = {"__name__": f"readme_example_{index}"}
    exec(compile(code, f"README.md python block {index}", "exec"), ns)
    if check is not None:
        check(ns, tmp_path)
