"""Hooks of the user's own (forward hooks, pre-hooks, with kwargs or always_call) on the
modules of a model that ``gate_`` gates and ``prune`` prunes. Found by an interop audit
(2026-12-07): a hook changing a gated layer's output made pruned != gated by 0.02-0.03 and
an observer saw 32 channels in the gated model and 24 in the pruned one; ``prune`` dropped
the hooks of a submodule it inlined into a rewritten ``forward``; torch.fx ran the hooks of
modules it traced through on Proxies (a hook reading ``out.shape`` made every block opaque);
a no-op pre-hook ungated a layer as "computes its weight" and its output group vanished from
the summary.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import examples, inserted_gating, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune
from gatedprune.gates import HardConcreteGate
from gatedprune.gating import apply_plan, export_plan, gate_


def _summary_lines(model: nn.Module) -> list[str]:
    return str(inserted_gating(model).summary).splitlines()


def _close_some(model: nn.Module) -> None:
    """Every channel group: its first third closed, the rest open at values in (0, 1]."""
    with torch.no_grad():
        for g in inserted_gating(model).group_gates:
            assert isinstance(g, HardConcreteGate)
            la = g.log_alpha
            la.copy_(torch.linspace(-1.0, 3.0, la.numel()))
            la[: la.numel() // 3] = -10.0


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def test_a_clipping_hook_keeps_the_channels_it_sees_and_pruned_equals_gated() -> None:
    # before: gate * hook(out) in the gated model, hook(gate * out)[kept] in the pruned one:
    # pruned != gated by 0.03, and the observer saw 32 channels, then 24
    net = _mlp()
    seen: list[Tensor] = []
    net[2].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    net[2].register_forward_hook(lambda m, i, o: o.clamp(-0.2, 0.2) + 0.05)
    x = torch.randn(16, 8)
    summary = gate_(net, x)
    lines = _summary_lines(net)
    assert "  channels     16  4" in lines  # the last hidden layer is still gated
    why = "2 (Linear) carries a forward hook <lambda> (test_gate_user_hooks.py:"
    for group in ("16  0", "32  2"):  # its input and its output channels
        assert any(ln.startswith(f"  ungated      {group}: {why}") for ln in lines), lines
    assert summary.n_gates == 16
    _close_some(net)
    net.eval()
    with torch.no_grad():
        seen.clear()
        gated = net(x)
        seen_gated = list(seen)
        pruned = gatedprune.prune(net).eval()
        seen.clear()
        out = pruned(x)
    assert pruned[4].out_features < 16  # the gated group was pruned
    assert (out - gated).abs().max().item() <= 1e-5
    assert len(seen) == len(seen_gated) == 1
    assert seen[0].shape == seen_gated[0].shape == (16, 32)
    assert torch.allclose(seen[0], seen_gated[0], atol=1e-6)


def test_a_hook_added_after_gate_on_a_gated_layer_is_refused_by_prune() -> None:
    # before: gate_ could not see it, and prune silently gave pruned != gated by 0.022
    net = _mlp()
    x = torch.randn(16, 8)
    gate_(net, x)
    _close_some(net)
    handle = net[2].register_forward_hook(lambda m, i, o: o.clamp(-0.2, 0.2) + 0.05)
    with pytest.raises(ValueError, match=r"module '2' \(Linear\) carries a forward hook <lambda>"):
        gatedprune.prune(net.eval())
    handle.remove()
    # an observer of a layer whose channels all stay is fine after gate_ too
    with torch.no_grad():
        for g in inserted_gating(net).group_gates:
            assert isinstance(g, HardConcreteGate)
            g.log_alpha.fill_(10.0)
    seen: list[Tensor] = []
    net[6].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    with torch.no_grad():
        gated = net(x)
        out = gatedprune.prune(net)(x)
    assert (out - gated).abs().max().item() <= 1e-5
    assert len(seen) == 2
    assert torch.allclose(seen[0], seen[1], atol=1e-6)


def test_a_user_pre_hook_lists_both_sides_with_the_hook_as_reason() -> None:
    # before: "computes its weight when it runs", and the layer's own 32 output channels
    # were missing from the summary
    net = _mlp()
    net[2].register_forward_pre_hook(lambda m, args: None)
    gate_(net, torch.randn(4, 8))
    lines = _summary_lines(net)
    why = "2 (Linear) carries a forward pre-hook <lambda> (test_gate_user_hooks.py:"
    assert any(ln.startswith("  ungated      16  0: " + why) for ln in lines), lines
    assert any(ln.startswith("  ungated      32  2: " + why) for ln in lines), lines
    assert not any("computes its weight" in ln for ln in lines)


def test_with_kwargs_and_always_call_hooks_count_as_hooks() -> None:
    net = _mlp()

    def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        return None

    def post(m: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        return out * 0.5 + 0.1

    h_pre = net[0].register_forward_pre_hook(pre, with_kwargs=True)
    h_post = net[6].register_forward_hook(post, always_call=True)
    x = torch.randn(4, 8)
    gate_(net, x)
    text = str(inserted_gating(net).summary)
    assert "  ungated      16  0: 0 (Linear) carries a forward pre-hook pre (test_gate" in text
    assert "  ungated      16  4: 6 (Linear) carries a forward hook post (test_gate" in text
    assert "  channels     32  2" in text.splitlines()
    _close_some(net)
    pruned = gatedprune.prune(net.eval())
    assert pruned[2].out_features < 32
    assert pruned[0]._forward_pre_hooks_with_kwargs == {h_pre.id: True}
    assert pruned[6]._forward_hooks_always_called == {h_post.id: True}
    with torch.no_grad():
        assert (pruned(x) - net(x)).abs().max().item() <= 1e-5


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def _resnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1),
        nn.ReLU(),
        _Block(8),
        _Block(8),
        _Block(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_hooks_reading_shapes_do_not_run_on_proxies_and_blocks_stay_gated() -> None:
    # before: fx ran the hooks on Proxies while tracing; tuple(out.shape) failed, every block
    # was opaque (0 blocks, 0 channel groups) and the warning blamed the block's code
    x = torch.randn(2, 3, 8, 8)
    net = _resnet()
    stats: list[tuple[tuple[int, ...], float]] = []
    handles = [
        net[i].register_forward_hook(
            lambda m, inp, out: stats.append((tuple(out.shape), out.mean().item()))
        )
        for i in (2, 3, 4)
    ]
    before = [list(net[i]._forward_hooks.items()) for i in (2, 3, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = gate_(net, x)
    assert len(summary.blocks) == 3
    assert len(summary.channel_groups) == 3  # the three blocks' inner channels
    assert all(isinstance(s[1], float) for s in stats)  # real tensors only
    assert [list(net[i]._forward_hooks.items()) for i in (2, 3, 4)] == before
    why = "  ungated       8  0, 2.c2, 3.c2, 4.c2: 2 (_Block) carries a forward hook <lambda>"
    assert any(ln.startswith(why) for ln in _summary_lines(net)), _summary_lines(net)
    gating = inserted_gating(net)
    gating.block_gates[1].force_(torch.zeros(1, dtype=torch.bool))
    _close_some(net)
    net.eval()
    with torch.no_grad():
        stats.clear()
        gated = net(x)
        seen_gated = list(stats)
        pruned = gatedprune.prune(net).eval()
        stats.clear()
        out = pruned(x)
    assert (out - gated).abs().max().item() <= 1e-5
    assert len(stats) == len(seen_gated) == 3
    for (shape, mean), (shape_g, mean_g) in zip(stats, seen_gated, strict=True):
        assert shape == shape_g
        assert abs(mean - mean_g) <= 1e-5
    # the closed block's module was rewritten and kept its hook
    assert type(pruned[3]).__name__ != "_Block"
    assert len(pruned[3]._forward_hooks) == 1
    for h in handles:  # the handles still remove them from the gated model
        h.remove()
    assert not any(net[i]._forward_hooks for i in (2, 3, 4))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
                for _ in range(3)
            ]
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


class _Capture:
    """A hook object of the user's collecting features."""

    def __init__(self) -> None:
        self.features: list[Tensor] = []

    def __call__(self, m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        self.features.append(out.detach().clone())


def test_prune_keeps_the_hooks_of_a_module_in_a_rewritten_forward() -> None:
    # before: closing block 0 rewrote Net.forward with blocks.2 inlined: its hook fired once
    # in the gated model and never in the pruned one
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(4, 8)
    capture = _Capture()
    net.blocks[2].register_forward_hook(capture)
    summary = gate_(net, x)
    capture.features.clear()  # (gate_ runs the model on the example input, hooks included)
    assert [owner for owner, _, _ in summary.blocks] == ["", ""]  # blocks 0 and 1
    why = "blocks.2 (Sequential) carries a forward hook _Capture, whose call would go with"
    assert any(why in reason for _, reason in summary.ungated_adds), summary.ungated_adds
    gating = inserted_gating(net)
    gating.block_gates[0].force_(torch.zeros(1, dtype=torch.bool))
    _close_some(net)
    net.eval()
    with torch.no_grad():
        gated = net(x)
        pruned = gatedprune.prune(net).eval()
        assert type(pruned).__name__ == "Pruned_Net"
        out = pruned(x)
    assert (out - gated).abs().max().item() <= 1e-5
    # the pruned model calls the very hook object (not a deep copy of it)
    assert list(pruned.get_submodule("blocks.2")._forward_hooks.values()) == [capture]
    assert len(capture.features) == 2
    assert torch.allclose(capture.features[0], capture.features[1], atol=1e-6)


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Linear(2 * c, c))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


class _Stage(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = _Res(c), _Res(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


class _TwoStages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.s1 = nn.Linear(6, 8), _Stage(8)
        self.s2 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + self.s1(h)
        h = h + self.s2(h)
        return self.head(h)


def test_a_hooked_module_changed_inside_a_rewritten_forward_is_rewritten_on_its_own() -> None:
    # closing the root's block rewrites the root, and closing s1.a changes s1's code: s1 is
    # rewritten first, with its hook, and the root calls it
    torch.manual_seed(0)
    net = _TwoStages()
    x = torch.randn(5, 6)
    calls: list[Tensor] = []
    net.s1.register_forward_hook(lambda m, i, o: calls.append(o.clone()))
    summary = gate_(net, x)
    calls.clear()  # (gate_ runs the model on the example input, hooks included)
    gating = inserted_gating(net)
    for i, (owner, _, _) in enumerate(summary.blocks):
        if owner in ("", "s1.a"):
            gating.block_gates[i].force_(torch.zeros(1, dtype=torch.bool))
    net.eval()
    with torch.no_grad():
        gated = net(x)
        pruned = gatedprune.prune(net).eval()
        out = pruned(x)
    assert (type(pruned).__name__, type(pruned.s1).__name__) == ("Pruned_TwoStages", "Pruned_Stage")
    assert (out - gated).abs().max().item() <= 1e-5
    assert len(calls) == 2
    assert torch.allclose(calls[0], calls[1], atol=1e-6)


class _PostReLU(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc, self.relu = nn.Linear(c, c), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.fc(x))


def test_a_hooked_relu_after_a_closed_block_is_not_dropped() -> None:
    # relu(relu(z)) = relu(z): prune drops the ReLU after a closed block; before, also a
    # ReLU carrying a hook, which then stopped firing
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), _PostReLU(6), _PostReLU(6), nn.Linear(6, 2))
    fired: list[str] = []
    net[3].relu.register_forward_hook(lambda m, i, o: fired.append("relu"))
    x = torch.randn(3, 4)
    summary = gate_(net, x)
    fired.clear()  # (gate_ runs the model on the example input, hooks included)
    assert [owner for owner, _, _ in summary.blocks] == ["2", "3"]
    inserted_gating(net).block_gates[1].force_(torch.zeros(1, dtype=torch.bool))
    net.eval()
    with torch.no_grad():
        gated = net(x)
        out = gatedprune.prune(net)(x)
    assert (out - gated).abs().max().item() <= 1e-5
    assert fired == ["relu", "relu"]


def test_a_layer_with_a_hooked_submodule_is_not_gated_inside() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    net = nn.Sequential(layer, nn.Linear(8, 3))
    seen: list[Tensor] = []
    layer.linear1.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    summary = gate_(net, torch.randn(2, 5, 8))
    assert summary.transformers == []
    reason = dict(summary.ungated_layers)["0"]
    assert reason.startswith("0.linear1 (Linear) carries a forward hook <lambda>")


def test_a_global_module_hook_is_refused() -> None:
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(ValueError, match="global forward hook <lambda>"):
            gate_(_mlp(), torch.randn(2, 8))
    finally:
        handle.remove()


def test_apply_plan_refuses_to_slice_a_module_carrying_a_hook() -> None:
    net = _mlp()
    gate_(net, torch.randn(4, 8))
    _close_some(net)
    plan = export_plan(net)
    fresh = _mlp()
    fresh[2].register_forward_hook(lambda m, i, o: None)
    before = fresh[2].weight.shape
    with pytest.raises(ValueError, match=r"slices module '2' \(Linear\), which carries a"):
        apply_plan(fresh, plan)
    assert fresh[2].weight.shape == before  # refused before changing anything


# -- random stacks, random hooks, random gates ----------------------------------------------


class _InnerBlock(nn.Module):
    """``act(x + f2(act(f1(x))))``: the add in the block's own forward."""

    def __init__(self, c: int, mid: int, post: bool) -> None:
        super().__init__()
        self.f1, self.f2 = nn.Linear(c, mid), nn.Linear(mid, c)
        self.act = nn.ReLU()
        self.post = post

    def forward(self, x: Tensor) -> Tensor:
        y = x + self.f2(self.act(self.f1(x)))
        return self.act(y) if self.post else y


class _Stack(nn.Module):
    def __init__(self, widths: list[int], inner: bool, post: bool) -> None:
        super().__init__()
        c = 6
        self.stem = nn.Linear(5, c)
        self.inner = inner
        if inner:
            self.blocks = nn.ModuleList([_InnerBlock(c, m, post) for m in widths])
        else:  # the add in this forward, the branch a Sequential
            self.blocks = nn.ModuleList(
                [nn.Sequential(nn.Linear(c, m), nn.ReLU(), nn.Linear(m, c)) for m in widths]
            )
        self.head = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h) if self.inner else h + b(h)
        return self.head(h)


_HOOK_KINDS = ("observe", "clip", "pre_observe", "pre_scale")


def _register(m: nn.Module, kind: str, log: list[Tensor]) -> None:
    def observe(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        log.append(out.detach().clone())

    def clip(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        log.append(out.detach().clone())
        return out.clamp(-0.5, 0.5) + 0.05

    def pre_observe(mod: nn.Module, args: tuple[Any, ...]) -> None:
        log.append(args[0].detach().clone())

    def pre_scale(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        log.append(args[0].detach().clone())
        return (args[0] * 0.9 + 0.01, *args[1:])

    hooks: dict[str, Callable[..., Any]] = {"observe": observe, "clip": clip}
    pre: dict[str, Callable[..., Any]] = {"pre_observe": pre_observe, "pre_scale": pre_scale}
    if kind in hooks:
        m.register_forward_hook(hooks[kind])
    else:
        m.register_forward_pre_hook(pre[kind])


@settings(max_examples=examples(25), deadline=None)
@given(
    widths=st.lists(st.integers(2, 6), min_size=1, max_size=3),
    inner=st.booleans(),
    post=st.booleans(),
    picks=st.lists(st.tuples(st.integers(0, 30), st.sampled_from(_HOOK_KINDS)), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_random_hooks_on_random_stacks_pruned_equals_gated(
    widths: list[int],
    inner: bool,
    post: bool,
    picks: list[tuple[int, str]],
    seed: int,
) -> None:
    torch.manual_seed(seed)
    net = _Stack(widths, inner, post)
    names = [name for name, _ in net.named_modules() if name]
    logs: list[list[Tensor]] = []
    for index, kind in picks:
        logs.append([])
        _register(net.get_submodule(names[index % len(names)]), kind, logs[-1])
    x = torch.randn(4, 5)
    gate_(net, x)
    randomise_gates(net, torch.Generator().manual_seed(seed))
    net.eval()
    with torch.no_grad():
        for log in logs:
            log.clear()
        gated = net(x)
        gated_logs = [list(log) for log in logs]
        pruned = gatedprune.prune(net).eval()
        for log in logs:
            log.clear()
        out = pruned(x)
    assert (out - gated).abs().max().item() <= 1e-5
    for log, gated_log in zip(logs, gated_logs, strict=True):
        assert len(log) == len(gated_log)
        for a, b in zip(log, gated_log, strict=True):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() <= 1e-5
