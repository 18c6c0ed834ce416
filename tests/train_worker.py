"""Helper of tests/test_train.py: train in a subprocess and SIGKILL ourselves mid-epoch.

Usage: ``python tests/train_worker.py CHECKPOINT_DIR KILL_AT_STEP``. Builds the same model, data
and Trainer as ``test_train.resume_setup`` and kills the process (SIGKILL: no clean-up, no
``finally``) right after optimizer step ``KILL_AT_STEP``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

from gatedprune.train import Trainer


def setup(checkpoint_dir: str | None, **extra: Any) -> tuple[Trainer, tuple[torch.Tensor, ...]]:
    """A small budgeted ShortcutMLP run: 3 epochs of 6 steps, checkpoints every 4 steps."""
    from gatedprune.budget import Budget
    from gatedprune.shortcut import ShortcutMLP

    g = torch.Generator().manual_seed(11)
    x = torch.randn(70, 10, generator=g)  # (N, 10)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()  # (N,) 3 classes
    xv = torch.randn(30, 10, generator=g)  # (M, 10)
    yv = (xv[:, :3].sum(1) > 0).long() + (xv[:, 3] > 1).long()  # (M,)
    torch.manual_seed(5)
    net = ShortcutMLP(10, [12, 12], 3)
    budget = Budget(net, torch.zeros(1, 10), flops=0.4, warmup_steps=6)
    options: dict[str, Any] = {
        "epochs": 3,
        "batch_size": 12,
        "seed": 2,
        "progress": False,
        "checkpoint_every_steps": 4,
        "straight_through_at": 0.5,
        "trace_every": 3,
        "weight_decay": 1e-3,
    }
    options.update(extra)
    trainer = Trainer(net, budget=budget, checkpoint_dir=checkpoint_dir, **options)
    return trainer, (x, y, xv, yv)


def main(checkpoint_dir: str, kill_at: int) -> None:
    torch.set_num_threads(1)

    def on_step(trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer, (x, y, xv, yv) = setup(checkpoint_dir, on_step=on_step)
    trainer.fit((x, y), val=(xv, yv))
    raise SystemExit("not killed")  # pragma: no cover


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
