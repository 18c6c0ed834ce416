"""export_onnx: pruned models run in ONNX Runtime with the same outputs as in PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from zoo import randomise_norms

import gatedprune
from gatedprune.gates import Gate
from gatedprune.gating import InsertedGating, ResNet1d, ScaledAdd, gate_

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _random_state(gates: list[Gate], gen: torch.Generator, p_open: float = 0.6) -> None:
    for g in gates:
        mask = torch.rand(g.n_groups, generator=gen) < p_open
        g.force_(mask.repeat_interleave(g.n // g.n_groups))


def _runtime_diff(path: Path, model: nn.Module, x: Tensor) -> float:
    session = gatedprune.onnx_session(path, threads=1)
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    assert got.shape == expected.shape
    return float((got - expected).abs().max())


@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_shortcut_conv_runs_in_onnx_runtime_at_any_batch_size(
    seed: int, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = gatedprune.ShortcutConv1d(2, [[8, 8], [12]], 3, input_length=24)
    _random_state(net.gates(), gen)
    randomise_norms(net, gen)
    gated = net.eval()
    pruned = gatedprune.prune(gated).eval()
    path = gatedprune.export_onnx(pruned, torch.randn(4, 2, 24, generator=gen), tmp_path / "c.onnx")
    for batch in (1, 7, 300):  # 300: the strided-slice pooling path in PyTorch
        x = torch.randn(batch, 2, 24, generator=gen)
        assert _runtime_diff(path, pruned, x) <= 1e-5
        with torch.no_grad():  # and so the gated model's function
            assert float((gated(x) - pruned(x)).abs().max()) <= 1e-5


def test_pruned_shortcut_mlp_exports(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    net = gatedprune.ShortcutMLP(10, [16, 16, 16], 4)
    _random_state(net.gates(), gen)
    pruned = gatedprune.prune(net.eval()).eval()
    path = gatedprune.export_onnx(pruned, torch.randn(3, 10), tmp_path / "m.onnx")
    assert _runtime_diff(path, pruned, torch.randn(33, 10, generator=gen)) <= 1e-5


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_pruned_recurrent_network_exports_with_dynamic_batch_and_length(
    cell: str, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    net = gatedprune.ShortcutLSTM(3, [24, 24], 2, 2, cell=cell)
    _random_state(net.unit_gates, gen)
    pruned = gatedprune.prune(net.eval()).eval()
    path = gatedprune.export_onnx(
        pruned, torch.randn(4, 9, 3), tmp_path / "r.onnx", dynamic_dims=(0, 1)
    )
    for shape in [(1, 5, 3), (6, 40, 3)]:
        assert _runtime_diff(path, pruned, torch.randn(*shape, generator=gen)) <= 1e-5


@pytest.mark.parametrize(("cell", "bidirectional"), [("gru", False), ("gru", True), ("lstm", True)])
def test_recurrent_layer_left_without_inputs_exports(
    cell: str, bidirectional: bool, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    net = gatedprune.ShortcutLSTM(2, [6, 4], 2, 3, cell=cell, bidirectional=bidirectional)
    for g in net.unit_gates:
        g.force_(torch.arange(g.n) != 1)
    assert net.edge_gates is not None
    net.edge_gates[1].force_(torch.zeros(2, dtype=torch.bool))  # layer 2 reads nothing
    pruned = gatedprune.prune(net.eval()).eval()
    rnn = pruned.get_submodule("layers.1")
    assert isinstance(rnn, nn.RNNBase)
    assert rnn.input_size == 0
    path = gatedprune.export_onnx(
        pruned, torch.randn(2, 5, 2), tmp_path / "z.onnx", dynamic_dims=(0, 1)
    )
    assert rnn.input_size == 0  # the model itself is not changed
    for shape in [(1, 3, 2), (4, 11, 2)]:
        assert _runtime_diff(path, pruned, torch.randn(*shape, generator=gen)) <= 1e-5


class _TwoGRUs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.GRU(3, 4, batch_first=True)
        self.second = nn.GRU(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.second(self.first(x)[0])[0][:, -1])  # (B, 2)


def test_gate_keeps_one_input_of_a_recurrent_module_whose_inputs_all_close(
    tmp_path: Path,
) -> None:
    torch.manual_seed(7)
    model = _TwoGRUs().eval()
    x = torch.randn(2, 5, 3)
    gate_(model, x)
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    first = gating.group_gates[gating.rnns[0].groups[0]]
    first.force_(torch.zeros(first.n, dtype=torch.bool))  # every unit of `first` closed
    pruned = gatedprune.prune(model).eval()
    second = pruned.get_submodule("second")
    assert isinstance(second, nn.GRU)
    assert second.input_size == 1  # kept with gate value 0, not input_size=0
    path = gatedprune.export_onnx(pruned, x, tmp_path / "u.onnx", dynamic_dims=(0, 1))
    assert _runtime_diff(path, pruned, torch.randn(3, 8, 3)) <= 1e-5


def test_resnet_pruned_with_gate_exports_removed_blocks_and_kept_shortcuts(
    tmp_path: Path,
) -> None:
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = ResNet1d()
    x = torch.randn(2, 1, 40, generator=gen)
    gate_(model, x, shortcuts="dense")
    gating = model.gatedprune
    assert isinstance(gating, InsertedGating)
    assert gating.edge_gate is not None
    for i, g in enumerate(gating.block_gates):
        assert isinstance(g, Gate)
        g.force_(torch.tensor([i % 3 != 1]))
    gating.edge_gate.force_(torch.rand(gating.edge_gate.n, generator=gen) < 0.5)
    randomise_norms(model, gen)
    pruned = gatedprune.prune(model.eval()).eval()
    assert any(isinstance(m, ScaledAdd) for m in pruned.modules())  # a shortcut survived
    path = gatedprune.export_onnx(pruned, x, tmp_path / "r.onnx")
    assert _runtime_diff(path, pruned, torch.randn(17, 1, 40, generator=gen)) <= 1e-5


def test_export_restores_the_training_mode(tmp_path: Path) -> None:
    net = gatedprune.prune(gatedprune.ShortcutMLP(4, [6], 2).eval()).train()
    gatedprune.export_onnx(net, torch.randn(2, 4), tmp_path / "t.onnx")
    assert net.training


def test_gated_models_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    net = gatedprune.ShortcutMLP(4, [6], 2)
    with pytest.raises(TypeError, match=r"still has gates .*gatedprune.prune"):
        gatedprune.export_onnx(net, torch.randn(2, 4), tmp_path / "g.onnx")
    plain = gatedprune.prune(net.eval())
    with pytest.raises(TypeError, match=r"example_input must be a torch\.Tensor"):
        gatedprune.export_onnx(plain, [[0.0] * 4], tmp_path / "g.onnx")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"real \(floating, integer or bool\) tensor"):
        gatedprune.export_onnx(plain, torch.zeros(2, 4, dtype=torch.cfloat), tmp_path / "g.onnx")
    with pytest.raises(ValueError, match=r"fails on example_input .*dtype torch\.int64"):
        gatedprune.export_onnx(plain, torch.zeros(2, 4, dtype=torch.long), tmp_path / "g.onnx")
    with pytest.raises(ValueError, match="dynamic_dims must be dimensions of the 2-dim"):
        gatedprune.export_onnx(plain, torch.randn(2, 4), tmp_path / "g.onnx", dynamic_dims=(2,))
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        gatedprune.export_onnx(plain, torch.randn(2, 4), tmp_path / "g.onnx", rtol=-1.0)
    with pytest.raises(ValueError, match="is a directory"):
        gatedprune.export_onnx(plain, torch.randn(2, 4), tmp_path)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        gatedprune.onnx_session(tmp_path / "g.onnx", threads=0)
    with pytest.raises(TypeError, match="threads must be a positive int"):
        gatedprune.onnx_session(tmp_path / "g.onnx", threads=1.5)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())  # nothing written by a refused call


class _Noisy(nn.Module):
    """Not a deterministic function: the exported graph cannot match it."""

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.rand_like(x)


def test_a_graph_that_differs_from_the_model_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="differs from the model by"):
        gatedprune.export_onnx(_Noisy(), torch.randn(2, 3), tmp_path / "n.onnx")
    assert not list(tmp_path.iterdir())
    gatedprune.export_onnx(_Noisy(), torch.randn(2, 3), tmp_path / "n.onnx", check=False)
    assert [p.name for p in tmp_path.iterdir()] == ["n.onnx"]


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)  # (B, T, 8)
        return self.fc2(torch.relu(self.fc1(h)).mean(1))  # (B, 3)


def test_a_pruned_model_taking_token_ids_exports(tmp_path: Path) -> None:
    """Integer inputs were refused ('must be floating point'); the check's resized input takes
    its ids from the example's, so they stay in the vocabulary."""
    torch.manual_seed(0)
    model = _TokenModel().eval()
    ids = torch.randint(0, 20, (2, 5))
    gate_(model, ids)
    for g in gatedprune.gate_modules(model):
        g.force_(torch.arange(g.n) % 2 == 0)
    pruned = gatedprune.prune(model)
    assert pruned.fc1.out_features < 16
    path = gatedprune.export_onnx(pruned, ids, tmp_path / "ids.onnx", dynamic_dims=(0, 1))
    session = gatedprune.onnx_session(path)
    probe = torch.randint(0, 20, (3, 9))
    got = torch.from_numpy(session.run(None, {"x": probe.numpy()})[0])
    with torch.no_grad():
        assert (got - pruned(probe)).abs().max().item() <= 1e-5
