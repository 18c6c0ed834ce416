"""``gatedprune demo --model lstm``: a ShortcutLSTM on MNIST-1D read as a 40-step sequence,
trained under a parameter budget, pruned to plain ``nn.LSTM`` layers, fine-tuned and reported.

The network: 2 LSTM layers of 64 units; layer 2 reads the gated concatenation of the input and
layer 1, the read-out reads every layer (gated); hidden-unit, layer and edge gates. The class
is read from the output at the last time step.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .demo import (
    DemoConfig,
    _plain_cost,
    _table,
    all_open_copy,
    budget_trainer,
    measure_demo_latency,
    prune_check_finetune,
    result_rows,
    run_facts,
    start_demo,
    write_json,
)
from .gates import HardConcrete
from .prune import prune
from .recurrent import ShortcutLSTM

__all__ = ["HIDDEN", "build_lstm_demo_model", "last_step_loss", "run_lstm_demo", "seq_accuracy"]

HIDDEN = (64, 64)
"""Units per layer of the demo ShortcutLSTM."""


def build_lstm_demo_model() -> ShortcutLSTM:
    """The demo's all-open ShortcutLSTM: 1 input feature, ``HIDDEN`` units, 10 classes.

    >>> build_lstm_demo_model()(torch.zeros(2, 40, 1)).shape
    torch.Size([2, 40, 10])
    """
    return ShortcutLSTM(1, HIDDEN, len(HIDDEN), 10, gate=HardConcrete(init_drop=0.05))


def last_step_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of the output at the last time step: ``out`` (B, T, C), ``y`` (B,).

    >>> float(last_step_loss(torch.zeros(2, 3, 4), torch.tensor([0, 1]))) > 0
    True
    """
    return F.cross_entropy(out[:, -1], y)


@torch.no_grad()
def seq_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of the last-step output in eval mode (mode restored).

    >>> seq_accuracy(build_lstm_demo_model(), torch.zeros(4, 40, 1), torch.zeros(4).long()) <= 1
    True
    """
    was = model.training
    model.eval()
    try:
        return float((model(x)[:, -1].argmax(-1) == y).float().mean())  # (N,) hits
    finally:
        model.train(was)


def run_lstm_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the LSTM demo (``config.budget`` is a *parameter* fraction here) and return the
    results written to ``config.out / 'results.json'``.

    >>> results = run_lstm_demo(DemoConfig(budget=0.25, epochs=1))  # doctest: +SKIP
    """
    config.refuse_conv_options()
    config.validate()  # a bad ``latency`` is a TypeError before it is read as a flag
    if config.latency:
        raise ValueError(
            f"latency={config.latency!r}: the LSTM demo has a parameter budget; a latency "
            "budget is the conv demo's (gatedprune.demo.run_demo)"
        )
    from . import io
    from .data import mnist1d
    from .plots import plot_connectivity, plot_training, plot_widths

    out, say, t_start = start_demo(config)

    data = mnist1d(num_samples=config.num_samples, as_sequence=True)
    x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
    say(f"MNIST-1D as sequences: {len(x_train)} train / {len(x_test)} test, 40 steps x 1 feature")
    example = x_train[:1]  # (1, 40, 1): costs are per sample

    net = build_lstm_demo_model()

    def val_metrics(model: nn.Module) -> dict[str, float]:
        return {"val_accuracy_last_step": seq_accuracy(model, x_test, y_test)}

    t0 = time.perf_counter()
    trainer = budget_trainer(
        net,
        data,
        params=config.budget,
        epochs=config.epochs,
        seed=config.seed,
        checkpoint_dir=out / "checkpoints",
        progress=config.progress,
        metrics_fn=val_metrics,
        loss_fn=last_step_loss,
        round_to=config.round_to,
    )
    trainer.fit(train=(x_train, y_train))
    train_seconds = time.perf_counter() - t0
    r = prune_check_finetune(net, data, config, accuracy_fn=seq_accuracy, loss_fn=last_step_loss)
    pruned, finetuned, (diff32, diff64) = r.pruned, r.finetuned, r.diffs
    acc_gated, acc_pruned, acc_finetuned = r.accuracies

    dense_plain = prune(all_open_copy(net)).eval()
    c_dense = _plain_cost(dense_plain, example)
    c_pruned = _plain_cost(pruned, example)
    lat = measure_demo_latency({"dense": dense_plain, "pruned": finetuned}, x_test)

    conn = net.connectivity()
    io.save(finetuned, out / "pruned.safetensors")
    plot_connectivity(conn, out / "connectivity.png")
    plot_widths(conn, out / "widths.png")
    plot_training(trainer.trace, out / "training.png", target=config.budget)

    rows = result_rows(c_dense, c_pruned, lat, (acc_gated, acc_pruned, acc_finetuned))
    params_fraction = c_pruned.params / c_dense.params
    results: dict[str, Any] = {
        "config": {
            "model": "lstm",
            "budget_params": config.budget,
            "epochs": config.epochs,
            "finetune_epochs": config.finetune_epochs,
            "seed": config.seed,
            "round_to": config.round_to,
            "num_samples": config.num_samples,
            "hidden": list(HIDDEN),
        },
        "rows": rows,
        "target_params_fraction": config.budget,
        "achieved_params_fraction": params_fraction,
        "achieved_flops_fraction": c_pruned.flops / c_dense.flops,
        "budget_error": abs(params_fraction - config.budget),
        "achieved_before_snap": trainer.achieved_before_snap,
        "params_reduction": c_dense.params / c_pruned.params,
        "kept": {k: v for k, v in conn.items() if k not in ("layers", "head")},
        "connectivity": conn,
        **run_facts(lat, r, train_s=train_seconds, t_start=t_start),
    }
    write_json(out / "results.json", results)

    k = results["kept"]
    say("")
    say(_table(rows))
    say("")
    say(
        f"budget {config.budget:.0%} of the parameters -> achieved {params_fraction:.3f} "
        f"({results['params_reduction']:.1f}x fewer); measured speed-up "
        f"{results['speedup_b1']:.2f}x at batch 1, {results['speedup_b256']:.2f}x at batch 256"
    )
    say(
        f"kept: {k['layers_kept']}/{k['layers_total']} layers, {k['units_kept']}/"
        f"{k['units_total']} units, {k['edges_kept']}/{k['edges_total']} edges"
    )
    say(
        f"pruned (plain nn.LSTM) == gated: max |diff| {diff32:.2e} (float32), {diff64:.2e} "
        f"(float64); accuracy {100 * acc_gated:.1f}% gated, {100 * acc_pruned:.1f}% pruned, "
        f"{100 * acc_finetuned:.1f}% after fine-tuning"
    )
    say(f"wrote {out}/results.json, pruned.safetensors, connectivity.png, widths.png, training.png")
    say(f"total {results['total_seconds']:.0f} s")
    return results
