"""Files gatedprune reads refuse JSON objects with a repeated key (Python's json would keep
the last one silently): checkpoint/model metadata, latency models and the ResNet demo's plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gatedprune as gp
from gatedprune import io
from gatedprune.demo_resnet import build_resnet_demo_model, load_pruned_resnet, save_pruned_resnet
from gatedprune.gating import export_plan, gate_
from gatedprune.strict_json import loads_strict


def _duplicate_first_key(text: str) -> str:
    """``text`` (a JSON object) with its first key written twice, the copy first."""
    obj = json.loads(text)
    key = next(iter(obj))
    return "{" + json.dumps(key) + ": " + json.dumps(obj[key]) + ", " + text.lstrip()[1:]


def test_loads_strict_refuses_repeated_keys_at_any_depth() -> None:
    assert loads_strict('{"a": {"b": 1}, "c": [{"d": 2}]}') == {"a": {"b": 1}, "c": [{"d": 2}]}
    for text in ('{"a": 1, "a": 1}', '{"x": {"b": 1, "b": 2}}', '[{"k": 0, "k": 0}]'):
        with pytest.raises(ValueError, match="duplicated JSON key"):
            loads_strict(text)


def test_metadata_with_a_repeated_key_is_refused_even_with_valid_checksums(
    tmp_path: Path,
) -> None:
    # a writer that repeats a key and computes the checksums over what it wrote
    path = tmp_path / "t.safetensors"
    io.write_tensors(path, {"w": torch.zeros(2)}, {"step": 1, "note": "x"})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    md = header["__metadata__"]
    meta_json = '{"step": 7, ' + md[io._META_KEY][1:]  # "step" twice: 7, then 1
    md[io._META_KEY] = meta_json
    md[io._META_SHA_KEY] = io._sha256(meta_json)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(ValueError, match="duplicated JSON key 'step'"):
        io.read_tensors(path)


def test_latency_models_with_a_repeated_key_are_refused() -> None:
    net = gp.ShortcutMLP(4, [6], 2)
    lm = gp.LatencyModel(
        coef=tuple([1.0] * 7),
        batch_size=1,
        threads=1,
        sample_shape=(1, 4),
        spec=net.spec,
        median_error=0.0,
        max_error=0.0,
        samples=4,
    )
    assert gp.LatencyModel.from_json(lm.to_json()) == lm
    with pytest.raises(ValueError, match="duplicated JSON key"):
        gp.LatencyModel.from_json(_duplicate_first_key(lm.to_json()))
    glm = gp.GatedLatencyModel((0.1, 0.01, 1e-7), 1, 1, (1, 1, 40), "ab12", 0.05, 0.1, 8)
    assert gp.GatedLatencyModel.from_json(glm.to_json()) == glm
    with pytest.raises(ValueError, match="duplicated JSON key"):
        gp.GatedLatencyModel.from_json(_duplicate_first_key(glm.to_json()))


def test_a_resnet_plan_with_a_repeated_key_is_refused(tmp_path: Path) -> None:
    net = build_resnet_demo_model((8,), (2,))
    gate_(net, torch.zeros(1, 1, 40), channels=True, blocks=True)
    pruned = gp.prune(net.eval()).eval()
    save_pruned_resnet(pruned, export_plan(net), tmp_path, widths=(8,), blocks=(2,))
    load_pruned_resnet(tmp_path)  # as written: fine
    plan = tmp_path / "plan.json"
    plan.write_text(_duplicate_first_key(plan.read_text()))
    with pytest.raises(ValueError, match=r"plan\.json: not a readable plan .*duplicated JSON key"):
        load_pruned_resnet(tmp_path)
