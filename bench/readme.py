"""Regenerate the README's benchmark section from bench/results/*.md (never typed by hand).

python -m bench.readme
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from .common import RESULTS

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ORDER = [
    "demo",
    "budget_sweep",
    "speed_recipe",
    "collapse",
    "latency_budget",
    "unit_group",
    "unit_group16_edge_lr",
    "round_to",
    "train_step",
    "prune_time",
    "resnet1d_speed",
    "resnet1d_latency",
    "resnet1d_gate_prune_time",
    "attention_heads",
    "transformer_budget",
    "suite/suite_summary",
    "lstm_quality",
    "lstm_speed",
    "lstm_train_step",
    "real_models",
]


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(
        prog="python -m bench.readme",
        description="Rebuild the README's benchmark section (between its bench markers) from "
        "bench/results/*.md.",
    ).parse_args(argv)
    files = [RESULTS / f"{name}.md" for name in ORDER if (RESULTS / f"{name}.md").exists()]
    body = "\n\n".join(p.read_text().strip().replace("## ", "#### ", 1) for p in files)
    text = README.read_text()
    if START not in text or END not in text:
        raise ValueError(f"README.md lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{body}\n{END}{tail}"
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, README)
    print(f"README benchmark section rebuilt from {len(files)} result file(s)")


if __name__ == "__main__":
    main()
