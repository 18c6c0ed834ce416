"""Models whose ``forward`` takes several tensors: ``gate_(model, (x, t))``. A tuple is the
model's positional inputs for ``gate_``, ``cost`` and ``Budget``; the pruned model is called
``pruned(x, t)`` and plans replay. Before 2026-12-08 ``gate_`` took one tensor only (a second
required argument was a ``TypeError``: "wrap the model")."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import budget_optimizer, examples, inserted_gating, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import apply_plan, export_plan

Inputs = tuple[Tensor, ...]


class ResBlock(nn.Module):
    """A diffusion UNet's residual block: the time embedding added after the first conv."""

    def __init__(self, c: int, mid: int, temb: int) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(c, mid, 3, padding=1)
        self.n1 = nn.BatchNorm1d(mid)
        self.emb = nn.Linear(temb, mid)
        self.c2 = nn.Conv1d(mid, c, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.n1(self.c1(x)))  # (B, mid, L)
        h = h + self.emb(emb)[:, :, None]  # (B, mid, L)
        return x + self.c2(F.silu(h))  # (B, C, L)


class UNetish(nn.Module):
    """``forward(x, t)``: a time embedding ``self.emb(t)`` read by every block."""

    def __init__(self, c: int = 8, mid: int = 12, temb: int = 16) -> None:
        super().__init__()
        self.inp = nn.Conv1d(3, c, 3, padding=1)
        self.emb = nn.Sequential(nn.Linear(4, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.blocks = nn.ModuleList([ResBlock(c, mid, temb) for _ in range(2)])
        self.mid = nn.Conv1d(c, mid, 1)
        self.t_mid = nn.Linear(temb, mid)
        self.out = nn.Conv1d(mid, 3, 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = self.emb(t)  # (B, temb)
        h = self.inp(x)  # (B, C, L)
        for block in self.blocks:
            h = block(h, e)  # (B, C, L)
        r = F.silu(self.mid(h)) + self.t_mid(e)[:, :, None]  # (B, mid, L)
        return self.out(r)  # (B, 3, L)


class EncDec(nn.Module):
    """``forward(src, tgt)``: a TransformerEncoder over ``src`` and ``tgt`` reading it
    through cross-attention."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.src_proj = nn.Linear(5, d)
        self.tgt_proj = nn.Linear(3, d)
        layer = nn.TransformerEncoderLayer(d, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.cross = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 24), nn.ReLU(), nn.Linear(24, d))
        self.head = nn.Linear(d, 2)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        memory = self.encoder(self.src_proj(src))  # (B, S, d)
        q = self.tgt_proj(tgt)  # (B, T, d)
        q = q + self.cross(q, memory, memory)[0]  # (B, T, d)
        q = q + self.ff(q)  # (B, T, d)
        return self.head(q)  # (B, T, 2)


class Masked(nn.Module):
    """``forward(x, mask=None)``: a boolean padding mask, tested with ``is not None``."""

    def __init__(self, d: int = 6, h: int = 20) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)
        self.head = nn.Linear(h, 3)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = torch.relu(self.fc1(x))  # (B, L, h)
        h = h + torch.relu(self.fc2(h))  # (B, L, h)
        if mask is not None:
            keep = mask[:, :, None].to(h.dtype)  # (B, L, 1)
            return self.head((h * keep).sum(1) / keep.sum(1))  # (B, 3)
        return self.head(h.mean(1))  # (B, 3)


class StepEmbedding(nn.Module):
    """``forward(x, step)``: integer diffusion steps looked up in an ``nn.Embedding`` and
    scaling a conv's channels (FiLM)."""

    def __init__(self, c: int = 10) -> None:
        super().__init__()
        self.inp = nn.Conv2d(2, c, 3, padding=1)
        self.steps = nn.Embedding(50, c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x: Tensor, step: Tensor) -> Tensor:
        h = F.relu(self.inp(x))  # (B, C, H, W)
        scale = self.steps(step)[:, :, None, None]  # (B, C, 1, 1)
        return self.out(h + F.relu(self.conv(h) * scale))  # (B, 2, H, W)


def step_inputs(b: int, gen: torch.Generator) -> Inputs:
    return torch.randn(b, 2, 6, 6, generator=gen), torch.randint(0, 50, (b,), generator=gen)


def unet_inputs(b: int, gen: torch.Generator) -> Inputs:
    return torch.randn(b, 3, 10, generator=gen), torch.randn(b, 4, generator=gen)


def encdec_inputs(b: int, gen: torch.Generator) -> Inputs:
    return torch.randn(b, 7, 5, generator=gen), torch.randn(b, 4, 3, generator=gen)


def masked_inputs(b: int, gen: torch.Generator) -> Inputs:
    mask = torch.rand(b, 5, generator=gen) > 0.4  # (B, L)
    mask[:, 0] = True  # every sample keeps a position
    return torch.randn(b, 5, 6, generator=gen), mask


CASES: list[tuple[type[nn.Module], Callable[[int, torch.Generator], Inputs]]] = [
    (UNetish, unet_inputs),
    (EncDec, encdec_inputs),
    (Masked, masked_inputs),
    (StepEmbedding, step_inputs),
]


def check_multi(
    kind: type[nn.Module], inputs: Callable[[int, torch.Generator], Inputs], seed: int
) -> None:
    """Gate, randomise the gates, prune: the pruned model equals the gated one on fresh
    inputs, costs what the gated hard cost says (at the gated and another batch size where
    the model scales with the batch), and the exported plan replays on a fresh instance."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = kind()
    xs = inputs(2, gen)
    gp.gate_(model, xs)
    randomise_gates(model, gen)
    model.eval()
    hard = gp.cost(model, xs, hard=True)
    pruned = gp.prune(model)
    small = gp.cost(pruned, xs)
    assert isinstance(small, gp.Cost)
    assert (small.flops, small.params) == (float(hard.flops), float(hard.params))
    fresh_xs = inputs(3, gen)
    with torch.no_grad():
        assert (pruned(*fresh_xs) - model(*fresh_xs)).abs().max().item() <= 1e-5
    if inserted_gating(model).batch_scalable:
        other = gp.cost(pruned, fresh_xs)
        assert isinstance(other, gp.Cost)
        assert other.flops == float(gp.cost(model, fresh_xs, hard=True).flops)
    replay = apply_plan(kind(), json.loads(json.dumps(export_plan(model))))
    replay.load_state_dict(pruned.state_dict())
    replay.eval()
    with torch.no_grad():
        assert (replay(*fresh_xs) - model(*fresh_xs)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("kind", "inputs"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_multi_input_gated_pruned_smaller_and_exact(
    kind: type[nn.Module], inputs: Callable[[int, torch.Generator], Inputs]
) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = kind()
    xs = inputs(2, gen)
    summary = gp.gate_(model, xs)
    assert summary.n_gates > 0
    dense = gp.cost(kind(), xs)
    assert isinstance(dense, gp.Cost)
    with torch.no_grad():  # close a third of every channel group, no block
        for g in inserted_gating(model).group_gates:
            g.log_alpha.fill_(8.0)  # type: ignore[operator]
            g.log_alpha[: max(1, g.n // 3)] = -8.0  # type: ignore[index]
    model.eval()
    pruned = gp.prune(model)
    small = gp.cost(pruned, xs)
    assert isinstance(small, gp.Cost)
    assert small.flops < dense.flops
    assert small.params < dense.params
    fresh = inputs(4, gen)
    with torch.no_grad():
        assert (pruned(*fresh) - model(*fresh)).abs().max().item() <= 1e-5
    check_multi(kind, inputs, 1)


@settings(max_examples=examples(6), deadline=None)
@given(case=st.sampled_from(range(len(CASES))), seed=st.integers(0, 2**16))
def test_multi_input_random_gate_states(case: int, seed: int) -> None:
    check_multi(*CASES[case], seed)


def test_unet_time_embedding_channels_gated_with_the_blocks() -> None:
    """``self.emb(emb)[:, :, None]`` added to a conv's output joins that conv's channel
    group (its Linear rows are pruned with the conv's filters), and the inputs are ungated."""
    model = UNetish()
    summary = gp.gate_(model, unet_inputs(2, torch.Generator().manual_seed(0)))
    text = str(summary)
    for layer in ("blocks.0.emb", "blocks.1.emb", "t_mid"):
        assert any(layer in line and "ungated" not in line for line in text.splitlines()), text


def test_optional_mask_given_as_input_is_kept() -> None:
    """``forward(x, mask=None)`` gated with ``(x, mask)``: the mask is an input of the traced
    graph (not fixed at None), so the pruned model and the replayed plan read it."""
    gen = torch.Generator().manual_seed(3)
    model = Masked()
    x, mask = masked_inputs(3, gen)
    gp.gate_(model, (x, mask))
    randomise_gates(model, gen)
    model.eval()
    pruned = gp.prune(model)
    replay = apply_plan(Masked(), json.loads(json.dumps(export_plan(model))))
    replay.load_state_dict(pruned.state_dict())
    replay.eval()
    x2, mask2 = masked_inputs(4, gen)
    mask2[:, 1:] = False  # a mask that changes the result
    with torch.no_grad():
        want = model(x2, mask2)
        assert (want - model(x2)).abs().max().item() > 1e-3
        assert (pruned(x2, mask2) - want).abs().max().item() <= 1e-5
        assert (replay(x2, mask2) - want).abs().max().item() <= 1e-5


def test_tuple_of_one_tensor_is_that_tensor() -> None:
    gen = torch.Generator().manual_seed(0)
    x, _ = masked_inputs(2, gen)
    a, b = Masked(), Masked()
    gp.gate_(a, x)
    gp.gate_(b, (x,))
    b.load_state_dict(a.state_dict())  # the same weights and gates
    assert torch.equal(gp.cost(a, x).flops, gp.cost(b, (x,)).flops)  # type: ignore[arg-type]
    assert torch.equal(gp.cost(a, (x,)).flops, gp.cost(b, x).flops)  # type: ignore[arg-type]
    assert export_plan(a.eval()) == export_plan(b.eval())


def test_cost_of_plain_multi_input_model_calls_it_positionally() -> None:
    gen = torch.Generator().manual_seed(0)
    xs = unet_inputs(2, gen)
    c = gp.cost(UNetish(), xs)
    assert isinstance(c, gp.Cost)
    assert c.flops > 0
    assert gp.cost(UNetish(), unet_inputs(4, gen)).flops == 2 * c.flops  # type: ignore[operator]


def test_budget_on_multi_input_model_trains() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = UNetish()
    xs = unet_inputs(8, gen)
    gp.gate_(model, xs)
    budget = gp.Budget(model, tuple(x[:1] for x in xs), flops=0.3)
    assert budget.dense["flops"] == gp.cost(UNetish(), tuple(x[:1] for x in xs)).flops
    start = float(budget.program.evaluate().flops.detach())
    opt = budget_optimizer(model, budget, gate_lr=0.5)
    model.train()
    for _ in range(12):
        x, t = unet_inputs(8, gen)
        loss = model(x, t).pow(2).mean() * 0.0 + budget.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(budget.program.evaluate().flops.detach()) < start


def test_cost_batch_sizes_follow_every_input() -> None:
    """Other batch sizes are derived when every input has the gated batch at dim 0; inputs
    with another dim 0 than the others (a time embedding of batch 1 broadcast over the batch)
    keep the cost at the gated shapes, and a cost asked with mixed batches is refused."""
    gen = torch.Generator().manual_seed(0)
    model = UNetish()
    x, t = unet_inputs(2, gen)
    gp.gate_(model, (x, t))
    assert inserted_gating(model).batch_scalable
    with pytest.raises(ValueError, match=r"shapes \[\(5, 3, 10\), \(4, 4\)\]"):
        gp.cost(model, (torch.zeros(5, 3, 10), torch.zeros(4, 4)))
    broadcast = UNetish()
    gp.gate_(broadcast, (x, t[:1]))
    assert not inserted_gating(broadcast).batch_scalable
    gp.cost(broadcast, (x, t[:1]))
    with pytest.raises(ValueError, match="only derived for other batch sizes"):
        gp.cost(broadcast, (torch.zeros(4, 3, 10), t[:1]))


def test_bad_inputs_are_refused_naming_them(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x, t = unet_inputs(2, gen)
    with pytest.raises(TypeError, match=r"requires 2 inputs \(x, t\).*gives 1"):
        gp.gate_(UNetish(), x)
    with pytest.raises(TypeError, match=r"at most 2 positional inputs \(x, t\).*gives 3"):
        gp.gate_(UNetish(), (x, t, t))
    with pytest.raises(TypeError, match=r"example_input\[1\] must be a torch.Tensor.*got int"):
        gp.gate_(UNetish(), (x, 3))
    with pytest.raises(TypeError, match=r"example_input\[1\] must be a torch.Tensor.*NoneType"):
        gp.gate_(Masked(), (masked_inputs(2, gen)[0], None))
    with pytest.raises(TypeError, match="empty tuple"):
        gp.gate_(UNetish(), ())
    with pytest.raises(TypeError, match="got a dict: keyword inputs are not supported"):
        gp.gate_(UNetish(), {"x": x, "t": t})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"a tuple of tensors.*got list"):
        gp.gate_(UNetish(), [x, t])  # type: ignore[arg-type]
    model = UNetish()
    gp.gate_(model, (x, t))
    with pytest.raises(TypeError, match=r"cost: UNetish.forward requires 2 inputs"):
        gp.cost(model, x)
    with pytest.raises(TypeError, match=r"requires 2 inputs"):
        gp.Budget(model, x, flops=0.5)
    with pytest.raises(ValueError, match=r"gated with inputs of shapes"):
        gp.cost(model, (x, torch.zeros(2, 5)))
    with pytest.raises(ValueError, match=r"gated with 2 inputs.*expected 2 shapes"):
        inserted_gating(model).expected_cost((2, 3, 10))
    with pytest.raises(TypeError, match=r"one input tensor.*gated with 2 inputs"):
        gp.GatedLatencyModel.calibrate(model, (x, t))
    with pytest.raises(TypeError, match=r"export_onnx.*one input tensor.*2"):
        gp.export_onnx(gp.prune(model.eval()), (x, t), tmp_path / "m.onnx")  # type: ignore[arg-type]


def test_plan_inputs_entry_is_checked() -> None:
    gen = torch.Generator().manual_seed(0)
    model = UNetish()
    gp.gate_(model, unet_inputs(2, gen))
    plan = export_plan(model.eval())
    assert plan["inputs"] == 2
    plan.pop("checksum", None)
    plan["inputs"] = 0
    with pytest.raises(ValueError, match=r"'inputs' must be the number of positional inputs"):
        apply_plan(UNetish(), plan)


class _ListInput(nn.Module):
    """A model whose ``forward`` takes one list ``[x, t]`` (a list stays one argument)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, xt: list[Tensor]) -> Tensor:
        return self.model(xt[0], xt[1])  # type: ignore[no-any-return]


def test_recalibrate_batchnorm_and_latency_take_tuples() -> None:
    """A tuple batch is the model's positional inputs: the statistics equal those of the
    same batches given to a one-argument wrapper as lists."""
    gen = torch.Generator().manual_seed(0)
    model = UNetish()
    xs = unet_inputs(6, gen)
    gp.gate_(model, xs)
    twin = UNetish()
    gp.gate_(twin, xs)
    twin.load_state_dict(model.state_dict())
    batches = [unet_inputs(6, gen) for _ in range(2)]
    assert gp.recalibrate_batchnorm(model, batches) == 2
    assert gp.recalibrate_batchnorm(_ListInput(twin), [list(b) for b in batches]) == 2
    for name in ("blocks.0.n1.running_mean", "blocks.1.n1.running_var"):
        got, want = model.state_dict()[name], twin.state_dict()[name]
        assert torch.equal(got, want)
        assert not torch.equal(got, UNetish().state_dict()[name])  # recomputed
    lat = gp.measure_latency(gp.prune(model.eval()), xs, warmup=0, repeats=2)
    assert lat.repeats == 2


def test_trainer_refuses_a_tuple_x_pointing_at_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    model = UNetish()
    xs = unet_inputs(4, gen)
    gp.gate_(model, xs)
    with pytest.raises(TypeError, match=r"x is a tuple of 2 inputs.*own loop"):
        gp.Trainer(model, epochs=1).fit((xs, torch.zeros(4, 3, 10)))


def test_fold_batchnorm_of_a_pruned_multi_input_model() -> None:
    gen = torch.Generator().manual_seed(2)
    model = UNetish()
    xs = unet_inputs(3, gen)
    gp.gate_(model, xs)
    randomise_gates(model, gen)
    with torch.no_grad():
        for name in ("blocks.0.n1", "blocks.1.n1"):
            bn = model.get_submodule(name)
            bn.running_mean.normal_(0.0, 0.5, generator=gen)  # type: ignore[operator]
            bn.running_var.uniform_(0.5, 2.0, generator=gen)  # type: ignore[operator]
    pruned = gp.prune(model.eval())
    folded = gp.fold_batchnorm(pruned)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    fresh = unet_inputs(4, gen)
    with torch.no_grad():
        assert (folded(*fresh) - model(*fresh)).abs().max().item() <= 1e-5
