"""Hand-written attention: latency of a GPT-style model pruned by head and FFN-unit gates.

A 4-block pre-LN GPT (d = 256, 8 heads of 32, FFN 1024, fused ``c_attn`` split into q, k, v,
``F.scaled_dot_product_attention``, as nanoGPT writes it) is gated with ``gate_``; the gates
are set by hand (the first ``keep`` heads and the first ``keep`` of the FFN units of every
block open, the rest closed), pruned, checked against the gated model, and timed against the
dense model in interleaved rounds on one thread (medians). The FLOPs include the attention
products ``q k^T`` and ``weights v`` (and SDPA's softmax), which head pruning cuts too.

    python -m bench.attention_heads [--seq 128] [--rounds 7]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import InsertedGating, gate_
from gatedprune.profiling import compare_latency

from .common import command_line, write_results


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.n_head, self.d = heads, d
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.d, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))  # (B, T, C)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.c_fc, self.c_proj = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT-style blocks on a (B, T, 64) input, mean-pooled to 10 outputs."""

    def __init__(self, d: int = 256, heads: int = 8, hidden: int = 1024, n: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(64, d)
        self.blocks = nn.Sequential(*(_Block(d, heads, hidden) for _ in range(n)))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ln_f(self.blocks(self.embed(x))).mean(1))  # (B, 10)


def _pruned(keep: float, x: Tensor) -> tuple[nn.Module, nn.Module, float]:
    """(dense, pruned, max |pruned - gated|) with a fraction ``keep`` of heads and units."""
    torch.manual_seed(0)
    dense = GPT().eval()
    gated = GPT().eval()
    gated.load_state_dict(dense.state_dict())
    gate_(gated, x[:1], blocks=False)
    gating = gated.gatedprune
    assert isinstance(gating, InsertedGating)
    for gate in gating.group_gates:
        n_open = max(1, round(keep * gate.n))
        gate.force_(torch.arange(gate.n) < n_open)  # type: ignore[operator]
    gated.eval()
    pruned = gp.prune(gated).eval()
    with torch.no_grad():
        diff = (pruned(x) - gated(x)).abs().max().item()
    return dense, pruned, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for keep in (0.5, 0.25):
        for batch in (1, 32):
            x = torch.randn(batch, args.seq, 64)
            dense, pruned, diff = _pruned(keep, x)
            c_d, c_p = gp.cost(dense, x), gp.cost(pruned, x)
            assert isinstance(c_d, gp.Cost)
            assert isinstance(c_p, gp.Cost)
            t = compare_latency({"dense": dense, "pruned": pruned}, x, rounds=args.rounds)
            heads = pruned.get_submodule("blocks.0.attn.c_proj")
            assert isinstance(heads, nn.Linear)
            rows.append(
                {
                    "kept": keep,
                    "batch": batch,
                    "heads": f"{heads.in_features // 32}/8",
                    "params_fraction": c_p.params / c_d.params,
                    "flops_fraction": c_p.flops / c_d.flops,
                    "dense_ms": 1e3 * t["dense"],
                    "pruned_ms": 1e3 * t["pruned"],
                    "speedup": t["dense"] / t["pruned"],
                    "max_abs_diff": diff,
                }
            )
            print(rows[-1], flush=True)
    write_results(
        "attention_heads",
        rows,
        title="Hand-written attention: heads and FFN units pruned (GPT-style, 4 blocks)",
        command=command_line(),
        notes=(
            f"T = {args.seq}, one thread, medians of {args.rounds} interleaved rounds; gates "
            "set by hand (the first `kept` of the heads and FFN units of every block open); "
            "FLOPs include the attention products q k^T and weights v. "
            "max_abs_diff: pruned vs gated model, eval mode."
        ),
    )


if __name__ == "__main__":
    main()
