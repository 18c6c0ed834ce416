"""``gatedprune demo --model resnet1d``: gate and prune an ordinary 1D ResNet on MNIST-1D.

Generates MNIST-1D offline, builds a plain :class:`~gatedprune.gating.ResNet1d` (a user model
without anything of gatedprune in it), inserts channel, residual-block and dense-shortcut gates
with :func:`~gatedprune.gating.gate_`, trains it under a FLOPs budget, prunes it, checks that
the pruned model computes the same function, fine-tunes it briefly, measures latency and writes
``results.json``, the pruning plan (``plan.json``), the pruned weights (``pruned.safetensors``,
reloadable with :func:`load_pruned_resnet`) and PNG plots.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .calibrate import recalibrate_batchnorm
from .demo import (
    DemoConfig,
    _plain_cost,
    _table,
    accuracy,
    all_open_copy,
    budget_trainer,
    measure_demo_latency,
    measured_latency_fraction,
    prune_check_finetune,
    result_rows,
    run_facts,
    run_latency_model,
    start_demo,
    write_json,
)
from .gating import (
    GatedLatencyModel,
    GatingSummary,
    InsertedGating,
    ResNet1d,
    apply_plan,
    export_plan,
    gate_,
)
from .prune import prune
from .strict_json import loads_strict

if TYPE_CHECKING:
    from .data import Splits
    from .train import Trainer

__all__ = [
    "BLOCKS",
    "WIDTHS",
    "block_report",
    "build_resnet_demo_model",
    "channel_report",
    "load_pruned_resnet",
    "plot_blocks_and_shortcuts",
    "plot_group_widths",
    "run_resnet_demo",
    "save_pruned_resnet",
    "shortcut_report",
    "train_resnet_demo_model",
]

# The all-open network: a stem, 3 stages of 3 basic blocks (32, 64, 64 channels; the later
# stages halve the length), average pool and a linear head; ~5.9 MFLOPs per MNIST-1D sample.
WIDTHS = (32, 64, 64)
BLOCKS = (3, 3, 3)
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "pruned.safetensors"
WEIGHTS_FORMAT = "gatedprune.demo_resnet1d"


def build_resnet_demo_model(
    widths: Sequence[int] = WIDTHS, blocks: Sequence[int] = BLOCKS
) -> ResNet1d:
    """The demo's dense (ungated) network.

    >>> build_resnet_demo_model()(torch.zeros(2, 1, 40)).shape
    torch.Size([2, 10])
    """
    return ResNet1d(1, 10, widths=tuple(widths), blocks=tuple(blocks))


def _gating(model: nn.Module) -> InsertedGating:
    gating = getattr(model, "gatedprune", None)
    if not isinstance(gating, InsertedGating):
        raise ValueError(f"{type(model).__name__} was not gated with gatedprune.gate_")
    return gating


def train_resnet_demo_model(
    data: Splits,
    *,
    budget: float | None,
    epochs: int,
    seed: int,
    widths: Sequence[int] = WIDTHS,
    blocks: Sequence[int] = BLOCKS,
    checkpoint_dir: Path | None = None,
    progress: bool = False,
    round_to: int | None = None,
    latency: float | None = None,
    latency_samples: int = 32,
) -> tuple[ResNet1d, GatingSummary, Trainer]:
    """Gate the demo ResNet (channels, blocks, dense shortcuts) and train it under a FLOPs
    budget (``budget``: a fraction of the gated all-open FLOPs) and/or a latency budget
    (``latency``: a fraction of the plain ResNet's latency at batch 1 as a
    :class:`~gatedprune.GatedLatencyModel` calibrated here on ``latency_samples`` pruned copies
    predicts it; ``trainer.budget.latency_model``) with the demos' recipe
    (:func:`gatedprune.demo.budget_trainer`), then BatchNorm statistics re-estimated for the
    eval gates.
    After each epoch the test accuracy is recorded as ``val_accuracy_calibrated`` (eval mode,
    BatchNorm statistics first re-estimated for the eval gates on one batch: the running
    statistics of training mix sampled gate values).

    >>> from gatedprune.data import mnist1d
    >>> data = mnist1d()  # doctest: +SKIP
    >>> net, summary, trainer = train_resnet_demo_model(  # doctest: +SKIP
    ...     data, budget=0.1, epochs=30, seed=0)
    """

    torch.manual_seed(seed)
    x_train, y_train = data.x_train, data.y_train  # (N, 1, 40), (N,)
    net = build_resnet_demo_model(widths, blocks)
    summary = gate_(net, x_train[:1], channels=True, blocks=True, shortcuts="dense")
    calib = [x_train[i : i + 500] for i in range(0, min(len(x_train), 2000), 500)]
    lm: GatedLatencyModel | None = None
    if latency is not None:
        lm = run_latency_model(
            checkpoint_dir,
            lambda: GatedLatencyModel.calibrate(
                net, x_train[:1], batch_size=1, samples=latency_samples
            ),
        )
        latency = latency * _own_latency_fraction(net, lm)

    def val_metrics(model: nn.Module) -> dict[str, float]:
        # one calibration batch per epoch keeps this cheap; the final one uses all of them
        recalibrate_batchnorm(model, calib[:1])
        return {"val_accuracy_calibrated": accuracy(model, data.x_test, data.y_test)}

    trainer = budget_trainer(
        net,
        data,
        flops=budget,
        epochs=epochs,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        metrics_fn=val_metrics,
        round_to=round_to,
        latency=latency,
        latency_model=lm,
    )
    trainer.fit(train=(x_train, y_train))
    recalibrate_batchnorm(net, calib)
    return net, summary, trainer


def _own_flops_fraction(
    example: Tensor, widths: Sequence[int] = WIDTHS, blocks: Sequence[int] = BLOCKS
) -> float:
    """FLOPs of the plain ResNet over those of the gated one with every gate open, its new
    dense shortcuts included: the reference of the Budget (and of ``budget`` in
    :func:`train_resnet_demo_model`) is the latter, the demo reports fractions of the former,
    so the demo trains with ``budget * _own_flops_fraction(...)``.

    >>> 0.99 < _own_flops_fraction(torch.zeros(1, 1, 40)) < 1.0
    True
    """
    net = build_resnet_demo_model(widths, blocks)
    own = _plain_cost(net, example).flops
    gate_(net, example, channels=True, blocks=True, shortcuts="dense")
    return own / _plain_cost(prune(all_open_copy(net).eval()).eval(), example).flops


def _own_latency_fraction(net: nn.Module, lm: GatedLatencyModel) -> float:
    """Predicted latency of the plain ResNet (every gate open but the new shortcuts) over that
    of the gated model with every gate open (the latency Budget's reference); ``net``'s gates
    are restored."""
    gating = _gating(net)
    saved = {k: v.clone() for k, v in gating.state_dict().items()}
    try:
        for g in gating.gates():
            g.force_(torch.ones(g.n, dtype=torch.bool))
        with torch.no_grad():
            every = float(lm.expected(net, hard=True))
            if gating.edge_gate is not None:
                gating.edge_gate.force_(torch.zeros(gating.edge_gate.n, dtype=torch.bool))
            own = float(lm.expected(net, hard=True))
    finally:
        gating.load_state_dict(saved)
    return own / every


# ---------------------------------------------------------------------- what survived
def _gate_value(values: Tensor, i: int) -> float:
    return float(values[i].detach())


@torch.no_grad()
def block_report(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per gated residual block of a model gated by ``gate_``: its module name,
    dense FLOPs per sample, eval gate value and whether it is kept.

    >>> net = build_resnet_demo_model((4,), (2,))
    >>> _ = gate_(net, torch.zeros(1, 1, 40))
    >>> [b["kept"] for b in block_report(net)]
    [True, True]
    """
    gating = _gating(model)
    out = []
    for (owner, _site, flops), gate in zip(gating.summary.blocks, gating.block_gates, strict=True):
        value = _gate_value(gate.eval_value(), 0)  # type: ignore[operator]
        out.append({"block": owner, "flops": int(flops), "gate": value, "kept": value > 0.0})
    return out


@torch.no_grad()
def shortcut_report(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per dense shortcut candidate of a model gated by ``gate_(...,
    shortcuts="dense")``: source and destination block, eval gate value, survived or not.

    >>> net = build_resnet_demo_model((4,), (3,))
    >>> _ = gate_(net, torch.zeros(1, 1, 40), shortcuts="dense")
    >>> [(s["from"], s["to"], s["kept"]) for s in shortcut_report(net)]
    [('stages.0.0', 'stages.0.2', False)]
    """
    gating = _gating(model)
    if gating.edge_gate is None:
        return []
    values = gating.edge_gate.eval_value()  # (n_edges,)
    return [
        {
            "from": e.src,
            "to": e.dst,
            "gate": _gate_value(values, k),
            "kept": _gate_value(values, k) > 0.0,
        }
        for k, e in enumerate(gating.edges)
    ]


def _out_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return module.out_channels
    raise TypeError(f"a channel group's producer must be Linear or Conv, got {type(module)}")


@torch.no_grad()
def channel_report(model: nn.Module, pruned: nn.Module) -> list[dict[str, Any]]:
    """One entry per gated channel group: its producer modules, its width before pruning, the
    number of gates left open and its width in ``pruned`` (0 when every producer was removed
    with its residual block).

    >>> net = build_resnet_demo_model((4,), (1,))
    >>> _ = gate_(net, torch.zeros(1, 1, 40))
    >>> [(g["before"], g["after"]) for g in channel_report(net, prune(net.eval()))]
    [(4, 4), (4, 4)]
    """
    gating = _gating(model)
    present = dict(pruned.named_modules())
    out = []
    opens = gating.hard_open()  # one (n,) 0/1 vector per group
    for (producers, size), is_open in zip(gating.summary.channel_groups, opens, strict=False):
        alive = [present[p] for p in producers if p in present]
        out.append(
            {
                "producers": list(producers),
                "before": int(size),
                "gates_open": int(is_open.sum()),
                "after": _out_width(alive[0]) if alive else 0,
            }
        )
    return out


def _group_label(producers: Sequence[str]) -> str:
    """Short plot label of a channel group of the demo ResNet."""
    names = [p.removeprefix("stages.") for p in producers]
    if len(names) == 1:
        return names[0]
    last = names[-1].split(".")
    return f"trunk {last[0]}" if last[0].isdigit() else f"{names[0]} +{len(names) - 1}"


# ---------------------------------------------------------------------- plots
def plot_blocks_and_shortcuts(
    blocks: Sequence[Mapping[str, Any]],
    shortcuts: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
) -> None:
    """Diagram of the residual blocks in order (kept: blue; removed: grey, hatched), grouped by
    stage, with the candidate dense shortcuts as arcs above them (survivors solid orange and
    labelled with their gate value, closed ones dotted grey).

    ``blocks`` and ``shortcuts`` are :func:`block_report` and :func:`shortcut_report`.
    """
    from matplotlib.patches import FancyArrowPatch, Rectangle

    from .plots import new_figure, save_figure

    names = [str(b["block"]) for b in blocks]
    pos = {name: i for i, name in enumerate(names)}
    n = len(names)
    spans = [pos[str(s["to"])] - pos[str(s["from"])] for s in shortcuts if s["to"] in pos]
    top = 0.5 + 0.22 * max(spans, default=1)
    fig = new_figure((max(6.0, 1.0 * n + 1.5), 1.6 + 1.4 * top))
    ax = fig.subplots()
    for i, b in enumerate(blocks):
        kept = bool(b["kept"])
        ax.add_patch(
            Rectangle(
                (i - 0.38, -0.3),
                0.76,
                0.6,
                facecolor="#9ecae1" if kept else "0.9",
                edgecolor="k" if kept else "0.6",
                hatch=None if kept else "//",
                lw=1.0,
            )
        )
        ax.text(i, 0.0, names[i].rpartition(".")[2], ha="center", va="center", fontsize=9)
        ax.text(
            i,
            -0.38,
            f"{int(b['flops']) / 1e3:.0f}k FLOPs" if kept else "removed",
            ha="center",
            va="top",
            fontsize=7,
            color="k" if kept else "tab:red",
        )
        if i + 1 < n:
            ax.annotate(
                "",
                xy=(i + 0.62, 0.0),
                xytext=(i + 0.38, 0.0),
                arrowprops={"arrowstyle": "->", "color": "0.3", "lw": 0.8},
            )
    stages: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        stages.setdefault(name.rpartition(".")[0], []).append(i)
    for stage, idx in stages.items():
        ax.plot([idx[0] - 0.4, idx[-1] + 0.4], [-0.62, -0.62], color="0.4", lw=0.8)
        ax.text((idx[0] + idx[-1]) / 2, -0.68, stage or "blocks", ha="center", va="top", fontsize=8)
    for s in shortcuts:
        a, b2 = pos.get(str(s["from"])), pos.get(str(s["to"]))
        if a is None or b2 is None:
            continue
        kept = bool(s["kept"])
        # block a's output is added to block b2's input
        ax.add_patch(
            FancyArrowPatch(
                (a + 0.15, 0.3),
                (b2 - 0.15, 0.3),
                connectionstyle="arc3,rad=-0.45",
                arrowstyle="-|>",
                mutation_scale=10,
                color="tab:orange" if kept else "0.65",
                lw=2.0 if kept else 0.8,
                ls="-" if kept else ":",
                zorder=3 if kept else 2,
            )
        )
        if kept:
            ax.text(
                (a + b2) / 2,
                0.3 + 0.22 * (b2 - a - 0.3),
                f"{float(s['gate']):.2f}",
                ha="center",
                va="bottom",
                fontsize=7,
                color="tab:orange",
            )
    n_sc = sum(bool(s["kept"]) for s in shortcuts)
    n_bl = sum(bool(b["kept"]) for b in blocks)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(-0.95, top + 0.1)
    ax.set_axis_off()
    ax.set_title(
        f"residual blocks kept: {n_bl}/{n} (dense FLOPs per sample below); new dense "
        f"shortcuts kept: {n_sc}/{len(shortcuts)} (orange, with gate value; dotted: closed)",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)


def plot_group_widths(groups: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Channels per gated channel group before and after pruning."""
    from .plots import new_figure, save_figure

    labels = [_group_label(g["producers"]) for g in groups]
    before = [int(g["before"]) for g in groups]
    after = [int(g["after"]) for g in groups]
    xs = list(range(len(groups)))
    fig = new_figure((max(4.0, 0.65 * len(groups) + 1.5), 3.6))
    ax = fig.subplots()
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="all-open", color="0.75")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="pruned", color="tab:blue")
    ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("channels")
    ax.set_title(
        f"channels per group: {sum(after)}/{sum(before)} kept (0: removed with its block)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------- saving
def _plan_digest(plan: Any) -> str:
    """SHA-256 of a plan as read back from JSON (key order and whitespace do not matter)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _check_reloadable(
    pruned: nn.Module, plan: Mapping[str, Any], widths: Sequence[int], blocks: Sequence[int]
) -> None:
    """``ValueError`` unless ``apply_plan(ResNet1d(widths, blocks), plan)`` has exactly the
    parameter and buffer names and shapes of ``pruned`` (what :func:`load_pruned_resnet`
    rebuilds before loading the weights)."""
    try:
        rebuilt = apply_plan(build_resnet_demo_model(widths, blocks), dict(plan))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"the plan does not apply to a ResNet1d with widths={tuple(widths)}, "
            f"blocks={tuple(blocks)}: pass the widths and blocks of the model you pruned ({e})"
        ) from e
    want = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:3]
        raise ValueError(
            f"load_pruned_resnet could not reload this model: the plan applied to a ResNet1d "
            f"with widths={tuple(widths)}, blocks={tuple(blocks)} has other weights than "
            f"`pruned` (e.g. {diff}); pass the widths and blocks of the model you pruned"
        )


def save_pruned_resnet(
    pruned: nn.Module,
    plan: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    widths: Sequence[int] = WIDTHS,
    blocks: Sequence[int] = BLOCKS,
) -> None:
    """Write ``plan.json`` (the pruning plan) and ``pruned.safetensors`` (the pruned
    ``state_dict`` and the dense architecture) into the folder ``out``; no pickle.

    >>> save_pruned_resnet(pruned, export_plan(net), "out")  # doctest: +SKIP
    """
    from .io import atomic_write, write_tensors

    _check_reloadable(pruned, plan, widths, blocks)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(plan, indent=1)
    atomic_write(folder / PLAN_FILE, text.encode())
    meta = {
        "format": WEIGHTS_FORMAT,
        "widths": list(widths),
        "blocks": list(blocks),
        "plan_sha256": _plan_digest(json.loads(text)),  # ties the two files together
    }
    write_tensors(folder / WEIGHTS_FILE, pruned.state_dict(), meta)


def load_pruned_resnet(folder: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the pruned demo ResNet written by the demo into ``folder``: a fresh dense
    :class:`~gatedprune.gating.ResNet1d`, :func:`~gatedprune.gating.apply_plan` with
    ``plan.json``, then ``load_state_dict`` of ``pruned.safetensors``. Returned in eval mode.

    >>> model = load_pruned_resnet("gatedprune-demo-resnet1d")  # doctest: +SKIP
    """
    from .io import read_tensors

    p = Path(folder)
    tensors, meta = read_tensors(p / WEIGHTS_FILE)
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(
            f"{p / WEIGHTS_FILE} holds {meta.get('format')!r}, expected {WEIGHTS_FORMAT!r}"
        )
    arch: dict[str, list[int]] = {}
    for k in ("widths", "blocks"):
        v = meta.get(k)
        if isinstance(v, list) and v and all(type(n) is int and n > 0 for n in v):
            arch[k] = v
        else:
            raise ValueError(
                f"{p / WEIGHTS_FILE}: metadata {k!r} must be a list of ints, got {v!r}"
            )
    try:
        plan = loads_strict((p / PLAN_FILE).read_text())
    except ValueError as e:  # malformed JSON, duplicated keys
        raise ValueError(f"{p / PLAN_FILE}: not a readable plan ({e})") from e
    digest = meta.get("plan_sha256")
    if digest is not None and digest != _plan_digest(plan):
        raise ValueError(
            f"{p / PLAN_FILE} is not the plan {p / WEIGHTS_FILE} was saved with (files of "
            "different runs?): save both again with save_pruned_resnet"
        )
    model = apply_plan(build_resnet_demo_model(arch["widths"], arch["blocks"]), plan)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(
            f"{p / WEIGHTS_FILE} does not fit the model {p / PLAN_FILE} describes: {e}"
        ) from e
    return model.eval()


# ---------------------------------------------------------------------- the demo
def _all_open_plain(model: nn.Module) -> nn.Module:
    """The dense architecture with the trained weights: every channel and block gate open,
    every new shortcut closed, pruned (which removes the gates)."""
    dense = copy.deepcopy(model)
    gating = _gating(dense)
    for g in [*gating.group_gates, *gating.block_gates]:
        g.force_(torch.ones(g.n, dtype=torch.bool))
    if gating.edge_gate is not None:
        gating.edge_gate.force_(torch.zeros(gating.edge_gate.n, dtype=torch.bool))
    return prune(dense.eval()).eval()


def run_resnet_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the ResNet demo and return the results written to ``config.out / 'results.json'``.

    >>> results = run_resnet_demo(DemoConfig(epochs=1, finetune_epochs=0))  # doctest: +SKIP
    """
    config.refuse_conv_options()
    config.validate()
    from .data import mnist1d
    from .plots import plot_training

    out, say, t_start = start_demo(config)

    data = mnist1d(num_samples=config.num_samples)
    x_train, x_test = data.x_train, data.x_test
    say(f"MNIST-1D generated offline: {len(x_train)} train / {len(x_test)} test, length 40")
    example = x_train[:1]  # (1, 1, 40): costs are per sample

    t0 = time.perf_counter()
    latency = config.budget if config.latency else None
    net, summary, trainer = train_resnet_demo_model(
        data,
        # a fraction of the plain ResNet's FLOPs, or of its predicted latency at batch 1
        budget=None if config.latency else config.budget * _own_flops_fraction(example),
        latency=latency,
        epochs=config.epochs,
        seed=config.seed,
        round_to=config.round_to,
        checkpoint_dir=out / "checkpoints",
        progress=config.progress,
    )
    train_seconds = time.perf_counter() - t0
    r = prune_check_finetune(net, data, config)
    pruned, finetuned, (diff32, diff64), scale = r.pruned, r.finetuned, r.diffs, r.scale
    acc_gated, acc_pruned, acc_finetuned = r.accuracies

    dense_plain = _all_open_plain(net)
    c_dense = _plain_cost(dense_plain, example)
    c_pruned = _plain_cost(pruned, example)
    lat = measure_demo_latency({"dense": dense_plain, "pruned": finetuned}, x_test)

    blocks = block_report(net)
    shortcuts = shortcut_report(net)
    groups = channel_report(net, pruned)
    plan = export_plan(net)
    save_pruned_resnet(finetuned, plan, out)
    plot_blocks_and_shortcuts(blocks, shortcuts, out / "blocks_shortcuts.png")
    plot_group_widths(groups, out / "widths.png")
    plot_training(trainer.trace, out / "training.png", target=config.budget)

    rows = result_rows(c_dense, c_pruned, lat, (acc_gated, acc_pruned, acc_finetuned))
    kept_blocks = [b["block"] for b in blocks if b["kept"]]
    latency_facts: dict[str, Any] = {}
    lm = trainer.budget.latency_model if trainer.budget is not None else None
    if isinstance(lm, GatedLatencyModel):
        with torch.no_grad():
            own = _own_latency_fraction(net, lm)
            every = float(lm.expected(all_open_copy(net), hard=True))
            predicted = float(lm.expected(net, hard=True)) / (every * own)
        latency_facts = {
            "target_latency_fraction": config.budget,
            "predicted_latency_fraction": predicted,
            # on the model's batch size (1) and threads, as the prediction
            "measured_latency_fraction_b1": measured_latency_fraction(
                dense_plain, finetuned, x_test, batch=lm.batch_size, threads=lm.threads
            ),
            "measured_latency_threads": lm.threads,
            "measured_latency_fraction_b1_all_threads": lat["pruned"][1] / lat["dense"][1],
            "latency_model": json.loads(lm.to_json()),
        }
    results: dict[str, Any] = {
        "config": {
            "model": "resnet1d",
            "budget": config.budget,
            "budget_kind": "latency" if config.latency else "flops",
            "epochs": config.epochs,
            "finetune_epochs": config.finetune_epochs,
            "seed": config.seed,
            "round_to": config.round_to,
            "num_samples": config.num_samples,
            "widths": list(WIDTHS),
            "blocks": list(BLOCKS),
        },
        "rows": rows,
        **({} if config.latency else {"target_flops_fraction": config.budget}),
        "achieved_flops_fraction": c_pruned.flops / c_dense.flops,
        "achieved_params_fraction": c_pruned.params / c_dense.params,
        "budget_error": abs(
            (latency_facts["predicted_latency_fraction"] if config.latency else c_pruned.flops)
            / (1.0 if config.latency else c_dense.flops)
            - config.budget
        ),
        **latency_facts,
        "achieved_before_snap": trainer.achieved_before_snap,
        "flops_reduction": c_dense.flops / c_pruned.flops,
        "blocks": blocks,
        "blocks_kept": kept_blocks,
        "blocks_removed": [b["block"] for b in blocks if not b["kept"]],
        "shortcuts": shortcuts,
        "shortcuts_kept": [[s["from"], s["to"]] for s in shortcuts if s["kept"]],
        "channel_groups": groups,
        "channels_before": sum(g["before"] for g in groups),
        "channels_after": sum(g["after"] for g in groups),
        "gating_summary": str(summary),
        "files": {
            "plan": PLAN_FILE,
            "weights": WEIGHTS_FILE,
            "plots": ["blocks_shortcuts.png", "widths.png", "training.png"],
        },
        **run_facts(lat, r, train_s=train_seconds, t_start=t_start),
    }
    write_json(out / "results.json", results)

    say("")
    say(_table(rows))
    say("")
    if config.latency:
        say(
            f"budget {config.budget:.0%} of the predicted latency at batch 1 -> predicted "
            f"{results['predicted_latency_fraction']:.3f}, measured "
            f"{results['measured_latency_fraction_b1']:.3f} on "
            f"{results['measured_latency_threads']} thread(s) as in the model "
            f"({results['measured_latency_fraction_b1_all_threads']:.3f} on "
            f"{torch.get_num_threads()}; latency model fitted on "
            f"{lm.samples if lm else 0} pruned copies, held-out error median "
            f"{100 * (lm.median_error if lm else 0.0):.1f}%)"
        )
    say(
        f"{'' if config.latency else f'budget {config.budget:.0%} of FLOPs -> '}achieved "
        f"{results['achieved_flops_fraction']:.3f} of the FLOPs"
        f" ({results['flops_reduction']:.1f}x fewer FLOPs); measured speed-up "
        f"{results['speedup_b1']:.2f}x at batch 1, {results['speedup_b256']:.2f}x at batch 256"
    )
    say(
        f"kept: {len(kept_blocks)}/{len(blocks)} residual blocks "
        f"({', '.join(kept_blocks) or 'none'}), {len(results['shortcuts_kept'])}/"
        f"{len(shortcuts)} new shortcuts "
        f"({', '.join(f'{a} -> {b}' for a, b in results['shortcuts_kept']) or 'none'}), "
        f"{results['channels_after']}/{results['channels_before']} channels"
    )
    say(
        f"pruned == gated: max |diff| {diff32:.2e} (float32; logits up to {scale:.0f}, relative "
        f"{diff32 / scale:.1e}; {r.random_diff:.1e} on fresh random inputs), {diff64:.2e} "
        "(float64); "
        f"accuracy {100 * acc_gated:.1f}% gated, {100 * acc_pruned:.1f}% pruned, "
        f"{100 * acc_finetuned:.1f}% after fine-tuning"
    )
    say(
        f"wrote {out}/results.json, {PLAN_FILE}, {WEIGHTS_FILE}, blocks_shortcuts.png, "
        "widths.png, training.png"
    )
    say(f"total {results['total_seconds']:.0f} s")
    return results
