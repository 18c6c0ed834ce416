"""Run the suite in parallel processes and merge their results (``python -m bench --jobs N``).

Every (workload, method) runs as its own ``python -m bench --jobs 1`` process with one thread
(methods that share a pre-training, :data:`~bench.suite.baselines.SHARED_PRETRAINING`, in one
process), at most ``jobs`` at a time, the longest expected first (expected from the previous
results in ``config.out``, if any: longest-processing-time-first keeps both cores busy to the
end), each writing into a part folder; the parts are merged (:mod:`bench.suite.merge`) into
``config.out``.
Parts do not time anything (``--defer-latency``): they keep their final models, and once every
part has finished the parent times all final models of a workload with one dense reference in
interleaved rounds (:mod:`bench.suite.latency`), with no training running. Speed-ups are then
comparable across methods (when each part timed its own dense reference while another part
trained, the dense latency varied 2x between parts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .baselines import SHARED_PRETRAINING
from .latency import find_models, measure_rows
from .merge import merge_rows, read_runs
from .report import write_report
from .runner import SuiteConfig

__all__ = ["expected_seconds", "method_units", "part_arguments", "run_parallel"]

ROOT = Path(__file__).resolve().parent.parent.parent


def method_units(methods: Sequence[str]) -> list[list[str]]:
    """``methods`` grouped so that methods sharing a pre-training run in one process.

    >>> method_units(["gatedprune", "magnitude", "iss", "random"])
    [['gatedprune'], ['magnitude', 'random'], ['iss']]
    """
    units: list[list[str]] = []
    placed: set[str] = set()
    for m in methods:
        if m in placed:
            continue
        group = next((g for g in SHARED_PRETRAINING if m in g), (m,))
        unit = [x for x in methods if x in group]
        units.append(unit)
        placed.update(unit)
    return units


def expected_seconds(folder: Path) -> dict[tuple[str, str], float]:
    """Seconds each (workload, method) took in the suite results in ``folder`` (wall time of
    its rows where recorded, else training time); empty when there are none."""
    try:
        rows = read_runs(folder)
    except ValueError:
        return {}
    out: dict[tuple[str, str], float] = {}
    for r in rows:
        numbers = [r.get(k) for k in ("wall_s", "train_s")]
        t = next((float(v) for v in numbers if isinstance(v, int | float)), 0.0)
        key = (str(r["workload"]), str(r["method"]))
        out[key] = out.get(key, 0.0) + t
    return out


def part_arguments(
    config: SuiteConfig, workload: str, methods: Sequence[str], out: Path, *, quick: bool
) -> list[str]:
    """Command-line arguments of one part (``python -m bench ...``).

    >>> from bench.suite.runner import QUICK
    >>> part_arguments(QUICK, "w", ["random"], Path("p"), quick=True)[:4]
    ['--quick', '--jobs', '1', '--workloads']
    """
    args = [*(["--quick"] if quick else []), "--jobs", "1"]
    args += ["--workloads", workload, "--methods", *methods]
    args += ["--targets", *(str(t) for t in config.targets)]
    args += ["--seeds", *(str(s) for s in config.seeds)]
    if config.epochs is not None:
        args += ["--epochs", str(config.epochs)]
    args += ["--num-samples", str(config.num_samples)]
    args += ["--threads", str(config.threads), "--out", str(out), "--no-plots"]
    args += ["--defer-latency"]
    return args


def run_parallel(
    config: SuiteConfig, *, quick: bool, command: str = "python -m bench"
) -> list[dict[str, Any]]:
    """Run every part, at most ``config.jobs`` at once, and write the merged report.

    >>> from bench.suite.runner import QUICK
    >>> rows = run_parallel(QUICK, quick=True)  # doctest: +SKIP
    """
    config.validate()
    t_start = time.perf_counter()
    parts_dir = Path(config.out) / "parts"
    expected = expected_seconds(Path(config.out))
    default = max(expected.values(), default=1.0)  # unknown parts first: they may be long
    tasks = [
        (w, ms, parts_dir / f"{w}-{'+'.join(ms)}")
        for w in config.workloads
        for ms in method_units(list(config.methods))
    ]
    tasks.sort(key=lambda t: -sum(expected.get((t[0], m), default) for m in t[1]))
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    waiting = list(tasks)
    running: list[tuple[subprocess.Popen[bytes], Path, Any]] = []
    failed: list[str] = []
    while waiting or running:
        while waiting and len(running) < config.jobs:
            w, ms, out = waiting.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = (out / "log.txt").open("wb")
            cmd = [sys.executable, "-m", "bench", *part_arguments(config, w, ms, out, quick=quick)]
            print(f"started {w} {' '.join(ms)} -> {out}", flush=True)
            running.append(
                (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), out, log)
            )
        time.sleep(1.0)
        for proc, out, log in list(running):
            if proc.poll() is not None:
                log.close()
                running.remove((proc, out, log))
                if proc.returncode != 0:
                    failed.append(f"{out} (exit {proc.returncode}, see {out / 'log.txt'})")
                print(f"finished {out.name} (exit {proc.returncode})", flush=True)
    if failed:
        raise RuntimeError("suite parts failed: " + "; ".join(failed))
    rows = merge_rows([read_runs(out) for _, _, out in tasks])
    trained_s = time.perf_counter() - t_start
    print(f"training finished in {trained_s:.0f} s; timing every final model ...", flush=True)
    measure_rows(rows, dict(find_models(out for _, _, out in tasks)), config)
    write_report(rows, config, seconds=time.perf_counter() - t_start, command=command)
    print(f"suite finished in {time.perf_counter() - t_start:.0f} s; results in {config.out}")
    return rows
