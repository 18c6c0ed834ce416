"""Results of the suite: per-run CSV/markdown, a mean ± std summary, verdicts and Pareto plots.

Files written into the output folder (names fixed, so the README can include them):

* ``suite_runs.csv`` / ``.md``: one row per (workload, method, target, seed);
* ``suite_summary.csv`` / ``.md``: mean ± std over seeds per (workload, method, target)
  (``suite_summary_numeric.csv``: the same as numbers), with a verdict per budget: is
  gatedprune at or above every baseline on mean accuracy, is its latency speed-up as large;
* ``pareto_<workload>.png``: accuracy vs achieved FLOPs, params and latency (batch 1, 256).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import write_results

if TYPE_CHECKING:
    from .runner import SuiteConfig

__all__ = ["SUMMARY_METRICS", "aggregate", "plot_pareto", "verdicts", "write_report"]

SUMMARY_METRICS = (
    "accuracy",
    "achieved_flops",
    "achieved_params",
    "budget_error",
    "latency_b1_ms",
    "latency_b256_ms",
    "speedup_b1",
    "speedup_b256",
    "train_s",
)
"""Columns averaged over seeds (each gets ``_mean`` and ``_std``)."""


def schedules(rows: Sequence[Mapping[str, Any]]) -> str:
    """The epochs (pruning + fine-tuning counted) and optimizer of each workload's methods.

    >>> schedules([{"workload": "mnist1d_shortcut_conv", "epochs": 15}]).split(": ")[1]
    'mnist1d_shortcut_conv 15 (AdamW lr 0.01, weight decay 0.0001)'
    """
    from .workloads import WORKLOADS

    parts = []
    for wl in dict.fromkeys(str(r["workload"]) for r in rows):
        epochs = sorted({int(r["epochs"]) for r in rows if r["workload"] == wl})
        text = f"{wl} {'/'.join(str(e) for e in epochs)}"
        if wl in WORKLOADS:
            text += f" ({WORKLOADS[wl]().schedule.describe()})"
        parts.append(text)
    return "epochs per method (pruning + fine-tuning counted): " + ", ".join(parts)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (workload, method, target), in first-seen order.

    >>> rows = [{"workload": "w", "method": "m", "target": 0.5, "seed": s, "accuracy": a}
    ...         for s, a in [(0, 0.8), (1, 0.9)]]
    >>> round(aggregate(rows)[0]["accuracy_mean"], 3), aggregate(rows)[0]["seeds"]
    (0.85, 2)
    """
    groups: dict[tuple[str, str, float], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["method"], r["target"]), []).append(r)
    out: list[dict[str, Any]] = []
    for (wl, method, target), rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        agg: dict[str, Any] = {
            "workload": wl,
            "method": method,
            "target": target,
            "seeds": len(ok),
            "failed": len(rs) - len(ok),
            "error": next((str(r["error"]) for r in rs if r.get("error")), ""),
        }
        for k in SUMMARY_METRICS:
            vals = [float(r[k]) for r in ok if r.get(k) not in (None, "")]
            agg[f"{k}_mean"], agg[f"{k}_std"] = _mean_std(vals)
        out.append(agg)
    return out


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _summary_table(summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "workload": s["workload"],
            "target": s["target"],
            "method": s["method"],
            "seeds": s["seeds"],
            "accuracy %": _pm(s["accuracy_mean"], s["accuracy_std"], 100.0, 1),
            "FLOPs": _pm(s["achieved_flops_mean"], s["achieved_flops_std"]),
            "params": _pm(s["achieved_params_mean"], s["achieved_params_std"]),
            "budget err": _pm(s["budget_error_mean"], s["budget_error_std"]),
            "lat b1 ms": _pm(s["latency_b1_ms_mean"], s["latency_b1_ms_std"]),
            "lat b256 ms": _pm(s["latency_b256_ms_mean"], s["latency_b256_ms_std"], digits=2),
            "speed-up b1": _pm(s["speedup_b1_mean"], s["speedup_b1_std"], digits=2),
            "speed-up b256": _pm(s["speedup_b256_mean"], s["speedup_b256_std"], digits=2),
            "train s": _pm(s["train_s_mean"], s["train_s_std"], digits=0),
        }
        for s in sorted(summary, key=lambda s: (s["workload"], -s["target"]))
    ]


def error_summary(error: str, limit: int = 90) -> str:
    """The first line of a recorded error, shortened to ``limit`` characters.

    >>> error_summary("ValueError: no BatchNorm (not applicable)" + chr(10) + "more")
    'ValueError: no BatchNorm (not applicable)'
    """
    first = error.strip().splitlines()[0] if error.strip() else "unknown error"
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _did_not_run(group: Mapping[str, Mapping[str, Any]], reference: str) -> list[str]:
    out = []
    for m, s in group.items():
        if m == reference or s.get("seeds", 1) > 0:
            continue
        err = str(s.get("error", ""))
        how = "not applicable" if "not applicable" in err else "failed"
        out.append(f"{m} {how}: {error_summary(err)}")
    return out


def verdicts(summary: Sequence[Mapping[str, Any]], reference: str = "gatedprune") -> list[str]:
    """One line per (workload, target): where ``reference`` stands against each baseline on
    mean accuracy and latency speed-up (markdown bullets). Baselines without a successful
    seed are listed with their error, and the comparison then says "every baseline that ran";
    baselines that failed on some seeds are named with the count.

    >>> s = [{"workload": "w", "target": 0.5, "method": m, "accuracy_mean": a,
    ...       "speedup_b1_mean": 1.0, "speedup_b256_mean": 2.0} for m, a in
    ...      [("gatedprune", 0.9), ("random", 0.8)]]
    >>> verdicts(s)[0].startswith("- w, target 0.5: gatedprune 90.0%")
    True
    """
    lines: list[str] = []
    keys = sorted({(s["workload"], s["target"]) for s in summary}, key=lambda k: (k[0], -k[1]))
    for wl, target in keys:
        group = {s["method"]: s for s in summary if (s["workload"], s["target"]) == (wl, target)}
        ref = group.get(reference)
        if ref is None or math.isnan(ref["accuracy_mean"]):
            continue
        ran = {
            m: s
            for m, s in group.items()
            if m != reference and s.get("seeds", 1) > 0 and not math.isnan(s["accuracy_mean"])
        }
        missing = _did_not_run(group, reference)
        every = "every baseline that ran" if missing else "every baseline"
        beaten_acc = [
            f"{m} ({100 * s['accuracy_mean']:.1f}%)"
            for m, s in ran.items()
            if s["accuracy_mean"] > ref["accuracy_mean"]
        ]
        slower = [
            f"{m} ({s['speedup_b256_mean']:.2f}x)"
            for m, s in ran.items()
            if s["speedup_b256_mean"] > ref["speedup_b256_mean"]
        ]
        line = (
            f"- {wl}, target {target:g}: {reference} {100 * ref['accuracy_mean']:.1f}%, "
            f"speed-up {ref['speedup_b256_mean']:.2f}x at batch 256. "
        )
        if not ran:
            line += "No baseline ran. "
        else:
            line += (
                f"**Below on accuracy:** {', '.join(beaten_acc)}. "
                if beaten_acc
                else f"At or above {every} on mean accuracy. "
            )
            line += (
                f"**Larger batch-256 speed-up:** {', '.join(slower)}."
                if slower
                else f"Speed-up at least as large as {every}'s."
            )
        partial = [
            f"{m} ({s['failed']} of {s['failed'] + s['seeds']} seeds failed: "
            f"{error_summary(str(s.get('error', '')))})"
            for m, s in group.items()
            if s.get("seeds", 0) > 0 and s.get("failed", 0) > 0
        ]
        if missing:
            line += f" **Did not run:** {'; '.join(missing)}."
        if partial:
            line += f" **Some seeds failed:** {'; '.join(partial)}."
        lines.append(line.rstrip())
    return lines


_AXES = (
    ("achieved_flops", "achieved FLOPs (fraction of dense)"),
    ("achieved_params", "achieved params (fraction of dense)"),
    ("latency_b1_ms", "latency, batch 1 (ms)"),
    ("latency_b256_ms", "latency, batch 256 (ms)"),
)


def plot_pareto(summary: Sequence[Mapping[str, Any]], workload: str, path: Path) -> None:
    """Accuracy (mean ± std over seeds) against achieved FLOPs, params and latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary if s["workload"] == workload]
    methods = list(dict.fromkeys(s["method"] for s in rows))
    fig, axes = plt.subplots(1, len(_AXES), figsize=(4.2 * len(_AXES), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], _AXES, strict=True):
        for method in methods:
            pts = sorted(
                (s[f"{key}_mean"], s[f"{key}_std"], s["accuracy_mean"], s["accuracy_std"])
                for s in rows
                if s["method"] == method and not math.isnan(s["accuracy_mean"])
            )
            if not pts:
                continue
            xs, xe, ys, ye = (list(v) for v in zip(*pts, strict=True))
            ax.errorbar(
                xs,
                [100 * y for y in ys],
                xerr=xe,
                yerr=[100 * e for e in ye],
                marker="o" if method == "gatedprune" else ".",
                linewidth=2.0 if method == "gatedprune" else 1.0,
                capsize=2,
                label=method,
            )
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{workload}: accuracy vs cost (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def write_report(
    rows: Sequence[Mapping[str, Any]],
    config: SuiteConfig,
    *,
    seconds: float,
    command: str = "python -m bench",
) -> None:
    """Write runs, summary (with verdicts) and Pareto plots into ``config.out``."""
    out = Path(config.out)
    setup = (
        f"Settings: {schedules(rows)}; "
        f"{config.num_samples} MNIST-1D samples (80% train), seeds {list(config.seeds)}, "
        f"{config.threads} thread(s) for training and latency; suite time {seconds:.0f} s. "
        "Fractions are of the all-open gated network's dense FLOPs/params; speed-ups are "
        "against that dense network's measured latency."
    )
    write_results(
        "suite_runs",
        rows,
        title="Benchmark suite: every run",
        command=command,
        notes=setup,
        out_dir=out,
    )
    summary = aggregate(rows)
    _write_csv(out / "suite_summary_numeric.csv", summary)
    write_results(
        "suite_summary",
        _summary_table(summary),
        title="Benchmark suite: mean ± std over seeds at equal achieved FLOPs",
        command=command,
        notes=setup + "\n\n" + "\n".join(verdicts(summary)),
        out_dir=out,
    )
    if config.plots:
        for wl in dict.fromkeys(s["workload"] for s in summary):
            plot_pareto(summary, wl, out / f"pareto_{wl}.png")
