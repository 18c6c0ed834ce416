"""A module returning a dataclass mapping (Hugging Face's ``ModelOutput``: a dataclass and an
``OrderedDict``) keeps returning one when ``prune`` rewrites its forward. Before 2026-12-08
the rewritten forward returned a plain ``dict`` (fx makes one of any dict), and the caller's
``out.last_hidden_state`` failed: transformers' ``LlamaForCausalLM`` / ``MistralModel`` /
``Qwen2Model`` pruned with a closed decoder block raised ``'dict' object has no attribute
'last_hidden_state'`` or ``KeyError: 0`` when run."""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import torch
from gating_helpers import check_pruned, inserted_gating, randomise_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gatedprune.gating import apply_plan, export_plan, gate_

D = 8


@dataclasses.dataclass
class Output(collections.OrderedDict):  # type: ignore[type-arg]
    """transformers/utils/generic.py ``ModelOutput``, reduced: fields set are also items."""

    last_hidden_state: Tensor | None = None
    hidden_states: Any = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def __getitem__(self, k: Any) -> Any:  # out[0]: the first field set, as HF does
        if isinstance(k, str):
            return dict(self.items())[k]
        return tuple(self.values())[k]


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(D, 16), nn.Linear(16, D)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return x + self.down(torch.relu(self.up(x * mask)))  # (B, D)


class Decoder(nn.Module):
    """transformers' LlamaModel: a loop over layers, the result in a ModelOutput."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.layers = nn.ModuleList(Layer() for _ in range(n))

    def forward(self, x: Tensor) -> Output:
        h = self.embed(x)  # (B, D)
        mask = (x[:, :1] > -10.0).to(h.dtype)  # (B, 1), called with it: no nn.Identity
        for layer in self.layers:
            h = layer(h, mask)
        return Output(last_hidden_state=h)


class ForCausalLM(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.model, self.head = Decoder(n), nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return self.head(out.last_hidden_state) + 0.0 * out[0].sum()  # (B, 3)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_rewritten_forward_returns_the_output_class(n: int, seed: int) -> None:
    torch.manual_seed(seed)
    net, x = ForCausalLM(n).eval(), torch.randn(3, 4)
    summary = gate_(net, x)
    assert len(summary.blocks) == n
    gen = torch.Generator().manual_seed(seed)
    randomise_gates(net, gen)
    with torch.no_grad():  # the first block closed: model.model's forward is rewritten
        inserted_gating(net).block_gates[0].log_alpha.fill_(-9.0)
    pruned = check_pruned(net, x, gen, factory=lambda: ForCausalLM(n).eval())
    out = pruned.model(x)
    assert type(out) is Output
    fresh = apply_plan(ForCausalLM(n).eval(), json.loads(json.dumps(export_plan(net))))
    assert type(fresh.model(x)) is Output
