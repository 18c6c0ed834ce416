"""Training-step time of gated networks vs the same networks without gates (target <= 1.25x).

The ungated network is the all-open network rebuilt without gates by ``prune`` (same layers,
same wiring). A step is forward + loss (+ budget penalty for the gated one) + backward +
AdamW step, batch 100. The budget penalises the exact cost with straight-through gradients
(``budget.straight_through``), as in the demos' recipe (``straight_through_at=0.0``), so a
gated + budget step also evaluates the hard cost. Gated and plain steps alternate in blocks;
medians are reported.

    python -m bench.train_step [--blocks 15] [--steps 10]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.demo import all_open_copy, build_demo_model

from .common import command_line, median, write_results


def _stepper(
    model: nn.Module, x: Tensor, y: Tensor, budget: gp.Budget | None
) -> Callable[[], None]:
    params = list(model.parameters()) + (list(budget.parameters()) if budget else [])
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        if budget is not None:
            loss = loss + budget.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _time(step: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    cases: list[tuple[str, gp.GatedModule, Tensor]] = [
        ("ShortcutConv1d demo (32,32|64,64|64,64)", build_demo_model(40), torch.randn(100, 1, 40)),
        (
            "ShortcutMLP 40 -> 6 x 256 -> 10",
            gp.ShortcutMLP(40, [256] * 6, 10),
            torch.randn(100, 40),
        ),
    ]
    rows = []
    for name, gated, x in cases:
        y = torch.randint(0, 10, (x.shape[0],))
        plain = gp.prune(all_open_copy(gated))
        budget = gp.Budget(gated, x[:1], flops=0.25)
        budget.straight_through = True  # the demos' recipe: Trainer(straight_through_at=0.0)
        steps = {
            "gated + budget": _stepper(gated, x, y, budget),
            "gated": _stepper(gated, x, y, None),
            "plain": _stepper(plain, x, y, None),
        }
        for s in steps.values():  # warm-up
            _time(s, 3)
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.blocks):
            for k, s in steps.items():
                times[k].append(_time(s, args.steps))
        t_plain = median(times["plain"])
        for k in ("gated + budget", "gated"):
            rows.append(
                {
                    "network": name,
                    "variant": k,
                    "step_ms": 1e3 * median(times[k]),
                    "plain_step_ms": 1e3 * t_plain,
                    "ratio": median(times[k]) / t_plain,
                    "target_ratio": 1.25,
                }
            )
    write_results(
        "train_step",
        rows,
        title="Training-step time: gated vs the same network without gates",
        command=command_line(),
        notes="ratio = median gated step / median plain step, measured in one run, batch 100.",
    )


if __name__ == "__main__":
    main()
