"""``gatedprune demo``: option errors the demo checks are usage errors (one line, exit 2,
no traceback) reported before any work or folder creation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gatedprune import cli


@pytest.fixture
def no_demo_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every demo by a recorder: a refused command line must not start one."""
    started: list[str] = []
    for name, (_, out, budget, epochs) in list(cli.DEMOS.items()):

        def run(config: Any, name: str = name) -> dict[str, Any]:
            started.append(name)
            return {}

        monkeypatch.setitem(cli.DEMOS, name, (run, out, budget, epochs))
    return started


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--unit-group", "3"], "--unit-group must divide every demo layer's width"),
        (
            ["--unit-group", "4", "--round-to", "6"],
            "--round-to must be a multiple of --unit-group 4 (channels are gated, so kept, in "
            "groups of 4), got 6",
        ),
        (["--round-to", "6", "--unit-group", "32"], "--round-to must be a multiple of"),
    ],
)
def test_options_the_demo_refuses_are_usage_errors_before_any_work(
    argv: list[str],
    message: str,
    tmp_path: Path,
    no_demo_runs: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *argv, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"gatedprune demo: error: {message}")
    assert "Traceback" not in err
    assert no_demo_runs == []
    assert not out.exists()


def test_a_valid_command_line_still_runs_the_demo(tmp_path: Path, no_demo_runs: list[str]) -> None:
    argv = ["demo", "--unit-group", "4", "--round-to", "8", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 0
    assert no_demo_runs == ["conv"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--epochs", "-1", "argument --epochs: expected an integer >= 1, got '-1'"),
        ("--epochs", "0", "argument --epochs: expected an integer >= 1, got '0'"),
        ("--epochs", "x", "argument --epochs: expected an integer >= 1, got 'x'"),
        (
            "--finetune-epochs",
            "-1",
            "argument --finetune-epochs: expected an integer >= 0, got '-1'",
        ),
        ("--unit-group", "-2", "argument --unit-group: expected an integer >= 1, got '-2'"),
    ],
)
def test_integer_options_name_the_bound_they_need(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", option, value])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"gatedprune demo: error: {message}"


def test_the_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    """The real entry point in a fresh process: exit status 2, one error line after the
    usage, nothing created."""
    out = tmp_path / "out"
    code = "import sys; from gatedprune.cli import main; sys.exit(main())"
    argv = ["demo", "--unit-group", "4", "--round-to", "6", "--epochs", "1", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("gatedprune demo: error: --round-to")
    assert not out.exists()
