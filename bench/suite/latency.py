"""The suite's latency phase: every final model of a workload timed in one process, together.

Training runs in several processes (``--jobs``); timing must not. Each part saves its final
models into ``<part>/models/`` (``--defer-latency``) and skips latency; once every part has
finished training, the parent process loads all final models of a workload and times them
with the workload's dense reference in interleaved rounds (:func:`gatedprune.profiling.
compare_latency`), with nothing else running. Every method's speed-up is then a ratio to the
*same* dense measurement, comparable across methods.

The model files are transient transport between the suite's own processes: whole modules
written with ``torch.save`` (baselines' Torch-Pruning surgery and fx graphs have no other
serialisation) and read back only from folders this suite wrote. They are not a user-facing
format (that is :func:`gatedprune.save`, which uses no pickle), and they are not committed.

Re-time a finished suite on a quieter machine without re-training::

    python -m bench.suite.retime bench/results/suite
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gatedprune.profiling import compare_latency, num_threads

from .workloads import WORKLOADS

if TYPE_CHECKING:
    from .runner import SuiteConfig

__all__ = ["find_models", "main", "measure_rows", "model_key", "model_path", "save_model"]


def model_key(row: Mapping[str, Any]) -> str:
    """File name of the final model of ``row`` (workload, method, target, seed).

    >>> model_key({"workload": "w", "method": "m", "target": 0.25, "seed": 1})
    'w--m--0.25--1.pt'
    """
    return f"{row['workload']}--{row['method']}--{float(row['target']):g}--{int(row['seed'])}.pt"


def model_path(folder: Path, row: Mapping[str, Any]) -> Path:
    """Where :func:`save_model` keeps the final model of ``row`` under ``folder``."""
    return Path(folder) / "models" / model_key(row)


def save_model(model: nn.Module, folder: Path, row: Mapping[str, Any]) -> Path:
    """Save ``row``'s final model for the latency phase; returns the file."""
    path = model_path(folder, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model, tmp)
    tmp.replace(path)
    return path


def find_models(folders: Iterable[Path]) -> dict[str, Path]:
    """Model files under ``folder/models`` and ``folder/parts/*/models``, by file name; a
    later folder's file replaces an earlier one's (as merged rows do)."""
    found: dict[str, Path] = {}
    for folder in folders:
        for pattern in ("models/*.pt", "parts/*/models/*.pt"):
            for p in sorted(Path(folder).glob(pattern)):
                found[p.name] = p
    return found


def _load(path: Path) -> nn.Module:
    # Written by save_model of this same suite (see the module docstring): a whole module.
    model = torch.load(path, weights_only=False)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{path} does not hold an nn.Module (got {type(model).__name__})")
    return model.eval()


def measure_rows(
    rows: Sequence[dict[str, Any]],
    models: Mapping[str, nn.Module | Path],
    config: SuiteConfig,
    *,
    log: Any = print,
) -> None:
    """Time every row's final model against its workload's dense reference, all models of a
    workload in one interleaved phase, and write ``latency_b{B}_ms``, ``speedup_b{B}`` and
    ``dense_latency_b{B}_ms`` into the rows. ``models`` maps :func:`model_key` file names
    to models (or their files); rows without one (failed runs) are left as they are. Batch
    sizes, rounds, repeats, threads and the data size come from ``config``."""
    threads = config.threads
    with num_threads(threads):
        for wl_name in dict.fromkeys(str(r["workload"]) for r in rows):
            wl = WORKLOADS[wl_name]()
            data = wl.data(config.num_samples)
            torch.manual_seed(0)
            reference = wl.dense_reference(data.x_train[:1])
            timed: dict[str, nn.Module] = {"dense": reference}
            owners: dict[str, dict[str, Any]] = {}
            for i, r in enumerate(rows):
                entry = models.get(model_key(r))
                if r["workload"] != wl_name or entry is None:
                    continue
                timed[str(i)] = _load(entry) if isinstance(entry, Path) else entry.eval()
                owners[str(i)] = r
            log(f"{wl_name}: measuring latency of {len(timed)} models in one process ...")
            for batch in config.batch_sizes:
                x = data.x_test[:batch]  # (batch, ...) real test inputs
                repeats = config.latency_repeats_b1 if batch == 1 else config.latency_repeats_b256
                times = compare_latency(
                    timed, x, rounds=config.latency_rounds, repeats=repeats, threads=threads
                )
                for key, r in owners.items():
                    r[f"latency_b{batch}_ms"] = 1e3 * times[key]
                    r[f"speedup_b{batch}"] = times["dense"] / times[key]
                    r[f"dense_latency_b{batch}_ms"] = 1e3 * times["dense"]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.suite.retime OUT``: re-time the final models a suite run kept and
    rewrite its report."""
    from dataclasses import replace

    from .merge import read_runs
    from .report import write_report
    from .runner import FULL

    ap = argparse.ArgumentParser(prog="python -m bench.suite.retime", description=__doc__)
    ap.add_argument("out", type=Path, help="a suite output folder (with its models/ or parts/)")
    ap.add_argument("--num-samples", type=int, default=FULL.num_samples)
    ap.add_argument("--threads", type=int, default=FULL.threads)
    ap.add_argument("--seconds", type=float, default=None, help="suite time to report")
    a = ap.parse_args(argv)
    rows = read_runs(a.out)
    models = find_models([a.out])
    if not models:
        raise ValueError(f"{a.out} keeps no final models (models/ or parts/*/models/)")
    config = replace(
        FULL,
        out=a.out,
        num_samples=a.num_samples,
        threads=a.threads,
        workloads=tuple(dict.fromkeys(str(r["workload"]) for r in rows)),
        seeds=tuple(sorted({int(r["seed"]) for r in rows})),
    )
    measure_rows(rows, dict(models), config)
    seconds = a.seconds if a.seconds is not None else sum(float(r["train_s"]) for r in rows)
    write_report(
        rows, config, seconds=seconds, command="python -m bench.suite.retime " + str(a.out)
    )


if __name__ == "__main__":
    main()
