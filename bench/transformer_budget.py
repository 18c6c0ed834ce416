"""A hand-written transformer trained under a FLOPs budget on MNIST-1D, pruned and timed.

The model: a convolution stem (1 -> 64 channels, kernel 5) over the 40 positions, a learned
position embedding, 3 pre-LN blocks of nanoGPT-style attention (a fused ``qkv`` Linear split
into q, k, v, 4 heads of 16 by a ``view``, ``F.scaled_dot_product_attention``) and a GELU FFN
of 256 units, a final LayerNorm, mean over the positions and a Linear read-out. ``gate_``
puts a gate on every head, FFN unit and residual sub-layer (attention or FFN, removable
whole); the demos' recipe (:func:`gatedprune.demo.budget_trainer`: no pressure for 10% of the
steps, the target warmed up over 40%, snapped at 60%, the rest fine-tunes the snapped
network) trains it at each FLOPs target, from the same initial weights as the dense run,
which trains with the same schedule and no gates. FLOPs include the attention products
``q k^T`` and ``weights v`` (and SDPA's softmax), which head pruning cuts too.

Reported per run: test accuracy (eval mode), the achieved FLOPs and parameter fractions
(``cost(prune(model)) / cost(dense)``), heads and FFN units kept, sub-layers removed, the
largest difference between the pruned and the gated model on the test set, and the measured
latency of the pruned model against the dense one at batch 1 and 256 (one thread, medians of
interleaved rounds; the FLOPs reduction it reaches is ``speedup * flops_fraction``).

    python -m bench.transformer_budget [--targets 0.5 0.25] [--epochs 30] [--seeds 0]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.data import Splits, mnist1d
from gatedprune.demo import budget_trainer
from gatedprune.gating import gate_
from gatedprune.profiling import compare_latency
from gatedprune.train import Trainer

from .common import command_line, median, write_results

D, HEADS, HIDDEN, BLOCKS, LENGTH = 64, 4, 256, 3, 40


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.size()
        q, k, v = self.qkv(x).split(c, dim=2)  # (B, T, C) each
        q = q.view(b, t, HEADS, c // HEADS).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(b, t, HEADS, c // HEADS).transpose(1, 2)  # (B, H, T, Dh)
        v = v.view(b, t, HEADS, c // HEADS).transpose(1, 2)  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))  # (B, T, C)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention()
        self.fc, self.out = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))  # (B, T, C)


class Net(nn.Module):
    """MNIST-1D ``(B, 1, 40)`` -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, D, 5, padding=2)
        self.pos = nn.Parameter(torch.zeros(1, LENGTH, D))
        self.blocks = nn.Sequential(*(Block() for _ in range(BLOCKS)))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x).transpose(1, 2) + self.pos  # (B, 40, C)
        return self.head(self.ln_f(self.blocks(h)).mean(1))  # (B, 10)


@torch.no_grad()
def _accuracy(model: nn.Module, data: Splits) -> float:
    model.eval()
    return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def _kept(pruned: nn.Module, x: Tensor) -> tuple[str, str]:
    """Heads and FFN units kept per block ("0": that sub-layer is no longer called)."""
    called: set[str] = set()
    handles = []
    for name, m in pruned.named_modules():
        if name.endswith(".attn") or name.endswith(".fc"):
            handles.append(m.register_forward_hook(lambda *_, n=name: called.add(n)))
    with torch.no_grad():
        pruned(x)
    for h in handles:
        h.remove()
    modules = dict(pruned.named_modules())
    heads, units = [], []
    for i in range(BLOCKS):  # a removed sub-layer's modules are gone or no longer called
        proj, fc = modules.get(f"blocks.{i}.attn.proj"), modules.get(f"blocks.{i}.fc")
        on_attn, on_fc = f"blocks.{i}.attn" in called, f"blocks.{i}.fc" in called
        heads.append(proj.in_features // (D // HEADS) if on_attn and proj is not None else 0)
        units.append(fc.out_features if on_fc and fc is not None else 0)
    return "/".join(map(str, heads)), "/".join(map(str, units))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = mnist1d()
    x1 = data.x_train[:1]  # costs per sample
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        init = Net()
        dense = copy.deepcopy(init)
        start = time.perf_counter()
        trainer = Trainer(dense, epochs=args.epochs, lr=args.lr, seed=seed, progress=False)
        trainer.fit(train=(data.x_train, data.y_train))
        dense_time = time.perf_counter() - start
        dense.eval()
        c_dense = gp.cost(dense, x1)
        assert isinstance(c_dense, gp.Cost)
        acc_dense = _accuracy(dense, data)
        rows.append(
            {
                "seed": seed,
                "target": 1.0,
                "test_accuracy": acc_dense,
                "flops_fraction": 1.0,
                "params_fraction": 1.0,
                "heads": "/".join([str(HEADS)] * BLOCKS),
                "ffn_units": "/".join([str(HIDDEN)] * BLOCKS),
                "max_abs_diff": 0.0,
                "speedup_b1": 1.0,
                "speedup_b256": 1.0,
                "train_s": dense_time,
            }
        )
        print(rows[-1], flush=True)
        for target in args.targets:
            net = copy.deepcopy(init)
            gate_(net, x1)
            start = time.perf_counter()
            trainer = budget_trainer(net, data, flops=target, epochs=args.epochs, seed=seed)
            trainer.lr = args.lr
            trainer.fit(train=(data.x_train, data.y_train))
            train_time = time.perf_counter() - start
            net.eval()
            pruned = gp.prune(net).eval()
            with torch.no_grad():
                diff = (pruned(data.x_test) - net(data.x_test)).abs().max().item()
            c = gp.cost(pruned, x1)
            assert isinstance(c, gp.Cost)
            heads, units = _kept(pruned, x1)
            speed = {}
            for batch in (1, 256):
                xb = data.x_test[:batch]
                t = compare_latency({"dense": dense, "pruned": pruned}, xb, rounds=args.rounds)
                speed[batch] = t["dense"] / t["pruned"]
            rows.append(
                {
                    "seed": seed,
                    "target": target,
                    "test_accuracy": _accuracy(pruned, data),
                    "flops_fraction": c.flops / c_dense.flops,
                    "params_fraction": c.params / c_dense.params,
                    "heads": heads,
                    "ffn_units": units,
                    "max_abs_diff": diff,
                    "speedup_b1": speed[1],
                    "speedup_b256": speed[256],
                    "train_s": train_time,
                }
            )
            print(rows[-1], flush=True)
    accs = [r["test_accuracy"] for r in rows if r["target"] == 1.0]
    write_results(
        "transformer_budget",
        rows,
        title="Hand-written transformer under a FLOPs budget (MNIST-1D, 3 blocks, 4 heads)",
        command=command_line(),
        notes=(
            f"{args.epochs} epochs, lr {args.lr}, batch 100, one thread; dense median accuracy "
            f"{median(accs):.4f}. FLOPs per sample with the attention products; heads and FFN "
            "units kept per block (0: the sub-layer was removed); speed-ups of the pruned "
            f"model over the dense one, medians of {args.rounds} interleaved rounds."
        ),
    )


if __name__ == "__main__":
    main()
