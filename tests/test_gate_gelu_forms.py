"""Hand-written GELU forms in FFN blocks: Hugging Face's ``gelu_new`` / ``NewGELUActivation``
(GPT-2, GPT-J, T5 v1.1's gated-gelu ``wi_0``), ``0.5 * x * (1.0 + tanh(c * (x + 0.044715 *
x ** 3)))`` written with ``torch.pow``, ``.pow``, ``**`` or ``x * x * x``, the erf form and
quick-gelu ``x * sigmoid(1.702 * x)``. Before, their hidden units were left ungated ("pow is
an op gate_ does not prune through", or for ``x * x * x`` "adds an ungated tensor or
constant": ``1.0 + tanh(...)``). A power ``x ** p`` (literal ``p > 0``) maps 0 to 0;
``1.0 + tanh(...)`` is not zero at closed units but is a function of the same units, so its
product with them is zero there, and the pruned model computes it from the same values.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import check_pruned, examples, inserted_gating, train_under_budget
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import gate_

_C = math.sqrt(2.0 / math.pi)


class NewGELUActivation(nn.Module):
    """Hugging Face's ``NewGELUActivation`` (``ACT2FN["gelu_new"]``), as written there."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(_C * (x + 0.044715 * torch.pow(x, 3.0))))


def act(x: Tensor, form: str) -> Tensor:
    """The activation ``form`` of ``x`` (every form maps 0 to 0)."""
    if form == "torch_pow":
        return 0.5 * x * (1.0 + torch.tanh(_C * (x + 0.044715 * torch.pow(x, 3.0))))
    if form == "method_pow":
        return 0.5 * x * (1.0 + torch.tanh(_C * (x + 0.044715 * x.pow(3.0))))
    if form == "starstar":
        return 0.5 * x * (1.0 + torch.tanh(_C * (x + 0.044715 * x**3)))
    if form == "xxx":
        return 0.5 * x * (1.0 + torch.tanh(_C * (x + 0.044715 * x * x * x)))
    if form == "square":  # torch.square / .square(): since 2026-12-07 23:05 UTC
        return 0.5 * x * (1.0 + torch.tanh(_C * (x + 0.044715 * x * torch.square(x))))
    if form == "method_square":
        return 0.5 * x * (1.0 + torch.tanh(_C * (x + 0.044715 * x.square() * x)))
    if form == "erf":  # Hugging Face's GELUActivation written out
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if form == "quick":  # quick_gelu (CLIP)
        return x * torch.sigmoid(1.702 * x)
    if form == "sub":  # a number subtracted, then a scale and a square of the factor
        return x * ((torch.sigmoid(x) - 2.0) * 0.5) ** 2
    raise ValueError(f"unknown form {form!r}")


FORMS = [
    "torch_pow",
    "method_pow",
    "starstar",
    "xxx",
    "square",
    "method_square",
    "erf",
    "quick",
    "sub",
    "module",
]
KINDS = ["linear", "conv1d", "gated"]


class Conv1D(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2): ``x @ weight + bias`` with weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005 (fx cannot unpack a Proxy)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)  # (B * T, nf)
        return x.view(size_out)  # (B, T, nf)


class FFN(nn.Module):
    """A GPT-2-style MLP (``kind`` "linear": nn.Linear, "conv1d": Hugging Face's Conv1D) or
    T5 v1.1's gated-gelu FFN (``kind`` "gated": ``act(wi_0(x)) * wi_1(x)``)."""

    def __init__(self, d: int, hidden: int, form: str, kind: str) -> None:
        super().__init__()
        self.form, self.kind = form, kind
        self.act = NewGELUActivation()
        self.fc: nn.Module
        self.proj: nn.Module
        if kind == "conv1d":
            self.fc, self.proj = Conv1D(hidden, d), Conv1D(d, hidden)
        else:
            self.fc, self.proj = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.wi_1 = nn.Linear(d, hidden) if kind == "gated" else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, hidden)
        h = self.act(h) if self.form == "module" else act(h, self.form)  # (B, T, hidden)
        if self.wi_1 is not None:
            h = h * self.wi_1(x)  # (B, T, hidden)
        return self.proj(h)  # (B, T, d)


class Net(nn.Module):
    """Two residual blocks ``x + ffn(ln(x))`` between a stem and a head."""

    def __init__(self, form: str, kind: str, hidden: int = 12, d: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.lns = nn.ModuleList(nn.LayerNorm(d) for _ in range(2))
        self.ffns = nn.ModuleList(FFN(d, hidden, form, kind) for _ in range(2))
        self.head = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)  # (B, T, d)
        for ln, ffn in zip(self.lns, self.ffns, strict=True):
            h = h + ffn(ln(h))  # (B, T, d)
        return self.head(h)  # (B, T, 4)


def _hidden_gated(summary: gp.gating.GatingSummary, kind: str) -> bool:
    """Whether every block's hidden units are one gated channel group."""
    names = {n for names, _ in summary.channel_groups for n in names}
    fc = "fc.weight" if kind == "conv1d" else "fc"
    return all(f"ffns.{i}.{fc}" in names for i in range(2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_every_gelu_form_gates_the_hidden_units(form: str, kind: str) -> None:
    summary = gate_(Net(form, kind).eval(), torch.randn(2, 3, 6))
    assert _hidden_gated(summary, kind), summary
    for names, _, why in summary.ungated_groups:  # only the residual stream and the output
        assert not any(".fc" in n or "wi_1" in n for n in names), (names, why)
    assert len(summary.blocks) == 2  # one per residual add


def _set_gates(model: nn.Module, gen: torch.Generator) -> None:
    """Each group gate: a random set of closed entries (at least one, not all), the others
    open at random, mostly fractional, eval values; block gates open or closed at random."""
    gating = inserted_gating(model)
    with torch.no_grad():
        for gate in gating.group_gates:
            assert isinstance(gate, HardConcreteGate)
            closed = torch.rand(gate.n, generator=gen) < 0.4
            closed[0], closed[-1] = True, False
            la = torch.empty(gate.n).uniform_(-1.5, 2.0, generator=gen)
            gate.log_alpha.copy_(torch.where(closed, torch.full_like(la, -8.0), la))
        for gate in gating.block_gates:
            assert isinstance(gate, HardConcreteGate)
            shut = bool(torch.rand((), generator=gen) < 0.3)
            gate.log_alpha.fill_(-8.0 if shut else float(torch.empty(()).uniform_(-1.0, 3.0)))


@settings(max_examples=examples(25), deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    form=st.sampled_from(FORMS),
    kind=st.sampled_from(KINDS),
    hidden=st.integers(3, 20),
)
def test_gelu_forms_prune_exactly(seed: int, form: str, kind: str, hidden: int) -> None:
    """Budget training, then random closed sets and fractional open gates: the pruned model
    equals the gated one on fresh inputs, costs the hard expected cost (less than dense), and
    the exported plan replays."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 6, generator=gen)
    model = Net(form, kind, hidden)
    dense = gp.cost(model, x)
    summary = gate_(model, x)
    assert _hidden_gated(summary, kind), summary
    budget = gp.Budget(model, x, flops=0.5)
    train_under_budget(
        model,
        budget,
        3,
        lambda: (torch.randn(2, 3, 6, generator=gen), torch.randn(2, 3, 4, generator=gen)),
        loss=F.mse_loss,
    )
    _set_gates(model, gen)
    pruned = check_pruned(model, x, gen, lambda: Net(form, kind, hidden), batches=(2, 5))
    c = gp.cost(pruned, x)
    assert c.flops < dense.flops
    assert c.params < dense.params


def test_closed_units_are_removed_and_open_ones_kept() -> None:
    """Half the hidden units closed in each block: the pruned Linear layers keep the others."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, generator=gen)
    model = Net("torch_pow", "linear").eval()
    gate_(model, x)
    gating = inserted_gating(model)
    keep = torch.arange(12) % 2 == 0
    for gate in gating.group_gates:
        if gate.n == 12:
            gate.force_(keep)
    pruned = check_pruned(model, x, gen, lambda: Net("torch_pow", "linear"))
    for i in range(2):
        fc = pruned.get_submodule(f"ffns.{i}.fc")
        assert isinstance(fc, nn.Linear)
        assert fc.out_features == 6


class Pow(nn.Module):
    """An FFN whose activation is a power the channels cannot be pruned through."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc, self.proj = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("t", torch.full((8,), 2.0))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, 8)
        if self.how == "zero":
            h = h**0
        elif self.how == "negative":
            h = h**-1
        elif self.how == "tensor":
            h = torch.pow(h, self.t)
        elif self.how == "base":
            h = 2.0**h
        elif self.how == "offset":  # 1.0 + h read by a Linear, not by a product with h
            h = 1.0 + torch.tanh(h)
        elif self.how == "sum":  # the factor added to the channels, not multiplied
            h = h + (1.0 + torch.tanh(h))
        return self.proj(h)  # (B, 3)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("zero", "raises to the power 0, which maps 0 to 1 (not 0)"),
        ("negative", "raises to the power -1, which maps 0 to inf (not 0)"),
        ("tensor", "raises to the power of tensor node 't', which maps 0 to 1 or inf"),
        ("base", "raises to the power of labelled channels (0 maps to 1)"),
        ("offset", "adds a constant to the channels (not zero at closed ones) and node 'proj'"),
        ("sum", "node 'add_1' (call_function add) adds an ungated tensor or constant"),
    ],
)
def test_powers_and_factors_not_zero_at_closed_units_keep_them_whole(how: str, reason: str) -> None:
    model = Pow(how).eval()
    summary = gate_(model, torch.randn(2, 6))
    fc = [why for names, _, why in summary.ungated_groups if names == ["fc"]]
    assert len(fc) == 1, summary
    assert reason in fc[0]
    assert not summary.channel_groups


class RMSNormFFN(nn.Module):
    """A hand-written RMSNorm over the hidden units of an FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.proj = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, 8)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)  # (B, 8)
        return self.proj(h)  # (B, 3)


def test_rms_norm_over_the_units_says_it_normalises_them() -> None:
    summary = gate_(RMSNormFFN().eval(), torch.randn(2, 6))
    fc = [why for names, _, why in summary.ungated_groups if names == ["fc"]]
    assert len(fc) == 1, summary
    assert "normalises over these channels" in fc[0]
    assert "pow" not in fc[0].split(":")[0]
