"""``gatedprune bench``: argument parsing, the call into ``python -m bench``'s entry point, and
the error when no source checkout holds the suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gatedprune import cli


def test_bench_arguments_are_parsed() -> None:
    args = cli.build_parser().parse_args(["bench", "--quick", "--jobs", "3", "--out", "r"])
    assert (args.command, args.quick, args.jobs, args.out) == ("bench", True, 3, Path("r"))
    defaults = cli.build_parser().parse_args(["bench"])
    assert (defaults.quick, defaults.jobs, defaults.out) == (False, None, None)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--jobs", "0"])


def test_bench_calls_the_suite_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.suite.runner as runner

    calls: list[tuple[list[str], Any]] = []
    monkeypatch.setattr(runner, "main", lambda argv, prog: calls.append((list(argv), prog)))
    assert cli.main(["bench", "--quick", "--jobs", "2", "--out", "some/dir"]) == 0
    assert calls == [(["--quick", "--jobs", "2", "--out", "some/dir"], "gatedprune bench")]
    calls.clear()
    assert cli.main(["bench"]) == 0
    assert calls == [([], "gatedprune bench")]


def test_the_checkout_is_found_next_to_the_source_tree() -> None:
    root = cli.find_bench_root()
    assert (root / "bench" / "suite" / "runner.py").is_file()
    assert (root / "src" / "gatedprune" / "cli.py").is_file()


def test_without_a_checkout_the_error_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(FileNotFoundError, match="not installed with the package") as e:
        cli.find_bench_root([tmp_path])
    assert str(tmp_path) in str(e.value)
    assert "python -m bench" in str(e.value)

    find = cli.find_bench_root

    def missing(candidates: object = None) -> Path:
        return find([tmp_path])

    monkeypatch.setattr(cli, "find_bench_root", missing)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gatedprune bench: ")
    assert "git clone" in err
