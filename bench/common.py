"""Shared helpers of the benchmark scripts: result files and environment notes."""

from __future__ import annotations

import copy
import csv
import os
import platform
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.costs import Cost
from gatedprune.plain import PlainShortcutNet
from gatedprune.profiling import allocator_setting

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> str:
    """One line describing where the numbers were measured."""
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {allocator_setting()}"
    )


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str,
    command: str,
    notes: str = "",
    out_dir: Path = RESULTS,
) -> Path:
    """Write ``rows`` to ``out_dir/name.csv`` and a markdown table to ``out_dir/name.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    csv_path = out_dir / f"{name}.csv"
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    os.replace(tmp, csv_path)
    lines = [
        f"## {title}",
        "",
        f"Command: `{command}`  ",
        f"Measured with {environment()}.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    if notes:
        lines += ["", notes]
    md_path = out_dir / f"{name}.md"
    md_tmp = md_path.with_suffix(".md.tmp")
    md_tmp.write_text("\n".join(lines) + "\n")
    os.replace(md_tmp, md_path)
    print("\n".join(lines))
    return md_path


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def command_line() -> str:
    return (
        "python -m bench."
        + Path(sys.argv[0]).stem
        + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    )


def channels_first(plain: nn.Module) -> nn.Module:
    """A copy of a pruned ``PlainShortcutNet`` that keeps the ``(B, C, L)`` eval path
    (``channels_last = False``), to time against the default channels-last path.

    >>> import torch, gatedprune
    >>> net = gatedprune.prune(gatedprune.ShortcutConv1d(1, [[4]], 2, input_length=8).eval())
    >>> channels_first(net).channels_last, net.channels_last
    (False, True)
    """
    if not isinstance(plain, PlainShortcutNet):
        raise TypeError(f"expected a PlainShortcutNet, got {type(plain).__name__}")
    out = copy.deepcopy(plain)
    out.channels_last = False
    return out


class OrtModule(nn.Module):
    """An exported plain model run by ONNX Runtime, callable like the module it came from (so
    :func:`gatedprune.profiling.compare_latency` times it in the same rounds as eager models).
    Exported with :func:`gatedprune.export_onnx` (checked against the model), ``threads``
    intra-op threads.

    >>> m = OrtModule(nn.Linear(3, 2), torch.zeros(1, 3))
    >>> m(torch.zeros(4, 3)).shape
    torch.Size([4, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        example: Tensor,
        *,
        dynamic_dims: Sequence[int] = (0,),
        threads: int = 1,
    ) -> None:
        import tempfile

        super().__init__()
        with tempfile.TemporaryDirectory() as tmp:
            path = gp.export_onnx(
                model, example, Path(tmp) / "model.onnx", dynamic_dims=dynamic_dims
            )
            self.session = gp.onnx_session(path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().numpy()})[0]
        return torch.from_numpy(out)


@dataclass(frozen=True)
class Pruned:
    """A trained shortcut network pruned, its all-open architecture pruned likewise (the
    dense reference), and their exact costs per sample."""

    pruned: PlainShortcutNet
    dense: PlainShortcutNet
    cost: Cost
    dense_cost: Cost

    @property
    def flops_fraction(self) -> float:
        return self.cost.flops / self.dense_cost.flops


def prune_with_reference(net: nn.Module, x1: Tensor) -> Pruned:
    """``prune(net)`` and ``prune`` of its all-open copy, both in eval mode, with their costs
    on the one-sample input ``x1`` (``net`` is put in eval mode).

    >>> import gatedprune as gp
    >>> r = prune_with_reference(gp.ShortcutMLP(4, [6], 2), torch.zeros(1, 4))
    >>> r.flops_fraction
    1.0
    """
    from gatedprune.demo import all_open_copy

    net.eval()
    pruned, dense = gp.prune(net).eval(), gp.prune(all_open_copy(net)).eval()
    if not isinstance(pruned, PlainShortcutNet) or not isinstance(dense, PlainShortcutNet):
        raise TypeError("expected a shortcut network (it prunes to PlainShortcutNet)")
    c_p, c_d = gp.cost(pruned, x1), gp.cost(dense, x1)
    if not isinstance(c_p, Cost) or not isinstance(c_d, Cost):
        raise TypeError("pruned models must be plain")
    return Pruned(pruned, dense, c_p, c_d)
