"""Shortcut networks: pruned == gated in eval mode, exact costs, edge cases (hypothesis)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gatedprune as gp
from gatedprune.gates import HardConcreteGate
from gatedprune.plain import CHANNELS_LAST_MIN_BATCH, OffsetConv1d, _conv_one_channel
from gatedprune.shortcut import _ShortcutNet

LN11 = math.log(11.0)


def _randomise_norms(net: nn.Module, gen: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


def _set_gates(net: nn.Module, states: st.DataObject) -> bool:
    """Random gate states: closed, open or in between. Returns whether any gate is closed."""
    any_closed = False
    for g in gp.gate_modules(net):
        assert isinstance(g, HardConcreteGate)
        n = g.n_groups  # one parameter per gate (a group of units shares one)
        kinds = states.draw(st.lists(st.sampled_from("cob"), min_size=n, max_size=n))
        vals = []
        for k in kinds:
            if k == "c":
                vals.append(-LN11 - 1.0)
                any_closed = True
            elif k == "o":
                vals.append(LN11 + 1.0)
            else:
                vals.append(states.draw(st.floats(-LN11 + 0.2, LN11 - 0.2)))
        with torch.no_grad():
            g.log_alpha.copy_(torch.tensor(vals))
    return any_closed


def _check_equivalent(net: _ShortcutNet, x: torch.Tensor) -> gp.Cost:
    net.eval()
    small = gp.prune(net)
    assert isinstance(small, gp.PlainShortcutNet)
    assert not gp.gate_modules(small)
    small.eval()
    with torch.no_grad():
        diff = (small(x) - net(x)).abs().max().item()
    assert diff <= 1e-5, diff
    if x.dim() == 3:  # spatial: the channels-last eval path too (taken from a batch size on)
        big = x.repeat(-(-CHANNELS_LAST_MIN_BATCH // x.shape[0]), 1, 1)  # (B', C, L)
        with torch.inference_mode():
            fast = small(big)
            assert small._folded_convs or not small.layers  # the path was taken
            diff = (fast - net(big)).abs().max().item()
        assert diff <= 1e-5, diff
        assert fast.is_contiguous()
        # cost() counts through module hooks: the hooked forward keeps to the modules
        assert gp.cost(small, big).flops == gp.cost(small, big[:1]).flops * big.shape[0]
        # another length: equal, unless a folded constant pinned the length (then refused)
        longer = torch.randn(3, x.shape[1], 2 * x.shape[2])  # (B, C, 2L)
        if small.spec.input_length is None:
            with torch.no_grad():
                assert (small(longer) - net(longer)).abs().max().item() <= 1e-5
        else:
            with pytest.raises(ValueError, match="built for inputs of length"):
                small(longer)
    pruned_cost = gp.cost(small, x[:1])
    assert isinstance(pruned_cost, gp.Cost)
    hard = gp.cost(net, x[:1], hard=True)
    assert isinstance(hard, gp.ExpectedCost)
    assert hard.detach() == pruned_cost
    assert float(hard.flops) == pruned_cost.flops  # exact, not just rounded
    assert float(hard.params) == pruned_cost.params
    return pruned_cost


def _dense_cost(net: _ShortcutNet, x: torch.Tensor) -> gp.Cost:
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    c = gp.cost(gp.prune(net), x[:1])
    net.load_state_dict(state)
    assert isinstance(c, gp.Cost)
    return c


@given(
    widths=st.lists(st.integers(1, 7), min_size=1, max_size=5),
    shortcuts=st.booleans(),
    norm=st.booleans(),
    act=st.sampled_from(["relu", "gelu", "tanh", "identity"]),
    group=st.sampled_from([1, 1, 2, 3]),
    states=st.data(),
    seed=st.integers(0, 2**16),
)
def test_mlp_pruned_equals_gated(
    widths: list[int],
    shortcuts: bool,
    norm: bool,
    act: str,
    group: int,
    states: st.DataObject,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    widths = [w * group for w in widths]
    net = gp.ShortcutMLP(
        6,
        widths,
        3,
        shortcuts=shortcuts,
        norm=norm,
        activation=act,  # type: ignore[arg-type]
        unit_group=group,
    )
    _randomise_norms(net, gen)
    any_closed = _set_gates(net, states)
    x = torch.randn(9, 6, generator=gen)  # (B, F)
    pruned = _check_equivalent(net, x)
    for layer in gp.prune(net).layers:  # every kept width is a whole number of groups
        assert layer.op.out_features % group == 0
    dense = _dense_cost(net, x)
    if any_closed:
        assert pruned.flops < dense.flops
        assert pruned.params < dense.params
    else:
        assert pruned == dense


@given(
    stages=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=3),
    kernel=st.sampled_from([1, 3, 5]),
    head_pool=st.integers(1, 4),
    shortcuts=st.booleans(),
    norm=st.booleans(),
    group=st.sampled_from([1, 1, 2, 4]),
    in_channels=st.sampled_from([1, 2]),
    n_out=st.sampled_from([1, 3, 16]),  # the channels-last read-out has two matrix products
    states=st.data(),
    seed=st.integers(0, 2**16),
)
def test_conv_pruned_equals_gated(
    stages: list[list[int]],
    kernel: int,
    head_pool: int,
    shortcuts: bool,
    norm: bool,
    group: int,
    in_channels: int,
    n_out: int,
    states: st.DataObject,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    length = 16
    net = gp.ShortcutConv1d(
        in_channels,
        [[w * group for w in stage] for stage in stages],
        n_out,
        kernel_size=kernel,
        head_pool=head_pool,
        input_length=length,
        shortcuts=shortcuts,
        norm=norm,
        unit_group=group,
    )
    _randomise_norms(net, gen)
    any_closed = _set_gates(net, states)
    x = torch.randn(5, in_channels, length, generator=gen)  # (B, C, L)
    pruned = _check_equivalent(net, x)
    for layer in gp.prune(net).layers:  # every kept layer has a whole number of channel groups
        assert layer.op.out_channels % group == 0
    dense = _dense_cost(net, x)
    if any_closed:
        assert pruned.flops < dense.flops
        assert pruned.params < dense.params
    else:
        assert pruned == dense


def _close(gate: gp.Gate | None, idx: list[int] | None = None) -> None:
    assert gate is not None
    mask = torch.ones(gate.n, dtype=torch.bool)
    mask[idx if idx is not None else slice(None)] = False
    gate.force_(mask)


def test_all_edges_of_a_conv_layer_closed_folds_a_constant() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[4, 4, 4]], 3, kernel_size=3, input_length=12)
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    _close(net.layers[1].edge_gate)  # layer 2 reads nothing: a constant map
    x = torch.randn(4, 1, 12)
    c = _check_equivalent(net, x)
    small = gp.prune(net)
    assert len(small.spec.layers) == 2  # the constant layer is gone
    assert any(isinstance(m, OffsetConv1d) for m in small.modules())  # folded as an offset
    assert c.flops < _dense_cost(net, x).flops
    with pytest.raises(ValueError, match="length 12"):
        small(torch.randn(2, 1, 20))


def test_constant_layer_without_input_length_is_a_clear_error() -> None:
    net = gp.ShortcutConv1d(1, [[4, 4]], 3, kernel_size=3)
    _close(net.layers[1].edge_gate)
    for layer in net.layers:
        layer.unit_gate.force_(torch.ones(4, dtype=torch.bool))
    assert net.head_gate is not None
    net.head_gate.force_(torch.ones(net.head_gate.n, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_length"):
        gp.prune(net)


def test_mlp_constant_layer_folds_into_bias() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutMLP(5, [6, 6, 6], 2)
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    _close(net.layers[0].edge_gate)  # layer 1 reads nothing
    _check_equivalent(net, torch.randn(7, 5))
    assert len(gp.prune(net).spec.layers) == 2


def test_whole_layer_closed_disappears() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutMLP(5, [6, 6, 6], 2)
    _close(net.layers[1].unit_gate)
    _check_equivalent(net, torch.randn(7, 5))
    assert [layer.width for layer in gp.prune(net).spec.layers] == [6, 6]


def test_layer_without_consumer_disappears_with_what_only_fed_it() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutMLP(5, [6, 6], 2)
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    # layer 1 feeds only layer 2 and the head; close both reads, so it has no consumer
    _close(net.layers[1].edge_gate, [1])
    assert net.head_gate is not None
    _close(net.head_gate, [1])
    _check_equivalent(net, torch.randn(7, 5))
    assert len(gp.prune(net).spec.layers) == 1


def test_closed_readout_prunes_to_the_constant_function() -> None:
    torch.manual_seed(0)
    for net, x in (
        (gp.ShortcutMLP(5, [6, 6], 3), torch.randn(7, 5)),
        (gp.ShortcutConv1d(1, [[3], [3]], 3, input_length=8), torch.randn(7, 1, 8)),
    ):
        _close(net.head_gate)
        c = _check_equivalent(net, x)
        small = gp.prune(net)
        assert len(small.spec.layers) == 0
        assert c.params == 3  # only the output bias is left
        out = small.eval()(x)
        assert torch.equal(out, out[:1].expand_as(out))  # the same prediction for every input


def test_all_open_prunes_to_the_same_architecture() -> None:
    net = gp.ShortcutConv1d(1, [[4, 4], [6]], 5, input_length=16)
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    x = torch.randn(3, 1, 16)
    c = _check_equivalent(net, x)
    plain_params = sum(p.numel() for p in gp.prune(net).parameters())
    gated_weights = sum(p.numel() for p in net.weight_parameters())
    assert c.params == plain_params == gated_weights


def test_gated_model_is_an_ordinary_module() -> None:
    net = gp.ShortcutConv1d(1, [[4], [4]], 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.randn(4, 1, 16)).pow(2).mean()
    loss.backward()
    opt.step()
    clone = gp.ShortcutConv1d(1, [[4], [4]], 3)
    clone.load_state_dict(net.state_dict())
    net.eval()
    clone.eval()
    x = torch.randn(2, 1, 16)
    assert torch.equal(net(x), clone(x))
    assert all(p.grad is not None for p in net.gate_parameters())


def test_expected_cost_is_differentiable_and_bounded() -> None:
    net = gp.ShortcutMLP(8, [8, 8], 2)
    x = torch.zeros(1, 8)
    exp = gp.cost(net, x)
    assert isinstance(exp, gp.ExpectedCost)
    exp.flops.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.gate_parameters())
    assert 0 < float(exp.flops.detach()) < _dense_cost(net, x).flops


@pytest.mark.parametrize(
    ("make", "x", "match"),
    [
        (lambda: gp.ShortcutMLP(4, [3], 2), torch.zeros(2, 5), r"\(B, 4\)"),
        (lambda: gp.ShortcutMLP(4, [3], 2), torch.zeros(2, 4, 1), r"\(B, 4\)"),
        (lambda: gp.ShortcutConv1d(1, [[3], [3]], 2), torch.zeros(2, 2, 8), r"\(B, 1, L\)"),
        (lambda: gp.ShortcutConv1d(1, [[3], [3], [3]], 2), torch.zeros(2, 1, 3), "L >= 4"),
    ],
)
def test_wrong_input_shape_is_a_clear_error(make: object, x: torch.Tensor, match: str) -> None:
    net = make()  # type: ignore[operator]
    with pytest.raises(ValueError, match=match):
        net(x)
    with pytest.raises(ValueError, match=match):
        gp.cost(net, x)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="widths"):
        gp.ShortcutMLP(4, [3, 0], 2)
    with pytest.raises(TypeError, match="widths"):
        gp.ShortcutMLP(4, 3, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kernel_size"):
        gp.ShortcutConv1d(1, [[3]], 2, kernel_size=4)
    with pytest.raises(ValueError, match="stages"):
        gp.ShortcutConv1d(1, [], 2)
    with pytest.raises(ValueError, match="activation"):
        gp.ShortcutMLP(4, [3], 2, activation="swish")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Tensor"):
        gp.ShortcutMLP(4, [3], 2)([[0.0] * 4])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="widths must hold at least one size"):
        gp.ShortcutMLP(4, [], 2)
    with pytest.raises(ValueError, match=r"stages\[1\] must hold at least one size"):
        gp.ShortcutConv1d(1, [[3], []], 2)


@pytest.mark.parametrize(
    ("make", "match"),
    [  # strings read as true and bools as 1: both refused, not silently accepted
        (lambda: gp.ShortcutMLP(3, [4], 2, shortcuts="no"), "shortcuts must be a bool"),
        (lambda: gp.ShortcutMLP(3, [4], 2, norm="no"), "norm must be a bool"),
        (lambda: gp.ShortcutConv1d(1, [[4]], 2, shortcuts=0), "shortcuts must be a bool"),
        (lambda: gp.ShortcutConv1d(1, [[4]], 2, kernel_size=True), "kernel_size must be an int"),
        (lambda: gp.ShortcutConv1d(1, [[4]], 2, head_pool=True), "head_pool must be an int"),
        (lambda: gp.ShortcutConv1d(1, [[4]], 2, input_length=True), "input_length must be"),
        (lambda: gp.ShortcutConv1d(1, [[4]], 2, head_pool="5"), "head_pool must be an int"),
    ],
)
def test_loose_constructor_arguments_are_refused(make: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        make()  # type: ignore[operator]


def test_numpy_integers_are_accepted_as_sizes() -> None:
    np = pytest.importorskip("numpy")
    net = gp.ShortcutConv1d(np.int64(1), [[np.int64(4)]], np.int32(2), kernel_size=np.int64(3))
    assert net.spec.in_width == 1
    assert type(net.spec.layers[0].width) is int
    assert type(net.spec.kernel_size) is int
    json.dumps(gp.prune(net).to_config())  # sizes stay JSON-able


@given(
    stages=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=2), min_size=1, max_size=3),
    states=st.data(),
    seed=st.integers(0, 2**16),
)
def test_fold_batchnorm_keeps_the_function(
    stages: list[list[int]], states: st.DataObject, seed: int
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = gp.ShortcutConv1d(1, stages, 3, kernel_size=3, input_length=16)
    _randomise_norms(net, gen)
    _set_gates(net, states)
    small = gp.prune(net.eval()).eval()
    folded = small.fold_batchnorm().eval()
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    x = torch.randn(6, 1, 16, generator=gen)  # (B, C, L)
    with torch.no_grad():
        assert float((folded(x) - small(x)).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="no BatchNorm"):
        folded.fold_batchnorm()


@pytest.mark.parametrize("hardened", [False, True])
def test_sigmoid_gated_network_prunes_to_the_same_function(hardened: bool) -> None:
    torch.manual_seed(3)
    net = gp.ShortcutConv1d(1, [[6, 6], [8]], 4, kernel_size=3, gate="sigmoid", input_length=16)
    for g in gp.gate_modules(net):
        assert isinstance(g, gp.SigmoidGate)
        with torch.no_grad():
            g.theta.copy_(torch.randn(g.n) * 3)
    if hardened:
        assert gp.harden(net) == len(gp.gate_modules(net))
    x = torch.randn(5, 1, 16)
    c = _check_equivalent(net, x)
    dense = _dense_cost(net, x)
    if hardened:  # hardening closes the gates with theta <= 0: the model really shrinks
        assert c.flops < dense.flops
        assert c.params < dense.params
    else:  # a soft sigmoid never closes: nothing is removed, the values are folded in
        assert c == dense


def test_pruned_net_pickled_before_the_resolved_wiring_still_runs() -> None:
    import io

    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[4, 4], [8]], 3, input_length=16).eval()
    pruned = gp.prune(net).eval()
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    # an older pickle has no resolved wiring or module calls: __setstate__ rebuilds them
    state = loaded.__dict__.copy()
    for key in ("_reads", "_head_reads", "_calls"):
        del state[key]
    old = gp.PlainShortcutNet.__new__(gp.PlainShortcutNet)
    old.__setstate__(state)
    x = torch.randn(3, 1, 16)  # (B, C, L)
    with torch.no_grad():
        assert torch.equal(old.eval()(x), pruned(x))


def test_unit_groups_share_one_gate() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[8, 8], [16]], 3, input_length=16, unit_group=4)
    gate = net.layers[0].unit_gate
    assert gate.n == 8
    assert gate.n_groups == 2
    net.train()
    z = gate()  # (8,) a sample: one draw per group, repeated over its channels
    assert torch.equal(z.reshape(2, 4), z.reshape(2, 4)[:, :1].expand(2, 4))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([0.5, -1.0]))
    p = gate.prob_open().detach().double()  # (8,)
    # P(some channel of the layer open) is over the two gates, not over eight copies
    z_summary, _ = net._summary(False)
    n_layers = len(net.layers)
    expected_o = 1 - (1 - p[0]) * (1 - p[4])
    assert math.isclose(float(z_summary[n_layers].detach()), float(expected_o), rel_tol=1e-12)
    assert math.isclose(float(z_summary[0].detach()), float(p.sum()), rel_tol=1e-12)


def test_unit_group_must_divide_every_width() -> None:
    with pytest.raises(ValueError, match="layer 1 has 6"):
        gp.ShortcutMLP(4, [8, 6], 2, unit_group=4)
    with pytest.raises(ValueError, match="unit_group must be a positive int"):
        gp.ShortcutConv1d(1, [[8]], 2, unit_group=0)
    gate = gp.ShortcutMLP(4, [8], 2, unit_group=4).layers[0].unit_gate
    with pytest.raises(ValueError, match="splits a group"):
        gate.force_(torch.tensor([True, False, True, True, False, False, False, False]))
    with pytest.raises(ValueError, match="expected n=8"):
        gate.force_(torch.ones(4, dtype=torch.bool))


def test_channels_last_path_follows_weight_updates_and_leaves_autograd_alone() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[4, 4], [8]], 3, kernel_size=3, input_length=16).eval()
    _randomise_norms(net, torch.Generator().manual_seed(1))
    small = gp.prune(net).eval()
    x = torch.randn(CHANNELS_LAST_MIN_BATCH, 1, 16)  # (B, C, L)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            small.channels_last = False
            slow = small(x)
            small.channels_last = True
            return small(x), slow

    fast, slow = both()
    assert (fast - slow).abs().max().item() <= 1e-5
    with torch.no_grad():  # in place: the cached folded weights must be refreshed
        small.layers[0].op.weight.mul_(2.0)
        small.layers[1].norm.running_mean.add_(1.0)
        small.layers[2].norm.weight.mul_(-1.0)
    fast2, slow2 = both()
    assert not torch.equal(fast, fast2)
    assert (fast2 - slow2).abs().max().item() <= 1e-5
    # edits through .data leave the version counters alone: they must be seen too
    small.layers[1].op.weight.data.mul_(0.5)
    small.layers[2].norm.running_var.data.mul_(3.0)
    fast3, slow3 = both()
    assert not torch.equal(fast2, fast3)
    assert (fast3 - slow3).abs().max().item() <= 1e-5
    small.double()  # a dtype change refolds too
    with torch.no_grad():
        fast4 = small(x.double())
    assert fast4.dtype == torch.float64
    assert (fast4 - slow3.double()).abs().max().item() <= 1e-5
    small.float()
    # with autograd recording, the (B, C, L) path runs and gradients reach every weight
    small(x).sum().backward()
    assert all(p.grad is not None for p in small.parameters() if p.numel())


def test_constant_read_out_source_pins_the_input_length() -> None:
    # layer 1 reads nothing (a constant map), layer 2 reads only layer 1 through zero padding
    # (a position-dependent constant) and only layer 2 reaches the read-out: the read-out's
    # folded bias holds for the built length only, so other lengths must be refused
    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[4, 4]], 2, input_length=8, kernel_size=5, head_pool=5)
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    _close(net.layers[0].edge_gate)
    _close(net.layers[1].edge_gate, [0])
    _close(net.head_gate, [0, 1])
    with torch.no_grad():
        net.layers[0].op.bias.fill_(3.0)
    net.eval()
    small = gp.prune(net).eval()
    assert len(small.layers) == 0
    assert small.spec.input_length == 8
    for batch in (2, CHANNELS_LAST_MIN_BATCH):
        x = torch.randn(batch, 1, 8)  # (B, C, L)
        with torch.no_grad():
            assert (small(x) - net(x)).abs().max().item() <= 1e-5
        with pytest.raises(ValueError, match="built for inputs of length 8"):
            small(torch.randn(batch, 1, 16))
    loaded = gp.PlainShortcutNet.from_config(small.to_config())
    with pytest.raises(ValueError, match="built for inputs of length 8"):
        loaded(torch.randn(2, 1, 16))


def test_prune_without_input_length_over_several_stages() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[4], [4], [4]], 2).eval()  # no input_length given
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    _close(net.layers[1].unit_gate, [0, 1])
    small = gp.prune(net).eval()
    assert small.spec.input_length is None
    for length in (4, 16, 40):
        x = torch.randn(3, 1, length)  # (B, C, L)
        with torch.no_grad():
            assert (small(x) - net(x)).abs().max().item() <= 1e-5


class _SpyTanh(nn.Module):
    """tanh, counting its calls (a type the channels-last path does not know)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(x)


def test_pruned_net_calls_replaced_modules_in_both_paths() -> None:
    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[4, 4], [8]], 3, kernel_size=3, input_length=16).eval()
    _randomise_norms(net, torch.Generator().manual_seed(1))
    small = gp.prune(net).eval()
    x = torch.randn(CHANNELS_LAST_MIN_BATCH, 1, 16)  # (B, C, L)

    def run(channels_last: bool) -> torch.Tensor:
        small.channels_last = channels_last
        with torch.no_grad():
            return small(x)  # (B, 3)

    relu = run(True)
    spy = _SpyTanh()
    small.layers[0].act = spy  # after forwards ran: the resolved modules must follow
    by_spy = [run(True), run(False)]
    assert spy.calls == 2
    assert torch.equal(by_spy[0], by_spy[1])
    assert not torch.allclose(by_spy[0], relu)
    small.layers[0].act = nn.Tanh()  # a standard activation: channels-last computes it
    assert (run(True) - by_spy[0]).abs().max().item() <= 1e-5
    assert (run(False) - by_spy[0]).abs().max().item() <= 1e-5
    # a BatchNorm in training mode inside an eval model uses batch statistics
    small.layers[1].norm.train()
    fast, slow = run(True), run(False)
    small.layers[1].norm.eval()
    assert (fast - slow).abs().max().item() <= 1e-5
    assert not torch.allclose(slow, run(False))
    # a convolution the fast path does not compute (dilated) is called as a module
    conv = small.layers[1].op
    dilated = nn.Conv1d(conv.in_channels, conv.out_channels, 3, padding=2, dilation=2)
    small.layers[1].op = dilated
    fast, slow = run(True), run(False)
    assert (fast - slow).abs().max().item() <= 1e-5
    small.layers[1].op = conv
    assert not torch.allclose(slow, run(False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_path_computes_one_channel_inputs_as_one_product(
    dtype: torch.dtype,
) -> None:
    """A layer whose input has one channel (the raw input, a one-unit layer, either with a
    folded constant's offset map) runs as a matrix product of its windows on the
    channels-last path (oneDNN returned such a layer in (B, C, L) layout, then a transposing
    copy); it must equal the (B, C, L) path and the gated network, and hand on contiguous
    (B, L, C) maps."""
    torch.manual_seed(0)
    net = gp.ShortcutConv1d(1, [[4, 1, 6], [5]], 3, input_length=16, kernel_size=5).to(dtype)
    _randomise_norms(net, torch.Generator().manual_seed(2))
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    _close(net.layers[0].edge_gate)  # layer 0 reads nothing: a constant map, folded away
    with torch.no_grad():
        net.layers[0].op.bias.fill_(2.0)
    _close(net.layers[2].edge_gate, [0, 1])  # layer 2 reads only the one-unit layer 1
    net.eval()
    small = gp.prune(net).eval()
    ops = [layer.op for layer in small.layers]
    assert [op.in_channels for op in ops] == [1, 1, 8]  # input (+ offset), layer 1, ...
    assert isinstance(ops[0], OffsetConv1d)
    x = torch.randn(CHANNELS_LAST_MIN_BATCH + 3, 1, 16, dtype=dtype)  # (B, C, L)
    with torch.no_grad():
        fast = small(x)
        small.channels_last = False
        slow = small(x)
        small.channels_last = True
        gated = net(x)
    assert (fast - slow).abs().max().item() <= 1e-5
    assert (fast - gated).abs().max().item() <= 1e-5
    w = small._folded_weights()[1][0]  # layer 2's (C, 1, 1, k) folded weight
    out = _conv_one_channel(torch.randn(2, 16, 1, dtype=dtype), w, None, None)  # (B, L, C)
    assert out.shape == (2, 16, w.shape[0])
    assert out.is_contiguous()
