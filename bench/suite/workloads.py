"""Workloads of the benchmark suite: a task, a gated network and the plain networks baselines use.

A :class:`Workload` bundles everything a method needs: the data, a fresh gated model (for
gate-based baselines such as L0 with a fixed λ), gatedprune's own training recipe, and a plain
dense model of adjustable width (for the small-dense and Torch-Pruning baselines). Costs are
fractions of :meth:`Workload.dense_reference`, the all-open gated network rebuilt without
gates, so every method is measured against the same dense FLOPs.

Add a workload by subclassing :class:`Workload` and listing it in :data:`WORKLOADS`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.calibrate import recalibrate_batchnorm
from gatedprune.data import Splits
from gatedprune.demo import (
    EDGE_LR_FACTOR,
    STAGES,
    all_open_copy,
    budget_trainer,
    build_demo_model,
    train_demo_model,
)
from gatedprune.demo_resnet import (
    BLOCKS,
    WIDTHS,
    build_resnet_demo_model,
    train_resnet_demo_model,
)
from gatedprune.gates import HardConcrete

if TYPE_CHECKING:
    from gatedprune.train import Trainer

__all__ = [
    "DEFAULT_SCHEDULE",
    "LSTM_HIDDEN",
    "LSTM_SCHEDULE",
    "MLP_WIDTHS",
    "WORKLOADS",
    "LastStep",
    "MNIST1DChainMLP",
    "MNIST1DResNet",
    "MNIST1DShortcutConv",
    "MNIST1DShortcutLSTM",
    "MNIST1DShortcutMLP",
    "PlainCNN1d",
    "PlainLSTM",
    "PlainMLP",
    "Schedule",
    "Workload",
    "apply_schedule",
    "plain_cost",
    "scaled_widths",
]


def plain_cost(model: nn.Module, example: Tensor) -> gp.Cost:
    """Exact cost of a plain (gate-free) model on ``example`` (one sample: costs per sample).

    >>> import torch
    >>> plain_cost(nn.Linear(4, 2), torch.zeros(1, 4)).flops
    18
    """
    c = gp.cost(model, example)
    if not isinstance(c, gp.Cost):
        raise TypeError(f"expected a plain model without gates, got {type(model).__name__}")
    return c


def scaled_widths(widths: Sequence[int], scale: float) -> list[int]:
    """``widths`` multiplied by ``scale``, rounded, at least 1.

    >>> scaled_widths([32, 64], 0.5)
    [16, 32]
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return [max(1, round(w * scale)) for w in widths]


class PlainCNN1d(nn.Sequential):
    """A plain chain CNN (Conv1d-BN-ReLU layers, average pooling between stages, adaptive
    pooling, linear head): the demo network without shortcuts, in a form Torch-Pruning handles.

    >>> import torch
    >>> net = PlainCNN1d([[8, 8], [16]], 10)
    >>> net(torch.zeros(2, 1, 40)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]],
        out_features: int,
        *,
        in_channels: int = 1,
        kernel_size: int = 5,
        head_pool: int = 5,
    ) -> None:
        if not stages or any(not s for s in stages):
            raise ValueError(f"stages must be non-empty lists of channels, got {stages!r}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for s, widths in enumerate(stages):
            if s > 0:
                layers.append(nn.AvgPool1d(2))
            for w in widths:
                layers += [
                    nn.Conv1d(c_in, w, kernel_size, padding=kernel_size // 2),
                    nn.BatchNorm1d(w),
                    nn.ReLU(),
                ]
                c_in = w
        layers += [
            nn.AdaptiveAvgPool1d(head_pool),
            nn.Flatten(),
            nn.Linear(c_in * head_pool, out_features),
        ]
        super().__init__(*layers)

    @property
    def head(self) -> nn.Linear:
        """The classifier (never pruned by the baselines)."""
        last = self[-1]
        if not isinstance(last, nn.Linear):
            raise TypeError("PlainCNN1d ends with its linear head")
        return last


class PlainMLP(nn.Sequential):
    """A plain chain MLP (Linear-BN-ReLU layers, linear head) on flattened inputs: the
    ShortcutMLP workload's network without shortcuts, in a form Torch-Pruning handles.

    >>> import torch
    >>> PlainMLP(40, [16, 8], 10)(torch.zeros(2, 40)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_features: int, widths: Sequence[int], out_features: int) -> None:
        if not widths:
            raise ValueError("widths must list at least one hidden layer")
        layers: list[nn.Module] = []
        n_in = in_features
        for w in widths:
            layers += [nn.Linear(n_in, w), nn.BatchNorm1d(w), nn.ReLU()]
            n_in = w
        layers.append(nn.Linear(n_in, out_features))
        super().__init__(*layers)

    @property
    def head(self) -> nn.Linear:
        """The classifier (never pruned by the baselines)."""
        last = self[-1]
        if not isinstance(last, nn.Linear):
            raise TypeError("PlainMLP ends with its linear head")
        return last


Optimizer = Callable[..., torch.optim.Optimizer]
"""An optimizer class or factory: ``optimizer(param_groups, lr=..., weight_decay=...)``."""


@dataclass(frozen=True)
class Schedule:
    """A workload's training schedule, used by *every* method on it (same data, same total
    epochs with pruning and fine-tuning counted, same optimizer, learning rate and clipping).

    ``epochs=None`` takes the suite's shared ``--epochs`` (15); ``clip_grad_norm`` clips the
    norm of the network weights' gradient (not the gates' or multipliers') before each step.

    >>> Schedule().resolve_epochs(15), Schedule(epochs=30).resolve_epochs(15)
    (15, 30)
    >>> Schedule(optimizer=torch.optim.Adam, weight_decay=0.0).describe()
    'Adam lr 0.01, weight decay 0'
    """

    epochs: int | None = None
    optimizer: Optimizer = torch.optim.AdamW
    lr: float = 1e-2
    weight_decay: float = 1e-4
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")

    def resolve_epochs(self, shared: int) -> int:
        """The epochs every method gets: the schedule's own, else the suite's ``shared``."""
        return shared if self.epochs is None else self.epochs

    def describe(self) -> str:
        """A short human-readable form for the report."""
        name = getattr(self.optimizer, "__name__", type(self.optimizer).__name__)
        text = f"{name} lr {self.lr:g}, weight decay {self.weight_decay:g}"
        if self.clip_grad_norm is not None:
            text += f", gradient norm clipped at {self.clip_grad_norm:g}"
        return text

    def make_optimizer(self, groups: Iterable[Any]) -> torch.optim.Optimizer:
        """The optimizer over ``groups`` (parameters or param groups; a group's own ``lr`` and
        ``weight_decay`` win), clipping the weights' gradient first when ``clip_grad_norm``
        is set. Groups named ``"gates"`` or ``"budget"`` (gatedprune's Trainer) are not
        clipped; a ``"budget"`` group gets betas (0.9, 0.9) as in gatedprune's recipe.

        >>> net = nn.Linear(2, 1)
        >>> opt = Schedule(clip_grad_norm=1.0).make_optimizer(net.parameters())
        >>> net(torch.ones(1, 2)).sum().mul(1e6).backward()
        >>> opt.step()
        >>> float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm()) <= 1.0 + 1e-6
        True
        """
        groups = list(groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [
            {**g, "betas": (0.9, 0.9)} if g.get("name") == "budget" else dict(g) for g in groups
        ]
        opt = self.optimizer(groups, lr=self.lr, weight_decay=self.weight_decay)
        if self.clip_grad_norm is not None:
            clip = self.clip_grad_norm
            clipped = [
                p
                for g in opt.param_groups
                if g.get("name") not in ("gates", "budget")
                for p in g["params"]
            ]

            def clip_hook(*_: Any) -> None:
                nn.utils.clip_grad_norm_(clipped, clip)

            opt.register_step_pre_hook(clip_hook)
        return opt


DEFAULT_SCHEDULE = Schedule()
"""The suite's shared recipe: the suite's epochs, AdamW lr 1e-2, weight decay 1e-4, no clipping."""


def apply_schedule(trainer: Trainer, schedule: Schedule) -> Trainer:
    """Give a gatedprune :class:`~gatedprune.train.Trainer` (from ``budget_trainer``) the
    workload's optimizer, weight learning rate, weight decay and gradient clipping; its epochs
    are set where it is built. With the shared default schedule the trainer is left as the
    recipe built it (AdamW with the recipe's own settings).

    >>> from gatedprune.train import Trainer
    >>> t = apply_schedule(Trainer(nn.Linear(2, 2)), Schedule(lr=3e-3, weight_decay=0.0))
    >>> t.lr, t.weight_decay
    (0.003, 0.0)
    """
    if replace(schedule, epochs=None) == DEFAULT_SCHEDULE:
        return trainer
    trainer.lr = schedule.lr
    trainer.weight_decay = schedule.weight_decay
    trainer.optimizer = schedule.make_optimizer
    return trainer


class Workload(abc.ABC):
    """A task with a gated network (gatedprune) and a plain network (baselines)."""

    name: str
    description: str
    schedule: Schedule = DEFAULT_SCHEDULE
    """Training schedule of every method on this workload."""
    edge_lr_factor: float | None = None
    """Edge-gate learning-rate factor of gatedprune's recipe here (``budget_trainer``), so the
    fixed-λ L0 ablation differs from gatedprune only in its penalty."""

    @abc.abstractmethod
    def data(self, num_samples: int) -> Splits:
        """Train/test split (generated offline)."""

    @abc.abstractmethod
    def gated_model(self, example: Tensor) -> nn.Module:
        """A fresh gated model (all gates trainable), for gate-based methods."""

    @abc.abstractmethod
    def train_gatedprune(self, data: Splits, *, budget: float, epochs: int, seed: int) -> nn.Module:
        """gatedprune's own recipe: train under a FLOPs budget; returns the gated model."""

    @abc.abstractmethod
    def plain_model(self, scale: float) -> nn.Module:
        """A plain dense model for baselines; ``scale`` multiplies every width."""

    def prunable_head(self, model: nn.Module) -> list[nn.Module]:
        """Modules of a :meth:`plain_model` that structured pruning must leave alone."""
        return [m for m in model.modules() if isinstance(m, nn.Linear)]

    def dense_reference(self, example: Tensor) -> nn.Module:
        """The all-open gated network rebuilt without gates: the 100% FLOPs reference."""
        return gp.prune(all_open_copy(self.gated_model(example)).eval()).eval()

    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        """Training loss (cross-entropy on class indices)."""
        return nn.CrossEntropyLoss()

    def finalize_gated(self, model: nn.Module, data: Splits) -> None:
        """Re-estimate BatchNorm statistics for the eval-mode gates (as the recipes do)."""
        x = data.x_train
        recalibrate_batchnorm(model, [x[i : i + 500] for i in range(0, min(len(x), 2000), 500)])


def _mnist1d(num_samples: int) -> Splits:
    from gatedprune.data import mnist1d

    return mnist1d(num_samples=num_samples)


class MNIST1DShortcutConv(Workload):
    """(a) MNIST-1D with the demo ShortcutConv1d (dense gated shortcuts, ~5.9 MFLOPs/sample);
    baselines prune a plain chain CNN of the same stage layout, widened to the same FLOPs.

    >>> MNIST1DShortcutConv().plain_model(0.5)[0].out_channels
    16
    """

    name = "mnist1d_shortcut_conv"
    description = "MNIST-1D, ShortcutConv1d (demo network) / plain chain CNN"
    edge_lr_factor = EDGE_LR_FACTOR  # as train_demo_model

    def data(self, num_samples: int) -> Splits:
        return _mnist1d(num_samples)

    def gated_model(self, example: Tensor) -> nn.Module:
        return build_demo_model(example.shape[-1])

    def train_gatedprune(self, data: Splits, *, budget: float, epochs: int, seed: int) -> nn.Module:
        net, _ = train_demo_model(data, budget=budget, epochs=epochs, seed=seed)
        return net

    def plain_model(self, scale: float) -> nn.Module:
        return PlainCNN1d([scaled_widths(s, scale) for s in STAGES], 10)


class MNIST1DResNet(Workload):
    """(b) MNIST-1D with the demo ResNet1d, gated by ``gate_`` (channels, blocks, dense
    shortcuts); baselines prune the plain ResNet1d (residual groups: Torch-Pruning's
    dependency graph keeps them consistent), widened to the same FLOPs.

    >>> import torch
    >>> MNIST1DResNet().plain_model(0.5)(torch.zeros(1, 1, 40)).shape
    torch.Size([1, 10])
    """

    name = "mnist1d_resnet"
    description = "MNIST-1D, ResNet1d gated with gate_ / plain ResNet1d"

    def data(self, num_samples: int) -> Splits:
        return _mnist1d(num_samples)

    def gated_model(self, example: Tensor) -> nn.Module:
        net = build_resnet_demo_model()
        gp.gate_(net, example, channels=True, blocks=True, shortcuts="dense")
        return net

    def train_gatedprune(self, data: Splits, *, budget: float, epochs: int, seed: int) -> nn.Module:
        net, _, _ = train_resnet_demo_model(data, budget=budget, epochs=epochs, seed=seed)
        return net

    def plain_model(self, scale: float) -> nn.Module:
        return build_resnet_demo_model(scaled_widths(WIDTHS, scale), BLOCKS)


MLP_WIDTHS = (256, 256, 256, 256)
"""Hidden widths of the ShortcutMLP workload."""


class MNIST1DShortcutMLP(Workload):
    """(a) MNIST-1D (flattened to 40 features) with a ShortcutMLP (4 x 256 units, BatchNorm,
    dense gated shortcuts); baselines prune a plain Linear-BN-ReLU chain of the same widths,
    widened to the same FLOPs.

    >>> MNIST1DShortcutMLP().plain_model(0.5)[0].out_features
    128
    """

    name = "mnist1d_shortcut_mlp"
    description = "MNIST-1D, ShortcutMLP / plain chain MLP"

    def data(self, num_samples: int) -> Splits:
        d = _mnist1d(num_samples)
        return Splits(d.x_train.flatten(1), d.y_train, d.x_test.flatten(1), d.y_test)

    shortcuts = True
    """Dense gated shortcuts in the gated network (the chain-MLP workload turns them off)."""

    def gated_model(self, example: Tensor) -> nn.Module:
        return gp.ShortcutMLP(
            example.shape[-1],
            list(MLP_WIDTHS),
            10,
            norm=True,
            shortcuts=self.shortcuts,
            gate=HardConcrete(init_drop=0.05),
        )

    def train_gatedprune(self, data: Splits, *, budget: float, epochs: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = self.gated_model(data.x_train[:1])
        budget_trainer(net, data, flops=budget, epochs=epochs, seed=seed).fit(
            train=(data.x_train, data.y_train)
        )
        self.finalize_gated(net, data)
        return net

    def plain_model(self, scale: float) -> nn.Module:
        return PlainMLP(40, scaled_widths(MLP_WIDTHS, scale), 10)

    def prunable_head(self, model: nn.Module) -> list[nn.Module]:
        if not isinstance(model, PlainMLP):
            raise TypeError(f"expected a PlainMLP, got {type(model).__name__}")
        return [model.head]


class MNIST1DChainMLP(MNIST1DShortcutMLP):
    """(a') The ShortcutMLP workload with the dense shortcuts off (``shortcuts=False``): the
    same 4 x 256 Linear-BN-ReLU chain the baselines prune, with gatedprune's unit gates only.
    It separates the gates and the budget from the shortcuts: on MNIST-1D the dense shortcuts
    make the MLP overfit (the dense-shortcut network is below the plain chain at every budget).

    >>> import torch
    >>> net = MNIST1DChainMLP().gated_model(torch.zeros(1, 40))
    >>> net.shortcuts, MNIST1DChainMLP().plain_model(0.5)[0].out_features
    (False, 128)
    """

    name = "mnist1d_chain_mlp"
    description = "MNIST-1D, ShortcutMLP without shortcuts / plain chain MLP"
    shortcuts = False


LSTM_HIDDEN = (64, 64)
"""Units per layer of the ShortcutLSTM workload."""


LSTM_SCHEDULE = Schedule(
    epochs=40, optimizer=torch.optim.Adam, lr=1e-2, weight_decay=0.0, clip_grad_norm=1.0
)
"""The LSTM workload's schedule (every method): Adam with gradient clipping as in
``bench/lstm_quality.py``; the suite's shared 15 AdamW epochs leave every method at 20-58%.
A plain 2 x 65 LSTM at the dense FLOPs (seed 0, 4000 training samples) reaches 88.1% in 20
epochs and 96.7% in 25, but gatedprune's gates need longer under a FLOPs budget: with 25
epochs it had 83.1 / 75.7% at 25 / 10% FLOPs, with 40 epochs 96.2 / 94.0% (3 seeds; ISS
96.7 / 94.3%, small dense 93.9 / 90.9% with the same 40 epochs). Every method gets 40."""


class LastStep(nn.Module):
    """Reads a sequence model's output at the last time step: (B, T, C) -> (B, C).

    >>> import torch
    >>> LastStep(gp.ShortcutLSTM(1, 4, 1, 3))(torch.zeros(2, 5, 1)).shape
    torch.Size([2, 3])
    """

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.rnn(x)[:, -1]  # (B, C)
        return out


class PlainLSTM(nn.Module):
    """A plain stacked LSTM (batch first) with a linear head on the last step's output: the
    baselines' network for the ShortcutLSTM workload.

    >>> import torch
    >>> PlainLSTM(1, 8, 2, 10)(torch.zeros(3, 40, 1)).shape
    torch.Size([3, 10])
    """

    def __init__(self, input_size: int, hidden: int, layers: int, out_features: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)  # (B, T, H)
        y: Tensor = self.head(out[:, -1])  # (B, C)
        return y


class MNIST1DShortcutLSTM(Workload):
    """(c) MNIST-1D read as a 40-step sequence with a ShortcutLSTM (2 x 64 units, shortcuts
    from the input and every layer, gated read-out; class read at the last step); baselines
    use a plain 2-layer LSTM whose width gives the same FLOPs. Torch-Pruning does not prune
    LSTMs (its issues #44, #276, #404): its methods are run anyway and their failures recorded.

    >>> MNIST1DShortcutLSTM().plain_model(0.5).lstm.hidden_size
    32
    """

    name = "mnist1d_shortcut_lstm"
    description = "MNIST-1D as a sequence, ShortcutLSTM / plain LSTM"
    schedule = LSTM_SCHEDULE

    def data(self, num_samples: int) -> Splits:
        from gatedprune.data import mnist1d

        return mnist1d(num_samples=num_samples, as_sequence=True)

    def gated_model(self, example: Tensor) -> nn.Module:
        rnn = gp.ShortcutLSTM(
            example.shape[-1],
            list(LSTM_HIDDEN),
            len(LSTM_HIDDEN),
            10,
            gate=HardConcrete(init_drop=0.05),
        )
        return LastStep(rnn)

    def train_gatedprune(self, data: Splits, *, budget: float, epochs: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = self.gated_model(data.x_train[:1])
        trainer = budget_trainer(net, data, flops=budget, epochs=epochs, seed=seed)
        apply_schedule(trainer, self.schedule).fit(train=(data.x_train, data.y_train))
        return net

    def plain_model(self, scale: float) -> nn.Module:
        return PlainLSTM(1, max(1, round(LSTM_HIDDEN[0] * scale)), len(LSTM_HIDDEN), 10)

    def prunable_head(self, model: nn.Module) -> list[nn.Module]:
        if not isinstance(model, PlainLSTM):
            raise TypeError(f"expected a PlainLSTM, got {type(model).__name__}")
        return [model.head]


WORKLOADS: dict[str, Callable[[], Workload]] = {
    MNIST1DShortcutConv.name: MNIST1DShortcutConv,
    MNIST1DShortcutMLP.name: MNIST1DShortcutMLP,
    MNIST1DChainMLP.name: MNIST1DChainMLP,
    MNIST1DShortcutLSTM.name: MNIST1DShortcutLSTM,
    MNIST1DResNet.name: MNIST1DResNet,
}
"""Workloads by name (the ``--workloads`` choices)."""
