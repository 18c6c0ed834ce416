"""Opaque (kept whole) submodules as Hugging Face transformers writes them: a forward wrapped
by a decorator that fills a keyword (``merge_with_config_defaults``), a norm ``gate_`` keeps
whole for its dtype check (``T5LayerNorm``), and a rotary embedding holding non-persistent
buffers (``LlamaRotaryEmbedding``). Minimal replicas of the library code, tiny widths."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from gating_helpers import check_pruned, random_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import gate_


def _merge_defaults(func: Callable[..., Any]) -> Callable[..., Any]:
    """transformers/utils/generic.py:1158-1205 ``merge_with_config_defaults``: a keyword left
    None is filled from the module's config (``kwargs[arg_name] = arg_value``, line 1205)."""

    @functools.wraps(func)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cache") is None:
            kwargs["use_cache"] = self.use_cache
        return func(self, *args, **kwargs)

    return wrapper


class _Body(nn.Module):
    """GPT2Model's shape of call: ``self.transformer(input_ids, attention_mask=...,
    use_cache=use_cache)``, its forward decorated, kept whole by a check on values."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.use_cache = False

    @_merge_defaults
    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, use_cache: bool | None = None
    ) -> Tensor:
        if use_cache:
            raise ValueError("no cache in this replica")
        if bool(x.isnan().any()):  # a check on values: fx cannot trace it, kept whole
            raise ValueError("NaN input")
        h = self.fc(x)  # (B, D)
        return h if attention_mask is None else h * attention_mask  # (B, D)


class _DecoratedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.body = _Body(6)
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))  # (B, 6)
        mask = torch.sigmoid(h)  # (B, 6)
        h = self.body(h, attention_mask=mask, use_cache=None)  # (B, 6)
        return self.down(torch.relu(self.up(h)))  # (B, 3)


def test_decorated_opaque_submodule_called_by_keyword_is_gated() -> None:
    """Was a TypeError in gate_ ("got multiple values for argument 'use_cache'"): the keyword
    call was recorded positionally, and the wrapper filled the keyword again."""
    torch.manual_seed(0)
    model, x = _DecoratedNet().eval(), torch.randn(4, 5)
    with torch.no_grad():
        before = model(x)  # (4, 3)
    with pytest.warns(UserWarning, match="'body'"):
        summary = gate_(model, x)
    assert summary.n_gates == 10  # up's units; body's inputs and outputs are kept
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0.0, atol=1e-6)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_decorated_opaque_submodule_prunes_exactly(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, x = _DecoratedNet(), torch.randn(3, 5, generator=gen)
    with pytest.warns(UserWarning, match="kept whole"):
        gate_(model, x)
    random_gates(model, gen)
    check_pruned(model, x, gen, factory=_DecoratedNet, batches=(1, 4))
