"""A pruned ShortcutConv1d (``PlainShortcutNet``) under ``torch.jit.trace`` and
``torch.export``: its eval-mode channels-last path (cached folded weights, taken from
``CHANNELS_LAST_MIN_BATCH`` samples on) is not taken while tracing, compiling or exporting.
Before 2026-12-08 01:17 UTC a trace from 16 samples on failed torch's check ("Graphs differed
across invocations"), a trace after an eager forward recorded the cached folded weights as
constants (a later ``load_state_dict`` changed nothing: 0.04 off), and ``torch.export`` with
a dynamic batch could not span 16 (a guard ``2 <= B <= 15``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gatedprune as gp
from gatedprune.demo import build_demo_model
from gatedprune.plain import CHANNELS_LAST_MIN_BATCH


def _pruned(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = build_demo_model(40)
    with torch.no_grad():
        for g in net.gates():
            g.log_alpha.uniform_(-3.0, 3.0)  # some units, edges closed
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return gp.prune(net.eval()).eval()


@pytest.mark.parametrize("warm", [False, True])
def test_trace_from_a_large_batch_follows_the_parameters(warm: bool) -> None:
    model = _pruned(0)
    x = torch.randn(2 * CHANNELS_LAST_MIN_BATCH, 1, 40)
    if warm:  # an eager forward first fills the channels-last path's folded weights
        with torch.no_grad():
            model(x)
    traced = torch.jit.trace(model, x)
    with torch.no_grad():
        for b in (1, 4, 2 * CHANNELS_LAST_MIN_BATCH):
            xb = torch.randn(b, 1, 40)
            assert (traced(xb) - model(xb)).abs().max().item() <= 1e-5
        # new weights (fine-tuning, say): the trace must compute with them
        state = {
            k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in model.state_dict().items()
        }
        model.load_state_dict(state)
        traced.load_state_dict(state, strict=False)
        xb = torch.randn(2 * CHANNELS_LAST_MIN_BATCH, 1, 40)
        assert (traced(xb) - model(xb)).abs().max().item() <= 1e-5


def test_export_with_a_dynamic_batch_spans_the_channels_last_threshold() -> None:
    model = _pruned(2)
    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.export.export(model, (torch.randn(4, 1, 40),), dynamic_shapes=({0: batch},))
    run = prog.module()
    with torch.no_grad():
        for b in (1, CHANNELS_LAST_MIN_BATCH - 1, CHANNELS_LAST_MIN_BATCH, 100):
            xb = torch.randn(b, 1, 40)
            assert (run(xb) - model(xb)).abs().max().item() <= 1e-5
