"""Run `gatedprune demo` (default settings) and record its table as a benchmark result.

python -m bench.demo [--budget 0.1] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gatedprune.demo import SNAP_AT, DemoConfig, run_demo

from .common import command_line, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run_demo(DemoConfig(budget=args.budget, seed=args.seed, out=Path(tmp)))
    rows = [
        {
            "model": row["model"],
            "params": row["params"],
            "FLOPs": row["flops"],
            "latency b=1 (ms)": row.get("latency_b1_ms") or "",
            "latency b=256 (ms)": row.get("latency_b256_ms") or "",
            "test accuracy": "" if row.get("accuracy") is None else row["accuracy"],
        }
        for row in r["rows"]
    ]
    k = r["kept"]
    before = r["achieved_before_snap"] or {}
    notes = "\n".join(
        [
            f"- target {r['target_flops_fraction']:g} of FLOPs, achieved "
            f"{r['achieved_flops_fraction']:.4f} (error {r['budget_error']:.4f}); the Lagrangian "
            f"alone had reached {before.get('flops', float('nan')):.4f} when the gates were "
            f"snapped at {100 * SNAP_AT:.0f}% of training",
            f"- {r['flops_reduction']:.2f}x fewer FLOPs; measured speed-up "
            f"{r['speedup_b1']:.2f}x at batch 1 and {r['speedup_b256']:.2f}x at batch 256 "
            f"(BatchNorm folded: {r['speedup_b1_bn_folded']:.2f}x / "
            f"{r['speedup_b256_bn_folded']:.2f}x)",
            f"- kept {k['layers_kept']}/{k['layers_total']} layers, {k['units_kept']}/"
            f"{k['units_total']} channels, {k['edges_kept']}/{k['edges_total']} edges",
            f"- pruned vs gated, eval mode: max |diff| {r['max_abs_diff_float32']:.1e} in float32 "
            f"(logits up to {r['max_abs_logit']:.0f}: relative {r['max_rel_diff_float32']:.1e}; "
            f"{r['max_abs_diff_float32_random']:.1e} on fresh random inputs), "
            f"{r['max_abs_diff_float64']:.1e} in float64",
            f"- wall time: training {r['train_seconds']:.0f} s, prune {r['prune_seconds']:.3f} s, "
            f"whole demo {r['total_seconds']:.0f} s",
        ]
    )
    write_results(
        "demo",
        rows,
        title="gatedprune demo (ShortcutConv1d on MNIST-1D, 10% FLOPs budget)",
        command=command_line() + "  (runs gatedprune demo with its defaults)",
        notes=notes,
    )


if __name__ == "__main__":
    main()
