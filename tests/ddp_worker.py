"""Worker of tests/test_distributed.py, launched twice by ``torch.distributed.run`` (gloo, CPU).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT_DIR [MODE]``.
Each rank trains the same ShortcutMLP under a Budget with the Trainer (ranks start from
*different* random weights: DDP must broadcast rank 0's), records which training samples its
forward passes saw, and writes ``OUT_DIR/rank{r}.safetensors`` with its initial and final
parameters, the multipliers and the seen samples (its history in the metadata).

Other modes, for resuming (``OUT_DIR/ckpt-shared`` is a folder both ranks see):
``stop`` trains to step ``STOP`` (mid-epoch) there; ``resume`` resumes from it and writes
``OUT_DIR/resumed-rank{r}.safetensors``; ``unshared`` resumes with rank 1 looking in an empty
folder of its own and writes the error each rank got to ``OUT_DIR/unshared-rank{r}.txt``.
``bn`` trains a ShortcutConv1d with BatchNorm and writes ``OUT_DIR/bn-rank{r}.safetensors``.
``diverge``: rank 1's loss turns inf at step ``STOP``; each rank writes the error it got to
``OUT_DIR/diverge-rank{r}.txt``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gatedprune.budget import Budget
from gatedprune.io import write_tensors
from gatedprune.shortcut import ShortcutConv1d, ShortcutMLP
from gatedprune.train import Trainer

IN, WIDTHS, OUT = 12, [16, 16], 3
N_TRAIN, BATCH, EPOCHS = 93, 20, 2  # 5 batches per epoch, the last of 13 samples (7 + 6)
STOP = 7  # mid-epoch 2: checkpoints at steps 5 (end of epoch 1) and 7


def make_data() -> tuple[Tensor, Tensor]:
    """The training set (identical on every rank and in the test)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N_TRAIN, IN, generator=g)  # (N, IN)
    y = torch.randint(0, OUT, (N_TRAIN,), generator=g)  # (N,)
    return x, y


def make_model(init_seed: int) -> tuple[ShortcutMLP, Budget]:
    torch.manual_seed(init_seed)
    net = ShortcutMLP(IN, WIDTHS, OUT)
    budget = Budget(net, torch.zeros(1, IN), flops=0.3, warmup_steps=4)
    return net, budget


def trainer(net: nn.Module, budget: Budget, checkpoint_dir: str | None) -> Trainer:
    return Trainer(
        net,
        budget=budget,
        epochs=EPOCHS,
        batch_size=BATCH,
        lr=1e-2,
        gate_lr=5e-2,
        budget_lr=5e-2,
        seed=3,
        progress=True,
        checkpoint_dir=checkpoint_dir,
        straight_through_at=0.5,
    )


def resume_main(out_dir: str, mode: str, rank: int) -> None:
    net, budget = make_model(init_seed=100 + rank)
    x, y = make_data()
    shared = os.path.join(out_dir, "ckpt-shared")
    if mode == "stop":
        trainer(net, budget, shared).fit((x, y), max_steps=STOP)
    elif mode == "unshared":
        folder = shared if rank == 0 else os.path.join(out_dir, f"ckpt-empty-rank{rank}")
        try:
            trainer(net, budget, folder).fit((x, y), resume=True)
            message = "no error"
        except ValueError as e:
            message = str(e)
        with open(os.path.join(out_dir, f"unshared-rank{rank}.txt"), "w") as f:
            f.write(message)
    else:
        t = trainer(net, budget, shared)
        t.fit((x, y), resume=True)
        tensors = {f"final/{k}": v for k, v in net.state_dict().items()}
        tensors.update({f"budget/{k}": v for k, v in budget.state_dict().items()})
        meta = {"rank": rank, "history": t.history, "before_snap": t.achieved_before_snap}
        write_tensors(os.path.join(out_dir, f"resumed-rank{rank}.safetensors"), tensors, meta)


def bn_main(out_dir: str, rank: int) -> None:
    """A network with BatchNorm: every rank must end with rank 0's statistics."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(160, 1, 16, generator=g)  # (N, 1, L)
    y = torch.randint(0, 3, (160,), generator=g)  # (N,)
    torch.manual_seed(100 + rank)
    net = ShortcutConv1d(1, [[6, 6], [8]], 3, input_length=16)
    budget = Budget(net, x[:1], flops=0.3, warmup_steps=10)
    t = Trainer(net, budget=budget, epochs=3, batch_size=20, progress=False, seed=5)
    t.fit(train=(x, y), val=(x[:40], y[:40]))
    tensors = {f"final/{k}": v for k, v in net.state_dict().items()}
    meta = {"rank": rank, "history": t.history}
    write_tensors(os.path.join(out_dir, f"bn-rank{rank}.safetensors"), tensors, meta)


def diverge_main(out_dir: str, rank: int) -> None:
    """Rank 1's loss is inf from step STOP on: both ranks must stop with the error (the
    other rank must not wait in DDP's gradient all-reduce until torchrun ends it)."""
    net, budget = make_model(init_seed=100 + rank)
    x, y = make_data()
    calls = [0]

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        calls[0] += torch.is_grad_enabled()  # training steps only
        loss = nn.functional.cross_entropy(out, target)
        return loss * float("inf") if rank == 1 and calls[0] > STOP else loss

    t = trainer(net, budget, None)
    t.loss_fn = loss_fn
    try:
        t.fit((x, y))
        message = "no error"
    except ValueError as e:
        message = str(e)
    with open(os.path.join(out_dir, f"diverge-rank{rank}.txt"), "w") as f:
        f.write(message)


def main(out_dir: str, mode: str = "full") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode != "full":
        if mode == "bn":
            bn_main(out_dir, rank)
        elif mode == "diverge":
            diverge_main(out_dir, rank)
        else:
            resume_main(out_dir, mode, rank)
        dist.barrier()
        dist.destroy_process_group()
        return
    net, budget = make_model(init_seed=100 + rank)  # different on each rank on purpose
    init = {f"init/{k}": v.detach().clone() for k, v in net.state_dict().items()}
    seen: list[Tensor] = []

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if module.training:
            seen.append(args[0][:, 0].detach().clone())  # (B_local,) first feature = sample id

    net.register_forward_pre_hook(record)
    x, y = make_data()
    t = trainer(net, budget, os.path.join(out_dir, f"ckpt-rank{rank}"))
    t.fit((x, y))
    tensors: dict[str, Tensor] = dict(init)
    tensors.update({f"final/{k}": v for k, v in net.state_dict().items()})
    tensors.update({f"budget/{k}": v for k, v in budget.state_dict().items()})
    tensors["seen"] = torch.cat(seen)  # (EPOCHS * N_TRAIN / 2,)
    tensors["seen_sizes"] = torch.tensor([len(s) for s in seen])  # (steps,)
    meta = {"rank": rank, "history": t.history, "before_snap": t.achieved_before_snap}
    write_tensors(os.path.join(out_dir, f"rank{rank}.safetensors"), tensors, meta)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    # Skip interpreter finalisation: gloo's worker threads can still hold tensors after
    # destroy_process_group, and tearing them down during finalisation occasionally aborts the
    # process ("terminate called without an active exception", pytorch/pytorch#190489 and
    # #179291; about 1 run in 30 here). Every output file is written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
