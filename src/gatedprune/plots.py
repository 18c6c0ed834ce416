"""PNG plots of learned connectivity, widths and training curves (needs matplotlib, extra
``demo``; imported lazily, never by ``import gatedprune``)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_connectivity", "plot_training", "plot_widths"]


def require_matplotlib() -> None:
    """Raise ``ImportError`` (with the install hint) unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'gatedprune[demo]'") from e


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` outside pyplot: no display needed, and the caller's backend,
    current figure and figure list are left alone (``matplotlib.use`` is never called)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 120) -> None:
    """Render ``fig`` with the Agg-based writer of ``path``'s format (PNG without a suffix) and
    write it atomically (:func:`gatedprune.io.atomic_write`: a symbolic link stays a link)."""
    from .io import atomic_write

    p = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=p.suffix[1:].lower() or "png", dpi=dpi)
    atomic_write(p, buf.getvalue())


def _node_names(n_layers: int) -> list[str]:
    return ["input"] + [f"L{i}" for i in range(1, n_layers + 1)]


def plot_connectivity(conn: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Edge matrix of a shortcut network: rows are layers and the head, columns the nodes they
    read. Colour is the eval gate value of each kept edge; removed edges are blank and marked.

    ``conn`` is ``ShortcutMLP/ShortcutConv1d.connectivity()``.
    """
    import numpy as np

    layers = conn["layers"]
    n = len(layers)
    grid = np.full((n + 1, n + 1), np.nan)
    offered = np.zeros((n + 1, n + 1), dtype=bool)
    rows = [*layers, conn["head"]]
    for r, row in enumerate(rows):
        for j, v, kept in zip(row["sources"], row["edge_values"], row["edges_kept"], strict=True):
            offered[r, j] = True
            if kept:
                grid[r, j] = v
    fig = new_figure((1.2 + 0.45 * (n + 1), 1.0 + 0.45 * (n + 1)))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0)
    for r in range(n + 1):
        for c in range(n + 1):
            if offered[r, c] and np.isnan(grid[r, c]):
                ax.text(c, r, "×", ha="center", va="center", color="0.6", fontsize=8)
    names = _node_names(n)
    ax.set_xticks(range(n + 1), names, rotation=90)
    row_names = [f"{names[i + 1]}" + ("" if layers[i]["alive"] else " (removed)") for i in range(n)]
    ax.set_yticks(range(n + 1), [*row_names, "head"])
    ax.set_xlabel("reads from")
    ax.set_title(f"learned connectivity: {conn['edges_kept']}/{conn['edges_total']} edges kept")
    fig.colorbar(im, ax=ax, label="gate value", shrink=0.8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_widths(conn: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Units/channels per layer before and after pruning."""
    layers = conn["layers"]
    names = _node_names(len(layers))[1:]
    before = [x["width"] for x in layers]
    after = [x["kept_units"] for x in layers]
    fig = new_figure((max(4.0, 0.6 * len(layers) + 1.5), 3.2))
    ax = fig.subplots()
    xs = range(len(layers))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="all-open", color="0.75")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="pruned", color="tab:blue")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("units / channels")
    ax.set_title(f"width per layer: {conn['units_kept']}/{conn['units_total']} units kept")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_training(
    trace: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    target: float | None = None,
) -> None:
    """Expected and achieved cost fraction and mean gate value over training steps."""
    steps = [r["step"] for r in trace]
    fig = new_figure((6.0, 3.4))
    ax = fig.subplots()
    for key, label in (
        ("expected_flops", "expected FLOPs fraction"),
        ("achieved_flops", "achieved FLOPs fraction"),
        ("expected_params", "expected params fraction"),
        ("expected_latency", "expected latency fraction (predicted)"),
        ("achieved_latency", "achieved latency fraction (predicted)"),
        ("mean_gate", "mean gate value"),
        ("open_fraction", "fraction of gates open"),
    ):
        if trace and key in trace[0]:
            ax.plot(steps, [r[key] for r in trace], label=label)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:g}")
    ax.set_xlabel("training step")
    ax.set_ylim(0, 1.05)
    ax.set_title("gates and expected cost over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
